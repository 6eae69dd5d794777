"""Tiny checkpoints with Nemotron-4 340B's head layout (8 KV heads, 12 query heads each) and a runner that drives
an LLMEngine at a given tensor-parallel size; rank 0 is the test process, ranks 1..N-1 real spawned processes
over gloo."""
from __future__ import annotations

import pytest

from model.config import ModelConfig
from server.engine.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.sampling import SamplingParams
from tests.utils import make_tiny_checkpoint

# vocab 509 is prime: no TP size divides it, so the vocab-parallel layers pad it.
CONFIG_340B_LAYOUT = ModelConfig(vocab_size=509, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=96, num_key_value_heads=8, head_dim=8,
                                 max_position_embeddings=256, torch_dtype="float32")
PROMPTS = {"a": [5, 6, 7, 8, 9, 10, 11], "b": [100, 3, 400, 27], "c": [508, 1, 250, 250, 250, 17, 90, 91, 92]}


@pytest.fixture(scope="session")
def tp_checkpoint(tmp_path_factory) -> str:
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tp340b")), CONFIG_340B_LAYOUT, seed=0)


def run_engine(path: str, tp: int, max_tokens: int = 5, quantization: str | None = None,
               prompts: dict[str, list[int]] = PROMPTS) -> tuple[dict, dict, dict]:
    """All prompts at once (one batch, continuous batching) with greedy decoding and prompt logprobs.
    -> (tokens per request, prompt logprobs per request, parameter bytes per rank)."""
    config = EngineConfig(max_model_len=64, num_kv_blocks=32, block_size=4, tensor_parallel_size=tp,
                          tp_timeout_s=60)
    tokens: dict[str, list[int]] = {k: [] for k in prompts}
    logprobs: dict[str, list[float]] = {k: [] for k in prompts}
    with LLMEngine.from_pretrained(path, config, quantization=quantization) as engine:
        for key, prompt in prompts.items():
            engine.add_request(key, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                                           prompt_logprobs=0))
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens[out.request_id] += out.new_token_ids
                logprobs[out.request_id] += [entry.logprob for entry in out.prompt_logprobs]
        per_rank = dict(engine.executor.rank_param_bytes) if engine.executor else {}
    return tokens, logprobs, per_rank
