"""The FP8 linear method: E4M3 weights with fp32 scales, activations quantized to E4M3 on the fly, FP8 GEMMs.

Everything FP8 about a linear layer lives here, so the model and the parallel layers stay dtype-agnostic:
- `create_weights` registers `weight` (float8_e4m3fn [out, in]), `weight_scale` (fp32: one per fused shard while
  loading, [] after; or [out, 1] per output channel) and, for static activations, `input_scale` (one per shard,
  [] after loading). Each parameter carries its own `weight_loader`, which checks what the checkpoint holds and then
  goes through the layer's loader, so scales follow the same shard (and, later, rank) mapping as weights.
- `process_weights_after_loading` turns per-shard scales into one: fused q/k/v shards with different per-tensor
  scales become one per-row scale (exact; REFERENCE.md's requantize-to-max re-rounds, and only a GEMM with a single
  scale needs it), static input scales take the max of the three.
- `apply` quantizes x (per token, or per tensor with the static input_scale) and runs the FP8 GEMM of the kernel
  backend: `kernels.fp8_gemm.fp8_gemm` (Triton) or `torch._scaled_mm` (torch backend on the CPU; the reference
  `fp8_gemm_ref` elsewhere). `squared_relu_mlp` runs the fused FP8 MLP, whose intermediate both backends quantize
  per token per 128 columns.

Quantizing at load (QuantConfig.online(), `--quantization fp8`): the weight loader receives a bf16/fp16/fp32
tensor, quantizes it per output channel on the parameter's device and keeps only the E4M3 values and scales, so a
checkpoint never sits in memory at high precision: the peak is the FP8 model plus one tensor being converted (in
FP8, and a few row chunks of it in fp32).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from model import distributed
from model.errors import CheckpointError
from model.lazy_tensor import materialize
from model.quant import FP8_DTYPE, FP8_MAX, LinearMethod, fp8_scale
from model.quant_config import QuantConfig


# Quantizing at load converts this many weight elements at a time: its fp32 temporaries (the upcast, the quotient,
# the clamp) stay ~48 MiB, where converting 340B's whole [73728, 18432] up_proj at once would take ~16 GB.
_QUANTIZE_CHUNK = 1 << 22


@dataclass(frozen=True)
class _Fp8Kernels:
    quantize_per_token: Callable   # x [M, K] -> (e4m3 [M, K], scale [M])
    quantize_per_tensor: Callable  # (x, scale [] or None) -> (e4m3, scale [])
    gemm: Callable                 # (a [M, K], b [N, K], a_scale, b_scale, out_dtype) -> [M, N]
    mlp: Callable                  # squared_relu_mlp_fp8's signature


def _kernels(backend: str) -> _Fp8Kernels:
    from kernels import fp8_gemm, fp8_quant, mlp
    if backend == "triton":
        return _Fp8Kernels(fp8_quant.quantize_fp8_per_token, fp8_quant.quantize_fp8_per_tensor, fp8_gemm.fp8_gemm,
                           mlp.squared_relu_mlp_fp8)
    if backend == "torch":
        return _Fp8Kernels(fp8_quant.quantize_fp8_per_token_ref, fp8_quant.quantize_fp8_per_tensor_ref,
                           _torch_fp8_gemm, mlp.squared_relu_mlp_fp8_ref)
    raise ValueError(f"kernel backend must be 'torch' or 'triton', got {backend!r}")


def _torch_fp8_gemm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                    out_dtype: torch.dtype) -> torch.Tensor:
    """fp8_gemm_ref's contract through torch._scaled_mm on the CPU. torch 2.13's CPU _scaled_mm takes two one-element
    scales, or row-wise [M, 1] and [1, N] contiguous ones, but no mix of the two (a per-tensor weight with per-token
    activations) and no stride-0 expansion: such scales are expanded into real [M, 1] / [1, N] tensors, which
    is the same product. Other devices take the reference: the torch backend is the specification there, and the
    Triton backend is what runs on GPUs."""
    if a.device.type != "cpu":
        from kernels.fp8_gemm import fp8_gemm_ref
        return fp8_gemm_ref(a, b, a_scale, b_scale, out_dtype)
    M, N = a.shape[0], b.shape[0]
    if a_scale.numel() == 1 and b_scale.numel() == 1:
        sa, sb = a_scale.reshape(()).float(), b_scale.reshape(()).float()
    else:
        sa = a_scale.float().reshape(-1, 1).expand(M, 1).contiguous()       # [M, 1]
        sb = b_scale.float().reshape(1, -1).expand(1, N).contiguous()       # [1, N]
    return torch._scaled_mm(a.contiguous(), b.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)  # [M, N]


def _shard_ids(layer: nn.Module) -> list[str | None]:
    """The checkpoint tensors fused into `layer` ("q", "k", "v" for the QKV projection), else [None]."""
    slices = getattr(layer, "output_slices", None)
    return list(slices()) if slices is not None else [None]


def _layer_load(layer: nn.Module, param: torch.Tensor, loaded, shard_id: str | None) -> None:
    """Through the layer's own loader: it knows where a shard's rows go and, with several ranks, which slice."""
    if shard_id is None:
        layer.weight_loader(param, loaded)
    else:
        layer.weight_loader(param, loaded, shard_id)


def _check_scale(loaded: torch.Tensor, positive: bool) -> None:
    if not loaded.is_floating_point():
        raise CheckpointError(f"a scale must be a floating-point tensor, found {loaded.dtype}")
    bad = ~torch.isfinite(loaded) | ((loaded <= 0) if positive else (loaded < 0))
    if bad.any():
        raise CheckpointError(f"scales must be finite and {'positive' if positive else 'non-negative'}, found "
                              f"{loaded.flatten()[bad.flatten()][0].item()}")


def _attach(layer: nn.Module, name: str, data: torch.Tensor, loader: Callable | None,
            computed_at_load: bool = False) -> None:
    param = nn.Parameter(data, requires_grad=False)
    if loader is not None:
        param.weight_loader = functools.partial(loader, layer)
    if computed_at_load:
        param.computed_at_load = True  # no checkpoint tensor: the weight's loader fills it
    setattr(layer, name, param)


class Fp8LinearMethod(LinearMethod):
    """FP8 E4M3 weights and activations for every linear layer of a model, configured by a QuantConfig."""

    def __init__(self, quant: QuantConfig, kernel_backend: str = "torch"):
        self.quant = quant
        self.kernel_backend = kernel_backend
        self.per_channel = quant.weight_granularity == "channel"
        self.static = quant.activation_scheme == "static"
        self.kernels = _kernels(kernel_backend)

    def describe(self) -> str:
        return self.quant.describe()

    # ---- parameters and their loaders ---------------------------------------------------------------------

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        shards = len(_shard_ids(layer))
        online = not self.quant.quantized_checkpoint
        weight = torch.empty(out_features, in_features, dtype=FP8_DTYPE)                  # [out, in] e4m3
        _attach(layer, "weight", weight, _load_and_quantize if online else _load_fp8_weight)
        if self.per_channel:
            scale = torch.empty(out_features, 1, dtype=torch.float32)                     # [out, 1]
            _attach(layer, "weight_scale", scale, None if online else _load_channel_scale, computed_at_load=online)
        else:
            scale = torch.empty(shards, dtype=torch.float32)                              # [shards] until loaded
            _attach(layer, "weight_scale", scale, functools.partial(_load_tensor_scale, positive=False))
        if self.static:
            input_scale = torch.empty(shards, dtype=torch.float32)                        # [shards] until loaded
            _attach(layer, "input_scale", input_scale, functools.partial(_load_tensor_scale, positive=True))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if not self.per_channel and layer.weight_scale.dim() == 1:
            scales = layer.weight_scale.detach()                                           # [shards]
            if len(scales) > 1 and not bool((scales == scales[0]).all()):
                # Fused q/k/v with different per-tensor scales: spread them over their rows as one per-channel
                # scale. Exact (vLLM instead re-rounds the shards to the largest scale, because its GEMM takes
                # one scale; ours takes a scale per output row at no extra cost).
                sizes = [size for _, size in layer.output_slices().values()]
                per_row = torch.repeat_interleave(scales, torch.tensor(sizes, device=scales.device))
                layer.weight_scale = nn.Parameter(per_row.reshape(-1, 1), requires_grad=False)  # [out, 1]
            else:
                layer.weight_scale = nn.Parameter(scales[0].reshape(()), requires_grad=False)  # []
        if self.static and layer.input_scale.dim() == 1:
            # One static scale for the fused input: the largest calibrated range covers q's, k's and v's.
            layer.input_scale = nn.Parameter(layer.input_scale.detach().max().reshape(()), requires_grad=False)

    # ---- compute ------------------------------------------------------------------------------------------

    def _quantize_input(self, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, in] -> (e4m3 [T, in], scale [T] dynamic per token | [] static)."""
        if self.static:
            return self.kernels.quantize_per_tensor(x, layer.input_scale)
        return self.kernels.quantize_per_token(x)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])                                                    # [T, in]
        x_fp8, x_scale = self._quantize_input(layer, x2)                                   # [T, in], [T] or []
        y = self.kernels.gemm(x_fp8, layer.weight, x_scale, layer.weight_scale, x.dtype)  # [T, out]
        return y.reshape(*lead, y.shape[-1])                                               # [..., out]

    def squared_relu_mlp(self, up: nn.Module, down: nn.Module, x: torch.Tensor, ops) -> torch.Tensor:
        if up.linear_method is not self or down.linear_method is not self:  # one of them is ignored (unquantized)
            return super().squared_relu_mlp(up, down, x, ops)
        # down_proj's static input_scale, if any, goes unused: the intermediate is quantized per token per 128
        # columns inside the fused kernel, which is never coarser than one static scale.
        x_fp8, x_scale = self._quantize_input(up, x)                                       # [T, hidden], [T] or []
        return self.kernels.mlp(x_fp8, x_scale, up.weight, up.weight_scale, down.weight, down.weight_scale,
                                x.dtype)                                                    # [T, hidden]


