"""`n4 serve` (OpenAI-compatible server) and `n4 generate` (one prompt, offline); n4/cli.py dispatches here."""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import uuid
from pathlib import Path

from model.config import PRESETS, get_config
from model.ops import BACKENDS, default_backend
from model.quant_config import KV_CACHE_DTYPES
from server.api.config import DEFAULT_MAX_REQUEST_BODY_BYTES
from server.engine.config import EngineConfig

logger = logging.getLogger("n4")
# The demo checkpoint sits next to the code in a checkout (make serve, editable installs). A copied install (the
# Docker image's `pip install .`) has no models/ beside its packages, so the image names the folder with
# N4_DEMO_MODEL; without it the default --model, and the tokenizer that presets borrow, would not exist there.
DEMO_MODEL = os.environ.get("N4_DEMO_MODEL") or str(Path(__file__).resolve().parents[2] / "models" / "demo")
# vLLM's --dtype also takes these spellings (`--dtype half` is common in its docs and scripts).
_DTYPE_ALIASES = {"half": "float16", "float": "float32"}


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEMO_MODEL,
                   help=f"checkpoint directory (HF format) or a preset ({', '.join(PRESETS)}) with --load-format "
                        f"dummy; default: the embedded demo model")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", *_DTYPE_ALIASES],
                   help="weight and activation dtype (half = float16, float = float32, as in vLLM); auto = the "
                        "checkpoint's, except float32 on the CPU")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="dummy: random weights of the model's shape (for benchmarks)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one step")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV-cache blocks (default: from memory)")
    p.add_argument("--kv-cache-memory", type=int, default=256, help="MiB for the KV cache on the CPU")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory n4 may use (weights + KV cache)")
    p.add_argument("--enable-prefix-caching", action="store_true", help="reuse KV blocks of shared prompt prefixes")
    p.add_argument("--kernel-backend", choices=BACKENDS, default=None,
                   help="triton (default with CUDA) or torch (plain-torch references; the default without CUDA)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    p.add_argument("--quantization", "-q", default=None, metavar="fp8",
                   help="fp8: quantize a bf16/fp16/fp32 checkpoint at load (per-channel weights, dynamic per-token "
                        "activations); FP8 checkpoints (fp8, compressed-tensors, ModelOpt) are detected without it")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, choices=[1, 2, 4, 8],
                   help="ranks (one process each) the model is split across; must divide the KV heads")
    p.add_argument("--tp-timeout", type=float, default=600.0,
                   help="seconds a tensor-parallel collective may wait before the engine is declared dead")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="fp8 (= fp8_e4m3): store K/V in FP8 E4M3 with the checkpoint's k/v scales (1.0 without); "
                        "auto: the model dtype")


def _engine_settings(args):
    """-> (engine_config, dtype) from the flags, checked before any model loads."""
    model_config = get_config(args.model)
    device = "cuda" if _cuda_available() else "cpu"
    dtype = _DTYPE_ALIASES.get(args.dtype, args.dtype)
    if dtype == "auto" and device == "cpu" and model_config.torch_dtype != "float32":
        # CPU matmuls in bf16/fp16 are slower than fp32 on most hosts; GPUs keep the checkpoint dtype.
        dtype = "float32"
    if args.kernel_backend == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("--kernel-backend triton needs a CUDA GPU (or TRITON_INTERPRET=1, the slow interpreter "
                         "the tests use); use --kernel-backend torch on the CPU")
    # `is None`, not `or`: an explicit --max-model-len 0 is an error (EngineConfig), not "the model's length".
    max_model_len = model_config.max_position_embeddings if args.max_model_len is None else args.max_model_len
    if max_model_len > model_config.max_position_embeddings:
        raise ValueError(f"--max-model-len {max_model_len} exceeds the model's max_position_embeddings "
                         f"({model_config.max_position_embeddings})")
    engine_config = EngineConfig(
        max_model_len=max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
        enable_prefix_caching=args.enable_prefix_caching, num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_bytes=args.kv_cache_memory << 20, gpu_memory_utilization=args.gpu_memory_utilization,
        kernel_backend=args.kernel_backend or default_backend(), enforce_eager=args.enforce_eager, device=device,
        kv_cache_dtype=args.kv_cache_dtype, tensor_parallel_size=args.tensor_parallel_size,
        tp_timeout_s=args.tp_timeout)
    return engine_config, dtype


def _build_engine(args):
    """An in-process LLMEngine (n4 generate, n4 bench throughput) and the tokenizer."""
    from server.engine.engine_process import engine_info
    from server.engine.engine import LLMEngine

    engine_config, dtype = _engine_settings(args)
    engine = LLMEngine.from_pretrained(args.model, engine_config, dtype=dtype, load_format=args.load_format,
                                       quantization=args.quantization)
    try:
        _log_engine(args, engine_info(engine))
        return engine, _tokenizer(args)
    except BaseException:
        engine.close()
        raise


def _tokenizer(args):
    from server.api.tokenizer import Tokenizer

    tokenizer_dir = args.model if os.path.isfile(os.path.join(args.model, "tokenizer.model")) else DEMO_MODEL
    if tokenizer_dir != args.model:
        logger.warning("%s has no tokenizer.model; using the demo model's tokenizer", args.model)
    return Tokenizer.from_pretrained(tokenizer_dir)


