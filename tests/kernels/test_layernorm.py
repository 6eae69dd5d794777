"""layernorm1p / layernorm1p_fp8 (Triton, interpreted on the CPU) against their references, and the reference
against the model's LayerNorm1P.

Tolerances, and why (kernel vs reference):
- The kernels sum the row in another order than torch (tree reductions, chunk merging), so mean/rstd differ by a
  few fp32 ulps and y by ~1e-7 absolute per unit of |y|'s terms; a compiled kernel may also fuse multiply-adds.
- fp32 output: rtol 1e-5, atol 1e-5 (y's terms are O(1-10), so fp32 rounding is ~1e-6 absolute).
- fp16 output: rtol 2^-10 (one fp16 ulp: the fp32 difference can push a value across a rounding boundary),
  atol 1e-5 (near-zero outputs, where the fp32 absolute error dominates the fp16 step).
- bf16 output: rtol 2^-7 (one bf16 ulp; the interpreter also truncates fp32 -> bf16 instead of rounding to
  nearest, which alone costs up to one ulp), atol 1e-5.
- FP8 variant: scale within 8 fp32 ulps times (1 + max|x| / std(x)) of its row: amax(y) is computed two ways,
  and x - mean loses log2(|mean| / std) bits when a row is far from zero-mean (the test rows reach 30-60 std),
  so the fp32 rounding of x is amplified by that ratio in both implementations; each E4M3 code
  within one step of the reference's (adjacent bit patterns, ±0 equal): kernel and reference apply the same
  formula (y * (1 / scale), the reciprocal rounded once), but y differs by fp32 rounding, which can flip a
  rounding by one step.
  Dequantized values are therefore within one E4M3 ulp (times the scale) of the reference's.
- Reference vs model in fp32: rtol/atol 1e-5 (torch's own layer_norm kernel sums in another order).
- GPU (compiled kernels, model shapes, `_assert_within_term_bound`): rows whose mean is tens of stds away from
  zero make fp32 mean/rstd noise visible in outputs near zero, where (x - mean) * rstd * (1 + w) and the bias
  cancel (seen on an H200: 1.2e-5 absolute error on a 2e-4 output in bf16, over atol 1e-5 + rtol 2^-7). The bound
  there is one output ulp of the *terms* plus that noise, per element:
  |y - y_ref| <= OUT_ULP * (|x_hat * (1 + w)| + |b|) + STAT_ULPS * 2^-24 * (1 + max|x| / std) * |1 + w|,
  x_hat from the reference's own mean/rstd. First part: kernel and reference each round their fp32 y to nearest,
  so once their fp32 values differ they can land on adjacent grid points, one ulp of y apart; ulp(y) <= OUT_ULP *
  |y| <= OUT_ULP * terms. Second part: the fp32 difference itself, mostly x - mean with mean's fp32 rounding
  (a few ulps of |mean|, i.e. of max|x|) divided by std; measured (interpreter vs torch, H = 6144 and 18432) at
  <= 3.6 of those units, so STAT_ULPS = 8.
"""
from __future__ import annotations

import pytest
import torch

from kernels import layernorm
from kernels.layernorm import (FP8_AMAX_EPS, FP8_E4M3_MAX, layernorm1p, layernorm1p_fp8, layernorm1p_fp8_ref,
                               layernorm1p_ref)
from model.layers import LayerNorm1P

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
EPS = 1e-5
TOLERANCE = {FP32: dict(rtol=1e-5, atol=1e-5), FP16: dict(rtol=2.0 ** -10, atol=1e-5),
             BF16: dict(rtol=2.0 ** -7, atol=1e-5)}
SCALE_ULPS = 8
# One ulp of the output dtype, relative to |value|, as an upper bound: bf16 keeps 8 significand bits, so adjacent
# bf16 values near v are up to 2^-7 |v| apart (2^-8, the unit roundoff, is only half an ulp at the top of a binade
# and would reject a legitimate one-ulp rounding flip there); fp16 (11 bits) 2^-10. fp32 outputs are not rounded
# again: 2^-21 (8 fp32 roundings) covers the handful of fp32 operations each side applies to the terms.
OUT_ULP = {BF16: 2.0 ** -7, FP16: 2.0 ** -10, FP32: 2.0 ** -21}
STAT_ULPS = 8  # fp32 ulps of max|x| that the kernel's mean/rstd may differ by from the reference's (measured <= 3.6)

