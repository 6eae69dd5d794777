"""Training data: reading JSONL/text, tokenizing, packing into fixed-length rows, batching.

A packed row holds several documents (or conversations) end to end: `input_ids`, `labels` (the next token, or
-100 where no loss is taken), `position_ids` (restarting at each document) and `segment_ids` (1, 2, ... per
document, 0 for padding; attention stays inside a document). Rows are deterministic for a seed, and an epoch's
order depends only on (seed, epoch), so a resumed run sees the same micro-batches as an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from model.config import REWARD_ATTRIBUTES
from n4_train.tokenization import DataError, Encoded, TrainTokenizer, reward_text

IGNORE = -100
# Padded widths are rounded up to this: transformer-engine's FP8 GEMMs need the token count (batch x width) to be a
# multiple of 16, and packed rows already are (--seq-len is the user's choice; 256/512/4096 are).
WIDTH_MULTIPLE = 16
DOCUMENT_END = r"(?m)^<\|endoftext\|>$"  # a line of its own ends a document in a .txt corpus
ATTRIBUTES = REWARD_ATTRIBUTES


def read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: each line must be a JSON object")
            yield number, record


def read_documents(path: str) -> list[str]:
    """Pretraining text: a `.jsonl` file of {"text": ...} records, or a text file whose documents end with a line
    holding only `<|endoftext|>` (training/demo/build_corpus.py writes that) — a whole file without one is one
    document."""
    if path.endswith(".jsonl"):
        docs = []
        for number, record in read_jsonl(path):
            if not isinstance(record.get("text"), str):
                raise DataError(f"{path}:{number}: a pretraining record needs a string field 'text'")
            docs.append(record["text"])
        return docs
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return [doc.strip("\n") for doc in re.split(DOCUMENT_END, text) if doc.strip()]


# ---- documents / conversations -> packed rows ----------------------------------------------------------------

@dataclass
class Rows:
    input_ids: torch.Tensor     # [N, S] int64
    labels: torch.Tensor        # [N, S] int64, IGNORE where no loss
    position_ids: torch.Tensor  # [N, S] int64
    segment_ids: torch.Tensor   # [N, S] int64, 0 = padding

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index],
                "position_ids": self.position_ids[index], "segment_ids": self.segment_ids[index]}

    @property
    def trained_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


def pack(pieces: list[Encoded], seq_len: int, pad_id: int = 0) -> Rows:
    """Greedy in-order packing of pieces (each at most seq_len tokens) into rows of seq_len tokens."""
    rows: list[list[tuple[Encoded, int]]] = [[]]
    used = 0
    for piece in pieces:
        if len(piece.ids) > seq_len:
            raise ValueError(f"a piece of {len(piece.ids)} tokens does not fit a row of {seq_len}")
        if used + len(piece.ids) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((piece, used))
        used += len(piece.ids)
    if not rows[-1]:
        rows.pop()
    shape = (len(rows), seq_len)
    out = Rows(torch.full(shape, pad_id, dtype=torch.long), torch.full(shape, IGNORE, dtype=torch.long),
               torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long))
    for r, row in enumerate(rows):
        for segment, (piece, start) in enumerate(row, 1):
            n = len(piece.ids)
            ids = torch.tensor(piece.ids)
            out.input_ids[r, start:start + n] = ids
            out.position_ids[r, start:start + n] = torch.arange(n)
            out.segment_ids[r, start:start + n] = segment
            # Token i predicts token i + 1 of the same piece, when that token is trained.
            target_trained = torch.tensor(piece.trained[1:], dtype=torch.bool)
            out.labels[r, start:start + n - 1] = torch.where(target_trained, ids[1:], IGNORE)
    return out


def pretraining_rows(paths: list[str], tokenizer: TrainTokenizer, seq_len: int) -> Rows:
    """Each document + EOS, cut into pieces of seq_len tokens, packed."""
    pieces = []
    for path in paths:
        for doc in read_documents(path):
            ids = tokenizer.encode(doc) + [tokenizer.eos_id]
            for start in range(0, len(ids), seq_len):
                chunk = ids[start:start + seq_len]
                if len(chunk) > 1:
                    pieces.append(Encoded(chunk, [True] * len(chunk)))
    if not pieces:
        raise DataError(f"no text in {', '.join(paths)}")
    return pack(pieces, seq_len)


def chat_rows(paths: list[str], tokenizer: TrainTokenizer, seq_len: int) -> tuple[Rows, int]:
    """SFT conversations ({"messages": [...]} per line) packed; conversations longer than a row are skipped, not
    truncated (a cut conversation would teach the model to stop mid-answer). Returns (rows, skipped)."""
    pieces, skipped = [], 0
    for path in paths:
        for number, record in read_jsonl(path):
            try:
                encoded = tokenizer.encode_chat(record.get("messages"))
            except DataError as e:
                raise DataError(f"{path}:{number}: {e}") from None
            if len(encoded.ids) > seq_len:
                skipped += 1
            else:
                pieces.append(encoded)
    if not pieces:
        raise DataError(f"no conversation of at most {seq_len} tokens in {', '.join(paths)}")
    return pack(pieces, seq_len), skipped


class Batches:
    """Micro-batches of `batch_size` rows; epoch e's order is a permutation seeded by (seed, e). Micro-batch k of
    the whole run is a pure function of k, which is what makes resuming exact."""

    def __init__(self, rows, batch_size: int, seed: int, shuffle: bool = True):
        if len(rows) < batch_size:
            raise DataError(f"only {len(rows)} training rows for a micro-batch of {batch_size}: use a smaller "
                            f"--batch-size or more data")
        self.rows, self.batch_size, self.seed, self.shuffle = rows, batch_size, seed, shuffle
        self.per_epoch = len(rows) // batch_size
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, its permutation): computed once per epoch

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            order = (torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
                     if self.shuffle else torch.arange(len(self.rows)))
            self._order = (epoch, order)
        return self._order[1]

    def __getitem__(self, k: int):
        epoch, index = divmod(k, self.per_epoch)
        order = self._epoch_order(epoch)
        return self.rows.select(order[index * self.batch_size:(index + 1) * self.batch_size])


# ---- reward-model and preference data -------------------------------------------------------------------------

@dataclass
class RewardRows:
    """Rows right-padded to the longest; the reward is read at `last` (each sequence's final token)."""
    input_ids: torch.Tensor  # [N, S] int64
    last: torch.Tensor       # [N] int64
    targets: torch.Tensor    # [N, 5] fp32, the HelpSteer2 attributes

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        width = _round_up(int(self.last[index].max()) + 1)  # trim the batch to its own longest sequence
        return {"input_ids": self.input_ids[index, :width], "last": self.last[index], "targets": self.targets[index]}


def _records(paths: str | list[str]) -> Iterator[tuple[str, int, dict]]:
    """(path, line number, record) over one JSONL file or several, in order."""
    for path in [paths] if isinstance(paths, str) else paths:
        for number, record in read_jsonl(path):
            yield path, number, record


def _finite(value, name: str) -> float:
    """float(value), refusing NaN and infinities (json reads NaN/Infinity, float() reads "nan"/"inf"): a non-finite
    target or reward makes the loss NaN, and a NaN loss makes every weight NaN at the next step."""
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name}: {value!r} is not a finite number")
    return number


