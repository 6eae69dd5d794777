"""While `n4 serve` loads the model, its port already answers: /health 503 (empty body) and any API call 503
in the OpenAI envelope with Retry-After; then the real app takes over and /health turns 200."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from tests.api.conftest import free_port

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_health_is_503_while_loading_then_200():
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # A 2 GiB KV cache takes a noticeable time to allocate and zero: a loading window the test can see.
    proc = subprocess.Popen([sys.executable, "-m", "n4.cli", "serve", "--port", str(port), "--kv-cache-memory",
                             "2048", "--log-level", "warning"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    seen_loading = seen_envelope = False
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, "n4 serve exited"
            try:
                r = httpx.get(base + "/health", timeout=2)
            except httpx.TransportError:
                time.sleep(0.01)
                continue
            if r.status_code == 200:
                break
            assert r.status_code == 503 and r.content == b""
            seen_loading = True
            try:
                api = httpx.post(base + "/v1/completions", json={"prompt": "x"}, timeout=2)
            except httpx.TransportError:  # the switch-over from the loading responder to the app
                continue
            if api.status_code == 503 and "error" in api.json():   # (the real app may have taken over already)
                assert api.json()["error"]["code"] == "loading" and api.headers["retry-after"]
                seen_envelope = True
        else:
            pytest.fail("n4 serve did not become healthy in 120 s")
        assert seen_loading and seen_envelope
        assert httpx.get(base + "/v1/models", timeout=5).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
