"""Scoring a response with a Nemotron-4-Reward-style model, in either of the two wire forms:

- n4: POST {base}/rewards {"model", "messages"} -> {"attributes": {5 names}, "raw": [9 values], "reward": scalar}.
- chat: POST {base}/chat/completions with the same messages -> content
  "helpfulness:1.26,correctness:0.43,coherence:3.12,complexity:1.05,verbosity:0.98" (NVIDIA's hosted API; n4 serve
  of a reward model answers so too).

The scalar is the published 340B-Reward weighting (model/config.py defines it once for the server and this package);
the first four weights are 0, so the scalar computed from the 5 attributes of the chat form equals the one from the
9 raw values (up to the chat form's 2-decimal rounding)."""
from __future__ import annotations

import math
import re

from model.config import REWARD_ATTRIBUTES, REWARD_WEIGHTS
from n4_train.sdg.client import ApiClient, chat, first_text
from n4_train.sdg.errors import RequestFailed, SDGError

ATTRIBUTES = REWARD_ATTRIBUTES
WEIGHTS = REWARD_WEIGHTS
ATTRIBUTE_WEIGHTS = dict(zip(ATTRIBUTES, WEIGHTS[-len(ATTRIBUTES):]))
PROBE = [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "2 plus 2 is 4."}]
_PAIR = re.compile(r"^\s*([A-Za-z_]+)\s*[:=]\s*(-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


class RewardFormatError(ValueError):
    """A reward answer that does not carry the 5 attributes."""


def scalar_from_attributes(attributes: dict[str, float]) -> float:
    return sum(ATTRIBUTE_WEIGHTS[name] * attributes[name] for name in ATTRIBUTES)


def parse_chat_reward(content: str) -> dict[str, float]:
    """'helpfulness:1.26,correctness:0.43,...' -> {name: value} with all 5 attributes, in ATTRIBUTES order.
    Tolerates spaces, newlines, '=' and any order; unknown names are ignored (a future attribute must not break
    old data), a missing or non-finite one is an error."""
    values: dict[str, float] = {}
    for part in re.split(r"[,\n;]", content.strip()):
        if not part.strip():
            continue
        match = _PAIR.match(part)
        if match is None:
            raise RewardFormatError(f"not a reward answer (expected 'name:value,...'): {content[:120]!r}")
        values[match.group(1).lower()] = float(match.group(2))
    missing = [a for a in ATTRIBUTES if a not in values]
    if missing:
        raise RewardFormatError(f"reward answer lacks {', '.join(missing)}: {content[:120]!r}")
    if not all(math.isfinite(values[a]) for a in ATTRIBUTES):
        raise RewardFormatError(f"reward answer has a non-finite value: {content[:120]!r}")
    return {a: values[a] for a in ATTRIBUTES}


def _finite_number(value) -> bool:
    # bool is an int in Python but not a reward; NaN/inf (JSON's non-standard literals, or 1e999) would reach the
    # pairs, where max/min against NaN pick arbitrary responses and n4-train dpo/rpo refuse the whole file.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_n4_reward(body) -> tuple[dict[str, float], list[float] | None, float]:
    """The attributes, the raw values and the scalar of a /rewards answer. RewardFormatError unless every
    attribute, raw value and the scalar (when given) is a finite number."""
    attributes = body.get("attributes") if isinstance(body, dict) else None
    if not isinstance(attributes, dict) or any(a not in attributes for a in ATTRIBUTES):
        raise RewardFormatError(f"/rewards answer lacks the 5 attributes: {str(body)[:120]}")
    if not all(_finite_number(attributes[a]) for a in ATTRIBUTES):
        raise RewardFormatError(f"/rewards answer has an attribute that is not a finite number: {str(body)[:120]}")
    attributes = {a: float(attributes[a]) for a in ATTRIBUTES}
    raw = body.get("raw")
    reward = body.get("reward")
    given = isinstance(reward, (int, float)) and not isinstance(reward, bool)
    if (isinstance(raw, list) and not all(map(_finite_number, raw))) or (given and not math.isfinite(reward)):
        raise RewardFormatError(f"/rewards answer has a value that is not a finite number: {str(body)[:120]}")
    # A head that is not 9 wide has no published weighting (n4 answers reward: null); fall back to the attributes.
    scalar = float(reward) if given else scalar_from_attributes(attributes)
    return attributes, raw if isinstance(raw, list) else None, scalar


class RewardScorer:
    def __init__(self, client: ApiClient, model: str, form: str = "n4"):
        self.client = client
        self.model = model
        self.form = form

    async def score(self, messages: list[dict]) -> dict:
        """{"attributes", "raw", "reward"} for a conversation that ends with the assistant turn to score.
        RequestFailed when the server fails or answers something that is not a reward."""
        try:
            if self.form == "chat":
                response = await chat(self.client, self.model, messages, temperature=0.0, max_tokens=64)
                attributes = parse_chat_reward(first_text(response)[0])
                return {"attributes": attributes, "raw": None, "reward": scalar_from_attributes(attributes)}
            body = await self.client.post("/rewards", {"model": self.model, "messages": messages})
            attributes, raw, reward = parse_n4_reward(body)
            return {"attributes": attributes, "raw": raw, "reward": reward}
        except RewardFormatError as e:
            raise RequestFailed(str(e), 200) from None

    async def check(self) -> None:
        """Score one tiny conversation, so a URL that is no reward model stops the run before any generation."""
        where = f"--reward-base-url {self.client.base_url} (model {self.model!r})"
        try:
            await self.score(PROBE)
        except RequestFailed as e:
            if e.status is None:
                raise SDGError(f"cannot reach the reward model at {where}: {e}") from None
            if e.status in (401, 403):
                raise SDGError(f"{where} refused the API key (--reward-api-key / --api-key): {e}") from None
            hint = " (for NVIDIA's hosted API use --reward-format chat)" if self.form == "n4" else ""
            if e.status == 404:  # n4's answer to an unknown model name; elsewhere, no /rewards route
                raise SDGError(f"{where}: the model or the endpoint does not exist{hint}: {e}") from None
            raise SDGError(f"{where} is not a reward model{hint}: {e}") from None
