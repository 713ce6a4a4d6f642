"""Group commit of the PostgreSQL job store's writes (:mod:`remsh.store.postgres`).

A master writes through one connection (a :class:`~remsh.store.pglink.Link`).
Each write alone would be its own transaction: the fence check on the
master's row, the write, ``NOTIFY``, ``COMMIT`` -- several round trips
and a commit for a write of a few hundred bytes, one after the other for
every slave of a job.  Here the writes that arrive while a transaction runs
wait, and go together in the next one (:class:`GroupCommit`): one fence
check (``FOR SHARE`` on the master's row), the writes in turn, one
announcement (``nextval`` of the change sequence and ``NOTIFY``), one
``COMMIT``; at most :data:`MAX_WRITES` writes or :data:`MAX_BYTES` bytes a
transaction.

What each caller is promised stays what one transaction a write promised:

- **Told after commit.**  A call returns (or raises) only once the
  transaction that carried its write has committed (or failed): output
  acknowledged to a slave after its append returned is committed.
- **A failing write fails alone.**  A write that raises (another master's
  job, an unknown slave, a gap in a stream, an error of the database) is
  taken out: the transaction is rolled back and run again with a
  ``SAVEPOINT`` around each write, so that each one's error is its own and
  the others commit.
- **Fencing fails them all.**  A stale epoch is found by the batch's fence
  check before any write runs: every write of the batch is refused
  (:class:`~remsh.store.fencing.FencedOff`).
- **Repeatable or not.**  When the connection breaks under a batch (its
  commit unknown), its writes that store the same whether they ran once or
  twice are run again once the database answers (for up to the store's
  ``outage_wait``); the others fail, as they did alone.  A write that is
  not repeatable is refused at once while the connection waits out an
  outage.

No thread of its own: the first caller to find nobody committing commits
(the *leader*), and when its batch is done hands the lead to the oldest
write still waiting.  The writes of one batch come from callers that were
all waiting at once, so none of them is ordered after another; they run
ordered by their key (a job's id) so that two masters' batches take the
row locks of the jobs they share in the same order.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any, Callable, Deque, Generic, List, Optional, Tuple

import psycopg

from remsh.store.base import StoreError
from remsh.store.pglink import Conn, Link, T, Unreachable, one_line

log = logging.getLogger("remsh.store.postgres")

#: Most writes in one transaction ...
MAX_WRITES = 256
#: ... and most bytes (a write larger than this goes alone).
MAX_BYTES = 4 << 20
#: Most batches one caller commits in a row while writes wait (its own among them).
LEAD_BATCHES = 1
#: How often a waiting write that is not repeatable looks for an outage ...
_OUTAGE_POLL = 0.05
#: ... and a repeatable one wakes to wait again (its batch tells it).
_WAIT_POLL = 1.0


class Write(Generic[T]):
    """One caller's write, waiting for (or carried by) a batch."""

    __slots__ = ("fn", "key", "repeatable", "size", "alone", "taken", "done", "lead", "result", "error", "event")

    def __init__(self, fn: Callable[[Conn], T], key: str, repeatable: bool, size: int, alone: bool) -> None:
        self.fn = fn
        self.key = key
        self.repeatable = repeatable
        self.size = size
        #: one statement fenced and announced by itself: alone in its batch,
        #: it is run as its own transaction (one round trip)
        self.alone = alone
        #: in a batch now (no longer in the queue)
        self.taken = False
        #: its batch has committed or failed (``result`` or ``error`` set)
        self.done = False
        #: handed the lead: its caller commits the next batch
        self.lead = False
        self.result: Optional[T] = None
        self.error: Optional[BaseException] = None
        self.event = threading.Event()

    def outcome(self) -> T:
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


class _Isolate(Exception):
    """A write of the batch raised: run the batch again, each write in a savepoint."""


