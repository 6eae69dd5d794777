"""FP8 E4M3 GEMM with scales: out[M, N] = (a * a_scale) @ (b * b_scale).T, a [M, K], b [N, K] (HF [out, in] layout).

Scales (fp32, dequantized = fp8.float() * scale):
- a_scale: one element (static per tensor) | [M] or [M, 1] (dynamic per token) | [M, ceil(K / 128)] (per token per
  128-wide K group; the fused MLP's down projection feeds its intermediate's group scales here).
- b_scale: one element (per tensor) | [N] or [N, 1] (per output channel).
Shapes that fit two readings mean the same thing either way ([1] for M == 1; [M, 1] when K <= 128).

Kernel: `tl.dot` on fp8 tiles into an fp32 accumulator. Per-token and per-channel scales are an outer product applied
once in the epilogue; group scales are applied inside the K loop, one [BLOCK_M] vector per 128-wide slice (BLOCK_K
divides 128 or is a multiple of it; a deeper tile is walked as 128-wide slices, each its own dot, so no dot straddles
two groups). Every tile's dot starts from zero and is added to the running
fp32 accumulator: on sm_90 Triton otherwise lets fp8 wgmma accumulate the whole K in its reduced-precision
accumulator (max_num_imprecise_acc defaults to 2**30 there), and K reaches 24576 here. Promoting every 128 elements
is what DeepGEMM does and what torch._scaled_mm's default (use_fast_accum=False) is comparable with.

Tile table per M bucket (sm_90), chosen from an H200 sweep (benchmarks/gpu_sweep.py, run 2026-11-28, results in
benchmarks/results/gpu-suite-h200-2026-11-28-run2.json):

    M        BLOCK_M BLOCK_N BLOCK_K GROUP_M warps stages  split-K
    <= 16       16      64     256      1      4     6     fill  } decode: stream the weight; small M tiles waste
    <= 32       32      64     128      1      4     6     fill  } little MMA work, BLOCK_N 64 doubles CTAs over 128
    <= 64       64      64     128      1      4     5     fill  }
    <= 256      64     128     128      8      4     4     -
    > 256      128     128     128      8      8     4     -     prefill: 2 warpgroups of 64x128; BLOCK_N stays 128
                                                                 because per-tile promotion doubles accumulators
At M <= 16 a 256-deep K tile (two 128-byte rows per stage), other settings equal, took the M = 1 GEMVs from 26.6 to
23.2 us (15B qkv), 67.0 to 54.7 us (15B down) and 44.0 to 37.0 us (340B-TP8 qkv), left 15B up even and 340B-TP8 down
10% slower (do_bench in one sweep run; its small-kernel timings swing with Triton's launch overhead). Timed since as
GPU time in CUDA graphs, these M = 1 GEMVs run at 0.98-1.77x torch._scaled_mm. At M = 256 the 64-row tile with 4 warps
beat 128x128 with 8 warps by 5-18% on the four shapes swept. At M = 4096 no tile in the sweep beat 128x128 (all
within 0.94-0.97x of it) and torch._scaled_mm stays ~1.5x faster: the per-tile promotion, not the tile, is the limit.
A-group scales (the fused MLP's down projection) take the same table: a 256-deep tile loads and multiplies two
128-wide slices per iteration, each with its group's scale. Until 2026-11-28 they were capped at BLOCK_K = 128, and
in that sweep the grouped 15B down GEMV at M = 1 took 78.5 us against 54.7 us for the plain one with 256-deep tiles
and 67.0 us with 128-deep ones (do_bench): the depth of K in flight, not the scales, was most of the gap.
split-K "fill" (M <= 64 only): when the M x N tile grid leaves more than half the SMs idle (340B TP8 qkv: N = 2688
-> 42 tiles on 132 SMs), split K into the smallest power of two that reaches the SM count, at most 8 and keeping
>= 4 K tiles per split; partial sums (already scaled, scaling is linear) go to an fp32 [SPLIT_K, M, N] workspace
summed by torch (deterministic, unlike atomics). Grids of >= 66 tiles (15B o/down: 96) are not split: several
decode CTAs fit on one SM and keep enough bytes in flight, and at M = 1 the extra reduction launch costs a
noticeable part of a ~15 us GEMM. Resulting splits for M <= 64: 340B TP8 qkv 4, every other model shape 1. The
table is a starting point to be tuned with benchmarks/gpu_suite.py.

Program order is grouped (GROUP_M M-tiles walk the N tiles together) so that prefill re-reads weight tiles from L2.

TMA loads (GemmConfig.tma, a launch option of the K loop `_fp8_dot_k_range`, for the GPU sweep; no table entry
uses it yet): A and B tiles come by TMA copies from host-built descriptors into a ring of num_stages shared-memory
buffers (bulk asynchronous copies: no per-thread address math, masks or register staging in the K loop; TMA fills
zeros past M, N and K). The fused MLP's up kernel takes it as an option; a persistent GEMM built on it lives with
the experiments (benchmarks/fp8_gemm_tma.py). Operands a descriptor cannot describe (an inner stride other than 1,
a row stride or base not 16-byte aligned) and BLOCK_K > 128 keep the pointer loads (`_tma_ready`).
Compiled for sm_90 (tests compile every table entry ahead of time on the CPU): BLOCK_M >= 64 runs native fp8
wgmma; the 16/32-row decode tiles lower to mma.sync with fp8 -> f16 conversion in registers, which costs ALU time
that a weight-streaming decode GEMM has to spare. No entry spills registers.

Tolerances (tests/kernels/test_fp8_gemm.py): kernel and reference see the same fp8 inputs and scales, so only fp32
accumulation order and the final rounding differ: |out - ref| <= rtol * |ref| + atol * sum_k |a_k b_k| (dequantized).
rtol is about one ulp of the output dtype: bf16 1e-2 (the interpreter truncates fp32 -> bf16 where GPUs round to
nearest, so up to one full ulp, 2^-7), fp16 2e-3 (two fp32 values straddling a rounding boundary: one ulp, 2^-10),
fp32 1e-5 (order of the epilogue's scale products). atol = 1e-5 on the CPU covers reordering an fp32 sum of the
K <= 640 terms tested (worst case K * 2^-24 = 4e-5, observed ~1e-7); 2e-4 on GPUs, where wgmma accumulates each
128-wide K slice with reduced precision before the fp32 promotion. The same bounds hold against torch._scaled_mm.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

FP8_DTYPE = torch.float8_e4m3fn
GROUP_K = 128           # K-group width of [M, K // 128] activation scales
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_DEFAULT_NUM_SMS = 132  # H100 SXM; used when no GPU is visible (interpreter), so the CPU follows the GPU's choices

A_TENSOR, A_TOKEN, A_GROUP = 0, 1, 2


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    split_k: int = 1
    # How the fp32 accumulator takes each BLOCK_K slice's product: 0, a fresh dot added in fp32 (the table's choice);
    # 1, tl.dot's max_num_imprecise_acc = BLOCK_K (the compiler promotes); 2, no promotion (fast accumulation, as
    # torch._scaled_mm(use_fast_accum=True)). 1 and 2 are for the GPU sweep to time against 0; group scales need 0.
    promote: int = 0
    # TMA: A and B tiles arrive by tensor-memory-accelerator copies from host-built descriptors (no address math or
    # masks in the loop; zero fill past M, N and K), where `_tma_ready` holds (BLOCK_K <= 128: a box row of at most
    # the 128-byte swizzle). For the GPU sweep: the MLP's up kernel and benchmarks/fp8_gemm_tma.py take it.
    tma: bool = False


# (largest M of the bucket, config); None = everything larger.
_M_BUCKETS: tuple[tuple[int | None, GemmConfig], ...] = (
    (16, GemmConfig(16, 64, 256, 1, 4, 6)),
    (32, GemmConfig(32, 64, 128, 1, 4, 6)),
    (64, GemmConfig(64, 64, 128, 1, 4, 5)),
    (256, GemmConfig(64, 128, 128, 8, 4, 4)),
    (None, GemmConfig(128, 128, 128, 8, 8, 4)),
)
_SPLIT_K_MAX_M = 64
_SPLIT_K_MAX = 8
_MIN_K_TILES_PER_SPLIT = 4


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_NUM_SMS


def pick_config(M: int, N: int, K: int, device: torch.device) -> GemmConfig:
    """The M-bucket table above, plus the split-K fill rule for small M. It holds for group-scaled A too: the
    kernel applies group scales per 128-wide slice of any power-of-two BLOCK_K."""
    cfg = next(c for bound, c in _M_BUCKETS if bound is None or M <= bound)
    if M > _SPLIT_K_MAX_M:
        return cfg
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    k_tiles = triton.cdiv(K, cfg.block_k)
    split, sms = 1, _num_sms(device)
    if tiles * 2 > sms:  # at least half the SMs busy: the workspace + reduction launch (~us) would cost more
        return cfg
    while tiles * split < sms and split < _SPLIT_K_MAX and k_tiles // (split * 2) >= _MIN_K_TILES_PER_SPLIT:
        split *= 2
    return dataclasses.replace(cfg, split_k=split)


# ----------------------------------------------------------------------------------------------- Triton

@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map a linear program id to (pid_m, pid_n), GROUP_M M-tiles at a time along N (L2 reuse of B tiles)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _fp8_dot_k_range(a_ptr, b_ptr, a_scale_ptr, rm, rn, k_lo, k_hi,
                     stride_am, stride_ak, stride_bn, stride_bk, stride_asm, stride_asg,
                     A_GROUPED: tl.constexpr, EVEN_K: tl.constexpr, GROUP_K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PROMOTE: tl.constexpr,
                     TMA: tl.constexpr = False, off_m=0, off_n=0):
    """sum over k in [k_lo, k_hi) of a[rm, k] * b[rn, k] as an fp32 [BLOCK_M, BLOCK_N] tile; rm, rn are in-bounds
    (callers wrap them modulo M, N), k_lo is a multiple of BLOCK_K. With A_GROUPED each GROUP_K-wide slice is
    multiplied by its rows' group scale a_scale[rm, k // GROUP_K] before it is added: a BLOCK_K deeper than the
    group is walked as BLOCK_K // GROUP_K slices of GROUP_K, each its own loads and dot, so one loop iteration still
    keeps BLOCK_K of K in flight (the 256-deep decode tiles), while each dot sees one group.

    TMA: a_ptr and b_ptr are TMA descriptors of a [M, K] and b [N, K] with [BLOCK_M, BLOCK_K] and [BLOCK_N,
    BLOCK_K] boxes (BLOCK_K <= 128, so one slice); the tile's rows start at off_m and off_n, and a box reaching past
    M, N or K reads zeros, so the loads need no masks and the strides are unused."""
    SUB_K: tl.constexpr = GROUP_K if (A_GROUPED and BLOCK_K > GROUP_K) else BLOCK_K
    rk = tl.arange(0, SUB_K)
    if not TMA:
        a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + (k_lo + rk)[None, :] * stride_ak   # [BM, SUB_K]
        b_ptrs = b_ptr + rn.to(tl.int64)[None, :] * stride_bn + (k_lo + rk)[:, None] * stride_bk   # [SUB_K, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        for sub in tl.static_range(BLOCK_K // SUB_K):
            if TMA:
                a = a_ptr.load([off_m, k0])                                     # [BM, BK]
                b = b_ptr.load([off_n, k0]).T                                   # [BK, BN]
            elif EVEN_K:
                a = tl.load(a_ptrs + sub * SUB_K * stride_ak)
                b = tl.load(b_ptrs + sub * SUB_K * stride_bk)
            else:
                in_k = k0 + sub * SUB_K + rk < k_hi
                a = tl.load(a_ptrs + sub * SUB_K * stride_ak, mask=in_k[None, :], other=0.0)
                b = tl.load(b_ptrs + sub * SUB_K * stride_bk, mask=in_k[:, None], other=0.0)
            if PROMOTE == 0:
                # A fresh zero accumulator per slice, added in fp32: promotion every BLOCK_K (module docstring).
                part = tl.dot(a, b, out_dtype=tl.float32)
                if A_GROUPED:
                    # A ragged last tile's second slice may lie wholly past K: its dot is 0, and the clamp keeps
                    # its scale read inside the [M, ceil(K / 128)] tensor (0 x garbage could be NaN).
                    group = tl.minimum((k0 + sub * SUB_K) // GROUP_K, (k_hi - 1) // GROUP_K)
                    part = part * tl.load(a_scale_ptr + rm * stride_asm + group * stride_asg)[:, None]
                acc += part
            elif PROMOTE == 1:
                acc = tl.dot(a, b, acc, max_num_imprecise_acc=SUB_K, out_dtype=tl.float32)
            else:
                acc = tl.dot(a, b, acc, out_dtype=tl.float32)
        if not TMA:
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, M, N, K, k_per_split,
                     stride_am, stride_ak, stride_bn, stride_bk, stride_cs, stride_cm, stride_cn,
                     stride_asm, stride_asg, stride_bs,
                     A_MODE: tl.constexpr, B_PER_CHANNEL: tl.constexpr, EVEN_K: tl.constexpr,
                     GROUP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, PROMOTE: tl.constexpr):
    """Grid (tiles, SPLIT_K). Split s covers K range [s * k_per_split, (s + 1) * k_per_split) and writes its
    scaled partial to c + s * stride_cs (fp32 workspace when SPLIT_K > 1, else the output itself)."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M  # wrapped rows/cols keep the K-loop loads unmasked; their results are never stored
    rn = offs_n % N
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    acc = _fp8_dot_k_range(a_ptr, b_ptr, a_scale_ptr, rm, rn, k_lo, k_hi,
                           stride_am, stride_ak, stride_bn, stride_bk, stride_asm, stride_asg,
                           A_MODE == 2, EVEN_K, GROUP_K, BLOCK_M, BLOCK_N, BLOCK_K, PROMOTE)
    _scale_and_store(acc, c_ptr + pid_k.to(tl.int64) * stride_cs, a_scale_ptr, b_scale_ptr, offs_m, offs_n, M, N,
                     stride_cm, stride_cn, stride_asm, stride_bs, A_MODE, B_PER_CHANNEL)


