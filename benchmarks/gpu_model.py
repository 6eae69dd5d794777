"""Whole-model timings for the GPU suite (benchmarks/gpu_suite.py), each beside its roofline.

- `model_run`: one engine with random weights (`load_format="dummy"`): decode tokens/s at several batch sizes
  (prefill first, then only decode steps are timed), prefill tokens/s of those batches, and the time to first
  token of one long prompt.
- `rank_slice_run`: one 340B tensor-parallel rank's shapes (12 query heads, 1 KV head, head_dim 192, an eighth of
  the MLP and of the vocabulary) at two layer counts on one GPU; the difference gives the time of one
  layer, which `n4 plan`'s model projects to 96 layers and adds the all-reduces that one GPU cannot run.

`emit(partial)` is called after every figure so that a step stopped at its time limit still reports what it had.
"""
from __future__ import annotations

import gc
import json
import os
import tempfile
import time
from typing import Callable

import torch

from benchmarks.plan import make_plan
from benchmarks.roofline import GPUS, for_device


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _prompt(engine, length: int, salt: int) -> list[int]:
    vocab = engine.model_config.vocab_size
    return [(salt * 7919 + j * 31) % (vocab - 10) + 10 for j in range(length)]


def decode_rate(engine, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """Prefill `batch` prompts, then time the decode steps alone (the batch stays full: ignore_eos)."""
    from server.engine.sampling import SamplingParams
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}", _prompt(engine, prompt_len, batch * 1000 + i), params)
    _sync()
    start = time.perf_counter()
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.requests.values()):
        engine.step()
    _sync()
    prefill_s = time.perf_counter() - start
    start, steps = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    _sync()
    seconds = time.perf_counter() - start
    return {"batch": batch, "prompt_len": prompt_len, "decode_steps": steps,
            "ms_per_step": round(1e3 * seconds / max(steps, 1), 3),
            "output_tokens_per_s": round(batch * steps / seconds, 1),
            "prefill_tokens": batch * prompt_len, "prefill_s": round(prefill_s, 4),
            "prefill_tokens_per_s": round(batch * prompt_len / prefill_s, 1)}


class _PhaseTimer:
    """Wall time of named engine phases, each bracketed by a device sync so a phase owns the GPU work it launched
    (the engine's steps are serial: the sampler reads its tokens back to the host every step)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            _sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync()
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        return timed


class _TimedSampler:
    """The runner's sampler behind a timer (a callable object: its __call__ cannot be patched on the instance)."""

    def __init__(self, sampler, timer: _PhaseTimer):
        self._sampler, self._call = sampler, timer.wrap("sample", sampler.__call__)

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._sampler, name)


def step_phases(engine, batch: int, prompt_len: int, steps: int) -> dict:
    """Where a decode step's time goes: ms per step in the scheduler, input preparation (host lists -> device
    tensors), the forward (CUDA graph replay or eager layers), lm_head, sampling, and the rest (scheduler update,
    outputs, engine bookkeeping), each phase bracketed by device syncs. Run after the timed decode, on its own
    requests: the syncs add a little to the total, which is reported beside the phases."""
    from server.engine.sampling import SamplingParams
    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"phases{batch}-{i}", _prompt(engine, prompt_len, 7000 + batch * 1000 + i), params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.requests.values()):
        engine.step()
    runner, timer = engine.runner, _PhaseTimer()
    patched = [(engine.scheduler, "schedule"), (runner, "_prepare_inputs"), (runner.model, "compute_logits"),
               (runner.model, "forward")] + ([(runner.graphs, "run")] if runner.graphs is not None else [])
    names = {"schedule": "schedule", "_prepare_inputs": "prepare_inputs", "compute_logits": "lm_head",
             "forward": "forward", "run": "forward"}
    sampler = runner.sampler
    for obj, attr in patched:
        setattr(obj, attr, timer.wrap(names[attr], getattr(obj, attr)))
    runner.sampler = _TimedSampler(sampler, timer)
    try:
        _sync()
        start, done = time.perf_counter(), 0
        while engine.has_unfinished_requests() and done < steps:
            engine.step()
            done += 1
        _sync()
        total = time.perf_counter() - start
    finally:
        for obj, attr in patched:
            delattr(obj, attr)                    # the instance attribute goes; the class's method is back
        runner.sampler = sampler
    while engine.has_unfinished_requests():
        engine.step()
    per_step = {name: round(1e3 * sec / max(done, 1), 4) for name, sec in timer.seconds.items()}
    per_step["other"] = round(1e3 * total / max(done, 1) - sum(per_step.values()), 4)
    return {"batch": batch, "steps": done, "ms_per_step_with_syncs": round(1e3 * total / max(done, 1), 4),
            "phases_ms": per_step}


def time_to_first_token(engine, prompt_len: int) -> dict:
    """One prompt, one output token; the second of two runs (the first compiles the prefill shapes)."""
    from server.engine.sampling import SamplingParams
    seconds = []
    for attempt in range(2):
        engine.add_request(f"ttft-{attempt}", _prompt(engine, prompt_len, 99 + attempt), SamplingParams(max_tokens=1))
        _sync()
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        _sync()
        seconds.append(time.perf_counter() - start)
    return {"prompt_tokens": prompt_len, "seconds": round(seconds[-1], 4), "first_run_seconds": round(seconds[0], 4),
            "prefill_tokens_per_s": round(prompt_len / seconds[-1], 1)}


