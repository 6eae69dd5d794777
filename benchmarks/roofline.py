"""Hardware ceilings the benchmarks report against. Measured figures are marked as such."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Roofline:
    name: str
    hbm_bytes_per_s: float      # what a copy kernel reaches (measured where known), not the datasheet
    bf16_flops: float           # dense
    fp8_flops: float            # dense
    source: str


H200 = Roofline("NVIDIA H200", hbm_bytes_per_s=4.3e12, bf16_flops=790e12, fp8_flops=1979e12,
                source="HBM: measured copy ~4.3 TB/s (datasheet 4.8); bf16: measured matmul ~790 TFLOP/s; "
                       "fp8: datasheet dense 1979 TFLOP/s")
H100 = Roofline("NVIDIA H100 80GB HBM3", hbm_bytes_per_s=3.35e12, bf16_flops=989e12, fp8_flops=1979e12,
                source="datasheet (SXM): 3.35 TB/s, 989 / 1979 TFLOP/s dense")


def for_device(device_name: str) -> Roofline:
    return H100 if "H100" in device_name else H200


def fraction(roof: Roofline, seconds: float, flops: float, bytes_moved: float, fp8: bool) -> float:
    """Share of the roofline reached: the ideal time (the slower of compute and memory) over the measured."""
    peak = roof.fp8_flops if fp8 else roof.bf16_flops
    ideal = max(flops / peak, bytes_moved / roof.hbm_bytes_per_s)
    return ideal / seconds if seconds > 0 else 0.0
