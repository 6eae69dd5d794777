"""Model configuration: one frozen dataclass, HF `config.json` in and out, and named presets."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace

_DTYPES = ("float32", "bfloat16", "float16")
# The config.json marker of a reward checkpoint, and its head width when `num_labels` is absent (Nemotron-4-340B-
# Reward: 9 outputs, the last 5 the HelpSteer2 attributes).
REWARD_ARCHITECTURE = "NemotronForRewardModel"
REWARD_NUM_LABELS = 9
# The last 5 of the 9 values, in order, and the weights of the published scalar (a dot product with all 9; the first
# 4 values are untrained). Served by server/api/rewards.py, trained and read by the training package.
REWARD_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
REWARD_WEIGHTS = (0.0, 0.0, 0.0, 0.0, 0.3, 0.74, 0.46, 0.47, -0.33)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    norm_eps: float = 1e-5
    bos_token_id: int | None = 2
    eos_token_id: int | None = 3
    torch_dtype: str = "bfloat16"
    # 0: a causal LM (lm_head [vocab, hidden]). > 0: a reward model (the Nemotron-4-340B-Reward layout), whose
    # lm_head is a linear head [num_labels, hidden] read at the last token. config.json marks it with
    # `architectures: ["NemotronForRewardModel"]` (and `num_labels`, 9 when absent).
    num_labels: int = 0

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"model config: num_attention_heads ({self.num_attention_heads}) must be a multiple "
                             f"of num_key_value_heads ({self.num_key_value_heads})")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ValueError(f"model config: partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        if self.rotary_dim % 2:
            raise ValueError(f"model config: rotary dims ({self.rotary_dim}) must be even")
        if not isinstance(self.num_labels, int) or self.num_labels < 0:
            raise ValueError(f"model config: num_labels must be a non-negative integer, got {self.num_labels!r}")
        if self.torch_dtype not in _DTYPES:
            raise ValueError(f"model config: torch_dtype must be one of {_DTYPES}, got {self.torch_dtype!r}")

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates (the first ones); the rest pass through."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def is_reward(self) -> bool:
        return self.num_labels > 0

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """Read an HF `config.json` dict (transformers 4.x or 5.x layout) of a Nemotron model."""
        if not isinstance(hf, dict):
            raise ValueError(f"config.json: expected a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type")
        if model_type != "nemotron":
            raise ValueError(f"config.json: model_type is {model_type!r}; n4 serves Nemotron models (model_type "
                             f"'nemotron')")
        act = hf.get("hidden_act", "relu2")
        if act != "relu2":
            raise ValueError(f"config.json: hidden_act {act!r} is not supported (Nemotron uses 'relu2')")
        if hf.get("tie_word_embeddings", False):
            raise ValueError("config.json: tied embeddings are not supported (Nemotron-4 has an untied lm_head)")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag, False):
                raise ValueError(f"config.json: {flag}=true is not supported (Nemotron-4 has no such biases)")
        rope = hf.get("rope_parameters") or {}
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rope_percent", 0.5)))
        _check_sizes(hf)
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        dtype = hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"
        reward = REWARD_ARCHITECTURE in (hf.get("architectures") or ())
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rope_theta=float(rope_theta),
            partial_rotary_factor=float(partial),
            norm_eps=float(hf.get("norm_eps", 1e-5)),
            bos_token_id=hf.get("bos_token_id", 2),
            eos_token_id=_first(hf.get("eos_token_id", 3)),
            torch_dtype=dtype if dtype in _DTYPES else "bfloat16",
            num_labels=hf.get("num_labels", REWARD_NUM_LABELS) if reward else 0,
        )

    @classmethod
    def from_pretrained(cls, path: str) -> "ModelConfig":
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise ValueError(f"{path}: no config.json found (expected an HF-format Nemotron checkpoint directory)")
        with open(config_path) as f:
            try:
                hf = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{config_path}: not valid JSON ({e})") from None
        return cls.from_hf(hf)

    def to_hf(self) -> dict:
        """An HF `config.json` dict in the transformers 4.x layout (which 5.x also reads)."""
        hf = {
            "architectures": [REWARD_ARCHITECTURE if self.is_reward else "NemotronForCausalLM"],
            "model_type": "nemotron",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "partial_rotary_factor": self.partial_rotary_factor,
            "norm_eps": self.norm_eps,
            "hidden_act": "relu2",
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": self.torch_dtype,
        }
        if self.is_reward:
            hf["num_labels"] = self.num_labels
        return hf

    def with_(self, **changes) -> "ModelConfig":
        return replace(self, **changes)


_REQUIRED_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "max_position_embeddings")


def _check_sizes(hf: dict) -> None:
    """The sizes a model is built from are present and whole numbers: a config.json without one (or with "64" for
    64) is a one-line error naming it, not a KeyError or TypeError traceback from the arithmetic below."""
    missing = [key for key in _REQUIRED_SIZES if key not in hf]
    if missing:
        raise ValueError(f"config.json: missing {', '.join(missing)} (needed to build the model)")
    for key in _REQUIRED_SIZES + _OPTIONAL_SIZES:
        value = hf.get(key)
        if (value is not None or key in _REQUIRED_SIZES) and (type(value) is not int or value < 1):
            raise ValueError(f"config.json: {key} must be a positive integer, got {value!r}")


def _first(value):
    return value[0] if isinstance(value, list) and value else value


PRESETS: dict[str, ModelConfig] = {
    "nemotron-4-15b": ModelConfig(vocab_size=256000, hidden_size=6144, intermediate_size=24576,
                                  num_hidden_layers=32, num_attention_heads=48, num_key_value_heads=8, head_dim=128),
    "nemotron-4-340b": ModelConfig(vocab_size=256000, hidden_size=18432, intermediate_size=73728,
                                   num_hidden_layers=96, num_attention_heads=96, num_key_value_heads=8, head_dim=192),
    # Tiny shapes for tests: the 340B per-rank head layout (12 query heads per KV head) and a
    # head_dim that is not a power of two, at a size a CPU runs in milliseconds.
    "tiny": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, torch_dtype="float32"),
    "tiny-340b-layout": ModelConfig(vocab_size=512, hidden_size=96, intermediate_size=384, num_hidden_layers=2,
                                    num_attention_heads=96 // 8 * 2, num_key_value_heads=2, head_dim=24,
                                    torch_dtype="float32"),
}


def get_config(name_or_path: str) -> ModelConfig:
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    if os.path.isdir(name_or_path):
        return ModelConfig.from_pretrained(name_or_path)
    raise ValueError(f"--model {name_or_path!r} is neither a checkpoint directory nor a preset "
                     f"({', '.join(sorted(PRESETS))})")


def config_dict(config: ModelConfig) -> dict:
    return asdict(config)
