"""FP8 checkpoints as other tools write them, beyond the variants of test_fp8_checkpoints.py: compressed-tensors
config groups that target only some layers, FP8 tensors that would land in an unquantized layer without a scale,
and malformed quantization configs, which must be one-line ValueErrors (the CLI prints those) and not tracebacks.

Checkpoints are written with test_fp8_checkpoints' helpers, and loaded models are compared with its dequantized
transformers reference (assert_tight: see that module's docstring for the tolerances)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.errors import CheckpointError
from model.loader import load_model
from model.quant import UnquantizedLinearMethod
from model.quant_config import detect_quant_config
from tests.model.test_fp8_checkpoints import (assert_tight, model_logits, prompt, reference_logits,
                                              write_fp8_checkpoint)

ATTENTION = tuple(f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo")


def _edit_config(path: str, change, whole: bool = False) -> None:
    """change(config.json's quantization_config), or change(config.json) when whole."""
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    change(hf if whole else hf["quantization_config"])
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f)


def _edit_tensors(path: str, change) -> None:
    state = load_file(os.path.join(path, "model.safetensors"))
    change(state)
    save_file(state, os.path.join(path, "model.safetensors"))


# ---- compressed-tensors config groups that quantize only some layers ------------------------------------------

@pytest.mark.parametrize("targets", [["re:.*mlp\\..*"], ["re:.*up_proj$", "re:.*down_proj$"],
                                     ["model.layers.0.mlp", "model.layers.1.mlp"]])
def test_ct_group_targeting_only_the_mlp(tmp_path, targets):
    """llm-compressor quantizes the layers a group's `targets` match; the others stay in high precision without
    being listed in `ignore`. Here only the MLPs are FP8: attention loads unquantized and the logits match."""
    ckpt = write_fp8_checkpoint(tmp_path, "compressed-tensors", per_channel=True, seed=21, ignore=ATTENTION)

    def change(qc):
        qc["ignore"] = ["lm_head"]
        qc["config_groups"]["group_0"]["targets"] = targets
    _edit_config(ckpt.path, change)
    model, _ = load_model(ckpt.path, dtype="float32")
    layer = model.model.layers[1]
    assert isinstance(layer.self_attn.qkv_proj.linear_method, UnquantizedLinearMethod)
    assert isinstance(layer.self_attn.o_proj.linear_method, UnquantizedLinearMethod)
    assert layer.mlp.up_proj.weight.dtype == layer.mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    tokens = prompt(21)
    assert_tight(model_logits(model, tokens), reference_logits(ckpt, tokens))


def test_ct_group_targeting_q_k_v_by_name_quantizes_the_fused_layer(tmp_path):
    """Targets naming q/k/v (not n4's fused qkv_proj) quantize the fused layer; o_proj, untargeted, is not."""
    o_proj = ("model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj")
    ckpt = write_fp8_checkpoint(tmp_path, "compressed-tensors", per_channel=False, seed=22, ignore=o_proj)

    def change(qc):
        qc["ignore"] = ["lm_head"]
        qc["config_groups"]["group_0"]["targets"] = ["re:.*self_attn\\.[qkv]_proj$", "re:.*mlp\\..*"]
    _edit_config(ckpt.path, change)
    model, _ = load_model(ckpt.path, dtype="float32")
    attn = model.model.layers[0].self_attn
    assert attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
    assert isinstance(attn.o_proj.linear_method, UnquantizedLinearMethod)
    tokens = prompt(22)
    assert_tight(model_logits(model, tokens), reference_logits(ckpt, tokens, requantized=False))


def test_ct_targets_that_split_a_fused_layer_or_name_a_class_are_refused(tmp_path):
    ckpt = write_fp8_checkpoint(tmp_path, "compressed-tensors", per_channel=True, seed=23)
    _edit_config(ckpt.path, lambda qc: qc["config_groups"]["group_0"].update(targets=["re:.*(q_proj|o_proj|mlp.*)$"]))
    with pytest.raises(ValueError, match=r"k_proj.*v_proj.*\] unquantized but not \[.*q_proj.*fuses"):
        load_model(ckpt.path, dtype="float32")
    _edit_config(ckpt.path, lambda qc: qc["config_groups"]["group_0"].update(targets=["NemotronMLP"]))
    with pytest.raises(ValueError, match="targets 'NemotronMLP'"):
        load_model(ckpt.path, dtype="float32")


