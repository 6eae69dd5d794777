"""The experimental FP8 GEMV (benchmarks/fp8_gemv.py) against kernels.fp8_gemm's reference, under the interpreter:
odd N, ragged K, split-K with a short last split; and its input checks."""
from __future__ import annotations

import pytest
import torch

from benchmarks.fp8_gemv import FP8, GemvConfig, fp8_gemv
from kernels.fp8_gemm import fp8_gemm_ref


def _operands(n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn((1, k), generator=g).to(FP8)
    b = (torch.randn((n, k), generator=g) * 0.5).to(FP8)
    return a, b, torch.tensor([0.02]), torch.rand(n, generator=g) * 0.01 + 1e-3


@pytest.mark.parametrize("n,k,cfg", [
    (200, 640, GemvConfig(32, 128, 4, 2)),            # N not a multiple of BLOCK_N
    (64, 600, GemvConfig(16, 128, 4, 2)),             # ragged K
    (96, 1000, GemvConfig(32, 64, 2, 3, split_k=4)),  # split-K, the last split short and ragged
    (17, 256, GemvConfig(16, 256, 4, 2, split_k=2)),
])
def test_matches_the_gemm_reference(n, k, cfg):
    a, b, sa, sb = _operands(n, k, seed=n + k)
    out = fp8_gemv(a, b, sa, sb, torch.float32, cfg)
    ref = fp8_gemm_ref(a, b, sa, sb, torch.float32)
    # fp32 sums of k exact products in another order: a few ulps of the magnitude.
    mag = (a.float().abs() * sa) @ (b.float().abs() * sb[:, None]).T
    assert ((out - ref).abs() <= 1e-5 * mag + 1e-7).all()


def test_rejects_what_it_does_not_do():
    a, b, sa, sb = _operands(32, 128, seed=1)
    with pytest.raises(ValueError, match="need a \\[1, K\\]"):
        fp8_gemv(torch.cat([a, a]), b, sa, sb)
    with pytest.raises(ValueError, match="b_scale"):
        fp8_gemv(a, b, sa, sb[:3])
    with pytest.raises(ValueError, match="contiguous along K"):
        fp8_gemv(a, b.t().contiguous().t(), sa, sb)


def test_swept_tiles_compile_for_sm90_without_spills():
    """Every tile the GPU sweep times compiles for sm_90 and spills nothing (so no device time goes to a tile
    that cannot run well)."""
    from benchmarks.gpu_sweep import _gemv_case
    from tests.kernels.launch_capture import aot_compile_sm90
    tiles = sorted({(c.block_n, c.block_k, c.num_warps) for c in _gemv_case("15b qkv").configs})
    types = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "c_ptr": "*bf16", "a_scale_ptr": "*fp32", "b_scale_ptr": "*fp32"}
    jobs = [{"module": "benchmarks.fp8_gemv", "kernel": "_fp8_gemv_kernel", "types": types,
             "constexprs": {"EVEN_K": True, "BLOCK_N": bn, "BLOCK_K": bk},
             "divisible": ["N", "K", "k_per_split", "stride_bn"], "num_warps": w, "num_stages": 1,
             "label": f"{bn}x{bk} {w} warps"} for bn, bk, w in tiles]
    for res in aot_compile_sm90(jobs):
        assert res["local"] == 0 and res["regs"] <= 128, res
