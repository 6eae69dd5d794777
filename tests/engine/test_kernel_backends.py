"""`--kernel-backend triton` (interpreted on the CPU) against `--kernel-backend torch` on the tiny models of the
parity tests: the same greedy tokens, prompt log-probs within 1e-3 (fp32: the kernels reassociate sums —
online softmax, tiled GEMMs — so agreement is ~1e-5 in practice; 1e-3 is the acceptance bound)."""
from __future__ import annotations

import random

import pytest
import torch

from model.config import ModelConfig
from server.engine.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.sampling import SamplingParams
from tests.utils import make_tiny_checkpoint

pytestmark = pytest.mark.slow

CONFIGS = {
    "gqa-4to1": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                            torch_dtype="float32"),
    "head-dim-24": ModelConfig(vocab_size=512, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                               max_position_embeddings=256, torch_dtype="float32"),
}


def _generate(path: str, backend: str, requests):
    engine = LLMEngine.from_pretrained(path, EngineConfig(max_model_len=128, num_kv_blocks=64, block_size=16,
                                                          max_num_batched_tokens=48, kernel_backend=backend),
                                       dtype="float32")
    tokens = {rid: [] for rid in requests}
    prompt_lps = {rid: [] for rid in requests}
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            prompt_lps[out.request_id] += [e.logprob for e in out.prompt_logprobs]
    return tokens, prompt_lps


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_triton_backend_matches_torch_backend(name, tmp_path):
    path = make_tiny_checkpoint(str(tmp_path), CONFIGS[name], seed=5)
    rng = random.Random(0)
    # Prompts longer than the 48-token step budget run in chunks; decode steps then batch all three.
    requests = {f"r{i}": ([rng.randrange(4, 512) for _ in range(n)],
                          SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, prompt_logprobs=0))
                for i, n in enumerate((1, 19, 60))}
    torch_tokens, torch_lps = _generate(path, "torch", requests)
    triton_tokens, triton_lps = _generate(path, "triton", requests)
    assert triton_tokens == torch_tokens
    for rid in requests:
        torch.testing.assert_close(torch.tensor(triton_lps[rid]), torch.tensor(torch_lps[rid]), atol=1e-3, rtol=0)
