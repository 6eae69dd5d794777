"""paged_attention_ref against a naive per-sequence dense causal attention."""
from __future__ import annotations

import pytest
import torch

from kernels.paged_attention import paged_attention_ref

# (cached tokens before this step, new tokens) per sequence: decode steps (q_len 1) with and without context,
# whole prompts, and prompt chunks after a cached prefix; lengths straddle block boundaries.
SEQS = [(0, 1), (0, 7), (5, 1), (13, 6), (0, 17), (30, 3), (3, 1), (16, 16)]


def _naive_attention(q, k_cache, v_cache, seqs, tables, scale):
    """One sequence at a time: read its keys slot by slot, repeat KV heads, dense causal softmax in fp32."""
    block_size = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    outs, row = [], 0
    for (ctx, q_len), table in zip(seqs, tables):
        seq_len = ctx + q_len
        slots = [table[i // block_size] * block_size + i % block_size for i in range(seq_len)]
        k = k_cache.flatten(0, 1)[slots].float().repeat_interleave(group, dim=1)  # [S, Hq, D]
        v = v_cache.flatten(0, 1)[slots].float().repeat_interleave(group, dim=1)  # [S, Hq, D]
        qs = q[row:row + q_len].float()                                           # [Q, Hq, D]
        scores = torch.einsum("qhd,shd->hqs", qs, k) * scale                      # [Hq, Q, S]
        q_pos = torch.arange(ctx, seq_len)[:, None]
        scores = scores.masked_fill(torch.arange(seq_len)[None, :] > q_pos, float("-inf"))
        outs.append(torch.einsum("hqs,shd->qhd", scores.softmax(-1), v))          # [Q, Hq, D]
        row += q_len
    return torch.cat(outs).to(q.dtype)


def _setup(seqs, num_heads, num_kv_heads, head_dim, block_size, dtype=torch.float32, seed=0):
    """Random q and a cache whose used slots hold random K/V and every other slot NaN; shuffled block ids."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-(ctx + q_len) // block_size) for ctx, q_len in seqs]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks stay NaN
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = []
    for n in blocks_per_seq:
        tables.append(order[:n])
        order = order[n:]
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    for (ctx, q_len), table in zip(seqs, tables):
        for i in range(ctx + q_len):
            slot = (table[i // block_size], i % block_size)
            k_cache[slot] = torch.randn(num_kv_heads, head_dim, generator=g).to(dtype)
            v_cache[slot] = torch.randn(num_kv_heads, head_dim, generator=g).to(dtype)
    num_tokens = sum(q_len for _, q_len in seqs)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=g).to(dtype)
    width = max(blocks_per_seq)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    starts = [0]
    for _, q_len in seqs:
        starts.append(starts[-1] + q_len)
    meta = dict(query_start_loc=torch.tensor(starts, dtype=torch.int32),
                seq_lens=torch.tensor([c + n for c, n in seqs], dtype=torch.int32), block_tables=block_tables,
                max_query_len=max(n for _, n in seqs), max_seq_len=max(c + n for c, n in seqs))
    return q, k_cache, v_cache, tables, meta


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("head_dim", [16, 24])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (12, 1)])
def test_matches_naive_attention(num_heads, num_kv_heads, head_dim, block_size):
    q, k_cache, v_cache, tables, meta = _setup(SEQS, num_heads, num_kv_heads, head_dim, block_size)
    scale = head_dim ** -0.5
    out = paged_attention_ref(q, k_cache, v_cache, scale=scale, **meta)
    expected = _naive_attention(q, k_cache, v_cache, SEQS, tables, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seqs", [[(0, 1)], [(9, 1)], [(0, 5)], [(2, 1), (0, 1), (7, 1)]])
def test_single_and_decode_batches(seqs):
    q, k_cache, v_cache, tables, meta = _setup(seqs, 8, 2, 16, 4, seed=1)
    out = paged_attention_ref(q, k_cache, v_cache, scale=0.25, **meta)
    torch.testing.assert_close(out, _naive_attention(q, k_cache, v_cache, seqs, tables, 0.25), atol=1e-5, rtol=1e-5)


def test_bfloat16_inputs_compute_in_fp32():
    q, k_cache, v_cache, tables, meta = _setup(SEQS, 8, 2, 16, 4, dtype=torch.bfloat16, seed=2)
    out = paged_attention_ref(q, k_cache, v_cache, scale=0.25, **meta)
    assert out.dtype == torch.bfloat16
    expected = _naive_attention(q, k_cache, v_cache, SEQS, tables, 0.25)  # fp32 math on the same bf16 inputs
    torch.testing.assert_close(out, expected, atol=1e-2, rtol=1e-2)


def test_rows_past_the_last_sequence_are_zero():
    """A batch padded with extra token rows (as a fixed-size graph would be) leaves those rows zero."""
    q, k_cache, v_cache, tables, meta = _setup([(3, 2), (0, 3)], 4, 2, 16, 4, seed=3)
    padded_q = torch.cat([q, torch.randn(2, 4, 16)])
    out = paged_attention_ref(padded_q, k_cache, v_cache, scale=0.25, **meta)
    torch.testing.assert_close(out[:5], _naive_attention(q, k_cache, v_cache, [(3, 2), (0, 3)], tables, 0.25))
    assert (out[5:] == 0).all()
