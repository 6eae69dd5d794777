"""Build the demo model's chat SFT set (OpenAI messages, JSONL) from CPython's own documentation.

Deterministic and offline, from the PSF-licensed sources of ``build_corpus.py``: "What is the `with`
statement?" -> the opening prose of that Language Reference topic (whole sentences, ~60-120 words);
"What does `json.dumps` do?" -> the first sentence(s) of its docstring; arithmetic word problems with a
worked answer ("17 + 3 × 12 = 53. The answer is 53."); and two-turn conversations whose "Give an example."
is answered with a code snippet from the same topic or docstring. Held-out conversations (~3%) are chosen
by a SHA-256 of their source (topic, API name, problem), so every phrasing of a source is on one side.

Run: ``.venv/bin/python training/demo/build_chat_set.py --output chat_train.jsonl --heldout chat_heldout.jsonl``
"""

from __future__ import annotations

import argparse
import ast
import collections
import hashlib
import json
import pathlib
import random
import re
import sys
import textwrap
from dataclasses import dataclass

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import build_corpus as corpus  # noqa: E402  (sibling script: same sources, same cleaning)

SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a helpful assistant. Answer briefly.",
                  "You are a concise assistant that answers questions about Python."]
KEYWORD_QUESTIONS = ["What is the `{k}` statement?", "Explain the `{k}` keyword.", "What does `{k}` do in Python?",
                     "How does the `{k}` statement work?", "When would I use `{k}` in Python?"]
TOPIC_QUESTIONS = ["Explain {s}.", "Tell me about {s} in Python.", "What does the Python documentation say about {s}?",
                   "Give me a short overview of {s}.", "Can you describe {s}?"]
CALLABLE_QUESTIONS = ["What does `{n}` do?", "What is `{n}` for?", "Explain `{n}`.",
                      "Briefly, what does `{n}()` do?", "What is the purpose of `{n}`?"]
CLASS_QUESTIONS = ["What is `{n}`?", "What is the `{n}` class for?", "Explain the `{n}` class.",
                   "What does `{n}` represent?"]
PROPERTY_QUESTIONS = ["What is the `{n}` property?", "What does the `{n}` attribute hold?", "What is `{n}`?"]
FOLLOW_UPS = ["Give an example.", "Can you show me an example?", "Show me some code that uses it.",
              "What does that look like in code?"]
EXAMPLE_INTROS = ["Here is an example from the Python documentation:", "For example:", "Here is a short example:"]
# Docstrings that describe implementation details rather than what a user calls.
UNHELPFUL_START = ("Internal", "Private", "Undocumented", "Helper", "Deprecated", "XXX", "For internal use")


def stable_int(*parts: str) -> int:
    """A process-independent hash (Python's hash() is salted per run)."""
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()[:8], "big")


def pick(options: list[str], *key: str) -> str:
    return options[stable_int(*key) % len(options)]


def flatten(paragraph: str) -> str:
    """One line; words hyphenated across a line break ("built-\\nin") are rejoined without a space."""
    return " ".join(re.sub(r"(\w)-\n\s*(\w)", r"\1-\2", paragraph).split())


def markup_to_markdown(text: str, quotes: bool) -> str:
    """reST roles and literals -> Markdown code; pydoc's "x" literals too when ``quotes`` (topic text).

    Expects flattened text, so that a literal wrapped over two lines is still one pair of quotes."""
    text = re.sub(r":[\w:]+:`!?~?([^`<]*?)(?:\s*<[^>]*>)?`", r"`\1`", text)
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    if quotes and text.count('"') % 2 == 0:  # an odd count would pair the wrong quotes
        text = re.sub(r'"([^"\n]+)"', r"`\1`", text)
    text = re.sub(r"\s*\((?:see|See) [^()]*\)", "", text)  # cross-references mean nothing in a chat
    return re.sub(r"\s*\[\d+\]", "", text)  # footnote markers


