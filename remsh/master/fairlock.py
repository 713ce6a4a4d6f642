"""A first-come, first-served lock: callers get it in the order they asked."""

from __future__ import annotations

import threading
import time
from typing import Optional


class FairLock:
    """Like ``threading.Lock`` but FIFO, and releasable from any thread.

    ``threading.Lock`` lets a late caller overtake one that has waited for
    long; operations on one slave must run in the order they were called.
    """

    def __init__(self) -> None:
        # the condition's lock, taken directly on the uncontended path
        # (``with self._mutex`` costs less than ``with self._cond``)
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._next = 0
        self._serving = 0
        self._abandoned: "set[int]" = set()
        self._waiters = 0

    def acquire(self, blocking: bool = True, timeout: Optional[float] = None) -> bool:
        """Take the lock; returns False if not blocking / timed out."""
        with self._mutex:
            ticket = self._next
            self._next = ticket + 1
            if ticket == self._serving:  # free: nobody holds it or waits
                return True
            if not blocking:
                self._next = ticket
                return False
            deadline = None if timeout is None else time.monotonic() + timeout
            self._waiters += 1
            try:
                return self._wait_for(ticket, deadline)
            except BaseException:
                # interrupted (e.g. KeyboardInterrupt) while queued: give the
                # turn back, or nobody would ever take it
                if self._serving == ticket:
                    self._serving += 1
                else:
                    self._abandoned.add(ticket)
                self._skip()
                raise
            finally:
                self._waiters -= 1

    def _wait_for(self, ticket: int, deadline: Optional[float]) -> bool:
        while self._serving != ticket:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                # give the ticket up: whoever reaches it skips it
                self._abandoned.add(ticket)
                self._skip()
                return False
            self._cond.wait(left)
        return True

    def _skip(self) -> None:
        while self._abandoned and self._serving in self._abandoned:
            self._abandoned.discard(self._serving)
            self._serving += 1
        if self._waiters:
            self._cond.notify_all()

    def release(self) -> None:
        with self._mutex:
            self._serving += 1
            if self._abandoned or self._waiters:
                self._skip()

    def locked(self) -> bool:
        with self._mutex:
            return self._next != self._serving

    def __enter__(self) -> "FairLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
