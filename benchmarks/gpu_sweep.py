"""Launch-config sweeps for a lent GPU (a step of benchmarks/gpu_suite.py): each kernel's alternatives timed side by
side on the model shapes, so that its table in kernels/ is chosen from measurements, as vLLM does per device.

- fp8_gemm: tile shape, warps, stages and split-K per M bucket (decode M = 1 and 16, M = 64, prefill M = 256 and
  4096) on the 15B and 340B-TP8 projections, beside torch._scaled_mm; the same with per-group A scales (the fused
  MLP's down projection) at decode sizes;
- the fused MLP's up projection (relu^2 + FP8 group quantization epilogue): K tile, warps, stages;
- the experimental CUDA-core FP8 GEMV (benchmarks/fp8_gemv.py) at M = 1, beside the production fp8_gemm;
- decode attention: keys per tile, warps, stages, BF16 and FP8 caches (FP8 V as words and per byte; head_dim 192 as
  128 + 64 and padded to 256), the context split count where few (sequence, KV head) pairs leave SMs idle, beside
  SDPA on dense K/V;
- prefill attention: score rows, keys per tile, warps, stages, beside SDPA pinned to FlashAttention (the default
  dispatch where flash refuses the case).

Every config first runs once in a pool of processes: Triton compiles there in parallel (about 2 s each, 150+
configs) and the timing process then finds them in the on-disk cache. Each config's output is compared with the
default's, so that a config that is fast because it is wrong is flagged, and a config that fails to compile or
launch (too much shared memory) is recorded with its error instead of stopping the sweep.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, is_dataclass, replace

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

FP8 = torch.float8_e4m3fn
SMOKE = os.environ.get("N4_SWEEP_SMOKE") == "1"   # tiny shapes, few configs: the CPU test of this code path


@dataclass
class SweepCase:
    kernel: str
    shape: str
    make: Callable[[torch.device], tuple]                 # device -> inputs
    run: Callable[[tuple, object], torch.Tensor]           # (inputs, config or None = default) -> output
    configs: list
    baseline: Callable[[tuple], object] | None = None      # torch's own op on the same problem, for scale
    rtol: float = 2e-2                                     # output vs the default config's
    # Cases of one group compile to the same kernels (same constexprs and launch-time specialization): only the
    # first of a group is warmed, its configs spread over the pool.
    compile_group: str = ""


def _cfg_dict(cfg) -> dict | None:
    if cfg is None:
        return None
    return asdict(cfg) if is_dataclass(cfg) else dict(cfg)


# ---- fp8 GEMM --------------------------------------------------------------------------------------------------

_GEMM_SHAPES = {  # name: (N, K)
    "15b qkv": (8192, 6144), "15b o": (6144, 6144), "15b up": (24576, 6144), "15b down": (6144, 24576),
    "340b-tp8 qkv": (2688, 18432), "340b-tp8 down": (18432, 9216),
}


def _fp8_operands(device, m: int, n: int, k: int, a_scale_shape: tuple) -> tuple:
    """a [m, k] and b [n, k] E4M3 (seeded by the shape), a's scales in `a_scale_shape`, b's per channel [n]."""
    g = torch.Generator(device=device).manual_seed(m * 7 + n + k)
    a = torch.randn((m, k), device=device, generator=g).to(FP8)
    b = (torch.randn((n, k), device=device, generator=g) * 0.5).to(FP8)
    return (a, b, torch.rand(a_scale_shape, device=device) * 0.01 + 1e-3,
            torch.rand(n, device=device) * 0.01 + 1e-3)


def _gemm_configs(m: int) -> list:
    from kernels.fp8_gemm import GemmConfig
    if SMOKE:
        return [GemmConfig(16, 32, 64, 1, 4, 2), GemmConfig(16, 64, 64, 1, 4, 2, 2)]
    if m <= 16:
        return [GemmConfig(16, n, k, 1, w, s, split) for n in (32, 64, 128) for k in (128, 256) for w in (2, 4)
                for s in (4, 6) for split in (1, 2)]
    if m <= 64:
        return [GemmConfig(64, n, 128, 1, 4, s, split) for n in (64, 128) for s in (3, 4, 5) for split in (1, 2)]
    tiles = [GemmConfig(bm, bn, bk, 8, w, s) for bm in (64, 128) for bn in (128, 256) for bk in (64, 128)
             for w in (4, 8) for s in (3, 4)
             if (bm * bk + bn * bk) * s <= 200 * 1024 and not (bm == 64 and w == 8 and bn == 128)]
    # Prefill sizes also try the compiler's promotion (1) and none (2, fast accumulation) on the usual Hopper tiles:
    # per-tile promotion (0) is what keeps the kernel at ~0.65x torch._scaled_mm (benchmarks/README.md).
    promoted = [GemmConfig(bm, bn, 128, 8, w, s, promote=p) for bm, bn, w, s in
                [(128, 128, 8, 4), (128, 256, 8, 3), (64, 128, 4, 4), (128, 128, 4, 4)] for p in (1, 2)]
    return tiles + promoted


def _gemm_tma_configs(m: int) -> list:
    """The persistent TMA GEMM (benchmarks/fp8_gemm_tma.py) with each promotion, and Triton's Hopper warp
    specialization of its tile loop (4 warps: a producer split off, registers rebalanced with setmaxnreg; 8 warps:
    pipelined without them). All compile for sm_90 without spills (tests/benchmarks/test_fp8_gemm_tma.py); none had
    run on a GPU when this was written, so they are a step of their own (sweep_tma: a fault cannot cost the rest)."""
    from benchmarks.fp8_gemm_tma import TmaGemmConfig as Cfg
    if SMOKE:
        return [Cfg(16, 32, 64, 1, 4, 2), Cfg(16, 32, 64, 1, 4, 4, split_k=2)]
    if m == 1:
        # GEMVs: TMA streams the weight through a deep ring of shared-memory buffers (8-12 stages of 10-18 KiB);
        # split-K for grids that leave SMs idle (340B-TP8 qkv: 42 or 21 tiles).
        return [Cfg(16, bn, 128, 1, 4, s, split_k=k) for bn, s in ((64, 8), (64, 12), (128, 8)) for k in (1, 2, 4)]
    tma = [Cfg(bm, bn, 128, 8, w, s, promote=p) for bm, bn, w, s in
           [(128, 128, 8, 3), (128, 128, 8, 4), (128, 256, 8, 3), (64, 128, 4, 4)] for p in (0, 1, 2)]
    tma += [Cfg(128, bn, 128, 8, w, s, promote=p, warp_specialize=True) for bn, w, s in
            [(128, 4, 4), (128, 8, 4), (256, 8, 3)] for p in (0, 2)]
    if m < 1024:  # M = 256: the two tiles the table uses there, with TMA (keeps the sweep inside its limit)
        tma = [c for c in tma if c.promote == 0 and not c.warp_specialize and c.block_n == 128 and c.num_stages == 4]
    return tma


def _gemm_case(name: str, m: int, tma: bool = False) -> SweepCase:
    from benchmarks.fp8_gemm_tma import fp8_gemm_tma
    from kernels.fp8_gemm import _fp8_gemm_launch
    n, k = (256, 512) if SMOKE else _GEMM_SHAPES[name]

    def make(device):
        return _fp8_operands(device, m, n, k, a_scale_shape=(m,))

    def run(x, cfg):
        if tma and cfg is not None:
            return fp8_gemm_tma(*x, torch.bfloat16, cfg)
        return _fp8_gemm_launch(*x, torch.bfloat16, cfg)       # cfg None: production's table (the default row)

    def baseline(x):
        a, b, sa, sb = x
        return torch._scaled_mm(a, b.t(), scale_a=sa[:, None], scale_b=sb[None, :], out_dtype=torch.bfloat16)

    # Every model N, K and stride is a multiple of 16 and every K of 256: only M == 1 (a constant) and the M bucket's
    # config list tell the compiled kernels apart.
    kernel = "fp8_gemm_tma" if tma else "fp8_gemm"
    group = f"{kernel} M={m}" if m == 1 or tma else f"{kernel} bucket={min(m, 256)}"
    configs = _gemm_tma_configs(m) if tma else _gemm_configs(m)
    return SweepCase(kernel, f"{name} M={m} N={n} K={k}", make, run, configs, baseline, compile_group=group)


def _gemm_grouped_case(name: str, m: int) -> SweepCase:
    """The fused MLP's down projection: A carries per-token per-128-group scales, applied inside the K loop."""
    from kernels.fp8_gemm import GemmConfig, _fp8_gemm_launch
    n, k = (256, 512) if SMOKE else _GEMM_SHAPES[name]

    def make(device):
        return _fp8_operands(device, m, n, k, a_scale_shape=(m, -(-k // 128)))

    def run(x, cfg):
        return _fp8_gemm_launch(*x, torch.bfloat16, cfg)

    configs = ([GemmConfig(16, 32, 64, 1, 4, 2)] if SMOKE else
               [GemmConfig(16, bn, bk, 1, w, s, split) for bn in (32, 64, 128) for bk in (128, 256) for w in (2, 4)
                for s in (4, 6) for split in (1, 2)])
    return SweepCase("fp8_gemm_grouped_a", f"{name} M={m} N={n} K={k}", make, run, configs,
                     compile_group=f"fp8_gemm_grouped_a M={m}" if m == 1 else "fp8_gemm_grouped_a bucket=16")


def _gemv_case(name: str) -> SweepCase:
    """The experimental CUDA-core GEMV (benchmarks/fp8_gemv.py) at M = 1; its baseline is the production fp8_gemm."""
    from benchmarks.fp8_gemv import GemvConfig, fp8_gemv
    from kernels.fp8_gemm import fp8_gemm
    n, k = (256, 512) if SMOKE else _GEMM_SHAPES[name]

    def make(device):
        return _fp8_operands(device, 1, n, k, a_scale_shape=(1,))

    def run(x, cfg):
        return fp8_gemv(*x, torch.bfloat16, cfg)

    def baseline(x):
        return fp8_gemm(*x, torch.bfloat16)

    tiles = [(8, 256, 4), (8, 512, 4), (8, 512, 8), (8, 1024, 8), (16, 128, 4), (16, 256, 4), (16, 256, 8),
             (16, 512, 8), (32, 128, 4), (32, 128, 8), (32, 256, 8), (64, 128, 8)]
    configs = ([GemvConfig(16, 128, 4, 1), GemvConfig(8, 128, 4, 1, 2)] if SMOKE else
               [GemvConfig(bn, bk, w, 1, split) for bn, bk, w in tiles for split in (1, 2, 4)])
    return SweepCase("fp8_gemv_experimental", f"{name} M=1 N={n} K={k}", make, run, configs, baseline,
                     compile_group="fp8_gemv_experimental")


def _mlp_up_case(model: str, m: int, tma: bool = False) -> SweepCase:
    """The fused MLP's up projection (relu^2 and the per-group FP8 quantization in its epilogue); tma: its TMA-fed
    variants (the sweep_tma step)."""
    from kernels.fp8_gemm import GROUP_K, GemmConfig
    from kernels.mlp import _up_squared_relu_fp8
    h, inter = {"15b": (6144, 24576), "340b-tp8": (18432, 9216), "tiny": (256, 512)}[model]

    def make(device):
        x, w, x_scale, w_scale = _fp8_operands(device, m, inter, h, a_scale_shape=(m,))
        return x, x_scale, w, w_scale

    def run(x, cfg):
        h_fp8, h_scale = _up_squared_relu_fp8(*x, cfg=cfg)
        return h_fp8.float() * h_scale.repeat_interleave(GROUP_K, dim=1)[:, :inter]

    bm = 16 if m <= 16 else 64
    if tma:  # 128-deep boxes (TMA's 128-byte rows) in rings of 4-12 stages
        configs = ([GemmConfig(16, GROUP_K, 64, 1, 4, 3, tma=True)] if SMOKE else
                   [GemmConfig(bm, GROUP_K, 128, 1, w, s, tma=True) for w in (4, 8) for s in (4, 8, 12)
                    if (bm + GROUP_K) * 128 * s <= 200 * 1024])
    else:
        configs = ([GemmConfig(16, GROUP_K, 64, 1, 4, 2)] if SMOKE else
                   [GemmConfig(bm, GROUP_K, bk, 1, w, s) for bk in (64, 128, 256) for w in (2, 4, 8)
                    for s in (3, 4, 5, 6) if not (bk == 256 and s > 4)])
    kernel = "mlp_up_fp8_tma" if tma else "mlp_up_fp8"
    return SweepCase(kernel, f"{model} M={m} H={h} I={inter}", make, run, configs,
                     compile_group=f"{kernel} M={m}" if m == 1 else f"{kernel} bucket={bm}")


# ---- decode attention --------------------------------------------------------------------------------------------

def _decode_case(model: str, batch: int, ctx: int, kv_dtype) -> SweepCase:
    from kernels.decode_attention import DecodeTiles, _decode_launch, default_decode_tiles
    # tiny: head_dim 96 (64 + 32), so the smoke run takes the split-head rows too
    heads, kv_heads, d = {"15b": (48, 8, 128), "340b-tp8": (12, 1, 192), "tiny": (6, 1, 96)}[model]
    fp8 = kv_dtype == FP8

    def make(device):
        blocks = batch * -(-ctx // 16)
        kc = torch.randn(blocks, 16, kv_heads, d, device=device).to(kv_dtype)
        vc = torch.randn(blocks, 16, kv_heads, d, device=device).to(kv_dtype)
        tables = torch.randperm(blocks, device=device).to(torch.int32).view(batch, -1)
        q = torch.randn(batch, heads, d, device=device, dtype=torch.bfloat16)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        dense = (torch.randn(batch, kv_heads, ctx, d, device=device, dtype=torch.bfloat16),) * 2 if not fp8 else ()
        return (q, kc, vc, lens, tables) + dense

    def run(x, tiles):
        q, kc, vc, lens, tables = x[:5]
        return _decode_launch(q, kc, vc, lens, tables, ctx, d ** -0.5, 0.05 if fp8 else 1.0, 0.05 if fp8 else 1.0,
                              None, tiles)

    def baseline(x):
        if fp8:
            return None
        q, kd = x[0], x[5]
        return torch.nn.functional.scaled_dot_product_attention(q.view(batch, heads, 1, d), kd, kd, enable_gqa=True)

    tiles = [(n, w) for n in (32, 64, 128) for w in (2, 4, 8) if not (d > 128 and n == 128)]
    configs = ([DecodeTiles(32, 4, 2)] if SMOKE else [DecodeTiles(n, w, s) for n, w in tiles for s in (2, 3, 4)])
    default = default_decode_tiles(d, 16, fp8)
    stages = default.num_stages  # the variants below change one thing each against the default's stages
    if fp8:  # FP8 V read per byte (the path before words) beside the default, words
        configs += [DecodeTiles(n, w, stages, v_words=False) for n, w in tiles[:1 if SMOKE else None]]
    if d & (d - 1):  # the head in one part padded to a power of two (before the split), beside the default split
        configs += [DecodeTiles(n, w, stages, split_head=False) for n, w in tiles[:1 if SMOKE else None]]
    if not SMOKE and (batch * kv_heads < 132 or model == "340b-tp8"):
        # Few (sequence, KV head) pairs: the context split count sets the grid. The auto rule's 5 splits for the
        # 340B rank at batch 64 make 320 programs, 2.4 an SM: whole waves may do better (e.g. 8 -> 512).
        configs += [replace(default, num_splits=s) for s in (2, 4, 8, 12, 16, 24, 32)]
    name = "fp8" if fp8 else "bf16"
    shape = f"{model} B={batch} ctx={ctx} kv={name}"
    return SweepCase("decode_attention", shape, make, run, configs, baseline, compile_group=shape)


# ---- prefill attention -------------------------------------------------------------------------------------------

def _prefill_case(model: str, seqs: int, seq_len: int, kv_tma: bool = False) -> SweepCase:
    """Causal prefill of seqs x seq_len new tokens. kv_tma: a cache of 128-token blocks, on which K/V tiles can be
    TMA boxes (the sweep_tma step): its default row is the production kernel on that same cache."""
    from kernels.paged_attention import _prefill_launch
    heads, kv_heads, d = {"15b": (48, 8, 128), "340b-tp8": (12, 1, 192), "tiny": (6, 1, 64)}[model]
    group = heads // kv_heads
    block_size = 128 if kv_tma and not SMOKE else 32 if kv_tma else 16

    def make(device):
        blocks = seqs * -(-seq_len // block_size)
        t = seqs * seq_len
        kc = torch.randn(blocks, block_size, kv_heads, d, device=device, dtype=torch.bfloat16)
        vc = torch.randn(blocks, block_size, kv_heads, d, device=device, dtype=torch.bfloat16)
        tables = torch.randperm(blocks, device=device).to(torch.int32).view(seqs, -1)
        q = torch.randn(t, heads, d, device=device, dtype=torch.bfloat16)
        qsl = torch.arange(0, t + 1, seq_len, dtype=torch.int32, device=device)
        lens = torch.full((seqs,), seq_len, dtype=torch.int32, device=device)
        qd = torch.randn(seqs, heads, seq_len, d, device=device, dtype=torch.bfloat16)
        kd = torch.randn(seqs, kv_heads, seq_len, d, device=device, dtype=torch.bfloat16)
        return q, kc, vc, qsl, lens, tables, qd, kd

    def run(x, cfg):
        q, kc, vc, qsl, lens, tables = x[:6]
        return _prefill_launch(q, kc, vc, qsl, lens, tables, d ** -0.5, 1.0, 1.0, cfg)

    flash_refused = []   # set on the first refusal: the later calls (inside a CUDA-graph capture) skip the attempt

    def baseline(x):
        # SDPA pinned to FlashAttention, the yardstick: the default dispatch may pick cuDNN on H100/H200
        # (benchmarks/kernels.py times every backend). Where flash refuses this case, the default dispatch, said once.
        qd, kd = x[6], x[7]
        if not flash_refused:
            try:
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return torch.nn.functional.scaled_dot_product_attention(qd, kd, kd, is_causal=True,
                                                                            enable_gqa=True)
            except RuntimeError as e:
                flash_refused.append(e)
                reason = (str(e).strip().splitlines() or [""])[0]
                warnings.warn(f"prefill {model} {seqs}x{seq_len}: FlashAttention refused ({reason}); the baseline "
                              f"is SDPA's default dispatch", stacklevel=1)
        return torch.nn.functional.scaled_dot_product_attention(qd, kd, kd, is_causal=True, enable_gqa=True)

    rows = (64, 128) if group <= 64 else (128,)
    if kv_tma:  # whole-block TMA boxes for the unmasked tiles (BLOCK_N divides the 128-token blocks)
        configs = ([dict(BLOCK_R=32, BLOCK_N=16, num_warps=4, num_stages=2, KV_TMA=True)] if SMOKE else
                   [dict(BLOCK_R=r, BLOCK_N=n, num_warps=w, num_stages=s, KV_TMA=True) for r in rows
                    for n in (32, 64, 128) for w in (4, 8) for s in (2, 3) if not (d > 128 and n == 128) and r >= group])
    else:  # every tile twice: in launch order and with the longest (last) query tiles first (REVERSE)
        configs = ([dict(BLOCK_R=32, BLOCK_N=16, num_warps=4, num_stages=2, REVERSE=rev) for rev in (False, True)]
                   if SMOKE else
                   [dict(BLOCK_R=r, BLOCK_N=n, num_warps=w, num_stages=s, REVERSE=rev) for r in rows
                    for n in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4) for rev in (False, True)
                    if not (d > 128 and n == 128) and r >= group])
    shape = f"{model} {seqs}x{seq_len} bf16" + (f" block {block_size}" if kv_tma else "")
    kernel = "prefill_attention_tma" if kv_tma else "prefill_attention"
    return SweepCase(kernel, shape, make, run, configs, baseline, compile_group=shape)


def sweep_cases() -> list[SweepCase]:
    if SMOKE:
        return [_gemm_case("tiny", 1), _gemm_grouped_case("tiny", 1), _gemv_case("tiny"), _mlp_up_case("tiny", 1),
                _decode_case("tiny", 2, 64, FP8), _prefill_case("tiny", 1, 64), _gemm_case("tiny", 1, tma=True),
                _mlp_up_case("tiny", 1, tma=True), _prefill_case("tiny", 1, 64, kv_tma=True)]
    cases = [_gemm_case(name, m) for m in (1, 16) for name in _GEMM_SHAPES]
    cases += [_gemm_case(name, 64) for name in ("15b qkv", "15b up", "340b-tp8 down")]
    cases += [_gemm_case(name, m) for m in (256, 4096) for name in ("15b qkv", "15b up", "15b down", "340b-tp8 down")]
    cases += [_gemv_case(name) for name in _GEMM_SHAPES]
    cases += [_gemm_grouped_case(name, m) for m in (1, 16) for name in ("15b down", "340b-tp8 down")]
    cases += [_mlp_up_case(model, m) for m in (1, 16, 64) for model in ("15b", "340b-tp8")]
    cases += [_decode_case("15b", b, 4096, dt) for b in (1, 64) for dt in (torch.bfloat16, FP8)]
    cases += [_decode_case("340b-tp8", 64, 4096, dt) for dt in (torch.bfloat16, FP8)]
    cases += [_prefill_case("15b", 1, 4096), _prefill_case("340b-tp8", 1, 4096)]
    cases += [_gemm_case(name, m, tma=True) for m in (4096, 256) for name in ("15b qkv", "15b up", "15b down",
                                                                            "340b-tp8 down")]
    cases += [_gemm_case(name, 1, tma=True) for name in _GEMM_SHAPES]
    cases += [_mlp_up_case(model, m, tma=True) for m in (1, 16, 64) for model in ("15b", "340b-tp8")]
    cases += [_prefill_case("15b", 1, 4096, kv_tma=True), _prefill_case("340b-tp8", 1, 4096, kv_tma=True)]
    return cases


# ---- running -----------------------------------------------------------------------------------------------------

def _warm_tasks(cases: list[SweepCase], chunk: int = 3, selected: list[int] | None = None
                ) -> list[tuple[int, list[int]]]:
    """(case index, config indices) for the pool: the first case of each compile group, configs in chunks; only the
    cases whose indices are in `selected` (indices into `cases`, all by default)."""
    tasks, seen = [], set()
    for i, case in enumerate(cases):
        if (selected is not None and i not in selected) or case.compile_group in seen:
            continue
        seen.add(case.compile_group)
        indices = list(range(len(case.configs)))
        tasks += [(i, indices[j:j + chunk]) for j in range(0, len(indices), chunk)]
    return tasks


def _warm(task: tuple[int, list[int]]) -> int:
    """In a pool process: run some configs of one case once (Triton compiles them into its on-disk cache)."""
    case_index, config_indices = task
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    case = sweep_cases()[case_index]
    x = case.make(device)
    for cfg in [case.configs[i] for i in config_indices] + ([None] if config_indices[:1] == [0] else []):
        try:
            case.run(x, cfg)
        except Exception:  # noqa: BLE001 — recorded by the timing pass
            pass
    if device.type == "cuda":
        torch.cuda.synchronize()
    return case_index


def _time(fn, cuda: bool) -> float:
    """Median ms of GPU time per call (benchmarks/kernels.py: CUDA graphs behind L2 flushes; CPU: one call)."""
    from benchmarks.kernels import _time as time_call
    return 1e3 * time_call(fn, 40 if cuda else 1, cuda)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """|out - ref| / |ref| in the Frobenius norm (inf if out is not finite)."""
    out, ref = out.float(), ref.float()
    if not bool(torch.isfinite(out).all()):
        return math.inf
    return float((out - ref).norm()) / (float(ref.norm()) + 1e-30)


def run_sweep(emit: Callable[[dict], None], workers: int | None = None, kernels: set[str] | None = None,
              skip_kernels: frozenset[str] = frozenset()) -> dict:
    """Time every case's configs (only the cases of `kernels` when given, none of `skip_kernels`)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    all_cases = sweep_cases()
    selected = [i for i, c in enumerate(all_cases)
                if (kernels is None or c.kernel in kernels) and c.kernel not in skip_kernels]
    cases = [all_cases[i] for i in selected]
    result: dict = {"cases": []}
    workers = workers or max(1, min(14, (os.cpu_count() or 2) - 2))
    if workers > 1:
        start = time.perf_counter()
        try:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                list(pool.map(_warm, _warm_tasks(all_cases, selected=selected)))
        except Exception as e:  # noqa: BLE001 — a worker that died (a kernel fault) costs the warm-up only: the
            # timing pass below compiles what is missing, one case at a time
            result["compile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        result["compile_s"] = round(time.perf_counter() - start, 1)
        result["compile_workers"] = workers
        emit(result)
    for case in cases:
        row: dict = {"kernel": case.kernel, "shape": case.shape, "configs": []}
        try:
            x = case.make(device)
            default_out = case.run(x, None)
            row["default_ms"] = round(_time(lambda: case.run(x, None), cuda), 5)
            if case.baseline is not None and case.baseline(x) is not None:
                row["baseline_ms"] = round(_time(lambda: case.baseline(x), cuda), 5)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            result["cases"].append(row)
            emit(result)
            continue
        for cfg in case.configs:
            entry: dict = {"config": _cfg_dict(cfg)}
            try:
                # How far from the default config's output: also how much accuracy a promotion gives up.
                err = _rel_err(case.run(x, cfg), default_out)
                entry["rel_err"] = err if math.isfinite(err) else None        # JSON has no inf
                entry["correct"] = err <= case.rtol
                entry["ms"] = round(_time(lambda cfg=cfg: case.run(x, cfg), cuda), 5)
            except Exception as e:  # noqa: BLE001 — too much shared memory, a compile error: noted
                entry["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
            row["configs"].append(entry)
        timed = [c for c in row["configs"] if c.get("correct") and "ms" in c]
        if timed:
            best = min(timed, key=lambda c: c["ms"])
            row["best"] = best
            row["best_vs_default"] = round(row["default_ms"] / best["ms"], 3)
        result["cases"].append(row)
        del x
        emit(result)
        print(f"{case.kernel} {case.shape}: default {row['default_ms']:.4f} ms, best "
              f"{row.get('best', {}).get('ms', math.nan):.4f} ms {row.get('best', {}).get('config')}, "
              f"baseline {row.get('baseline_ms')}", flush=True)
    return result
