"""Transfer progress on the terminal: a bar per slave and one for the total.

Used by :class:`remsh.fleet.Renderer` for ``remsh put`` and ``remsh get``
(and ``remsh job`` of a transfer): on a terminal the bars are redrawn in
place at most ten times a second; piped, nothing is drawn.
"""

from __future__ import annotations

import threading
import time
from typing import Dict, List, Optional, TextIO

from remsh.lineprinter import printable


def human_bytes(n: float) -> str:
    """``1.5 MiB`` and the like."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop returns


def _eta(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class ProgressBars:
    """Transfer progress per slave and in total.

    On a terminal: one bar per slave and a total line, redrawn in place at
    most ten times a second (bytes, rate, ETA when the size is known).
    Otherwise (``tty`` false): nothing until a slave ends, then one plain
    line (the caller's).
    """

    BAR = 24
    EVERY = 0.1

    def __init__(self, out: TextIO, tty: bool) -> None:
        self.out = out
        self.tty = tty
        self._lock = threading.Lock()
        self._names: List[str] = []
        self._done: Dict[str, int] = {}
        self._total: Dict[str, Optional[int]] = {}
        self._ended: Dict[str, float] = {}
        self._drawn = 0
        self._last = 0.0
        self._t0 = time.monotonic()

    def begin(self, names: List[str]) -> None:
        with self._lock:
            self._names = list(names)
            self._t0 = time.monotonic()

    def update(self, name: str, done: int, total: Optional[int]) -> None:
        with self._lock:
            self._done[name] = done
            self._total[name] = total
            now = time.monotonic()
            if self.tty and now - self._last >= self.EVERY:
                self._last = now
                self._draw()

    def ended(self, name: str) -> None:
        with self._lock:
            self._ended[name] = time.monotonic()
            if self.tty:
                self._draw()

    def clear(self) -> None:
        """Take the bars off the screen (before other text is printed)."""
        if self.tty and self._drawn:
            self.out.write(f"\033[{self._drawn}F\033[J")
            self._drawn = 0
            self.out.flush()

    def finish(self) -> None:
        """Draw the final state and leave it on the screen."""
        with self._lock:
            if self.tty:
                self._draw()
                self._drawn = 0

    def line(self, label: str, done: int, total: Optional[int], elapsed: float, finished: bool) -> str:
        """One line: bar, bytes, rate, ETA."""
        rate = done / elapsed if elapsed > 0 else 0.0
        if total:
            frac = min(1.0, done / total)
            fill = int(frac * self.BAR)
            bar = "#" * fill + "-" * (self.BAR - fill)
            amount = f"{human_bytes(done)} / {human_bytes(total)} {frac * 100:3.0f}%"
        else:
            bar = ("#" if finished else "?") * self.BAR
            amount = human_bytes(done)
        text = f"{label} [{bar}] {amount} {human_bytes(rate)}/s"
        if finished:
            text += " done"
        elif total and rate > 0 and done < total:
            text += f" ETA {_eta((total - done) / rate)}"
        return text

    def _draw(self) -> None:
        shown = {name: printable(name) for name in self._names}
        width = max((len(n) for n in shown.values()), default=5)
        width = max(width, 5)
        now = time.monotonic()
        lines = []
        for name in self._names:
            start = self._t0
            end = self._ended.get(name, now)
            lines.append(self.line(shown[name].ljust(width), self._done.get(name, 0), self._total.get(name),
                                   end - start, name in self._ended))
        totals = [self._total.get(n) for n in self._names]
        total: Optional[int] = sum(t for t in totals if t is not None) if all(t is not None for t in totals) \
            else None
        finished = len(self._ended) >= len(self._names)
        lines.append(self.line("total".ljust(width), sum(self._done.values()), total, now - self._t0, finished))
        up = f"\033[{self._drawn}F" if self._drawn else ""
        self.out.write(up + "".join(line + "\033[K\n" for line in lines))
        self.out.flush()
        self._drawn = len(lines)
