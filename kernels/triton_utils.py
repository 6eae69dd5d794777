"""Pieces the Triton kernels here share: interpreter detection, the argument checks of both paged attention kernels,
the split of a head into power-of-two parts, a dot that survives the interpreter, rounding onto the FP8 E4M3 grid,
and E4M3 words converted to fp16 in registers.

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

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1" or bool(triton.knobs.runtime.interpret)


ATTENTION_Q_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_paged_attention_args(name: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               **index_tensors: torch.Tensor) -> None:
    """The checks prefill and decode attention share, each failure a ValueError that starts with `name`: q
    [tokens, Hq, D] in fp32/bf16/fp16; k_cache and v_cache [num_blocks, block_size, Hkv, D] of one shape, in q's dtype
    or both float8_e4m3fn; Hq a multiple of Hkv; every tensor (the index tensors too) on q's device, a CUDA one unless
    the kernels run in the interpreter."""
    if q.dim() != 3:
        raise ValueError(f"{name}: q must be [tokens, Hq, D], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"{name}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must both be "
                         f"[num_blocks, block_size, Hkv, D]")
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, cache_dim = k_cache.shape[2], k_cache.shape[3]
    if cache_dim != head_dim:
        raise ValueError(f"{name}: q head_dim {head_dim} != cache head_dim {cache_dim}")
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"{name}: {num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if q.dtype not in ATTENTION_Q_DTYPES:
        raise ValueError(f"{name}: q dtype {q.dtype} not supported ({', '.join(map(str, ATTENTION_Q_DTYPES))})")
    if v_cache.dtype != k_cache.dtype or k_cache.dtype not in (q.dtype, torch.float8_e4m3fn):
        raise ValueError(f"{name}: k_cache/v_cache dtypes {k_cache.dtype}/{v_cache.dtype} must both be q's dtype "
                         f"({q.dtype}) or torch.float8_e4m3fn")
    for arg, t in dict(k_cache=k_cache, v_cache=v_cache, **index_tensors).items():
        if t.device != q.device:
            raise ValueError(f"{name}: {arg} is on {t.device}, q on {q.device}")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(f"{name}: a Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1); on the CPU use the "
                         f"_ref function")


def split_head_dim(head_dim: int) -> tuple[int, int]:
    """(BLOCK_DA, BLOCK_DB): a power-of-two head part and a power-of-two tail (0: none), both >= 16 (tl.dot's K).
    64 -> (64, 0), 128 -> (128, 0), 192 -> (128, 64), 80 -> (64, 16), 72 -> (64, 16) with the tail masked."""
    block_da = max(16, 1 << (head_dim.bit_length() - 1))
    tail = head_dim - block_da
    return block_da, (max(16, triton.next_power_of_2(tail)) if tail > 0 else 0)


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


@triton.jit
def to_f16_saturated(x):
    """x (bf16/fp32) -> fp16 with |x| > 65504 held at +-65504 instead of becoming inf.

    For dots that run in fp16 over an FP8 E4M3 cache: E4M3 -> fp16 is one conversion per two values on sm_90 (one
    `F2FP.F16.E4M3.UNPACK_B`), where E4M3 -> bf16 adds an `F2F.BF16.F16` per value. Every E4M3 value is exact in
    fp16, and a bf16 operand in [6e-5, 65504] keeps all its bits (fp16 has more mantissa)."""
    return tl.minimum(tl.maximum(x.to(tl.float32), -65504.0), 65504.0).to(tl.float16)


@triton.jit
def e4m3_words_to_f16(words, ASM: tl.constexpr):
    """int32 words, each holding 4 E4M3 values (little-endian: byte i is element i) -> fp16 [..., 4], exact.

    Why words: an FP8 V tile loaded as fp8 and converted with `.to(tl.float16)` is converted after Triton's shared
    memory round trip, in the MMA operand layout. P @ V reads V along the key axis, which is strided in the cache, so
    on sm_90 each thread then reads its bytes one at a time (128 `LDS.U8` a thread per 64 x 128 tile at 2 warps).
    Converted in registers first, the tile goes through shared memory as fp16 and is read back with transposing
    `ldmatrix`, as a BF16 cache is. The reshape after this join keeps Triton from moving the conversion back.

    ASM (compiled kernels): `cvt.rn.f16x2.e4m3x2`, one instruction per two values. Otherwise (the interpreter runs no
    inline asm) the same values from the bits: E4M3's exponent and mantissa shifted into fp16's fields give
    value * 2^-8 for normals and subnormals alike, and the product with 256 is exact. NaN (0x7F) becomes 480 there;
    callers mask what is not a valid slot, so no NaN is read.
    """
    if ASM:
        e0, e1, e2, e3 = tl.inline_asm_elementwise(
            asm="{ .reg .b16 lo, hi; .reg .b32 a, b; mov.b32 {lo, hi}, $4; cvt.rn.f16x2.e4m3x2 a, lo; "
                "cvt.rn.f16x2.e4m3x2 b, hi; mov.b32 {$0, $1}, a; mov.b32 {$2, $3}, b; }",
            constraints="=h,=h,=h,=h,r", args=[words], dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
            is_pure=True, pack=1)
    else:
        # byte i's bits 0..6 (exponent, mantissa) go to fp16 bits 7..13, its sign (bit 7) to bit 15
        e0 = (((words << 7) & 0x3F80) | ((words << 8) & 0x8000)).to(tl.int16).to(tl.float16, bitcast=True) * 256.0
        e1 = (((words >> 1) & 0x3F80) | (words & 0x8000)).to(tl.int16).to(tl.float16, bitcast=True) * 256.0
        e2 = (((words >> 9) & 0x3F80) | ((words >> 8) & 0x8000)).to(tl.int16).to(tl.float16, bitcast=True) * 256.0
        e3 = (((words >> 17) & 0x3F80) | ((words >> 16) & 0x8000)).to(tl.int16).to(tl.float16, bitcast=True) * 256.0
    # join(join(e0, e2), join(e1, e3)) is [..., 2, 2] with [..., i, j] = e(2i + j): row-major, e0 e1 e2 e3
    return tl.reshape(tl.join(tl.join(e0, e2), tl.join(e1, e3)), words.shape + [4])


@triton.jit
def tile_blocks(table_row, stride_tn, first, end, offs_n, CACHE_BLOCK: tl.constexpr):
    """Cache block numbers [BLOCK_N] int32 of tokens first + offs_n of one sequence (0 where first + offs_n >= end);
    with offs_n a scalar 0, the one block of token `first`.

    Why the attention loops load these one tile ahead and carry them (`block = block_next`) rather than load them
    next to the K/V gather they address: Triton's software pipeliner then sees K/V loads whose addresses come from a
    loop-carried value, and gives them their own ring of shared-memory buffers with loads in flight while a tile is
    computed. Loaded in the same iteration, the block numbers are an indirect load: the pipeliner made them an
    async copy committed after the K/V copies, and waiting for them (cp.async.wait_group 0) also waits for the K/V
    copies just issued, so every tile waited for its own loads. Compiled for sm_90 by Triton 3.6: the 15B prefill
    tile (num_stages 3) went from 2 K/V buffers and wait_group 0 to 3 buffers and wait_group 2, at 194 registers
    instead of 196; decode at num_stages 3 from 1 buffer and wait_group 0 to 2 buffers and wait_group > 0.
    """
    tok = first + offs_n
    return tl.load(table_row + (tok // CACHE_BLOCK) * stride_tn, mask=tok < end, other=0)
