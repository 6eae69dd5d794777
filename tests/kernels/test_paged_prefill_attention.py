"""paged_prefill_attention (Triton) against paged_attention_ref, the specification.

On CPU-only machines the kernel runs in the Triton interpreter (tests/conftest.py), so shapes stay small: 1-2 KV
heads, sequences of at most a few hundred tokens, and a curated list of cases (each GQA ratio meets each head_dim
once, dtypes and block sizes in a Latin square) instead of a cartesian product.

Tolerances (assert_close: |out - ref| <= atol + rtol * |ref|), by q dtype:

- fp32: atol = rtol = 1e-5. Both sides compute in fp32; the kernel sums the softmax online, tile by tile, with exp2
  and the scale folded into one multiplier, so results differ by reassociation only (measured <= 1.7e-6 here).
- fp16: atol = rtol = 2 * eps (eps = 2^-10, so 1.95e-3); bf16: atol = rtol = 2 * eps (eps = 2^-7, so 1.56e-2).
  The kernel rounds the probabilities to q's dtype before the P @ V MMA (as every flash-attention kernel does):
  each term errs by <= eps/2 relative (worst case eps/2 * max|v| on the output, |v| < 4.5 here, but the rounding
  errors of independent terms largely cancel in the sum); each side then rounds its fp32 result to q's dtype
  (another eps/2 * |out| each). Measured: at most one ulp of the output (1.6e-2 bf16 / 2e-3 fp16 at |out| ~ 2),
  i.e. <= 0.9 * eps * (1 + |ref|), half the allowance. The GPU test uses bf16's tolerance too: the error bound does
  not grow with context length (P @ V is a convex combination).
- FP8 (e4m3) cache: the ref gets the same FP8 cache and the same k_scale / v_scale, so quantization error cancels;
  converting e4m3 to bf16/fp16/fp32 is exact, and only where the scales multiply in differs (fp32 rounding). The
  q dtype's tolerance applies unchanged.

Every cache slot that no valid key maps to holds NaN (spare blocks, the tail of a sequence's last block, padding of
the block table), and block ids are shuffled, so reading outside a sequence shows up as NaN in the output.
"""
from __future__ import annotations

import pytest
import torch

from kernels import paged_attention as pa
from kernels.triton_utils import split_head_dim
from kernels.paged_attention import paged_attention_ref, paged_prefill_attention

FP8 = torch.float8_e4m3fn
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2 * 2.0 ** -10, torch.bfloat16: 2 * 2.0 ** -7}  # atol = rtol

# (cached tokens before this step, new tokens) per sequence: one-token sequences, pure decode rows after a context,
# whole prompts, chunks after a cached prefix (a prefix-cache hit or a chunked prefill), a chunk after a long prefix,
# and a prompt longer than one query tile of every config here; lengths straddle block and tile boundaries.
SEQS = [(0, 1), (9, 1), (0, 23), (45, 12), (0, 1), (161, 19), (31, 1), (0, 130), (64, 33)]

# Each GQA ratio meets each head_dim once; dtype and block size vary so that every pair of values appears.
CASES = [  # (num_heads, num_kv_heads, head_dim, block_size, q dtype)
    (2, 2, 64, 16, torch.float32),
    (6, 1, 64, 32, torch.bfloat16),
    (12, 1, 64, 16, torch.float16),
    (1, 1, 128, 32, torch.bfloat16),
    (12, 2, 128, 16, torch.float16),
    (12, 1, 128, 32, torch.float32),
    (2, 2, 192, 16, torch.float16),
    (6, 1, 192, 32, torch.float32),
    (12, 1, 192, 16, torch.bfloat16),
]


