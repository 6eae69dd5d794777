"""Operational edges of `n4 serve`'s engine process: a SIGTERM that reaches the whole process group (systemd's
default KillMode, `timeout`, `kill -- -PGID`) still gives a graceful drain, and the gauges /metrics reads follow
engine steps that produce no output (prompt chunks)."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import httpx
import pytest

from server.api.cli import DEMO_MODEL
from server.engine.config import EngineConfig
from server.engine.engine_process import EngineProcess, EngineSpec
from server.engine.sampling import SamplingParams
from tests.api.conftest import server_log, start_n4_serve

CONFIG = EngineConfig(max_model_len=512, num_kv_blocks=64, block_size=16, max_num_seqs=4)
GREEDY = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)


def test_a_loaded_engine_process_survives_sigterm_and_still_stops():
    engine = EngineProcess.launch(EngineSpec(DEMO_MODEL, CONFIG))

    async def scenario():
        engine.start()
        os.kill(engine.info.pid, signal.SIGTERM)   # what a process-group or cgroup SIGTERM delivers to it
        await asyncio.sleep(0.5)
        assert engine.is_running, engine.error
        outs = [out async for out in engine.generate("after-sigterm", [5, 6, 7], GREEDY)]
        assert outs[-1].finish_reason == "length" and sum(len(o.new_token_ids) for o in outs) == 3

    try:
        asyncio.run(scenario())
    finally:
        engine.shutdown()
    assert not engine._proc.is_alive()   # the server still stops it


def test_gauges_follow_prompt_chunks_that_produce_no_output():
    # 400 prompt tokens in 16-token chunks: 25 steps before the first output.
    engine = EngineProcess.launch(EngineSpec(DEMO_MODEL, EngineConfig(
        max_model_len=512, num_kv_blocks=64, block_size=16, max_num_batched_tokens=16)))

    async def scenario():
        engine.start()
        seen = []

        async def watch():
            while True:
                snap = engine.snapshot()
                seen.append((snap.num_running, snap.kv_cache_usage))
                await asyncio.sleep(0.002)

        watcher = asyncio.create_task(watch())
        stream = engine.generate("long-prompt", [5 + i % 50 for i in range(400)], GREEDY)
        await stream.__anext__()
        watcher.cancel()
        # Before its first output the request was running and held KV blocks; /metrics must have said so.
        assert max(running for running, _ in seen) == 1
        assert max(usage for _, usage in seen) > 0
        async for _ in stream:
            pass
        deadline = time.monotonic() + 10
        while engine.snapshot().num_running and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert engine.snapshot().num_running == 0 and engine.snapshot().kv_cache_usage == 0

    try:
        asyncio.run(scenario())
    finally:
        engine.shutdown()


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_drains_and_exits_0():
    proc, base = start_n4_serve("--served-model-name", "demo", "--max-model-len", "2048", "--shutdown-timeout", "10",
                                new_session=True)
    try:
        events, started = [], threading.Event()

        def stream():
            body = {"model": "demo", "prompt": "Once", "max_tokens": 60, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[len("data: "):])
                        started.set()

        thread = threading.Thread(target=stream)
        thread.start()
        assert started.wait(30)
        os.killpg(proc.pid, signal.SIGTERM)   # the server, its engine process, all of them
        thread.join(30)
        rc = proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log_text = server_log(proc)
    assert events[-1] == "[DONE]", log_text[-3000:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks), log_text[-3000:]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["length"]
    assert rc == 0, log_text[-3000:]
