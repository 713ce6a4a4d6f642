"""Many deadlines, one thread: :class:`Deadlines`.

A master may hold thousands of sessions whose connection is away at once (a
network outage, or a slave holding the shared secret that registers names
and drops them); a ``threading.Timer`` each would be a thread each.  One
:class:`Deadlines` per listener keeps them in a heap and calls each due
callback from its single thread.  :func:`call_later` falls back to a
``threading.Timer`` where no :class:`Deadlines` is given (one session in a
slave).

Callbacks run on the deadlines thread one after another: they must be short
and must not wait for another deadline.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Callable, List, Optional, Protocol, Tuple

log = logging.getLogger(__name__)


class Cancellable(Protocol):
    """What :func:`call_later` returns: ``cancel()`` stops a call not yet made."""

    def cancel(self) -> None: ...


class _Entry:
    __slots__ = ("fn", "cancelled")

    def __init__(self, fn: Callable[[], object]) -> None:
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Deadlines:
    """Calls ``fn`` at its time, from one thread for every deadline.

    The thread starts with the first deadline and ends when none is left (or
    at :meth:`stop`), so an owner with nothing pending holds no thread.
    """

    def __init__(self, name: str = "remsh-deadlines") -> None:
        self.name = name
        self._cond = threading.Condition()
        self._heap: List[Tuple[float, int, _Entry]] = []
        self._seq = itertools.count()
        self._thread: Optional[threading.Thread] = None

    def call_later(self, seconds: float, fn: Callable[[], object]) -> Cancellable:
        """Call ``fn()`` in ``seconds`` (monotonic clock); cancel with the result."""
        entry = _Entry(fn)
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + seconds, next(self._seq), entry))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            else:
                self._cond.notify()
        return entry

    def pending(self) -> int:
        """Deadlines not yet due nor cancelled."""
        with self._cond:
            return sum(1 for _, _, e in self._heap if not e.cancelled)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    while self._heap and self._heap[0][2].cancelled:
                        heapq.heappop(self._heap)
                    if not self._heap:
                        self._thread = None
                        return
                    when, _, entry = self._heap[0]
                    left = when - time.monotonic()
                    if left <= 0:
                        heapq.heappop(self._heap)
                        break
                    self._cond.wait(left)
            if entry.cancelled:
                continue
            try:
                entry.fn()
            except Exception:  # noqa: BLE001 - one callback must not stop the others
                log.exception("%s: a deadline's callback failed", self.name)

    def stop(self, timeout: float = 5.0) -> None:
        """Drop every pending deadline and end the thread (idempotent; a
        deadline given later starts it again)."""
        with self._cond:
            for _, _, entry in self._heap:
                entry.cancel()
            self._heap.clear()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)


def call_later(deadlines: Optional[Deadlines], seconds: float, fn: Callable[[], object]) -> Cancellable:
    """``fn()`` in ``seconds``: on ``deadlines`` when given, else on a timer thread of its own."""
    if deadlines is not None:
        return deadlines.call_later(seconds, fn)
    timer = threading.Timer(seconds, fn)
    timer.daemon = True
    timer.start()
    return timer
