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


CHAT_PARAMS = dict(
    model="demo", n=2, temperature=0.9, top_p=0.95, seed=7, stop=["\n\n", "###"], presence_penalty=0.5,
    frequency_penalty=0.3, logit_bias={"100": -100}, logprobs=True, top_logprobs=3, max_completion_tokens=12,
    user="test-user",
    messages=[{"role": "system", "content": "Be brief."},
              {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}],
    extra_body={"top_k": 40, "min_p": 0.01, "repetition_penalty": 1.1, "min_tokens": 2, "ignore_eos": True,
                "stop_token_ids": [7]},
)


def test_every_chat_parameter_through_the_client(client):
    r = client.chat.completions.create(**CHAT_PARAMS)
    assert sorted(c.index for c in r.choices) == [0, 1]
    for choice in r.choices:
        assert choice.finish_reason in ("stop", "length")
        assert all(len(t.top_logprobs) == 3 for t in choice.logprobs.content)
        assert all(t.token != "token_id:100" for t in choice.logprobs.content)
    # Streaming, same parameters: two choices, each with exactly one finish_reason, then the usage chunk.
    chunks = list(client.chat.completions.create(**CHAT_PARAMS, stream=True, stream_options={"include_usage": True}))
    finishes = {}
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            if choice.finish_reason:
                finishes[choice.index] = finishes.get(choice.index, 0) + 1
    assert finishes == {0: 1, 1: 1}
    assert chunks[-1].usage.completion_tokens >= 4   # min_tokens 2 for each of 2 choices


def test_every_completion_parameter_through_the_client(client):
    kwargs = dict(model="demo", prompt=["The answer", "Another prompt"], max_tokens=6, n=2, echo=True, logprobs=2,
                  temperature=0.7, top_p=0.9, seed=3, stop=["###"], presence_penalty=0.2, frequency_penalty=0.2,
                  logit_bias={"5": -100}, user="u", extra_body={"top_k": 20, "min_tokens": 1, "ignore_eos": True})
    r = client.completions.create(**kwargs)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    for choice in r.choices:
        assert choice.text.startswith(("The answer", "Another prompt"))     # echo
        assert choice.logprobs.token_logprobs[0] is None                    # echoed first token has no logprob
        assert all(len(top) >= 1 for top in choice.logprobs.top_logprobs[1:])
    stream = client.completions.create(**{**kwargs, "echo": False, "prompt": "The answer"}, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 12   # 2 choices x 6 tokens (ignore_eos)
