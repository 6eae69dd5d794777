"""`n4 bench throughput` on the tiny preset with random weights: counts, JSON, and the workloads it builds."""
from __future__ import annotations

import json

import pytest

from benchmarks.datasets import load_sharegpt, make_random_prompts, make_random_token_prompts
from n4.cli import main as n4_main
from server.api.cli import DEMO_MODEL
from server.api.tokenizer import Tokenizer


def _bench(tmp_path, *extra: str) -> dict:
    out = tmp_path / "throughput.json"
    n4_main(["bench", "throughput", "--model", "tiny", "--load-format", "dummy", "--log-level", "warning",
             "--json", str(out), *extra])
    return json.loads(out.read_text())


def test_random_prompts_counts_and_json(tmp_path, capsys):
    r = _bench(tmp_path, "--input-len", "8", "--output-len", "4", "--num-prompts", "6", "--max-num-seqs", "4")
    assert (r["benchmark"], r["model"], r["load_format"], r["dataset"]) == ("throughput", "tiny", "dummy", "random")
    assert r["num_requests"] == 6 and r["max_num_seqs"] == 4
    assert r["prompt_tokens"] == 6 * 8
    assert r["output_tokens"] == 6 * 4          # ignore_eos: every request runs to --output-len
    assert r["elapsed_s"] > 0
    assert r["requests_per_s"] == pytest.approx(6 / r["elapsed_s"], rel=1e-2)
    assert r["output_tokens_per_s"] == pytest.approx(24 / r["elapsed_s"], rel=1e-2)
    assert r["total_tokens_per_s"] == pytest.approx(72 / r["elapsed_s"], rel=1e-2)
    captured = capsys.readouterr()
    assert "6 requests" in captured.out and "output tokens/s" in captured.out
    assert "6/6 requests" in captured.err       # the progress bar reached the end


def test_sharegpt_dataset_is_tokenized_and_fits(tmp_path):
    data = [{"conversations": [{"from": "human", "value": "Tell me about rivers."}, {"from": "gpt", "value": "x"}]},
            {"conversations": [{"from": "gpt", "value": "no human turn"}]},
            {"conversations": [{"from": "human", "value": "word " * 200}]}]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    r = _bench(tmp_path, "--dataset", str(path), "--num-prompts", "3", "--output-len", "3", "--max-model-len", "64",
               "--no-warmup")
    tokenizer = Tokenizer.from_pretrained(DEMO_MODEL)   # the preset borrows the demo tokenizer
    full = [len(tokenizer.encode(t)) for t in load_sharegpt(str(path), 3, seed=0)]
    assert r["dataset"] == str(path) and r["input_len"] is None
    assert r["num_requests"] == 3 and r["output_tokens"] == 9
    assert r["prompt_tokens"] == sum(min(n, 64 - 3) for n in full)   # cut to leave room for --output-len
    assert r["truncated_prompts"] == sum(n > 64 - 3 for n in full) >= 1


def test_load_sharegpt(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "a"}]},
                                {"conversations": [{"role": "user", "content": "b"}]},
                                {"conversations": []}, {"other": 1}]))
    prompts = load_sharegpt(str(path), 5, seed=1)
    assert len(prompts) == 5 and set(prompts) == {"a", "b"}
    assert prompts == load_sharegpt(str(path), 5, seed=1)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_sharegpt(str(path), 1)
    path.write_text(json.dumps([{"conversations": [{"from": "gpt", "value": "x"}]}]))
    with pytest.raises(ValueError, match="no conversation"):
        load_sharegpt(str(path), 1)


def test_random_workloads_are_seeded():
    assert make_random_token_prompts(3, 5, 100, seed=7) == make_random_token_prompts(3, 5, 100, seed=7)
    assert make_random_token_prompts(3, 5, 100, seed=7) != make_random_token_prompts(3, 5, 100, seed=8)
    assert all(0 <= t < 100 for p in make_random_token_prompts(4, 50, 100) for t in p)
    texts = make_random_prompts(4, 12, seed=3)
    assert texts == make_random_prompts(4, 12, seed=3) and len(set(texts)) == 4
    assert all(len(t.split()) == 12 for t in texts)
    with pytest.raises(ValueError):
        make_random_prompts(0, 12, seed=3)


def test_bad_flags_fail_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _bench(tmp_path, "--output-len", "0")
    assert e.value.code == 2 and "--output-len must be positive" in capsys.readouterr().err