def graph_replay_ms(graphs, batches: list[int], replays: int = 20) -> dict:
    """GPU time of the captured decode forward alone (all layers; lm_head and sampling run outside the graph): set
    against ms_per_step, the difference is lm_head, sampling and the engine's own Python."""
    out = {}
    for batch in batches:
        size = min(s for s in graphs.sizes if s >= batch)
        graph = graphs.graphs[size]
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        out[str(batch)] = round(start.elapsed_time(end) / replays, 4)
    return out


def lm_head_ms(model, batches: list[int]) -> dict:
    """compute_logits alone (the vocab GEMM outside the decode graph) per batch size, median ms."""
    import triton.testing
    hidden = model.config.hidden_size
    dtype = getattr(torch, model.config.torch_dtype)
    out = {}
    for batch in batches:
        x = torch.randn(batch, hidden, device="cuda", dtype=dtype)
        with torch.inference_mode():
            out[str(batch)] = round(triton.testing.do_bench(lambda x=x: model.compute_logits(x), warmup=5, rep=20,
                                                            return_mode="median"), 4)
    return out


def _engine(model: str, batches: list[int], backend: str, dtype: str, device: str, kv_cache_dtype: str,
            max_model_len: int, max_num_batched_tokens: int, num_kv_blocks: int | None = None):
    from server.engine.config import EngineConfig
    from server.engine.engine import LLMEngine
    config = EngineConfig(max_model_len=max_model_len, max_num_seqs=max(batches),
                          max_num_batched_tokens=max_num_batched_tokens, kernel_backend=backend, device=device,
                          num_kv_blocks=num_kv_blocks or (None if device == "cuda" else 512),
                          kv_cache_dtype=kv_cache_dtype)
    start = time.perf_counter()
    engine = LLMEngine.from_pretrained(model, config, dtype=dtype, load_format="dummy", quantization="fp8")
    _sync()
    return engine, round(time.perf_counter() - start, 1)


def _roofline_for(plan_model: str, tp: int, kv_cache_dtype: str, max_model_len: int,
                  context: int | None = None) -> tuple[dict, object]:
    gpu_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "NVIDIA H200"
    roof = for_device(gpu_name)
    gpu_key = next(k for k, v in GPUS.items() if v is roof)
    plan = make_plan(plan_model, tp=tp, gpu=gpu_key, kv_cache_dtype="fp8" if kv_cache_dtype == "fp8" else "auto",
                     max_model_len=max_model_len, context=context or max_model_len // 2,
                     prompt_len=min(2048, max_model_len))
    return plan, roof


def _decode_roofline(row: dict, plan: dict, roof, new_tokens: int) -> dict:
    """Bytes one decode step must read (weights without the embedding, plus the batch's KV) over the measured copy
    bandwidth: the fastest step HBM allows."""
    context = row["prompt_len"] + new_tokens / 2                      # mean context over the timed steps
    step_bytes = plan["memory"]["decode_read_bytes"] + row["batch"] * context * plan["kv"]["bytes_per_token"]
    ideal_ms = 1e3 * step_bytes / roof.hbm_bytes_per_s
    return {"bytes_per_step": int(step_bytes), "ideal_ms": round(ideal_ms, 3),
            "fraction_of_hbm_roofline": round(ideal_ms / row["ms_per_step"], 3)}


