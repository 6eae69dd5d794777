"""The OpenAPI document (/openapi.json) of the routes that parse their bodies by hand (server/api/app.py `_parse`,
which answers 400 in the OpenAI envelope instead of FastAPI's 422): request bodies from the pydantic models,
the responses they give, and the error envelope on every error status."""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from server.api import protocol
from server.api.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

_REF = "#/components/schemas/{model}"

ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}
_NULLABLE_INT = {"type": ["integer", "null"]}
_USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
          "properties": {"prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
                         "total_tokens": {"type": "integer"}}}


def _completion_schema(object_name: str, choice: dict) -> dict:
    return {"type": "object", "required": ["id", "object", "created", "model", "choices"],
            "properties": {"id": {"type": "string"}, "object": {"const": object_name},
                           "created": {"type": "integer"}, "model": {"type": "string"},
                           "choices": {"type": "array", "items": choice}, "usage": _USAGE}}


_FINISH = {"type": ["string", "null"]}
COMPLETION_RESPONSE = _completion_schema("text_completion", {
    "type": "object", "required": ["index", "text", "finish_reason"],
    "properties": {"index": {"type": "integer"}, "text": {"type": "string"}, "finish_reason": _FINISH,
                   "logprobs": {"type": ["object", "null"]}}})
CHAT_RESPONSE = _completion_schema("chat.completion", {
    "type": "object", "required": ["index", "message", "finish_reason"],
    "properties": {"index": {"type": "integer"}, "finish_reason": _FINISH,
                   "message": {"type": "object", "required": ["role", "content"],
                               "properties": {"role": {"const": "assistant"}, "content": {"type": ["string", "null"]}}},
                   "logprobs": {"type": ["object", "null"]}}})
TOKENIZE_RESPONSE = {"type": "object", "required": ["count", "max_model_len", "tokens"],
                     "properties": {"count": {"type": "integer"}, "max_model_len": {"type": "integer"},
                                    "tokens": {"type": "array", "items": {"type": "integer"}},
                                    "token_strs": {"type": ["array", "null"], "items": {"type": "string"}}}}
DETOKENIZE_RESPONSE = {"type": "object", "required": ["prompt"], "properties": {"prompt": {"type": "string"}}}
# Server-sent events, one `data:` line each (JSON chunks, an {"error": ...} event, then `[DONE]`).
EVENT_STREAM = {"text/event-stream": {"schema": {"type": "object", "required": ["data"],
                                                 "properties": {"data": {"type": "string"}}}}}

# path -> (request model, 200 response schema, whether it can stream)
BODIES: dict[str, tuple[type[BaseModel], dict, bool]] = {
    "/v1/completions": (CompletionRequest, COMPLETION_RESPONSE, True),
    "/v1/chat/completions": (ChatCompletionRequest, CHAT_RESPONSE, True),
    "/tokenize": (TokenizeRequest, TOKENIZE_RESPONSE, False),
    "/detokenize": (DetokenizeRequest, DETOKENIZE_RESPONSE, False),
}
if hasattr(protocol, "RewardRequest"):   # /v1/rewards (reward checkpoints; 400 on other models)
    BODIES["/v1/rewards"] = (protocol.RewardRequest, {"type": "object"}, False)
# Error statuses any route may answer: the request guard's (401 auth, 413 body too large, 429 queue full, 503
# draining or engine dead), plus 400 and 404 (unknown model) on the routes that take a body.
_GUARD_ERRORS = {"401": "Missing or wrong API key", "413": "Request body too large",
                 "429": "Too many requests waiting", "503": "Draining, or the engine is not running"}
_BODY_ERRORS = {"400": "Invalid request", "404": "Unknown model"}


# Routes whose 200 is not JSON.
_PLAIN_OK = {"/health": {"description": "The engine is running (empty body)"},
             "/metrics": {"description": "Prometheus text exposition",
                          "content": {"text/plain": {"schema": {"type": "string"}}}}}


def _error(description: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}


_TOKEN_ID = {"type": "integer", "minimum": 0}
_NONEMPTY_STR = {"type": "string", "minLength": 1}
# Constraints the models check in validators (so model_json_schema cannot see them), stated in the document so
# that clients and generated tests know them. The vocabulary's upper bound depends on the model: not stated.
_REFINEMENTS: dict[str, dict[str, dict]] = {
    "CompletionRequest": {"prompt": {"anyOf": [
        _NONEMPTY_STR, {"type": "array", "minItems": 1, "items": _TOKEN_ID},
        {"type": "array", "minItems": 1, "items": _NONEMPTY_STR},
        {"type": "array", "minItems": 1, "items": {"type": "array", "minItems": 1, "items": _TOKEN_ID}}]}},
    "DetokenizeRequest": {"tokens": {"type": "array", "items": _TOKEN_ID}},
}
_STOP = {"anyOf": [_NONEMPTY_STR, {"type": "array", "maxItems": 4, "items": _NONEMPTY_STR}, {"type": "null"}],
         "default": None}


def _refine(name: str, body: dict) -> None:
    properties = body.get("properties", {})
    for field, schema in _REFINEMENTS.get(name, {}).items():
        properties[field] = {**schema, "title": properties.get(field, {}).get("title", field)}
    if "stop" in properties:
        properties["stop"] = {**_STOP, "title": "Stop"}


def build_openapi(app: FastAPI) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["ErrorResponse"] = ERROR_SCHEMA
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            for status, description in _GUARD_ERRORS.items():
                responses.setdefault(status, _error(description))
            if path in _PLAIN_OK:
                responses["200"] = _PLAIN_OK[path]
            if path not in BODIES or method != "post":
                continue
            model, ok_schema, streams = BODIES[path]
            body = model.model_json_schema(ref_template=_REF)
            components.update(body.pop("$defs", {}))
            _refine(model.__name__, body)
            components[model.__name__] = body
            operation["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}}}
            content = {"application/json": {"schema": ok_schema}}
            if streams:
                content.update(EVENT_STREAM)
            responses["200"] = {"description": "Successful Response", "content": content}
            for status, description in _BODY_ERRORS.items():
                responses[status] = _error(description)
    return schema


def install(app: FastAPI) -> None:
    """Serve build_openapi's document (built once, on first request) at /openapi.json."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi
