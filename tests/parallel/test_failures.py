"""`n4 serve -tp 2` with a real worker process: SIGKILL of the worker makes the server exit non-zero within a
bounded time with a message naming the rank; SIGTERM to the server stops every rank with status 0; no process
is left either way."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from tests.api.conftest import server_log, start_n4_serve, stop_n4_serve

pytestmark = pytest.mark.slow
EXIT_BOUND_S = 20.0


def _worker_pids(proc) -> list[int]:
    match = re.search(r"worker pids ([\d, ]+)\)", server_log(proc))
    assert match, server_log(proc)
    return [int(pid) for pid in match.group(1).split(",")]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes only once reaped; its parent (the server) reaps it or dies.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _serve(path: str):
    return start_n4_serve("--model", path, "-tp", "2", "--tp-timeout", "20", "--max-model-len", "64",
                          "--num-kv-blocks", "32", "--block-size", "4")


def test_killed_worker_stops_the_server(tp_checkpoint):
    proc, base = _serve(tp_checkpoint)
    workers = _worker_pids(proc)
    try:
        os.kill(workers[0], signal.SIGKILL)
        killed_at = time.monotonic()
        status = proc.wait(timeout=EXIT_BOUND_S)
        assert time.monotonic() - killed_at < EXIT_BOUND_S
        log = server_log(proc)
        assert status != 0, log
        assert "tensor-parallel rank 1" in log and "SIGKILL" in log, log
    finally:
        if proc.poll() is None:
            stop_n4_serve(proc)
    assert _wait_gone(workers, 5.0) == []


def test_sigterm_stops_every_rank(tp_checkpoint):
    proc, base = _serve(tp_checkpoint)
    workers = _worker_pids(proc)
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=EXIT_BOUND_S) == 0, server_log(proc)
    except subprocess.TimeoutExpired:
        stop_n4_serve(proc)
        pytest.fail(f"n4 serve -tp 2 did not exit after SIGTERM:\n{server_log(proc)}")
    assert _wait_gone(workers, 5.0) == []
