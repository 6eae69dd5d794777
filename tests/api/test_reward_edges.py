"""Edges of serving a reward model: bad conversations answer 400 in the OpenAI envelope (streaming or not), a
conversation that exactly fills the context is scored and one token more is refused, n > 1 and prefix caching give
the same values as a single uncached request, and the system/developer roles render the same prompt."""
from __future__ import annotations

import pytest

from model.config import ModelConfig
from server.api.tokenizer import Tokenizer
from tests.api.conftest import MODEL_NAME, metric_value, serve_checkpoint
from tests.utils import make_tiny_reward_checkpoint

CONFIG = ModelConfig(vocab_size=4096, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                     torch_dtype="float32")
MAX_MODEL_LEN = 128
CONVERSATION = [{"role": "user", "content": "Name a prime number larger than ten."},
                {"role": "assistant", "content": "Eleven is a prime number larger than ten."}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_reward_checkpoint(str(tmp_path_factory.mktemp("reward-edges")), CONFIG, seed=11)


@pytest.fixture(scope="module")
def client(checkpoint):
    with serve_checkpoint(checkpoint, max_model_len=MAX_MODEL_LEN) as c:
        yield c


def _prompt_len(checkpoint: str, messages: list[dict]) -> int:
    tokenizer = Tokenizer.from_pretrained(checkpoint)
    return len(tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=False)))


def _raw(client, messages: list[dict]) -> list[float]:
    r = client.post("/v1/rewards", json={"model": MODEL_NAME, "messages": messages})
    assert r.status_code == 200, r.text
    return r.json()["raw"]


def _assert_400(r, param: str | None = "messages") -> dict:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize("path", ["/v1/rewards", "/v1/chat/completions"])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_conversations_are_400_in_the_envelope(client, path, stream):
    body = {"stream": True} if stream and path.endswith("completions") else {}
    _assert_400(client.post(path, json={**body, "messages": []}))
    # Ends with the user: that asks for generation, which a reward model cannot do.
    error = _assert_400(client.post(path, json={**body, "messages": CONVERSATION[:1]}))
    assert "assistant" in error["message"]
    # A system message after the first: the chat template's own refusal, still a 400.
    _assert_400(client.post(path, json={**body, "messages": CONVERSATION + [{"role": "system", "content": "x"},
                                                                             {"role": "assistant", "content": "y"}]}))
    _assert_400(client.post(path, json={**body, "messages": [{"role": "tool", "content": "x"}]}))
    assert client.post("/v1/rewards", json={"messages": CONVERSATION}).status_code == 200  # still serving


def test_a_conversation_that_fills_the_context_is_scored(checkpoint):
    """max_tokens is 0, so a prompt of exactly max_model_len tokens fits; one token more is a 400 naming the limit."""
    length = _prompt_len(checkpoint, CONVERSATION)
    with serve_checkpoint(checkpoint, max_model_len=MAX_MODEL_LEN) as c:
        expected = _raw(c, CONVERSATION)
    with serve_checkpoint(checkpoint, max_model_len=length, block_size=4) as c:
        assert _raw(c, CONVERSATION) == pytest.approx(expected, abs=1e-5)
    with serve_checkpoint(checkpoint, max_model_len=length - 1, block_size=4) as c:
        for path in ("/v1/rewards", "/v1/chat/completions"):
            error = _assert_400(c.post(path, json={"messages": CONVERSATION}))
            assert f"maximum context length is {length - 1} tokens" in error["message"]


def test_n_choices_score_alike(client):
    raw = _raw(client, CONVERSATION)
    r = client.post("/v1/chat/completions", json={"messages": CONVERSATION, "n": 3})
    assert r.status_code == 200, r.text
    contents = [c["message"]["content"] for c in r.json()["choices"]]
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2]
    expected = ",".join(f"{v:.2f}" for v in raw[4:])
    assert [",".join(p.split(":")[1] for p in c.split(",")) for c in contents] == [expected] * 3
    assert r.json()["usage"]["prompt_tokens"] == _prompt_len_from(client, CONVERSATION)


def _prompt_len_from(client, messages) -> int:
    return client.post("/v1/rewards", json={"messages": messages}).json()["usage"]["prompt_tokens"]


def test_prefix_caching_does_not_change_the_values(checkpoint, client):
    """The same conversation twice and one sharing its prompt: the cached blocks are reused (the last token is
    always recomputed), and every value equals the uncached server's."""
    other = CONVERSATION[:1] + [{"role": "assistant", "content": "Thirteen."}]
    long = [{"role": "system", "content": "You answer in full sentences. " * 6}] + CONVERSATION
    plain = [_raw(client, m) for m in (CONVERSATION, other, long)]
    with serve_checkpoint(checkpoint, max_model_len=MAX_MODEL_LEN, block_size=4, enable_prefix_caching=True) as c:
        for _ in range(2):
            for messages, expected in zip((CONVERSATION, other, long), plain):
                assert _raw(c, messages) == pytest.approx(expected, abs=1e-5)
        # The cache was used, so the equality above means something.
        assert metric_value(c.get("/metrics").text, "n4:prefix_cache_hits_total") > 0


def test_developer_is_system_and_text_parts_are_joined(client):
    system = [{"role": "system", "content": "Be brief."}] + CONVERSATION
    developer = [{"role": "developer", "content": "Be brief."}] + CONVERSATION
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}] + CONVERSATION
    assert _raw(client, developer) == _raw(client, system) == _raw(client, parts)
    assert _raw(client, system) != _raw(client, CONVERSATION)
