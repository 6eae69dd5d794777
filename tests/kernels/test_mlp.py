"""Fused squared-ReLU MLP (BF16 and FP8 variants) against the references in kernels/mlp.py.

Tolerances (see the module docstring of kernels/mlp.py):
- BF16/FP16/FP32 variant: |out - ref| <= rtol * |ref| + atol * (|h_ref| @ |down_w|.T). The intermediate h is
  rounded to the input dtype at the same point in both, but the kernel's fp32 accumulator differs from the
  reference's by reordering and the interpreter truncates to bf16 where a GPU rounds to nearest, so h may differ by
  one ulp of its dtype (2^-7 bf16, 2^-10 fp16, ~1e-6 fp32 reordering): atol is that ulp, rtol one more ulp for the
  output rounding.
- FP8 variant: the intermediate's group scales agree to rtol 1e-4 (fp32 reordering of the up GEMM, observed ~1e-6);
  its E4M3 codes agree within one E4M3 step, and codes that differ at all are rare (< 0.5%): they are values the
  fp32 noise pushed across a rounding boundary. Outputs: fp8_gemm's tolerance (tests/kernels/test_fp8_gemm.py)
  plus atol 2^-4 * (|h_deq| @ |down_deq|.T) * (fraction of flipped codes + 1e-4) for the flips' contribution.
"""
from __future__ import annotations

import dataclasses
from unittest import mock

import pytest
import torch

from kernels.fp8_gemm import GemmConfig, fp8_gemm
from kernels.fp8_quant import EPS, FP8_MAX, quantize_fp8_per_token
from kernels.mlp import (_BF16_BUCKETS, _FP8_BUCKETS, FP8_DTYPE, _up_squared_relu_fp8, _up_squared_relu_fp8_ref,
                         squared_relu_mlp, squared_relu_mlp_fp8, squared_relu_mlp_fp8_ref, squared_relu_mlp_ref)
from tests.kernels.test_fp8_gemm import SM90_SHARED_BYTES, aot_compile_sm90

# (M, H, I): decode M = 1, odd M with H off the BLOCK_K grid, I off the 128-column group grid (a partial last
# group, and a down projection with K % 128 != 0), and M over the 128 bucket (the 128x256 BF16 tile).
SHAPES = [(1, 128, 256), (17, 200, 384), (64, 256, 200), (130, 128, 256)]
H_ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 1e-6}
OUT_RTOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def _randn(g, *shape):
    return torch.randn(shape, generator=g, device=g.device)


