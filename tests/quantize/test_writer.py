"""quantize/writer.py: the streaming safetensors writer and shard planning, read back by safetensors and
transformers."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from quantize.cli import parse_size
from quantize.writer import ShardWriter, TensorSpec, layout_shard, plan_shards, write_index

DTYPES = (torch.float8_e4m3fn, torch.float32, torch.bfloat16, torch.float16)


def _random_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Mixed dtypes and odd shapes (so that byte sizes are not multiples of 8), including a scalar."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 5), (7,), (), (2, 3, 3), (1, 1), (13, 1), (5,)]
    tensors = {}
    for i, shape in enumerate(shapes):
        for dtype in DTYPES:
            tensors[f"t{i}.{str(dtype).removeprefix('torch.')}"] = torch.randn(shape, generator=g).to(dtype)
    return tensors


def _spec(name: str, t: torch.Tensor) -> TensorSpec:
    return TensorSpec(name, t.dtype, tuple(t.shape))


def test_written_file_reads_back_with_safetensors_and_transformers(tmp_path):
    from transformers.modeling_utils import load_state_dict

    tensors = _random_tensors()
    shard = layout_shard("model.safetensors", [_spec(n, t) for n, t in tensors.items()])
    with ShardWriter(str(tmp_path), shard) as writer:
        for name in reversed(list(tensors)):  # any order: each tensor goes to its planned offset
            t = tensors[name]
            if t.dim() and t.shape[0] > 1:    # and in pieces
                writer.write(name, t[:1])
                writer.write(name, t[1:])
            else:
                writer.write(name, t)
    file = str(tmp_path / "model.safetensors")
    with safe_open(file, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        for name, t in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name
    for loaded in (load_file(file), load_state_dict(file)):
        assert set(loaded) == set(tensors)
        for name, t in tensors.items():
            assert torch.equal(loaded[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
    assert (tmp_path / "model.safetensors").stat().st_size == shard.size


def test_header_layout_is_padded_contiguous_and_aligned(tmp_path):
    tensors = _random_tensors(1)
    shard = layout_shard("x.safetensors", [_spec(n, t) for n, t in tensors.items()])
    (length,) = struct.unpack("<Q", shard.header[:8])
    assert len(shard.header) == 8 + length and len(shard.header) % 8 == 0
    header = json.loads(shard.header[8:])
    assert header.pop("__metadata__") == {"format": "pt"}
    spans = sorted((e["data_offsets"], e["dtype"]) for e in header.values())
    end = 0
    for (begin, stop), dtype in spans:
        assert begin == end  # no gaps, no overlaps
        itemsize = {"F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1}[dtype]
        assert (len(shard.header) + begin) % itemsize == 0  # every tensor aligned to its element size
        end = stop
    assert end == sum(t.nbytes for t in shard.tensors)


def test_incomplete_or_overfull_tensor_is_an_error(tmp_path):
    t = torch.ones(4, 4)
    shard = layout_shard("a.safetensors", [_spec("a", t), _spec("b", t)])
    with pytest.raises(RuntimeError, match="not completely written: b"):
        with ShardWriter(str(tmp_path), shard) as writer:
            writer.write("a", t)
            writer.write("b", t[:2])
    shard = layout_shard("b.safetensors", [_spec("a", t)])
    with ShardWriter(str(tmp_path), shard) as writer:
        writer.write("a", t)
        with pytest.raises(ValueError, match="planned"):
            writer.write("a", t[:1])
        with pytest.raises(TypeError, match="planned as"):
            writer.write("a", t.bfloat16())


def test_plan_shards_keeps_groups_together_within_the_size(tmp_path):
    def group(i, rows):
        return [TensorSpec(f"w{i}", torch.float8_e4m3fn, (rows, 10)), TensorSpec(f"w{i}.scale", torch.float32, ())]

    groups = [group(0, 10), group(1, 10), group(2, 30), group(3, 5), group(4, 5)]  # 104, 104, 304, 54, 54 bytes
    shards = plan_shards(groups, max_shard_size=250)
    assert [sorted(t.name for t in s.tensors) for s in shards] == [
        ["w0", "w0.scale", "w1", "w1.scale"], ["w2", "w2.scale"], ["w3", "w3.scale", "w4", "w4.scale"]]
    assert [s.filename for s in shards] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert [s.filename for s in plan_shards(groups, max_shard_size=10**6)] == ["model.safetensors"]
    write_index(str(tmp_path), shards)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 104 * 2 + 304 + 54 * 2
    assert index["weight_map"]["w2.scale"] == "model-00002-of-00003.safetensors"
    assert len(index["weight_map"]) == 10


@pytest.mark.parametrize("text, size", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30),
                                        ("1.5kb", 1500), ("4096", 4096), (" 10 MiB ", 10 * 2**20)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "5 XB", "-1GB", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="max-shard-size"):
        parse_size(text)
