"""Linear methods: how a linear layer stores its weight and computes y = x @ W^T.

A parallel linear layer (model/parallel.py) decides its shape and how a checkpoint tensor maps onto it; its
`linear_method` decides which parameters hold the weight and how to multiply with them. That keeps the model file
free of quantization: an FP8 method registers fp8 weights plus scales and runs an FP8 GEMM, with the same layers.
The FP8 method is `model.fp8.Fp8LinearMethod`; which FP8 format a checkpoint is in is `model.quant_config`'s call.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from model import cpu_gemm
from model.errors import CheckpointError


class LinearMethod:
    """Strategy object shared by every linear layer of a model (it holds no per-layer state)."""

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        """Register on `layer` the parameters for an [out_features, in_features] weight (at least `weight`)."""
        raise NotImplementedError

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> y [..., out_features]."""
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Hook run once all of `layer`'s parameters are loaded (e.g. to quantize or re-layout them)."""

    def squared_relu_mlp(self, up: nn.Module, down: nn.Module, x: torch.Tensor, ops) -> torch.Tensor:
        """down(relu(up(x)) ** 2); a method may fuse the activation into the up-projection's epilogue. Unfused,
        each projection runs its own layer's method (they differ when a checkpoint leaves one unquantized)."""
        h = torch.relu(up.linear_method.apply(up, x)).square()  # [T, intermediate]
        return down.linear_method.apply(down, h)                 # [T, hidden]

    def describe(self) -> str:
        """The weight format, for the startup log."""
        return "unquantized"


class UnquantizedLinearMethod(LinearMethod):
    """Plain weight in the model dtype; y = x @ weight^T (F.linear, or MKL's packed GEMM for fp32 on the CPU)."""

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        weight = torch.empty(out_features, in_features, dtype=dtype)  # [out, in]
        layer.weight = nn.Parameter(weight)
        layer.weight.weight_loader = functools.partial(_load_plain_weight, layer)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return cpu_gemm.linear(x, layer.weight, getattr(layer, "cpu_packed_weight", None))  # [..., out]

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        # fp32 on the CPU: packed once for MKL's GEMM (model/cpu_gemm.py); a no-op for any other weight.
        layer.cpu_packed_weight = cpu_gemm.prepare(layer.weight)

    def squared_relu_mlp(self, up: nn.Module, down: nn.Module, x: torch.Tensor, ops) -> torch.Tensor:
        if not isinstance(down.linear_method, UnquantizedLinearMethod):
            return super().squared_relu_mlp(up, down, x, ops)  # down_proj is quantized, up_proj not
        if ops.name == "torch" and getattr(up, "cpu_packed_weight", None) is not None:
            # The reference's math (relu(x @ up^T) ** 2 @ down^T in fp32, in place) over the packed CPU GEMMs.
            return self.apply(down, self.apply(up, x).relu_().square_())  # [T, hidden]
        # The backend's MLP: a Triton GEMM with relu(.)**2 applied on the fp32 accumulator, or its reference.
        return ops.squared_relu_mlp(x, up.weight, down.weight)  # [T, hidden]


def _load_plain_weight(layer: nn.Module, param: torch.Tensor, loaded, shard_id: str | None = None) -> None:
    """The layer's own loader, after refusing an FP8 tensor: an unquantized layer has no scale for it, and casting
    E4M3 values to the model dtype as they are would load the weight off by its scale (for a whole checkpoint, one
    whose quantization config is missing; for one layer, a layer its config says is not quantized)."""
    if loaded.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise CheckpointError(f"found an FP8 weight ({loaded.dtype}) for a layer that the checkpoint's quantization "
                              f"config (if it has one) leaves unquantized, and so no scale to dequantize it with")
    if shard_id is None:
        layer.weight_loader(param, loaded)
    else:
        layer.weight_loader(param, loaded, shard_id)


# ---- The FP8 checkpoint format (defined here once; `n4 quantize` writes it, the loader reads it) ------------
#
# HF `config.json` carries `quantization_config = {"quant_method": "fp8", "activation_scheme": "dynamic" |
# "static", "ignored_layers": [...]}` (vLLM's reading). Per quantized linear layer `X`:
#   X.weight        float8_e4m3fn [out, in]
#   X.weight_scale  float32, [] (per tensor) or [out, 1] (per output channel)
#   X.input_scale   float32 [] (static activations only)
# per attention layer, for an FP8 KV cache: `self_attn.k_scale`, `self_attn.v_scale` float32 [].
# Dequantized = fp8.float() * scale, with scale = max(amax, SCALE_EPS) / 448.

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE_EPS = 1e-12   # an all-zero tensor gets a tiny positive scale, never 0 (which would make 0/0 on load)
QUANT_METHOD = "fp8"
WEIGHT_SCALE, INPUT_SCALE, K_SCALE, V_SCALE = "weight_scale", "input_scale", "k_scale", "v_scale"


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """The E4M3 scale for values of magnitude up to `amax` (fp32), an IEEE division on every device: divided by a
    0-dim tensor, because CUDA turns `tensor / python_float` into a reciprocal multiply (kernels/fp8_quant.ieee_div)."""
    return amax.float().clamp(min=SCALE_EPS) / torch.full((), FP8_MAX, dtype=torch.float32, device=amax.device)


def quantize_weight_fp8(weight: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (E4M3 [out, in], fp32 scale [] or [out, 1]): q = e4m3(clamp(w / scale, +-448)),
    rounded to nearest even by torch's cast. Division (not a reciprocal multiply) so that any implementation
    that states the formula reproduces it bit for bit."""
    w = weight.float()                                                              # [out, in]
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()     # [out, 1] or []
    scale = fp8_scale(amax)
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale
