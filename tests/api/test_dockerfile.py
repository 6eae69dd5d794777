"""The Dockerfile cannot be built here (no Docker, no GPU), so it is kept honest by reading it: a CUDA base
image, n4 installed from this repository without test-only packages, every COPY source present and not
excluded by .dockerignore, port 8000 exposed, and `n4 serve` as what the container runs."""
from __future__ import annotations

import fnmatch
import json
import os
import shlex

from tests.api.conftest import REPO_ROOT

TEST_ONLY = ("pytest", "httpx", "openai", "transformers", "protobuf", "schemathesis", "lm-eval", "lm_eval", "[test]")


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    with open(os.path.join(REPO_ROOT, "Dockerfile")) as f:
        lines = [line.rstrip("\n") for line in f if not line.lstrip().startswith("#")]
    joined, current = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip():
            keyword, _, rest = current.strip().partition(" ")
            joined.append((keyword.upper(), rest.strip()))
        current = ""
    return joined


def _ignored(path: str) -> bool:
    with open(os.path.join(REPO_ROOT, ".dockerignore")) as f:
        patterns = [p.strip() for p in f if p.strip() and not p.startswith("#")]
    ignored = False
    for pattern in patterns:   # last match wins; "!" re-includes (Docker's rule)
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            ignored = not negate
    return ignored


def _exec_form(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def test_base_image_is_cuda():
    froms = [args for keyword, args in _instructions() if keyword == "FROM"]
    assert froms and froms[0].split()[0].startswith("nvidia/cuda:")


def test_copy_sources_exist_and_are_in_the_build_context():
    copies = [args for keyword, args in _instructions() if keyword in ("COPY", "ADD")]
    assert copies
    for args in copies:
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        for source in parts[:-1]:
            assert os.path.exists(os.path.join(REPO_ROOT, source)), f"COPY {source}: no such path in the repo"
            assert not _ignored(source), f"COPY {source}: excluded by .dockerignore"


def test_installs_n4_without_test_packages():
    runs = " ".join(args for keyword, args in _instructions() if keyword == "RUN")
    assert "pip install" in runs and ("pip install ." in runs or "pip install --no-deps ." in runs)
    for package in TEST_ONLY:
        assert package not in runs, f"the image installs the test-only package {package}"


def test_serves_on_port_8000():
    instructions = _instructions()
    exposed = [port for keyword, args in instructions if keyword == "EXPOSE" for port in args.split()]
    assert "8000" in exposed or "8000/tcp" in exposed
    command = []
    for keyword, args in instructions:
        if keyword == "ENTRYPOINT":
            command = _exec_form(args)
        elif keyword == "CMD":
            command = command + _exec_form(args)
    assert command[:2] == ["n4", "serve"], command
    assert "--host" in command and command[command.index("--host") + 1] == "0.0.0.0"
    assert "--port" not in command or command[command.index("--port") + 1] == "8000"
