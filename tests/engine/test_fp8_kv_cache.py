"""`--kv-cache-dtype fp8`: the engine stores K/V in float8_e4m3fn with the checkpoint's per-layer scales (1.0 and one
warning without them), sizes the pool by the FP8 element size, and its prompt log-probs stay close to those of the
model-dtype cache.

Tolerance. Both runs use the same FP8 weights; the difference is K and V rounded to E4M3, a relative error uniform
within +-2^-4 per element (~0.025 RMS) wherever a value lies in E4M3's normal range, which a scale of amax / 448
puts every value in (the smallest normal is 2^-6 * scale = 3.5e-5 * amax). That error enters the attention scores
as ~0.025 of |q.k| / sqrt(d); the random tiny models have large, peaked scores, so it moves softmax weights by
percents and log-probs of (random, mean -6) prompt tokens by: mean |diff| 0.09-0.13, max 0.30-0.57 (5 seeds, 88
positions each). Bounds: mean 0.2, max 1.0. Because E4M3 is floating point, a scale that is too large changes
almost nothing (64x: same max |diff|) until values go subnormal, but one that is too small saturates: at 1/16 of the
calibrated scale the max |diff| is 2.7-5.8, which is what shows the checkpoint's scales are the ones used.
"""
from __future__ import annotations

import logging
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.errors import CheckpointError
from model.loader import load_model
from n4.cli import main
from server.engine.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.sampling import SamplingParams
from tests.model.test_fp8_checkpoints import CONFIG, write_fp8_checkpoint

MEAN_BOUND = 0.2
MAX_BOUND = 1.0


def _engine(path: str, kv_cache_dtype: str, **config) -> LLMEngine:
    engine_config = EngineConfig(**{"max_model_len": 128, "num_kv_blocks": 16, "block_size": 16,
                                    "max_num_batched_tokens": 48, "kv_cache_dtype": kv_cache_dtype, **config})
    return LLMEngine.from_pretrained(path, engine_config, dtype="float32")


