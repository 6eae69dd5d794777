"""`n4 serve` / `n4 generate` flag edges: values that used to be silently replaced (0 sizes, an empty API key, a port
past 65535), a port in use found only after the model loaded, vLLM's --dtype spellings, and the demo model of a
copied (Docker) install. Each test stops at the point where a model would load, so none loads one."""
from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys

import pytest

from n4.cli import main
from server.engine.engine import LLMEngine
from server.engine.engine_process import EngineProcess
from tests.api.conftest import REPO_ROOT, free_port
from tests.api.test_dockerfile import _instructions


class ReachedModelLoading(Exception):
    """Raised in place of loading a model: the flags were accepted."""


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading a model (in-process for generate, in the engine process for serve) raises ReachedModelLoading; the
    keyword arguments of the last attempt are kept in the returned dict."""
    seen = {}

    def refuse(*args, **kwargs):
        seen.update(kwargs)
        raise ReachedModelLoading

    monkeypatch.setattr(LLMEngine, "from_pretrained", classmethod(lambda cls, *a, **kw: refuse(*a, **kw)))
    monkeypatch.setattr(EngineProcess, "launch", classmethod(lambda cls, *a, **kw: refuse(*a, **kw)))
    monkeypatch.delenv("N4_API_KEY", raising=False)
    return seen


def _exit_2_with(args: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("n4 ")]
    assert len(err_lines) == 1 and message.lower() in err_lines[0].lower(), err_lines


@pytest.mark.parametrize("args, message", [
    # `--max-model-len 0` was read as "the model's length"; batched tokens <= 0 were clamped to a budget of 1.
    (["--max-model-len", "0"], "--max-model-len must be a positive integer"),
    (["--max-num-batched-tokens", "0"], "--max-num-batched-tokens must be a positive integer"),
    (["--max-num-batched-tokens", "-5"], "--max-num-batched-tokens must be a positive integer"),
])
def test_non_positive_sizes_are_refused_not_replaced(args, message, no_model_loading, capsys):
    _exit_2_with(["generate", "--prompt", "x", *args], message, capsys)


def test_empty_api_key_is_refused_rather_than_serving_without_auth(no_model_loading, capsys):
    _exit_2_with(["serve", "--api-key", ""], "--api-key must not be empty", capsys)


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_port_out_of_range_is_refused(port, no_model_loading, capsys):
    # 70000 used to be served on 70000 % 65536 = 4464.
    _exit_2_with(["serve", "--port", port], "--port must be in 0..65535", capsys)


def test_port_in_use_fails_before_the_model_loads(no_model_loading, capsys):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        _exit_2_with(["serve", "--port", str(port)], "address already in use", capsys)


@pytest.mark.parametrize("flag, dtype", [("half", "float16"), ("float", "float32"), ("bfloat16", "bfloat16")])
def test_vllm_dtype_spellings(flag, dtype, no_model_loading):
    with pytest.raises(ReachedModelLoading):
        main(["generate", "--prompt", "x", "--dtype", flag])
    assert no_model_loading["dtype"] == dtype


def _docker_env() -> dict[str, str]:
    env = {}
    for keyword, args in _instructions():
        if keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(args))
    return env


def test_docker_image_points_n4_at_its_copy_of_the_demo_model():
    instructions = _instructions()
    workdir = next(args for keyword, args in instructions if keyword == "WORKDIR")
    copies = [shlex.split(args) for keyword, args in instructions if keyword == "COPY"]
    destination = next(parts[-1] for parts in copies if parts[0] == "models/demo")
    assert _docker_env().get("N4_DEMO_MODEL") == os.path.join(workdir, destination)


def test_a_copied_install_finds_the_demo_model_through_n4_demo_model(tmp_path):
    """`pip install .` copies the packages without models/; DEMO_MODEL must then come from N4_DEMO_MODEL."""
    site = tmp_path / "site-packages"
    for package in ("n4", "kernels", "model", "server", "quantize", "benchmarks"):
        shutil.copytree(os.path.join(REPO_ROOT, package), site / package,
                        ignore=shutil.ignore_patterns("__pycache__", "results"))
    demo = os.path.join(REPO_ROOT, "models", "demo")
    env = {**os.environ, "PYTHONPATH": str(site), "N4_DEMO_MODEL": demo}
    result = subprocess.run([sys.executable, "-c", "import server.api.cli as c; print(c.__file__); print(c.DEMO_MODEL)"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    module_file, demo_model = result.stdout.split()
    assert module_file.startswith(str(site))    # the copy, not the checkout, was imported
    assert demo_model == demo
