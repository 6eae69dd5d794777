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


def _codes(q: torch.Tensor) -> torch.Tensor:
    """E4M3 bytes with -0 (0x80) read as +0 (0x00): both dequantize to exactly 0. On the H200 (Triton 3.6) a negative
    value that rounds to zero came out +0 where torch's cast gives -0 (44 of 6144 bytes at M = 1, K = 6144, every one
    of them such a zero); every other byte and every scale matched bit for bit."""
    b = _bytes(q)
    return b.masked_fill(b == 0x80, 0)


def _hex(v: float) -> str:
    return f"{v!r} ({float(v).hex()})"


def _mismatch_report(x, q, s, q_ref, s_ref, limit=8) -> str:
    """Why (q, s) and the reference's (q_ref, s_ref) are not bitwise equal: how many scales differ (and the largest
    relative difference), how many E4M3 bytes differ, and for the first `limit` differing bytes the element's
    row/col (of x viewed as [-1, last dim]), x, the fp32 product x * (1 / s_ref) the reference rounds, both codes
    (value and byte) and what the CPU's cast makes of that product (the CPU rounds to nearest-even exactly, so it
    says which side rounded wrong when the scales agree). Works on CPU or CUDA tensors; "" when all match."""
    lines = []
    s2, s2_ref = s.reshape(-1).float(), s_ref.reshape(-1).float()
    per_token = s2_ref.numel() > 1
    bad_s = s2 != s2_ref
    if bad_s.any():
        rel = ((s2 - s2_ref).abs() / s2_ref.abs()).max().item()
        first = bad_s.nonzero()[:, 0][:limit].tolist()
        lines.append(f"{int(bad_s.sum())} of {s2.numel()} scales differ, max relative difference {rel:.3e}; first "
                     f"rows {first}: ours {[float(s2[i]).hex() for i in first]} ref "
                     f"{[float(s2_ref[i]).hex() for i in first]}")
    width = x.shape[-1] if x.dim() else 1
    b, b_ref = _codes(q).reshape(-1, width), _codes(q_ref).reshape(-1, width)
    bad = b != b_ref
    n_bad = int(bad.sum())
    if n_bad:
        lines.append(f"{n_bad} of {b.numel()} bytes differ")
        xf = x.reshape(-1, width).float()
        for row, col in bad.nonzero()[:limit].tolist():
            scale = s2_ref[row if per_token else 0]
            inv = 1.0 / scale
            prod = (xf[row, col] * inv).cpu()                                  # as the reference computes it
            cpu_code = int(_bytes(prod.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)))
            ours, ref = int(b[row, col]), int(b_ref[row, col])
            lines.append(f"  [{row}, {col}] x={_hex(float(xf[row, col]))} scale={float(scale).hex()} "
                         f"1/scale={float(inv).hex()} x*(1/scale)={_hex(float(prod))} "
                         f"ours={_code(ours)} ref={_code(ref)} cpu cast={_code(cpu_code)}")
    return "\n".join(lines)


def _code(byte: int) -> str:
    value = torch.tensor([byte], dtype=torch.uint8).view(FP8_DTYPE).float().item()
    return f"{value!r} (0x{byte:02x})"


def _assert_bytewise(x, q, s, q_ref, s_ref, what=""):
    """Strict: scales and codes bit for bit (zero's sign aside, `_codes`); the failure message is
    `_mismatch_report`."""
    ok = torch.equal(s, s_ref) and torch.equal(_codes(q), _codes(q_ref))
    assert ok, f"{what}: {_mismatch_report(x, q, s, q_ref, s_ref)}"


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
    _assert_bytewise(x, q, s, q_ref, s_ref, "per token")


def test_per_token_non_contiguous_rows():
    x = _input((20, 300), torch.bfloat16)[::2, :256]                           # row stride 600
    q, s = quantize_fp8_per_token(x)
    q_ref, s_ref = quantize_fp8_per_token_ref(x)
    _assert_bytewise(x, q, s, q_ref, s_ref, "per token, strided rows")


