"""Arithmetic word problems with a ground truth computed in Python, and reading the final number out of a free-text
answer. A checkable answer is what lets a math pair be ranked by correctness instead of by the reward model, which
the 340B report prefers wherever a verifier exists.

Every template draws its numbers so the answer is an exact integer (no rounding questions), and the generator is
a pure function of its Random, so a seed gives the same problems everywhere."""
from __future__ import annotations

import random
import re

NAMES = ("Ana", "Ben", "Chloe", "Dev", "Elif", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Luca",
         "Maya", "Nikolai", "Olu", "Priya")
ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "stamps", "books", "shells")


def _buy_bags(r: random.Random, name: str, item: str) -> tuple[str, int]:
    a, b, c = r.randint(2, 60), r.randint(2, 9), r.randint(3, 24)
    return (f"{name} has {a} {item} and buys {b} bags with {c} {item} in each bag. "
            f"How many {item} does {name} have now?", a + b * c)


def _spend(r: random.Random, name: str, item: str) -> tuple[str, int]:
    b, c = r.randint(3, 40), r.randint(3, 40)
    a = b + c + r.randint(1, 100)
    return (f"{name} had {a} dollars, spent {b} dollars on {item} and {c} dollars on lunch. "
            f"How many dollars does {name} have left?", a - b - c)


def _distance(r: random.Random, name: str, item: str) -> tuple[str, int]:
    speed, hours = r.randint(30, 140), r.randint(2, 12)
    vehicle = r.choice(("train", "bus", "truck", "ferry", "car"))
    return (f"{name}'s {vehicle} travels at {speed} kilometers per hour for {hours} hours. "
            f"How many kilometers does it travel?", speed * hours)


def _boxes(r: random.Random, name: str, item: str) -> tuple[str, int]:
    per_box, boxes = r.randint(3, 15), r.randint(4, 30)
    return (f"{name} packs {per_box * boxes} {item} into boxes that hold {per_box} {item} each. "
            f"How many boxes does {name} fill?", boxes)


def _area(r: random.Random, name: str, item: str) -> tuple[str, int]:
    width, length = r.randint(3, 60), r.randint(3, 90)
    place = r.choice(("garden", "field", "courtyard", "parking lot", "playground"))
    return (f"{name}'s rectangular {place} is {width} meters wide and {length} meters long. "
            f"What is its area in square meters?", width * length)


def _discount(r: random.Random, name: str, item: str) -> tuple[str, int]:
    # price a multiple of 20 and percent a multiple of 5 make price * percent / 100 an integer.
    price, percent = 20 * r.randint(1, 30), 5 * r.randint(1, 15)
    thing = r.choice(("jacket", "lamp", "bicycle", "backpack"))
    return (f"A {thing} costs {price} dollars. It is on sale for {percent} percent off. "
            f"What is the sale price in dollars?", price * (100 - percent) // 100)


def _reading(r: random.Random, name: str, item: str) -> tuple[str, int]:
    pages, days = r.randint(5, 40), r.randint(3, 25)
    return (f"{name} reads {pages} pages a day. How many days does it take {name} to finish a book of "
            f"{pages * days} pages?", days)


def _seats(r: random.Random, name: str, item: str) -> tuple[str, int]:
    rows, cols = r.randint(4, 25), r.randint(5, 30)
    taken = r.randint(1, rows * cols - 1)
    room = r.choice(("hall", "theater", "classroom", "chapel"))
    return (f"A {room} has {rows} rows of {cols} chairs. {taken} chairs are taken. "
            f"How many chairs are free?", rows * cols - taken)


def _wages(r: random.Random, name: str, item: str) -> tuple[str, int]:
    wage, hours, days = r.randint(9, 40), r.randint(2, 10), r.randint(2, 7)
    spent = r.randint(1, wage * hours * days - 1)
    return (f"{name} earns {wage} dollars per hour and works {hours} hours a day for {days} days, then spends "
            f"{spent} dollars on {item}. How many dollars does {name} have left from these earnings?",
            wage * hours * days - spent)


TEMPLATES = (_buy_bags, _spend, _distance, _boxes, _area, _discount, _reading, _seats, _wages)


def generate_problem(rng: random.Random) -> tuple[str, int, str]:
    """(problem text, integer answer, template name)."""
    template = rng.choice(TEMPLATES)
    text, answer = template(rng, rng.choice(NAMES), rng.choice(ITEMS))
    return text, answer, template.__name__.lstrip("_")


# A number as people write it: optional sign, thousands separators, decimals ("-1,234.5", "$12", "3.").
_NUMBER = r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?"
# Places a model states its final answer, most explicit first; the last number of the text is the fallback.
_MARKERS = (
    re.compile(r"\\boxed\{\s*\$?\s*(" + _NUMBER + r")"),
    re.compile(r"####\s*\$?\s*(" + _NUMBER + r")"),
    re.compile(r"(?:final answer|answer)\s*(?:is|:|=)?\s*(?:\*\*)?\s*\$?\s*(" + _NUMBER + r")", re.IGNORECASE),
)


def _to_number(text: str) -> float:
    return float(text.replace(",", ""))


def extract_answer(text: str) -> float | None:
    """The final number of a free-text solution: a \\boxed{}, '#### N' or 'answer is N' (the last such) when
    present, else the last number in the text; None when there is no number at all."""
    for marker in _MARKERS:
        found = marker.findall(text)
        if found:
            return _to_number(found[-1])
    numbers = re.findall(_NUMBER, text)
    return _to_number(numbers[-1]) if numbers else None


def is_correct(text: str, answer: float) -> bool:
    value = extract_answer(text)
    return value is not None and abs(value - answer) <= 1e-6 * max(1.0, abs(answer))
