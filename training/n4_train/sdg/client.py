"""An async OpenAI-compatible HTTP client with the three things bulk generation needs: a concurrency cap, bounded
retries with exponential backoff on overload and transient failures, and counters for the summary."""
from __future__ import annotations

import asyncio
import math
import random
from dataclasses import dataclass, field

import httpx

from n4_train.sdg.errors import RequestFailed

# The statuses the openai SDK also retries: timeouts, conflicts, overload (n4 answers 429 + Retry-After when its
# queue is full) and server errors. Any other 4xx is the request's own fault and would fail again.
RETRY_STATUSES = frozenset({408, 409, 429}) | frozenset(range(500, 600))
ERROR_TEXT_LIMIT = 300  # an error echoed into the summary is capped: a server may send back a whole prompt


@dataclass
class RetryPolicy:
    retries: int = 4          # attempts after the first; 4 with backoff 0.5 s waits up to ~7.5 s in all
    backoff_s: float = 0.5    # first wait; doubled each attempt
    max_backoff_s: float = 30.0

    def delay(self, attempt: int, retry_after: str | None, rng: random.Random) -> float:
        """Seconds to wait before retry number `attempt` (0-based). A server's Retry-After wins when it parses;
        otherwise full exponential backoff with jitter, so C concurrent clients do not retry in lockstep."""
        if retry_after is not None:
            try:
                seconds = float(retry_after)
            except ValueError:
                seconds = math.nan
            if not math.isnan(seconds):  # "nan" parses, then slept 0 s: a retry storm against an overloaded server
                return min(max(seconds, 0.0), self.max_backoff_s)
        return min(self.backoff_s * 2 ** attempt, self.max_backoff_s) * (0.5 + rng.random() / 2)


@dataclass
class RequestStats:
    sent: int = 0       # HTTP attempts, retries included
    retries: int = 0
    failed: int = 0     # requests that failed for good
    by_status: dict[str, int] = field(default_factory=dict)  # failed attempts: "429", "500", "connection"

    def as_dict(self) -> dict:
        return {"sent": self.sent, "retries": self.retries, "failed": self.failed, "by_status": dict(self.by_status)}


def error_message(response: httpx.Response) -> tuple[str, str | None]:
    """The message and code of an OpenAI error envelope, or the start of the body when it is not one."""
    try:
        error = response.json().get("error")
        if isinstance(error, dict):
            return str(error.get("message", ""))[:ERROR_TEXT_LIMIT], error.get("code")
        if isinstance(error, str):
            return error[:ERROR_TEXT_LIMIT], None
    except (ValueError, AttributeError):
        pass
    return response.text[:ERROR_TEXT_LIMIT], None


class ApiClient:
    """One endpoint (`base_url` ends in /v1 for OpenAI servers). At most `concurrency` requests are in flight."""

    def __init__(self, base_url: str, api_key: str | None = None, concurrency: int = 8,
                 retry: RetryPolicy | None = None, timeout_s: float = 600.0,
                 transport: httpx.AsyncBaseTransport | None = None, seed: int = 0):
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # A long read timeout suits a big model's long answers; connecting never takes long, and a host that drops
        # packets should fail the preflight in seconds, not after the read timeout times the retries.
        timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 20.0))
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout,
                                       transport=transport,
                                       limits=httpx.Limits(max_connections=max(concurrency, 1)))
        self._semaphore = asyncio.Semaphore(concurrency)
        self.retry = retry or RetryPolicy()
        self.stats = RequestStats()
        self._rng = random.Random(seed)  # jitter only; seeded so tests are repeatable

    async def get(self, path: str) -> dict:
        return await self.request("GET", path)

    async def post(self, path: str, body: dict) -> dict:
        return await self.request("POST", path, body)

    async def request(self, method: str, path: str, body: dict | None = None) -> dict:
        """The JSON answer; RequestFailed after the retries, or at once for a non-retryable status."""
        # The slot is held through the backoff sleep on purpose: an overloaded server gets fewer requests, not the
        # same number from other coroutines.
        async with self._semaphore:
            for attempt in range(self.retry.retries + 1):
                failure = await self._attempt(method, path, body)
                if isinstance(failure, dict):
                    return failure
                error, retry_after = failure
                if attempt == self.retry.retries or (error.status is not None
                                                     and error.status not in RETRY_STATUSES):
                    break
                self.stats.retries += 1
                await asyncio.sleep(self.retry.delay(attempt, retry_after, self._rng))
        self.stats.failed += 1
        raise error

    async def _attempt(self, method: str, path: str, body: dict | None):
        """The parsed answer, or (RequestFailed, Retry-After header) for a failed attempt."""
        self.stats.sent += 1
        try:
            response = await self._http.request(method, path, json=body)
        except httpx.TransportError as e:  # refused, reset, timed out: the server may be restarting
            self._count("connection")
            return RequestFailed(f"{method} {self.base_url}{path}: {type(e).__name__}: {e}"[:ERROR_TEXT_LIMIT]), None
        if response.status_code != 200:
            self._count(str(response.status_code))
            message, code = error_message(response)
            failed = RequestFailed(f"{method} {path}: HTTP {response.status_code}: {message}",
                                   status=response.status_code, code=code)
            return failed, response.headers.get("retry-after")
        try:
            answer = response.json()
        except ValueError:
            self._count("bad_json")
            return RequestFailed(f"{method} {path}: the answer is not JSON: {response.text[:100]!r}", 200), None
        if not isinstance(answer, dict):
            # Every OpenAI answer is an object. A list or string here was unpacked by request() as a failed
            # attempt ("ok" became (error, retry_after)) or crashed the run on `.get`; it is one failed request.
            self._count("bad_json")
            return RequestFailed(f"{method} {path}: the answer is not a JSON object: {response.text[:100]!r}",
                                 200), None
        return answer

    def _count(self, key: str) -> None:
        self.stats.by_status[key] = self.stats.by_status.get(key, 0) + 1

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "ApiClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


async def chat(client: ApiClient, model: str, messages: list[dict], *, n: int = 1, temperature: float = 0.7,
               max_tokens: int = 256, seed: int | None = None) -> dict:
    """POST /chat/completions (non-streaming); the whole OpenAI response."""
    body = {"model": model, "messages": messages, "n": n, "temperature": temperature, "max_tokens": max_tokens}
    if seed is not None:
        body["seed"] = seed
    response = await client.post("/chat/completions", body)
    if not isinstance(response.get("choices"), list) or not response["choices"]:
        raise RequestFailed(f"POST /chat/completions: no choices in the answer: {str(response)[:100]}", 200)
    return response


def first_text(response: dict) -> tuple[str, str | None]:
    """The first choice's content and finish_reason (content None, e.g. from a tool call, reads as "")."""
    choice = response["choices"][0]
    return (choice.get("message") or {}).get("content") or "", choice.get("finish_reason")
