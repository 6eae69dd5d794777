"""JSONL files that survive being killed: each record is one line written whole and flushed, a reader drops a
torn last line, and a stage reopening its file learns which ids it already holds so a rerun only adds the rest."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable


def stable_id(*parts) -> str:
    """A short content hash: the same parts (JSON-serializable) give the same id on every machine and run.
    16 hex digits (64 bits): a collision among 3 million records has a chance of about 2e-7."""
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _drop_torn_tail(path: str) -> None:
    """Cut a last line that has no newline: a run killed mid-write leaves one, and appending after it would glue
    the next record onto garbage."""
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


def read_jsonl(path: str) -> list[dict]:
    """All whole records of a file (none when it does not exist); a torn last line is ignored."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith("\n"):
                break  # torn by a kill; the next open for append cuts it
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not a JSON line ({e.msg})") from None
    return records


class JsonlAppender:
    """Appends records to a stage's file. `existing` holds the records already there (after dropping a torn tail),
    `new` those written since, `ids` the keys of both, so the stage can skip them."""

    def __init__(self, path: str, key: str = "id"):
        self.path = path
        self.key = key
        if os.path.exists(path):
            _drop_torn_tail(path)
        self.existing = read_jsonl(path)
        for number, record in enumerate(self.existing, 1):
            # A JSON line without the key (a file some other tool wrote) was a KeyError traceback; name the file.
            if not isinstance(record, dict) or key not in record:
                raise ValueError(f"{path}: record {number} has no {key!r}: not a file `n4-train sdg` wrote (use "
                                 f"another --output)")
        self.ids = {r[key] for r in self.existing}
        self.new: list[dict] = []
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        # One write() of the whole line, then flush: a kill loses at most the records still in flight.
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        self.ids.add(record[self.key])
        self.new.append(record)

    @property
    def written(self) -> int:
        return len(self.new)

    @property
    def records(self) -> list[dict]:
        return self.existing + self.new

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_jsonl_atomic(path: str, records: Iterable[dict]) -> int:
    """Replace a derived file (filtered, pairs) in one rename, so a reader never sees half of it."""
    tmp = path + ".tmp"
    count = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    os.replace(tmp, path)
    return count


def write_json_atomic(path: str, value) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def by_key(records: Iterable[dict], key: str) -> dict[str, list[dict]]:
    """Group records by one field (e.g. responses by prompt_id), keeping file order inside each group."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r[key], []).append(r)
    return groups
