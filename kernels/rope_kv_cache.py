"""Partial rotate-half (NeoX) RoPE on q and k, fused with writing k and v into the paged KV cache.

Semantics (`rope_kv_write_ref` is the specification):

- RoPE rotates the first R dims of every q and k head, R = 2 * cos_cache.shape[1]: dim i pairs with dim i + R/2,
  out[i] = x[i] * cos - x[i + R/2] * sin and out[i + R/2] = x[i + R/2] * cos + x[i] * sin, with cos/sin taken at
  the token's position (row `positions[t]` of the fp32 [P, R/2] tables). Dims R..D pass through unchanged.
- The math is fp32 whatever the input dtype (inputs are widened exactly). `model.layers.apply_rotary`, like HF,
  instead rounds cos/sin to the input dtype and rounds each product and the sum to it; in bf16 that costs up to
  a few bf16 ulps of max(|x_i|, |x_{i+R/2}|) per element (the sum may cancel), so a bf16 model using this op
  matches HF to about that, not bit for bit. In fp32 the two are identical.
- q_rot (a new contiguous [T, Hq, D] tensor) is the fp32 result rounded once to q's dtype.
- k and v go to cache slot slot_mapping[t] (= block * BS + offset); a slot < 0 marks a padding token whose k/v
  are not written (its q is still rotated). The fp32 rotated k (not k_rot rounded to k's dtype) and v are
  converted once to the cache dtype: for a float8_e4m3fn cache the stored byte is E4M3(clamp(x / scale, ±448))
  with round-to-nearest-even, so that dequantized = fp8.float() * scale; for a bf16/fp16/fp32 cache the scales
  are ignored (as in vLLM, they only mean something for an FP8 cache).

Kernel: grid (T, S): program (t, s) loads token t's position, slot and cos/sin row once, then handles q head
blocks s, s + S, ... and likewise the k/v head blocks. S = 1 for prefill-sized batches; for small T (decode) S
splits the heads over more programs so that more SMs share the traffic. A head is split into three tiles
(x1 = [0, R/2), x2 = [R/2, R), pass-through = [R, D)), each padded to a power of two and masked, which covers
D = 64/128/192 and R = D/2 or D without loading a partner element twice.

Exactness: the kernel performs the same IEEE fp32 operations in the same order as the reference (fp contraction
off, so x1 * cos - x2 * sin is not turned into an FMA; `div_rn` for the scale division), so on a GPU its output
should equal the reference bit for bit. Under TRITON_INTERPRET=1 two Triton 3.9 interpreter conversions are wrong:
fp32 -> bf16 truncates instead of rounding to nearest (at most 1 bf16 ulp off), and fp32 -> float8e4nv drops the
carry when rounding up across a power of two (125.98 becomes 64 instead of 128). The kernel therefore rounds to
the E4M3 grid itself in fp32 when interpreted (SOFT_E4M3), so that the cast is exact; compiled kernels use the
hardware cvt.rn.satfinite. bf16 outputs are left to the interpreter (tests allow 1 ulp for them).

Performance (H100/H200): purely memory-bound, ~6 fp32 ops per rotated element. Bytes per token: read q, k, v once,
write q_rot once, write k and v once into the cache; cos/sin (<= 384 B per token) come from L2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_utils import interpreting, round_to_e4m3

FP8_E4M3_MAX = 448.0
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CACHE_DTYPES = _FLOAT_DTYPES + (torch.float8_e4m3fn,)
# Elements of one head-block tile: 2048 keeps ~16 fp32 values per thread per tile at 4 warps.
_TILE_ELEMS = 2048
# Below this many (token, head-split) programs the grid splits heads: ~4 CTAs per SM on a 132-SM H100.
_TARGET_PROGRAMS = 512
# Interpreted kernels round to the E4M3 grid in software (see the module docstring).


def _rotate_fp32(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] any float dtype; cos, sin [T, R/2] fp32 -> [T, H, D] fp32, dims [0, R) rotated."""
    half = cos.shape[-1]
    xf = x.float()                                   # [T, H, D] fp32 (exact widening)
    x1 = xf[..., :half]                              # [T, H, R/2]
    x2 = xf[..., half:2 * half]                      # [T, H, R/2]
    c = cos[:, None, :]                              # [T, 1, R/2]
    s = sin[:, None, :]                              # [T, 1, R/2]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s, xf[..., 2 * half:]), dim=-1)  # [T, H, D] fp32


