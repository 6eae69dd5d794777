"""Sampling parameters of one request, validated once, here. Pure Python: the scheduler imports it (the
batched sampler that applies them lives in sampler.py)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field


def _check_finite(name: str, value: float) -> None:
    # NaN passes every `<` check and later crashes torch.multinomial: reject it up front.
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise SamplingParamError(name, f"{name} must be a finite number, got {value!r}")


class SamplingParamError(ValueError):
    """A sampling parameter is out of range; `param` names it (the OpenAI error envelope's `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


_GREEDY_BELOW = 1e-5   # vLLM's _SAMPLING_EPS


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0          # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0   # applied to prompt and output tokens, as in vLLM / HF
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None       # top-k logprobs per sampled token (the sampled token's own is always given)
    prompt_logprobs: int | None = None  # same, per prompt position (position 0 has none)

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise SamplingParamError("max_tokens", f"max_tokens must be a non-negative integer, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens:
            raise SamplingParamError("min_tokens", f"min_tokens must be a non-negative integer, got {self.min_tokens!r}")
        if self.min_tokens > self.max_tokens:
            raise SamplingParamError("min_tokens", f"min_tokens ({self.min_tokens}) must not exceed max_tokens "
                                                   f"({self.max_tokens})")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            _check_finite(name, getattr(self, name))
        if not 0.0 <= self.temperature <= 2.0:
            raise SamplingParamError("temperature", f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingParamError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise SamplingParamError("top_k", f"top_k must be -1, 0 (off) or a positive integer, got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise SamplingParamError("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise SamplingParamError(name, f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise SamplingParamError("repetition_penalty",
                                     f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        for token, bias in self.logit_bias.items():
            _check_finite("logit_bias", bias)
            if not -100.0 <= bias <= 100.0:
                raise SamplingParamError("logit_bias", f"logit_bias values must be in [-100, 100], got {bias}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= 20):
                raise SamplingParamError(name, f"{name} must be an integer in [0, 20], got {value!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not -(2 ** 63) <= self.seed < 2 ** 64):
            raise SamplingParamError("seed", f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        # Temperatures below vLLM's epsilon are greedy too: float32 logits divided by 1e-40 overflow to inf, and
        # the softmax of those is NaN, which argmax read as token 0 at every step.
        return self.temperature < _GREEDY_BELOW

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids the request names must exist; called once the model is known."""
        for token in list(self.logit_bias) + list(self.stop_token_ids):
            if not isinstance(token, int) or not 0 <= token < vocab_size:
                param = "logit_bias" if token in self.logit_bias else "stop_token_ids"
                raise SamplingParamError(param, f"token id {token!r} is out of range for a vocabulary of "
                                                f"{vocab_size}")


# ----------------------------------------------------------------------------------------------------------------
# The batched sampler
# ----------------------------------------------------------------------------------------------------------------