@triton.jit
def _scale_and_store(acc, c_ptr, a_scale_ptr, b_scale_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn, stride_asm,
                     stride_bs, A_MODE: tl.constexpr, B_PER_CHANNEL: tl.constexpr):
    """Epilogue: per-token x per-channel scales as an outer product on the fp32 tile (group scales were applied in
    the K loop), then the masked store of rows offs_m < M and columns offs_n < N."""
    rm = offs_m % M
    rn = offs_n % N
    if A_MODE == 0:
        acc = acc * tl.load(a_scale_ptr)
    elif A_MODE == 1:
        acc = acc * tl.load(a_scale_ptr + rm * stride_asm)[:, None]
    if B_PER_CHANNEL:
        acc = acc * tl.load(b_scale_ptr + rn * stride_bs)[None, :]
    else:
        acc = acc * tl.load(b_scale_ptr)
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------- scales

def parse_scales(a_scale: torch.Tensor, b_scale: torch.Tensor, M: int, N: int, K: int, name: str = "fp8_gemm",
                 names: tuple[str, str] = ("a_scale", "b_scale"), allow_groups: bool = True
                 ) -> tuple[int, torch.Tensor, bool, torch.Tensor]:
    """Validate the scale shapes -> (a_mode, a_scale fp32 as [1] / [M] / [M, G], b_per_channel, b_scale fp32 as
    [1] / [N]). Shared by the reference and the kernel wrappers so that all read shapes the same way."""
    groups = triton.cdiv(K, GROUP_K)
    a_name, b_name = names
    for s, what in ((a_scale, a_name), (b_scale, b_name)):
        if not isinstance(s, torch.Tensor) or not s.is_floating_point():
            raise ValueError(f"{name}: {what} must be a floating-point tensor")
    if a_scale.numel() == 1:
        a_mode, a_s = A_TENSOR, a_scale.reshape(1)
    elif tuple(a_scale.shape) in ((M,), (M, 1)):
        a_mode, a_s = A_TOKEN, a_scale.reshape(M)
    elif allow_groups and tuple(a_scale.shape) == (M, groups):
        a_mode, a_s = A_GROUP, a_scale
    else:
        grouped = f" or [M, ceil(K / {GROUP_K})] = [{M}, {groups}]" if allow_groups else ""
        raise ValueError(f"{name}: {a_name} {tuple(a_scale.shape)} must be one element or [M] / [M, 1] = [{M}]"
                         + grouped)
    if b_scale.numel() == 1:
        b_per_channel, b_s = False, b_scale.reshape(1)
    elif tuple(b_scale.shape) in ((N,), (N, 1)):
        b_per_channel, b_s = True, b_scale.reshape(N)
    else:
        raise ValueError(f"{name}: {b_name} {tuple(b_scale.shape)} must be one element or [N] / [N, 1] = [{N}]")
    return a_mode, a_s.float().contiguous(), b_per_channel, b_s.float().contiguous()


