"""`n4 bench kernels`: every Triton kernel beside its plain-torch reference and torch's built-ins, on the 15B and
340B-TP8 shapes, with TFLOP/s, GB/s and the fraction of the roofline (benchmarks/roofline.py) each reaches.

The torch built-ins are pinned, so that a figure says which kernel it is:
- attention: `scaled_dot_product_attention` once per backend (`sdpa_flash`, `sdpa_cudnn`, `sdpa_efficient`) beside
  the default dispatch (`sdpa`, whichever backend this torch picks on this device). Prefill's baseline is
  `sdpa_flash` (the goal is BF16 prefill at least as fast as FlashAttention), or `sdpa` where flash cannot run;
- FP8 GEMM: `torch._scaled_mm` with fp32 promotion (the baseline) and with fast accumulation.
A built-in that refuses a case (a backend without GQA support, or missing on the CPU) is dropped from it when the
case is built, and appears as a row with no timings and the reason in its notes.

Without CUDA it runs a reduced set of tiny shapes under the Triton interpreter: that checks the harness and
the kernels' launch paths, and its timings mean nothing.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.roofline import fraction, for_device

FP8 = torch.float8_e4m3fn


@dataclass
class Case:
    kernel: str
    shape: str
    flops: float
    bytes_moved: float
    fp8: bool
    candidates: dict[str, Callable[[], object]]   # name -> zero-argument call; "triton" is ours
    # What the others are compared with: the first of these that runs. Put the preferred one first among the
    # candidates after "triton" and "ref" as well: benchmarks/gpu_report.py takes that row as the baseline.
    baselines: tuple[str, ...] = ("ref",)
    unavailable: dict[str, str] = field(default_factory=dict)   # dropped when the case was built: name -> why


@dataclass
class Row:
    kernel: str
    shape: str
    impl: str
    ms: float
    tflops: float
    gbps: float
    roofline_fraction: float
    vs_baseline: float | None = None            # the baseline's time / this one's: > 1 is faster than it
    is_baseline: bool = False
    notes: list[str] = field(default_factory=list)


def _time(fn: Callable, iters: int, cuda: bool) -> float:
    """Median seconds per call.

    On CUDA the calls are captured in a CUDA graph, each behind a 256 MB memset that clears the L2 (so weights
    come from HBM, as in a forward whose layers do not fit in L2), and the same graph of memsets alone is subtracted:
    what is left is GPU time, without Python or launch overhead. That is how the engine runs decode steps, and it
    matters: with Triton 3.6 a launch costs tens of microseconds of CPU, and in the first H200 runs (do_bench)
    the same 15B qkv GEMV at M = 64 measured 27 us in one run and 73 us in the next, while torch._scaled_mm held
    within 3%. A function that cannot be captured (a host sync) falls back to Triton's do_bench. CUDA: iters / 2
    calls per graph (fewer for a call over ~0.5 ms); CPU: `iters` timed calls.
    """
    if cuda:
        try:
            return _time_cuda_graph(fn, max(iters // 2, 5))
        except Exception:  # noqa: BLE001 — not capturable (a host sync): time it the ordinary way
            torch.cuda.synchronize()
            import triton.testing
            return triton.testing.do_bench(fn, warmup=max(iters // 4, 5), rep=iters, return_mode="median") / 1e3
    fn()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return samples[len(samples) // 2]


_L2_FLUSH_BYTES = 256 << 20


def _time_cuda_graph(fn: Callable, calls: int, replays: int = 5) -> float:
    """Seconds of GPU time per call: graph([flush, fn] x calls) minus graph([flush] x calls), medians of replays."""
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    fn()                                   # compile and allocate outside the capture
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    # About 10 ms of calls per graph at most: a 100 ms reference is captured once, a 20 us kernel `calls` times.
    calls = max(1, min(calls, int(0.01 / max(start.elapsed_time(end) / 1e3, 1e-6))))
    graphs = []
    for with_fn in (False, True):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                flush.zero_()
                if with_fn:
                    fn()
        graphs.append(graph)
    medians = []
    for graph in graphs:
        graph.replay()                     # warm
        samples = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        samples.sort()
        medians.append(samples[len(samples) // 2])
    del graphs
    return max(medians[1] - medians[0], 1e-9) / calls


# ---- shapes ---------------------------------------------------------------------------------------------------
# (name, hidden, q heads, kv heads, head_dim, intermediate) per GPU: 15B whole, 340B one TP=8 rank.
MODELS = {
    "15b": dict(hidden=6144, heads=48, kv_heads=8, head_dim=128, inter=24576, o_in=6144),
    "340b-tp8": dict(hidden=18432, heads=12, kv_heads=1, head_dim=192, inter=9216, o_in=2304),
}
REDUCED = {"tiny": dict(hidden=256, heads=6, kv_heads=1, head_dim=64, inter=512, o_in=384)}


# SDPA pinned to one backend each. The default dispatch picks by device, dtype and torch version (cuDNN ahead of
# FlashAttention-2 on some H100/H200 builds: our H200 "sdpa" reached ~560 TFLOP/s, more than FA2 usually does),
# so a default-dispatch figure alone does not say which kernel ours was compared with.
SDPA_BACKENDS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
                 "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}


def _sdpa(q, k, v, backend: SDPBackend | None = None, **kwargs) -> Callable[[], torch.Tensor]:
    """A zero-argument `scaled_dot_product_attention` call; `backend` None is the default dispatch.

    The pin is entered inside the call: the backend is chosen at every dispatch, so every call (warm-up, CUDA-graph
    capture, do_bench) must run under it, and it must not leak into the candidates timed after this one.
    """
    def call():
        if backend is None:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
    return call


def _drop_unrunnable(candidates: dict[str, Callable], names) -> dict[str, str]:
    """Call each named candidate once; remove the ones that raise and return {name: why}.

    For torch's built-ins that refuse some cases (a pinned SDPA backend, `_scaled_mm`'s fast accumulation). Probing
    them while the case is built keeps a refusal from costing a failed graph capture and a do_bench attempt, and a
    pinned SDPA backend explains its refusal only in warnings, which are caught here and kept in the note.
    """
    dropped = {}
    for name in names:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                candidates[name]()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 — any refusal drops the candidate, and the note says why
                dropped[name] = _unavailable(e, [str(w.message) for w in caught])
                del candidates[name]
                continue
        for w in caught:  # a candidate that runs keeps its warnings
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return dropped


def _fp8(shape, device, scale=0.05):
    return (torch.randn(shape, device=device) * scale / 0.05).clamp(-448, 448).to(FP8)


def gemm_cases(model: str, m_values, device) -> list[Case]:
    from kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref
    c = (MODELS | REDUCED)[model]
    projections = {"qkv": ((c["heads"] + 2 * c["kv_heads"]) * c["head_dim"], c["hidden"]),
                   "o": (c["hidden"], c["o_in"]), "up": (c["inter"], c["hidden"]), "down": (c["hidden"], c["inter"])}
    cases = []
    for proj, (n, k) in projections.items():
        b = _fp8((n, k), device)
        b_scale = torch.rand(n, device=device) * 0.01 + 0.001          # per output channel
        for m in m_values:
            a = _fp8((m, k), device)
            a_scale = torch.rand(m, device=device) * 0.01 + 0.001      # per token (dynamic)
            # Two torch figures. The baseline keeps use_fast_accum=False: it promotes partial sums into fp32, as
            # ours does every 128-deep K tile, so it is the like-for-like comparison. With fast accumulation the
            # sums stay in the tensor cores' reduced-precision accumulator; vLLM's CUTLASS FP8 kernels for
            # per-tensor / per-token scales on sm_90 use those fast-accumulation schedules, so that is the speed
            # a serving stack is measured against.
            candidates = {
                "triton": lambda a=a, b=b, sa=a_scale, sb=b_scale: fp8_gemm(a, b, sa, sb, torch.bfloat16),
                "ref": lambda a=a, b=b, sa=a_scale, sb=b_scale: fp8_gemm_ref(a, b, sa, sb, torch.bfloat16),
                "torch._scaled_mm": lambda a=a, b=b, sa=a_scale, sb=b_scale: torch._scaled_mm(
                    a, b.t(), scale_a=sa[:, None], scale_b=sb[None, :], out_dtype=torch.bfloat16),
                "torch._scaled_mm fast_accum": lambda a=a, b=b, sa=a_scale, sb=b_scale: torch._scaled_mm(
                    a, b.t(), scale_a=sa[:, None], scale_b=sb[None, :], out_dtype=torch.bfloat16,
                    use_fast_accum=True),
            }
            unavailable = _drop_unrunnable(candidates, ["torch._scaled_mm fast_accum"])
            cases.append(Case("fp8_gemm", f"{model} {proj} M={m} N={n} K={k}", 2.0 * m * n * k,
                              m * k + n * k + 2 * m * n + 4 * (m + n), True, candidates, ("torch._scaled_mm",),
                              unavailable))
    return cases


def _paged_kv(batch: int, ctx: int, kv_heads: int, head_dim: int, block: int, dtype, device):
    blocks_per_seq = -(-ctx // block)
    num_blocks = batch * blocks_per_seq
    k_cache = torch.randn(num_blocks, block, kv_heads, head_dim, device=device).to(dtype)
    v_cache = torch.randn(num_blocks, block, kv_heads, head_dim, device=device).to(dtype)
    tables = torch.randperm(num_blocks, device=device, dtype=torch.int64).to(torch.int32).view(batch, blocks_per_seq)
    return k_cache, v_cache, tables


def decode_cases(model: str, batches, ctx: int, device) -> list[Case]:
    from kernels.decode_attention import paged_decode_attention, paged_decode_attention_ref
    c = (MODELS | REDUCED)[model]
    h, hk, d = c["heads"], c["kv_heads"], c["head_dim"]
    cases = []
    for kv_dtype in (torch.bfloat16, FP8):
        for b in batches:
            k_cache, v_cache, tables = _paged_kv(b, ctx, hk, d, 16, kv_dtype, device)
            q = torch.randn(b, h, d, device=device, dtype=torch.bfloat16)
            seq_lens = torch.full((b,), ctx, dtype=torch.int32, device=device)
            ks = vs = 0.05 if kv_dtype == FP8 else 1.0
            args = (q, k_cache, v_cache, seq_lens, tables, ctx, d ** -0.5)
            candidates = {
                "triton": lambda args=args, ks=ks, vs=vs: paged_decode_attention(*args, k_scale=ks, v_scale=vs),
                "ref": lambda args=args, ks=ks, vs=vs: paged_decode_attention_ref(*args, k_scale=ks, v_scale=vs),
            }
            unavailable = {}
            if kv_dtype != FP8:
                # SDPA on dense (already gathered) K/V: the contiguous-memory lower bound. The default dispatch
                # stays the baseline (a memory-bound bound, whichever backend reaches it); flash beside it.
                kd = torch.randn(b, hk, ctx, d, device=device, dtype=torch.bfloat16)
                vd = torch.randn(b, hk, ctx, d, device=device, dtype=torch.bfloat16)
                qd = q.view(b, h, 1, d)
                candidates["sdpa"] = _sdpa(qd, kd, vd, enable_gqa=True)
                candidates["sdpa_flash"] = _sdpa(qd, kd, vd, SDPA_BACKENDS["sdpa_flash"], enable_gqa=True)
                unavailable = _drop_unrunnable(candidates, ["sdpa_flash"])
            kv_bytes = 2 * b * ctx * hk * d * kv_dtype.itemsize
            name = "fp8" if kv_dtype == FP8 else "bf16"
            cases.append(Case("decode_attention", f"{model} B={b} ctx={ctx} kv={name}", 4.0 * b * h * ctx * d,
                              kv_bytes + 4 * b * h * d, False, candidates,
                              ("ref",) if kv_dtype == FP8 else ("sdpa",), unavailable))
    return cases


def prefill_cases(model: str, seqs: int, seq_len: int, device) -> list[Case]:
    from kernels.paged_attention import paged_attention_ref, paged_prefill_attention
    c = (MODELS | REDUCED)[model]
    h, hk, d = c["heads"], c["kv_heads"], c["head_dim"]
    k_cache, v_cache, tables = _paged_kv(seqs, seq_len, hk, d, 16, torch.bfloat16, device)
    t = seqs * seq_len
    q = torch.randn(t, h, d, device=device, dtype=torch.bfloat16)
    qsl = torch.arange(0, t + 1, seq_len, dtype=torch.int32, device=device)
    seq_lens = torch.full((seqs,), seq_len, dtype=torch.int32, device=device)
    args = (q, k_cache, v_cache, qsl, seq_lens, tables, seq_len, seq_len, d ** -0.5)
    qd = torch.randn(seqs, h, seq_len, d, device=device, dtype=torch.bfloat16)
    kd = torch.randn(seqs, hk, seq_len, d, device=device, dtype=torch.bfloat16)
    vd = torch.randn(seqs, hk, seq_len, d, device=device, dtype=torch.bfloat16)
    candidates = {
        "triton": lambda: paged_prefill_attention(*args),
        "ref": lambda: paged_attention_ref(*args),
        "sdpa_flash": _sdpa(qd, kd, vd, SDPA_BACKENDS["sdpa_flash"], is_causal=True, enable_gqa=True),
        "sdpa": _sdpa(qd, kd, vd, is_causal=True, enable_gqa=True),   # the figure earlier runs reported
        "sdpa_cudnn": _sdpa(qd, kd, vd, SDPA_BACKENDS["sdpa_cudnn"], is_causal=True, enable_gqa=True),
        "sdpa_efficient": _sdpa(qd, kd, vd, SDPA_BACKENDS["sdpa_efficient"], is_causal=True, enable_gqa=True),
    }
    unavailable = _drop_unrunnable(candidates, list(SDPA_BACKENDS))
    flops = 4.0 * seqs * h * d * seq_len * (seq_len + 1) / 2   # causal: half the score matrix
    bytes_moved = 2 * (2 * t * h * d + 2 * t * hk * d)
    cases = [Case("prefill_attention", f"{model} {seqs}x{seq_len} bf16", flops, bytes_moved, False, candidates,
                  ("sdpa_flash", "sdpa"), unavailable)]
    # Over an FP8 cache (what `--kv-cache-dtype fp8` prefills through), against the same kernel over the BF16 cache
    # of the same values: whether converting E4M3 costs the prefill more than the halved K/V bytes save.
    fp8_k, fp8_v = k_cache.to(FP8), v_cache.to(FP8)
    fp8_args = (q, fp8_k, fp8_v) + args[3:]
    fp8_candidates = {
        "triton": lambda: paged_prefill_attention(*fp8_args, k_scale=1.0, v_scale=1.0),
        "ref": lambda: paged_attention_ref(*fp8_args, k_scale=1.0, v_scale=1.0),
        "triton kv=bf16": lambda: paged_prefill_attention(*args),
    }
    cases.append(Case("prefill_attention", f"{model} {seqs}x{seq_len} kv=fp8", flops,
                      2 * (2 * t * h * d) + 2 * t * hk * d, False, fp8_candidates, ("triton kv=bf16",)))
    return cases


def mlp_cases(model: str, m_values, device) -> list[Case]:
    from kernels.fp8_gemm import fp8_gemm
    from kernels.fp8_quant import quantize_fp8_per_token
    from kernels.mlp import squared_relu_mlp_fp8, squared_relu_mlp_fp8_ref
    c = (MODELS | REDUCED)[model]
    hid, inter = c["hidden"], c["inter"]
    up, down = _fp8((inter, hid), device), _fp8((hid, inter), device)
    up_s, down_s = torch.rand(inter, device=device) * 0.01 + 1e-3, torch.rand(hid, device=device) * 0.01 + 1e-3
    cases = []
    for m in m_values:
        x = _fp8((m, hid), device)
        xs = torch.rand(m, device=device) * 0.01 + 1e-3

        def separate(x=x, xs=xs):
            h = fp8_gemm(x, up, xs, up_s, torch.bfloat16)
            h = torch.relu(h).square()
            hq, hs = quantize_fp8_per_token(h)
            return fp8_gemm(hq, down, hs, down_s, torch.bfloat16)

        candidates = {
            "triton": lambda x=x, xs=xs: squared_relu_mlp_fp8(x, xs, up, up_s, down, down_s, torch.bfloat16),
            "ref": lambda x=x, xs=xs: squared_relu_mlp_fp8_ref(x, xs, up, up_s, down, down_s, torch.bfloat16),
            "separate": separate,
        }
        cases.append(Case("squared_relu_mlp_fp8", f"{model} M={m} H={hid} I={inter}", 4.0 * m * hid * inter,
                          2 * hid * inter + m * hid * 3 + m * inter * 2, True, candidates, ("separate",)))
    return cases


def norm_rope_cases(model: str, t_values, device) -> list[Case]:
    from kernels.layernorm import layernorm1p, layernorm1p_fp8, layernorm1p_fp8_ref, layernorm1p_ref
    from kernels.rope_kv_cache import rope_kv_write, rope_kv_write_ref
    c = (MODELS | REDUCED)[model]
    hid, h, hk, d = c["hidden"], c["heads"], c["kv_heads"], c["head_dim"]
    w, b = torch.randn(hid, device=device, dtype=torch.bfloat16), torch.randn(hid, device=device, dtype=torch.bfloat16)
    rot = d // 2
    pos_table = torch.arange(4096, device=device, dtype=torch.float32)[:, None]
    inv = 1.0 / 10000 ** (torch.arange(0, rot, 2, device=device, dtype=torch.float32) / rot)
    cos, sin = (pos_table * inv).cos(), (pos_table * inv).sin()
    cases = []
    for t in t_values:
        x = torch.randn(t, hid, device=device, dtype=torch.bfloat16)
        cases.append(Case("layernorm1p", f"{model} T={t} H={hid}", 8.0 * t * hid, 4 * t * hid + 4 * hid, False,
                          {"triton": lambda x=x: layernorm1p(x, w, b, 1e-5),
                           "ref": lambda x=x: layernorm1p_ref(x, w, b, 1e-5),
                           "torch.layer_norm": lambda x=x: torch.nn.functional.layer_norm(x, (hid,), w + 1, b, 1e-5)}))
        cases.append(Case("layernorm1p_fp8", f"{model} T={t} H={hid}", 10.0 * t * hid, 3 * t * hid + 4 * hid, False,
                          {"triton": lambda x=x: layernorm1p_fp8(x, w, b, 1e-5),
                           "ref": lambda x=x: layernorm1p_fp8_ref(x, w, b, 1e-5)}))
        q = torch.randn(t, h, d, device=device, dtype=torch.bfloat16)
        k = torch.randn(t, hk, d, device=device, dtype=torch.bfloat16)
        v = torch.randn(t, hk, d, device=device, dtype=torch.bfloat16)
        k_cache, v_cache, _ = _paged_kv(1, t, hk, d, 16, torch.bfloat16, device)
        positions = torch.arange(t, device=device) % 4096
        slots = torch.randperm(k_cache.shape[0] * 16, device=device)[:t]
        args = (q, k, v, positions, cos, sin, k_cache, v_cache, slots)
        cases.append(Case("rope_kv_write", f"{model} T={t}", 6.0 * t * (h + hk) * rot,
                          2 * t * (2 * h * d + 4 * hk * d), False,
                          {"triton": lambda args=args: rope_kv_write(*args), "ref": lambda args=args: rope_kv_write_ref(*args)}))
    return cases


def build_cases(reduced: bool, device) -> list[Case]:
    if reduced:
        return (gemm_cases("tiny", [1, 17], device) + decode_cases("tiny", [2], 64, device)
                + prefill_cases("tiny", 2, 32, device) + mlp_cases("tiny", [1, 17], device)
                + norm_rope_cases("tiny", [1, 17], device))
    cases: list[Case] = []
    for model in MODELS:
        cases += gemm_cases(model, [1, 16, 64, 256, 1024, 4096, 8192], device)
        cases += decode_cases(model, [1, 16, 64], 4096, device)
        cases += prefill_cases(model, 1, 4096, device) + prefill_cases(model, 4, 1024, device)
        cases += mlp_cases(model, [1, 64, 1024, 8192], device)
        cases += norm_rope_cases(model, [1, 64, 8192], device)
    return cases


def run(cases: list[Case], iters: int, cuda: bool, roof) -> list[Row]:
    """Rows of each case in candidate order, then one row without timings per candidate that did not run."""
    rows = []
    for case in cases:
        timings, unavailable = {}, dict(case.unavailable)
        for impl, fn in case.candidates.items():
            try:
                timings[impl] = _time(fn, iters, cuda)
            except Exception as e:  # noqa: BLE001 — a _scaled_mm scale layout, a kernel that fails to compile: noted
                if cuda:
                    torch.cuda.synchronize()
                unavailable[impl] = _unavailable(e)
        baseline = next((name for name in case.baselines if name in timings), None)
        for impl, seconds in timings.items():
            notes = []
            if impl == baseline and baseline != case.baselines[0]:
                notes.append(f"baseline in place of {case.baselines[0]}, which did not run")
            rows.append(Row(case.kernel, case.shape, impl, seconds * 1e3, case.flops / seconds / 1e12,
                            case.bytes_moved / seconds / 1e9,
                            fraction(roof, seconds, case.flops, case.bytes_moved, case.fp8),
                            vs_baseline=timings[baseline] / seconds if baseline else None,
                            is_baseline=impl == baseline, notes=notes))
        rows += [Row(case.kernel, case.shape, impl, math.nan, math.nan, math.nan, math.nan, notes=[why])
                 for impl, why in unavailable.items()]
    return rows


_TORCH_SOURCE_SUFFIX = re.compile(r"\s*\(Triggered internally at [^)]*\)\.?$")


def _unavailable(e: Exception, warned: Sequence[str] = ()) -> str:
    """One line: the exception's first line, then what the warnings raised with it say.

    A pinned SDPA backend that refuses raises only "No available kernel"; the reasons come as warnings, one
    "<backend> kernel not used because:" header per backend followed by its reasons. The headers, and the other
    backends' "runtime disabled" (the pin's doing), are left out.
    """
    first = (str(e).strip().splitlines() or [""])[0]
    reasons = []
    for message in warned:
        line = _TORCH_SOURCE_SUFFIX.sub("", (message.strip().splitlines() or [""])[0])
        if line and not line.endswith("because:") and "runtime disabled" not in line and line not in reasons:
            reasons.append(line)
    note = f"unavailable: {type(e).__name__}: {first}" + (f" ({'; '.join(reasons)})" if reasons else "")
    return note if len(note) <= 240 else note[:237] + "..."


def _finite(row: dict) -> dict:
    """JSON has no NaN: an unavailable measurement is null."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def main(reduced: bool = False, only: str | None = None, iters: int | None = None, json_path: str | None = None):
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        reduced = True
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    name = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter: timings are not meaningful)"
    roof = for_device(name)
    cases = build_cases(reduced, device)
    if only:
        wanted = set(only.split(","))
        cases = [c for c in cases if c.kernel in wanted]
    rows = run(cases, iters or (40 if cuda else 2), cuda, roof)
    print(f"device: {name}; roofline: {roof.source}")
    iw = max([18] + [len(r.impl) for r in rows])
    print(f"{'kernel':22} {'shape':44} {'impl':{iw}} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8} {'roof':>6} {'x base':>7}")
    for r in rows:
        ratio = "   base" if r.is_baseline else f"{r.vs_baseline:7.2f}" if r.vs_baseline else "      -"
        print(f"{r.kernel:22} {r.shape:44} {r.impl:{iw}} {r.ms:9.4f} {r.tflops:8.2f} {r.gbps:8.1f} "
              f"{r.roofline_fraction:6.1%} {ratio}" + (f"  {'; '.join(r.notes)}" if r.notes else ""))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"device": name, "roofline": asdict(roof), "reduced": reduced,
                       "rows": [_finite(asdict(r)) for r in rows]}, f, indent=1)
    return rows
