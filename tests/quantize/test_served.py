"""`n4 quantize` output served by n4: prompt log-probs close to the unquantized model's, and a static-scheme
checkpoint's calibrated input scales (and KV scales) are the ones the served model uses.

Tolerance for log-probs (random tiny model, fp32 reference): FP8 E4M3 rounds each weight and activation with a
relative RMS error of ~0.025 (3 mantissa bits); through 2 layers the logits carry ~0.1 of their RMS as noise
(tests/model/test_fp8_checkpoints.py derives and measures this). These random models have logits of RMS ~1.2, so
a token's log-prob moves by ~0.1 on average; MEAN_TOL = 0.2 bounds the mean absolute difference and MAX_TOL = 1.5
any single token (measured on this config over 3 seeds: mean 0.09-0.13, max 0.34-0.51). A broken scale or a misplaced shard moves
log-probs by several nats (the static-scale test in tests/model shows saturation at 2.7-5.8)."""
from __future__ import annotations

import random

import pytest
import torch
from safetensors import safe_open

from model.config import ModelConfig
from model.loader import load_model
from quantize.convert import QuantizeOptions, quantize_checkpoint
from server.engine.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.sampling import SamplingParams
from tests.utils import make_tiny_checkpoint

CONFIG = ModelConfig(vocab_size=4096, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                     torch_dtype="float32")
MEAN_TOL, MAX_TOL = 0.2, 1.5
CALIBRATION = "\n".join(["The quick brown fox jumps over the lazy dog.", "FP8 keeps three mantissa bits.",
                         "Calibration text measures the range each layer sees.", "def f(x): return x ** 2"] * 4)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("src")), CONFIG, seed=21)


def _quantize(source: str, out: str, **options) -> str:
    quantize_checkpoint(QuantizeOptions(model=source, output=out, progress=False, **options))
    return out


def _prompt_logprobs(path: str, prompts: list[list[int]], kv_cache_dtype: str = "auto") -> list[float]:
    engine = LLMEngine.from_pretrained(path, EngineConfig(max_model_len=128, num_kv_blocks=64,
                                                          kv_cache_dtype=kv_cache_dtype), dtype="float32")
    params = SamplingParams(max_tokens=0, prompt_logprobs=0)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"p{i}", prompt, params)
    out: dict[str, list[float]] = {f"p{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id] += [e.logprob for e in o.prompt_logprobs]
    return [lp for i in range(len(prompts)) for lp in out[f"p{i}"]]


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(4, CONFIG.vocab_size) for _ in range(n)] for n in (9, 33, 60)]


@pytest.mark.parametrize("scheme", ["per-tensor", "per-channel"])
def test_served_fp8_logprobs_close_to_unquantized(source, tmp_path, scheme):
    fp8 = _quantize(source, str(tmp_path / "fp8"), weight_scheme=scheme)
    expected = torch.tensor(_prompt_logprobs(source, _prompts()))
    got = torch.tensor(_prompt_logprobs(fp8, _prompts()))
    diff = (got - expected).abs()
    assert diff.mean() < MEAN_TOL and diff.max() < MAX_TOL, (diff.mean(), diff.max())


def test_static_scales_from_calibration_are_used_by_the_server(source, tmp_path):
    calibration = tmp_path / "calib.txt"
    calibration.write_text(CALIBRATION)
    out = _quantize(source, str(tmp_path / "static"), activation_scheme="static", calibration_data=str(calibration),
                    kv_cache_scales=True)
    with safe_open(f"{out}/model.safetensors", framework="pt") as f:
        stored = {name: f.get_tensor(name) for name in f.keys() if name.endswith(("input_scale", "k_scale",
                                                                                    "v_scale"))}
    model, _ = load_model(out, dtype="float32", kv_cache_dtype="fp8")
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}."
        qkv_scale = max(stored[prefix + f"self_attn.{p}_proj.input_scale"].item() for p in "qkv")
        assert layer.self_attn.qkv_proj.input_scale.item() == qkv_scale
        assert layer.self_attn.o_proj.input_scale.item() == stored[prefix + "self_attn.o_proj.input_scale"].item()
        assert layer.mlp.up_proj.input_scale.item() == stored[prefix + "mlp.up_proj.input_scale"].item()
        assert layer.self_attn.k_scale == stored[prefix + "self_attn.k_scale"].item()
        assert layer.self_attn.v_scale == stored[prefix + "self_attn.v_scale"].item()
    # And the served static checkpoint (FP8 weights, static activations, FP8 KV cache) stays close.
    expected = torch.tensor(_prompt_logprobs(source, _prompts()))
    got = torch.tensor(_prompt_logprobs(out, _prompts(), kv_cache_dtype="fp8"))
    diff = (got - expected).abs()
    assert diff.mean() < MEAN_TOL and diff.max() < MAX_TOL, (diff.mean(), diff.max())
