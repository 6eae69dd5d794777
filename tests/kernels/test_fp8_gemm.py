"""fp8_gemm (Triton) against fp8_gemm_ref and torch._scaled_mm on the same FP8 inputs and scales.

Only fp32 accumulation order and the output rounding differ, so the check is |out - ref| <= rtol * |ref| +
atol * (|a_deq| @ |b_deq|.T): rtol is about one ulp of the output dtype (bf16 1e-2: the interpreter truncates
fp32 -> bf16, a GPU rounds to nearest; fp16 2e-3; fp32 1e-5 for the order of the epilogue's scale products) and
atol = 1e-5 of the sum of |terms| covers reordering an fp32 sum of K <= 640 terms (bound K * 2^-24 = 4e-5 for the
worst order, observed ~1e-7). On GPUs fp8 wgmma accumulates each 128-wide K slice with reduced precision before
the fp32 promotion, so the GPU tests allow atol = 2e-4.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from kernels.fp8_gemm import (
    _M_BUCKETS,
    FP8_DTYPE,
    GROUP_K,
    GemmConfig,
    _fp8_gemm_launch,
    fp8_gemm,
    fp8_gemm_ref,
    pick_config,
)
from tests.kernels.launch_capture import SM90_SHARED_BYTES, aot_compile_sm90

RTOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
ATOL_CPU, ATOL_GPU = 1e-5, 2e-4

# (M, N, K): decode-sized M, N off the tile grid, K a multiple of 128 and not, one M over the 128 bucket.
SHAPES = [(1, 200, 256), (17, 200, 384), (64, 136, 200), (200, 136, 512)]
A_MODES = ["tensor", "token", "token_col", "group"]
B_MODES = ["tensor", "channel", "channel_col"]
OUT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _operands(M, N, K, seed=0, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    a = (torch.randn(M, K, generator=g, device=device) * 60).clamp(-448, 448).to(FP8_DTYPE)
    b = (torch.randn(N, K, generator=g, device=device) * 60).clamp(-448, 448).to(FP8_DTYPE)
    return a, b


def _a_scale(mode, M, K, seed=1, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    groups = -(-K // GROUP_K)
    shape = {"tensor": (), "token": (M,), "token_col": (M, 1), "group": (M, groups)}[mode]
    if mode == "tensor":
        return torch.tensor(0.02, device=device)
    return torch.rand(shape, generator=g, device=device) * 0.02 + 1e-3


def _b_scale(mode, N, seed=2, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    if mode == "tensor":
        return torch.tensor([3e-3], device=device)
    shape = (N,) if mode == "channel" else (N, 1)
    return torch.rand(shape, generator=g, device=device) * 3e-3 + 1e-4


def _magnitude(a, b, a_scale, b_scale):
    """|a_deq| @ |b_deq|.T: the sum of |terms| each output is made of (the scale for its rounding errors)."""
    a_abs = a.float().abs().to(FP8_DTYPE)  # exact: |e4m3| is e4m3
    b_abs = b.float().abs().to(FP8_DTYPE)
    return fp8_gemm_ref(a_abs, b_abs, a_scale.abs(), b_scale.abs(), torch.float32)


def _assert_close(out, ref, mag, out_dtype, atol=ATOL_CPU):
    assert out.dtype == out_dtype and out.shape == ref.shape
    err = (out.float() - ref.float()).abs()
    allowed = RTOL[out_dtype] * ref.float().abs() + atol * mag
    worst = (err - allowed).max().item()
    assert worst <= 0, f"max |err| {err.max().item():.3e} exceeds tolerance by {worst:.3e}"


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("a_mode", A_MODES)
@pytest.mark.parametrize("b_mode", ["tensor", "channel"])
def test_matches_ref(M, N, K, a_mode, b_mode):
    out_dtype = OUT_DTYPES[(M + len(a_mode) + len(b_mode)) % 3]  # spread output dtypes over the grid
    a, b = _operands(M, N, K)
    sa, sb = _a_scale(a_mode, M, K), _b_scale(b_mode, N)
    out = fp8_gemm(a, b, sa, sb, out_dtype)
    _assert_close(out, fp8_gemm_ref(a, b, sa, sb, out_dtype), _magnitude(a, b, sa, sb), out_dtype)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("M,N,K", [(17, 200, 384), (64, 136, 200)])
def test_out_dtypes_and_column_scales(M, N, K, out_dtype):
    a, b = _operands(M, N, K, seed=3)
    sa, sb = _a_scale("token_col", M, K), _b_scale("channel_col", N)
    out = fp8_gemm(a, b, sa, sb, out_dtype)
    _assert_close(out, fp8_gemm_ref(a, b, sa, sb, out_dtype), _magnitude(a, b, sa, sb), out_dtype)


# Every table entry on a small problem (so the interpreter covers each tile shape and grouped ordering over
# several M tiles), and forced split-K, with even and ragged K, per-token and group scales.
FORCED = [(cfg, 200, 136, 256) for _, cfg in _M_BUCKETS] + [
    (GemmConfig(16, 64, 128, 1, 4, 6, split_k=2), 1, 200, 640),
    (GemmConfig(32, 64, 128, 1, 4, 6, split_k=3), 17, 136, 600),
    (GemmConfig(64, 64, 64, 1, 4, 5, split_k=4), 64, 72, 520),
    (GemmConfig(16, 32, 32, 2, 4, 2, split_k=8), 40, 72, 256),
    # 256-deep tiles: with group scales, two 128-wide slices per iteration; a ragged last tile that ends inside its
    # first slice (K = 600: 512 + 88) and one that ends inside its second (K = 720: 512 + 128 + 80), split in two.
    (GemmConfig(16, 64, 256, 1, 4, 6, split_k=2), 3, 72, 600),
    (GemmConfig(32, 32, 256, 1, 4, 3, split_k=2), 17, 40, 720),
]


@pytest.mark.parametrize("a_mode", ["token", "group"])
@pytest.mark.parametrize("cfg,M,N,K", FORCED)
def test_forced_configs_and_split_k(cfg, M, N, K, a_mode):
    a, b = _operands(M, N, K, seed=4)
    sa, sb = _a_scale(a_mode, M, K), _b_scale("channel", N)
    out = _fp8_gemm_launch(a, b, sa, sb, torch.bfloat16, cfg)
    _assert_close(out, fp8_gemm_ref(a, b, sa, sb, torch.bfloat16), _magnitude(a, b, sa, sb), torch.bfloat16)


def test_deep_tile_reads_no_group_scale_past_k():
    """A 256-deep tile whose second 128-wide slice lies wholly past K (K = 600 = 2 x 256 + 88) must not read a
    group scale for it: the scales sit in a buffer followed by NaN, which a read past the last group would carry
    into the output (0 x NaN) of the last row."""
    M, N, K = 3, 40, 600
    a, b = _operands(M, N, K, seed=11)
    groups = -(-K // GROUP_K)
    buffer = torch.full((M * groups + 8,), float("nan"))
    buffer[:M * groups] = _a_scale("group", M, K).reshape(-1)
    sa, sb = buffer[:M * groups].view(M, groups), _b_scale("channel", N)
    out = _fp8_gemm_launch(a, b, sa, sb, torch.float32, GemmConfig(16, 32, 256, 1, 4, 2))
    assert not out.isnan().any()
    _assert_close(out, fp8_gemm_ref(a, b, sa, sb, torch.float32), _magnitude(a, b, sa, sb), torch.float32)


@pytest.mark.parametrize("promote", [1, 2])
def test_other_promotions_compute_the_same_product(promote):
    """The sweep's alternatives to per-tile promotion (1: the compiler's, 2: none) are the same product; under the
    interpreter every accumulation is fp32, so they match the reference like the default. Group scales refuse them."""
    a, b = _operands(40, 136, 520, seed=9)
    sa, sb = _a_scale("token", 40, 520), _b_scale("channel", 136)
    cfg = GemmConfig(16, 32, 64, 2, 4, 2, promote=promote)
    out = _fp8_gemm_launch(a, b, sa, sb, torch.bfloat16, cfg)
    _assert_close(out, fp8_gemm_ref(a, b, sa, sb, torch.bfloat16), _magnitude(a, b, sa, sb), torch.bfloat16)
    with pytest.raises(ValueError, match="needs promote = 0"):
        _fp8_gemm_launch(a, b, _a_scale("group", 40, 520), sb, torch.bfloat16, cfg)


@pytest.mark.parametrize("M,N,K", [(1, 200, 256), (64, 136, 512)])
@pytest.mark.parametrize("scheme", ["tensorwise", "rowwise", "token_x_tensor"])
def test_matches_torch_scaled_mm(M, N, K, scheme):
    """torch._scaled_mm takes tensor-wise (both scalars) or row-wise ([M, 1] and [1, N]) scales; a per-tensor weight
    scale with per-token activations is passed to it expanded to row-wise."""
    a, b = _operands(M, N, K, seed=5)
    if scheme == "tensorwise":
        sa, sb = _a_scale("tensor", M, K), _b_scale("tensor", N).reshape(())
        sm_a, sm_b = sa, sb
    else:
        sa = _a_scale("token_col", M, K)
        sb = _b_scale("tensor" if scheme == "token_x_tensor" else "channel", N)
        sm_a, sm_b = sa, sb.reshape(1, -1).expand(1, N).contiguous()
    for out_dtype in OUT_DTYPES if scheme == "tensorwise" else [torch.bfloat16]:
        ours = fp8_gemm(a, b, sa, sb, out_dtype)
        theirs = torch._scaled_mm(a, b.T, scale_a=sm_a, scale_b=sm_b, out_dtype=out_dtype)
        _assert_close(ours, theirs, _magnitude(a, b, sa, sb), out_dtype)


def test_pick_config_table():
    """M buckets, and split-K only where the grid would leave over half of 132 SMs idle (340B TP8 qkv)."""
    cpu = torch.device("cpu")
    assert pick_config(1, 8192, 6144, cpu) == GemmConfig(16, 64, 256, 1, 4, 6, 1)
    assert pick_config(17, 6144, 24576, cpu).block_m == 32
    assert pick_config(100, 6144, 6144, cpu) == GemmConfig(64, 128, 128, 8, 4, 4, 1)
    assert pick_config(256, 6144, 6144, cpu) == GemmConfig(64, 128, 128, 8, 4, 4, 1)
    assert pick_config(257, 6144, 6144, cpu) == GemmConfig(128, 128, 128, 8, 8, 4, 1)
    assert pick_config(8192, 24576, 6144, cpu) == GemmConfig(128, 128, 128, 8, 8, 4, 1)
    assert pick_config(1, 2688, 18432, cpu).split_k == 4        # 42 tiles -> 168 CTAs
    assert pick_config(64, 2688, 18432, cpu).split_k == 4
    assert pick_config(128, 2688, 18432, cpu).split_k == 1      # M > 64: no split-K
    assert pick_config(1, 2688, 512, cpu).split_k == 1          # too few K tiles to split
    for N, K in [(8192, 6144), (6144, 6144), (24576, 6144), (6144, 24576), (18432, 2304), (9216, 18432)]:
        assert pick_config(1, N, K, cpu).split_k == 1


def test_zero_sized_and_bad_inputs():
    a, b = _operands(3, 8, 64)
    assert fp8_gemm(a[:0], b, torch.tensor(1.0), torch.tensor(1.0)).shape == (0, 8)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_gemm(a.float(), b, torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="\\[N, K\\]"):
        fp8_gemm(a, b[:, :32], torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="a_scale"):
        fp8_gemm(a, b, torch.ones(3, 2), torch.tensor(1.0))     # K = 64 has one group, not two
    with pytest.raises(ValueError, match="b_scale"):
        fp8_gemm_ref(a, b, torch.tensor(1.0), torch.ones(7))
    with pytest.raises(ValueError, match="out_dtype"):
        fp8_gemm(a, b, torch.tensor(1.0), torch.tensor(1.0), torch.int32)
    with pytest.raises(ValueError, match="benchmarks/fp8_gemm_tma.py"):
        _fp8_gemm_launch(a, b, torch.tensor(1.0), torch.tensor(1.0), torch.bfloat16,
                         GemmConfig(16, 32, 64, 1, 4, 2, tma=True))  # the experiment's tiles, not production's
    # [M, 1] with K <= 128 reads as per token and as one group: the same numbers either way.
    sa = torch.rand(3, 1)
    assert torch.equal(fp8_gemm_ref(a, b, sa, torch.tensor(1.0)), fp8_gemm_ref(a, b, sa[:, 0], torch.tensor(1.0)))


# ----------------------------------------------------------------------------------------------- sm_90 compile (CPU)

# Without a GPU we can still compile every kernel for sm_90 ahead of time (Triton ships ptxas and cuobjdump) and
# check what matters for speed: it lowers, spills nothing to local memory, fits shared memory, and uses wgmma where
# the tile allows. The interpreter cannot do this (TRITON_INTERPRET swaps @triton.jit for a Python emulation), so a
# subprocess without it compiles: `aot_compile_sm90` lives in tests/kernels/launch_capture.py (re-exported here for
# the other kernel test files); tests/kernels/test_sm90_launches.py compiles every launch the wrappers make.


def test_compiles_for_sm90_without_spills():
    types = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "c_ptr": "*bf16", "a_scale_ptr": "*fp32",
             "b_scale_ptr": "*fp32"}
    jobs = []
    # The table, plus the prefill tile with the sweep's two other promotions (per-token A only).
    variants = [(bound, cfg, [(1, True), (2, True), (0, False)]) for bound, cfg in _M_BUCKETS]
    variants += [(None, dataclasses.replace(_M_BUCKETS[-1][1], promote=p), [(1, True)]) for p in (1, 2)]
    for bound, cfg, modes in variants:
        for a_mode, even_k in modes:  # group-scaled A (2) walks a 256-deep tile as two 128-wide slices
            jobs.append({
                "module": "kernels.fp8_gemm", "kernel": "_fp8_gemm_kernel", "types": types,
                "constexprs": {"stride_ak": 1, "stride_bk": 1, "stride_cn": 1, "A_MODE": a_mode, "B_PER_CHANNEL": True,
                               "EVEN_K": even_k, "GROUP_K": GROUP_K, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                               "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m, "PROMOTE": cfg.promote},
                "divisible": ["N", "K", "k_per_split", "stride_am", "stride_bn", "stride_cm"] if even_k else [],
                "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                "label": f"M<={bound} a_mode={a_mode} promote={cfg.promote}"})
    for job, res in zip(jobs, aot_compile_sm90(jobs)):
        assert res["local"] == 0, res
        assert res["shared"] <= SM90_SHARED_BYTES, res
        # BLOCK_M >= 64 runs native fp8 wgmma; smaller decode tiles lower to mma.sync (fp8 -> f16 in registers).
        assert res["wgmma"] == (job["constexprs"]["BLOCK_M"] >= 64), res


# ----------------------------------------------------------------------------------------------- GPU (CUDA only)

MODEL_SHAPES = {  # name: (N, K)
    "15b_qkv": (8192, 6144), "15b_o": (6144, 6144), "15b_up": (24576, 6144), "15b_down": (6144, 24576),
    "340b_tp8_qkv": (2688, 18432), "340b_tp8_o": (18432, 2304), "340b_tp8_up": (9216, 18432),
    "340b_tp8_down": (18432, 9216),
}


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 64, 256, 2048])
@pytest.mark.parametrize("name", list(MODEL_SHAPES))
def test_gpu_model_shapes(name, M):
    N, K = MODEL_SHAPES[name]
    a, b = _operands(M, N, K, device="cuda")
    sa, sb = _a_scale("token_col", M, K, device="cuda"), _b_scale("channel", N, device="cuda")
    mag = _magnitude(a, b, sa, sb)
    out = fp8_gemm(a, b, sa, sb, torch.bfloat16)
    _assert_close(out, fp8_gemm_ref(a, b, sa, sb, torch.bfloat16), mag, torch.bfloat16, ATOL_GPU)
    theirs = torch._scaled_mm(a, b.T, scale_a=sa, scale_b=sb.reshape(1, N), out_dtype=torch.bfloat16)
    _assert_close(out, theirs, mag, torch.bfloat16, ATOL_GPU)
    sg = _a_scale("group", M, K, device="cuda")
    _assert_close(fp8_gemm(a, b, sg, sb, torch.bfloat16), fp8_gemm_ref(a, b, sg, sb, torch.bfloat16),
                  _magnitude(a, b, sg, sb), torch.bfloat16, ATOL_GPU)
