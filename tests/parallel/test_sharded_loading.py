"""Sharded loading, in one process: `set_rank_for_loading` gives each rank's shapes without a process group, so
every rank's shard of a BF16/fp32 and of a per-channel FP8 checkpoint is loaded (through LazyTensor slices) and
checked: the shards put together are TP=1's parameters, and each rank holds total/N of the split weights plus the
replicated norms (plus the vocabulary padding of the two vocab-parallel tables)."""
from __future__ import annotations

import pytest
import torch

from model import distributed
from model.config import ModelConfig
from model.loader import load_model
from model.parallel import QKVParallelLinear, RowParallelLinear, VocabParallelEmbedding
from quantize.convert import QuantizeOptions, quantize_checkpoint
from tests.parallel.conftest import CONFIG_340B_LAYOUT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fp8_checkpoint(tp_checkpoint, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tp340b-fp8") / "fp8")
    return quantize_checkpoint(QuantizeOptions(model=tp_checkpoint, output=out, weight_scheme="per-channel",
                                               progress=False))


def _load(path: str, rank: int, world: int):
    distributed.set_rank_for_loading(rank, world)
    try:
        return load_model(path)[0]
    finally:
        distributed.destroy_tensor_parallel()


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _merge(name: str, module, shards: list[torch.Tensor], config: ModelConfig) -> torch.Tensor:
    """TP=1's tensor from the ranks' shards of parameter `name` of `module` (a rank-0 module)."""
    if isinstance(module, VocabParallelEmbedding):
        return torch.cat(shards)[: config.vocab_size]
    if name.endswith("weight_scale") and shards[0].dim() == 0 or "norm" in name:
        assert all(torch.equal(s, shards[0]) for s in shards)  # replicated
        return shards[0]
    if isinstance(module, RowParallelLinear):
        return torch.cat(shards, dim=1) if shards[0].shape[1] > 1 else shards[0]  # per-row scales: replicated
    if isinstance(module, QKVParallelLinear):  # each rank: its q rows, k rows, v rows
        parts = [s.split([module.num_heads * module.head_dim] + [module.num_kv_heads * module.head_dim] * 2)
                 for s in shards]
        return torch.cat([torch.cat([p[i] for p in parts]) for i in range(3)])
    return torch.cat(shards)


@pytest.mark.parametrize("kind", ["fp32", "fp8"])
@pytest.mark.parametrize("world", [2, 8])
def test_each_rank_loads_its_share(tp_checkpoint, fp8_checkpoint, kind, world):
    path = tp_checkpoint if kind == "fp32" else fp8_checkpoint
    full = load_model(path)[0]
    ranks = [_load(path, r, world) for r in range(world)]
    config = CONFIG_340B_LAYOUT
    modules = dict(ranks[0].named_modules())
    for name, param in full.named_parameters():
        module = modules[name.rpartition(".")[0]]
        merged = _merge(name, module, [dict(m.named_parameters())[name] for m in ranks], config)
        assert torch.equal(merged.float(), param.float()), name

    norms = _bytes(p for n, p in full.named_parameters() if "norm" in n)
    vocab_tables = _bytes([full.model.embed_tokens.weight, full.lm_head.weight])
    padded_tables = vocab_tables * (-(-config.vocab_size // world)) // config.vocab_size
    per_tensor_scales = _bytes(p for n, p in full.named_parameters() if p.dim() == 0)
    row_scales = _bytes(p for n, p in full.named_parameters() if n.endswith("weight_scale") and p.dim() == 2
                        and ("o_proj" in n or "down_proj" in n))
    split = _bytes(full.parameters()) - norms - vocab_tables - per_tensor_scales - row_scales
    assert split % world == 0
    expected = split // world + norms + padded_tables + per_tensor_scales + row_scales
    for r, model in enumerate(ranks):
        got = _bytes(model.parameters())
        assert got == expected, (r, got, expected)
        # ≈ total / N plus what is replicated: the replicated part is a few percent of this tiny model.
        assert got <= _bytes(full.parameters()) / world + norms + padded_tables + per_tensor_scales + row_scales