def _load_fp8_weight(layer: nn.Module, param: torch.Tensor, loaded: torch.Tensor, shard_id: str | None = None):
    if loaded.dtype != FP8_DTYPE:
        raise CheckpointError(f"expected an FP8 E4M3 weight ({FP8_DTYPE}) as the checkpoint's quantization config "
                              f"says, found {loaded.dtype}")
    _layer_load(layer, param, loaded, shard_id)


def _load_channel_scale(layer: nn.Module, param: torch.Tensor, loaded: torch.Tensor, shard_id: str | None = None):
    """A per-output-channel scale, stored [rows] or [rows, 1]; rows land where the weight's rows do (split with
    them by a column-parallel layer, whole on every rank of a row-parallel one)."""
    loaded = materialize(loaded)
    _check_scale(loaded, positive=False)
    column = loaded.float().reshape(-1, 1) if loaded.dim() == 1 else loaded.float()       # [rows, 1]
    _layer_load(layer, param, column, shard_id)


def _load_tensor_scale(layer: nn.Module, param: torch.Tensor, loaded: torch.Tensor, shard_id: str | None = None,
                       positive: bool = True):
    """A per-tensor scale ([] or [1]) into its shard's slot. Multi-rank: per-tensor scales are replicated."""
    loaded = materialize(loaded)
    if loaded.numel() != 1:
        raise CheckpointError(f"expected one value (a per-tensor scale), found shape {list(loaded.shape)}")
    _check_scale(loaded, positive)
    shards = _shard_ids(layer)
    if shard_id not in shards:
        raise CheckpointError(f"no shard {shard_id!r} in this layer (shards: {shards})")
    with torch.no_grad():
        param[shards.index(shard_id)] = loaded.reshape(()).float()


