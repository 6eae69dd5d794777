"""Static calibration: run the unquantized model over sample text and record the magnitudes FP8 needs scales for.

- every linear layer's input amax -> `X.input_scale = fp8_scale(amax)` (q/k/v run as one fused layer on one
  input, so they get the same value);
- per attention layer, the amax of K as stored in the KV cache (after RoPE) and of V -> `self_attn.k_scale`,
  `self_attn.v_scale`.

The whole model is loaded into memory (float32 on the CPU: 4 bytes per parameter) with n4's own model and the
torch kernel backend; batches are packed flat token batches with a paged KV cache, as the engine runs them. The
recording wraps, on the loaded model only, each linear layer's linear method and each attention layer's
`rope_kv_write` op: model/ is not changed and sees no hooks.

Text is tokenized with the checkpoint's SentencePiece `tokenizer.model`, without BOS, as the server encodes
prompts (server/api/tokenizer.py; not imported here: quantize must not import server).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from collections.abc import Iterator

import torch
from torch import nn

from model.attention_metadata import AttentionMetadata
from model.loader import load_model
from model.quant import LinearMethod

log = logging.getLogger(__name__)

DEFAULT_NUM_SAMPLES = 128
DEFAULT_SEQ_LEN = 512
_BLOCK_SIZE = 16
BATCH_TOKENS = 4096  # tokens per packed forward; bounds the activations and the per-batch KV cache


@dataclasses.dataclass
class Calibration:
    input_amax: dict[str, torch.Tensor]  # HF linear module name ("model.layers.0.self_attn.q_proj") -> fp32 []
    k_amax: dict[int, torch.Tensor]      # layer index -> fp32 [] amax of K as stored (after RoPE)
    v_amax: dict[int, torch.Tensor]      # layer index -> fp32 [] amax of V
    num_samples: int
    num_tokens: int


def check_calibration_file(path: str) -> None:
    """Fail early (before any work) on a missing or empty calibration file."""
    if not os.path.isfile(path):
        raise ValueError(f"--calibration-data {path}: no such file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"--calibration-data {path}: the file is empty")


def read_samples(path: str, limit: int) -> list[str]:
    """Up to `limit` text samples: one per non-blank line of a text file, or the `text` field of each line of a
    `.jsonl` file. Reads only as far as it needs."""
    check_calibration_file(path)
    jsonl = path.endswith(".jsonl")
    samples: list[str] = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if len(samples) == limit:
                    break
                if not line.strip():
                    continue
                text = _jsonl_text(path, lineno, line) if jsonl else line.rstrip("\n")
                if text.strip():
                    samples.append(text)
    except UnicodeDecodeError as e:
        raise ValueError(f"--calibration-data {path}: not UTF-8 text ({e})") from None
    if not samples:
        raise ValueError(f"--calibration-data {path}: no text samples in it")
    return samples


def _jsonl_text(path: str, lineno: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"--calibration-data {path}:{lineno}: not valid JSON ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f"--calibration-data {path}:{lineno}: expected an object with a string \"text\" field")
    return record["text"]


def tokenize(samples: list[str], model_path: str, max_len: int, vocab_size: int) -> list[list[int]]:
    """Token ids of each sample (no BOS), truncated to max_len; samples that encode to nothing are dropped."""
    import sentencepiece as spm

    tokenizer_file = os.path.join(model_path, "tokenizer.model")
    if not os.path.isfile(tokenizer_file):
        raise ValueError(f"{model_path}: no tokenizer.model; calibration tokenizes its text with the checkpoint's "
                         f"SentencePiece tokenizer")
    try:
        sp = spm.SentencePieceProcessor(model_file=tokenizer_file)
    except (RuntimeError, OSError) as e:
        raise ValueError(f"{tokenizer_file}: cannot load the SentencePiece model ({e})") from None
    tokens = [ids[:max_len] for ids in sp.encode(samples)]
    if any(t >= vocab_size for ids in tokens for t in ids):
        raise ValueError(f"{tokenizer_file} produces ids >= the model's vocab_size ({vocab_size}); it does not "
                         f"belong to this model")
    return [ids for ids in tokens if ids]


@torch.inference_mode()
def calibrate(model_path: str, token_lists: list[list[int]]) -> Calibration:
    """Run the model (float32, CPU) over the token lists in packed batches and record the amaxes."""
    model, _ = load_model(model_path, dtype="float32", kernel_backend="torch")
    recorder = _Recorder(model)
    batches = list(_pack(token_lists, max(BATCH_TOKENS, max(map(len, token_lists)))))
    for i, batch in enumerate(batches, 1):
        _forward(model, batch)
        log.info("calibration batch %d/%d: %d sequences, %d tokens", i, len(batches), len(batch),
                 sum(map(len, batch)))
    return Calibration(recorder.input_amax(), recorder.kv_amax("k"), recorder.kv_amax("v"),
                       num_samples=len(token_lists), num_tokens=sum(map(len, token_lists)))


def _pack(token_lists: list[list[int]], batch_tokens: int) -> Iterator[list[list[int]]]:
    batch: list[list[int]] = []
    for ids in token_lists:
        if batch and sum(map(len, batch)) + len(ids) > batch_tokens:
            yield batch
            batch = []
        batch.append(ids)
    if batch:
        yield batch


def _forward(model: nn.Module, batch: list[list[int]]) -> None:
    """One prefill of fresh sequences: each gets its own consecutive cache blocks."""
    config = model.config
    lengths = [len(ids) for ids in batch]
    tables, next_block = [], 0
    for n in lengths:
        blocks = math.ceil(n / _BLOCK_SIZE)
        tables.append(list(range(next_block, next_block + blocks)))
        next_block += blocks
    metadata = AttentionMetadata.build(lengths, lengths, tables, _BLOCK_SIZE)
    cache_shape = (2, next_block, _BLOCK_SIZE, config.num_key_value_heads, config.head_dim)
    kv_caches = [torch.zeros(cache_shape) for _ in range(config.num_hidden_layers)]  # [2, NB, BS, Hkv, D] fp32
    input_ids = torch.tensor([t for ids in batch for t in ids])                       # [T]
    positions = torch.cat([torch.arange(n) for n in lengths])                          # [T]
    model(input_ids, positions, kv_caches, metadata)


class _AmaxLinearMethod(LinearMethod):
    """Delegates to the model's own linear method and records the amax of every input. The MLP takes the base
    class's unfused path (apply(up), relu(.)**2, apply(down)) so that the down-projection's input is seen too."""

    def __init__(self, inner: LinearMethod, record):
        self.inner = inner
        self.record = record

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        self.record(layer, x)
        return self.inner.apply(layer, x)


class _Recorder:
    """Installs the recording on a loaded NemotronForCausalLM and keeps running maxima."""

    def __init__(self, model: nn.Module):
        self._linear: dict[nn.Module, torch.Tensor] = {}        # linear layer -> amax of its inputs
        self._kv: dict[tuple[str, int], torch.Tensor] = {}      # ("k" | "v", layer index) -> amax as stored
        self._names: dict[nn.Module, list[str]] = {}
        method = _AmaxLinearMethod(model.linear_method, functools.partial(_update_max, self._linear))
        for i, layer in enumerate(model.model.layers):
            attn, mlp, prefix = layer.self_attn, layer.mlp, f"model.layers.{i}."
            self._names[attn.qkv_proj] = [f"{prefix}self_attn.{p}_proj" for p in ("q", "k", "v")]
            self._names[attn.o_proj] = [f"{prefix}self_attn.o_proj"]
            self._names[mlp.up_proj] = [f"{prefix}mlp.up_proj"]
            self._names[mlp.down_proj] = [f"{prefix}mlp.down_proj"]
            for module in (attn.qkv_proj, attn.o_proj, mlp.up_proj, mlp.down_proj):
                module.linear_method = method
            write = functools.partial(self._rope_kv_write, attn.ops.rope_kv_write, i)
            attn.ops = dataclasses.replace(attn.ops, rope_kv_write=write)

    def _rope_kv_write(self, write, layer: int, q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping,
                       *args, **kwargs) -> torch.Tensor:
        q_rot = write(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping, *args, **kwargs)
        slots = slot_mapping[slot_mapping >= 0]
        _update_max(self._kv, ("k", layer), k_cache.flatten(0, 1)[slots])  # [T, Hkv, D] as stored, after RoPE
        _update_max(self._kv, ("v", layer), v_cache.flatten(0, 1)[slots])  # [T, Hkv, D]
        return q_rot

    def input_amax(self) -> dict[str, torch.Tensor]:
        return {name: self._linear[module] for module, names in self._names.items() for name in names}

    def kv_amax(self, which: str) -> dict[int, torch.Tensor]:
        return {layer: amax for (kind, layer), amax in self._kv.items() if kind == which}


def _update_max(store: dict, key: object, x: torch.Tensor) -> None:
    amax = x.abs().amax().float()  # fp32 []
    store[key] = torch.maximum(store[key], amax) if key in store else amax
