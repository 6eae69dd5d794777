"""Clients that go away free what they held, under a real `n4 serve` on a loopback port with real sockets:
100 streaming clients that hang up after their first chunk and 100 non-streaming ones that time out early.
Afterwards nothing runs, the KV cache is back at its baseline, and a normal request finishes promptly."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.api.conftest import metric_value, server_log, start_n4_serve, stop_n4_serve

pytestmark = pytest.mark.slow
STREAMING = NON_STREAMING = 100
# Long enough that, were nothing aborted, the engine would still be busy for tens of seconds afterwards.
BODY = {"model": "demo", "prompt": "Tell me a long story", "max_tokens": 1900, "ignore_eos": True,
        "temperature": 0}


async def _metrics(http: httpx.AsyncClient) -> str:
    return (await http.get("/metrics")).text


async def _streaming_client(http: httpx.AsyncClient, started: list, hang_up: asyncio.Event) -> None:
    async with http.stream("POST", "/v1/completions", json={**BODY, "stream": True}) as r:
        assert r.status_code == 200
        chunks = r.aiter_raw()   # kept referenced: an abandoned iterator closes the connection when collected
        await chunks.__anext__()
        started.append(1)
        await hang_up.wait()
    # Leaving the block with the body unread closes the connection: the server sees the disconnect.


async def _impatient_client(http: httpx.AsyncClient) -> None:
    with pytest.raises(httpx.TimeoutException):
        await http.post("/v1/completions", json=BODY, timeout=httpx.Timeout(60, read=0.5))


async def _scenario(base: str) -> None:
    limits = httpx.Limits(max_connections=STREAMING + NON_STREAMING + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as http:
        baseline = metric_value(await _metrics(http), "n4:kv_cache_usage_perc")
        started: list = []
        hang_up = asyncio.Event()
        streams = [asyncio.create_task(_streaming_client(http, started, hang_up)) for _ in range(STREAMING)]
        deadline = time.monotonic() + 60
        while len(started) < STREAMING and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(started) == STREAMING
        busy = await _metrics(http)
        assert metric_value(busy, "n4:num_requests_running") > 0
        assert metric_value(busy, "n4:kv_cache_usage_perc") > baseline

        hang_up.set()
        await asyncio.gather(*streams)
        await asyncio.gather(*(_impatient_client(http) for _ in range(NON_STREAMING)))

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = await _metrics(http)
            if metric_value(text, "n4:num_requests_running") == 0 and \
                    metric_value(text, "n4:num_requests_waiting") == 0:
                break
            await asyncio.sleep(0.1)
        assert metric_value(text, "n4:num_requests_running") == 0
        assert metric_value(text, "n4:num_requests_waiting") == 0
        assert metric_value(text, "n4:kv_cache_usage_perc") == baseline

        start = time.monotonic()
        r = await http.post("/v1/completions", json={**BODY, "max_tokens": 16})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16
        assert time.monotonic() - start < 5


def test_disconnected_clients_free_their_requests():
    proc, base = start_n4_serve("--served-model-name", "demo", "--max-model-len", "2048", "--kv-cache-memory", "512")
    try:
        asyncio.run(_scenario(base))
    except BaseException:
        print(server_log(proc)[-4000:])
        raise
    finally:
        assert stop_n4_serve(proc) == 0
