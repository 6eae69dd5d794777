"""The shared loop: schedule, exact resume, gradient accumulation that does not change the update."""
from __future__ import annotations

import argparse
import os

import pytest
import torch

from helpers import DEMO, TINY, text_corpus
from n4_train import data as D
from n4_train.modeling import TrainableNemotron
from n4_train.precision import resolve_precision
from n4_train.stages import _lm_count, _lm_objective
from n4_train.tokenization import TrainTokenizer
from n4_train.trainer import TrainConfig, Trainer, TrainingInterrupted, learning_rate


def test_warmup_then_cosine_to_the_floor():
    config = TrainConfig(output_dir="unused", max_steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert learning_rate(1, config) == pytest.approx(0.1)
    assert learning_rate(10, config) == pytest.approx(1.0)
    assert learning_rate(60, config) == pytest.approx(0.55)   # halfway through the cosine: mean of 1 and 0.1
    assert learning_rate(110, config) == pytest.approx(0.1)
    assert all(learning_rate(s, config) >= learning_rate(s + 1, config) for s in range(10, 110))


@pytest.mark.parametrize("bad, match", [(dict(max_steps=0), "max-steps"), (dict(lr=float("nan")), "--lr"),
                                        (dict(min_lr_ratio=2.0), "min-lr-ratio"), (dict(grad_accum=0), "grad-accum")])
def test_bad_settings_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{"output_dir": "x", "max_steps": 5, **bad})


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    corpus = text_corpus(str(tmp_path_factory.mktemp("corpus") / "train.txt"), 40, seed=0)
    return D.pretraining_rows([corpus], TrainTokenizer(DEMO), seq_len=32)


def _trainer(rows, output, batch_size=4, grad_accum=1, max_steps=6, save_every=0):
    torch.manual_seed(0)
    precision = resolve_precision("fp32", "cpu")
    model = TrainableNemotron(TINY, precision)
    model.init_weights(0)
    config = TrainConfig(output_dir=str(output), max_steps=max_steps, lr=1e-2, warmup_steps=2, grad_accum=grad_accum,
                         save_every=save_every)
    return Trainer(model, precision, config, D.Batches(rows, batch_size, seed=0), _lm_objective, _lm_count)


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(rows, tmp_path):
    straight = _trainer(rows, tmp_path / "straight")
    straight.train()
    interrupted = _trainer(rows, tmp_path / "resumed", save_every=3)
    calls = {"n": 0}
    objective = interrupted.loss_sum

    def failing(model, batch):  # Ctrl-C during step 5, after step 3's state was saved and step 4 ran
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return objective(model, batch)

    interrupted.loss_sum = failing
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    resumed = _trainer(rows, tmp_path / "resumed", save_every=3)
    assert resumed.resume() and resumed.step == 4  # the interrupt saved the last finished step
    resumed.train()
    for name, value in _weights(straight).items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    steps = [line for line in open(tmp_path / "resumed" / "train_log.jsonl")]
    assert len(steps) == 6  # the log holds each step once


def test_states_keep_the_last_two_whatever_a_crash_left(rows, tmp_path):
    trainer = _trainer(rows, tmp_path, max_steps=4, save_every=1)
    state_dir = tmp_path / "trainer_state"
    state_dir.mkdir()
    (state_dir / "step-0000099.pt.tmp").write_bytes(b"half a state")   # a crash mid-write in an earlier run
    trainer.train()
    assert sorted(os.listdir(state_dir)) == ["step-0000003.pt", "step-0000004.pt"]


def _signal_during_update(trainer, at_step: int, signals: int):
    """Deliver `signals` SIGTERMs from inside optimizer.step() of step `at_step` (the racy spot: weights half-updated,
    the step neither counted nor logged)."""
    import os
    import signal
    update = trainer.optimizer.step

    def step_and_signal(*args, **kwargs):
        if trainer.step + 1 == at_step:
            for _ in range(signals):
                os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before os.kill returns, in this thread
        return update(*args, **kwargs)

    trainer.optimizer.step = step_and_signal


def test_a_signal_mid_update_finishes_logs_and_saves_that_step(rows, tmp_path):
    trainer = _trainer(rows, tmp_path / "run")
    _signal_during_update(trainer, at_step=3, signals=1)
    with pytest.raises(TrainingInterrupted) as stopped:
        trainer.train()
    assert stopped.value.saved and stopped.value.step == 3
    logged = [line for line in open(tmp_path / "run" / "train_log.jsonl")]
    assert len(logged) == 3  # the saved step is the last logged one
    resumed = _trainer(rows, tmp_path / "run")
    assert resumed.resume() and resumed.step == 3
    for name, value in _weights(trainer).items():  # the saved weights are the whole update of step 3
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_a_second_signal_mid_update_stops_at_once_without_saving_half_updated_weights(rows, tmp_path):
    trainer = _trainer(rows, tmp_path / "run", save_every=2)
    _signal_during_update(trainer, at_step=3, signals=2)
    with pytest.raises(TrainingInterrupted) as stopped:
        trainer.train()
    assert not stopped.value.saved
    resumed = _trainer(rows, tmp_path / "run")
    assert resumed.resume() and resumed.step == 2  # the last regular save, not the interrupted update


def test_gradient_accumulation_matches_one_big_batch(rows, tmp_path):
    big = _trainer(rows, tmp_path / "big", batch_size=4, grad_accum=1, max_steps=3)
    big.train()
    split = _trainer(rows, tmp_path / "split", batch_size=2, grad_accum=2, max_steps=3)
    split.train()
    for name, value in _weights(big).items():
        # Three Adam steps at lr 1e-2 move weights by ~3e-2; what is left is float summation order (measured
        # <= 3e-6).
        torch.testing.assert_close(split.model.state_dict()[name], value, atol=1e-5, rtol=0, msg=name)


def test_sigterm_saves_the_last_step_and_resume_finishes(tmp_path):
    """A preempted job (SIGTERM) keeps its progress: exit 130 with a saved state, then --resume runs to the end."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from helpers import write_config

    corpus = text_corpus(str(tmp_path / "corpus.txt"), 40, seed=0)
    output = tmp_path / "run"
    command = [sys.executable, "-m", "n4_train.cli", "pretrain", "--model", write_config(str(tmp_path / "c.json")),
               "--tokenizer", DEMO, "--data", corpus, "--output", str(output), "--seq-len", "32", "--batch-size", "2",
               "--max-steps", "100000", "--save-every", "0"]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    log = output / "train_log.jsonl"
    deadline = time.monotonic() + 60
    while not (log.exists() and len(log.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    states = os.listdir(output / "trainer_state")
    assert len(states) == 1
    saved_step = torch.load(output / "trainer_state" / states[0], weights_only=False)["step"]
    assert saved_step >= 3
    assert proc.returncode == 130 and f"state of step {saved_step} saved, continue with --resume" in err
    # Starting over into the same directory is refused rather than mixing two runs.
    again = subprocess.run([*command[:-4], "--max-steps", "5"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already holds a training state: pass --resume" in again.stderr
    # Resume with a reachable end: the log continues from the saved step without a gap or a repeat.
    resumed = subprocess.run([*command[:-4], "--max-steps", str(saved_step + 2), "--resume"], capture_output=True,
                             text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, saved_step + 3))
