"""Causal GQA attention of a flat token batch over the paged KV cache (prefill chunks and decode alike).

`paged_attention_ref` is the CPU execution path and the specification every Triton attention kernel is tested
against. Semantics:

- The batch is packed: sequence b's new tokens are rows query_start_loc[b]:query_start_loc[b+1] of `q`. They are
  the LAST q_len[b] tokens of a sequence of seq_lens[b] tokens; the first seq_lens[b] - q_len[b] (the context) were
  cached by earlier steps. The new tokens' own K/V must already be in the cache (the caller writes them first).
- Token i of sequence b lives at cache slot block_tables[b, i // BS] * BS + i % BS.
- Causal: the query at absolute position p attends keys 0..p of its own sequence.
- GQA: query head h reads KV head h // (Hq // Hkv).
- Scores, softmax and the weighted sum of V are computed in fp32; the output has q's dtype.

Cache slots that no valid key maps to (padding of the block table, blocks of other sequences, never-written memory)
may hold anything, NaN included: they are masked out before they can reach the output.
"""
from __future__ import annotations

import torch


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                        max_query_len: int, max_seq_len: int, scale: float) -> torch.Tensor:
    """q [T, Hq, D]; k_cache, v_cache [NB, BS, Hkv, D]; query_start_loc [B+1] int32; seq_lens [B] int32;
    block_tables [B, MB] int32 -> out [T, Hq, D] in q's dtype.

    Vectorized over the batch: gather every sequence's K/V into a padded [B, max_seq_len, Hkv, D], pad the queries
    to [B, max_query_len, Hq, D], mask, attend, and scatter the valid rows back to the flat layout.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    group = num_heads // num_kv_heads  # query heads per KV head
    device = q.device
    out = q.new_zeros(num_tokens, num_heads, head_dim)  # [T, Hq, D]; rows no sequence owns stay zero
    if num_tokens == 0 or num_seqs == 0:
        return out

    starts = query_start_loc[:-1].long()                 # [B] first row of each sequence in the flat batch
    q_lens = query_start_loc[1:].long() - starts         # [B] new tokens per sequence
    seq_lens = seq_lens.long()                           # [B] cached + new
    ctx_lens = seq_lens - q_lens                         # [B] tokens cached before this step

    # Keys: position j of sequence b sits in slot block_tables[b, j // BS] * BS + j % BS.
    k_pos = torch.arange(max_seq_len, device=device)                       # [S]
    blocks = block_tables.long()[:, k_pos // block_size]                   # [B, S]
    slots = blocks * block_size + k_pos % block_size                       # [B, S]
    key_valid = k_pos[None, :] < seq_lens[:, None]                         # [B, S]
    k = k_cache.reshape(num_blocks * block_size, num_kv_heads, head_dim)[slots]  # [B, S, Hkv, D]
    v = v_cache.reshape(num_blocks * block_size, num_kv_heads, head_dim)[slots]  # [B, S, Hkv, D]
    # Zero V outside each sequence so that garbage there (even NaN) cannot leak through a 0 probability.
    v = v.float().masked_fill(~key_valid[:, :, None, None], 0.0)           # [B, S, Hkv, D] fp32

    # Queries: padded row i of sequence b is flat row starts[b] + i, when i < q_lens[b].
    q_idx = torch.arange(max_query_len, device=device)                     # [Q]
    query_valid = q_idx[None, :] < q_lens[:, None]                         # [B, Q]
    rows = torch.where(query_valid, starts[:, None] + q_idx[None, :], 0)   # [B, Q] (padding reads row 0)
    q_pad = q[rows].float()                                                # [B, Q, Hq, D] fp32
    q_pad = q_pad.view(num_seqs, max_query_len, num_kv_heads, group, head_dim)  # [B, Q, Hkv, G, D]

    # Causal mask in absolute positions: query i of sequence b is at position ctx_lens[b] + i.
    q_pos = ctx_lens[:, None] + q_idx[None, :]                             # [B, Q]
    allowed = (k_pos[None, None, :] <= q_pos[:, :, None]) & key_valid[:, None, :]  # [B, Q, S]

    scores = torch.einsum("bqhgd,bshd->bhgqs", q_pad, k.float()) * scale   # [B, Hkv, G, Q, S] fp32
    scores = scores.masked_fill(~allowed[:, None, None, :, :], float("-inf"))
    # A row with no allowed key at all (padding of an empty sequence) turns NaN here; such rows are dropped below.
    probs = torch.softmax(scores, dim=-1)                                  # [B, Hkv, G, Q, S] fp32
    out_pad = torch.einsum("bhgqs,bshd->bqhgd", probs, v)                  # [B, Q, Hkv, G, D] fp32
    out_pad = out_pad.reshape(num_seqs, max_query_len, num_heads, head_dim)  # [B, Q, Hq, D]

    out[rows[query_valid]] = out_pad[query_valid].to(q.dtype)              # [T_valid, Hq, D] back to flat rows
    return out
