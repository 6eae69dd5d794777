"""Nemotron-4's squared-ReLU MLP, y = down(relu(up(x)) ** 2), no gate, no bias; weights in HF [out, in] layout.

BF16 variant (`squared_relu_mlp`): `_up_squared_relu_kernel` is a GEMM whose epilogue applies relu(.)^2 to the fp32
accumulator and stores the [M, I] intermediate in x's dtype (the one rounding point the reference also has). The
down projection is torch.matmul: it is a plain GEMM with nothing left to fuse (the residual add lives in the model),
and cuBLAS is at least as fast as a Triton GEMM for bf16 on H100, with its own split-K choices for decode.
Under TRITON_INTERPRET (CPU tests) bf16 tiles are upcast to fp32 before tl.dot, because the interpreter of Triton 3.9
multiplies bf16 tiles as their raw uint16 bits; bf16 products are exact in fp32, as on tensor cores, so the numbers
are those of the GPU path (a constexpr, off on GPUs).

FP8 variant (`squared_relu_mlp_fp8`): x, up_w and down_w are E4M3 with fp32 scales (x: per tensor or per token; weights:
per tensor or per output channel). `_up_squared_relu_fp8_kernel` computes the up GEMM, applies both scales and
relu(.)^2 to the fp32 accumulator, and quantizes the intermediate to E4M3 in the same epilogue. The quantization is
per token *per 128-column group*: a true per-token scale needs the amax of the whole 24576- (15B) or 9216-wide (340B
TP8) row, which a tiled GEMM epilogue only sees after a grid-wide sync. Each BLOCK_N = 128 tile instead takes the
amax of its own rows -> h_scale [M, ceil(I / 128)], scale = max(amax, EPS) / 448 with EPS = 1e-12 as in
kernels/fp8_quant.py (a group that relu zeroed gets zeros, not NaN), values rounded to nearest-even and saturated.
This is finer than per token (never less accurate) and exact to implement. The down projection is then fp8_gemm
with those group scales as its a_scale ([M, K // 128] path), applied inside its K loop.
`squared_relu_mlp_fp8_ref` defines exactly this in fp32 math.

Decode grids: the FP8 up kernel runs cdiv(I, 128) CTAs per 16-64 rows, 192 for 15B but 72 for 340B TP8 on 132 SMs;
split-K cannot help before a nonlinear epilogue, and narrower tiles would need a cross-CTA amax (to be measured
with benchmarks/gpu_suite.py before anything is done about it).

Tolerances (tests/kernels/test_mlp.py). BF16 variant: kernel and reference round the intermediate to x's dtype at
the same point, but their fp32 accumulators differ by reordering (and the interpreter truncates fp32 -> bf16 where
GPUs round to nearest), so h may differ by one ulp of its dtype: |out - ref| <= rtol * |ref| + ulp_h * (|h| @
|down_w|.T), ulp_h = 2^-7 bf16, 2^-10 fp16, 1e-6 fp32, rtol one output ulp (1e-2, 2e-3, 1e-5). FP8 variant: the
intermediate's group scales match to rtol 1e-4 (fp32 reordering, observed ~1e-6; 1e-3 on GPUs), its E4M3 codes
agree within one E4M3 step and differ at all for < 0.5% of elements (values the fp32 noise moved across a rounding
boundary); outputs follow fp8_gemm's bound plus the flips' contribution: 2^-4 * (flipped fraction + 1e-4) *
(|h_deq| @ |down_deq|.T) under the interpreter, where flips are rare and scattered; on GPUs, where they cluster in
rows, exactly what they can move each output by, |h_ours - h_deq| @ |down_deq|.T (triangle inequality), plus 2e-4 of
the magnitude for the down GEMM's own reduced-precision wgmma slices.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from kernels.fp8_gemm import (A_TOKEN, FP8_DTYPE, GROUP_K, OUT_DTYPES, GemmConfig, _fp8_dot_k_range,
                              _grouped_tile, _tma_descriptors, _tma_ready, fp8_gemm, fp8_gemm_ref, parse_scales)
from kernels.triton_utils import interpreting
from kernels.fp8_quant import EPS, FP8_MAX, _e4m3_ref, _quantize_e4m3, _scale_from_amax, ieee_div

# Up-projection tiles per M bucket (sm_90). BF16: BLOCK_K 64 = 128 bytes per row; the big prefill tile is the usual
# Hopper 128x256x64 / 8 warps / 3 stages (144 KiB smem). FP8: BLOCK_N is pinned to the 128-column quantization group.
_BF16_BUCKETS: tuple[tuple[int | None, GemmConfig], ...] = (
    (16, GemmConfig(16, 64, 64, 1, 4, 5)),
    (32, GemmConfig(32, 64, 64, 1, 4, 5)),
    (64, GemmConfig(64, 64, 64, 1, 4, 4)),
    (128, GemmConfig(64, 128, 64, 8, 4, 4)),
    (None, GemmConfig(128, 256, 64, 8, 8, 3)),
)
# FP8 M <= 16: a 256-deep K tile, 4 stages (H200 sweep 2026-11-28, do_bench in one run: the 15B up projection at
# M = 1 took 63 us against 107 us with the best 128-deep tile; 340B-TP8 at M = 16 67 us against 98 us and more).
_FP8_BUCKETS: tuple[tuple[int | None, GemmConfig], ...] = (
    (16, GemmConfig(16, GROUP_K, 256, 1, 4, 4)),
    (32, GemmConfig(32, GROUP_K, 128, 1, 4, 5)),
    (128, GemmConfig(64, GROUP_K, 128, 8, 4, 4)),
    (None, GemmConfig(128, GROUP_K, 128, 8, 8, 4)),
)
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _bucket(table, M: int) -> GemmConfig:
    return next(c for bound, c in table if bound is None or M <= bound)


# ----------------------------------------------------------------------------------------------- Triton

@triton.jit
def _up_squared_relu_kernel(x_ptr, w_ptr, h_ptr, M, N, K,
                            stride_xm, stride_xk, stride_wn, stride_wk, stride_hm, stride_hn,
                            EVEN_K: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                            BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """h[M, N] = relu(x[M, K] @ w[N, K].T) ** 2, fp32 accumulation, stored in h's dtype."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk   # [BM, BK]
    w_ptrs = w_ptr + rn[None, :] * stride_wn + rk[:, None] * stride_wk   # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            in_k = k0 + rk < K
            a = tl.load(x_ptrs, mask=in_k[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=in_k[:, None], other=0.0)
        if UPCAST:  # interpreter only: its tl.dot multiplies bf16 tiles as raw uint16 (Triton 3.9)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    acc = tl.maximum(acc, 0.0)
    h = acc * acc
    h_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm + offs_n[None, :] * stride_hn
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _up_squared_relu_fp8_kernel(x_ptr, w_ptr, h_ptr, hs_ptr, xs_ptr, ws_ptr, M, N, K,
                                stride_xm, stride_xk, stride_wn, stride_wk, stride_hm, stride_hn,
                                stride_hsm, stride_hsg, stride_xs, stride_ws,
                                X_PER_TOKEN: tl.constexpr, W_PER_CHANNEL: tl.constexpr, EVEN_K: tl.constexpr,
                                EPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, TMA: tl.constexpr):
    """h = relu((x * xs) @ (w * ws).T) ** 2 for one [BLOCK_M, BLOCK_N = 128] tile, quantized in the epilogue:
    hs[m, pid_n] = max(amax(h[m, tile]), EPS) / 448, h_fp8 = e4m3(h / hs). TMA: x_ptr and w_ptr are TMA
    descriptors (GemmConfig.tma, for the GPU sweep; kernels/fp8_gemm.py)."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M
    rn = offs_n % N
    acc = _fp8_dot_k_range(x_ptr, w_ptr, xs_ptr, rm, rn, 0, K,
                           stride_xm, stride_xk, stride_wn, stride_wk, 0, 0,
                           False, EVEN_K, BLOCK_K, BLOCK_M, BLOCK_N, BLOCK_K, 0, TMA, pid_m * BLOCK_M, pid_n * BLOCK_N)
    if X_PER_TOKEN:
        acc = acc * tl.load(xs_ptr + rm * stride_xs)[:, None]
    else:
        acc = acc * tl.load(xs_ptr)
    if W_PER_CHANNEL:
        acc = acc * tl.load(ws_ptr + rn * stride_ws)[None, :]
    else:
        acc = acc * tl.load(ws_ptr)
    acc = tl.maximum(acc, 0.0)
    # Wrapped columns (offs_n >= N) hold real values of other columns: keep them out of the group's amax.
    h = tl.where(offs_n[None, :] < N, acc * acc, 0.0)
    scale = _scale_from_amax(tl.max(h, axis=1), EPS)                         # [BM]
    inv = tl.math.div_rn(1.0, scale)                                          # [BM]
    in_m = offs_m < M
    h_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm + offs_n[None, :] * stride_hn
    tl.store(h_ptrs, _quantize_e4m3(h, inv[:, None]), mask=in_m[:, None] & (offs_n[None, :] < N))
    tl.store(hs_ptr + offs_m.to(tl.int64) * stride_hsm + pid_n * stride_hsg, scale, mask=in_m)


# ----------------------------------------------------------------------------------------------- BF16 variant

def _check_mlp_shapes(name: str, x: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor) -> None:
    if x.dim() != 2 or up_w.dim() != 2 or down_w.dim() != 2:
        raise ValueError(f"{name}: x, up_w, down_w must be 2-D, got {x.dim()}, {up_w.dim()}, {down_w.dim()} dims")
    H, inter = x.shape[1], up_w.shape[0]
    if up_w.shape[1] != H or tuple(down_w.shape) != (H, inter):
        raise ValueError(f"{name}: need x [M, H], up_w [I, H], down_w [H, I]; got {tuple(x.shape)}, "
                         f"{tuple(up_w.shape)}, {tuple(down_w.shape)}")
    _check_one_device(name, x=x, up_w=up_w, down_w=down_w)


def _check_one_device(name: str, **tensors: torch.Tensor) -> None:
    """The up kernel takes raw pointers: a weight or scale on another device than x would be read as x's device
    memory (another GPU of a TP group) or fail inside Triton (a CPU tensor), so refuse it here, naming the op."""
    device = next(iter(tensors.values())).device
    for what, t in tensors.items():
        if t.device != device:
            raise ValueError(f"{name}: {what} is on {t.device}, x on {device}; all operands must share a device")


def squared_relu_mlp_ref(x: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor) -> torch.Tensor:
    """x [M, H], up_w [I, H], down_w [H, I] (one float dtype) -> [M, H] in x's dtype. fp32 math; the intermediate
    relu(x @ up_w.T) ** 2 is rounded to x's dtype once, as the kernel stores it."""
    _check_mlp_shapes("squared_relu_mlp_ref", x, up_w, down_w)
    # In place on the fresh GEMM output: two fewer [M, I] fp32 allocations (each a page-faulting 16 MB at M = I =
    # 2048 on the CPU serving path).
    h = (x.float() @ up_w.float().T).relu_().square_().to(x.dtype)          # [M, I]
    return (h.float() @ down_w.float().T).to(x.dtype)                        # [M, H]


def squared_relu_mlp(x: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor) -> torch.Tensor:
    """Triton up GEMM with the relu^2 epilogue, then torch.matmul for the down projection."""
    _check_mlp_shapes("squared_relu_mlp", x, up_w, down_w)
    if x.dtype not in _FLOAT_DTYPES or up_w.dtype != x.dtype or down_w.dtype != x.dtype:
        raise ValueError(f"squared_relu_mlp: x, up_w, down_w must share one of {_FLOAT_DTYPES}, got "
                         f"{x.dtype}, {up_w.dtype}, {down_w.dtype}")
    (M, H), inter = x.shape, up_w.shape[0]
    h = torch.empty((M, inter), dtype=x.dtype, device=x.device)             # [M, I]
    if M and inter:
        cfg = _bucket(_BF16_BUCKETS, M)
        # Exact either way: bf16 x bf16 products are exact in fp32, as on the tensor cores.
        upcast = x.dtype == torch.bfloat16 and interpreting()
        grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(inter, cfg.block_n),)
        _up_squared_relu_kernel[grid](
            x, up_w, h, M, inter, H, x.stride(0), x.stride(1), up_w.stride(0), up_w.stride(1),
            h.stride(0), h.stride(1), EVEN_K=H % cfg.block_k == 0, UPCAST=upcast,
            # fp32 inputs (tests) get exact fp32 products instead of TF32 on GPUs.
            DOT_PRECISION="ieee" if x.dtype == torch.float32 or upcast else "tf32",
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return torch.matmul(h, down_w.T)                                          # [M, H]


# ----------------------------------------------------------------------------------------------- FP8 variant

def _up_scales(name, x_fp8, x_scale, up_w_fp8, up_scale):
    """Check the up projection's operands -> (x_per_token, x_scale fp32 [1] / [M], w_per_channel,
    up_scale fp32 [1] / [I])."""
    for t, what in ((x_fp8, "x_fp8"), (up_w_fp8, "up_w_fp8")):
        if t.dtype != FP8_DTYPE or t.dim() != 2:
            raise ValueError(f"{name}: {what} must be a 2-D {FP8_DTYPE} tensor, got {t.dtype} {tuple(t.shape)}")
    (M, H), inter = x_fp8.shape, up_w_fp8.shape[0]
    if up_w_fp8.shape[1] != H:
        raise ValueError(f"{name}: up_w_fp8 {tuple(up_w_fp8.shape)} must be [I, H = {H}]")
    x_mode, x_s, w_per_channel, w_s = parse_scales(x_scale, up_scale, M, inter, H, name,
                                                   names=("x_scale", "up_scale"), allow_groups=False)
    _check_one_device(name, x_fp8=x_fp8, up_w_fp8=up_w_fp8, x_scale=x_scale, up_scale=up_scale)
    return x_mode == A_TOKEN, x_s, w_per_channel, w_s


def _check_fp8_mlp(name, x_fp8, x_scale, up_w_fp8, up_scale, down_w_fp8, down_scale, out_dtype) -> None:
    _up_scales(name, x_fp8, x_scale, up_w_fp8, up_scale)
    _check_mlp_shapes(name, x_fp8, up_w_fp8, down_w_fp8)
    if down_w_fp8.dtype != FP8_DTYPE:
        raise ValueError(f"{name}: down_w_fp8 must be {FP8_DTYPE}, got {down_w_fp8.dtype}")
    H = x_fp8.shape[1]
    if not isinstance(down_scale, torch.Tensor) or (down_scale.numel() != 1
                                                    and tuple(down_scale.shape) not in ((H,), (H, 1))):
        raise ValueError(f"{name}: down_scale must be one element or [H] / [H, 1] = [{H}]")
    if not down_scale.is_floating_point():  # else the down GEMM's check refuses it in fp8_gemm's name
        raise ValueError(f"{name}: down_scale must be a floating-point tensor, got {down_scale.dtype}")
    _check_one_device(name, x_fp8=x_fp8, down_scale=down_scale)   # down_w_fp8: _check_mlp_shapes
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"{name}: out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")


