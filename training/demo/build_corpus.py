"""Build the demo model's pretraining corpus from CPython's own documentation: offline, PSF licence.

Sources, both shipped with the interpreter running this script (Python Software Foundation License v2):
    * ``pydoc_data.topics``: the Language Reference topics behind ``help("with")`` (the tokenizer's text);
    * standard-library docstrings: modules, classes, functions and methods of every stdlib ``.py`` file,
      read with ``ast`` (never imported, so no module code runs), plus a fixed list of built-in C modules
      (``builtins``, ``math``, ...) that have no source; importing those has no side effects.
Output (``--output-dir``): ``train.txt`` and ``heldout.txt``, documents each followed by a line holding only
``<|endoftext|>`` (``read_documents`` splits them); a document is one topic, one module (docstring and
functions) or one class (docstring and methods). Held-out documents (~4%) are chosen by a SHA-256 of the
title, so the split is stable and never overlaps. ``SOURCES.md`` says what the text is and its licence.
The same interpreter gives the same bytes.

Run: ``.venv/bin/python training/demo/build_corpus.py --output-dir /tmp/n4-demo-data/corpus``
"""

from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import importlib
import inspect
import pathlib
import platform
import re
import sys
import sysconfig
import time
import tokenize
from dataclasses import dataclass

REPO = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_TOKENIZER = REPO / "models" / "demo" / "tokenizer.model"
DOC_END = "<|endoftext|>"
# Tests, GUI code and third-party packages are not documentation we want; `encodings` is hundreds of
# near-identical codec stubs; `pydoc_data` is the topics source, taken separately.
SKIP_DIRS = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "site-packages",
             "__pycache__", "ensurepip", "encodings", "pydoc_data", "lib-dynload"}
# C modules worth documenting -> the module name users write (e.g. `posix` is what `os` re-exports).
BUILTIN_MODULES = {"builtins": "builtins", "math": "math", "cmath": "cmath", "itertools": "itertools",
                   "sys": "sys", "time": "time", "gc": "gc", "posix": "os", "_collections": "collections",
                   "_functools": "functools", "_struct": "struct", "_io": "io", "array": "array",
                   "binascii": "binascii", "zlib": "zlib", "unicodedata": "unicodedata"}
HELDOUT_PERCENT = 4.0  # share of documents held out (by title hash); benchmarks/perplexity.py reads the same split
MIN_DOC_CHARS = 100  # shorter documents are mostly a lone "Constants for X." line


@dataclass(frozen=True)
class Entry:
    """One docstring of the standard library."""
    module: str     # as users import it: "json", "os", "builtins"
    qualname: str   # "" for the module docstring, "dumps", "JSONEncoder", "JSONEncoder.encode"
    kind: str       # "module" | "class" | "function" | "method" | "property"
    signature: str  # "(obj, *, skipkeys=False)", or "" when unknown
    doc: str        # cleaned docstring

    @property
    def name(self) -> str:
        """The dotted name as written in code: "json.dumps", but "len" rather than "builtins.len"."""
        if self.module == "builtins" and self.qualname:
            return self.qualname
        return f"{self.module}.{self.qualname}" if self.qualname else self.module


def clean_text(text: str) -> str:
    """Normalise newlines and tabs, drop control characters and trailing spaces, squeeze blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(8)
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text)
    text = "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")
    return re.sub(r"\n{3,}", "\n\n", text)


def topic_documents(limit: int | None = None) -> list[tuple[str, str]]:
    """(title, text) for each Language Reference topic, in sorted topic order."""
    from pydoc_data.topics import topics
    return [(f"topic:{key}", clean_text(topics[key])) for key in sorted(topics)[:limit]]


def source_modules(root: pathlib.Path) -> list[tuple[str, pathlib.Path]]:
    """(dotted module name, path) for every stdlib source file we document, sorted by path."""
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts[-1] == "__main__" or parts[-1].startswith("_sysconfigdata"):
            continue
        found.append((".".join(parts), path))
    return found


def _defs(body: list[ast.stmt]):
    """Functions and classes of a body, including those inside if/try blocks (platform variants)."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node
        elif isinstance(node, ast.If):
            yield from _defs(node.body)
            yield from _defs(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from _defs(block)


def _ast_signature(node: ast.FunctionDef | ast.AsyncFunctionDef, method: bool) -> str:
    args = node.args
    static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in node.decorator_list)
    if method and not static:  # drop self/cls: callers never write it
        args = copy.copy(args)
        if args.posonlyargs:
            args.posonlyargs = args.posonlyargs[1:]
        elif args.args:
            args.args = args.args[1:]
    return f"({ast.unparse(args)})"


def _is_property(node) -> bool:
    return any(isinstance(d, ast.Name) and d.id in ("property", "cached_property") or
               isinstance(d, ast.Attribute) and d.attr in ("setter", "getter", "deleter", "cached_property")
               for d in node.decorator_list)


