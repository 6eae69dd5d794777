"""Packing and batching: labels never cross a document boundary, positions restart, padding is inert, widths suit
FP8 GEMMs, and the micro-batch order is a pure function of (seed, index)."""
from __future__ import annotations

import torch

from n4_train import data as D
from n4_train.tokenization import Encoded


def test_pack_keeps_documents_apart():
    pieces = [Encoded([10, 11, 12], [True] * 3), Encoded([20, 21], [True, True]),
              Encoded([30, 31, 32, 33], [False, False, True, True])]
    rows = D.pack(pieces, seq_len=6)
    assert len(rows) == 2  # 3 + 2 fit the first row; 4 more do not
    assert rows.input_ids[0].tolist() == [10, 11, 12, 20, 21, 0]
    # Token i predicts i + 1 of its own document; a document's last token and padding predict nothing.
    assert rows.labels[0].tolist() == [11, 12, D.IGNORE, 21, D.IGNORE, D.IGNORE]
    assert rows.position_ids[0].tolist() == [0, 1, 2, 0, 1, 0]
    assert rows.segment_ids[0].tolist() == [1, 1, 1, 2, 2, 0]
    # Untrained targets (e.g. a prompt in SFT) are IGNORE; trained ones are kept.
    assert rows.labels[1].tolist() == [D.IGNORE, 32, 33, D.IGNORE, D.IGNORE, D.IGNORE]
    assert rows.trained_tokens == 5


def test_padded_widths_are_multiples_of_16():
    ids, labels = D.pack_padded([Encoded(list(range(1, 18)), [True] * 17), Encoded([1, 2], [True, True])])
    assert ids.shape == labels.shape == (2, 32)
    assert labels[1].tolist()[:2] == [2, D.IGNORE] and (labels[1, 2:] == D.IGNORE).all()


def test_batches_are_a_pure_function_of_the_index():
    rows = D.pack([Encoded([i, i + 1], [True, True]) for i in range(0, 40, 2)], seq_len=2)
    a, b = D.Batches(rows, batch_size=4, seed=3), D.Batches(rows, batch_size=4, seed=3)
    assert a.per_epoch == 5
    for k in (0, 4, 5, 12):
        assert torch.equal(a[k]["input_ids"], b[k]["input_ids"])
    epoch0 = torch.cat([a[k]["input_ids"] for k in range(5)])
    assert sorted(epoch0[:, 0].tolist()) == list(range(0, 40, 2))  # an epoch visits every row once
    assert not torch.equal(a[0]["input_ids"], a[5]["input_ids"])   # and the next epoch is reshuffled
