"""`n4 bench kernels` in its reduced (CPU, interpreter) mode: every kernel case runs ours, the reference and the
torch built-ins where they exist, pinned per backend; a built-in that refuses a case is dropped with a note and does
not stop the run; the prefill baseline falls back from SDPA's flash backend to its default dispatch."""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from benchmarks import kernels
from benchmarks.kernels import Case, main, run
from benchmarks.roofline import for_device


def _by_impl(rows, kernel: str) -> dict:
    return {r.impl: r for r in rows if r.kernel == kernel}


def test_reduced_bench_runs_every_implementation(tmp_path):
    out = tmp_path / "kernels.json"
    rows = main(reduced=True, only="fp8_gemm,decode_attention,prefill_attention,layernorm1p", iters=1,
                json_path=str(out))
    impls = {(r.kernel, r.impl) for r in rows}
    assert {("fp8_gemm", "triton"), ("fp8_gemm", "ref"), ("fp8_gemm", "torch._scaled_mm"),
            ("decode_attention", "triton"), ("decode_attention", "sdpa"), ("decode_attention", "sdpa_flash"),
            ("prefill_attention", "triton"), ("prefill_attention", "sdpa"), ("prefill_attention", "sdpa_flash"),
            ("prefill_attention", "sdpa_cudnn"), ("prefill_attention", "sdpa_efficient"),
            ("layernorm1p", "triton")} <= impls
    # Every row is either timed or says why not.
    for r in rows:
        assert (math.isfinite(r.ms) and r.ms > 0) != bool(r.notes and r.notes[0].startswith("unavailable")), r
    # One baseline per case, with the ratio of the others to it.
    for case in {(r.kernel, r.shape) for r in rows}:
        case_rows = [r for r in rows if (r.kernel, r.shape) == case]
        (base,) = [r for r in case_rows if r.is_baseline]
        for r in case_rows:
            if math.isfinite(r.ms):
                assert r.vs_baseline == pytest.approx(base.ms / r.ms)
    gemm = [r for r in rows if r.kernel == "fp8_gemm" and r.is_baseline]
    assert gemm and all(r.impl == "torch._scaled_mm" for r in gemm)
    assert {r.impl for r in rows if r.kernel == "decode_attention" and r.is_baseline} == {"sdpa", "ref"}
    if not torch.cuda.is_available():
        # torch's CPU build: flash (and math) take GQA, cuDNN is a CUDA library, and so is memory-efficient attention.
        prefill = _by_impl(rows, "prefill_attention")
        assert prefill["sdpa_flash"].is_baseline and not prefill["sdpa_flash"].notes
        assert math.isnan(prefill["sdpa_cudnn"].ms) and "unavailable: RuntimeError" in prefill["sdpa_cudnn"].notes[0]
        # _scaled_mm takes use_fast_accum on the CPU too.
        assert all(math.isfinite(r.ms) for r in rows if r.impl == "torch._scaled_mm fast_accum")
        assert len([r for r in rows if r.impl == "torch._scaled_mm fast_accum"]) == len(gemm)
    data = json.loads(out.read_text())
    assert data["reduced"] is True and len(data["rows"]) == len(rows)
    assert {"tflops", "gbps", "roofline_fraction", "vs_baseline", "is_baseline", "notes"} <= set(data["rows"][0])
    dropped = [row for row in data["rows"] if row["notes"] and row["ms"] is None]
    assert all(row["tflops"] is None and row["vs_baseline"] is None for row in dropped)


def _refuse_flash(monkeypatch):
    """SDPA that refuses whenever it is pinned to the flash backend alone, as a build without FlashAttention does:
    warnings shaped like torch's (a header, the reason, another backend's "runtime disabled"), then "No available
    kernel" over two lines. Otherwise torch's own."""
    real = torch.nn.functional.scaled_dot_product_attention

    def sdpa(*args, **kwargs):
        if torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.math_sdp_enabled():
            warnings.warn("Flash attention kernel not used because:")
            warnings.warn("Torch was not compiled with flash attention. (Triggered internally at sdp_utils.cpp:1.)")
            warnings.warn("Memory Efficient attention has been runtime disabled.")
            raise RuntimeError("No available kernel. Aborting execution.\nsecond line of the message")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)


