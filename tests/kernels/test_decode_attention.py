"""paged_decode_attention (Triton flash-decoding) against paged_decode_attention_ref, and the ref against the general
paged_attention_ref. Without CUDA the kernel runs in the Triton interpreter, so shapes stay small.

Tolerances (|out - ref| <= atol + rtol * |ref|; |out| reaches ~3.7 here, since V ~ N(0, 1) and a one-token context
returns its V row). Worst errors measured over CASES x 3 seeds x splits {1, 3, auto} are given in brackets.
- fp32 q: 1e-5 / 1e-5 [6.6e-7]. Kernel and ref both compute in fp32 (the kernel's dots use input_precision="ieee");
  they differ only in summation order and exp2 vs exp.
- fp16 q: 2e-3 / 2e-3 [9.8e-4, half an fp16 ulp at |out| in [2, 4)]. The output is rounded to fp16 (2^-11
  relative) and the kernel feeds the probabilities to the P @ V dot in fp16 (2^-11 relative each, so at most
  ~2^-11 * max|v| ~ 2e-3 absolute, far less on average).
- bf16 q: 1e-2 / 1.6e-2 [7.8e-3, half a bf16 ulp at |out| in [2, 4)]. The same two roundings with bf16's 8-bit
  significand: rtol covers the output rounding (2^-8 relative) four times over, atol the probabilities' rounding.
- FP8 cache: the tolerance of q's dtype. E4M3 values convert exactly to fp32/fp16/bf16 and the ref dequantizes the
  very same stored values, so FP8 adds no error of its own between kernel and ref.
Unused cache slots (tails of last blocks, spare blocks, block-table padding) hold NaN, so any read of a slot that no
valid key maps to shows up as a NaN in the output.
"""
from __future__ import annotations

import pytest
import torch

from kernels.decode_attention import (
    DecodeTiles,
    _auto_num_splits,
    _decode_launch,
    _v_words_ready,
    paged_decode_attention,
    paged_decode_attention_ref,
)
from kernels.paged_attention import paged_attention_ref

FP8 = torch.float8_e4m3fn
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1.6e-2)}
# Ragged decode batch: a one-token context, a length on a block boundary (128: also a tile and, at 3 splits and
# D <= 128, a split boundary), one mid-block, and one long enough (300) that auto picks 2 splits and forced 3 splits
# all hold tokens, while the shorter sequences leave some splits empty.
SEQ_LENS = [1, 128, 37, 300]
# (Hq, Hkv, head_dim, block_size, q dtype, cache dtype): GQA ratios 1, 6 and 12; every head_dim and block size;
# every q dtype with its own cache and with FP8. Curated, not a cartesian product, to stay fast in the interpreter.
CASES = [
    (2, 2, 64, 16, torch.float32, torch.float32),
    (2, 2, 128, 32, torch.bfloat16, torch.bfloat16),
    (2, 2, 192, 16, torch.float16, FP8),
    (6, 1, 128, 16, torch.bfloat16, FP8),
    (6, 1, 192, 32, torch.float32, FP8),
    (6, 1, 64, 32, torch.float16, torch.float16),
    (12, 1, 192, 16, torch.bfloat16, torch.bfloat16),
    (12, 1, 128, 32, torch.float16, FP8),
    (24, 2, 64, 16, torch.bfloat16, FP8),
    (24, 2, 192, 32, torch.float32, torch.float32),
]


def _case_id(case):
    heads, kv_heads, head_dim, block_size, q_dtype, cache_dtype = case
    return f"{heads}q{kv_heads}kv-d{head_dim}-bs{block_size}-{str(q_dtype)[6:]}-{str(cache_dtype)[6:]}"


