"""OpenAI completions and chat completions on top of the AsyncEngine: prompts to token ids, request
parameters to SamplingParams, engine outputs to responses (whole or streamed as server-sent events)."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator

from server.api.admission import Admission, Ticket
from server.api.metrics import ServerMetrics
from server.api.output import (ChoiceDelta, ChoiceProcessor, chat_logprobs, completion_logprobs,
                               prompt_logprobs_vllm, TokenNamer)
from server.api.protocol import (APIError, ChatCompletionRequest, CompletionRequest, error_envelope, now,
                                 random_id, usage)
from server.api.tokenizer import Tokenizer
from server.engine.engine import AsyncEngine, EngineDeadError, RequestOutput
from server.engine.sampling import SamplingParamError, SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Choice:
    index: int
    sample_index: int          # which of the n samples of its prompt
    prompt_token_ids: list[int]
    params: SamplingParams
    processor: ChoiceProcessor
    arrival: float             # time.monotonic() when the HTTP request arrived
    ticket: Ticket | None = None


class EventStream:
    """A server-sent-event body and the admission slots it holds. The app's response calls close() when it
    ends, so the slots come back even if the body never started (a client gone before the first byte)."""

    def __init__(self, events: AsyncIterator[str], ticket: Ticket):
        self.events = events
        self.ticket = ticket

    def __aiter__(self) -> AsyncIterator[str]:
        return self.events

    def close(self) -> None:
        self.ticket.close()


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, tokenizer: Tokenizer, model_name: str, max_model_len: int,
                 admission: Admission | None = None, metrics: ServerMetrics | None = None,
                 aliases: list[str] | tuple[str, ...] = ()):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name                       # what responses carry
        self.served_names = {model_name, *aliases}         # what requests may name
        self.max_model_len = max_model_len
        self.admission = admission or Admission(engine)
        self.metrics = metrics or ServerMetrics(engine, model_name)

    # ---- request -> engine inputs --------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.served_names:
            raise APIError(f"The model `{model[:200]}` does not exist.", status=404, param="model",
                           code="model_not_found")

    def _prompts(self, request: CompletionRequest) -> list[list[int]]:
        prompt = request.prompt
        if isinstance(prompt, str):
            prompts = [self.tokenizer.encode(prompt, control_tokens=True)]
        elif isinstance(prompt[0], int):
            prompts = [list(prompt)]
        elif isinstance(prompt[0], str):
            prompts = [self.tokenizer.encode(p, control_tokens=True) for p in prompt]
        else:
            prompts = [list(p) for p in prompt]
        vocab = self.tokenizer_vocab_limit
        for ids in prompts:
            if not ids:
                raise APIError("The prompt is empty.", param="prompt")
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(f"Prompt token ids must be in [0, {vocab}).", param="prompt")
        return prompts

    @property
    def tokenizer_vocab_limit(self) -> int:
        # Ids a request may name: known to the model and to the tokenizer (echo and logprobs decode them).
        return min(self.engine.model_config.vocab_size, self.tokenizer.vocab_size)

    def _check_length(self, prompt_len: int, max_tokens: int | None, param: str) -> int:
        """Returns the effective max_tokens; a request over the context is a 400 in vLLM's wording."""
        # Omitted: the remaining context, but at least one token, so a prompt that fills the context is refused
        # (as vLLM does) instead of answered with no text. An explicit 0 (scoring a prompt with echo) stays allowed.
        requested = max_tokens if max_tokens is not None else max(self.max_model_len - prompt_len, 1)
        if prompt_len + requested > self.max_model_len or prompt_len >= self.max_model_len + (requested == 0):
            raise APIError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{requested} output tokens and your prompt contains at least {prompt_len} input tokens, for a "
                f"total of at least {prompt_len + requested} tokens. Please reduce the length of the input prompt "
                f"or the number of requested output tokens.", param=param)
        return requested

    @staticmethod
    def _sampling_params(request, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None,
                         extra_stop_ids: list[int], seed_offset: int) -> SamplingParams:
        bias = {int(k): v for k, v in (request.logit_bias or {}).items()}
        seed = request.seed
        if seed is not None:
            seed += seed_offset   # sample i of n draws with seed + i, wrapped to stay in the seed range
            if seed >= 2 ** 64:
                seed -= 2 ** 64
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                min_tokens=request.min_tokens,   # above max_tokens: a 400, as in vLLM (was clamped silently)
                temperature=1.0 if request.temperature is None else request.temperature,
                top_p=1.0 if request.top_p is None else request.top_p,
                top_k=request.top_k or 0,
                min_p=request.min_p or 0.0,
                seed=seed,
                presence_penalty=request.presence_penalty,
                frequency_penalty=request.frequency_penalty,
                repetition_penalty=1.0 if request.repetition_penalty is None else request.repetition_penalty,
                logit_bias=bias,
                stop_token_ids=tuple(request.stop_token_ids or ()) + tuple(extra_stop_ids),
                ignore_eos=request.ignore_eos,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
            )
        except SamplingParamError as e:
            raise APIError(str(e), param=e.param) from None

    def _check_stream_options(self, request) -> None:
        if request.stream_options is not None and not request.stream:
            raise APIError("stream_options is only allowed when stream is true.", param="stream_options")

    def _choices(self, request, prompts: list[list[int]], max_tokens: int | None, length_param: str,
                 logprobs: int | None, prompt_logprobs: int | None, extra_stop_ids: list[int],
                 arrival: float) -> list[_Choice]:
        choices = []
        for p, prompt_ids in enumerate(prompts):
            effective = self._check_length(len(prompt_ids), max_tokens, length_param)
            for i in range(request.n):
                params = self._sampling_params(request, effective, logprobs, prompt_logprobs, extra_stop_ids,
                                               seed_offset=i)
                try:
                    params.check_vocab(self.tokenizer_vocab_limit)
                except SamplingParamError as e:
                    raise APIError(str(e), param=e.param) from None
                index = p * request.n + i
                processor = ChoiceProcessor(index, self.tokenizer, prompt_ids, request.stop_list,
                                            request.skip_special_tokens, request.include_stop_str_in_output,
                                            params.min_tokens)
                choices.append(_Choice(index, i, prompt_ids, params, processor, arrival))
        return choices

    async def _start(self, request, request_id: str, choices: list[_Choice], stream, full):
        """Admits the request (429 over the queue cap, 503 while draining), then streams or runs it whole."""
        ticket = self.admission.admit(len(choices))
        for choice in choices:
            choice.ticket = ticket
        if request.stream:
            return EventStream(stream(request, request_id, choices), ticket)
        try:
            return await full(request, request_id, choices)
        finally:
            ticket.close()

    # ---- running choices ----------------------------------------------------------------------------------
    async def _run_choice(self, request_id: str, choice: _Choice, sink: asyncio.Queue) -> None:
        engine_id = f"{request_id}-{choice.index}"
        timer = self.metrics.timer(choice.arrival)
        live = self.admission.live
        try:
            if self.admission.closed:   # a drain that ran out of time: what starts now is aborted at once
                await sink.put(choice.processor.process(RequestOutput(engine_id, finished=True,
                                                                      finish_reason="abort")))
                return
            live.add(engine_id)
            async for out in self.engine.generate(engine_id, choice.prompt_token_ids, choice.params):
                timer.on_output(out)
                delta = choice.processor.process(out)
                await sink.put(delta)
                if delta.stop_string_hit:
                    self.engine.stop_request(engine_id)
                    return
                if delta.finish_reason is not None:
                    return
        except ValueError as e:  # the engine refused the request (its own checks); a client error, not ours
            raise APIError(str(e)) from None
        finally:
            live.discard(engine_id)
            if choice.ticket is not None:
                choice.ticket.release()
            if choice.processor.finish_reason is not None:
                timer.finish(choice.processor.finish_reason)

    async def _deltas(self, request_id: str, choices: list[_Choice]) -> AsyncIterator[ChoiceDelta]:
        """Runs every choice concurrently and yields their deltas as they come. Cancelling the consumer (a
        client that went away) cancels every choice, which aborts its engine request and frees its blocks.
        Each choice task ends by putting itself in the sink, so the consumer needs one queue get per item (no
        asyncio.wait per token: this runs once per generated token of every stream)."""
        sink: asyncio.Queue = asyncio.Queue()

        async def run(choice: _Choice) -> None:
            try:
                await self._run_choice(request_id, choice, sink)
            finally:
                sink.put_nowait(task_of[choice.index])

        task_of: dict[int, asyncio.Task] = {}
        for c in choices:
            task_of[c.index] = asyncio.create_task(run(c))
        running = len(choices)
        try:
            while running:
                item = await sink.get()
                if isinstance(item, asyncio.Task):
                    running -= 1
                    item.result()  # re-raise an engine error here
                else:
                    yield item
        finally:
            for task in task_of.values():
                task.cancel()

    # ---- completions --------------------------------------------------------------------------------------
    async def completion(self, request: CompletionRequest):
        arrival = time.monotonic()
        self.check_model(request.model)
        self._check_stream_options(request)
        if request.suffix:
            raise APIError("suffix is not supported.", param="suffix")
        if request.echo and request.n > 1 and request.stream:
            raise APIError("echo with n > 1 is not supported when streaming.", param="echo")
        prompts = self._prompts(request)
        # Echo with logprobs scores the prompt too (what lm-eval's loglikelihood relies on).
        prompt_logprobs = request.prompt_logprobs
        if request.echo and request.logprobs is not None:
            prompt_logprobs = max(prompt_logprobs or 0, request.logprobs)
        choices = self._choices(request, prompts, request.max_tokens, "max_tokens", request.logprobs,
                                prompt_logprobs, [], arrival)
        return await self._start(request, random_id("cmpl"), choices, self._stream_completion,
                                 self._full_completion)

    async def _full_completion(self, request: CompletionRequest, request_id: str, choices: list[_Choice]) -> dict:
        name = TokenNamer(self.tokenizer, request.return_tokens_as_token_ids)
        collected: dict[int, list[ChoiceDelta]] = {c.index: [] for c in choices}
        async for delta in self._deltas(request_id, choices):
            collected[delta.index].append(delta)
        out_choices = []
        for c in choices:
            deltas = collected[c.index]
            text = "".join(d.text for d in deltas)
            logprobs = None
            output_ids = [e.token_id for d in deltas for e in d.logprobs]
            entries = [e for d in deltas for e in d.logprobs]
            if request.echo:
                prompt_text = self.tokenizer.decode(c.prompt_token_ids)
                text = prompt_text + text
                if request.logprobs is not None:
                    prompt_entries = [None] + c.processor.prompt_logprobs
                    logprobs = completion_logprobs(name, prompt_entries + entries,
                                                   c.prompt_token_ids + output_ids)
            elif request.logprobs is not None:
                logprobs = completion_logprobs(name, entries, output_ids)
            out_choice = {"index": c.index, "text": text, "logprobs": logprobs,
                          "finish_reason": c.processor.finish_reason}
            if request.prompt_logprobs is not None:   # vLLM's extra: only when asked, OpenAI's shape otherwise
                out_choice["prompt_logprobs"] = prompt_logprobs_vllm(name, c.processor.prompt_logprobs,
                                                                     c.prompt_token_ids, request.prompt_logprobs)
            out_choices.append(out_choice)
        return {"id": request_id, "object": "text_completion", "created": now(), "model": self.model_name,
                "choices": out_choices, "usage": self._usage(choices)}

    def _stream_completion(self, request: CompletionRequest, request_id: str,
                           choices: list[_Choice]) -> AsyncIterator[str]:
        name = TokenNamer(self.tokenizer, request.return_tokens_as_token_ids)
        by_index = {c.index: c for c in choices}
        # text_offset counts from the start of the choice's text across chunks, as in the non-streamed answer.
        offset = {c.index: 0 for c in choices}
        echo_pending = {c.index for c in choices} if request.echo else set()

        def render(delta: ChoiceDelta) -> dict:
            text, entries = delta.text, list(delta.logprobs)
            token_ids = [e.token_id for e in entries]
            if delta.index in echo_pending:
                # The echo rides on the choice's first chunk, once the engine has scored the prompt, so it carries
                # the prompt's logprobs as the non-streamed answer does (position 0 has none).
                echo_pending.discard(delta.index)
                choice = by_index[delta.index]
                text = self.tokenizer.decode(choice.prompt_token_ids) + text
                entries = [None] + choice.processor.prompt_logprobs + entries
                token_ids = choice.prompt_token_ids + token_ids
            logprobs = None
            if request.logprobs is not None and token_ids:
                logprobs = completion_logprobs(name, entries, token_ids, offset[delta.index])
                offset[delta.index] = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
            return {"index": delta.index, "text": text, "logprobs": logprobs, "finish_reason": delta.finish_reason}

        return self._stream(request, request_id, choices, "text_completion", [], render)

    # ---- chat ---------------------------------------------------------------------------------------------
    async def chat(self, request: ChatCompletionRequest):
        arrival = time.monotonic()
        self.check_model(request.model)
        self._check_stream_options(request)
        if request.top_logprobs is not None and not request.logprobs:
            raise APIError("top_logprobs requires logprobs to be true.", param="top_logprobs")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in request.messages]
        try:
            prompt_text = self.tokenizer.apply_chat_template(messages, request.add_generation_prompt)
        except ValueError as e:
            raise APIError(str(e), param="messages") from None
        prompt_ids = self.tokenizer.encode(prompt_text)
        max_tokens = request.max_completion_tokens or request.max_tokens
        param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        choices = self._choices(request, [prompt_ids], max_tokens, param, logprobs, None,
                                self.tokenizer.chat_stop_token_ids, arrival)
        return await self._start(request, random_id("chatcmpl"), choices, self._stream_chat, self._full_chat)

    async def _full_chat(self, request: ChatCompletionRequest, request_id: str, choices: list[_Choice]) -> dict:
        name = TokenNamer(self.tokenizer, request.return_tokens_as_token_ids)
        texts = {c.index: [] for c in choices}
        entries = {c.index: [] for c in choices}
        async for delta in self._deltas(request_id, choices):
            texts[delta.index].append(delta.text)
            entries[delta.index].extend(delta.logprobs)
        out_choices = []
        for c in choices:
            out_choices.append({
                "index": c.index,
                "message": {"role": "assistant", "content": "".join(texts[c.index])},
                "logprobs": chat_logprobs(name, entries[c.index]) if request.logprobs else None,
                "finish_reason": c.processor.finish_reason,
            })
        return {"id": request_id, "object": "chat.completion", "created": now(), "model": self.model_name,
                "choices": out_choices, "usage": self._usage(choices)}

    def _stream_chat(self, request: ChatCompletionRequest, request_id: str,
                     choices: list[_Choice]) -> AsyncIterator[str]:
        name = TokenNamer(self.tokenizer, request.return_tokens_as_token_ids)
        # OpenAI clients expect each choice to open with a role delta.
        opening = [{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None} for c in choices]

        def render(delta: ChoiceDelta) -> dict:
            return {"index": delta.index, "delta": {"content": delta.text} if delta.text else {},
                    "logprobs": chat_logprobs(name, delta.logprobs) if request.logprobs else None,
                    "finish_reason": delta.finish_reason}

        return self._stream(request, request_id, choices, "chat.completion.chunk", opening, render)

    async def _stream(self, request, request_id: str, choices: list[_Choice], object_name: str,
                      opening: list[dict], render) -> AsyncIterator[str]:
        """Server-sent events: the opening choice chunks, one chunk per delta (the one carrying finish_reason
        included), with include_usage a final `choices: []` chunk with usage (`usage: null` on the others), then
        [DONE]. The same id and created on every chunk; an error after the headers went out is an error event."""
        created = now()
        include_usage = bool(request.stream_options and request.stream_options.include_usage)

        def chunk(choice_list: list, usage_value=None) -> str:
            body = {"id": request_id, "object": object_name, "created": created, "model": self.model_name,
                    "choices": choice_list}
            if include_usage:
                body["usage"] = usage_value
            return _sse(body)

        try:
            for choice in opening:
                yield chunk([choice])
            async for delta in self._deltas(request_id, choices):
                if delta.text or delta.finish_reason is not None or delta.logprobs:
                    yield chunk([render(delta)])
            if include_usage:
                yield chunk([], self._usage(choices))
        except Exception as e:  # noqa: BLE001 — headers are sent: report in-band, then end the stream cleanly
            yield _stream_error(e)
        yield "data: [DONE]\n\n"

    @staticmethod
    def _usage(choices: list[_Choice]) -> dict:
        # Each prompt is counted once however many samples (n) were drawn from it, as OpenAI does.
        prompt_tokens = sum(c.processor.num_prompt_tokens for c in choices if c.sample_index == 0)
        completion_tokens = sum(c.processor.num_output_tokens for c in choices)
        cached = sum(c.processor.num_cached_tokens for c in choices)
        return usage(prompt_tokens, completion_tokens, cached)


def _stream_error(error: Exception) -> str:
    """A mid-stream failure as the event OpenAI clients raise on: data: {"error": {...}}."""
    if isinstance(error, APIError):
        return _sse(error.envelope())
    if not isinstance(error, EngineDeadError):
        logger.exception("stream failed", exc_info=error)
    return _sse(error_envelope(f"engine error: {error}", "server_error", code="engine_error"))


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'), allow_nan=False)}\n\n"
