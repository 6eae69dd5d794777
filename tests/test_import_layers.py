"""The import directions of DESIGN.md, checked on the source: nothing imports upward.

    server.api -> server.engine -> model -> kernels;  quantize -> model, kernels;
    training (n4_train) -> model, kernels (and nothing imports it);  benchmarks, tests -> anything.
"""
from __future__ import annotations

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_PARTY = ("kernels", "model", "server", "quantize", "benchmarks", "n4", "n4_train", "tests")
# package directory -> the first-party packages its modules may import (besides itself)
ALLOWED = {
    "kernels": set(),
    "model": {"kernels"},
    "server/engine": {"model", "kernels"},
    "server/api": {"server.engine", "model", "kernels"},
    "quantize": {"model", "kernels"},
    "training/n4_train": {"model", "kernels"},
}


def _imports(path: str) -> set[str]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _first_party(name: str, own: str) -> str | None:
    """The layer an import belongs to ('server.engine', 'model', ...), None for stdlib/third party or itself."""
    top = name.split(".")[0]
    if top not in FIRST_PARTY:
        return None
    layer = ".".join(name.split(".")[:2]) if top == "server" else top
    return None if layer == own or layer.startswith(own + ".") else layer


def _python_files(directory: str):
    for root, _, files in os.walk(os.path.join(REPO, directory)):
        yield from (os.path.join(root, f) for f in files if f.endswith(".py"))


@pytest.mark.parametrize("directory", sorted(ALLOWED))
def test_packages_import_only_downward(directory):
    own = directory.replace("training/", "").replace("/", ".")
    bad = []
    for path in _python_files(directory):
        for name in _imports(path):
            layer = _first_party(name, own)
            if layer is not None and layer not in ALLOWED[directory] and layer.split(".")[0] not in ALLOWED[directory]:
                bad.append(f"{os.path.relpath(path, REPO)} imports {name}")
    assert not bad, "\n".join(bad)