def _make_inputs(seqs, num_heads, num_kv_heads, head_dim, block_size, dtype, cache_dtype=None, seed=0,
                 device="cpu"):
    """q, a NaN-filled cache whose used slots hold randn K/V under shuffled block ids, and the metadata kwargs.
    An FP8 cache stores K * 4 and V * 8 (as a calibrated scale would spread values over e4m3's range); the caller
    passes k_scale = 1/4, v_scale = 1/8."""
    cache_dtype = cache_dtype or dtype
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-(ctx + n) // block_size) for ctx, n in seqs]
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks, generator=g).tolist()
    width = max(blocks_per_seq)
    tables = torch.zeros(len(seqs), width, dtype=torch.int32)        # [B, MB]; padding points at block 0
    k = torch.full((num_blocks * block_size, num_kv_heads, head_dim), float("nan"))
    v = k.clone()                                                    # [NB * BS, Hkv, D] fp32 staging
    for b, ((ctx, n), count) in enumerate(zip(seqs, blocks_per_seq)):
        ids, order = order[:count], order[count:]
        tables[b, :count] = torch.tensor(ids, dtype=torch.int32)
        pos = torch.arange(ctx + n)
        slots = torch.tensor(ids)[pos // block_size] * block_size + pos % block_size
        k[slots] = torch.randn(ctx + n, num_kv_heads, head_dim, generator=g)
        v[slots] = torch.randn(ctx + n, num_kv_heads, head_dim, generator=g)
    if cache_dtype == FP8:
        k, v = k * 4, v * 8
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = k.view(shape).to(cache_dtype).to(device)
    v_cache = v.view(shape).to(cache_dtype).to(device)
    q = torch.randn(sum(n for _, n in seqs), num_heads, head_dim, generator=g).to(dtype).to(device)
    starts = torch.tensor([0] + [n for _, n in seqs]).cumsum(0)
    meta = dict(query_start_loc=starts.to(torch.int32).to(device),
                seq_lens=torch.tensor([c + n for c, n in seqs], dtype=torch.int32, device=device),
                block_tables=tables.to(device), max_query_len=max(n for _, n in seqs),
                max_seq_len=max(c + n for c, n in seqs))
    return q, k_cache, v_cache, meta


def _check(q, k_cache, v_cache, meta, **scales):
    scale = q.shape[-1] ** -0.5
    out = paged_prefill_attention(q, k_cache, v_cache, scale=scale, **meta, **scales)
    ref = paged_attention_ref(q, k_cache, v_cache, scale=scale, **meta, **scales)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    tol = TOLERANCES[q.dtype]
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    return out


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size,dtype", CASES)
def test_matches_ref(num_heads, num_kv_heads, head_dim, block_size, dtype):
    _check(*_make_inputs(SEQS, num_heads, num_kv_heads, head_dim, block_size, dtype))


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size,dtype", [
    (6, 1, 128, 16, torch.bfloat16),
    (12, 1, 192, 32, torch.float16),
    (2, 2, 64, 32, torch.float32),
])
def test_fp8_cache_matches_ref_on_the_same_cache(num_heads, num_kv_heads, head_dim, block_size, dtype):
    seqs = [(0, 1), (40, 1), (0, 20), (70, 25)]
    q, k_cache, v_cache, meta = _make_inputs(seqs, num_heads, num_kv_heads, head_dim, block_size, dtype,
                                             cache_dtype=FP8, seed=1)
    _check(q, k_cache, v_cache, meta, k_scale=0.25, v_scale=0.125)


def test_fp8_cache_query_beyond_fp16_range_saturates():
    """With an FP8 cache and bf16 q the dots run in fp16: a q entry past fp16's 65504 is held there, not turned
    into inf (which would make NaN scores). Such an entry dominates its scores in the reference and in the kernel
    alike (the softmax is one-hot on the same key), so the outputs still agree."""
    seqs = [(0, 1), (40, 1), (0, 20), (70, 25)]
    q, k_cache, v_cache, meta = _make_inputs(seqs, 6, 1, 128, 16, torch.bfloat16, cache_dtype=FP8, seed=4)
    q[:, :, 0] = 1.0e5                  # bf16 holds it; fp16 does not
    _check(q, k_cache, v_cache, meta, k_scale=0.25, v_scale=0.125)


@pytest.mark.parametrize("seqs", [[(0, 1)], [(37, 1)], [(3, 1), (0, 1), (50, 1), (16, 1)], [(100, 2), (0, 1)],
                                  [(4, 0), (0, 3), (7, 0), (2, 1)]])  # sequences with no new token in this step
def test_one_token_and_decode_batches(seqs):
    _check(*_make_inputs(seqs, 6, 1, 64, 16, torch.float32, seed=2))


@pytest.mark.parametrize("reverse", [False, True])
def test_small_tiles_many_query_and_key_tiles(monkeypatch, reverse):
    """16-row programs (G=6: 2 tokens each) and 16-key tiles (half a 32-slot block): dozens of query tiles per
    sequence, the tile -> sequence search over many entries, and key tiles that split cache blocks; in launch
    order and reversed (the sweep's REVERSE: every program still finds its own tile)."""
    monkeypatch.setattr(pa, "_launch_config", lambda head_dim, group, elem_bytes, fp8_cache=False: dict(
        BLOCK_R=16, BLOCK_N=16, num_warps=4, num_stages=1, REVERSE=reverse))
    _check(*_make_inputs([(0, 1), (5, 30), (0, 19), (33, 1), (2, 9)], 6, 1, 64, 32, torch.float16, seed=3))


