"""summary.json: counts per stage over the whole output directory (so they add up across resumed runs), what this
run added, why responses were dropped and prompts got no pair, and the requests that failed."""
from __future__ import annotations

from collections import Counter

from n4_train.sdg.ranking import PAIR_SKIPS, POST_REASONS, PRE_REASONS
from n4_train.sdg.state import RunState


def _count(records, key) -> dict[str, int]:
    return dict(sorted(Counter(str(r.get(key)) for r in records).items()))


def _prompts(state: RunState, prompts: list[dict], topics: list[dict]) -> dict:
    return {"total": len(prompts), "by_task": _count(prompts, "task"), "by_kind": _count(prompts, "kind"),
            "by_source": _count(prompts, "source"),
            "followup_source": _count([p for p in prompts if "followup_source" in p], "followup_source"),
            "with_answer": sum("answer" in p for p in prompts),
            "topics_by_source": _count(topics, "source"), "this_run": state.notes.get("prompts", {})}


def _responses(state: RunState, responses: list[dict]) -> dict:
    checks = [r.get("checks", {}) for r in responses]
    return {"total": len(responses), "by_finish_reason": _count(responses, "finish_reason"),
            "math_correct": sum(bool(c.get("correct")) for c in checks),
            "math_checked": sum("correct" in c for c in checks),
            "instruction_followed": sum(bool(c.get("instruction_followed")) for c in checks),
            "instruction_checked": sum("instruction_followed" in c for c in checks),
            "this_run": state.notes.get("responses", {})}


def _filter(responses: list[dict], dropped: dict[str, str]) -> dict:
    reasons = Counter(dropped[r["id"]] for r in responses if r["id"] in dropped)
    return {"input": len(responses), "kept": len(responses) - sum(reasons.values()),
            "dropped": {reason: reasons.get(reason, 0) for reason in PRE_REASONS + POST_REASONS}}


def _pairs(prompts: list[dict], pairs: list[dict], skipped: dict[str, int]) -> dict:
    return {"total": len(pairs), "prompts": len(prompts), "by_ranked_by": _count(pairs, "ranked_by"),
            "by_task": _count(pairs, "task"), "skipped": {why: skipped.get(why, 0) for why in PAIR_SKIPS}}


def build_summary(state: RunState, scorer, topics: list[dict], prompts: list[dict], responses: list[dict] | None,
                  scores: dict[str, dict] | None, filtered: tuple | None) -> dict:
    """`filtered` is (dropped reasons by response id, pairs, pair skip counts); None for the stages not run."""
    config = state.config
    summary = {"config": config.public(), "generator_model": state.model,
               "reward_model": scorer.model if scorer else None,
               "prompts": _prompts(state, prompts, topics)}
    if responses is not None:
        summary["responses"] = _responses(state, responses)
    if scores is not None:
        ids = {r["id"] for r in responses}
        summary["scores"] = {"total": sum(i in scores for i in ids), "this_run": state.notes.get("scores", {})}
    if filtered is not None:
        dropped, pairs, skipped = filtered
        summary["filter"] = _filter(responses, dropped)
        summary["pairs"] = _pairs(prompts, pairs, skipped)
    requests = {"generator": state.generator.stats.as_dict()}
    if scorer is not None:
        requests["reward"] = scorer.client.stats.as_dict()
    summary["requests"] = requests
    summary["failures_this_run"] = {"total": sum(state.failure_counts.values()), "by_stage": state.failure_counts,
                                    "first": state.failures}
    return summary
