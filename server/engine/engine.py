"""The engine: one step = schedule -> run -> postprocess. `LLMEngine` is synchronous (offline use, tests);
`AsyncEngine` steps it in its own thread and hands outputs to asyncio consumers, so the HTTP event loop
never waits on the model. `n4 serve` runs the engine in its own process instead (server/engine/engine_process.py,
the same interface), so that the engine's Python does not share a GIL with the event loop."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch

from model import distributed
from model.config import ModelConfig, get_config
from model.loader import load_model
from model.quant import FP8_DTYPE
from model.quant_config import is_fp8_kv_cache
from server.engine.block_manager import BlockManager
from server.engine.config import EngineConfig
from server.engine.model_runner import ModelRunner, RunnerOutput, kv_cache_bytes_per_block
from server.engine.request import Request, RequestStatus
from server.engine.sampler import TokenLogprobs
from server.engine.sampling import SamplingParams
from server.engine.scheduler import Scheduler
from server.engine.worker import LoadSpec, TPExecutor, WorkerFailure, param_bytes

logger = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    """What one step produced for one request. Token-level only: text is the API layer's business."""
    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # newly scored prompt positions, in order
    finished: bool = False
    finish_reason: str | None = None
    stop_token_id: int | None = None       # set when a stop_token_ids entry (not EOS) ended the request
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    # Reward models: the head's num_labels values (fp32) at the prompt's last token, on the finishing output
    reward: list[float] | None = None
    # time.monotonic() of the request's first scheduling, for the queue/prefill metrics. Carried on the output
    # because a request that finishes in its first step is gone from the engine by the time the API reads it.
    first_scheduled_time: float | None = None


@dataclass
class EngineStats:
    """Token counters since start (preemptions are counted by the scheduler)."""
    prompt_tokens: int = 0
    generation_tokens: int = 0


@dataclass(frozen=True)
class EngineSnapshot:
    """The scheduler and KV-cache state the API layer reads (admission, /metrics): what an engine in another
    process reports after each step."""
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