class GroupCommit:
    """The writes of one master, committed in batches over ``link``.

    ``fence(db)`` checks the master's epoch (raising
    :class:`~remsh.store.fencing.FencedOff`) at the start of each batch;
    ``announce(db, key)`` ends it (the change sequence and ``NOTIFY``,
    ``key`` the one key of all its writes or ``""``); ``committed()`` is
    called once after each batch that committed, before its callers are
    told; ``patience`` is how long repeatable writes wait out an outage.
    """

    def __init__(self, link: Link, fence: Callable[[Conn], None], announce: Callable[[Conn, str], None],
                 committed: Callable[[], None], patience: float) -> None:
        self.link = link
        self.fence = fence
        self.announce = announce
        self.committed = committed
        self.patience = patience
        self._lock = threading.Lock()
        self._queue: Deque[Write[Any]] = collections.deque()
        self._leading = False
        #: transactions committed and writes they carried (for the benchmarks and tests)
        self.batches = 0
        self.writes = 0

    @property
    def queued(self) -> int:
        """Writes waiting for a batch (not yet in one)."""
        with self._lock:
            return len(self._queue)

    def submit(self, fn: Callable[[Conn], T], key: str = "", *, repeatable: bool = True, size: int = 0,
               alone: bool = False) -> T:
        """``fn(db)`` committed in a batch; its result once committed.
        ``alone``: ``fn`` runs one statement that fences and announces
        itself (``remsh_append``), so that a batch of it alone needs no
        transaction around it.

        :raises StoreError: the write failed, or its batch did (the store's
            refusals: FencedOff, NotOwner, UnknownJob, ...)
        """
        write: Write[T] = Write(fn, key, repeatable, size, alone)
        with self._lock:
            if not repeatable and self.link.outage.is_set():
                raise Unreachable(self.link.outage_error or f"cannot reach the job store {self.link.label}")
            self._queue.append(write)
            lead = not self._leading
            self._leading = True
        if lead or self._wait(write):
            self._lead(write)
        return write.outcome()

    def _wait(self, write: Write[Any]) -> bool:
        """Wait until ``write`` is done (False) or handed the lead (True).
        Bounded by the leader's: each batch ends within the link's bounds."""
        poll = _WAIT_POLL if write.repeatable else _OUTAGE_POLL
        while not write.event.wait(poll):
            if write.repeatable or not self.link.outage.is_set():
                continue
            with self._lock:
                if write.lead or write.done or write.taken:
                    continue  # told, or carried: its batch decides
                self._queue.remove(write)
            raise Unreachable(self.link.outage_error or f"cannot reach the job store {self.link.label}")
        with self._lock:
            return not write.done

    def _lead(self, own: Write[Any]) -> None:
        """Commit batches until ``own`` is done (and, while writes wait, up
        to :data:`LEAD_BATCHES` in all: waking another thread to lead costs
        a switch the link would wait for), then hand the lead on."""
        led = 0
        try:
            while True:
                with self._lock:
                    if own.done and (led >= LEAD_BATCHES or not self._queue):
                        break
                    batch = self._take()
                led += 1
                if not batch:
                    break
                self._commit(batch)
        finally:
            with self._lock:
                if self._queue:
                    nxt = self._queue[0]
                    nxt.lead = True
                    nxt.event.set()
                else:
                    self._leading = False

    def _take(self) -> List[Write[Any]]:
        """The oldest writes waiting, within the bounds of one batch (under the lock)."""
        batch: List[Write[Any]] = []
        size = 0
        while self._queue and len(batch) < MAX_WRITES:
            nxt = self._queue[0]
            if batch and size + nxt.size > MAX_BYTES:
                break
            self._queue.popleft()
            nxt.taken = True
            nxt.lead = False
            batch.append(nxt)
            size += nxt.size
        return batch

    def _commit(self, batch: List[Write[Any]]) -> None:
        """Run ``batch`` in one transaction (two when a write fails) and tell its callers."""
        pending = sorted(batch, key=lambda w: w.key)  # the same lock order on every master
        outcome: List[Tuple[Write[Any], Any, Optional[BaseException]]] = []
        try:
            try:
                outcome = self._run(pending, isolate=False)
            except _Isolate:
                outcome = self._run(pending, isolate=True)
            self.batches += 1
            self.writes += len(outcome)
            self.committed()
        except BaseException as e:  # noqa: BLE001 - the batch failed whole (fenced, closed, unreachable, ...)
            outcome = [(w, None, e) for w in pending]
            if not isinstance(e, Exception):
                raise
        finally:
            with self._lock:
                for write, result, error in outcome:
                    write.result, write.error, write.done = result, error, True
                for write in batch:
                    if not write.done:  # dropped when the connection broke (not repeatable), or a surprise
                        write.error = write.error or StoreError(f"job store {self.link.label}: the write was "
                                                                f"not committed")
                        write.done = True
                    write.event.set()

    def _run(self, pending: List[Write[Any]], *, isolate: bool) -> List[Tuple[Write[Any], Any,
                                                                               Optional[BaseException]]]:
        """One transaction of ``pending`` (shrunk of the writes that are not
        repeatable when the connection breaks under it)."""
        def retrying(failure: StoreError) -> None:
            kept = [w for w in pending if w.repeatable]
            with self._lock:
                for write in pending:
                    if not write.repeatable:  # its commit is unknown: not run again, told at once
                        write.error, write.done = StoreError(str(failure)), True
                        write.event.set()
            pending[:] = kept

        def run(db: Conn) -> List[Tuple[Write[Any], Any, Optional[BaseException]]]:
            self.fence(db)
            out: List[Tuple[Write[Any], Any, Optional[BaseException]]] = []
            for write in pending:
                if not isolate:
                    try:
                        out.append((write, write.fn(db), None))
                    except Exception as e:
                        if isinstance(e, psycopg.Error) and (db.closed or db.broken):
                            raise  # the link's: connect again, repeat what may be
                        raise _Isolate() from e
                    continue
                try:
                    with db.transaction():
                        out.append((write, write.fn(db), None))
                except Exception as e:
                    if isinstance(e, psycopg.Error):
                        if db.closed or db.broken:
                            raise
                        e = StoreError(f"job store {self.link.label}: {one_line(e)}")
                    out.append((write, None, e))
            keys = {w.key for w in pending}
            self.announce(db, keys.pop() if len(keys) == 1 else "")
            return out

        patience = self.patience if any(w.repeatable for w in pending) else 0.0
        if len(pending) == 1 and pending[0].alone:
            write = pending[0]

            def single(db: Conn) -> List[Tuple[Write[Any], Any, Optional[BaseException]]]:
                try:
                    return [(write, write.fn(db), None)]
                except StoreError as e:  # the store's refusal, raised by the statement
                    return [(write, None, e)]

            return self.link.run(single, patience=patience, single=True, retrying=retrying)
        return self.link.run(run, patience=patience, retrying=retrying)


__all__ = ["GroupCommit", "MAX_WRITES", "MAX_BYTES"]
