"""Connections of the PostgreSQL job store (:mod:`remsh.store.postgres`):
one connection per :class:`Link`, its lock, its bounds (connecting, a
statement, a row lock), and its reopening after it broke -- at once for a
read, waiting out an outage for a write that is harmless to repeat.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any, Callable, Optional, Tuple, TypeVar

import psycopg
import psycopg.conninfo

from remsh.store.base import StoreAway, StoreError

log = logging.getLogger("remsh.store.postgres")

T = TypeVar("T")
Conn = psycopg.Connection[Tuple[Any, ...]]

#: Bounds on the database: connecting, one statement, waiting for a row lock.
CONNECT_TIMEOUT = 10
STATEMENT_TIMEOUT_MS = 30_000
LOCK_TIMEOUT_MS = 10_000


def redacted(conninfo: str) -> str:
    """``conninfo`` as it may be logged or shown: any password left out."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "(an unparsable connection string)"
    params.pop("password", None)
    return psycopg.conninfo.make_conninfo("", **{k: v for k, v in params.items() if v is not None})


class Broken(StoreAway):
    """The connection broke under a call (whether it committed is unknown)."""


class Unreachable(StoreAway):
    """No connection to the database could be made."""


class Link:
    """One connection to the database, its lock, and its reopening after it
    broke: calls on one link run one at a time."""

    def __init__(self, conninfo: str, label: str) -> None:
        self.conninfo = conninfo
        self.label = label
        self.lock = threading.Lock()
        self.conn: Optional[Conn] = None
        self.closed = False
        #: set first by :meth:`close`: a call waiting out an outage gives up
        self.closing = threading.Event()
        #: set while a call holding the link waits for the database to come
        #: back (``outage_error`` says why): a call without patience then
        #: fails at once rather than waiting behind it
        self.outage = threading.Event()
        self.outage_error = ""

    def connect(self) -> Conn:
        try:
            conn: Conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
        except psycopg.Error as e:
            raise Unreachable(f"cannot reach the job store {self.label}: {one_line(e)}") from e
        try:
            conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
            conn.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
        except psycopg.Error as e:
            conn.close()
            raise StoreError(f"job store {self.label}: {one_line(e)}") from e
        return conn

    def run(self, fn: Callable[[Conn], T], *, retry: bool = False, patience: float = 0.0,
            single: bool = False, retrying: Optional[Callable[[StoreError], None]] = None) -> T:
        """``fn(conn)`` in one transaction (committed when it returns).

        ``fn`` is run again on a new connection when the connection broke
        under it: with ``retry`` (a read) once, at once; with ``patience``
        (a write that is harmless to repeat: whether the broken attempt
        committed or not, repeating it stores the same) until the database
        answers again, for at most ``patience`` seconds.  Otherwise the
        call fails and the next one connects again.  ``single``: ``fn`` runs
        one statement, its own transaction (no BEGIN and COMMIT around it).
        ``retrying(failure)`` is called before each wait for the database
        to answer again (with the error that made it wait): a batch of
        writes takes out those that are not to be repeated.
        """
        deadline = time.monotonic() + patience
        delay = 0.1
        self._acquire(patience)
        try:
            for attempt in itertools.count(1):
                if self.closed or self.closing.is_set():
                    raise StoreError(f"the job store {self.label} is closed")
                try:
                    if self.conn is None or self.conn.closed or self.conn.broken:
                        self.conn = self.connect()
                    conn = self.conn
                    try:
                        if single:
                            return fn(conn)
                        with conn.transaction():
                            return fn(conn)
                    except psycopg.Error as e:
                        if not (conn.closed or conn.broken):
                            raise StoreError(f"job store {self.label}: {one_line(e)}") from e
                        conn.close()
                        self.conn = None
                        raise Broken(f"job store {self.label}: {one_line(e)}") from e
                except Broken as e:
                    log.warning("%s; connecting again", e)
                    if retry and attempt == 1:
                        continue
                    failure: StoreError = e
                except Unreachable as e:
                    failure = e
                if time.monotonic() + delay > deadline:
                    raise type(failure)(str(failure)) from failure.__cause__  # still away: may be tried again
                self.outage_error = str(failure)
                self.outage.set()
                if retrying is not None:
                    retrying(failure)
                if self.closing.wait(delay):
                    raise StoreError(f"the job store {self.label} is closed")
                delay = min(1.0, delay * 2)
            raise AssertionError("not reached")
        finally:
            self.outage.clear()
            self.lock.release()

    def _acquire(self, patience: float) -> None:
        """Take the link; a call without ``patience`` that finds it held by
        one waiting out an outage fails at once (``Unreachable``)."""
        while not self.lock.acquire(timeout=0.05):
            if not patience and self.outage.is_set():
                raise Unreachable(self.outage_error or f"cannot reach the job store {self.label}")

    def close(self) -> None:
        self.closing.set()
        with self.lock:
            self.closed = True
            if self.conn is not None:
                self.conn.close()
                self.conn = None


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


__all__ = ["Link", "Conn", "T", "Broken", "Unreachable", "redacted", "one_line", "CONNECT_TIMEOUT"]
