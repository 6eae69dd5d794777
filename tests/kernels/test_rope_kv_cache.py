"""rope_kv_write (Triton, interpreted on the CPU) against rope_kv_write_ref (which the model's torch backend runs,
so the HF parity tests check the reference itself end to end).

Tolerances, and why:
- fp32 and fp16 q_rot / caches, and every FP8 cache byte: exact. The kernel does the reference's IEEE fp32
  operations in the same order (fp contraction off, `div_rn` for the scale), and the only roundings are the final
  casts: numpy's fp16 cast rounds to nearest even like torch, and FP8 values are put on the E4M3 grid before the
  interpreter's (carry-dropping) cast. Any difference is a bug, so bytes are compared exactly.
- bf16 q_rot / caches: one bf16 ulp (adjacent bit patterns). The interpreter truncates fp32 -> bf16 where torch
  rounds to nearest even; a compiled kernel rounds to nearest and should be exact.
- On a GPU (the `gpu` test) everything gets one ulp of its dtype: the reference runs on the CPU and we cannot
  rule out an FMA or a reciprocal-multiply in code we have not inspected there.
Cache slots that no token maps to must keep their sentinel bytes (padding tokens write nothing).
"""
from __future__ import annotations

import pytest
import torch

from kernels import rope_kv_cache
from kernels.rope_kv_cache import FP8_E4M3_MAX, rope_kv_write, rope_kv_write_ref
from model.layers import RotaryEmbedding

FP8 = torch.float8_e4m3fn
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
MAX_POSITION = 128
SENTINEL = 0x7F  # every byte of an unwritten cache slot (NaN in fp8/fp16, a huge finite value in bf16/fp32)

# (T, Hq, Hkv, head_dim, rotary_dim, block_size, dtype, cache dtype, k_scale, v_scale): head dims 64/128/192,
# rotary D/2 and D, GQA groups 1/6/12, block sizes 16/32, decode (T=1) and prefill-like T, and every input dtype
# with a same-dtype and an FP8 cache (non-1 scales; 0.004 saturates at ±448), plus fp32 storage of bf16 inputs.
CASES = [
    (1, 2, 2, 64, 32, 16, FP32, FP32, 1.0, 1.0),
    (17, 6, 1, 128, 64, 16, BF16, BF16, 1.0, 1.0),
    (17, 12, 1, 192, 96, 32, BF16, FP8, 0.05, 0.02),
    (17, 12, 1, 192, 192, 16, FP16, FP16, 1.0, 1.0),
    (33, 6, 1, 64, 64, 32, FP32, FP8, 0.03, 0.07),
    (17, 2, 2, 128, 128, 32, FP16, FP8, 0.004, 0.5),
    (1, 12, 1, 128, 64, 16, BF16, FP8, 0.05, 0.05),
    (5, 6, 1, 192, 96, 16, FP32, FP32, 1.0, 1.0),
    (17, 12, 2, 64, 32, 32, BF16, FP32, 1.0, 1.0),
    (9, 12, 2, 128, 64, 16, FP16, FP8, 0.01, 0.01),
]