def _load_and_quantize(layer: nn.Module, param: torch.Tensor, loaded, shard_id: str | None = None):
    """A high-precision weight (shard) -> E4M3 per output channel into `weight`, its scales into `weight_scale`.

    Each rank quantizes only its slice. A row's scale is that of the whole row, as at one rank: a row-parallel
    rank holds a K-slice of each row, so the slices' amaxes are max-reduced over the ranks first (one [out, 1]
    all-reduce per layer at load). The stored bytes are therefore the same at every tensor-parallel size."""
    local = layer.rank_slice(param, loaded, shard_id)                                      # [rows, in of rank]
    if not local.is_floating_point() or local.element_size() < 2:
        raise CheckpointError(f"quantizing at load (--quantization fp8) needs a bf16/fp16/fp32 weight, found "
                              f"{local.dtype}")
    rows, cols = local.shape
    step = max(1, _QUANTIZE_CHUNK // max(cols, 1))
    amax = torch.empty(rows, 1, dtype=torch.float32, device=param.device)                  # [rows, 1]
    for r in range(0, rows, step):  # chunks bound the fp32 temporaries; rows are independent
        amax[r:r + step] = local[r:r + step].to(param.device).float().abs().amax(dim=1, keepdim=True)
    if getattr(layer, "splits_input", False):
        distributed.all_reduce(amax, op="max")
    scale = fp8_scale(amax)                                                                 # [rows, 1]
    w_fp8 = torch.empty(rows, cols, dtype=FP8_DTYPE, device=param.device)                  # [rows, in of rank]
    for r in range(0, rows, step):  # quant.quantize_weight_fp8's formula (division, clamp, RNE cast)
        chunk = local[r:r + step].to(param.device).float()
        w_fp8[r:r + step] = (chunk / scale[r:r + step]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    layer.place(param, w_fp8, shard_id)
    layer.place(layer.weight_scale, scale, shard_id)
