"""Experimental (DESIGN.md: variants live in benchmarks/, not kernels/): a persistent FP8 GEMM fed by TMA, to be
timed against the production `kernels.fp8_gemm` and `torch._scaled_mm` by the GPU sweep's `sweep_tma` step.

Why: at prefill sizes fp8_gemm runs at 0.58-0.70x torch._scaled_mm on the H200, and as a decode GEMV it streams
weights at 2.2-2.9 of the 4.3 TB/s the H200 copies at (benchmarks/README.md). Here A and B tiles come by TMA copies
into a ring of num_stages shared-memory buffers (`_fp8_dot_k_range(TMA=True)`, the production K loop with
descriptor loads), in a persistent grid: one program per SM (per split) walks the tiles in grouped order, which
Triton can pipeline across tiles (flatten) or, with `warp_specialize`, split into a producer warp group issuing the
copies and consumers running the MMAs (Triton 3.6's Hopper warp specialization; with 4 warps it rebalances
registers with setmaxnreg). Scales, promotion modes and split-K are those of fp8_gemm; operands a descriptor
cannot describe fall back to it. Checked against `kernels.fp8_gemm.fp8_gemm_ref` under the interpreter and compiled
for sm_90 in tests/benchmarks/test_fp8_gemm_tma.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.fp8_gemm import (A_GROUP, GROUP_K, GemmConfig, _check_operands, _fp8_dot_k_range, _fp8_gemm_launch,
                              _grouped_tile, _num_sms, _scale_and_store, _tma_descriptors, _tma_ready, parse_scales,
                              split_k_plan)


@dataclass(frozen=True)
class TmaGemmConfig(GemmConfig):
    tma: bool = True
    warp_specialize: bool = False     # Triton's Hopper warp specialization of the persistent tile loop


@triton.jit
def _fp8_gemm_tma_kernel(a_desc, b_desc, c_ptr, a_scale_ptr, b_scale_ptr, M, N, K, k_per_split, num_programs,
                         stride_cs, stride_cm, stride_cn, stride_asm, stride_asg, stride_bs,
                         A_MODE: tl.constexpr, B_PER_CHANNEL: tl.constexpr, GROUP_K: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                         PROMOTE: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    """Persistent: grid (programs, SPLIT_K); program p of split s takes tiles p, p + num_programs, ... in grouped
    order over K range [s * k_per_split, (s + 1) * k_per_split), writing its scaled partial to c + s * stride_cs
    as the pointer kernel does. a_desc / b_desc are TMA descriptors of a [M, K] and b [N, K] with [BLOCK_M,
    BLOCK_K] / [BLOCK_N, BLOCK_K] boxes; a box reaching past M, N or K reads zeros, so the K loop has no masks."""
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    pid_k = tl.program_id(1)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    for tile in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=not WARP_SPECIALIZE,
                         warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _fp8_dot_k_range(a_desc, b_desc, a_scale_ptr, offs_m % M, offs_n % N, k_lo, k_hi,
                               0, 0, 0, 0, stride_asm, stride_asg, A_MODE == 2, True, GROUP_K,
                               BLOCK_M, BLOCK_N, BLOCK_K, PROMOTE, True, pid_m * BLOCK_M, pid_n * BLOCK_N)
        _scale_and_store(acc, c_ptr + pid_k.to(tl.int64) * stride_cs, a_scale_ptr, b_scale_ptr, offs_m, offs_n,
                         M, N, stride_cm, stride_cn, stride_asm, stride_bs, A_MODE, B_PER_CHANNEL)


def fp8_gemm_tma(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                 out_dtype: torch.dtype, cfg: TmaGemmConfig) -> torch.Tensor:
    """`kernels.fp8_gemm.fp8_gemm` (same arguments and scale modes) through the persistent TMA kernel; operands a
    descriptor cannot describe, or BLOCK_K > 128, run the production kernel with the same tiles."""
    _check_operands("fp8_gemm_tma", a, b, out_dtype)
    pointer_cfg = GemmConfig(cfg.block_m, cfg.block_n, cfg.block_k, cfg.group_m, cfg.num_warps, cfg.num_stages,
                             cfg.split_k, cfg.promote)
    if a.device != b.device or not _tma_ready(a, b, cfg):
        return _fp8_gemm_launch(a, b, a_scale, b_scale, out_dtype, pointer_cfg)
    (M, K), N = a.shape, b.shape[0]
    a_mode, a_s, b_per_channel, b_s = parse_scales(a_scale, b_scale, M, N, K, "fp8_gemm_tma")
    if a_mode == A_GROUP and cfg.promote:
        raise ValueError("fp8_gemm_tma: group scales are applied per tile, which needs promote = 0")
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)              # [M, N]
    if M == 0 or N == 0:
        return out
    split, k_per_split = split_k_plan(K, cfg)
    c = out if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=a.device)
    a_desc, b_desc = _tma_descriptors(a, b, cfg)
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    programs = min(tiles, max(_num_sms(a.device) // split, 1))
    _fp8_gemm_tma_kernel[(programs, split)](
        a_desc, b_desc, c, a_s, b_s, M, N, K, k_per_split, programs, 0 if split == 1 else c.stride(0),
        c.stride(-2), c.stride(-1), a_s.stride(0), a_s.stride(1) if a_mode == A_GROUP else 0, b_s.stride(0),
        A_MODE=a_mode, B_PER_CHANNEL=b_per_channel, GROUP_K=GROUP_K, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, PROMOTE=cfg.promote, WARP_SPECIALIZE=cfg.warp_specialize,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split > 1:
        out.copy_(c.sum(dim=0))                                               # [SPLIT, M, N] -> [M, N]
    return out
