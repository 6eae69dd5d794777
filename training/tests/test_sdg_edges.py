"""Edges of the SDG pipeline: reward answers that are not finite numbers never reach a pair (pairs.jsonl must stay
readable by `n4-train dpo/rpo`, which refuse NaN rewards), answers that are not JSON objects are failed requests
rather than crashes, a nonsense Retry-After does not turn into a retry storm, and bad input (an empty --topics file,
an output file this pipeline did not write) is one line and a non-zero exit."""
from __future__ import annotations

import asyncio
import json
import math
import random
import zlib

import httpx
import pytest
from n4_train.sdg import cli
from n4_train.sdg.client import ApiClient, RetryPolicy
from n4_train.sdg.errors import RequestFailed
from n4_train.sdg.records import read_jsonl
from n4_train.sdg.rewards import ATTRIBUTES, PROBE, RewardFormatError, parse_n4_reward
from test_sdg_pipeline import FakeServers, _config, _run

RAW = [0.0] * 4 + [1.0, 2.0, 3.0, 4.0, 5.0]
GOOD = {"object": "reward", "attributes": dict(zip(ATTRIBUTES, RAW[4:])), "raw": RAW, "reward": 3.0}
NAN, INF = float("nan"), float("inf")


def _strict_json(line: str):
    """json.loads that refuses NaN/Infinity, as a strict JSON reader (and n4-train's finite checks) would."""
    def refuse(constant):
        raise ValueError(f"non-finite number {constant} in JSON")
    return json.loads(line, parse_constant=refuse)


@pytest.mark.parametrize("body", [
    {**GOOD, "reward": NAN},
    {**GOOD, "reward": INF},
    {**GOOD, "attributes": {**GOOD["attributes"], "correctness": NAN}},
    {**GOOD, "attributes": {**GOOD["attributes"], "correctness": None}},
    {**GOOD, "attributes": {**GOOD["attributes"], "correctness": "high"}},
    {**GOOD, "attributes": {**GOOD["attributes"], "correctness": True}},
    {**GOOD, "reward": None, "attributes": {**GOOD["attributes"], "verbosity": -INF}},
    {**GOOD, "raw": RAW[:8] + [NAN]},
    [GOOD],
    "helpfulness:1",
])
def test_n4_reward_answers_that_are_not_finite_numbers_are_refused(body):
    with pytest.raises(RewardFormatError):
        parse_n4_reward(body)


def test_n4_reward_accepts_integers_and_a_null_reward():
    attributes, raw, scalar = parse_n4_reward({**GOOD, "attributes": {a: 2 for a in ATTRIBUTES}, "reward": None})
    assert attributes == {a: 2.0 for a in ATTRIBUTES} and raw == RAW and math.isfinite(scalar)


class NaNRewards(FakeServers):
    """A reward server whose head overflows on every third response (NaN written as Python's json writes it)."""

    def __call__(self, request):
        if request.url.path != "/v1/rewards":
            return super().__call__(request)
        self.calls[request.url.host, request.url.path] += 1
        text = json.loads(request.content)["messages"][-1]["content"]
        answer = self._reward(text)
        if text != PROBE[-1]["content"] and zlib.crc32(text.encode()) % 3 == 0:
            answer = {**answer, "reward": NAN, "raw": answer["raw"][:8] + [NAN],
                      "attributes": {**answer["attributes"], "verbosity": NAN}}
        return httpx.Response(200, content=json.dumps(answer).encode(), headers={"content-type": "application/json"})


def test_non_finite_rewards_never_reach_scores_or_pairs(tmp_path):
    config = _config(tmp_path, tasks=("open_qa", "coding"), num_prompts=3)
    fake = NaNRewards()
    summary = _run(config, fake)
    assert summary["failures_this_run"]["by_stage"].get("scores", 0) > 0  # recorded, a rerun retries them
    for name in ("scores.jsonl", "pairs.jsonl"):
        with open(config.path(name)) as f:
            records = [_strict_json(line) for line in f]
        if name == "pairs.jsonl":
            assert records, "no pairs at all: the test would not exercise pairing"
            for pair in records:
                assert pair["chosen_id"] != pair["rejected_id"]
                assert pair["chosen_reward"] > pair["rejected_reward"]


def _client(handler, retries=0) -> ApiClient:
    return ApiClient("http://fake/v1", None, 2, RetryPolicy(retries, backoff_s=0.0),
                     transport=httpx.MockTransport(handler))


@pytest.mark.parametrize("payload", [[], [{"choices": []}], "ok", 3])
def test_an_answer_that_is_not_a_json_object_is_a_failed_request(payload):
    async def go():
        async with _client(lambda request: httpx.Response(200, json=payload)) as client:
            await client.post("/chat/completions", {})

    with pytest.raises(RequestFailed, match="not a JSON object"):
        asyncio.run(go())


def test_generator_answering_a_json_list_fails_that_request_only(tmp_path):
    class ListForOne(FakeServers):
        def _chat(self, body):
            if body.get("n", 1) > 1 and self.calls["list"] == 0:  # the first response request only
                self.calls["list"] += 1
                return httpx.Response(200, json=[])
            return super()._chat(body)

    config = _config(tmp_path, tasks=("coding",), num_prompts=2, stop_after="responses")
    summary = _run(config, ListForOne())
    assert summary["failures_this_run"]["by_stage"] == {"responses": 1}
    assert summary["responses"]["total"] == 3  # the other prompt's responses are kept
    summary = _run(config, FakeServers())  # and a rerun fills the gap
    assert summary["responses"]["total"] == 6


@pytest.mark.parametrize("retry_after, low, high", [("nan", 0.5, 1.0), ("inf", 30.0, 30.0), ("-inf", 0.0, 0.0)])
def test_nonsense_retry_after_gives_a_finite_wait(retry_after, low, high):
    """NaN parses as a float but is no wait at all (asyncio.sleep(nan) returns at once): the backoff applies."""
    delay = RetryPolicy(backoff_s=1.0).delay(0, retry_after, random.Random(0))
    assert low <= delay <= high


def test_an_empty_topics_file_is_a_one_line_error(tmp_path, capsys):
    topics = tmp_path / "topics.txt"
    topics.write_text("\n  \n")
    code = cli.main(["--base-url", "http://x/v1", "--output", str(tmp_path / "out"), "--topics", str(topics),
                     "--stop-after", "prompts"])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("n4-train sdg: error: --topics") and err.count("\n") == 1


def test_an_output_file_it_did_not_write_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "topics.jsonl").write_text('{"task": "open_qa", "topics": ["x"]}\n')  # valid JSON, no "id"

    def fake_transport(*args, **kwargs):
        return httpx.MockTransport(FakeServers())

    # The CLI builds its own clients: route them to the fake servers.
    from n4_train.sdg import pipeline
    original = pipeline.make_client
    monkeypatch.setattr(pipeline, "make_client",
                        lambda config, base_url, api_key, transport=None: original(
                            config, base_url.replace("127.0.0.1:1", "gen"), api_key, fake_transport()))
    code = cli.main(["--base-url", "http://127.0.0.1:1/v1", "--output", str(out), "--stop-after", "prompts",
                     "--retries", "0"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert "topics.jsonl" in err and "'id'" in err
    assert read_jsonl(str(out / "topics.jsonl")) == [{"task": "open_qa", "topics": ["x"]}]  # left as it was
