"""SIGTERM drains `n4 serve` (server/api/lifecycle.py): in-flight requests that finish within --shutdown-timeout
finish normally, those still running then end with finish_reason "abort", new requests are refused (503 while
the listener is still open, then connection refused), and the process exits 0 in about the timeout."""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.api.conftest import server_log, start_n4_serve, stop_n4_serve

pytestmark = pytest.mark.slow
SHUTDOWN_TIMEOUT = 4.0


def _stream(base: str, max_tokens: int, first_chunk: threading.Event, result: dict) -> None:
    body = {"model": "demo", "prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
        events = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
                first_chunk.set()
    result["finished_at"] = time.monotonic()
    result["done"] = events[-1] == "[DONE]"
    result["reasons"] = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]
                         if json.loads(e)["choices"][0]["finish_reason"]]


def _whole(base: str, result: dict) -> None:
    r = httpx.post(base + "/v1/completions", timeout=60,
                   json={"model": "demo", "prompt": "x", "max_tokens": 1900, "ignore_eos": True})
    result["status"] = r.status_code
    result["reasons"] = [r.json()["choices"][0]["finish_reason"]]


def test_sigterm_drains_then_aborts_then_exits_0():
    proc, base = start_n4_serve("--served-model-name", "demo", "--max-model-len", "2048",
                                "--shutdown-timeout", str(SHUTDOWN_TIMEOUT))
    short, long, whole = {}, {}, {}
    short_started, long_started = threading.Event(), threading.Event()
    threads = [threading.Thread(target=_stream, args=(base, 150, short_started, short)),
               threading.Thread(target=_stream, args=(base, 1900, long_started, long)),
               threading.Thread(target=_whole, args=(base, whole))]
    try:
        for t in threads:
            t.start()
        assert short_started.wait(30) and long_started.wait(30)
        time.sleep(0.2)   # the non-streaming one is admitted by now too
        proc.send_signal(signal.SIGTERM)
        sigterm_at = time.monotonic()
        time.sleep(0.3)   # uvicorn closes the listener within ~0.1 s
        try:
            r = httpx.post(base + "/v1/completions", json={"model": "demo", "prompt": "x", "max_tokens": 1},
                           timeout=5)
            assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        except httpx.TransportError:
            pass   # connection refused: the listener is closed
        for t in threads:
            t.join(SHUTDOWN_TIMEOUT + 10)
        rc = proc.wait(SHUTDOWN_TIMEOUT + 10)
        exited_after = time.monotonic() - sigterm_at
    except BaseException:
        print(server_log(proc)[-4000:])
        stop_n4_serve(proc)
        raise
    assert rc == 0, server_log(proc)[-4000:]
    assert exited_after < SHUTDOWN_TIMEOUT + 3
    # Still running at SIGTERM, finished within the timeout: a normal end.
    assert short["finished_at"] > sigterm_at and short["done"] and short["reasons"] == ["length"]
    # Still running when the timeout ran out: ended with "abort", stream closed properly.
    assert long["done"] and long["reasons"] == ["abort"]
    assert whole == {"status": 200, "reasons": ["abort"]}
    assert "aborted 2 requests" in server_log(proc)