def helpsteer_rows(paths: str | list[str], tokenizer: TrainTokenizer, max_len: int) -> tuple[RewardRows, int]:
    """HelpSteer2-format JSONL (one file or several): {"prompt", "response", "helpfulness", ..., "verbosity"} (0-4
    each); the prompt may also be a list of messages. Rows longer than max_len are skipped. Returns (rows, skipped)."""
    sequences, targets, skipped = [], [], 0
    for path, number, record in _records(paths):
        try:
            messages = _prompt_messages(record.get("prompt")) + [
                {"role": "assistant", "content": _string(record, "response")}]
            values = [_finite(record[name], name) for name in ATTRIBUTES]
            ids = tokenizer.encode(reward_text(messages))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}:{number}: a HelpSteer2 row needs prompt, response and numeric "
                            f"{', '.join(ATTRIBUTES)} ({e})") from None
        if len(ids) > max_len:
            skipped += 1
            continue
        sequences.append(ids)
        targets.append(values)
    if not sequences:
        raise DataError(f"{_names(paths)}: no usable rows")
    width = _round_up(max(map(len, sequences)))
    input_ids = torch.zeros(len(sequences), width, dtype=torch.long)
    for i, ids in enumerate(sequences):
        input_ids[i, :len(ids)] = torch.tensor(ids)
    last = torch.tensor([len(ids) - 1 for ids in sequences])
    return RewardRows(input_ids, last, torch.tensor(targets, dtype=torch.float32)), skipped