def sentences(paragraph: str) -> list[str]:
    """Complete sentences only: a trailing fragment (often "...as follows:") is dropped."""
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z`\"“(*])", paragraph)
    return [p for p in parts if re.search(r"[.!?][)\"”]?$", p) and not re.match(r"\(?See ", p)]


def _is_prose(par: str) -> bool:
    first = par.split("\n", 1)[0]
    return bool(first) and not first[0].isspace() and not first[0].islower() and not re.match(
        r"(New in version|Changed in version|Deprecated|See also|Note:|\*\*Source|[+=-]{3}|\d+\. |[*-] )", first)


def topic_summary(text: str, low: int = 60, high: int = 120) -> str | None:
    """The opening prose of a topic's first section: whole sentences, about ``low``..``high`` words."""
    body = text.split("\n", 2)[2].strip("\n") if text.count("\n") >= 2 else ""
    body = re.split(r"\n\n[^\n]+\n[=*-]{3,}\n|\n={10,}\n", body)[0]  # stop at the next section heading
    chosen, words = [], 0
    for par in body.split("\n\n"):
        if not _is_prose(par):
            if words >= 25:  # prose after a code block tends to refer back to it
                break
            continue
        for sentence in sentences(markup_to_markdown(flatten(par), quotes=True)):
            if words >= low or words + len(sentence.split()) > high:
                break
            chosen.append(sentence)
            words += len(sentence.split())
    return " ".join(chosen) if words >= 15 else None


def doc_summary(doc: str, max_words: int = 80) -> str | None:
    """The first sentence(s) of a docstring, skipping a leading "name(args) -> result" line."""
    pars = [p for p in doc.split("\n\n") if p.strip()]
    while pars and re.match(r"[\w.]+\(.*\)(\s*->.*)?$", pars[0].split("\n")[0].strip()):
        pars.pop(0)
    if not pars or ">>>" in pars[0] or "::" in pars[0] or pars[0].startswith(UNHELPFUL_START):
        return None
    chosen = []
    for sentence in sentences(markup_to_markdown(flatten(pars[0]), quotes=False)):
        if len(" ".join(chosen + [sentence]).split()) > max_words or len(" ".join(chosen).split()) >= 8:
            break  # one sentence, or two when the first is very short
        chosen.append(sentence)
    text = " ".join(chosen)
    return text if len(text.split()) >= 3 and text[0].isupper() else None


def _is_code(snippet: str) -> bool:
    if snippet.startswith(">>>") or "::=" in snippet:  # doctest: yes; grammar production: no
        return snippet.startswith(">>>")
    try:
        tree = ast.parse(snippet)
    except SyntaxError:  # indented prose ("Note:" blocks), tables, pseudo-code
        return False
    trivial = (ast.Name, ast.Constant, ast.Attribute)  # a lone name is not an example
    return any(not (isinstance(s, ast.Expr) and isinstance(s.value, trivial)) for s in tree.body)


def topic_snippet(text: str, max_lines: int = 15) -> str | None:
    """The first indented block of a topic that is real Python code (not grammar, notes or tables)."""
    for match in re.finditer(r"(?:^|\n\n)((?: {3}[^\n]*\n?|\n(?= {3}))+)", text):
        snippet = textwrap.dedent(match.group(1)).strip("\n")
        if _is_code(snippet) and snippet.count("\n") < max_lines:
            return snippet
    return None


def doctest_snippet(doc: str, max_lines: int = 12) -> str | None:
    """The first doctest block (">>>" lines and their output up to a blank line) of a docstring."""
    match = re.search(r"^([ \t]*>>> .*(?:\n[ \t]*\S.*)*)", doc, re.M)
    if not match:
        return None
    snippet = textwrap.dedent(match.group(1)).strip()
    return snippet if snippet.count("\n") < max_lines else None


def convo(user: str, answer: str, key: str, follow_up: tuple[str, str] | None = None) -> list[dict]:
    messages = []
    if stable_int(key, "system") % 4 == 0:  # a quarter get a system prompt, so both shapes are seen
        messages.append({"role": "system", "content": pick(SYSTEM_PROMPTS, key, "prompt")})
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    if follow_up:
        messages += [{"role": "user", "content": follow_up[0]}, {"role": "assistant", "content": follow_up[1]}]
    return messages


def example_turn(snippet: str, key: str) -> tuple[str, str]:
    return pick(FOLLOW_UPS, key, "follow"), f"{pick(EXAMPLE_INTROS, key, 'intro')}\n\n```python\n{snippet}\n```"


def topic_conversations(limit: int | None) -> list[tuple[str, list[dict]]]:
    out = []
    for title, text in corpus.topic_documents(limit):
        answer = topic_summary(text)
        if not answer:
            continue
        heading = markup_to_markdown(text.split("\n", 1)[0], quotes=True)
        keyword = re.fullmatch(r"The `(\w+)` statement", heading)
        if keyword:
            questions = [q.format(k=keyword.group(1)) for q in KEYWORD_QUESTIONS]
        else:  # "Format String Syntax" -> "format string syntax"; code, acronyms and "Python" kept
            subject = re.sub(r"(?<![`\w])([A-Z][a-z]+)\b", lambda m: m.group(1) if m.group(1) == "Python"
                             else m.group(1).lower(), heading)
            questions = [q.format(s=subject) for q in TOPIC_QUESTIONS]
        out += [(title, convo(q, answer, f"{title}:{q}")) for q in questions]
        snippet = topic_snippet(text)
        if snippet:
            out.append((title, convo(questions[0], answer, title, example_turn(snippet, title))))
    return out


