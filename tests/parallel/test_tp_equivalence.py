"""TP = 2, 4 and 8 against TP = 1 on the 340B head layout, with real worker processes over gloo: the same greedy
tokens for three concurrent requests and prompt log-probs within 1e-4 (fp32; the all-reduce changes only the
order of a sum, ~1e-6 here)."""
from __future__ import annotations

import pytest

from model import distributed
from tests.parallel.conftest import run_engine

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tp_checkpoint):
    return run_engine(tp_checkpoint, 1)


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_tp_matches_tp1(tp_checkpoint, reference, tp):
    ref_tokens, ref_logprobs, _ = reference
    tokens, logprobs, per_rank = run_engine(tp_checkpoint, tp)
    assert tokens == ref_tokens
    for key in ref_logprobs:
        assert len(logprobs[key]) == len(ref_logprobs[key])
        assert max(abs(a - b) for a, b in zip(logprobs[key], ref_logprobs[key])) < 1e-4
    assert sorted(per_rank) == list(range(tp))
    assert distributed.tp_world_size() == 1  # the engine's close() left this process at one rank
