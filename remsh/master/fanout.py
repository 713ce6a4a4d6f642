"""Run one operation on many slaves at once: :func:`fan_out`.

A bounded pool of worker threads takes the slaves in order.  Each slave's
result or exception is kept separately, so one failure never hides another.
An overall ``timeout`` or a :class:`Cancellation` stops the fan-out: slaves
not yet started get :class:`~remsh.errors.Cancelled`, running commands are
interrupted (again every :data:`REINTERRUPT` seconds, for an operation that
reached its command only after the first interrupt), a slave that is away
has its session ended at once, and a slave whose operation still has not
returned after ``grace`` seconds has its connection dropped, so the call
always returns in bounded time.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Generic, List, Optional, Sequence, TypeVar

from remsh.errors import Cancelled
from remsh.master.slave import Slave

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MAX_WORKERS = 32
DEFAULT_GRACE = 10.0
#: How often a cancelled fan-out interrupts what still runs during the grace.
REINTERRUPT = 0.25


class Outcome(Generic[T]):
    """What happened on one slave: ``value`` or ``error``, and how long it took."""

    __slots__ = ("slave", "value", "error", "started", "finished")

    def __init__(self, slave: Slave) -> None:
        self.slave = slave
        self.value: Optional[T] = None
        self.error: Optional[BaseException] = None
        self.started: Optional[float] = None
        self.finished: Optional[float] = None

    @property
    def ok(self) -> bool:
        """True when the operation returned without raising."""
        return self.finished is not None and self.error is None

    @property
    def duration(self) -> Optional[float]:
        if self.started is None or self.finished is None:
            return None
        return self.finished - self.started

    def result(self) -> T:
        """The value, or raise the slave's exception."""
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]

    def __repr__(self) -> str:
        state = "ok" if self.ok else f"error={self.error!r}"
        return f"<Outcome {self.slave.name} {state}>"


class Cancellation:
    """A handle to cancel a running :func:`fan_out` from another thread."""

    def __init__(self) -> None:
        #: notified on cancel and whenever a fan-out using it finishes a slave
        self.cond = threading.Condition()
        self._cancelled = False
        self.reason = "cancelled"

    def cancel(self, reason: str = "cancelled") -> None:
        with self.cond:
            if not self._cancelled:
                self.reason = reason
                self._cancelled = True
            self.cond.notify_all()

    @property
    def cancelled(self) -> bool:
        return self._cancelled


def fan_out(slaves: Sequence[Slave], operation: Callable[[Slave], T], *,
            max_workers: int = DEFAULT_MAX_WORKERS, timeout: Optional[float] = None,
            cancellation: Optional[Cancellation] = None, grace: float = DEFAULT_GRACE) -> List[Outcome[T]]:
    """Call ``operation(slave)`` for every slave, at most ``max_workers`` at once.

    Returns one :class:`Outcome` per slave, in the order given.  Never raises
    for a slave's failure: look at each outcome's ``error``.  With
    ``timeout`` (seconds, for the whole fan-out) or a ``cancellation`` that
    fires, unstarted slaves get :class:`~remsh.errors.Cancelled` and running
    commands are interrupted (see module docstring).

    Example::

        outcomes = fan_out(collection.get_all_slaves(),
                           lambda s: s.execute(["make", "test"]), max_workers=50)
        failed = [o.slave.name for o in outcomes if not (o.ok and o.value == 0)]
    """
    if max_workers < 1:
        raise ValueError("max_workers must be at least 1")
    cancellation = cancellation or Cancellation()
    outcomes: List[Outcome[T]] = [Outcome(s) for s in slaves]
    lock = threading.Lock()
    next_index = 0
    running: "set[Outcome[T]]" = set()
    all_done = threading.Event()
    remaining = len(outcomes)
    if not remaining:
        return outcomes

    def finish(outcome: Outcome[T]) -> None:
        nonlocal remaining
        outcome.finished = time.monotonic()
        with lock:
            running.discard(outcome)
            remaining -= 1
            if remaining == 0:
                all_done.set()
        with cancellation.cond:
            cancellation.cond.notify_all()

    def worker() -> None:
        nonlocal next_index
        while True:
            with lock:
                if next_index >= len(outcomes):
                    return
                outcome = outcomes[next_index]
                next_index += 1
                if cancellation.cancelled:
                    outcome.error = Cancelled(f"{outcome.slave.name}: {cancellation.reason} before it started")
                    outcome.started = time.monotonic()
                else:
                    outcome.started = time.monotonic()
                    running.add(outcome)
            if outcome.error is None:
                try:
                    outcome.value = operation(outcome.slave)
                except BaseException as e:  # noqa: BLE001 - kept per slave
                    outcome.error = e
            finish(outcome)

    threads = [threading.Thread(target=worker, name=f"remsh-fanout-{i}", daemon=True)
               for i in range(min(max_workers, len(outcomes)))]
    for t in threads:
        t.start()
    with cancellation.cond:
        finished = cancellation.cond.wait_for(
            lambda: all_done.is_set() or cancellation.cancelled, timeout)
    if not finished:
        cancellation.cancel(f"fan-out timed out after {timeout:g} s")
    if not all_done.is_set():
        # one deadline for the whole wind-down: at most 2 * grace after the
        # cancellation, however many threads are stuck
        end = time.monotonic() + 2 * grace
        _stop_running(running, lock, all_done, grace)
        for t in threads:
            t.join(max(0.0, end - time.monotonic()))
    for outcome in outcomes:
        if outcome.finished is None:  # a worker that never came back
            outcome.error = Cancelled(f"{outcome.slave.name}: {cancellation.reason}; did not stop in time")
            outcome.finished = time.monotonic()
    return outcomes


def _stop_running(running: "set[Outcome[T]]", lock: threading.Lock, all_done: threading.Event,
                  grace: float) -> None:
    """Interrupt what runs (an interrupt that comes before a command starts is
    delivered with its request), and again every :data:`REINTERRUPT` seconds
    for an operation that registered its command only after the first one;
    a slave that is away has its session ended at once (nothing can reach
    it now; its command is killed when it comes back).  After ``grace``,
    drop the connections of the slaves still busy and wait ``grace`` again
    at most."""
    end = time.monotonic() + grace
    while True:
        with lock:
            busy = [o.slave for o in running]
        for slave in busy:
            if slave.resumable and not slave.connected:
                log.info("slave %s is away: ending its session to stop its work", slave.name)
                slave.close()
            else:
                slave.interrupt()
        left = end - time.monotonic()
        if all_done.wait(max(0.0, min(REINTERRUPT, left))):
            return
        if left <= REINTERRUPT:
            break
    with lock:
        stuck = [o.slave for o in running]
    for slave in stuck:
        log.warning("slave %s did not stop within %g s; dropping its connection", slave.name, grace)
        slave.close()
    all_done.wait(grace)
