"""Numeric precision of a training run, and the one switch between plain torch and transformer-engine.

`fp32` and `bf16` (autocast over fp32 master weights) run anywhere. `fp8` runs the linear layers as
transformer-engine `te.Linear` inside `te.fp8_autocast` (delayed scaling, E4M3 forward / E5M2 backward,
the "HYBRID" recipe) and everything else in bf16 autocast. Nothing else in the package changes with the
precision: the model asks `Precision.linear` for its projections and the trainer wraps each forward in
`Precision.autocast()`.
"""
from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "fp8")


class PrecisionError(ValueError):
    """A precision this machine cannot run (fp8 without transformer-engine or CUDA)."""


def import_transformer_engine():
    """transformer_engine.pytorch, or None where it is not installed (it has no CPU build)."""
    try:
        return importlib.import_module("transformer_engine.pytorch")
    except ImportError:
        return None


@dataclass(frozen=True)
class Precision:
    name: str
    device: torch.device
    te: object | None = field(default=None, repr=False)  # the transformer_engine.pytorch module for fp8

    def linear(self, in_features: int, out_features: int) -> nn.Module:
        """A bias-free projection with its weight named `weight` [out, in] (as HF checkpoints name it)."""
        if self.te is not None:
            return self.te.Linear(in_features, out_features, bias=False, params_dtype=torch.float32,
                                  device=self.device)
        return nn.Linear(in_features, out_features, bias=False, device=self.device)

    def autocast(self):
        """The context one forward pass runs in."""
        stack = contextlib.ExitStack()
        if self.name in ("bf16", "fp8"):
            stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
        if self.te is not None:
            recipe_module = importlib.import_module("transformer_engine.common.recipe")
            recipe = recipe_module.DelayedScaling(fp8_format=recipe_module.Format.HYBRID,
                                                  amax_history_len=16, amax_compute_algo="max")
            stack.enter_context(self.te.fp8_autocast(enabled=True, fp8_recipe=recipe))
        return stack


def resolve_precision(name: str, device: torch.device | str) -> Precision:
    """Check that `name` can run on `device` here, and load transformer-engine for fp8."""
    device = torch.device(device)
    if name not in PRECISIONS:
        raise PrecisionError(f"--precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if name != "fp8":
        return Precision(name, device)
    if device.type != "cuda":
        raise PrecisionError("--precision fp8 needs a CUDA GPU (FP8 GEMMs run on Hopper/Ada tensor cores); "
                             "use --precision bf16 or fp32 here")
    te = import_transformer_engine()
    if te is None:
        raise PrecisionError("--precision fp8 needs transformer-engine: pip install 'n4-training[fp8]' "
                             "(or use --precision bf16)")
    return Precision(name, device, te)
