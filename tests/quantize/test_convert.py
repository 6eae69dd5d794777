"""`n4 quantize` round trips on random tiny checkpoints: every FP8 weight and scale equals the reference
quantization bit for bit, every other tensor is byte-identical to the input, config/tokenizer/index are right and
readable by safetensors and transformers."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import quantize.convert
from model.config import PRESETS, ModelConfig
from model.nemotron import NemotronForCausalLM
from model.quant import quantize_weight_fp8
from quantize.source import expected_shapes
from tests.quantize.helpers import LINEAR_MODULES, error_lines, read_tensors, reference_fp8, run_quantize, same_bits
from tests.utils import make_tiny_checkpoint

# (preset, dtype, input max_shard_size, output --max-shard-size, BLOCK_ELEMENTS): single and sharded inputs and
# outputs, all three input dtypes, and blocks of a few rows so the row-block streaming path splits every tensor.
CASES = {
    "fp32-single": ("tiny", "float32", None, "5GB", None),
    "bf16-sharded-in-and-out": ("tiny-340b-layout", "bfloat16", "40KB", "60KB", None),
    "fp16-small-blocks": ("tiny", "float16", None, "100KB", 200),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    preset, dtype, in_shard, out_shard, block = CASES[request.param]
    config = PRESETS[preset].with_(torch_dtype=dtype)
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), config, seed=sorted(CASES).index(request.param),
                                max_shard_size=in_shard)
    return path, out_shard, block


@pytest.mark.parametrize("scheme", ["per-tensor", "per-channel"])
def test_round_trip_matches_reference_bit_for_bit(case, scheme, tmp_path, capsys, monkeypatch):
    model_dir, out_shard, block = case
    if block:
        monkeypatch.setattr(quantize.convert, "BLOCK_ELEMENTS", block)
    out = tmp_path / "fp8"
    code, err = run_quantize(capsys, "--model", model_dir, "--output", str(out), "--weight-scheme", scheme,
                             "--max-shard-size", out_shard)
    assert code == 0, err
    source, result = read_tensors(model_dir), read_tensors(out)

    quantized = {f"model.layers.{i}.{m}" for i in range(2) for m in LINEAR_MODULES}
    assert set(result) == set(source) | {f"{m}.weight_scale" for m in quantized}
    for name, (_, tensor) in source.items():
        module = name.removesuffix(".weight")
        got = result[name][1]
        if module not in quantized:
            assert same_bits(got, tensor), f"{name} changed"
            continue
        q_ref, scale_ref = reference_fp8(tensor, per_channel=scheme == "per-channel")
        scale = result[f"{module}.weight_scale"][1]
        assert same_bits(got, q_ref), f"{name}: FP8 bytes differ from the reference"
        assert same_bits(scale, scale_ref), f"{module}.weight_scale differs from the reference"
        assert scale.shape == ((tensor.shape[0], 1) if scheme == "per-channel" else ())
        # The convention, independently of the formula: dequantized = fp8 * scale is within E4M3's rounding
        # (half an ulp: 2**-4 relative for normal values, 2**-10 * scale absolute below the normal range).
        err_bound = torch.maximum(tensor.float().abs() * 2**-4, scale.expand_as(tensor) * 2**-10) * (1 + 1e-6)
        assert ((got.float() * scale - tensor.float()).abs() <= err_bound).all(), name
    assert result["lm_head.weight"][1].dtype == source["lm_head.weight"][1].dtype
    _check_files(model_dir, out, scheme, result)


def _check_files(model_dir: str, out, scheme: str, result: dict) -> None:
    from transformers import AutoConfig

    with open(os.path.join(model_dir, "config.json")) as f:
        config_in = json.load(f)
    with open(out / "config.json") as f:
        config_out = json.load(f)
    qc = config_out.pop("quantization_config")
    assert config_out == config_in  # every other key kept as it was
    assert qc == {"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": ["lm_head"],
                  "weight_scheme": scheme}
    for name in ("tokenizer.model", "generation_config.json"):
        assert (out / name).read_bytes() == open(os.path.join(model_dir, name), "rb").read()
    files = sorted(p.name for p in out.iterdir())
    assert not any(name.startswith(".") for name in files)
    shards = sorted({file for file, _ in result.values()})
    if len(shards) == 1:
        assert shards == ["model.safetensors"] and "model.safetensors.index.json" not in files
    else:
        assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == {name: file for name, (file, _) in result.items()}
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for _, t in result.values())
    hf = AutoConfig.from_pretrained(str(out))
    assert hf.model_type == "nemotron" and hf.quantization_config["quant_method"] == "fp8"


def test_ignored_modules_stay_unquantized(tmp_path, capsys):
    model_dir = make_tiny_checkpoint(tmp_path / "in", PRESETS["tiny"])
    out = tmp_path / "fp8"
    code, err = run_quantize(capsys, "--model", model_dir, "--output", str(out), "--ignore", "model.layers.1.mlp",
                             "model.layers.0.self_attn.o_proj")
    assert code == 0, err
    result, source = read_tensors(out), read_tensors(model_dir)
    ignored = ["lm_head", "model.layers.0.self_attn.o_proj", "model.layers.1.mlp.up_proj",
               "model.layers.1.mlp.down_proj"]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["ignored_layers"] == ignored
    for module in ignored:
        assert same_bits(result[f"{module}.weight"][1], source[f"{module}.weight"][1])
        assert f"{module}.weight_scale" not in result
    assert result["model.layers.1.self_attn.o_proj.weight"][1].dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("ignore, message", [
    (["model.layers.0.self_attn.k_proj"], "run as one fused layer"),
    (["model.layers.7"], "matches no linear module"),
    (["model.layers.0.mlp.up"], "matches no linear module"),
])
def test_bad_ignore(ignore, message, tmp_path, capsys):
    model_dir = make_tiny_checkpoint(tmp_path / "in", PRESETS["tiny"])
    code, err = run_quantize(capsys, "--model", model_dir, "--output", str(tmp_path / "out"), "--ignore", *ignore)
    assert code == 2 and len(error_lines(err)) == 1 and message in error_lines(err)[0]
    assert sorted(os.listdir(tmp_path)) == ["in"]


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("block", [1, 7, 64, 10**9])
def test_row_blocks_give_the_bytes_of_quantize_weight_fp8(per_channel, block, tmp_path, capsys, monkeypatch):
    """The converter streams blocks of rows; the result is what model/quant.py's quantize_weight_fp8 gives for the
    whole tensor, including an all-zero row (per-channel scale 1e-12 / 448) and an all-zero tensor."""
    config = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, torch_dtype="bfloat16")
    model_dir = make_tiny_checkpoint(tmp_path / "in", config, init_std=3.0)
    file = os.path.join(model_dir, "model.safetensors")
    tensors = load_file(file)
    tensors["model.layers.0.mlp.up_proj.weight"][3] = 0
    tensors["model.layers.0.self_attn.v_proj.weight"].zero_()
    save_file(tensors, file, metadata={"format": "pt"})
    monkeypatch.setattr(quantize.convert, "BLOCK_ELEMENTS", block)
    code, err = run_quantize(capsys, "--model", model_dir, "--output", str(tmp_path / "out"),
                             "--weight-scheme", "per-channel" if per_channel else "per-tensor")
    assert code == 0, err
    result, source = read_tensors(tmp_path / "out"), read_tensors(model_dir)
    for module in LINEAR_MODULES:
        name = f"model.layers.0.{module}.weight"
        q, scale = quantize_weight_fp8(source[name][1], per_channel=per_channel)
        assert same_bits(result[name][1], q) and same_bits(result[name.replace("weight", "weight_scale")][1], scale)


def test_expected_shapes_are_the_models_tensors():
    config = PRESETS["tiny-340b-layout"]
    with torch.device("meta"):
        names = NemotronForCausalLM(config).checkpoint_tensor_names()
    assert sorted(expected_shapes(config)) == sorted(names)
