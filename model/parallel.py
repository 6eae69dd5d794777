"""Layers that own a shard of a weight under tensor parallelism, each with the `weight_loader` that maps a checkpoint
tensor onto its shard.

The rank and world size come from model/distributed.py (one rank when no group was started, and then every layer
here is the plain layer and no collective runs). Column-parallel layers own a slice of the output features (dim 0
of the weight), row-parallel layers a slice of the input features (dim 1) and all-reduce their output, the vocab
layers a contiguous slice of the (padded) vocabulary. Constructors take whole-model sizes; `in_features`,
`out_features` and the QKV head counts are this rank's. Nothing outside this file slices by rank.

A loader gets the whole checkpoint tensor, or a LazyTensor of it (model/lazy_tensor.py), of which it reads only
this rank's slice. A tensor that already has the rank's shape (random weights generated per rank) is taken as is.

Every loader checks shapes and raises `CheckpointError` with the expected and found shape; the model adds the
tensor's name. Nemotron-4 has no biases, so none of these layers has one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model import cpu_gemm, distributed
from model.errors import CheckpointError
from model.lazy_tensor import materialize
from model.quant import LinearMethod, UnquantizedLinearMethod


def _check_shape(expected: torch.Size, loaded: torch.Tensor) -> None:
    if tuple(loaded.shape) != tuple(expected):
        raise CheckpointError(f"shape {list(loaded.shape)} does not match the model's {list(expected)}")


def default_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
    """Copy a whole tensor into `param` (casting to its dtype and device); replicated on every rank."""
    loaded_weight = materialize(loaded_weight)
    _check_shape(param.shape, loaded_weight)
    with torch.no_grad():
        param.copy_(loaded_weight)


def _divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"tensor parallel size {parts} does not divide {what} ({total})")
    return total // parts


def rank_part(loaded, dim: int, local: int):
    """This rank's `local` entries along `dim` of a whole checkpoint tensor (reading only those from a LazyTensor);
    a tensor already of the local size (per-rank random weights) is returned whole."""
    world = distributed.tp_world_size()
    if world == 1 or loaded.dim() <= dim or loaded.shape[dim] != local * world:
        return materialize(loaded)  # one rank, already local, or mis-shaped (the caller's shape check says so)
    return loaded.narrow(dim, distributed.tp_rank() * local, local)


class _ParallelLinear(nn.Module):
    """A bias-free linear layer whose weight layout and matmul belong to its linear method."""

    split_dim = 0             # the weight dimension divided across ranks
    splits_input = False      # True for row-parallel: each rank sees a K-slice of the input

    def __init__(self, in_features: int, out_features: int, linear_method: LinearMethod | None = None,
                 params_dtype: torch.dtype | None = None):
        super().__init__()
        world = distributed.tp_world_size()
        if self.split_dim == 0:
            out_features = _divide(out_features, world, f"{type(self).__name__}'s output features")
        else:
            in_features = _divide(in_features, world, f"{type(self).__name__}'s input features")
        self.in_features = in_features    # of this rank's shard
        self.out_features = out_features  # of this rank's shard
        self.linear_method = linear_method or UnquantizedLinearMethod()
        self.linear_method.create_weights(self, in_features, out_features, params_dtype or torch.get_default_dtype())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_method.apply(self, x)  # [..., out_features]

    def rank_slice(self, param: torch.Tensor, loaded, shard_id: str | None = None) -> torch.Tensor:
        """This rank's part of checkpoint tensor `loaded` for `param` (the weight, or a per-row [out, 1] scale,
        which a row-parallel layer keeps whole)."""
        dim = self.split_dim
        if dim >= param.dim() or (dim == 1 and param.shape[1] != self.in_features):
            return materialize(loaded)  # not split along this tensor (a row-parallel layer's per-row scale)
        return rank_part(loaded, dim, param.shape[dim])

    def place(self, param: torch.Tensor, local: torch.Tensor, shard_id: str | None = None) -> None:
        """Copy this rank's part (from rank_slice) into `param`."""
        default_weight_loader(param, local)

    def weight_loader(self, param: torch.Tensor, loaded_weight, shard_id: str | None = None) -> None:
        self.place(param, self.rank_slice(param, loaded_weight, shard_id), shard_id)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class ColumnParallelLinear(_ParallelLinear):
    """y = x W^T with W's output features (rows) split across ranks; each rank keeps its slice of y."""