def _bf16_operands(M, H, inter, dtype, seed=0, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    x = _randn(g, M, H)
    up = _randn(g, inter, H) / H ** 0.5
    down = _randn(g, H, inter) / inter ** 0.5
    return x.to(dtype), up.to(dtype), down.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,H,inter", SHAPES)
def test_bf16_variant_matches_ref(M, H, inter, dtype):
    _check_bf16(M, H, inter, dtype)


def test_fp32_variant_matches_ref():
    _check_bf16(17, 200, 384, torch.float32)


def _check_bf16(M, H, inter, dtype):
    x, up, down = _bf16_operands(M, H, inter, dtype)
    out = squared_relu_mlp(x, up, down)
    ref = squared_relu_mlp_ref(x, up, down)
    h_ref = torch.relu(x.float() @ up.float().T).square()
    mag = h_ref @ down.float().abs().T
    assert out.dtype == dtype and out.shape == (M, H)
    err = (out.float() - ref.float()).abs()
    allowed = OUT_RTOL[dtype] * ref.float().abs() + H_ULP[dtype] * mag
    assert (err <= allowed).all(), f"max excess {(err - allowed).max().item():.3e}"


def _bf16_mlp_and_h(x, up, down):
    """squared_relu_mlp(x, up, down) and the intermediate h [M, I] its Triton up projection produced: the BF16 path
    has no separate up-projection wrapper, so h is taken from the one torch.matmul call it makes (the down
    projection) while torch.matmul is wrapped."""
    seen = []
    matmul = torch.matmul

    def spy(a, b, *args, **kwargs):
        seen.append(a)
        return matmul(a, b, *args, **kwargs)

    with mock.patch.object(torch, "matmul", spy):
        out = squared_relu_mlp(x, up, down)
    assert len(seen) == 1, f"squared_relu_mlp made {len(seen)} torch.matmul calls, expected 1"
    return out, seen[0]


def _matmul_fp32_reduction(a, b):
    """torch.matmul(a, b) with allow_bf16_reduced_precision_reduction off (cuBLAS then keeps split-K partials in
    fp32), the flag restored afterwards."""
    flags = torch.backends.cuda.matmul
    saved = flags.allow_bf16_reduced_precision_reduction
    flags.allow_bf16_reduced_precision_reduction = False
    try:
        return torch.matmul(a, b)
    finally:
        flags.allow_bf16_reduced_precision_reduction = saved


def _ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """8-, 16- or 32-bit floats as integers ordered like the values: adjacent floats differ by 1 (one ulp), ±0 are 0."""
    int_dtype, magnitude = {1: (torch.int8, 0x7F), 2: (torch.int16, 0x7FFF), 4: (torch.int32, 0x7FFFFFFF)}[
        t.element_size()]                                                     # E4M3 too: 1-byte codes
    bits = t.view(int_dtype).long()
    return torch.where(bits < 0, -(bits & magnitude), bits)


def _bound_report(out, ref, allowed, mag, h, h_ref, alternatives=None, worst=5) -> str:
    """Why `|out - ref| <= allowed` fails: how many outputs exceed it, and for the `worst` largest excesses the
    element (row, col, out, ref, allowed, mag) and how far the kernel's intermediate h is from the reference's in
    that row (elements that differ, max ulps). `alternatives`: {label: another output of the same product}, each
    summarized by its own count over the same bound and shown beside the worst elements (by the label's part before
    " (")."""
    alternatives = alternatives or {}
    ref32 = ref.float()
    err = (out.float() - ref32).abs()
    bad = ~(err <= allowed)                                                   # NaN counts as bad
    excess = torch.where(bad, (err - allowed).nan_to_num(nan=float("inf")), torch.full_like(err, -float("inf")))
    lines = [f"{int(bad.sum())} of {out.numel()} outputs over the bound; max excess {float(excess.max()):.3e}"]
    alt_err = {}
    for label, alt in alternatives.items():
        alt_err[label] = (alt.float() - ref32).abs()
        over = ~(alt_err[label] <= allowed)
        lines.append(f"{label}: {int(over.sum())} over the bound, max |err| {float(alt_err[label].max()):.3e}, "
                     f"max |err| / allowed {float((alt_err[label] / allowed).max()):.3f}")
    h_ulps = (_ordered_bits(h) - _ordered_bits(h_ref)).abs()                  # [M, I]
    k = min(worst, int(bad.sum()))
    for i in torch.topk(excess.flatten(), k).indices.tolist():
        row, col = divmod(i, out.shape[1])
        line = (f"  [{row}, {col}] out={float(out[row, col])!r} ref={float(ref[row, col])!r} "
                f"|err|={float(err[row, col]):.4e} allowed={float(allowed[row, col]):.4e} "
                f"mag={float(mag[row, col]):.4e}; h row {row}: {int((h_ulps[row] != 0).sum())} of {h.shape[1]} "
                f"differ from the reference's, max {int(h_ulps[row].max())} ulps")
        for label, e in alt_err.items():
            line += f"; |err| {label.split(' (')[0]}: {float(e[row, col]):.4e}"
        lines.append(line)
    return "\n".join(lines)


def _fp8_operands(M, H, inter, x_mode, w_mode, seed=0, device="cpu"):
    """Quantized operands with realistic scales: x per token (or per tensor), weights per channel (or tensor)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = _randn(g, M, H)
    if M > 2:
        x[1] = 0.0  # relu(0)^2 = 0 everywhere: its group scales are EPS / 448, its codes zero
    up = _randn(g, inter, H) / H ** 0.5
    down = _randn(g, H, inter) / inter ** 0.5
    if x_mode == "token":
        xq, xs = quantize_fp8_per_token(x)
    else:
        xs = x.abs().amax().clamp(min=EPS) / FP8_MAX
        xq = (x / xs).to(FP8_DTYPE)

    def weight(w):
        if w_mode == "channel":
            s = w.abs().amax(dim=1) / FP8_MAX                                 # [out]
            return (w / s[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), s
        s = w.abs().amax() / FP8_MAX
        return (w / s).to(FP8_DTYPE), s.reshape(1)

    (upq, ups), (downq, downs) = weight(up), weight(down)
    return xq, xs, upq, ups, downq, downs


# (M, H, I, x scale, weight scales, out dtype): every shape once, each scale kind and output dtype at least once.
FP8_CASES = [
    (1, 128, 256, "token", "channel", torch.bfloat16),
    (17, 200, 384, "token", "tensor", torch.float16),
    (64, 256, 200, "tensor", "channel", torch.float32),
    (130, 128, 256, "token", "channel", torch.bfloat16),
    (17, 128, 384, "tensor", "tensor", torch.bfloat16),
]


@pytest.mark.parametrize("M,H,inter,x_mode,w_mode,out_dtype", FP8_CASES)
def test_fp8_variant_matches_ref(M, H, inter, x_mode, w_mode, out_dtype):
    xq, xs, upq, ups, downq, downs = _fp8_operands(M, H, inter, x_mode, w_mode)

    h, hs = _up_squared_relu_fp8(xq, xs, upq, ups)
    h_ref, hs_ref = _up_squared_relu_fp8_ref(xq, xs, upq, ups)
    groups = -(-inter // 128)
    assert h.dtype == FP8_DTYPE and h.shape == (M, inter) and hs.shape == hs_ref.shape == (M, groups)
    torch.testing.assert_close(hs, hs_ref, rtol=1e-4, atol=0)
    a, b = h.float(), h_ref.float()
    step = torch.where(b.abs() >= 2.0 ** -6, 2.0 ** (torch.floor(torch.log2(b.abs().clamp(min=2.0 ** -6))) - 3),
                       torch.full_like(b, 2.0 ** -9))
    assert ((a - b).abs() <= step).all(), "intermediate codes differ by more than one E4M3 step"
    flipped = (h.view(torch.uint8) != h_ref.view(torch.uint8)).float().mean().item()
    assert flipped < 5e-3
    if M > 2:
        assert torch.equal(hs[1], torch.full((groups,), EPS / FP8_MAX)) and h[1].float().eq(0).all()

    out = squared_relu_mlp_fp8(xq, xs, upq, ups, downq, downs, out_dtype)
    ref = squared_relu_mlp_fp8_ref(xq, xs, upq, ups, downq, downs, out_dtype)
    assert out.dtype == out_dtype and out.shape == (M, H)
    h_deq = h_ref.float() * hs_ref.repeat_interleave(128, dim=1)[:, :inter]
    down_deq = downq.float() * (downs.reshape(-1, 1) if downs.numel() > 1 else downs)
    mag = h_deq.abs() @ down_deq.abs().T
    err = (out.float() - ref.float()).abs()
    allowed = OUT_RTOL[out_dtype] * ref.float().abs() + (1e-5 + 2.0 ** -4 * (flipped + 1e-4)) * mag
    assert (err <= allowed).all(), f"max excess {(err - allowed).max().item():.3e}"


def test_fp8_group_quantization_is_per_128_columns():
    """The reference's intermediate: each 128-column group of a row has its own amax mapped to 448."""
    xq, xs, upq, ups, _, _ = _fp8_operands(5, 128, 300, "token", "channel", seed=1)
    h_fp8, hs = _up_squared_relu_fp8_ref(xq, xs, upq, ups)
    h = torch.relu((xq.float() * xs[:, None]) @ (upq.float() * ups[:, None]).T).square()
    for g, (lo, hi) in enumerate([(0, 128), (128, 256), (256, 300)]):
        amax = h[:, lo:hi].amax(dim=1)
        torch.testing.assert_close(hs[:, g], amax.clamp(min=EPS) / FP8_MAX, rtol=1e-5, atol=0)
        live = amax > EPS
        assert torch.equal(h_fp8[live, lo:hi].float().amax(dim=1), torch.full((int(live.sum()),), FP8_MAX))


def test_bf16_failure_report_on_cpu():
    """The GPU test's diagnostics: h is the kernel's own intermediate (within one bf16 ulp of the reference's: the
    interpreter truncates), the fp32-reduction matmul restores the flag, and a report on an output pushed over the
    bound counts it and names its element and its row of h."""
    x, up, down = _bf16_operands(17, 200, 384, torch.bfloat16)
    out, h = _bf16_mlp_and_h(x, up, down)
    assert torch.equal(out, squared_relu_mlp(x, up, down)) and h.shape == (17, 384) and h.dtype == torch.bfloat16
    h_ref = torch.relu(x.float() @ up.float().T).square()
    assert int((_ordered_bits(h) - _ordered_bits(h_ref.to(torch.bfloat16))).abs().max()) <= 1
    saved = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    assert torch.equal(_matmul_fp32_reduction(h, down.T), torch.matmul(h, down.T))
    assert torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction == saved

    ref = squared_relu_mlp_ref(x, up, down)
    mag = h_ref @ down.float().abs().T
    allowed = 1e-2 * ref.float().abs() + 2.0 ** -7 * mag
    assert _bound_report(out, ref, allowed, mag, h, h_ref.to(torch.bfloat16)).startswith("0 of 3400 outputs")
    bad_out = out.clone()
    bad_out[5, 7] += 1.0
    h_bad = h.clone()
    h_bad[5, 3] = torch.nextafter(h_bad[5, 3].float(), torch.tensor(float("inf"))).to(torch.bfloat16) * 1.01
    report = _bound_report(bad_out, ref, allowed, mag, h_bad, h_ref.to(torch.bfloat16), {"again (same)": bad_out})
    assert report.startswith("1 of 3400 outputs over the bound") and "[5, 7]" in report
    assert "again (same): 1 over the bound" in report and "|err| again:" in report
    assert f"h row 5: {int((_ordered_bits(h_bad[5]) != _ordered_bits(h_ref[5].to(torch.bfloat16))).sum())} of 384" \
        in report


def test_bad_inputs_raise():
    x, up, down = _bf16_operands(3, 64, 128, torch.bfloat16)
    with pytest.raises(ValueError, match="down_w"):
        squared_relu_mlp(x, up, down.T.contiguous()[:, :64])
    with pytest.raises(ValueError, match="share one of"):
        squared_relu_mlp(x, up.float(), down)
    xq, xs, upq, ups, downq, downs = _fp8_operands(3, 128, 256, "token", "channel")
    with pytest.raises(ValueError, match="x_scale"):
        squared_relu_mlp_fp8(xq, torch.ones(3, 1, 1), upq, ups, downq, downs)
    with pytest.raises(ValueError, match="down_scale"):
        squared_relu_mlp_fp8(xq, xs, upq, ups, downq, torch.ones(7))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        squared_relu_mlp_fp8_ref(xq.float(), xs, upq, ups, downq, downs)


@pytest.mark.parametrize("M,H,inter,cfg", [
    (1, 208, 384, GemmConfig(16, 128, 64, 1, 4, 8, tma=True)),      # K off the box: the last box reads zeros
    (70, 256, 200, GemmConfig(64, 128, 128, 8, 4, 3, tma=True)),    # I off the group: columns past I read zeros
])
def test_fp8_up_projection_with_tma_loads(M, H, inter, cfg):
    """The up kernel fed by TMA descriptors (the GPU sweep's variant) computes exactly what the pointer loads do:
    the same tiles and epilogue, so the same intermediate codes and scales."""
    from tests.kernels.launch_capture import capture_launches
    xq, xs, upq, ups, _, _ = _fp8_operands(M, H, inter, "token", "channel")
    with capture_launches() as cap:
        _up_squared_relu_fp8(xq, xs, upq, ups, cfg)
    assert cap.launches[0].args["TMA"] is True
    h, hs = _up_squared_relu_fp8(xq, xs, upq, ups, cfg)
    h_ptr, hs_ptr = _up_squared_relu_fp8(xq, xs, upq, ups, dataclasses.replace(cfg, tma=False))
    assert torch.equal(hs, hs_ptr) and torch.equal(h.view(torch.uint8), h_ptr.view(torch.uint8))
    h_ref, hs_ref = _up_squared_relu_fp8_ref(xq, xs, upq, ups)
    torch.testing.assert_close(hs, hs_ref, rtol=1e-4, atol=0)


def test_compiles_for_sm90_without_spills():
    """Both up-projection kernels, every table entry, compiled for sm_90 (see tests/kernels/test_fp8_gemm.py)."""
    jobs = []
    for bound, cfg in _BF16_BUCKETS:
        jobs.append({
            "module": "kernels.mlp", "kernel": "_up_squared_relu_kernel",
            "types": {"x_ptr": "*bf16", "w_ptr": "*bf16", "h_ptr": "*bf16"},
            "constexprs": {"stride_xk": 1, "stride_wk": 1, "stride_hn": 1, "EVEN_K": True, "UPCAST": False,
                           "DOT_PRECISION": "tf32", "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                           "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m},
            "divisible": ["N", "K", "stride_xm", "stride_wn", "stride_hm"],
            "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "label": f"bf16 M<={bound}"})
    for bound, cfg in _FP8_BUCKETS:
        jobs.append({
            "module": "kernels.mlp", "kernel": "_up_squared_relu_fp8_kernel",
            "types": {"x_ptr": "*fp8e4nv", "w_ptr": "*fp8e4nv", "h_ptr": "*fp8e4nv", "hs_ptr": "*fp32",
                      "xs_ptr": "*fp32", "ws_ptr": "*fp32"},
            "constexprs": {"stride_xk": 1, "stride_wk": 1, "stride_hn": 1, "stride_hsg": 1, "stride_xs": 1,
                           "stride_ws": 1, "X_PER_TOKEN": True, "W_PER_CHANNEL": True, "EVEN_K": True, "EPS": EPS,
                           "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
                           "GROUP_M": cfg.group_m, "TMA": False},
            "divisible": ["N", "K", "stride_xm", "stride_wn", "stride_hm"],
            "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "label": f"fp8 M<={bound}"})
    # The sweep's TMA variants of the FP8 up kernel: descriptors in place of x and w.
    for cfg in (GemmConfig(16, 128, 128, 1, 4, 8, tma=True), GemmConfig(64, 128, 128, 8, 4, 4, tma=True)):
        jobs.append({
            "module": "kernels.mlp", "kernel": "_up_squared_relu_fp8_kernel",
            "types": {"x_ptr": f"tensordesc<fp8e4nv[{cfg.block_m}, {cfg.block_k}]>",
                      "w_ptr": f"tensordesc<fp8e4nv[{cfg.block_n}, {cfg.block_k}]>", "h_ptr": "*fp8e4nv",
                      "hs_ptr": "*fp32", "xs_ptr": "*fp32", "ws_ptr": "*fp32"},
            "constexprs": {"stride_hn": 1, "stride_hsg": 1, "stride_xs": 1, "stride_ws": 1, "X_PER_TOKEN": True,
                           "W_PER_CHANNEL": True, "EVEN_K": True, "EPS": EPS, "BLOCK_M": cfg.block_m,
                           "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m, "TMA": True},
            "divisible": ["N", "K", "stride_hm"], "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
            "label": f"fp8 tma {cfg}"})
    for job, res in zip(jobs, aot_compile_sm90(jobs)):
        assert res["local"] == 0 and res["shared"] <= SM90_SHARED_BYTES, res
        assert res["wgmma"] == (job["constexprs"]["BLOCK_M"] >= 64), res


# ----------------------------------------------------------------------------------------------- GPU (CUDA only)

MODEL_MLPS = {"15b": (6144, 24576), "340b_tp8": (18432, 9216)}  # (H, I per rank)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 64, 512])
@pytest.mark.parametrize("name", list(MODEL_MLPS))
def test_gpu_model_shapes(name, M):
    H, inter = MODEL_MLPS[name]
    x, up, down = _bf16_operands(M, H, inter, torch.bfloat16, device="cuda")
    (out, h), ref = _bf16_mlp_and_h(x, up, down), squared_relu_mlp_ref(x, up, down)
    h_ref = torch.relu(x.float() @ up.float().T).square()                     # [M, I] fp32
    mag = h_ref @ down.float().abs().T
    allowed = 1e-2 * ref.float().abs() + 2.0 ** -7 * mag
    # On failure: which outputs, whether our h differs from the reference's there, and whether the same product
    # with cuBLAS's bf16 split-K reduction off (or with the reference's h) would pass.
    assert ((out.float() - ref.float()).abs() <= allowed).all(), _bound_report(
        out, ref, allowed, mag, h, h_ref.to(x.dtype), {
            "fp32 split-K (our h, allow_bf16_reduced_precision_reduction=False)": _matmul_fp32_reduction(h, down.T),
            "reference h (default cuBLAS flags)": torch.matmul(h_ref.to(x.dtype), down.T)})

    xq, xs, upq, ups, downq, downs = _fp8_operands(M, H, inter, "token", "channel", device="cuda")
    h, hs = _up_squared_relu_fp8(xq, xs, upq, ups)
    h_ref, hs_ref = _up_squared_relu_fp8_ref(xq, xs, upq, ups)
    torch.testing.assert_close(hs, hs_ref, rtol=1e-3, atol=0)  # fp8 wgmma slices: ~1e-4 relative noise
    flipped = (h.view(torch.uint8) != h_ref.view(torch.uint8)).float().mean().item()
    assert flipped < 2e-2
    out = squared_relu_mlp_fp8(xq, xs, upq, ups, downq, downs, torch.bfloat16)
    ref = squared_relu_mlp_fp8_ref(xq, xs, upq, ups, downq, downs, torch.bfloat16)
    h_deq = h_ref.float() * hs_ref.repeat_interleave(128, dim=1)[:, :inter]
    w_abs = (downq.float() * downs[:, None]).abs()                           # [H, I]
    mag = h_deq.abs() @ w_abs.T
    # The kernel's intermediate differs from the reference's where an E4M3 rounding flipped (fp8 wgmma sums 128-wide
    # slices with ~1e-4 relative noise) and by its group scales; what that can move each output by is exactly
    # sum_k |h_ours - h_ref| |w| (triangle inequality), so it enters the bound as computed, not as an average flip
    # rate: an average (2^-4 x the flipped fraction x mag) failed on some 340B-TP8 outputs at M = 64 and 512 on the
    # H200 (2026-11-28), where flips cluster in rows. What is left is the down GEMM's own accumulation (2e-4).
    h_ours = h.float() * hs.repeat_interleave(128, dim=1)[:, :inter]
    moved = (h_ours - h_deq).abs() @ w_abs.T
    allowed = 1e-2 * ref.float().abs() + 2e-4 * mag + 1.01 * moved
    assert ((out.float() - ref.float()).abs() <= allowed).all(), _bound_report(
        out, ref, allowed, mag, h, h_ref, {"down GEMM on the reference's h": fp8_gemm(h_ref, downq, hs_ref, downs,
                                                                                        torch.bfloat16)})


def test_bound_report_reads_fp8_intermediates():
    """The FP8 assertion's report compares E4M3 intermediates code by code (one step = one ulp)."""
    h_ref = torch.tensor([[1.0, 2.0, -0.5, 448.0]]).to(FP8_DTYPE)
    h = h_ref.clone()
    h.view(torch.uint8)[0, 1] += 1                                            # 2.0 -> 2.25: one code up
    out, ref = torch.tensor([[1.0, 3.0]]), torch.tensor([[1.0, 2.0]])
    text = _bound_report(out, ref, torch.full_like(ref, 0.5), torch.ones_like(ref), h, h_ref)
    assert "1 of 2 outputs over the bound" in text and "1 of 4 differ from the reference's, max 1 ulps" in text


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 64])
@pytest.mark.parametrize("name", list(MODEL_MLPS))
def test_gpu_tma_up_projection(name, M):
    """The sweep's TMA-fed up kernel on the model shapes, with the pointer kernel's bounds (test_gpu_model_shapes)."""
    H, inter = MODEL_MLPS[name]
    cfg = GemmConfig(16 if M == 1 else 64, 128, 128, 1, 4, 8 if M == 1 else 4, tma=True)
    xq, xs, upq, ups, _, _ = _fp8_operands(M, H, inter, "token", "channel", device="cuda")
    h, hs = _up_squared_relu_fp8(xq, xs, upq, ups, cfg)
    h_ref, hs_ref = _up_squared_relu_fp8_ref(xq, xs, upq, ups)
    torch.testing.assert_close(hs, hs_ref, rtol=1e-3, atol=0)
    assert (h.view(torch.uint8) != h_ref.view(torch.uint8)).float().mean().item() < 2e-2
