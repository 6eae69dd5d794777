"""What attention needs to know about a flat token batch: where each sequence's new tokens sit in the batch,
how long each sequence is in total, and where its KV lives in the paged cache.

The batch is packed: T new tokens of B sequences laid end to end (a prompt chunk or one decode token each).
The paged KV cache of a layer is one tensor [2, num_blocks, block_size, num_kv_heads, head_dim] (K then V);
token `i` of a sequence lives in slot `block_table[i // block_size] * block_size + i % block_size`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor     # [T] int64: cache slot each new token's K/V is written to
    query_start_loc: torch.Tensor  # [B + 1] int32: sequence b's new tokens are rows qsl[b]:qsl[b+1] of the batch
    seq_lens: torch.Tensor         # [B] int32: tokens of sequence b in the cache after this step (cached + new)
    block_tables: torch.Tensor     # [B, max_blocks_per_seq] int32, padded with 0 past each sequence's blocks
    max_query_len: int             # host-side copies, so kernels and the torch path never sync on .item()
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]

    @classmethod
    def build(cls, query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]], block_size: int,
              device: torch.device | str = "cpu") -> "AttentionMetadata":
        """Build from host lists: query_lens[b] new tokens ending at seq_lens[b] for each sequence b."""
        slots: list[int] = []
        for q_len, s_len, table in zip(query_lens, seq_lens, block_tables):
            for pos in range(s_len - q_len, s_len):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        starts = [0]
        for q_len in query_lens:
            starts.append(starts[-1] + q_len)
        width = max((len(t) for t in block_tables), default=0) or 1
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device).reshape(len(block_tables), width),
            max_query_len=max(query_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
        )
