"""Checkpoints: HF-format export (what `n4 serve` and transformers load), loading HF checkpoints for further
training, and the trainer's own resumable state."""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.config import REWARD_NUM_LABELS, ModelConfig, get_config
from model.loader import safetensors_files
from model.nemotron import IGNORED_SUFFIXES, REWARD_HEAD_ALIASES
from n4_train.modeling import TrainableNemotron
from n4_train.precision import Precision

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked (missing, mis-shaped or unexpected tensors)."""


def read_hf_tensors(path: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in safetensors_files(path):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if not name.endswith(IGNORED_SUFFIXES):  # the serving loader's rules: skipped names, head aliases
                    tensors[REWARD_HEAD_ALIASES.get(name, name)] = f.get_tensor(name)
    return tensors


def build_model(model: str, precision: Precision, *, reward: bool = False, seed: int = 0) -> TrainableNemotron:
    """A model to train. `model` is an HF checkpoint directory (its weights are loaded), or a preset name or a
    config.json file (random init). With `reward`, the model gets the reward layout: a causal LM checkpoint keeps its backbone and gets a
    fresh 9-output head (how Nemotron-4-340B-Reward was made from the base model); a reward checkpoint loads
    whole."""
    if model.endswith(".json") and os.path.isfile(model):  # an architecture to pretrain from scratch
        with open(model) as f:
            config = ModelConfig.from_hf(json.load(f))
    else:
        config = get_config(model)
    source_is_reward = config.is_reward
    if reward and not config.is_reward:
        config = config.with_(num_labels=REWARD_NUM_LABELS)
    if not reward and config.is_reward:
        raise CheckpointError(f"{model} is a reward model; this stage trains a causal LM")
    net = TrainableNemotron(config.with_(torch_dtype="float32"), precision)
    net.init_weights(seed)
    if os.path.isdir(model):
        tensors = read_hf_tensors(model)
        if reward and not source_is_reward:
            tensors.pop("lm_head.weight", None)  # the LM head does not become the reward head
            _load(net, tensors, skip={"lm_head.weight"})
        else:
            _load(net, tensors)
    return net


def _load(net: TrainableNemotron, tensors: dict[str, torch.Tensor], skip: set[str] = frozenset()) -> None:
    params = dict(net.named_parameters())
    unexpected = sorted(set(tensors) - set(params))
    if unexpected:
        raise CheckpointError(f"checkpoint has tensors the model does not: {', '.join(unexpected[:5])}")
    missing = sorted(set(params) - set(tensors) - set(skip))
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:5])}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise CheckpointError(f"tensor {name!r}: shape {list(tensor.shape)} does not match the model's "
                                      f"{list(params[name].shape)}")
            params[name].copy_(tensor)


def export_hf(net: TrainableNemotron, output_dir: str, tokenizer_dir: str | None, dtype: str = "bfloat16") -> str:
    """Write `output_dir` as an HF checkpoint: config.json (NemotronForCausalLM, or NemotronForRewardModel with
    num_labels), model.safetensors in `dtype`, and the tokenizer files copied from `tokenizer_dir`."""
    os.makedirs(output_dir, exist_ok=True)
    config = net.config.with_(torch_dtype=dtype)
    tensors = {name: t.to(getattr(torch, dtype)).contiguous().cpu() for name, t in net.hf_state_dict().items()}
    tmp = os.path.join(output_dir, "model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(output_dir, "model.safetensors"))  # never a half-written file under the real name
    with open(os.path.join(output_dir, "config.json"), "w") as f:
        json.dump(config.to_hf(), f, indent=2)
        f.write("\n")
    if tokenizer_dir:
        for name in TOKENIZER_FILES:
            src = os.path.join(tokenizer_dir, name)
            if os.path.isfile(src) and os.path.abspath(src) != os.path.abspath(os.path.join(output_dir, name)):
                shutil.copyfile(src, os.path.join(output_dir, name))
    return output_dir

