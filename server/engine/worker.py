"""Tensor parallelism across processes: rank 0 is the engine (scheduler, sampler) in the server process; ranks
1..N-1 are worker processes started here, each loading its shard and its own KV cache (its own KV heads).

Per step, rank 0 sends each worker a small header over its pipe — the step's sizes — and then broadcasts one
int64 tensor holding input_ids, positions, slot_mapping, query_start_loc, seq_lens, block_tables and the rows
that need logits. Every rank runs the same forward (all-reduces after o_proj, down_proj and the embedding, the
logits gathered to rank 0). The header goes over the pipe rather than as a broadcast tensor so that an idle
worker waits on a pipe, not on a collective that would time out, and sees its parent vanish as end-of-file.

Failures: a monitor thread on rank 0 watches the workers' process sentinels; an unexpected exit becomes a
WorkerFailure naming the rank, delivered to `on_failure` callbacks (the engine marks itself dead, the server
exits). A collective that fails or exceeds the group timeout raises on rank 0 and becomes one too. A worker that
fails sends its traceback over its pipe first, so the WorkerFailure says why; at startup each worker reports before
it joins the rendezvous, so one that cannot (a bad device) fails the start instead of leaving rank 0 waiting out the
group timeout there. Workers exit when their parent is gone (pipe EOF, or a watchdog polling getppid while they
are inside a collective), and the parent terminates them on shutdown, at exit, and on any failure, so no process
outlives the server.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass

import torch

from model import distributed
from model.attention_metadata import AttentionMetadata

logger = logging.getLogger(__name__)
_STARTUP_POLL_S = 0.2


class WorkerFailure(RuntimeError):
    """A tensor-parallel rank died, failed or stopped answering: the engine cannot continue."""


@dataclass(frozen=True)
class LoadSpec:
    """What a worker needs to load its shard (load_model's arguments)."""
    model: str
    dtype: str
    load_format: str
    quantization: str | None


# ---- the step message -------------------------------------------------------------------------------------

def pack_step(input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata,
              rows: torch.Tensor) -> tuple[tuple[int, ...], torch.Tensor]:
    """-> (header: T, B, block-table width, logit rows, max_query_len, max_seq_len; one int64 payload tensor)."""
    num_seqs, width = md.block_tables.shape
    header = (input_ids.shape[0], num_seqs, width, rows.shape[0], md.max_query_len, md.max_seq_len)
    parts = [input_ids, positions, md.slot_mapping, md.query_start_loc, md.seq_lens, md.block_tables.flatten(), rows]
    return header, torch.cat([p.to(torch.int64) for p in parts])  # [3T + 2B + 1 + B*W + R]


def unpack_step(header: tuple[int, ...], payload: torch.Tensor):
    """The inverse of pack_step: (input_ids, positions, AttentionMetadata, rows)."""
    t, b, width, r, max_query_len, max_seq_len = header
    input_ids, positions, slots, qsl, seq_lens, tables, rows = payload.split([t, t, t, b + 1, b, b * width, r])
    md = AttentionMetadata(slot_mapping=slots, query_start_loc=qsl.to(torch.int32), seq_lens=seq_lens.to(torch.int32),
                           block_tables=tables.to(torch.int32).reshape(b, width), max_query_len=max_query_len,
                           max_seq_len=max_seq_len)
    return input_ids, positions, md, rows


def payload_size(header: tuple[int, ...]) -> int:
    t, b, width, r = header[:4]
    return 3 * t + 2 * b + 1 + b * width + r


def run_forward(model, kv_caches, input_ids, positions, md: AttentionMetadata, rows: torch.Tensor):
    """The part of a step every rank runs: the forward, then lm_head on `rows` (logits on rank 0, else None)."""
    hidden = model(input_ids, positions, kv_caches, md)  # [T, hidden]
    if rows.numel() == 0:
        return None
    return model.compute_logits(hidden[rows])           # [R, vocab] on rank 0


def allocate_kv_caches(model_config, num_blocks: int, block_size: int, dtype: torch.dtype,
                       device: torch.device) -> list[torch.Tensor]:
    """One tensor per layer: [2 (K, V), num_blocks, block_size, this rank's KV heads, head_dim]."""
    heads = model_config.num_key_value_heads // distributed.tp_world_size()
    return [torch.zeros(2, num_blocks, block_size, heads, model_config.head_dim, dtype=dtype, device=device)
            for _ in range(model_config.num_hidden_layers)]


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ---- rank 0 -------------------------------------------------------------------------------------------------

class TPExecutor:
    """Rank 0's handle on ranks 1..N-1: starts them, sends each step, watches them, stops them."""

    def __init__(self, world_size: int, spec: LoadSpec, engine_config):
        self.world_size = world_size
        self.spec = spec
        self.config = engine_config
        self.device = torch.device(engine_config.device)
        self._dir = tempfile.TemporaryDirectory(prefix="n4-tp-")
        self.init_method = "file://" + os.path.join(self._dir.name, "rendezvous")
        self.procs: list[mp.Process] = []
        self.pipes: list[multiprocessing.connection.Connection] = []
        self.rank_param_bytes: dict[int, int] = {}
        self.failure: WorkerFailure | None = None
        self.on_failure: list = []   # callables(WorkerFailure), called once, from the monitor or engine thread
        self._stopping = False
        self._lock = threading.Lock()
        self._pipe_lock = threading.Lock()  # the monitor and the engine thread may both read a dead worker's pipe

    # startup
    def start(self) -> None:
        """Start ranks 1..N-1 and wait until each is about to join the rendezvous (the caller joins it next)."""
        distributed.check_devices(self.world_size, self.device)  # before any process starts
        ctx = mp.get_context("spawn")
        for rank in range(1, self.world_size):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=worker_main, name=f"n4-tp-rank{rank}", daemon=True,
                               args=(rank, self.world_size, self.init_method, self.spec, self.config, child_end,
                                     os.getpid()))
            proc.start()
            child_end.close()
            self.procs.append(proc)
            self.pipes.append(parent_end)
        atexit.register(self.shutdown)
        logger.info("tensor parallel: started %d worker processes (pids %s)", len(self.procs),
                    ", ".join(str(p.pid) for p in self.procs))
        # Before rank 0 blocks in the rendezvous: a worker that fails before joining it (its device, an import)
        # would otherwise leave rank 0 waiting there for the whole TP timeout, then reporting only a timeout.
        self._expect("joining")

    def _expect(self, kind: str) -> list:
        """Wait for message `kind` from every worker; a worker's error or death raises WorkerFailure."""
        values = []
        for rank, (proc, pipe) in enumerate(zip(self.procs, self.pipes), start=1):
            while not pipe.poll(_STARTUP_POLL_S):
                if not proc.is_alive():
                    raise WorkerFailure(f"tensor-parallel rank {rank} (pid {proc.pid}) exited with "
                                        f"{exit_status(proc.exitcode)} during startup")
            got, value = pipe.recv()
            if got == "error":
                raise WorkerFailure(f"tensor-parallel rank {rank} failed during startup:\n{value}")
            values.append(value)
        return values

    def wait_loaded(self, own_param_bytes: int) -> None:
        self.rank_param_bytes = {0: own_param_bytes}
        for rank, nbytes in enumerate(self._expect("loaded"), start=1):
            self.rank_param_bytes[rank] = nbytes

    def allocate_kv_caches(self, num_blocks: int, dtype: torch.dtype) -> None:
        """Rank 0 decides the pool size; every rank allocates the same number of blocks of its own heads."""
        for pipe in self.pipes:
            pipe.send(("kv_cache", (num_blocks, dtype)))
        self._expect("ready")
        threading.Thread(target=self._monitor, name="n4-tp-monitor", daemon=True).start()

    # steps
    def send_step(self, input_ids, positions, md: AttentionMetadata, rows: torch.Tensor) -> None:
        header, payload = pack_step(input_ids, positions, md, rows)
        for pipe in self.pipes:
            pipe.send(("step", header))
        distributed.broadcast(payload, src=0)

    @contextlib.contextmanager
    def guard(self):
        """Around a step's collectives: any failure becomes a WorkerFailure naming the dead rank if one is."""
        if self.failure is not None:
            raise self.failure
        try:
            yield
        except Exception as e:  # noqa: BLE001 — a broken pipe, a collective's error or timeout
            deadline = time.monotonic() + 2.0  # give a dying worker's exit a moment to become visible
            while self.failure is None and time.monotonic() < deadline:
                self._check_workers()
                time.sleep(0.05)
            failure = self.failure or WorkerFailure(f"a tensor-parallel collective failed or timed out "
                                                    f"({self.config.tp_timeout_s:g} s): {e}")
            self._fail(failure)
            raise failure from e

    # failures
    def _check_workers(self) -> None:
        for rank, (proc, pipe) in enumerate(zip(self.procs, self.pipes), start=1):
            if proc.exitcode is not None and not self._stopping:
                reason = self._last_error(rank, pipe)
                self._fail(WorkerFailure(f"tensor-parallel rank {rank} (pid {proc.pid}) exited with "
                                         f"{exit_status(proc.exitcode)}" + (f": {reason}" if reason else "")))
                return

    def _last_error(self, rank: int, pipe) -> str | None:
        """The exception line of the error a dead worker sent before exiting (its traceback is logged), if any."""
        error = None
        with self._pipe_lock, contextlib.suppress(OSError, EOFError, ValueError):
            while pipe.poll():  # the worker is gone: this drains what it sent, then EOFError ends it
                kind, value = pipe.recv()
                if kind == "error":
                    error = value
        if error is None:
            return None
        logger.error("tensor-parallel rank %d failed:\n%s", rank, error.rstrip())
        return error.strip().splitlines()[-1]

    def _monitor(self) -> None:
        sentinels = [p.sentinel for p in self.procs]
        while not self._stopping and self.failure is None:
            if multiprocessing.connection.wait(sentinels, timeout=1.0):
                self._check_workers()

    def _fail(self, failure: WorkerFailure) -> None:
        with self._lock:
            if self.failure is not None or self._stopping:
                return
            self.failure = failure
        logger.error("%s", failure)
        for callback in list(self.on_failure):
            callback(failure)

    # shutdown
    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop every worker: a "stop" message when the group is healthy, then terminate, then kill. Idempotent."""
        with self._lock:
            already = self._stopping
            self._stopping = True
        if already:
            return
        for pipe in self.pipes:
            with contextlib.suppress(OSError, ValueError):
                pipe.send(("stop", None))
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        # A worker that did not stop cleanly (dead, failed at startup, stuck) makes the group broken even when no
        # WorkerFailure was recorded (startup failures raise without one): abort it rather than wait on that peer.
        broken = self.failure is not None or any(proc.exitcode != 0 for proc in self.procs)
        for rank, (proc, pipe) in enumerate(zip(self.procs, self.pipes), start=1):
            if proc.exitcode not in (0, None):
                # Logged: a worker's error rank 0 never asked for (it failed while rank 0 was loading, so rank 0
                # saw only a collective's "connection closed") would otherwise be lost with the pipe.
                self._last_error(rank, pipe)
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)
        for pipe in self.pipes:
            pipe.close()
        distributed.destroy_tensor_parallel(broken=broken)
        self._dir.cleanup()
        atexit.unregister(self.shutdown)


def exit_status(code: int | None) -> str:
    """A child process's exit code in words: 'exit code N', 'signal SIGKILL', or 'no status' while it runs."""
    if code is None:
        return "no status"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"exit code {code}"


