"""Layers that own a shard of a weight under tensor parallelism, each with the `weight_loader` that maps a checkpoint
tensor onto its shard.

Today the tensor-parallel size is always 1: every rank holds whole weights and no collective runs. The split is
already where it will be: column-parallel layers own a slice of the output features (dim 0 of the weight),
row-parallel layers a slice of the input features (dim 1) and all-reduce their output, the vocab layers a slice of
the vocabulary. Adding ranks means slicing `loaded_weight` by the rank inside the loaders below and adding the
collectives in `forward`; nothing outside this file has to learn about shards.

Every loader checks shapes and raises `CheckpointError` with the expected and found shape; the model adds the
tensor's name. Nemotron-4 has no biases, so none of these layers has one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.errors import CheckpointError
from model.quant import LinearMethod, UnquantizedLinearMethod


def _check_shape(expected: torch.Size, loaded: torch.Tensor) -> None:
    if tuple(loaded.shape) != tuple(expected):
        raise CheckpointError(f"shape {list(loaded.shape)} does not match the model's {list(expected)}")


def default_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
    """Copy a whole tensor into `param` (casting to its dtype and device)."""
    _check_shape(param.shape, loaded_weight)
    with torch.no_grad():
        param.copy_(loaded_weight)


class _ParallelLinear(nn.Module):
    """A bias-free linear layer whose weight layout and matmul belong to its linear method."""

    def __init__(self, in_features: int, out_features: int, linear_method: LinearMethod | None = None,
                 params_dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features = in_features    # of this rank's shard
        self.out_features = out_features  # of this rank's shard
        self.linear_method = linear_method or UnquantizedLinearMethod()
        self.linear_method.create_weights(self, in_features, out_features, params_dtype or torch.get_default_dtype())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_method.apply(self, x)  # [..., out_features]

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
        # Multi-rank: narrow loaded_weight to this rank's slice (dim 0 column-, dim 1 row-parallel) first.
        default_weight_loader(param, loaded_weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class ColumnParallelLinear(_ParallelLinear):
    """y = x W^T with W's output features (rows) split across ranks; each rank keeps its slice of y."""


class RowParallelLinear(_ParallelLinear):
    """y = x W^T with W's input features (columns) split across ranks; partial results are summed across ranks
    (a no-op at one rank), so every rank ends with the whole y."""


class QKVParallelLinear(ColumnParallelLinear):
    """The fused q/k/v projection: one weight [(Hq + 2 * Hkv) * D, hidden] whose rows are q's, then k's, then v's.
    HF checkpoints store q_proj, k_proj and v_proj separately; each is loaded into its rows with shard_id
    "q", "k" or "v"."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 linear_method: LinearMethod | None = None, params_dtype: torch.dtype | None = None):
        self.head_dim = head_dim
        self.num_heads = num_heads        # of this rank
        self.num_kv_heads = num_kv_heads  # of this rank
        super().__init__(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, linear_method, params_dtype)

    def output_slices(self) -> dict[str, tuple[int, int]]:
        """(first row, number of rows) of q, k and v in the fused output."""
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        return {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: str | None = None) -> None:
        """Load one shard into its rows of `param` (the weight, or a per-row tensor such as an FP8 per-channel
        scale); shard_id None loads a tensor of the whole fused shape (random weights, tests)."""
        if shard_id is None:
            return super().weight_loader(param, loaded_weight)
        slices = self.output_slices()
        if shard_id not in slices:
            raise ValueError(f"QKVParallelLinear.weight_loader: shard_id must be one of {sorted(slices)}, "
                             f"got {shard_id!r}")
        start, size = slices[shard_id]
        # Multi-rank: narrow loaded_weight to this rank's heads of the shard first.
        with torch.no_grad():
            target = param.narrow(0, start, size)  # [size, hidden] view into the fused weight
            _check_shape(target.shape, loaded_weight)
            target.copy_(loaded_weight)


class VocabParallelEmbedding(nn.Module):
    """Token embedding table [vocab, hidden], split by vocabulary rows across ranks."""

    def __init__(self, num_embeddings: int, embedding_dim: int, params_dtype: torch.dtype | None = None):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        weight = torch.empty(num_embeddings, embedding_dim, dtype=params_dtype or torch.get_default_dtype())
        self.weight = nn.Parameter(weight)  # [V, hidden]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Multi-rank: look up only ids in this rank's range, zero the rest, all-reduce.
        return F.embedding(input_ids, self.weight)  # [T, hidden]

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
        # Multi-rank: narrow loaded_weight to this rank's vocabulary rows first.
        default_weight_loader(param, loaded_weight)

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}"


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection [vocab, hidden] (untied from the input embedding), split by vocabulary rows.
    Calling it maps hidden states to logits."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # Multi-rank: each rank computes its vocabulary slice; they are gathered to rank 0.
        return F.linear(hidden, self.weight)  # [N, V]