def _check_operands(name: str, a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> None:
    if a.dtype != FP8_DTYPE or b.dtype != FP8_DTYPE:
        raise ValueError(f"{name}: a and b must be {FP8_DTYPE}, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"{name}: need a [M, K] and b [N, K], got {tuple(a.shape)} and {tuple(b.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"{name}: out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")


# ----------------------------------------------------------------------------------------------- public

def fp8_gemm_ref(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                 out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(a.float() * a_scale) @ (b.float() * b_scale[:, None]).T in fp32, cast to out_dtype. a [M, K] and b [N, K]
    are float8_e4m3fn; group scales [M, ceil(K / 128)] scale a's columns 128 at a time."""
    _check_operands("fp8_gemm_ref", a, b, out_dtype)
    (M, K), N = a.shape, b.shape[0]
    a_mode, a_s, _, b_s = parse_scales(a_scale, b_scale, M, N, K, "fp8_gemm_ref")
    if a_mode == A_GROUP:
        a_s = a_s.repeat_interleave(GROUP_K, dim=1)[:, :K]                  # [M, K]
    elif a_mode == A_TOKEN:
        a_s = a_s[:, None]                                                    # [M, 1]
    a_deq = a.float() * a_s                                                   # [M, K]
    b_deq = b.float() * b_s[:, None]                                          # [N, K]
    return (a_deq @ b_deq.T).to(out_dtype)                                    # [M, N]


def fp8_gemm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Triton version of `fp8_gemm_ref` (tile config from `pick_config`)."""
    return _fp8_gemm_launch(a, b, a_scale, b_scale, out_dtype, None)


def _fp8_gemm_launch(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                     out_dtype: torch.dtype, cfg: GemmConfig | None) -> torch.Tensor:
    """fp8_gemm with an optional forced config (tests use it to reach split-K and other tiles at small shapes)."""
    _check_operands("fp8_gemm", a, b, out_dtype)
    if a.device != b.device or a_scale.device != a.device or b_scale.device != a.device:
        raise ValueError(f"fp8_gemm: a, b and the scales must share a device ({a.device}, {b.device}, "
                         f"{a_scale.device}, {b_scale.device})")
    (M, K), N = a.shape, b.shape[0]
    a_mode, a_s, b_per_channel, b_s = parse_scales(a_scale, b_scale, M, N, K)
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)              # [M, N]
    if M == 0 or N == 0:
        return out
    cfg = cfg or pick_config(M, N, K, a.device)
    if cfg.tma:
        raise ValueError("fp8_gemm: TMA tiles run in the experimental persistent GEMM (benchmarks/fp8_gemm_tma.py)")
    if a_mode == A_GROUP and cfg.promote:
        raise ValueError("fp8_gemm: group scales are applied per tile, which needs promote = 0")
    split, k_per_split = split_k_plan(K, cfg)
    c = out if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=a.device)
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), split)
    _fp8_gemm_kernel[grid](
        a, b, c, a_s, b_s, M, N, K, k_per_split,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), 0 if split == 1 else c.stride(0), c.stride(-2),
        c.stride(-1), a_s.stride(0), a_s.stride(1) if a_mode == A_GROUP else 0, b_s.stride(0),
        A_MODE=a_mode, B_PER_CHANNEL=b_per_channel, EVEN_K=K % cfg.block_k == 0, GROUP_K=GROUP_K,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, PROMOTE=cfg.promote,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split > 1:
        out.copy_(c.sum(dim=0))                                               # [SPLIT, M, N] -> [M, N]
    return out


def split_k_plan(K: int, cfg: GemmConfig) -> tuple[int, int]:
    """(splits, K per split): cfg.split_k capped by the number of K tiles, K per split a whole number of BLOCK_K
    tiles, and no split left empty."""
    k_tiles = triton.cdiv(K, cfg.block_k)
    split = min(cfg.split_k, max(k_tiles, 1))
    k_per_split = max(triton.cdiv(k_tiles, split), 1) * cfg.block_k
    return max(triton.cdiv(K, k_per_split), 1), k_per_split


def _tma_ready(a: torch.Tensor, b: torch.Tensor, cfg: GemmConfig) -> bool:
    """Whether a TMA config can run on these operands; otherwise the pointer kernel takes the same tiles. A TMA
    descriptor needs a unit inner stride, 16-byte aligned outer strides and base addresses, and a box row of at most
    the 128-byte swizzle (BLOCK_K <= 128)."""
    if cfg.block_k > 128:
        return False
    return all(t.stride(1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0 for t in (a, b))


def _tma_descriptors(a: torch.Tensor, b: torch.Tensor, cfg: GemmConfig) -> tuple:
    """Host-side TMA descriptors of a [M, K] and b [N, K] with [BLOCK_M, BLOCK_K] / [BLOCK_N, BLOCK_K] boxes."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    (M, K), N = a.shape, b.shape[0]
    return (TensorDescriptor(a, [M, K], [a.stride(0), 1], [cfg.block_m, cfg.block_k]),
            TensorDescriptor(b, [N, K], [b.stride(0), 1], [cfg.block_n, cfg.block_k]))
