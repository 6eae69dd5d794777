"""OpenAI wire protocol: request bodies (pydantic, validated) and the error envelope.

Responses are built as plain dicts in serving.py: they are written once per token on the hot path, and
pydantic would add nothing there."""
from __future__ import annotations

import re
import time
import uuid
from typing import Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class APIError(Exception):
    """An error returned to the client in the OpenAI envelope."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 error_type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.headers = headers   # e.g. Retry-After on a 429
        self.error_type = error_type or _ERROR_TYPES.get(status, "server_error" if status >= 500 else
                                                          "invalid_request_error")

    def envelope(self) -> dict:
        return error_envelope(self.message, self.error_type, self.param, self.code)


_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}
_TOKEN_ID_KEY = re.compile(r"-?[0-9]+")   # a logit_bias key: a token id written in ASCII digits
MAX_ECHOED_CHARS = 200   # a bad request's content is quoted in errors only this far


def error_envelope(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict:
    if len(message) > 4 * MAX_ECHOED_CHARS:
        message = message[: 4 * MAX_ECHOED_CHARS] + "..."
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class _Strict(BaseModel):
    # NaN and ±Infinity are rejected at parse time (they pass range checks written as `x < 0` otherwise).
    # Unknown fields are ignored, as OpenAI and vLLM do, so newer clients keep working. JSON types are strict, as
    # /openapi.json states them and OpenAI's API checks them: `"stream": 1` or `"top_k": 3.5` is a 400, not coerced.
    model_config = ConfigDict(allow_inf_nan=False, extra="ignore", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """Fields shared by chat and completions (OpenAI's, then vLLM's extras)."""
    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=-(2 ** 63), lt=2 ** 64)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_tokens_as_token_ids: bool = False   # logprobs name tokens "token_id:N" (exact, for scoring tools)
    # OpenAI's limit, kept for chat; CompletionRequest lifts it (see there).
    max_stop_sequences: ClassVar[int | None] = 4

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value):
        if isinstance(value, list):
            if cls.max_stop_sequences is not None and len(value) > cls.max_stop_sequences:
                raise ValueError(f"at most {cls.max_stop_sequences} stop sequences are allowed")
            if any(not s for s in value):
                raise ValueError("stop sequences must not be empty")
        elif value == "":
            raise ValueError("stop sequences must not be empty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _check_bias(cls, value):
        for token, bias in (value or {}).items():
            if not _TOKEN_ID_KEY.fullmatch(token):   # what int() takes: not "²" (isdigit) nor "--5"
                raise ValueError(f"logit_bias keys must be token ids, got {token[:40]!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        return value

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)   # as vLLM and TensorRT-LLM join text parts


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True


class RewardRequest(_Strict):
    """n4's /v1/rewards: the conversation to score, ending with the assistant response."""
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)


PromptType = Union[str, list[int], list[str], list[list[int]]]


class CompletionRequest(_SamplingFields):
    # No limit on stop sequences, as in vLLM: lm-eval's local-completions sends a task's whole `until` list plus
    # EOS (humaneval: 6), where its chat backend truncates to OpenAI's 4.
    max_stop_sequences: ClassVar[int | None] = None
    prompt: PromptType
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("prompt must not be an empty list")
            if isinstance(value[0], list) and any(not ids for ids in value):
                raise ValueError("token-id prompts must not be empty")
        return value


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: a text `prompt`, or chat `messages` rendered with the chat template."""
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    # True prepends BOS. n4 adds none to prompts (Nemotron-4's convention), so the default gives the ids that
    # /v1/completions and /v1/chat/completions run.
    add_special_tokens: bool = False
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                           "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out
