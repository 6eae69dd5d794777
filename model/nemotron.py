"""The Nemotron-4 model on a flat token batch with a paged KV cache.

Parameter names are HF's, except that each layer's q_proj/k_proj/v_proj are one fused `qkv_proj`; `load_weights`
is therefore a name mapping. Tensor parallelism lives in model/parallel.py and quantization in model/quant.py:
nothing here knows about either.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from model import cpu_gemm
from model.attention_metadata import AttentionMetadata
from model.config import ModelConfig
from model.errors import CheckpointError
from model.layers import DecoderLayer, LayerNorm1P, RotaryEmbedding, params_dtype
from model.ops import get_ops
from model.parallel import ParallelLMHead, RewardHead, VocabParallelEmbedding, default_weight_loader
from model.quant import LinearMethod, UnquantizedLinearMethod

# (fused module, HF module, shard id): checkpoint tensors that load into part of a fused parameter.
_STACKED = (("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"))
# Non-parameter tensors some older checkpoints carry; they are recomputed, so skipped.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class NemotronModel(nn.Module):
    def __init__(self, config: ModelConfig, linear_method: LinearMethod, kernel_backend: str):
        super().__init__()
        dtype = params_dtype(config)
        ops = get_ops(kernel_backend)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype)
        self.rotary_emb = RotaryEmbedding(config.rotary_dim, config.max_position_embeddings, config.rope_theta)
        self.layers = nn.ModuleList(DecoderLayer(config, linear_method, ops)
                                    for _ in range(config.num_hidden_layers))
        self.norm = LayerNorm1P(config.hidden_size, config.norm_eps, dtype, ops)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"got {len(kv_caches)} KV caches for {len(self.layers)} layers")
        x = self.embed_tokens(input_ids)          # [T, hidden]
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, positions, self.rotary_emb, kv_cache, attn_metadata)  # [T, hidden]
        return self.norm(x)                       # [T, hidden]


class NemotronForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, linear_method: LinearMethod | None = None,
                 kernel_backend: str = "torch"):
        super().__init__()
        self.config = config
        self.kernel_backend = kernel_backend
        self.linear_method = linear_method or UnquantizedLinearMethod()
        self.model = NemotronModel(config, self.linear_method, kernel_backend)
        self.lm_head = self._make_head(config)

    @staticmethod
    def _make_head(config: ModelConfig) -> nn.Module:
        return ParallelLMHead(config.vocab_size, config.hidden_size, params_dtype(config))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions [T] int64; kv_caches: per layer [2, NB, BS, Hkv, D] (K, V) -> hidden [T, hidden]
        after the final norm. Writes the new tokens' K/V into the caches at attn_metadata.slot_mapping."""
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [N, hidden] -> logits [N, vocab] fp32; None on tensor-parallel ranks other than 0 (the
        vocab-parallel lm_head gathers the logits there). Every rank must call it with the same N."""
        logits = self.lm_head(hidden)  # [N, vocab] or None
        return None if logits is None else logits.float()

    # ---- loading -------------------------------------------------------------------------------------------

    def checkpoint_tensor_names(self) -> list[str]:
        """The HF tensor names a complete checkpoint of this model holds (q/k/v separately)."""
        return [hf_name for param_name, param in self.named_parameters()
                if not getattr(param, "computed_at_load", False)  # e.g. the scale of a weight quantized at load
                for hf_name in _hf_names(param_name)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors, consumed one at a time. Raises CheckpointError naming the tensor on an unexpected,
        duplicated or mis-shaped tensor, and naming every missing one at the end."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith(IGNORED_SUFFIXES):
                continue
            param_name, shard_id = _param_name(name)
            if param_name not in params:
                raise CheckpointError(f"unexpected tensor {name!r}: the model ({self.config.num_hidden_layers} "
                                      f"layers) has no such parameter")
            if name in loaded:
                raise CheckpointError(f"tensor {name!r} appears more than once in the checkpoint")
            module_name, _, _ = param_name.rpartition(".")
            # A parameter's own loader (a linear method's, e.g. for FP8 scales) comes before its module's.
            loader = (getattr(params[param_name], "weight_loader", None)
                      or getattr(self.get_submodule(module_name), "weight_loader", default_weight_loader))
            try:
                if shard_id is None:
                    loader(params[param_name], tensor)
                else:
                    loader(params[param_name], tensor, shard_id)
            except CheckpointError as e:
                raise CheckpointError(f"tensor {name!r}: {e}") from None
            loaded.add(name)
        missing = [name for name in self.checkpoint_tensor_names() if name not in loaded]
        if missing:
            raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {', '.join(missing)}")
        self.process_weights_after_loading()

    def process_weights_after_loading(self) -> None:
        """Let the linear method finish each layer once its weights are in (a no-op when unquantized, apart from
        packing fp32 CPU weights for MKL's GEMM, which the lm_head takes too)."""
        for module in self.modules():
            method = getattr(module, "linear_method", None)
            if method is not None and module is not self:
                method.process_weights_after_loading(module)
        if isinstance(self.lm_head, ParallelLMHead):
            self.lm_head.cpu_packed_weight = cpu_gemm.prepare(self.lm_head.weight)


# Other names reward checkpoints give their head (transformers' sequence-classification name, NeMo-Aligner's).
REWARD_HEAD_ALIASES = {"score.weight": "lm_head.weight", "reward_head.weight": "lm_head.weight"}


class NemotronForRewardModel(NemotronForCausalLM):
    """Nemotron-4-340B-Reward: the base model with lm_head replaced by a linear head to config.num_labels (9) values,
    read at the last token of each sequence. The checkpoint's config.json says `architectures:
    ["NemotronForRewardModel"]`; the head is the tensor `lm_head.weight` [num_labels, hidden] (also read as
    `score.weight` or `reward_head.weight`). The head is replicated on every rank and computed in fp32 on rank 0."""

    @staticmethod
    def _make_head(config: ModelConfig) -> nn.Module:
        return RewardHead(config.num_labels, config.hidden_size)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [N, hidden] -> the head's values [N, num_labels] fp32 on rank 0, None on the other ranks. Named
        like the causal LM's method so one step path (model_runner, worker) serves both."""
        return self.lm_head(hidden)  # [N, num_labels] or None

    compute_rewards = compute_logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights((REWARD_HEAD_ALIASES.get(name, name), tensor) for name, tensor in weights)


def model_class(config: ModelConfig) -> type[NemotronForCausalLM]:
    """The model class a config needs: NemotronForRewardModel for a reward checkpoint, else NemotronForCausalLM."""
    return NemotronForRewardModel if config.is_reward else NemotronForCausalLM


def _param_name(hf_name: str) -> tuple[str, str | None]:
    """HF tensor name -> (our parameter name, shard id within a fused parameter or None)."""
    for fused, part, shard in _STACKED:
        if f".{part}." in hf_name:
            return hf_name.replace(f".{part}.", f".{fused}."), shard
    return hf_name, None


def hf_module_names(module_name: str) -> list[str]:
    """Our module name -> the HF module names it holds (q_proj, k_proj, v_proj for a fused qkv_proj)."""
    return [name.rpartition(".")[0] for name in _hf_names(module_name + ".weight")]


def _hf_names(param_name: str) -> list[str]:
    """Our parameter name -> the HF tensor names loaded into it."""
    parts = [param_name.replace(f".{fused}.", f".{part}.")
             for fused, part, _ in _STACKED if f".{fused}." in param_name]
    return parts or [param_name]
