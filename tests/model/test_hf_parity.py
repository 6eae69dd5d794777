"""NemotronForCausalLM on a flat batch through the paged cache (block size 4, shuffled blocks) against
transformers.NemotronForCausalLM run one sequence at a time, fp32, on random tiny configs."""
from __future__ import annotations

import pytest
import torch

from model.config import PRESETS, ModelConfig
from tests.utils import PagedSession, hf_model, our_model_from_hf

ATOL = 1e-4


def _config(**shape) -> ModelConfig:
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                max_position_embeddings=128, torch_dtype="float32")
    return ModelConfig(**{**base, **shape})


CONFIGS = {
    "mha": _config(num_attention_heads=4, num_key_value_heads=4, head_dim=16),
    "gqa-4to1": _config(hidden_size=48, num_attention_heads=8, num_key_value_heads=2, head_dim=16),
    "one-kv-head": _config(num_attention_heads=4, num_key_value_heads=1, head_dim=16),
    # 12 query heads per KV head and head_dim 24 (rotary_dim 12): the 340B per-rank layout.
    "340b-layout": PRESETS["tiny-340b-layout"].with_(vocab_size=256, max_position_embeddings=128),
    # A quarter of each head rotated, with a small theta so the rotation matters over a few positions.
    "rotary-quarter": _config(num_attention_heads=4, num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.25,
                              rope_theta=50.0),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def models(request):
    config = CONFIGS[request.param]
    hf = hf_model(config, seed=sorted(CONFIGS).index(request.param))
    return hf, our_model_from_hf(hf, config)


def _tokens(lengths, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def _hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    return hf(torch.tensor([tokens])).logits[0].float()  # [S, vocab]


def test_flat_batch_matches_hf_per_sequence(models):
    hf, ours = models
    seqs = _tokens([1, 5, 9, 13, 4], ours.config.vocab_size, seed=0)
    logits = PagedSession(ours).step(list(enumerate(seqs)))
    for tokens, got in zip(seqs, logits):
        torch.testing.assert_close(got, _hf_logits(hf, tokens), atol=ATOL, rtol=0)


def test_chunked_prefill_equals_processing_at_once(models):
    """Sequence 0 in two chunks (6 then 5 tokens: the second attends to the first through the cache), sharing the
    second step with a new prompt and a decode token of a third sequence."""
    hf, ours = models
    long, other, short = _tokens([11, 7, 3], ours.config.vocab_size, seed=1)
    session = PagedSession(ours, seed=1)
    first = session.step([(0, long[:6]), (2, short[:2])])
    second = session.step([(1, other), (0, long[6:]), (2, short[2:])])
    at_once = PagedSession(ours, seed=2).step([(0, long)])[0]
    chunked = torch.cat([first[0], second[1]])
    torch.testing.assert_close(chunked, at_once, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked, _hf_logits(hf, long), atol=ATOL, rtol=0)
    torch.testing.assert_close(second[0], _hf_logits(hf, other), atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.cat([first[1], second[2]]), _hf_logits(hf, short), atol=ATOL, rtol=0)


def test_decode_steps_match_hf(models):
    """Prefill three prompts, then five steps of one greedy token per sequence."""
    hf, ours = models
    seqs = _tokens([3, 7, 4], ours.config.vocab_size, seed=2)
    session = PagedSession(ours, seed=3)
    logits = session.step(list(enumerate(seqs)))
    decoded = [[] for _ in seqs]  # per sequence: logits row of every decode step
    for _ in range(5):
        for i, seq in enumerate(seqs):
            seq.append(int(logits[i][-1].argmax()))
        logits = session.step([(i, seq[-1:]) for i, seq in enumerate(seqs)])
        for i, row in enumerate(logits):
            assert row.shape == (1, ours.config.vocab_size)
            decoded[i].append(row[0])
    for seq, rows in zip(seqs, decoded):
        torch.testing.assert_close(torch.stack(rows), _hf_logits(hf, seq)[-5:], atol=ATOL, rtol=0)


def test_default_init_gives_peaked_logits():
    """tests.utils.DEFAULT_INIT_STD is chosen so that greedy decoding rarely meets a near-tie."""
    hf = hf_model(PRESETS["tiny"], seed=0)
    ids = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        top2 = hf(ids).logits.topk(2, dim=-1).values  # [8, 32, 2]
    gap = top2[..., 0] - top2[..., 1]
    assert (gap < 1e-2).float().mean() < 0.05
