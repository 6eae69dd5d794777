"""Hardware ceilings the benchmarks and `n4 plan` report against. Each figure says where it comes from (`kinds`):
measured (on that GPU, REFERENCE.md), datasheet (NVIDIA's), reported (what CUDA reports on that GPU, seen in a
public log) or assumed (a modelling choice)."""
from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30


@dataclass(frozen=True)
class Roofline:
    name: str
    hbm_bytes_per_s: float      # what a copy kernel reaches (measured where known), not the datasheet
    bf16_flops: float           # dense
    fp8_flops: float            # dense
    source: str
    # Used by `n4 plan` (benchmarks/plan.py); 0 where unknown.
    memory_bytes: float = 0.0          # total device memory as CUDA reports it: what --gpu-memory-utilization scales
    link_bytes_per_s: float = 0.0      # NVLink per GPU per direction: the rate a ring all-reduce moves data at
    collective_latency_s: float = 0.0  # fixed cost of one small all-reduce or gather
    kinds: tuple[tuple[str, str], ...] = ()  # (field, measured | datasheet | reported | assumed)

    def kind(self, field: str) -> str:
        return dict(self.kinds).get(field, "datasheet")


# NVLink 4 on the SXM parts: 18 links x 25 GB/s per direction = 450 GB/s per GPU per direction (the datasheets'
# "900 GB/s" counts both directions); in an 8-GPU HGX board every GPU reaches every other through NVSwitch at that
# rate, so a ring all-reduce of B bytes takes about latency + 2 (N - 1) / N * B / 450 GB/s. NCCL reaches less than
# the link rate on large messages; the plan uses the link rate (a ceiling, like the rest of the roofline).
_NVLINK4 = 450e9
# Small-message all-reduce latency over NVSwitch (launch + synchronisation across 8 GPUs): an assumption of ~10 us,
# the order NCCL shows for kilobyte messages; it dominates decode-time collectives at small batches.
_COLLECTIVE_LATENCY = 10e-6

H200 = Roofline("NVIDIA H200", hbm_bytes_per_s=4.3e12, bf16_flops=790e12, fp8_flops=1979e12,
                source="HBM: measured copy ~4.3 TB/s (datasheet 4.8); bf16: measured matmul ~790 TFLOP/s; "
                       "fp8: datasheet dense 1979 TFLOP/s; memory: CUDA reports 139.81 GiB (datasheet 141 GB); "
                       "NVLink 4: datasheet 450 GB/s per direction; collective latency: assumed 10 us",
                memory_bytes=139.81 * GiB, link_bytes_per_s=_NVLINK4, collective_latency_s=_COLLECTIVE_LATENCY,
                kinds=(("hbm_bytes_per_s", "measured"), ("bf16_flops", "measured"), ("fp8_flops", "datasheet"),
                       ("memory_bytes", "reported"), ("link_bytes_per_s", "datasheet"),
                       ("collective_latency_s", "assumed")))
H100 = Roofline("NVIDIA H100 80GB HBM3", hbm_bytes_per_s=3.35e12, bf16_flops=989e12, fp8_flops=1979e12,
                source="datasheet (SXM): 3.35 TB/s, 989 / 1979 TFLOP/s dense; memory: CUDA reports 79.22 GiB "
                       "(nvidia-smi 81559 MiB); NVLink 4: datasheet 450 GB/s per direction; collective latency: "
                       "assumed 10 us",
                memory_bytes=79.22 * GiB, link_bytes_per_s=_NVLINK4, collective_latency_s=_COLLECTIVE_LATENCY,
                kinds=(("hbm_bytes_per_s", "datasheet"), ("bf16_flops", "datasheet"), ("fp8_flops", "datasheet"),
                       ("memory_bytes", "reported"), ("link_bytes_per_s", "datasheet"),
                       ("collective_latency_s", "assumed")))
# The memory totals are cudaMemGetInfo's (what n4's engine multiplies by --gpu-memory-utilization), as vLLM's
# profiling logs print them: 79.22 GiB on an H100 80GB (vllm-project/vllm#10511), 139.81 GiB on an H200.

# `n4 plan --gpu NAME`
GPUS: dict[str, Roofline] = {"h100-80gb": H100, "h200": H200}


def for_device(device_name: str) -> Roofline:
    return H100 if "H100" in device_name else H200


def fraction(roof: Roofline, seconds: float, flops: float, bytes_moved: float, fp8: bool) -> float:
    """Share of the roofline reached: the ideal time (the slower of compute and memory) over the measured."""
    peak = roof.fp8_flops if fp8 else roof.bf16_flops
    ideal = max(flops / peak, bytes_moved / roof.hbm_bytes_per_s)
    return ideal / seconds if seconds > 0 else 0.0