def _make_batch(seq_lens, num_heads, num_kv_heads, head_dim, block_size, q_dtype=torch.float32, cache_dtype=None,
                k_scale=1.0, v_scale=1.0, device="cpu", seed=0, spare_blocks=2, extra_table_cols=1):
    """Random q and a paged cache holding random K/V (dequantized ~ N(0, 1)) in each sequence's slots and NaN in
    every other slot; block ids shuffled; block-table padding points at a spare (all-NaN) block."""
    cache_dtype = cache_dtype or q_dtype
    g = torch.Generator(device="cpu").manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    order = torch.randperm(num_blocks, generator=g)
    width = max(blocks_per_seq, default=0) + extra_table_cols
    block_tables = torch.full((len(seq_lens), width), int(order[-1]), dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks_per_seq):
        block_tables[b, :n] = order[used:used + n]
        used += n

    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k = torch.randn(shape, generator=g) / k_scale
    v = torch.randn(shape, generator=g) / v_scale
    pos = torch.arange(block_size)
    valid = torch.zeros(num_blocks, block_size, dtype=torch.bool)  # [NB, BS] slots some sequence owns
    for b, n in enumerate(seq_lens):
        for i in range(blocks_per_seq[b]):
            valid[block_tables[b, i]] = pos < n - i * block_size
    k = k.masked_fill(~valid[:, :, None, None], float("nan")).to(cache_dtype)
    v = v.masked_fill(~valid[:, :, None, None], float("nan")).to(cache_dtype)
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=g).to(q_dtype)
    return dict(q=q.to(device), k_cache=k.to(device), v_cache=v.to(device),
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
                block_tables=block_tables.to(device), max_seq_len=max(seq_lens, default=0),
                scale=head_dim ** -0.5, k_scale=k_scale, v_scale=v_scale)


def _assert_matches_ref(batch, num_splits):
    out = paged_decode_attention(**batch, num_splits=num_splits)
    expected = paged_decode_attention_ref(**batch)
    q = batch["q"]
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(expected).all() and torch.isfinite(out).all()
    atol, rtol = TOLERANCES[q.dtype]
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("num_splits", [1, 3, None])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_matches_ref(case, num_splits):
    heads, kv_heads, head_dim, block_size, q_dtype, cache_dtype = case
    scales = dict(k_scale=0.5, v_scale=0.25) if cache_dtype == FP8 else {}
    batch = _make_batch(SEQ_LENS, heads, kv_heads, head_dim, block_size, q_dtype, cache_dtype, **scales)
    _assert_matches_ref(batch, num_splits)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_fp8_cache_query_beyond_fp16_range_saturates(num_splits):
    """FP8 cache, bf16 q: the dots run in fp16, and a q entry past fp16's 65504 is held there instead of becoming
    inf (NaN scores). It dominates its scores in the reference and the kernel alike, so the outputs agree."""
    batch = _make_batch(SEQ_LENS, 8, 2, 128, 16, torch.bfloat16, FP8, k_scale=0.5, v_scale=0.25, seed=5)
    batch["q"][:, :, 0] = 1.0e5          # bf16 holds it; fp16 does not
    _assert_matches_ref(batch, num_splits)


@pytest.mark.parametrize("num_splits", [1, 5, None])
@pytest.mark.parametrize("seq_lens", [[1], [1, 1, 1], [2, 1, 17]])
def test_one_token_contexts_and_empty_splits(seq_lens, num_splits):
    """Contexts of one token, and more splits than a sequence has cache blocks: empty splits contribute nothing."""
    batch = _make_batch(seq_lens, 8, 2, 64, 16, torch.bfloat16, seed=3)
    _assert_matches_ref(batch, num_splits)


def test_noncontiguous_query():
    """q as the decode layer sees it: a strided view into a fused QKV projection output."""
    batch = _make_batch([5, 70], 12, 2, 64, 16, torch.float16, FP8, k_scale=2.0, v_scale=0.5, seed=4)
    qkv = torch.randn(2, (12 + 2 * 2) * 64).half()
    qkv[:, :12 * 64] = batch["q"].reshape(2, -1)
    batch["q"] = qkv[:, :12 * 64].view(2, 12, 64)  # [B, Hq, D], row stride (16 * 64)
    assert not batch["q"].is_contiguous()
    _assert_matches_ref(batch, 3)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_ref_matches_general_paged_attention_ref(cache_dtype):
    """The decode ref is paged_attention_ref with one query token per sequence (query_start_loc = arange(B+1))."""
    batch = _make_batch([1, 17, 64, 45], 12, 2, 32, 16, cache_dtype, seed=5)
    num_seqs = batch["q"].shape[0]
    general = paged_attention_ref(batch["q"], batch["k_cache"], batch["v_cache"],
                                  query_start_loc=torch.arange(num_seqs + 1, dtype=torch.int32),
                                  seq_lens=batch["seq_lens"], block_tables=batch["block_tables"],
                                  max_query_len=1, max_seq_len=batch["max_seq_len"], scale=batch["scale"])
    torch.testing.assert_close(paged_decode_attention_ref(**batch), general, atol=1e-6, rtol=1e-6)


