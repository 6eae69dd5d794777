"""What `n4 serve` flags set for the HTTP layer (the engine has its own EngineConfig)."""
from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_MAX_REQUEST_BODY_BYTES = 8 << 20   # 8 MiB: a full 4096-token context as JSON ids is ~30 KiB


@dataclass(frozen=True)
class ServerConfig:
    api_key: str | None = None              # Bearer token required on every route but /health, /metrics, /version
    max_queue_len: int | None = None        # new requests get 429 while this many engine requests wait
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    shutdown_timeout: float = 30.0          # seconds SIGTERM waits for in-flight requests before aborting them

    def __post_init__(self):
        if self.api_key is not None and not self.api_key:
            raise ValueError("--api-key must not be empty")
        if self.max_queue_len is not None and (not isinstance(self.max_queue_len, int) or self.max_queue_len <= 0):
            raise ValueError(f"--max-queue-len must be a positive integer, got {self.max_queue_len!r}")
        if not isinstance(self.max_request_body_bytes, int) or self.max_request_body_bytes <= 0:
            raise ValueError(f"--max-request-body-bytes must be a positive integer, "
                             f"got {self.max_request_body_bytes!r}")
        if not math.isfinite(self.shutdown_timeout) or self.shutdown_timeout < 0:
            raise ValueError(f"--shutdown-timeout must be a non-negative number of seconds, "
                             f"got {self.shutdown_timeout}")