def _to_cache_dtype(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """fp32 values -> cache dtype: E4M3 of clamp(x / scale) for an FP8 cache, a plain rounding otherwise."""
    if dtype == torch.float8_e4m3fn:
        return (x / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(dtype)
    return x.to(dtype)


def rope_kv_write_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                      cos_cache: torch.Tensor, sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Rotate q and k (partial NeoX RoPE, fp32 math), store rotated k and v at their cache slots; return q_rot.

    q [T, Hq, D]; k, v [T, Hkv, D] (one float dtype); positions [T] int, each in [0, P); cos_cache, sin_cache
    [P, R/2] fp32 with 0 < R <= D; k_cache, v_cache [NB, BS, Hkv, D] contiguous, fp32/bf16/fp16/float8_e4m3fn;
    slot_mapping [T] int, distinct slots >= 0 or negative for padding tokens (skipped). k_scale / v_scale
    divide the values stored in an FP8 cache and are ignored for other cache dtypes.
    Returns q_rot [T, Hq, D] in q's dtype (new tensor); k_cache and v_cache are updated in place.
    """
    _check(q, k, v, positions, cos_cache, sin_cache, k_cache, v_cache, slot_mapping)
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    cos = cos_cache[positions.long()]                                       # [T, R/2] fp32
    sin = sin_cache[positions.long()]                                       # [T, R/2] fp32
    q_rot = _rotate_fp32(q, cos, sin).to(q.dtype)                           # [T, Hq, D]
    k_rot = _rotate_fp32(k, cos, sin)                                       # [T, Hkv, D] fp32
    keep = slot_mapping >= 0                                                # [T] padding tokens are dropped
    slots = slot_mapping[keep].long()                                       # [T_valid]
    k_slots = k_cache.view(num_blocks * block_size, num_kv_heads, head_dim)  # [NB * BS, Hkv, D]
    v_slots = v_cache.view(num_blocks * block_size, num_kv_heads, head_dim)  # [NB * BS, Hkv, D]
    # Indexed assignment rather than index_copy_, which has no float8 CPU kernel in torch 2.13.
    k_slots[slots] = _to_cache_dtype(k_rot[keep], k_cache.dtype, k_scale)
    v_slots[slots] = _to_cache_dtype(v[keep].float(), v_cache.dtype, v_scale)
    return q_rot


def _check(q, k, v, positions, cos_cache, sin_cache, k_cache, v_cache, slot_mapping) -> None:
    """Shapes, dtypes, layouts and devices shared by the reference and the kernel (raises ValueError)."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"rope_kv_write: q/k/v must be [T, heads, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    num_tokens, _, head_dim = q.shape
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"rope_kv_write: k_cache {tuple(k_cache.shape)} {k_cache.dtype} and v_cache "
                         f"{tuple(v_cache.shape)} {v_cache.dtype} must be one [NB, BS, Hkv, D] shape and dtype")
    kv_shape = (num_tokens, k_cache.shape[2], head_dim)
    if k.shape != kv_shape or v.shape != kv_shape or k_cache.shape[3] != head_dim:
        raise ValueError(f"rope_kv_write: k {tuple(k.shape)} / v {tuple(v.shape)} must be {kv_shape} to fit q "
                         f"{tuple(q.shape)} and a cache of {tuple(k_cache.shape)}")
    if q.dtype not in _FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"rope_kv_write: q/k/v must share one of fp32/bf16/fp16, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if k_cache.dtype not in _CACHE_DTYPES or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(f"rope_kv_write: caches must be contiguous fp32/bf16/fp16/float8_e4m3fn, got "
                         f"{k_cache.dtype}")
    if cos_cache.dim() != 2 or cos_cache.shape != sin_cache.shape:
        raise ValueError(f"rope_kv_write: cos_cache {tuple(cos_cache.shape)} and sin_cache "
                         f"{tuple(sin_cache.shape)} must both be [P, R/2]")
    if cos_cache.dtype != torch.float32 or sin_cache.dtype != torch.float32:
        raise ValueError("rope_kv_write: cos_cache and sin_cache must be fp32")
    if not 0 < 2 * cos_cache.shape[1] <= head_dim:
        raise ValueError(f"rope_kv_write: rotary dims {2 * cos_cache.shape[1]} must be in (0, head_dim "
                         f"{head_dim}]")
    for name, t in (("positions", positions), ("slot_mapping", slot_mapping)):
        if t.shape != (num_tokens,) or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"rope_kv_write: {name} must be [{num_tokens}] int32/int64, got "
                             f"{tuple(t.shape)} {t.dtype}")
    devices = {t.device for t in (q, k, v, positions, cos_cache, sin_cache, k_cache, v_cache, slot_mapping)}
    if len(devices) != 1:
        raise ValueError(f"rope_kv_write: all tensors must be on one device, got {sorted(map(str, devices))}")


