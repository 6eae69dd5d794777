"""Edges of tensor parallelism: a vocabulary so small that the last ranks hold only padding; a TP size larger than
the visible CUDA devices (refused before any process starts); a worker that fails before the rendezvous, or during
a step, reaching rank 0 as a WorkerFailure that names the rank and says why, with no process left behind."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

from model import distributed
from model.parallel import ParallelLMHead, VocabParallelEmbedding
from server.engine import worker
from server.engine.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.sampling import SamplingParams
from server.engine.worker import WorkerFailure


@pytest.fixture
def loading_ranks():
    yield
    distributed.destroy_tensor_parallel()


@pytest.mark.parametrize("cls", [VocabParallelEmbedding, ParallelLMHead])
@pytest.mark.parametrize("vocab, world", [(9, 8), (17, 8), (5, 4)])
def test_small_vocab_shards_cover_it(loading_ranks, monkeypatch, cls, vocab, world):
    """V = 9 at TP = 8: 2 rows per rank, so ranks 5-7 lie wholly past the vocabulary. They must load (as padding
    only) and add nothing to the embedding, while the ranks together give TP=1's table and lookups."""
    full = torch.randn(vocab, 4)                                  # [V, hidden]
    ids = torch.arange(vocab)                                     # [V]
    monkeypatch.setattr(distributed, "all_reduce", lambda x, op="sum": x)  # each rank's partial sum, summed below
    shards, lookups = [], torch.zeros(vocab, 4)
    for rank in range(world):
        distributed.set_rank_for_loading(rank, world)
        layer = cls(vocab, 4)
        layer.weight_loader(layer.weight, full)
        assert 0 <= layer.vocab_start <= layer.vocab_end <= vocab
        shards.append(layer.weight.detach().clone())
        if cls is VocabParallelEmbedding:
            lookups += layer(ids)
    padded = torch.cat(shards)                                    # [V padded, hidden]
    assert padded.shape[0] == -(-vocab // world) * world
    assert torch.equal(padded[:vocab], full)
    assert not padded[vocab:].any()
    if cls is VocabParallelEmbedding:
        assert torch.equal(lookups, full)


def _engine_config(tp: int, device: str = "cpu") -> EngineConfig:
    return EngineConfig(max_model_len=32, num_kv_blocks=16, block_size=4, tensor_parallel_size=tp, tp_timeout_s=30,
                        device=device)


def _no_children_left(timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while mp.active_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    return not mp.active_children()


def test_tp_larger_than_visible_cuda_devices_is_refused(tp_checkpoint):
    """Before: rank 0 and the workers failed in set_device (on a GPU host with fewer devices than ranks, rank 0 waited
    in the rendezvous for the missing ranks until the TP timeout). Now: one line, before any process starts."""
    assert torch.cuda.device_count() < 2  # the CPU test machine
    with pytest.raises(ValueError, match=r"tensor parallel size 2 needs 2 CUDA devices .* but \d+ (is|are) visible"):
        LLMEngine.from_pretrained(tp_checkpoint, _engine_config(2, device="cuda"))
    assert mp.active_children() == []
    assert distributed.tp_world_size() == 1


@pytest.mark.slow
def test_worker_failing_before_the_rendezvous_is_reported(tp_checkpoint, monkeypatch):
    """Rank 0 believes in 2 GPUs but rank 1 cannot select its device: rank 1's error must reach the caller (before
    rank 0 itself blocks in the rendezvous, where it would wait out the TP timeout)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    started = time.monotonic()
    with pytest.raises(WorkerFailure, match="tensor-parallel rank 1 failed during startup") as info:
        LLMEngine.from_pretrained(tp_checkpoint, _engine_config(2, device="cuda"))
    assert "set_device" in str(info.value) or "cuda" in str(info.value).lower()
    assert time.monotonic() - started < 25  # well inside tp_timeout_s (30)
    assert _no_children_left()
    assert distributed.tp_world_size() == 1


def _faulty_worker_main(rank, *args):
    """worker_main with run_forward raising on this rank (spawned: importable by name)."""
    def boom(*_args, **_kwargs):
        raise RuntimeError(f"injected fault on rank {rank}")
    worker.run_forward = boom
    worker.worker_main(rank, *args)


@pytest.mark.slow
def test_worker_step_error_reaches_rank0_with_its_reason(tp_checkpoint, monkeypatch):
    """Before: "tensor-parallel rank 1 (pid N) exited with exit code 1", the reason only on the worker's stderr; and
    the failed group stayed initialized in torch, so no other TP engine could start in this process."""
    monkeypatch.setattr(worker, "worker_main", _faulty_worker_main)
    engine = LLMEngine.from_pretrained(tp_checkpoint, _engine_config(2))
    try:
        engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=2, temperature=0.0))
        with pytest.raises(WorkerFailure, match=r"tensor-parallel rank 1 .*exit code 1: RuntimeError: injected "
                                                r"fault on rank 1"):
            engine.step()
    finally:
        engine.close()
    assert _no_children_left()
    assert distributed.tp_world_size() == 1
    # The broken group is gone from torch too: this process can start a working TP engine again (before: "trying to
    # initialize the default process group twice").
    monkeypatch.undo()
    with LLMEngine.from_pretrained(tp_checkpoint, _engine_config(2)) as engine:
        engine.add_request("b", [5, 6, 7], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        tokens = []
        while engine.has_unfinished_requests():
            tokens += [t for out in engine.step() for t in out.new_token_ids]
    assert len(tokens) == 2
    assert _no_children_left()


def _worker_main_failing_load(rank, *args):
    """worker_main whose load_model raises on this rank (spawned: importable by name)."""
    import model.loader

    def boom(*_args, **_kwargs):
        raise MemoryError(f"injected load failure on rank {rank}")
    model.loader.load_model = boom
    worker.worker_main(rank, *args)


@pytest.mark.slow
def test_worker_load_error_is_logged_when_rank0_fails_in_a_collective(tp_checkpoint, monkeypatch, caplog):
    """--quantization fp8 max-reduces row amaxes at load, so rank 0 meets rank 1's load failure as a gloo
    "connection closed" (the raised error, engine.py's). Rank 1's own error must not be lost: it is logged."""
    monkeypatch.setattr(worker, "worker_main", _worker_main_failing_load)
    with caplog.at_level("ERROR", logger="server.engine.worker"), pytest.raises(RuntimeError):  # gloo's "connection closed"
        LLMEngine.from_pretrained(tp_checkpoint, _engine_config(2), quantization="fp8")
    assert "tensor-parallel rank 1 failed" in caplog.text
    assert "MemoryError: injected load failure on rank 1" in caplog.text
    assert _no_children_left()
    assert distributed.tp_world_size() == 1


@pytest.mark.slow
def test_loaded_workers_outlive_a_sigterm_meant_for_the_server(tp_checkpoint):
    """systemd, `timeout` and dumb-init send SIGTERM to the whole group: a rank that died of it turned the server's
    drain into a fatal tensor-parallel failure. Loaded ranks ignore it; rank 0 still stops them."""
    with LLMEngine.from_pretrained(tp_checkpoint, _engine_config(2)) as engine:
        (proc,) = engine.executor.procs
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.5)
        assert proc.is_alive()
        engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
    assert _no_children_left()
