"""Reward answers in both wire forms, the published scalar, and verifiable instructions."""
from __future__ import annotations

import pytest

from n4_train.sdg.instructions import END_PHRASE, follows, sample_instruction
from n4_train.sdg.rewards import (ATTRIBUTES, WEIGHTS, RewardFormatError, parse_chat_reward, parse_n4_reward,
                                  scalar_from_attributes)

HOSTED = "helpfulness:1.26,correctness:0.43,coherence:3.12,complexity:1.05,verbosity:0.98"


def test_chat_form_as_nvidia_sends_it():
    values = parse_chat_reward(HOSTED)
    assert values == {"helpfulness": 1.26, "correctness": 0.43, "coherence": 3.12, "complexity": 1.05,
                      "verbosity": 0.98}
    assert list(values) == list(ATTRIBUTES)


def test_chat_form_tolerates_layout():
    text = " verbosity = 0.98\ncomplexity:1.05 ; coherence : 3.12,\n correctness:-0.43, helpfulness:1e0, extra:7 "
    assert parse_chat_reward(text) == {"helpfulness": 1.0, "correctness": -0.43, "coherence": 3.12,
                                       "complexity": 1.05, "verbosity": 0.98}


@pytest.mark.parametrize("text", ["", "helpfulness:1.26,correctness:0.43", "I think this answer is good.",
                                  HOSTED.replace("0.98", "nan"), HOSTED.replace("0.98", "high")])
def test_chat_form_rejects_non_rewards(text):
    with pytest.raises(RewardFormatError):
        parse_chat_reward(text)


def test_scalar_is_the_published_weighting():
    raw = [0.5, -1.0, 2.0, 3.0, 1.26, 0.43, 3.12, 1.05, 0.98]
    attributes = dict(zip(ATTRIBUTES, raw[4:]))
    expected = sum(w * v for w, v in zip(WEIGHTS, raw))
    assert scalar_from_attributes(attributes) == pytest.approx(expected)
    assert scalar_from_attributes(attributes) == pytest.approx(0.3 * 1.26 + 0.74 * 0.43 + 0.46 * 3.12
                                                               + 0.47 * 1.05 - 0.33 * 0.98)


def test_n4_form():
    raw = [0.0] * 4 + [1.0, 2.0, 3.0, 4.0, 5.0]
    body = {"object": "reward", "attributes": dict(zip(ATTRIBUTES, raw[4:])), "raw": raw, "reward": 9.5}
    assert parse_n4_reward(body) == (dict(zip(ATTRIBUTES, raw[4:])), raw, 9.5)
    # A head that is not 9 wide: n4 answers reward null; the scalar comes from the attributes.
    attributes, _, scalar = parse_n4_reward({**body, "reward": None})
    assert scalar == pytest.approx(scalar_from_attributes(attributes))
    with pytest.raises(RewardFormatError):
        parse_n4_reward({"error": {"message": "not a reward model"}})


def test_instructions_are_checkable():
    import random

    seen = set()
    for seed in range(200):
        instruction = sample_instruction(random.Random(seed))
        seen.add(instruction["type"])
        assert instruction["text"] and not follows(instruction, "")
    assert len(seen) == 6
    assert follows({"type": "max_words", "value": 5}, "one two three four five")
    assert not follows({"type": "max_words", "value": 5}, "one two three four five six")
    assert follows({"type": "bullets", "value": 2}, "Intro\n- a thing\n- another\nThe end")
    assert not follows({"type": "bullets", "value": 2}, "- a\n- b\n- c")
    assert follows({"type": "paragraphs", "value": 2}, "First one.\n\n  \nSecond one.")
    assert follows({"type": "lowercase", "value": None}, "all lower case here.")
    assert not follows({"type": "lowercase", "value": None}, "Not here")
    assert not follows({"type": "no_commas", "value": None}, "a, b")
    assert follows({"type": "end_phrase", "value": END_PHRASE}, f"Done. {END_PHRASE}\n")