@dataclass
class PreferenceRows:
    """Chosen and rejected conversations, right-padded; `mask` marks the response tokens whose log-probs are summed
    (the targets of positions [0, S-1), as in `labels`)."""
    chosen: torch.Tensor           # [N, S] int64
    chosen_labels: torch.Tensor    # [N, S] int64, IGNORE outside the response
    rejected: torch.Tensor         # [N, S]
    rejected_labels: torch.Tensor  # [N, S]
    rewards: torch.Tensor          # [N, 2] fp32 (chosen, rejected) reward-model scalars; NaN when absent

    def __len__(self) -> int:
        return self.chosen.shape[0]

    def select(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"chosen": self.chosen[index], "chosen_labels": self.chosen_labels[index],
                "rejected": self.rejected[index], "rejected_labels": self.rejected_labels[index],
                "rewards": self.rewards[index]}


def preference_rows(paths: str | list[str], tokenizer: TrainTokenizer, max_len: int) -> tuple[PreferenceRows, int]:
    """Pairs JSONL, one file or several (what `n4-train sdg` writes): {"prompt": str | messages, "chosen": str,
    "rejected": str, "chosen_reward"?: float, "rejected_reward"?: float}. Pairs longer than max_len are skipped."""
    pairs, rewards, skipped = [], [], 0
    for path, number, record in _records(paths):
        try:
            prompt = _prompt_messages(record.get("prompt"))
            chosen = tokenizer.encode_chat(prompt + [{"role": "assistant", "content": _string(record, "chosen")}],
                                           last_turn_only=True)
            rejected = tokenizer.encode_chat(
                prompt + [{"role": "assistant", "content": _string(record, "rejected")}], last_turn_only=True)
            # NaN marks an absent reward (DPO does not need one; RPO refuses it); a present one must be finite.
            reward = [_finite(record[k], k) if k in record else math.nan for k in ("chosen_reward", "rejected_reward")]
        except (DataError, TypeError, ValueError) as e:
            raise DataError(f"{path}:{number}: {e}") from None
        if max(len(chosen.ids), len(rejected.ids)) > max_len:
            skipped += 1
            continue
        pairs.append((chosen, rejected))
        rewards.append(reward)
    if not pairs:
        raise DataError(f"{_names(paths)}: no usable pairs")
    chosen = pack_padded([c for c, _ in pairs])
    rejected = pack_padded([r for _, r in pairs])
    return PreferenceRows(*chosen, *rejected, torch.tensor(rewards, dtype=torch.float32)), skipped


def pack_padded(encoded: list[Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence per row, right-padded -> (input_ids [N, S], labels [N, S])."""
    width = _round_up(max(len(e.ids) for e in encoded))
    input_ids = torch.zeros(len(encoded), width, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(encoded):
        ids = torch.tensor(e.ids)
        input_ids[i, :len(e.ids)] = ids
        labels[i, :len(e.ids) - 1] = torch.where(torch.tensor(e.trained[1:], dtype=torch.bool), ids[1:], IGNORE)
    return input_ids, labels


def _names(paths: str | list[str]) -> str:
    return paths if isinstance(paths, str) else ", ".join(paths)


def _round_up(width: int) -> int:
    return -(-width // WIDTH_MULTIPLE) * WIDTH_MULTIPLE


def _prompt_messages(prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        return list(prompt)
    raise DataError("'prompt' must be a string or a non-empty list of messages")


def _string(record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise DataError(f"'{key}' must be a string")
    return value
