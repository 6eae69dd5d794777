"""Test-wide setup. Without CUDA, Triton kernels run in the interpreter (TRITON_INTERPRET=1) on the CPU; the
variable must be set before triton is first imported, which is why it lives here."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
