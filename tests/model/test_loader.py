"""load_model: checkpoints written by HF save_pretrained and by hand, single-file and sharded; errors that name the
file or tensor at fault; dtype handling; dummy weights; config.json in the transformers 4.x and 5.x layouts."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import cpu_gemm
from model.config import PRESETS, ModelConfig
from model.loader import CheckpointError, load_model
from tests.utils import PagedSession, hf_model, make_tiny_checkpoint

CONFIG = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                     torch_dtype="float32")


def _hand_checkpoint(path, tensors: dict[str, torch.Tensor], hf_dict: dict, shards: int = 1) -> str:
    """Write config.json and the tensors ourselves: one model.safetensors, or `shards` files plus an index."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_dict, f)
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"))
        return str(path)
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"part-{i}.safetensors"
        part = {name: tensors[name].contiguous() for name in names[i::shards]}
        save_file(part, os.path.join(path, file))
        weight_map.update(dict.fromkeys(part, file))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return str(path)


def _state_dict(config=CONFIG, seed=0) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in hf_model(config, seed).state_dict().items()}


def _check_weights(model, state: dict[str, torch.Tensor]):
    """Every parameter equals the HF tensors it was loaded from (q/k/v stacked into the fused weight)."""
    params = dict(model.named_parameters())
    for i in range(model.config.num_hidden_layers):
        prefix = f"model.layers.{i}.self_attn."
        fused = torch.cat([state.pop(prefix + f"{p}_proj.weight") for p in "qkv"])
        torch.testing.assert_close(params.pop(prefix + "qkv_proj.weight"), fused.to(params_dtype(model)),
                                   atol=0, rtol=0)
    for name, tensor in state.items():
        torch.testing.assert_close(params.pop(name), tensor.to(params_dtype(model)), atol=0, rtol=0)
    assert not params


def params_dtype(model) -> torch.dtype:
    return model.lm_head.weight.dtype


@pytest.mark.parametrize("max_shard_size", [None, "20KB"])
def test_hf_save_pretrained_checkpoint(tmp_path, max_shard_size):
    path = make_tiny_checkpoint(tmp_path, CONFIG, seed=1, max_shard_size=max_shard_size)
    sharded = os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    assert sharded == (max_shard_size is not None)
    model, config = load_model(path)
    assert config == CONFIG
    _check_weights(model, _state_dict(seed=1))
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_fp32_cpu_weights_are_prepared_for_the_cpu_gemm_with_the_same_values(tmp_path, monkeypatch):
    """fp32 CPU linear and lm_head weights get an MKL pack beside the unchanged weight (or, without MKL, are stored
    column-major); bf16 ones stay as loaded. Values are the checkpoint's either way."""
    path = make_tiny_checkpoint(tmp_path, CONFIG, seed=1)
    up = lambda m: m.model.layers[0].mlp.up_proj  # noqa: E731
    if cpu_gemm.mkl_packing_available():
        model, _ = load_model(path, dtype="float32")
        _check_weights(model, _state_dict(seed=1))
        assert isinstance(up(model).cpu_packed_weight, cpu_gemm.PackedWeight)
        assert isinstance(model.lm_head.cpu_packed_weight, cpu_gemm.PackedWeight)
        assert up(model).weight.is_contiguous() and model.lm_head.weight.is_contiguous()
    monkeypatch.setattr(cpu_gemm, "_MKL", None)
    model, _ = load_model(path, dtype="float32")
    _check_weights(model, _state_dict(seed=1))
    out, inp = up(model).weight.shape
    assert up(model).weight.stride() == (1, out) and up(model).cpu_packed_weight is None
    assert model.lm_head.weight.stride() == (1, model.lm_head.weight.shape[0])
    assert model.model.embed_tokens.weight.is_contiguous()  # a lookup table, not a GEMM operand
    bf16, _ = load_model(path, dtype="bfloat16")
    assert all(p.is_contiguous() for p in bf16.parameters())
    assert up(bf16).cpu_packed_weight is None and bf16.lm_head.cpu_packed_weight is None


@pytest.mark.parametrize("shards", [1, 3])
def test_hand_written_checkpoint(tmp_path, shards):
    state = _state_dict(seed=2)
    path = _hand_checkpoint(tmp_path, state, CONFIG.to_hf(), shards=shards)
    model, config = load_model(path)
    assert config == CONFIG
    _check_weights(model, state)


@pytest.fixture
def state():
    return _state_dict(seed=3)


def test_missing_tensors_are_all_named(tmp_path, state):
    del state["model.layers.1.self_attn.v_proj.weight"], state["model.norm.bias"], state["lm_head.weight"]
    with pytest.raises(CheckpointError) as e:
        load_model(_hand_checkpoint(tmp_path, state, CONFIG.to_hf()))
    for name in ("model.layers.1.self_attn.v_proj.weight", "model.norm.bias", "lm_head.weight"):
        assert name in str(e.value)
    assert "missing 3 tensor" in str(e.value)


def test_unexpected_tensor_is_named(tmp_path, state):
    state["model.layers.2.mlp.up_proj.weight"] = torch.zeros(64, 32)  # a third layer in a 2-layer config
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.2\.mlp\.up_proj\.weight'"):
        load_model(_hand_checkpoint(tmp_path, state, CONFIG.to_hf()))


@pytest.mark.parametrize("name,shape", [("model.layers.0.self_attn.k_proj.weight", (24, 32)),
                                        ("model.layers.1.mlp.down_proj.weight", (32, 65)),
                                        ("model.embed_tokens.weight", (100, 32)),
                                        ("model.layers.0.input_layernorm.bias", (31,))])
