"""Stages 4 and 5 as pure functions: which responses survive the filters (and why the others do not), and which two
of a prompt's survivors become its preference pair.

Filters run in two steps so the reward model never scores what would be dropped anyway: before scoring, empty,
truncated and duplicate responses; after scoring, unscored ones (the request failed) and those under --min-reward."""
from __future__ import annotations

import re

from n4_train.sdg.records import stable_id

PRE_REASONS = ("empty", "truncated", "duplicate")
POST_REASONS = ("unscored", "below_min_reward")
PAIR_SKIPS = ("no_responses", "too_few_responses", "no_correct_response", "below_margin")


def _normalized(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def prefilter(responses: list[dict], keep_truncated: bool = False) -> dict[str, str]:
    """response id -> reason, for responses that are empty, cut off by max_tokens (finish_reason "length": half an
    answer teaches the policy to stop mid-sentence), or the same text as an earlier response to the same prompt."""
    dropped: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    for r in responses:
        text = _normalized(r["response"])
        if not text:
            dropped[r["id"]] = "empty"
        elif r.get("finish_reason") == "length" and not keep_truncated:
            dropped[r["id"]] = "truncated"
        elif (r["prompt_id"], text) in seen:
            dropped[r["id"]] = "duplicate"
        else:
            seen.add((r["prompt_id"], text))
    return dropped


def postfilter(responses: list[dict], dropped: dict[str, str], scores: dict[str, dict],
               min_reward: float | None) -> dict[str, str]:
    """`dropped` plus the responses without a score or with a reward under min_reward."""
    dropped = dict(dropped)
    for r in responses:
        if r["id"] in dropped:
            continue
        if r["id"] not in scores:
            dropped[r["id"]] = "unscored"
        elif min_reward is not None and scores[r["id"]]["reward"] < min_reward:
            dropped[r["id"]] = "below_min_reward"
    return dropped


def _pick(prompt: dict, kept: list[dict], rewards: dict[str, float], min_margin: float):
    """(chosen, rejected, ranked_by) or (None, None, skip reason)."""
    if "answer" in prompt:
        correct = [r for r in kept if r.get("checks", {}).get("correct")]
        wrong = [r for r in kept if not r.get("checks", {}).get("correct")]
        if not correct:
            return None, None, "no_correct_response"  # a pair of two wrong answers would reward a wrong one
        if wrong:
            # The ground truth orders the pair; of the many possible pairs take the widest reward gap, the one most
            # likely to agree with the RM (RPO fits the policy's gap to this reward gap).
            chosen = max(correct, key=lambda r: rewards[r["id"]])
            return chosen, min(wrong, key=lambda r: rewards[r["id"]]), "ground_truth"
        # All correct: the ground truth cannot tell them apart; the RM judges the rest (clarity, verbosity).
    chosen = max(kept, key=lambda r: rewards[r["id"]])
    rejected = min(kept, key=lambda r: rewards[r["id"]])
    gap = rewards[chosen["id"]] - rewards[rejected["id"]]
    if gap <= 0 or gap < min_margin:  # a tie says nothing about which response is better
        return None, None, "below_margin"
    return chosen, rejected, "reward"


def make_pair(prompt: dict, responses: list[dict], dropped: dict[str, str], scores: dict[str, dict],
              min_margin: float) -> tuple[dict | None, str | None]:
    """The pair record of one prompt (DPO/RPO input: prompt, chosen, rejected, chosen_reward, rejected_reward),
    or None and why not."""
    if not responses:
        return None, "no_responses"
    kept = [r for r in responses if r["id"] not in dropped]
    if len(kept) < 2:
        return None, "too_few_responses"
    rewards = {r["id"]: scores[r["id"]]["reward"] for r in kept}
    chosen, rejected, how = _pick(prompt, kept, rewards, min_margin)
    if chosen is None:
        return None, how
    return {"id": stable_id(chosen["id"], rejected["id"]), "prompt_id": prompt["id"], "task": prompt["task"],
            "kind": prompt["kind"], "prompt": prompt["messages"], "chosen": chosen["response"],
            "rejected": rejected["response"], "chosen_reward": rewards[chosen["id"]],
            "rejected_reward": rewards[rejected["id"]], "chosen_id": chosen["id"], "rejected_id": rejected["id"],
            "ranked_by": how}, None
