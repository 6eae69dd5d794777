"""Filters (with their reasons) and preference pairs: reward ranking with a margin, ground truth over the reward
model for math with an answer, and the DPO/RPO record format."""
from __future__ import annotations

from n4_train.sdg.ranking import make_pair, postfilter, prefilter

PROMPT = {"id": "p1", "task": "open_qa", "kind": "single_turn", "messages": [{"role": "user", "content": "Why?"}]}
MATH = {"id": "m1", "task": "math", "kind": "single_turn", "answer": 12,
        "messages": [{"role": "user", "content": "How many?"}]}


def _response(rid, text="some answer", prompt_id="p1", finish="stop", correct=None):
    checks = {} if correct is None else {"correct": correct}
    return {"id": rid, "prompt_id": prompt_id, "response": text, "finish_reason": finish, "checks": checks}


def _scores(**rewards):
    return {rid: {"reward": r} for rid, r in rewards.items()}


def test_prefilter_reasons():
    responses = [_response("a", "  "), _response("b", "cut off", finish="length"), _response("c", "Same  answer"),
                 _response("d", "Same answer\n"), _response("e", "Same answer", prompt_id="p2"),
                 _response("f", "fine")]
    assert prefilter(responses) == {"a": "empty", "b": "truncated", "d": "duplicate"}
    assert prefilter(responses, keep_truncated=True) == {"a": "empty", "d": "duplicate"}


def test_postfilter_reasons():
    responses = [_response("a"), _response("b", "x"), _response("c", "y"), _response("d", "z")]
    dropped = postfilter(responses, {"a": "empty"}, _scores(b=1.0, c=-2.0), min_reward=0.0)
    assert dropped == {"a": "empty", "c": "below_min_reward", "d": "unscored"}
    assert postfilter(responses, {}, _scores(a=0, b=1.0, c=-2.0, d=0), min_reward=None) == {}


def test_reward_pair_is_best_against_worst():
    responses = [_response("a", "mid"), _response("b", "best"), _response("c", "worst")]
    pair, why = make_pair(PROMPT, responses, {}, _scores(a=0.5, b=2.0, c=-1.0), min_margin=0.0)
    assert why is None
    assert pair["prompt"] == PROMPT["messages"] and pair["chosen"] == "best" and pair["rejected"] == "worst"
    assert (pair["chosen_reward"], pair["rejected_reward"]) == (2.0, -1.0)
    assert (pair["chosen_id"], pair["rejected_id"], pair["ranked_by"]) == ("b", "c", "reward")
    assert {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"} <= set(pair)
    assert isinstance(pair["chosen"], str) and isinstance(pair["prompt"], list)


def test_margin_and_ties():
    responses = [_response("a", "one"), _response("b", "two")]
    assert make_pair(PROMPT, responses, {}, _scores(a=1.0, b=0.7), min_margin=0.5) == (None, "below_margin")
    assert make_pair(PROMPT, responses, {}, _scores(a=1.0, b=0.4), min_margin=0.5)[0]["chosen"] == "one"
    assert make_pair(PROMPT, responses, {}, _scores(a=1.0, b=1.0), min_margin=0.0) == (None, "below_margin")


def test_dropped_responses_do_not_pair():
    responses = [_response("a", "one"), _response("b", "two"), _response("c", "three")]
    assert make_pair(PROMPT, responses, {"a": "empty", "b": "truncated"}, _scores(c=1.0), 0.0) == \
        (None, "too_few_responses")
    pair, _ = make_pair(PROMPT, responses, {"b": "truncated"}, _scores(a=3.0, c=1.0), 0.0)
    assert (pair["chosen_id"], pair["rejected_id"]) == ("a", "c")
    assert make_pair(PROMPT, [], {}, {}, 0.0) == (None, "no_responses")


def test_ground_truth_beats_the_reward_model():
    responses = [_response("r", "It is 12.", "m1", correct=True), _response("w1", "It is 13.", "m1", correct=False),
                 _response("w2", "It is 11.", "m1", correct=False)]
    # The RM prefers the wrong answers; the ground truth decides anyway.
    pair, why = make_pair(MATH, responses, {}, _scores(r=-1.0, w1=3.0, w2=2.0), min_margin=10.0)
    assert why is None and pair["ranked_by"] == "ground_truth"
    assert (pair["chosen"], pair["rejected"]) == ("It is 12.", "It is 11.")  # the widest reward gap
    assert (pair["chosen_reward"], pair["rejected_reward"]) == (-1.0, 2.0)


def test_ground_truth_without_a_correct_or_a_wrong_answer():
    wrong = [_response("a", "7", "m1", correct=False), _response("b", "8", "m1", correct=False)]
    assert make_pair(MATH, wrong, {}, _scores(a=1.0, b=0.0), 0.0) == (None, "no_correct_response")
    right = [_response("a", "12", "m1", correct=True), _response("b", "12!", "m1", correct=True)]
    pair, _ = make_pair(MATH, right, {}, _scores(a=0.0, b=1.0), 0.0)
    assert pair["ranked_by"] == "reward" and pair["chosen"] == "12!"