def _wanted(name: str, method: bool) -> bool:
    """Public names; for methods also dunders like __init__, whose docstrings are real documentation."""
    if method and name.startswith("__") and name.endswith("__"):
        return True
    return not name.startswith("_")


def entries_from_source(module: str, source: str) -> list[Entry]:
    tree = ast.parse(source)
    entries, seen = [], set()

    def add(qualname: str, kind: str, signature: str, node) -> None:
        doc = ast.get_docstring(node)
        if qualname not in seen and (doc or kind == "class"):  # keep classes: their methods hang off them
            seen.add(qualname)
            entries.append(Entry(module, qualname, kind, signature, clean_text(doc or "")))

    add("", "module", "", tree)
    for node in _defs(tree.body):
        if not _wanted(node.name, method=False):
            continue
        if isinstance(node, ast.ClassDef):
            add(node.name, "class", "", node)
            for sub in _defs(node.body):
                if isinstance(sub, ast.ClassDef) or not _wanted(sub.name, method=True):
                    continue
                if _is_property(sub):
                    add(f"{node.name}.{sub.name}", "property", "", sub)
                else:
                    add(f"{node.name}.{sub.name}", "method", _ast_signature(sub, True), sub)
        else:
            add(node.name, "function", _ast_signature(node, False), node)
    return entries


def _c_signature(obj, method: bool) -> str:
    try:
        sig = inspect.signature(obj)
    except (ValueError, TypeError):  # many C callables carry no __text_signature__
        return ""
    params = list(sig.parameters.values())
    if method and params and params[0].name in ("self", "cls", "type"):
        sig = sig.replace(parameters=params[1:])
    return str(sig)


def entries_from_builtin(import_name: str, shown: str) -> list[Entry]:
    mod = importlib.import_module(import_name)
    entries = []
    for name, obj in sorted(vars(mod).items()):
        # Only what the module defines itself (not re-exports), and only callables and classes.
        if name.startswith("_") or getattr(obj, "__module__", None) not in (import_name, shown):
            continue
        if isinstance(obj, type):
            entries.append(Entry(shown, name, "class", "", clean_text(inspect.cleandoc(obj.__doc__ or ""))))
            for mname, member in sorted(vars(obj).items()):
                doc = getattr(member, "__doc__", None)
                if not mname.startswith("_") and callable(member) and isinstance(doc, str) and doc.strip():
                    entries.append(Entry(shown, f"{name}.{mname}", "method", _c_signature(member, True),
                                         clean_text(inspect.cleandoc(doc))))
        elif callable(obj) and isinstance(obj.__doc__, str) and obj.__doc__.strip():
            entries.append(Entry(shown, name, "function", _c_signature(obj, False),
                                 clean_text(inspect.cleandoc(obj.__doc__))))
    return entries


def stdlib_entries(limit: int | None = None) -> list[Entry]:
    """Every docstring we use, in a fixed order: source modules by path, then the C modules."""
    entries = []
    for module, path in source_modules(pathlib.Path(sysconfig.get_paths()["stdlib"]))[:limit]:
        with tokenize.open(path) as f:  # honours PEP 263 coding cookies
            source = f.read()
        try:
            entries += entries_from_source(module, source)
        except SyntaxError:  # not expected in a released stdlib; skip rather than fail the build
            print(f"note: cannot parse {path}; skipped", file=sys.stderr)
    for import_name, shown in list(BUILTIN_MODULES.items())[:limit]:
        entries += entries_from_builtin(import_name, shown)
    return entries


def _heading(text: str) -> str:
    return f"{text}\n{'*' * len(text)}"


def docstring_documents(entries: list[Entry]) -> list[tuple[str, str]]:
    """Group entries into one document per module (module-level functions) and per class (methods).

    A docstring already used elsewhere (``_pydecimal`` vs ``decimal``, inherited boilerplate) is kept
    only the first time: repeats teach the model nothing and would leak into the held-out split."""
    groups: dict[str, list[Entry]] = {}
    for e in entries:
        cls = e.qualname.split(".")[0] if e.kind in ("class", "method", "property") else ""
        groups.setdefault(f"{e.module}.{cls}" if cls else e.module, []).append(e)
    seen_docs, docs = set(), []
    for title, group in groups.items():
        is_class = group[0].kind in ("class", "method", "property")
        shown = group[0].name.split(".")[0] if group[0].module == "builtins" and is_class else title
        parts = [_heading(f"{'Class' if is_class else 'Module'} {shown}")]
        for e in group:
            if not e.doc or e.doc in seen_docs:
                continue
            seen_docs.add(e.doc)
            if e.kind in ("module", "class"):
                parts.append(e.doc)
            else:
                body = "\n".join(f"    {line}" if line else "" for line in e.doc.split("\n"))
                call = "" if e.kind == "property" else e.signature or "(...)"
                parts.append(f"{e.name}{call}\n{body}")
        text = "\n\n".join(parts)
        if len(parts) > 1 and len(text) >= MIN_DOC_CHARS:
            docs.append((title, text))
    return docs


