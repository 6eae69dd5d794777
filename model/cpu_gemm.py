"""fp32 linear layers on the CPU: the weight packed once for MKL's GEMM (`cblas_sgemm_pack`), then every product
taken from the packed copy (`cblas_sgemm_compute`), through ctypes on the MKL inside torch's CPU build.

Why: `F.linear` calls MKL's sgemm, which packs the whole weight into its blocked layout on every call. At the row
counts of decode (one row per sequence: 1 to a few dozen) that packing costs as much as the multiply itself. Packed
once at load, on the 2-core CI machine (2 threads): a [2048, 512] weight at M = 16 takes 117 instead of 147 us
with warm caches, and a batch-16 decode step of the 8-layer, 512-wide grid model went from 19.3 to ~16.5 ms.
Prefill-sized inputs keep `F.linear`, where the per-call packing is amortized (M = 2048: 13.6 ms plain against
14.6 ms packed), and so do 1 to 3 rows, where the plain call is as fast or faster (measured below): `linear` takes
the packed path for PACKED_MIN_ROWS to PACKED_MAX_ROWS rows.

MKL documents the m of `cblas_sgemm_pack` as the row count of A and C. The packed B does not depend on it in
practice: for every M from 2 to 2048 the products from a pack made for m = 16 are bit-identical to those from a
pack made for that M, and the buffer size is the same. tests/model/test_cpu_gemm.py checks the products against
`F.linear` over M = 1 .. 300, so an MKL that behaved otherwise fails CI instead of serving wrong numbers.

The cost is memory: the pack is a second copy of the weight plus a fixed ~9 MB per matrix (MKL's sizing: 3.1x a
[2048, 512] weight, 2.2x a [4096, 512] lm_head, nearer 1x the larger the matrix); the grid model's 92 MB of weights
take ~0.4 GB more. The plain weight stays as loaded (row-major), the faster layout for 1 to 3 rows. Without MKL
(another platform, or a torch without it), fp32 CPU weights are instead stored column-major
(`use_cpu_gemm_layout`), which gives `F.linear` its faster transposed-B path at decode batch sizes.
"""
from __future__ import annotations

import ctypes
import os

import torch
import torch.nn.functional as F

# The packed path's row range. Below it the plain weight is as fast or faster: the
# grid model's decode step, medians of 6 interleaved runs in one process, plain vs packed: batch 1 9.05 vs 9.46 ms,
# 2: 9.48 vs 10.13, 4: 12.62 vs 12.04, 8: 15.58 vs 14.58, 16: 23.1 vs 17.7 (min 19.2 vs 15.2). Above it the
# per-call packing is amortized ([2048, 512], 2 threads: packed 459 vs plain 517 us at M = 64, 2058 vs 2002 at 300).
PACKED_MIN_ROWS = 4
PACKED_MAX_ROWS = 128
_PACK_ROWS = 16         # the m given to cblas_sgemm_pack (see the module docstring: the pack does not depend on it)

# CBLAS enum values (mkl_cblas.h).
_ROW_MAJOR, _NO_TRANS, _TRANS, _B_MATRIX, _PACKED = 101, 111, 112, 162, 151


def _load_mkl():
    """The three packed-GEMM entry points from torch's own library, or None where they are not there."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        get_size, pack, compute = lib.cblas_sgemm_pack_get_size, lib.cblas_sgemm_pack, lib.cblas_sgemm_compute
    except (OSError, AttributeError):
        return None
    i, p, f = ctypes.c_int, ctypes.c_void_p, ctypes.c_float   # MKL_INT is 32-bit in torch's LP64 MKL
    get_size.restype, get_size.argtypes = ctypes.c_size_t, [i, i, i, i]
    pack.restype, pack.argtypes = None, [i, i, i, i, i, i, f, p, i, p]
    compute.restype, compute.argtypes = None, [i, i, i, i, i, i, p, i, p, i, f, p, i]
    return get_size, pack, compute


_MKL = _load_mkl()


def mkl_packing_available() -> bool:
    return _MKL is not None


def use_cpu_gemm_layout(weight: torch.nn.Parameter) -> None:
    """Store an fp32 CPU weight [out, in] column-major (strides (1, out)); same shape and values, so every op
    reading it gives the same result, but the CPU GEMM is faster on x @ W^T with W^T contiguous. The grid model's
    decode step at batch 16, 2 threads: 23.6 -> 20.5 ms; a [4096, 512] lm_head at M = 16: 1.25 -> 0.81 ms with
    cold caches. The fallback where MKL's packed GEMM is not available."""
    if weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2:
        weight.data = weight.data.t().contiguous().t()


class PackedWeight:
    """One weight [N, K] packed for MKL. The pack is a copy: repack after changing the weight. It must stay at its
    address (MKL keeps aligned metadata inside it), so it is a plain attribute, never a parameter or buffer that
    `.to()` or a state dict could move or copy."""

    def __init__(self, weight: torch.Tensor):
        if _MKL is None:
            raise RuntimeError("MKL's packed GEMM is not available in this torch build")
        if weight.dim() != 2 or weight.dtype != torch.float32 or weight.device.type != "cpu":
            raise ValueError(f"PackedWeight takes a 2-D float32 CPU weight, got {weight.dtype} "
                             f"{list(weight.shape)} on {weight.device}")
        get_size, pack, _ = _MKL
        self.out_features, self.in_features = weight.shape
        n, k = self.out_features, self.in_features
        source = weight.detach().contiguous()                                    # [N, K] row-major
        self._buffer = torch.empty(get_size(_B_MATRIX, _PACK_ROWS, n, k), dtype=torch.uint8)
        # op(B) = W^T ([K, N]) from the row-major [N, K] source: trans = T with leading dimension K.
        pack(_ROW_MAJOR, _B_MATRIX, _TRANS, _PACK_ROWS, n, k, 1.0, source.data_ptr(), k, self._buffer.data_ptr())

    @property
    def nbytes(self) -> int:
        return self._buffer.numel()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] float32 -> x @ W^T [M, N] float32."""
        _, _, compute = _MKL
        rows = x.shape[0]
        out = torch.empty(rows, self.out_features, dtype=torch.float32)      # [M, N]
        if rows:
            x = x.contiguous()
            compute(_ROW_MAJOR, _NO_TRANS, _PACKED, rows, self.out_features, self.in_features, x.data_ptr(),
                    self.in_features, self._buffer.data_ptr(), 0, 0.0, out.data_ptr(), self.out_features)
        return out


def prepare(weight: torch.nn.Parameter) -> PackedWeight | None:
    """Called once a layer's weight is loaded: an fp32 CPU weight is packed for MKL (returned) or, without MKL,
    re-laid out column-major (None returned). Any other weight is left alone."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2:
        return None
    if _MKL is None:
        use_cpu_gemm_layout(weight)
        return None
    return PackedWeight(weight.data)


def linear(x: torch.Tensor, weight: torch.Tensor, packed: PackedWeight | None) -> torch.Tensor:
    """x [..., K] @ weight^T -> [..., N]: from the packed weight for decode-sized inputs, else F.linear."""
    if packed is None or x.dtype != torch.float32 or x.device.type != "cpu":
        return F.linear(x, weight)
    rows = x.numel() // x.shape[-1]
    if not PACKED_MIN_ROWS <= rows <= PACKED_MAX_ROWS:
        return F.linear(x, weight)
    return packed.matmul(x.reshape(rows, x.shape[-1])).view(*x.shape[:-1], packed.out_features)
