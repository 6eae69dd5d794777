"""Which FP8 format a checkpoint is in, read from its configs and tensor names (REFERENCE.md, "FP8 formats").

Three producers write FP8 checkpoints that differ in their config, not in the tensors that matter: every format has
E4M3 `X.weight`, fp32 `X.weight_scale` and, for static activations, `X.input_scale`, with dequantized = fp8 * scale.

- HF / vLLM: config.json `quantization_config = {"quant_method": "fp8", "activation_scheme", "ignored_layers"}`; the
  weight scale is per tensor unless its shape ([out] / [out, 1]) says per output channel.
- compressed-tensors (llm-compressor): `quant_method: "compressed-tensors"`, `format: "float-quantized"`,
  `config_groups.*.{targets, weights, input_activations}` with their strategies, `ignore`, `kv_cache_scheme`; a
  linear layer no group targets is stored unquantized, like an ignored one.
- NVIDIA ModelOpt: `hf_quant_config.json` with `quantization: {quant_algo, kv_cache_quant_algo, exclude_modules}`
  (newer exports put the same keys in config.json as `quant_method: "modelopt"`).

KV-cache scales come under several names (`kv_scale_target`). Anything else that is quantized (block-wise FP8,
integer or 4-bit formats, other methods) is refused with a ValueError that names what is unsupported, instead of
being loaded as something it is not. Pure functions: the loader reads the files and passes their contents in.
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass

GRANULARITIES = ("tensor", "channel")
ACTIVATION_SCHEMES = ("dynamic", "static")
# "online": a bf16/fp16/fp32 checkpoint quantized while it loads (`--quantization fp8`).
SOURCES = ("fp8", "compressed-tensors", "modelopt", "online")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")   # vLLM's names; fp8 means E4M3
MODELOPT_CONFIG = "hf_quant_config.json"

_SUPPORTED = ("n4 runs FP8 E4M3 checkpoints with per-tensor or per-channel weight scales: quant_method 'fp8', "
              "'compressed-tensors' (format 'float-quantized'), or NVIDIA ModelOpt quant_algo 'FP8' / "
              "'FP8_PER_CHANNEL_PER_TOKEN'")

# Checkpoint name suffix -> which KV scale it is ("kv": one scale for both, as older files store it).
_KV_SCALE_SUFFIXES = (
    (".self_attn.k_scale", "k"), (".self_attn.v_scale", "v"),                      # HF / vLLM, compressed-tensors
    (".self_attn.k_proj.k_scale", "k"), (".self_attn.v_proj.v_scale", "v"),        # ModelOpt
    (".self_attn.k_proj.output_scale", "k"), (".self_attn.v_proj.output_scale", "v"),  # older compressed-tensors
    (".self_attn.kv_scale", "kv"),                                                 # older files
)


@dataclass(frozen=True)
class QuantConfig:
    """How a model's linear layers are quantized to FP8.

    source: the checkpoint format, or "online" for a high-precision checkpoint quantized at load.
    weight_granularity: "tensor" (one fp32 scale per weight) | "channel" (one per output row).
    activation_scheme: "dynamic" (a scale per token, computed at run time) | "static" (one per-tensor scale per
        layer, the checkpoint's `input_scale`).
    ignored_modules: HF module names or patterns (exact, a parent module, fnmatch globs, or "re:" regexes) whose
        linear layers stay unquantized.
    kv_scales: the checkpoint carries per-layer KV-cache scales.
    targets: compressed-tensors' config groups quantize only the linear layers their `targets` match (module names,
        a parent module, or "re:" regexes); () means every linear layer (the target "Linear", and every other
        format).
    """
    source: str
    weight_granularity: str
    activation_scheme: str = "dynamic"
    ignored_modules: tuple[str, ...] = ()
    kv_scales: bool = False
    targets: tuple[str, ...] = ()

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"quantization source must be one of {SOURCES}, got {self.source!r}")
        if self.weight_granularity not in GRANULARITIES:
            raise ValueError(f"weight granularity must be one of {GRANULARITIES}, got {self.weight_granularity!r}")
        if self.activation_scheme not in ACTIVATION_SCHEMES:
            raise ValueError(f"activation scheme must be one of {ACTIVATION_SCHEMES}, got {self.activation_scheme!r}")
        if self.source == "online" and (self.weight_granularity, self.activation_scheme) != ("channel", "dynamic"):
            raise ValueError("quantizing at load supports per-channel weights with dynamic activations only")

    @classmethod
    def online(cls) -> "QuantConfig":
        """`--quantization fp8` on a bf16/fp16/fp32 checkpoint. Per output channel: a row's scale follows its own
        amax, never coarser than one scale per tensor, free in the GEMM epilogue (an outer product with the token
        scales), and each of q/k/v quantizes on arrival with no requantization of the fused weight. Dynamic
        per-token activations: there is no calibration data at load time, and per token is the finest scale."""
        return cls("online", "channel", "dynamic")

    @property
    def quantized_checkpoint(self) -> bool:
        """The checkpoint already holds FP8 weights and scales (not quantized at load)."""
        return self.source != "online"

    def is_ignored(self, module: str) -> bool:
        """Whether the linear layer with HF module name `module` is on the checkpoint's ignore list."""
        return any(_matches(pattern, module) for pattern in self.ignored_modules)

    def quantizes(self, module: str) -> bool:
        """Whether the checkpoint holds the linear layer with HF module name `module` in FP8: targeted by a config
        group (compressed-tensors; every layer in the other formats) and not ignored."""
        return (not self.targets or any(_matches(t, module) for t in self.targets)) and not self.is_ignored(module)

    @property
    def leaves_some_unquantized(self) -> bool:
        return bool(self.ignored_modules or self.targets)

    def describe(self) -> str:
        where = "quantized at load" if self.source == "online" else f"{self.source} checkpoint"
        activations = "dynamic per-token" if self.activation_scheme == "dynamic" else "static per-tensor"
        return f"fp8 per-{self.weight_granularity} weights, {activations} activations ({where})"


