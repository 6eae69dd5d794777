"""Randomized invariant checks of the scheduler + block manager (and the real engine on a tiny model).

A seeded driver adds requests at random steps (some sharing prefixes, some with max_tokens 0, min_tokens, EOS or
stop token ids), aborts or stop-finishes random requests (waiting, mid-prefill, decoding, and between schedule
and update), and runs a small KV pool that forces preemption. After every step it checks the bookkeeping from
scratch: ref counts equal the number of live owners, the free queue is exactly the unreferenced blocks, the
prefix-cache map and block hashes agree, every cached block still holds the KV its hash names, every live
request's computed positions hold its own KV, and every output equals what the model would generate alone.
"""
from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from server.engine.block_manager import BlockManager, hash_block_tokens
from server.engine.config import EngineConfig
from server.engine.request import Request, RequestStatus
from server.engine.sampling import SamplingParams
from server.engine.scheduler import Scheduler, SchedulerOutput

BLOCK = 4
EOS = 11
MOTIFS = {size: [[12] * size, list(range(20, 20 + size))] for size in (1, 2, 4, 8, 16)}


def next_token(tokens: list[int]) -> int:
    """The fake model: a deterministic function of the whole sequence over a small range (10..29), so EOS and stop
    token ids come up within a few steps."""
    return (sum((i + 7) * t for i, t in enumerate(tokens)) * 2654435761 + len(tokens)) % 20 + 10