def is_heldout(title: str, percent: float) -> bool:
    """Stable across runs and machines (unlike hash()): the first 8 bytes of SHA-256 of the title."""
    h = int.from_bytes(hashlib.sha256(title.encode("utf-8")).digest()[:8], "big")
    return h % 10_000 < round(percent * 100)


def build(limit: int | None = None) -> list[tuple[str, str]]:
    """All documents, topics first, with exact duplicates (after the heading) removed."""
    docs, bodies = [], set()
    for title, text in topic_documents(limit) + docstring_documents(stdlib_entries(limit)):
        body = text.split("\n", 2)[-1]
        if DOC_END in text or body in bodies:  # the delimiter must never occur inside a document
            continue
        bodies.add(body)
        docs.append((title, text))
    return docs


def write_documents(path: pathlib.Path, texts: list[str]) -> None:
    path.write_text("".join(f"{t}\n{DOC_END}\n" for t in texts), encoding="utf-8")


def read_documents(path: pathlib.Path) -> list[str]:
    """The documents of a train.txt/heldout.txt, without delimiters."""
    text = path.read_text(encoding="utf-8")
    return [d for d in text.split(f"\n{DOC_END}\n") if d]


SOURCES_MD = """# Demo pretraining corpus: sources and licence

Built by `training/demo/build_corpus.py` from CPython {version}'s own files; nothing was downloaded.

* Python Language Reference topics (`pydoc_data.topics`, the text behind `help("with")`): {topics} documents.
* Standard-library docstrings of the `.py` modules (read with `ast`; tests, `idlelib`, `tkinter`, `turtledemo`,
  `lib2to3`, `encodings`, `site-packages` skipped) and of the C modules {builtins}: {docstrings} documents.

Licence: CPython and its documentation are distributed under the **Python Software Foundation License
Version 2** (`LICENSE.txt` in the standard library directory; https://docs.python.org/3/license.html), which
permits use, modification and redistribution. Copyright (c) 2001-2023 Python Software Foundation.

`train.txt`: {train_docs} documents, sha256 `{train_sha}`; `heldout.txt`: {held_docs} documents, sha256
`{held_sha}`. Each document is followed by a line holding only `{doc_end}`; held-out documents are the
{percent}% whose title hashes lowest (SHA-256), whole documents that never overlap train.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=pathlib.Path, required=True)
    parser.add_argument("--tokenizer", type=pathlib.Path, default=DEFAULT_TOKENIZER,
                        help="SentencePiece model used to count tokens (default: models/demo/tokenizer.model)")
    parser.add_argument("--heldout-percent", type=float, default=HELDOUT_PERCENT)
    parser.add_argument("--limit", type=int, default=None,
                        help="use only the first N topics, source modules and C modules (quick tests)")
    args = parser.parse_args()
    if not 0 < args.heldout_percent < 50 or (args.limit is not None and args.limit < 1):
        sys.exit("error: need 0 < --heldout-percent < 50 and --limit >= 1")
    if not args.tokenizer.is_file():
        sys.exit(f"error: tokenizer not found: {args.tokenizer}")
    import sentencepiece as spm

    start = time.monotonic()
    docs = build(args.limit)
    train = [text for title, text in docs if not is_heldout(title, args.heldout_percent)]
    held = [text for title, text in docs if is_heldout(title, args.heldout_percent)]
    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        write_documents(args.output_dir / "train.txt", train)
        write_documents(args.output_dir / "heldout.txt", held)
    except OSError as e:
        sys.exit(f"error: cannot write to {args.output_dir}: {e}")
    sp = spm.SentencePieceProcessor(model_file=str(args.tokenizer))
    stats = {}
    for split, texts in (("train", train), ("heldout", held)):
        tokens = sum(len(ids) for ids in sp.encode(texts)) if texts else 0
        stats[split] = (len(texts), sum(map(len, texts)), tokens)
        print(f"{split}: {len(texts)} documents, {stats[split][1]:,} characters, {tokens:,} tokens")
    n_topics = sum(title.startswith("topic:") for title, _ in docs)
    sha = {name: hashlib.sha256((args.output_dir / name).read_bytes()).hexdigest()
           for name in ("train.txt", "heldout.txt")}
    (args.output_dir / "SOURCES.md").write_text(SOURCES_MD.format(
        version=platform.python_version(), topics=n_topics, docstrings=len(docs) - n_topics,
        builtins=", ".join(f"`{m}`" for m in list(BUILTIN_MODULES)[:args.limit]),
        train_docs=len(train), train_sha=sha["train.txt"], held_docs=len(held), held_sha=sha["heldout.txt"],
        doc_end=DOC_END, percent=args.heldout_percent), encoding="utf-8")
    print(f"total: {len(docs)} documents ({n_topics} topics), "
          f"{stats['train'][1] + stats['heldout'][1]:,} characters, "
          f"{stats['train'][2] + stats['heldout'][2]:,} tokens; wrote {args.output_dir} "
          f"in {time.monotonic() - start:.1f}s")


if __name__ == "__main__":
    main()
