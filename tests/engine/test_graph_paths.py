"""The decode-graph paths checked without a GPU: which kernel backends may be captured, that the captured forward
(`DecodeGraphs._forward`) makes no host sync, and that padded graph batches over the Triton kernels (interpreted)
leave no trace of stale static-buffer rows, read no stale block-table column and write no real cache slot."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model.attention_metadata import AttentionMetadata
from model.config import ModelConfig
from model.loader import load_model
from server.engine import model_runner
from server.engine.config import EngineConfig
from server.engine.cuda_graphs import DecodeGraphs
from tests.utils import make_tiny_checkpoint

CONFIG = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                     torch_dtype="float32")
BLOCK_SIZE, NUM_BLOCKS, TRAP = 4, 32, 31


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt")), CONFIG, seed=1)


# ---- which backends are captured -----------------------------------------------------------------------------

class _Model(torch.nn.Module):
    def __init__(self, backend: str):
        super().__init__()
        self.kernel_backend = backend


@pytest.mark.parametrize("backend, graphed", [("torch", False), ("triton", True)])
def test_only_the_triton_backend_is_captured_on_cuda(monkeypatch, backend, graphed):
    """A CUDA runner on the torch backend used to capture the references, whose host syncs fail a capture."""
    built = []

    class Recorder:
        def __init__(self, *args, **kwargs):
            built.append(args)

        def capture_all(self):
            pass

    monkeypatch.setattr(model_runner, "DecodeGraphs", Recorder)
    monkeypatch.setattr(model_runner, "allocate_kv_caches", lambda *a, **k: [])  # no CUDA here
    config = EngineConfig(device="cuda", kernel_backend=backend, max_model_len=64, max_num_seqs=8)
    runner = model_runner.ModelRunner(_Model(backend), CONFIG, config, num_blocks=16, kv_cache_dtype=torch.float32)
    assert (runner.graphs is not None) == graphed and len(built) == int(graphed)
    eager = EngineConfig(device="cuda", kernel_backend=backend, max_model_len=64, max_num_seqs=8, enforce_eager=True)
    assert model_runner.ModelRunner(_Model(backend), CONFIG, eager, 16, torch.float32).graphs is None


# ---- no host sync in what is captured ---------------------------------------------------------------------------

# Ops that read device memory on the host (a sync a capturing stream refuses) or whose output shape depends on it.
_SYNC_OPS = ("aten.nonzero", "aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal",
             "aten.masked_select", "aten.unique", "aten._unique", "aten.repeat_interleave")


class _SyncRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        bool_index = name.startswith(("aten.index.", "aten.index_put")) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ())
        if name.startswith(_SYNC_OPS) or bool_index:
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


def _graphs(model, kv_dtype=torch.float32) -> tuple[DecodeGraphs, list[torch.Tensor]]:
    caches = [torch.randn(2, NUM_BLOCKS, BLOCK_SIZE, 2, 8, generator=torch.Generator().manual_seed(i)).to(kv_dtype)
              for i in range(CONFIG.num_hidden_layers)]
    return DecodeGraphs(model, caches, max_batch_size=16, max_blocks_per_seq=8, max_model_len=32,
                        device=torch.device("cpu"), capture=False), caches


@pytest.mark.parametrize("quantization, kv_dtype", [(None, torch.float32), ("fp8", torch.float8_e4m3fn)])
def test_the_captured_triton_forward_makes_no_host_sync(checkpoint, quantization, kv_dtype):
    model, _ = load_model(checkpoint, dtype="float32", kernel_backend="triton", quantization=quantization,
                          kv_cache_dtype="fp8" if kv_dtype == torch.float8_e4m3fn else "auto")
    graphs, _ = _graphs(model, kv_dtype)
    with torch.inference_mode(), _SyncRecorder() as recorder:
        graphs._forward(8)
    assert recorder.syncs == []


def test_the_torch_backend_syncs_which_is_why_it_is_not_captured(checkpoint):
    model, _ = load_model(checkpoint, dtype="float32", kernel_backend="torch")
    graphs, _ = _graphs(model)
    with torch.inference_mode(), _SyncRecorder() as recorder:
        graphs._forward(8)
    assert "aten.nonzero.default" in recorder.syncs


# ---- padded graph batches over the kernels ----------------------------------------------------------------------

# The interpreter warns on the padding rows' NaN (they read block 0); those rows are dropped.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_stale_static_rows_and_columns_leave_no_trace(checkpoint, backend):
    """Five decode rows padded to 8 after a larger, wider batch: stale ids, positions, seq_lens, a stale real slot
    in the padding rows and stale block-table columns pointing at a NaN block. Block 0 (what padding rows read) holds
    NaN too: the padding rows' garbage must stay in their own rows."""
    model, _ = load_model(checkpoint, dtype="float32", kernel_backend=backend)
    graphs, caches = _graphs(model)
    for cache in caches:
        cache[:, 0] = float("nan")
        cache[:, TRAP] = float("nan")
    seq_lens = [1, 5, 9, 4, 13]
    tables = [[1], [2, 3], [4, 5, 6], [7], [8, 9, 10, 11]]
    metadata = AttentionMetadata.build([1] * 5, seq_lens, tables, BLOCK_SIZE)
    input_ids = torch.tensor([3, 14, 15, 92, 65])
    positions = torch.tensor([n - 1 for n in seq_lens])
    before = [c.clone() for c in caches]
    direct_caches = [c.clone() for c in caches]
    with torch.inference_mode():
        expected = model(input_ids, positions, direct_caches, metadata)                   # [5, hidden]

    stale_slot = 12 * BLOCK_SIZE + 1  # a real slot, in a block no row of this step owns
    graphs.input_ids.fill_(7)
    graphs.positions.fill_(20)
    graphs.seq_lens.fill_(25)
    graphs.slot_mapping.fill_(stale_slot)
    graphs.block_tables.fill_(TRAP)
    got = graphs.run(input_ids, positions, metadata)                                      # padded to 8 rows
    assert got.shape == expected.shape and torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert graphs.slot_mapping[5:8].eq(-1).all() and graphs.seq_lens[5:8].eq(1).all()
    written = torch.zeros(NUM_BLOCKS * BLOCK_SIZE, dtype=torch.bool)
    written[metadata.slot_mapping] = True
    for mine, theirs, old in zip(caches, direct_caches, before):
        flat, flat_theirs, flat_old = (t.flatten(1, 2) for t in (mine, theirs, old))     # [2, slots, Hkv, D]
        torch.testing.assert_close(flat[:, written], flat_theirs[:, written], atol=1e-5, rtol=0)
        torch.testing.assert_close(flat[:, ~written], flat_old[:, ~written], atol=0, rtol=0, equal_nan=True)


