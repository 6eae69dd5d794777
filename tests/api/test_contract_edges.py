"""OpenAI wire-contract corners: each test names a request that used to break (a dead engine, a 500 outside the
envelope, a silent empty answer, stream/non-stream disagreement)."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.api.app import build_app
from server.api.protocol import ChatMessage
from server.api.tokenizer import Tokenizer
from server.engine.config import EngineConfig
from server.engine.engine import AsyncEngine, LLMEngine
from tests.api.conftest import MODEL_NAME, make_app
# The same tiny served model as test_openai_api (its fixtures, module-scoped here too).
from tests.api.test_openai_api import MAX_MODEL_LEN, _events, checkpoint, client  # noqa: F401


def _still_serving(client) -> None:
    assert client.get("/health").status_code == 200
    r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "ok", "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_huge_top_k_does_not_kill_the_engine(client):
    # top_k is unbounded in the protocol; 2**63 overflowed the sampler's int64 tensor inside the engine thread,
    # which killed the engine: this request and every later one got 503.
    body = {"model": MODEL_NAME, "prompt": "hello", "max_tokens": 4, "seed": 3, "ignore_eos": True}
    r = client.post("/v1/completions", json={**body, "top_k": 2 ** 63})
    assert r.status_code == 200, r.text
    # A top-k at least the vocabulary keeps every token: the same draw as no top-k.
    off = client.post("/v1/completions", json={**body, "top_k": -1}).json()["choices"][0]["text"]
    assert r.json()["choices"][0]["text"] == off
    _still_serving(client)


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 1}'),
    ("/v1/completions", '{"prompt": ["ok", "\\udfff"], "max_tokens": 1}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud83d"}], "max_tokens": 1}'),
    ("/v1/completions", '{"model": "\\ud800", "prompt": "x", "max_tokens": 1}'),
    ("/tokenize", '{"prompt": "\\udc00"}'),
])
def test_lone_surrogate_is_400_in_the_envelope(client, path, body):
    # JSON may spell a lone UTF-16 surrogate (\ud800); Python decodes it to a str that cannot be encoded as UTF-8,
    # so SentencePiece (or the 404 message quoting the model name) raised and the client got a bare 500.
    r = client.post(path, content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and "surrogate" in error["message"]
    _still_serving(client)


def test_valid_surrogate_pair_is_accepted(client):
    r = client.post("/v1/completions", content=b'{"prompt": "smile \\ud83d\\ude00", "max_tokens": 1}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("temperature", [1e-40, 1e-300])
def test_tiny_temperature_is_greedy(client, temperature):
    # logits / 1e-40 overflow float32 to inf, softmax gives NaN, and the sampler returned token 0 ("<pad>") every
    # step. vLLM treats a temperature below 1e-5 as greedy.
    body = {"model": MODEL_NAME, "prompt": "The quick brown fox", "max_tokens": 8, "ignore_eos": True,
            "logprobs": 0, "return_tokens_as_token_ids": True}
    greedy = client.post("/v1/completions", json={**body, "temperature": 0}).json()["choices"][0]
    tiny = client.post("/v1/completions", json={**body, "temperature": temperature}).json()["choices"][0]
    assert tiny["logprobs"]["tokens"] == greedy["logprobs"]["tokens"]
    assert "token_id:0" not in tiny["logprobs"]["tokens"]


def test_prompt_filling_the_context_without_max_tokens_is_400(client):
    # With max_tokens omitted the default is the remaining context; a prompt that leaves none used to run with
    # max_tokens 0 and answer 200 with no text (a chat completion must produce at least one token). vLLM: 400.
    r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": [5] * MAX_MODEL_LEN, "max_tokens": None})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].startswith(f"This model's maximum context length is {MAX_MODEL_LEN} tokens.")
    assert r.json()["error"]["param"] == "max_tokens"
    # One token of room: one token, finish_reason length.
    r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": [5] * (MAX_MODEL_LEN - 1),
                                             "max_tokens": None, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1
    # Explicit max_tokens 0 over a full context stays allowed (scoring the prompt with echo).
    r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": [5] * MAX_MODEL_LEN, "max_tokens": 0,
                                             "echo": True, "logprobs": 0})
    assert r.status_code == 200, r.text


def test_chat_prompt_filling_the_context_without_max_tokens_is_400(client):
    ids = client.post("/tokenize", json={"prompt": "hello " * 200}).json()["tokens"]
    for k in range(len(ids)):
        text = client.post("/detokenize", json={"tokens": ids[:k]}).json()["prompt"]
        messages = [{"role": "user", "content": text}]
        if client.post("/tokenize", json={"messages": messages}).json()["count"] >= MAX_MODEL_LEN:
            break
    r = client.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": messages})
    assert r.status_code == 400, r.text
    assert "maximum context length" in r.json()["error"]["message"]


def _merge_logprobs(chunks: list[dict]) -> dict:
    merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in chunks:
        for key in merged:
            merged[key] += lp[key]
    return merged


@pytest.mark.parametrize("echo", [False, True])
def test_streamed_completion_logprobs_match_non_streamed(client, echo):
    # text_offset restarted at 0 in every streamed chunk (vLLM and the non-streamed answer count from the start
    # of the text), and a streamed echo carried no prompt logprobs at all.
    body = {"model": MODEL_NAME, "prompt": [101, 202, 303, 404], "max_tokens": 6, "temperature": 0,
            "ignore_eos": True, "logprobs": 1, "echo": echo, "return_tokens_as_token_ids": True}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    events = _events(client.post("/v1/completions", json={**body, "stream": True}))
    assert events[-1] == "[DONE]"
    choices = [e["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in choices) == whole["text"]
    streamed = _merge_logprobs([c["logprobs"] for c in choices if c["logprobs"] is not None])
    assert streamed == whole["logprobs"]
    assert len(streamed["tokens"]) == 6 + (4 if echo else 0)


def test_streamed_echo_without_logprobs_still_echoes(client):
    body = {"model": MODEL_NAME, "prompt": ["hello world", "good night"], "max_tokens": 3, "temperature": 0,
            "ignore_eos": True, "echo": True}
    whole = client.post("/v1/completions", json=body).json()["choices"]
    events = _events(client.post("/v1/completions", json={**body, "stream": True}))
    for c in whole:
        streamed = "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"][0]["index"] == c["index"])
        assert streamed == c["text"] and streamed.startswith(("hello world", "good night"))


def test_max_seed_with_n_is_accepted(client):
    # Sample i of n draws with seed + i; at the top of the seed range that overflowed and a valid request got a 400.
    r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 2, "n": 2,
                                             "seed": 2 ** 64 - 1})
    assert r.status_code == 200, r.text
    a = r.json()["choices"]
    b = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 2, "n": 2,
                                             "seed": 2 ** 64 - 1}).json()["choices"]
    assert [c["text"] for c in a] == [c["text"] for c in b]


def test_unexpected_failure_is_500_in_the_envelope(checkpoint):
    # Anything not foreseen still answers in the OpenAI envelope (clients read error.message), not Starlette's
    # plain-text "Internal Server Error".
    app = make_app(checkpoint, max_model_len=MAX_MODEL_LEN)

    async def broken(_request):
        raise RuntimeError("boom")

    app.state.serving.completion = broken
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 1})
        assert r.status_code == 500
        error = r.json()["error"]
        assert error["type"] == "server_error" and error["message"]
        assert c.get("/health").status_code == 200


def test_completions_accept_more_than_four_stop_sequences(client):
    # lm-eval's local-completions sends a task's whole `until` list plus EOS (humaneval: 5 + "</s>"); vLLM takes any
    # number on /v1/completions, n4 answered 400 to every such request. Chat keeps OpenAI's limit of 4.
    until = ["\nclass", "\ndef", "\n#", "\nif", "\nprint", "</s>"]
    body = {"model": MODEL_NAME, "prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0,
            "ignore_eos": True}
    text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    stops = until + [text[6:9]]   # one that the greedy text contains
    r = client.post("/v1/completions", json={**body, "stop": stops})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == text[:text.find(text[6:9])]
    r = client.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}],
                                                  "stop": until, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"


@pytest.mark.parametrize("key", ["²", "--5"])
def test_logit_bias_key_that_is_not_an_integer_is_400(client, key):
    # The key check used str.isdigit (true for "²", which int() refuses) after stripping every leading "-", so
    # these keys passed validation and int() raised later: a 500.
    r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 1,
                                             "logit_bias": {key: 1}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "logit_bias"


def test_prompt_logprobs_are_returned(client):
    # vLLM's prompt_logprobs extra was accepted and computed but never returned. vLLM's shape: per prompt position
    # None (position 0) or {token_id: {logprob, rank, decoded_token}} holding the prompt token and the top-k.
    ids = [101, 202, 303, 404]
    body = {"model": MODEL_NAME, "prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 2}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    rows = choice["prompt_logprobs"]
    assert len(rows) == len(ids) and rows[0] is None
    echo = client.post("/v1/completions", json={**body, "echo": True, "logprobs": 0, "max_tokens": 0,
                                                "prompt_logprobs": None}).json()["choices"][0]["logprobs"]
    for token_id, row, expected in zip(ids[1:], rows[1:], echo["token_logprobs"][1:]):
        assert 2 <= len(row) <= 3 and row[str(token_id)]["logprob"] == pytest.approx(expected)
        assert all(set(v) == {"logprob", "rank", "decoded_token"} and v["rank"] >= 1 for v in row.values())
    # Without the extra the field is absent or null (OpenAI's shape is untouched).
    plain = client.post("/v1/completions", json={**body, "prompt_logprobs": None}).json()["choices"][0]
    assert plain.get("prompt_logprobs") is None


def test_chat_text_parts_join_with_newlines():
    # vLLM and TensorRT-LLM join a message's text parts with "\n"; "".join glued "Hello" and "there" together.
    message = ChatMessage(role="user", content=[{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}])
    assert message.text() == "Hello\nthere"


def test_several_served_model_names(checkpoint):
    # vLLM's `--served-model-name a b`: requests may name either, responses and /v1/models' root carry the first.
    engine = LLMEngine.from_pretrained(checkpoint, EngineConfig(max_model_len=MAX_MODEL_LEN, num_kv_blocks=64),
                                       dtype="float32")
    app = build_app(AsyncEngine(engine), Tokenizer.from_pretrained(checkpoint), ["nemotron", "n4-alias"])
    with TestClient(app) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["nemotron", "n4-alias"]
        for name in ("nemotron", "n4-alias"):
            r = c.post("/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 2})
            assert r.status_code == 200 and r.json()["model"] == "nemotron"
        assert c.post("/v1/completions", json={"model": "other", "prompt": "hi"}).status_code == 404
