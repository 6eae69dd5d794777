"""Fp8LinearMethod on single layers: torch._scaled_mm layouts on the CPU, loading (per-tensor q/k/v scales requantized
to their max, per-channel scales concatenated, quantization at load), apply and the fused MLP on both kernel
backends, mixed quantized/unquantized MLPs, loader errors; and an FP8 tiny model giving the same greedy tokens on
the triton backend (interpreted) as on the torch backend.

Tolerances. Where the test quantizes inputs exactly as the method does (the kernels' convention: scale =
max(amax, 1e-12) / 448, q = e4m3(x * (1 / scale))), the two sides multiply the same E4M3 values, so only fp32
summation order differs: |diff| <= 1e-5 * |ref| + 1e-5 * sum_k |a_k b_k| (fp8_gemm's own bound for fp32 outputs,
K <= 640 here). Between backends the intermediate of the fused MLP may round an element to the other E4M3 neighbour
where fp32 noise straddles a rounding midpoint (< 0.5% of elements, kernels/mlp.py), hence a bound relative to the
output's magnitude there.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from kernels.fp8_gemm import fp8_gemm_ref
from model.errors import CheckpointError
from model.fp8 import Fp8LinearMethod, _torch_fp8_gemm
from model.ops import get_ops
from model.parallel import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from model.quant import UnquantizedLinearMethod
from model.quant_config import QuantConfig
from server.engine.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.sampling import SamplingParams
from tests.model.test_fp8_checkpoints import (CONFIG, e4m3, fake_quant_groups, fake_quant_static, fake_quant_token,
                                              quantize, same_bytes, write_fp8_checkpoint)
from tests.utils import make_tiny_checkpoint

FP8 = torch.float8_e4m3fn


def _gemm_bound(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return 1e-5 * ref.abs() + 1e-5 * (a.abs() @ b.abs().T)


def _scale(kind: str, n: int) -> torch.Tensor:
    """A random positive scale of the layout `kind` for n rows: [], [1], [n] or [n, 1]."""
    shape = {"scalar": (), "one": (1,), "row": (n,), "column": (n, 1)}[kind]
    return torch.rand(shape) * 0.02 + 0.001


@pytest.mark.parametrize("m, k, n", [(0, 40, 16), (1, 7, 5), (5, 160, 48), (7, 96, 20)])
@pytest.mark.parametrize("a_kind", ["scalar", "one", "row", "column"])
@pytest.mark.parametrize("b_kind", ["scalar", "one", "row", "column"])
def test_scaled_mm_on_cpu_matches_reference(m, k, n, a_kind, b_kind):
    """torch 2.13's CPU _scaled_mm takes only scalar x scalar or [M, 1] x [1, N]; every other layout is expanded."""
    g = torch.Generator().manual_seed(m * 1000 + k)
    a = e4m3(torch.randn(m, k, generator=g) * 50)
    b = e4m3(torch.randn(n, k, generator=g) * 50)
    a_scale, b_scale = _scale(a_kind, m), _scale(b_kind, n)
    ref = fp8_gemm_ref(a, b, a_scale, b_scale, torch.float32)
    got = _torch_fp8_gemm(a, b, a_scale, b_scale, torch.float32)
    a_deq = a.float() * (a_scale.reshape(-1, 1) if a_kind in ("row", "column") else a_scale)
    b_deq = b.float() * (b_scale.reshape(-1, 1) if b_kind in ("row", "column") else b_scale)
    assert got.shape == (m, n) and ((got - ref).abs() <= _gemm_bound(a_deq, b_deq, ref)).all()
    bf16 = _torch_fp8_gemm(a, b, a_scale, b_scale, torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), ref, rtol=2 ** -8, atol=1e-6)


def _method(granularity="tensor", scheme="dynamic", backend="torch", source="fp8") -> Fp8LinearMethod:
    return Fp8LinearMethod(QuantConfig(source, granularity, scheme), backend)


def _load(layer, name: str, tensor: torch.Tensor, shard: str | None = None) -> None:
    param = getattr(layer, name)
    if shard is None:
        param.weight_loader(param, tensor)
    else:
        param.weight_loader(param, tensor, shard)


