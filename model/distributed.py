"""The tensor-parallel group of this process and the collectives the parallel layers need.

One process per rank. Without `init_tensor_parallel` the world is one rank and every collective is a no-op, which
is how TP=1 runs (and how the model behaves in tests that never start a group). The backend follows the device:
NCCL for CUDA tensors, gloo on the CPU; the code is the same.

`set_rank_for_loading` sets rank/world without a process group: a rank's shard shapes and loader slices depend
only on those two numbers, so tests can load (and measure) every rank's shard in one process. Collectives are
then unavailable, and `all_reduce` raises rather than silently skipping the sum.
"""
from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)
SUPPORTED_SIZES = (1, 2, 4, 8)


@dataclass
class _TPState:
    rank: int = 0
    world_size: int = 1
    group: object | None = None  # torch.distributed ProcessGroup (the default group: TP is the whole world)


_STATE = _TPState()


def tp_rank() -> int:
    return _STATE.rank


def tp_world_size() -> int:
    return _STATE.world_size


def backend_for(device: str | torch.device) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def check_devices(world_size: int, device: str | torch.device) -> None:
    """Refuse a TP size the visible devices cannot hold (one CUDA device per rank), before any process starts.
    Without this, ranks >= the device count fail in set_device while rank 0 waits in the rendezvous for them
    until the TP timeout (600 s by default) and then reports a timeout, not the cause."""
    if world_size not in SUPPORTED_SIZES:
        raise ValueError(f"tensor parallel size must be one of {SUPPORTED_SIZES}, got {world_size}")
    if torch.device(device).type == "cuda":
        visible = torch.cuda.device_count()
        if world_size > visible:
            raise ValueError(f"tensor parallel size {world_size} needs {world_size} CUDA devices (one per rank), "
                             f"but {visible} {'is' if visible == 1 else 'are'} visible")


def select_device(rank: int, device: str | torch.device) -> None:
    """Make CUDA device `rank` this process's current device (rank r runs on GPU r); nothing on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(rank)


def init_tensor_parallel(rank: int, world_size: int, init_method: str, device: str | torch.device,
                         timeout_s: float) -> None:
    """Join the TP group (blocks until every rank has joined). A collective that waits longer than timeout_s
    raises (gloo; NCCL with async error handling), which is how a hung rank is noticed."""
    check_devices(world_size, device)
    select_device(rank, device)
    dist.init_process_group(backend_for(device), init_method=init_method, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    _STATE.rank, _STATE.world_size, _STATE.group = rank, world_size, dist.group.WORLD


def set_rank_for_loading(rank: int, world_size: int) -> None:
    """Shard shapes of `rank` of `world_size` without a process group (tests, planning); see the module doc."""
    _STATE.rank, _STATE.world_size, _STATE.group = rank, world_size, None


def destroy_tensor_parallel(broken: bool = False) -> None:
    """Leave the group and return to one rank. broken: a peer died, so the group is aborted rather than destroyed
    (destroying may wait on the dead peer)."""
    if _STATE.group is not None and dist.is_initialized():
        if broken:
            # Aborted, not merely forgotten: torch's default group would otherwise stay initialized, and the next
            # engine this process starts (library use, n4 generate, tests) would fail in init_process_group with
            # "trying to initialize the default process group twice".
            try:
                dist.distributed_c10d._abort_process_group()  # private: torch has no public abort (2.13)
            except Exception as e:  # noqa: BLE001 — a torch without it, or a backend that refuses: forget the group
                logger.warning("could not abort the broken tensor-parallel group (%r); this process cannot start "
                               "another one", e)
        else:
            dist.destroy_process_group()
    _STATE.rank, _STATE.world_size, _STATE.group = 0, 1, None


def _require_group() -> None:
    if _STATE.group is None:
        raise RuntimeError(f"a collective on rank {_STATE.rank} of {_STATE.world_size} without a process group "
                           f"(set_rank_for_loading only supports loading)")


def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or max) `x` over the TP group in place and return it; `x` itself at one rank."""
    if _STATE.world_size == 1:
        return x
    _require_group()
    dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=_STATE.group)
    return x


def gather_to_rank0(x: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
    """Concatenate every rank's `x` (same shape on each) along `dim` on rank 0; None on the other ranks."""
    if _STATE.world_size == 1:
        return x
    _require_group()
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(_STATE.world_size)] if _STATE.rank == 0 else None
    dist.gather(x, parts, dst=0, group=_STATE.group)
    return torch.cat(parts, dim=dim) if parts is not None else None


def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank `src`'s `x` into `x` on every rank (in place); returns `x`."""
    if _STATE.world_size == 1:
        return x
    _require_group()
    dist.broadcast(x, src=src, group=_STATE.group)
    return x
