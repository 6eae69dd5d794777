"""model/cpu_gemm.py: fp32 CPU products from MKL-packed weights equal F.linear's, over every row count the engine
can send (the packed path for PACKED_MIN_ROWS..PACKED_MAX_ROWS rows, F.linear outside it), and the fallback
without MKL."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import cpu_gemm

needs_mkl = pytest.mark.skipif(not cpu_gemm.mkl_packing_available(), reason="torch build without MKL's packed GEMM")

# (out, in): the grid model's up / down / qkv projections and lm_head, and odd sizes that are no multiple of any
# register block.
SHAPES = [(2048, 512), (512, 2048), (768, 512), (4096, 512), (33, 17), (1, 5), (130, 64)]
ROWS = [1, 2, 3, 4, 5, 15, 16, 17, 63, 64, 127, 128, 129, 300]


def _fp64_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.double() @ w.double().T)


def _tolerance(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # fp32 accumulation over K terms: a few ulps of the sum of |x_k w_k|, per output element.
    return 8 * torch.finfo(torch.float32).eps * (x.abs().double() @ w.abs().double().T) + 1e-30


@needs_mkl
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_packed_matmul_is_the_fp32_product_for_every_row_count(shape):
    torch.manual_seed(sum(shape))
    w = torch.randn(*shape)                                                  # [N, K]
    packed = cpu_gemm.PackedWeight(w)
    for rows in ROWS:
        x = torch.randn(rows, shape[1])                                      # [M, K]
        got = packed.matmul(x)
        assert got.shape == (rows, shape[0]) and got.dtype == torch.float32
        err = (got.double() - _fp64_product(x, w)).abs()
        assert (err <= _tolerance(x, w)).all(), f"M={rows}: max error {err.max().item():.3e}"
        # Against F.linear: the same fp32 product up to summation order.
        torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5 * shape[1] ** 0.5)


@needs_mkl
def test_packed_matmul_reads_strided_inputs_and_zero_rows():
    w = torch.randn(96, 40)
    packed = cpu_gemm.PackedWeight(w)
    x = torch.randn(40, 16).T                                                # [16, 40], not contiguous
    torch.testing.assert_close(packed.matmul(x), F.linear(x, w), rtol=1e-5, atol=1e-4)
    assert packed.matmul(torch.empty(0, 40)).shape == (0, 96)


@needs_mkl
def test_the_pack_is_a_copy_of_the_weight_at_packing_time():
    w = torch.randn(64, 32)
    packed = cpu_gemm.PackedWeight(w)
    x = torch.randn(8, 32)
    before = packed.matmul(x)
    w.zero_()
    torch.testing.assert_close(packed.matmul(x), before, rtol=0, atol=0)
    assert packed.nbytes >= 64 * 32 * 4


@needs_mkl
@pytest.mark.parametrize("rows", [1, 3, 4, 16, 128, 129, 600])
def test_linear_takes_the_packed_path_only_inside_its_row_range(rows, monkeypatch):
    w = torch.randn(80, 48)
    packed = cpu_gemm.PackedWeight(w)
    calls = []
    real = cpu_gemm.PackedWeight.matmul
    monkeypatch.setattr(cpu_gemm.PackedWeight, "matmul", lambda self, x: calls.append(x.shape) or real(self, x))
    x = torch.randn(rows, 48)
    torch.testing.assert_close(cpu_gemm.linear(x, w, packed), F.linear(x, w), rtol=1e-5, atol=1e-4)
    assert bool(calls) == (cpu_gemm.PACKED_MIN_ROWS <= rows <= cpu_gemm.PACKED_MAX_ROWS)


@needs_mkl
def test_linear_keeps_leading_dimensions():
    w = torch.randn(24, 16)
    x = torch.randn(2, 5, 16)                                                # 10 rows: the packed path
    y = cpu_gemm.linear(x, w, cpu_gemm.PackedWeight(w))
    assert y.shape == (2, 5, 24)
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-4)


def test_linear_without_a_pack_or_for_other_dtypes_is_f_linear():
    w = torch.randn(24, 16)
    x = torch.randn(8, 16)
    torch.testing.assert_close(cpu_gemm.linear(x, w, None), F.linear(x, w), rtol=0, atol=0)
    wb, xb = w.bfloat16(), x.bfloat16()
    assert cpu_gemm.prepare(torch.nn.Parameter(wb, requires_grad=False)) is None
    torch.testing.assert_close(cpu_gemm.linear(xb, wb, None), F.linear(xb, wb), rtol=0, atol=0)


@needs_mkl
def test_prepare_packs_fp32_cpu_weights_and_leaves_them_as_they_were():
    w = torch.nn.Parameter(torch.randn(48, 32), requires_grad=False)
    before = w.detach().clone()
    packed = cpu_gemm.prepare(w)
    assert isinstance(packed, cpu_gemm.PackedWeight) and (packed.out_features, packed.in_features) == (48, 32)
    assert w.is_contiguous() and torch.equal(w, before)
    assert cpu_gemm.prepare(torch.nn.Parameter(torch.randn(4, 3, 2), requires_grad=False)) is None   # not 2-D


def test_without_mkl_fp32_cpu_weights_go_column_major_with_the_same_values(monkeypatch):
    monkeypatch.setattr(cpu_gemm, "_MKL", None)
    assert not cpu_gemm.mkl_packing_available()
    w = torch.nn.Parameter(torch.randn(48, 32), requires_grad=False)
    before = w.detach().clone()
    assert cpu_gemm.prepare(w) is None
    assert w.stride() == (1, 48) and torch.equal(w, before)
    with pytest.raises(RuntimeError, match="not available"):
        cpu_gemm.PackedWeight(before)


@needs_mkl
@pytest.mark.parametrize("bad", [torch.randn(4, 4, dtype=torch.float64), torch.randn(4), torch.randn(2, 2, 2)])
def test_packed_weight_rejects_what_it_cannot_pack(bad):
    with pytest.raises(ValueError, match="2-D float32 CPU weight"):
        cpu_gemm.PackedWeight(bad)