def _prompt_logprobs(engine: LLMEngine) -> torch.Tensor:
    """Prompt log-probs of two prompts (the longer one in chunks), then one decode step each."""
    rng = random.Random(0)
    for i, n in enumerate((30, 60)):
        engine.add_request(f"r{i}", [rng.randrange(4, CONFIG.vocab_size) for _ in range(n)],
                           SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=0))
    lps: dict[str, list[float]] = {"r0": [], "r1": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            lps[out.request_id] += [e.logprob for e in out.prompt_logprobs]
    return torch.tensor(lps["r0"] + lps["r1"])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("kv")
    return {name: write_fp8_checkpoint(root / name, "fp8", per_channel=True, kv_scales=kv, seed=3,
                                       kv_scale_factor=factor)
            for name, kv, factor in (("calibrated", True, 1.0), ("too-small", True, 1 / 16), ("none", False, 1.0))}


@pytest.fixture(scope="module")
def auto_logprobs(checkpoints):
    return _prompt_logprobs(_engine(checkpoints["calibrated"].path, "auto"))


def test_fp8_kv_cache_is_close_to_the_model_dtype_cache(checkpoints, auto_logprobs):
    ckpt = checkpoints["calibrated"]
    engine = _engine(ckpt.path, "fp8")
    assert all(cache.dtype == torch.float8_e4m3fn for cache in engine.runner.kv_caches)
    for i, layer in enumerate(engine.runner.model.model.layers):
        prefix = f"model.layers.{i}.self_attn."
        assert layer.self_attn.k_scale == ckpt.written[prefix + "k_scale"].item() != 1.0
        assert layer.self_attn.v_scale == ckpt.written[prefix + "v_scale"].item() != 1.0
    diff = (_prompt_logprobs(engine) - auto_logprobs).abs()
    assert len(diff) == 88 and diff.mean() < MEAN_BOUND and diff.max() < MAX_BOUND


def test_wrong_kv_scales_change_the_results(checkpoints, auto_logprobs):
    good = (_prompt_logprobs(_engine(checkpoints["calibrated"].path, "fp8")) - auto_logprobs).abs().max()
    wrong = (_prompt_logprobs(_engine(checkpoints["too-small"].path, "fp8")) - auto_logprobs).abs().max()
    assert wrong > 2 * MAX_BOUND and wrong > 3 * good


def test_no_kv_scales_means_one_and_one_warning(checkpoints, auto_logprobs, caplog):
    with caplog.at_level(logging.WARNING):
        engine = _engine(checkpoints["none"].path, "fp8")
    warnings = [r for r in caplog.records if "no k/v scales" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert all((layer.self_attn.k_scale, layer.self_attn.v_scale) == (1.0, 1.0)
               for layer in engine.runner.model.model.layers)
    diff = (_prompt_logprobs(engine) - auto_logprobs).abs()  # the tiny model's K/V are far below 448: no clipping
    assert diff.mean() < MEAN_BOUND and diff.max() < MAX_BOUND


def test_pool_sized_with_the_fp8_element_size(checkpoints):
    path = checkpoints["calibrated"].path
    sizes = {kv: _engine(path, kv, num_kv_blocks=None, kv_cache_memory_bytes=1 << 20).num_blocks
             for kv in ("auto", "fp8")}
    assert sizes["fp8"] == 4 * sizes["auto"] > 0  # an fp32 model: 4 bytes per element vs 1


@pytest.mark.parametrize("naming", ["self_attn", "k_proj", "kv_scale"])
def test_kv_scale_names(tmp_path, naming):
    """vLLM's self_attn.k_scale / v_scale, ModelOpt's k_proj.k_scale / v_proj.v_scale, older files' one kv_scale."""
    ckpt = write_fp8_checkpoint(tmp_path, "fp8", kv_scales=True, seed=1, kv_naming=naming)
    model, _ = load_model(ckpt.path, dtype="float32", kv_cache_dtype="fp8")
    attn = model.model.layers[1].self_attn
    if naming == "kv_scale":
        assert attn.k_scale == attn.v_scale == ckpt.written["model.layers.1.self_attn.kv_scale"].item()
    else:
        prefix = "model.layers.1.self_attn." + ("k_proj." if naming == "k_proj" else "")
        assert attn.k_scale == ckpt.written[prefix + "k_scale"].item()


def test_kv_scales_for_some_layers_only_are_an_error(tmp_path):
    ckpt = write_fp8_checkpoint(tmp_path, "fp8", kv_scales=True, seed=1)
    file = f"{ckpt.path}/model.safetensors"
    state = load_file(file)
    del state["model.layers.1.self_attn.v_scale"]
    save_file(state, file)
    with pytest.raises(CheckpointError, match=r"not both k and v for 1: model\.layers\.1\.self_attn"):
        load_model(ckpt.path, dtype="float32", kv_cache_dtype="fp8")
    load_model(ckpt.path, dtype="float32")  # a model-dtype cache does not need them


def test_engine_config_rejects_other_kv_dtypes():
    with pytest.raises(ValueError, match="--kv-cache-dtype must be one of auto, fp8, fp8_e4m3"):
        EngineConfig(kv_cache_dtype="fp8_e5m2")


def test_cli_flags_and_startup_log(caplog, capsys):
    """`n4 generate --quantization fp8 --kv-cache-dtype fp8` on the demo model: it runs, and the startup line
    names the weight format and the KV dtype."""
    with caplog.at_level(logging.INFO):
        main(["generate", "--prompt", "The answer is", "--max-tokens", "3", "--quantization", "fp8",
              "--kv-cache-dtype", "fp8"])
    startup = [r.getMessage() for r in caplog.records if r.getMessage().startswith("model ")]
    assert len(startup) == 1
    assert "fp8 per-channel weights, dynamic per-token activations (quantized at load)" in startup[0]
    assert "KV cache float8_e4m3fn" in startup[0]
    assert capsys.readouterr().out.strip()
