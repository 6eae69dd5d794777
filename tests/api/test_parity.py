"""Parity with transformers.NemotronForCausalLM through the HTTP API, fp32: prompt log-probs via
/v1/completions (echo + logprobs) within 1e-4, and 32 greedy tokens identical to HF generate."""
from __future__ import annotations

import pytest
import torch
import transformers

from model.config import ModelConfig
from tests.api.conftest import MODEL_NAME, serve_checkpoint
from tests.utils import make_tiny_checkpoint

VOCAB = 4096  # the demo tokenizer's vocabulary, so every id has a token text

CONFIGS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16, hidden_size=64),
    "gqa-4to1": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16, hidden_size=64),
    "one-kv-head": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16, hidden_size=64),
    "head-dim-24": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24, hidden_size=96),
}


def _config(shape: dict) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, intermediate_size=4 * shape["hidden_size"], num_hidden_layers=2,
                       partial_rotary_factor=0.5, max_position_embeddings=512, torch_dtype="float32", **shape)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    config = _config(CONFIGS[request.param])
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp(request.param)), config, seed=7)


def _hf(path: str):
    model = transformers.NemotronForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def test_prompt_logprobs_match_hf(checkpoint):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in (5, 23, 40)]
    with serve_checkpoint(checkpoint, block_size=4) as client:
        r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": prompts, "echo": True,
                                                 "logprobs": 1, "max_tokens": 0, "temperature": 0})
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    hf = _hf(checkpoint)
    for prompt, choice in zip(prompts, choices):
        with torch.no_grad():
            logits = hf(torch.tensor([prompt])).logits[0].float()                 # [S, vocab]
        expected = torch.log_softmax(logits, -1)[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        got = choice["logprobs"]["token_logprobs"]
        assert got[0] is None and len(got) == len(prompt)
        torch.testing.assert_close(torch.tensor(got[1:]), expected, atol=1e-4, rtol=0)


def test_greedy_tokens_match_hf_generate(checkpoint):
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(4, VOCAB, (11,), generator=g).tolist()
    hf = _hf(checkpoint)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    expected = out[0, len(prompt):].tolist()
    with serve_checkpoint(checkpoint, block_size=4) as client:
        r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 32,
                                                 "temperature": 0, "ignore_eos": True, "logprobs": 0,
                                                 "return_tokens_as_token_ids": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 32
    tokens = [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]
    assert tokens == expected
