"""The prepared GPU script: one run on a lent GPU (H200) checks the compiled kernels, times them, and times the
whole model with random weights; every figure lands in one JSON beside its roofline.

    python benchmarks/gpu_suite.py --output $OUT            # on the GPU machine (default budget: 360 s of steps)
    python benchmarks/gpu_suite.py --smoke --output /tmp/x  # CPU: the same code path on tiny shapes
    python benchmarks/gpu_suite.py --output $OUT --steps model_15b,rank_slice_340b   # a rerun of some steps

Each step runs in its own process under its own time limit, so a slow step, a hang or a CUDA fault cannot eat the
device budget or the other steps' figures; a step stopped at its limit keeps the figures it had written. The
JSON is rewritten after every step, and each step's log lands beside it.
1. correctness: `pytest -m gpu tests/kernels` and the experiments' GPU tests (compiled Triton vs the references on
   the real shapes), spread over 8 processes (pytest-xdist), which also fills Triton's compile cache for the later
   steps;
2. kernels: `n4 bench kernels` on the 15B and 340B-TP8 shapes;
3. model_15b: the 15B preset in FP8 (weights quantized at load, FP8 KV cache, Triton kernels, CUDA graphs):
   decode tokens/s at batch 1/16/64/256 beside the HBM roofline, prefill tokens/s, the TTFT of a 2k prompt;
4. rank_slice_340b: one 340B TP=8 rank's layers timed on this GPU and projected to a step through `n4 plan`.
5. sweep (only when named in --steps): launch-config alternatives of each kernel (benchmarks/gpu_sweep.py);
6. sweep_tma (only when named): the persistent TMA GEMM variants, in a process of their own because they had never
   run on a GPU when they were written (a fault there costs only them).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Seconds per step on the GPU; the default steps' limits sum to the default budget (360 s). The H200 runs of
# 2026-11-28 took 31-37 s, 34-49 s, 22-25 s and 13-17 s for them, and 193 s for a sweep of 1412 configs (it now has
# 1816, ~250 s at that rate; the TMA step 198): raise a step's share from such figures, never the sum past what
# leaves room for a second try.
GPU_LIMITS = {"correctness": 90, "kernels": 100, "model_15b": 110, "rank_slice_340b": 60, "sweep": 300,
              "sweep_tma": 150}
SMOKE_LIMITS = {"correctness": 120, "kernels": 120, "model_15b": 120, "rank_slice_340b": 120, "sweep": 120,
                "sweep_tma": 150}


def _write(path: str, report: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(path + ".tmp", path)


# ---- the steps (each runs in a child process: `gpu_suite.py --run-step NAME --step-json PATH`) --------------

def step_correctness(smoke: bool, emit) -> dict:
    # A module that fails to import (say, under another Triton) costs its own tests, not the whole run.
    # The experiments' GPU tests too (benchmarks/fp8_gemm_tma.py): the sweep_tma step relies on them.
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-m", "gpu", "tests/kernels",
           "tests/benchmarks/test_fp8_gemm_tma.py", "-p", "no:cacheprovider", "--continue-on-collection-errors"]
    try:
        import xdist  # noqa: F401 — on the GPU machine: compile in 8 processes at once
        if not smoke:
            cmd += ["-n", "8"]
    except ImportError:
        pass
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    print(proc.stdout[-20000:], proc.stderr[-5000:], sep="\n")
    tail = proc.stdout.strip().splitlines()[-15:]
    failed = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    # pytest's 5 is "no tests ran": the smoke run's CPU skips every gpu test.
    return {"returncode": proc.returncode, "summary": tail[-1] if tail else "", "failed": failed[:50],
            "tail": tail, "seconds": round(time.time() - start, 1)}


def step_kernels(smoke: bool, emit) -> dict:
    import torch

    from benchmarks.kernels import _finite, build_cases, run
    from benchmarks.roofline import for_device
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    roof = for_device(torch.cuda.get_device_name() if cuda else "cpu")
    result: dict = {"roofline_source": roof.source, "rows": []}
    for case in build_cases(reduced=smoke, device=torch.device("cuda" if cuda else "cpu")):
        rows = run([case], 2 if smoke else 40, cuda, roof)
        result["rows"] += [_finite(r.__dict__) for r in rows]
        print(*(f"{r.kernel} {r.shape} {r.impl}: {r.ms:.4f} ms {r.roofline_fraction:.1%} {r.notes}" for r in rows),
              sep="\n", flush=True)
        emit(result)
    return result


def step_model(smoke: bool, emit) -> dict:
    from benchmarks.gpu_model import model_run
    if smoke:
        # plan_model: the 15B roofline beside tiny figures is meaningless, but it runs the same code.
        return model_run("tiny", [1, 4], "torch", "float32", 16, 4, 32, "fp8", emit, plan_model="nemotron-4-15b")
    return model_run("nemotron-4-15b", [1, 16, 64, 256], "triton", "bfloat16", 128, 64, 2048, "fp8", emit,
                     plan_model="nemotron-4-15b")


def step_rank_slice(smoke: bool, emit) -> dict:
    from benchmarks.gpu_model import rank_slice_run
    if smoke:
        return rank_slice_run((1, 2), [1, 2], "torch", "float32", 8, 4, "fp8", emit, smoke=True)
    return rank_slice_run((2, 6), [1, 16, 64], "triton", "bfloat16", 128, 32, "fp8", emit)


_TMA_KERNELS = frozenset({"fp8_gemm_tma", "mlp_up_fp8_tma", "prefill_attention_tma"})


def step_sweep(smoke: bool, emit) -> dict:
    if smoke:
        os.environ["N4_SWEEP_SMOKE"] = "1"
    from benchmarks.gpu_sweep import run_sweep
    return run_sweep(emit, workers=2 if smoke else None, skip_kernels=_TMA_KERNELS)


def step_sweep_tma(smoke: bool, emit) -> dict:
    if smoke:
        os.environ["N4_SWEEP_SMOKE"] = "1"
    from benchmarks.gpu_sweep import run_sweep
    return run_sweep(emit, workers=2 if smoke else None, kernels=set(_TMA_KERNELS))


STEPS = {"correctness": step_correctness, "kernels": step_kernels, "model_15b": step_model,
         "rank_slice_340b": step_rank_slice, "sweep": step_sweep, "sweep_tma": step_sweep_tma}
# The sweep (benchmarks/gpu_sweep.py) is for re-tuning the kernels' tables: asked for by name, not run by default.
DEFAULT_STEPS = ("correctness", "kernels", "model_15b", "rank_slice_340b")


def run_step(name: str, smoke: bool, step_json: str) -> None:
    def emit(partial: dict) -> None:
        _write(step_json, partial)
    emit(STEPS[name](smoke, emit))


# ---- the parent --------------------------------------------------------------------------------------------

def _environment(cuda: bool) -> dict:
    import torch
    env = {"date": time.strftime("%Y-%m-%d"), "host": platform.node(), "python": platform.python_version(),
           "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name() if cuda else "cpu"}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if cuda:
        try:
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            env["nvidia_smi"] = f"unavailable: {e}"
    return env


def _run_child(name: str, smoke: bool, limit: float, output: str) -> dict:
    step_json = os.path.join(tempfile.mkdtemp(prefix="n4-gpu-suite-"), f"{name}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--run-step", name, "--step-json", step_json]
    cmd += ["--smoke"] if smoke else []
    start = time.time()
    with open(os.path.join(output, f"{name}.log"), "w") as log:
        # A new session, so that a time-out stops the step's own children (pytest workers) too.
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            code = proc.wait(timeout=limit)
            error = None if code == 0 else f"exited with {code} (see {name}.log)"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            error = f"stopped at its {limit:.0f} s limit (figures so far kept; see {name}.log)"
    result: dict = {}
    if os.path.exists(step_json):
        with open(step_json) as f:
            result = json.load(f)
    if error:
        last = _last_error(output, name)
        result["error"] = error + (f": {last}" if last else "")
    result["seconds"] = round(time.time() - start, 1)
    return result


def _last_error(output: str, name: str) -> str:
    """The last line of the step's log that names an exception, for the JSON's summary."""
    try:
        with open(os.path.join(output, f"{name}.log"), errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    hits = [line for line in lines if "Error" in line or "error:" in line]
    return hits[-1][:500] if hits else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=os.environ.get("OUT", "."))
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run of the same code path")
    parser.add_argument("--steps", default=",".join(DEFAULT_STEPS),
                        help=f"comma-separated steps out of {', '.join(STEPS)} (default: {', '.join(DEFAULT_STEPS)})")
    parser.add_argument("--scale-limits", type=float, default=1.0, help="multiply every step's time limit")
    parser.add_argument("--run-step", choices=list(STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--step-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch
    cuda = torch.cuda.is_available()
    if not cuda:  # the smoke run interprets the Triton kernels; this must precede the first triton import
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.run_step:
        run_step(args.run_step, args.smoke, args.step_json)
        return
    steps = [s for s in args.steps.split(",") if s]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        parser.error(f"unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, "gpu_suite.json")
    report: dict = _environment(cuda)
    limits = SMOKE_LIMITS if args.smoke or not cuda else GPU_LIMITS
    report["limits_s"] = {s: limits[s] * args.scale_limits for s in steps}
    _write(path, report)
    for name in steps:
        report[name] = _run_child(name, args.smoke or not cuda, limits[name] * args.scale_limits, args.output)
        _write(path, report)
        print(f"[gpu_suite] {name}: {report[name].get('error', 'ok')} ({report[name]['seconds']} s)", flush=True)
    print(f"[gpu_suite] wrote {path}")


if __name__ == "__main__":
    main()
