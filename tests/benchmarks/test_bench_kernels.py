"""`n4 bench kernels` in its reduced (CPU, interpreter) mode: every kernel case runs ours, the reference and the
torch built-in where one exists, and the JSON rows carry the figures the GPU report needs."""
from __future__ import annotations

import json
import math

from benchmarks.kernels import main


def test_reduced_bench_runs_every_implementation(tmp_path):
    out = tmp_path / "kernels.json"
    rows = main(reduced=True, only="fp8_gemm,decode_attention,layernorm1p", iters=1, json_path=str(out))
    impls = {(r.kernel, r.impl) for r in rows}
    assert {("fp8_gemm", "triton"), ("fp8_gemm", "ref"), ("fp8_gemm", "torch._scaled_mm"),
            ("decode_attention", "triton"), ("decode_attention", "sdpa"), ("layernorm1p", "triton")} <= impls
    assert all(math.isfinite(r.ms) and r.ms > 0 for r in rows if not r.notes)
    data = json.loads(out.read_text())
    assert data["reduced"] is True and len(data["rows"]) == len(rows)
    assert {"tflops", "gbps", "roofline_fraction", "vs_baseline"} <= set(data["rows"][0])
