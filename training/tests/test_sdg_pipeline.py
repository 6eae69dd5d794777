"""The whole pipeline against fake in-process servers (an httpx.MockTransport playing a generator at http://gen/v1
and a reward model at http://rm/v1): record formats, resuming (nothing is asked twice; a torn file continues),
failed requests counted rather than fatal, and bad servers stopping the run with one clear line."""
from __future__ import annotations

import asyncio
import json
import os
import zlib
from collections import Counter

import httpx
import pytest

from n4_train.sdg import cli
from n4_train.sdg.config import TASKS, SDGConfig
from n4_train.sdg.errors import SDGError
from n4_train.sdg.pipeline import run_pipeline
from n4_train.sdg.records import read_jsonl
from n4_train.sdg.rewards import ATTRIBUTES, WEIGHTS

FILES = ("topics.jsonl", "prompts.jsonl", "responses.jsonl", "scores.jsonl", "filtered.jsonl", "pairs.jsonl")


class FakeServers:
    """Deterministic answers keyed on the request, so a rerun with the same seeds gets the same text."""

    def __init__(self, fail_responses_for: str | None = None, reward_form: bool = True):
        self.calls: Counter = Counter()
        self.fail_responses_for = fail_responses_for  # substring of a prompt whose responses always 500
        self.reward_form = reward_form                # False: the "reward" server is a plain generator

    def __call__(self, request: httpx.Request) -> httpx.Response:
        host, path = request.url.host, request.url.path
        self.calls[host, path] += 1
        if path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": f"{host}-model"}]})
        body = json.loads(request.content)
        if host == "rm" and path == "/v1/rewards":
            if not self.reward_form:
                return httpx.Response(400, json={"error": {"message": "not a reward model",
                                                           "code": "not_a_reward_model"}})
            return httpx.Response(200, json=self._reward(body["messages"][-1]["content"]))
        answer = self._chat(body)
        return answer if isinstance(answer, httpx.Response) else httpx.Response(200, json=answer)

    @staticmethod
    def _reward(text: str) -> dict:
        h = zlib.crc32(text.encode())
        raw = [0.0] * 4 + [((h >> (4 * i)) % 40) / 10 for i in range(5)]
        return {"object": "reward", "attributes": dict(zip(ATTRIBUTES, raw[4:])), "raw": raw,
                "reward": sum(w * v for w, v in zip(WEIGHTS, raw))}

    def _chat(self, body: dict) -> dict:
        if body["model"] not in ("gen-model", "rm-model", "unlisted-model"):
            return httpx.Response(404, json={"error": {"message": f"The model `{body['model']}` does not exist."}})
        asked = body["messages"][-1]["content"]
        if self.fail_responses_for and self.fail_responses_for in asked:
            return httpx.Response(500, json={"error": {"message": "boom"}})
        n = body.get("n", 1)
        texts = [self._answer(asked, body.get("seed", 0), i) for i in range(n)]
        return {"object": "chat.completion", "model": "gen-model", "usage": {"prompt_tokens": 5},
                "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                            for i, t in enumerate(texts)]}

    @staticmethod
    def _answer(asked: str, seed: int, i: int) -> str:
        if "diverse topics" in asked:
            return "\n".join(f"{i + 1}. The {w} of bridges" for i, w in enumerate(
                ("history", "physics", "economics", "art", "future")))
        topic = asked.partition("Topic: ")[2].partition("\n")[0]
        if "Reply with the question only" in asked:
            return f"Question: Why does {topic} matter so much?"
        if "Reply with the passage only" in asked:
            return ("Stone arch bridges carry loads by compression. " * 4).strip()
        if "Reply with" in asked:  # instruction, problem, follow-up
            return f"Please explain the idea number {seed % 97} in simple words."
        return f"Answer {i} (seed {seed}): the result is {seed % 50 + i}."  # a response


def _config(tmp_path, **overrides) -> SDGConfig:
    fields = dict(base_url="http://gen/v1", reward_base_url="http://rm/v1", output=str(tmp_path / "out"),
                  num_prompts=4, responses_per_prompt=3, concurrency=4, retries=1, backoff_s=0.0, seed=7)
    return SDGConfig(**{**fields, **overrides})


def _run(config: SDGConfig, fake: FakeServers) -> dict:
    return asyncio.run(run_pipeline(config, transport=httpx.MockTransport(fake)))


def _snapshot(out: str) -> dict[str, bytes]:
    return {name: open(os.path.join(out, name), "rb").read() for name in FILES}


def test_full_run_writes_consistent_records(tmp_path):
    config = _config(tmp_path)
    summary = _run(config, FakeServers())
    prompts = read_jsonl(config.path("prompts.jsonl"))
    responses = read_jsonl(config.path("responses.jsonl"))
    scores = {s["id"]: s for s in read_jsonl(config.path("scores.jsonl"))}
    pairs = read_jsonl(config.path("pairs.jsonl"))
    assert len(prompts) == 4 * len(TASKS) and len({p["id"] for p in prompts}) == len(prompts)
    assert Counter(p["task"] for p in prompts) == {t: 4 for t in TASKS}
    assert {p["kind"] for p in prompts} == {"single_turn", "instruction_following", "two_turn"}
    assert {p["source"] for p in prompts} >= {"model", "template"}
    for p in prompts:
        assert p["messages"][-1]["role"] == "user" and all(m["content"] for m in p["messages"])
        if p["kind"] == "two_turn":
            assert [m["role"] for m in p["messages"]] == ["user", "assistant", "user"]
        if p["kind"] == "instruction_following":
            assert p["messages"][-1]["content"].endswith(p["instruction"]["text"])
    math_local = [p for p in prompts if p["source"] == "template"]
    assert len(math_local) == 2 and all(isinstance(p["answer"], int) for p in math_local)
    assert len(responses) == 3 * len(prompts) and all(r["finish_reason"] == "stop" for r in responses)
    assert set(scores) == {r["id"] for r in responses}
    assert all(set(s["attributes"]) == set(ATTRIBUTES) and len(s["raw"]) == 9 for s in scores.values())
    by_id = {r["id"]: r for r in responses}
    for pair in pairs:
        assert by_id[pair["chosen_id"]]["response"] == pair["chosen"]
        assert pair["chosen_reward"] == scores[pair["chosen_id"]]["reward"]
        assert pair["chosen_reward"] > pair["rejected_reward"] or pair["ranked_by"] == "ground_truth"
    assert summary["filter"]["kept"] + sum(summary["filter"]["dropped"].values()) == len(responses)
    assert summary["pairs"]["total"] + sum(summary["pairs"]["skipped"].values()) == len(prompts)
    assert summary["pairs"]["total"] == len(pairs) > 0
    assert summary["failures_this_run"]["total"] == 0
    assert json.load(open(config.path("summary.json"))) == summary


def test_rerun_asks_nothing_and_changes_nothing(tmp_path):
    config = _config(tmp_path)
    _run(config, FakeServers())
    before = _snapshot(config.output)
    again = FakeServers()
    summary = _run(config, again)
    # Only the preflight: GET /models on both servers and the reward model's probe.
    assert again.calls == {("gen", "/v1/models"): 1, ("rm", "/v1/models"): 1, ("rm", "/v1/rewards"): 1}
    assert _snapshot(config.output) == before
    assert summary["prompts"]["this_run"] == {"written": 0}


def test_torn_responses_file_resumes(tmp_path):
    config = _config(tmp_path)
    _run(config, FakeServers())
    full = read_jsonl(config.path("responses.jsonl"))
    with open(config.path("responses.jsonl"), "rb") as f:
        lines = f.read().splitlines(keepends=True)
    # Keep 4 whole lines (prompt 1 whole, prompt 2 with one of its 3 responses) and half of the 5th, as a kill does;
    # the derived files go too.
    with open(config.path("responses.jsonl"), "wb") as f:
        f.write(b"".join(lines[:4]) + lines[4][:30])
    for name in ("scores.jsonl", "pairs.jsonl"):
        os.remove(config.path(name))
    fake = FakeServers()
    _run(config, fake)
    prompts = read_jsonl(config.path("prompts.jsonl"))
    assert fake.calls["gen", "/v1/chat/completions"] == len(prompts) - 1  # every prompt but the whole one
    resumed = read_jsonl(config.path("responses.jsonl"))
    assert sorted(r["id"] for r in resumed) == sorted(r["id"] for r in full)
    assert resumed[:4] == full[:4]
    assert len(read_jsonl(config.path("scores.jsonl"))) == len(full)


def test_a_killed_run_resumes(tmp_path):
    """Cancel the run in the middle of the responses stage; the file holds only whole lines and a rerun finishes
    it with exactly the missing requests."""
    config = _config(tmp_path, concurrency=2, refine=False)  # 40 calls = the prompt stage's, without refinement
    fake = FakeServers()

    async def handler(request):
        await asyncio.sleep(0.002)
        return fake(request)

    async def killed():
        task = asyncio.ensure_future(run_pipeline(config, transport=httpx.MockTransport(handler)))
        while fake.calls["gen", "/v1/chat/completions"] < 40:  # past the prompt stage's requests
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(killed())
    partial = read_jsonl(config.path("responses.jsonl"))
    assert 0 < len(partial) < 3 * 20 and open(config.path("responses.jsonl")).read().endswith("\n")
    _run(config, FakeServers())
    assert len(read_jsonl(config.path("responses.jsonl"))) == 60


def test_failed_requests_are_counted_not_fatal(tmp_path):
    config = _config(tmp_path, tasks=("math",), num_prompts=4)
    prompts_fake = FakeServers()
    _run(_config(tmp_path, tasks=("math",), num_prompts=4, stop_after="prompts"), prompts_fake)
    victim = read_jsonl(config.path("prompts.jsonl"))[0]["messages"][-1]["content"]
    summary = _run(config, FakeServers(fail_responses_for=victim))
    failures = summary["failures_this_run"]
    assert failures["total"] == 1 and failures["by_stage"] == {"responses": 1}
    assert "HTTP 500" in failures["first"][0]["error"]
    assert summary["requests"]["generator"]["retries"] == 1 and summary["requests"]["generator"]["failed"] == 1
    assert summary["pairs"]["skipped"]["no_responses"] == 1
    summary = _run(config, FakeServers())  # the rerun fills the gap
    assert summary["responses"]["total"] == 12 and summary["pairs"]["skipped"]["no_responses"] == 0


def test_a_server_that_refuses_n_gets_one_request_per_response(tmp_path):
    class OnlyOneChoice(FakeServers):
        def _chat(self, body):
            if body.get("n", 1) > 1:
                self.calls["refused n"] += 1
                return httpx.Response(400, json={"error": {"message": "n must be 1", "param": "n"}})
            return super()._chat(body)

    config = _config(tmp_path, tasks=("open_qa",), num_prompts=2)
    fake = OnlyOneChoice()
    summary = _run(config, fake)
    responses = read_jsonl(config.path("responses.jsonl"))
    assert len(responses) == 2 * 3 and summary["failures_this_run"]["total"] == 0
    assert fake.calls["refused n"] == 2  # one refused n=3 request per prompt, then three n=1 requests each
    for prompt_id in {r["prompt_id"] for r in responses}:
        texts = [r["response"] for r in responses if r["prompt_id"] == prompt_id]
        assert len(set(texts)) == 3  # each single request has its own seed, so the responses differ


def test_open_qa_and_writing_requests_are_refined_once(tmp_path):
    class Refiner(FakeServers):
        @staticmethod
        def _answer(asked, seed, i):
            if "Please revise the following" in asked:
                self_request = asked.partition(": ")[2].partition("\n")[0]
                return f"{self_request.rstrip('?.')} (with two examples and the trade-offs)?"
            return FakeServers._answer(asked, seed, i)

    config = _config(tmp_path, tasks=("open_qa", "writing", "coding"), num_prompts=2, stop_after="prompts")
    fake = Refiner()
    summary = _run(config, fake)
    prompts = read_jsonl(config.path("prompts.jsonl"))
    refined = [p for p in prompts if p["task"] in ("open_qa", "writing") and p["source"] == "model"]
    assert refined and all("(with two examples and the trade-offs)?" in p["messages"][0]["content"] for p in refined)
    assert all("trade-offs" not in p["messages"][0]["content"] for p in prompts if p["task"] == "coding")
    assert summary["prompts"]["this_run"]["refined"] == len(refined)
    unrefined = _config(tmp_path / "plain", tasks=("open_qa",), num_prompts=2, stop_after="prompts", refine=False)
    _run(unrefined, fake)
    assert all("trade-offs" not in p["messages"][0]["content"] for p in read_jsonl(unrefined.path("prompts.jsonl")))


def test_unparseable_generator_falls_back(tmp_path):
    class Gibberish(FakeServers):
        @staticmethod
        def _answer(asked, seed, i):
            return f"termsaliasOnlylongriesattributeite{seed}{i} � ]] function"

    config = _config(tmp_path, stop_after="prompts")
    summary = _run(config, Gibberish())
    prompts = read_jsonl(config.path("prompts.jsonl"))
    assert len(prompts) == 20 and {p["source"] for p in prompts} == {"fallback", "template"}
    assert summary["prompts"]["topics_by_source"] == {"fallback": 5}
    assert all(p["followup_source"] == "fallback" for p in prompts if p["kind"] == "two_turn")


def test_duplicate_prompts_are_marked_once_and_not_asked_again(tmp_path):
    class SameQuestion(FakeServers):
        @staticmethod
        def _answer(asked, seed, i):
            if "Reply with the question only" in asked:
                return "Why is the sky blue?"
            return FakeServers._answer(asked, seed, i)

    config = _config(tmp_path, tasks=("open_qa",), num_prompts=4)
    summary = _run(config, SameQuestion())
    records = read_jsonl(config.path("prompts.jsonl"))
    assert len(records) == 4 and summary["prompts"]["duplicates"] == 1 and summary["prompts"]["total"] == 3
    duplicate = next(r for r in records if "duplicate_of" in r)
    # Slots 0 and 3 are both single-turn; whichever finished second is the duplicate.
    assert duplicate["slot"] in ("open_qa/0", "open_qa/3")
    assert duplicate["duplicate_of"] in {r["id"] for r in records}
    assert summary["responses"]["total"] == 9
    again = SameQuestion()
    _run(config, again)
    assert again.calls["gen", "/v1/chat/completions"] == 0


def test_topics_file(tmp_path):
    topics = tmp_path / "topics.txt"
    topics.write_text("tea ceremonies\n\nglaciers\n")
    config = _config(tmp_path, tasks=("open_qa", "writing"), topics_file=str(topics), stop_after="prompts")
    fake = FakeServers()
    _run(config, fake)
    assert {p["topic"] for p in read_jsonl(config.path("prompts.jsonl"))} == {"tea ceremonies", "glaciers"}
    assert not os.path.exists(config.path("topics.jsonl"))


def test_not_a_reward_model_stops_before_generating(tmp_path):
    fake = FakeServers(reward_form=False)
    with pytest.raises(SDGError, match="is not a reward model.*--reward-format chat"):
        _run(_config(tmp_path), fake)
    assert fake.calls["gen", "/v1/chat/completions"] == 0


def test_model_names(tmp_path):
    """The first listed model by default; a named one that is not listed is asked once before it is trusted."""
    config = _config(tmp_path, tasks=("math",), num_prompts=1, stop_after="prompts")
    assert _run(config, FakeServers())["generator_model"] == "gen-model"
    assert _run(_config(tmp_path, model="unlisted-model", stop_after="prompts"), FakeServers())["generator_model"] \
        == "unlisted-model"
    with pytest.raises(SDGError, match="does not serve 'nope'.*does not exist"):
        _run(_config(tmp_path, model="nope"), FakeServers())


def test_chat_reward_form(tmp_path):
    class ChatRM(FakeServers):
        def _chat(self, body):
            if body["model"] != "rm-model":
                return super()._chat(body)
            values = self._reward(body["messages"][-1]["content"])["attributes"]
            content = ",".join(f"{k}:{v:.2f}" for k, v in values.items())
            return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                 "finish_reason": "stop"}]}

    config = _config(tmp_path, tasks=("open_qa",), num_prompts=2, reward_format="chat")
    fake = ChatRM()
    summary = _run(config, fake)
    scores = read_jsonl(config.path("scores.jsonl"))
    assert len(scores) == 6 and all(s["raw"] is None and len(s["attributes"]) == 5 for s in scores)
    assert fake.calls["rm", "/v1/rewards"] == 0 and summary["pairs"]["total"] > 0


def test_cli_errors_are_one_line(tmp_path, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    out = str(tmp_path / "out")
    assert cli.main(["--base-url", f"http://127.0.0.1:{port}/v1", "--output", out, "--retries", "0",
                     "--stop-after", "prompts"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("n4-train sdg: error: cannot reach --base-url") and err.count("\n") == 1
    assert cli.main(["--base-url", "http://x/v1", "--output", out, "--responses-per-prompt", "1"]) == 2
    assert capsys.readouterr().err.startswith("n4-train sdg: error: --responses-per-prompt must be at least 2")
    assert cli.main(["--base-url", "http://x/v1", "--output", out]) == 2
    assert "--reward-base-url is required" in capsys.readouterr().err
