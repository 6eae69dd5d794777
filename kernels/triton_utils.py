"""Pieces every Triton kernel here shares: interpreter detection, a dot that survives the interpreter, and
rounding onto the FP8 E4M3 grid.

Why they exist (Triton 3.9's CPU interpreter, TRITON_INTERPRET=1, which CI uses to test every kernel):
- `tl.dot` on bf16 tiles multiplies the raw uint16 storage (triton-lang/triton#11584): errors ~1e9. `mma` with
  UPCAST converts the (already bf16-rounded) operands to fp32 first — exact, and bf16 products are exact in
  fp32 — so the result is what a bf16 MMA computes up to summation order. Compiled kernels never take it.
- fp32 -> fp8e4nv casts round ties away from zero and drop the carry when the mantissa rounds up (7.8 -> 4.0;
  ~2.5% of random values). `round_to_e4m3` puts values on the E4M3 grid in fp32 first, after which any cast
  is exact.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1" or bool(triton.knobs.runtime.interpret)


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with an fp32 accumulator (UPCAST: interpreter-only bf16 workaround, module docstring)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def round_to_e4m3(x):
    """fp32 x with |x| <= 448 -> the nearest E4M3 value (ties to even), still fp32, so that the cast is exact.

    For |x| in [2^e, 2^(e+1)) E4M3 keeps 3 mantissa bits: a step of 2^(e-3), and 2^-9 in the subnormal range
    (e < -6). Adding M = step * 2^23 puts the sum in [M, 2M), where fp32's own step is exactly `step`, so the fp32
    add rounds |x| to the grid (ties to even, carries into the next power of two included); subtracting M is
    exact. The sign is taken from the bits, which keeps -0.0.
    """
    bits = x.to(tl.int32, bitcast=True)
    biased_exp = tl.maximum((bits >> 23) & 0xFF, 127 - 6)           # subnormals share 2^-6's step of 2^-9
    magic = ((biased_exp + 20) << 23).to(tl.float32, bitcast=True)  # 2^(e + 20) = step * 2^23
    rounded = (tl.abs(x) + magic) - magic
    return tl.where(bits < 0, -rounded, rounded)
