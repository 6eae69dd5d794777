"""FP8 activation quantization: Triton kernels against their references, compared *bytewise* (same fp8 bit patterns,
same fp32 scales), plus properties of the references themselves (round-trip error, saturation, zero rows)."""
from __future__ import annotations

import pytest
import torch

from kernels.fp8_quant import (EPS, FP8_DTYPE, FP8_MAX, quantize_fp8_per_tensor, quantize_fp8_per_tensor_ref,
                               quantize_fp8_per_token, quantize_fp8_per_token_ref)
from tests.kernels.test_fp8_gemm import aot_compile_sm90

# (M, K): one token, odd sizes, a wide row held in one tile, and K > 8192 (the two-pass path).
TOKEN_SHAPES = [(1, 64), (17, 200), (64, 1000), (3, 9000)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _bytes(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


def _input(shape, dtype, seed=0):
    """Random values over many binades, plus rows that stress the edges: all zeros, tiny (< EPS), huge, and the
    fp8 grid's own values and midpoints (ties must round to even)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * 2)
    if len(shape) == 2 and shape[0] >= 4:
        x[1] = 0.0
        x[2] *= 1e-20
        x[3] *= 1e4 if dtype == torch.float16 else 1e20
    if len(shape) == 2 and shape[0] >= 8:
        grid = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()
        grid = grid[grid.isfinite()].sort().values                           # every finite e4m3 value
        row = torch.cat([grid, (grid[1:] + grid[:-1]) / 2])                  # and the ties between them
        n = min(shape[1], row.numel())
        x[5] = 0.0
        x[5, :n] = row[:n]
        x[5, 0] = FP8_MAX                                                    # scale exactly 1: values stay on grid
    if dtype == torch.float16:
        x = x.clamp(-60000.0, 60000.0)                                       # finite in fp16
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K", TOKEN_SHAPES)
def test_per_token_matches_ref_bytewise(M, K, dtype):
    x = _input((M, K), dtype)
    q, s = quantize_fp8_per_token(x)
    q_ref, s_ref = quantize_fp8_per_token_ref(x)
    assert q.dtype == FP8_DTYPE and q.shape == (M, K) and s.dtype == torch.float32 and s.shape == (M,)
    assert torch.equal(s, s_ref)
    assert torch.equal(_bytes(q), _bytes(q_ref))


def test_per_token_non_contiguous_rows():
    x = _input((20, 300), torch.bfloat16)[::2, :256]                           # row stride 600
    q, s = quantize_fp8_per_token(x)
    q_ref, s_ref = quantize_fp8_per_token_ref(x)
    assert torch.equal(s, s_ref) and torch.equal(_bytes(q), _bytes(q_ref))


@pytest.mark.parametrize("shape", [(1,), (17, 200), (2, 3, 1000)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_tensor_dynamic_matches_ref_bytewise(shape, dtype):
    x = _input(shape, dtype, seed=1)
    q, s = quantize_fp8_per_tensor(x)
    q_ref, s_ref = quantize_fp8_per_tensor_ref(x)
    assert s.shape == () and q.shape == x.shape
    assert torch.equal(s, s_ref)
    assert torch.equal(_bytes(q), _bytes(q_ref))


@pytest.mark.parametrize("scale", [torch.tensor(0.01), torch.tensor([0.37]), torch.tensor([[1e-4]])])
def test_per_tensor_static_matches_ref_bytewise(scale):
    """A small static scale saturates most values at +-448 (the clamp runs before the cast: no NaN)."""
    x = _input((17, 200), torch.bfloat16, seed=2)
    q, s = quantize_fp8_per_tensor(x, scale)
    q_ref, s_ref = quantize_fp8_per_tensor_ref(x, scale)
    assert s.shape == () and s.item() == pytest.approx(scale.item())
    assert torch.equal(_bytes(q), _bytes(q_ref))
    assert not q.float().isnan().any()


@pytest.mark.parametrize("M,K", [(17, 200), (64, 1000)])
def test_ref_round_trip_error_is_half_an_e4m3_step(M, K):
    """Dequantized values are within half a step of the E4M3 grid: 2^-4 relative for normals, 2^-10 * scale
    absolute for subnormals; the row's amax maps to 448 and is exact."""
    x = _input((M, K), torch.float32, seed=3)
    q, s = quantize_fp8_per_token_ref(x)
    deq = q.float() * s[:, None]
    assert (deq - x).abs().le(x.abs() * 2.0 ** -4 * 1.0001 + s[:, None] * 2.0 ** -10).all()
    assert torch.equal(q.float().abs().amax(dim=1)[x.abs().amax(dim=1) > EPS], torch.full((M,), FP8_MAX)[
        x.abs().amax(dim=1) > EPS])


def test_zero_and_tiny_rows_give_zeros_not_nan():
    x = torch.zeros(4, 256)
    x[1] = 1e-20
    x[2, 7] = -3.0
    for fn in (quantize_fp8_per_token, quantize_fp8_per_token_ref):
        q, s = fn(x)
        assert not q.float().isnan().any() and not s.isnan().any()
        assert torch.equal(s[[0, 1, 3]], torch.full((3,), EPS / FP8_MAX))
        assert q[[0, 1, 3]].float().eq(0).all() and q[2, 7].float().item() == -FP8_MAX
    for fn in (quantize_fp8_per_tensor, quantize_fp8_per_tensor_ref):
        q, s = fn(torch.zeros(3, 5))
        assert s.item() == pytest.approx(EPS / FP8_MAX) and q.float().eq(0).all()


def test_empty_inputs():
    for M, K in [(0, 64), (3, 0)]:
        q, s = quantize_fp8_per_token(torch.randn(M, K))
        q_ref, s_ref = quantize_fp8_per_token_ref(torch.randn(M, K))
        assert q.shape == q_ref.shape == (M, K) and torch.equal(s, s_ref)
    q, s = quantize_fp8_per_tensor(torch.randn(0, 4))
    assert q.shape == (0, 4) and s.item() == pytest.approx(EPS / FP8_MAX)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="\\[M, K\\]"):
        quantize_fp8_per_token(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="bf16, fp16 or fp32"):
        quantize_fp8_per_token(torch.ones(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="one-element"):
        quantize_fp8_per_tensor(torch.randn(2, 4), torch.ones(2))


def test_compiles_for_sm90_without_spills():
    """Both quantization kernels compiled for sm_90 (see tests/kernels/test_fp8_gemm.py): the hand rounding must
    lower, and the 8192-wide one-tile row must stay in registers."""
    token = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32"}
    jobs = [{"module": "kernels.fp8_quant", "kernel": "_quantize_fp8_per_token_kernel", "types": token,
             "constexprs": {"EPS": EPS, "BLOCK_K": block, "ONE_TILE": one}, "divisible": ["K", "stride_xm"],
             "num_warps": 4 if block <= 2048 else 8, "num_stages": 2, "label": f"token {block} {one}"}
            for block, one in [(8192, True), (8192, False), (1024, True)]]
    jobs.append({"module": "kernels.fp8_quant", "kernel": "_quantize_fp8_per_tensor_kernel", "types": token,
                 "constexprs": {"BLOCK": 4096}, "divisible": ["n"], "num_warps": 4, "num_stages": 2,
                 "label": "tensor"})
    for res in aot_compile_sm90(jobs):
        assert res["local"] == 0, res


# ----------------------------------------------------------------------------------------------- GPU (CUDA only)

@pytest.mark.gpu
@pytest.mark.parametrize("M,K", [(1, 6144), (8192, 6144), (16, 18432), (4096, 18432), (512, 24576)])
def test_gpu_model_shapes_bytewise(M, K):
    x = _input((M, K), torch.bfloat16).cuda()
    q, s = quantize_fp8_per_token(x)
    q_ref, s_ref = quantize_fp8_per_token_ref(x)
    assert torch.equal(s, s_ref) and torch.equal(_bytes(q), _bytes(q_ref))
    q, s = quantize_fp8_per_tensor(x)
    q_ref, s_ref = quantize_fp8_per_tensor_ref(x)
    assert torch.equal(s, s_ref) and torch.equal(_bytes(q), _bytes(q_ref))
    static = torch.tensor([0.05], device="cuda")
    q, _ = quantize_fp8_per_tensor(x, static)
    assert torch.equal(_bytes(q), _bytes(quantize_fp8_per_tensor_ref(x, static)[0]))
