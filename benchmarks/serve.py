"""`n4 bench serve`: an online load generator for any OpenAI-compatible server (n4, vLLM, ...).

Streaming requests (asyncio + httpx) at a Poisson --request-rate or under a --max-concurrency cap, and per request
TTFT (first content chunk), ITL (gaps between content chunks), TPOT ((e2e - ttft) / (output tokens - 1)) and
end-to-end latency; token counts come from the stream's usage chunk (`stream_options.include_usage`). Aggregated:
mean/p50/p90/p99 of each, requests/s, output and total tokens/s, and goodput under --slo (requests meeting every
SLO, per second). A failed request (an HTTP error, an error event, a broken or malformed stream, or, as in vLLM's
client, a stream without a single choices chunk) is counted and its error kept; it never stops the run.

    n4 bench serve --base-url http://127.0.0.1:8000 --num-prompts 100 --request-rate 4 --json out.json
    n4 bench serve --base-url http://127.0.0.1:8000 --max-concurrency --sweep 1,4,16 --plot lat.png

Python API (other scripts drive n4 and vLLM with the same client through it): `run_benchmark`,
`make_random_prompts`, `compute_metrics`; `main(args)` is the CLI.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import platform
import random
import time
from dataclasses import dataclass, field

from benchmarks.plot import write_plot
from benchmarks.datasets import load_sharegpt, make_random_prompts

__all__ = ["add_arguments", "compute_metrics", "main", "make_random_prompts", "parse_slo", "percentile",
           "run_benchmark", "write_plot"]

SLO_KEYS = ("ttft_ms", "tpot_ms", "e2e_ms")
PROBE_TOKENS = 2
MAX_ERROR_KINDS = 10


@dataclass
class RequestResult:
    ok: bool = False
    error: str | None = None
    start_s: float = 0.0                 # when it was sent, from the benchmark's start
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None     # from the usage chunk; None when the server sent none
    output_tokens: int = 0               # from the usage chunk, else the number of content chunks

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


# ---- arithmetic ---------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation between ranks (numpy's default); None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    return {"mean": round(sum(values) / len(values), 4), "p50": round(percentile(values, 50), 4),
            "p90": round(percentile(values, 90), 4), "p99": round(percentile(values, 99), 4)}


def _meets_slo(r: RequestResult, slo: dict) -> bool:
    measured = {"ttft_ms": r.ttft_s, "tpot_ms": r.tpot_s or 0.0, "e2e_ms": r.e2e_s}  # one token: no TPOT to miss
    return r.ok and all(measured[k] * 1000 <= limit for k, limit in slo.items())


def compute_metrics(results: list[RequestResult], duration_s: float, slo: dict | None = None) -> dict:
    """Aggregates over the completed requests; failures are counted (and their errors tallied), not averaged."""
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok and (r.error in errors or len(errors) < MAX_ERROR_KINDS):
            errors[r.error] = errors.get(r.error, 0) + 1
    input_tokens = sum(r.prompt_tokens or 0 for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    good = sum(_meets_slo(r, slo) for r in ok) if slo else None
    per_s = (lambda n: round(n / duration_s, 4)) if duration_s > 0 else (lambda n: None)
    return {
        "completed": len(ok), "failed": len(results) - len(ok), "errors": errors,
        "duration_s": round(duration_s, 4),
        "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "usage_missing": sum(r.prompt_tokens is None for r in ok),
        "request_throughput": per_s(len(ok)), "output_throughput": per_s(output_tokens),
        "total_token_throughput": per_s(input_tokens + output_tokens),
        "good_requests": good, "request_goodput": per_s(good) if slo else None,
        "ttft_ms": _stats([r.ttft_s * 1000 for r in ok]),
        "tpot_ms": _stats([r.tpot_s * 1000 for r in ok if r.tpot_s is not None]),
        "itl_ms": _stats([g * 1000 for r in ok for g in r.itl_s]),
        "e2e_ms": _stats([r.e2e_s * 1000 for r in ok]),
    }


def parse_slo(text: str | None) -> dict | None:
    """"ttft_ms=500,tpot_ms=50" -> {"ttft_ms": 500.0, "tpot_ms": 50.0}."""
    if not text:
        return None
    slo = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"--slo takes KEY=MS pairs with keys {', '.join(SLO_KEYS)}, got {item!r}")
        try:
            slo[key] = float(value)
        except ValueError:
            raise ValueError(f"--slo {key}: {value!r} is not a number") from None
        if not slo[key] > 0:
            raise ValueError(f"--slo {key} must be positive, got {value}")
    return slo


# ---- requests -----------------------------------------------------------------------------------------------
def _payload(endpoint: str, model: str, prompt: str, output_len: int, extras: bool) -> dict:
    body = {"model": model, "max_tokens": output_len, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    if endpoint.endswith("/chat/completions"):
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if extras:  # vLLM's (and n4's) extras: exactly output_len tokens, so runs compare like for like
        body.update(ignore_eos=True, min_tokens=output_len)
    return body


def _content(chunk: dict) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    delta = choice.get("delta") or {}
    return choice.get("text") or delta.get("content") or delta.get("reasoning_content") or ""


def _error_message(status: int, body: bytes) -> str:
    text = body.decode("utf-8", "replace")
    try:
        err = json.loads(text)
        err = err.get("error", err.get("detail", err)) if isinstance(err, dict) else err
        text = err.get("message", json.dumps(err)) if isinstance(err, dict) else str(err)
    except ValueError:
        pass
    return f"HTTP {status}: {text[:200]}"


async def _request(client, url: str, payload: dict, t0: float) -> RequestResult:
    start = time.perf_counter()
    r = RequestResult(start_s=start - t0)
    last, chunks, usage, any_choice = None, 0, None, False
    # Any exception fails this request only, never the run: vLLM's request functions catch every Exception
    # (a chunk of an unexpected shape raises AttributeError/KeyError/TypeError, not only ValueError).
    try:
        async with client.stream("POST", url, json=payload) as resp:
            if resp.status_code != 200:
                r.error = _error_message(resp.status_code, await resp.aread())
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if not isinstance(chunk, dict):
                    raise ValueError(f"a stream chunk is not a JSON object: {data[:80]}")
                error = _stream_error(chunk)
                if error is not None:
                    r.error = "stream error: " + error[:200]
                    return r
                now = time.perf_counter()
                any_choice = any_choice or bool(chunk.get("choices"))
                if _content(chunk):
                    if last is None:
                        r.ttft_s = now - start
                    else:
                        r.itl_s.append(now - last)
                    last, chunks = now, chunks + 1
                usage = chunk.get("usage") or usage
            else:
                r.error = "the stream ended without [DONE]"
                return r
        if not any_choice:  # as vLLM: "Never received a valid chunk to calculate TTFT" is a failed request
            r.error = "the stream had no choices chunk"
            return r
        r.e2e_s = time.perf_counter() - start
        r.ttft_s = r.e2e_s if r.ttft_s is None else r.ttft_s  # no content chunk: the output arrived with the end
        r.prompt_tokens = usage.get("prompt_tokens") if usage else None
        # A usage chunk without a count (null or absent) falls back, as vLLM falls back to its tokenizer.
        completion = usage.get("completion_tokens") if usage else None
        r.output_tokens = completion if isinstance(completion, int) else chunks
    except Exception as e:  # noqa: BLE001 -- see above; CancelledError and KeyboardInterrupt still propagate
        r.error = f"{type(e).__name__}: {e}"[:200]
        return r
    r.ok = True
    return r


def _stream_error(chunk: dict) -> str | None:
    """The message of an error event: {"error": {...}} (OpenAI, vLLM, n4), {"error": "..."} (TGI), or an
    ErrorResponse sent as the chunk itself, {"object": "error", "message": ...} (older vLLM releases)."""
    err = chunk.get("error")
    if err:
        return str(err.get("message", err)) if isinstance(err, dict) else str(err)
    if chunk.get("object") == "error":
        return str(chunk.get("message", chunk))
    return None


async def _first_model(client) -> str:
    import httpx

    try:
        resp = await client.get("/v1/models")
    except httpx.HTTPError as e:
        raise ConnectionError(f"GET /v1/models: {type(e).__name__}: {e}") from None
    if resp.status_code != 200:
        raise ConnectionError(f"GET /v1/models: {_error_message(resp.status_code, resp.content)}")
    try:  # a body of another shape (not JSON, no "data" list, no "id") is the server's error, not a traceback
        models = resp.json().get("data") or []
        return str(models[0]["id"])
    except IndexError:
        raise ConnectionError("GET /v1/models lists no model; pass --model") from None
    except (ValueError, AttributeError, KeyError, TypeError):
        raise ConnectionError(f"GET /v1/models: not an OpenAI model list: {resp.text[:200]}; pass --model") from None


async def _probe(client, endpoint: str, model: str, prompt: str) -> bool:
    """One short untimed request (a warm-up); True when the server took the ignore_eos/min_tokens extras."""
    def probe(extras: bool):
        return _request(client, endpoint, _payload(endpoint, model, prompt, PROBE_TOKENS, extras), time.perf_counter())

    first = await probe(True)
    if first.ok:
        return True
    if (await probe(False)).ok:
        return False
    raise ConnectionError(f"probe request to {endpoint} failed: {first.error}")


async def run_benchmark(base_url: str, *, endpoint: str, model: str | None, prompts: list[str], output_len: int,
                        request_rate: float = math.inf, max_concurrency: int | None = None,
                        api_key: str | None = None, slo: dict | None = None, seed: int = 0,
                        timeout_s: float = 600.0) -> dict:
    """One load point: every prompt streamed to `base_url + endpoint`, arrivals Poisson at `request_rate`/s
    (inf: all at once), at most `max_concurrency` in flight. The metrics of compute_metrics, plus the load, the
    model, whether the server took ignore_eos (`ignore_eos`), the most requests seen in flight (`max_in_flight`)
    and, under "requests", each request's own figures."""
    try:
        import httpx
    except ImportError:
        raise OSError("n4 bench serve needs httpx (pip install httpx)") from None
    if not prompts or output_len < 1:
        raise ValueError("run_benchmark needs at least one prompt and output_len >= 1")
    if not request_rate > 0 or (max_concurrency is not None and max_concurrency < 1):
        raise ValueError(f"request rate must be > 0 and max concurrency >= 1, got {request_rate}, {max_concurrency}")
    try:  # a malformed URL is bad input (one-line error), not a traceback from deep inside httpx
        httpx.URL(base_url)
    except httpx.InvalidURL as e:
        raise ValueError(f"--base-url {base_url!r}: {e}") from None
    connections = min(max_concurrency or len(prompts), len(prompts)) + 1
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers,
                                 timeout=httpx.Timeout(timeout_s, connect=30.0),
                                 limits=httpx.Limits(max_connections=connections,
                                                     max_keepalive_connections=connections)) as client:
        model = model or await _first_model(client)
        extras = await _probe(client, endpoint, model, prompts[0])
        results, duration, max_in_flight = await _dispatch(client, endpoint, model, prompts, output_len, extras,
                                                           request_rate, max_concurrency, seed)
    row = {"endpoint": endpoint, "model": model, "request_rate": request_rate, "max_concurrency": max_concurrency,
           "num_prompts": len(prompts), "output_len": output_len, "ignore_eos": extras,
           "max_in_flight": max_in_flight}
    row.update(compute_metrics(results, duration, slo))
    row["requests"] = [{"ok": r.ok, "error": r.error, "start_s": round(r.start_s, 4),
                        "ttft_ms": _ms(r.ttft_s), "tpot_ms": _ms(r.tpot_s), "e2e_ms": _ms(r.e2e_s),
                        "itl_ms": [_ms(g) for g in r.itl_s], "prompt_tokens": r.prompt_tokens,
                        "output_tokens": r.output_tokens} for r in results]
    return row


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


