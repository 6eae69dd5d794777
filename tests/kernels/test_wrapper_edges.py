"""Edge inputs of the public kernel wrappers: each is either computed as its `_ref` computes it (same tolerances as
the per-kernel test files) or refused with a ValueError that names the wrapper.

Strided index tensors are built as one column of a [n, 2] tensor whose two columns hold the same values: a kernel
that ignores the stride then reads valid entries of the wrong rows (a wrong result, never an out-of-bounds access),
so the tests fail cleanly instead of corrupting memory.
"""
from __future__ import annotations

import pytest
import torch

from kernels.decode_attention import paged_decode_attention, paged_decode_attention_ref
from kernels.fp8_gemm import FP8_DTYPE, fp8_gemm, fp8_gemm_ref
from kernels.mlp import squared_relu_mlp, squared_relu_mlp_fp8, squared_relu_mlp_fp8_ref, squared_relu_mlp_ref
from kernels.paged_attention import paged_attention_ref, paged_prefill_attention
from kernels.rope_kv_cache import rope_kv_write, rope_kv_write_ref


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as t ([n]) in a view with stride 2."""
    view = torch.stack([t, t], dim=1)[:, 0]
    assert view.stride() == (2,) and torch.equal(view, t)
    return view


def _paged_cache(seq_lens, num_kv_heads, head_dim, block_size, seed=0):
    """A fp32 cache with random K/V in each sequence's slots, NaN elsewhere; block ids shuffled. -> (k, v, tables)."""
    g = torch.Generator().manual_seed(seed)
    per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(per_seq) + 1
    order = torch.randperm(num_blocks, generator=g)
    tables = torch.full((len(seq_lens), max(per_seq)), int(order[-1]), dtype=torch.int32)   # [B, MB]
    k = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"))          # [NB, BS, Hkv, D]
    v = k.clone()
    used = 0
    for b, (n, count) in enumerate(zip(seq_lens, per_seq)):
        tables[b, :count] = order[used:used + count].to(torch.int32)
        used += count
        for i in range(n):
            blk, off = int(tables[b, i // block_size]), i % block_size
            k[blk, off] = torch.randn(num_kv_heads, head_dim, generator=g)
            v[blk, off] = torch.randn(num_kv_heads, head_dim, generator=g)
    return k, v, tables


# ----------------------------------------------------------------------------------------------- rope_kv_write

def test_rope_kv_write_reads_strided_positions_and_slot_mapping():
    g = torch.Generator().manual_seed(0)
    T, Hq, Hkv, D, half, P = 5, 2, 1, 32, 8, 40
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (Hq, Hkv, Hkv))
    freqs = torch.outer(torch.arange(P).float(), 1.0 / 10000 ** (torch.arange(half).float() / half))  # [P, R/2]
    cos, sin = freqs.cos(), freqs.sin()
    positions = torch.tensor([3, 17, 4, 39, 0])
    slots = torch.tensor([6, -1, 0, 13, 9])
    caches = [torch.zeros(4, 4, Hkv, D) for _ in range(4)]                  # [NB, BS, Hkv, D] x (k, v) x 2
    q_rot = rope_kv_write(q, k, v, _strided(positions), cos, sin, caches[0], caches[1], _strided(slots))
    q_ref = rope_kv_write_ref(q, k, v, positions, cos, sin, caches[2], caches[3], slots)
    assert torch.equal(q_rot, q_ref)                                         # fp32: exact (test_rope_kv_cache.py)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


# ----------------------------------------------------------------------------------------------- attention

def test_decode_attention_reads_strided_seq_lens():
    seq_lens = [5, 37, 1]
    k, v, tables = _paged_cache(seq_lens, 1, 32, 16)
    q = torch.randn(len(seq_lens), 2, 32, generator=torch.Generator().manual_seed(1))
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    out = paged_decode_attention(q, k, v, _strided(lens), tables, 37, 0.2)
    ref = paged_decode_attention_ref(q, k, v, lens, tables, 37, 0.2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)               # fp32 (test_decode_attention.py)


def test_prefill_attention_reads_strided_query_start_loc_and_seq_lens():
    seqs = [(2, 3), (0, 4), (20, 2)]                                         # (cached, new) per sequence
    seq_lens = [c + n for c, n in seqs]
    k, v, tables = _paged_cache(seq_lens, 1, 32, 16)
    q = torch.randn(9, 2, 32, generator=torch.Generator().manual_seed(1))   # [T, Hq, D]
    qsl = torch.tensor([0, 3, 7, 9], dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    out = paged_prefill_attention(q, k, v, _strided(qsl), _strided(lens), tables, 4, 22, 0.2)
    ref = paged_attention_ref(q, k, v, qsl, lens, tables, 4, 22, 0.2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)               # fp32 (test_paged_prefill_attention.py)


@pytest.mark.parametrize("num_heads,head_dim", [(0, 32), (2, 0)])
def test_prefill_attention_with_no_heads_or_no_head_dim_is_empty(num_heads, head_dim):
    # Was a ZeroDivisionError (group = Hq // Hkv = 0) and a "negative shift count" from split_head_dim.
    k = torch.randn(2, 16, 1, head_dim)
    args = (torch.randn(3, num_heads, head_dim), k, k.clone(), torch.tensor([0, 3], dtype=torch.int32),
            torch.tensor([3], dtype=torch.int32), torch.tensor([[1]], dtype=torch.int32), 3, 3, 0.2)
    out, ref = paged_prefill_attention(*args), paged_attention_ref(*args)
    assert out.shape == ref.shape == (3, num_heads, head_dim) and out.dtype == ref.dtype


# ----------------------------------------------------------------------------------------------- MLP

def _fp8_mlp_operands(M=2, H=32, inter=48):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, H, generator=g).to(FP8_DTYPE)
    up = torch.randn(inter, H, generator=g).to(FP8_DTYPE)
    down = torch.randn(H, inter, generator=g).to(FP8_DTYPE)
    return [x, torch.rand(M, generator=g) + 0.5, up, torch.rand(inter, generator=g) * 0.1, down,
            torch.rand(H, generator=g) * 0.1]


@pytest.mark.parametrize("which", ["up_w", "down_w"])
def test_bf16_mlp_refuses_a_weight_on_another_device(which):
    g = torch.Generator().manual_seed(0)
    x, up, down = torch.randn(2, 32, generator=g), torch.randn(48, 32, generator=g), torch.randn(32, 48, generator=g)
    up, down = (up.to("meta"), down) if which == "up_w" else (up, down.to("meta"))
    for fn in (squared_relu_mlp, squared_relu_mlp_ref):
        with pytest.raises(ValueError, match=f"{fn.__name__}: {which} is on meta"):
            fn(x, up, down)


@pytest.mark.parametrize("index,which", [(1, "x_scale"), (2, "up_w_fp8"), (3, "up_scale"), (4, "down_w"),
                                         (5, "down_scale")])
def test_fp8_mlp_refuses_an_operand_on_another_device(index, which):
    ops = _fp8_mlp_operands()
    ops[index] = ops[index].to("meta")
    for fn in (squared_relu_mlp_fp8, squared_relu_mlp_fp8_ref):
        with pytest.raises(ValueError, match=f"{fn.__name__}: {which} is on meta"):
            fn(*ops)


def test_fp8_mlp_names_itself_for_an_integer_down_scale():
    ops = _fp8_mlp_operands()
    ops[5] = torch.ones(32, dtype=torch.int32)
    for fn in (squared_relu_mlp_fp8, squared_relu_mlp_fp8_ref):
        with pytest.raises(ValueError, match=f"{fn.__name__}: down_scale must be a floating-point tensor"):
            fn(*ops)


# ----------------------------------------------------------------------------------------------- fp8_gemm

def _gemm_layouts():
    """(name, a, b, a_scale, b_scale): strided operands and stride-0 (expanded) or transposed scales."""
    g = torch.Generator().manual_seed(0)
    M, N, K = 5, 24, 200

    def fp8(*shape):
        return torch.randn(*shape, generator=g).to(FP8_DTYPE)

    a, b = fp8(M, K), fp8(N, K)
    a_tok, b_ch = torch.rand(M, generator=g) + 0.5, torch.rand(N, generator=g) + 0.5
    return [
        ("a transposed", fp8(K, M).T, b, a_tok, b_ch),
        ("b transposed", a, fp8(K, N).T, a_tok, b_ch),
        ("row strides", fp8(M, K + 8)[:, 3:3 + K], fp8(N, K + 16)[:, 16:], a_tok, b_ch),
        ("expanded scales", a, b, torch.tensor(0.7).expand(M), torch.tensor(1.3).expand(N, 1)),
        ("expanded group scales", a, b, torch.rand(1, 2, generator=g).expand(M, 2), b_ch),
        ("transposed group scales", a, b, torch.rand(2, M, generator=g).T, b_ch),
        ("fp16 / bf16 scales", a, b, a_tok.half(), b_ch.bfloat16()),
    ]


@pytest.mark.parametrize("case", _gemm_layouts(), ids=lambda c: c[0])
def test_fp8_gemm_layouts_match_ref(case):
    _, a, b, a_scale, b_scale = case
    out = fp8_gemm(a, b, a_scale, b_scale, torch.float32)
    ref = fp8_gemm_ref(a.contiguous(), b.contiguous(), a_scale.contiguous(), b_scale.contiguous(), torch.float32)
    mag = fp8_gemm_ref(a.float().abs().to(FP8_DTYPE), b.float().abs().to(FP8_DTYPE), a_scale.abs(), b_scale.abs(),
                       torch.float32)
    # fp32 bound of tests/kernels/test_fp8_gemm.py: rtol 1e-5, atol 1e-5 of the sum of |terms|
    assert ((out - ref).abs() <= 1e-5 * ref.abs() + 1e-5 * mag).all()
