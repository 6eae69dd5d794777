"""SFT masking on a worked example, and the template agreeing with the server's."""
from __future__ import annotations

import os

import pytest

from n4_train.tokenization import DataError, TrainTokenizer, render_chat, reward_text

DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "models", "demo")
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is a list?"},
    {"role": "assistant", "content": "A mutable sequence."},
    {"role": "user", "content": "And a tuple? é"},
    {"role": "assistant", "content": "An immutable one."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return TrainTokenizer(DEMO)


def test_only_assistant_turns_and_their_turn_ends_are_trained(tokenizer):
    encoded = tokenizer.encode_chat(CONVERSATION)
    pieces = [tokenizer.sp.id_to_piece(i) for i in encoded.ids]
    trained = "".join(p for p, t in zip(pieces, encoded.trained) if t).replace("▁", " ").replace("<0x0A>", "\n")
    untrained = "".join(p for p, t in zip(pieces, encoded.trained) if not t).replace("▁", " ")
    # Worked example: exactly the two answers, each followed by the newline and <extra_id_1> that end the turn.
    assert trained == "A mutable sequence.\n<extra_id_1>An immutable one.\n<extra_id_1>"
    assert untrained.replace("<0x0A>", "\n").startswith("<extra_id_0>System\nBe brief.\n<extra_id_1>User\n")
    assert "What" in untrained and "tuple" in untrained and "Assistant" in untrained
    assert not any(t for p, t in zip(pieces, encoded.trained) if p in ("User", "Sys", "<extra_id_0>"))
    # The ids are SentencePiece's encoding of the whole rendered text: what the server feeds the model.
    assert encoded.ids == tokenizer.encode(render_chat(CONVERSATION)[0])


def test_last_turn_only_masks_earlier_answers(tokenizer):
    encoded = tokenizer.encode_chat(CONVERSATION, last_turn_only=True)
    trained = tokenizer.decode([i for i, t in zip(encoded.ids, encoded.trained) if t])
    assert trained.startswith("An immutable one.")


def test_template_matches_the_server():
    from server.api.tokenizer import Tokenizer
    served = Tokenizer.from_pretrained(DEMO)
    text, _ = render_chat(CONVERSATION)
    assert text == served.apply_chat_template(CONVERSATION, add_generation_prompt=False) + "<extra_id_1>"
    assert reward_text(CONVERSATION) == served.apply_chat_template(CONVERSATION, add_generation_prompt=False)
    # The generation prompt the server sends is a prefix of the training text up to the answer.
    prompt = served.apply_chat_template(CONVERSATION[:4], add_generation_prompt=True)
    assert text.startswith(prompt + CONVERSATION[4]["content"])


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty"),
    ([{"role": "user", "content": "hi"}], "end with an assistant"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}, {"role": "assistant", "content": "a"}],
     "only allowed first"),
    ([{"role": "tool", "content": "hi"}, {"role": "assistant", "content": "a"}], "messages\\[0\\]"),
])
def test_bad_conversations_are_rejected(messages, match):
    with pytest.raises(DataError, match=match):
        render_chat(messages)
