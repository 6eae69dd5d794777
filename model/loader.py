"""Build a NemotronForCausalLM (a NemotronForRewardModel for a reward checkpoint) from an HF checkpoint directory
(safetensors, single file or sharded with an index) or from a preset with random weights (`load_format="dummy"`,
for benchmarks and tests).

FP8: the checkpoint's format is detected from its configs (model/quant_config.py) and selects the FP8 linear
method (model/fp8.py); `quantization="fp8"` quantizes a high-precision checkpoint while it streams in. KV-cache
scales are taken out of the tensor stream here and set on each layer's Attention for an FP8 KV cache."""
from __future__ import annotations

import glob
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from model import distributed
from model.config import PRESETS, ModelConfig
from model.errors import CheckpointError
from model.fp8 import Fp8LinearMethod
from model.layers import Attention
from model.lazy_tensor import LazyTensor, materialize
from model.nemotron import NemotronForCausalLM, hf_module_names, model_class
from model.quant import UnquantizedLinearMethod
from model.quant_config import (MODELOPT_CONFIG, QuantConfig, detect_quant_config, is_fp8_kv_cache,
                                kv_scale_target, resolve_quantization)

__all__ = ["CheckpointError", "load_model", "iter_safetensors", "init_dummy_weights", "resolve_dtype",
           "read_quant_config"]

logger = logging.getLogger(__name__)

_DTYPE_NAMES = {"float32": "float32", "float": "float32", "bfloat16": "bfloat16", "float16": "float16",
                "half": "float16"}
_LOAD_FORMATS = ("auto", "dummy")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DUMMY_INIT_STD = 0.02


def load_model(model: str, dtype: str = "auto", device: str = "cpu", load_format: str = "auto",
               kernel_backend: str = "torch", quantization: str | None = None,
               kv_cache_dtype: str = "auto") -> tuple[NemotronForCausalLM, ModelConfig]:
    """Load `model` (a checkpoint directory or a preset name) for inference on `device`.

    dtype: "auto" (the checkpoint's torch_dtype) | "float32" | "bfloat16" | "float16": the activation dtype, and
    the weight dtype of unquantized layers. The returned config's torch_dtype is that dtype. load_format: "auto"
    reads the checkpoint's safetensors; "dummy" uses only its config (or the preset's) and fills the weights with
    seeded random values (FP8 ones quantized at load when the model is FP8). quantization: None (FP8 checkpoints
    are detected) | "fp8" (quantize a bf16/fp16/fp32 checkpoint at load; a no-op on an FP8 one).
    kv_cache_dtype: "auto" | "fp8" | "fp8_e4m3": with fp8 each Attention gets the checkpoint's k/v scales (1.0,
    with a warning, when it has none); allocating the cache itself is the engine's business.
    """
    if load_format not in _LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {_LOAD_FORMATS}, got {load_format!r}")
    fp8_kv_cache = is_fp8_kv_cache(kv_cache_dtype)
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
    quant = _quant_config(model, load_format, quantization)

    with torch.device(device):
        method = Fp8LinearMethod(quant, kernel_backend) if quant is not None else None
        net = model_class(config)(config, linear_method=method, kernel_backend=kernel_backend)
        if quant is not None:
            _leave_ignored_unquantized(net, quant)
    kv_scales: dict[str, dict[str, float]] = {}
    if load_format == "dummy":
        init_dummy_weights(net)
    else:
        # Under tensor parallelism each loader reads only its rank's slice of the memory-mapped files.
        lazy = distributed.tp_world_size() > 1
        net.load_weights(_take_kv_scales(iter_safetensors(model, lazy=lazy), kv_scales))
    if fp8_kv_cache:
        _set_kv_scales(net, kv_scales)
    net.requires_grad_(False)
    return net.eval(), config


def read_quant_config(path: str) -> QuantConfig | None:
    """The FP8 format of the checkpoint directory `path` (None: unquantized), from config.json,
    hf_quant_config.json and the safetensors headers (names and shapes of the *_scale tensors; no data is read)."""
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    modelopt = None
    if os.path.isfile(os.path.join(path, MODELOPT_CONFIG)):
        with open(os.path.join(path, MODELOPT_CONFIG)) as f:
            modelopt = json.load(f)
    return detect_quant_config(hf, modelopt, _scale_shapes(path))


def _quant_config(model: str, load_format: str, quantization: str | None) -> QuantConfig | None:
    if load_format == "dummy":
        # Random weights have no format to detect: an FP8 model (asked for, or a quantized checkpoint's config)
        # gets random high-precision weights quantized at load, which exercises the same kernels.
        quantized = os.path.isdir(model) and _declares_quantization(model)
        return resolve_quantization(None, quantization or ("fp8" if quantized else None))
    return resolve_quantization(read_quant_config(model), quantization)


def _declares_quantization(path: str) -> bool:
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    return "quantization_config" in hf or os.path.isfile(os.path.join(path, MODELOPT_CONFIG))


