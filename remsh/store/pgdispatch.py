"""The SQL of work crossing masters on the PostgreSQL job store
(:mod:`remsh.crossmaster`): ``remsh_dispatch``, one row per slave's part of
a job that the master which made the job (its *origin*) asks of whichever
master holds that slave, and ``remsh_blobs``, the bytes a ``put`` or a
``get`` carries between the two masters, in rows of :data:`CHUNK` bytes.

A dispatch is ``pending`` until a master holding its slave claims it
(:func:`claim`, a compare-and-set on the state, in a write fenced by that
master's epoch), ``running`` while that master runs it (it alone, under
the epoch it claimed with, writes that slave's record and output in the
origin's job: ``remsh_append`` and the store's ``update_slave`` check the
claim), then ``done`` (the holder reports its result), or ``lost`` /
``cancelled`` when the origin settles it (:func:`settle`: the claimer died,
nobody claimed it in time, the job was cancelled before it started).  A
settled claim is void: the old claimer's writes are refused.

Every function takes the transaction's connection first; the writes are
run by :meth:`remsh.store.postgres.PostgresJobStore.dispatch_write`, which
passes this master's name and epoch after it (and fences the transaction by
them), the reads by ``dispatch_read``.  psycopg is not imported here at run
time, so that the callers may import this module without it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from remsh.store.base import SessionRecord, StoreError, UnknownJob
from remsh.store.fencing import NotOwner

if TYPE_CHECKING:
    from remsh.store.pglink import Conn

#: The states of a dispatch: waiting for a master holding its slave, run by one, and the ends.
PENDING, RUNNING, DONE, LOST, CANCELLED = "pending", "running", "done", "lost", "cancelled"
FINAL = (DONE, LOST, CANCELLED)
#: Bytes of one ``remsh_blobs`` row.
CHUNK = 1 << 20
#: The blob of a put's source (one per job; a get's result is named by its slave).
SOURCE = ""

_DB_NOW = "extract(epoch from clock_timestamp())::double precision"
#: The dispatch's (or ``job_id``'s) job is ``%s``'s.
_OWNED = "EXISTS (SELECT 1 FROM remsh_jobs j WHERE j.id = remsh_dispatch.job_id AND j.owner = %s)"
#: The dispatch's claimer holds a recorded session of its part (``remsh_sessions``).
_SESSION_OF_CLAIMER = ("EXISTS (SELECT 1 FROM remsh_sessions s WHERE s.job_id = remsh_dispatch.job_id "
                       "AND s.name = remsh_dispatch.slave AND s.owner = remsh_dispatch.claimed_by)")
_COLUMNS = "id, job_id, slave, origin, holder, kind, spec, state, claimed_by, claim_epoch, cancel_reason, result"


@dataclasses.dataclass
class Dispatch:
    """One row of ``remsh_dispatch``."""

    id: int
    job_id: str
    slave: str
    origin: str
    holder: str
    kind: str
    spec: Dict[str, Any]
    state: str
    claimed_by: Optional[str]
    claim_epoch: Optional[int]
    cancel_reason: Optional[str]
    result: Optional[Dict[str, Any]]


def _row(r: Sequence[Any]) -> Dispatch:
    return Dispatch(int(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]), str(r[5]), json.loads(r[6]), str(r[7]),
                    r[8], None if r[9] is None else int(r[9]), r[10], None if r[11] is None else json.loads(r[11]))


# -- the origin's writes ---------------------------------------------------------------


def ask(db: "Conn", master: str, epoch: int, job_id: str, parts: Sequence[Tuple[str, str]], kind: str,
        spec: Dict[str, Any]) -> None:
    """Ask the parts ``(slave, holder)`` of job ``job_id`` (``master``'s
    own); a part asked already stays as it is (a second try is harmless)."""
    row = db.execute("SELECT owner FROM remsh_jobs WHERE id = %s FOR UPDATE", (job_id,)).fetchone()
    if row is None:
        raise UnknownJob(f"no job {job_id}")
    if row[0] != master:
        raise StoreError(f"job {job_id} belongs to master {row[0]}, not {master}: not its to dispatch")
    text = json.dumps(spec, sort_keys=True)
    with db.cursor() as cur:
        cur.executemany(f"INSERT INTO remsh_dispatch (job_id, slave, origin, holder, kind, spec, state, created) "
                        f"VALUES (%s, %s, %s, %s, %s, %s, %s, {_DB_NOW}) ON CONFLICT (job_id, slave) DO NOTHING",
                        [(job_id, slave, master, holder, kind, text, PENDING) for slave, holder in parts])


def ask_cancel(db: "Conn", master: str, epoch: int, job_id: str, reason: str) -> None:
    """Ask the holders of job ``job_id``'s open dispatches to cancel them
    (``master``'s job only: another master asks its owner, ``request_cancel``)."""
    db.execute(f"UPDATE remsh_dispatch SET cancel_reason = coalesce(cancel_reason, %s) "
               f"WHERE job_id = %s AND state IN (%s, %s) AND {_OWNED}", (reason, job_id, PENDING, RUNNING, master))


def settle(db: "Conn", master: str, epoch: int, dispatch_id: int, before: str, after: str,
           claimed_by: Optional[str], claim_epoch: Optional[int]) -> bool:
    """The origin ends dispatch ``dispatch_id`` ``after`` if it is still
    ``before`` (and, running, still claimed by ``claimed_by`` at
    ``claim_epoch``), and its job is ``master``'s (the origin's, or its
    adopter's: no other master voids a claim).  Whether it did.

    A claim whose claimer holds a recorded session of the part is not
    settled: the master that adopts the claimer carries the part on
    (:func:`move_claims`) and ends it."""
    cur = db.execute(f"UPDATE remsh_dispatch SET state = %s WHERE id = %s AND state = %s "
                     f"AND claimed_by IS NOT DISTINCT FROM %s AND claim_epoch IS NOT DISTINCT FROM %s AND {_OWNED} "
                     f"AND NOT {_SESSION_OF_CLAIMER}",
                     (after, dispatch_id, before, claimed_by, claim_epoch, master))
    return cur.rowcount == 1


# -- the holder's writes ----------------------------------------------------------------


def claim(db: "Conn", master: str, epoch: int, dispatch_ids: Sequence[int]) -> List[int]:
    """Take the pending dispatches ``dispatch_ids``: those this master won."""
    rows = db.execute("UPDATE remsh_dispatch SET state = %s, claimed_by = %s, claim_epoch = %s "
                      "WHERE id = ANY(%s) AND state = %s RETURNING id",
                      (RUNNING, master, epoch, list(dispatch_ids), PENDING)).fetchall()
    return sorted(int(r[0]) for r in rows)


def finish(db: "Conn", master: str, epoch: int, dispatch_id: int, result: Dict[str, Any]) -> bool:
    """Report the result of a dispatch this master runs; False when its
    claim was settled meanwhile (the report is not taken)."""
    cur = db.execute("UPDATE remsh_dispatch SET state = %s, result = %s WHERE id = %s AND state = %s "
                     "AND claimed_by = %s AND claim_epoch = %s",
                     (DONE, json.dumps(result, sort_keys=True), dispatch_id, RUNNING, master, epoch))
    return cur.rowcount == 1


# -- adoption -----------------------------------------------------------------------------


def move_claims(db: "Conn", old: str, new: str, new_epoch: int) -> List[int]:
    """The running claims of master ``old`` that have a recorded session of
    their part (held by ``old``) become master ``new``'s at ``new_epoch``,
    in the transaction where ``new`` adopts ``old`` (before the sessions
    move).  A claim without one (a transfer, a part whose command was not
    yet asked) stays void, and the origin settles it.  The ids moved."""
    rows = db.execute(f"UPDATE remsh_dispatch SET claimed_by = %s, claim_epoch = %s WHERE claimed_by = %s "
                      f"AND state = %s AND {_SESSION_OF_CLAIMER} RETURNING id",
                      (new, new_epoch, old, RUNNING)).fetchall()
    return sorted(int(r[0]) for r in rows)


def drop_sessions(db: "Conn", master: str) -> None:
    """Master ``master`` restarts under its name (a new epoch: its claims
    are void): the sessions it recorded for parts of other masters' jobs
    are deleted, so that their origins settle those parts (:func:`settle`)."""
    db.execute("DELETE FROM remsh_sessions s WHERE s.owner = %s AND NOT EXISTS (SELECT 1 FROM remsh_jobs j "
               "WHERE j.id = s.job_id AND j.owner = %s)", (master, master))


# -- blobs --------------------------------------------------------------------------------


def put_chunk(db: "Conn", master: str, epoch: int, job_id: str, name: str, seq: int, data: bytes) -> None:
    """Store chunk ``seq`` of blob ``name`` of job ``job_id`` (again: the
    same): ``master``'s job, or the blob of the slave whose part it runs
    under a claim (a get's result).

    :raises NotOwner: neither
    """
    _may_write_blob(db, master, epoch, job_id, name)
    db.execute("INSERT INTO remsh_blobs (job_id, name, seq, data) VALUES (%s, %s, %s, %s) "
               "ON CONFLICT (job_id, name, seq) DO UPDATE SET data = excluded.data", (job_id, name, seq, data))


def drop_blob(db: "Conn", master: str, epoch: int, job_id: str, name: str) -> None:
    """Delete blob ``name`` of job ``job_id`` (``master``'s job only).

    :raises NotOwner: the job is another master's
    """
    _may_write_blob(db, master, None, job_id, name)
    db.execute("DELETE FROM remsh_blobs WHERE job_id = %s AND name = %s", (job_id, name))


def _may_write_blob(db: "Conn", master: str, epoch: Optional[int], job_id: str, name: str) -> None:
    """Refuse a write of blob ``name`` of job ``job_id`` by ``master``
    unless the job is its own or (``epoch`` given) it runs the part of
    slave ``name`` under a claim made at ``epoch``."""
    row = db.execute("SELECT owner FROM remsh_jobs WHERE id = %s", (job_id,)).fetchone()
    if row is None:
        raise UnknownJob(f"no job {job_id}")
    if row[0] == master or (epoch is not None and name != SOURCE and claimed(db, job_id, name, master, epoch)):
        return
    raise NotOwner(f"job {job_id} belongs to master {row[0]}, not {master}: its bytes of {name or 'the put'!r} "
                   f"are not {master}'s to write", owner=str(row[0]))


def chunk(db: "Conn", job_id: str, name: str, seq: int) -> Optional[bytes]:
    """Chunk ``seq`` of blob ``name`` of job ``job_id``; ``None`` when missing."""
    row = db.execute("SELECT data FROM remsh_blobs WHERE job_id = %s AND name = %s AND seq = %s",
                     (job_id, name, seq)).fetchone()
    return None if row is None else bytes(row[0])


# -- reads --------------------------------------------------------------------------------


def of_job(db: "Conn", job_id: str) -> List[Dispatch]:
    """Every dispatch of job ``job_id``, by slave."""
    rows = db.execute(f"SELECT {_COLUMNS} FROM remsh_dispatch WHERE job_id = %s ORDER BY slave", (job_id,))
    return [_row(r) for r in rows.fetchall()]


def open_of(db: "Conn", job_id: str, owner: str) -> List[Dispatch]:
    """The pending and running dispatches of job ``job_id`` if ``owner``
    owns it (none otherwise), by slave."""
    rows = db.execute(f"SELECT {', '.join('d.' + c for c in _COLUMNS.split(', '))} FROM remsh_dispatch d "
                      f"JOIN remsh_jobs j ON j.id = d.job_id WHERE d.job_id = %s AND j.owner = %s "
                      f"AND d.state IN (%s, %s) ORDER BY d.slave", (job_id, owner, PENDING, RUNNING))
    return [_row(r) for r in rows.fetchall()]


def for_holder(db: "Conn", master: str, slaves: Sequence[str]) -> List[Dispatch]:
    """What master ``master``, holding ``slaves``, has to look at: the
    pending dispatches of those slaves and the running ones it claimed
    whose cancel was asked, oldest first."""
    rows = db.execute(f"SELECT {_COLUMNS} FROM remsh_dispatch WHERE (state = %s AND slave = ANY(%s)) "
                      f"OR (state = %s AND claimed_by = %s AND cancel_reason IS NOT NULL) ORDER BY id",
                      (PENDING, list(slaves), RUNNING, master))
    return [_row(r) for r in rows.fetchall()]


def carried_on(db: "Conn", master: str, epoch: int) -> List[Tuple[Dispatch, SessionRecord]]:
    """The running parts claimed by ``master`` at ``epoch`` with a recorded
    session of its own (moved to it when it adopted their dead claimer,
    :func:`move_claims`), each with that session, oldest first."""
    rows = db.execute(f"SELECT {', '.join('d.' + c for c in _COLUMNS.split(', '))}, s.id, s.op, s.request_box, "
                      f"s.reply_base, s.received, s.opened FROM remsh_dispatch d JOIN remsh_sessions s "
                      f"ON s.job_id = d.job_id AND s.name = d.slave AND s.owner = d.claimed_by "
                      f"WHERE d.state = %s AND d.claimed_by = %s AND d.claim_epoch = %s ORDER BY d.id",
                      (RUNNING, master, epoch)).fetchall()
    return [(_row(r), SessionRecord(str(r[12]), str(r[2]), str(r[1]), str(r[13]), int(r[14]), int(r[15]),
                                    int(r[16]), float(r[17]))) for r in rows]


def claimed(db: "Conn", job_id: str, slave: str, master: str, epoch: int) -> bool:
    """Whether ``master`` at ``epoch`` runs the part of ``slave`` in job
    ``job_id`` (and so may write that slave's record)."""
    row = db.execute("SELECT 1 FROM remsh_dispatch WHERE job_id = %s AND slave = %s AND state = %s "
                     "AND claimed_by = %s AND claim_epoch = %s", (job_id, slave, RUNNING, master, epoch)).fetchone()
    return row is not None


__all__ = ["Dispatch", "PENDING", "RUNNING", "DONE", "LOST", "CANCELLED", "FINAL", "CHUNK", "SOURCE", "ask",
           "ask_cancel", "settle", "claim", "finish", "move_claims", "drop_sessions", "put_chunk", "drop_blob",
           "chunk", "of_job", "open_of", "for_holder", "carried_on", "claimed"]