# ---- ranks 1..N-1 -------------------------------------------------------------------------------------------

def _watch_parent(parent_pid: int) -> None:
    """Inside a collective a worker does not read its pipe; this ends it when the server is gone."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(0.5)


def worker_main(rank: int, world_size: int, init_method: str, spec: LoadSpec, engine_config, conn,
                parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; rank 0 stops us
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    device = torch.device(engine_config.device)
    if device.type == "cpu":  # N processes share the cores; oversubscribing threads costs more than it gives
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        distributed.select_device(rank, device)
        from model.loader import load_model

        conn.send(("joining", None))  # rank 0 joins the rendezvous only once every worker got this far
        distributed.init_tensor_parallel(rank, world_size, init_method, device, engine_config.tp_timeout_s)
        model, config = load_model(spec.model, dtype=spec.dtype, device=str(device), load_format=spec.load_format,
                                   kernel_backend=engine_config.kernel_backend, quantization=spec.quantization,
                                   kv_cache_dtype=engine_config.kv_cache_dtype)
        conn.send(("loaded", param_bytes(model)))
        kind, (num_blocks, kv_dtype) = conn.recv()
        kv_caches = allocate_kv_caches(config, num_blocks, engine_config.block_size, kv_dtype, device)
        conn.send(("ready", None))
        # Loaded: rank 0 stops us ("stop", then terminate, then kill). A SIGTERM meant for the server often reaches
        # the whole process group or cgroup (systemd, `timeout`, dumb-init); dying of it would make the server's
        # drain a fatal rank failure, as for the engine process (server/engine/engine_process.py).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except BaseException:  # noqa: BLE001 — report any startup failure to rank 0, which names this rank
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
        raise SystemExit(1)
    _serve_steps(model, kv_caches, conn, device)


@torch.inference_mode()
def _serve_steps(model, kv_caches, conn, device: torch.device) -> None:
    while True:
        try:
            kind, header = conn.recv()
        except (EOFError, OSError):  # the server is gone
            os._exit(1)
        if kind == "stop":
            return
        try:
            payload = torch.empty(payload_size(header), dtype=torch.int64, device=device)
            distributed.broadcast(payload, src=0)
            input_ids, positions, md, rows = unpack_step(header, payload)
            run_forward(model, kv_caches, input_ids, positions, md, rows)
        except BaseException:
            # This rank is about to die: tell rank 0 why, so its WorkerFailure says more than "exit code 1".
            with contextlib.suppress(OSError):
                conn.send(("error", traceback.format_exc()))
            raise