def _scale_shapes(path: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for file in safetensors_files(path):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name.endswith("_scale"):
                        shapes[name] = tuple(f.get_slice(name).get_shape())
        except (SafetensorError, OSError) as e:
            raise unreadable_file_error(file, e) from None
    return shapes


def _leave_ignored_unquantized(net: NemotronForCausalLM, quant: QuantConfig) -> None:
    """Give the linear layers a checkpoint leaves unquantized (its ignore list, and the layers no compressed-tensors
    config group targets) plain weights in the model dtype."""
    if not quant.leaves_some_unquantized:
        return
    plain = UnquantizedLinearMethod()
    dtype = getattr(torch, net.config.torch_dtype)
    for name, module in net.named_modules():
        if module is net or not isinstance(getattr(module, "linear_method", None), Fp8LinearMethod):
            continue
        hf_names = hf_module_names(name)
        # Our fused name (qkv_proj) in an ignore list counts for all of its parts.
        # Targets (compressed-tensors) are matched against the checkpoint's names only.
        ignored = [not quant.quantizes(hf_name) or quant.is_ignored(name) for hf_name in hf_names]
        if any(ignored) and not all(ignored):
            raise ValueError(f"the checkpoint leaves {[n for n, i in zip(hf_names, ignored) if i]} unquantized but "
                             f"not {[n for n, i in zip(hf_names, ignored) if not i]}; n4 fuses them into one layer")
        if all(ignored):
            for attr in ("weight", "weight_scale", "input_scale"):
                if hasattr(module, attr):
                    delattr(module, attr)
            module.linear_method = plain
            plain.create_weights(module, module.in_features, module.out_features, dtype)


def _take_kv_scales(weights: Iterable[tuple[str, torch.Tensor]],
                    sink: dict[str, dict[str, float]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass the tensors through, except KV-cache scales: those go to sink[attention module]["k" / "v"]."""
    for name, tensor in weights:
        target = kv_scale_target(name)
        if target is None:
            yield name, tensor
            continue
        tensor = materialize(tensor)  # one value, the same on every rank
        value = float(tensor.float().reshape(-1)[0]) if tensor.numel() == 1 else None
        if value is None or not math.isfinite(value) or value <= 0:
            raise CheckpointError(f"tensor {name!r}: a KV-cache scale must be one finite positive value, found "
                                  f"shape {list(tensor.shape)}" + (f" value {value}" if value is not None else ""))
        attention, which = target
        for part in ("k", "v") if which == "kv" else (which,):
            sink.setdefault(attention, {})[part] = value


def _set_kv_scales(net: NemotronForCausalLM, scales: dict[str, dict[str, float]]) -> None:
    attentions = {name: m for name, m in net.named_modules() if isinstance(m, Attention)}
    if not scales:
        logger.warning("--kv-cache-dtype fp8: the checkpoint has no k/v scales, so K and V are stored unscaled "
                       "(scale 1.0; values beyond +-448 saturate). Calibrate them with `n4 quantize "
                       "--kv-cache-scales` for better accuracy.")
        return
    unknown = sorted(set(scales) - set(attentions))
    if unknown:
        raise CheckpointError(f"KV-cache scales for {unknown[0]}, which the model ({net.config.num_hidden_layers} "
                              f"layers) does not have")
    incomplete = [name for name in attentions if set(scales.get(name, ())) != {"k", "v"}]
    if incomplete:
        raise CheckpointError(f"the checkpoint has KV-cache scales for some layers but not both k and v for "
                              f"{len(incomplete)}: {', '.join(incomplete)}")
    for name, attention in attentions.items():
        attention.k_scale = scales[name]["k"]
        attention.v_scale = scales[name]["v"]


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig) -> str:
    """The dtype name to run in: config.torch_dtype for "auto", else `dtype` (a name or a torch.dtype)."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype == "auto":
        return config.torch_dtype
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    return _DTYPE_NAMES[dtype]


def iter_safetensors(path: str, lazy: bool = False) -> Iterator[tuple[str, torch.Tensor | LazyTensor]]:
    """Yield (name, tensor) from a checkpoint directory's safetensors, one tensor at a time, memory-mapped.

    Reads `model.safetensors.index.json` and its shards when present, else `model.safetensors`, else any
    `*.safetensors`. Raises CheckpointError naming the file when one is missing, truncated or corrupt. Tensors
    come in their stored dtype: the model's weight loaders cast as they copy into the parameters, so a quantized
    linear method can still see its checkpoint's own dtypes. lazy: yield LazyTensors (model/lazy_tensor.py), valid
    until the next one, of which the loaders read only the slices they need.
    """
    for file in safetensors_files(path):
        try:
            handle = safe_open(file, framework="pt", device="cpu")
        except (SafetensorError, OSError) as e:
            raise unreadable_file_error(file, e) from None
        with handle as f:
            for name in f.keys():
                try:
                    tensor = (LazyTensor(f, name, lambda e, file=file: unreadable_file_error(file, e)) if lazy
                              else f.get_tensor(name))
                except (SafetensorError, OSError) as e:
                    raise unreadable_file_error(file, e) from None
                yield name, tensor


def unreadable_file_error(file: str, error: Exception) -> CheckpointError:
    return CheckpointError(f"{file}: cannot read this safetensors file; it may be truncated or corrupt ({error})")


def safetensors_files(path: str) -> list[str]:
    index_path = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        # Checked here, not trusted: a weight_map that is a list, or maps a tensor to a number, would otherwise
        # surface as an AttributeError/TypeError traceback from the path handling below.
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index_path}: not a valid safetensors index (weight_map must map tensor names "
                                  f"to shard file names)")
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
    float_dtype = getattr(torch, net.config.torch_dtype)
    for name, param in net.named_parameters():
        if generator is None:
            generator = torch.Generator(device=param.device).manual_seed(seed)
        loader = getattr(param, "weight_loader", None)  # a linear method's (FP8: quantizes what it is given)
        if getattr(param, "computed_at_load", False):
            continue
        if "norm." in name:
            param.zero_()
        elif loader is not None:
            values = torch.empty(param.shape, dtype=float_dtype, device=param.device)
            loader(param, values.normal_(0.0, std, generator=generator))
        else:
            param.normal_(0.0, std, generator=generator)
    net.process_weights_after_loading()
