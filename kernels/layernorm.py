"""LayerNorm1P (LayerNorm with bias whose scale is `weight + 1`), alone or fused with per-token FP8 quantization.

Semantics (`layernorm1p_ref` / `layernorm1p_fp8_ref` are the specification):

- y = (x - mean) / sqrt(var + eps) * (weight + 1) + bias over the last dim, var biased (divide by H). Everything
  runs in fp32: x, weight and bias are widened exactly and `weight + 1` is formed in fp32. `model.layers.LayerNorm1P`
  (like HF) forms `weight + 1` in the parameter dtype; in bf16 that rounds the scale to 2^-8 relative (weights are
  zero-centred, so weight + 1 sits near 1 where the bf16 step is 2^-7), so a bf16 model using this op differs from
  HF by up to ~1 bf16 ulp of the output. In fp32 the two agree to rounding.
- `layernorm1p` returns y rounded once to x's dtype.
- `layernorm1p_fp8` quantizes each row of the fp32 y (before any rounding to x's dtype) with a dynamic per-token
  scale, in the convention of `kernels/fp8_quant.py` (so it equals LayerNorm1P followed by per-token quantization
  of the fp32 result): scale = max(amax(|y|), FP8_AMAX_EPS) / 448 and y_fp8 = E4M3(clamp(y * (1 / scale), ±448))
  with 1 / scale rounded to fp32 once per row, so that y ≈ y_fp8.float() * scale[:, None]. FP8_AMAX_EPS = 1e-12
  keeps an all-zero row from giving 0/0: its scale is 1e-12 / 448 and its codes are zeros, never NaN.

Kernels: one program per row. When the row fits one power-of-two block of at most _MAX_ROW_BLOCK (8192) elements,
which covers Nemotron-4 15B (H = 6144), the row is loaded once and kept in registers for the mean, the variance
(two-pass, from the registers), the normalization and, in the FP8 kernel, the amax and the quantization: one
HBM read and one write. A longer row (340B: H = 18432 = 9 x 2048) would need 32768-wide blocks and spill, so it is
walked in chunks (_CHUNK = 2048 elements; _MAX_ROW_BLOCK = 8192 with 16 warps when there are at most _FEW_ROWS
rows, where a pass is latency-bound): pass 1 computes mean and variance in one sweep by combining per-chunk
(mean, M2) pairs (Chan et al.; stable, unlike E[x^2] - E[x]^2), pass 2 normalizes and stores. The FP8 kernel needs
the amax of the normalized row before it can quantize anything, and that depends on weight/bias per column, so the
chunked FP8 kernel makes three passes: stats, amax of y, then recompute y, quantize and store. Passes 2 and 3
re-read the row (36 KB in bf16) from L1/L2, not HBM, so HBM traffic stays one read of x plus the writes.

The kernels' mean and variance are summed in another order than torch's, so y differs from the reference's by
fp32 rounding, which can flip an E4M3 (or bf16/fp16) rounding by one step. Under TRITON_INTERPRET=1
the Triton 3.9 interpreter's fp32 -> float8e4nv cast drops the carry when rounding up across a power of two
(125.98 becomes 64) and its fp32 -> bf16 cast truncates; the kernel rounds to the E4M3 grid itself when
interpreted (SOFT_E4M3) so that the cast is exact, and the bf16 truncation (1 ulp) is left to test tolerances.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.fp8_quant import ieee_div
from kernels.triton_utils import interpreting, round_to_e4m3

FP8_E4M3_MAX = 448.0
FP8_AMAX_EPS = 1e-12
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Largest row kept whole in registers (16 warps x 32 threads x 16 fp32 values); longer rows go in chunks.
_MAX_ROW_BLOCK = 8192
# Chunk of the multi-pass path: 8 warps x 32 threads x 8 values (16-byte bf16 loads); 18432 = 9 chunks exactly.
_CHUNK = 2048
# Up to this many rows (decode batches) the chunked path walks _MAX_ROW_BLOCK-wide chunks with 16 warps: with one
# program per row and few rows, a pass is a chain of dependent chunk loads, and 3 chunks for H = 18432 instead of
# 9 shorten it. The H200 run of 2026-11-28 measured the 9-chunk kernels at 14 us (plain) and 19 us (FP8) for one
# 340B row, against 3.3 us for a 15B row held in one block.
_FEW_ROWS = 256


def _normalize_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H] -> fp32 [T, H]: LayerNorm1P with fp32 statistics and fp32 weight + 1."""
    # torch's layer_norm computes exactly this (fp32 mean, biased variance, rsqrt(var + eps)) in one op; on the CPU
    # serving path the eight separate ops it replaces cost ~15% of a decode step of the demo model.
    return F.layer_norm(x.float(), x.shape[-1:], weight.float() + 1.0, bias.float(), eps)  # [T, H] fp32