@triton.jit
def _store_converted(ptrs, x, mask, scale, FP8: tl.constexpr, SOFT_E4M3: tl.constexpr):
    """Store fp32 x at ptrs in their element type; an FP8 destination gets clamp(x / scale) as E4M3."""
    if FP8:
        x = tl.math.div_rn(x, scale)  # IEEE division: plain `/` may be approximate on NVIDIA
        x = tl.minimum(tl.maximum(x, -448.0), 448.0)
        if SOFT_E4M3:
            x = round_to_e4m3(x)
    tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _rope_heads(src, dst, head_mask, cos, sin, scale, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
                BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr, FP8: tl.constexpr, SOFT_E4M3: tl.constexpr):
    """Rotate a [heads, D] block: src/dst are [BLOCK_H, 1] pointers to the heads' first elements."""
    offs = tl.arange(0, BLOCK_HALF)[None, :]                    # [1, BLOCK_HALF]
    mask = head_mask & (offs < HALF)                             # [BLOCK_H, BLOCK_HALF]
    x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    _store_converted(dst + offs, x1 * cos - x2 * sin, mask, scale, FP8, SOFT_E4M3)
    _store_converted(dst + HALF + offs, x2 * cos + x1 * sin, mask, scale, FP8, SOFT_E4M3)
    if HEAD_DIM > 2 * HALF:  # pass-through dims [R, D)
        offs_rest = tl.arange(0, BLOCK_REST)[None, :]            # [1, BLOCK_REST]
        mask_rest = head_mask & (offs_rest < HEAD_DIM - 2 * HALF)
        rest = tl.load(src + 2 * HALF + offs_rest, mask=mask_rest, other=0.0).to(tl.float32)
        _store_converted(dst + 2 * HALF + offs_rest, rest, mask_rest, scale, FP8, SOFT_E4M3)


