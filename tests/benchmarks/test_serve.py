"""`n4 bench serve`: the metric arithmetic on known latencies, the load generator against a scripted OpenAI-style
server (concurrency cap, failures of every kind counted), and the CLI against a live `n4 serve` of the demo model.
Every server here listens on 127.0.0.1 only."""
from __future__ import annotations

import asyncio
import json
import math
import zlib

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from benchmarks.serve import (RequestResult, compute_metrics, make_random_prompts, parse_slo, percentile,
                              run_benchmark, write_plot)
from n4.cli import main as n4_main
from tests.api.conftest import free_port, start_n4_serve, stop_n4_serve, uvicorn_thread


# ---- arithmetic on known latencies --------------------------------------------------------------------------
def test_percentile_interpolates_like_numpy():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 90) == pytest.approx(4.6)      # numpy.percentile(values, 90)
    assert percentile(values, 99) == pytest.approx(4.96)
    assert percentile([7.0], 99) == 7.0 and percentile([], 50) is None


def _ok(ttft, e2e, out, itl=(), prompt=10):
    return RequestResult(ok=True, ttft_s=ttft, e2e_s=e2e, output_tokens=out, prompt_tokens=prompt, itl_s=list(itl))


def test_compute_metrics_and_goodput():
    results = [_ok(0.1, 1.1, 11, [0.1] * 10),      # TPOT 100 ms
               _ok(0.3, 0.8, 6, [0.1] * 5),        # TPOT 100 ms, TTFT 300 ms
               _ok(0.05, 0.05, 1),                 # one token: no TPOT
               RequestResult(error="HTTP 500: boom"), RequestResult(error="HTTP 500: boom")]
    m = compute_metrics(results, duration_s=2.0, slo={"ttft_ms": 200, "tpot_ms": 150})
    assert (m["completed"], m["failed"], m["errors"]) == (3, 2, {"HTTP 500: boom": 2})
    assert m["total_input_tokens"] == 30 and m["total_output_tokens"] == 18
    assert m["request_throughput"] == 1.5 and m["output_throughput"] == 9.0 and m["total_token_throughput"] == 24.0
    assert m["ttft_ms"]["mean"] == pytest.approx(150.0) and m["ttft_ms"]["p50"] == pytest.approx(100.0)
    assert m["tpot_ms"]["p50"] == pytest.approx(100.0) and m["itl_ms"]["p99"] == pytest.approx(100.0)
    assert m["e2e_ms"]["p90"] == pytest.approx(1040.0)    # between 800 and 1100 ms, 0.8 of the way
    assert m["good_requests"] == 2 and m["request_goodput"] == 1.0   # the 300 ms TTFT misses; failures never count
    assert compute_metrics(results, 2.0)["request_goodput"] is None


def test_parse_slo():
    assert parse_slo("ttft_ms=500, tpot_ms=50") == {"ttft_ms": 500.0, "tpot_ms": 50.0}
    assert parse_slo(None) is None
    for bad in ("ttft=5", "ttft_ms", "e2e_ms=-1", "tpot_ms=fast"):
        with pytest.raises(ValueError):
            parse_slo(bad)


