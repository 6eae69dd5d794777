"""The engine end to end on a tiny fp32 model: continuous batching, preemption, prefix caching and chunked
prefill must not change a single greedy token or (beyond float noise) a prompt log-prob."""
from __future__ import annotations

import random

import pytest
import torch

from model.config import ModelConfig
from server.engine.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.sampling import SamplingParams
from tests.utils import make_tiny_checkpoint

CONFIG = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                     torch_dtype="float32")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("engine")), CONFIG, seed=3)


def _engine(path: str, **kwargs) -> LLMEngine:
    kwargs.setdefault("max_model_len", 256)
    kwargs.setdefault("num_kv_blocks", 256)
    return LLMEngine.from_pretrained(path, EngineConfig(**kwargs), dtype="float32")


def _run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]):
    """Add every request at once, step to completion; returns output tokens and prompt logprobs per request."""
    tokens = {rid: [] for rid in requests}
    prompt_lps = {rid: [] for rid in requests}
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            prompt_lps[out.request_id] += [e.logprob for e in out.prompt_logprobs]
        steps += 1
        assert steps < 10_000
    return tokens, prompt_lps


def _workload(n: int = 16, seed: int = 0, shared_prefix: list[int] | None = None):
    rng = random.Random(seed)
    requests = {}
    for i in range(n):
        prompt = (shared_prefix or []) + [rng.randrange(4, CONFIG.vocab_size) for _ in range(rng.randint(1, 60))]
        params = SamplingParams(max_tokens=rng.randint(1, 40), temperature=0.0, ignore_eos=True)
        requests[f"r{i}"] = (prompt, params)
    return requests


def _alone(path: str, requests) -> dict[str, list[int]]:
    engine = _engine(path)
    return {rid: _run(engine, {rid: req})[0][rid] for rid, req in requests.items()}


def test_continuous_batching_matches_each_request_alone(checkpoint):
    requests = _workload()
    expected = _alone(checkpoint, requests)
    batched, _ = _run(_engine(checkpoint, max_num_batched_tokens=64), requests)
    assert batched == expected
    assert all(len(batched[rid]) == params.max_tokens for rid, (_, params) in requests.items())


def test_preemption_is_exact(checkpoint):
    requests = _workload(seed=1)
    expected = _alone(checkpoint, requests)
    # 20 blocks of 16 tokens cannot hold 16 sequences of up to 100 tokens: the scheduler must preempt.
    engine = _engine(checkpoint, num_kv_blocks=20, max_model_len=128)
    batched, _ = _run(engine, requests)
    assert engine.scheduler.num_preemptions > 0
    assert batched == expected
    assert engine.block_manager.num_free_blocks == 20


def test_prefix_caching_hits_and_is_exact(checkpoint):
    prefix = random.Random(5).choices(range(4, CONFIG.vocab_size), k=48)
    requests = _workload(seed=2, shared_prefix=prefix)
    expected = _alone(checkpoint, requests)
    engine = _engine(checkpoint, enable_prefix_caching=True, max_num_seqs=4)
    batched, _ = _run(engine, requests)
    assert engine.block_manager.prefix_cache_hits >= 12 * 48   # later requests reuse the 3 shared blocks
    assert batched == expected


def test_chunked_prefill_gives_same_logprobs(checkpoint):
    prompt = random.Random(9).choices(range(4, CONFIG.vocab_size), k=150)
    params = SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=1, ignore_eos=True)
    whole_tokens, whole = _run(_engine(checkpoint, max_num_batched_tokens=512), {"a": (prompt, params)})
    chunked_tokens, chunked = _run(_engine(checkpoint, max_num_batched_tokens=32), {"a": (prompt, params)})
    assert len(whole["a"]) == len(prompt) - 1
    torch.testing.assert_close(torch.tensor(chunked["a"]), torch.tensor(whole["a"]), atol=1e-5, rtol=0)
    assert chunked_tokens == whole_tokens


def test_abort_frees_blocks(checkpoint):
    engine = _engine(checkpoint, num_kv_blocks=64)
    engine.add_request("x", list(range(4, 40)), SamplingParams(max_tokens=50, temperature=0.0))
    engine.step()
    engine.step()
    outputs = engine.abort(["x"])
    assert outputs[0].finished and outputs[0].finish_reason == "abort"
    assert engine.block_manager.num_free_blocks == 64
    assert not engine.has_unfinished_requests()


def test_pool_smaller_than_one_sequence_is_a_clear_error(checkpoint):
    with pytest.raises(ValueError, match="max-model-len"):
        _engine(checkpoint, num_kv_blocks=4, max_model_len=256)


def test_max_model_len_past_the_rope_table_is_a_clear_error(checkpoint):
    # Positions past max_position_embeddings have no RoPE row: on a GPU the Triton kernel would read past the table.
    with pytest.raises(ValueError, match="max_model_len 1024 exceeds the model's max_position_embeddings"):
        _engine(checkpoint, max_model_len=1024, num_kv_blocks=1024)
