"""Edges of the benchmark tools: servers that answer in unusual ways must give failed requests (counted, as vLLM's
`benchmark_serving.py` counts them), never a crashed run or a failure counted as a success; bad CLI input must give
a one-line error and a non-zero exit. Every server here listens on 127.0.0.1 only."""
from __future__ import annotations

import asyncio
import json
import random
import time

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from benchmarks import serve
from benchmarks.datasets import load_sharegpt
from benchmarks.serve import run_benchmark
from n4.cli import main as n4_main
from tests.api.conftest import uvicorn_thread


def _chunk(obj) -> str:
    return "data: " + json.dumps(obj) + "\n\n"


def _text(i: int) -> str:
    return _chunk({"choices": [{"index": 0, "text": f"t{i} "}], "usage": None})


# Each prompt names what the scripted server streams back for it (after the probe, whose prompt is prompts[0]).
SCRIPTS = {
    "fine": [_text(0), _text(1), _text(2),
             _chunk({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}),
             "data: [DONE]\n\n"],
    # TGI's streamed error: {"error": "...", "error_type": "..."} (a string, not an object)
    "tgi_error": [_text(0), _chunk({"error": "Input validation error: boom", "error_type": "validation"}),
                  "data: [DONE]\n\n"],
    # vLLM before its errors were wrapped in {"error": ...}: the ErrorResponse itself, "object": "error"
    "old_vllm_error": [_chunk({"object": "error", "message": "old-style failure", "type": "BadRequestError",
                               "code": 400}), "data: [DONE]\n\n"],
    # nothing but [DONE]: vLLM's client fails it ("Never received a valid chunk to calculate TTFT")
    "empty": ["data: [DONE]\n\n"],
    # a usage object whose completion_tokens is null: fall back as vLLM does when usage gives no count
    "null_usage": [_text(0), _text(1),
                   _chunk({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": None}}),
                   "data: [DONE]\n\n"],
    # a malformed chunk (choices that are not objects): one failed request, not a crashed run
    "odd_shape": [_chunk({"choices": ["not an object"]}), "data: [DONE]\n\n"],
}


def _scripted_app():
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return ["not", "an", "OpenAI", "list"]

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        lines = SCRIPTS[body["prompt"].split()[0]]

        async def stream():
            for line in lines:
                await asyncio.sleep(0.005)
                yield line
        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


def _run(base: str, prompts: list[str], **kw) -> dict:
    return asyncio.run(run_benchmark(base, endpoint="/v1/completions", model="fake", prompts=prompts, output_len=3,
                                     **kw))


@pytest.fixture(scope="module")
def scripted():
    with uvicorn_thread(_scripted_app()) as base:
        yield base


def test_string_error_event_fails_the_request_not_the_run(scripted):
    row = _run(scripted, ["fine a", "tgi_error b", "fine c"])
    assert row["completed"] == 2 and row["failed"] == 1
    assert row["errors"] == {"stream error: Input validation error: boom": 1}


def test_stream_without_any_choices_chunk_is_a_failure(scripted):
    # vLLM's client marks a request that never got a choices chunk as failed; counting it as completed (with
    # TTFT = E2E and 0 tokens) would inflate request throughput and pull TTFT percentiles towards E2E.
    row = _run(scripted, ["fine a", "old_vllm_error b", "empty c"])
    assert row["completed"] == 1 and row["failed"] == 2
    assert row["errors"]["stream error: old-style failure"] == 1
    assert row["total_output_tokens"] == 3 and row["ttft_ms"]["p99"] < row["e2e_ms"]["p99"]


def test_usage_without_a_completion_count_falls_back(scripted):
    row = _run(scripted, ["null_usage a", "fine b"], max_concurrency=1)
    assert row["completed"] == 2 and row["failed"] == 0
    assert [r["output_tokens"] for r in row["requests"]] == [2, 3]
    assert row["total_output_tokens"] == 5 and row["tpot_ms"]["p50"] is not None


def test_malformed_chunk_fails_one_request(scripted):
    row = _run(scripted, ["fine a", "odd_shape b", "fine c"])
    assert row["completed"] == 2 and row["failed"] == 1
    (error,) = row["errors"]
    assert error.startswith("AttributeError")


def test_model_list_of_another_shape_is_a_clear_error(scripted):
    with pytest.raises(ConnectionError, match="not an OpenAI model list"):
        asyncio.run(run_benchmark(scripted, endpoint="/v1/completions", model=None, prompts=["fine a"], output_len=3))


def test_poisson_arrivals_follow_the_seed(monkeypatch):
    # vLLM's get_request: the first request at once, then exponential gaps of mean 1 / rate, from the seed. The
    # requests go to a stub (no server thread competing for the GIL), so only the event loop's jitter remains.
    rate, n = 50.0, 8

    async def stub(client, url, payload, t0):
        return serve.RequestResult(ok=True, start_s=time.perf_counter() - t0)

    monkeypatch.setattr(serve, "_request", stub)

    def schedule(seed):
        rng, t, out = random.Random(seed), 0.0, []
        for _ in range(n):
            out.append(t)
            t += rng.expovariate(rate)
        return out

    for seed in (3, 3, 4):
        results, _, _ = asyncio.run(serve._dispatch(None, "/v1/completions", "m", ["p"] * n, 3, True, rate, None,
                                                    seed))
        starts = [r.start_s for r in results]
        # never before its time (a burst fails here) and not far after it (a wrong mean or drift fails here)
        assert all(0 <= s - e < 0.25 for s, e in zip(starts, schedule(seed))), (starts, schedule(seed))
    assert schedule(3) != schedule(4)


# ---- bad CLI input: one line on stderr, exit 2 --------------------------------------------------------------
def _cli_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        n4_main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv, message", [
    (["--sweep", ","], "--sweep"),
    (["--sweep", " , "], "--sweep"),
])
def test_serve_bad_sweep_is_one_line(capsys, argv, message):
    err = _cli_error(capsys, ["bench", "serve", "--base-url", "http://127.0.0.1:9", *argv])
    assert err.startswith("n4 bench: error: ") and message in err


def test_serve_invalid_base_url_is_one_line(capsys):
    err = _cli_error(capsys, ["bench", "serve", "--base-url", "http://[::1", "--num-prompts", "1"])
    assert "--base-url" in err


def test_sharegpt_needs_a_positive_count(tmp_path, capsys):
    path = tmp_path / "sg.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi there"}]}]))
    for n in (0, -3):
        with pytest.raises(ValueError, match="--num-prompts"):
            load_sharegpt(str(path), n)
    err = _cli_error(capsys, ["bench", "throughput", "--model", "tiny", "--load-format", "dummy", "--log-level",
                              "error", "--dataset", str(path), "--num-prompts", "0", "--output-len", "2"])
    assert "--num-prompts" in err


def test_plan_max_model_len_zero_is_an_error(capsys):
    err = _cli_error(capsys, ["plan", "--model", "nemotron-4-340b", "--tp", "8", "--gpu", "h200",
                              "--max-model-len", "0"])
    assert "--max-model-len 0" in err
