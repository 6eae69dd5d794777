"""The prepared GPU script's code path, run in its CPU smoke mode: every step completes and the JSON holds the
figures (so the few minutes of a lent GPU are not lost to a bug in the script)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_gpu_suite_smoke(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--smoke", "--output", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    for step in ("correctness", "kernels", "model_15b", "rank_slice_340b"):
        assert "error" not in report[step], report[step]
    assert report["kernels"]["rows"]
    decode = report["model_15b"]["decode"]
    assert [d["batch"] for d in decode] == [1, 4] and all(d["output_tokens_per_s"] > 0 for d in decode)
    assert report["model_15b"]["ttft"]["prompt_tokens"] == 32
    assert report["model_15b"]["preset"] == "tiny"   # the smoke run's stand-in for the 15B preset
    phases = report["model_15b"]["step_phases"]
    assert [p["batch"] for p in phases] == [1, 4] and all(p["phases_ms"]["forward"] > 0 for p in phases)
    projection = report["rank_slice_340b"]["projection"]
    assert [p["batch"] for p in projection] == [1, 2] and all("ms_per_layer" in p for p in projection)
    for step in ("correctness", "kernels", "model_15b", "rank_slice_340b"):
        assert (tmp_path / f"{step}.log").exists()


@pytest.mark.slow
def test_gpu_suite_sweep_smoke(tmp_path):
    """The sweep step on tiny shapes: every config is timed, checked against the default config's output and the
    best is reported."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--smoke", "--steps", "sweep,sweep_tma",
                           "--output", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sweep = json.loads((tmp_path / "gpu_suite.json").read_text())["sweep"]
    assert "error" not in sweep, sweep
    kernels = {case["kernel"] for case in sweep["cases"]}
    assert kernels == {"fp8_gemm", "fp8_gemm_grouped_a", "fp8_gemv_experimental", "mlp_up_fp8", "decode_attention",
                       "prefill_attention"}
    # The TMA variants run in a step (a process) of their own.
    tma = json.loads((tmp_path / "gpu_suite.json").read_text())["sweep_tma"]
    assert [case["kernel"] for case in tma["cases"]] == ["fp8_gemm_tma", "mlp_up_fp8_tma", "prefill_attention_tma"]
    for case in sweep["cases"] + tma["cases"]:
        assert case["default_ms"] > 0 and case["configs"]
        assert all(c["correct"] and c["ms"] > 0 for c in case["configs"]), case
        assert case["best"] in case["configs"]


def test_gpu_suite_rejects_unknown_steps(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--steps", "kernels,bogus",
                           "--output", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown step(s) bogus" in proc.stderr