# ---- an FP8 tensor never loads into a high-precision layer as if it were unscaled ------------------------------

def test_fp8_weights_without_a_quantization_config_are_refused(tmp_path):
    """E4M3 weights with neither a quantization config nor scales: loading them as plain weights would drop every
    scale (logits off by orders of magnitude), so the tensor is named instead."""
    ckpt = write_fp8_checkpoint(tmp_path, "fp8", seed=24)
    _edit_config(ckpt.path, lambda hf: hf.pop("quantization_config"), whole=True)
    _edit_tensors(ckpt.path, lambda s: [s.pop(name) for name in list(s) if name.endswith("_scale")])
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.\w+\.\w+_proj\.weight'.*float8_e4m3fn.*no scale"):
        load_model(ckpt.path, dtype="float32")


def test_ignored_layer_stored_in_fp8_is_refused(tmp_path):
    ckpt = write_fp8_checkpoint(tmp_path, "fp8", per_channel=True, seed=25)
    _edit_config(ckpt.path, lambda qc: qc.update(ignored_layers=["lm_head", "model.layers.1.mlp.down_proj"]))
    _edit_tensors(ckpt.path, lambda s: s.pop("model.layers.1.mlp.down_proj.weight_scale"))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.down_proj\.weight'.*float8_e4m3fn"):
        load_model(ckpt.path, dtype="float32")


# ---- malformed quantization configs: one-line ValueErrors ----------------------------------------------------

_SCALES = {"model.layers.0.mlp.up_proj.weight_scale": ()}
_GROUP = {"format": "float-quantized", "targets": ["Linear"],
          "weights": {"num_bits": 8, "type": "float", "strategy": "tensor"},
          "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}


def _ct(group: dict | None = None, **top) -> dict:
    return {"quantization_config": {"quant_method": "compressed-tensors",
                                    "config_groups": {"group_0": group if group is not None else _GROUP}, **top}}


@pytest.mark.parametrize("hf, modelopt, message", [
    ({"quantization_config": {"quant_method": "compressed-tensors", "config_groups": [_GROUP]}}, None,
     "config_groups must be an object"),
    (_ct("fp8"), None, "group 'group_0' must be an object"),
    (_ct({**_GROUP, "weights": "fp8"}), None, "weights must be an object"),
    (_ct({**_GROUP, "input_activations": ["fp8"]}), None, "input_activations must be an object"),
    (_ct(kv_cache_scheme="fp8"), None, "kv_cache_scheme must be an object"),
    (_ct(ignore="lm_head"), None, "ignore must be a list of module names"),
    (_ct(ignore=[1]), None, "ignore must be a list of module names"),
    (_ct({**_GROUP, "targets": "Linear"}), None, "targets must be a list of module names"),
    ({"quantization_config": {"quant_method": "fp8", "ignored_layers": 3}}, None,
     "ignored_layers must be a list of module names"),
    ({"quantization_config": {"quant_method": "fp8", "ignored_layers": "lm_head"}}, None,
     "ignored_layers must be a list of module names"),
    ({"quantization_config": {"quant_method": "modelopt", "quantization": "FP8"}}, None,
     "quantization must be an object"),
    ({}, ["FP8"], "hf_quant_config.json must be an object"),
    ({}, {"quantization": ["FP8"]}, "quantization must be an object"),
    ({}, {"quantization": {"quant_algo": "FP8", "exclude_modules": "lm_head"}}, "exclude_modules must be a list"),
])
def test_malformed_quantization_configs_are_value_errors(hf, modelopt, message):
    with pytest.raises(ValueError, match=message):
        detect_quant_config({"model_type": "nemotron", **hf}, modelopt, _SCALES)
