"""Build a NemotronForCausalLM from an HF checkpoint directory (safetensors, single file or sharded with an index)
or from a preset with random weights (`load_format="dummy"`, for benchmarks and tests)."""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import torch
from safetensors import SafetensorError, safe_open

from model.config import PRESETS, ModelConfig
from model.errors import CheckpointError
from model.nemotron import NemotronForCausalLM

__all__ = ["CheckpointError", "load_model", "iter_safetensors", "init_dummy_weights", "resolve_dtype"]

_DTYPE_NAMES = {"float32": "float32", "float": "float32", "bfloat16": "bfloat16", "float16": "float16",
                "half": "float16"}
_LOAD_FORMATS = ("auto", "dummy")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DUMMY_INIT_STD = 0.02


def load_model(model: str, dtype: str = "auto", device: str = "cpu", load_format: str = "auto",
               kernel_backend: str = "torch") -> tuple[NemotronForCausalLM, ModelConfig]:
    """Load `model` (a checkpoint directory or a preset name) for inference on `device`.

    dtype: "auto" (the checkpoint's torch_dtype) | "float32" | "bfloat16" | "float16". The returned config's
    torch_dtype is the dtype the weights were loaded in. load_format: "auto" reads the checkpoint's safetensors;
    "dummy" uses only its config (or the preset's) and fills the weights with seeded random values.
    """
    if load_format not in _LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {_LOAD_FORMATS}, got {load_format!r}")
    if model in PRESETS:  # presets first, as model.config.get_config does
        if load_format != "dummy":
            raise ValueError(f"{model!r} is a preset with no weights; pass load_format='dummy' for random weights "
                             f"of its shape, or a checkpoint directory")
        config = PRESETS[model]
    elif os.path.isdir(model):
        config = ModelConfig.from_pretrained(model)
    else:
        raise ValueError(f"model {model!r} is neither a checkpoint directory nor a preset "
                         f"({', '.join(sorted(PRESETS))})")
    config = config.with_(torch_dtype=resolve_dtype(dtype, config))

    with torch.device(device):
        net = NemotronForCausalLM(config, kernel_backend=kernel_backend)
    if load_format == "dummy":
        init_dummy_weights(net)
    else:
        net.load_weights(iter_safetensors(model))
    net.requires_grad_(False)
    return net.eval(), config


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig) -> str:
    """The dtype name to run in: config.torch_dtype for "auto", else `dtype` (a name or a torch.dtype)."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype == "auto":
        return config.torch_dtype
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    return _DTYPE_NAMES[dtype]


def iter_safetensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from a checkpoint directory's safetensors, one tensor at a time, memory-mapped.

    Reads `model.safetensors.index.json` and its shards when present, else `model.safetensors`, else any
    `*.safetensors`. Raises CheckpointError naming the file when one is missing, truncated or corrupt. Tensors
    come in their stored dtype: the model's weight loaders cast as they copy into the parameters, so a quantized
    linear method can still see its checkpoint's own dtypes.
    """
    for file in _safetensors_files(path):
        try:
            handle = safe_open(file, framework="pt", device="cpu")
        except (SafetensorError, OSError) as e:
            raise _unreadable(file, e) from None
        with handle as f:
            for name in f.keys():
                try:
                    tensor = f.get_tensor(name)
                except (SafetensorError, OSError) as e:
                    raise _unreadable(file, e) from None
                yield name, tensor


def _unreadable(file: str, error: Exception) -> CheckpointError:
    return CheckpointError(f"{file}: cannot read this safetensors file; it may be truncated or corrupt ({error})")


def _safetensors_files(path: str) -> list[str]:
    index_path = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        files = [os.path.join(path, shard) for shard in sorted(set(weight_map.values()))]
        absent = [file for file in files if not os.path.isfile(file)]
        if absent:
            raise CheckpointError(f"{index_path} names shard files that do not exist: {', '.join(absent)}")
        return files
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        others = [name for name in ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt")
                  if os.path.exists(os.path.join(path, name))]
        hint = f" (found {', '.join(others)}: convert it to safetensors)" if others else ""
        raise CheckpointError(f"{path}: no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}){hint}")
    return files


@torch.no_grad()
def init_dummy_weights(net: NemotronForCausalLM, seed: int = 0, std: float = DUMMY_INIT_STD) -> None:
    """Fill every parameter with N(0, std) from a generator seeded with `seed` on the parameters' device, so the
    same seed gives the same weights on the same device. Norm weights are zero-centred (stored scale - 1), so
    zeros give scale 1; norm biases are zeros too."""
    generator = None
    for name, param in net.named_parameters():
        if generator is None:
            generator = torch.Generator(device=param.device).manual_seed(seed)
        if "norm." in name:
            param.zero_()
        else:
            param.normal_(0.0, std, generator=generator)
    net.process_weights_after_loading()
