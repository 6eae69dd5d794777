"""Benchmark workloads shared by `n4 bench throughput` (token ids) and `n4 bench serve` (text).

Random text prompts are words drawn from a fixed list, so any server's tokenizer accepts them; a common English
word is about one token for SentencePiece/BPE vocabularies of 32k+ (Nemotron-4's is 256k), so the prompt length
in tokens is only approximate: the serve benchmark reports the server's own count from the usage chunk.
A ShareGPT-style file is a JSON list of {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]};
its first human turn of each conversation is the prompt.
"""
from __future__ import annotations

import json
import random

WORDS = tuple(dict.fromkeys("""
the of and to in is was for that on as with by he it at from his an were are which this be or had not but first
one their its new after who they have her she two been other when there all during into school time may years
more most only over city some world would where later up such used many can state about national out known
university united then made team year also high three since between her under well while however part found
area early group house because river season series both life million book game same water music through long
being film small second public old people place large field light story power south north east west road home
world line work name play back open city town point main word hand page rest blue green red black white gold
stone tree wind rain snow fire sun moon star sea lake hill road bridge door room table chair paper letter
number color sound voice night day week month morning evening summer winter spring market bank store price
""".split()))  # deduplicated, order kept


def make_random_prompts(num_prompts: int, input_len: int, seed: int = 0) -> list[str]:
    """`num_prompts` prompts of `input_len` random words each (about `input_len` tokens), the same for a seed."""
    if num_prompts <= 0 or input_len <= 0:
        raise ValueError(f"--num-prompts and --input-len must be positive, got {num_prompts} and {input_len}")
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=input_len)) for _ in range(num_prompts)]


def make_random_token_prompts(num_prompts: int, input_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Token-id prompts for the offline engine: uniform over the vocabulary, the same for a seed."""
    if num_prompts <= 0 or input_len <= 0:
        raise ValueError(f"--num-prompts and --input-len must be positive, got {num_prompts} and {input_len}")
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(input_len)] for _ in range(num_prompts)]


def load_sharegpt(path: str, num_prompts: int, seed: int = 0) -> list[str]:
    """The first human turn of each conversation in a ShareGPT-style JSON file, shuffled by `seed`; `num_prompts`
    of them, cycling through the file when it holds fewer (so a small file still gives the asked-for load)."""
    if num_prompts <= 0:  # else [] reaches the benchmarks, which index prompts[0] for their warm-up
        raise ValueError(f"--num-prompts must be positive, got {num_prompts}")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON: {e}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {{'conversations': [...]}} entries")
    prompts = [p for p in (_first_human_turn(entry) for entry in data) if p]
    if not prompts:
        raise ValueError(f"{path}: no conversation has a non-empty human turn")
    random.Random(seed).shuffle(prompts)
    return [prompts[i % len(prompts)] for i in range(num_prompts)]


def _first_human_turn(entry) -> str | None:
    turns = entry.get("conversations") if isinstance(entry, dict) else None
    if not isinstance(turns, list):
        return None
    for turn in turns:
        if not isinstance(turn, dict):
            continue
        # ShareGPT's {"from": "human", "value": ...}, or OpenAI-style {"role": "user", "content": ...}.
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if role in ("human", "user") and isinstance(text, str):
            return text
    return None
