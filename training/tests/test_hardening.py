"""Regressions: arguments and data that used to crash with a traceback or train on NaN, reward/preference files
after the first being dropped, a reference policy computed in another precision than the policy, and resuming with
another --grad-accum repeating or skipping data."""
from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import DEMO, TINY, WORDS, helpsteer_records, text_corpus, write_config, write_jsonl
from n4_train import data as D
from n4_train.cli import main
from n4_train.modeling import TrainableNemotron
from n4_train.precision import resolve_precision
from n4_train.stages import _lm_count, _lm_objective
from n4_train.tokenization import TrainTokenizer
from n4_train.trainer import TrainConfig, Trainer


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("audit")
    pairs = [{"prompt": f"say {w}", "chosen": f"{w} {w} {w} list", "rejected": f"{w} dict",
              "chosen_reward": 2.0, "rejected_reward": 1.0} for w in WORDS[:8]]
    return {"config": write_config(str(d / "config.json")), "corpus": text_corpus(str(d / "corpus.txt"), 20, seed=0),
            "pairs": write_jsonl(str(d / "pairs.jsonl"), pairs),
            "pairs2": write_jsonl(str(d / "pairs2.jsonl"), pairs[:4]),
            "rm": write_jsonl(str(d / "rm.jsonl"), helpsteer_records(6, seed=0)),
            "rm2": write_jsonl(str(d / "rm2.jsonl"), helpsteer_records(4, seed=1)), "dir": d}


def _run(files, stage, *extra, output="out"):
    return main([stage, "--model", files["config"], "--tokenizer", DEMO, "--output", str(files["dir"] / output),
                 "--max-steps", "1", "--batch-size", "2", *extra])


@pytest.mark.parametrize("stage, data, extra, match", [
    ("pretrain", "corpus", ("--batch-size", "0"), "--batch-size must be at least 1"),  # was ZeroDivisionError
    ("pretrain", "corpus", ("--batch-size", "-2"), "--batch-size must be at least 1"),  # was a reshape RuntimeError
    ("pretrain", "corpus", ("--seq-len", "0"), "--seq-len must be at least 2"),
    ("dpo", "pairs", ("--beta", "nan"), "--beta must be a positive number"),  # trained to NaN weights, exit 0
    ("dpo", "pairs", ("--beta", "0"), "--beta must be a positive number"),    # a constant loss log 2, exit 0
    ("rpo", "pairs", ("--eta", "nan"), "--eta must be a positive number"),
    ("pretrain", "corpus", ("--clip-grad", "nan"), "--clip-grad must be a non-negative number"),  # NaN weights
    ("pretrain", "corpus", ("--weight-decay", "nan"), "--weight-decay must be a non-negative number"),
])
def test_bad_hyperparameters_are_one_line_errors(files, capsys, stage, data, extra, match):
    assert _run(files, stage, "--data", files[data], *extra, output=f"bad-{stage}{extra[0]}{extra[1]}") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"n4-train {stage}: error: {match}") and err.count("\n") == 1, err


def test_non_finite_targets_and_rewards_are_refused(files):
    tokenizer = TrainTokenizer(DEMO)
    rows = helpsteer_records(3, seed=0)
    rows[1]["correctness"] = float("nan")  # json writes NaN, which json.loads reads back
    path = write_jsonl(str(files["dir"] / "nan.jsonl"), rows)
    with pytest.raises(D.DataError, match=r"nan.jsonl:2: .*correctness: nan is not a finite number"):
        D.helpsteer_rows(path, tokenizer, 512)
    pairs = [{"prompt": "hi", "chosen": "a", "rejected": "b", "chosen_reward": "inf", "rejected_reward": 0.0}]
    path = write_jsonl(str(files["dir"] / "inf.jsonl"), pairs)
    with pytest.raises(D.DataError, match=r"inf.jsonl:1: chosen_reward: 'inf' is not a finite number"):
        D.preference_rows(path, tokenizer, 512)
    # An absent reward is still allowed (DPO does not need one) and reads as NaN.
    path = write_jsonl(str(files["dir"] / "absent.jsonl"), [{"prompt": "hi", "chosen": "a", "rejected": "b"}])
    assert torch.isnan(D.preference_rows(path, tokenizer, 512)[0].rewards).all()


@pytest.mark.parametrize("stage, first, second, key, expected", [
    ("rm", "rm", "rm2", "train_rows", 10), ("dpo", "pairs", "pairs2", "pairs", 12)])
def test_every_data_file_is_trained_on(files, stage, first, second, key, expected):
    output = f"multi-{stage}"
    assert _run(files, stage, "--data", files[first], files[second], output=output) == 0
    with open(files["dir"] / output / "training_summary.json") as f:
        assert json.load(f)[key] == expected  # was 6 / 8: only the first file was read


def test_reference_logprobs_match_the_policy_precision(files):
    """At step 1 the policy *is* the reference, so Δ = 0 and the DPO loss is log 2 exactly. Under bf16 the reference
    used to be computed in fp32 and the policy in bf16: Δ was their rounding difference (2.9e-4 here)."""
    output = files["dir"] / "bf16-dpo"
    assert _run(files, "dpo", "--data", files["pairs"], "--eval-data", files["pairs2"], "--precision", "bf16",
                "--lr", "1e-9", "--batch-size", "4", output="bf16-dpo") == 0
    first = json.loads((output / "train_log.jsonl").read_text().splitlines()[0])
    assert first["margin"] == 0.0 and abs(first["loss"] - math.log(2)) < 1e-7, first
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["eval_before"]["margin"] == 0.0


class _Recording:
    def __init__(self, batches):
        self.inner, self.batch_size, self.seen = batches, batches.batch_size, []

    def __getitem__(self, k):
        self.seen.append(k)
        return self.inner[k]


def _trainer(rows, output, grad_accum, max_steps, batch_size=2):
    precision = resolve_precision("fp32", "cpu")
    model = TrainableNemotron(TINY, precision)
    model.init_weights(0)
    config = TrainConfig(output_dir=str(output), max_steps=max_steps, lr=1e-3, grad_accum=grad_accum)
    return Trainer(model, precision, config, _Recording(D.Batches(rows, batch_size, seed=0)), _lm_objective, _lm_count)


def test_resume_with_another_grad_accum_continues_with_the_next_micro_batches(files):
    rows = D.pretraining_rows([files["corpus"]], TrainTokenizer(DEMO), seq_len=16)
    first = _trainer(rows, files["dir"] / "resume", grad_accum=1, max_steps=2)
    first.train()
    assert first.batches.seen == [0, 1]
    resumed = _trainer(rows, files["dir"] / "resume", grad_accum=2, max_steps=3)
    assert resumed.resume() and resumed.step == 2
    resumed.train()
    assert resumed.batches.seen == [2, 3]  # was [4, 5]: step * grad_accum assumed the new grad_accum all along
    other = _trainer(rows, files["dir"] / "resume", grad_accum=1, max_steps=4, batch_size=3)
    with pytest.raises(ValueError, match="--batch-size 2"):  # micro-batch k would be other rows
        other.resume()
