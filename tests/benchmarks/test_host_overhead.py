"""benchmarks/host_overhead.py: the engine's per-step host cost with the model stubbed out."""
from __future__ import annotations

import json

import pytest

from benchmarks import host_overhead


def test_host_overhead_reports_every_batch(tmp_path, capsys):
    out = tmp_path / "host.json"
    assert host_overhead.main(["--batches", "1,3", "--steps", "3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 3]
    for row in rows:
        assert row["ms_per_step"] > 0
        assert {"schedule", "prepare_inputs", "forward", "lm_head", "sample", "other"} <= set(row["phases_ms"])
    assert "batch    3:" in capsys.readouterr().out


def test_stubbed_steps_still_decode():
    """The stubs replace the model's work only: each step still gives every sequence one token (7, the stub
    logits' argmax) through the scheduler, sampler and outputs."""
    engine = host_overhead.decoding_engine(3, 64)
    before = {r.request_id: r.num_output_tokens for r in engine.requests.values()}
    outputs = engine.step()
    assert sorted(o.request_id for o in outputs) == sorted(before)
    assert all(o.new_token_ids == [7] and o.num_output_tokens == before[o.request_id] + 1 for o in outputs)


@pytest.mark.parametrize("argv", [["--batches", "1,x"], ["--batches", "0"], ["--steps", "0"]])
def test_bad_arguments_exit_with_a_message(argv, capsys):
    with pytest.raises(SystemExit) as e:
        host_overhead.main(argv)
    assert e.value.code == 2 and "error:" in capsys.readouterr().err
