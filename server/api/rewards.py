"""Serving a reward model (the Nemotron-4-340B-Reward layout: 9 values at the last token, the last 5 the HelpSteer2
attributes).

- `/v1/chat/completions` with user + assistant messages answers as NVIDIA's hosted API does: a chat.completion whose
  message content is `helpfulness:1.26,correctness:0.43,coherence:3.12,complexity:1.05,verbosity:0.98`.
- `/v1/rewards` answers the same conversation structured: the attributes, the raw values and the weighted scalar.

The conversation is rendered with the chat template without a generation prompt, so it ends right after the
assistant's content, and runs as an engine request with max_tokens 0 whose finishing output carries the values.
Requests go through OpenAIServing's admission, metrics and disconnect handling like any other."""
from __future__ import annotations

import time

from model.config import REWARD_ATTRIBUTES, REWARD_WEIGHTS
from server.api.output import ChoiceProcessor
from server.api.protocol import APIError, ChatCompletionRequest, RewardRequest, now, random_id
from server.api.serving import OpenAIServing, _Choice
from server.engine.sampling import SamplingParams

ATTRIBUTES = REWARD_ATTRIBUTES
# The published scalar of Nemotron-4-340B-Reward: a weighted sum of all 9 values (the first 4 are untrained).
WEIGHTS = REWARD_WEIGHTS


def attributes(raw: list[float]) -> dict[str, float]:
    """The last 5 values, named."""
    return dict(zip(ATTRIBUTES, raw[-len(ATTRIBUTES):]))


def scalar_reward(raw: list[float]) -> float | None:
    """dot(raw, WEIGHTS); None for a head that is not 9 wide (the weights are defined for 9 values only)."""
    if len(raw) != len(WEIGHTS):
        return None
    return sum(w * v for w, v in zip(WEIGHTS, raw))


def chat_content(raw: list[float]) -> str:
    """NVIDIA's hosted format: `name:value` pairs joined by commas, each value with 2 decimals (Python's `.2f`: the
    float correctly rounded to the nearest 0.01, ties to even)."""
    return ",".join(f"{name}:{value:.2f}" for name, value in attributes(raw).items())


class RewardServing:
    def __init__(self, serving: OpenAIServing):
        self.serving = serving

    # ---- request -> engine input ----------------------------------------------------------------------------
    def _prompt_ids(self, messages) -> list[int]:
        rendered = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        if rendered[-1]["role"] != "assistant":
            raise APIError("A reward model scores an assistant response: messages must end with an assistant "
                           "message (e.g. a user message then the assistant's reply).", param="messages")
        try:
            prompt_text = self.serving.tokenizer.apply_chat_template(rendered, add_generation_prompt=False)
        except ValueError as e:
            raise APIError(str(e), param="messages") from None
        prompt_ids = self.serving.tokenizer.encode(prompt_text)
        self.serving._check_length(len(prompt_ids), 0, "messages")
        return prompt_ids

    def _choices(self, prompt_ids: list[int], n: int, arrival: float) -> list[_Choice]:
        params = SamplingParams(max_tokens=0)
        return [_Choice(i, i, prompt_ids, params, ChoiceProcessor(i, self.serving.tokenizer, prompt_ids, []), arrival)
                for i in range(n)]

    async def _values(self, request_id: str, choices: list[_Choice]) -> dict[int, list[float]]:
        values: dict[int, list[float]] = {}
        async for delta in self.serving._deltas(request_id, choices):
            if delta.reward is not None:
                values[delta.index] = delta.reward
        missing = [c.index for c in choices if c.index not in values]
        if missing:  # only an abort (a drain that ran out of time) finishes a reward request without values
            raise APIError("The request was aborted before it was scored.", status=503)
        return values

    # ---- /v1/chat/completions -------------------------------------------------------------------------------
    async def chat(self, request: ChatCompletionRequest):
        arrival = time.monotonic()
        self.serving.check_model(request.model)
        self.serving._check_stream_options(request)
        if request.logprobs:
            raise APIError("A reward model has no token logprobs.", param="logprobs")
        choices = self._choices(self._prompt_ids(request.messages), request.n, arrival)
        return await self.serving._start(request, random_id("chatcmpl"), choices, self._stream_chat,
                                         self._full_chat)

    async def _full_chat(self, request: ChatCompletionRequest, request_id: str, choices: list[_Choice]) -> dict:
        values = await self._values(request_id, choices)
        out_choices = [{"index": c.index, "message": {"role": "assistant", "content": chat_content(values[c.index])},
                        "logprobs": None, "finish_reason": c.processor.finish_reason} for c in choices]
        return {"id": request_id, "object": "chat.completion", "created": now(), "model": self.serving.model_name,
                "choices": out_choices, "usage": self.serving._usage(choices)}

    def _stream_chat(self, request: ChatCompletionRequest, request_id: str, choices: list[_Choice]):
        """The role delta, then one chunk with the whole content and finish_reason "stop"."""
        opening = [{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None} for c in choices]

        def render(delta) -> dict:
            return {"index": delta.index, "delta": {"content": chat_content(delta.reward)} if delta.reward else {},
                    "logprobs": None, "finish_reason": delta.finish_reason}

        return self.serving._stream(request, request_id, choices, "chat.completion.chunk", opening, render)

    # ---- /v1/rewards ----------------------------------------------------------------------------------------
    async def rewards(self, request: RewardRequest) -> dict:
        arrival = time.monotonic()
        self.serving.check_model(request.model)
        choices = self._choices(self._prompt_ids(request.messages), 1, arrival)
        request_id = random_id("reward")
        ticket = self.serving.admission.admit(len(choices))
        choices[0].ticket = ticket
        try:
            raw = (await self._values(request_id, choices))[0]
        finally:
            ticket.close()
        return {"id": request_id, "object": "reward", "created": now(), "model": self.serving.model_name,
                "attributes": attributes(raw), "reward": scalar_reward(raw), "raw": raw,
                "usage": self.serving._usage(choices)}