def api_conversations(limit: int | None) -> list[tuple[str, list[dict]]]:
    out, seen = [], set()
    for e in corpus.stdlib_entries(limit):
        name = e.name
        public = not any(part.startswith("_") for part in f"{e.module}.{e.qualname}".split("."))
        if e.kind == "module" or not public or name in seen:
            continue
        answer = doc_summary(e.doc)
        if not answer:
            continue
        seen.add(name)
        key = f"api:{name}"
        templates = {"class": CLASS_QUESTIONS, "property": PROPERTY_QUESTIONS}.get(e.kind, CALLABLE_QUESTIONS)
        question = pick(templates, key).format(n=name)
        # Long signatures read badly in chat; "(self, ...)" on a function means a decorator rewrote it.
        if e.signature and len(name + e.signature) <= 60 and not e.signature.startswith("(self"):
            if e.kind == "function":
                answer += f" Call it as `{name}{e.signature}`."
            elif e.kind == "method":  # a method needs an instance, so "call it as X.m()" would be wrong
                answer += f" Its signature is `{e.qualname}{e.signature}`."
        out.append((key, convo(question, answer, key)))
        snippet = doctest_snippet(e.doc)
        if snippet:
            out.append((key, convo(question, answer, key + ":2", example_turn(snippet, key))))
    return out


# --- arithmetic -------------------------------------------------------------------------------------
PEOPLE = [("Ana", "she"), ("Ben", "he"), ("Chen", "he"), ("Dara", "she"), ("Eli", "he"), ("Fatima", "she"),
          ("Goran", "he"), ("Hana", "she"), ("Ivan", "he"), ("Jade", "she"), ("Kofi", "he"), ("Lena", "she"),
          ("Mateo", "he"), ("Noor", "she"), ("Omar", "he"), ("Priya", "she")]
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "stamps", "cards", "shells", "balloons"]


@dataclass(frozen=True)
class Problem:
    question: str
    expression: str    # uses + − × ÷ as written in the answer
    numbers: tuple     # every number of the question, in the order the expression uses them
    value: int

    @property
    def answer(self) -> str:
        return f"{self.expression} = {self.value}. The answer is {self.value}."


def _change(r) -> tuple[int, int, int]:
    a, b = r(2, 15), r(2, 6)
    return next(x for x in (20, 50, 100, 200) if x > a * b), a, b  # pays with the smallest note that covers it


def _shared(r) -> tuple[int, int, int]:
    c = r(2, 6)
    total = c * r(2, 12)
    a = r(1, total - 1)
    return a, total - a, c  # (a + b) divisible by c by construction


# (draw numbers, expression, value, question phrasings). Draws keep every answer a whole number >= 0;
# the value is computed separately from the expression so that the tests can check one against the other.
ARITHMETIC = [
    (lambda r: (r(2, 40), r(2, 9), r(2, 12)), "{0} + {1} × {2}", lambda a, b, c: a + b * c,
     ["{name} has {0} {item} and buys {1} bags of {2} {item}. How many {item} does {he} have now?",
      "{name} starts with {0} {item}. Then {he} gets {1} packs with {2} {item} in each. "
      "How many {item} does {he} have in total?"]),
    (lambda r: ((a := r(10, 99)), r(1, a - 1)), "{0} − {1}", lambda a, b: a - b,
     ["{name} had {0} {item} and gave {1} of them to {friend}. How many {item} are left?",
      "There are {0} {item} in a jar. {name} takes out {1}. How many {item} remain in the jar?"]),
    (lambda r: (r(2, 30), r(2, 15)), "{0} × {1}", lambda a, b: a * b,
     ["{name} reads {0} pages every day for {1} days. How many pages does {he} read?",
      "A shelf has {1} rows with {0} {item} in each row. How many {item} are on the shelf?"]),
    (lambda r: ((b := r(2, 9)) * r(2, 15), b), "{0} ÷ {1}", lambda a, b: a // b,
     ["{name} shares {0} {item} equally among {1} friends. How many {item} does each friend get?",
      "{0} {item} are packed into {1} boxes with the same number in each. How many {item} are in each box?"]),
    (lambda r: ((a := r(5, 60)), (b := r(2, 40)), r(1, a + b - 1)), "{0} + {1} − {2}", lambda a, b, c: a + b - c,
     ["{name} has {0} {item}, buys {1} more, and then gives {2} to {friend}. How many {item} does {he} have now?"]),
    (lambda r: (r(3, 12), r(2, 9), r(1, 9)), "{0} × {1} + {2}", lambda a, b, c: a * b + c,
     ["A box holds {0} {item}. {name} fills {1} boxes and has {2} {item} left over. "
      "How many {item} does {he} have altogether?"]),
    (lambda r: ((a := r(8, 25)), (b := r(2, 8)), r(1, a * b - 1)), "{0} × {1} − {2}", lambda a, b, c: a * b - c,
     ["{name} earns {0} dollars an hour and works {1} hours. Then {he} spends {2} dollars. "
      "How many dollars does {he} have left?"]),
    (_change, "{0} − {1} × {2}", lambda c, a, b: c - a * b,
     ["{name} buys {2} notebooks that cost {1} dollars each and pays with {0} dollars. "
      "How much change does {he} get?"]),
    (_shared, "({0} + {1}) ÷ {2}", lambda a, b, c: (a + b) // c,
     ["{name} has {0} {item} and {friend} has {1}. They put them together and share them equally among "
      "{2} children. How many {item} does each child get?"]),
]


