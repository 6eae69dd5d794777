"""Experimental (DESIGN.md: variants live in benchmarks/, not kernels/): an FP8 GEMV for one decode row on the CUDA
cores, to be timed against the tensor-core `kernels.fp8_gemm` by the GPU sweep (benchmarks/gpu_sweep.py).

Why: at batch 1 the 15B decode step is 0.49 of its HBM roofline, and the GEMVs are the reason. fp8_gemm streams
the weights at 2.2-2.9 TB/s of the 4.3 the H200 copies at (benchmarks/README.md), through 16-row mma tiles of which
one row is real. Here each program owns BLOCK_N output channels over a K range: it loads [BLOCK_N, BLOCK_K] E4M3
weights (16 contiguous bytes a thread), widens them to fp32, multiplies by the activation row and reduces along K.
No MMA, no padding rows, and split-K programs to put several CTAs on every SM.

With no tl.dot in the loop Triton does not software-pipeline it (compiled for sm_90 the kernel uses no shared
memory whatever num_stages says): the bytes in flight come from each thread's independent 16-byte loads and from
occupancy, so the sweep keeps to tiles of at most ~128 registers a thread (ptxas: 16 x 256 with 4 warps 68, 32 x 256
with 8 warps 74, 32 x 512 with 4 warps 240).

out[0, n] = sum_k a[0, k] * b[n, k] * a_scale * b_scale[n]: a [1, K] and b [N, K] float8_e4m3fn, a_scale one
element (per token: one row), b_scale [N] (per channel). The reference is `kernels.fp8_gemm.fp8_gemm_ref`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

FP8 = torch.float8_e4m3fn


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1


@triton.jit
def _fp8_gemv_kernel(a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, N, K, k_per_split, stride_bn, stride_cs,
                     EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (cdiv(N, BLOCK_N), SPLIT_K); split s sums K range [s * k_per_split, (s + 1) * k_per_split) and writes its
    scaled partial to c + s * stride_cs (an fp32 workspace when split, else the output row)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = offs_n % N                      # wrapped rows keep the loads unmasked; they are never stored
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    b_ptrs = b_ptr + rn.to(tl.int64)[:, None] * stride_bn + (k_lo + offs_k)[None, :]   # [BN, BK]
    a_ptrs = a_ptr + k_lo + offs_k                                                       # [BK]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            w = tl.load(b_ptrs)
            x = tl.load(a_ptrs)
        else:
            in_k = k0 + offs_k < k_hi
            w = tl.load(b_ptrs, mask=in_k[None, :], other=0.0)
            x = tl.load(a_ptrs, mask=in_k, other=0.0)
        # Elementwise products accumulate per lane; one reduction along K at the end (not one per tile).
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        b_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    out = tl.sum(acc, axis=1) * tl.load(a_scale_ptr) * tl.load(b_scale_ptr + rn)                    # [BN]
    tl.store(c_ptr + pid_k.to(tl.int64) * stride_cs + offs_n, out.to(c_ptr.dtype.element_ty), mask=offs_n < N)


def fp8_gemv(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, cfg: GemvConfig | None = None) -> torch.Tensor:
    """a [1, K], b [N, K] E4M3 (b contiguous along K); a_scale one element, b_scale [N] -> out [1, N] in out_dtype."""
    if a.dtype != FP8 or b.dtype != FP8 or a.dim() != 2 or b.dim() != 2 or a.shape[0] != 1 or a.shape[1] != b.shape[1]:
        raise ValueError(f"fp8_gemv: need a [1, K] and b [N, K] in {FP8}, got {a.dtype} {tuple(a.shape)} and "
                         f"{b.dtype} {tuple(b.shape)}")
    if b.stride(1) != 1 or a.stride(1) != 1:
        raise ValueError("fp8_gemv: a and b must be contiguous along K")
    (_, K), N = a.shape, b.shape[0]
    if a_scale.numel() != 1 or b_scale.numel() != N:
        raise ValueError(f"fp8_gemv: a_scale must be one element and b_scale [N = {N}], got "
                         f"{tuple(a_scale.shape)} and {tuple(b_scale.shape)}")
    cfg = cfg or GemvConfig(16, 256, 4, 1)
    out = torch.empty((1, N), dtype=out_dtype, device=a.device)                 # [1, N]
    if N == 0:
        return out
    k_tiles = triton.cdiv(K, cfg.block_k)
    k_per_split = triton.cdiv(k_tiles, max(1, min(cfg.split_k, k_tiles))) * cfg.block_k
    split = max(triton.cdiv(K, k_per_split), 1)
    c = out if split == 1 else torch.empty((split, 1, N), dtype=torch.float32, device=a.device)
    _fp8_gemv_kernel[(triton.cdiv(N, cfg.block_n), split)](
        a, b, c, a_scale.float().reshape(1).contiguous(), b_scale.float().reshape(N).contiguous(), N, K,
        k_per_split, b.stride(0), 0 if split == 1 else c.stride(0),
        EVEN_K=K % cfg.block_k == 0 and k_per_split % cfg.block_k == 0, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split > 1:
        out.copy_(c.sum(dim=0))                                                  # [SPLIT, 1, N] -> [1, N]
    return out
