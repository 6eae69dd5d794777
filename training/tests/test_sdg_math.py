"""Local math word problems: the stored answer is what the text asks (recomputed here independently from the
numbers in the text), the generator is deterministic per seed, and final answers are read from free text."""
from __future__ import annotations

import random
import re

import pytest

from n4_train.sdg.math_problems import TEMPLATES, extract_answer, generate_problem, is_correct


def _numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", text)]


# template -> the answer from the numbers as they appear in the text, written independently of the generator.
SOLVERS = {
    "buy_bags": lambda a, b, c: a + b * c,
    "spend": lambda a, b, c: a - b - c,
    "distance": lambda speed, hours: speed * hours,
    "boxes": lambda total, per_box: total / per_box,
    "area": lambda width, length: width * length,
    "discount": lambda price, percent: price * (100 - percent) / 100,
    "reading": lambda per_day, total: total / per_day,
    "seats": lambda rows, cols, taken: rows * cols - taken,
    "wages": lambda wage, hours, days, spent: wage * hours * days - spent,
}


def test_every_template_has_an_independent_solver():
    assert {t.__name__.lstrip("_") for t in TEMPLATES} == set(SOLVERS)


@pytest.mark.parametrize("seed", range(300))
def test_ground_truth_matches_the_text(seed):
    text, answer, template = generate_problem(random.Random(seed))
    assert isinstance(answer, int) and answer > 0
    assert SOLVERS[template](*_numbers(text)) == answer, text
    assert text.rstrip().endswith("?")


def test_generator_is_deterministic_and_varied():
    first = [generate_problem(random.Random(f"seed/{i}")) for i in range(50)]
    again = [generate_problem(random.Random(f"seed/{i}")) for i in range(50)]
    assert first == again
    assert len({text for text, _, _ in first}) == 50
    assert len({template for _, _, template in first}) >= 6


@pytest.mark.parametrize("text, expected", [
    ("The answer is 42.", 42),
    ("So 3 + 4 = 7 apples in total.", 7),
    ("Step 1: 12 * 3 = 36. Step 2: 36 + 5 = 41.\n#### 41", 41),
    ("First 10, then 20. Final answer: $1,250", 1250),
    ("We get \\boxed{17} apples, i.e. 17 out of 20.", 17),
    ("answer: -3.5 degrees, down from 2", -3.5),
    ("The answer is **64** (8 rows of 8).", 64),
    ("It costs 3.50 dollars", 3.5),
    ("I am not sure.", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_is_correct():
    assert is_correct("So Ana has 17 + 36 = 53 apples.", 53)
    assert is_correct("The final answer is 53.0", 53)
    assert not is_correct("The answer is 52, not 53 as one might think", 53)  # the stated answer wins
    assert not is_correct("no idea", 53)