def _log_engine(args, info) -> None:
    model_config, engine_config = info.model_config, info.engine_config
    logger.info("model %s: %d layers, hidden %d, %s, %s compute on %s, %s kernels; KV cache %s, %d "
                "blocks of %d tokens = %d tokens, %.1f concurrent sequences of %d tokens", args.model,
                model_config.num_hidden_layers, model_config.hidden_size, info.weights, info.compute_dtype,
                engine_config.device, engine_config.kernel_backend, info.kv_cache_dtype, info.num_blocks,
                engine_config.block_size, info.num_blocks * engine_config.block_size, info.max_concurrency,
                engine_config.max_model_len)
    if info.worker_pids:
        per_rank = ", ".join(f"rank {r}: {mib:.1f} MiB" for r, mib in sorted(info.rank_param_mib.items()))
        logger.info("tensor parallel size %d (worker pids %s); weights %s", engine_config.tensor_parallel_size,
                    ", ".join(str(p) for p in info.worker_pids), per_rank)


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def serve(args) -> None:
    from server.api import lifecycle
    from server.api.app import build_app
    from server.api.config import ServerConfig
    from server.engine.engine_process import EngineProcess, EngineSpec

    # Checked before the model loads, so a bad flag fails in a second rather than after minutes. An explicit
    # --api-key "" (say "$KEY" with KEY unset) is refused by ServerConfig rather than read as "no key", which
    # would serve without authentication; an empty $N4_API_KEY still means unset.
    api_key = args.api_key if args.api_key is not None else (os.environ.get("N4_API_KEY") or None)
    server_config = ServerConfig(api_key=api_key,
                                 max_queue_len=args.max_queue_len,
                                 max_request_body_bytes=args.max_request_body_bytes,
                                 shutdown_timeout=args.shutdown_timeout)
    engine_config, dtype = _engine_settings(args)
    tokenizer = _tokenizer(args)
    _check_listen(args.host, args.port)
    spec = EngineSpec(args.model, engine_config, dtype=dtype, load_format=args.load_format,
                      quantization=args.quantization, log_level=logging.getLogger().level)
    loading = lifecycle.LoadingResponder(args.host, args.port).start()   # /health 503 until the model is up
    try:
        engine = EngineProcess.launch(spec)   # the model loads in the engine process
    finally:
        loading.stop()
    try:
        _log_engine(args, engine.info)
        logger.info("engine process pid %d", engine.info.pid)
        names = args.served_model_name or [os.path.basename(os.path.normpath(args.model))]
        app = build_app(engine, tokenizer, names, server_config)
        logger.info("serving %s on http://%s:%d%s", " / ".join(map(repr, names)), args.host, args.port,
                    " (API key required)" if server_config.api_key else "")
        lifecycle.run(app, args.host, args.port, args.log_level, server_config.shutdown_timeout)
    finally:
        engine.shutdown()  # the engine process and its tensor-parallel ranks, however serving ended


def _check_listen(host: str, port: int) -> None:
    """Fail now if n4 could not listen on host:port. Otherwise a port in use surfaces only after the model has
    loaded (the loading responder's bind error dies with its thread), and getaddrinfo takes a port past 65535
    modulo 2**16 (--port 70000 served on 4464)."""
    if not 0 <= port <= 65535:   # 0: any free port (tests use it)
        raise ValueError(f"--port must be in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(f"--host {host!r}: {e.strerror}") from None
    for family, kind, proto, _, address in infos:   # every address uvicorn (asyncio create_server) binds
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as asyncio does: TIME_WAIT is no clash
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as e:
                raise OSError(f"cannot listen on {address[0]}:{port}: {e.strerror}") from None


def generate(args) -> None:
    engine, tokenizer = _build_engine(args)
    with engine:
        _generate(args, engine, tokenizer)


def _generate(args, engine, tokenizer) -> None:
    from server.api.output import ChoiceProcessor
    from server.engine.sampling import SamplingParams

    if args.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
        stop_ids = tuple(tokenizer.chat_stop_token_ids)
    else:
        text, stop_ids = args.prompt, ()
    prompt_ids = tokenizer.encode(text)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                            stop_token_ids=stop_ids)
    request_id = uuid.uuid4().hex
    engine.add_request(request_id, prompt_ids, params)
    processor = ChoiceProcessor(0, tokenizer, prompt_ids, stop=[])
    while engine.has_unfinished_requests():
        for out in engine.step():
            sys.stdout.write(processor.process(out).text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    logger.info("%d prompt tokens, %d generated, finish reason %s", len(prompt_ids),
                processor.num_output_tokens, processor.finish_reason)


def add_commands(sub) -> None:
    """Register `serve` and `generate` on the `n4` command's subparsers (n4/cli.py)."""
    p_serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    _add_engine_args(p_serve)
    p_serve.add_argument("--host", default="127.0.0.1")
    p_serve.add_argument("--port", type=int, default=8000)
    p_serve.add_argument("--served-model-name", nargs="+", default=None,
                         help="the model name clients send; several are all accepted, and responses carry the "
                              "first (as in vLLM)")
    p_serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p_serve.add_argument("--api-key", default=None,
                         help="require 'Authorization: Bearer KEY' (default: $N4_API_KEY; /health, /metrics and "
                              "/version stay public)")
    p_serve.add_argument("--max-queue-len", type=int, default=None,
                         help="answer 429 (with Retry-After) while this many requests wait to run (default: no cap)")
    p_serve.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_REQUEST_BODY_BYTES,
                         help="larger request bodies get 413 (default: 8 MiB)")
    p_serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                         help="on SIGTERM, seconds to let in-flight requests finish before aborting them")
    p_serve.set_defaults(func=serve)

    p_gen = sub.add_parser("generate", help="generate from one prompt")
    _add_engine_args(p_gen)
    p_gen.add_argument("--prompt", required=True)
    p_gen.add_argument("--max-tokens", type=int, default=64)
    p_gen.add_argument("--temperature", type=float, default=0.0)
    p_gen.add_argument("--seed", type=int, default=None)
    p_gen.add_argument("--chat", action="store_true", help="wrap the prompt in the Nemotron-4 chat template")
    p_gen.set_defaults(func=generate)
