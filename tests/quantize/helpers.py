"""Shared by tests/quantize: running `n4 quantize` in-process, reading every tensor of a checkpoint, and the
reference FP8 quantization that the converter's output is checked against (written here from the formula, not by
calling model/quant.py)."""
from __future__ import annotations

import glob
import os

import torch
from safetensors import safe_open

from n4.cli import main

LINEAR_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj",
                  "mlp.down_proj")


def run_quantize(capsys, *args: str) -> tuple[int, str]:
    """`n4 quantize ARGS` in this process -> (exit code, stderr)."""
    capsys.readouterr()
    try:
        main(["quantize", "--no-progress", *args])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("n4 ")]


def read_tensors(path: str | os.PathLike) -> dict[str, tuple[str, torch.Tensor]]:
    """name -> (file name, tensor) for every tensor of every *.safetensors file in the directory."""
    out = {}
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                assert name not in out, f"{name} in two files"
                out[name] = (os.path.basename(file), f.get_tensor(name))
    return out


def reference_fp8(weight: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """scale = max(amax, 1e-12) / 448 in fp32 (per tensor, or per output row as [out, 1]);
    q = e4m3(clamp(w / scale, -448, 448)) by torch's round-to-nearest-even cast."""
    w = weight.to(torch.float32)
    if per_channel:
        amax = torch.amax(torch.abs(w), dim=1, keepdim=True)
    else:
        amax = torch.max(torch.abs(w))
    scale = torch.clamp(amax, min=1e-12) / 448.0
    q = torch.clamp(w / scale, min=-448.0, max=448.0).to(torch.float8_e4m3fn)
    return q, scale


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def dir_listing(path) -> list[str]:
    return sorted(os.listdir(path))

