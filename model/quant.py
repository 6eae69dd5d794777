"""Linear methods: how a linear layer stores its weight and computes y = x @ W^T.

A parallel linear layer (model/parallel.py) decides its shape and how a checkpoint tensor maps onto it; its
`linear_method` decides which parameters hold the weight and how to multiply with them. That keeps the model file
free of quantization: an FP8 method registers fp8 weights plus scales and runs an FP8 GEMM, with the same layers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
        """down(relu(up(x)) ** 2); a method may fuse the activation into the up-projection's epilogue."""
        return self.apply(down, torch.relu(self.apply(up, x)).square())


class UnquantizedLinearMethod(LinearMethod):
    """Plain weight in the model dtype; y = F.linear(x, weight)."""

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        weight = torch.empty(out_features, in_features, dtype=dtype)  # [out, in]
        layer.weight = nn.Parameter(weight)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight)  # [..., out]

    def squared_relu_mlp(self, up: nn.Module, down: nn.Module, x: torch.Tensor, ops) -> torch.Tensor:
        # The backend's MLP: a Triton GEMM with relu(.)**2 applied on the fp32 accumulator, or its reference.
        return ops.squared_relu_mlp(x, up.weight, down.weight)  # [T, hidden]