async def _dispatch(client, endpoint, model, prompts, output_len, extras, rate, max_concurrency, seed):
    rng = random.Random(seed)
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    in_flight = max_in_flight = 0
    t0 = time.perf_counter()

    async def one(prompt: str) -> RequestResult:
        nonlocal in_flight, max_in_flight
        if gate:
            await gate.acquire()
        in_flight += 1
        max_in_flight = max(max_in_flight, in_flight)
        try:
            return await _request(client, endpoint, _payload(endpoint, model, prompt, output_len, extras), t0)
        finally:
            in_flight -= 1
            if gate:
                gate.release()

    tasks, next_at = [], 0.0
    for prompt in prompts:
        delay = next_at - (time.perf_counter() - t0)  # an absolute schedule: send overheads do not accumulate
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(prompt)))
        if math.isfinite(rate):
            next_at += rng.expovariate(rate)
    results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - t0, max_in_flight


# ---- CLI ----------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"])
    p.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    p.add_argument("--dataset", default="random", help="'random' or a ShareGPT-style JSON file")
    p.add_argument("--input-len", type=int, default=128, help="words per random prompt (~tokens; usage has the count)")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens of each request (exact with ignore_eos)")
    p.add_argument("--num-prompts", type=int, default=100, help="requests per load point")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="Poisson arrivals per second (inf: all at once)")
    p.add_argument("--max-concurrency", type=int, nargs="?", const=0, default=None,
                   help="most requests in flight; with --sweep (value optional) the sweep values are concurrencies")
    p.add_argument("--sweep", default=None, help="comma-separated loads: request rates, or concurrencies with "
                                                 "--max-concurrency; one result row each")
    p.add_argument("--slo", default=None, help="goodput SLOs in ms, e.g. ttft_ms=500,tpot_ms=50 (also e2e_ms)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and the arrival times")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may wait for its next bytes")
    p.add_argument("--json", default=None, help="write the runs here as JSON")
    p.add_argument("--save-requests", action="store_true", help="include every request's figures in the JSON")
    p.add_argument("--plot", default=None, help="PNG of p50/p99 latencies against load (for a --sweep)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])


def _loads(args) -> tuple[str | None, list]:
    """(the swept quantity or None, the load points as (request_rate, max_concurrency))."""
    if args.max_concurrency == 0 and not args.sweep:
        raise ValueError("--max-concurrency needs a value unless --sweep gives the concurrencies")
    if not args.sweep:
        return None, [(args.request_rate, args.max_concurrency)]
    try:
        values = [float(v) for v in args.sweep.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--sweep takes comma-separated numbers, got {args.sweep!r}") from None
    if not values:  # no load point would run, and main() would index runs[0]
        raise ValueError(f"--sweep takes comma-separated numbers, got {args.sweep!r}")
    if args.max_concurrency is not None:
        if any(v < 1 or v != int(v) for v in values):
            raise ValueError(f"--sweep concurrencies must be integers >= 1, got {args.sweep!r}")
        return "max_concurrency", [(args.request_rate, int(v)) for v in values]
    return "request_rate", [(v, None) for v in values]


def main(args) -> dict:
    kind, loads = _loads(args)
    slo = parse_slo(args.slo)
    if args.dataset == "random":
        prompts = make_random_prompts(args.num_prompts, args.input_len, args.seed)
    else:
        prompts = load_sharegpt(args.dataset, args.num_prompts, args.seed)
    runs = []
    for rate, concurrency in loads:
        row = asyncio.run(run_benchmark(args.base_url, endpoint=args.endpoint, model=args.model, prompts=prompts,
                                        output_len=args.output_len, request_rate=rate, max_concurrency=concurrency,
                                        api_key=args.api_key, slo=slo, seed=args.seed, timeout_s=args.timeout))
        if not args.save_requests:
            del row["requests"]
        runs.append(row)
        print(_summary(row), flush=True)
    result = {"benchmark": "serve", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "base_url": args.base_url, "endpoint": args.endpoint, "model": runs[0]["model"],
              "dataset": args.dataset, "input_len": args.input_len if args.dataset == "random" else None,
              "output_len": args.output_len, "num_prompts": args.num_prompts, "seed": args.seed, "slo": slo,
              "sweep": kind, "client": {"python": platform.python_version(), "platform": platform.platform()},
              "runs": runs}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_jsonable(result), f, indent=2)
            f.write("\n")
    if args.plot:
        write_plot(args.plot, runs, kind or ("max_concurrency" if args.max_concurrency else "request_rate"))
    return result


def _jsonable(value):
    """inf is not JSON: write it as the string "inf" (as the CLI accepts it)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _summary(row: dict) -> str:
    def pair(name):
        s = row[name]
        return "-" if s["p50"] is None else f"{s['p50']:.1f}/{s['p99']:.1f}"

    load = f"rate {row['request_rate']}" + (f", concurrency {row['max_concurrency']}" if row["max_concurrency"] else "")
    good = "" if row["request_goodput"] is None else f", goodput {row['request_goodput']:.2f} req/s"
    return (f"{load}: {row['completed']} ok, {row['failed']} failed in {row['duration_s']:.2f} s; "
            f"{row['request_throughput']} req/s, {row['output_throughput']} output tok/s, "
            f"{row['total_token_throughput']} total tok/s{good}; p50/p99 ms: TTFT {pair('ttft_ms')}, "
            f"TPOT {pair('tpot_ms')}, ITL {pair('itl_ms')}, E2E {pair('e2e_ms')}")
