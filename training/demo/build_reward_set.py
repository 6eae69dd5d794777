"""Build the demo reward model's HelpSteer2-format set by corrupting the demo chat set's answers.

No human ratings exist offline, so every target is a documented function of the text. Each single-turn source
conversation (from ``build_chat_set.py``) gives its original answer plus ``--variants`` corrupted ones (default
2, drawn per conversation from the kinds that apply). The prompt is the last user message (a string, as in
HelpSteer2); two-turn conversations are skipped, since their "Give an example." means nothing on its own.

helpfulness, correctness, coherence: fixed per variant kind (integers, as HelpSteer2 raters give):

  kind             help corr coh  what is done to the answer
  original           4    4    4  nothing
  wrong_number       1    1    4  arithmetic only, always one of a problem's variants: the result (both "= N."
                                  and "The answer is N.") changed by +-1, +-2, +-10 or doubled; the expression
                                  is still right, hence 1 and not 0
  swapped            0    0    4  the answer of a different question of the same kind (docs or arithmetic) and
                                  similar length, so style and length give nothing away; it reads fine (coh 4)
  refusal            0    1    4  "I don't know." and the like: nothing false, nothing useful
  truncated          2    2    3  cut after 30-70% of the words, never at a sentence end (so visibly cut off)
  shuffled           0    0    0  all words in random order (answers of 6+ words)
  partial_shuffle    2    2    2  one window of about a third of the words shuffled (answers of 6+ words)
  padded             3    4    3  filler sentences appended and repeated: still right, but longer and repetitive

complexity and verbosity: computed from the response text alone, for every kind (so a shuffled answer keeps
its original's complexity, and a padded one gets a higher verbosity), rounded to 0.5, clamped to [0, 4]:

  complexity = 1.5 * (mean length of its alphabetic words - 3.5) + 4 * (share of code-like tokens)
      a token is code-like if it has a backtick, "_", "(", "[", "{" or a dotted name (``os.path``); digits and
      + - x / = are not, so worked arithmetic counts as plain vocabulary. Plain prose ~0.5-2, API prose ~2-4.
  verbosity = 4 * ln(words / 4) / ln(20)
      log scale, because length matters relatively: <=4 words -> 0, 9 -> 1, 18 -> 2, 38 -> 3, >=80 -> 4.

Deterministic for ``--seed``: each conversation's choices come from a generator seeded by (seed, its line).
Run: ``.venv/bin/python training/demo/build_reward_set.py --chat chat_train.jsonl --output reward_train.jsonl``
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import pathlib
import random
import re
import statistics
import sys
from dataclasses import dataclass

ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
SCORES = {  # kind -> (helpfulness, correctness, coherence); see the table above
    "original": (4, 4, 4), "wrong_number": (1, 1, 4), "swapped": (0, 0, 4), "refusal": (0, 1, 4),
    "truncated": (2, 2, 3), "shuffled": (0, 0, 0), "partial_shuffle": (2, 2, 2), "padded": (3, 4, 3)}
REFUSALS = ["I don't know.", "I'm not sure.", "Sorry, I can't help with that.",
            "I don't have enough information to answer that.", "I cannot answer this question."]
FILLERS = ["I hope this helps.", "Let me know if you have any other questions.",
           "In other words, that is the answer to your question.", "As mentioned above, this is how it works.",
           "This is an important point to keep in mind.", "To summarize, the answer is given above."]
# The chat set's worked answers: "17 + 3 × 12 = 53. The answer is 53."
MATH = re.compile(r"(?P<expr>.+) = (?P<value>\d+)\. The answer is (?P=value)\.")
CODE_LIKE = re.compile(r"[`_(\[{]|\w\.\w")


class InputError(Exception):
    pass


@dataclass(frozen=True)
class Source:
    line: int
    prompt: str
    answer: str
    value: int | None  # the arithmetic result, None for docs answers

    @property
    def kind(self) -> str:
        return "math" if self.value is not None else "docs"


def read_sources(path: pathlib.Path, limit: int | None) -> tuple[list[Source], int]:
    """Single-turn conversations of a chat JSONL (the first ``limit`` lines) -> (sources, two-turn skipped)."""
    sources, skipped = [], 0
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path}: {e}") from None
    for number, line in enumerate(lines[:limit], 1):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
            users = [m["content"] for m in messages if m["role"] == "user"]
            last = messages[-1]
            if last["role"] != "assistant" or not isinstance(last["content"], str) or not last["content"].strip():
                raise ValueError("the last message must be a non-empty assistant answer")
            if not users or not isinstance(users[-1], str):
                raise ValueError("no user message")
        except (json.JSONDecodeError, KeyError, TypeError, IndexError, ValueError) as e:
            raise InputError(f"{path}:{number}: not a chat conversation ({type(e).__name__}: {e})") from None
        if len(users) > 1:
            skipped += 1
            continue
        match = MATH.fullmatch(last["content"])
        sources.append(Source(number, users[-1], last["content"], int(match["value"]) if match else None))
    if not sources:
        raise InputError(f"{path}: no single-turn conversations")
    return sources, skipped


def round_half(x: float) -> float:
    # floor(+0.5), not round(): no banker's rounding; the inner round() stops 0.24999... from flooring to 0
    return min(4.0, max(0.0, math.floor(round(x * 2, 9) + 0.5) / 2))


def complexity(text: str) -> float:
    tokens = text.split()
    words = [w for w in (t.strip(".,;:!?\"'()`") for t in tokens) if w.isalpha()]
    if not tokens or not words:
        return 0.0
    mean_length = sum(map(len, words)) / len(words)
    code_share = sum(bool(CODE_LIKE.search(t)) for t in tokens) / len(tokens)
    return round_half(1.5 * (mean_length - 3.5) + 4 * code_share)


def verbosity(text: str) -> float:
    words = len(text.split())
    return round_half(4 * math.log(words / 4) / math.log(20)) if words > 4 else 0.0


# ---- corruptions: (source, rng, same-kind sources of similar length) -> new answer, or None if it does not apply --

def wrong_number(s: Source, rng: random.Random, pool: list[Source]) -> str | None:
    if s.value is None:
        return None
    wrong = rng.choice([v for v in (s.value + d for d in (-10, -2, -1, 1, 2, 10)) if v >= 0] + [2 * s.value])
    if wrong == s.value:  # doubling 0
        wrong = s.value + 1
    expr = MATH.fullmatch(s.answer)["expr"]
    return f"{expr} = {wrong}. The answer is {wrong}."


def swapped(s: Source, rng: random.Random, pool: list[Source]) -> str | None:
    for _ in range(20):  # the five phrasings of one topic share an answer: look for a really different one
        other = rng.choice(pool)
        if other.answer != s.answer and (s.value is None or other.value != s.value):
            return other.answer
    return None


def refusal(s: Source, rng: random.Random, pool: list[Source]) -> str | None:
    return rng.choice(REFUSALS)


def truncated(s: Source, rng: random.Random, pool: list[Source]) -> str | None:
    words = s.answer.split()
    cuts = [k for k in range(max(2, math.ceil(0.3 * len(words))), math.floor(0.7 * len(words)) + 1)
            if k < len(words) and not re.search(r"[.!?:][)\"'`]*$", words[k - 1])]
    return " ".join(words[:rng.choice(cuts)]) if cuts else None


def shuffled(s: Source, rng: random.Random, pool: list[Source]) -> str | None:
    words = s.answer.split()
    if len(words) < 6:  # too few words to be sure that a shuffle reads as nonsense
        return None
    for _ in range(10):
        rng.shuffle(words)
        if " ".join(words) != s.answer:
            return " ".join(words)
    return None


def partial_shuffle(s: Source, rng: random.Random, pool: list[Source]) -> str | None:
    words = s.answer.split()
    if len(words) < 6:
        return None
    size = max(3, len(words) // 3)
    start = rng.randrange(len(words) - size + 1)
    window = words[start:start + size]
    for _ in range(10):
        rng.shuffle(window)
        if window != words[start:start + size]:
            return " ".join(words[:start] + window + words[start + size:])
    return None


def padded(s: Source, rng: random.Random, pool: list[Source]) -> str | None:
    fillers = rng.sample(FILLERS, 3)
    target = len(s.answer.split()) + rng.randint(25, 60)
    out = [s.answer]
    while len(" ".join(out).split()) < target:  # cycling through the same three sentences: repetitive on purpose
        out.append(fillers[(len(out) - 1) % 3])
    return " ".join(out)


CORRUPTIONS = {f.__name__: f for f in (wrong_number, swapped, refusal, truncated, shuffled, partial_shuffle, padded)}


def row(s: Source, response: str, kind: str) -> dict:
    helpfulness, correctness, coherence = SCORES[kind]
    return {"prompt": s.prompt, "response": response, "helpfulness": helpfulness, "correctness": correctness,
            "coherence": coherence, "complexity": complexity(response), "verbosity": verbosity(response),
            "variant": kind}  # extra key, ignored by the trainer; for inspection and tests


def build(sources: list[Source], seed: int, variants: int, window: int = 25) -> list[dict]:
    by_length = collections.defaultdict(list)  # kind -> sources sorted by answer length
    for s in sorted(sources, key=lambda s: (len(s.answer.split()), s.line)):
        by_length[s.kind].append(s)
    position = {s.line: i for pool in by_length.values() for i, s in enumerate(pool)}
    rows = []
    for s in sources:
        i = position[s.line]
        neighbours = by_length[s.kind][max(0, i - window):i + window + 1]
        rng = random.Random(f"{seed}:{s.line}")  # str seeds are hashed with SHA-512: stable across runs
        rows.append(row(s, s.answer, "original"))
        kinds = [k for k in CORRUPTIONS if k != "wrong_number"]
        rng.shuffle(kinds)
        kinds.insert(0, "wrong_number")  # first, where it applies: arithmetic's main correctness contrast
        made = 0
        for kind in kinds:
            if made == variants:
                break
            response = CORRUPTIONS[kind](s, rng, neighbours)
            if response is not None:
                rows.append(row(s, response, kind))
                made += 1
    return rows


def summary(rows: list[dict]) -> str:
    lines = ["by variant: " + ", ".join(f"{k} {v}" for k, v in sorted(collections.Counter(
        r["variant"] for r in rows).items()))]
    for name in ATTRIBUTES:
        values = [r[name] for r in rows]
        lines.append(f"{name:>12}: mean {statistics.fmean(values):.2f}  std {statistics.pstdev(values):.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chat", type=pathlib.Path, required=True, help="chat JSONL from build_chat_set.py")
    parser.add_argument("--output", type=pathlib.Path, required=True, help="HelpSteer2-format JSONL to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", type=int, default=2, help="corrupted answers per conversation")
    parser.add_argument("--limit", type=int, default=None, help="read only the first N lines (quick tests)")
    args = parser.parse_args()
    if args.variants < 0 or (args.limit is not None and args.limit < 1):
        sys.exit("error: need --variants >= 0 and --limit >= 1")
    try:
        sources, skipped = read_sources(args.chat, args.limit)
    except InputError as e:
        sys.exit(f"error: {e}")
    rows = build(sources, args.seed, args.variants)
    try:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    except OSError as e:
        sys.exit(f"error: cannot write output: {e}")
    print(f"{len(rows)} rows from {len(sources)} conversations ({skipped} two-turn skipped) -> {args.output}")
    print(summary(rows))


if __name__ == "__main__":
    main()