class RowParallelLinear(_ParallelLinear):
    """y = x W^T with W's input features (columns) split across ranks; partial results are summed across ranks
    (a no-op at one rank), so every rank ends with the whole y."""

    split_dim = 1
    splits_input = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.linear_method.apply(self, x))  # [..., out_features]

    @staticmethod
    def reduce(partial: torch.Tensor) -> torch.Tensor:
        """Sum this layer's partial output over the ranks; a linear method that runs the layer's matmul itself
        (the fused MLP) calls this on the result."""
        return distributed.all_reduce(partial)  # [..., out_features]


class QKVParallelLinear(ColumnParallelLinear):
    """The fused q/k/v projection: one weight [(Hq + 2 * Hkv) * D, hidden] whose rows are q's, then k's, then v's.
    HF checkpoints store q_proj, k_proj and v_proj separately; each is loaded into its rows with shard_id
    "q", "k" or "v". Split by KV-head groups: rank r holds KV heads [r * Hkv/N, (r + 1) * Hkv/N) and the query
    heads that attend to them, which are the same fraction of q's rows because GQA groups are contiguous."""

    def __init__(self, hidden_size: int, head_dim: int, total_num_heads: int, total_num_kv_heads: int,
                 linear_method: LinearMethod | None = None, params_dtype: torch.dtype | None = None):
        world = distributed.tp_world_size()
        if total_num_kv_heads % world:
            raise ValueError(f"tensor parallel size {world} must divide the number of KV heads "
                             f"({total_num_kv_heads}): each rank holds whole KV heads and their query heads")
        self.head_dim = head_dim
        self.num_heads = total_num_heads // world        # of this rank
        self.num_kv_heads = total_num_kv_heads // world  # of this rank
        super().__init__(hidden_size, (total_num_heads + 2 * total_num_kv_heads) * head_dim, linear_method,
                         params_dtype)

    def output_slices(self) -> dict[str, tuple[int, int]]:
        """(first row, number of rows) of q, k and v in this rank's fused output."""
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        return {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}

    def _rows(self, shard_id: str) -> tuple[int, int]:
        slices = self.output_slices()
        if shard_id not in slices:
            raise ValueError(f"QKVParallelLinear.weight_loader: shard_id must be one of {sorted(slices)}, "
                             f"got {shard_id!r}")
        return slices[shard_id]

    def rank_slice(self, param: torch.Tensor, loaded, shard_id: str | None = None) -> torch.Tensor:
        """shard_id None: a tensor of this rank's whole fused shape (random weights, tests)."""
        if shard_id is None:
            return materialize(loaded)
        return rank_part(loaded, 0, self._rows(shard_id)[1])

    def place(self, param: torch.Tensor, local: torch.Tensor, shard_id: str | None = None) -> None:
        """Copy a shard into its rows of `param` (the weight, or a per-row tensor such as an FP8 per-channel
        scale)."""
        if shard_id is None:
            return default_weight_loader(param, local)
        start, size = self._rows(shard_id)
        with torch.no_grad():
            target = param.narrow(0, start, size)  # [size, hidden] view into the fused weight
            _check_shape(target.shape, local)
            target.copy_(local)


