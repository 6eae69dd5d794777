"""Tokenizing training text exactly as `n4 serve` tokenizes it at inference.

The server renders a conversation with the Nemotron-4 template and encodes the whole string with SentencePiece
(`<extra_id_N>` are user-defined pieces, so they come out as single tokens). Training does the same, and reads
SentencePiece's byte offsets to tell which tokens came from assistant text: those, plus the newline and the
`<extra_id_1>` that close each assistant turn (so the model learns to stop), are the only tokens SFT trains on.
The template is restated here because this package never imports `server`; a test renders both and compares.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import sentencepiece as spm

TURN_END = "<extra_id_1>"
_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


class DataError(ValueError):
    """Training data that cannot be used (bad JSON, wrong roles, a conversation without assistant text)."""


@dataclass
class Encoded:
    ids: list[int]
    trained: list[bool]  # per token: does the loss see it (assistant text and its turn end)


class TrainTokenizer:
    def __init__(self, path: str):
        model_file = path if os.path.isfile(path) else os.path.join(path, "tokenizer.model")
        if not os.path.isfile(model_file):
            raise DataError(f"{path}: no tokenizer.model (a SentencePiece model) found")
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self.eos_id = self.sp.eos_id()
        turn_end = self.sp.piece_to_id(TURN_END)
        self.turn_end_id = turn_end if self.sp.id_to_piece(turn_end) == TURN_END else None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def encode_chat(self, messages: list[dict], last_turn_only: bool = False) -> Encoded:
        """A conversation ending with an assistant message -> ids with the assistant-token mask (only the final
        assistant turn's with `last_turn_only`: the response DPO/RPO score)."""
        text, spans = render_chat(messages)
        spans = spans[-1:] if last_turn_only else spans
        proto = self.sp.encode(text, return_type="proto")
        # Offsets are in UTF-8 bytes of `text`; a token is trained when it starts inside an assistant span.
        ids, trained = [], []
        for piece in proto.pieces:
            ids.append(piece.id)
            trained.append(any(start <= piece.begin < end for start, end in spans))
        return Encoded(ids, trained)


def render_chat(messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The server's template with the final `<extra_id_1>` appended -> (text, byte spans of each assistant turn's
    content + "\\n<extra_id_1>")."""
    if not isinstance(messages, list) or not messages:
        raise DataError("a conversation needs a non-empty `messages` list")
    system, turns = "", []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLE_NAMES \
                or not isinstance(message.get("content"), str):
            raise DataError(f"messages[{index}] must be {{'role': system|user|assistant, 'content': str}}")
        if message["role"] == "system":
            if index:
                raise DataError(f"messages[{index}]: a system message is only allowed first")
            system = message["content"]
        else:
            turns.append((message["role"], message["content"]))
    if not turns or turns[-1][0] != "assistant":
        raise DataError("a training conversation must end with an assistant message")
    text = f"<extra_id_0>System\n{system}\n".encode()
    spans = []
    for role, content in turns:
        text += f"{TURN_END}{_ROLE_NAMES[role]}\n".encode()
        body = f"{content}\n".encode()
        if role == "assistant":
            spans.append((len(text), len(text) + len(body) + len(TURN_END)))
        text += body
    text += TURN_END.encode()
    return text.decode(), spans


def reward_text(messages: list[dict]) -> str:
    """What `/v1/rewards` scores: the template without a generation prompt, ending right after the assistant's
    content and its newline; the reward is read at the last token of this text."""
    return render_chat(messages)[0][:-len(TURN_END)]
