"""Adoption of a dead master's work by a running master, in the PostgreSQL
job store (the SQL; :class:`remsh.store.postgres.PostgresJobStore` calls it).

Two questions a running master asks of the store:

- :func:`dead_with_work`: which other masters are dead (stopped, or silent
  past the lease) and still own running jobs or recorded sessions -- the
  ones its heartbeat adopts
  (:meth:`~remsh.store.postgres.PostgresJobStore.adopt_master`, a
  compare-and-set on their epoch: of several masters racing, one wins).
  A master with nothing left to adopt is not named again, so no epoch is
  raised in a loop.
- :func:`find_session`: who holds the recorded session a slave names when
  it resumes on a master that does not know it.  The session is found by
  the digest of its id (the lookup reveals nothing of the id's characters
  to a timing observer) and the id then compared in constant time.

Also :func:`env_seconds`: the heartbeat and the lease may be set in the
environment (``REMSH_STORE_HEARTBEAT``, ``REMSH_STORE_LEASE``), for every
master of a cluster alike (tests shorten them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import math
import os
import threading
from typing import Callable, List, Optional, Tuple

from remsh.store import pgdispatch
from remsh.store.base import JOB_RUNNING
from remsh.store.fencing import FencedOff
from remsh.store.pglink import Conn

log = logging.getLogger(__name__)

_DB_NOW = "extract(epoch from clock_timestamp())::double precision"


def env_seconds(variable: str, default: float) -> float:
    """A positive number of seconds from ``$variable``, else ``default``
    (a value that is not one is logged and ignored)."""
    text = os.environ.get(variable)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value > 0 and math.isfinite(value)):
        log.warning("$%s=%r is not a positive number of seconds: %g s used", variable, text, default)
        return default
    return value


def dead_with_work(db: Conn, me: str, lease: float) -> List[Tuple[str, int]]:
    """``(name, epoch)`` of every other master that is stopped or silent for
    ``lease`` seconds or more, and still owns a running job or a recorded
    session."""
    rows = db.execute(
        f"SELECT m.name, m.epoch FROM remsh_masters m WHERE m.name <> %s "
        f"AND {_DB_NOW} - m.heartbeat >= %s "
        f"AND (EXISTS (SELECT 1 FROM remsh_jobs j WHERE j.owner = m.name AND j.state = %s) "
        f"OR EXISTS (SELECT 1 FROM remsh_sessions s WHERE s.owner = m.name)) ORDER BY m.name",
        (me, lease, JOB_RUNNING)).fetchall()
    return [(str(r[0]), int(r[1])) for r in rows]


def move_work(db: Conn, dead: str, me: str, epoch: int) -> Tuple[List[str], List[int]]:
    """In the transaction where master ``me`` (at ``epoch``) won the
    compare-and-set on dead master ``dead``'s epoch: its running jobs, its
    claims of other masters' parts that have a recorded session
    (:func:`remsh.store.pgdispatch.move_claims`, before the sessions move)
    and its sessions become ``me``'s.  The job ids and the dispatch ids moved."""
    rows = db.execute("UPDATE remsh_jobs SET owner = %s, owner_epoch = %s WHERE owner = %s AND state = %s "
                      "RETURNING id", (me, epoch, dead, JOB_RUNNING)).fetchall()
    claims = pgdispatch.move_claims(db, dead, me, epoch)
    db.execute("UPDATE remsh_sessions SET owner = %s, owner_epoch = %s WHERE owner = %s", (me, epoch, dead))
    return sorted(str(r[0]) for r in rows), claims


@dataclasses.dataclass(frozen=True)
class SessionHolder:
    """A recorded session and the master that holds it, as the store has them."""

    #: the slave whose session it is
    name: str
    job_id: str
    #: the master that owns its job
    owner: str
    #: that master's epoch now
    epoch: int
    #: that master is within its lease and not stopped
    alive: bool


def session_digest(session_id: str) -> bytes:
    """What a session is looked up by (SHA-256 of its id)."""
    return hashlib.sha256(session_id.encode("utf-8", "replace")).digest()


def find_session(db: Conn, session_id: str, lease: float) -> Optional[SessionHolder]:
    """The recorded session ``session_id`` and its holder; ``None`` when the
    store has none of that id."""
    rows = db.execute(
        f"SELECT s.id, s.name, s.job_id, s.owner, coalesce(m.epoch, 0), coalesce(m.stopped, true), "
        f"coalesce({_DB_NOW} - m.heartbeat, 'Infinity'::double precision) "
        f"FROM remsh_sessions s LEFT JOIN remsh_masters m ON m.name = s.owner "
        f"WHERE sha256(convert_to(s.id, 'UTF8')) = %s", (session_digest(session_id),)).fetchall()
    for sid, name, job_id, owner, epoch, stopped, silent in rows:
        if hmac.compare_digest(str(sid).encode("utf-8", "replace"), session_id.encode("utf-8", "replace")):
            return SessionHolder(str(name), str(job_id), str(owner), int(epoch),
                                 not stopped and float(silent) < lease)
    return None


class Watchers:
    """Who takes back the work this master adopts, and who hears that it
    was fenced off (:meth:`~remsh.store.postgres.PostgresJobStore.watch_adoptions`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._adopted: Optional[Callable[[List[str]], None]] = None
        self._fenced: Optional[Callable[[FencedOff], None]] = None
        #: the refusal that fenced this master off (``None``: not fenced)
        self.fenced: Optional[FencedOff] = None

    def watch(self, adopted: Callable[[List[str]], None], fenced: Callable[[FencedOff], None]) -> None:
        with self._lock:
            self._adopted, self._fenced = adopted, fenced
            error = self.fenced
        if error is not None:
            fenced(error)

    @property
    def adopting(self) -> bool:
        """Whether the heartbeat adopts dead masters: someone takes back
        their work (a store opened without a master's jobs adopts nothing)
        and this master is not fenced off."""
        with self._lock:
            return self._adopted is not None and self.fenced is None

    def adopted(self, job_ids: List[str]) -> None:
        """Jobs just adopted: hand them to whoever takes them back."""
        with self._lock:
            callback = self._adopted
        if callback is None:
            return
        try:
            callback(job_ids)
        except Exception:  # noqa: BLE001 - the adopter's; the store goes on
            log.exception("the adopted jobs %s could not be taken back", ", ".join(job_ids))

    def fence(self, error: FencedOff) -> None:
        """This master's epoch is stale: say so, once."""
        with self._lock:
            if self.fenced is not None:
                return
            self.fenced = error
            callback = self._fenced
        log.error("%s", error)
        if callback is not None:
            try:
                callback(error)
            except Exception:  # noqa: BLE001 - the adopter's; the refusal is raised all the same
                log.exception("the fence could not be reported")


__all__ = ["SessionHolder", "Watchers", "dead_with_work", "env_seconds", "find_session", "move_work",
           "session_digest"]
