"""Retries with backoff on 429/5xx/connection errors, no retry on other 4xx, the concurrency cap, and counting."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from n4_train.sdg.client import ApiClient, RetryPolicy
from n4_train.sdg.errors import RequestFailed


def _client(handler, retries=3, concurrency=4) -> ApiClient:
    return ApiClient("http://fake/v1", "key", concurrency, RetryPolicy(retries, backoff_s=0.0),
                     transport=httpx.MockTransport(handler))


def _scripted(*answers):
    """A handler answering the given statuses in order (an exception instance is raised), then 200s."""
    answers = list(answers)
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = answers.pop(0) if answers else 200
        if isinstance(answer, Exception):
            raise answer
        if answer == 200:
            return httpx.Response(200, json={"ok": True})
        return httpx.Response(answer, json={"error": {"message": f"status {answer}", "code": "c"}},
                              headers={"Retry-After": "0"} if answer == 429 else {})

    return handler, seen


def test_retries_transient_failures_then_succeeds():
    handler, seen = _scripted(503, 429, httpx.ConnectError("refused"))
    client = _client(handler)
    assert asyncio.run(client.post("/x", {"a": 1})) == {"ok": True}
    assert len(seen) == 4 and seen[0].headers["authorization"] == "Bearer key"
    assert client.stats.as_dict() == {"sent": 4, "retries": 3, "failed": 0,
                                      "by_status": {"503": 1, "429": 1, "connection": 1}}


def test_gives_up_after_the_retries():
    handler, seen = _scripted(500, 502, 500)
    client = _client(handler, retries=2)
    with pytest.raises(RequestFailed, match="HTTP 500: status 500") as info:
        asyncio.run(client.get("/x"))
    assert info.value.status == 500 and info.value.code == "c"
    assert len(seen) == 3 and client.stats.failed == 1 and client.stats.retries == 2


def test_client_errors_are_not_retried():
    handler, seen = _scripted(400)
    client = _client(handler)
    with pytest.raises(RequestFailed) as info:
        asyncio.run(client.post("/x", {}))
    assert info.value.status == 400 and len(seen) == 1 and client.stats.retries == 0


def test_connection_failure_has_no_status():
    handler, _ = _scripted(*[httpx.ConnectError("refused")] * 3)
    client = _client(handler, retries=2)
    with pytest.raises(RequestFailed) as info:
        asyncio.run(client.get("/models"))
    assert info.value.status is None and "ConnectError" in str(info.value)


def test_backoff_honours_retry_after_and_grows():
    import random

    policy = RetryPolicy(retries=5, backoff_s=1.0, max_backoff_s=10.0)
    rng = random.Random(0)
    assert policy.delay(0, "3", rng) == 3.0
    assert policy.delay(0, "600", rng) == 10.0  # capped
    delays = [policy.delay(a, None, rng) for a in range(6)]
    assert 0.5 <= delays[0] <= 1.0 and 4.0 <= delays[3] <= 8.0 and delays[5] <= 10.0


def test_concurrency_cap():
    in_flight, peak = 0, 0

    async def handler(request):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.005)
        in_flight -= 1
        return httpx.Response(200, json={})

    async def main():
        client = _client(handler, concurrency=3)
        await asyncio.gather(*(client.get("/x") for _ in range(20)))
        await client.aclose()

    asyncio.run(main())
    assert peak == 3
