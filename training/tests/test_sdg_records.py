"""JSONL files that survive a kill, stable ids, and flag validation."""
from __future__ import annotations

import json

import pytest

from n4_train.sdg.config import SDGConfig
from n4_train.sdg.records import JsonlAppender, read_jsonl, stable_id


def test_stable_id():
    assert stable_id([{"a": 1}], 0) == stable_id([{"a": 1}], 0)
    assert stable_id([{"a": 1}], 0) != stable_id([{"a": 1}], 1)
    assert stable_id("x", "y") != stable_id("y", "x")
    assert len(stable_id("x")) == 16


def test_torn_last_line_is_dropped_and_append_continues(tmp_path):
    path = str(tmp_path / "r.jsonl")
    with JsonlAppender(path) as out:
        out.write({"id": "a", "v": 1})
        out.write({"id": "b", "v": 2})
    with open(path, "a") as f:
        f.write('{"id": "c", "v"')  # killed mid-write
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b"]
    with JsonlAppender(path) as out:
        assert out.ids == {"a", "b"} and out.written == 0
        out.write({"id": "c", "v": 3})
    with open(path) as f:
        lines = f.read().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["a", "b", "c"]


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match="r.jsonl:2"):
        read_jsonl(str(path))


BASE = {"base_url": "http://127.0.0.1:8000/v1", "output": "/tmp/x", "reward_base_url": "http://127.0.0.1:8001/v1"}


@pytest.mark.parametrize("override, message", [
    ({"responses_per_prompt": 1}, "--responses-per-prompt must be at least 2"),
    ({"num_prompts": 0}, "--num-prompts must be a positive integer"),
    ({"concurrency": 0}, "--concurrency"),
    ({"temperature": float("nan")}, "--temperature"),
    ({"temperature": 2.5}, "--temperature"),
    ({"min_margin": -1.0}, "--min-margin"),
    ({"min_reward": float("inf")}, "--min-reward"),
    ({"tasks": ("open_qa", "poems")}, "unknown task"),
    ({"tasks": ("math", "math")}, "listed twice"),
    ({"base_url": "127.0.0.1:8000"}, "--base-url must be an http"),
    ({"reward_base_url": None}, "--reward-base-url is required"),
    ({"topics_file": "/nonexistent/topics.txt"}, "--topics"),
    ({"retries": -1}, "--retries"),
])
def test_config_validation(override, message):
    with pytest.raises(ValueError, match=message):
        SDGConfig(**{**BASE, **override})


def test_config_without_reward_when_stopping_early():
    config = SDGConfig(**{**BASE, "reward_base_url": None, "stop_after": "responses"})
    assert not config.needs_reward
    assert "api_key" not in SDGConfig(**BASE, api_key="secret").public()