def layernorm1p_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """x [T, H] fp32/bf16/fp16; weight, bias [H] -> [T, H] in x's dtype."""
    _check(x, weight, bias)
    return _normalize_ref(x, weight, bias, eps).to(x.dtype)


def layernorm1p_fp8_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H]; weight, bias [H] -> (y_fp8 [T, H] float8_e4m3fn, scale [T] fp32), y ≈ y_fp8.float() * scale."""
    _check(x, weight, bias)
    y = _normalize_ref(x, weight, bias, eps)                                    # [T, H] fp32
    # IEEE division like the kernel's div_rn: `/ FP8_E4M3_MAX` (a Python float) would run on CUDA as a multiply by
    # the rounded reciprocal 1/448 (ieee_div in kernels/fp8_quant.py says why and why `1.0 / scale` is exact).
    scale = ieee_div(y.abs().amax(dim=-1).clamp(min=FP8_AMAX_EPS), FP8_E4M3_MAX)  # [T] fp32
    inv_scale = 1.0 / scale                                                     # [T] fp32, rounded once
    y_fp8 = (y * inv_scale[:, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)  # [T, H]
    return y_fp8, scale


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"layernorm1p: x must be [T, H], got {tuple(x.shape)}")
    hidden = x.shape[1]
    if weight.shape != (hidden,) or bias.shape != (hidden,):
        raise ValueError(f"layernorm1p: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} must be "
                         f"[{hidden}]")
    if x.dtype not in _FLOAT_DTYPES or weight.dtype not in _FLOAT_DTYPES or bias.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"layernorm1p: x/weight/bias must be fp32/bf16/fp16, got {x.dtype}, {weight.dtype}, "
                         f"{bias.dtype}")
    if hidden == 0 or len({x.device, weight.device, bias.device}) != 1:
        raise ValueError("layernorm1p: H must be > 0 and x/weight/bias on one device")


@triton.jit
def _normalize(x, w_ptr, b_ptr, offs, mask, mean, rstd):
    """fp32 x chunk at columns offs -> fp32 y = (x - mean) * rstd * (w + 1) + b (masked lanes: garbage)."""
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32) + 1.0
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return (x - mean) * rstd * w + b


@triton.jit
def _stats_in_registers(x, mask, H, eps):
    """Whole-row fp32 x (masked lanes 0) -> mean, 1 / sqrt(var + eps), two-pass from registers."""
    mean = tl.sum(x, axis=0) / H
    dev = tl.where(mask, x - mean, 0.0)
    var = tl.sum(dev * dev, axis=0) / H
    return mean, tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))


@triton.jit
def _stats_chunked(x_row, H, eps, BLOCK: tl.constexpr):
    """Mean and 1 / sqrt(var + eps) of a row in one sweep of BLOCK chunks, merging per-chunk (mean, M2)."""
    cols = tl.arange(0, BLOCK)
    mean = 0.0
    m2 = 0.0
    seen = 0.0
    for start in range(0, H, BLOCK):
        mask = start + cols < H
        x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        n = tl.sum(mask.to(tl.float32), axis=0)
        chunk_mean = tl.sum(x, axis=0) / n
        dev = tl.where(mask, x - chunk_mean, 0.0)
        chunk_m2 = tl.sum(dev * dev, axis=0)
        total = seen + n
        delta = chunk_mean - mean
        mean = mean + delta * (n / total)
        m2 = m2 + chunk_m2 + delta * delta * (seen * n / total)
        seen = total
    return mean, tl.math.div_rn(1.0, tl.sqrt_rn(m2 / H + eps))


@triton.jit
def _quantize_store(ptrs, y, mask, inv_scale, SOFT_E4M3: tl.constexpr):
    q = tl.minimum(tl.maximum(y * inv_scale, -448.0), 448.0)
    if SOFT_E4M3:
        q = round_to_e4m3(q)
    tl.store(ptrs, q.to(tl.float8e4nv), mask=mask)


@triton.jit
def _layernorm1p_kernel(x_ptr, w_ptr, b_ptr, y_ptr, stride_x, H, eps, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    y_row = y_ptr + row * H
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        mask = cols < H
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        mean, rstd = _stats_in_registers(x, mask, H, eps)
        y = _normalize(x, w_ptr, b_ptr, cols, mask, mean, rstd)
        tl.store(y_row + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        mean, rstd = _stats_chunked(x_row, H, eps, BLOCK)
        for start in range(0, H, BLOCK):
            offs = start + cols
            mask = offs < H
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            y = _normalize(x, w_ptr, b_ptr, offs, mask, mean, rstd)
            tl.store(y_row + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _layernorm1p_fp8_kernel(x_ptr, w_ptr, b_ptr, y_ptr, scale_ptr, stride_x, H, eps, BLOCK: tl.constexpr,
                            ONE_BLOCK: tl.constexpr, SOFT_E4M3: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    y_row = y_ptr + row * H
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        mask = cols < H
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        mean, rstd = _stats_in_registers(x, mask, H, eps)
        y = _normalize(x, w_ptr, b_ptr, cols, mask, mean, rstd)
        amax = tl.max(tl.where(mask, tl.abs(y), 0.0), axis=0)
        scale = tl.math.div_rn(tl.maximum(amax, 1e-12), 448.0)  # FP8_AMAX_EPS
        _quantize_store(y_row + cols, y, mask, tl.math.div_rn(1.0, scale), SOFT_E4M3)
    else:
        mean, rstd = _stats_chunked(x_row, H, eps, BLOCK)
        amax = 0.0
        for start in range(0, H, BLOCK):  # pass 2: amax of the fp32 normalized row
            offs = start + cols
            mask = offs < H
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            y = _normalize(x, w_ptr, b_ptr, offs, mask, mean, rstd)
            amax = tl.maximum(amax, tl.max(tl.where(mask, tl.abs(y), 0.0), axis=0))
        scale = tl.math.div_rn(tl.maximum(amax, 1e-12), 448.0)  # FP8_AMAX_EPS
        inv_scale = tl.math.div_rn(1.0, scale)
        for start in range(0, H, BLOCK):  # pass 3: the same y again, quantized
            offs = start + cols
            mask = offs < H
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            y = _normalize(x, w_ptr, b_ptr, offs, mask, mean, rstd)
            _quantize_store(y_row + offs, y, mask, inv_scale, SOFT_E4M3)
    tl.store(scale_ptr + row, scale)


def _launch_config(hidden: int, num_tokens: int) -> tuple[int, bool, int]:
    """(BLOCK, ONE_BLOCK, num_warps) for `num_tokens` rows of `hidden` elements."""
    block = triton.next_power_of_2(hidden)
    if block <= _MAX_ROW_BLOCK:
        return block, True, min(16, max(1, block // 512))  # ~16 values per thread at the top size
    if num_tokens <= _FEW_ROWS:
        return _MAX_ROW_BLOCK, False, 16
    return _CHUNK, False, 8


def _rows(x: torch.Tensor) -> torch.Tensor:
    """Kernels need unit stride along H; any row stride is fine."""
    return x if x.stride(1) == 1 else x.contiguous()


def layernorm1p(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Triton version of `layernorm1p_ref` (same contract)."""
    _check(x, weight, bias)
    x = _rows(x)
    num_tokens, hidden = x.shape
    y = torch.empty((num_tokens, hidden), dtype=x.dtype, device=x.device)  # [T, H]
    if num_tokens == 0:
        return y
    block, one_block, num_warps = _launch_config(hidden, num_tokens)
    _layernorm1p_kernel[(num_tokens,)](x, weight.contiguous(), bias.contiguous(), y, x.stride(0), hidden,
                                       float(eps), BLOCK=block, ONE_BLOCK=one_block, num_warps=num_warps,
                                       enable_fp_fusion=True)
    return y


def layernorm1p_fp8(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `layernorm1p_fp8_ref` (same contract): LayerNorm1P and per-token E4M3 quantization in one
    kernel, so the normalized activations never reach HBM in 16 bits."""
    _check(x, weight, bias)
    x = _rows(x)
    num_tokens, hidden = x.shape
    y = torch.empty((num_tokens, hidden), dtype=torch.float8_e4m3fn, device=x.device)  # [T, H]
    scale = torch.empty((num_tokens,), dtype=torch.float32, device=x.device)            # [T]
    if num_tokens == 0:
        return y, scale
    block, one_block, num_warps = _launch_config(hidden, num_tokens)
    _layernorm1p_fp8_kernel[(num_tokens,)](x, weight.contiguous(), bias.contiguous(), y, scale, x.stride(0),
                                           hidden, float(eps), BLOCK=block, ONE_BLOCK=one_block,
                                           SOFT_E4M3=interpreting(), num_warps=num_warps, enable_fp_fusion=True)
    return y, scale