# K/V as TMA boxes (the sweep_tma step's variant): BLOCK_N divides the block size, the head splits exactly into
# power-of-two boxes. (q heads, KV heads, head_dim, block size, BLOCK_N, q dtype, cache dtype)
KV_TMA_CASES = [
    (6, 1, 64, 32, 32, torch.bfloat16, None),
    (12, 2, 128, 64, 64, torch.float16, None),
    (12, 1, 192, 64, 32, torch.bfloat16, FP8),       # 128 + 64 boxes of an FP8 cache
    (2, 2, 128, 32, 16, torch.float32, None),        # two tiles per block
]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size,block_n,dtype,cache_dtype", KV_TMA_CASES)
def test_kv_tma_boxes_match_ref(num_heads, num_kv_heads, head_dim, block_size, block_n, dtype, cache_dtype):
    """The unmasked tiles read K/V as whole-block TMA boxes (every other slot of the cache is NaN, so a box at the
    wrong rows or columns shows), the diagonal tiles as masked gathers."""
    from tests.kernels.launch_capture import capture_launches
    q, k_cache, v_cache, meta = _make_inputs(SEQS, num_heads, num_kv_heads, head_dim, block_size, dtype,
                                             cache_dtype=cache_dtype, seed=5)
    scales = (0.25, 0.125) if cache_dtype == FP8 else (1.0, 1.0)
    args = (q, k_cache, v_cache, meta["query_start_loc"], meta["seq_lens"], meta["block_tables"],
            head_dim ** -0.5, *scales)
    cfg = dict(BLOCK_R=16 if dtype == torch.float32 else 64, BLOCK_N=block_n, num_warps=4, num_stages=2, KV_TMA=True)
    with capture_launches() as cap:
        pa._prefill_launch(*args, cfg)
    assert cap.launches[0].args["KV_TMA"] is True
    out = pa._prefill_launch(*args, cfg)
    ref = paged_attention_ref(q, k_cache, v_cache, scale=head_dim ** -0.5, **meta,
                              k_scale=scales[0], v_scale=scales[1])
    assert torch.isfinite(out).all()
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("why,head_dim,block_size,block_n,contiguous", [
    ("a tile would span two cache blocks", 64, 16, 32, True),
    ("72 = 64 + 16 boxes would read 8 columns of the next head", 72, 32, 32, True),
    ("a cache that does not view as [NB * BS, Hkv * D] rows", 64, 32, 32, False),
])
def test_kv_tma_falls_back_to_gathers(why, head_dim, block_size, block_n, contiguous):
    from tests.kernels.launch_capture import capture_launches
    q, k_cache, v_cache, meta = _make_inputs(SEQS[:4], 6, 2, head_dim, block_size, torch.float16, seed=6)
    if not contiguous:  # the same values, every other KV head of a cache twice as wide
        wide = torch.zeros(*k_cache.shape[:2], 4, head_dim, dtype=k_cache.dtype)
        k_cache = wide.clone().index_copy_(2, torch.tensor([0, 2]), k_cache)[:, :, ::2]
        v_cache = wide.clone().index_copy_(2, torch.tensor([0, 2]), v_cache)[:, :, ::2]
    args = (q, k_cache, v_cache, meta["query_start_loc"], meta["seq_lens"], meta["block_tables"], head_dim ** -0.5,
            1.0, 1.0)
    cfg = dict(BLOCK_R=64, BLOCK_N=block_n, num_warps=4, num_stages=2, KV_TMA=True)
    with capture_launches() as cap:
        pa._prefill_launch(*args, cfg)
    assert cap.launches[0].args["KV_TMA"] is False, why
    ref = paged_attention_ref(q, k_cache, v_cache, scale=head_dim ** -0.5, **meta)
    tol = TOLERANCES[torch.float16]
    torch.testing.assert_close(pa._prefill_launch(*args, cfg), ref, atol=tol, rtol=tol)