class FakeKV:
    """A simulated paged KV cache. Like real K/V, a slot's content depends on the whole prefix, not only on its
    token: each scheduled position stores the tuple of tokens [0, position]. A sampling request "attends" by reading
    its whole sequence back through the block table, so a block reused in another context (a wrong prefix hit)
    shows up as well as a wrong or overwritten one."""

    def __init__(self, manager: BlockManager):
        self.manager = manager
        self.kv: dict[int, list[tuple[int, ...] | None]] = {}   # block id -> prefix per slot

    def step(self, output: SchedulerOutput) -> dict[str, int]:
        for s in output.scheduled:
            request = s.request
            assert s.start == request.num_computed_tokens
            for position in range(s.start, s.start + s.num_new_tokens):
                block = self.manager.blocks[request.block_ids[position // BLOCK]]
                assert block.ref_count == 1, "writing into a shared block"
                assert block.block_hash is None, "writing into a block registered in the prefix cache"
                slot = tuple(request.token_ids_between(0, position + 1))
                self.kv.setdefault(block.block_id, [None] * BLOCK)[position % BLOCK] = slot
        sampled = {}
        for s in output.scheduled:
            if s.needs_sample:
                end = s.start + s.num_new_tokens
                tokens = s.request.all_token_ids[:end]
                seen = [self.kv[s.request.block_ids[p // BLOCK]][p % BLOCK] for p in range(end)]
                assert seen == [tuple(tokens[:p + 1]) for p in range(end)], "the KV cache does not hold this sequence"
                sampled[s.request.request_id] = next_token(tokens)
        return sampled


def reference_outputs(request: Request, max_model_len: int) -> tuple[list[int], RequestStatus, int | None]:
    """What the request generates alone, with the stop rules spelled out independently of the scheduler."""
    params, out = request.sampling_params, []
    if params.max_tokens == 0:
        return out, RequestStatus.FINISHED_LENGTH, None
    while True:
        token = next_token(request.prompt_token_ids + out)
        out.append(token)
        if len(out) >= params.min_tokens:
            if not params.ignore_eos and token == request.eos_token_id:
                return out, RequestStatus.FINISHED_STOPPED, None
            if token in params.stop_token_ids:
                return out, RequestStatus.FINISHED_STOPPED, token
        if len(out) >= params.max_tokens or request.num_prompt_tokens + len(out) >= max_model_len:
            return out, RequestStatus.FINISHED_LENGTH, None


def check_invariants(scheduler: Scheduler, manager: BlockManager, kv: FakeKV, hash_tokens: dict) -> None:
    running_ids = {r.request_id for r in scheduler.running}
    waiting_ids = {r.request_id for r in scheduler.waiting}
    assert len(running_ids) == len(scheduler.running) and len(waiting_ids) == len(scheduler.waiting)
    assert not running_ids & waiting_ids
    assert running_ids | waiting_ids == set(scheduler.requests)
    assert len(scheduler.running) <= scheduler.config.max_num_seqs
    # Ref counts are exactly the number of live owners; waiting requests own nothing.
    owners = Counter()
    for request in scheduler.running:
        assert request.status == RequestStatus.RUNNING
        assert len(set(request.block_ids)) == len(request.block_ids)
        assert len(request.block_ids) >= math.ceil(request.num_computed_tokens / BLOCK)
        assert len(request.block_ids) <= math.ceil(request.num_tokens / BLOCK), "over-allocated"
        owners.update(request.block_ids)
    for request in scheduler.waiting:
        assert request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert request.block_ids == [] and request.num_computed_tokens == 0
    assert [b.ref_count for b in manager.blocks] == [owners[b.block_id] for b in manager.blocks]
    assert set(manager._free_queue) == {b.block_id for b in manager.blocks if b.ref_count == 0}
    # The prefix-cache map and the blocks' hashes describe each other, and every cached block still holds the
    # tokens of the prefix its hash names (a block overwritten while findable would serve wrong KV).
    assert {h: b for h, b in manager._cached_block_by_hash.items()} == {
        b.block_hash: b.block_id for b in manager.blocks if b.block_hash is not None}
    for block_hash, block_id in manager._cached_block_by_hash.items():
        assert kv.kv.get(block_id) == hash_tokens[block_hash], "a cached block lost its content"
    assert set(manager._request_block_hashes) <= running_ids
    for request in scheduler.running:
        tokens = request.all_token_ids
        for p in range(request.num_computed_tokens):
            assert kv.kv[request.block_ids[p // BLOCK]][p % BLOCK] == tuple(tokens[:p + 1]), "computed KV is wrong"
        hashes = manager._request_block_hashes.get(request.request_id, [])
        assert len(hashes) <= request.num_computed_tokens // BLOCK
        parent = None
        for index, block_hash in enumerate(hashes):
            parent = hash_block_tokens(parent, tokens[index * BLOCK:(index + 1) * BLOCK])
            assert block_hash == parent
            assert manager.blocks[request.block_ids[index]].block_hash in (None, block_hash)


def record_hashes(requests, hash_tokens: dict) -> None:
    """Test-side map: hash -> the KV a block with that hash must hold, for every full computed block of these
    requests (the hash chain is rebuilt here from the tokens, independently of the block manager's own)."""
    for request in requests:
        tokens, parent = request.all_token_ids, None
        for index in range(request.num_computed_tokens // BLOCK):
            parent = hash_block_tokens(parent, tokens[index * BLOCK:(index + 1) * BLOCK])
            content = [tuple(tokens[:p + 1]) for p in range(index * BLOCK, (index + 1) * BLOCK)]
            assert hash_tokens.setdefault(parent, content) == content


def random_request(rng: random.Random, request_id: str, prefixes: list[list[int]], max_model_len: int) -> Request:
    prompt = list(rng.choice(prefixes)) if rng.random() < 0.6 else []
    if rng.random() < 0.3:   # the same block-aligned motifs in different orders: equal blocks after other prefixes
        prompt += [t for _ in range(rng.randint(1, 4)) for t in rng.choice(MOTIFS[BLOCK])]
    prompt += [rng.randrange(10, 30) for _ in range(rng.choice([0, 1, 3, 4, 5, 8, 13]))]
    prompt = prompt[:max_model_len] or [rng.randrange(10, 30)]
    room = max_model_len - len(prompt)
    max_tokens = 0 if rng.random() < 0.1 else rng.randint(1, max(1, min(room + 4, 24)))
    params = SamplingParams(
        max_tokens=max_tokens,
        min_tokens=rng.randint(0, max_tokens) if rng.random() < 0.3 else 0,
        ignore_eos=rng.random() < 0.5,
        stop_token_ids=tuple(rng.sample(range(10, 30), rng.randint(1, 2))) if rng.random() < 0.2 else (),
        prompt_logprobs=1 if rng.random() < 0.1 else None,
    )
    return Request(request_id, prompt, params, eos_token_id=EOS)


def stress(seed: int, prefix_caching: bool, steps: int = 250) -> tuple[Scheduler, BlockManager]:
    rng = random.Random(seed)
    max_model_len = rng.choice([24, 40, 64])
    num_blocks = -(-max_model_len // BLOCK) + rng.randint(0, 6)
    config = EngineConfig(max_model_len=max_model_len, max_num_seqs=rng.randint(2, 6),
                          max_num_batched_tokens=rng.choice([3, 4, 7, 16, 32]), block_size=BLOCK,
                          enable_prefix_caching=prefix_caching)
    manager = BlockManager(num_blocks, BLOCK, prefix_caching)
    scheduler = Scheduler(config, manager)
    kv = FakeKV(manager)
    prefixes = [[rng.randrange(10, 30) for _ in range(rng.choice([4, 7, 8, 12]))] for _ in range(3)]
    hash_tokens: dict = {}
    added, ended = {}, {}     # ended: request id -> (request, cut short from outside?)

    def finish_from_outside(ids, status):
        for request in scheduler.finish_requests(ids, status):
            ended[request.request_id] = (request, True)
            assert request.block_ids == []

    step = 0
    while step < steps or scheduler.has_unfinished_requests:
        assert step < steps + 2000, "requests starved: the engine stopped making progress"
        if step < steps:
            for _ in range(rng.choice([0, 0, 0, 1, 1, 2])):
                request = random_request(rng, f"r{len(added)}", prefixes, max_model_len)
                added[request.request_id] = request
                scheduler.add_request(request)
            live = list(scheduler.requests)
            if live and rng.random() < 0.08:
                finish_from_outside([rng.choice(live)], rng.choice([RequestStatus.FINISHED_ABORTED,
                                                                     RequestStatus.FINISHED_STOPPED]))
            if prefix_caching and rng.random() < 0.02 and not scheduler.has_unfinished_requests:
                assert manager.reset_prefix_cache()
                hash_tokens.clear()
        check_invariants(scheduler, manager, kv, hash_tokens)
        output = scheduler.schedule()
        assert output.total_num_scheduled_tokens <= config.max_num_batched_tokens
        assert len({s.request.request_id for s in output.scheduled}) == len(output.scheduled)
        assert all(s.num_new_tokens >= 1 for s in output.scheduled)
        assert not {r.request_id for r in output.preempted} & {s.request.request_id for s in output.scheduled}
        sampled = kv.step(output)
        if step < steps and output.scheduled and rng.random() < 0.05:   # abort while the step "runs"
            finish_from_outside([rng.choice(output.scheduled).request.request_id], RequestStatus.FINISHED_ABORTED)
        for request in scheduler.update(output, sampled):
            ended[request.request_id] = (request, False)
        record_hashes([s.request for s in output.scheduled], hash_tokens)
        check_invariants(scheduler, manager, kv, hash_tokens)
        step += 1

    assert set(ended) == set(added)
    for request_id, (request, cut_short) in ended.items():
        expected, status, stop_reason = reference_outputs(request, max_model_len)
        if cut_short:
            assert request.output_token_ids == expected[:request.num_output_tokens]
        else:
            assert (request.output_token_ids, request.status, request.stop_reason) == (expected, status, stop_reason)
    assert manager.num_free_blocks == num_blocks and manager._request_block_hashes == {}
    return scheduler, manager


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_random_workloads_keep_every_invariant(prefix_caching):
    preemptions = hits = 0
    for seed in range(12):
        scheduler, manager = stress(seed, prefix_caching)
        preemptions += scheduler.num_preemptions
        hits += manager.prefix_cache_hits
    assert preemptions > 0                      # the pools were small enough to force recompute
    assert (hits > 0) == prefix_caching


# ---- the real engine on a tiny model ----------------------------------------------------------------------------

TINY = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=128, torch_dtype="float32")


@pytest.fixture(scope="module")
def tiny_model():
    """Random weights built in-process (no checkpoint, no transformers import: the test stays fast). std 0.15, as
    tests/utils.py explains, keeps greedy near-ties (decided by float noise between batch shapes) rare."""
    from model.config import ModelConfig
    from model.loader import init_dummy_weights
    from model.nemotron import model_class

    config = ModelConfig(**TINY)
    net = model_class(config)(config, kernel_backend="torch")
    init_dummy_weights(net, seed=4, std=0.15)
    return net.requires_grad_(False).eval(), config


def engine_workload(seed: int) -> dict[str, tuple[list[int], SamplingParams]]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(4, 256) for _ in range(n)] for n in (8, 13, 20)]
    requests = {}
    for i in range(14):
        prompt = list(rng.choice(prefixes)) + [rng.randrange(4, 256) for _ in range(rng.randint(1, 12))]
        kind = rng.random()
        if kind < 0.5:
            params = SamplingParams(max_tokens=rng.randint(1, 14), temperature=0.0, ignore_eos=True)
        elif kind < 0.75:   # seeded sampling: the request's own generator makes it reproducible under any batch
            params = SamplingParams(max_tokens=rng.randint(1, 14), temperature=1.0, seed=rng.randrange(1 << 30),
                                    top_k=rng.choice([0, 20]), top_p=rng.choice([1.0, 0.9]), ignore_eos=True)
        elif kind < 0.9:
            params = SamplingParams(max_tokens=rng.randint(1, 6), temperature=0.0, prompt_logprobs=2,
                                    ignore_eos=True)
        else:
            params = SamplingParams(max_tokens=0, prompt_logprobs=1)
        requests[f"e{i}"] = (prompt, params)
    return requests


def run_engine(model, requests, arrivals: dict[str, int], aborts: dict[int, str], **config):
    from server.engine.engine import LLMEngine

    engine = LLMEngine(*model, EngineConfig(max_model_len=64, **config))
    manager = engine.block_manager
    tokens = {rid: [] for rid in requests}
    prompt_lps = {rid: [] for rid in requests}
    reasons = {}
    step = 0
    while step <= max(arrivals.values()) or engine.has_unfinished_requests():
        assert step < 2000
        for rid, at in arrivals.items():
            if at == step:
                engine.add_request(rid, *requests[rid])
        outputs = engine.step()
        if step in aborts:
            outputs += engine.abort([aborts[step]])
        for out in outputs:
            tokens[out.request_id] += out.new_token_ids
            prompt_lps[out.request_id] += [e.logprob for e in out.prompt_logprobs]
            if out.finished:
                assert out.request_id not in reasons, "a request finished twice"
                reasons[out.request_id] = out.finish_reason
        owners = Counter(b for r in engine.scheduler.running for b in r.block_ids)
        assert [b.ref_count for b in manager.blocks] == [owners[b.block_id] for b in manager.blocks]
        assert manager.num_free_blocks == sum(1 for b in manager.blocks if b.ref_count == 0)
        step += 1
    assert manager.num_free_blocks == manager.num_blocks
    assert engine.requests == {} and engine.runner.sampler._per_request == {}
    return engine, tokens, prompt_lps, reasons


def test_engine_under_pressure_matches_an_unpressured_run(tiny_model):
    import torch

    requests = engine_workload(seed=1)
    # Reference: everything at once, a pool that never preempts, no prefix cache, whole prompts in one step.
    _, expected, expected_lps, expected_reasons = run_engine(
        tiny_model, requests, dict.fromkeys(requests, 0), {}, num_kv_blocks=256, max_num_batched_tokens=512)
    # Under test: staggered arrivals, two aborts, 20 blocks of 4 tokens (one sequence needs up to 16), 12-token
    # steps (chunked prefill), prefix caching.
    rng = random.Random(2)
    arrivals = {rid: rng.randrange(0, 30) for rid in requests}
    aborts = {6: "e3", 15: "e8"}
    engine, got, got_lps, reasons = run_engine(
        tiny_model, requests, arrivals, aborts, num_kv_blocks=20, block_size=4, max_num_batched_tokens=12,
        max_num_seqs=6, enable_prefix_caching=True)
    assert engine.scheduler.num_preemptions > 0 and engine.block_manager.prefix_cache_hits > 0
    for rid in requests:
        if reasons[rid] == "abort":
            assert got[rid] == expected[rid][:len(got[rid])]
            continue
        assert (got[rid], reasons[rid]) == (expected[rid], expected_reasons[rid]), rid
        assert len(got_lps[rid]) == len(expected_lps[rid]), rid
        torch.testing.assert_close(torch.tensor(got_lps[rid]), torch.tensor(expected_lps[rid]), atol=1e-4, rtol=0)


def test_prompt_tokens_count_each_prompt_once_through_preemptions(tiny_model):
    # The prompt_tokens metric counts computed prompt positions; a preempted request recomputing its prompt must not
    # count it again (before: 4 prompts of 20 tokens with 3 preemptions counted 140).
    rng = random.Random(3)
    requests = {f"p{i}": ([rng.randrange(4, 256) for _ in range(20)],
                          SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)) for i in range(4)}
    engine, *_ = run_engine(tiny_model, requests, dict.fromkeys(requests, 0), {}, num_kv_blocks=16, block_size=4,
                            max_num_batched_tokens=16)
    assert engine.scheduler.num_preemptions > 0
    assert engine.stats.prompt_tokens == 80
