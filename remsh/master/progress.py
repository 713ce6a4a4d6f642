"""Progress callbacks of transfers, called at a bounded rate."""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

#: ``progress(done_bytes, total_bytes)``; ``total_bytes`` is ``None`` while unknown
ProgressCallback = Callable[[int, Optional[int]], Any]

#: Least time between two calls of a ``progress`` callback (seconds).
PROGRESS_EVERY = 0.1


class Progress:
    """Calls a ``progress`` callback at most every :data:`PROGRESS_EVERY`
    seconds as bytes move, and once at the end (with the total)."""

    def __init__(self, callback: Optional[ProgressCallback], total: Optional[int]) -> None:
        self.callback = callback
        self.total = total
        self.done = 0
        self._next = 0.0

    def add(self, n: int) -> None:
        """``n`` more bytes moved."""
        self.done += n
        if self.callback is not None:
            now = time.monotonic()
            if now >= self._next:
                self._next = now + PROGRESS_EVERY
                self.callback(self.done, self.total)

    def finish(self) -> None:
        """The transfer is complete."""
        if self.callback is not None:
            self.callback(self.done, self.total if self.total is not None else self.done)
