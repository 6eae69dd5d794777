"""Continuous batching with chunked prefill (vLLM v1 style): no prefill and decode phases, one token budget.

Each step every request simply gets "the tokens it has not computed yet", capped by the step's token budget:
a decoding request needs 1, a prompt needs the rest of its prompt (split into chunks across steps when the
budget is short). Running requests are served first, in admission order, so decodes are never starved by new
prompts; then waiting requests are admitted FIFO. When KV blocks run out, the most recently admitted running
request is preempted by recompute: its blocks are freed and it goes back to the front of the waiting queue.

max_tokens == 0 (echo-only prompt scoring): the request runs its prompt and finishes with FINISHED_LENGTH as soon
as the whole prompt is computed; it is never sampled (needs_sample is False) and gets no output token.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from server.engine.block_manager import BlockManager
from server.engine.config import EngineConfig
from server.engine.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    start: int                      # == request.num_computed_tokens when scheduled: the chunk is [start, start + n)
    # The chunk reaches the end of the known tokens, so the last position's logits give the next token.
    # A snapshot taken at scheduling time (update() appends tokens afterwards); False for max_tokens == 0.
    needs_sample: bool = field(init=False)

    def __post_init__(self):
        self.needs_sample = (self.start + self.num_new_tokens == self.request.num_tokens
                             and self.request.sampling_params.max_tokens > 0)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)   # batch order
    preempted: list[Request] = field(default_factory=list)            # KV dropped this step; will recompute

    @property
    def num_scheduled_tokens(self) -> dict[str, int]:
        return {s.request.request_id: s.num_new_tokens for s in self.scheduled}

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []          # admission order; the last one is preempted first
        self.requests: dict[str, Request] = {}    # every unfinished request, by id
        self.num_preemptions = 0                  # total since start (metric: num_preemptions_total)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if not 0 < request.num_prompt_tokens <= self.config.max_model_len:
            raise ValueError(f"the prompt has {request.num_prompt_tokens} tokens; it must have between 1 and "
                             f"max_model_len ({self.config.max_model_len})")
        # A request whose KV can never fit the whole pool would wait (or preempt itself) forever. Its KV peaks
        # at every token but the last sampled one; a pool that holds max_model_len tokens never refuses here.
        max_kv_tokens = max(request.num_prompt_tokens,
                            min(request.num_prompt_tokens + request.sampling_params.max_tokens,
                                self.config.max_model_len) - 1)
        block_size = self.block_manager.block_size
        if -(-max_kv_tokens // block_size) > self.block_manager.num_blocks:
            raise ValueError(f"the request needs KV for {max_kv_tokens} tokens, more KV blocks than the cache has "
                             f"({self.block_manager.num_blocks} blocks of {block_size} tokens)")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    # ---- scheduling ----

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        budget = self._schedule_running(output, self.config.max_num_batched_tokens)
        # A step that had to preempt is short of blocks: admitting new prompts now would only thrash.
        if not output.preempted:
            self._schedule_waiting(output, budget)
        return output

    def _schedule_running(self, output: SchedulerOutput, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new_tokens = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.block_manager.allocate_slots(request, num_new_tokens):
                # Victims come from the end, i.e. after `index`, so none of them was scheduled this step.
                victim = self.running.pop()
                self._preempt(victim)
                output.preempted.append(victim)
                if victim is request:   # it was the last running request and still does not fit
                    return budget
            output.scheduled.append(ScheduledRequest(request, num_new_tokens, request.num_computed_tokens))
            budget -= num_new_tokens
            index += 1
        return budget

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)   # first back in: it was admitted before everything still waiting

    def _schedule_waiting(self, output: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            computed_blocks, num_cached_tokens = None, 0
            # prompt_logprobs needs logits at every prompt position, so nothing may be skipped.
            if self.block_manager.enable_prefix_caching and request.sampling_params.prompt_logprobs is None:
                computed_blocks, num_cached_tokens = self.block_manager.get_computed_blocks(request)
            # Recompute after a preemption covers the outputs too: num_tokens, not num_prompt_tokens.
            num_new_tokens = min(request.num_tokens - num_cached_tokens, budget)
            if not self.block_manager.allocate_slots(request, num_new_tokens, computed_blocks):
                break   # no skipping ahead: a big prompt at the head must not be starved by small ones
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_cached_tokens
            request.num_cached_tokens = min(num_cached_tokens, request.num_prompt_tokens)
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            output.scheduled.append(ScheduledRequest(request, num_new_tokens, num_cached_tokens))
            budget -= num_new_tokens

    # ---- after the forward pass ----

    def update(self, output: SchedulerOutput, sampled_token_ids: dict[str, int]) -> list[Request]:
        """Account the step: advance computed tokens, append sampled tokens, apply stop conditions, cache newly
        full blocks, free finished requests. Returns the requests that finished in this update."""
        finished: list[Request] = []
        for scheduled in output.scheduled:
            request = scheduled.request
            if request.is_finished:   # aborted while the step was running; its blocks are already freed
                continue
            request.num_computed_tokens += scheduled.num_new_tokens
            status = None
            if scheduled.needs_sample:
                token_id = sampled_token_ids[request.request_id]
                request.output_token_ids.append(token_id)
                if request.first_token_time is None:
                    request.first_token_time = time.monotonic()
                status = self._check_stop(request, token_id)
            elif request.sampling_params.max_tokens == 0 and request.num_computed_tokens >= request.num_prompt_tokens:
                status = RequestStatus.FINISHED_LENGTH
            # Before freeing, so a finished request's prompt and output blocks stay reusable (e.g. multi-turn chat).
            self.block_manager.cache_full_blocks(request)
            if status is not None:
                request.status = status
                self.block_manager.free(request)
                del self.requests[request.request_id]
                finished.append(request)
        if finished:
            self.running = [r for r in self.running if not r.is_finished]
        return finished

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.sampling_params
        min_tokens_reached = request.num_output_tokens >= params.min_tokens
        if min_tokens_reached and not params.ignore_eos and token_id == request.eos_token_id:
            return RequestStatus.FINISHED_STOPPED
        if min_tokens_reached and token_id in params.stop_token_ids:
            request.stop_reason = token_id
            return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= params.max_tokens or request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    # ---- finishing from outside (abort, stop strings) ----

    def finish_requests(self, request_ids: str | Iterable[str], status: RequestStatus) -> list[Request]:
        """Finish waiting or running requests with `status` and free their blocks; unknown or already finished
        ids are ignored. The API layer uses it with FINISHED_STOPPED when a stop string matched."""
        if not status.finished:
            raise ValueError(f"{status} is not a finished status")
        ids = [request_ids] if isinstance(request_ids, str) else dict.fromkeys(request_ids)   # dedupe, keep order
        finished = [self.requests.pop(request_id) for request_id in ids if request_id in self.requests]
        if not finished:
            return []
        for request in finished:
            request.status = status
            self.block_manager.free(request)
        self.running = [r for r in self.running if not r.is_finished]
        self.waiting = deque(r for r in self.waiting if not r.is_finished)
        return finished

    def abort_requests(self, request_ids: str | Iterable[str]) -> list[Request]:
        return self.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)
