"""The FastAPI application: routes, the OpenAI error envelope, engine lifecycle."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from server.api import openapi, tokenization
from server.api.admission import Admission
from server.api.config import ServerConfig
from server.api.guard import RequestGuard
from server.api.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, ServerMetrics
from server.api.protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                 RewardRequest, TokenizeRequest, error_envelope)
from server.api.rewards import RewardServing
from server.api.serving import EventStream, OpenAIServing
from server.api.tokenizer import Tokenizer
from server.engine.engine import AsyncEngine, EngineDeadError

logger = logging.getLogger(__name__)
VERSION = "0.1.0"


class ClientDisconnected(Exception):
    pass


def build_app(engine: AsyncEngine, tokenizer: Tokenizer, model_name: str | list[str],
              config: ServerConfig | None = None) -> FastAPI:
    """model_name: the name clients send, or several (vLLM's `--served-model-name a b`): requests may name any of
    them; responses and metrics carry the first."""
    config = config or ServerConfig()
    names = [model_name] if isinstance(model_name, str) else list(model_name)
    model_name = names[0]
    max_model_len = engine.max_model_len
    admission = Admission(engine, config.max_queue_len)
    metrics = ServerMetrics(engine, model_name)
    serving = OpenAIServing(engine, tokenizer, model_name, max_model_len, admission, metrics, aliases=names[1:])
    # A reward checkpoint scores conversations instead of generating (server/api/rewards.py).
    reward_serving = RewardServing(serving) if engine.model_config.is_reward else None
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.loop = asyncio.get_running_loop()
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="n4", version=VERSION, lifespan=lifespan)
    app.add_middleware(RequestGuard, config=config, admission=admission)
    openapi.install(app)   # /openapi.json documents the hand-parsed request bodies and the error envelope
    app.state.engine = engine
    app.state.serving = serving
    app.state.admission = admission
    app.state.metrics = metrics
    app.state.config = config

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return JSONResponse(exc.envelope(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(_: Request, exc: EngineDeadError):
        return JSONResponse(error_envelope(str(exc), "service_unavailable", code="engine_dead"), status_code=503)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        # Anything unforeseen still answers in the envelope clients parse (Starlette's default is plain text).
        # Starlette logs the exception after this handler runs.
        return JSONResponse(error_envelope("The server had an internal error while processing the request.",
                                           "server_error", code="internal_error"), status_code=500)

    @app.exception_handler(404)
    async def _not_found(request: Request, _exc):
        return JSONResponse(error_envelope(f"Not found: {request.url.path[:200]}", "invalid_request_error",
                                           code="not_found"), status_code=404)

    @app.exception_handler(405)
    async def _bad_method(request: Request, _exc):
        return JSONResponse(error_envelope(f"Method {request.method} not allowed on {request.url.path[:200]}",
                                           "invalid_request_error", code="method_not_allowed"), status_code=405)

    @app.get("/health")
    async def health():
        # 503 until the engine runs, after it died, and while draining (the guard answers that first).
        return Response(status_code=200 if engine.is_running and not admission.draining else 503)

    @app.get("/version")
    async def version():
        return {"version": VERSION}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.post("/tokenize")
    async def tokenize(raw: Request):
        request = await _parse(raw, TokenizeRequest)
        serving.check_model(request.model)
        return tokenization.tokenize(tokenizer, request, max_model_len)

    @app.post("/detokenize")
    async def detokenize(raw: Request):
        request = await _parse(raw, DetokenizeRequest)
        serving.check_model(request.model)
        return tokenization.detokenize(tokenizer, request)

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return tokenization.tokenizer_info(tokenizer, max_model_len)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "n4",
                                            "root": model_name, "parent": None, "max_model_len": max_model_len}
                                           for name in names]}

    @app.post("/v1/completions")
    async def completions(raw: Request):
        request = await _parse(raw, CompletionRequest)
        if reward_serving is not None:
            raise APIError(f"The model `{model_name}` is a reward model: it scores conversations and does not "
                           f"generate text, so /v1/completions is not supported. Send the user and assistant "
                           f"messages to /v1/chat/completions or /v1/rewards.", code="reward_model")
        return await _respond(raw, serving.completion(request), request.stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(raw: Request):
        request = await _parse(raw, ChatCompletionRequest)
        handler = reward_serving.chat(request) if reward_serving is not None else serving.chat(request)
        return await _respond(raw, handler, request.stream)

    @app.post("/v1/rewards")
    async def rewards(raw: Request):
        request = await _parse(raw, RewardRequest)
        if reward_serving is None:
            raise APIError(f"The model `{model_name}` is not a reward model: /v1/rewards needs a checkpoint with a "
                           f"reward head (config.json architectures: [\"NemotronForRewardModel\"]).",
                           param="model", code="not_a_reward_model")
        return await _respond(raw, reward_serving.rewards(request), False)

    return app


def _check_content_type(raw: Request) -> None:
    # A missing Content-Type is read as JSON (lenient, like OpenAI's API); a different one is a client mistake
    # worth naming (curl -d without -H sends form encoding).
    content_type = raw.headers.get("content-type")
    if content_type is None:
        return
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise APIError(f"Content-Type must be application/json, got {media_type[:100]!r}.")


# JSON may escape a lone UTF-16 surrogate ("\ud800"); json.loads turns it into a str that cannot be encoded as
# UTF-8, so the tokenizer (or a 404 quoting the model name) would fail with a 500. Only bodies that spell a surrogate
# escape at all are checked.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(data) -> bool:
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


async def _parse(raw: Request, model):
    _check_content_type(raw)
    body = await raw.body()
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"The request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError("The request body must be a JSON object.")
    if _SURROGATE_ESCAPE.search(body) and _has_lone_surrogate(data):
        raise APIError("The request body contains a lone UTF-16 surrogate escape (such as \\ud800), which is not "
                       "text: surrogates must come in pairs.")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = [str(part) for part in first.get("loc", ())]
        param = loc[0] if loc else None
        where = ".".join(loc)
        raise APIError(f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "invalid"),
                       param=param) from None


async def _respond(raw: Request, pending, stream: bool):
    """Non-streaming: race the handler against the client's disconnect (Starlette only cancels streaming
    responses), so a client that gives up frees its KV blocks at once. Streaming: Starlette cancels the body
    iterator on disconnect, and the iterator's cleanup aborts the requests."""
    if stream:
        events = await pending
        return _EventStreamResponse(events, media_type="text/event-stream",
                                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    work = asyncio.ensure_future(pending)
    watcher = asyncio.ensure_future(_wait_for_disconnect(raw))
    done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if work in done:
        watcher.cancel()
        return JSONResponse(work.result())
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await work
    logger.info("client disconnected; request aborted")
    return Response(status_code=499)


class _EventStreamResponse(StreamingResponse):
    """Gives the stream's admission slots back when the response ends, however it ends."""

    def __init__(self, events: EventStream, **kwargs):
        super().__init__(events, **kwargs)
        self.events = events

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.events.close()


async def _wait_for_disconnect(raw: Request) -> None:
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return