def _matches(pattern: str, module: str) -> bool:
    """An ignore-list entry or target: a "re:" regex (re.match: anchored at the start of the name), an fnmatch glob
    (ModelOpt's "*lm_head*"), or a module name, which also covers the modules under it."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(module, pattern)
    return module == pattern or module.startswith(pattern + ".")


def kv_scale_target(name: str) -> tuple[str, str] | None:
    """A checkpoint tensor name -> (attention module name, "k" | "v" | "kv") when it is a KV-cache scale."""
    for suffix, which in _KV_SCALE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".self_attn", which
    return None


def is_fp8_kv_cache(kv_cache_dtype: str) -> bool:
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        hint = " (E5M2 is not supported)" if kv_cache_dtype == "fp8_e5m2" else ""
        raise ValueError(f"--kv-cache-dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}{hint}")
    return kv_cache_dtype != "auto"


def resolve_quantization(detected: QuantConfig | None, quantization: str | None) -> QuantConfig | None:
    """Combine the detected checkpoint format with `--quantization` (None, "fp8", or the detected format's name).
    "fp8" on an FP8 checkpoint is a no-op; on a high-precision checkpoint it quantizes at load."""
    allowed = ("fp8",) + ((detected.source,) if detected is not None else ())
    if quantization is not None and quantization not in allowed:
        raise ValueError(f"--quantization {quantization!r} is not supported for this checkpoint; use 'fp8' (or "
                         f"leave it out: FP8 checkpoints are detected from their config)")
    if detected is not None:
        return detected
    return QuantConfig.online() if quantization is not None else None


def detect_quant_config(hf_config: Mapping, modelopt_config: Mapping | None,
                        scale_shapes: Mapping[str, tuple[int, ...]]) -> QuantConfig | None:
    """The checkpoint's FP8 format, or None for an unquantized checkpoint.

    hf_config: config.json; modelopt_config: hf_quant_config.json when present; scale_shapes: name -> shape of
    every checkpoint tensor whose name ends in "_scale" (the per-tensor vs per-channel reading and the presence of
    input and KV scales come from them). Raises ValueError for a quantized format n4 does not run."""
    qc = hf_config.get("quantization_config")
    if qc is None and modelopt_config is None:
        stray = sorted(name for name in scale_shapes if name.endswith(".weight_scale"))
        if stray:
            raise ValueError(f"the checkpoint holds FP8 scales ({stray[0]}, ...) but config.json has no "
                             f"quantization_config and there is no {MODELOPT_CONFIG}")
        return None
    if qc is None:
        modelopt_config = _mapping(modelopt_config, MODELOPT_CONFIG)
        quant = _mapping(modelopt_config.get("quantization") or {}, f"{MODELOPT_CONFIG}: quantization")
        return _modelopt(quant, scale_shapes, MODELOPT_CONFIG)
    qc = _mapping(qc, "config.json: quantization_config")
    method = str(qc.get("quant_method", "")).lower()
    if method == "fp8":
        return _hf_fp8(qc, scale_shapes)
    if method == "compressed-tensors":
        return _compressed_tensors(qc, scale_shapes)
    if method == "modelopt":
        where = "config.json quantization_config"
        return _modelopt(_mapping(qc.get("quantization") or qc, f"{where}: quantization"), scale_shapes, where)
    raise ValueError(f"config.json: quantization_config.quant_method {qc.get('quant_method')!r} is not supported; "
                     f"{_SUPPORTED}")


def _mapping(value, where: str) -> Mapping:
    """A config value that must be a JSON object; anything else is a ValueError naming it, not an AttributeError."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be an object, got {type(value).__name__}")
    return value


