"""Every Triton kernel specialization the public wrappers launch on the real model shapes compiles for sm_90.

No GPU needed: the wrappers run under TRITON_INTERPRET=1 with their launches captured (tests/kernels/
launch_capture.py), each launch becomes a compile job with Triton's launch-time specialization (dtypes, int args
divisible by 16, ints equal to 1, 16-byte aligned pointers), and the deduplicated jobs are compiled for sm_90 by
the wheel's ptxas. Checked: it compiles, fits the 227 KiB of shared memory a CTA can use on H100/H200, and spills
nothing to local memory (kernels listed in SPILL_TOLERATED only report their spills).

Shapes: Nemotron-4 15B (hidden 6144, 48 / 8 heads, head_dim 128, ffn 24576) and one 340B TP=8 rank (hidden 18432,
12 / 1 heads, head_dim 192, ffn 9216 a rank); BF16 and FP8 KV caches, block size 16 (and 32, as the GPU tests);
decode batches 1..256 at contexts up to 4096; prefill of 4096 tokens, 4 x 1024, chunked prefill over a cached
prefix; GEMM M from 1 to 8192, as benchmarks/kernels.py, benchmarks/gpu_suite.py, the model and the GPU tests
call them.

The default run compiles one job per distinct kernel configuration (see `representative`), which covers every tile
shape, dtype and structural variant; N4_AOT_FULL=1 compiles every distinct launch specialization (also the
int-divisibility and ==1 variants). N4_AOT_TRITON_PATH=/path/to/site-packages compiles with another Triton (the GPU
machine's 3.6.0 installed with `pip install --no-deps --target`). N4_AOT_REPORT=path writes every job and result
as JSON.
"""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

from tests.kernels.launch_capture import (
    SM90_SHARED_BYTES,
    aot_compile_sm90,
    capture_launches,
    dedupe_jobs,
    launch_to_job,
)

FP8 = torch.float8_e4m3fn
BF16 = torch.bfloat16

MODELS = {  # per GPU: 15B whole, 340B one TP=8 rank
    "15b": {"hidden": 6144, "heads": 48, "kv_heads": 8, "head_dim": 128, "inter": 24576},
    "340b-tp8": {"hidden": 18432, "heads": 12, "kv_heads": 1, "head_dim": 192, "inter": 9216},
}
GEMM_M = [1, 7, 16, 17, 64, 100, 256, 1000, 1024, 4096, 8192]
NORM_T = [1, 7, 64, 256, 4096, 8192]
DECODE = [(1, 1), (1, 4096), (16, 300), (16, 4096), (64, 1000), (64, 4096), (256, 2048), (256, 4096)]
# (cached prefix, new tokens) per sequence: one 4096 prompt, 4 x 1024, chunked prefill over cached prefixes,
# a mixed batch with decode rows (what the engine sends when prefill and decode share a step).
PREFILL = [[(0, 4096)], [(0, 1024)] * 4, [(3072, 1024)], [(2048, 333), (4000, 96)],
           [(0, 1), (0, 1024), (3072, 1024), (4000, 96), (0, 4096), (517, 1), (2048, 333)], [(0, 17)]]

# Kernels allowed to use local memory (only reported): none so far.
SPILL_TOLERATED: set[str] = set()


def _e(shape, dtype):
    return torch.empty(shape, dtype=dtype)


def _fp8_scales(n):
    return torch.full((n,), 0.01)