def test_grid_is_query_tiles_by_kv_heads(monkeypatch):
    """One program per (query tile, KV head) -- not per query head -- so every K/V tile is read once per GQA group;
    T // TILE_M + B programs per KV head."""
    grids = []
    kernel = pa._paged_prefill_attention_kernel

    class Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(pa, "_paged_prefill_attention_kernel", Recorder())
    seqs = [(0, 30), (4, 1), (0, 11)]
    q, k_cache, v_cache, meta = _make_inputs(seqs, 12, 2, 64, 16, torch.float32, seed=4)
    _check(q, k_cache, v_cache, meta)
    tile_m = pa._launch_config(64, 6, 4)["BLOCK_R"] // 6
    assert grids == [(42 // tile_m + 3, 2)]


def test_empty_batch_and_padded_rows():
    q, k_cache, v_cache, meta = _make_inputs([(3, 2), (0, 3)], 4, 2, 64, 16, torch.float32, seed=5)
    empty = paged_prefill_attention(q[:0], k_cache, v_cache, scale=0.125, **dict(
        meta, query_start_loc=torch.zeros(1, dtype=torch.int32), seq_lens=meta["seq_lens"][:0],
        block_tables=meta["block_tables"][:0]))
    assert empty.shape == (0, 4, 64)
    padded = torch.cat([q, torch.randn(3, 4, 64)])  # a batch padded to a fixed size, as a CUDA graph would be
    out = paged_prefill_attention(padded, k_cache, v_cache, scale=0.125, **meta)
    ref = paged_attention_ref(q, k_cache, v_cache, scale=0.125, **meta)
    torch.testing.assert_close(out[:5], ref, atol=1e-5, rtol=1e-5)
    assert (out[5:] == 0).all()


def test_rejects_bad_inputs():
    q, k_cache, v_cache, meta = _make_inputs([(2, 3)], 4, 2, 64, 16, torch.float32, seed=6)
    bad = [
        dict(q=q[:, :3]),                                             # 3 query heads over 2 KV heads
        dict(q=q[..., :32]),                                          # head_dim differs from the cache's
        dict(v_cache=v_cache[:, :8]),                                 # K and V caches of different shapes
        dict(k_cache=k_cache.half(), v_cache=v_cache.half()),         # cache dtype neither q's nor FP8
        dict(q=q.double()),
        dict(query_start_loc=meta["query_start_loc"][:1]),            # not [B+1]
        dict(seq_lens=meta["seq_lens"].float()),
        dict(block_tables=meta["block_tables"][0]),                   # not 2-D
    ]
    for override in bad:
        args = dict(q=q, k_cache=k_cache, v_cache=v_cache, **meta, scale=0.125) | override
        with pytest.raises(ValueError, match="paged_prefill_attention"):
            paged_prefill_attention(**args)


def test_ref_scales_dequantize_the_cache():
    """paged_attention_ref with k_scale / v_scale equals the ref on a cache already multiplied out in fp32."""
    q, k_cache, v_cache, meta = _make_inputs([(5, 4), (0, 3)], 6, 1, 64, 16, torch.float32, cache_dtype=FP8, seed=7)
    out = paged_attention_ref(q, k_cache, v_cache, scale=0.125, **meta, k_scale=0.25, v_scale=0.125)
    dequant = paged_attention_ref(q, k_cache.float() * 0.25, v_cache.float() * 0.125, scale=0.125, **meta)
    torch.testing.assert_close(out, dequant, atol=1e-6, rtol=1e-6)


# Realistic shapes on the GPU: Nemotron-4 15B (48 q / 8 kv heads, D=128) and one TP8 rank of 340B (12 q / 1 kv, D=192);
# contexts to 4096, chunks after long prefixes, decode rows.
GPU_SEQS = [(0, 1), (0, 1024), (3072, 1024), (4000, 96), (0, 4096), (517, 1), (2048, 333)]


def _ref_per_sequence(q, k_cache, v_cache, meta, **scales):
    """The ref one sequence at a time: batched, it would pad every sequence to [max_query_len, max_seq_len] scores
    (tens of GB at these shapes)."""
    starts, outs = meta["query_start_loc"].tolist(), []
    for b, (start, end) in enumerate(zip(starts[:-1], starts[1:])):
        one = dict(query_start_loc=torch.tensor([0, end - start], dtype=torch.int32, device=q.device),
                   seq_lens=meta["seq_lens"][b:b + 1], block_tables=meta["block_tables"][b:b + 1],
                   max_query_len=end - start, max_seq_len=int(meta["seq_lens"][b]))
        outs.append(paged_attention_ref(q[start:end], k_cache, v_cache, scale=q.shape[-1] ** -0.5, **one, **scales))
    return torch.cat(outs)


@pytest.mark.gpu
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(48, 8, 128), (12, 1, 192)])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8])
@pytest.mark.parametrize("block_size", [16, 32])
def test_realistic_shapes_on_gpu(num_heads, num_kv_heads, head_dim, cache_dtype, block_size):
    q, k_cache, v_cache, meta = _make_inputs(GPU_SEQS, num_heads, num_kv_heads, head_dim, block_size,
                                             torch.bfloat16, cache_dtype=cache_dtype, seed=8, device="cuda")
    scales = dict(k_scale=0.25, v_scale=0.125) if cache_dtype == FP8 else {}
    out = paged_prefill_attention(q, k_cache, v_cache, scale=head_dim ** -0.5, **meta, **scales)
    assert torch.isfinite(out).all()
    tol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(out, _ref_per_sequence(q, k_cache, v_cache, meta, **scales), atol=tol, rtol=tol)


