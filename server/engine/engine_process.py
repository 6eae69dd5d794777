"""The engine in its own process, as `n4 serve` runs it: the API server's process keeps HTTP, tokenization and
detokenization; a child process loads the model and loops schedule -> run -> postprocess.

Why a process and not a thread: in one process the engine's Python (hundreds of small torch calls per step) and the
event loop take turns on one GIL, and every turn the event loop takes stalls the step. On the 2-core CI machine,
an 8-layer 512-wide fp32 model at 16 concurrent streams stepped in ~45 ms over HTTP against ~29 ms offline.

Wire protocol (multiprocessing pipes, pickled tuples):
- parent -> child: ("add", (request_id, prompt_token_ids, params)), ("abort", ids), ("stop", ids), ("shutdown", None)
- child -> parent: ("ready", EngineInfo) or ("load_failed", (kind, message)) once; then ("outputs", (outputs,
  EngineSnapshot)) per step that produced anything or changed the snapshot, and ("dead", (message, fatal)) when the
  engine cannot go on.
A fatal death (a tensor-parallel rank failed, or the engine process itself vanished) runs `fatal_callbacks`: the
server exits non-zero. A non-fatal one (a step raised) leaves the server up, answering 503 on /health.

The child ignores SIGINT (the server drains on Ctrl-C, then stops it), and SIGTERM once the model is loaded: a
SIGTERM meant for the server often reaches the whole process group or cgroup (systemd's default KillMode, `timeout`,
`kill -- -PGID`, dumb-init), and an engine that died of it would turn the server's drain into an engine failure
(in-flight streams got an error, exit status 1). It exits when its parent is gone (end of file on the command
pipe), so no engine outlives its server; the server stops it with the "shutdown" command, SIGKILL as a last resort.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
from dataclasses import dataclass, field

from model.config import ModelConfig
from server.engine.config import EngineConfig
from server.engine.engine import EngineClient, EngineDeadError, EngineSnapshot, apply_command
from server.engine.worker import exit_status

logger = logging.getLogger(__name__)
_IDLE_POLL_S = 0.5      # how often an idle engine checks for a vanished parent
_LOAD_POLL_S = 0.2


@dataclass(frozen=True)
class EngineSpec:
    """What the child needs to build LLMEngine.from_pretrained, and its log level. torch keeps its default thread
    count (the cores) in the engine process: on 2 cores, 16 streams of the issue's grid model gave 526 output
    tok/s with 2 threads against 366 with 1 (the API process needs little CPU once the GIL is not shared)."""
    model: str
    engine_config: EngineConfig
    dtype: str = "auto"
    load_format: str = "auto"
    quantization: str | None = None
    log_level: int = logging.INFO


@dataclass(frozen=True)
class EngineInfo:
    """What the loaded engine tells the server once: its configs and the facts the startup log states."""
    model_config: ModelConfig
    engine_config: EngineConfig
    num_blocks: int
    max_concurrency: float
    weights: str                 # e.g. "float32 weights" or the FP8 scheme
    compute_dtype: str
    kv_cache_dtype: str
    pid: int
    worker_pids: list[int] = field(default_factory=list)
    rank_param_mib: dict[int, float] = field(default_factory=dict)


class EngineProcess(EngineClient):
    """EngineClient's interface (the one AsyncEngine has) over an engine in a child process. `launch()` starts the
    child and returns once the model is loaded, or raises the child's load error (ValueError / OSError keep their
    type, for the CLI's one-line message)."""

    def __init__(self, proc: mp.process.BaseProcess, commands, outputs, info: EngineInfo):
        super().__init__()
        self._proc = proc
        self._commands_conn = commands
        self._outputs_conn = outputs
        self.info = info
        self._snapshot = EngineSnapshot()
        self._outbox: queue.Queue = queue.Queue()   # commands, sent by a thread so the event loop never blocks
        self._threads: list[threading.Thread] = []
        self._closing = False

    @classmethod
    def launch(cls, spec: EngineSpec) -> "EngineProcess":
        ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited threads, locks or CUDA state
        commands_recv, commands_send = ctx.Pipe(duplex=False)
        outputs_recv, outputs_send = ctx.Pipe(duplex=False)
        # Not a daemon: the engine starts its own tensor-parallel worker processes, which daemons may not.
        proc = ctx.Process(target=_engine_main, args=(spec, commands_recv, outputs_send), name="n4-engine")
        binding = omp_binding(spec.engine_config)
        with _environment(binding):  # the child copies the environment as it starts
            proc.start()
        if binding:
            logger.info("engine OpenMP threads pinned one per CPU (GOMP_CPU_AFFINITY=%s); set OMP_PROC_BIND=false "
                        "to leave their placement to the OS", binding["GOMP_CPU_AFFINITY"])
        commands_recv.close()
        outputs_send.close()
        try:
            info = _wait_ready(proc, outputs_recv)
        except BaseException:
            _stop_process(proc, timeout=5.0)
            raise
        return cls(proc, commands_send, outputs_recv, info)

    # ---- what the API layer reads -------------------------------------------------------------------------
    @property
    def model_config(self) -> ModelConfig:
        return self.info.model_config

    @property
    def max_model_len(self) -> int:
        return self.info.engine_config.max_model_len

    def snapshot(self) -> EngineSnapshot:
        """As of the engine's last step (or command) that produced output."""
        return self._snapshot

    @property
    def is_running(self) -> bool:
        return bool(self._threads) and self._proc.is_alive() and self.error is None

    # ---- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # Outputs are read on the event loop itself, when the pipe is readable: one wakeup per engine step, with no
        # thread handing each message over (a receiver thread cost a self-pipe write and a GIL handoff per step,
        # ~20% of the API process's samples at 16 streams). Commands keep a sender thread: a long prompt can fill
        # the pipe while the engine is inside a step, and that wait must not block the loop.
        self._loop.add_reader(self._outputs_conn.fileno(), self._receive)
        thread = threading.Thread(target=self._send, name="n4-engine-send", daemon=True)
        thread.start()
        self._threads.append(thread)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask the engine process to stop (it stops its tensor-parallel ranks), then make sure it is gone."""
        self._closing = True
        self._stop_reading()
        self._outbox.put(("shutdown", None))
        if not self._threads:  # never started: no sender thread to deliver the message
            with contextlib.suppress(OSError):
                self._commands_conn.send(("shutdown", None))
        self._proc.join(timeout)
        if self._proc.is_alive():   # hung: a loaded engine ignores SIGTERM (see the module docstring)
            self._proc.kill()
            self._proc.join(5.0)
        self._outbox.put(None)
        with contextlib.suppress(OSError):
            self._commands_conn.close()

    close = shutdown

    def _submit(self, kind: str, arg) -> None:
        self._outbox.put((kind, arg))

    # ---- the pipes ----------------------------------------------------------------------------------------
    def _send(self) -> None:
        """The sender thread: commands from the outbox into the pipe."""
        while (message := self._outbox.get()) is not None:
            try:
                self._commands_conn.send(message)
            except (OSError, ValueError):  # the engine process is gone; the reader reports it
                return

    def _receive(self) -> None:
        """On the event loop, when the outputs pipe is readable: handle every message already there."""
        try:
            while self._outputs_conn.poll():
                kind, payload = self._outputs_conn.recv()
                if kind == "outputs":
                    outputs, self._snapshot = payload
                    self._dispatch(outputs)
                elif kind == "dead":
                    self._engine_died(*payload)
        except (EOFError, OSError):
            self._stop_reading()
            if not self._closing:
                self._proc.join(1.0)
                self._engine_died(f"the engine process exited with {exit_status(self._proc.exitcode)}", fatal=True)

    def _stop_reading(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed() or self._outputs_conn.closed:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            loop.remove_reader(self._outputs_conn.fileno())
        else:
            with contextlib.suppress(RuntimeError):  # closed meanwhile
                loop.call_soon_threadsafe(self._stop_reading)

    def _engine_died(self, message: str, fatal: bool) -> None:
        if self.error is None:
            logger.error("%s", message)
        self._die(EngineDeadError(message), fatal, message=message)


def _wait_ready(proc, conn) -> EngineInfo:
    while not conn.poll(_LOAD_POLL_S):
        if not proc.is_alive():
            raise RuntimeError(f"the engine process exited with {exit_status(proc.exitcode)} while loading")
    try:
        kind, payload = conn.recv()
    except EOFError:
        proc.join(5.0)
        raise RuntimeError(f"the engine process exited with {exit_status(proc.exitcode)} while loading") from None
    if kind == "load_failed":
        error_kind, message = payload
        raise {"value": ValueError, "os": OSError}.get(error_kind, RuntimeError)(message)
    return payload


# Set by the user, these say how OpenMP threads are placed; n4 then leaves placement alone.
_OMP_PLACEMENT_VARS = ("GOMP_CPU_AFFINITY", "OMP_PROC_BIND", "OMP_PLACES", "KMP_AFFINITY")


def omp_binding(engine_config: EngineConfig) -> dict[str, str]:
    """The environment that pins the engine process's OpenMP threads one per CPU (as vLLM's CPU backend does with
    VLLM_CPU_OMP_THREADS_BIND): a CPU engine at tensor-parallel size 1, unless the user placed threads already.
    Why: under `n4 serve` the API process and the clients wake on every step, and an unpinned OpenMP thread they
    displace migrates and stalls the step's barriers. The grid model at 16 streams on 2 cores, 6 runs each,
    interleaved: 518 output tok/s unpinned against 540 pinned (mean)."""
    if engine_config.device != "cpu" or engine_config.tensor_parallel_size != 1:
        return {}
    if any(os.environ.get(name) for name in _OMP_PLACEMENT_VARS) or not hasattr(os, "sched_getaffinity"):
        return {}
    return {"GOMP_CPU_AFFINITY": " ".join(str(cpu) for cpu in one_cpu_per_core(os.sched_getaffinity(0)))}


def one_cpu_per_core(cpus) -> list[int]:
    """The first CPU of each physical core among `cpus` (Linux topology; each CPU its own core where that is not
    readable). torch starts one thread per core, and two of them pinned to hyperthread siblings would share one."""
    chosen, cores = [], set()
    for cpu in sorted(cpus):
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                core = f.read().strip()
        except OSError:
            core = f"cpu{cpu}"
        if core not in cores:
            cores.add(core)
            chosen.append(cpu)
    return chosen


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """os.environ with `values` set, restored afterwards (a spawned child copies the environment at start)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _stop_process(proc, timeout: float) -> None:
    if proc.is_alive():
        proc.terminate()
        proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join(timeout)