# (T, H, dtype, chunked): H = 64, 192, 1000 (not a power of two or a multiple of any block), 6144 (15B); T = 1
# and 17. `chunked` forces the multi-pass path (used for H > 8192, i.e. 340B's 18432) with 256-wide chunks, so
# that it is tested with several chunks and a partial last one.
CASES = [
    (1, 64, FP32, False), (17, 64, BF16, False), (17, 192, FP16, False), (17, 192, FP32, True),
    (1, 1000, BF16, False), (17, 1000, FP32, False), (17, 1000, BF16, True), (1, 1000, FP16, True),
    (17, 6144, BF16, False), (1, 6144, FP16, False), (17, 6144, FP32, True), (1, 6144, BF16, True),
]
FP8_CASES = [
    (1, 64, BF16, False), (17, 192, FP32, False), (17, 192, BF16, True), (17, 1000, FP16, False),
    (17, 1000, BF16, True), (17, 6144, BF16, False), (1, 6144, FP32, False), (17, 6144, FP16, True),
]


def _ids(case):
    return f"T{case[0]}-H{case[1]}-{str(case[2])[6:]}" + ("-chunked" if case[3] else "")


def _inputs(num_tokens, hidden, dtype, seed=0):
    """Rows of different scales and offsets (a mean 30x the std tests the variance's stability), zero-centred
    weights and small biases as checkpoints have them."""
    g = torch.Generator().manual_seed(seed)
    row_scale = 2.0 ** torch.randint(-4, 5, (num_tokens, 1), generator=g)
    row_offset = torch.randn(num_tokens, 1, generator=g) * 30 * row_scale
    x = (torch.randn(num_tokens, hidden, generator=g) * row_scale + row_offset).to(dtype)  # [T, H]
    weight = (torch.randn(hidden, generator=g) * 0.1).to(dtype)                           # [H] zero-centred
    bias = (torch.randn(hidden, generator=g) * 0.1).to(dtype)                             # [H]
    return x, weight, bias


def _force_chunks(monkeypatch):
    monkeypatch.setattr(layernorm, "_MAX_ROW_BLOCK", 128)
    monkeypatch.setattr(layernorm, "_CHUNK", 256)
    monkeypatch.setattr(layernorm, "_FEW_ROWS", 0)   # the many-rows chunking; the few-rows one is tested below


def _ordinal(t: torch.Tensor) -> torch.Tensor:
    """E4M3 bit patterns as integers ordered like the values (adjacent values differ by 1, ±0 both 0)."""
    bits = t.view(torch.int8).long()
    return torch.where(bits < 0, -(bits & 0x7F), bits)


def _assert_fp8_close(x, y, scale, y_ref, scale_ref):
    assert y.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    # x - mean loses |mean| / std of relative precision, so y (and its amax) carry fp32 rounding scaled by it.
    xf = x.float()
    cancellation = 1 + xf.abs().amax(dim=-1) / xf.std(dim=-1, unbiased=False).clamp(min=1e-30)  # [T]
    assert ((scale - scale_ref).abs() <= SCALE_ULPS * 2.0 ** -24 * cancellation * scale_ref).all()
    steps = (_ordinal(y) - _ordinal(y_ref)).abs()
    assert int(steps.max()) <= 1, f"{int((steps > 1).sum())} codes more than one E4M3 step apart"


def _term_bound(x, weight, bias):
    """Allowed |layernorm1p(x) - layernorm1p_ref(x)| per element, fp32 [T, H] (module docstring, GPU): one ulp of
    x's dtype of the terms |x_hat * (1 + w)| + |b|, plus the fp32 statistics noise of the row, amplified by
    |x| / std where the row is far from zero-mean. x_hat uses the reference's own fp32 mean and rstd."""
    xf = x.float()
    _, mean, rstd = torch.native_layer_norm(xf, xf.shape[-1:], None, None, EPS)  # [T, 1] each, as layer_norm's
    w1 = weight.float() + 1.0                                                   # [H]
    terms = ((xf - mean) * rstd * w1).abs() + bias.float().abs()                # [T, H]
    cancellation = 1 + xf.abs().amax(dim=-1, keepdim=True) * rstd               # [T, 1] max|x| / std
    return OUT_ULP[x.dtype] * terms + STAT_ULPS * 2.0 ** -24 * cancellation * w1.abs()


