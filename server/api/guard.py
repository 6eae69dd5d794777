"""The checks every HTTP request passes before a route sees it, as one pure-ASGI middleware (no body buffering,
no per-request task): 503 while draining, Bearer auth, and the request-body size limit.

Auth: with an API key set, every route but PUBLIC_PATHS needs `Authorization: Bearer <key>`, compared in
constant time; a missing or wrong key is a 401 in the OpenAI envelope. Without a key, the header is ignored
(lm-eval sends `Bearer ` with an empty key).

Body size: a Content-Length over the limit is refused with 413 before anything is read; a body without one
(chunked) is counted as it is received, and the read that crosses the limit raises a 413 APIError inside the
route's body read, so at most one chunk past the limit is ever held.
"""
from __future__ import annotations

import hmac
import json

from server.api.admission import Admission
from server.api.config import ServerConfig
from server.api.protocol import APIError, error_envelope

PUBLIC_PATHS = frozenset({"/health", "/metrics", "/version"})
ALLOWED_WHILE_DRAINING = frozenset({"/metrics"})


class RequestGuard:
    def __init__(self, app, config: ServerConfig, admission: Admission):
        self.app = app
        self.limit = config.max_request_body_bytes
        self.api_key = config.api_key.encode() if config.api_key is not None else None
        self.admission = admission

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = dict(scope.get("headers") or ())
        if self.admission.draining and path not in ALLOWED_WHILE_DRAINING:
            if path == "/health":
                return await _send(send, 503, b"", [])
            return await _send_error(send, APIError("The server is shutting down; it accepts no new requests.",
                                                    status=503, code="shutting_down"))
        if self.api_key is not None and path not in PUBLIC_PATHS:
            if not self._authorized(headers.get(b"authorization", b"")):
                return await _send_error(send, APIError("Invalid or missing API key: send 'Authorization: Bearer "
                                                        "<key>'.", status=401, code="invalid_api_key",
                                                        headers={"WWW-Authenticate": "Bearer"}))
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await _send_error(send, APIError("Content-Length is not a number."))
            if declared > self.limit:
                return await _send_error(send, self._too_large())
        return await self.app(scope, self._counting(receive), send)

    def _authorized(self, header: bytes) -> bool:
        scheme, _, token = header.strip().partition(b" ")
        # compare_digest runs in time independent of where the token differs (it still reveals the length).
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

    def _too_large(self) -> APIError:
        return APIError(f"The request body is larger than the limit of {self.limit} bytes "
                        f"(--max-request-body-bytes).", status=413, code="request_too_large")

    def _counting(self, receive):
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise self._too_large()
            return message

        return counted


async def _send_error(send, error: APIError) -> None:
    headers = [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    body = json.dumps(error_envelope(error.message, error.error_type, error.param, error.code)).encode()
    await _send(send, error.status, body, headers + [(b"content-type", b"application/json")])


async def _send(send, status: int, body: bytes, headers: list) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": headers + [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
