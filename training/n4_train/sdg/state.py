"""What the stages share during one run: the config, the generator client, the failures to report, and a helper
that runs many coroutines under a progress bar."""
from __future__ import annotations

import asyncio
import random
import sys
from dataclasses import dataclass, field
from typing import Awaitable, Iterable

from tqdm import tqdm

from n4_train.sdg.client import ApiClient
from n4_train.sdg.config import SDGConfig
from n4_train.sdg.records import stable_id

FAILURES_KEPT = 200  # summary.json lists this many failed requests in full; the count covers all of them


@dataclass
class RunState:
    config: SDGConfig
    generator: ApiClient
    model: str
    failures: list[dict] = field(default_factory=list)
    failure_counts: dict[str, int] = field(default_factory=dict)  # stage -> requests failed this run
    notes: dict[str, dict[str, int]] = field(default_factory=dict)  # stage -> counters of this run

    def fail(self, stage: str, record_id: str, error: Exception) -> None:
        """A request that failed for good: counted and kept for the summary; its record is simply not written, so
        a rerun tries it again."""
        self.failure_counts[stage] = self.failure_counts.get(stage, 0) + 1
        if len(self.failures) < FAILURES_KEPT:
            self.failures.append({"stage": stage, "id": record_id, "error": str(error)})

    def note(self, stage: str, key: str, amount: int = 1) -> None:
        counters = self.notes.setdefault(stage, {})
        counters[key] = counters.get(key, 0) + amount

    def seed_for(self, *parts) -> int:
        """A request seed derived from the run seed and what the request is for: reruns ask the same question with
        the same seed, and different requests never share one."""
        return int(stable_id(self.config.seed, *parts)[:8], 16)

    def rng(self, *parts) -> random.Random:
        return random.Random(stable_id(self.config.seed, *parts))


async def run_all(coroutines: Iterable[Awaitable], total: int, desc: str) -> None:
    """Await all, updating a progress bar as each finishes (shown only on a terminal). The concurrency cap lives in
    the clients' semaphores, so scheduling everything at once is fine."""
    bar = tqdm(total=total, desc=desc, unit="req", disable=not sys.stderr.isatty(), leave=False)
    try:
        for finished in asyncio.as_completed(list(coroutines)):
            await finished
            bar.update(1)
    finally:
        bar.close()