def _group_quantize_ref(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [M, I] -> (e4m3 [M, I], scale [M, ceil(I / 128)]): per row, per 128 columns, as the kernel epilogue."""
    M, inter = h.shape
    groups = triton.cdiv(inter, GROUP_K)
    padded = torch.nn.functional.pad(h, (0, groups * GROUP_K - inter))      # [M, G * 128]
    amax = padded.view(M, groups, GROUP_K).amax(dim=2) if M else h.new_zeros(0, groups)
    scale = ieee_div(amax.clamp(min=EPS), FP8_MAX)                            # [M, G]
    inv = (1.0 / scale).repeat_interleave(GROUP_K, dim=1)[:, :inter]         # [M, I]
    return _e4m3_ref(h * inv), scale


def _up_squared_relu_fp8_ref(x_fp8, x_scale, up_w_fp8, up_scale) -> tuple[torch.Tensor, torch.Tensor]:
    """The intermediate the reference defines: (h_fp8 [M, I], h_scale [M, ceil(I / 128)])."""
    h = torch.relu(fp8_gemm_ref(x_fp8, up_w_fp8, x_scale, up_scale, torch.float32)).square()  # [M, I]
    return _group_quantize_ref(h)


def squared_relu_mlp_fp8_ref(x_fp8: torch.Tensor, x_scale: torch.Tensor, up_w_fp8: torch.Tensor,
                             up_scale: torch.Tensor, down_w_fp8: torch.Tensor, down_scale: torch.Tensor,
                             out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x_fp8 [M, H], up_w_fp8 [I, H], down_w_fp8 [H, I] (E4M3) with their scales -> [M, H] out_dtype:
    h = relu(fp8_gemm_ref(x, up)) ** 2 in fp32, quantized per token per 128 columns (module docstring), then
    fp8_gemm_ref(h_fp8, down_w, h_scale, down_scale)."""
    _check_fp8_mlp("squared_relu_mlp_fp8_ref", x_fp8, x_scale, up_w_fp8, up_scale, down_w_fp8, down_scale,
                   out_dtype)
    h_fp8, h_scale = _up_squared_relu_fp8_ref(x_fp8, x_scale, up_w_fp8, up_scale)
    return fp8_gemm_ref(h_fp8, down_w_fp8, h_scale, down_scale, out_dtype)


def _up_squared_relu_fp8(x_fp8, x_scale, up_w_fp8, up_scale, cfg: GemmConfig | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch `_up_squared_relu_fp8_kernel` -> (h_fp8 [M, I], h_scale [M, ceil(I / 128)] fp32). cfg overrides the
    M-bucket table (the GPU sweep, benchmarks/gpu_sweep.py); its BLOCK_N must be the 128-wide group."""
    (M, H), inter = x_fp8.shape, up_w_fp8.shape[0]
    x_per_token, x_s, w_per_channel, w_s = _up_scales("squared_relu_mlp_fp8", x_fp8, x_scale, up_w_fp8, up_scale)
    h = torch.empty((M, inter), dtype=FP8_DTYPE, device=x_fp8.device)       # [M, I]
    h_scale = torch.empty((M, triton.cdiv(inter, GROUP_K)), dtype=torch.float32, device=x_fp8.device)  # [M, G]
    if M and inter:
        cfg = cfg or _bucket(_FP8_BUCKETS, M)
        if cfg.block_n != GROUP_K:  # one tile is one quantization group
            raise ValueError(f"squared_relu_mlp_fp8: BLOCK_N {cfg.block_n} must be the group width {GROUP_K}")
        grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(inter, cfg.block_n),)
        tma = cfg.tma and _tma_ready(x_fp8, up_w_fp8, cfg)   # else the pointer loads, same tiles
        x_arg, w_arg = _tma_descriptors(x_fp8, up_w_fp8, cfg) if tma else (x_fp8, up_w_fp8)
        _up_squared_relu_fp8_kernel[grid](
            x_arg, w_arg, h, h_scale, x_s, w_s, M, inter, H,
            x_fp8.stride(0), x_fp8.stride(1), up_w_fp8.stride(0), up_w_fp8.stride(1), h.stride(0), h.stride(1),
            h_scale.stride(0), h_scale.stride(1), x_s.stride(0), w_s.stride(0),
            X_PER_TOKEN=x_per_token, W_PER_CHANNEL=w_per_channel, EVEN_K=H % cfg.block_k == 0, EPS=EPS,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, TMA=tma,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return h, h_scale


def squared_relu_mlp_fp8(x_fp8: torch.Tensor, x_scale: torch.Tensor, up_w_fp8: torch.Tensor,
                         up_scale: torch.Tensor, down_w_fp8: torch.Tensor, down_scale: torch.Tensor,
                         out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Triton version of `squared_relu_mlp_fp8_ref`: fused up + relu^2 + group quantization, then fp8_gemm."""
    _check_fp8_mlp("squared_relu_mlp_fp8", x_fp8, x_scale, up_w_fp8, up_scale, down_w_fp8, down_scale, out_dtype)
    h_fp8, h_scale = _up_squared_relu_fp8(x_fp8, x_scale, up_w_fp8, up_scale)  # [M, I], [M, G]
    return fp8_gemm(h_fp8, down_w_fp8, h_scale, down_scale, out_dtype)         # [M, H]
