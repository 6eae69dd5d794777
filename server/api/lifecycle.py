"""Running the app under uvicorn with a graceful shutdown.

On SIGTERM (or a first Ctrl-C):
1. n4 starts draining: /health answers 503 and any new request 503 in the envelope (code "shutting_down");
   uvicorn closes the listening socket within ~0.1 s, after which new connections are refused.
2. In-flight requests run on for up to --shutdown-timeout seconds.
3. Whatever is still running then is aborted: its client gets a normal end with finish_reason "abort" (the
   final stream chunk and [DONE], or the JSON body).
4. Once the last response is out, the lifespan stops the engine (its process, under `n4 serve`) and the process
   exits 0.
A second Ctrl-C exits at once; uvicorn's own deadline (--shutdown-timeout + GRACE_SECONDS) cancels any handler
that still hangs after the aborts.

A fatal engine failure (a tensor-parallel rank died or hung, or the engine process vanished) ends serving at once:
in-flight requests have already received the error, /health answers 503 until the socket closes, and the process
exits with status 1 and a message naming the rank or the engine process's exit status.
"""
from __future__ import annotations

import asyncio
import logging
import signal

import uvicorn
from fastapi import FastAPI

logger = logging.getLogger(__name__)
GRACE_SECONDS = 5.0


def begin_drain(app: FastAPI, timeout: float) -> None:
    """Stop admitting requests; abort the ones still running after `timeout` seconds. Runs on the event loop."""
    admission = app.state.admission
    if admission.draining:
        return
    admission.draining = True
    logger.info("shutting down: draining %d in-flight requests for up to %.1f s", len(admission.live), timeout)

    def abort_left() -> None:
        count = admission.abort_all()
        if count:
            logger.warning("shutdown timeout (%.1f s) reached: aborted %d requests", timeout, count)

    asyncio.get_running_loop().call_later(timeout, abort_left)


class _DrainingServer(uvicorn.Server):
    """uvicorn's server with the drain hooked into its exit signal. Unlike uvicorn's own handler it does not
    re-raise the signal after the graceful exit, so a drained shutdown exits with status 0."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, timeout: float):
        super().__init__(config)
        self.n4_app = app
        self.drain_timeout = timeout
        self.fatal: BaseException | None = None

    def fail(self, error: BaseException) -> None:
        """The engine cannot go on (called from any thread): stop serving; run() then exits non-zero."""
        self.fatal = error
        self.should_exit = True

    def handle_exit(self, sig: int, frame) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True   # a second Ctrl-C: stop waiting
            return
        self.should_exit = True
        loop = getattr(self.n4_app.state, "loop", None)
        if loop is not None:   # a signal handler may not touch the loop directly; this is the safe way in
            loop.call_soon_threadsafe(begin_drain, self.n4_app, self.drain_timeout)


def run(app: FastAPI, host: str, port: int, log_level: str, shutdown_timeout: float) -> None:
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout + GRACE_SECONDS)
    server = _DrainingServer(config, app, shutdown_timeout)
    app.state.engine.fatal_callbacks.append(server.fail)
    server.run()
    if server.fatal is not None:
        logger.error("n4 stopped: %s", server.fatal)
        raise SystemExit(f"n4: the engine failed: {server.fatal}")
    if not server.started:
        raise SystemExit(3)   # uvicorn's status for a failed startup (e.g. the port is taken)


class LoadingResponder:
    """Answers on the serving port while the model loads: /health 503 with an empty body, every other request
    503 in the OpenAI envelope (code "loading"), so that orchestrators and clients see "not ready" instead of a
    refused connection. Stopped (socket closed) right before the real app binds the same port; the gap between
    the two is a few milliseconds of refused connections."""

    def __init__(self, host: str, port: int):
        import threading
        self._server = uvicorn.Server(uvicorn.Config(self._app, host=host, port=port, log_level="warning",
                                                     lifespan="off"))
        self._server.install_signal_handlers = lambda: None   # the main thread keeps its own handlers
        self._thread = threading.Thread(target=self._server.run, name="n4-loading", daemon=True)

    def start(self) -> "LoadingResponder":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    @staticmethod
    async def _app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/health":
            body, headers = b"", []
        else:
            body = b'{"error": {"message": "The model is loading; retry shortly.", "type": "service_unavailable", ' \
                   b'"param": null, "code": "loading"}}'
            headers = [(b"content-type", b"application/json"), (b"retry-after", b"5")]
        await send({"type": "http.response.start", "status": 503,
                    "headers": headers + [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
