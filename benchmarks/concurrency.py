"""Continuous batching pays: the same requests sent one at a time vs all at once, against one `n4 serve`.

Starts `n4 serve` on the embedded demo model (or --model), sends N completion requests sequentially, then
the same N concurrently, and reports output tokens/s of each and their ratio, measured in one run.

    .venv/bin/python benchmarks/concurrency.py [--num-requests 16] [--max-tokens 64] [--json out.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time

import httpx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "n4.cli", "serve", "--port", str(port), "--served-model-name", "bench",
           "--log-level", "warning"]
    if model:
        cmd += ["--model", model]
    proc = subprocess.Popen(cmd, cwd=REPO)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("n4 serve exited before becoming healthy")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("n4 serve did not become healthy")


def make_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 4000) for _ in range(rng.randint(16, 128))] for _ in range(n)]


async def one(client: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> int:
    r = await client.post("/v1/completions", json={"model": "bench", "prompt": prompt, "max_tokens": max_tokens,
                                                   "temperature": 0, "ignore_eos": True})
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"]


async def measure(base: str, prompts: list[list[int]], max_tokens: int, concurrent: bool) -> dict:
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        await one(client, prompts[0], 4)  # warm-up
        start = time.perf_counter()
        if concurrent:
            tokens = sum(await asyncio.gather(*(one(client, p, max_tokens) for p in prompts)))
        else:
            tokens = 0
            for p in prompts:
                tokens += await one(client, p, max_tokens)
        elapsed = time.perf_counter() - start
    return {"output_tokens": tokens, "seconds": round(elapsed, 3), "output_tokens_per_s": round(tokens / elapsed, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint dir (default: the embedded demo model)")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    port = _free_port()
    proc = start_server(args.model, port)
    try:
        base = f"http://127.0.0.1:{port}"
        prompts = make_prompts(args.num_requests)
        sequential = asyncio.run(measure(base, prompts, args.max_tokens, concurrent=False))
        concurrent = asyncio.run(measure(base, prompts, args.max_tokens, concurrent=True))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    result = {
        "benchmark": "concurrency", "model": args.model or "models/demo", "num_requests": args.num_requests,
        "max_tokens": args.max_tokens, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "sequential": sequential, "concurrent": concurrent,
        "speedup": round(concurrent["output_tokens_per_s"] / sequential["output_tokens_per_s"], 2),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