class LLMEngine:
    def __init__(self, model: torch.nn.Module, model_config: ModelConfig, engine_config: EngineConfig,
                 kv_cache_dtype: torch.dtype | None = None, executor: TPExecutor | None = None):
        self.model_config = model_config
        self.config = engine_config
        self.executor = executor  # the other tensor-parallel ranks (from_pretrained starts them), or None
        if engine_config.max_model_len > model_config.max_position_embeddings:
            # The RoPE table has max_position_embeddings rows: the Triton kernel would read past it on a GPU
            # without an error (the CLI checks this too; library users construct engines directly).
            raise ValueError(f"max_model_len {engine_config.max_model_len} exceeds the model's "
                             f"max_position_embeddings ({model_config.max_position_embeddings})")
        # The KV cache: E4M3 for --kv-cache-dtype fp8 (each Attention holds its k/v scales), else the model dtype.
        # Blocks from memory are counted with this dtype's element size, so FP8 holds twice the tokens of bf16.
        kv_dtype = kv_cache_dtype or (FP8_DTYPE if is_fp8_kv_cache(engine_config.kv_cache_dtype)
                                      else next(model.parameters()).dtype)
        self.num_blocks = engine_config.num_kv_blocks or self._blocks_from_memory(kv_dtype)
        self._check_pool_fits_a_sequence()
        self.block_manager = BlockManager(self.num_blocks, engine_config.block_size,
                                          engine_config.enable_prefix_caching)
        self.scheduler = Scheduler(engine_config, self.block_manager)
        if executor is not None:  # rank 0 sized the pool; every rank allocates the same blocks of its own heads
            executor.allocate_kv_caches(self.num_blocks, kv_dtype)
        self.runner = ModelRunner(model, model_config, engine_config, self.num_blocks, kv_dtype, executor)
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats()

    @classmethod
    def from_pretrained(cls, model: str, engine_config: EngineConfig, dtype: str = "auto",
                        load_format: str = "auto", quantization: str | None = None) -> "LLMEngine":
        """quantization: None (FP8 checkpoints are detected) or "fp8" (quantize a bf16/fp16/fp32 one at load).
        With engine_config.tensor_parallel_size N > 1 this process becomes rank 0 and starts ranks 1..N-1; call
        close() (or use the engine as a context manager) to stop them."""
        tp = engine_config.tensor_parallel_size
        if tp == 1:
            module, config = load_model(model, dtype=dtype, device=engine_config.device, load_format=load_format,
                                        kernel_backend=engine_config.kernel_backend, quantization=quantization,
                                        kv_cache_dtype=engine_config.kv_cache_dtype)
            return cls(module, config, engine_config)
        _check_tp_divides(get_config(model), tp)
        executor = TPExecutor(tp, LoadSpec(model, dtype, load_format, quantization), engine_config)
        try:
            executor.start()
            distributed.init_tensor_parallel(0, tp, executor.init_method, engine_config.device,
                                             engine_config.tp_timeout_s)
            module, config = load_model(model, dtype=dtype, device=engine_config.device, load_format=load_format,
                                        kernel_backend=engine_config.kernel_backend, quantization=quantization,
                                        kv_cache_dtype=engine_config.kv_cache_dtype)
            executor.wait_loaded(param_bytes(module))
            return cls(module, config, engine_config, executor=executor)
        except BaseException:
            executor.shutdown()
            raise

    @property
    def tensor_parallel_size(self) -> int:
        return self.config.tensor_parallel_size

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (a no-op at TP=1). Idempotent."""
        if self.executor is not None:
            self.executor.shutdown()

    def __enter__(self) -> "LLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- sizing -------------------------------------------------------------------------------------------
    def _blocks_from_memory(self, kv_dtype: torch.dtype) -> int:
        per_block = kv_cache_bytes_per_block(self.model_config, self.config.block_size, kv_dtype)
        if self.config.device.startswith("cuda"):
            free, total = torch.cuda.mem_get_info()
            budget = int(total * self.config.gpu_memory_utilization) - (total - free)
        else:
            budget = self.config.kv_cache_memory_bytes
        return max(budget // per_block, 0)

    def _check_pool_fits_a_sequence(self) -> None:
        needed = -(-self.config.max_model_len // self.config.block_size)
        if self.num_blocks < needed:
            raise ValueError(f"the KV cache has {self.num_blocks} blocks of {self.config.block_size} tokens, fewer "
                             f"than one sequence of --max-model-len {self.config.max_model_len} needs ({needed}); "
                             f"lower --max-model-len or give the cache more memory")

    @property
    def max_concurrency(self) -> float:
        """How many full-length sequences the KV pool holds at once."""
        return self.num_blocks * self.config.block_size / self.config.max_model_len

    # ---- requests -----------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(prompt_token_ids) + params.max_tokens > self.config.max_model_len:
            raise ValueError(f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                             f"max_model_len ({self.config.max_model_len})")
        params.check_vocab(vocab)
        if self.model_config.is_reward:
            _check_reward_params(params)
        request = Request(request_id, list(prompt_token_ids), params, eos_token_id=self.model_config.eos_token_id)
        self.scheduler.add_request(request)   # first: if it refuses the request, no stale id is left behind
        self.requests[request_id] = request

    def abort(self, request_ids: list[str]) -> list[RequestOutput]:
        return self._finish(request_ids, RequestStatus.FINISHED_ABORTED)

    def stop(self, request_ids: list[str]) -> list[RequestOutput]:
        """Finish requests as stopped (the API layer found a stop string)."""
        return self._finish(request_ids, RequestStatus.FINISHED_STOPPED)

    def _finish(self, request_ids: list[str], status: RequestStatus) -> list[RequestOutput]:
        finished = self.scheduler.finish_requests(request_ids, status)
        outputs = []
        for request in finished:
            self._release(request)
            outputs.append(self._make_output(request))
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests

    def snapshot(self) -> EngineSnapshot:
        scheduler, blocks = self.scheduler, self.block_manager
        return EngineSnapshot(scheduler.num_running, scheduler.num_waiting, blocks.usage, self.stats.prompt_tokens,
                              self.stats.generation_tokens, scheduler.num_preemptions, blocks.prefix_cache_queries,
                              blocks.prefix_cache_hits)

    # ---- the step -----------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        result = self.runner.execute(batch)
        finished = self.scheduler.update(batch, result.sampled_token_ids)
        for request in finished:
            if request.request_id in result.rewards:
                request.status = RequestStatus.FINISHED_STOPPED  # a scored prompt is complete, not cut short
        return self._postprocess(batch, result, finished)

    def _postprocess(self, batch, result: RunnerOutput, finished: list[Request]) -> list[RequestOutput]:
        """One RequestOutput per request that got a token, prompt logprobs or finished (a prompt chunk that did
        neither reports nothing); the token counters. Per request this runs every step: lookups are hoisted."""
        finished_ids = {r.request_id for r in finished}
        sampled, logprobs, rewards = result.sampled_token_ids, result.logprobs, result.rewards
        prompt_logprobs = result.prompt_logprobs
        prompt_tokens = generation_tokens = 0
        outputs = []
        for s in batch.scheduled:
            request = s.request
            request_id = request.request_id
            # Prompt positions computed for the first time (vLLM counts a prompt once, however often a preempted
            # request recomputes it; before, 4 prompts of 20 tokens and 3 preemptions counted 140).
            prompt_end = min(s.start + s.num_new_tokens, len(request.prompt_token_ids))
            if prompt_end > request.num_prompt_tokens_counted:
                prompt_tokens += prompt_end - max(s.start, request.num_prompt_tokens_counted)
                request.num_prompt_tokens_counted = prompt_end
            token = sampled.get(request_id)
            is_finished = request_id in finished_ids
            if token is None and not is_finished and request_id not in prompt_logprobs:
                continue
            out = self._make_output(request)
            if token is not None:
                out.new_token_ids.append(token)
                generation_tokens += 1
                entry = logprobs.get(request_id)
                if entry is not None:
                    out.new_logprobs.append(entry)
            if rewards:
                out.reward = rewards.get(request_id)
            if request_id in prompt_logprobs:
                first, entries = prompt_logprobs[request_id]
                out.prompt_logprobs = entries
                request.num_prompt_logprobs_done = first - 1 + len(entries)
            outputs.append(out)
        self.stats.prompt_tokens += prompt_tokens
        self.stats.generation_tokens += generation_tokens
        for request in finished:
            self._release(request)
        return outputs

    def _make_output(self, request: Request) -> RequestOutput:
        finish_reason = request.status.finish_reason
        return RequestOutput(
            request_id=request.request_id,
            finished=finish_reason is not None,
            finish_reason=finish_reason,
            stop_token_id=request.stop_reason if finish_reason is not None else None,
            num_prompt_tokens=len(request.prompt_token_ids),
            num_cached_tokens=request.num_cached_tokens,
            num_output_tokens=len(request.output_token_ids),
            first_scheduled_time=request.first_scheduled_time,
        )

    def _release(self, request: Request) -> None:
        self.requests.pop(request.request_id, None)
        self.runner.free_request(request.request_id)


def _check_reward_params(params: SamplingParams) -> None:
    """A reward model scores its prompt and generates nothing: it has no logits to sample or to score with."""
    if params.max_tokens != 0:
        raise ValueError(f"this is a reward model: it scores the prompt and generates nothing, so max_tokens must "
                         f"be 0 (got {params.max_tokens})")
    if params.logprobs is not None or params.prompt_logprobs is not None:
        raise ValueError("this is a reward model: it has no token logprobs")


def _check_tp_divides(config: ModelConfig, tp: int) -> None:
    """Checked before any process starts, so a bad -tp fails at once with the reason."""
    if config.num_key_value_heads % tp:
        raise ValueError(f"--tensor-parallel-size {tp} must divide the model's {config.num_key_value_heads} KV "
                         f"heads: each rank holds whole KV heads and their query heads")
    if config.intermediate_size % tp:
        raise ValueError(f"--tensor-parallel-size {tp} must divide the MLP width ({config.intermediate_size})")


class EngineDeadError(RuntimeError):
    pass


class EngineClient:
    """The interface the API layer uses: `generate()` (an async iterator of RequestOutput), `abort()`,
    `stop_request()`, `model_config`, `max_model_len`, `snapshot()`, `is_running`, `start()`, `shutdown()` and
    `fatal_callbacks`. Subclasses say how a command reaches the engine (`_submit`) and deliver each step's outputs
    to `_dispatch` on the event loop."""

    def __init__(self):
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        # Called (from any thread) when the engine dies in a way the process cannot recover from: a tensor-parallel
        # rank failed, or the engine process vanished. The server registers its exit here.
        self.fatal_callbacks: list = []
        self._fatal_lock = threading.Lock()

    @property
    def is_running(self) -> bool:
        raise NotImplementedError

    def _submit(self, kind: str, arg) -> None:
        """Send ("add" | "abort" | "stop", argument) to the engine (see apply_command)."""
        raise NotImplementedError

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        if not self.is_running:
            raise EngineDeadError(f"the engine is not running ({self.error})" if self.error else
                                  "the engine is not running")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._submit("add", (request_id, list(prompt_token_ids), params))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # the consumer went away (client disconnect, stop string, error): free its blocks
                self._submit("abort", [request_id])

    def abort(self, request_id: str) -> None:
        self._submit("abort", [request_id])

    def stop_request(self, request_id: str) -> None:
        """Finish a request as stopped; its stream receives a final output with finish_reason 'stop'."""
        self._submit("stop", [request_id])

    def _die(self, error: BaseException, fatal: bool = True, message: str | None = None) -> None:
        """Mark the engine dead (health 503, every stream gets an EngineDeadError) and, if fatal, run the fatal
        callbacks; only the first death counts."""
        with self._fatal_lock:
            first = self.error is None
            if first:
                self.error = error
        if not first:
            return
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop may already be closed at exit
                self._loop.call_soon_threadsafe(self._fail_all, EngineDeadError(message or f"engine failed: {error}"))
        if fatal:
            for callback in list(self.fatal_callbacks):
                callback(error)

    def _dispatch(self, outputs: list) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out.error if isinstance(out, _ErrorOutput) else out)

    def _fail_all(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.put_nowait(error)


def apply_command(engine: LLMEngine, kind: str, arg) -> list:
    """Carry out one command from an EngineClient on the engine; -> the outputs it produced (an add the engine
    refuses becomes an _ErrorOutput for that request's stream)."""
    if kind == "add":
        request_id, prompt, params = arg
        try:
            engine.add_request(request_id, prompt, params)
        except ValueError as e:
            return [_ErrorOutput(request_id, e)]
        return []
    if kind == "abort":
        return engine.abort(arg)
    if kind == "stop":
        return engine.stop(arg)
    raise ValueError(f"unknown engine command {kind!r}")


class AsyncEngine(EngineClient):
    """Runs `LLMEngine.step` in a dedicated thread. Commands reach the engine thread through a queue, outputs come
    back through one `call_soon_threadsafe` per step."""

    def __init__(self, engine: LLMEngine):
        super().__init__()
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        if engine.executor is not None:
            engine.executor.on_failure.append(self._die)

    @property
    def model_config(self) -> ModelConfig:
        return self.engine.model_config

    @property
    def max_model_len(self) -> int:
        return self.engine.config.max_model_len

    def snapshot(self) -> EngineSnapshot:
        """Plain int/float reads of state the engine thread updates: each is atomic under the GIL, and no reader
        needs the fields consistent with each other."""
        return self.engine.snapshot()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="n4-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread, then the other tensor-parallel ranks."""
        self._stopping.set()
        self._commands.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout)
        self.engine.close()

    def _submit(self, kind: str, arg) -> None:
        self._commands.put((kind, arg))

    # ---- engine thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                outputs = self._drain_commands(block=not self.engine.has_unfinished_requests())
                if self.engine.has_unfinished_requests():
                    outputs += self.engine.step()
                if outputs:
                    self._loop.call_soon_threadsafe(self._dispatch, outputs)
        except BaseException as e:  # noqa: BLE001 — any failure kills the engine; every waiter must hear of it
            if isinstance(e, WorkerFailure) or self.engine.executor is not None:
                # The tensor-parallel group is broken (or out of step): nothing can run again; the server exits.
                logger.error("engine step failed: %s", e)
                self._die(e if isinstance(e, WorkerFailure) else WorkerFailure(f"rank 0 failed: {e!r}"))
                return
            logger.exception("engine step failed")
            self._die(e, fatal=False, message=f"engine failed: {e!r}")

    def _drain_commands(self, block: bool) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        while True:
            try:
                kind, arg = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
            except queue.Empty:
                return outputs
            block = False
            if kind != "wake":
                outputs += apply_command(self.engine, kind, arg)


@dataclass
class _ErrorOutput:
    request_id: str
    error: BaseException