def _names(value, where: str) -> tuple[str, ...]:
    """A list of module names or patterns (null: none). A bare string is refused, not read as its characters."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where} must be a list of module names, got {value!r:.80}")
    return tuple(value)


def _kv_scales_present(scale_shapes: Mapping) -> bool:
    return any(kv_scale_target(name) is not None for name in scale_shapes)


def _weight_granularity(scale_shapes: Mapping, where: str) -> str:
    """Per tensor or per channel, from the weight scales' shapes: one element, or a column [out] / [out, 1]."""
    kinds = set()
    for name, shape in scale_shapes.items():
        if not name.endswith(".weight_scale"):
            continue
        if len(shape) == 0 or (len(shape) <= 2 and all(d == 1 for d in shape)):
            kinds.add("tensor")
        elif len(shape) == 1 or (len(shape) == 2 and shape[1] == 1):
            kinds.add("channel")
        else:
            raise ValueError(f"{where}: {name} has shape {list(shape)}: block-wise weight scales are not "
                             f"supported; {_SUPPORTED}")
    if not kinds:
        raise ValueError(f"{where}: an FP8 checkpoint must have *.weight_scale tensors, found none")
    if len(kinds) > 1:
        raise ValueError(f"{where}: the checkpoint mixes per-tensor and per-channel weight scales; not supported")
    return kinds.pop()


def _hf_fp8(qc: Mapping, scale_shapes: Mapping) -> QuantConfig:
    where = "config.json quantization_config"
    if qc.get("weight_block_size"):
        raise ValueError(f"{where}: block-wise FP8 (weight_block_size {qc['weight_block_size']}) is not "
                         f"supported; {_SUPPORTED}")
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme not in ACTIVATION_SCHEMES:
        raise ValueError(f"{where}: activation_scheme {scheme!r} is not supported (dynamic or static)")
    key = "ignored_layers" if qc.get("ignored_layers") else "modules_to_not_convert"
    ignored = _names(qc.get(key), f"{where}: {key}")
    return QuantConfig("fp8", _weight_granularity(scale_shapes, where), scheme, ignored,
                       _kv_scales_present(scale_shapes))


def _compressed_tensors(qc: Mapping, scale_shapes: Mapping) -> QuantConfig:
    where = "config.json quantization_config (compressed-tensors)"
    groups = _mapping(qc.get("config_groups") or {}, f"{where}: config_groups")
    if not groups:
        raise ValueError(f"{where}: no config_groups")
    schemes = {_ct_group(name, _mapping(group, f"{where}: group {name!r}"), qc.get("format"), where)
               for name, group in groups.items()}
    if len(schemes) > 1:
        raise ValueError(f"{where}: config groups with different schemes {sorted(schemes)} are not supported")
    granularity, activations = schemes.pop()
    kv = qc.get("kv_cache_scheme")
    if kv is not None:
        kv = _mapping(kv, f"{where}: kv_cache_scheme")
        _ct_check_float8(kv, f"{where}: kv_cache_scheme")
        if kv.get("strategy", "tensor") != "tensor" or kv.get("dynamic", False):
            raise ValueError(f"{where}: kv_cache_scheme must be static per tensor, got strategy "
                             f"{kv.get('strategy')!r}, dynamic {kv.get('dynamic')!r}")
    return QuantConfig("compressed-tensors", granularity, activations, _names(qc.get("ignore"), f"{where}: ignore"),
                       _kv_scales_present(scale_shapes), _ct_targets(groups, where))


