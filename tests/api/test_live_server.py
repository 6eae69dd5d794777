"""`n4 serve` as users run it: a real process on a local port, driven by the official `openai` client.
With no --model it serves the embedded demo checkpoint (what `make serve` does)."""
from __future__ import annotations

import openai
import pytest

from tests.api.conftest import start_n4_serve, stop_n4_serve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    proc, base = start_n4_serve("--served-model-name", "demo", "--max-model-len", "512")
    yield base
    assert stop_n4_serve(proc) == 0   # a graceful SIGTERM exits 0


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
