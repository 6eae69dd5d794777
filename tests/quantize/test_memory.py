"""Streaming: quantizing a generated checkpoint of over 1 GiB keeps the converter's peak anonymous memory (RssAnon
sampled from /proc every 2 ms, above its baseline after imports) under 25% of the checkpoint's size; the mapped
input's file-backed pages do not count. Also: SIGTERM midway removes the staging directory and leaves no OUT."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.config import ModelConfig
from quantize.source import expected_shapes
from tests.quantize.helpers import reference_fp8, same_bits
from tests.utils import REPO_ROOT

pytestmark = pytest.mark.slow

# Few, large layers: up_proj and down_proj are 134 MB each in bf16 (11% of the checkpoint), so holding fp32 copies
# of one whole tensor would already exceed the 25% budget. 3 layers x 352 MB + 2 x 67 MB embeddings = 1.19 GB.
CONFIG = ModelConfig(vocab_size=8192, hidden_size=4096, intermediate_size=16384, num_hidden_layers=3,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, torch_dtype="bfloat16")
BUDGET = 0.25
SAMPLE_INTERVAL_S = 0.002

# Imports everything a run imports, reports RssAnon (kB), waits for the go-ahead, then runs `n4 ARGS`.
DRIVER = """
import sys
import numpy, safetensors, torch
import model.loader, n4.cli, quantize.convert
with open("/proc/self/status") as f:
    print(next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")), flush=True)
sys.stdin.readline()
n4.cli.main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """An HF-layout checkpoint: one shard per layer plus one for the rest, with an index; deleted afterwards."""
    path = tmp_path_factory.mktemp("big-in")
    g = torch.Generator().manual_seed(0)
    shapes = expected_shapes(CONFIG)
    groups: dict[str, list[str]] = {}
    for name in shapes:
        key = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        groups.setdefault(key, []).append(name)
    weight_map = {}
    for i, (key, names) in enumerate(groups.items()):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: torch.empty(shapes[n], dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g) for n in names}
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(CONFIG.to_hf()))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _checkpoint_bytes(path) -> int:
    return sum(os.path.getsize(path / f) for f in os.listdir(path) if f.endswith(".safetensors"))


def _rss_anon_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
    except (OSError, StopIteration):  # the process has exited
        return None


@pytest.fixture
def out(tmp_path):
    yield tmp_path / "fp8"
    shutil.rmtree(tmp_path / "fp8", ignore_errors=True)  # ~0.66 GB


@pytest.mark.parametrize("scheme", ["per-tensor", "per-channel"])
def test_peak_anonymous_memory_is_a_fraction_of_the_checkpoint(scheme, big_checkpoint, out, tmp_path):
    size = _checkpoint_bytes(big_checkpoint)
    assert size >= 2**30
    stderr = open(tmp_path / "stderr.txt", "w+")
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, "quantize", "--model", str(big_checkpoint), "--output",
                             str(out), "--max-shard-size", "200MB", "--weight-scheme", scheme],
                            cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)
    baseline_kb = int(proc.stdout.readline())
    peak_kb = [baseline_kb]

    def sample() -> None:
        while proc.poll() is None:
            rss = _rss_anon_kb(proc.pid)
            if rss is not None:
                peak_kb[0] = max(peak_kb[0], rss)
            time.sleep(SAMPLE_INTERVAL_S)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.monotonic()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    code = proc.wait(timeout=300)
    elapsed = time.monotonic() - start
    sampler.join()
    stderr.seek(0)
    assert code == 0, stderr.read()
    above = (peak_kb[0] - baseline_kb) * 1024
    print(f"\n{scheme}: checkpoint {size / 1e9:.2f} GB; baseline RssAnon {baseline_kb / 1e3:.0f} MB; peak above "
          f"baseline {above / 1e6:.1f} MB = {100 * above / size:.1f}% of the checkpoint; quantized in {elapsed:.1f} s")
    assert above < BUDGET * size
    _spot_check(big_checkpoint, out, scheme == "per-channel")


def _spot_check(source, out, per_channel: bool) -> None:
    """One weight of the big run against the reference (the tiny round trips check every tensor)."""
    index = json.loads((out / "model.safetensors.index.json").read_text())
    name = "model.layers.2.self_attn.k_proj.weight"
    src_index = json.loads((source / "model.safetensors.index.json").read_text())
    with safe_open(str(source / src_index["weight_map"][name]), framework="pt") as f:
        q_ref, scale_ref = reference_fp8(f.get_tensor(name), per_channel)
    with safe_open(str(out / index["weight_map"][name]), framework="pt") as f:
        assert same_bits(f.get_tensor(name), q_ref)
        assert same_bits(f.get_tensor(name + "_scale"), scale_ref)


def test_sigterm_midway_leaves_no_output(big_checkpoint, out, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "n4.cli", "quantize", "--model", str(big_checkpoint), "--output",
                             str(out), "--no-progress", "--max-shard-size", "100MB"],
                            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        staged = [p for p in tmp_path.iterdir() if p.name.startswith(".fp8.")]
        if staged and len(list(staged[0].glob("*.safetensors"))) >= 2:  # midway: a shard done, the next begun
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert list(tmp_path.iterdir()) == []