def _assert_within_term_bound(y, y_ref, x, weight, bias):
    err = (y.float() - y_ref.float()).abs()
    allowed = _term_bound(x, weight, bias)
    bad = ~(err <= allowed)                                                     # NaN counts as bad
    if bad.any():
        excess = torch.where(bad, err - allowed, torch.zeros_like(err)).nan_to_num(nan=float("inf"))
        row, col = divmod(int(excess.argmax()), y.shape[1])
        raise AssertionError(
            f"{int(bad.sum())} of {y.numel()} outputs outside the term bound; worst [{row}, {col}]: "
            f"y={float(y[row, col])!r} ref={float(y_ref[row, col])!r} |err|={float(err[row, col]):.3e} "
            f"allowed={float(allowed[row, col]):.3e}; max |err| / allowed = {float((err / allowed).max()):.3f}")


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_kernel_matches_reference(monkeypatch, case):
    num_tokens, hidden, dtype, chunked = case
    if chunked:
        _force_chunks(monkeypatch)
    x, weight, bias = _inputs(num_tokens, hidden, dtype)
    y = layernorm1p(x, weight, bias, EPS)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y, layernorm1p_ref(x, weight, bias, EPS), **TOLERANCE[dtype])


@pytest.mark.parametrize("case", FP8_CASES, ids=_ids)
def test_fp8_kernel_matches_reference(monkeypatch, case):
    num_tokens, hidden, dtype, chunked = case
    if chunked:
        _force_chunks(monkeypatch)
    x, weight, bias = _inputs(num_tokens, hidden, dtype, seed=1)
    y, scale = layernorm1p_fp8(x, weight, bias, EPS)
    y_ref, scale_ref = layernorm1p_fp8_ref(x, weight, bias, EPS)
    _assert_fp8_close(x, y, scale, y_ref, scale_ref)
    # The quantization really uses the range: each row's largest code is (close to) ±448.
    assert (y_ref.float().abs().amax(dim=-1) >= 416).all()


@pytest.mark.parametrize("num_tokens,hidden,dtype", [(1, 1000, BF16), (17, 6144, FP16), (3, 1000, FP32)])
def test_few_rows_walk_wider_chunks(monkeypatch, num_tokens, hidden, dtype):
    """Few rows (decode) over a long H: the chunked kernels with _MAX_ROW_BLOCK-wide chunks and 16 warps (here 256,
    so several chunks and a partial last one), many rows keep _CHUNK; both match the references."""
    monkeypatch.setattr(layernorm, "_MAX_ROW_BLOCK", 256)
    monkeypatch.setattr(layernorm, "_CHUNK", 128)
    assert layernorm._launch_config(hidden, num_tokens) == (256, False, 16)
    assert layernorm._launch_config(hidden, layernorm._FEW_ROWS + 1) == (128, False, 8)
    x, weight, bias = _inputs(num_tokens, hidden, dtype, seed=7)
    torch.testing.assert_close(layernorm1p(x, weight, bias, EPS), layernorm1p_ref(x, weight, bias, EPS),
                               **TOLERANCE[dtype])
    y, scale = layernorm1p_fp8(x, weight, bias, EPS)
    _assert_fp8_close(x, y, scale, *layernorm1p_fp8_ref(x, weight, bias, EPS))


def test_strided_rows():
    """A row stride larger than H (e.g. a slice of a wider activation) is honoured without a copy."""
    x, weight, bias = _inputs(5, 1000, BF16, seed=2)
    wide = torch.zeros(5, 1024, dtype=BF16)
    wide[:, :1000] = x
    torch.testing.assert_close(layernorm1p(wide[:, :1000], weight, bias, EPS), layernorm1p_ref(x, weight, bias, EPS),
                               **TOLERANCE[BF16])


@pytest.mark.parametrize("chunked", [False, True])
def test_fp8_constant_and_zero_rows_give_zeros_not_nan(monkeypatch, chunked):
    """A constant row normalizes to 0; with zero bias y is all zero: scale = FP8_AMAX_EPS / 448, zero codes."""
    if chunked:
        _force_chunks(monkeypatch)
    x = torch.stack([torch.zeros(1000), torch.full((1000,), 3.5)])  # [2, H]
    weight, bias = torch.randn(1000) * 0.1, torch.zeros(1000)
    for fn in (layernorm1p_fp8_ref, layernorm1p_fp8):
        y, scale = fn(x, weight, bias, EPS)
        assert torch.equal(scale, torch.full((2,), FP8_AMAX_EPS) / FP8_E4M3_MAX)
        assert (y.float() == 0).all()
    assert (layernorm1p(x, weight, bias, EPS) == 0).all()


def test_fp8_reference_dequantizes_to_the_normalized_row():
    """The FP8 spec reproduces LayerNorm1P to within E4M3 precision (3 mantissa bits: relative step 2^-3)."""
    x, weight, bias = _inputs(17, 1000, FP32, seed=3)
    y, scale = layernorm1p_fp8_ref(x, weight, bias, EPS)
    expected = layernorm1p_ref(x, weight, bias, EPS)
    dequant = y.float() * scale[:, None]
    # Half a step: 2^-4 relative in the normal range, 2^-10 * scale (half the subnormal step 2^-9) below it.
    bound = 2.0 ** -4 * expected.abs() + 2.0 ** -10 * scale[:, None]
    assert ((dequant - expected).abs() <= bound * (1 + 1e-6)).all()


