"""The two ways SDG fails: SDGError stops the run with a one-line message (bad flags, unreachable server, a reward
URL that is not a reward model); RequestFailed is one request that failed after its retries, which the stages
record in the summary and move past, so one bad prompt never costs the rest of the run."""
from __future__ import annotations


class SDGError(Exception):
    """A problem the user must fix; `n4-train sdg` prints `n4-train sdg: error: <message>` and exits non-zero."""


class RequestFailed(Exception):
    """One HTTP request that failed for good: a non-retryable status, or retries exhausted."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status  # None: no HTTP answer at all (connection refused, timeout)
        self.code = code      # the OpenAI error envelope's `code`, e.g. "not_a_reward_model"