def test_refused_flash_is_dropped_with_a_note_and_the_baseline_falls_back(monkeypatch):
    _refuse_flash(monkeypatch)
    rows = main(reduced=True, only="prefill_attention,decode_attention", iters=1)
    prefill = [r for r in rows if r.kernel == "prefill_attention" and r.shape.endswith(" bf16")]
    timed = [math.isfinite(r.ms) for r in prefill]
    assert timed == sorted(timed, reverse=True)   # the rows without timings come after the timed ones
    by_impl = {r.impl: r for r in prefill}
    flash = by_impl["sdpa_flash"]
    assert math.isnan(flash.ms) and flash.vs_baseline is None and not flash.is_baseline
    (note,) = flash.notes
    assert note == ("unavailable: RuntimeError: No available kernel. Aborting execution. "
                    "(Torch was not compiled with flash attention.)")
    assert by_impl["sdpa"].is_baseline and by_impl["sdpa"].vs_baseline == pytest.approx(1.0)
    assert by_impl["sdpa"].notes == ["baseline in place of sdpa_flash, which did not run"]
    assert by_impl["triton"].vs_baseline == pytest.approx(by_impl["sdpa"].ms / by_impl["triton"].ms)
    # Decode keeps the default dispatch as its baseline, so losing flash there changes no ratio.
    decode = _by_impl(rows, "decode_attention")
    assert decode["sdpa"].is_baseline and not decode["sdpa"].notes
    assert math.isnan(decode["sdpa_flash"].ms) and decode["sdpa_flash"].notes[0].startswith("unavailable")


def test_fp8_cache_prefill_is_timed_against_the_same_kernel_over_bf16():
    rows = main(reduced=True, only="prefill_attention", iters=1)
    fp8 = {r.impl: r for r in rows if r.kernel == "prefill_attention" and r.shape.endswith(" kv=fp8")}
    assert set(fp8) == {"triton", "ref", "triton kv=bf16"}
    assert fp8["triton kv=bf16"].is_baseline and all(math.isfinite(r.ms) for r in fp8.values())
    assert fp8["triton"].vs_baseline == pytest.approx(fp8["triton kv=bf16"].ms / fp8["triton"].ms)


def test_pinned_backend_does_not_leak_into_the_next_call(monkeypatch):
    """The pin is entered inside each call: the default-dispatch candidate, called after a pinned one, still
    runs under the default flags."""
    _refuse_flash(monkeypatch)
    q = torch.randn(1, 2, 4, 8)
    kernels._sdpa(q, q, q, kernels.SDPA_BACKENDS["sdpa_cudnn"])   # building a call enters nothing
    assert torch.backends.cuda.math_sdp_enabled()
    with pytest.raises(RuntimeError, match="No available kernel"), pytest.warns(UserWarning):
        kernels._sdpa(q, q, q, kernels.SDPA_BACKENDS["sdpa_flash"])()
    assert torch.backends.cuda.math_sdp_enabled() and torch.backends.cuda.cudnn_sdp_enabled()
    kernels._sdpa(q, q, q)()


def test_a_candidate_that_fails_when_timed_is_noted_and_the_next_baseline_serves():
    def fails():
        raise ValueError("scale layout not supported\nmore detail")

    case = Case("k", "s", 1e6, 1e6, False, {"ours": lambda: None, "fast": fails, "slow": lambda: sum(range(50_000))},
                baselines=("fast", "slow"), unavailable={"probed": "unavailable: RuntimeError: refused"})
    rows = run([case], iters=3, cuda=False, roof=for_device("cpu"))
    assert [r.impl for r in rows] == ["ours", "slow", "probed", "fast"]
    ours, slow, probed, fast = rows
    assert slow.is_baseline and slow.notes == ["baseline in place of fast, which did not run"]
    assert ours.vs_baseline == pytest.approx(slow.ms / ours.ms) and ours.vs_baseline > 1
    assert fast.notes == ["unavailable: ValueError: scale layout not supported"] and math.isnan(fast.ms)
    assert probed.notes == ["unavailable: RuntimeError: refused"]


def test_no_baseline_that_runs_leaves_the_ratios_empty():
    case = Case("k", "s", 1.0, 1.0, False, {"ours": lambda: None}, baselines=("missing",))
    (row,) = run([case], iters=1, cuda=False, roof=for_device("cpu"))
    assert row.vs_baseline is None and not row.is_baseline and row.notes == []


def test_a_long_refusal_is_one_line_of_bounded_length():
    note = kernels._unavailable(RuntimeError("x" * 500 + "\nsecond"), ["reason " * 80])
    assert "\n" not in note and len(note) == 240 and note.endswith("...")


def test_sweep_prefill_baseline_pins_flash_and_falls_back_once(monkeypatch):
    """benchmarks/gpu_sweep.py's prefill baseline: SDPA pinned to flash; where flash refuses, the default dispatch,
    with one warning, and no second attempt (later calls run inside a CUDA-graph capture)."""
    from benchmarks.gpu_sweep import _prefill_case
    x = _prefill_case("tiny", 1, 32).make(torch.device("cpu"))
    flags = []
    real = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        flags.append((torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    _prefill_case("tiny", 1, 32).baseline(x)
    assert flags == [(True, False)]   # flash alone

    _refuse_flash(monkeypatch)
    case = _prefill_case("tiny", 1, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = case.baseline(x)
    said = [str(w.message) for w in caught if "FlashAttention refused" in str(w.message)]
    assert said == [("prefill tiny 1x32: FlashAttention refused (No available kernel. Aborting execution.); "
                     "the baseline is SDPA's default dispatch")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the refusal is not tried, nor reported, again
        assert torch.equal(case.baseline(x), out)
