"""One generation request as the engine sees it: token ids in, token ids out. No text here."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from server.engine.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"          # back in the waiting queue; its KV was dropped and will be recomputed
    FINISHED_STOPPED = "stop"        # EOS, a stop token id, or (decided by the API layer) a stop string
    FINISHED_LENGTH = "length"       # max_tokens or the model's context length
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return self.value if self in _FINISHED else None


# A set, not a tuple scan through the enum: the engine asks every request every step (0.43 -> 0.11 us a call).
_FINISHED = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED})


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None = None
    arrival_time: float = field(default_factory=time.monotonic)

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens (prompt then output) whose K/V are in the cache. A request is "in prefill" while this is below
    # num_tokens - 1 ... precisely: the next forward pass runs tokens [num_computed_tokens, num_tokens).
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)   # the request's block table
    num_cached_tokens: int = 0       # prompt tokens served from the prefix cache at the last admission
    num_preemptions: int = 0
    # Why a FINISHED_STOPPED request stopped, as in vLLM: the stop token id (or the stop string, set by the API
    # layer); None for EOS or any other finish.
    stop_reason: int | str | None = None
    # Prompt positions whose logprobs were already returned (so a recompute after preemption skips them).
    num_prompt_logprobs_done: int = 0
    # Prompt positions already counted in the prompt_tokens metric (a recompute after preemption counts none again).
    num_prompt_tokens_counted: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_at(self, position: int) -> int:
        """Token `position` of prompt + output (a decode step's one input token), without building a list."""
        num_prompt = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < num_prompt else self.output_token_ids[position - num_prompt]

    def token_ids_between(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without copying the whole sequence (a decode step asks for
        one token of a sequence that may be thousands long)."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt:end - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - num_prompt]

    @property
    def is_finished(self) -> bool:
        return self.status in _FINISHED
