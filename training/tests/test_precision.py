"""The precision switch: fp32/bf16 in plain torch, fp8 through transformer-engine where it is importable (a fake
module stands in for it here: TE has no CPU build) and refused with a clear message where it is not."""
from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch
from torch import nn

from model.config import PRESETS
from n4_train import precision as P
from n4_train.modeling import TrainableNemotron


def test_plain_torch_precisions_use_nn_linear():
    for name in ("fp32", "bf16"):
        net = TrainableNemotron(PRESETS["tiny"], P.resolve_precision(name, "cpu"))
        assert type(net.model.layers[0].self_attn.q_proj) is nn.Linear


def test_bf16_autocast_runs_the_matmuls_in_bf16():
    prec = P.resolve_precision("bf16", "cpu")
    layer = prec.linear(8, 4)
    with prec.autocast():
        assert layer(torch.randn(2, 8)).dtype == torch.bfloat16


def test_fp8_is_refused_without_cuda_or_transformer_engine(monkeypatch):
    with pytest.raises(P.PrecisionError, match="CUDA"):
        P.resolve_precision("fp8", "cpu")
    monkeypatch.setattr(P, "import_transformer_engine", lambda: None)
    with pytest.raises(P.PrecisionError, match="transformer-engine"):
        P.resolve_precision("fp8", "cuda")
    with pytest.raises(P.PrecisionError, match="must be one of"):
        P.resolve_precision("fp4", "cpu")


def test_fp8_builds_te_linears_and_enters_fp8_autocast(monkeypatch):
    entered = []

    class FakeTELinear(nn.Linear):
        def __init__(self, in_features, out_features, bias=True, params_dtype=None, device=None):
            super().__init__(in_features, out_features, bias=bias, dtype=params_dtype)

    @contextlib.contextmanager
    def fp8_autocast(enabled, fp8_recipe):
        entered.append((enabled, fp8_recipe))
        yield

    te = types.SimpleNamespace(Linear=FakeTELinear, fp8_autocast=fp8_autocast)
    recipe = types.ModuleType("transformer_engine.common.recipe")
    recipe.Format = types.SimpleNamespace(HYBRID="hybrid")
    recipe.DelayedScaling = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "transformer_engine.common.recipe", recipe)
    monkeypatch.setattr(P, "import_transformer_engine", lambda: te)
    prec = P.resolve_precision("fp8", "cuda")
    prec = P.Precision("fp8", torch.device("cpu"), te)  # the same switch, built on the CPU for the test
    net = TrainableNemotron(PRESETS["tiny"], prec)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert all(isinstance(m, FakeTELinear) for m in linears)  # every projection, the LM head included
    # HF names are unchanged by the switch, so export and loading do not care which linear ran.
    assert "model.layers.0.self_attn.q_proj.weight" in net.hf_state_dict()
    with prec.autocast():
        net(torch.zeros(1, 3, dtype=torch.long))
    assert entered == [(True, {"fp8_format": "hybrid", "amax_history_len": 16, "amax_compute_algo": "max"})]
