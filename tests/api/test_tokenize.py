"""/tokenize, /detokenize and /tokenizer_info: the ids they give are the ids the serving path runs, and they
carry what lm-eval's remote tokenizer reads (eos_token, a chat template it can render itself)."""
from __future__ import annotations

import jinja2
import pytest

from model.config import ModelConfig
from server.api.tokenizer import Tokenizer
from tests.api.conftest import MODEL_NAME, serve_checkpoint
from tests.utils import make_tiny_checkpoint

CONFIG = ModelConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                     torch_dtype="float32")
CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    path = make_tiny_checkpoint(str(tmp_path_factory.mktemp("tok")), CONFIG, seed=3)
    with serve_checkpoint(path) as c:
        c.tokenizer = Tokenizer.from_pretrained(path)
        yield c


def test_tokenize_prompt_gives_the_ids_completions_run(client):
    r = client.post("/tokenize", json={"prompt": "The quick brown fox", "model": MODEL_NAME})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 256 and body["token_strs"] is None
    echo = client.post("/v1/completions", json={"prompt": "The quick brown fox", "echo": True, "max_tokens": 0,
                                                "logprobs": 0, "return_tokens_as_token_ids": True}).json()
    assert [f"token_id:{t}" for t in body["tokens"]] == echo["choices"][0]["logprobs"]["tokens"]
    assert echo["usage"]["prompt_tokens"] == body["count"]


def test_add_special_tokens_prepends_bos_and_control_pieces_map_to_their_ids(client):
    tok = client.tokenizer
    plain = client.post("/tokenize", json={"prompt": "hello", "add_special_tokens": False}).json()["tokens"]
    with_bos = client.post("/tokenize", json={"prompt": "hello", "add_special_tokens": True}).json()["tokens"]
    assert with_bos == [tok.bos_token_id] + plain
    # lm-eval's remote tokenizer finds the EOS id as tokenize(eos_token)[0].
    eos = client.get("/tokenizer_info").json()["eos_token"]
    assert client.post("/tokenize", json={"prompt": eos, "add_special_tokens": False}).json()["tokens"] == [
        tok.eos_token_id]


def test_tokenize_messages_matches_chat_usage(client):
    for messages in CONVERSATIONS:
        body = client.post("/tokenize", json={"messages": messages}).json()
        chat = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1}).json()
        assert body["count"] == chat["usage"]["prompt_tokens"]
    strs = client.post("/tokenize", json={"messages": CONVERSATIONS[0], "return_token_strs": True}).json()
    assert strs["token_strs"][0] == "<extra_id_0>"


def test_detokenize_round_trip_and_bad_ids(client):
    ids = client.post("/tokenize", json={"prompt": "Round trip, with punctuation!"}).json()["tokens"]
    r = client.post("/detokenize", json={"tokens": ids})
    assert r.status_code == 200 and r.json() == {"prompt": "Round trip, with punctuation!"}
    for bad in ([10 ** 6], [-1]):
        r = client.post("/detokenize", json={"tokens": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


def test_tokenizer_info_has_what_remote_tokenizers_read(client):
    info = client.get("/tokenizer_info").json()
    tok = client.tokenizer
    assert info["eos_token"] == "</s>" and info["eos_token_id"] == tok.eos_token_id
    assert info["bos_token"] == "<s>" and info["pad_token"] == "<pad>"
    assert info["vocab_size"] == tok.vocab_size and info["model_max_length"] == 256
    template = jinja2.Environment().from_string(info["chat_template"])
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            assert template.render(messages=messages, add_generation_prompt=add_generation_prompt) == \
                tok.apply_chat_template(messages, add_generation_prompt)


@pytest.mark.parametrize("body, status", [
    ({}, 400),
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400),
    ({"prompt": 5}, 400),
    ({"messages": []}, 400),
    ({"prompt": "a", "model": "other"}, 404),
])
def test_bad_tokenize_requests(client, body, status):
    r = client.post("/tokenize", json=body)
    assert r.status_code == status and r.json()["error"]["message"]
