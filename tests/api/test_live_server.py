"""`n4 serve` as users run it: a real process on a local port, driven by the official `openai` client.
With no --model it serves the embedded demo checkpoint (what `make serve` does)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "n4.cli", "serve", "--port", str(port),
                             "--served-model-name", "demo", "--max-model-len", "512"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"n4 serve exited early:\n{proc.stdout.read()}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("n4 serve did not become healthy in 120 s")
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("n4 serve did not exit within 20 s of SIGTERM")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def test_chat_non_streaming(client):
    r = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi!"}],
                                       max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert r.usage.completion_tokens <= 10


def test_chat_streaming(client):
    stream = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi!"}],
                                            max_completion_tokens=10, stream=True,
                                            stream_options={"include_usage": True}, temperature=0.7, seed=3)
    chunks = list(stream)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_completions_with_logprobs(client):
    r = client.completions.create(model="demo", prompt="The capital of", max_tokens=5, logprobs=3, temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == r.usage.completion_tokens
    assert all(len(top) >= 1 for top in lp.top_logprobs)


def test_errors_reach_the_client_and_server_survives(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}], temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    models = client.models.list()
    assert [m.id for m in models.data] == ["demo"]
