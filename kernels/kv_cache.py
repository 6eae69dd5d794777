"""Writing new tokens' K/V into the paged KV cache.

A layer's cache is [2, num_blocks, block_size, num_kv_heads, head_dim] (K then V); `k_cache` and `v_cache` are its
two halves. Flattening (num_blocks, block_size) gives one row per cache slot, and `slot_mapping[t]` is the row that
token t of the flat batch goes to (block_table[pos // block_size] * block_size + pos % block_size).
"""
from __future__ import annotations

import torch


def write_kv_cache_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """Store k[t], v[t] at cache slot slot_mapping[t], in place (cast to the cache dtype).

    k, v: [T, num_kv_heads, head_dim]; k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], each
    contiguous (a view of a flat slot table is taken, so that the write lands in the caller's tensor);
    slot_mapping: [T] int64, distinct slots.
    """
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    if k.shape != v.shape or k.shape[1:] != (num_kv_heads, head_dim):
        raise ValueError(f"write_kv_cache: k {tuple(k.shape)} / v {tuple(v.shape)} do not fit a cache of "
                         f"[*, *, {num_kv_heads}, {head_dim}]")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"write_kv_cache: slot_mapping {tuple(slot_mapping.shape)} must be [{k.shape[0]}]")
    k_slots = k_cache.view(num_blocks * block_size, num_kv_heads, head_dim)  # [NB * BS, Hkv, D]
    v_slots = v_cache.view(num_blocks * block_size, num_kv_heads, head_dim)  # [NB * BS, Hkv, D]
    slots = slot_mapping.long()                                              # [T]
    k_slots.index_copy_(0, slots, k.to(k_cache.dtype))
    v_slots.index_copy_(0, slots, v.to(v_cache.dtype))
