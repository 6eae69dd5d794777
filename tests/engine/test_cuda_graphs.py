"""The decode-graph machinery without a GPU: `DecodeGraphs(capture=False)` runs the exact static-buffer path
(copy in, pad to the captured size with inert rows, slice out) eagerly, so padding rows must change nothing and
leave no trace in the KV cache."""
from __future__ import annotations

import torch

from model.attention_metadata import AttentionMetadata
from model.config import ModelConfig
from model.loader import load_model
from server.engine.cuda_graphs import DecodeGraphs
from tests.utils import make_tiny_checkpoint

CONFIG = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                     torch_dtype="float32")


def test_padded_static_decode_matches_direct_call(tmp_path):
    model, config = load_model(make_tiny_checkpoint(str(tmp_path), CONFIG, seed=1), dtype="float32")
    block_size, num_blocks = 4, 32
    caches = [torch.zeros(2, num_blocks, block_size, 2, 8) for _ in range(2)]
    g = torch.Generator().manual_seed(0)
    caches[0].normal_(generator=g)
    caches[1].normal_(generator=g)
    # Five sequences decoding one token each, with contexts of various lengths in disjoint blocks.
    seq_lens = [1, 5, 9, 4, 13]
    tables = [[0], [1, 2], [3, 4, 5], [6], [7, 8, 9, 10]]
    metadata = AttentionMetadata.build([1] * 5, seq_lens, tables, block_size)
    input_ids = torch.tensor([3, 14, 15, 92, 65])
    positions = torch.tensor([n - 1 for n in seq_lens])

    before = [c.clone() for c in caches]
    direct_caches = [c.clone() for c in caches]
    expected = model(input_ids, positions, direct_caches, metadata)                 # [5, hidden]

    graphs = DecodeGraphs(model, caches, max_batch_size=16, max_blocks_per_seq=8, max_model_len=32,
                          device=torch.device("cpu"), capture=False)
    assert graphs.can_run(metadata)
    # A larger batch first leaves stale rows in the static buffers; the 5-row step must not see them.
    graphs.input_ids.fill_(7)
    graphs.seq_lens.fill_(9)
    got = graphs.run(input_ids, positions, metadata)                               # padded to 8 rows
    # Padding to max_model_len changes the reference attention's reduction length: float noise only.
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    written[metadata.slot_mapping] = True
    for mine, theirs, old in zip(caches, direct_caches, before):
        flat, flat_theirs, flat_old = (t.flatten(1, 2) for t in (mine, theirs, old))  # [2, slots, Hkv, D]
        torch.testing.assert_close(flat[:, written], flat_theirs[:, written], atol=1e-5, rtol=0)
        assert torch.equal(flat[:, ~written], flat_old[:, ~written])   # padding rows wrote nothing (slot -1)


def test_prefill_batches_are_not_graphed():
    graphs = DecodeGraphs(torch.nn.Identity(), [], max_batch_size=8, max_blocks_per_seq=4, max_model_len=64,
                          device=torch.device("cpu"), capture=False)
    prefill = AttentionMetadata.build([3, 1], [3, 5], [[0], [1, 2]], 4)
    assert not graphs.can_run(prefill)
    too_many = AttentionMetadata.build([1] * 9, [2] * 9, [[i] for i in range(9)], 4)
    assert not graphs.can_run(too_many)
    assert graphs.sizes == [1, 2, 4, 8]