# ---- the capture itself (CUDA only) -----------------------------------------------------------------------------

def _decode_step(seq_lens: list[int], tables: list[list[int]], device: str):
    metadata = AttentionMetadata.build([1] * len(seq_lens), seq_lens, tables, BLOCK_SIZE, device)
    input_ids = torch.tensor([(37 * n + 11) % CONFIG.vocab_size for n in seq_lens], device=device)
    positions = torch.tensor([n - 1 for n in seq_lens], device=device)
    return input_ids, positions, metadata


@pytest.mark.gpu
def test_captured_graphs_replay_like_eager_steps_on_cuda(checkpoint):
    """Real captures (shared pool, largest first), replayed for a 9-row step (graph 16) then a 5-row one (graph 8):
    each must give the eager forward's hidden states and cache writes. The eager decode kernel runs with the step's
    max_seq_len and the graph with max_model_len (other context splits): fp32 reassociation only."""
    model, _ = load_model(checkpoint, dtype="float32", device="cuda", kernel_backend="triton")
    caches = [torch.randn(2, NUM_BLOCKS, BLOCK_SIZE, 2, 8, device="cuda",
                          generator=torch.Generator(device="cuda").manual_seed(i))
              for i in range(CONFIG.num_hidden_layers)]
    for cache in caches:
        cache[:, 0] = float("nan")  # what padding rows read
    graphs = DecodeGraphs(model, caches, max_batch_size=16, max_blocks_per_seq=8, max_model_len=32,
                          device=torch.device("cuda"))
    eager_caches = [c.clone() for c in caches]
    graphs.capture_all()
    assert sorted(graphs.graphs) == [1, 2, 4, 8, 16]
    steps = [([3, 6, 1, 9, 2, 12, 5, 7, 4], [[1], [2, 3], [4], [5, 6, 7], [8], [9, 10, 11], [12, 13], [14, 15],
                                             [16]]),
             ([4, 7, 10, 13, 6], [[1], [2, 3], [5, 6, 7], [9, 10, 11, 17], [12, 13]])]
    for seq_lens, tables in steps:
        input_ids, positions, metadata = _decode_step(seq_lens, tables, "cuda")
        assert graphs.can_run(metadata)
        with torch.inference_mode():
            expected = model(input_ids, positions, eager_caches, metadata)                # [B, hidden]
        got = graphs.run(input_ids, positions, metadata).clone()                           # [B, hidden]
        torch.cuda.synchronize()
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)
        for mine, theirs in zip(caches, eager_caches):
            torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0, equal_nan=True)
