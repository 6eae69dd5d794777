"""benchmarks/gpu_report.py renders a suite JSON (here the first H200 run, committed under benchmarks/results/)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.gpu_report import main, render

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def test_renders_the_committed_h200_run():
    report = json.loads((RESULTS / "gpu-suite-h200-2026-11-28-run1.json").read_text())
    text = render(report)
    assert "NVIDIA H200" in text and "Triton 3.6.0" in text
    # One row per decode batch, with the measured step time and its fraction of the HBM roofline.
    for row in report["model_15b"]["decode"]:
        assert f"| {row['batch']} | {row['ms_per_step']:.2f} |" in text
    assert "| fp8_gemm | 15b qkv M=1 N=8192 K=6144 |" in text and "torch._scaled_mm" in text
    assert "Compiled-kernel tests: 9 failed, 62 passed" in text


def test_a_failed_step_shows_its_error():
    text = render({"device": "x", "model_15b": {"error": "stopped at its 110 s limit", "decode": []}})
    assert "Step error: stopped at its 110 s limit" in text


def test_unreadable_json_is_a_one_line_error(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{")
    with pytest.raises(SystemExit) as e:
        main([str(bad)])
    assert "cannot read" in str(e.value)


def test_kernel_table_uses_the_marked_baseline():
    """Rows that mark their baseline (is_baseline) are compared with it, whatever the order of the built-ins."""
    row = {"kernel": "prefill_attention", "shape": "15b 1x4096 bf16", "roofline_fraction": 0.3}
    rows = [dict(row, impl="triton", ms=0.67, vs_baseline=0.9),
            dict(row, impl="sdpa", ms=0.37),
            dict(row, impl="sdpa_flash", ms=0.60, is_baseline=True)]
    text = render({"device": "x", "kernels": {"rows": rows}})
    assert "| prefill_attention | 15b 1x4096 bf16 | 0.6700 | sdpa_flash | 0.6000 | 0.90 |" in text


def test_step_phases_table():
    phases = {"schedule": 0.05, "prepare_inputs": 0.2, "forward": 5.9, "lm_head": 0.7, "sample": 0.3, "other": 0.1}
    text = render({"device": "x", "model_15b": {"decode": [], "step_phases": [
        {"batch": 1, "steps": 16, "ms_per_step_with_syncs": 7.25, "phases_ms": phases}]}})
    assert "| 1 | 0.050 | 0.200 | 5.900 | 0.700 | 0.300 | 0.100 | 7.250 |" in text


def test_decode_variants_table():
    """FP8 V as words against per byte (each its best tile), the head padded, and the forced split counts."""
    def row(ms, **config):
        return {"config": {"block_n": 32, "num_warps": 4, "num_stages": 2, "v_words": None, "num_splits": None,
                           **config}, "correct": True, "ms": ms}
    fp8 = {"kernel": "decode_attention", "shape": "340b-tp8 B=64 ctx=4096 kv=fp8", "default_ms": 0.08,
           "configs": [row(0.08), row(0.07, num_warps=8), row(0.10, v_words=False), row(0.12, v_words=False,
                                                                                        num_warps=8),
                       row(0.06, num_splits=8), row(0.09, num_splits=2), row(0.05, split_head=False),
                       {"config": {"block_n": 64, "v_words": False}, "correct": False, "ms": 0.01}]}
    bf16 = {"kernel": "decode_attention", "shape": "15b B=64 ctx=4096 kv=bf16", "default_ms": 0.25,
            "configs": [row(0.25)]}
    text = render({"device": "x", "sweep": {"cases": [fp8, bf16]}})
    assert ("| 340b-tp8 B=64 ctx=4096 kv=fp8 | 0.0800 | 0.0700 | 0.1000 | 1.43 | 0.0500 | 2: 0.0900, 8: 0.0600 |"
            in text)
    assert "| 15b B=64 ctx=4096 kv=bf16 | 0.2500 | - | - | - | - | - |" in text
