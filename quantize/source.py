"""The input checkpoint, opened for streaming: its config.json, and its tensors memory-mapped.

`SourceCheckpoint.open` reads only headers (dtype and shape come from them, no data) and rejects, with a message
naming the file or tensor, anything the conversion cannot use: a non-Nemotron config, an already quantized
checkpoint, an unreadable (truncated or corrupt) safetensors file, missing, unexpected, duplicated or mis-shaped
tensors. Data is then read a block of rows at a time, so at most one block of one tensor is resident at once (the
mapped file pages are page cache, not process memory).
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open

from model.config import ModelConfig
from model.errors import CheckpointError
from model.loader import safetensors_files, unreadable_file_error
from quantize import signals
from quantize.writer import TORCH_DTYPES

_FLOAT_DTYPES = ("F32", "BF16", "F16")
_QUANTIZED_SUFFIXES = ("weight_scale", "input_scale", "k_scale", "v_scale", "kv_scale", "weight_scale_inv")
# Buffers some older checkpoints carry; model/nemotron.py skips them on load, the conversion copies them as they are.
PASSTHROUGH_SUFFIXES = ("rotary_emb.inv_freq",)
_MAX_NAMES_SHOWN = 8


@dataclass(frozen=True)
class SourceTensor:
    name: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF Nemotron checkpoint of `config` holds, with its shape (DESIGN.md's names)."""
    hidden, head_dim = config.hidden_size, config.head_dim
    q_rows, kv_rows = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"{p}{norm}.weight"] = shapes[f"{p}{norm}.bias"] = (hidden,)
        shapes[f"{p}self_attn.q_proj.weight"] = (q_rows, hidden)
        shapes[f"{p}self_attn.k_proj.weight"] = (kv_rows, hidden)
        shapes[f"{p}self_attn.v_proj.weight"] = (kv_rows, hidden)
        shapes[f"{p}self_attn.o_proj.weight"] = (hidden, q_rows)
        shapes[f"{p}mlp.up_proj.weight"] = (config.intermediate_size, hidden)
        shapes[f"{p}mlp.down_proj.weight"] = (hidden, config.intermediate_size)
    shapes["model.norm.weight"] = shapes["model.norm.bias"] = (hidden,)
    # A reward checkpoint (Nemotron-4-340B-Reward) replaces the LM head by a [num_labels, hidden] one; like any
    # lm_head it is copied unquantized.
    shapes["lm_head.weight"] = (config.num_labels if config.is_reward else config.vocab_size, hidden)
    return shapes


class SourceCheckpoint:
    """An HF Nemotron checkpoint directory, validated; use as a context manager (it holds the mapped files)."""

    def __init__(self, path: str, hf_config: dict, config: ModelConfig, tensors: dict[str, SourceTensor],
                 handles: dict[str, object], stack: contextlib.ExitStack):
        self.path = path
        self.hf_config = hf_config    # config.json as read, every key kept
        self.config = config
        self.tensors = tensors        # in file order, then header order within a file
        self._handles = handles
        self._stack = stack

    @classmethod
    def open(cls, path: str) -> "SourceCheckpoint":
        if not os.path.isdir(path):
            raise ValueError(f"--model {path!r} is not a checkpoint directory")
        config = ModelConfig.from_pretrained(path)  # raises ValueError for anything but a valid Nemotron config
        with open(os.path.join(path, "config.json")) as f:
            hf_config = json.load(f)
        _reject_quantized_config(path, hf_config)
        stack = contextlib.ExitStack()
        try:
            handles, tensors = _open_files(safetensors_files(path), stack)
            _check_tensors(tensors, config)
        except BaseException:
            stack.close()
            raise
        return cls(path, hf_config, config, tensors, handles, stack)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` (elements, for a 1-D tensor), copied out of the mapped file."""
        tensor = self.tensors[name]
        handle = self._handles[tensor.file]
        try:
            with signals.shielded():
                if not tensor.shape:
                    return handle.get_tensor(name)
                return handle.get_slice(name)[start:stop]
        except (SafetensorError, OSError) as e:
            raise unreadable_file_error(tensor.file, e) from None

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "SourceCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _reject_quantized_config(path: str, hf_config: dict) -> None:
    for key in ("quantization_config", "compression_config"):
        if key in hf_config:
            value = hf_config[key]
            method = value.get("quant_method") if isinstance(value, dict) else None
            raise ValueError(f"{path}: already quantized (config.json has {key} with quant_method {method!r}); "
                             f"n4 quantize needs a BF16, FP16 or FP32 checkpoint")
    if os.path.exists(os.path.join(path, "hf_quant_config.json")):
        raise ValueError(f"{path}: already quantized (it has a ModelOpt hf_quant_config.json); n4 quantize needs a "
                         f"BF16, FP16 or FP32 checkpoint")


def _open_files(files: list[str], stack: contextlib.ExitStack) -> tuple[dict, dict[str, SourceTensor]]:
    handles, tensors = {}, {}
    for file in files:
        try:
            with signals.shielded():
                handle = stack.enter_context(safe_open(file, framework="pt", device="cpu"))
                entries = [(name, handle.get_slice(name)) for name in handle.keys()]
                entries = [(name, s.get_dtype(), tuple(s.get_shape())) for name, s in entries]
        except (SafetensorError, OSError) as e:
            raise unreadable_file_error(file, e) from None
        handles[file] = handle
        for name, dtype, shape in entries:
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} appears twice: in {tensors[name].file} and {file}")
            if dtype.startswith("F8") or name.endswith(_QUANTIZED_SUFFIXES):
                raise ValueError(f"{file}: tensor {name!r} ({dtype}) shows the checkpoint is already quantized; "
                                 f"n4 quantize needs a BF16, FP16 or FP32 checkpoint")
            if dtype not in _FLOAT_DTYPES:
                raise CheckpointError(f"{file}: tensor {name!r} has dtype {dtype}; expected one of "
                                      f"{', '.join(_FLOAT_DTYPES)}")
            tensors[name] = SourceTensor(name, file, TORCH_DTYPES[dtype], shape)
    return handles, tensors


def _check_tensors(tensors: dict[str, SourceTensor], config: ModelConfig) -> None:
    expected = expected_shapes(config)
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s) that config.json implies: "
                              f"{_names(missing)}")
    unexpected = [name for name in tensors if name not in expected and not name.endswith(PASSTHROUGH_SUFFIXES)]
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} tensor(s) a Nemotron model of "
                              f"{config.num_hidden_layers} layers does not: {_names(unexpected)}")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise CheckpointError(f"{tensors[name].file}: tensor {name!r} has shape {list(tensors[name].shape)}, "
                                  f"config.json implies {list(shape)}")


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES_SHOWN])
    return shown + (f" and {len(names) - _MAX_NAMES_SHOWN} more" if len(names) > _MAX_NAMES_SHOWN else "")

