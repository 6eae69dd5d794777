"""Fast checks of the demo-model data builders (training/demo/build_corpus.py, build_chat_set.py).

Both builders run for real, in their small ``--limit`` mode, into temporary directories.
Run: ``.venv/bin/python -m pytest -q training/tests/test_demo_data.py``
"""

from __future__ import annotations

import collections
import json
import pathlib
import re
import subprocess
import sys

import pytest

DEMO = pathlib.Path(__file__).resolve().parents[1] / "demo"
sys.path.insert(0, str(DEMO))
import build_chat_set  # noqa: E402
import build_corpus  # noqa: E402

LIMIT = "40"  # topics, source modules and C modules: enough for a non-empty held-out split, still fast


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DEMO / script), *args], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def corpus_dirs(tmp_path_factory) -> list[pathlib.Path]:
    dirs = []
    for i in range(2):
        out = tmp_path_factory.mktemp(f"corpus{i}")
        result = run("build_corpus.py", "--output-dir", str(out), "--limit", LIMIT)
        assert result.returncode == 0, result.stderr
        assert "tokens" in result.stdout
        dirs.append(out)
    return dirs


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory) -> list[tuple[pathlib.Path, pathlib.Path]]:
    pairs = []
    for i in range(2):
        out = tmp_path_factory.mktemp(f"chat{i}")
        train, held = out / "train.jsonl", out / "heldout.jsonl"
        result = run("build_chat_set.py", "--output", str(train), "--heldout", str(held),
                     "--limit", LIMIT, "--arithmetic", "300")
        assert result.returncode == 0, result.stderr
        pairs.append((train, held))
    return pairs


def test_corpus_is_deterministic(corpus_dirs):
    first, second = corpus_dirs
    names = sorted(p.name for p in first.iterdir())
    assert names == ["SOURCES.md", "heldout.txt", "train.txt"]
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_corpus_split_is_whole_documents_without_overlap(corpus_dirs):
    train = build_corpus.read_documents(corpus_dirs[0] / "train.txt")
    held = build_corpus.read_documents(corpus_dirs[0] / "heldout.txt")
    assert train and held
    assert not set(train) & set(held)
    assert len(set(train)) == len(train)  # deduplicated
    headings = {d.split("\n", 1)[0] for d in train}
    assert not headings & {d.split("\n", 1)[0] for d in held}
    for doc in train + held:
        assert doc.strip() == doc and "\n\n\n" not in doc and "\t" not in doc
        assert build_corpus.DOC_END not in doc
    assert "Python Software Foundation License" in (corpus_dirs[0] / "SOURCES.md").read_text()


def test_heldout_choice_is_stable():
    # Pinned: a different hash (e.g. Python's salted hash()) would silently reshuffle the split.
    titles = [f"doc{i}" for i in range(2000)]
    held = [t for t in titles if build_corpus.is_heldout(t, 4.0)]
    assert 40 <= len(held) <= 120
    assert held == [t for t in titles if build_corpus.is_heldout(t, 4.0)]


def test_chat_set_is_deterministic(chat_files):
    (train1, held1), (train2, held2) = chat_files
    assert train1.read_bytes() == train2.read_bytes()
    assert held1.read_bytes() == held2.read_bytes()


def _load(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_every_chat_line_is_valid(chat_files):
    train, held = chat_files[0]
    rows = _load(train) + _load(held)
    assert len(rows) > 300
    for row in rows:
        assert set(row) == {"messages"}
        messages = row["messages"]
        roles = [m["role"] for m in messages]
        if roles[0] == "system":
            roles = roles[1:]
        assert roles and len(roles) % 2 == 0, roles
        assert roles == ["user", "assistant"] * (len(roles) // 2), roles
        for m in messages:
            assert set(m) == {"role", "content"}
            assert isinstance(m["content"], str) and m["content"].strip() == m["content"] and m["content"]
    assert any(len(r["messages"]) >= 4 and r["messages"][-2]["role"] == "user" for r in rows)  # two-turn


def test_chat_split_does_not_overlap(chat_files):
    train, held = (_load(p) for p in chat_files[0])
    assert train and held
    first_question = lambda row: next(m["content"] for m in row["messages"] if m["role"] == "user")  # noqa: E731
    # All phrasings and follow-ups of one source share a side, so no question is on both sides.
    assert not {first_question(r) for r in train} & {first_question(r) for r in held}


def _evaluate(expression: str) -> float:
    python = expression.replace("−", "-").replace("×", "*").replace("÷", "/")
    assert re.fullmatch(r"[\d\s()+\-*/]+", python), expression
    return eval(python)  # safe: only digits, spaces, parentheses and + - * / (checked above)


def test_arithmetic_generator_answers_are_correct():
    problems = build_chat_set.arithmetic_problems(3000)
    assert len({p.question for p in problems}) == 3000
    operators = collections.Counter()
    for p in problems:
        assert _evaluate(p.expression) == p.value and p.value >= 0
        # The expression uses exactly the numbers stated in the question.
        assert sorted(map(int, re.findall(r"\d+", p.question))) == sorted(p.numbers)
        assert [int(n) for n in re.findall(r"\d+", p.expression)] == list(p.numbers)
        assert p.answer == f"{p.expression} = {p.value}. The answer is {p.value}."
        operators.update(ch for ch in p.expression if ch in "+−×÷")
    assert set(operators) == set("+−×÷")


def test_arithmetic_conversations_are_correct(chat_files):
    rows = _load(chat_files[0][0]) + _load(chat_files[0][1])
    answers = [r["messages"][-1]["content"] for r in rows if "The answer is" in r["messages"][-1]["content"]]
    assert len(answers) == 300
    for answer in answers:
        match = re.fullmatch(r"(.+) = (\d+)\. The answer is (\d+)\.", answer)
        assert match and match.group(2) == match.group(3), answer
        assert _evaluate(match.group(1)) == int(match.group(2)), answer


def test_summaries_end_at_sentence_boundaries():
    from pydoc_data.topics import topics
    summary = build_chat_set.topic_summary(build_corpus.clean_text(topics["yield"]))
    assert summary.startswith("A `yield` statement is semantically equivalent to a yield expression.")
    assert summary.endswith(".") and len(summary.split()) <= 120
    doc = "dumps(obj) -> str\n\nSerialize ``obj`` to a JSON formatted ``str``.\n\nMore text."
    assert build_chat_set.doc_summary(doc) == "Serialize `obj` to a JSON formatted `str`."


def test_bad_input_fails_with_one_line(tmp_path):
    bad = run("build_corpus.py", "--output-dir", str(tmp_path), "--tokenizer", str(tmp_path / "missing.model"))
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "tokenizer" in bad.stderr
    same = str(tmp_path / "x.jsonl")
    bad = run("build_chat_set.py", "--output", same, "--heldout", same)
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0
