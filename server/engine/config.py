"""Engine configuration: what `n4 serve` flags set for the engine (vLLM's names and defaults)."""
from __future__ import annotations

from dataclasses import dataclass

from model.quant_config import KV_CACHE_DTYPES


@dataclass(frozen=True)
class EngineConfig:
    max_model_len: int = 4096
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048   # token budget of one step: decode tokens plus prompt chunks
    block_size: int = 16
    enable_prefix_caching: bool = False
    num_kv_blocks: int | None = None     # None: size the pool from memory (gpu_memory_utilization / kv_cache_memory)
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int = 256 << 20  # CPU: bytes given to the KV pool when num_kv_blocks is not set
    kernel_backend: str = "torch"        # torch | triton (model/ops.py)
    kv_cache_dtype: str = "auto"         # auto (the model dtype) | fp8 / fp8_e4m3 (E4M3 with per-layer scales)
    enforce_eager: bool = False          # True: no CUDA graphs for decode steps
    device: str = "cpu"
    tensor_parallel_size: int = 1        # ranks; ranks 1..N-1 are worker processes (server/engine/worker.py)
    tp_timeout_s: float = 600.0          # a collective waiting longer than this marks the engine dead

    def __post_init__(self):
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"--block-size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ValueError(f"--num-kv-blocks must be positive, got {self.num_kv_blocks}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kernel_backend not in ("torch", "triton"):
            raise ValueError(f"--kernel-backend must be 'torch' or 'triton', got {self.kernel_backend!r}")
        if self.tensor_parallel_size not in (1, 2, 4, 8):
            raise ValueError(f"--tensor-parallel-size must be 1, 2, 4 or 8, got {self.tensor_parallel_size!r}")
        if not self.tp_timeout_s > 0:
            raise ValueError(f"the tensor-parallel timeout must be positive, got {self.tp_timeout_s!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got "
                             f"{self.kv_cache_dtype!r}")
