"""Fast checks of training/demo/build_reward_set.py (the synthesized HelpSteer2-format demo reward set).

The script runs for real on a small hand-written chat file; the rules are also checked on worked examples.
Run: ``.venv/bin/python -m pytest -q training/tests/test_reward_set.py``
"""

from __future__ import annotations

import collections
import json
import pathlib
import random
import subprocess
import sys

import pytest

DEMO = pathlib.Path(__file__).resolve().parents[1] / "demo"
sys.path.insert(0, str(DEMO))
import build_reward_set as brs  # noqa: E402

ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
DOCS = [
    ("What does `json.dumps` do?", "Serialize ``obj`` to a JSON formatted ``str``. Call it as `json.dumps(obj)`."),
    ("What is the `pass` statement?", ("The `pass` statement is a null operation: when it is executed, nothing "
     "happens. It is useful as a placeholder when a statement is required syntactically, but no code needs to be "
     "executed, for example in an empty class or function body.")),
    ("Explain `os.getcwd`.", "Return a unicode string representing the current working directory."),
    ("What does `abs` do?", "Return the absolute value of the argument."),
    ("Tell me about the while loop in Python.", ("The `while` statement is used for repeated execution as long as "
     "an expression is true. It repeatedly tests the expression and, if it is true, executes the first suite; if "
     "the expression is false the suite of the `else` clause, if present, is executed and the loop terminates.")),
]


def chat_lines() -> list[str]:
    convos = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in DOCS]
    convos[0].insert(0, {"role": "system", "content": "You are a helpful assistant."})
    rng = random.Random(1)
    for _ in range(12):
        a, b, c = rng.randint(2, 40), rng.randint(2, 9), rng.randint(2, 12)
        convos.append([{"role": "user", "content": f"Ana has {a} pens and buys {b} bags of {c}. How many now?"},
                       {"role": "assistant", "content": f"{a} + {b} × {c} = {a + b * c}. The answer is {a + b * c}."}])
    convos.append(convos[1] + [{"role": "user", "content": "Give an example."},  # two-turn: skipped
                               {"role": "assistant", "content": "For example:\n\n```python\npass\n```"}])
    return [json.dumps({"messages": m}, ensure_ascii=False) for m in convos]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DEMO / "build_reward_set.py"), *args],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("reward")
    chat = tmp / "chat.jsonl"
    chat.write_text("\n".join(chat_lines()) + "\n", encoding="utf-8")
    outputs = {}
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        result = run("--chat", str(chat), "--output", str(tmp / f"{name}.jsonl"), "--seed", seed)
        assert result.returncode == 0, result.stderr
        assert "17 conversations (1 two-turn skipped)" in result.stdout
        outputs[name] = tmp / f"{name}.jsonl"
    outputs["chat"] = chat
    outputs["rows"] = [json.loads(line) for line in outputs["a"].read_text(encoding="utf-8").splitlines()]
    return outputs


def test_deterministic_for_a_seed(built):
    assert built["a"].read_bytes() == built["b"].read_bytes()
    assert built["a"].read_bytes() != built["c"].read_bytes()


def test_every_row_is_valid_helpsteer(built):
    rows = built["rows"]
    assert len(rows) == 17 * 3  # original + 2 variants each (every source here has enough applicable kinds)
    for r in rows:
        assert isinstance(r["prompt"], str) and r["prompt"] and "Give an example." not in r["prompt"]
        assert isinstance(r["response"], str) and r["response"].strip()
        for name in ATTRIBUTES:
            assert 0 <= r[name] <= 4 and r[name] * 2 == int(r[name] * 2), (name, r)
    assert "You are a helpful assistant." not in {r["prompt"] for r in rows}  # the user message only
    per_prompt = collections.Counter(r["prompt"] for r in rows if r["variant"] == "original")
    assert set(per_prompt.values()) == {1}
    assert all(brs.SCORES[r["variant"]] == (r["helpfulness"], r["correctness"], r["coherence"]) for r in rows)
    assert len({r["variant"] for r in rows}) >= 6


