"""Data parallelism across processes started by `torchrun` (one per GPU, or several CPU processes over gloo).

Every rank holds the whole model and runs its own micro-batches; after the backward passes of an optimizer step the
gradients are summed across ranks (each rank's loss is already divided by the step's *global* count), so every
rank takes the same optimizer step and the weights stay identical without being broadcast. Rank 0 alone writes
the log, the resumable state and the exported checkpoint. Without torchrun's environment, world size is 1 and
nothing here does anything.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns the device this rank computes on."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def sum_across_ranks(value: float, device: torch.device) -> float:
    """The sum of a host number over ranks (token counts are exact in float64)."""
    if world_size() == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.item()


def sum_gradients(model: torch.nn.Module) -> None:
    """Sum every gradient across ranks, flattened into one buffer (one collective per step, not one per tensor)."""
    if world_size() == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