def model_run(preset: str, batches: list[int], backend: str, dtype: str, prompt_len: int, new_tokens: int,
              ttft_len: int, kv_cache_dtype: str, emit: Callable[[dict], None], plan_model: str | None = None) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    max_model_len = 4096
    engine, build_s = _engine(preset, batches, backend, dtype, device, kv_cache_dtype, max_model_len, 8192)
    result: dict = {"preset": preset, "dtype": dtype, "backend": backend, "quantization": "fp8",
                    "kv_cache_dtype": kv_cache_dtype, "kv_blocks": engine.num_blocks, "engine_build_s": build_s,
                    "cuda_graphs": engine.runner.graphs is not None, "decode": []}
    plan = roof = None
    if plan_model is not None:
        plan, roof = _roofline_for(plan_model, 1, kv_cache_dtype, max_model_len)
        result["roofline"] = {"source": roof.source, "hbm_bytes_per_s": roof.hbm_bytes_per_s,
                              "fp8_flops": roof.fp8_flops, "decode_read_bytes": plan["memory"]["decode_read_bytes"]}
    emit(result)
    for batch in batches:
        row = decode_rate(engine, batch, prompt_len, new_tokens)
        if plan is not None:
            row["roofline"] = _decode_roofline(row, plan, roof, new_tokens)
        result["decode"].append(row)
        emit(result)
    if engine.runner.graphs is not None:
        try:
            result["graph_replay_ms"] = graph_replay_ms(engine.runner.graphs, batches)
            result["lm_head_ms"] = lm_head_ms(engine.runner.model, batches)
        except Exception as e:  # noqa: BLE001 — a diagnostic: its failure must not cost the TTFT below
            result["graph_replay_ms"] = {"error": f"{type(e).__name__}: {e}"[:500]}
        emit(result)
    try:
        result["step_phases"] = [step_phases(engine, b, prompt_len, 16) for b in (batches[0], batches[-1])]
    except Exception as e:  # noqa: BLE001 — a diagnostic: its failure must not cost the TTFT below
        result["step_phases"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    emit(result)
    result["ttft"] = time_to_first_token(engine, ttft_len)
    if plan is not None:
        # FLOPs of the prompt (linear layers, causal attention, one lm_head row) over the FP8 dense peak.
        arch = plan["architecture"]
        linear = arch["layer_params_total"]
        per_pair = 4 * arch["num_attention_heads"] * arch["head_dim"] * arch["num_hidden_layers"]  # QK^T and PV
        attn = per_pair * ttft_len * (ttft_len + 1) / 2                                           # causal
        flops = 2 * linear * ttft_len + attn + 2 * arch["vocab_size"] * arch["hidden_size"]
        result["ttft"]["flops"] = flops
        result["ttft"]["fraction_of_fp8_peak"] = round(flops / result["ttft"]["seconds"] / roof.fp8_flops, 3)
    emit(result)
    return result


def _rank_slice_dir(layers: int, tp: int = 8, smoke: bool = False) -> str:
    """A config.json with one tensor-parallel rank's shapes of the 340B model and `layers` layers."""
    from model.config import PRESETS
    full = PRESETS["tiny-340b-layout" if smoke else "nemotron-4-340b"]
    rank = full.with_(num_hidden_layers=layers, num_attention_heads=full.num_attention_heads // tp,
                      num_key_value_heads=max(full.num_key_value_heads // tp, 1),
                      intermediate_size=full.intermediate_size // tp, vocab_size=-(-full.vocab_size // tp),
                      torch_dtype="float32" if smoke else "bfloat16")
    path = tempfile.mkdtemp(prefix=f"n4-rank-slice-{layers}-")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(rank.to_hf(), f)
    return path


def rank_slice_run(layer_counts: tuple[int, int], batches: list[int], backend: str, dtype: str, prompt_len: int,
                   new_tokens: int, kv_cache_dtype: str, emit: Callable[[dict], None], smoke: bool = False) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict = {"what": "one TP=8 rank of nemotron-4-340b (12/1 heads, head_dim 192, MLP/8, vocab/8), "
                            "timed on one GPU at two layer counts", "layer_counts": list(layer_counts),
                    "runs": {}}
    for layers in layer_counts:
        # A KV pool for just this run (not 90% of the GPU), so the second engine has room beside the first's
        # CUDA-graph memory even if that is not returned.
        blocks = max(2 * max(batches) * -(-(prompt_len + new_tokens) // 16), 4096 // 16) + 64
        engine, build_s = _engine(_rank_slice_dir(layers, smoke=smoke), batches, backend, dtype, device,
                                  kv_cache_dtype, 4096, 8192, num_kv_blocks=blocks)
        result["runs"][str(layers)] = {"engine_build_s": build_s,
                                       "decode": [decode_rate(engine, b, prompt_len, new_tokens) for b in batches]}
        emit(result)
        engine.close()
        del engine
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    low, high = (result["runs"][str(n)]["decode"] for n in layer_counts)
    # The smoke run projects its tiny layers with the 340B plan too: meaningless figures, but the same code path.
    plan, _ = _roofline_for("nemotron-4-340b", 8, kv_cache_dtype, 4096, context=prompt_len + new_tokens // 2)
    plan_decode = {d["batch"]: d for d in plan["decode"]}
    projection = []
    for a, b in zip(low, high):
        per_layer = (b["ms_per_step"] - a["ms_per_step"]) / (layer_counts[1] - layer_counts[0])
        fixed = a["ms_per_step"] - layer_counts[0] * per_layer         # embedding, lm_head, sampling, launch
        row = {"batch": a["batch"], "ms_per_layer": round(per_layer, 4), "ms_outside_layers": round(fixed, 3),
               "ms_96_layers_no_collectives": round(fixed + 96 * per_layer, 3)}
        if a["batch"] in plan_decode:
            p = plan_decode[a["batch"]]
            # n4 plan's all-reduces at this batch (NVLink ceiling + assumed latency), which one GPU cannot time.
            step = fixed + 96 * per_layer + 1e3 * p["collective_s"]
            row.update({"collective_ms_from_plan": round(1e3 * p["collective_s"], 3),
                        "projected_ms_per_step": round(step, 3),
                        "projected_tokens_per_s": round(a["batch"] / step * 1e3, 1),
                        "plan_roofline_ms_per_step": round(1e3 * p["step_s"], 3), "plan_context": p["context"],
                        "fraction_of_plan_roofline": round(1e3 * p["step_s"] / step, 3)})
        projection.append(row)
    result["projection"] = projection
    emit(result)
    return result
