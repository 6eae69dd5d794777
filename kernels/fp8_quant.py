"""Activation quantization to FP8 E4M3 (torch.float8_e4m3fn): per token (dynamic) and per tensor (static or dynamic).

Convention (REFERENCE.md, "FP8 formats"): dequantized = fp8.float() * scale.

- Dynamic scales: scale = max(amax, EPS) / 448 in fp32 (IEEE division, see `ieee_div`), amax over the row (per
  token) or over the whole tensor (per tensor). EPS = 1e-12 keeps an all-zero row from producing 0/0: its scale
  is EPS / 448 and its values quantize to +0 (no NaN). Rows with amax below EPS are treated like zeros
  (everything they hold is < 1e-12).
- Values: q = e4m3(clamp(x.float() * (1 / scale), -448, 448)), the reciprocal computed once in fp32 with IEEE
  rounding, the product rounded to fp32, then rounded to nearest-even onto the E4M3 grid (saturating: the clamp
  comes first, so nothing becomes NaN). NaN inputs are unspecified.

Why the kernels round by hand: Triton's interpreter (TRITON_INTERPRET=1, our CPU test path) casts fp32 -> fp8e4nv
wrongly: it rounds ties away from zero and drops the carry when the mantissa rounds up (7.8 -> 4.0 instead of 8.0;
about 2.5% of random values came out wrong). `round_to_e4m3` (kernels/triton_utils.py) rounds in fp32 onto the E4M3 grid with one
magic-number add (IEEE round-to-nearest-even does the work), after which the cast is exact on every backend; on a
GPU it costs ~8 integer/fp ops per element in a memory-bound kernel. Kernel outputs are therefore tested
*bytewise* against the references, which use torch's own cast.

Dynamic per-tensor quantization takes amax with torch (`torch.aminmax`, one read, no |x| temporary); a grid-wide
reduction is not worth a kernel here. The quantizing pass and the static path are Triton.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_utils import round_to_e4m3

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
EPS = 1e-12

_ROW_BLOCK_MAX = 8192   # a per-token row up to this many elements is held in registers (one read of x)
_FLAT_BLOCK = 4096      # elements per program for per-tensor quantization


# ----------------------------------------------------------------------------------------------- Triton helpers

@triton.jit
def _quantize_e4m3(v, inv_scale):
    """fp32 values times the (broadcastable) fp32 reciprocal scale -> float8e4nv, saturating at +-448."""
    y = tl.minimum(tl.maximum(v * inv_scale, -448.0), 448.0)
    return round_to_e4m3(y).to(tl.float8e4nv)


@triton.jit
def _scale_from_amax(amax, EPS: tl.constexpr):
    """max(amax, EPS) / 448 with IEEE division (plain `/` may lower to an approximate divide on GPUs)."""
    return tl.math.div_rn(tl.maximum(amax, EPS), 448.0)


# ----------------------------------------------------------------------------------------------- per token

@triton.jit
def _quantize_fp8_per_token_kernel(x_ptr, q_ptr, scale_ptr, K, stride_xm, stride_qm,
                                   EPS: tl.constexpr, BLOCK_K: tl.constexpr, ONE_TILE: tl.constexpr):
    """One program per row. ONE_TILE: the row fits in one BLOCK_K tile and is read once; otherwise two passes
    (amax, then quantize; the second read mostly hits L2)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    cols = tl.arange(0, BLOCK_K)
    if ONE_TILE:
        mask = cols < K
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        scale = _scale_from_amax(tl.max(tl.abs(x), axis=0), EPS)
        inv = tl.math.div_rn(1.0, scale)
        tl.store(q_row + cols, _quantize_e4m3(x, inv), mask=mask)
    else:
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask = k0 + cols < K
            x = tl.load(x_row + k0 + cols, mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = _scale_from_amax(tl.max(amax, axis=0), EPS)
        inv = tl.math.div_rn(1.0, scale)
        for k0 in range(0, K, BLOCK_K):
            mask = k0 + cols < K
            x = tl.load(x_row + k0 + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(q_row + k0 + cols, _quantize_e4m3(x, inv), mask=mask)
    tl.store(scale_ptr + row, scale)


def ieee_div(v: torch.Tensor, divisor: float) -> torch.Tensor:
    """v / divisor (fp32 v), correctly rounded on every device, as the kernels' `tl.math.div_rn`.

    Not `v / divisor` with a Python float: on CUDA, dividing a tensor by a CPU scalar computes
    `v * (1 / divisor)` (aten/src/ATen/native/cuda/BinaryDivTrueKernel.cu: "may lose one bit of precision"), so
    e.g. amax / 448 can come out one fp32 ulp off the IEEE quotient. A 0-dim tensor on v's device takes the
    elementwise `a / b` path instead (IEEE division; on the CPU both paths divide exactly, so CPU results are the
    same bits as before). `torch.full` fills on the device from a kernel argument: no host-to-device copy, so this
    stays CUDA-graph safe (torch.tensor(...) / new_tensor would copy from host memory).

    `1.0 / scale` elsewhere is fine as it is: Python-scalar / tensor is `scale.reciprocal() * 1.0`
    (Tensor.__rtruediv__), CUDA's reciprocal kernel is `static_cast<T>(1) / a` (UnaryFractionKernels.cu; PyTorch
    is built without fast-math, so that is an IEEE division) and the CPU one divides too; `* 1.0` is exact.
    """
    return v / torch.full((), divisor, dtype=torch.float32, device=v.device)


def _scale_from_amax_ref(amax: torch.Tensor) -> torch.Tensor:
    """fp32 amax (any shape) -> max(amax, EPS) / 448 with IEEE division (the kernels' `_scale_from_amax`)."""
    return ieee_div(amax.clamp(min=EPS), FP8_MAX)


def _e4m3_ref(v: torch.Tensor) -> torch.Tensor:
    """fp32 -> E4M3, saturating (torch's cast rounds to nearest-even but turns out-of-range values into NaN)."""
    return v.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_fp8_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (bf16/fp16/fp32) -> (x_fp8 [M, K] e4m3, scale [M] fp32) with x ~= x_fp8.float() * scale[:, None]."""
    xf = x.float()                                                           # [M, K]
    amax = xf.abs().amax(dim=1) if x.shape[1] else xf.new_zeros(x.shape[0])  # [M]
    scale = _scale_from_amax_ref(amax)                                       # [M]
    return _e4m3_ref(xf * (1.0 / scale)[:, None]), scale


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `quantize_fp8_per_token_ref`; identical bytes."""
    if x.dim() != 2:
        raise ValueError(f"quantize_fp8_per_token: x must be [M, K], got {tuple(x.shape)}")
    _check_float_input("quantize_fp8_per_token", x)
    if x.stride(1) != 1:
        x = x.contiguous()
    M, K = x.shape
    q = torch.empty((M, K), dtype=FP8_DTYPE, device=x.device)               # [M, K]
    scale = torch.empty((M,), dtype=torch.float32, device=x.device)         # [M]
    if M == 0:
        return q, scale
    block = min(triton.next_power_of_2(max(K, 1)), _ROW_BLOCK_MAX)
    num_warps = 4 if block <= 2048 else 8
    _quantize_fp8_per_token_kernel[(M,)](x, q, scale, K, x.stride(0), q.stride(0), EPS=EPS, BLOCK_K=block,
                                         ONE_TILE=K <= block, num_warps=num_warps)
    return q, scale


# ----------------------------------------------------------------------------------------------- per tensor

@triton.jit
def _quantize_fp8_per_tensor_kernel(x_ptr, q_ptr, scale_ptr, n, BLOCK: tl.constexpr):
    """Flat elementwise pass; the scale is read from device memory (no host sync, CUDA-graph safe)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    inv = tl.math.div_rn(1.0, tl.load(scale_ptr))
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(q_ptr + offs, _quantize_e4m3(x, inv), mask=mask)


def _static_scale(scale: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(scale, torch.Tensor) or scale.numel() != 1:
        raise ValueError(f"{name}: a static scale must be a one-element tensor, got "
                         f"{tuple(scale.shape) if isinstance(scale, torch.Tensor) else type(scale).__name__}")
    return scale.reshape(()).float()                                         # []


def quantize_fp8_per_tensor_ref(x: torch.Tensor, scale: torch.Tensor | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (any shape) -> (x_fp8 same shape, scale [] fp32). scale None: dynamic, max(amax(|x|), EPS) / 448;
    a one-element tensor: static, used as given."""
    xf = x.float()
    if scale is None:
        amax = xf.abs().amax() if x.numel() else xf.new_zeros(())            # []
        scale = _scale_from_amax_ref(amax)                                   # []
    else:
        scale = _static_scale(scale, "quantize_fp8_per_tensor_ref")
    return _e4m3_ref(xf * (1.0 / scale)), scale


def quantize_fp8_per_tensor(x: torch.Tensor, scale: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `quantize_fp8_per_tensor_ref`; identical bytes. The dynamic amax is a torch reduction."""
    _check_float_input("quantize_fp8_per_tensor", x)
    if scale is None:
        if x.numel() == 0:
            amax = torch.zeros((), dtype=torch.float32, device=x.device)
        else:
            lo, hi = torch.aminmax(x)
            amax = torch.maximum(hi.float(), -lo.float())                    # []
        scale = _scale_from_amax_ref(amax)                                   # [] IEEE, like the per-token kernel
    else:
        scale = _static_scale(scale, "quantize_fp8_per_tensor")
        if scale.device != x.device:
            raise ValueError(f"quantize_fp8_per_tensor: scale on {scale.device}, x on {x.device}")
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    n = x.numel()
    if n:
        _quantize_fp8_per_tensor_kernel[(triton.cdiv(n, _FLAT_BLOCK),)](x, q, scale, n, BLOCK=_FLAT_BLOCK,
                                                                         num_warps=4)
    return q, scale


def _check_float_input(name: str, x: torch.Tensor) -> None:
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"{name}: x must be bf16, fp16 or fp32, got {x.dtype}")