@pytest.mark.parametrize("hidden", [64, 1000, 6144])
def test_reference_matches_model_in_fp32(hidden):
    x, weight, bias = _inputs(17, hidden, FP32, seed=4)
    norm = LayerNorm1P(hidden, EPS, FP32)
    with torch.no_grad():
        norm.weight.copy_(weight)
        norm.bias.copy_(bias)
        expected = norm(x)
    torch.testing.assert_close(layernorm1p_ref(x, weight, bias, EPS), expected, rtol=1e-5, atol=1e-5)


def test_reference_in_bf16_differs_from_model_within_bound():
    """The model forms weight + 1 in bf16 (the scale rounded by up to 2^-9 relative) and torch's bf16 layer_norm
    (CPU) rounds intermediate terms as well, so in bf16 the two differ by a few bf16 roundings of the terms
    |x_hat * (w + 1)| and |b|, not of y: up to ~4 ulps of y where the bias cancels the normalized term. Measured
    worst case here: 0.67 of this bound."""
    x, weight, bias = _inputs(17, 1000, BF16, seed=5)
    norm = LayerNorm1P(1000, EPS, BF16)
    with torch.no_grad():
        norm.weight.copy_(weight)
        norm.bias.copy_(bias)
        model = norm(x).float()
    ref = layernorm1p_ref(x, weight, bias, EPS).float()
    xf = x.float()
    x_hat = (xf - xf.mean(-1, keepdim=True)) * torch.rsqrt(xf.var(-1, unbiased=False, keepdim=True) + EPS)
    terms = (x_hat * (weight.float() + 1)).abs() + bias.float().abs()
    bound = 2.0 ** -7 * terms + 2.0 ** -8 * ref.abs() + 1e-5
    assert ((ref - model).abs() <= bound).all()


@pytest.mark.parametrize("chunked", [False, True])
def test_term_bound_holds_and_still_catches_bugs(monkeypatch, chunked):
    """The GPU test's bound on the CPU: the (interpreted) kernel is within it, and a reference computed with a wrong
    eps (10x), without the bias or without the + 1 on the weight is not."""
    if chunked:
        _force_chunks(monkeypatch)
    x, weight, bias = _inputs(17, 6144, BF16, seed=6)
    y = layernorm1p(x, weight, bias, EPS)
    _assert_within_term_bound(y, layernorm1p_ref(x, weight, bias, EPS), x, weight, bias)
    for wrong in (layernorm1p_ref(x, weight, bias, 10 * EPS), layernorm1p_ref(x, weight, torch.zeros_like(bias), EPS),
                  layernorm1p_ref(x, weight - 1, bias, EPS)):
        with pytest.raises(AssertionError, match="outside the term bound"):
            _assert_within_term_bound(y, wrong, x, weight, bias)


def test_empty_batch_and_bad_shapes():
    x, weight, bias = _inputs(3, 64, FP32)
    assert layernorm1p(x[:0], weight, bias).shape == (0, 64)
    y, scale = layernorm1p_fp8(x[:0], weight, bias)
    assert y.shape == (0, 64) and scale.shape == (0,)
    for fn in (layernorm1p_ref, layernorm1p, layernorm1p_fp8_ref, layernorm1p_fp8):
        with pytest.raises(ValueError):
            fn(x, weight[:32], bias)
        with pytest.raises(ValueError):
            fn(x[0], weight, bias)


# Realistic shapes: 15B (H = 6144, single-block path) and 340B (H = 18432, chunked path), prefill-sized batches.
GPU_CASES = [(4096, 6144, BF16), (2048, 18432, BF16), (7, 18432, FP16), (1, 6144, FP32)]


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens,hidden,dtype", GPU_CASES)
def test_kernels_match_reference_on_gpu(num_tokens, hidden, dtype):
    x, weight, bias = (t.cuda() for t in _inputs(num_tokens, hidden, dtype, seed=6))
    # Within one output ulp of the terms plus fp32 statistics noise (module docstring: near-zero outputs where the
    # normalized term and the bias cancel fail any bound relative to |y|).
    _assert_within_term_bound(layernorm1p(x, weight, bias, EPS), layernorm1p_ref(x, weight, bias, EPS), x, weight,
                              bias)
    y, scale = layernorm1p_fp8(x, weight, bias, EPS)
    y_ref, scale_ref = layernorm1p_fp8_ref(x, weight, bias, EPS)
    _assert_fp8_close(x.cpu(), y.cpu(), scale.cpu(), y_ref.cpu(), scale_ref.cpu())