@triton.jit
def _rope_kv_write_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                          q_out_ptr, k_scale, v_scale, num_q_heads, num_kv_heads,
                          stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                          HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                          BLOCK_REST: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HQ: tl.constexpr,
                          BLOCK_HKV: tl.constexpr, FP8_CACHE: tl.constexpr, SOFT_E4M3: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)  # int64: slot * Hkv * D exceeds 2^31 in a 35 GB cache

    # cos/sin of this token, once for all its heads.
    offs_half = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_ptr + pos * HALF + offs_half, mask=offs_half < HALF, other=0.0)[None, :]  # [1, BLOCK_HALF]
    sin = tl.load(sin_ptr + pos * HALF + offs_half, mask=offs_half < HALF, other=0.0)[None, :]  # [1, BLOCK_HALF]

    for hb in range(split, tl.cdiv(num_q_heads, BLOCK_HQ), num_splits):
        heads = hb * BLOCK_HQ + tl.arange(0, BLOCK_HQ)[:, None]  # [BLOCK_HQ, 1]
        src = q_ptr + token * stride_qt + heads * stride_qh
        dst = q_out_ptr + (token * num_q_heads + heads) * HEAD_DIM
        _rope_heads(src, dst, heads < num_q_heads, cos, sin, 1.0, HEAD_DIM, HALF, BLOCK_HALF, BLOCK_REST,
                    False, SOFT_E4M3)

    if slot >= 0:  # padding tokens (slot < 0) write nothing
        offs_d = tl.arange(0, BLOCK_D)[None, :]                   # [1, BLOCK_D]
        for hb in range(split, tl.cdiv(num_kv_heads, BLOCK_HKV), num_splits):
            heads = hb * BLOCK_HKV + tl.arange(0, BLOCK_HKV)[:, None]  # [BLOCK_HKV, 1]
            head_mask = heads < num_kv_heads
            cache_row = (slot * num_kv_heads + heads) * HEAD_DIM     # [BLOCK_HKV, 1] int64
            _rope_heads(k_ptr + token * stride_kt + heads * stride_kh, k_cache_ptr + cache_row, head_mask,
                        cos, sin, k_scale, HEAD_DIM, HALF, BLOCK_HALF, BLOCK_REST, FP8_CACHE, SOFT_E4M3)
            v_mask = head_mask & (offs_d < HEAD_DIM)
            vals = tl.load(v_ptr + token * stride_vt + heads * stride_vh + offs_d, mask=v_mask, other=0.0)
            _store_converted(v_cache_ptr + cache_row + offs_d, vals.to(tl.float32), v_mask, v_scale, FP8_CACHE,
                             SOFT_E4M3)


def rope_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  cos_cache: torch.Tensor, sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Triton version of `rope_kv_write_ref` (same contract). q/k/v may be strided views (e.g. splits of a fused
    qkv output) as long as the last dim is contiguous; the wrapper never synchronizes (CUDA-graph safe)."""
    _check(q, k, v, positions, cos_cache, sin_cache, k_cache, v_cache, slot_mapping)
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("rope_kv_write: q/k/v must be contiguous in their last (head_dim) dimension")
    # The kernel reads positions and slot_mapping as flat arrays (pos_ptr + token): a strided view (a column of a
    # [T, 2] tensor) would hand token t another token's position and slot. No-ops (no copy) when already contiguous.
    positions, slot_mapping = positions.contiguous(), slot_mapping.contiguous()
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    half = cos_cache.shape[1]
    q_rot = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)  # [T, Hq, D]
    if num_tokens == 0:
        return q_rot
    block_d = triton.next_power_of_2(head_dim)
    heads_per_tile = max(1, _TILE_ELEMS // block_d)
    block_hq = min(triton.next_power_of_2(num_q_heads), heads_per_tile)
    block_hkv = min(triton.next_power_of_2(num_kv_heads), heads_per_tile)
    q_blocks = triton.cdiv(num_q_heads, block_hq)
    splits = max(1, min(q_blocks, triton.cdiv(_TARGET_PROGRAMS, num_tokens)))
    _rope_kv_write_kernel[(num_tokens, splits)](
        q, k, v, positions, cos_cache.contiguous(), sin_cache.contiguous(), k_cache, v_cache, slot_mapping,
        q_rot, float(k_scale), float(v_scale), num_q_heads, num_kv_heads,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        HEAD_DIM=head_dim, HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_REST=triton.next_power_of_2(max(head_dim - 2 * half, 1)), BLOCK_D=block_d,
        BLOCK_HQ=block_hq, BLOCK_HKV=block_hkv, FP8_CACHE=k_cache.dtype == torch.float8_e4m3fn,
        SOFT_E4M3=interpreting(), num_warps=4, enable_fp_fusion=False)
    return q_rot
