"""Static activation scales and KV-cache scales from `n4 quantize`, checked against transformers'
NemotronForCausalLM run one sample at a time with hooks: input_scale of every linear layer is fp8_scale of the amax
of the input that layer sees; k_scale / v_scale of the amax of K after RoPE (what the KV cache stores) and of V.

Tolerance: n4's model and transformers' are both fp32 but add and multiply in different orders (fused q/k/v,
packed batches), so activations differ by a few fp32 ulps (~1e-6 relative, measured in tests/model at ATOL 1e-4 on
logits); an amax is one such value, so the scales agree to rtol 1e-5."""
from __future__ import annotations

import json
from collections import defaultdict

import pytest
import sentencepiece as spm
import torch

import quantize.calibrate
from model.config import ModelConfig
from tests.quantize.helpers import LINEAR_MODULES, read_tensors, run_quantize
from tests.utils import DEMO_TOKENIZER, make_tiny_checkpoint

# vocab_size matches the demo tokenizer the checkpoint carries.
CONFIG = ModelConfig(vocab_size=4096, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                     torch_dtype="bfloat16")
SAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, in a land far away, there lived a curious engineer who quantized everything.",
    "FP8 has four exponent bits and three mantissa bits.",
    "Hello!",
    "Numbers like 3.14159 and 2.71828 show up in text too, along with symbols: #, %, & and @.",
    "A last, fairly long sample sentence that keeps going so that truncation to a few tokens matters here.",
]
RTOL = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("calib-in"), CONFIG, seed=3)


def _tokens(samples: list[str], seq_len: int) -> list[list[int]]:
    sp = spm.SentencePieceProcessor(model_file=str(DEMO_TOKENIZER))
    return [ids[:seq_len] for ids in sp.encode(samples)]


def _reference_scales(model_dir: str, token_lists: list[list[int]], monkeypatch) -> dict[str, torch.Tensor]:
    """fp32 scales from transformers with hooks: {tensor name: scale}."""
    import transformers.models.nemotron.modeling_nemotron as modeling
    from transformers import NemotronForCausalLM

    hf = NemotronForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    amax: dict[str, torch.Tensor] = defaultdict(lambda: torch.tensor(0.0))

    def record(name: str, x: torch.Tensor) -> None:
        amax[name] = torch.maximum(amax[name], x.detach().abs().max().float())

    for i, layer in enumerate(hf.model.layers):
        for m in LINEAR_MODULES:
            layer.get_submodule(m).register_forward_pre_hook(
                lambda module, args, name=f"model.layers.{i}.{m}.input_scale": record(name, args[0]))
        layer.self_attn.v_proj.register_forward_hook(
            lambda module, args, out, name=f"model.layers.{i}.self_attn.v_scale": record(name, out))
    rotated_keys = []
    apply_rope = modeling.apply_rotary_pos_emb

    def recording_rope(q, k, *args, **kwargs):
        q_rot, k_rot = apply_rope(q, k, *args, **kwargs)
        rotated_keys.append(k_rot)
        return q_rot, k_rot

    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", recording_rope)
    with torch.no_grad():
        for ids in token_lists:
            rotated_keys.clear()
            hf(torch.tensor([ids]))
            for i, k_rot in enumerate(rotated_keys):  # one call per layer, in order
                record(f"model.layers.{i}.self_attn.k_scale", k_rot)
    return {name: torch.clamp(a, min=1e-12) / 448.0 for name, a in amax.items()}


def _assert_scales(result: dict, reference: dict, names: list[str]) -> None:
    for name in names:
        got = result[name][1]
        assert got.dtype == torch.float32 and got.shape == (), name
        torch.testing.assert_close(got, reference[name], rtol=RTOL, atol=0, msg=name)


def test_static_scheme_records_input_and_kv_scales(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(quantize.calibrate, "BATCH_TOKENS", 40)  # several packed batches, maxima across them
    data = tmp_path / "calib.txt"
    data.write_text("\n".join(SAMPLES[:3]) + "\n\n   \n" + "\n".join(SAMPLES[3:]) + "\n")  # blank lines skipped
    out = tmp_path / "fp8"
    code, err = run_quantize(capsys, "--model", model_dir, "--output", str(out), "--activation-scheme", "static",
                             "--kv-cache-scales", "--calibration-data", str(data), "--ignore", "lm_head",
                             "model.layers.1.mlp.down_proj")
    assert code == 0, err
    result = read_tensors(out)
    reference = _reference_scales(model_dir, _tokens(SAMPLES, 512), monkeypatch)
    quantized = [f"model.layers.{i}.{m}" for i in range(2) for m in LINEAR_MODULES]
    quantized.remove("model.layers.1.mlp.down_proj")
    kv = [f"model.layers.{i}.self_attn.{x}_scale" for i in range(2) for x in ("k", "v")]
    _assert_scales(result, reference, [f"{m}.input_scale" for m in quantized] + kv)
    assert "model.layers.1.mlp.down_proj.input_scale" not in result  # not quantized, so no activation scale
    layer0 = [result[f"model.layers.0.self_attn.{p}_proj.input_scale"][1] for p in "qkv"]
    assert torch.equal(layer0[0], layer0[1]) and torch.equal(layer0[0], layer0[2])  # one fused input
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["activation_scheme"] == "static"
    assert qc["ignored_layers"] == ["lm_head", "model.layers.1.mlp.down_proj"]


def test_jsonl_sample_limit_and_truncation(model_dir, tmp_path, capsys, monkeypatch):
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": s, "id": i}) + "\n" for i, s in enumerate(SAMPLES)))
    out = tmp_path / "fp8"
    code, err = run_quantize(capsys, "--model", model_dir, "--output", str(out), "--activation-scheme", "static",
                             "--calibration-data", str(data), "--num-calibration-samples", "3",
                             "--calibration-seq-len", "7")
    assert code == 0, err
    result = read_tensors(out)
    reference = _reference_scales(model_dir, _tokens(SAMPLES[:3], 7), monkeypatch)
    _assert_scales(result, reference, [f"model.layers.{i}.{m}.input_scale" for i in range(2) for m in LINEAR_MODULES])
    assert not any(name.endswith(("k_scale", "v_scale")) for name in result)


def test_kv_cache_scales_alone_keep_dynamic_activations(model_dir, tmp_path, capsys, monkeypatch):
    data = tmp_path / "calib.txt"
    data.write_text("\n".join(SAMPLES))
    out = tmp_path / "fp8"
    code, err = run_quantize(capsys, "--model", model_dir, "--output", str(out), "--kv-cache-scales",
                             "--calibration-data", str(data), "--weight-scheme", "per-channel")
    assert code == 0, err
    result = read_tensors(out)
    reference = _reference_scales(model_dir, _tokens(SAMPLES, 512), monkeypatch)
    _assert_scales(result, reference, [f"model.layers.{i}.self_attn.{x}_scale" for i in range(2) for x in "kv"])
    assert not any(name.endswith("input_scale") for name in result)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["activation_scheme"] == "dynamic"
