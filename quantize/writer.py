"""A minimal streaming safetensors writer: every output tensor's name, dtype and shape is planned before any data is
read, so each shard's header (and hence every tensor's byte range) is fixed up front; tensors are then written
piece by piece at their offsets, and nothing larger than the piece being written is ever held in memory.

File layout (the safetensors format): an 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {"format": "pt"}}` padded with spaces so
that the data starts at a multiple of 8, then the tensors' bytes back to back (offsets relative to the data start,
contiguous, no gaps). Within a shard, tensors are laid out by decreasing element size (fp32, then bf16/fp16, then
fp8), as safetensors' own serializer does, so every tensor starts aligned to its element size.
"""
from __future__ import annotations

import json
import math
import os
import struct
import sys
from dataclasses import dataclass, field

import torch

DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float8_e4m3fn: "F8_E4M3"}
TORCH_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_HEADER_ALIGN = 8


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor, known before its data exists."""
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Shard:
    """One output file: its name, its header bytes (length prefix included) and where each tensor's data begins."""
    filename: str
    tensors: tuple[TensorSpec, ...]                            # in file order
    header: bytes
    offsets: dict[str, int] = field(hash=False, compare=False)  # absolute file offset of each tensor's first byte

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)


def layout_shard(filename: str, tensors: list[TensorSpec]) -> Shard:
    """Fix the byte layout of one file holding `tensors`."""
    ordered = sorted(tensors, key=lambda t: -t.dtype.itemsize)  # stable: keeps plan order within a dtype size
    entries, begin = {}, 0
    for t in ordered:
        entries[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                           "data_offsets": [begin, begin + t.nbytes]}
        begin += t.nbytes
    body = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    body += b" " * (-(8 + len(body)) % _HEADER_ALIGN)
    header = struct.pack("<Q", len(body)) + body
    offsets = {name: len(header) + entry["data_offsets"][0] for name, entry in entries.items()}
    return Shard(filename, tuple(ordered), header, offsets)


def plan_shards(groups: list[list[TensorSpec]], max_shard_size: int) -> list[Shard]:
    """Split tensor groups (a group, e.g. a weight and its scales, always shares a file) into shards of at most
    max_shard_size data bytes, in order; a group larger than that gets a shard of its own. One shard is named
    model.safetensors, several model-0000i-of-0000n.safetensors (HF's names)."""
    if max_shard_size <= 0:
        raise ValueError(f"max shard size must be positive, got {max_shard_size}")
    bins: list[list[TensorSpec]] = []
    size = 0
    for group in groups:
        group_size = sum(t.nbytes for t in group)
        if not bins or (size + group_size > max_shard_size and bins[-1]):
            bins.append([])
            size = 0
        bins[-1].extend(group)
        size += group_size
    if len(bins) == 1:
        return [layout_shard(SINGLE_FILE, bins[0])]
    n = len(bins)
    return [layout_shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", b) for i, b in enumerate(bins)]


def write_index(directory: str, shards: list[Shard]) -> None:
    """model.safetensors.index.json: total data size and the file of every tensor."""
    index = {"metadata": {"total_size": sum(t.nbytes for s in shards for t in s.tensors)},
             "weight_map": {t.name: s.filename for s in shards for t in sorted(s.tensors, key=lambda t: t.name)}}
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")


class ShardWriter:
    """Writes one planned shard: the header on open, then each tensor's bytes in pieces (`write` appends to the
    named tensor at its planned offset, so tensors may be filled in any order). `close` checks that every byte
    was written and syncs the file to disk. Use as a context manager."""

    def __init__(self, directory: str, shard: Shard):
        if sys.byteorder != "little":
            raise RuntimeError("the safetensors writer assumes a little-endian host")
        self.shard = shard
        self.path = os.path.join(directory, shard.filename)
        self._specs = {t.name: t for t in shard.tensors}
        self._written = dict.fromkeys(self._specs, 0)
        self._file = open(self.path, "xb")
        self._file.write(shard.header)

    def write(self, name: str, data: torch.Tensor) -> int:
        """Append `data`'s elements (row-major) to tensor `name`; returns the bytes written."""
        spec = self._specs[name]
        if data.dtype != spec.dtype:
            raise TypeError(f"{name}: planned as {spec.dtype}, got {data.dtype}")
        raw = data.detach().contiguous().reshape(-1).view(torch.uint8).numpy()  # zero-copy byte view
        done = self._written[name]
        if done + raw.nbytes > spec.nbytes:
            raise ValueError(f"{name}: {done + raw.nbytes} bytes written, {spec.nbytes} planned")
        self._file.seek(self.shard.offsets[name] + done)
        self._file.write(raw)
        self._written[name] = done + raw.nbytes
        return raw.nbytes

    def close(self) -> None:
        short = [name for name, spec in self._specs.items() if self._written[name] != spec.nbytes]
        if short:
            self._file.close()
            raise RuntimeError(f"{self.path}: tensors not completely written: {', '.join(short)}")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()  # the caller discards the whole staging directory