def test_misshaped_tensor_is_named(tmp_path, state, name, shape):
    expected = list(state[name].shape)
    state[name] = torch.zeros(shape)
    with pytest.raises(CheckpointError) as e:
        load_model(_hand_checkpoint(tmp_path, state, CONFIG.to_hf()))
    assert repr(name) in str(e.value)
    assert str(list(shape)) in str(e.value) and str(expected) in str(e.value)


def test_truncated_file_is_named(tmp_path, state):
    path = _hand_checkpoint(tmp_path, state, CONFIG.to_hf(), shards=2)
    shard = os.path.join(path, "part-1.safetensors")
    data = open(shard, "rb").read()
    with open(shard, "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="part-1.safetensors.*truncated or corrupt"):
        load_model(path)


def test_no_safetensors_files(tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump(CONFIG.to_hf(), f)
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="no safetensors weights.*pytorch_model.bin"):
        load_model(str(tmp_path))


def test_index_naming_a_missing_shard(tmp_path, state):
    path = _hand_checkpoint(tmp_path, state, CONFIG.to_hf(), shards=2)
    os.remove(os.path.join(path, "part-0.safetensors"))
    with pytest.raises(CheckpointError, match="part-0.safetensors"):
        load_model(path)


def test_dtype_handling(tmp_path):
    path = make_tiny_checkpoint(tmp_path, CONFIG.with_(torch_dtype="bfloat16"), seed=4)
    assert load_file(os.path.join(path, "model.safetensors"))["lm_head.weight"].dtype == torch.bfloat16
    model, config = load_model(path)  # auto: the checkpoint's dtype
    assert config.torch_dtype == "bfloat16" and params_dtype(model) == torch.bfloat16
    for name, torch_dtype in [("float32", torch.float32), ("float16", torch.float16), ("half", torch.float16)]:
        model, config = load_model(path, dtype=name)
        assert params_dtype(model) == torch_dtype and config.torch_dtype == str(torch_dtype).split(".")[1]
    # fp32 from a bf16 checkpoint is exact, and both run.
    model = load_model(path, dtype="float32")[0]
    _check_weights(model, {k: v.float() for k, v in load_file(os.path.join(path, "model.safetensors")).items()})
    bf16_model = load_model(path)[0]
    ids = [5, 9, 1, 77, 3]
    fp32_logits = PagedSession(model).step([(0, ids)])[0]
    bf16_logits = PagedSession(bf16_model).step([(0, ids)])[0]
    assert torch.isfinite(bf16_logits).all()
    assert (fp32_logits - bf16_logits).abs().max() < 0.25
    with pytest.raises(ValueError, match="dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got 'int8'"):
        load_model(path, dtype="int8")


def test_dummy_weights():
    model, config = load_model("tiny", load_format="dummy")
    assert config == PRESETS["tiny"]
    again, _ = load_model("tiny", load_format="dummy")
    for (name, a), (_, b) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), name
        if "norm." in name:
            assert (a == 0).all(), name
        else:
            assert 0.015 < a.std() < 0.025, name
    logits = PagedSession(model).step([(0, [1, 2, 3])])[0]
    assert torch.isfinite(logits).all()


def test_dummy_weights_from_a_directory_need_only_its_config(tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump(CONFIG.to_hf(), f)
    model, config = load_model(str(tmp_path), load_format="dummy", dtype="bfloat16")
    assert config == CONFIG.with_(torch_dtype="bfloat16") and params_dtype(model) == torch.bfloat16


def test_bad_model_and_load_format():
    with pytest.raises(ValueError, match="load_format='dummy'"):
        load_model("tiny")
    with pytest.raises(ValueError, match="neither a checkpoint directory nor a preset"):
        load_model("/nonexistent/nemotron")
    with pytest.raises(ValueError, match="load_format must be one of"):
        load_model("tiny", load_format="pt")


ROPE = dict(partial_rotary_factor=0.25, rope_theta=500.0)


def _layouts() -> dict[str, dict]:
    v4 = CONFIG.with_(**ROPE).to_hf()
    v5 = {k: v for k, v in v4.items() if k not in ROPE}
    v5["rope_parameters"] = {"rope_type": "default", **ROPE}
    percent = {k: v for k, v in v4.items() if k != "partial_rotary_factor"}
    percent["rope_percent"] = 0.25
    return {"4.x": v4, "5.x": v5, "rope_percent": percent}


@pytest.mark.parametrize("layout", ["4.x", "5.x", "rope_percent"])
def test_config_layouts(layout):
    config = ModelConfig.from_hf(_layouts()[layout])
    assert config.partial_rotary_factor == 0.25 and config.rope_theta == 500.0 and config.rotary_dim == 2


@pytest.mark.parametrize("layout", ["4.x", "5.x"])
def test_hf_reads_the_config_like_we_do(tmp_path, layout):
    """transformers loads the same directory with the same RoPE, so its logits match ours."""
    import transformers

    state = _state_dict(CONFIG.with_(**ROPE), seed=5)
    path = _hand_checkpoint(tmp_path, state, _layouts()[layout])
    hf = transformers.NemotronForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert hf.config.rope_parameters["partial_rotary_factor"] == 0.25
    assert hf.config.rope_parameters["rope_theta"] == 500.0
    model, _ = load_model(path)
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(PagedSession(model).step([(0, ids)])[0], expected, atol=1e-4, rtol=0)


def test_make_tiny_checkpoint_copies_the_demo_tokenizer(tmp_path):
    from tests.utils import DEMO_TOKENIZER

    path = make_tiny_checkpoint(tmp_path, CONFIG)
    assert os.path.isfile(os.path.join(path, "tokenizer.model")) == DEMO_TOKENIZER.is_file()
    with open(os.path.join(path, "config.json")) as f:
        assert ModelConfig.from_hf(json.load(f)) == CONFIG
