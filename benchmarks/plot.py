"""Latency-vs-load plots for `n4 bench serve --sweep`: a dependency-free PNG writer (matplotlib is not in the
runtime install), four panels (TTFT, TPOT, ITL, E2E) with p50 and p99 against the load points."""
from __future__ import annotations

import itertools
import math
import zlib

_GLYPHS = dict(zip("0123456789.-/=:() ABCDEFGHIJKLMNOPQRSTUVWXYZ", (
    "75557 26227 71747 71717 55711 74717 74757 71111 75757 75717 00002 00700 11244 07070 02020 12221 42224 00000 "
    "25755 65656 34443 65556 74647 74644 34553 55755 72227 11152 55655 44447 57755 65555 25552 65644 25563 65655 "
    "34216 72222 55557 55552 55775 55255 55222 71247").split()))
_BLACK, _GREY, _BLUE, _RED = (0, 0, 0), (200, 200, 200), (31, 119, 180), (214, 39, 40)


class _Canvas:
    def __init__(self, width: int, height: int):
        self.w, self.h = width, height
        self.px = bytearray(b"\xff" * (width * height * 3))

    def dot(self, x: int, y: int, color, size: int = 1) -> None:
        for yy in range(y, y + size):
            for xx in range(x, x + size):
                if 0 <= xx < self.w and 0 <= yy < self.h:
                    self.px[(yy * self.w + xx) * 3:(yy * self.w + xx) * 3 + 3] = bytes(color)

    def line(self, x0, y0, x1, y1, color, size: int = 1) -> None:
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(steps + 1):
            self.dot(round(x0 + (x1 - x0) * i / steps), round(y0 + (y1 - y0) * i / steps), color, size)

    def text(self, x: int, y: int, s: str, color=_BLACK, scale: int = 2) -> None:
        for k, ch in enumerate(s.upper()):
            for row, bits in enumerate(_GLYPHS.get(ch, "00000")):
                for col in range(3):
                    if int(bits) >> (2 - col) & 1:
                        self.dot(x + (4 * k + col) * scale, y + row * scale, color, scale)

    def png(self) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

        rows = b"".join(b"\x00" + bytes(self.px[y * self.w * 3:(y + 1) * self.w * 3]) for y in range(self.h))
        header = self.w.to_bytes(4, "big") + self.h.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])  # 8-bit RGB
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9)) + \
            chunk(b"IEND", b"")


def write_plot(path: str, runs: list[dict], kind: str) -> None:
    """2x2 panels (TTFT, TPOT, ITL, E2E in ms): p50 in blue, p99 in red, against the load points, evenly spaced."""
    pw, ph, top = 420, 280, 40
    canvas = _Canvas(2 * pw, 2 * ph + top)
    canvas.text(10, 10, f"LATENCY VS {kind.replace('_', ' ')}:", scale=3)
    canvas.text(10 + 4 * 3 * (len(kind) + 13), 10, "P50", _BLUE, 3)
    canvas.text(10 + 4 * 3 * (len(kind) + 17), 10, "P99", _RED, 3)
    loads = [r[kind] for r in runs]
    for i, metric in enumerate(("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")):
        _panel(canvas, (i % 2) * pw, top + (i // 2) * ph, pw, ph, metric, loads, runs)
    with open(path, "wb") as f:
        f.write(canvas.png())


def _panel(c: _Canvas, x0: int, y0: int, w: int, h: int, metric: str, loads: list, runs: list[dict]) -> None:
    left, right, bottom, upper = x0 + 70, x0 + w - 20, y0 + h - 40, y0 + 30
    series = {q: [r[metric][q] for r in runs] for q in ("p50", "p99")}
    top_value = max([v for vs in series.values() for v in vs if v is not None] or [1.0]) * 1.1
    c.text(x0 + 70, y0 + 8, metric.replace("_", " "))
    c.line(left, upper, left, bottom, _BLACK)
    c.line(left, bottom, right, bottom, _BLACK)
    for t in range(5):  # y ticks and grid
        y = bottom - (bottom - upper) * t // 4
        c.line(left + 1, y, right, y, _GREY)
        c.text(x0 + 4, y - 4, f"{top_value * t / 4:.3g}")
    xs = [left + (right - left) * (k + 1) // (len(loads) + 1) for k in range(len(loads))]
    for x, load in zip(xs, loads):
        c.text(x - 8, bottom + 8, "INF" if load is None or load == math.inf else f"{load:g}")
    for q, color in (("p50", _BLUE), ("p99", _RED)):
        points = [(x, bottom - round((bottom - upper) * v / top_value)) for x, v in zip(xs, series[q]) if v is not None]
        for a, b in itertools.pairwise(points):
            c.line(*a, *b, color, 2)
        for x, y in points:
            c.dot(x - 2, y - 2, color, 5)
