"""The most frequent writes of the PostgreSQL job store
(:mod:`remsh.store.postgres`), each one statement: a slave's record of a
job updated, a session recorded.

Each statement locks the job's row (``FOR UPDATE``, as every write to a job
does first, so that writes of one job take their locks in one order) and
writes only when the job is this master's -- or, for a slave's record, when
this master runs that slave's part of another master's job under a claim
(:mod:`remsh.store.pgdispatch`).  One statement instead of a check and a
write halves the round trips of these writes in a batch
(:mod:`remsh.store.pgbatch`); the refusals are told apart afterwards, in
the same transaction, only when nothing was written.
"""

from __future__ import annotations

from typing import Dict, Optional

from remsh.store.base import SessionRecord, UnknownJob
from remsh.store.fencing import NotOwner
from remsh.store.pgdispatch import RUNNING, claimed
from remsh.store.pglink import Conn

#: The job's row, locked, and whether ``%(me)s`` may write slave ``%(name)s``'s record of it
#: (the same test as :func:`remsh.store.pgdispatch.claimed`, which tells the refusal apart).
_JOB = "j AS (SELECT owner FROM remsh_jobs WHERE id = %(job)s FOR UPDATE)"
_CLAIM = ("EXISTS (SELECT 1 FROM remsh_dispatch WHERE job_id = %(job)s AND slave = %(name)s AND state = %(running)s "
          "AND claimed_by = %(me)s AND claim_epoch = %(epoch)s)")


def update_slave(db: Conn, me: str, epoch: int, job_id: str, name: str, changes: Dict[str, object]) -> None:
    """Set ``changes`` (column -> value) on slave ``name``'s record of job ``job_id``.

    :raises UnknownJob: no such job, or no such slave in it
    :raises NotOwner: the job is another master's, and ``name``'s part of it not claimed by ``me``
    """
    params: Dict[str, object] = {f"v{i}": value for i, value in enumerate(changes.values())}
    assignments = ", ".join(f"{column} = %(v{i})s" for i, column in enumerate(changes))
    params.update(job=job_id, name=name, me=me, epoch=epoch, running=RUNNING)
    row = db.execute(f"WITH {_JOB}, u AS (UPDATE remsh_job_slaves SET {assignments} "
                     f"WHERE job_id = %(job)s AND name = %(name)s "
                     f"AND EXISTS (SELECT 1 FROM j WHERE owner = %(me)s OR {_CLAIM}) RETURNING 1) "
                     f"SELECT (SELECT owner FROM j), (SELECT count(*) FROM u)", params).fetchone()
    assert row is not None
    owner: Optional[str] = row[0]
    if row[1]:
        return
    if owner is None:
        raise UnknownJob(f"no job {job_id}")
    if owner != me and not claimed(db, job_id, name, me, epoch):
        raise NotOwner(f"job {job_id} belongs to master {owner}, not {me}", owner=str(owner))
    raise UnknownJob(f"no slave {name!r} in job {job_id}")


def open_session(db: Conn, me: str, epoch: int, record: SessionRecord, opened: float) -> None:
    """Record the session ``record`` of a command of job ``record.job_id``
    (replacing one of its id that this master holds: another master's is
    never taken over by naming its id): a job of this master's, or another
    master's whose part on slave ``record.name`` this master runs under a
    claim (so that the master adopting this one carries that part on).

    :raises UnknownJob: no such job
    :raises NotOwner: the job is another master's and that part not claimed by ``me``
    """
    row = db.execute(
        f"WITH {_JOB}, i AS (INSERT INTO remsh_sessions (id, name, job_id, op, request_box, reply_base, received, "
        f"opened, owner, owner_epoch) SELECT %(id)s, %(name)s, %(job)s, %(op)s, %(request_box)s, %(reply_base)s, "
        f"%(received)s, %(opened)s, %(me)s, %(epoch)s WHERE EXISTS (SELECT 1 FROM j WHERE owner = %(me)s OR {_CLAIM}) "
        f"ON CONFLICT (id) DO UPDATE SET name = excluded.name, job_id = excluded.job_id, op = excluded.op, "
        f"request_box = excluded.request_box, reply_base = excluded.reply_base, received = excluded.received, "
        f"opened = excluded.opened, owner = excluded.owner, owner_epoch = excluded.owner_epoch "
        f"WHERE remsh_sessions.owner = excluded.owner RETURNING 1) "
        f"SELECT (SELECT owner FROM j), (SELECT count(*) FROM i)",
        {"id": record.id, "name": record.name, "job": record.job_id, "op": record.op,
         "request_box": record.request_box, "reply_base": record.reply_base, "received": record.received,
         "opened": opened, "me": me, "epoch": epoch, "running": RUNNING}).fetchone()
    assert row is not None
    if row[1]:
        return
    if row[0] is None:
        raise UnknownJob(f"no job {record.job_id}")
    if row[0] == me or claimed(db, record.job_id, record.name, me, epoch):
        # the id is a session of another master's: never taken over by naming it
        raise NotOwner(f"session for {record.name} of job {record.job_id}: its id is held by another master")
    raise NotOwner(f"job {record.job_id} belongs to master {row[0]}, not {me}", owner=str(row[0]))


__all__ = ["update_slave", "open_session"]
