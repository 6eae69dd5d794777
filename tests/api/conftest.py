"""Fixtures and helpers for API tests: an in-process n4 app over a tiny checkpoint (FastAPI's TestClient runs
the app's lifespan, so the engine thread starts and stops as in `n4 serve`), the same app behind a real uvicorn
on a loopback port (real sockets, real disconnects), and `n4 serve` itself as a subprocess."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from server.api.app import build_app
from server.api.config import ServerConfig
from server.api.tokenizer import Tokenizer
from server.engine.config import EngineConfig
from server.engine.engine import AsyncEngine, LLMEngine

MODEL_NAME = "tiny"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_app(path: str, server_config: ServerConfig | None = None, **engine_kwargs):
    engine_kwargs.setdefault("max_model_len", 256)
    engine_kwargs.setdefault("num_kv_blocks", 128)
    engine = LLMEngine.from_pretrained(path, EngineConfig(**engine_kwargs), dtype="float32")
    return build_app(AsyncEngine(engine), Tokenizer.from_pretrained(path), MODEL_NAME, server_config)


@contextlib.contextmanager
def serve_checkpoint(path: str, server_config: ServerConfig | None = None, **engine_kwargs):
    with TestClient(make_app(path, server_config, **engine_kwargs)) as client:
        yield client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def uvicorn_thread(app, timeout: float = 30.0):
    """The app behind a real uvicorn in a background thread on a free loopback port; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


def start_n4_serve(*args: str, startup_timeout: float = 120.0,
                   new_session: bool = False) -> tuple[subprocess.Popen, str]:
    """`n4 serve ARGS` (the embedded demo model unless --model is given) on a free loopback port, once healthy.
    new_session: in a process group of its own, so that signalling the group does not reach pytest."""
    port = free_port()
    # The log goes to a file, not a pipe: a pipe nobody reads would block a chatty server once it fills.
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "n4.cli", "serve", "--port", str(port), *args],
                            stdout=log, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT,
                            start_new_session=new_session)
    proc.log = log
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"n4 serve exited early:\n{server_log(proc)}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    pytest.fail(f"n4 serve did not become healthy in {startup_timeout:.0f} s:\n{server_log(proc)}")


def server_log(proc: subprocess.Popen) -> str:
    proc.log.flush()
    proc.log.seek(0)
    return proc.log.read()


def stop_n4_serve(proc: subprocess.Popen, timeout: float = 20.0) -> int:
    """SIGTERM, then the exit status; a server that does not exit in time is killed and the test fails."""
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"n4 serve did not exit within {timeout:.0f} s of SIGTERM:\n{server_log(proc)}")


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample of Prometheus text (labels matched as given; model_name is not required)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, value = line.rsplit(" ", 1)
        metric, _, label_text = series.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            return float(value)
    raise KeyError(f"{name} {labels} not in the metrics")


@pytest.fixture(scope="session")
def demo_tokenizer_vocab() -> int:
    from server.api.cli import DEMO_MODEL
    return Tokenizer.from_pretrained(DEMO_MODEL).vocab_size