def test_fp8_ref_dequantizes_stored_values():
    """k_scale/v_scale multiply the stored FP8 values: the same as the ref on a dequantized fp32 copy."""
    batch = _make_batch([9, 33], 6, 1, 64, 16, torch.float32, FP8, k_scale=0.5, v_scale=0.125, seed=6)
    dequant = dict(batch, k_cache=batch["k_cache"].float() * 0.5, v_cache=batch["v_cache"].float() * 0.125,
                   k_scale=1.0, v_scale=1.0)
    torch.testing.assert_close(paged_decode_attention_ref(**batch), paged_decode_attention_ref(**dequant))


def test_zero_length_padding_rows_give_zeros():
    batch = _make_batch([3, 1], 4, 2, 64, 16, torch.float32, seed=7)
    batch["seq_lens"] = torch.tensor([3, 0], dtype=torch.int32)
    for num_splits in (1, 2):
        out = paged_decode_attention(**batch, num_splits=num_splits)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        torch.testing.assert_close(out, paged_decode_attention_ref(**batch), atol=1e-5, rtol=1e-5)


def test_empty_batch():
    batch = _make_batch([4], 4, 2, 64, 16)
    batch.update(q=batch["q"][:0], seq_lens=batch["seq_lens"][:0], block_tables=batch["block_tables"][:0])
    out = paged_decode_attention(**batch)
    assert out.shape == (0, 4, 64)
    assert paged_decode_attention_ref(**batch).shape == (0, 4, 64)


@pytest.mark.parametrize("split_head", [None, False])
@pytest.mark.parametrize("v_words", [None, False])
@pytest.mark.parametrize("head_dim, q_dtype, cache_dtype", [(192, torch.bfloat16, FP8), (64, torch.float16, FP8),
                                                            (96, torch.float16, FP8), (192, torch.bfloat16, None)])
def test_launch_variants_match_ref(head_dim, q_dtype, cache_dtype, v_words, split_head):
    """The sweep's alternatives to the defaults: an FP8 V cache read per byte instead of as int32 words converted in
    registers (v_words=False), and the head in one power-of-two part instead of `split_head_dim`'s two
    (split_head=False: 192 -> 256 and 96 -> 128 instead of 128 + 64 and 64 + 32). All match the ref, splits too."""
    batch = _make_batch(SEQ_LENS, 12, 2, head_dim, 16, q_dtype, cache_dtype, k_scale=0.5, v_scale=0.25, seed=11)
    assert _v_words_ready(batch["q"], batch["v_cache"]) == (cache_dtype == FP8)
    args = [batch[k] for k in ("q", "k_cache", "v_cache", "seq_lens", "block_tables", "max_seq_len", "scale",
                               "k_scale", "v_scale")]
    for num_splits in (1, 3):
        out = _decode_launch(*args, num_splits, DecodeTiles(32, 4, 2, v_words=v_words, split_head=split_head))
        atol, rtol = TOLERANCES[q_dtype]
        torch.testing.assert_close(out, paged_decode_attention_ref(**batch), atol=atol, rtol=rtol)


def test_v_words_only_where_whole_aligned_words_exist():
    q = torch.zeros(2, 4, 64, dtype=torch.bfloat16)
    cache = torch.zeros(8, 16, 2, 64, dtype=FP8)
    assert _v_words_ready(q, cache)
    assert _v_words_ready(q.half(), cache)
    assert not _v_words_ready(q.float(), cache)                          # fp32 dots: per-value conversion
    assert not _v_words_ready(q, cache.to(torch.bfloat16))               # not an FP8 cache
    assert not _v_words_ready(q[..., :62], torch.zeros(8, 16, 2, 62, dtype=FP8))  # 62 values a head: no whole words
    odd = torch.zeros(8, 16, 2, 65, dtype=FP8)[..., 1:]                  # head rows start 1 byte past a word
    assert odd.shape[-1] == 64 and not _v_words_ready(q, odd)
    assert not _v_words_ready(q, torch.zeros(8, 16, 2, 128, dtype=FP8)[..., ::2])  # values not adjacent


