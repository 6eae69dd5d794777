"""A checkpoint tensor not yet read: under tensor parallelism each rank reads only its slice of a memory-mapped
safetensors file (340B's up_proj is 2.7 GB in FP8; a rank at TP=8 needs 1/8 of it).

Loaders take either a torch.Tensor or a LazyTensor: `narrow` reads just the slice, `materialize` reads all of it
(norms, scales, and every tensor when the whole model is one rank's).
"""
from __future__ import annotations

import torch

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class LazyTensor:
    """One tensor of an open safetensors file (valid while the file is open, i.e. during iteration)."""

    def __init__(self, handle, name: str, on_error=None):
        self._slice = handle.get_slice(name)
        self.name = name
        self.shape = torch.Size(self._slice.get_shape())
        self.dtype = _DTYPES.get(self._slice.get_dtype(), None)
        self._on_error = on_error  # exception -> the exception to raise (naming the file)

    def dim(self) -> int:
        return len(self.shape)

    def _read(self, index) -> torch.Tensor:
        try:
            return self._slice[index]
        except Exception as e:  # noqa: BLE001 — safetensors raises its own error types for truncated files
            raise (self._on_error(e) if self._on_error else e) from None

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = tuple(slice(None) if d != dim else slice(start, start + length) for d in range(self.dim()))
        return self._read(index)

    def materialize(self) -> torch.Tensor:
        if self.dim() == 0:
            return self._read(())  # safetensors returns the scalar tensor for an empty index
        return self._read(tuple(slice(None) for _ in range(self.dim())))


def materialize(t) -> torch.Tensor:
    return t.materialize() if isinstance(t, LazyTensor) else t
