"""FP8 checkpoints written by this test (not by `n4 quantize`) in vLLM's, compressed-tensors' and ModelOpt's naming
load into the parameters the test expects, bit for bit, and their logits match a transformers reference built from
the dequantized weights. `--quantization fp8` quantizes a high-precision checkpoint at load. Unsupported formats
fail with errors that say what is unsupported.

The references. The FP8 model quantizes activations too, so plain dequantized weights are not its exact reference.
- Tight: transformers.NemotronForCausalLM with the weights the model holds after loading (dequantized; fused q/k/v
  with differing per-tensor scales keep their bytes, each shard's rows their own scale) plus forward pre-hooks that fake-
  quantize every linear layer's input exactly as the FP8 scheme says (per token, or static with the checkpoint's
  input_scale; the down projection's input per token per 128 columns, as the fused MLP does). Both then compute the
  same function: the logits differ by fp32 summation order (observed <= 3e-6), except that a value lying within fp32
  noise of an E4M3 rounding midpoint rounds to the other neighbour in one of them, one E4M3 step (2^-3 of its
  binade) on one element; that was seen in 2 of 21 runs (5.7e-4 on the logits). A flip on the largest element of
  a per-token group moves that token's scale and so the whole group: with the prefill attention reference on
  `scaled_dot_product_attention` (a different fp32 summation order than before, max 3.6e-7 apart) the
  ct-channel-token variant sees one at one position, 0.06 on its logits, every other position within 1.3e-6.
  So `assert_tight` holds every position but at most one to TIGHT_ATOL = 5e-3 and that one to FLIP_ATOL = 0.2;
  a wrong scale, shard order or requantization moves every position (max |diff| 0.56-1.2 below) and cannot pass.
- Loose: the same weights without fake quantization, so the difference is all activation quantization. E4M3 keeps
  3 mantissa bits: rounding a value is a relative error uniform within +-2^-4 of its binade, RMS ~2^-3 / sqrt(12) /
  1.44 ~= 0.025 of the value; with independent errors a GEMM's output inherits that relative RMS. Per layer the
  logits see the qkv, o, up and down inputs and the MLP intermediate quantized, the up output's error doubled by the
  square: ~0.025 * sqrt(2 layers * (1 + 1 + 4 + 1 + 1)) = 0.10 of the logits' RMS. Measured 0.086-0.118 over the 7
  variants below x 3 seeds (max |diff| 0.56-0.76 at logit RMS 1.2); LOOSE_REL_RMS = 0.15.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.errors import CheckpointError
from model.fp8 import Fp8LinearMethod
from model.loader import load_model, read_quant_config
from model.quant import UnquantizedLinearMethod
from model.quant_config import detect_quant_config
from tests.utils import PagedSession, hf_model, make_tiny_checkpoint

# intermediate 192: the MLP intermediate has one full and one partial 128-column group.
CONFIG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                     torch_dtype="float32")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
# k and v weights scaled so that q/k/v get clearly different per-tensor scales (requantization then matters).
SKEW = {"k_proj": 4.0, "v_proj": 0.25}
TIGHT_ATOL = 5e-3
FLIP_ATOL = 0.2
LOOSE_REL_RMS = 0.15
E4M3_MAX = 448.0


# ---- this test's own FP8 arithmetic (independent of model/ and kernels/) -------------------------------------

def e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize(w: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.float()
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()
    scale = amax.clamp(min=1e-12) / E4M3_MAX
    return e4m3(w / scale), scale


def fake_quant_token(x: torch.Tensor) -> torch.Tensor:
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return e4m3(x * (1.0 / scale)).float() * scale


def fake_quant_static(x: torch.Tensor, scale: float) -> torch.Tensor:
    scale = torch.tensor(scale, dtype=torch.float32)
    return e4m3(x * (1.0 / scale)).float() * scale


def fake_quant_groups(x: torch.Tensor, group: int = 128) -> torch.Tensor:
    width = x.shape[-1]
    groups = -(-width // group)
    padded = F.pad(x, (0, groups * group - width)).unflatten(-1, (groups, group))
    scale = padded.abs().amax(-1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return (e4m3(padded * (1.0 / scale)).float() * scale).flatten(-2)[..., :width]


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# ---- writing checkpoints ------------------------------------------------------------------------------------

@dataclass
class Fp8Checkpoint:
    path: str
    seed: int
    static: bool
    written: dict[str, torch.Tensor]                  # tensors as stored
    model_weights: dict[str, torch.Tensor]            # HF-named fp8 weights the loaded model should hold
    model_scales: dict[str, torch.Tensor]             # their scales after loading
    input_scales: dict[str, float] = field(default_factory=dict)   # HF module -> static scale the model uses
    ignored: tuple[str, ...] = ()

    def dequantized(self, requantized: bool = True) -> dict[str, torch.Tensor]:
        """HF state dict of the weights the checkpoint means (requantized: those the model holds)."""
        state = {n: t for n, t in self.written.items() if not n.endswith("_scale")}
        weights = self.model_weights if requantized else None
        for name in list(state):
            module = name.removesuffix(".weight")
            if module.rpartition(".")[2] in LINEARS and module not in self.ignored:
                if weights is not None:
                    state[name] = weights[name].float() * self.model_scales[name]
                else:
                    scale = self.written[module + ".weight_scale"].float()
                    state[name] = state[name].float() * (scale.reshape(-1, 1) if scale.numel() > 1 else scale)
        return state


def _calibrate(hf, tokens: list[int]) -> tuple[dict[str, float], dict[str, float]]:
    """Input amax of every linear layer and output amax of k_proj / v_proj on `tokens`."""
    inputs, outputs, handles = {}, {}, []
    for name, module in hf.named_modules():
        if name.rpartition(".")[2] in LINEARS:
            def hook(mod, args, out, name=name):
                inputs[name] = args[0].abs().max().item()
                outputs[name] = out.abs().max().item()
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        hf(torch.tensor([tokens]))
    for h in handles:
        h.remove()
    return inputs, outputs


def write_fp8_checkpoint(root, fmt: str = "fp8", per_channel: bool = False, static: bool = False,
                         kv_scales: bool = False, seed: int = 0, scale_shape: str = "column",
                         input_scale: float | None = None, kv_scale_factor: float = 1.0,
                         ignore: tuple[str, ...] = (), kv_naming: str | None = None,
                         config: ModelConfig = CONFIG) -> Fp8Checkpoint:
    """An FP8 variant of make_tiny_checkpoint(seed) in `fmt`'s naming: "fp8" (vLLM / HF), "compressed-tensors" or
    "modelopt". Static input scales are calibrated on a random prompt (or all `input_scale`); KV scales are the
    calibrated k_proj / v_proj output amax / 448 times kv_scale_factor."""
    src = make_tiny_checkpoint(os.path.join(root, "bf16"), config, seed=seed)
    state = load_file(os.path.join(src, "model.safetensors"))
    written, weights, scales = {}, {}, {}
    for name, tensor in state.items():
        module = name.removesuffix(".weight")
        kind = module.rpartition(".")[2]
        if kind not in LINEARS or module in ignore:
            written[name] = tensor
            continue
        q, scale = quantize(tensor * SKEW.get(kind, 1.0), per_channel)
        written[name] = weights[name] = q
        if per_channel:
            stored = scale.reshape(-1) if scale_shape == "row" else scale                  # [out] or [out, 1]
        else:
            stored = scale.reshape(1) if fmt == "compressed-tensors" else scale            # [1] or []
        written[module + ".weight_scale"] = stored
        scales[name] = scale
    ckpt = Fp8Checkpoint(os.path.join(root, fmt), seed, static, written, weights, scales, ignored=ignore)
    if not per_channel:
        _expand_qkv_scales(ckpt, config)
    calibration = torch.randint(0, config.vocab_size, (32,), generator=torch.Generator().manual_seed(seed + 99))
    ref = hf_model(config, seed)
    ref.load_state_dict(ckpt.dequantized())
    amax_in, amax_out = _calibrate(ref, calibration.tolist())
    if static:
        for name in weights:
            module = name.removesuffix(".weight")
            value = input_scale if input_scale is not None else amax_in[module] / E4M3_MAX
            shape = (1,) if fmt == "compressed-tensors" else ()
            written[module + ".input_scale"] = torch.full(shape, value, dtype=torch.float32)
        _model_input_scales(ckpt, config)
    if kv_scales:
        naming = kv_naming or {"modelopt": "k_proj"}.get(fmt, "self_attn")
        for i in range(config.num_hidden_layers):
            attn = f"model.layers.{i}.self_attn"
            k, v = (amax_out[f"{attn}.{p}_proj"] / E4M3_MAX * kv_scale_factor for p in "kv")
            if naming == "k_proj":
                written[f"{attn}.k_proj.k_scale"], written[f"{attn}.v_proj.v_scale"] = torch.tensor(k), torch.tensor(v)
            elif naming == "kv_scale":
                written[f"{attn}.kv_scale"] = torch.tensor(max(k, v))
            else:
                written[f"{attn}.k_scale"], written[f"{attn}.v_scale"] = torch.tensor(k), torch.tensor(v)
    _save(ckpt, src, fmt, per_channel, static, kv_scales, ignore)
    return ckpt


def _expand_qkv_scales(ckpt: Fp8Checkpoint, config: ModelConfig) -> None:
    """Fused q/k/v with different per-tensor scales load as one per-row scale [out, 1] (each shard's rows keep
    their own scale; the fp8 bytes are untouched). Equal scales stay one per-tensor scale."""
    for i in range(config.num_hidden_layers):
        names = [f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkv"]
        if any(n not in ckpt.model_weights for n in names):
            continue
        if len({ckpt.model_scales[n].item() for n in names}) == 1:
            continue
        for n in names:
            rows = ckpt.model_weights[n].shape[0]
            ckpt.model_scales[n] = torch.full((rows, 1), ckpt.model_scales[n].item(), dtype=torch.float32)


def _model_input_scales(ckpt: Fp8Checkpoint, config: ModelConfig) -> None:
    for name in ckpt.model_weights:
        module = name.removesuffix(".weight")
        ckpt.input_scales[module] = ckpt.written[module + ".input_scale"].item()
    for i in range(config.num_hidden_layers):
        fused = [f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv"]
        top = max(ckpt.input_scales[m] for m in fused)
        ckpt.input_scales.update(dict.fromkeys(fused, top))


def _save(ckpt: Fp8Checkpoint, src: str, fmt: str, per_channel: bool, static: bool, kv: bool, ignore) -> None:
    os.makedirs(ckpt.path)
    save_file({n: t.contiguous() for n, t in ckpt.written.items()}, os.path.join(ckpt.path, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        hf = json.load(f)
    ignored = ["lm_head", *ignore]
    if fmt == "fp8":
        hf["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic",
                                     "ignored_layers": ignored}
    elif fmt == "compressed-tensors":
        acts = ({"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True} if static
                else {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True, "symmetric": True})
        weights = {"num_bits": 8, "type": "float", "strategy": "channel" if per_channel else "tensor",
                   "dynamic": False, "symmetric": True}
        hf["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}},
            "ignore": ignored,
            "kv_cache_scheme": ({"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                                 "symmetric": True} if kv else None)}
    elif fmt == "modelopt":
        with open(os.path.join(ckpt.path, "hf_quant_config.json"), "w") as f:
            json.dump({"producer": {"name": "modelopt", "version": "0.0"},
                       "quantization": {"quant_algo": "FP8" if not per_channel else "FP8_PER_CHANNEL_PER_TOKEN",
                                        "kv_cache_quant_algo": "FP8" if kv else None,
                                        "exclude_modules": ignored}}, f)
    with open(os.path.join(ckpt.path, "config.json"), "w") as f:
        json.dump(hf, f)


# ---- references ---------------------------------------------------------------------------------------------

def reference_logits(ckpt: Fp8Checkpoint, tokens: list[int], fake_quant: bool = True,
                     requantized: bool = True, config: ModelConfig = CONFIG) -> torch.Tensor:
    hf = hf_model(config, ckpt.seed)
    hf.load_state_dict(ckpt.dequantized(requantized))
    if fake_quant:
        for name, module in hf.named_modules():
            if name.rpartition(".")[2] not in LINEARS or name in ckpt.ignored:
                continue
            if name.endswith("down_proj") and f"{name.rpartition('.')[0]}.up_proj" not in ckpt.ignored:
                fq = fake_quant_groups        # the fused MLP's intermediate
            elif ckpt.static:
                fq = lambda x, s=ckpt.input_scales[name]: fake_quant_static(x, s)  # noqa: E731
            else:
                fq = fake_quant_token
            module.register_forward_pre_hook(lambda mod, args, fq=fq: (fq(args[0]),))
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()                                  # [S, vocab]


def assert_tight(got: torch.Tensor, reference: torch.Tensor) -> None:
    """got, reference [S, vocab]: every position within TIGHT_ATOL but at most one, which is within FLIP_ATOL (an
    E4M3 rounding flip; see the module docstring)."""
    per_position = (got - reference).abs().amax(dim=-1)                                     # [S]
    off = (per_position > TIGHT_ATOL).nonzero().flatten().tolist()
    assert len(off) <= 1 and per_position.max() <= FLIP_ATOL, \
        f"positions {off} differ by {per_position[off].tolist()} (tight {TIGHT_ATOL}, one flip up to {FLIP_ATOL})"


def model_logits(model, tokens: list[int]) -> torch.Tensor:
    return PagedSession(model).step([(0, tokens)])[0]                                         # [S, vocab]


def prompt(seed: int, n: int = 24) -> list[int]:
    return torch.randint(0, CONFIG.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def rel_rms(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def check_parameters(model, ckpt: Fp8Checkpoint) -> None:
    """The loaded fp8 weights and scales are exactly what the checkpoint says (fused q/k/v concatenated)."""
    params = dict(model.named_parameters())
    for i in range(model.config.num_hidden_layers):
        for ours, parts in ((f"model.layers.{i}.self_attn.qkv_proj", [f"model.layers.{i}.self_attn.{p}_proj"
                                                                      for p in "qkv"]),
                            *((f"model.layers.{i}.{m}", [f"model.layers.{i}.{m}"])
                              for m in ("self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"))):
            if parts[0] in ckpt.ignored:
                continue
            weight = torch.cat([ckpt.model_weights[p + ".weight"] for p in parts])
            assert same_bytes(params[ours + ".weight"], weight), ours
            scales = [ckpt.model_scales[p + ".weight"] for p in parts]
            expected = torch.cat(scales) if scales[0].dim() == 2 else scales[0]
            assert torch.equal(params[ours + ".weight_scale"], expected), ours
            if ckpt.static:
                assert params[ours + ".input_scale"].item() == ckpt.input_scales[parts[0]]


# ---- tests --------------------------------------------------------------------------------------------------

VARIANTS = {
    # name: (fmt, per_channel, static, scale_shape, expected (source, granularity, scheme))
    "vllm-tensor-dynamic": ("fp8", False, False, "column", ("fp8", "tensor", "dynamic")),
    "vllm-tensor-static": ("fp8", False, True, "column", ("fp8", "tensor", "static")),
    "vllm-channel-dynamic": ("fp8", True, False, "column", ("fp8", "channel", "dynamic")),
    "vllm-channel-static-1d-scales": ("fp8", True, True, "row", ("fp8", "channel", "static")),
    "ct-tensor-static": ("compressed-tensors", False, True, "column", ("compressed-tensors", "tensor", "static")),
    "ct-channel-token": ("compressed-tensors", True, False, "column", ("compressed-tensors", "channel", "dynamic")),
    "modelopt-fp8": ("modelopt", False, True, "column", ("modelopt", "tensor", "static")),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_fp8_checkpoint_loads_and_matches_dequantized_reference(tmp_path, name):
    fmt, per_channel, static, scale_shape, expected = VARIANTS[name]
    seed = sorted(VARIANTS).index(name)
    ckpt = write_fp8_checkpoint(tmp_path, fmt, per_channel, static, kv_scales=fmt == "modelopt", seed=seed,
                                scale_shape=scale_shape)
    quant = read_quant_config(ckpt.path)
    assert (quant.source, quant.weight_granularity, quant.activation_scheme) == expected
    assert quant.kv_scales == (fmt == "modelopt")

    model, _ = load_model(ckpt.path, dtype="float32")
    assert isinstance(model.linear_method, Fp8LinearMethod)
    check_parameters(model, ckpt)
    if fmt == "modelopt":  # k_proj.k_scale / v_proj.v_scale naming reaches the attention layers of an FP8 cache
        attn = load_model(ckpt.path, dtype="float32", kv_cache_dtype="fp8")[0].model.layers[1].self_attn
        assert (attn.k_scale, attn.v_scale) == (ckpt.written["model.layers.1.self_attn.k_proj.k_scale"].item(),
                                                ckpt.written["model.layers.1.self_attn.v_proj.v_scale"].item())
        assert model.model.layers[1].self_attn.k_scale == 1.0  # a model-dtype cache stores values unscaled

    tokens = prompt(seed)
    got = model_logits(model, tokens)
    assert_tight(got, reference_logits(ckpt, tokens))
    plain = reference_logits(ckpt, tokens, fake_quant=False)
    assert 0 < rel_rms(got, plain) < LOOSE_REL_RMS


def test_fused_qkv_keeps_each_shard_scale_exactly(tmp_path):
    """q/k/v with three different per-tensor scales: the fused weight keeps the checkpoint's bytes and carries a
    per-row scale, so the model computes exactly the checkpoint's dequantized weights (no second rounding, unlike
    requantizing to the max scale)."""
    ckpt = write_fp8_checkpoint(tmp_path, "fp8", per_channel=False, seed=11)
    scales = [ckpt.written[f"model.layers.0.self_attn.{p}_proj.weight_scale"].item() for p in "qkv"]
    assert len(set(scales)) == 3  # the test really has differing shard scales
    model, _ = load_model(ckpt.path, dtype="float32")
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight_scale.shape == (qkv.out_features, 1)
    assert sorted(set(qkv.weight_scale.flatten().tolist())) == sorted(scales)
    tokens = prompt(11)
    got = model_logits(model, tokens)
    assert_tight(got, reference_logits(ckpt, tokens, requantized=False))


def test_static_input_scale_is_used(tmp_path):
    """A deliberately tiny input_scale saturates every activation at +-448 * 1e-4: the model must follow it (it
    matches the reference that fake-quantizes with that scale) and so differ from the dynamic-activation run of the
    same weights by far more than activation quantization does."""
    ckpt = write_fp8_checkpoint(tmp_path / "tiny", "fp8", static=True, seed=4, input_scale=1e-4)
    dynamic = write_fp8_checkpoint(tmp_path / "dyn", "fp8", static=False, seed=4)
    tokens = prompt(4)
    saturated = model_logits(load_model(ckpt.path, dtype="float32")[0], tokens)
    normal = model_logits(load_model(dynamic.path, dtype="float32")[0], tokens)
    assert_tight(saturated, reference_logits(ckpt, tokens))
    plain = reference_logits(dynamic, tokens, fake_quant=False)
    assert rel_rms(saturated, plain) > 3 * LOOSE_REL_RMS > 3 * rel_rms(normal, plain)


def test_ignored_layer_stays_unquantized(tmp_path):
    ignored = "model.layers.1.mlp.down_proj"
    ckpt = write_fp8_checkpoint(tmp_path, "fp8", per_channel=True, seed=6, ignore=(ignored,))
    model, _ = load_model(ckpt.path, dtype="float32")
    down = model.model.layers[1].mlp.down_proj
    assert isinstance(down.linear_method, UnquantizedLinearMethod) and down.weight.dtype == torch.float32
    assert not hasattr(down, "weight_scale")
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    tokens = prompt(6)
    assert_tight(model_logits(model, tokens), reference_logits(ckpt, tokens))


def test_quantization_fp8_on_a_bf16_checkpoint(tmp_path):
    """`--quantization fp8`: weights quantized per output channel at load, bit for bit as this test quantizes
    them; nothing high-precision kept. Logits against the unquantized model: weight rounding (per channel, the same
    ~0.025 relative RMS per element as activations) adds to the activation-quantization error, ~sqrt(2) x 0.10;
    measured 0.10-0.12 over 6 seeds, bound 0.2. Greedy tokens: random tiny models have flat distributions (top-1/
    top-2 margins of 0.01-0.3 are common at logit RMS 1.2), so the argmax flips at 6-25% of positions, all with margins
    <= 0.35; it must agree wherever the margin exceeds 4x the margin's RMS error (sqrt(2) x the per-logit RMS
    error, ~0.75 here)."""
    config = CONFIG.with_(torch_dtype="bfloat16")
    path = make_tiny_checkpoint(tmp_path, config, seed=8)
    model, loaded_config = load_model(path, dtype="float32", quantization="fp8")
    assert loaded_config.torch_dtype == "float32" and model.linear_method.quant.source == "online"
    state = load_file(os.path.join(path, "model.safetensors"))
    params = dict(model.named_parameters())
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        qkv = [quantize(state[prefix + f"self_attn.{p}_proj.weight"], per_channel=True) for p in "qkv"]
        assert same_bytes(params[prefix + "self_attn.qkv_proj.weight"], torch.cat([q for q, _ in qkv]))
        assert torch.equal(params[prefix + "self_attn.qkv_proj.weight_scale"], torch.cat([s for _, s in qkv]))
        for m in ("self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
            q, s = quantize(state[prefix + m + ".weight"], per_channel=True)
            assert same_bytes(params[prefix + m + ".weight"], q)
            assert torch.equal(params[prefix + m + ".weight_scale"], s)
    assert all(p.dtype in (torch.float8_e4m3fn, torch.float32) for p in params.values())

    reference, _ = load_model(path, dtype="float32")
    tokens = prompt(8, 96)
    got, ref = model_logits(model, tokens), model_logits(reference, tokens)
    error = rel_rms(got, ref)
    assert error < 0.2
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 4 * 2 ** 0.5 * error * ref.pow(2).mean().sqrt()
    assert clear.sum() >= 3
    assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])


def test_quantization_flag_on_fp8_checkpoint_and_bad_values(tmp_path):
    ckpt = write_fp8_checkpoint(tmp_path, "fp8", per_channel=True, seed=2)
    model, _ = load_model(ckpt.path, dtype="float32", quantization="fp8")   # a no-op on an FP8 checkpoint
    assert model.linear_method.quant.source == "fp8"
    check_parameters(model, ckpt)
    with pytest.raises(ValueError, match="--quantization 'awq' is not supported"):
        load_model(ckpt.path, dtype="float32", quantization="awq")
    with pytest.raises(ValueError, match="--kv-cache-dtype must be one of"):
        load_model(ckpt.path, dtype="float32", kv_cache_dtype="fp8_e5m2")


def test_dummy_fp8_model(tmp_path):
    model, _ = load_model("tiny", load_format="dummy", quantization="fp8")
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.weight_scale.shape == (qkv.out_features, 1)
    logits = model_logits(model, [1, 2, 3])
    assert torch.isfinite(logits).all()


# ---- bad checkpoints and unsupported formats ----------------------------------------------------------------

def _edit(ckpt: Fp8Checkpoint, change) -> str:
    state = load_file(os.path.join(ckpt.path, "model.safetensors"))
    change(state)
    save_file(state, os.path.join(ckpt.path, "model.safetensors"))
    return ckpt.path


@pytest.mark.parametrize("change, message", [
    (lambda s: s.__setitem__("model.layers.0.mlp.up_proj.weight", s["model.layers.0.mlp.up_proj.weight"].float()),
     r"'model\.layers\.0\.mlp\.up_proj\.weight'.*expected an FP8 E4M3 weight"),
    (lambda s: s.pop("model.layers.1.self_attn.k_proj.weight_scale"),
     r"missing 1 tensor.*model\.layers\.1\.self_attn\.k_proj\.weight_scale"),
    (lambda s: s.__setitem__("model.layers.0.self_attn.v_proj.weight_scale", torch.tensor(float("nan"))),
     r"'model\.layers\.0\.self_attn\.v_proj\.weight_scale'.*finite"),
    (lambda s: s.__setitem__("model.layers.0.self_attn.k_scale", torch.tensor([1.0, 2.0])),
     r"'model\.layers\.0\.self_attn\.k_scale'.*one finite positive value"),
])
def test_bad_fp8_tensors_are_named(tmp_path, change, message):
    ckpt = write_fp8_checkpoint(tmp_path, "fp8", seed=1)
    with pytest.raises(CheckpointError, match=message):
        load_model(_edit(ckpt, change), dtype="float32")


def test_partially_ignored_fused_layer_is_an_error(tmp_path):
    ckpt = write_fp8_checkpoint(tmp_path, "fp8", per_channel=True, seed=1, ignore=("model.layers.0.self_attn.q_proj",))
    with pytest.raises(ValueError, match="q_proj.*unquantized but not.*k_proj.*fuses"):
        load_model(ckpt.path, dtype="float32")


def test_block_wise_checkpoint_on_disk_is_refused(tmp_path):
    ckpt = write_fp8_checkpoint(tmp_path, "fp8", seed=1)
    with open(os.path.join(ckpt.path, "config.json")) as f:
        hf = json.load(f)
    hf["quantization_config"]["weight_block_size"] = [128, 128]
    with open(os.path.join(ckpt.path, "config.json"), "w") as f:
        json.dump(hf, f)
    with pytest.raises(ValueError, match=r"block-wise FP8 \(weight_block_size \[128, 128\]\) is not supported"):
        load_model(ckpt.path, dtype="float32")


_FP8_SCALES = {"model.layers.0.mlp.up_proj.weight_scale": ()}
_CT_GROUP = {"format": "float-quantized", "weights": {"num_bits": 8, "type": "float", "strategy": "tensor"},
             "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}


def _ct(**group_changes) -> dict:
    group = {**_CT_GROUP, **group_changes}
    return {"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {"group_0": group}}}


@pytest.mark.parametrize("hf, modelopt, scales, message", [
    ({"quantization_config": {"quant_method": "awq", "bits": 4}}, None, {}, "quant_method 'awq' is not supported"),
    ({"quantization_config": {"quant_method": "gptq"}}, None, {}, "quant_method 'gptq' is not supported"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}, None, _FP8_SCALES,
     "block-wise FP8"),
    ({"quantization_config": {"quant_method": "fp8"}}, None, {"model.layers.0.mlp.up_proj.weight_scale": (2, 4)},
     "block-wise weight scales are not supported"),
    ({"quantization_config": {"quant_method": "fp8"}}, None, {}, "must have \\*.weight_scale tensors"),
    ({"quantization_config": {"quant_method": "fp8"}}, None,
     {"a.up_proj.weight_scale": (), "a.down_proj.weight_scale": (8, 1)}, "mixes per-tensor and per-channel"),
    ({"quantization_config": {"quant_method": "fp8", "activation_scheme": "per-group"}}, None, _FP8_SCALES,
     "activation_scheme 'per-group'"),
    (_ct(weights={"num_bits": 8, "type": "int", "strategy": "channel"}), None, {}, "8-bit int quantization"),
    (_ct(weights={"num_bits": 4, "type": "int", "strategy": "group"}, format="pack-quantized"), None, {},
     "format 'pack-quantized'"),
    (_ct(weights={"num_bits": 8, "type": "float", "strategy": "block"}), None, {}, "weight strategy 'block'"),
    (_ct(input_activations=None), None, {}, "weight-only"),
    (_ct(input_activations={"num_bits": 8, "type": "float", "strategy": "group", "dynamic": True}), None, {},
     "input_activations strategy 'group'"),
    ({}, {"quantization": {"quant_algo": "NVFP4"}}, {}, "quant_algo 'NVFP4' is not supported"),
    ({}, {"quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "NVFP4"}}, _FP8_SCALES,
     "kv_cache_quant_algo 'NVFP4'"),
    ({}, None, _FP8_SCALES, "no quantization_config"),
])
def test_unsupported_formats_are_refused(hf, modelopt, scales, message):
    with pytest.raises(ValueError, match=message):
        detect_quant_config({"model_type": "nemotron", **hf}, modelopt, scales)


def test_supported_format_details():
    ct = detect_quant_config(_ct(input_activations={"num_bits": 8, "type": "float", "strategy": "tensor",
                                                    "dynamic": True}), None, {})
    assert (ct.weight_granularity, ct.activation_scheme) == ("tensor", "dynamic")  # dynamic per tensor runs per token
    opt = detect_quant_config({}, {"quantization": {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN",
                                                    "exclude_modules": ["lm_head", "re:.*layers\\.1\\..*"]}},
                              {"x.weight_scale": (8,), "model.layers.0.self_attn.kv_scale": ()})
    assert (opt.weight_granularity, opt.activation_scheme, opt.kv_scales) == ("channel", "dynamic", True)
    assert opt.is_ignored("lm_head") and opt.is_ignored("model.layers.1.mlp.up_proj")
    assert not opt.is_ignored("model.layers.0.mlp.up_proj")
    assert detect_quant_config({"model_type": "nemotron"}, None, {}) is None
