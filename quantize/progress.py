"""A tiny progress bar on stderr (tqdm is not a runtime dependency): tensors done / total and bytes written.

On a terminal the line is redrawn in place at most every 0.1 s; into a log (not a terminal) one line is printed
per 10% of the bytes, so logs stay short."""
from __future__ import annotations

import sys
import time
from typing import TextIO

_BAR_WIDTH = 24


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


class Progress:
    def __init__(self, total_items: int, total_bytes: int, label: str = "quantize", stream: TextIO | None = None,
                 enabled: bool = True, min_interval: float = 0.1):
        self.total_items, self.total_bytes = total_items, total_bytes
        self.items = self.nbytes = 0
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.min_interval = min_interval
        self._last_draw = 0.0
        self._last_decile = -1
        self._start = time.monotonic()

    def advance(self, items: int = 0, nbytes: int = 0) -> None:
        self.items += items
        self.nbytes += nbytes
        if not self.enabled:
            return
        if self.tty:
            now = time.monotonic()
            if now - self._last_draw >= self.min_interval:
                self._last_draw = now
                self.stream.write("\r" + self._line())
                self.stream.flush()
        else:
            decile = int(10 * self.nbytes / max(self.total_bytes, 1))
            if decile > self._last_decile and self.nbytes < self.total_bytes:
                self._last_decile = decile
                self.stream.write(self._line() + "\n")

    def close(self) -> None:
        if self.enabled:
            self.stream.write(("\r" if self.tty else "") + self._line() + "\n")
            self.stream.flush()

    def _line(self) -> str:
        fraction = self.nbytes / self.total_bytes if self.total_bytes else 1.0
        filled = int(_BAR_WIDTH * fraction)
        bar = "#" * filled + "." * (_BAR_WIDTH - filled)
        elapsed = time.monotonic() - self._start
        return (f"{self.label} [{bar}] {100 * fraction:3.0f}%  {self.items}/{self.total_items} tensors  "
                f"{format_bytes(self.nbytes)}/{format_bytes(self.total_bytes)}  {elapsed:.0f}s")