# ---- the child ------------------------------------------------------------------------------------------------

def _engine_main(spec: EngineSpec, commands, outputs) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server drains, then stops us
    logging.basicConfig(level=spec.log_level, format="%(levelname)s %(name)s: %(message)s")
    from server.engine.engine import LLMEngine
    try:
        engine = LLMEngine.from_pretrained(spec.model, spec.engine_config, dtype=spec.dtype,
                                           load_format=spec.load_format, quantization=spec.quantization)
    except BaseException as e:  # noqa: BLE001 — every load failure goes back to the server as one message
        kind = "value" if isinstance(e, ValueError) else "os" if isinstance(e, OSError) else "other"
        with contextlib.suppress(OSError):
            outputs.send(("load_failed", (kind, str(e) if kind != "other" else f"{type(e).__name__}: {e}")))
        if kind == "other":
            logging.getLogger(__name__).exception("the engine failed to load")
        return
    try:
        _EngineLoop(engine, commands, outputs).run()
    finally:
        engine.close()


class _EngineLoop:
    def __init__(self, engine, commands, outputs):
        self.engine = engine
        self.commands = commands
        self.outputs = outputs
        self._send_lock = threading.Lock()  # the tensor-parallel monitor thread may report a failure meanwhile
        self._dead = threading.Event()
        self._last_snapshot = None   # the snapshot the server has (None: none sent yet)
        if engine.executor is not None:
            engine.executor.on_failure.append(lambda failure: self._report_death(str(failure), fatal=True))

    def run(self) -> None:
        from server.engine.worker import WorkerFailure
        # Loaded: from now on the server decides when we stop (after its drain). Before this, SIGTERM still ends a
        # load (EngineProcess.launch's cleanup relies on it).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            self._send("ready", engine_info(self.engine))
        except OSError:
            return  # the server went away while the model loaded
        while not self._dead.is_set():
            try:
                outputs, stop = self._drain_commands(block=not self.engine.has_unfinished_requests())
            except (EOFError, OSError):
                return  # the server is gone
            if stop:
                return
            try:
                if self.engine.has_unfinished_requests():
                    outputs += self.engine.step()
            except BaseException as e:  # noqa: BLE001 — any failure ends the engine; the server must hear of it
                fatal = isinstance(e, WorkerFailure) or self.engine.executor is not None
                logging.getLogger(__name__).exception("engine step failed")
                self._report_death(str(e) if isinstance(e, WorkerFailure) else f"engine failed: {e!r}", fatal)
                return
            # A step can change the gauges without producing an output (a prompt chunk: on 2 cores an 800-token
            # prompt in 16-token chunks showed nothing running and an empty KV cache for 1.6 s), so a changed
            # snapshot goes out on its own too. Only a changed one: an engine spinning on an unschedulable waiting
            # request must not flood the pipe.
            snapshot = self.engine.snapshot()
            if outputs or snapshot != self._last_snapshot:
                self._last_snapshot = snapshot
                try:
                    self._send("outputs", (outputs, snapshot))
                except OSError:
                    return

    def _drain_commands(self, block: bool) -> tuple[list, bool]:
        outputs: list = []
        while self.commands.poll(_IDLE_POLL_S if block else 0):
            block = False
            kind, arg = self.commands.recv()
            if kind == "shutdown":
                return outputs, True
            outputs += apply_command(self.engine, kind, arg)
        return outputs, False

    def _report_death(self, message: str, fatal: bool) -> None:
        if self._dead.is_set():
            return
        self._dead.set()
        with contextlib.suppress(OSError):
            self._send("dead", (message, fatal))

    def _send(self, kind: str, payload) -> None:
        with self._send_lock:
            self.outputs.send((kind, payload))


def engine_info(engine) -> EngineInfo:
    model = engine.runner.model
    compute_dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    weights = model.linear_method.describe()
    weights = f"{compute_dtype} weights" if weights == "unquantized" else weights
    executor = engine.executor
    return EngineInfo(
        model_config=engine.model_config, engine_config=engine.config, num_blocks=engine.num_blocks,
        max_concurrency=engine.max_concurrency, weights=weights, compute_dtype=compute_dtype,
        kv_cache_dtype=str(engine.runner.kv_caches[0].dtype).replace("torch.", ""), pid=os.getpid(),
        worker_pids=[p.pid for p in executor.procs] if executor is not None else [],
        rank_param_mib={r: b / 2**20 for r, b in executor.rank_param_bytes.items()} if executor is not None else {})
