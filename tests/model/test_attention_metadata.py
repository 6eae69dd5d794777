"""AttentionMetadata.build (numpy) against the definition written out slot by slot in plain Python."""
from __future__ import annotations

import random

import pytest
import torch

from model.attention_metadata import AttentionMetadata


def _by_definition(query_lens, seq_lens, block_tables, block_size):
    slots = [table[pos // block_size] * block_size + pos % block_size
             for q_len, s_len, table in zip(query_lens, seq_lens, block_tables) for pos in range(s_len - q_len, s_len)]
    starts = [0]
    for q_len in query_lens:
        starts.append(starts[-1] + q_len)
    width = max((len(t) for t in block_tables), default=0) or 1
    return slots, starts, [t + [0] * (width - len(t)) for t in block_tables]


@pytest.mark.parametrize("seed", range(6))
def test_matches_the_definition(seed):
    """Ragged batches: decode rows, whole prompts, chunks after a cached prefix, rows with no new token, tables longer
    than needed (blocks allocated ahead), block sizes 1 to 32."""
    rng = random.Random(seed)
    block_size = rng.choice([1, 4, 16, 32])
    query_lens, seq_lens, tables = [], [], []
    for _ in range(rng.randint(1, 12)):
        s_len = rng.randint(1, 300)
        q_len = rng.choice([0, 1, s_len, rng.randint(0, s_len)])
        blocks = -(-s_len // block_size) + rng.choice([0, 0, 1, 3])
        query_lens.append(q_len)
        seq_lens.append(s_len)
        tables.append(rng.sample(range(10_000), blocks))
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, block_size)
    slots, starts, padded = _by_definition(query_lens, seq_lens, tables, block_size)
    assert meta.slot_mapping.dtype == torch.int64 and meta.slot_mapping.tolist() == slots
    assert meta.query_start_loc.dtype == torch.int32 and meta.query_start_loc.tolist() == starts
    assert meta.seq_lens.dtype == torch.int32 and meta.seq_lens.tolist() == seq_lens
    assert meta.block_tables.dtype == torch.int32 and meta.block_tables.tolist() == padded
    assert (meta.max_query_len, meta.max_seq_len) == (max(query_lens), max(seq_lens))


def test_empty_batch():
    meta = AttentionMetadata.build([], [], [], 16)
    assert meta.num_seqs == 0 and meta.num_tokens == 0 and tuple(meta.block_tables.shape) == (0, 1)
    assert meta.query_start_loc.tolist() == [0] and (meta.max_query_len, meta.max_seq_len) == (0, 0)


def test_a_block_table_too_short_for_its_sequence_is_an_error():
    with pytest.raises(ValueError, match="sequence 1: 33 tokens need 3 blocks of 16, its block table has 2"):
        AttentionMetadata.build([1, 1], [16, 33], [[4], [5, 6]], 16)
