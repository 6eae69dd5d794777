"""`n4 quantize` and the checkpoint loader at their edges: cases the other files of tests/quantize do not cover.

- a Nemotron-4-340B-Reward-layout checkpoint (lm_head [num_labels, hidden]) converts, and n4 serves the result;
- a safetensors index whose weight_map is not an object of shard file names is a one-line error, not a traceback;
- every file of OUT (config.json, the index, copied tokenizer files, not only the shards) and OUT's directory
  entries reach the disk before OUT is published, so a crash just after the rename cannot leave an OUT that looks
  complete with an empty config.json or tokenizer;
- an empty --output is refused up front, not after the whole conversion;
- inf/nan in a tensor that is copied, not quantized (embeddings, norms), is refused when calibration meets it,
  instead of being written as an inf/nan input_scale or k_scale that n4 then refuses to load.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import quantize.convert
from model.config import PRESETS, ModelConfig
from model.loader import load_model
from model.nemotron import NemotronForRewardModel
from tests.quantize.helpers import error_lines, read_tensors, run_quantize, same_bits
from tests.utils import PagedSession, make_tiny_checkpoint, make_tiny_reward_checkpoint

TINY = PRESETS["tiny"]


def test_reward_checkpoint_converts_and_serves(tmp_path, capsys):
    """The 340B-Reward model only fits one node in FP8, so its layout must convert: the [9, hidden] head is kept as
    it is (lm_head is always ignored), the base model's linears are quantized, and n4 loads the result as a reward
    model whose values stay close to the unquantized one's."""
    config = TINY.with_(torch_dtype="float32")
    model_dir = make_tiny_reward_checkpoint(tmp_path / "in", config, seed=3)
    out = tmp_path / "fp8"
    code, err = run_quantize(capsys, "--model", model_dir, "--output", str(out))
    assert code == 0, err
    source, result = read_tensors(model_dir), read_tensors(out)
    assert same_bits(result["lm_head.weight"][1], source["lm_head.weight"][1])  # [9, hidden] fp32
    assert result["model.layers.0.mlp.up_proj.weight"][1].dtype == torch.float8_e4m3fn

    prompt = torch.randint(0, config.vocab_size, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    values = {}
    for key, path in (("bf16", model_dir), ("fp8", str(out))):
        model, _ = load_model(path, dtype="float32")
        assert isinstance(model, NemotronForRewardModel)
        values[key] = PagedSession(model).step([("r", prompt)])[0][-1]  # [9] at the last token
    assert values["fp8"].shape == (9,)
    # FP8 moves the largest of the 9 values by 0.16-0.24 of their RMS (measured, seeds 3-5); a wrong head or a
    # misplaced scale moves them by their whole size.
    rms = values["bf16"].square().mean().sqrt()
    assert (values["fp8"] - values["bf16"]).abs().max() < 0.5 * rms, values


@pytest.mark.parametrize("weight_map", [["model-00001-of-00007.safetensors"], {"model.norm.weight": 3},
                                        "model.safetensors", None])
def test_index_with_a_malformed_weight_map_is_a_one_line_error(weight_map, tmp_path, capsys):
    model_dir = make_tiny_checkpoint(tmp_path / "in", TINY, max_shard_size="100KB")
    index_file = os.path.join(model_dir, "model.safetensors.index.json")
    with open(index_file) as f:
        index = json.load(f)
    index["weight_map"] = weight_map
    with open(index_file, "w") as f:
        json.dump(index, f)
    code, err = run_quantize(capsys, "--model", model_dir, "--output", str(tmp_path / "out"))
    lines = error_lines(err)
    assert code == 2, err
    assert len(lines) == 1 and "model.safetensors.index.json: not a valid safetensors index" in lines[0], err
    assert sorted(os.listdir(tmp_path)) == ["in"]


def test_index_that_is_not_utf8_names_the_file(tmp_path, capsys):
    model_dir = make_tiny_checkpoint(tmp_path / "in", TINY, max_shard_size="100KB")
    with open(os.path.join(model_dir, "model.safetensors.index.json"), "wb") as f:
        f.write(b'\xff\xfe{"weight_map": {}}')
    code, err = run_quantize(capsys, "--model", model_dir, "--output", str(tmp_path / "out"))
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert "model.safetensors.index.json: not a valid safetensors index" in lines[0], err


@pytest.mark.parametrize("shard_size", ["5GB", "100KB"])
def test_every_output_file_is_synced_before_out_is_published(shard_size, tmp_path, capsys, monkeypatch):
    model_dir = make_tiny_checkpoint(tmp_path / "in", TINY)
    (tmp_path / "in" / "generation_config.json").write_text('{"bos_token_id": 2}')
    out = tmp_path / "out"
    events: list[tuple[str, str]] = []
    fsync, rename = os.fsync, os.rename

    def recording_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def recording_rename(src, dst):
        events.append(("rename", os.fspath(dst)))
        return rename(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "rename", recording_rename)
    code, err = run_quantize(capsys, "--model", model_dir, "--output", str(out), "--max-shard-size", shard_size)
    assert code == 0, err
    published = events.index(("rename", str(out)))
    synced = [path for kind, path in events[:published] if kind == "fsync"]
    staging = {os.path.dirname(path) for path in synced if os.path.basename(os.path.dirname(path)).startswith(".out.")}
    assert len(staging) == 1, synced
    staging = staging.pop()
    names = sorted(os.listdir(out))
    assert "config.json" in names and "tokenizer.model" in names and "generation_config.json" in names
    assert (len([n for n in names if n.endswith(".safetensors")]) > 1) == (shard_size == "100KB")
    unsynced = [name for name in names if os.path.join(staging, name) not in synced]
    assert not unsynced, f"written but never fsynced before OUT was published: {unsynced}"
    assert staging in synced, "the staging directory's entries were not synced before the rename"


def test_empty_output_is_refused_before_converting(tmp_path, capsys, monkeypatch):
    model_dir = make_tiny_checkpoint(tmp_path / "in", TINY)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # an empty path names no directory; it must not be read as "here"
    converted = []
    monkeypatch.setattr(quantize.convert, "_write_shards", lambda *a: converted.append(1))
    code, err = run_quantize(capsys, "--model", model_dir, "--output", "")
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and "--output" in lines[0], err
    assert not converted, "the conversion ran before the output path was refused"
    assert sorted(os.listdir(tmp_path)) == ["cwd", "in"] and os.listdir(tmp_path / "cwd") == []


# vocab_size matches the demo tokenizer the checkpoint carries (calibration tokenizes with it).
CALIBRATION_CONFIG = ModelConfig(vocab_size=4096, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 max_position_embeddings=256, torch_dtype="bfloat16")


@pytest.mark.parametrize("tensor, value", [("model.layers.0.input_layernorm.weight", float("inf")),
                                           ("model.embed_tokens.weight", float("nan"))])
def test_non_finite_calibration_is_refused(tensor, value, tmp_path, capsys):
    model_dir = make_tiny_checkpoint(tmp_path / "in", CALIBRATION_CONFIG, seed=1)
    file = os.path.join(model_dir, "model.safetensors")
    tensors = load_file(file)
    tensors[tensor].fill_(value)
    save_file(tensors, file, metadata={"format": "pt"})
    (tmp_path / "calib.txt").write_text("Calibration text measures the range each layer sees.\nHello there.\n")
    code, err = run_quantize(capsys, "--model", model_dir, "--output", str(tmp_path / "out"),
                             "--activation-scheme", "static", "--kv-cache-scales",
                             "--calibration-data", str(tmp_path / "calib.txt"))
    lines = error_lines(err)
    assert code == 2, err
    assert len(lines) == 1 and "calibration measured inf or nan values in" in lines[0], err
    assert sorted(os.listdir(tmp_path)) == ["calib.txt", "in"]
