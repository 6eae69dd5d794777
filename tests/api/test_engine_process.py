"""The engine in its own process (`n4 serve`'s EngineProcess): the same tokens as the in-process engine, aborts
and stops over the pipe, the snapshot the metrics read, load errors as one line, and no process outliving the
other: a killed engine stops the server (non-zero, with the reason), a killed server takes its engine along."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file, save_file

from model.config import get_config
from server.api.cli import DEMO_MODEL
from server.engine.config import EngineConfig
from server.engine.engine import EngineDeadError, LLMEngine
from server.engine.engine_process import EngineProcess, EngineSpec, omp_binding, one_cpu_per_core
from server.engine.sampling import SamplingParams
from tests.api.conftest import REPO_ROOT, server_log, start_n4_serve, stop_n4_serve
from tests.utils import make_tiny_checkpoint

EXIT_BOUND_S = 20.0
CONFIG = EngineConfig(max_model_len=128, num_kv_blocks=64, block_size=8, max_num_seqs=4)
PROMPTS = [[5, 17, 99, 3, 250], [7, 7, 7], [1000, 42, 11, 12, 13, 14, 15, 16, 17]]


def _offline_tokens(prompts, max_tokens: int) -> list[list[int]]:
    engine = LLMEngine.from_pretrained(DEMO_MODEL, CONFIG)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    return [tokens[str(i)] for i in range(len(prompts))]


def test_the_engine_process_gives_the_offline_tokens_aborts_and_stops():
    expected = _offline_tokens(PROMPTS, max_tokens=12)
    engine = EngineProcess.launch(EngineSpec(DEMO_MODEL, CONFIG))

    async def scenario():
        engine.start()
        greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

        async def collect(request_id, prompt):
            outs = [out async for out in engine.generate(request_id, prompt, greedy)]
            return [t for out in outs for t in out.new_token_ids], outs[-1]

        results = await asyncio.gather(*(collect(f"r{i}", p) for i, p in enumerate(PROMPTS)))
        assert [tokens for tokens, _ in results] == expected
        assert all(last.finished and last.finish_reason == "length" for _, last in results)

        # stop_request: the stream ends with finish_reason "stop" after the tokens generated so far.
        long = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
        seen = []
        async for out in engine.generate("stopped", PROMPTS[0], long):
            seen.append(out)
            if len(seen) == 2:
                engine.stop_request("stopped")
        assert seen[-1].finished and seen[-1].finish_reason == "stop" and seen[-1].num_output_tokens < 100

        # A consumer that walks away aborts its request: the engine frees it and goes idle.
        stream = engine.generate("walked-away", PROMPTS[1], long)
        await stream.__anext__()
        await stream.aclose()
        deadline = time.monotonic() + 10
        while engine.snapshot().num_running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        snapshot = engine.snapshot()
        assert snapshot.num_running == 0 and snapshot.kv_cache_usage == 0.0
        assert snapshot.generation_tokens >= 3 * 12 + 2
        # The engine's own checks come back as the request's error.
        with pytest.raises(ValueError, match="prompt token ids must be in"):
            async for _ in engine.generate("bad", [10 ** 9], greedy):
                pass

    try:
        # The child, and only the child, got the OpenMP thread placement.
        child_env = dict(entry.split("=", 1) for entry in
                         open(f"/proc/{engine.info.pid}/environ").read().split("\0") if "=" in entry)
        for name, value in omp_binding(CONFIG).items():
            assert child_env.get(name) == value and name not in os.environ
        asyncio.run(scenario())
        assert engine.is_running
    finally:
        engine.shutdown()
    assert not engine._proc.is_alive()


def test_one_cpu_per_core_skips_hyperthread_siblings(monkeypatch):
    import builtins
    siblings = {0: "0,8", 8: "0,8", 1: "1,9", 9: "1,9", 2: "2"}
    real_open = builtins.open

    def fake_open(path, *args, **kwargs):
        if str(path).startswith("/sys/devices/system/cpu/cpu"):
            cpu = int(str(path).split("/cpu/cpu")[1].split("/")[0])
            if cpu not in siblings:
                raise FileNotFoundError(path)
            import io
            return io.StringIO(siblings[cpu] + "\n")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    assert one_cpu_per_core({9, 8, 1, 0, 2, 5}) == [0, 1, 2, 5]   # 5: no topology, its own core


def test_omp_binding_pins_a_cpu_engine_unless_the_user_placed_threads(monkeypatch):
    for name in ("GOMP_CPU_AFFINITY", "OMP_PROC_BIND", "OMP_PLACES", "KMP_AFFINITY"):
        monkeypatch.delenv(name, raising=False)
    cpus = one_cpu_per_core(os.sched_getaffinity(0))
    assert cpus and set(cpus) <= os.sched_getaffinity(0)
    assert omp_binding(CONFIG) == {"GOMP_CPU_AFFINITY": " ".join(map(str, cpus))}
    assert omp_binding(EngineConfig(device="cuda")) == {}
    assert omp_binding(EngineConfig(tensor_parallel_size=2)) == {}
    monkeypatch.setenv("OMP_PROC_BIND", "false")
    assert omp_binding(CONFIG) == {}


def test_a_load_error_in_the_engine_process_is_one_line_and_exit_2(tmp_path):
    config = get_config(DEMO_MODEL)
    path = tmp_path / "broken"
    make_tiny_checkpoint(path, config)
    tensors = load_file(path / "model.safetensors")
    tensors.pop("model.layers.0.mlp.up_proj.weight")
    save_file(tensors, path / "model.safetensors")
    result = subprocess.run([sys.executable, "-m", "n4.cli", "serve", "--model", str(path), "--port", "0"],
                            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("n4 serve: error:")]
    assert len(errors) == 1 and "model.layers.0.mlp.up_proj.weight" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def _engine_pid(proc) -> int:
    match = re.search(r"engine process pid (\d+)", server_log(proc))
    assert match, server_log(proc)
    return int(match.group(1))


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_a_killed_engine_process_stops_the_server_with_the_reason():
    proc, _ = start_n4_serve("--max-model-len", "64")
    engine_pid = _engine_pid(proc)
    try:
        os.kill(engine_pid, signal.SIGKILL)
        status = proc.wait(timeout=EXIT_BOUND_S)
        log = server_log(proc)
        assert status != 0, log
        assert "the engine process exited with signal SIGKILL" in log, log
    finally:
        if proc.poll() is None:
            stop_n4_serve(proc)


@pytest.mark.slow
def test_a_killed_server_takes_its_engine_process_along():
    proc, _ = start_n4_serve("--max-model-len", "64")
    engine_pid = _engine_pid(proc)
    proc.kill()
    proc.wait()
    assert _gone(engine_pid, 5.0), "the engine process outlived its server"


def test_a_dead_engine_process_fails_requests_with_engine_dead():
    engine = EngineProcess.launch(EngineSpec(DEMO_MODEL, CONFIG))

    async def scenario():
        engine.start()
        os.kill(engine.info.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while engine.is_running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not engine.is_running and "signal SIGKILL" in str(engine.error)
        with pytest.raises(EngineDeadError):
            async for _ in engine.generate("late", [1, 2, 3], SamplingParams(max_tokens=2)):
                pass

    fatal = []
    engine.fatal_callbacks.append(fatal.append)
    try:
        asyncio.run(scenario())
    finally:
        engine.shutdown()
    assert len(fatal) == 1