def test_auto_num_splits_rule():
    cpu = torch.device("cpu")  # 132 SMs assumed (H100 SXM / H200)
    assert _auto_num_splits(64, 8, 4096, cpu) == 1    # 15B, batch 64: 512 programs already
    assert _auto_num_splits(64, 1, 4096, cpu) == 5    # 340B TP8 rank, batch 64: ceil(264 / 64)
    assert _auto_num_splits(1, 8, 4096, cpu) == 16    # one long 15B sequence: capped by 256-token splits
    assert _auto_num_splits(2, 1, 200, cpu) == 1      # short contexts never split below 256 tokens


@pytest.mark.parametrize("batch_size, kv_heads, head_dim, stages", [
    (1, 8, 128, 3),     # 8 programs: each needs its own next tile in flight
    (48, 8, 128, 3),    # 384 programs, 2.9 an SM: the most that 3 stages keep resident
    (64, 8, 128, 2),    # 512 programs, 3.9 an SM: they cover each other's waits; 3 stages would cut occupancy
    (64, 1, 192, 3),    # the 340B-TP8 rank's default
])
def test_few_programs_take_three_stages(batch_size, kv_heads, head_dim, stages):
    from tests.kernels.launch_capture import capture_launches
    batch = _make_batch([16] * batch_size, kv_heads * 6, kv_heads, head_dim, 16, torch.bfloat16)
    with capture_launches() as cap:
        paged_decode_attention(**batch)
    (launch,) = [x for x in cap.launches if x.fn.__name__ == "_paged_decode_attention_kernel"]
    assert launch.options["num_stages"] == stages


@pytest.mark.parametrize("change, message", [
    (lambda b: b.update(q=b["q"][0]), "q must be"),
    (lambda b: b.update(v_cache=b["v_cache"][:, :, :1]), "k_cache"),
    (lambda b: b.update(q=b["q"][:, :, :32]), "head_dim"),
    (lambda b: b.update(q=b["q"][:, :3]), "multiple"),
    (lambda b: b.update(k_cache=b["k_cache"].half(), v_cache=b["v_cache"].half()), "dtypes"),
    (lambda b: b.update(q=b["q"].double()), "q dtype"),
    (lambda b: b.update(seq_lens=b["seq_lens"].long()), "seq_lens"),
    (lambda b: b.update(block_tables=b["block_tables"][:, :1]), "max_seq_len"),
    (lambda b: b.update(block_tables=b["block_tables"][:1]), "block_tables"),
    (lambda b: b.update(num_splits=0), "num_splits"),
])
def test_validation(change, message):
    batch = _make_batch([40, 3], 4, 2, 64, 16)
    change(batch)
    with pytest.raises(ValueError, match=message):
        paged_decode_attention(**batch)


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(48, 8, 128), (12, 1, 192)], ids=["15b", "340b-tp8-rank"])
def test_compiled_kernel_realistic_shapes(heads, kv_heads, head_dim, cache_dtype):
    """Batch 64 with contexts up to 4096 (ragged, one of them 4096 and one of them 1), compiled on the GPU."""
    g = torch.Generator().manual_seed(8)
    seq_lens = torch.randint(1, 4097, (64,), generator=g).tolist()
    seq_lens[:2] = [4096, 1]
    scales = dict(k_scale=0.05, v_scale=0.03) if cache_dtype == FP8 else {}
    batch = _make_batch(seq_lens, heads, kv_heads, head_dim, 16, torch.bfloat16, cache_dtype, device="cuda",
                        **scales)
    for num_splits in (None, 1, 7):
        _assert_matches_ref(batch, num_splits)
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(48, 8, 128), (12, 1, 192)], ids=["15b", "340b-tp8-rank"])
def test_compiled_small_batch_takes_the_three_stage_ring(heads, kv_heads, head_dim, cache_dtype):
    """Two long sequences: few programs, so the launch takes 3 stages (a K/V tile in flight per program), which the
    batch-64 test above does not reach at 15B. Compiled on the GPU, against the reference."""
    scales = dict(k_scale=0.05, v_scale=0.03) if cache_dtype == FP8 else {}
    batch = _make_batch([4096, 1000], heads, kv_heads, head_dim, 16, torch.bfloat16, cache_dtype, device="cuda",
                        seed=9, **scales)
    for num_splits in (None, 1):
        _assert_matches_ref(batch, num_splits)
    torch.cuda.synchronize()
