"""The OpenAI surface of `n4 serve`, in process: response shapes, streaming events, stop strings, and bad
input answered with the error envelope (after which the server keeps serving)."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from model.config import ModelConfig
from tests.api.conftest import MODEL_NAME, make_app, serve_checkpoint, uvicorn_thread
from tests.utils import make_tiny_checkpoint

CONFIG = ModelConfig(vocab_size=4096, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                     torch_dtype="float32")
MAX_MODEL_LEN = 128


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("api")), CONFIG, seed=11)


@pytest.fixture(scope="module")
def client(checkpoint):
    with serve_checkpoint(checkpoint, max_model_len=MAX_MODEL_LEN) as c:
        yield c


def _chat(**kw):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8}
    body.update(kw)
    return body


def _events(response) -> list:
    events = []
    for line in response.text.split("\n\n"):
        if not line.strip():
            continue
        assert line.startswith("data: "), line
        payload = line[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_models_lists_served_model(client):
    data = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == [MODEL_NAME]
    assert data[0]["max_model_len"] == MAX_MODEL_LEN


def test_health_is_empty_200(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.content == b""


def test_chat_completion_shape(client):
    r = client.post("/v1/chat/completions", json=_chat(temperature=0, max_completion_tokens=5))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL_NAME
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["completion_tokens"] <= 5 and usage["total_tokens"] == usage["prompt_tokens"] + usage[
        "completion_tokens"]


def test_chat_stream_events(client):
    r = client.post("/v1/chat/completions", json=_chat(stream=True, n=2, temperature=0.8, seed=1,
                                                       stream_options={"include_usage": True}))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] > 0
    assert all(c["usage"] is None for c in chunks[:-1])
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert sum(1 for c in mine if c["finish_reason"] is not None) == 1
        assert mine[-1]["finish_reason"] in ("stop", "length")


def test_completion_stream_matches_non_stream(client):
    body = {"model": MODEL_NAME, "prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    events = _events(client.post("/v1/completions", json={**body, "stream": True}))
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == whole


def test_stop_string_across_token_boundary_is_cut(client):
    body = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0,
            "ignore_eos": True, "logprobs": 0}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    tokens, text = choice["logprobs"]["tokens"], choice["text"]
    # A stop string made of the end of one token and the start of the next (skip tokens too short to split).
    boundary = next(i for i in range(3, len(tokens) - 1) if len(tokens[i]) >= 2 and len(tokens[i + 1]) >= 1)
    stop = tokens[boundary][-2:] + tokens[boundary + 1][:1]
    cut = text.find(stop)
    for stream in (False, True):
        r = client.post("/v1/completions", json={**body, "stop": [stop], "stream": stream})
        if stream:
            events = _events(r)[:-1]
            got = "".join(e["choices"][0]["text"] for e in events)
            reason = [e["choices"][0]["finish_reason"] for e in events if e["choices"][0]["finish_reason"]]
            assert reason == ["stop"]
        else:
            got = r.json()["choices"][0]["text"]
            assert r.json()["choices"][0]["finish_reason"] == "stop"
        assert got == text[:cut]
        assert stop not in got


def test_stop_strings_wait_for_min_tokens(client):
    # As EOS and stop ids do (and vLLM's stop strings): a stop string inside the first min_tokens tokens is output.
    body = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0,
            "ignore_eos": True, "logprobs": 0}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    tokens = choice["logprobs"]["tokens"]
    stop = next(t for t in tokens[1:4] if t.strip())                # text of an early token
    cut = choice["text"].find(stop)
    early = client.post("/v1/completions", json={**body, "stop": [stop]}).json()
    assert early["choices"][0]["text"] == choice["text"][:cut]
    late = client.post("/v1/completions", json={**body, "stop": [stop], "min_tokens": 6}).json()
    assert late["usage"]["completion_tokens"] >= 6
    assert late["choices"][0]["text"].startswith(choice["text"][:cut] + stop)


def test_completion_prompt_forms_and_n(client):
    r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": ["a b", "c d e"], "n": 2,
                                             "max_tokens": 3, "temperature": 1.0, "seed": 4})
    assert r.status_code == 200, r.text
    assert sorted(c["index"] for c in r.json()["choices"]) == [0, 1, 2, 3]
    r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": [[5, 6, 7], [8, 9]], "max_tokens": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


def test_echo_with_zero_max_tokens_returns_prompt(client):
    r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "hello world", "echo": True,
                                             "max_tokens": 0, "logprobs": 2})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == "hello world"
    lp = choice["logprobs"]
    assert lp["token_logprobs"][0] is None and all(x <= 0 for x in lp["token_logprobs"][1:])
    for token, top in zip(lp["tokens"][1:], lp["top_logprobs"][1:]):
        assert token in top   # lm-eval compares the chosen token against its top dict


def test_seed_reproduces(client):
    body = {"model": MODEL_NAME, "prompt": "seeded", "max_tokens": 10, "temperature": 1.0, "seed": 1234}
    a = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    b = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert a == b


def test_logit_bias_forces_token(client):
    r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 4,
                                             "temperature": 1.0, "logit_bias": {"700": 100}, "logprobs": 0,
                                             "return_tokens_as_token_ids": True, "ignore_eos": True})
    assert r.json()["choices"][0]["logprobs"]["tokens"] == ["token_id:700"] * 4


@pytest.mark.parametrize("body, param", [
    ({"temperature": 3.0}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"top_logprobs": 30, "logprobs": True}, "top_logprobs"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"logit_bias": {"99999": 5}}, "logit_bias"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"max_tokens": 200}, "max_tokens"),
    ({"max_tokens": 3, "min_tokens": 5}, "min_tokens"),
])
def test_bad_parameters_are_400_with_param(client, body, param):
    r = client.post("/v1/chat/completions", json=_chat(**body))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"
    assert client.post("/v1/chat/completions", json=_chat()).status_code == 200


def test_nan_and_bad_json_are_400(client):
    raw = '{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}'
    r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = client.post("/v1/chat/completions", content="{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_context_overflow_wording(client):
    prompt = [5] * 100
    r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 50})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == (
        f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you requested 50 output tokens "
        f"and your prompt contains at least 100 input tokens, for a total of at least 150 tokens. Please reduce "
        f"the length of the input prompt or the number of requested output tokens.")


def test_unknown_model_is_404(client):
    r = client.post("/v1/chat/completions", json=_chat(model="gpt-9"))
    assert r.status_code == 404
    assert r.json()["error"]["message"] == "The model `gpt-9` does not exist."
    assert client.get("/health").status_code == 200


def test_chat_max_tokens_defaults_to_remaining_context(client):
    r = client.post("/v1/chat/completions", json={"model": MODEL_NAME, "temperature": 0, "ignore_eos": True,
                                                  "messages": [{"role": "user", "content": "count"}]})
    assert r.status_code == 200
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == MAX_MODEL_LEN
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_length_and_stop_finish_reasons(client):
    body = {"model": MODEL_NAME, "prompt": "Finish", "max_tokens": 6, "ignore_eos": True}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "length"
    # EOS (id 3 in the demo tokenizer) forced as the first token: a "stop" with no text.
    r = client.post("/v1/completions", json={**body, "ignore_eos": False, "logit_bias": {"3": 100}})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == "" and r.json()["usage"]["completion_tokens"] == 1
    # A stop token id after one forced token: "stop", and the stop token is not in the text.
    r = client.post("/v1/chat/completions", json=_chat(logit_bias={"5": 100}, max_tokens=6))
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and "<extra_id_1>" not in choice["message"]["content"]
    events = _events(client.post("/v1/completions", json={**body, "stream": True}))
    assert [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"][0]["finish_reason"]] == \
        ["length"]


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_contract_lm_eval_relies_on(client, max_tokens):
    """lm-eval's loglikelihood call: token-id prompts, echo, logprobs 1, max_tokens 0 or 1."""
    ids = [101, 202, 303, 404, 505, 606]
    body = {"model": MODEL_NAME, "prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": max_tokens,
            "temperature": 0, "seed": 1234, "return_tokens_as_token_ids": True}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) + max_tokens
    assert lp["tokens"][:len(ids)] == [f"token_id:{t}" for t in ids]   # 1:1, no BOS, no re-tokenization
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for token, logprob, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert logprob <= 0 and top[token] == logprob and len(top) <= 2
    assert lp["text_offset"] == sorted(lp["text_offset"])
    if max_tokens == 1:   # the greedy next token is the top-1 of its own distribution
        assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())
    zero = client.post("/v1/completions", json={**body, "max_tokens": 0}).json()["choices"][0]["logprobs"]
    assert zero["token_logprobs"] == lp["token_logprobs"][:len(ids)]


def test_concurrent_identical_greedy_requests_match_a_single_one(checkpoint):
    """32 identical greedy requests batched together (half streamed) give the single request's text."""
    body = {"model": MODEL_NAME, "prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0,
            "ignore_eos": True}

    async def one(http: httpx.AsyncClient, stream: bool) -> str:
        if not stream:
            r = await http.post("/v1/completions", json=body)
            return r.json()["choices"][0]["text"]
        text = []
        async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    text.append(json.loads(line[len("data: "):])["choices"][0]["text"])
        return "".join(text)

    async def run(base: str) -> tuple[str, list[str]]:
        limits = httpx.Limits(max_connections=40)
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as http:
            single = await one(http, stream=False)
            return single, await asyncio.gather(*(one(http, stream=i % 2 == 1) for i in range(32)))

    with uvicorn_thread(make_app(checkpoint, max_model_len=MAX_MODEL_LEN)) as base:
        single, texts = asyncio.run(run(base))
    assert single and texts == [single] * 32
