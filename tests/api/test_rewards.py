"""A reward checkpoint behind the OpenAI API: /v1/chat/completions answers with NVIDIA's hosted content format,
/v1/rewards with the structured attributes and the weighted scalar; both equal the engine's values for the same
rendered conversation; concurrent requests score as single ones; wrong endpoints answer 400 in the envelope."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from model.config import ModelConfig
from server.api.rewards import ATTRIBUTES, WEIGHTS
from server.api.tokenizer import Tokenizer
from server.engine.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.sampling import SamplingParams
from tests.api.conftest import MODEL_NAME, make_app, serve_checkpoint, uvicorn_thread
from tests.utils import make_tiny_checkpoint, make_tiny_reward_checkpoint

CONFIG = ModelConfig(vocab_size=4096, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                     torch_dtype="float32")
MAX_MODEL_LEN = 128


def _conversation(i: int = 0) -> list[dict]:
    return [{"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"{i} plus {i} is {2 * i}." + " Indeed." * (i % 4)}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_reward_checkpoint(str(tmp_path_factory.mktemp("reward-api")), CONFIG, seed=3)


@pytest.fixture(scope="module")
def client(checkpoint):
    with serve_checkpoint(checkpoint, max_model_len=MAX_MODEL_LEN) as c:
        yield c


@pytest.fixture(scope="module")
def engine_values(checkpoint) -> dict[int, list[float]]:
    """The engine's 9 values for conversations 0..7, rendered as the server renders them (no generation prompt)."""
    tokenizer = Tokenizer.from_pretrained(checkpoint)
    engine = LLMEngine.from_pretrained(checkpoint, EngineConfig(max_model_len=MAX_MODEL_LEN, num_kv_blocks=64))
    for i in range(8):
        text = tokenizer.apply_chat_template(_conversation(i), add_generation_prompt=False)
        assert text.endswith(_conversation(i)[-1]["content"] + "\n")
        engine.add_request(str(i), tokenizer.encode(text), SamplingParams(max_tokens=0))
    values = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.reward is not None:
                values[int(out.request_id)] = out.reward
    return values


def _content(raw: list[float]) -> str:
    return ",".join(f"{name}:{value:.2f}" for name, value in zip(ATTRIBUTES, raw[4:]))


def test_chat_completion_is_nvidia_format(client, engine_values):
    r = client.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": _conversation(1)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == _content(engine_values[1])
    pairs = [p.split(":") for p in choice["message"]["content"].split(",")]
    assert [name for name, _ in pairs] == list(ATTRIBUTES)
    assert all(len(value.split(".")[1]) == 2 for _, value in pairs)
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] == 0
    assert usage["total_tokens"] == usage["prompt_tokens"]


def test_chat_stream_sends_content_then_stop(client, engine_values):
    r = client.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": _conversation(2), "stream": True,
                                                  "stream_options": {"include_usage": True}})
    events = [line[len("data: "):] for line in r.text.split("\n\n") if line.strip()]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == _content(engine_values[2])
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 0


def test_rewards_endpoint(client, engine_values):
    r = client.post("/v1/rewards", json={"model": MODEL_NAME, "messages": _conversation(3)})
    assert r.status_code == 200, r.text
    body = r.json()
    raw = engine_values[3]
    assert body["object"] == "reward" and body["model"] == MODEL_NAME and body["id"]
    assert body["raw"] == pytest.approx(raw, abs=1e-6) and len(body["raw"]) == 9
    assert body["attributes"] == pytest.approx(dict(zip(ATTRIBUTES, raw[4:])), abs=1e-6)
    assert list(body["attributes"]) == list(ATTRIBUTES)
    assert body["reward"] == pytest.approx(sum(w * v for w, v in zip(WEIGHTS, raw)), abs=1e-6)
    assert WEIGHTS == (0, 0, 0, 0, 0.3, 0.74, 0.46, 0.47, -0.33)
    assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["completion_tokens"] == 0


def test_concurrent_requests_equal_single(checkpoint, engine_values):
    async def run(base: str):
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            rewards = [http.post("/v1/rewards", json={"messages": _conversation(i)}) for i in range(8)]
            chats = [http.post("/v1/chat/completions", json={"messages": _conversation(i)}) for i in range(8)]
            return await asyncio.gather(*rewards, *chats)

    with uvicorn_thread(make_app(checkpoint, max_model_len=MAX_MODEL_LEN)) as base:
        responses = asyncio.run(run(base))
    assert all(r.status_code == 200 for r in responses)
    for i in range(8):
        assert responses[i].json()["raw"] == pytest.approx(engine_values[i], abs=1e-5)
        assert responses[8 + i].json()["choices"][0]["message"]["content"] == _content(engine_values[i])


def test_errors_on_a_reward_model(client):
    r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "hello"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert "reward model" in error["message"] and "/v1/rewards" in error["message"]
    assert error["type"] == "invalid_request_error"
    # The conversation must end with the response to score.
    r = client.post("/v1/rewards", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "assistant" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"messages": _conversation(1), "logprobs": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    r = client.post("/v1/rewards", json={"model": "other", "messages": _conversation(1)})
    assert r.status_code == 404
    assert client.post("/v1/rewards", json={"messages": _conversation(1)}).status_code == 200  # still serving


def test_rewards_on_a_causal_model_is_400(tmp_path):
    path = make_tiny_checkpoint(str(tmp_path), CONFIG, seed=3)
    with serve_checkpoint(path, max_model_len=MAX_MODEL_LEN) as c:
        r = c.post("/v1/rewards", json={"model": MODEL_NAME, "messages": _conversation(1)})
        assert r.status_code == 400
        error = r.json()["error"]
        assert "not a reward model" in error["message"] and error["code"] == "not_a_reward_model"
        assert error["type"] == "invalid_request_error"
