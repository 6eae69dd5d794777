"""The whole run: check the servers, then prompts -> responses -> scores -> filter -> pairs -> summary. Each stage
reads what the previous one left on disk, so a rerun continues a killed one (see records.py)."""
from __future__ import annotations

import os

import httpx

from n4_train.sdg.client import ApiClient, RetryPolicy, chat
from n4_train.sdg.config import SDGConfig
from n4_train.sdg.errors import RequestFailed, SDGError
from n4_train.sdg.instructions import follows
from n4_train.sdg.math_problems import extract_answer, is_correct
from n4_train.sdg.prompt_stage import run_prompt_stage
from n4_train.sdg.ranking import make_pair, postfilter, prefilter
from n4_train.sdg.records import JsonlAppender, by_key, read_jsonl, stable_id, write_json_atomic, write_jsonl_atomic
from n4_train.sdg.rewards import RewardScorer
from n4_train.sdg.state import RunState, run_all
from n4_train.sdg.summary import build_summary


def make_client(config: SDGConfig, base_url: str, api_key: str | None, transport=None) -> ApiClient:
    return ApiClient(base_url, api_key, config.concurrency, RetryPolicy(config.retries, config.backoff_s),
                     config.timeout_s, transport, seed=config.seed)


async def resolve_model(client: ApiClient, model: str | None, flag: str) -> str:
    """The model to use: --model/--reward-model when given and served, else the first listed. Also the reachability
    check: a wrong URL fails here, before any work, with one clear line."""
    try:
        listed = [m.get("id") for m in (await client.get("/models")).get("data", []) if isinstance(m, dict)]
    except RequestFailed as e:
        if e.status is None:
            raise SDGError(f"cannot reach {flag} {client.base_url}: {e}") from None
        if e.status in (401, 403):
            raise SDGError(f"{flag} {client.base_url} refused the API key: {e}") from None
        if model is None:
            raise SDGError(f"{flag} {client.base_url} does not list its models ({e}); name one with "
                           f"{'--model' if flag == '--base-url' else '--reward-model'}") from None
        return model  # some endpoints lack /models; the named model is trusted
    if model is None:
        if not listed:
            raise SDGError(f"{flag} {client.base_url}/models lists no models")
        return listed[0]
    if listed and model not in listed and flag == "--base-url":
        # Hosted APIs may not list every model they serve: ask the model itself before refusing it.
        try:
            await chat(client, model, [{"role": "user", "content": "Hi"}], max_tokens=1)
        except RequestFailed as e:
            raise SDGError(f"{flag} {client.base_url} does not serve {model!r} (it lists "
                           f"{', '.join(listed[:10])}): {e}") from None
    return model  # a reward model is checked by scoring a probe conversation


# ---- stage 2: responses -------------------------------------------------------------------------------------------
def response_checks(prompt: dict, text: str) -> dict:
    """What can be verified without a reward model: the final number against a math answer, and the appended
    instruction."""
    checks = {}
    if "answer" in prompt:
        checks.update(correct=is_correct(text, prompt["answer"]), extracted=extract_answer(text))
    if "instruction" in prompt:
        checks["instruction_followed"] = follows(prompt["instruction"], text)
    return checks


async def _respond(state: RunState, prompt: dict, missing: list[int], out: JsonlAppender) -> None:
    """One request with n = the missing responses (the server shares the prompt's prefill among them)."""
    config = state.config
    try:
        response = await chat(state.generator, state.model, prompt["messages"], n=len(missing),
                              temperature=config.temperature, max_tokens=config.max_tokens,
                              seed=state.seed_for("responses", prompt["id"], missing))
    except RequestFailed as e:
        if len(missing) > 1 and e.status == 400:
            # Some OpenAI-compatible servers (and hosted APIs) refuse n > 1: ask for each response on its own, each
            # with its own seed. A prompt the server really rejects then fails once per response, and is recorded.
            for k in missing:
                await _respond(state, prompt, [k], out)
            return
        state.fail("responses", prompt["id"], e)
        return
    choices = sorted(response["choices"], key=lambda c: c.get("index", 0))
    for k, choice in zip(missing, choices):  # a server that returns fewer choices leaves the rest for a rerun
        text = (choice.get("message") or {}).get("content") or ""
        out.write({"id": stable_id(prompt["id"], k), "prompt_id": prompt["id"], "index": k, "response": text,
                   "finish_reason": choice.get("finish_reason"), "model": response.get("model", state.model),
                   "usage": response.get("usage"), "request_n": len(missing),
                   "checks": response_checks(prompt, text)})