def _ct_targets(groups: Mapping, where: str) -> tuple[str, ...]:
    """The layers the config groups quantize: () for all of them (a group targets "Linear", or states no targets),
    else the union of their module names and "re:" regexes. A layer no group targets is stored in high precision
    without being on the ignore list (llm-compressor quantizes only what `targets` matches, and vLLM loads such a
    layer unquantized). Other class names are refused: n4 cannot tell which of its layers they cover."""
    targets: list[str] = []
    for name, group in groups.items():
        if group.get("targets") is None:
            return ()
        for target in _names(group["targets"], f"{where}: group {name!r} targets"):
            if target == "Linear":
                return ()
            if not target.startswith("re:") and "." not in target and target[:1].isupper():
                raise ValueError(f"{where}: group {name!r} targets {target!r}: n4 reads the target 'Linear', module "
                                 f"names and 're:' regexes, not other class names")
            targets.append(target)
    return tuple(targets)


def _ct_group(name: str, group: Mapping, top_format, where: str) -> tuple[str, str]:
    """One compressed-tensors config group -> (weight granularity, activation scheme)."""
    fmt = group.get("format") or top_format
    if fmt != "float-quantized":
        raise ValueError(f"{where}: format {fmt!r} (group {name!r}) is not supported; {_SUPPORTED}")
    weights = group.get("weights")
    if not weights:
        raise ValueError(f"{where}: group {name!r} has no weights scheme")
    weights = _mapping(weights, f"{where}: group {name!r} weights")
    _ct_check_float8(weights, f"{where}: group {name!r} weights")
    strategy = weights.get("strategy", "tensor")
    if strategy not in GRANULARITIES or weights.get("dynamic", False):
        raise ValueError(f"{where}: group {name!r} weight strategy {strategy!r} is not supported (tensor or channel)")
    acts = group.get("input_activations")
    if not acts:
        raise ValueError(f"{where}: group {name!r} quantizes weights only (no input_activations); FP8 weight-only "
                         f"checkpoints are not supported")
    acts = _mapping(acts, f"{where}: group {name!r} input_activations")
    _ct_check_float8(acts, f"{where}: group {name!r} input_activations")
    act_strategy, dynamic = acts.get("strategy", "tensor"), bool(acts.get("dynamic", False))
    if act_strategy == "token" and dynamic:
        return strategy, "dynamic"
    if act_strategy == "tensor":
        # Dynamic per tensor runs per token: the scale is not stored, and per token is never coarser.
        return strategy, "dynamic" if dynamic else "static"
    raise ValueError(f"{where}: group {name!r} input_activations strategy {act_strategy!r} with dynamic "
                     f"{dynamic} is not supported (token + dynamic, or tensor)")


def _ct_check_float8(scheme: Mapping, where: str) -> None:
    if scheme.get("num_bits") != 8 or scheme.get("type") != "float":
        raise ValueError(f"{where}: {scheme.get('num_bits')}-bit {scheme.get('type')} quantization is not "
                         f"supported; {_SUPPORTED}")


def _modelopt(quant: Mapping, scale_shapes: Mapping, where: str) -> QuantConfig:
    algo = str(quant.get("quant_algo") or "").upper()
    kv_algo = quant.get("kv_cache_quant_algo")
    if kv_algo is not None and str(kv_algo).upper() != "FP8":
        raise ValueError(f"{where}: kv_cache_quant_algo {kv_algo!r} is not supported (FP8 or none)")
    ignored = _names(quant.get("exclude_modules"), f"{where}: exclude_modules")
    kv = _kv_scales_present(scale_shapes)
    if algo == "FP8":  # per-tensor weights; activations static when the export wrote input scales
        static = any(name.endswith(".input_scale") for name in scale_shapes)
        return QuantConfig("modelopt", _weight_granularity(scale_shapes, where), "static" if static else "dynamic",
                           ignored, kv)
    if algo == "FP8_PER_CHANNEL_PER_TOKEN":
        return QuantConfig("modelopt", _weight_granularity(scale_shapes, where), "dynamic", ignored, kv)
    raise ValueError(f"{where}: quant_algo {quant.get('quant_algo')!r} is not supported; {_SUPPORTED}")
