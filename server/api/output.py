"""Per-choice output processing: token ids -> text deltas, stop strings found across token boundaries (and
kept out of the output), logprob entries in OpenAI's two formats."""
from __future__ import annotations

from dataclasses import dataclass, field

from server.api.tokenizer import IncrementalDetokenizer, Tokenizer
from server.engine.engine import RequestOutput
from server.engine.sampler import TokenLogprobs


@dataclass
class ChoiceDelta:
    index: int
    text: str = ""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_string_hit: bool = False
    reward: list[float] | None = None   # a reward model's values, on the finishing delta


class ChoiceProcessor:
    """Turns one engine request's outputs into text. Text that might be the start of a stop string is held
    back until it is known not to be one, so a stop string never reaches the client, even split over tokens."""

    def __init__(self, index: int, tokenizer: Tokenizer, prompt_token_ids: list[int], stop: list[str],
                 skip_special_tokens: bool = True, include_stop_str_in_output: bool = False, min_tokens: int = 0):
        self.index = index
        self.vocab_size = tokenizer.vocab_size
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens)
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.min_tokens = min_tokens   # stop strings count only from then on, as EOS and stop ids (and vLLM's)
        self.hold_back = max((len(s) for s in stop), default=1) - 1
        self.text = ""        # decoded output so far (possibly past a stop string, before truncation)
        self.sent = 0         # chars of self.text already handed out
        self.finish_reason: str | None = None
        self.num_output_tokens = 0
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_cached_tokens = 0
        self.prompt_logprobs: list[TokenLogprobs] = []

    def process(self, out: RequestOutput) -> ChoiceDelta:
        self.num_output_tokens = out.num_output_tokens
        self.num_cached_tokens = out.num_cached_tokens
        self.prompt_logprobs.extend(out.prompt_logprobs)
        # A model whose embedding is padded past the tokenizer can sample ids with no text: they add none.
        token_ids = [t for t in out.new_token_ids if t < self.vocab_size]
        if out.finished and token_ids and out.finish_reason == "stop" and self._is_stop_token(out, token_ids[-1]):
            token_ids = token_ids[:-1]   # a stop token id (or EOS) ends the request but is not output text
        start = len(self.text)
        self.text += self.detokenizer.add(token_ids)
        if out.finished:
            self.text += self.detokenizer.flush()
        delta = ChoiceDelta(self.index, logprobs=list(out.new_logprobs), reward=out.reward)
        if self.stop and self.num_output_tokens >= self.min_tokens and self._find_stop(start):
            delta.finish_reason = self.finish_reason = "stop"
            delta.stop_string_hit = True
        elif out.finished:
            delta.finish_reason = self.finish_reason = out.finish_reason
        delta.text = self._take(final=delta.finish_reason is not None)
        return delta

    def _is_stop_token(self, out: RequestOutput, token: int) -> bool:
        return out.stop_token_id is not None or token == self.detokenizer.tokenizer.eos_token_id

    def _find_stop(self, start: int) -> bool:
        """Look for a stop string that ends in the newly decoded text; truncate the text at the first one."""
        search_from = max(0, start - self.hold_back)
        best = -1
        best_stop = ""
        for s in self.stop:
            i = self.text.find(s, search_from)
            if i != -1 and (best == -1 or i < best):
                best, best_stop = i, s
        if best == -1:
            return False
        self.text = self.text[: best + (len(best_stop) if self.include_stop else 0)]
        return True

    def _take(self, final: bool) -> str:
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold_back)
        chunk = self.text[self.sent:end]
        self.sent = end
        return chunk


def _finite(logprob: float) -> float:
    # JSON has no -Infinity; a token the model rules out entirely gets vLLM's floor value instead.
    return max(logprob, -9999.0)


class TokenNamer:
    """How logprob entries name tokens: their text, or "token_id:N" (vLLM's return_tokens_as_token_ids)."""

    def __init__(self, tokenizer: Tokenizer, as_ids: bool = False):
        self.tokenizer = tokenizer
        self.as_ids = as_ids

    def __call__(self, token_id: int) -> str:
        if self.as_ids:
            return f"token_id:{token_id}"
        return self.tokenizer.token_text(token_id) if token_id < self.tokenizer.vocab_size else ""

    def bytes(self, token_id: int) -> list[int]:
        return list(self.tokenizer.token_bytes(token_id)) if token_id < self.tokenizer.vocab_size else []


def completion_logprobs(name: TokenNamer, entries: list[TokenLogprobs | None], token_ids: list[int],
                        text_start: int = 0) -> dict:
    """The legacy completions format: tokens, token_logprobs, top_logprobs, text_offset. Each top dict also
    carries the chosen token (lm-eval checks greediness against it)."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = text_start
    for token_id, entry in zip(token_ids, entries):
        text = name(token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if entry is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(_finite(entry.logprob))
        top = {name(t): _finite(lp) for t, lp in entry.top}
        top.setdefault(text, _finite(entry.logprob))
        top_logprobs.append(top)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def chat_logprobs(name: TokenNamer, entries: list[TokenLogprobs]) -> dict:
    """The chat format: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    def item(token_id: int, logprob: float) -> dict:
        return {"token": name(token_id), "logprob": _finite(logprob), "bytes": name.bytes(token_id)}

    content = []
    for entry in entries:
        row = item(entry.token_id, entry.logprob)
        row["top_logprobs"] = [item(t, lp) for t, lp in entry.top]
        content.append(row)
    return {"content": content}


def prompt_logprobs_vllm(name: TokenNamer, entries: list[TokenLogprobs], prompt_ids: list[int],
                         num_top: int) -> list[dict | None]:
    """vLLM's `prompt_logprobs` extra: per prompt position None (position 0) or {token_id: {logprob, rank,
    decoded_token}} for the prompt token and the top `num_top` tokens."""
    def item(token_id: int, logprob: float, rank: int) -> dict:
        return {"logprob": _finite(logprob), "rank": rank, "decoded_token": name(token_id)}

    rows: list[dict | None] = [None]
    for token_id, entry in zip(prompt_ids[1:], entries):
        row = {str(t): item(t, lp, i + 1) for i, (t, lp) in enumerate(entry.top[:num_top])}
        row[str(token_id)] = item(token_id, entry.logprob, entry.rank)
        rows.append(row)
    return rows
