"""Bad input to `n4 quantize`: a one-line error, exit code 2, and nothing written (no OUT, no staging directory,
an existing OUT untouched). Interrupted or failing runs leave no OUT either."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import quantize.writer
from model.config import PRESETS
from quantize import signals
from tests.quantize.helpers import error_lines, run_quantize
from tests.utils import make_tiny_checkpoint

TINY = PRESETS["tiny"]


@pytest.fixture
def model_dir(tmp_path):
    return make_tiny_checkpoint(tmp_path / "in", TINY, max_shard_size="100KB")


def _single(tmp_path) -> str:
    return make_tiny_checkpoint(tmp_path / "in", TINY)


def _edit_config(path, **changes) -> None:
    file = os.path.join(path, "config.json")
    with open(file) as f:
        config = json.load(f)
    config.update(changes)
    with open(file, "w") as f:
        json.dump(config, f)


def _edit_tensors(path, edit) -> None:
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _shard(path, i=2) -> str:
    """The i-th (1-based) shard file of a sharded checkpoint."""
    return sorted(glob.glob(os.path.join(path, "model-*-of-*.safetensors")))[i - 1]


def _truncate(path) -> list[str]:
    with open(_shard(path), "r+b") as f:
        f.truncate(os.path.getsize(_shard(path)) - 100)
    return []


def _garbage_header(path) -> list[str]:
    with open(_shard(path), "r+b") as f:
        f.seek(8)
        f.write(b"not json")
    return []


def _drop_tensor(path) -> list[str]:
    _edit_tensors(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    return []


def _extra_tensor(path) -> list[str]:
    _edit_tensors(path, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(4, 4)}))
    return []


def _integer_tensor(path) -> list[str]:
    _edit_tensors(path, lambda t: t.update({"model.norm.bias": torch.zeros(64, dtype=torch.int32)}))
    return []


def _inf_weight(path) -> list[str]:
    def edit(t):
        t["model.layers.1.mlp.down_proj.weight"][0, 0] = float("inf")
    _edit_tensors(path, edit)
    return []


def _fp8_tensors(path) -> list[str]:
    _edit_tensors(path, lambda t: t.update({"model.layers.0.mlp.up_proj.weight":
                                            t["model.layers.0.mlp.up_proj.weight"].to(torch.float8_e4m3fn)}))
    return []


def _no_weights(path) -> list[str]:
    os.remove(os.path.join(path, "model.safetensors"))
    return []


def _empty_file(name, content=""):
    def make(path) -> list[str]:
        file = os.path.join(os.path.dirname(path), name)
        with open(file, "w") as f:
            f.write(content)
        return ["--activation-scheme", "static", "--calibration-data", file]
    return make


def _remove(name):
    def make(path) -> list[str]:
        os.remove(os.path.join(path, name))
        return []
    return make


SINGLE_FILE_CASES = {
    "missing-tensor": (_drop_tensor, "missing 1 tensor(s) that config.json implies: model.layers.1.mlp.up_proj.weight"),
    "unexpected-tensor": (_extra_tensor, "model.layers.2.mlp.up_proj.weight"),
    "integer-tensor": (_integer_tensor, "'model.norm.bias' has dtype I32"),
    "mis-shaped": (lambda p: _edit_config(p, intermediate_size=128) or [],
                   "'model.layers.0.mlp.up_proj.weight' has shape [256, 64], config.json implies [128, 64]"),
    "not-nemotron": (lambda p: _edit_config(p, model_type="llama") or [], "model_type is 'llama'"),
    "no-config": (_remove("config.json"), "no config.json"),
    "config-not-object": (lambda p: open(os.path.join(p, "config.json"), "w").write("[1, 2]") and [],
                          "config.json: expected a JSON object, got list"),
    "config-without-heads": (lambda p: _edit_config(p, num_attention_heads=None) or [],
                             "config.json: num_attention_heads must be a positive integer, got None"),
    "config-size-as-text": (lambda p: _edit_config(p, hidden_size="64") or [],
                            "config.json: hidden_size must be a positive integer, got '64'"),
    "quantized-config": (lambda p: _edit_config(p, quantization_config={"quant_method": "fp8"}) or [],
                         "already quantized (config.json has quantization_config with quant_method 'fp8')"),
    "compressed-tensors-config": (
        lambda p: _edit_config(p, compression_config={"quant_method": "compressed-tensors"}) or [],
        "already quantized"),
    "modelopt": (lambda p: open(os.path.join(p, "hf_quant_config.json"), "w").close() or [],
                 "ModelOpt hf_quant_config.json"),
    "fp8-tensors": (_fp8_tensors, "'model.layers.0.mlp.up_proj.weight' (F8_E4M3) shows the checkpoint is already"),
    "inf-weight": (_inf_weight, "'model.layers.1.mlp.down_proj.weight' has inf or nan values"),
    "no-weights": (_no_weights, "no safetensors weights"),
    "static-without-data": (lambda p: ["--activation-scheme", "static"], "needs --calibration-data"),
    "kv-without-data": (lambda p: ["--kv-cache-scales"], "--kv-cache-scales needs --calibration-data"),
    "data-without-use": (lambda p: ["--calibration-data", os.path.join(p, "config.json")], "only used with"),
    "calibration-missing": (lambda p: ["--kv-cache-scales", "--calibration-data", "/nonexistent/c.txt"],
                            "/nonexistent/c.txt: no such file"),
    "calibration-empty": (_empty_file("c.txt"), "c.txt: the file is empty"),
    "calibration-blank": (_empty_file("c.txt", "\n   \n\n"), "no text samples"),
    "calibration-bad-jsonl": (_empty_file("c.jsonl", '{"text": "fine"}\n{"text": \n'), "c.jsonl:2: not valid JSON"),
    "calibration-jsonl-no-text": (_empty_file("c.jsonl", '{"content": "x"}\n'), 'a string "text" field'),
    "calibration-no-tokenizer": (lambda p: _remove("tokenizer.model")(p) + _empty_file("c.txt", "hi\n")(p),
                                 "no tokenizer.model"),
    "zero-samples": (lambda p: ["--num-calibration-samples", "0"], "--num-calibration-samples must be positive"),
    "bad-shard-size": (lambda p: ["--max-shard-size", "lots"], "--max-shard-size 'lots'"),
}


def _assert_clean_failure(capsys, tmp_path, args, message, expected_listing=("in",)):
    code, err = run_quantize(capsys, *args)
    lines = error_lines(err)
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("n4 quantize: error: "), err
    assert message in lines[0], lines[0]
    assert sorted(os.listdir(tmp_path)) == sorted(expected_listing)  # no OUT, no staging directory


@pytest.mark.parametrize("case", sorted(SINGLE_FILE_CASES))
def test_bad_input_single_file(case, tmp_path, capsys):
    path = _single(tmp_path)
    breaker, message = SINGLE_FILE_CASES[case]
    extra = breaker(path)
    listing = sorted(os.listdir(tmp_path))
    _assert_clean_failure(capsys, tmp_path, ["--model", path, "--output", str(tmp_path / "out"), *extra], message,
                          listing)


@pytest.mark.parametrize("breaker, message", [
    (_truncate, "model-00002-of-00007.safetensors: cannot read this safetensors file; it may be truncated"),
    (_garbage_header, "model-00002-of-00007.safetensors: cannot read this safetensors file"),
    (lambda p: os.remove(_shard(p, 3)), "names shard files that do not exist"),
])
def test_bad_input_sharded(breaker, message, model_dir, tmp_path, capsys):
    breaker(model_dir)
    _assert_clean_failure(capsys, tmp_path, ["--model", model_dir, "--output", str(tmp_path / "out")], message)


def test_output_exists_without_overwrite(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    _assert_clean_failure(capsys, tmp_path, ["--model", model_dir, "--output", str(out)],
                          "already exists; pass --overwrite", ("in", "out"))
    assert os.listdir(out) == ["keep.txt"]


@pytest.mark.parametrize("output, message", [
    ("missing-parent/out", "does not exist"),
    ("in", "would replace the input checkpoint"),
    (".", "would replace the input checkpoint"),
])
def test_bad_output_path(output, message, model_dir, tmp_path, capsys):
    _assert_clean_failure(capsys, tmp_path, ["--model", model_dir, "--output", str(tmp_path / output),
                                             "--overwrite"], message)


def test_overwrite_replaces_only_a_complete_output(model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    _fail_on_write(monkeypatch, 3, OSError("disk on fire"))
    _assert_clean_failure(capsys, tmp_path, ["--model", model_dir, "--output", str(out), "--overwrite"],
                          "disk on fire", ("in", "out"))
    assert os.listdir(out) == ["keep.txt"]
    monkeypatch.undo()
    code, err = run_quantize(capsys, "--model", model_dir, "--output", str(out), "--overwrite")
    assert code == 0, err
    assert "keep.txt" not in os.listdir(out) and "config.json" in os.listdir(out)
    assert sorted(os.listdir(tmp_path)) == ["in", "out"]


def _fail_on_write(monkeypatch, after: int, error: BaseException) -> None:
    """ShardWriter.write raises `error` on its call number `after` (the run is then midway through its shards)."""
    write = quantize.writer.ShardWriter.write
    calls = []

    def failing(self, name, data):
        calls.append(name)
        if len(calls) == after:
            raise error
        return write(self, name, data)

    monkeypatch.setattr(quantize.writer.ShardWriter, "write", failing)


@pytest.mark.parametrize("overwrite", [False, True])
def test_interrupted_run_leaves_no_output(overwrite, model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    if overwrite:
        out.mkdir()
        (out / "keep.txt").write_text("old")
    _fail_on_write(monkeypatch, 20, KeyboardInterrupt())
    code, _ = run_quantize(capsys, "--model", model_dir, "--output", str(out), *(["--overwrite"] * overwrite))
    assert code == 130
    assert sorted(os.listdir(tmp_path)) == (["in", "out"] if overwrite else ["in"])
    if overwrite:
        assert os.listdir(out) == ["keep.txt"]


def test_unexpected_exception_cleans_up(model_dir, tmp_path, capsys, monkeypatch):
    """A bug (not a user error) propagates with its traceback, and still removes the staging directory."""
    _fail_on_write(monkeypatch, 10, RuntimeError("bug"))
    with pytest.raises(RuntimeError, match="bug"):
        run_quantize(capsys, "--model", model_dir, "--output", str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["in"]


def test_entry_point_error_is_one_line(model_dir, tmp_path):
    (tmp_path / "out").mkdir()
    proc = subprocess.run([sys.executable, "-m", "n4.cli", "quantize", "--model", model_dir, "--output",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"n4 quantize: error: --output {tmp_path / 'out'} already exists; pass --overwrite to replace it (it is "
        f"replaced only once the new checkpoint is complete)"]


def test_a_signal_inside_a_shielded_call_is_raised_when_it_returns():
    restore = signals.install()
    reached = False
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals.shielded():
                os.kill(os.getpid(), signal.SIGTERM)
                reached = True  # the handler did not raise inside the block
        assert reached
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # outside a shield it raises at once
    finally:
        restore()
