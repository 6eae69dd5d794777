"""Markdown tables from a GPU suite JSON (benchmarks/gpu_suite.py), for benchmarks/README.md and closing notes.

    python benchmarks/gpu_report.py benchmarks/results/gpu-suite-h200-2026-11-28.json
"""
from __future__ import annotations

import argparse
import json
import sys


def _f(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def model_table(model: dict) -> list[str]:
    lines = ["| batch | ms / step | output tok/s | HBM roofline ms | of roofline | decode graph alone ms "
             "| lm_head ms |", "|---|---|---|---|---|---|---|"]
    graph, head = model.get("graph_replay_ms", {}), model.get("lm_head_ms", {})
    for row in model.get("decode", []):
        roof = row.get("roofline", {})
        b = str(row["batch"])
        lines.append(f"| {b} | {row['ms_per_step']:.2f} | {row['output_tokens_per_s']:.0f} | "
                     f"{_f(roof.get('ideal_ms'), 2)} | {_f(roof.get('fraction_of_hbm_roofline'), 2)} | "
                     f"{_f(graph.get(b) if isinstance(graph, dict) else None, 2)} | "
                     f"{_f(head.get(b) if isinstance(head, dict) else None, 2)} |")
    phases = model.get("step_phases")
    if isinstance(phases, list) and phases:
        names = ["schedule", "prepare_inputs", "forward", "lm_head", "sample", "other"]
        lines += ["", "Where a decode step goes (ms, each phase between device syncs):", "",
                  "| batch | " + " | ".join(names) + " | total with syncs |", "|---" * (len(names) + 2) + "|"]
        for p in phases:
            lines.append(f"| {p['batch']} | " + " | ".join(_f(p["phases_ms"].get(n), 3) for n in names)
                         + f" | {_f(p.get('ms_per_step_with_syncs'), 3)} |")
    elif isinstance(phases, dict) and "error" in phases:
        lines += ["", f"Step phases: {phases['error']}"]
    ttft = model.get("ttft")
    if ttft:
        lines.append("")
        lines.append(f"Time to first token, {ttft['prompt_tokens']}-token prompt: {1e3 * ttft['seconds']:.1f} ms "
                     f"({ttft['prefill_tokens_per_s']:.0f} tok/s, {_f(ttft.get('fraction_of_fp8_peak'), 2)} of the "
                     f"FP8 dense peak).")
    return lines


def kernel_table(kernels: dict) -> list[str]:
    """Ours against the case's baseline (torch._scaled_mm, SDPA, the unfused ops, or the reference)."""
    rows: dict[tuple[str, str], dict] = {}
    for r in kernels.get("rows", []):
        rows.setdefault((r["kernel"], r["shape"]), {})[r["impl"]] = r
    lines = ["| kernel | shape | ours ms | baseline | baseline ms | ours / baseline speed | of roofline |",
             "|---|---|---|---|---|---|---|"]
    for (kernel, shape), impls in rows.items():
        ours = impls.get("triton")
        if ours is None:
            continue
        # Rows since 2026-11-28 (session 6) name their baseline; older runs had it first among torch's built-ins.
        marked = [name for name, r in impls.items() if r.get("is_baseline")]
        others = [name for name in impls if name not in ("triton", "ref")]
        base = marked[0] if marked else others[0] if others else "ref"
        b = impls[base]
        lines.append(f"| {kernel} | {shape} | {_f(ours['ms'], 4)} | {base} | {_f(b['ms'], 4)} | "
                     f"{_f(ours.get('vs_baseline'), 2)} | {_f(ours.get('roofline_fraction'), 2)} |")
    return lines


def slice_table(rank: dict) -> list[str]:
    lines = ["| batch | ms / layer | ms outside layers | projected ms / step (96 layers + all-reduces) | tok/s | "
             "plan roofline ms | of roofline |", "|---|---|---|---|---|---|---|"]
    for p in rank.get("projection", []):
        lines.append(f"| {p['batch']} | {p['ms_per_layer']:.3f} | {p['ms_outside_layers']:.2f} | "
                     f"{_f(p.get('projected_ms_per_step'), 1)} | {_f(p.get('projected_tokens_per_s'), 0)} | "
                     f"{_f(p.get('plan_roofline_ms_per_step'), 1)} | {_f(p.get('fraction_of_plan_roofline'), 2)} |")
    return lines


def sweep_table(sweep: dict) -> list[str]:
    lines = ["| kernel | shape | default ms | best ms | best / default speed | best config | baseline ms |",
             "|---|---|---|---|---|---|---|"]
    for case in sweep.get("cases", []):
        best = case.get("best", {})
        lines.append(f"| {case['kernel']} | {case['shape']} | {_f(case.get('default_ms'), 4)} | "
                     f"{_f(best.get('ms'), 4)} | {_f(case.get('best_vs_default'), 2)} | "
                     f"{json.dumps(best.get('config'), separators=(',', ':')) if best else '-'} | "
                     f"{_f(case.get('baseline_ms'), 4)} |")
    return lines


def decode_variants_table(sweep: dict) -> list[str]:
    """Decode attention's questions for the next table: FP8 V as words vs per byte (the best tile of each), a head
    of 192 in two parts vs one padded to 256, and the context split count (forced counts against the auto rule)."""
    lines = ["| shape | default ms | best, V as words | best, V per byte | words vs bytes speed | best, head padded "
             "| forced splits: ms |", "|---|---|---|---|---|---|---|"]
    for case in sweep.get("cases", []):
        if case["kernel"] != "decode_attention":
            continue
        timed = [c for c in case["configs"] if c.get("correct") and c.get("ms")]
        tiles = [c for c in timed if (c["config"] or {}).get("num_splits") is None]
        split = [c for c in tiles if (c["config"] or {}).get("split_head") is not False]
        words = min((c["ms"] for c in split if (c["config"] or {}).get("v_words") is not False), default=None)
        bytewise = min((c["ms"] for c in split if (c["config"] or {}).get("v_words") is False), default=None)
        padded = min((c["ms"] for c in tiles if (c["config"] or {}).get("split_head") is False), default=None)
        splits = sorted((c["config"]["num_splits"], c["ms"]) for c in timed
                        if (c["config"] or {}).get("num_splits") is not None)
        fp8 = "kv=fp8" in case["shape"]
        lines.append(f"| {case['shape']} | {_f(case.get('default_ms'), 4)} | {_f(words, 4) if fp8 else '-'} | "
                     f"{_f(bytewise, 4) if fp8 else '-'} | "
                     f"{_f(bytewise / words, 2) if fp8 and words and bytewise else '-'} | "
                     f"{_f(padded, 4) if padded else '-'} | {', '.join(f'{n}: {ms:.4f}' for n, ms in splits) or '-'} |")
    return lines


def render(report: dict) -> str:
    out = [f"GPU: {report.get('device')} ({report.get('nvidia_smi', '')}); torch {report.get('torch')}, "
           f"Triton {report.get('triton')}, CUDA {report.get('cuda')}; {report.get('date')}.", ""]
    for step, title, table in (("model_15b", "Nemotron-4 15B, FP8 weights and KV cache", model_table),
                               ("rank_slice_340b", "Nemotron-4 340B, one TP=8 rank projected", slice_table),
                               ("kernels", "Kernels", kernel_table), ("sweep", "Launch-config sweep", sweep_table),
                               ("sweep_tma", "Launch-config sweep: TMA variants", sweep_table)):
        if step not in report:
            continue
        out.append(f"#### {title}")
        out.append("")
        if "error" in report[step]:
            out.append(f"Step error: {report[step]['error']}")
            out.append("")
        out += table(report[step])
        out.append("")
        if step == "sweep" and any(c["kernel"] == "decode_attention" for c in report[step].get("cases", [])):
            out += ["#### Decode attention: FP8 V as words or bytes, the head in parts or padded, split counts", ""]
            out += decode_variants_table(report[step]) + [""]
    if "correctness" in report:
        c = report["correctness"]
        out.append(f"Compiled-kernel tests: {c.get('summary')}" + (f"; failed: {', '.join(c['failed'])}"
                                                                  if c.get("failed") else ""))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="gpu_suite.json")
    args = parser.parse_args(argv)
    try:
        with open(args.json) as f:
            report = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"gpu_report: cannot read {args.json}: {e}")
    print(render(report))


if __name__ == "__main__":
    main()
