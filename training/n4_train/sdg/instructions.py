"""Verifiable instructions appended to a prompt to make it an instruction-following prompt (the 340B report's
"Answer in N words"-style constraints, after IFEval). Each has a checker, so a response records whether it obeyed."""
from __future__ import annotations

import random
import re
from typing import Callable

END_PHRASE = "Is there anything else I can help with?"


def _max_words(r: random.Random) -> tuple[str, int]:
    n = r.choice((30, 50, 80, 120))
    return f"Answer in at most {n} words.", n


def _bullets(r: random.Random) -> tuple[str, int]:
    k = r.randint(2, 5)
    return f"Use exactly {k} bullet points, each on its own line starting with '- '.", k


def _paragraphs(r: random.Random) -> tuple[str, int]:
    k = r.randint(2, 4)
    return f"Write exactly {k} paragraphs, separated by blank lines.", k


def _lowercase(r: random.Random) -> tuple[str, None]:
    return "Write your entire answer in lowercase letters; no capital letters are allowed.", None


def _no_commas(r: random.Random) -> tuple[str, None]:
    return "Do not use any commas in your answer.", None


def _end_phrase(r: random.Random) -> tuple[str, str]:
    return f'End your answer with the exact phrase "{END_PHRASE}" and nothing after it.', END_PHRASE


def _bullet_count(text: str) -> int:
    return sum(1 for line in text.splitlines() if re.match(r"\s*[-*•]\s+\S", line))


def _paragraph_count(text: str) -> int:
    return len([p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()])


# name -> (make instruction text and value, check(response text, value)).
INSTRUCTIONS: dict[str, tuple[Callable, Callable[[str, object], bool]]] = {
    "max_words": (_max_words, lambda text, n: 0 < len(text.split()) <= n),
    "bullets": (_bullets, lambda text, k: _bullet_count(text) == k),
    "paragraphs": (_paragraphs, lambda text, k: _paragraph_count(text) == k),
    "lowercase": (_lowercase, lambda text, _: bool(text.strip()) and text == text.lower()),
    "no_commas": (_no_commas, lambda text, _: bool(text.strip()) and "," not in text),
    "end_phrase": (_end_phrase, lambda text, phrase: text.rstrip().endswith(phrase)),
}


def sample_instruction(rng: random.Random) -> dict:
    """{"type", "value", "text"}: what to append to the user turn and what to check the answer against."""
    name = rng.choice(sorted(INSTRUCTIONS))
    text, value = INSTRUCTIONS[name][0](rng)
    return {"type": name, "value": value, "text": text}


def follows(instruction: dict, response: str) -> bool:
    return INSTRUCTIONS[instruction["type"]][1](response, instruction["value"])
