"""CUDA graphs for decode steps.

A decode step of a small batch launches hundreds of small kernels (on 15B: 32 layers x ~10 ops), and on an
H100 the launch overhead alone rivals the weight-streaming time. So decode steps (one new token per sequence)
are captured once per batch size and replayed: the step's inputs are copied into static buffers, the batch is
padded up to the next captured size, and the graph runs every kernel with no Python in between.

Padding rows are inert: token 0 at position 0, slot_mapping -1 (the KV write skips negative slots), a
one-token sequence whose block table points at block 0 (read but never written), and their outputs dropped.

Only a model on the Triton backend is captured (ModelRunner's choice): the torch references sync with the host,
which a capturing stream refuses.

`capture=False` runs exactly the same static-buffer code eagerly; the CPU tests use it to check the padding and
buffer logic, which is everything here but the capture call itself.
"""
from __future__ import annotations

import logging

import torch

from model.attention_metadata import AttentionMetadata

logger = logging.getLogger(__name__)

CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], max_batch_size: int,
                 max_blocks_per_seq: int, max_model_len: int, device: torch.device, capture: bool = True):
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = [b for b in CAPTURE_SIZES if b <= max_batch_size] or [1]
        self.max_model_len = max_model_len
        self.capture = capture
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)            # [N]
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)            # [N]
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)   # [N]
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)              # [N]
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)  # [N + 1]
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)  # [N, MB]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _metadata(self, size: int) -> AttentionMetadata:
        # max_seq_len is the bound the kernels are specialised for at capture, not this step's longest sequence.
        return AttentionMetadata(slot_mapping=self.slot_mapping[:size], query_start_loc=self.query_start_loc[:size + 1],
                                 seq_lens=self.seq_lens[:size], block_tables=self.block_tables[:size],
                                 max_query_len=1, max_seq_len=self.max_model_len)

    def _forward(self, size: int) -> torch.Tensor:
        return self.model(self.input_ids[:size], self.positions[:size], self.kv_caches, self._metadata(size))

    @torch.inference_mode()
    def capture_all(self) -> None:
        if not self.capture:
            return
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            self._forward(size)            # warm-up: Triton compiles and allocators settle outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(size)
            self.graphs[size] = graph
        torch.cuda.synchronize()
        logger.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def can_run(self, metadata: AttentionMetadata) -> bool:
        return (metadata.max_query_len == 1 and metadata.num_tokens == metadata.num_seqs
                and metadata.num_seqs <= self.sizes[-1]
                and metadata.block_tables.shape[1] <= self.block_tables.shape[1])

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """A decode step through the graph of the smallest captured size >= B; returns hidden [B, H]."""
        batch = metadata.num_seqs
        size = next(s for s in self.sizes if s >= batch)
        width = metadata.block_tables.shape[1]
        self.input_ids[:batch].copy_(input_ids)
        self.positions[:batch].copy_(positions)
        self.slot_mapping[:batch].copy_(metadata.slot_mapping)
        self.seq_lens[:batch].copy_(metadata.seq_lens)
        self.block_tables[:batch, :width].copy_(metadata.block_tables)
        # Reset the padding rows (a previous, larger batch may have left real entries there).
        self.input_ids[batch:size].zero_()
        self.positions[batch:size].zero_()
        self.slot_mapping[batch:size].fill_(-1)
        self.seq_lens[batch:size].fill_(1)
        self.block_tables[batch:size].zero_()
        if self.capture:
            self.graphs[size].replay()
            hidden = self.outputs[size]
        else:
            hidden = self._forward(size)
        return hidden[:batch]                                                        # [B, H]