def _paged(seq_tokens: list[int], kv_heads: int, head_dim: int, block: int, dtype, table_pad: int = 0):
    """A [2, NB, BS, Hkv, D] cache just big enough for the sequences, and int32 block tables [B, MB]."""
    per_seq = [-(-n // block) for n in seq_tokens]
    nb = max(sum(per_seq), 1)
    kv = torch.zeros(2, nb, block, kv_heads, head_dim, dtype=dtype)
    width = max(per_seq) + table_pad
    tables = torch.zeros(len(seq_tokens), width, dtype=torch.int32)
    used = 0
    for b, n in enumerate(per_seq):
        tables[b, :n] = torch.arange(used, used + n, dtype=torch.int32)
        used += n
    return kv[0], kv[1], tables


# ------------------------------------------------------------------------------------------------ drivers

def drive_gemm(cap):
    from kernels.fp8_gemm import fp8_gemm
    for model, c in MODELS.items():
        h, d = c["hidden"], c["head_dim"]
        projections = {"qkv": ((c["heads"] + 2 * c["kv_heads"]) * d, h), "o": (h, c["heads"] * d),
                       "up": (c["inter"], h), "down": (h, c["inter"])}
        for proj, (n, k) in projections.items():
            b = _e((n, k), FP8)
            for m in GEMM_M:
                a = _e((m, k), FP8)
                for a_name, sa in [("token", torch.full((m,), 0.01)), ("tensor", torch.tensor(0.01)),
                                   ("token_col", torch.full((m, 1), 0.01))]:
                    for b_name, sb in [("channel", torch.full((n, 1), 0.01)), ("tensor", torch.tensor(0.01))]:
                        for out_dtype in (BF16,):
                            cap.label = f"fp8_gemm {model} {proj} M={m} a={a_name} b={b_name}"
                            fp8_gemm(a, b, sa, sb, out_dtype)
                if proj == "down":  # the fused MLP's down projection takes group scales
                    cap.label = f"fp8_gemm {model} {proj} M={m} a=group"
                    fp8_gemm(a, b, torch.full((m, -(-k // 128)), 0.01), torch.full((n, 1), 0.01), BF16)


def drive_quant(cap):
    from kernels.fp8_quant import quantize_fp8_per_tensor, quantize_fp8_per_token
    ks = sorted({c["hidden"] for c in MODELS.values()} | {c["inter"] for c in MODELS.values()}
                | {c["heads"] * c["head_dim"] for c in MODELS.values()})
    for k in ks:
        for m in [1, 7, 16, 64, 512, 4096, 8192]:
            x = torch.zeros(m, k, dtype=BF16)
            cap.label = f"quant per_token M={m} K={k}"
            quantize_fp8_per_token(x)
            cap.label = f"quant per_tensor static M={m} K={k}"
            quantize_fp8_per_tensor(x, torch.tensor([0.05]))
            if m <= 64:  # the dynamic path's amax runs in torch: keep it cheap
                cap.label = f"quant per_tensor dynamic M={m} K={k}"
                quantize_fp8_per_tensor(x)


def drive_mlp(cap):
    from kernels.mlp import squared_relu_mlp, squared_relu_mlp_fp8
    for model, c in MODELS.items():
        h, i = c["hidden"], c["inter"]
        up8, down8 = _e((i, h), FP8), _e((h, i), FP8)
        up16, down16 = _e((i, h), BF16), _e((h, i), BF16)
        for m in [1, 7, 16, 17, 64, 100, 256, 512, 1024, 4096, 8192]:
            x8 = _e((m, h), FP8)
            for xs_name, xs in [("token", torch.full((m,), 0.01)), ("tensor", torch.tensor(0.01))]:
                for ws_name, ws, ds in [("channel", torch.full((i, 1), 0.01), torch.full((h, 1), 0.01)),
                                        ("tensor", torch.tensor(0.01), torch.tensor(0.01))]:
                    cap.label = f"mlp_fp8 {model} M={m} x={xs_name} w={ws_name}"
                    squared_relu_mlp_fp8(x8, xs, up8, ws, down8, ds, BF16)
            cap.label = f"mlp_bf16 {model} M={m}"
            squared_relu_mlp(_e((m, h), BF16), up16, down16)


def drive_layernorm(cap):
    from kernels.layernorm import layernorm1p, layernorm1p_fp8
    for h in sorted({c["hidden"] for c in MODELS.values()}):
        for dtype in (BF16, torch.float16, torch.float32):  # GPU tests: bf16, fp16 (18432), fp32 (6144)
            w, b = torch.zeros(h, dtype=dtype), torch.zeros(h, dtype=dtype)
            for t in NORM_T:
                x = torch.zeros(t, h, dtype=dtype)
                cap.label = f"layernorm1p H={h} T={t} {str(dtype)[6:]}"
                layernorm1p(x, w, b, 1e-5)
                cap.label = f"layernorm1p_fp8 H={h} T={t} {str(dtype)[6:]}"
                layernorm1p_fp8(x, w, b, 1e-5)


def drive_rope(cap):
    from kernels.rope_kv_cache import rope_kv_write
    cases = [(c["heads"], c["kv_heads"], c["head_dim"]) for c in MODELS.values()] + [(96, 8, 192)]  # GPU test
    for hq, hkv, d in cases:
        rot = d // 2
        cos = torch.zeros(4096, rot // 2)
        for block in (16, 32):
            for cache_dtype in (BF16, FP8):
                for t in [1, 16, 64, 256, 2048, 4096]:
                    qkv = _e((t, (hq + 2 * hkv) * d), BF16)  # q/k/v are views of the fused projection
                    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
                    kv = torch.zeros(2, t // block + 2, block, hkv, d, dtype=cache_dtype)
                    for idx in (torch.int64, torch.int32):
                        pos = torch.zeros(t, dtype=idx)
                        slots = torch.arange(t, dtype=idx)
                        cap.label = f"rope H={hq}/{hkv} D={d} BS={block} T={t} {str(cache_dtype)[6:]} {idx}"
                        rope_kv_write(q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d), pos, cos, cos,
                                      kv[0], kv[1], slots, 0.05, 0.02)


def drive_decode(cap):
    from kernels.decode_attention import paged_decode_attention
    for model, c in MODELS.items():
        hq, hkv, d = c["heads"], c["kv_heads"], c["head_dim"]
        for cache_dtype in (BF16, FP8):
            scales = {"k_scale": 0.05, "v_scale": 0.03} if cache_dtype == FP8 else {}
            for batch, ctx in DECODE:
                # A short batch over a long table (ragged contexts) and a table padded to the engine's 256 columns.
                seqs = [ctx] + [1] * (batch - 1)
                for pad in (0, 256 - -(-ctx // 16)) if ctx < 4096 else (0,):
                    k_cache, v_cache, tables = _paged(seqs, hkv, d, 16, cache_dtype, pad)
                    q = _e((batch, hq, d), BF16)
                    seq_lens = torch.tensor(seqs, dtype=torch.int32)
                    for splits in (None, 1, 7):
                        cap.label = f"decode {model} B={batch} ctx={ctx} pad={pad} {str(cache_dtype)[6:]} s={splits}"
                        paged_decode_attention(q, k_cache, v_cache, seq_lens, tables, ctx, d ** -0.5,
                                               num_splits=splits, **scales)


def drive_prefill(cap):
    from kernels.paged_attention import paged_prefill_attention
    for model, c in MODELS.items():
        hq, hkv, d = c["heads"], c["kv_heads"], c["head_dim"]
        for cache_dtype in (BF16, FP8):
            scales = {"k_scale": 0.25, "v_scale": 0.125} if cache_dtype == FP8 else {}
            for block in (16, 32):
                for seqs in PREFILL:
                    k_cache, v_cache, tables = _paged([a + n for a, n in seqs], hkv, d, block, cache_dtype)
                    t = sum(n for _, n in seqs)
                    q = _e((t, hq, d), BF16)
                    qsl = torch.tensor([0] + [n for _, n in seqs]).cumsum(0).to(torch.int32)
                    seq_lens = torch.tensor([a + n for a, n in seqs], dtype=torch.int32)
                    cap.label = f"prefill {model} {seqs[:3]}{'...' if len(seqs) > 3 else ''} BS={block} " \
                                f"{str(cache_dtype)[6:]}"
                    paged_prefill_attention(q, k_cache, v_cache, qsl, seq_lens, tables,
                                            max(n for _, n in seqs), max(a + n for a, n in seqs), d ** -0.5,
                                            **scales)


DRIVERS = [drive_gemm, drive_quant, drive_mlp, drive_layernorm, drive_rope, drive_decode, drive_prefill]


def collect_jobs() -> list[dict]:
    """Run every driver under capture -> deduplicated compile jobs."""
    with capture_launches() as cap:
        for drive in DRIVERS:
            drive(cap)
    return dedupe_jobs([launch_to_job(launch) for launch in cap.launches])


# Epilogue-only scale-mode flags: variants that differ only in these are left to the full run.
_EPILOGUE_FLAGS = {"B_PER_CHANNEL", "X_PER_TOKEN", "W_PER_CHANNEL"}


def representative(jobs: list[dict]) -> list[dict]:
    """One job per kernel configuration (kernel, pointer dtypes, declared constexprs but the epilogue scale flags,
    warps, stages, options): every tile shape, dtype and structural variant, without the variants that differ only
    in int divisibility, ==1 specialization or which scales the epilogue multiplies."""
    picked: dict[str, dict] = {}
    for job in jobs:
        ce = {k: v for k, v in job["constexprs"].items()
              if k[0].isupper() and k not in _EPILOGUE_FLAGS}  # declared constexprs are upper case
        ptrs = {n: t for n, t in job["types"].items() if t.startswith("*")}
        key = json.dumps([job["module"], job["kernel"], ce, ptrs, job["num_warps"], job["num_stages"],
                          job["options"]], sort_keys=True)
        picked.setdefault(key, job)
    return list(picked.values())


def _summary(job, res) -> str:
    if "error" in res:
        return f"{job['kernel']}: ERROR {res['error'][:300]}"
    return (f"{job['kernel']:34} shared {res['shared']:6d} local {res['local']:4d} regs {res['regs']:3d} "
            f"wgmma {int(res['wgmma'])}  warps {job['num_warps']} stages {job['num_stages']}  {job['label'][:90]}")


def test_launches_compile_for_sm90():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the launch capture runs under the Triton interpreter (CPU CI)")
    start = time.time()
    jobs = collect_jobs()
    captured_s = time.time() - start
    full = os.environ.get("N4_AOT_FULL") == "1"
    chosen = jobs if full else representative(jobs)
    kernels = {j["kernel"] for j in jobs}
    assert {"_fp8_gemm_kernel", "_quantize_fp8_per_token_kernel", "_quantize_fp8_per_tensor_kernel",
            "_up_squared_relu_kernel", "_up_squared_relu_fp8_kernel", "_layernorm1p_kernel",
            "_layernorm1p_fp8_kernel", "_rope_kv_write_kernel", "_paged_decode_attention_kernel",
            "_decode_reduce_kernel", "_paged_prefill_attention_kernel"} <= kernels, kernels
    results = aot_compile_sm90(chosen, raise_on_error=False)
    report = os.environ.get("N4_AOT_REPORT")
    if report:
        with open(report, "w") as f:
            json.dump({"captured_s": captured_s, "total_s": time.time() - start, "jobs_all": len(jobs),
                       "results": [dict(job, result=res) for job, res in zip(chosen, results)]}, f, indent=1)
    print(f"\n{len(jobs)} distinct launch specializations, {len(chosen)} compiled "
          f"(capture {captured_s:.1f} s, total {time.time() - start:.1f} s)")
    for job, res in zip(chosen, results):
        print(_summary(job, res))
    failures = [_summary(j, r) for j, r in zip(chosen, results) if "error" in r]
    assert not failures, "\n".join(failures)
    over = [_summary(j, r) for j, r in zip(chosen, results) if r["shared"] > SM90_SHARED_BYTES]
    assert not over, "shared memory over the sm_90 limit:\n" + "\n".join(over)
    spills = [_summary(j, r) for j, r in zip(chosen, results) if r["local"] and j["kernel"] not in SPILL_TOLERATED]
    assert not spills, "local memory (spills):\n" + "\n".join(spills)
    # Decode over an FP8 cache reads V as words converted in registers (kernels/decode_attention.py): no byte-wide
    # shared-memory loads, and V reaches the P @ V dot through transposing ldmatrix as a BF16 V does.
    fp8_decode = [(j, r) for j, r in zip(chosen, results)
                  if j["kernel"] == "_paged_decode_attention_kernel" and j["types"]["v_ptr"] == "*fp8e4nv"]
    assert fp8_decode and all(j["constexprs"]["V_WORDS"] for j, _ in fp8_decode)
    bytewise = [_summary(j, r) for j, r in fp8_decode
                if r["sass_ops"].get("LDS.U8") or not any(op.startswith("LDSM.16.MT88") for op in r["sass_ops"])]
    assert not bytewise, "FP8 decode reads V bytewise from shared memory:\n" + "\n".join(bytewise)
    # Prefill over an FP8 cache with bf16 q runs its dots in fp16: E4M3 -> fp16 in one step, no second F2F to bf16
    # per value (the 15B loop body: 523 -> 417 SASS instructions).
    fp8_prefill = [(j, r) for j, r in zip(chosen, results) if j["kernel"] == "_paged_prefill_attention_kernel"
                   and j["types"]["k_ptr"] == "*fp8e4nv" and j["types"]["q_ptr"] == "*bf16"]
    assert fp8_prefill and all(j["constexprs"]["FP16_DOTS"] for j, _ in fp8_prefill)
    two_step = [_summary(j, r) for j, r in fp8_prefill if r["sass_ops"].get("F2F.BF16.F16")]
    assert not two_step, "FP8 prefill converts E4M3 to bf16 through fp16:\n" + "\n".join(two_step)
    # Attention loops of 3+ stages keep a tile's K/V copies in flight while a tile is computed (cp.async.wait_group
    # N > 0). When the block numbers were loaded beside the K/V gathers they address, every wait drained all copies
    # (wait_group 0 only) whatever num_stages said (kernels/triton_utils.py: tile_blocks).
    attention = [(j, r) for j, r in zip(chosen, results)
                 if j["kernel"] in ("_paged_prefill_attention_kernel", "_paged_decode_attention_kernel")
                 and j["num_stages"] >= 3]
    assert {j["kernel"] for j, _ in attention} == {"_paged_prefill_attention_kernel", "_paged_decode_attention_kernel"}
    drained = [_summary(j, r) for j, r in attention if max(r["cp_async_waits"], default=0) == 0]
    assert not drained, "attention loops that wait for every tile's own loads:\n" + "\n".join(drained)


def test_capture_restores_the_interpreter():
    """After a capture, wrappers run their kernels again, in the interpreter's own mode (a leak here once broke
    every later interpreted test of the BF16 MLP)."""
    import kernels.mlp as mlp
    from kernels import triton_utils
    from tests.kernels.launch_capture import capture_launches
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    up, down = torch.randn(128, 64, dtype=torch.bfloat16) * 0.1, torch.randn(64, 128, dtype=torch.bfloat16) * 0.1
    with capture_launches() as cap:
        mlp.squared_relu_mlp(x, up, down)
    assert len(cap.launches) == 1
    assert mlp.interpreting is triton_utils.interpreting and mlp.interpreting()
    torch.testing.assert_close(mlp.squared_relu_mlp(x, up, down), mlp.squared_relu_mlp_ref(x, up, down),
                               atol=2e-2, rtol=2e-2)
