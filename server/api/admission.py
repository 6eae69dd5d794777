"""Which engine requests the API layer has in flight: the queue cap (429 while too many wait), refusal while
draining (503), and the set of live engine requests that a drain which ran out of time aborts."""
from __future__ import annotations

from server.api.protocol import APIError
from server.engine.engine import AsyncEngine

RETRY_AFTER_SECONDS = 1


class Ticket:
    """One HTTP request's hold on `count` admission slots (one per engine request, i.e. per choice). Each choice
    gives its slot back when it ends; the response gives back whatever is left when it ends, however it ends
    (a streaming body that never started included), so slots never leak."""

    def __init__(self, admission: "Admission", count: int):
        self._admission = admission
        self.count = count

    def release(self, count: int = 1) -> None:
        count = min(count, self.count)
        self.count -= count
        self._admission.admitted -= count

    def close(self) -> None:
        self.release(self.count)


class Admission:
    def __init__(self, engine: AsyncEngine, max_queue_len: int | None = None):
        self.engine = engine
        self.max_queue_len = max_queue_len
        self.admitted = 0               # engine requests held by live tickets
        self.live: set[str] = set()     # engine request ids submitted and not yet finished
        self.draining = False           # SIGTERM: admit nothing new
        self.closed = False             # the drain ran out of time: in-flight requests were aborted

    @property
    def num_waiting(self) -> int:
        """Engine requests admitted but not running: in the scheduler's waiting queue (preempted ones included)
        or still on their way to it. Counted here rather than read from the scheduler alone, so that a burst
        arriving within one event-loop turn sees its own earlier members."""
        return max(self.admitted - self.engine.snapshot().num_running, 0)

    def admit(self, count: int) -> Ticket:
        if self.draining:
            raise APIError("The server is shutting down; it accepts no new requests.", status=503,
                           code="shutting_down")
        if self.max_queue_len is not None:
            waiting = self.num_waiting
            if waiting >= self.max_queue_len:
                raise APIError(f"The server is overloaded: {waiting} requests are waiting to run "
                               f"(--max-queue-len {self.max_queue_len}). Retry shortly.", status=429,
                               code="queue_full", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        self.admitted += count
        return Ticket(self, count)

    def abort_all(self) -> int:
        """End every in-flight engine request with finish_reason "abort" (their clients get that answer), and
        any that would start later too. Returns how many were aborted."""
        self.closed = True
        live = list(self.live)
        for request_id in live:
            self.engine.abort(request_id)
        return len(live)
