"""Scheduler driven by a fake model that keeps a simulated paged KV cache.

The fake model writes each scheduled token id into the slot its block table points at, and "samples" from the
token ids it reads back through the block table. So a wrong block table, a prefix-cache hit on the wrong block,
or a write into a block shared with another request shows up as a failed assertion or a different output.
"""
from __future__ import annotations

import random

import pytest

from server.engine.block_manager import BlockManager
from server.engine.config import EngineConfig
from server.engine.request import Request, RequestStatus
from server.engine.sampling import SamplingParams
from server.engine.scheduler import Scheduler, SchedulerOutput

BLOCK = 4


def next_token(tokens: list[int]) -> int:
    """The fake model: a deterministic function of the whole sequence, never 0..9 (kept for EOS/stop tests)."""
    return (sum((i + 1) * t for i, t in enumerate(tokens)) * 31 + len(tokens)) % 990 + 10


class FakeModel:
    def __init__(self, manager: BlockManager):
        self.manager = manager
        self.kv: dict[int, list[int | None]] = {}   # block id -> token id per slot

    def step(self, output: SchedulerOutput) -> dict[str, int]:
        for scheduled in output.scheduled:
            request = scheduled.request
            assert scheduled.start == request.num_computed_tokens
            end = scheduled.start + scheduled.num_new_tokens
            assert len(request.block_ids) * BLOCK >= end, "block table too short"
            tokens = request.all_token_ids
            for position in range(scheduled.start, end):
                block_id = request.block_ids[position // BLOCK]
                assert self.manager.blocks[block_id].ref_count == 1, "writing into a shared block"
                self.kv.setdefault(block_id, [None] * BLOCK)[position % BLOCK] = tokens[position]
        sampled = {}
        for scheduled in output.scheduled:        # attention reads after every write of the step
            if scheduled.needs_sample:
                request = scheduled.request
                end = scheduled.start + scheduled.num_new_tokens
                seen = [self.kv[request.block_ids[p // BLOCK]][p % BLOCK] for p in range(end)]
                assert seen == request.all_token_ids[:end], "KV cache does not hold the request's tokens"
                sampled[request.request_id] = next_token(seen)
        return sampled


def make_scheduler(num_blocks=64, max_num_seqs=8, budget=32, max_model_len=256, prefix_caching=False):
    config = EngineConfig(max_model_len=max_model_len, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                          block_size=BLOCK, enable_prefix_caching=prefix_caching)
    manager = BlockManager(num_blocks, BLOCK, prefix_caching)
    return Scheduler(config, manager), manager


def make_request(request_id, prompt, eos=None, **params) -> Request:
    params.setdefault("max_tokens", 8)
    return Request(request_id, list(prompt), SamplingParams(**params), eos_token_id=eos)


def check_step(scheduler: Scheduler, output: SchedulerOutput) -> None:
    config = scheduler.config
    assert output.total_num_scheduled_tokens <= config.max_num_batched_tokens
    assert scheduler.num_running <= config.max_num_seqs
    ids = [s.request.request_id for s in output.scheduled]
    assert len(ids) == len(set(ids))
    assert all(s.num_new_tokens >= 1 for s in output.scheduled)
    assert not {r.request_id for r in scheduler.running} & {r.request_id for r in scheduler.waiting}


def run(scheduler: Scheduler, model: FakeModel, on_step=None, max_steps=10_000):
    """Step until nothing is left. Returns (finished requests by id, per-step [(id, start, n)] lists)."""
    finished, steps = {}, []
    while scheduler.has_unfinished_requests:
        assert len(steps) < max_steps, "no progress"
        output = scheduler.schedule()
        check_step(scheduler, output)
        steps.append([(s.request.request_id, s.start, s.num_new_tokens) for s in output.scheduled])
        sampled = model.step(output)
        for request in scheduler.update(output, sampled):
            finished[request.request_id] = request
        if on_step:
            on_step(len(steps), output)
    return finished, steps


def assert_no_leaks(manager: BlockManager) -> None:
    assert manager.num_free_blocks == manager.num_blocks
    assert all(block.ref_count == 0 for block in manager.blocks)
    assert manager._request_block_hashes == {}


def random_requests(count, seed=0, shared_prefix=()):
    rng = random.Random(seed)
    return [make_request(f"r{i}", list(shared_prefix) + [rng.randrange(10, 1000) for _ in range(rng.randrange(1, 40))],
                         max_tokens=rng.randrange(1, 20)) for i in range(count)]


def outputs_of(scheduler, manager, requests, **kwargs):
    for request in requests:
        scheduler.add_request(request)
    finished, steps = run(scheduler, FakeModel(manager), **kwargs)
    assert_no_leaks(manager)
    return {rid: r.output_token_ids for rid, r in finished.items()}, finished, steps


# ---- batching ----

def test_budget_and_max_num_seqs_respected_and_everything_finishes():
    scheduler, manager = make_scheduler(num_blocks=128, max_num_seqs=3, budget=16)
    outputs, finished, steps = outputs_of(scheduler, manager, random_requests(12))
    assert len(finished) == 12
    assert all(r.status == RequestStatus.FINISHED_LENGTH for r in finished.values())
    assert all(len(out) == finished[rid].sampling_params.max_tokens for rid, out in outputs.items())
    assert max(len(step) for step in steps) == 3
    assert scheduler.num_running == scheduler.num_waiting == 0


def test_chunked_prefill_is_contiguous_then_decodes():
    scheduler, manager = make_scheduler(budget=16)
    scheduler.add_request(make_request("long", range(10, 110), max_tokens=3))
    _, steps = run(scheduler, FakeModel(manager))
    chunks = [step[0][1:] for step in steps]
    assert chunks == [(0, 16), (16, 16), (32, 16), (48, 16), (64, 16), (80, 16), (96, 4), (100, 1), (101, 1)]


def test_decodes_are_scheduled_before_new_prompts():
    scheduler, manager = make_scheduler(budget=8)
    model = FakeModel(manager)
    scheduler.add_request(make_request("a", range(10, 16)))
    scheduler.update(output := scheduler.schedule(), model.step(output))
    scheduler.add_request(make_request("b", range(20, 40)))
    output = scheduler.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in output.scheduled] == [("a", 1), ("b", 7)]
    assert output.num_scheduled_tokens == {"a": 1, "b": 7}
    assert [s.needs_sample for s in output.scheduled] == [True, False]
    scheduler.update(output, model.step(output))
    output = scheduler.schedule()                # b's prompt continues behind a's decode
    assert [(s.request.request_id, s.start, s.num_new_tokens) for s in output.scheduled] == [("a", 7, 1),
                                                                                           ("b", 7, 7)]


def test_waiting_queue_is_fifo_without_skipping_ahead():
    scheduler, manager = make_scheduler(num_blocks=8, budget=64)
    scheduler.add_request(make_request("first", range(10, 30), max_tokens=4))    # 5 blocks
    scheduler.add_request(make_request("big", range(10, 26), max_tokens=4))      # 4 blocks: does not fit now
    scheduler.add_request(make_request("small", [10, 11], max_tokens=1))         # would fit, must wait
    output = scheduler.schedule()
    assert [s.request.request_id for s in output.scheduled] == ["first"]
    assert [r.request_id for r in scheduler.waiting] == ["big", "small"]
    assert output.scheduled[0].request.first_scheduled_time is not None
    assert scheduler.requests["big"].first_scheduled_time is None


# ---- preemption ----

def test_preemption_recomputes_and_gives_the_same_outputs():
    requests_big = random_requests(10, seed=3)
    requests_small = random_requests(10, seed=3)
    big, big_manager = make_scheduler(num_blocks=256, max_num_seqs=8, budget=32)
    expected, _, _ = outputs_of(big, big_manager, requests_big)
    assert big.num_preemptions == 0
    small, small_manager = make_scheduler(num_blocks=16, max_num_seqs=8, budget=32)
    preempted_seen = []
    got, finished, _ = outputs_of(small, small_manager, requests_small,
                                  on_step=lambda i, out: preempted_seen.extend(out.preempted))
    assert small.num_preemptions > 0 and len(preempted_seen) == small.num_preemptions
    assert sum(r.num_preemptions for r in finished.values()) == small.num_preemptions
    assert got == expected


def test_most_recently_admitted_is_preempted_and_goes_to_the_front():
    scheduler, manager = make_scheduler(num_blocks=4, budget=64)
    model = FakeModel(manager)
    scheduler.add_request(make_request("a", range(10, 14), max_tokens=8))   # 1 block, needs a 2nd to decode
    scheduler.add_request(make_request("b", range(20, 32), max_tokens=4))   # 3 blocks
    scheduler.add_request(make_request("c", [5], max_tokens=1))
    output = scheduler.schedule()
    assert [s.request.request_id for s in output.scheduled] == ["a", "b"] and manager.num_free_blocks == 0
    scheduler.update(output, model.step(output))
    output = scheduler.schedule()                # a's 5th token needs a block: b is evicted, a continues
    assert output.preempted == [scheduler.requests["b"]]
    assert [s.request.request_id for s in output.scheduled] == ["a"]   # no admissions in a preempting step
    b = scheduler.requests["b"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and b.block_ids == []
    assert b.num_preemptions == 1 and len(b.output_token_ids) == 1
    assert [r.request_id for r in scheduler.waiting] == ["b", "c"]
    scheduler.update(output, model.step(output))
    finished, _ = run(scheduler, model)
    assert len(finished) == 3
    assert_no_leaks(manager)


def test_self_preemption_of_the_last_running_request():
    # running = [a, b]: a is scheduled first and takes the last free block; b, the last one, must evict itself.
    scheduler, manager = make_scheduler(num_blocks=4, budget=64)
    model = FakeModel(manager)
    scheduler.add_request(make_request("a", range(10, 18), max_tokens=4))   # 2 blocks, a 3rd on the first decode
    scheduler.add_request(make_request("b", range(20, 24), max_tokens=4))   # 1 block, a 2nd on the first decode
    scheduler.update(output := scheduler.schedule(), model.step(output))
    assert manager.num_free_blocks == 1
    output = scheduler.schedule()
    assert [s.request.request_id for s in output.scheduled] == ["a"]
    assert [r.request_id for r in output.preempted] == ["b"]
    scheduler.update(output, model.step(output))
    finished, _ = run(scheduler, model)
    assert finished["b"].num_preemptions == 1 and len(finished["b"].output_token_ids) == 4
    assert_no_leaks(manager)


def test_no_admissions_in_a_step_that_preempted():
    scheduler, manager = make_scheduler(num_blocks=5, budget=9)
    model = FakeModel(manager)
    scheduler.add_request(make_request("a", range(10, 14), max_tokens=8))
    scheduler.add_request(make_request("b", range(20, 40), max_tokens=1))   # chunked: 5 tokens, then 8, ...
    scheduler.update(output := scheduler.schedule(), model.step(output))
    output = scheduler.schedule()
    # b's next chunk needs 2 more blocks, 1 is free: b (last) evicts itself. Its first chunk (2 blocks) would
    # fit again right away, but readmitting it in the same step would only thrash.
    assert [r.request_id for r in output.preempted] == ["b"]
    assert [s.request.request_id for s in output.scheduled] == ["a"]
    scheduler.update(output, model.step(output))
    finished, _ = run(scheduler, model)
    assert len(finished) == 2 and finished["b"].num_preemptions >= 1
    assert_no_leaks(manager)


# ---- aborts and leaks ----

@pytest.mark.parametrize("prefix_caching", [False, True])
def test_aborts_anywhere_leak_nothing(prefix_caching):
    scheduler, manager = make_scheduler(num_blocks=32, budget=8, prefix_caching=prefix_caching)
    model = FakeModel(manager)
    for request in random_requests(6, seed=5, shared_prefix=range(100, 110)):
        scheduler.add_request(request)
    scheduler.add_request(make_request("long", range(10, 60), max_tokens=4))
    aborted = []

    def abort_some(step, output):
        if step == 1:
            aborted.extend(scheduler.abort_requests(["r5", "nope"]))          # waiting (and an unknown id)
        if step == 3:
            mid_prefill = [r for r in scheduler.running if r.num_computed_tokens < r.num_prompt_tokens]
            aborted.extend(scheduler.abort_requests(r.request_id for r in mid_prefill[:1]))
        if step == 8:
            decoding = [r for r in scheduler.running if r.num_output_tokens > 0]
            aborted.extend(scheduler.abort_requests([r.request_id for r in decoding[:1]]))

    finished, _ = run(scheduler, model, on_step=abort_some)
    assert len(aborted) == 3 and all(r.status == RequestStatus.FINISHED_ABORTED for r in aborted)
    assert not {r.request_id for r in aborted} & set(finished)
    assert_no_leaks(manager)
    assert scheduler.abort_requests(["r0"]) == []                             # already finished: ignored


def test_abort_between_schedule_and_update():
    scheduler, manager = make_scheduler()
    model = FakeModel(manager)
    scheduler.add_request(make_request("a", range(10, 20)))
    scheduler.add_request(make_request("b", range(10, 20)))
    output = scheduler.schedule()
    sampled = model.step(output)
    assert [r.request_id for r in scheduler.abort_requests("a")] == ["a"]
    assert scheduler.update(output, sampled) == []
    a = output.scheduled[0].request
    assert a.output_token_ids == [] and a.block_ids == [] and a.status == RequestStatus.FINISHED_ABORTED
    scheduler.abort_requests("b")
    assert_no_leaks(manager)
    assert not scheduler.has_unfinished_requests


def test_finish_requests_for_a_stop_string():
    scheduler, manager = make_scheduler()
    model = FakeModel(manager)
    scheduler.add_request(make_request("a", range(10, 20)))
    scheduler.update(output := scheduler.schedule(), model.step(output))
    [request] = scheduler.finish_requests(["a"], RequestStatus.FINISHED_STOPPED)
    assert request.status.finish_reason == "stop" and request.block_ids == []
    assert not scheduler.has_unfinished_requests and manager.num_free_blocks == manager.num_blocks
    with pytest.raises(ValueError):
        scheduler.finish_requests(["a"], RequestStatus.RUNNING)


# ---- prefix caching ----

def test_prefix_cache_hits_in_whole_blocks_with_shared_blocks():
    scheduler, manager = make_scheduler(budget=64, prefix_caching=True)
    model = FakeModel(manager)
    prefix = list(range(100, 110))                               # 10 tokens: 2 whole blocks + 2
    scheduler.add_request(make_request("a", prefix + [1, 2], max_tokens=6))
    scheduler.update(output := scheduler.schedule(), model.step(output))
    scheduler.add_request(make_request("b", prefix + [3, 4, 5], max_tokens=6))
    output = scheduler.schedule()
    a, b = scheduler.requests["a"], scheduler.requests["b"]
    assert b.num_cached_tokens == 8 and output.scheduled[1].start == 8 and output.scheduled[1].num_new_tokens == 5
    assert b.block_ids[:2] == a.block_ids[:2]
    assert [manager.blocks[i].ref_count for i in a.block_ids[:2]] == [2, 2]
    assert manager.prefix_cache_hits == 8 and manager.prefix_cache_queries == 12 + 13
    scheduler.update(output, model.step(output))
    finished, _ = run(scheduler, model)
    assert_no_leaks(manager)
    # Cached blocks outlive their requests: the same prompt again hits (all but the last token's block).
    scheduler.add_request(make_request("c", prefix + [1, 2], max_tokens=1))
    scheduler.schedule()
    assert scheduler.requests["c"].num_cached_tokens == 8


def test_prefix_caching_gives_the_same_outputs():
    shared = list(range(200, 223))
    plain, plain_manager = make_scheduler(num_blocks=64, budget=16)
    expected, _, _ = outputs_of(plain, plain_manager, random_requests(10, seed=7, shared_prefix=shared))
    cached, cached_manager = make_scheduler(num_blocks=64, budget=16, prefix_caching=True)
    got, finished, _ = outputs_of(cached, cached_manager, random_requests(10, seed=7, shared_prefix=shared))
    assert got == expected
    assert cached_manager.prefix_cache_hits > 0 and cached_manager.prefix_cache_hits % BLOCK == 0
    assert all(r.num_cached_tokens % BLOCK == 0 for r in finished.values())


def test_prefix_caching_with_preemption_gives_the_same_outputs():
    shared = list(range(300, 309))
    plain, plain_manager = make_scheduler(num_blocks=256, budget=32)
    expected, _, _ = outputs_of(plain, plain_manager, random_requests(12, seed=11, shared_prefix=shared))
    tight, tight_manager = make_scheduler(num_blocks=20, budget=32, prefix_caching=True)
    got, _, _ = outputs_of(tight, tight_manager, random_requests(12, seed=11, shared_prefix=shared))
    assert tight.num_preemptions > 0
    assert got == expected


def test_prompt_logprobs_requests_skip_the_prefix_cache():
    scheduler, manager = make_scheduler(prefix_caching=True)
    model = FakeModel(manager)
    scheduler.add_request(make_request("a", range(10, 22), max_tokens=1))
    run(scheduler, model)
    scheduler.add_request(make_request("b", range(10, 22), max_tokens=1, prompt_logprobs=2))
    output = scheduler.schedule()
    assert output.scheduled[0].start == 0 and scheduler.requests["b"].num_cached_tokens == 0


# ---- stop conditions (scripted samples) ----

def run_scripted(request: Request, script: list[int], max_model_len=256) -> Request:
    scheduler, manager = make_scheduler(max_model_len=max_model_len)
    scheduler.add_request(request)
    tokens = iter(script)
    while scheduler.has_unfinished_requests:
        output = scheduler.schedule()
        scheduler.update(output, {s.request.request_id: next(tokens) for s in output.scheduled if s.needs_sample})
    assert manager.num_free_blocks == manager.num_blocks
    return request


def test_eos_stops_but_only_after_min_tokens():
    request = run_scripted(make_request("a", [10, 11], eos=2, max_tokens=10), [50, 2, 51])
    assert request.output_token_ids == [50, 2] and request.status == RequestStatus.FINISHED_STOPPED
    assert request.stop_reason is None
    request = run_scripted(make_request("a", [10, 11], eos=2, max_tokens=10, min_tokens=3), [2, 2, 2, 51])
    assert request.output_token_ids == [2, 2, 2] and request.status == RequestStatus.FINISHED_STOPPED


def test_ignore_eos():
    request = run_scripted(make_request("a", [10], eos=2, max_tokens=3, ignore_eos=True), [2, 2, 2])
    assert request.output_token_ids == [2, 2, 2] and request.status == RequestStatus.FINISHED_LENGTH


def test_stop_token_ids_record_the_reason():
    params = dict(max_tokens=10, stop_token_ids=(5, 6))
    request = run_scripted(make_request("a", [10], eos=2, **params), [50, 6, 51])
    assert request.output_token_ids == [50, 6] and request.status == RequestStatus.FINISHED_STOPPED
    assert request.stop_reason == 6
    request = run_scripted(make_request("a", [10], eos=2, min_tokens=2, **params), [5, 5, 51])
    assert request.output_token_ids == [5, 5] and request.stop_reason == 5


def test_max_tokens_and_max_model_len():
    request = run_scripted(make_request("a", [10], max_tokens=3), [50, 51, 52, 53])
    assert request.output_token_ids == [50, 51, 52] and request.status.finish_reason == "length"
    request = run_scripted(make_request("a", [10, 11, 12], max_tokens=100), list(range(50, 80)), max_model_len=8)
    assert request.num_tokens == 8 and request.status == RequestStatus.FINISHED_LENGTH


def test_max_tokens_zero_finishes_after_the_prompt_without_sampling():
    scheduler, manager = make_scheduler(budget=8)
    scheduler.add_request(make_request("echo", range(10, 30), max_tokens=0, prompt_logprobs=1))
    finished, steps = run(scheduler, FakeModel(manager))
    echo = finished["echo"]
    assert echo.output_token_ids == [] and echo.status == RequestStatus.FINISHED_LENGTH
    assert [s[0][1:] for s in steps] == [(0, 8), (8, 8), (16, 4)]
    assert_no_leaks(manager)


def test_add_request_rejects_what_can_never_run():
    scheduler, _ = make_scheduler(num_blocks=4, max_model_len=64)
    with pytest.raises(ValueError, match="max_model_len"):
        scheduler.add_request(make_request("long", range(65)))
    with pytest.raises(ValueError, match="KV blocks"):
        scheduler.add_request(make_request("huge", range(20), max_tokens=0))
    with pytest.raises(ValueError, match="KV blocks"):
        scheduler.add_request(make_request("grows", range(10), max_tokens=8))   # KV for 17 tokens: 5 blocks
    scheduler.add_request(make_request("ok", range(10), max_tokens=7))         # KV for 16 tokens: 4 blocks
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add_request(make_request("ok", range(10)))


def test_request_token_views_agree_with_the_whole_sequence():
    """token_at and token_ids_between (the runner's per-step views) read prompt + output as one sequence."""
    request = make_request("r", [11, 12, 13])
    request.output_token_ids += [21, 22]
    whole = request.all_token_ids
    assert [request.token_at(i) for i in range(len(whole))] == whole
    for start in range(len(whole) + 1):
        for end in range(start, len(whole) + 1):
            assert request.token_ids_between(start, end) == whole[start:end]