def _qkv(method, static=False, seed=0):
    """A QKV layer (hidden 160, 3 query + 1 KV heads of 16) loaded with q/k/v of very different magnitudes."""
    layer = QKVParallelLinear(160, 16, 3, 1, method, torch.float32)
    g = torch.Generator().manual_seed(seed)
    shards = {}
    for shard, (_, rows), magnitude in zip("qkv", layer.output_slices().values(), (1.0, 8.0, 0.125)):
        q, s = quantize(torch.randn(rows, 160, generator=g) * magnitude, method.per_channel)
        shards[shard] = (q, s)
        _load(layer, "weight", q, shard)
        _load(layer, "weight_scale", s, shard)
        if static:
            _load(layer, "input_scale", torch.tensor(0.01 * (1 + "qkv".index(shard))), shard)
    method.process_weights_after_loading(layer)
    return layer, shards


def test_per_tensor_qkv_scales_spread_over_their_rows():
    layer, shards = _qkv(_method("tensor", "static"), static=True)
    expected_scale = torch.cat([torch.full((q.shape[0], 1), float(s)) for q, s in shards.values()])
    assert layer.weight_scale.shape == (layer.out_features, 1) and torch.equal(layer.weight_scale, expected_scale)
    assert layer.input_scale.shape == () and layer.input_scale.item() == pytest.approx(0.03)
    expected = torch.cat([q for q, _ in shards.values()])
    assert same_bytes(layer.weight, expected)                # every shard keeps its bytes: no second rounding
    method = layer.linear_method
    method.process_weights_after_loading(layer)  # idempotent
    assert same_bytes(layer.weight, expected) and torch.equal(layer.weight_scale, expected_scale)


def test_per_channel_qkv_scales_concatenate():
    layer, shards = _qkv(_method("channel"))
    assert same_bytes(layer.weight, torch.cat([q for q, _ in shards.values()]))
    assert torch.equal(layer.weight_scale, torch.cat([s for _, s in shards.values()]))


def test_quantize_at_load_keeps_only_fp8():
    method = _method("channel", source="online")
    layer = RowParallelLinear(96, 40, method, torch.float32)
    assert getattr(layer.weight_scale, "computed_at_load", False)
    w = torch.randn(40, 96, dtype=torch.bfloat16)
    _load(layer, "weight", w)
    q, s = quantize(w, per_channel=True)
    assert same_bytes(layer.weight, q) and torch.equal(layer.weight_scale, s)
    qkv = QKVParallelLinear(32, 8, 2, 1, _method("channel", source="online"), torch.float32)
    parts = {shard: torch.randn(rows, 32) for shard, (_, rows) in qkv.output_slices().items()}
    for shard, w in parts.items():
        _load(qkv, "weight", w, shard)
    assert same_bytes(qkv.weight, torch.cat([quantize(w, True)[0] for w in parts.values()]))


@pytest.mark.parametrize("source, name, tensor, message", [
    ("fp8", "weight", torch.zeros(48, 160, dtype=torch.bfloat16), "expected an FP8 E4M3 weight"),
    ("fp8", "weight_scale", torch.ones(2), r"one value \(a per-tensor scale\), found shape \[2\]"),
    ("fp8", "weight_scale", torch.tensor(-1.0), "finite and non-negative"),
    ("fp8", "input_scale", torch.tensor(0.0), "finite and positive"),
    ("online", "weight", torch.zeros(48, 160, dtype=FP8), "needs a bf16/fp16/fp32 weight"),
])
def test_loader_errors(source, name, tensor, message):
    method = _method("tensor", "static") if source == "fp8" else _method("channel", source="online")
    layer = ColumnParallelLinear(160, 48, method, torch.float32)
    with pytest.raises(CheckpointError, match=message):
        _load(layer, name, tensor)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("granularity, scheme", [("tensor", "dynamic"), ("tensor", "static"),
                                                 ("channel", "dynamic"), ("channel", "static")])
def test_apply_matches_fake_quantized_reference(backend, granularity, scheme):
    """y = F.linear(the test's own fake-quantized input, the dequantized weight)."""
    layer, _ = _qkv(_method(granularity, scheme, backend), static=scheme == "static", seed=3)
    x = torch.randn(2, 3, 160)                                                     # leading dims are kept
    got = layer(x)
    assert got.shape == (2, 3, layer.out_features) and got.dtype == torch.float32
    xq = fake_quant_static(x, layer.input_scale.item()) if scheme == "static" else fake_quant_token(x)
    xq = xq.reshape(6, 160)
    w = layer.weight.float() * layer.weight_scale
    ref = F.linear(xq, w)
    assert ((got.reshape(6, -1) - ref).abs() <= _gemm_bound(xq, w, ref)).all()


