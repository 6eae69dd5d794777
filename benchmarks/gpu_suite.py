"""The prepared GPU script: one run on a lent GPU (H200) checks the compiled kernels, times them, and times the
whole model with random weights; every figure lands in one JSON beside its roofline.

    python benchmarks/gpu_suite.py --output $OUT            # on the GPU machine (budget: under 8 minutes)
    python benchmarks/gpu_suite.py --smoke --output /tmp/x  # CPU: the same code path on a tiny preset

Steps, each under its own time limit so that one slow step cannot eat the device budget:
1. correctness: `pytest -m gpu tests/kernels` (compiled Triton vs the references on real shapes);
2. kernels: `n4 bench kernels` on the 15B and 340B-TP8 shapes;
3. model: the 15B preset with --load-format dummy in FP8 (weights and KV cache), decode tokens/s at batch 1/16/64/256, prefill tokens/s,
   and the time to first token of a 2k prompt, beside the decode roofline (weights read per step / HBM).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _write(path: str, report: dict) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


def step_correctness(timeout: int) -> dict:
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/kernels", "-p",
                           "no:cacheprovider"], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    tail = proc.stdout.strip().splitlines()[-15:]
    return {"returncode": proc.returncode, "summary": tail[-1] if tail else "", "tail": tail,
            "seconds": round(time.time() - start, 1)}


def step_kernels(reduced: bool, iters: int) -> dict:
    from benchmarks.kernels import _finite, main
    rows = main(reduced=reduced, iters=iters)
    return {"rows": [_finite(r.__dict__) for r in rows]}


def _decode_rate(engine, batch: int, prompt_len: int, new_tokens: int) -> dict:
    from server.engine.sampling import SamplingParams
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}", [(i * 7 + j) % 1000 + 10 for j in range(prompt_len)], params)
    # Prefill (all prompts) first, then time pure decode steps.
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.requests.values()):
        engine.step()
    _sync()
    start, steps = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    _sync()
    seconds = time.perf_counter() - start
    return {"batch": batch, "decode_steps": steps, "ms_per_step": round(1e3 * seconds / max(steps, 1), 3),
            "output_tokens_per_s": round(batch * steps / seconds, 1)}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_model(preset: str, batches: list[int], backend: str, dtype: str, prompt_len: int, new_tokens: int,
               ttft_len: int, quantization: str | None = None, kv_cache_dtype: str = "auto") -> dict:
    from benchmarks.roofline import for_device
    from model.config import PRESETS
    from server.engine.config import EngineConfig
    from server.engine.engine import LLMEngine
    from server.engine.sampling import SamplingParams

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = EngineConfig(max_model_len=4096, max_num_seqs=max(batches), max_num_batched_tokens=8192,
                          kernel_backend=backend, device=device, num_kv_blocks=None if device == "cuda" else 512,
                          kv_cache_dtype=kv_cache_dtype)
    engine = LLMEngine.from_pretrained(preset, config, dtype=dtype, load_format="dummy", quantization=quantization)
    result: dict = {"preset": preset, "dtype": dtype, "backend": backend, "quantization": quantization,
                    "kv_cache_dtype": kv_cache_dtype, "kv_blocks": engine.num_blocks,
                    "decode": [_decode_rate(engine, b, prompt_len, new_tokens) for b in batches]}
    # Prefill throughput and TTFT: one prompt of ttft_len tokens, max_tokens 1.
    engine.add_request("ttft", [(j % 1000) + 10 for j in range(ttft_len)], SamplingParams(max_tokens=1))
    _sync()
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    _sync()
    ttft = time.perf_counter() - start
    result["ttft"] = {"prompt_tokens": ttft_len, "seconds": round(ttft, 4),
                      "prefill_tokens_per_s": round(ttft_len / ttft, 1)}
    c = PRESETS.get(preset)
    if c is not None and device == "cuda":
        roof = for_device(torch.cuda.get_device_name())
        weight_bytes = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
        result["roofline"] = {"weight_bytes": weight_bytes,
                              "decode_ms_at_hbm_roofline": round(1e3 * weight_bytes / roof.hbm_bytes_per_s, 3),
                              "source": roof.source}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=os.environ.get("OUT", "."))
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run of the same code path")
    args = parser.parse_args()
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, "gpu_suite.json")
    cuda = torch.cuda.is_available()
    if not cuda:  # the smoke run interprets the Triton kernels; this must precede the first triton import
        os.environ.setdefault("TRITON_INTERPRET", "1")
    report: dict = {"date": time.strftime("%Y-%m-%d"), "host": platform.node(),
                    "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    try:
        import triton
        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    steps = [
        ("correctness", lambda: step_correctness(timeout=60 if args.smoke else 180)),
        ("kernels", lambda: step_kernels(reduced=args.smoke or not cuda, iters=2 if args.smoke else 20)),
        ("model_15b" if not args.smoke else "model_tiny",
         # The deployment configuration: FP8 weights (quantized at load), FP8 KV cache, Triton kernels.
         lambda: step_model("tiny" if args.smoke else "nemotron-4-15b", [1, 4] if args.smoke else [1, 16, 64, 256],
                            "torch" if args.smoke else "triton", "float32" if args.smoke else "bfloat16",
                            16 if args.smoke else 128, 4 if args.smoke else 64, 32 if args.smoke else 2048,
                            quantization="fp8", kv_cache_dtype="fp8")),
    ]
    for name, fn in steps:
        start = time.time()
        try:
            report[name] = fn()
        except Exception as e:  # noqa: BLE001 — record and go on: the other steps' figures still count
            report[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        report[name]["seconds"] = round(time.time() - start, 1)
        _write(path, report)
        print(f"[gpu_suite] {name}: {report[name].get('error', 'ok')} ({report[name]['seconds']} s)", flush=True)
    print(f"[gpu_suite] wrote {path}")


if __name__ == "__main__":
    main()