class VocabParallelEmbedding(nn.Module):
    """Token embedding table [vocab, hidden], split by vocabulary rows across ranks: rank r holds rows
    [r * Vr, (r + 1) * Vr) of the vocabulary padded to a multiple of the world size (Vr = padded / N); padding
    rows are zeros."""

    def __init__(self, num_embeddings: int, embedding_dim: int, params_dtype: torch.dtype | None = None):
        super().__init__()
        world = distributed.tp_world_size()
        self.num_embeddings = num_embeddings  # the whole vocabulary
        self.embedding_dim = embedding_dim
        self.rows_per_rank = -(-num_embeddings // world)
        # Clamped: with a small vocabulary the last ranks' padded ranges lie wholly past it (V = 9 at TP = 8: 2
        # rows per rank, rank 5 would start at row 10 of 9); such a rank holds only padding, the empty [V, V).
        self.vocab_start = min(distributed.tp_rank() * self.rows_per_rank, num_embeddings)
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, num_embeddings)  # exclusive; real rows only
        weight = torch.empty(self.rows_per_rank, embedding_dim, dtype=params_dtype or torch.get_default_dtype())
        self.weight = nn.Parameter(weight)  # [V / N (padded), hidden]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if distributed.tp_world_size() == 1:
            return F.embedding(input_ids, self.weight)  # [T, hidden]
        # Ids outside this rank's range look up row 0 and are zeroed; the all-reduce adds the owner's row.
        mine = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)                # [T]
        local = torch.where(mine, input_ids - self.vocab_start, torch.zeros_like(input_ids))  # [T]
        out = F.embedding(local, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)   # [T, hidden]
        return distributed.all_reduce(out)                                                  # [T, hidden]

    def weight_loader(self, param: torch.Tensor, loaded_weight) -> None:
        if distributed.tp_world_size() == 1:
            return default_weight_loader(param, loaded_weight)
        if loaded_weight.dim() != 2 or loaded_weight.shape[0] != self.num_embeddings:
            raise CheckpointError(f"shape {list(loaded_weight.shape)} does not match the model's "
                                  f"[{self.num_embeddings}, {self.embedding_dim}]")
        rows = max(self.vocab_end - self.vocab_start, 0)
        local = loaded_weight.narrow(0, self.vocab_start, rows)  # [rows, hidden]
        with torch.no_grad():
            param.zero_()  # padding rows past the vocabulary
            target = param.narrow(0, 0, rows)
            _check_shape(target.shape, local)
            target.copy_(local)

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"rows=[{self.vocab_start}, {self.vocab_end})")


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection [vocab, hidden] (untied from the input embedding), split by vocabulary rows.
    Calling it maps hidden states to logits: [N, vocab] on rank 0, None on the other ranks (each computes its
    vocabulary slice; they are gathered to rank 0, which alone samples)."""
    cpu_packed_weight = None   # set by the model once loaded (model/cpu_gemm.py)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = cpu_gemm.linear(hidden, self.weight, self.cpu_packed_weight)  # [N, V / ranks]
        if distributed.tp_world_size() == 1:
            return logits
        gathered = distributed.gather_to_rank0(logits, dim=-1)  # [N, V padded] on rank 0
        return None if gathered is None else gathered[:, : self.num_embeddings]  # [N, V]


class RewardHead(nn.Module):
    """A reward model's head [num_labels, hidden] (9 x 18432 for 340B-Reward: 0.7 MB in fp32). Too small to be worth
    splitting, so every rank holds all of it (plain weight loader) in fp32, and only rank 0 applies it: the hidden
    states after the final norm are the same on every rank. Calling it gives [N, num_labels] fp32 on rank 0, None on
    the other ranks, like ParallelLMHead's logits."""

    def __init__(self, num_labels: int, hidden_size: int):
        super().__init__()
        self.num_labels = num_labels
        self.weight = nn.Parameter(torch.empty(num_labels, hidden_size, dtype=torch.float32), requires_grad=False)
        self.weight_loader = default_weight_loader

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        if distributed.tp_rank() != 0:
            return None
        return F.linear(hidden.float(), self.weight)  # [N, num_labels] fp32
