"""Data parallelism under torchrun (2 CPU processes over gloo): the same weights as one process that accumulates the
same micro-batches, one log, one state, one export."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import DEMO, text_corpus, write_config

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_match_one_process_with_the_same_micro_batches(tmp_path):
    corpus = text_corpus(str(tmp_path / "corpus.txt"), 60, seed=0)
    config = write_config(str(tmp_path / "config.json"))
    common = ["pretrain", "--model", config, "--tokenizer", DEMO, "--data", corpus, "--eval-data", corpus,
              "--seq-len", "32", "--batch-size", "2", "--max-steps", "4", "--lr", "1e-2", "--warmup-steps", "1",
              "--export-dtype", "float32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "n4_train.cli", *common, "--grad-accum", "2",
                             "--output", str(tmp_path / "single")], capture_output=True, text=True, env=env,
                            timeout=300)
    assert single.returncode == 0, single.stderr
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                            "--master-port", str(_free_port()), "-m", "n4_train.cli", *common,
                            "--output", str(tmp_path / "ranks")], capture_output=True, text=True, env=env,
                           timeout=300)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    assert ranks.stdout.count("exported") == 1  # rank 0 reports and exports; rank 1 stays quiet
    one = load_file(str(tmp_path / "single" / "model.safetensors"))
    two = load_file(str(tmp_path / "ranks" / "model.safetensors"))
    for name, tensor in one.items():
        # Four Adam steps at lr 1e-2; the sum over ranks adds in another order than accumulation does.
        torch.testing.assert_close(two[name], tensor, atol=2e-5, rtol=0, msg=name)
    log_one = [json.loads(line) for line in open(tmp_path / "single" / "train_log.jsonl")]
    log_two = [json.loads(line) for line in open(tmp_path / "ranks" / "train_log.jsonl")]
    assert [r["step"] for r in log_two] == [r["step"] for r in log_one]
    for a, b in zip(log_one, log_two):
        if "loss" in a:
            assert a["count"] == b["count"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    summary = json.load(open(tmp_path / "ranks" / "training_summary.json"))
    assert summary["data_parallel_ranks"] == 2
    assert os.listdir(tmp_path / "ranks" / "trainer_state") == ["step-0000004.pt"]