def test_png_writer(tmp_path):
    def stats(v):
        return {"mean": v, "p50": v, "p90": v, "p99": 2 * v}

    runs = [{"request_rate": r, **{k: stats(v) for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")}}
            for r, v in ((1.0, 10.0), (math.inf, 30.0))]
    path = tmp_path / "p.png"
    write_plot(str(path), runs, "request_rate")
    _check_png(path.read_bytes())


def _check_png(data: bytes) -> None:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    idat_len = int.from_bytes(data[33:37], "big")
    assert data[37:41] == b"IDAT"
    assert zlib.crc32(data[37:41 + idat_len]) == int.from_bytes(data[41 + idat_len:45 + idat_len], "big")
    raw = zlib.decompress(data[41:41 + idat_len])
    assert len(raw) == height * (1 + 3 * width)
    assert len(set(raw)) > 3                        # something was drawn besides white


# ---- a scripted server: latency, a concurrency meter, and failures on cue -----------------------------------
def _fake_app(reject_extras: bool = False):
    app = FastAPI()
    app.state.in_flight = app.state.max_in_flight = 0
    app.state.bodies = []

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        app.state.bodies.append(body)
        if reject_extras and "ignore_eos" in body:
            return JSONResponse({"error": {"message": "unknown field ignore_eos"}}, status_code=400)
        if "fail" in body["prompt"]:
            return JSONResponse({"error": {"message": "scripted failure"}}, status_code=500)
        return StreamingResponse(_stream(app, body), media_type="text/event-stream")

    return app


async def _stream(app, body):
    app.state.in_flight += 1
    app.state.max_in_flight = max(app.state.max_in_flight, app.state.in_flight)
    try:
        for i in range(body["max_tokens"]):
            await asyncio.sleep(0.01)
            if i == 1 and "break" in body["prompt"]:
                yield 'data: {"error": {"message": "scripted mid-stream error"}}\n\n'
                return
            if i == 1 and "drop" in body["prompt"]:
                return                              # the stream ends without [DONE]
            yield "data: " + json.dumps({"choices": [{"index": 0, "text": f"t{i} "}], "usage": None}) + "\n\n"
        usage = {"prompt_tokens": 7, "completion_tokens": body["max_tokens"], "total_tokens": 7 + body["max_tokens"]}
        yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
        yield "data: [DONE]\n\n"
    finally:
        app.state.in_flight -= 1


def test_concurrency_cap_is_respected():
    app = _fake_app()
    with uvicorn_thread(app) as base:
        row = asyncio.run(run_benchmark(base, endpoint="/v1/completions", model=None,
                                        prompts=make_random_prompts(12, 4, seed=0), output_len=4, max_concurrency=3))
    assert row["model"] == "fake" and row["completed"] == 12 and row["failed"] == 0
    assert row["max_in_flight"] == 3 and app.state.max_in_flight <= 3
    assert row["total_output_tokens"] == 48 and row["total_input_tokens"] == 12 * 7   # from the usage chunks
    body = app.state.bodies[-1]
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["min_tokens"] == body["max_tokens"] == 4
    for r in row["requests"]:
        assert r["ttft_ms"] <= r["e2e_ms"] and len(r["itl_ms"]) == 3


def test_failures_are_counted_not_hidden():
    prompts = ["fine one", "please fail", "fine two", "break here", "drop here", "fine three"]
    with uvicorn_thread(_fake_app()) as base:
        row = asyncio.run(run_benchmark(base, endpoint="/v1/completions", model="fake", prompts=prompts,
                                        output_len=3, request_rate=200.0, slo={"e2e_ms": 10_000}))
    assert row["completed"] == 3 and row["failed"] == 3
    assert row["errors"] == {"HTTP 500: scripted failure": 1, "stream error: scripted mid-stream error": 1,
                             "the stream ended without [DONE]": 1}
    assert row["good_requests"] == 3 and row["total_output_tokens"] == 9


@pytest.mark.parametrize("model", [None, "m"])   # None: fails listing models; "m": fails the probe request
def test_unreachable_server_is_a_clear_error(model):
    with pytest.raises(ConnectionError):
        asyncio.run(run_benchmark(f"http://127.0.0.1:{free_port()}", endpoint="/v1/completions", model=model,
                                  prompts=["x"], output_len=2, timeout_s=5))


def test_server_without_the_extras():
    with uvicorn_thread(_fake_app(reject_extras=True)) as base:
        row = asyncio.run(run_benchmark(base, endpoint="/v1/completions", model="fake", prompts=["a b", "c d"],
                                        output_len=2))
    assert row["ignore_eos"] is False and row["completed"] == 2 and row["failed"] == 0


# ---- against a live `n4 serve` ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def n4_server():
    proc, base = start_n4_serve("--served-model-name", "demo", "--max-model-len", "512", "--log-level", "warning")
    yield base
    assert stop_n4_serve(proc) == 0


@pytest.mark.slow
@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_live_n4_metrics(n4_server, endpoint):
    prompts = make_random_prompts(4, 16, seed=1)
    row = asyncio.run(run_benchmark(n4_server, endpoint=endpoint, model=None, prompts=prompts, output_len=8,
                                    max_concurrency=2, slo={"ttft_ms": 60_000}))
    assert row["model"] == "demo" and row["ignore_eos"] is True
    assert row["completed"] == 4 and row["failed"] == 0 and row["usage_missing"] == 0
    assert row["max_in_flight"] == 2
    assert row["total_output_tokens"] == 4 * 8                  # usage: exactly output_len with ignore_eos
    assert row["total_input_tokens"] >= 4 * 16                  # each word is one token or more
    for r in row["requests"]:
        assert r["output_tokens"] == 8 and 0 < r["ttft_ms"] <= r["e2e_ms"]
        assert r["tpot_ms"] == pytest.approx((r["e2e_ms"] - r["ttft_ms"]) / 7, abs=1e-2)
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        s = row[name]
        assert 0 < s["p50"] <= s["p90"] <= s["p99"] and s["mean"] > 0
    assert row["ttft_ms"]["p99"] <= row["e2e_ms"]["p99"]
    assert row["output_throughput"] > 0 and row["request_goodput"] == row["request_throughput"]


@pytest.mark.slow
def test_live_n4_cli_sweep(n4_server, tmp_path, capsys):
    out, plot = tmp_path / "serve.json", tmp_path / "serve.png"
    n4_main(["bench", "serve", "--base-url", n4_server, "--num-prompts", "4", "--input-len", "8", "--output-len", "4",
             "--max-concurrency", "--sweep", "1,2", "--slo", "ttft_ms=60000,tpot_ms=60000", "--json", str(out),
             "--plot", str(plot)])
    result = json.loads(out.read_text())
    assert result["sweep"] == "max_concurrency" and result["model"] == "demo"
    assert [r["max_concurrency"] for r in result["runs"]] == [1, 2]
    assert [r["max_in_flight"] for r in result["runs"]] == [1, 2]
    assert all(r["request_rate"] == "inf" and r["completed"] == 4 and r["total_output_tokens"] == 16
               and "requests" not in r for r in result["runs"])
    _check_png(plot.read_bytes())
    assert capsys.readouterr().out.count("4 ok, 0 failed") == 2