async def run_response_stage(state: RunState, prompts: list[dict]) -> list[dict]:
    k = state.config.responses_per_prompt
    with JsonlAppender(state.config.path("responses.jsonl")) as out:
        todo = []
        for p in prompts:
            missing = [i for i in range(k) if stable_id(p["id"], i) not in out.ids]
            if missing:
                todo.append((p, missing))
        await run_all((_respond(state, p, m, out) for p, m in todo), len(todo), "responses")
        state.note("responses", "written", out.written)
        wanted = {stable_id(p["id"], i) for p in prompts for i in range(k)}
        return [r for r in out.records if r["id"] in wanted]


# ---- stage 3: scores ----------------------------------------------------------------------------------------------
async def _score(state: RunState, scorer: RewardScorer, prompt: dict, response: dict, out: JsonlAppender) -> None:
    messages = prompt["messages"] + [{"role": "assistant", "content": response["response"]}]
    try:
        score = await scorer.score(messages)
    except RequestFailed as e:
        state.fail("scores", response["id"], e)
        return
    out.write({"id": response["id"], "prompt_id": prompt["id"], **score, "model": scorer.model})


async def run_score_stage(state: RunState, scorer: RewardScorer, prompts: list[dict], responses: list[dict],
                          dropped: dict[str, str]) -> dict[str, dict]:
    """Scores (by response id) of every response that passed the pre-scoring filters."""
    prompt_by_id = {p["id"]: p for p in prompts}
    with JsonlAppender(state.config.path("scores.jsonl")) as out:
        todo = [r for r in responses if r["id"] not in dropped and r["id"] not in out.ids]
        await run_all((_score(state, scorer, prompt_by_id[r["prompt_id"]], r, out) for r in todo), len(todo),
                      "scores")
        state.note("scores", "written", out.written)
        return {s["id"]: s for s in out.records}


# ---- stages 4 and 5: filter and pairs (recomputed whole each run: cheap, and idempotent) ---------------------------
def write_filter_and_pairs(state: RunState, prompts: list[dict], responses: list[dict], pre: dict[str, str],
                           scores: dict[str, dict]) -> tuple[dict[str, str], list[dict], dict[str, int]]:
    """Writes filtered.jsonl (one line per dropped response, with the reason) and pairs.jsonl."""
    config = state.config
    dropped = postfilter(responses, pre, scores, config.min_reward)
    write_jsonl_atomic(config.path("filtered.jsonl"),
                       ({"id": r["id"], "prompt_id": r["prompt_id"], "reason": dropped[r["id"]]}
                        for r in responses if r["id"] in dropped))
    by_prompt = by_key(responses, "prompt_id")
    pairs, skipped = [], {}
    for p in prompts:
        pair, why = make_pair(p, by_prompt.get(p["id"], []), dropped, scores, config.min_margin)
        if pair is None:
            skipped[why] = skipped.get(why, 0) + 1
        else:
            pairs.append(pair)
    write_jsonl_atomic(config.path("pairs.jsonl"), pairs)
    return dropped, pairs, skipped


async def run_pipeline(config: SDGConfig, transport: httpx.AsyncBaseTransport | None = None) -> dict:
    """Run every stage up to config.stop_after; returns (and writes) the summary. `transport` is for tests."""
    try:
        os.makedirs(config.output, exist_ok=True)
    except OSError as e:
        raise SDGError(f"--output {config.output}: {e.strerror}") from None
    async with make_client(config, config.base_url, config.api_key, transport) as generator:
        state = RunState(config, generator, await resolve_model(generator, config.model, "--base-url"))
        reward = None
        if config.needs_reward:
            reward = make_client(config, config.reward_base_url, config.reward_api_key or config.api_key, transport)
        try:
            scorer = await _reward_scorer(config, reward) if reward else None
            return await _stages(state, scorer)
        finally:
            if reward:
                await reward.aclose()


async def _reward_scorer(config: SDGConfig, client: ApiClient) -> RewardScorer:
    model = await resolve_model(client, config.reward_model, "--reward-base-url")
    scorer = RewardScorer(client, model, config.reward_format)
    await scorer.check()
    return scorer


async def _stages(state: RunState, scorer: RewardScorer | None) -> dict:
    config = state.config
    slots = await run_prompt_stage(state)
    prompts = [p for p in slots if "duplicate_of" not in p]
    responses, scores, filtered = None, None, None
    if config.stop_after != "prompts":
        responses = await run_response_stage(state, prompts)
    if scorer is not None:
        pre = prefilter(responses, config.keep_truncated)
        scores = await run_score_stage(state, scorer, prompts, responses, pre)
        if config.stop_after == "pairs":
            filtered = write_filter_and_pairs(state, prompts, responses, pre, scores)
    summary = build_summary(state, scorer, read_jsonl(config.path("topics.jsonl")), prompts, responses, scores,
                            filtered)
    summary["prompts"]["duplicates"] = len(slots) - len(prompts)
    write_json_atomic(config.path("summary.json"), summary)
    return summary
