"""Helpers shared by the test suite: tiny HF reference models and checkpoints, and a minimal paged-KV driver for
running NemotronForCausalLM over several steps without the engine."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from model.attention_metadata import AttentionMetadata
from model.config import ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_TOKENIZER = REPO_ROOT / "models" / "demo" / "tokenizer.model"

# Std of the random linear/embedding weights. HF's default (initializer_range 0.0134) gives a tiny model logits
# with std ~0.1-0.2, so the top-2 logits of ~18% of positions lie within 1e-2 of each other and greedy decoding
# is decided by float noise. At 0.15 the logit std is ~1.2 (hidden 64-96, vocab 512) and a top-1/top-2 gap
# below 1e-2 occurs at ~1-2% of positions (measured over 256 random positions each for the `tiny` and
# `tiny-340b-layout` presets). A near-tie cannot be excluded with random weights (the gap's density at 0 only falls
# as 1/std), but fp32 implementations differ by ~1e-6, so a flip needs a gap 10^4 times smaller than that.
# Larger stds saturate the attention softmax and blow up relu(x)**2 without making ties much rarer.
DEFAULT_INIT_STD = 0.15
# Norm weights are stored zero-centred (scale = weight + 1); HF initializes them to ones (scale 2) and the biases
# to zeros. Random values of this std make tests exercise both the `+ 1` and the bias.
NORM_INIT_STD = 0.1


def hf_config(config: ModelConfig, init_std: float = DEFAULT_INIT_STD):
    """transformers.NemotronConfig for `config` (from its 4.x-layout dict, which transformers 5 reads too),
    with eager attention so the reference is the plain softmax(QK^T)V."""
    from transformers import NemotronConfig

    return NemotronConfig(**config.to_hf(), initializer_range=init_std, attn_implementation="eager")


def hf_model(config: ModelConfig, seed: int = 0, init_std: float = DEFAULT_INIT_STD):
    """A seeded random transformers.NemotronForCausalLM in fp32 eval mode (norms randomized, see NORM_INIT_STD).
    The global torch RNG is left as it was."""
    from transformers import NemotronForCausalLM
    from transformers.models.nemotron.modeling_nemotron import NemotronLayerNorm1P

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = NemotronForCausalLM(hf_config(config, init_std)).float()
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, NemotronLayerNorm1P):
                    module.weight.normal_(0.0, NORM_INIT_STD)
                    module.bias.normal_(0.0, NORM_INIT_STD)
    return model.eval()


def make_tiny_checkpoint(path: str | os.PathLike, config: ModelConfig, seed: int = 0,
                         init_std: float = DEFAULT_INIT_STD, max_shard_size: int | str | None = None) -> str:
    """Write an HF checkpoint directory of a random `hf_model(config, seed, init_std)`: config.json (transformers
    5 layout) and safetensors in config.torch_dtype, sharded with an index when max_shard_size is given (e.g.
    "20KB"), plus models/demo/tokenizer.model when that file exists. Returns the directory."""
    model = hf_model(config, seed, init_std).to(getattr(torch, config.torch_dtype))
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(path), **kwargs)
    if DEMO_TOKENIZER.is_file():
        shutil.copy(DEMO_TOKENIZER, os.path.join(path, "tokenizer.model"))
    return str(path)


def make_tiny_reward_checkpoint(path: str | os.PathLike, config: ModelConfig, seed: int = 0, num_labels: int = 9,
                                head_name: str = "lm_head.weight", head_std: float = 0.1) -> str:
    """A Nemotron-4-340B-Reward-layout checkpoint: `make_tiny_checkpoint(path, config, seed)` (so its base weights are
    those of `hf_model(config, seed)`) with lm_head.weight replaced by a seeded random fp32 head [num_labels, hidden]
    stored as `head_name`, and config.json marked `architectures: ["NemotronForRewardModel"]`, `num_labels`.
    head_std 0.1 gives values of std ~1 at hidden 64 (measured), the scale of the real model's 0-4 attributes."""
    import json

    from safetensors.torch import load_file, save_file

    make_tiny_checkpoint(path, config, seed)
    weights_path = os.path.join(path, "model.safetensors")
    weights = load_file(weights_path)
    del weights["lm_head.weight"]
    generator = torch.Generator().manual_seed(seed + 1)
    weights[head_name] = torch.randn(num_labels, config.hidden_size, generator=generator) * head_std
    save_file(weights, weights_path, metadata={"format": "pt"})
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        hf = json.load(f)
    hf.update(architectures=["NemotronForRewardModel"], num_labels=num_labels)
    with open(config_path, "w") as f:
        json.dump(hf, f, indent=2)
    return str(path)


def our_model_from_hf(hf, config: ModelConfig):
    """NemotronForCausalLM with the weights of the HF model `hf`, loaded through load_weights."""
    from model.nemotron import NemotronForCausalLM

    model = NemotronForCausalLM(config)
    model.load_weights(hf.state_dict().items())
    return model.eval()


class PagedSession:
    """Drives NemotronForCausalLM over steps of flat batches with its own paged KV cache and block allocator.

    Blocks are handed out from a seeded shuffled free list, so each sequence's blocks are non-contiguous and out
    of order. Caches start filled with `fill` (NaN by default): attention must never read a slot no valid key maps
    to, or the NaN shows up in the logits.
    """

    def __init__(self, model, num_blocks: int = 64, block_size: int = 4, seed: int = 0,
                 fill: float = float("nan"), dtype: torch.dtype | None = None):
        config: ModelConfig = model.config
        self.model = model
        self.block_size = block_size
        dtype = dtype or getattr(torch, config.torch_dtype)
        shape = (2, num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.kv_caches = [torch.full(shape, fill, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.free_blocks = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.block_tables: dict[object, list[int]] = {}
        self.seq_lens: dict[object, int] = {}

    @torch.no_grad()
    def step(self, batch: list[tuple[object, list[int]]]) -> list[torch.Tensor]:
        """Run the new tokens of several sequences (key, token ids) as one flat batch; a new key starts a sequence.
        Returns each sequence's logits [len(tokens), vocab] fp32, in batch order."""
        input_ids, positions, query_lens, seq_lens, tables = [], [], [], [], []
        for key, tokens in batch:
            start = self.seq_lens.get(key, 0)
            end = start + len(tokens)
            table = self.block_tables.setdefault(key, [])
            while len(table) * self.block_size < end:
                table.append(self.free_blocks.pop())
            self.seq_lens[key] = end
            input_ids += tokens
            positions += range(start, end)
            query_lens.append(len(tokens))
            seq_lens.append(end)
            tables.append(list(table))
        metadata = AttentionMetadata.build(query_lens, seq_lens, tables, self.block_size)
        hidden = self.model(torch.tensor(input_ids), torch.tensor(positions), self.kv_caches, metadata)  # [T, H]
        logits = self.model.compute_logits(hidden)                                                       # [T, V]
        return list(logits.split(query_lens))
