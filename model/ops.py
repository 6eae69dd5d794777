"""Kernel backends: the ops the model calls, by name (`--kernel-backend torch|triton`).

The model never imports a kernel directly; each layer holds a `KernelOps` and calls `ops.layernorm1p`,
`ops.rope_kv_write`, `ops.attention` and `ops.squared_relu_mlp`. The torch backend runs the plain-torch
references (the specification; the CPU path); the triton backend runs the Triton kernels with the same
signatures (on the CPU only under TRITON_INTERPRET=1, which the tests use).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from model.attention_metadata import AttentionMetadata

BACKENDS = ("torch", "triton")


@dataclass(frozen=True)
class KernelOps:
    name: str
    layernorm1p: Callable          # (x [T, H], weight, bias, eps) -> [T, H]
    rope_kv_write: Callable        # (q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping, k_scale, v_scale) -> q_rot
    prefill_attention: Callable    # paged_attention_ref's signature
    decode_attention: Callable     # (q [B, Hq, D], k_cache, v_cache, seq_lens, block_tables, max_seq_len, scale, ...)
    squared_relu_mlp: Callable     # (x [T, H], up_w [I, H], down_w [H, I]) -> [T, H]

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, metadata: AttentionMetadata,
                  scale: float, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        """q [T, Hq, D] -> [T, Hq, D]. A pure decode batch (one new token per sequence, so T == B) takes the
        split-context decode kernel; anything with a prompt chunk takes the varlen prefill kernel."""
        if metadata.max_query_len == 1 and metadata.num_tokens == metadata.num_seqs:
            return self.decode_attention(q, k_cache, v_cache, metadata.seq_lens, metadata.block_tables,
                                         metadata.max_seq_len, scale, k_scale=k_scale, v_scale=v_scale)
        return self.prefill_attention(q, k_cache, v_cache, metadata.query_start_loc, metadata.seq_lens,
                                      metadata.block_tables, metadata.max_query_len, metadata.max_seq_len, scale,
                                      k_scale=k_scale, v_scale=v_scale)


def get_ops(backend: str) -> KernelOps:
    if backend == "torch":
        from kernels.decode_attention import paged_decode_attention_ref
        from kernels.layernorm import layernorm1p_ref
        from kernels.mlp import squared_relu_mlp_ref
        from kernels.paged_attention import paged_attention_ref
        from kernels.rope_kv_cache import rope_kv_write_ref
        return KernelOps("torch", layernorm1p_ref, rope_kv_write_ref, paged_attention_ref,
                         paged_decode_attention_ref, squared_relu_mlp_ref)
    if backend == "triton":
        from kernels.decode_attention import paged_decode_attention
        from kernels.layernorm import layernorm1p
        from kernels.mlp import squared_relu_mlp
        from kernels.paged_attention import paged_prefill_attention
        from kernels.rope_kv_cache import rope_kv_write
        return KernelOps("triton", layernorm1p, rope_kv_write, paged_prefill_attention, paged_decode_attention,
                         squared_relu_mlp)
    raise ValueError(f"--kernel-backend must be one of {BACKENDS}, got {backend!r}")


def default_backend() -> str:
    """triton where CUDA is available, torch otherwise (the Triton interpreter is for tests, not serving)."""
    return "triton" if torch.cuda.is_available() else "torch"