def _mlp(method_up, method_down, seed=0):
    g = torch.Generator().manual_seed(seed)
    up = ColumnParallelLinear(64, 192, method_up, torch.float32)
    down = RowParallelLinear(192, 64, method_down, torch.float32)
    for layer in (up, down):
        w = torch.randn(layer.out_features, layer.in_features, generator=g) * 0.2
        if isinstance(layer.linear_method, UnquantizedLinearMethod):
            layer.weight.data.copy_(w)
        else:
            q, s = quantize(w, layer.linear_method.per_channel)
            _load(layer, "weight", q)
            _load(layer, "weight_scale", s)
    return up, down


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_fused_mlp_on_both_backends(granularity):
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    outs = {}
    for backend in ("torch", "triton"):
        method = _method(granularity, backend=backend)
        up, down = _mlp(method, method)
        outs[backend] = method.squared_relu_mlp(up, down, x, get_ops(backend))
    w_up = up.weight.float() * up.weight_scale
    w_down = down.weight.float() * down.weight_scale
    h = fake_quant_groups(torch.relu(F.linear(fake_quant_token(x), w_up)).square())
    ref = F.linear(h, w_down)
    assert ((outs["torch"] - ref).abs() <= _gemm_bound(h, w_down, ref)).all()
    torch.testing.assert_close(outs["triton"], outs["torch"], rtol=0, atol=1e-3 * ref.abs().max().item())


@pytest.mark.parametrize("fp8_up", [True, False])
def test_mlp_with_one_unquantized_projection(fp8_up):
    """A checkpoint may leave one projection unquantized: each then runs its own layer's method, unfused."""
    fp8, plain = _method("channel"), UnquantizedLinearMethod()
    up, down = _mlp(fp8 if fp8_up else plain, plain if fp8_up else fp8)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    got = up.linear_method.squared_relu_mlp(up, down, x, get_ops("torch"))
    expected = down(torch.relu(up(x)).square())
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# ---- a whole FP8 model on both kernel backends --------------------------------------------------------------

def _engine_run(path: str, backend: str, requests, quantization=None):
    engine = LLMEngine.from_pretrained(path, EngineConfig(max_model_len=64, num_kv_blocks=8, block_size=16,
                                                          max_num_batched_tokens=16, kernel_backend=backend,
                                                          kv_cache_dtype="fp8"),
                                       dtype="float32", quantization=quantization)
    tokens = {rid: [] for rid in requests}
    lps = {rid: [] for rid in requests}
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            lps[out.request_id] += [e.logprob for e in out.prompt_logprobs]
    return tokens, lps


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["checkpoint-per-tensor-static", "quantized-at-load"])
def test_triton_and_torch_backends_agree_on_an_fp8_model(tmp_path, variant):
    """FP8 weights and an FP8 KV cache (checkpoint scales, or 1.0) through the engine, a prompt longer than the step
    budget (chunked) and batched decode steps. Prompt log-probs within 1e-2: both backends quantize the same values
    and differ by fp32 reassociation (~1e-6 observed), except where an activation sits on an E4M3 rounding midpoint
    in one of them (one E4M3 step on one element, ~1e-3 on a log-prob)."""
    if variant == "quantized-at-load":
        path, quantization = make_tiny_checkpoint(tmp_path, CONFIG, seed=9), "fp8"
    else:
        path, quantization = write_fp8_checkpoint(tmp_path, "fp8", static=True, kv_scales=True, seed=9).path, None
    rng = random.Random(0)
    requests = {f"r{i}": ([rng.randrange(4, CONFIG.vocab_size) for _ in range(n)],
                          SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=0))
                for i, n in enumerate((3, 21))}
    torch_tokens, torch_lps = _engine_run(path, "torch", requests, quantization)
    triton_tokens, triton_lps = _engine_run(path, "triton", requests, quantization)
    assert triton_tokens == torch_tokens
    for rid in requests:
        torch.testing.assert_close(torch.tensor(triton_lps[rid]), torch.tensor(torch_lps[rid]), atol=1e-2, rtol=0)