def arithmetic_problem(rng: random.Random) -> Problem:
    """One word problem with its worked answer; the tests recompute ``value`` from the expression."""
    draw, expression, value, phrasings = rng.choice(ARITHMETIC)
    numbers = draw(lambda lo, hi: rng.randint(lo, hi))
    (name, he), item = rng.choice(PEOPLE), rng.choice(ITEMS)
    friend = rng.choice([p for p, _ in PEOPLE if p != name])
    question = rng.choice(phrasings).format(*numbers, name=name, he=he, item=item, friend=friend)
    return Problem(question, expression.format(*numbers), numbers, value(*numbers))


def arithmetic_problems(count: int, seed: int = 4096) -> list[Problem]:
    rng, seen, problems = random.Random(seed), set(), []
    while len(problems) < count:
        p = arithmetic_problem(rng)
        if p.question not in seen:
            seen.add(p.question)
            problems.append(p)
    return problems


def build(limit: int | None, arithmetic: int) -> list[tuple[str, list[dict]]]:
    items = topic_conversations(limit) + api_conversations(limit)
    items += [(f"math:{p.question}", convo(p.question, p.answer, f"math:{p.question}"))
              for p in arithmetic_problems(arithmetic)]
    unique, seen = [], set()
    for key, messages in items:
        line = json.dumps({"messages": messages}, ensure_ascii=False)
        if line not in seen:
            seen.add(line)
            unique.append((key, line))
    # A fixed pseudo-random order (by line hash) mixes the kinds, so a truncated file is still balanced.
    return sorted(unique, key=lambda item: hashlib.sha256(item[1].encode("utf-8")).digest())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=pathlib.Path, required=True, help="training JSONL")
    parser.add_argument("--heldout", type=pathlib.Path, required=True, help="held-out JSONL")
    parser.add_argument("--heldout-percent", type=float, default=3.0)
    parser.add_argument("--arithmetic", type=int, default=600, help="number of arithmetic word problems")
    parser.add_argument("--limit", type=int, default=None,
                        help="use only the first N topics, source modules and C modules (quick tests)")
    args = parser.parse_args()
    if not 0 < args.heldout_percent < 50 or args.arithmetic < 0 or (args.limit is not None and args.limit < 1):
        sys.exit("error: need 0 < --heldout-percent < 50, --arithmetic >= 0 and --limit >= 1")
    if args.output.resolve() == args.heldout.resolve():
        sys.exit("error: --output and --heldout must be different files")

    items = build(args.limit, args.arithmetic)
    train = [line for key, line in items if not corpus.is_heldout(key, args.heldout_percent)]
    held = [line for key, line in items if corpus.is_heldout(key, args.heldout_percent)]
    try:
        for path, lines in ((args.output, train), (args.heldout, held)):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    except OSError as e:
        sys.exit(f"error: cannot write output: {e}")
    kinds = collections.Counter(key.split(":")[0] + (" (two-turn)" if line.count('"role": "user"') > 1 else "")
                                for key, line in items)
    print(f"train: {len(train)} conversations -> {args.output}")
    print(f"heldout: {len(held)} conversations -> {args.heldout}")
    print("by source: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))


if __name__ == "__main__":
    main()