@pytest.mark.parametrize("shape", [(1,), (17, 200), (2, 3, 1000)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_tensor_dynamic_matches_ref_bytewise(shape, dtype):
    x = _input(shape, dtype, seed=1)
    q, s = quantize_fp8_per_tensor(x)
    q_ref, s_ref = quantize_fp8_per_tensor_ref(x)
    assert s.shape == () and q.shape == x.shape
    _assert_bytewise(x, q, s, q_ref, s_ref, "per tensor")


@pytest.mark.parametrize("scale", [torch.tensor(0.01), torch.tensor([0.37]), torch.tensor([[1e-4]])])
def test_per_tensor_static_matches_ref_bytewise(scale):
    """A small static scale saturates most values at +-448 (the clamp runs before the cast: no NaN)."""
    x = _input((17, 200), torch.bfloat16, seed=2)
    q, s = quantize_fp8_per_tensor(x, scale)
    q_ref, s_ref = quantize_fp8_per_tensor_ref(x, scale)
    assert s.shape == () and s.item() == pytest.approx(scale.item())
    _assert_bytewise(x, q, s, q_ref, s_ref, "static")
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


def test_mismatch_report_describes_the_differences():
    """The GPU test's failure message, exercised on the CPU: one flipped code and one changed scale are counted and
    located; equal results give an empty report."""
    x = _input((8, 64), torch.bfloat16, seed=4)
    q_ref, s_ref = quantize_fp8_per_token_ref(x)
    assert _mismatch_report(x, q_ref, s_ref, q_ref, s_ref) == ""
    q = q_ref.clone()
    _bytes(q)[6, 9] ^= 1                                                    # one code, one step away
    s = s_ref.clone()
    s[3] = torch.nextafter(s[3], torch.tensor(float("inf")))               # one scale, one fp32 ulp away
    report = _mismatch_report(x, q, s, q_ref, s_ref)
    assert "1 of 8 scales differ" in report and "1 of 512 bytes differ" in report and "[6, 9]" in report
    product = x[6, 9].float() * (1.0 / s_ref[6])
    assert float(product).hex() in report
    with pytest.raises(AssertionError, match="1 of 512 bytes differ"):
        _assert_bytewise(x, q, s_ref, q_ref, s_ref, "per token")
    q_t, s_t = quantize_fp8_per_tensor_ref(x)                               # a 0-dim scale
    q_bad = q_t.clone()
    _bytes(q_bad)[0, 0] ^= 1
    assert "1 of 512 bytes differ" in _mismatch_report(x, q_bad, s_t, q_t, s_t)


# ----------------------------------------------------------------------------------------------- GPU (CUDA only)

@pytest.mark.gpu
@pytest.mark.parametrize("M,K", [(1, 6144), (8192, 6144), (16, 18432), (4096, 18432), (512, 24576)])
def test_gpu_model_shapes_bytewise(M, K):
    x = _input((M, K), torch.bfloat16).cuda()
    q, s = quantize_fp8_per_token(x)
    q_ref, s_ref = quantize_fp8_per_token_ref(x)
    _assert_bytewise(x, q, s, q_ref, s_ref, "per token")
    q, s = quantize_fp8_per_tensor(x)
    q_ref, s_ref = quantize_fp8_per_tensor_ref(x)
    _assert_bytewise(x, q, s, q_ref, s_ref, "per tensor (dynamic)")
    static = torch.tensor([0.05], device="cuda")
    q, s = quantize_fp8_per_tensor(x, static)
    q_ref, s_ref = quantize_fp8_per_tensor_ref(x, static)
    _assert_bytewise(x, q, s, q_ref, s_ref, "per tensor (static 0.05)")


def test_bytewise_reads_the_sign_of_zero_as_equal_and_nothing_else():
    """-0 and +0 codes dequantize to the same 0, so the strict comparison accepts either; any other byte still fails."""
    x = _input((4, 64), torch.bfloat16, seed=11)
    q, s = quantize_fp8_per_token_ref(x)
    zeros = _bytes(q) == 0x80
    assert zeros.any()                      # the input has negative values that round to zero
    plus = q.clone()
    _bytes(plus)[zeros] = 0x00
    _assert_bytewise(x, plus, s, q, s, "signed zero")
    _bytes(plus)[0, 0] ^= 1
    with pytest.raises(AssertionError, match="1 of 256 bytes differ"):
        _assert_bytewise(x, plus, s, q, s, "one code")