def test_kv_tma_variants_compile_for_sm90_without_spills():
    """The sweep's TMA-fed prefill tiles on the model shapes (cache blocks of 128): TMA copies, wgmma, no spills."""
    from tests.kernels.launch_capture import SM90_SHARED_BYTES, aot_compile_sm90
    jobs = []
    for head_dim, group, block_n, stages, cache in [(128, 6, 64, 3, "bf16"), (128, 6, 128, 3, "bf16"),
                                                    (192, 12, 64, 2, "bf16"), (192, 12, 32, 3, "fp8e4nv")]:
        block_da, block_db = split_head_dim(head_dim)
        types = {"q_ptr": "*bf16", "k_ptr": f"*{cache}", "v_ptr": f"*{cache}", "out_ptr": "*bf16", "qsl_ptr": "*i32",
                 "seq_lens_ptr": "*i32", "bt_ptr": "*i32", "qk_scale": "fp32", "v_scale": "fp32",
                 "k_desc_a": f"tensordesc<{cache}[{block_n}, {block_da}]>",
                 "v_desc_a": f"tensordesc<{cache}[{block_n}, {block_da}]>"}
        constexprs = {"stride_qd": 1, "stride_od": 1, "stride_kd": 1, "stride_vd": 1, "stride_btn": 1, "GROUP": group,
                      "TILE_M": 128 // group, "HEAD_DIM": head_dim, "BLOCK_SIZE": 128, "BLOCK_R": 128,
                      "BLOCK_N": block_n, "BLOCK_DA": block_da, "BLOCK_DB": max(block_db, 16),
                      "HAS_TAIL": block_db > 0, "DOT_PRECISION": "tf32", "UPCAST": False, "REVERSE": False,
                      "KV_TMA": True, "FP16_DOTS": cache == "fp8e4nv"}
        if block_db:
            types["k_desc_b"] = types["v_desc_b"] = f"tensordesc<{cache}[{block_n}, {block_db}]>"
        else:
            constexprs["k_desc_b"] = constexprs["v_desc_b"] = None
        jobs.append({"module": "kernels.paged_attention", "kernel": "_paged_prefill_attention_kernel",
                     "types": types, "constexprs": constexprs,
                     "divisible": ["stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_kb", "stride_ks",
                                   "stride_kh", "stride_vb", "stride_vs", "stride_vh", "stride_btb"],
                     "num_warps": 8, "num_stages": stages, "label": f"D={head_dim} BLOCK_N={block_n} {cache}"})
    for res in aot_compile_sm90(jobs):
        assert res["local"] == 0 and res["shared"] <= SM90_SHARED_BYTES and res["wgmma"] and res["tma"], res


@pytest.mark.gpu
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(48, 8, 128), (12, 1, 192)])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8])
def test_kv_tma_on_gpu(num_heads, num_kv_heads, head_dim, cache_dtype):
    """The production tiles with K/V as TMA boxes (a cache of 128-token blocks), against the reference."""
    q, k_cache, v_cache, meta = _make_inputs(GPU_SEQS, num_heads, num_kv_heads, head_dim, 128, torch.bfloat16,
                                             cache_dtype=cache_dtype, seed=9, device="cuda")
    scales = (0.25, 0.125) if cache_dtype == FP8 else (1.0, 1.0)
    cfg = pa._launch_config(head_dim, num_heads // num_kv_heads, 2, cache_dtype == FP8) | {"KV_TMA": True}
    out = pa._prefill_launch(q, k_cache, v_cache, meta["query_start_loc"], meta["seq_lens"], meta["block_tables"],
                             head_dim ** -0.5, *scales, cfg)
    assert torch.isfinite(out).all()
    tol = TOLERANCES[torch.bfloat16]
    ref = _ref_per_sequence(q, k_cache, v_cache, meta, k_scale=scales[0], v_scale=scales[1])
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