def _ordinal(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns of a float tensor as integers ordered like the values, so adjacent values differ by 1
    (+0 and -0 both map to 0)."""
    int_dtype = {1: torch.int8, 2: torch.int16, 4: torch.int32}[t.element_size()]
    bits = t.view(int_dtype).long()
    magnitude = bits & ((1 << (8 * t.element_size() - 1)) - 1)
    return torch.where(bits < 0, -magnitude, magnitude)


def _assert_within_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: int) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    diff = (_ordinal(actual) - _ordinal(expected)).abs()
    worst = int(diff.max()) if diff.numel() else 0
    assert worst <= ulps, f"{int((diff > ulps).sum())} elements more than {ulps} ulp(s) apart (worst {worst})"


def _ulps_allowed(dtype: torch.dtype) -> int:
    return 1 if dtype == BF16 else 0  # bf16: the interpreter truncates (module docstring)


def _inputs(num_tokens, num_heads, num_kv_heads, head_dim, rotary_dim, block_size, dtype, cache_dtype, seed=0):
    """Strided q/k/v split from one fused qkv (as the model has them), with magnitudes spread over 2^-10..2^3 so
    that FP8 sees subnormals, carries and saturation; shuffled slots with one padding token when T > 1."""
    g = torch.Generator().manual_seed(seed)
    width = (num_heads + 2 * num_kv_heads) * head_dim
    magnitude = 2.0 ** torch.randint(-10, 3, (num_tokens, width), generator=g)
    qkv = (torch.randn(num_tokens, width, generator=g) * magnitude).to(dtype)  # [T, (Hq + 2 Hkv) * D]
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = q.view(num_tokens, num_heads, head_dim)
    k = k.view(num_tokens, num_kv_heads, head_dim)
    v = v.view(num_tokens, num_kv_heads, head_dim)
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), generator=g)
    num_blocks = num_tokens // block_size + 2
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    if num_tokens > 1:
        slots[num_tokens // 2] = -1
    kv_cache = torch.empty(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=cache_dtype)
    kv_cache.view(torch.uint8).fill_(SENTINEL)
    rotary = RotaryEmbedding(rotary_dim, MAX_POSITION, 10000.0)
    return q, k, v, positions, rotary.cos_cache, rotary.sin_cache, kv_cache, slots


def _run(fn, q, k, v, positions, cos, sin, kv_cache, slots, k_scale, v_scale):
    kv_cache = kv_cache.clone()
    q_rot = fn(q, k, v, positions, cos, sin, kv_cache[0], kv_cache[1], slots, k_scale, v_scale)
    return q_rot, kv_cache


@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-H{}x{}-D{}-R{}-BS{}-{}-{}".format(
    *c[:6], str(c[6])[6:], str(c[7])[6:]))
def test_kernel_matches_reference(case):
    *shape, dtype, cache_dtype, k_scale, v_scale = case
    q, k, v, positions, cos, sin, kv_cache, slots = _inputs(*shape, dtype, cache_dtype)
    q_ref, cache_ref = _run(rope_kv_write_ref, q, k, v, positions, cos, sin, kv_cache, slots, k_scale, v_scale)
    q_out, cache_out = _run(rope_kv_write, q, k, v, positions, cos, sin, kv_cache, slots, k_scale, v_scale)

    assert q_out.is_contiguous() and q_out.dtype == dtype
    _assert_within_ulps(q_out, q_ref, _ulps_allowed(dtype))
    _assert_within_ulps(cache_out, cache_ref, 0 if cache_dtype == FP8 else _ulps_allowed(cache_dtype))
    written = torch.zeros(cache_out.shape[1] * cache_out.shape[2], dtype=torch.bool)
    written[slots[slots >= 0]] = True
    untouched = cache_out.flatten(1, 2)[:, ~written]  # [2, unwritten slots, Hkv, D]
    assert (untouched.contiguous().view(torch.uint8) == SENTINEL).all()
    if cache_dtype == FP8 and k_scale < 0.01:  # the saturating case really saturates
        assert (cache_ref[0].float().abs() == FP8_E4M3_MAX).any()


@pytest.mark.parametrize("tile_elems,target_programs", [(128, 40), (256, 1)])
def test_head_blocks_and_program_splits(monkeypatch, tile_elems, target_programs):
    """Small tiles make several q and k/v head blocks; the target program count makes some programs loop over
    several blocks (stride = number of splits) and others get no k/v block at all."""
    monkeypatch.setattr(rope_kv_cache, "_TILE_ELEMS", tile_elems)
    monkeypatch.setattr(rope_kv_cache, "_TARGET_PROGRAMS", target_programs)
    q, k, v, positions, cos, sin, kv_cache, slots = _inputs(9, 12, 2, 128, 64, 16, FP16, FP8, seed=5)
    q_ref, cache_ref = _run(rope_kv_write_ref, q, k, v, positions, cos, sin, kv_cache, slots, 0.02, 0.03)
    q_out, cache_out = _run(rope_kv_write, q, k, v, positions, cos, sin, kv_cache, slots, 0.02, 0.03)
    assert torch.equal(q_out, q_ref)
    assert torch.equal(cache_out.view(torch.uint8), cache_ref.view(torch.uint8))


def test_fp8_rounding_edges_are_exact():
    """Every E4M3 value, every midpoint between neighbours (ties to even), values past 448 and ±0, through the V
    path with a power-of-two scale so that x / scale is exact: the stored bytes must equal torch's."""
    codes = torch.arange(0x7F, dtype=torch.uint8)                     # +0 .. 448 (0x7F is NaN)
    values = codes.view(FP8).float()                                  # [127] ascending
    midpoints = (values[:-1] + values[1:]) / 2                        # [126]
    specials = torch.tensor([0.0, 449.0, 464.0, 480.0, 1e4, 2.0 ** -10, 3 * 2.0 ** -11])
    edges = torch.cat([values, midpoints, specials])
    edges = torch.cat([edges, -edges])                                # includes -0.0
    head_dim = 64
    num_tokens = -(-edges.numel() // head_dim)
    v_scale = 0.125
    v = torch.zeros(num_tokens * head_dim)
    v[:edges.numel()] = edges * v_scale
    v = v.view(num_tokens, 1, head_dim)
    q, k, _, positions, cos, sin, kv_cache, _ = _inputs(num_tokens, 1, 1, head_dim, head_dim // 2, 16, FP32, FP8)
    slots = torch.arange(num_tokens)
    _, cache_ref = _run(rope_kv_write_ref, q, k, v, positions, cos, sin, kv_cache, slots, 1.0, v_scale)
    _, cache_out = _run(rope_kv_write, q, k, v, positions, cos, sin, kv_cache, slots, 1.0, v_scale)
    assert torch.equal(cache_out[1].view(torch.uint8), cache_ref[1].view(torch.uint8))
    assert torch.equal(cache_out[0].view(torch.uint8), cache_ref[0].view(torch.uint8))


def test_padding_only_and_empty_batches():
    q, k, v, positions, cos, sin, kv_cache, slots = _inputs(3, 6, 1, 64, 32, 16, FP32, FP8)
    slots = torch.full((3,), -1)
    q_out, cache_out = _run(rope_kv_write, q, k, v, positions, cos, sin, kv_cache, slots, 0.1, 0.1)
    torch.testing.assert_close(q_out, rope_kv_write_ref(q, k, v, positions, cos, sin, *kv_cache.clone(), slots),
                               rtol=0, atol=0)
    assert (cache_out.view(torch.uint8) == SENTINEL).all()
    q_empty = rope_kv_write(q[:0], k[:0], v[:0], positions[:0], cos, sin, *kv_cache.clone(), slots[:0])
    assert q_empty.shape == (0, 6, 64)


def test_rejects_mismatched_inputs():
    q, k, v, positions, cos, sin, kv_cache, slots = _inputs(4, 6, 1, 64, 32, 16, FP32, FP32)
    bad = [
        (q, k[:, :, :32], v, positions, cos, sin, kv_cache[0], kv_cache[1], slots),  # head_dim mismatch
        (q, k, v, positions[:2], cos, sin, kv_cache[0], kv_cache[1], slots),         # positions length
        (q, k, v, positions, cos.double(), sin, kv_cache[0], kv_cache[1], slots),    # fp64 tables
        (q, k.half(), v, positions, cos, sin, kv_cache[0], kv_cache[1], slots),      # mixed dtypes
    ]
    for fn in (rope_kv_write_ref, rope_kv_write):
        for args in bad:
            with pytest.raises(ValueError):
                fn(*args)


# Realistic shapes per rank: 15B at TP=1 (48/8 heads, D=128), 340B at TP=1 (96/8, D=192) and TP=8 (12/1, D=192).
GPU_CASES = [
    (4096, 48, 8, 128, 64, 16, BF16, FP8, 0.05, 0.02),
    (4096, 48, 8, 128, 64, 16, BF16, BF16, 1.0, 1.0),
    (2048, 96, 8, 192, 96, 16, BF16, FP8, 0.05, 0.02),
    (256, 12, 1, 192, 96, 32, BF16, BF16, 1.0, 1.0),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES)
def test_kernel_matches_reference_on_gpu(case):
    *shape, dtype, cache_dtype, k_scale, v_scale = case
    q, k, v, positions, cos, sin, kv_cache, slots = _inputs(*shape, dtype, cache_dtype, seed=3)
    q_ref, cache_ref = _run(rope_kv_write_ref, q, k, v, positions, cos, sin, kv_cache, slots, k_scale, v_scale)
    dev = [t.cuda() for t in (q, k, v, positions, cos, sin, kv_cache, slots)]
    q_out, cache_out = _run(rope_kv_write, *dev, k_scale, v_scale)
    _assert_within_ulps(q_out.cpu(), q_ref, 1)
    _assert_within_ulps(cache_out.cpu(), cache_ref, 1)