def test_rules_hold_in_the_output(built):
    rows = built["rows"]
    original = {r["prompt"]: r["response"] for r in rows if r["variant"] == "original"}
    assert sum(r["variant"] == "wrong_number" for r in rows) == 12  # every arithmetic problem gets one
    for r in rows:
        answer = original[r["prompt"]]
        assert (r["response"] == answer) == (r["variant"] == "original")
        if r["variant"] == "wrong_number":
            assert r["response"].split()[-1] != answer.split()[-1] and r["correctness"] <= 1
        if r["variant"] in ("shuffled", "partial_shuffle"):
            assert sorted(r["response"].split()) == sorted(answer.split()) and r["coherence"] <= 2
            assert r["complexity"] == brs.complexity(answer)  # same words, same vocabulary
        if r["variant"] == "swapped":
            assert r["response"] in original.values() and r["correctness"] == 0
        if r["variant"] == "padded":
            assert r["response"].startswith(answer) and r["verbosity"] > brs.verbosity(answer)
        if r["variant"] != "original":
            assert r["helpfulness"] < 4


def test_rules_on_worked_examples():
    math = brs.Source(1, "Ana has 10 pens and buys 6 bags of 6. How many now?", "10 + 6 × 6 = 46. The answer is 46.",
                      46)
    docs = brs.Source(2, "What does `abs` do?", DOCS[1][1], None)
    rng = random.Random(0)
    wrong = brs.wrong_number(math, rng, [math])
    assert wrong.startswith("10 + 6 × 6 = ") and wrong.split()[-1] != "46." and brs.SCORES["wrong_number"][1] <= 1
    assert brs.wrong_number(docs, rng, [docs]) is None
    assert brs.swapped(docs, rng, [docs]) is None  # nothing different to swap in
    assert brs.swapped(docs, rng, [docs, math]) == math.answer
    cut = brs.truncated(docs, rng, [docs])
    assert docs.answer.startswith(cut) and len(cut) < len(docs.answer) and cut[-1] not in ".!?:"
    assert brs.shuffled(brs.Source(3, "q", "Too short.", None), rng, []) is None
    assert brs.SCORES["shuffled"][2] <= 1 and brs.SCORES["partial_shuffle"][2] == 2
    # verbosity grows with length: 4 words -> 0, ~9 -> 1, ~18 -> 2, ~38 -> 3, 80+ -> 4
    assert [brs.verbosity("word " * n) for n in (3, 4, 9, 18, 38, 80, 300)] == [0, 0, 1, 2, 3, 4, 4]
    assert brs.verbosity(brs.padded(docs, rng, [docs])) > brs.verbosity(docs.answer)
    # complexity: long words and code-like tokens raise it; arithmetic and refusals are plain
    assert brs.complexity("I do not know.") == 0 and brs.complexity(math.answer) <= 0.5
    assert brs.complexity("Call `os.path.join(base, name)` to concatenate pathname components.") >= 3.5
    assert brs.complexity("") == 0 and brs.round_half(0.25) == 0.5 and brs.round_half(9) == 4


@pytest.mark.parametrize("content, args", [
    (None, ()),                                                    # missing file
    ("{not json\n", ()),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', ()),   # no assistant answer
    ('{"messages": [{"role": "assistant", "content": "hi"}]}\n', ()),  # no user message
    ('{"text": "hi"}\n', ()),
    ("\n", ()),                                                    # nothing usable
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n', ("--variants", "-1")),
])
def test_bad_input_is_a_one_line_error(tmp_path, content, args):
    chat = tmp_path / "chat.jsonl"
    if content is not None:
        chat.write_text(content, encoding="utf-8")
    result = run("--chat", str(chat), "--output", str(tmp_path / "out.jsonl"), *args)
    assert result.returncode != 0
    assert result.stderr.startswith("error: ") and result.stderr.strip().count("\n") == 0, result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_limit_reads_the_first_lines(built, tmp_path):
    result = run("--chat", str(built["chat"]), "--output", str(tmp_path / "out.jsonl"), "--limit", "3",
                 "--variants", "1")
    assert result.returncode == 0, result.stderr
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 3 * 2
