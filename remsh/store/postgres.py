"""A job store in PostgreSQL, shared by several masters.

The same calls and the same promises as :mod:`remsh.store.sqlite` (records,
output appended exactly once by its position in its stream, the per-slave
cap with :data:`~remsh.store.sqlite.CHUNK_COST` per chunk, retention,
:meth:`~PostgresJobStore.wait_change`), over psycopg 3 (the extra
``remsh[postgres]``; this module is the only one that imports psycopg).

Several masters open one database, each under its own name (a row of
``remsh_masters``: name, epoch, heartbeat, host and process).  Opening the
store raises the name's epoch; a name whose holder's heartbeat is within
the lease is refused (:class:`~remsh.store.fencing.MasterNameInUse`)
unless that holder ran on this machine and its process is gone.  Every
write runs in a transaction (writes made at once share one:
:mod:`remsh.store.pgbatch`; output is one statement, ``remsh_append``)
that first reads this master's row ``FOR SHARE`` and
refuses to go on when the epoch there is not ours
(:class:`~remsh.store.fencing.FencedOff`): the row lock makes an adopter's
epoch change wait for our transaction, so no write of a fenced master lands
after the fence.  A job belongs to the master that created it (``owner``,
``owner_epoch``); another master's write to it is refused
(:class:`~remsh.store.fencing.NotOwner`) until it adopts it
(:meth:`PostgresJobStore.adopt_master`, a compare-and-set on the dead
master's epoch: of two masters racing, one wins).

Changes reach the other masters' :meth:`~PostgresJobStore.wait_change` by
``NOTIFY`` on commit, heard by a thread of each store on its own
connection; a sequence every write advances is polled every
``poll_interval`` seconds as a safety net (a notification lost with a
connection).  The same thread writes the heartbeat, says when another
master goes silent past its lease, and delivers the cancels other masters
ask of this one's jobs (:meth:`PostgresJobStore.watch_cancels`).

The schema (:mod:`remsh.store.pgschema`: tables prefixed ``remsh_``, so a
database may be shared with other programs) is versioned in ``remsh_meta``;
its migrations are applied in one transaction under an advisory lock, so
masters starting together migrate once.  A database of a newer remsh is
refused.

A broken connection (PostgreSQL restarted, the network) is opened again.
A write that stores the same whether it ran once or twice (output by its
position, a slave's record, a job's end, a session) is repeated once the
database answers again, for up to ``outage_wait`` seconds: a restart of
PostgreSQL under a running job loses none of its output.  A new job is not
(a second try could make two): it fails while the database is away; a read
is tried once more at once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import psycopg
import psycopg.conninfo

from remsh.store.base import (DEFAULT_KEEP_SECONDS, DEFAULT_MAX_OUTPUT, JOB_FINAL_STATES, JOB_RUNNING, KINDS,
                              SLAVE_QUEUED, STREAMS, ChangeCounter, JobIds, JobRecord, OutputChunk, OutputGap,
                              SessionRecord, SlaveRecord, StoreError, UnknownJob, now, slave_changes)
from remsh.store.fencing import FencedOff, MasterNameInUse, MasterRow, NotOwner
from remsh.store.pgbatch import GroupCommit
from remsh.store.pglink import CONNECT_TIMEOUT, Conn, Link, T, one_line, redacted
from remsh.store import pgadopt, pgdispatch, pgslaves, pgwrites
from remsh.store.pgschema import GAP, MIGRATIONS, NO_JOB, NO_SLAVE, NOT_OWNER, SCHEMA_VERSION, STALE_EPOCH
from remsh.store.sqlite import CHUNK_COST

#: ``Connection.notifies(timeout=, stop_after=)`` came with psycopg 3.2.
PSYCOPG_NEEDED = (3, 2)
if tuple(int(part) for part in psycopg.__version__.split(".")[:2] if part.isdigit()) < PSYCOPG_NEEDED:
    raise ImportError(f"psycopg {psycopg.__version__} is too old: the PostgreSQL job store needs 3.2 or later")

log = logging.getLogger(__name__)

#: The ``NOTIFY`` channel of every change.
CHANNEL = "remsh_store"
#: The ``NOTIFY`` channel of a cancel asked of a job (payload: its id).
CANCEL_CHANNEL = "remsh_cancel"
#: Serialises the masters' migrations (an advisory lock key: "remsh" in ASCII).
MIGRATION_LOCK = 0x72656D7368
#: Defaults: heartbeat every HEARTBEAT seconds; a master silent for LEASE is dead.
#: (Both may be set for every master alike: ``$REMSH_STORE_HEARTBEAT``, ``$REMSH_STORE_LEASE``.)
HEARTBEAT = pgadopt.env_seconds("REMSH_STORE_HEARTBEAT", 3.0)
LEASE = pgadopt.env_seconds("REMSH_STORE_LEASE", 15.0)
POLL_INTERVAL = 2.0
#: How long a write that is harmless to repeat (output, a slave's record, a
#: job's end) waits for the database to come back before it fails.
OUTAGE_WAIT = 30.0

_SLAVE_COLUMNS = ("name", "state", "exit_status", "error", "errtag", "started", "finished",
                  "stdout_bytes", "stderr_bytes", "truncated", "progress_done", "progress_total", "summary")
_JOB_COLUMNS = "id, kind, spec, uid, state, started, finished"
_DB_NOW = "extract(epoch from clock_timestamp())::double precision"


class PostgresJobStore(ChangeCounter):
    """A :class:`~remsh.store.base.JobStore` in a PostgreSQL database, for
    master ``name`` among the masters that share it.

    ``conninfo`` is a libpq connection string or URI (a password comes best
    from a password file: ``PGPASSFILE`` or ``passfile=``); ``keep`` and
    ``max_output`` as for :class:`~remsh.store.sqlite.SqliteJobStore`;
    ``heartbeat``/``lease`` the heartbeat interval and how long a silent
    master counts as alive; ``poll_interval`` the safety net of
    :meth:`wait_change`; ``outage_wait`` how long a write that is harmless
    to repeat waits for the database to come back (a new job does not
    wait: it is refused while the database is away).

    :raises StoreError: the database cannot be reached, is not a remsh store
        or is of a newer remsh
    :raises MasterNameInUse: a live master already uses ``name``
    """

    def __init__(self, conninfo: str, name: str, *, keep: float = DEFAULT_KEEP_SECONDS,
                 max_output: int = DEFAULT_MAX_OUTPUT, heartbeat: float = HEARTBEAT, lease: float = LEASE,
                 poll_interval: float = POLL_INTERVAL, outage_wait: float = OUTAGE_WAIT) -> None:
        if not name:
            raise ValueError("a master on a shared store needs a name")
        self.label = redacted(conninfo)
        self.name = name
        self.keep = keep
        self.max_output = max_output
        self.heartbeat = heartbeat
        self.lease = lease
        self.poll_interval = poll_interval
        self.outage_wait = outage_wait
        self._conninfo = psycopg.conninfo.make_conninfo(conninfo, application_name=f"remsh master {name}"[:63])
        self._writer = Link(self._conninfo, self.label)
        self._reader = Link(self._conninfo, self.label)
        #: the group commit of this master's writes (its counts say how many transactions carried how many)
        self.group = GroupCommit(self._writer, self._fence, self._announce, self._bump, outage_wait)
        self._init_changes()
        self._closed = False
        self._ids = JobIds()
        self._stop = threading.Event()
        self._seen = 0
        #: who hears of cancels asked of this master's jobs, and which it heard of
        self._on_cancel: Optional[Callable[[str, str], None]] = None
        self._cancels_delivered: Set[str] = set()
        #: what the watcher last saw of the other masters: alive or not
        self._alive: Dict[str, bool] = {}
        self._published = pgslaves.Published()  # this master's slaves as last written
        self._adopted_from: Dict[str, str] = {}  # job id -> the dead master this one adopted it from
        self._adoption = pgadopt.Watchers()  # who takes back the work adopted; who hears of a fence
        listening: Optional[Conn] = None
        try:
            self._writer.run(self._migrate)
            listening = self._start_listening()
            self.epoch: int = self._writer.run(self._register)
        except BaseException:
            if listening is not None:
                listening.close()
            self._writer.close()
            self._reader.close()
            raise
        log.info("job store %s: master %s, epoch %d", self.label, name, self.epoch)
        self._watcher = threading.Thread(target=self._watch, args=(listening,), name="remsh-store-watch",
                                         daemon=True)
        self._watcher.start()

    # -- opening ------------------------------------------------------------------

    def _migrate(self, db: Conn) -> None:
        db.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        tables = db.execute("SELECT to_regclass('remsh_meta') IS NOT NULL, "
                            "to_regclass('remsh_jobs') IS NOT NULL").fetchone()
        assert tables is not None
        if tables[0]:
            row = db.execute("SELECT value FROM remsh_meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row is not None else 0
        elif tables[1]:
            raise StoreError(f"{self.label} has remsh_ tables but is not a remsh job store")
        else:
            version = 0
        if version > SCHEMA_VERSION:
            raise StoreError(f"the job store {self.label} has schema version {version}; this remsh "
                             f"knows up to {SCHEMA_VERSION} (a newer remsh made it)")
        while version < SCHEMA_VERSION:
            for statement in MIGRATIONS[version]:
                db.execute(statement)
            version += 1
            log.info("job store %s: schema now version %d", self.label, version)
            db.execute("INSERT INTO remsh_meta (key, value) VALUES ('schema_version', %s) "
                       "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (str(version),))

    def _register(self, db: Conn) -> int:
        """Take this master's name with a new epoch.  A live holder (its
        heartbeat within the lease) keeps it, unless it ran on this machine
        and its process is gone: a master restarted after a crash gets its
        name back at once."""
        host, pid = socket.gethostname(), os.getpid()
        pgslaves.forget(db, self.name)  # a predecessor's slaves are not ours
        row = db.execute(f"SELECT epoch, {_DB_NOW} - heartbeat, stopped, host, pid FROM remsh_masters "
                         f"WHERE name = %s FOR UPDATE", (self.name,)).fetchone()
        if row is None:
            db.execute(f"INSERT INTO remsh_masters (name, epoch, heartbeat, started, host, pid) "
                       f"VALUES (%s, 1, {_DB_NOW}, {_DB_NOW}, %s, %s)", (self.name, host, pid))
            return 1
        epoch, silent, stopped, old_host, old_pid = row
        if not stopped and silent < self.lease and not (old_host == host and not _process_alive(old_pid)):
            raise MasterNameInUse(f"a master named {self.name!r} is running on the job store {self.label} "
                                  f"(on {old_host}, heartbeat {silent:.0f}s ago): give this one another --name, "
                                  f"or wait {self.lease:.0f}s if that master is dead")
        db.execute(f"UPDATE remsh_masters SET epoch = %s, heartbeat = {_DB_NOW}, started = {_DB_NOW}, "
                   f"stopped = false, host = %s, pid = %s WHERE name = %s", (epoch + 1, host, pid, self.name))
        pgdispatch.drop_sessions(db, self.name)  # its claims died with its epoch: their origins settle them
        return int(epoch) + 1

    # -- background: notifications, the safety-net poll, the heartbeat ---------------

    def _bump(self) -> None:
        with self._changed:
            self._version += 1
            self._changed.notify_all()

    def _start_listening(self) -> Conn:
        """A connection that listens for the masters' changes."""
        conn = Link(self._conninfo, self.label).connect()
        try:
            conn.execute(f"LISTEN {CHANNEL}")
            conn.execute(f"LISTEN {CANCEL_CHANNEL}")
            self._seen = self._sequence(conn)
        except psycopg.Error as e:
            conn.close()
            raise StoreError(f"job store {self.label}: cannot listen for changes: {one_line(e)}") from e
        return conn

    @staticmethod
    def _sequence(conn: Conn) -> int:
        row = conn.execute("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM remsh_changes").fetchone()
        return 0 if row is None else int(row[0])

    def _watch(self, conn: Optional[Conn]) -> None:
        next_beat = time.monotonic() + self.heartbeat
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = self._start_listening()
                    self._bump()  # what changed while nobody listened
            except StoreError as e:
                log.warning("%s; listening again in %.1fs", e, self.poll_interval)
                if self._stop.wait(self.poll_interval):
                    return
                next_beat = self._beat_if_due(next_beat)
                continue
            try:
                next_beat = self._listen(conn, next_beat)
            except psycopg.Error as e:
                log.warning("job store %s: listening connection lost (%s)", self.label, one_line(e))
            except Exception:  # noqa: BLE001 - this thread must outlive a surprise: waiters depend on it
                log.exception("job store %s: the listening thread failed; listening again", self.label)
                if self._stop.wait(self.poll_interval):
                    return
            finally:
                conn.close()
                conn = None

    def _listen(self, conn: Conn, next_beat: float) -> float:
        seen = [self._seen, self._seen]
        while not self._stop.is_set():
            wait = max(0.01, min(self.poll_interval, next_beat - time.monotonic()))
            heard = list(conn.notifies(timeout=wait, stop_after=1))
            if heard:
                self._bump()
                if any(n.channel == CANCEL_CHANNEL for n in heard):
                    self._deliver_cancels()
            elif not self._stop.is_set():
                # the sequence moves before its write commits: a change
                # seen now is announced on this poll and the next
                value = self._sequence(conn)
                if value != seen[0] or value != seen[1]:
                    self._bump()
                seen = [seen[1], value]
            next_beat = self._beat_if_due(next_beat)
        return next_beat

    def _beat_if_due(self, next_beat: float) -> float:
        if time.monotonic() < next_beat or self._stop.is_set():
            return next_beat
        try:
            self._writer.run(self._beat)
            self._notice_masters(self.masters())
            self._deliver_cancels()  # a notification lost with a connection
            if self._adoption.adopting:
                for name, epoch in self._read(lambda db: pgadopt.dead_with_work(db, self.name, self.lease)):
                    self.adopt_master(name, epoch)  # of several masters racing, one wins
        except FencedOff:
            pass  # said once, when first found (pgadopt.Watchers.fence)
        except StoreError as e:
            log.warning("job store %s: no heartbeat written: %s", self.label, e)
        return time.monotonic() + self.heartbeat

    def _notice_masters(self, rows: List[MasterRow]) -> None:
        """Say when another master goes silent past its lease, or comes back."""
        for row in rows:
            if row.name == self.name:
                continue
            before = self._alive.get(row.name)
            self._alive[row.name] = row.alive
            if before is None or before == row.alive:
                continue
            if row.alive:
                log.warning("master %s is back (epoch %d)", row.name, row.epoch)
            elif row.stopped:
                log.info("master %s stopped", row.name)
            else:
                log.warning("master %s is dead: no heartbeat for %.0fs (lease %.0fs); its running jobs can be "
                            "adopted", row.name, row.silent_for, self.lease)

    def beat(self) -> None:
        """Write this master's heartbeat now (the store's thread does every
        ``heartbeat`` seconds).

        :raises FencedOff: this master's epoch is stale
        """
        self._writer.run(self._beat)

    def _beat(self, db: Conn) -> None:
        cur = db.execute(f"UPDATE remsh_masters SET heartbeat = {_DB_NOW} WHERE name = %s AND epoch = %s",
                         (self.name, self.epoch))
        if cur.rowcount == 0:
            raise self._fenced(db)

    # -- writing ------------------------------------------------------------------

    def _fenced(self, db: Conn) -> FencedOff:
        row = db.execute("SELECT epoch FROM remsh_masters WHERE name = %s", (self.name,)).fetchone()
        return self._stale("gone" if row is None else f"now {row[0]}")

    def _stale(self, current: str) -> FencedOff:
        error = FencedOff(f"master {self.name} on the job store {self.label}: its epoch {self.epoch} is stale "
                          f"({current}): another master has taken over its work; nothing it writes is kept")
        self._adoption.fence(error)  # before the writer hears: it must acknowledge nothing more
        return error

    def _fence(self, db: Conn) -> None:
        """The start of every write's transaction: this master's row read
        ``FOR SHARE`` (an adopter's epoch change waits for our commit), and
        :class:`FencedOff` unless its epoch is ours."""
        row = db.execute("SELECT epoch FROM remsh_masters WHERE name = %s FOR SHARE", (self.name,)).fetchone()
        if row is None or int(row[0]) != self.epoch:
            raise self._stale("gone" if row is None else f"now {row[0]}")

    @staticmethod
    def _announce(db: Conn, payload: str) -> None:
        db.execute("SELECT nextval('remsh_changes'), pg_notify(%s, %s)", (CHANNEL, payload))

    def _write(self, fn: Callable[[Conn], T], payload: str = "", *, repeatable: bool = True, size: int = 0,
               alone: bool = False) -> T:
        """``fn(db)`` committed in a transaction fenced by this master's
        epoch, which also announces the change; local waiters wake at once.
        Writes made at once share a transaction (:mod:`remsh.store.pgbatch`:
        each caller returns once its own write is committed, and a write that
        fails fails alone).  A ``repeatable`` write (storing the same whether
        it ran once or twice) waits out a database outage of up to
        :attr:`outage_wait` seconds; ``size`` is about how many bytes it writes."""
        if self._closed:
            raise StoreError(f"the job store {self.label} is closed")
        return self.group.submit(fn, payload, repeatable=repeatable, size=size, alone=alone)

    def _read(self, fn: Callable[[Conn], T]) -> T:
        if self._closed:
            raise StoreError(f"the job store {self.label} is closed")
        return self._reader.run(fn, retry=True)

    def _own(self, db: Conn, job_id: str, slave: Optional[str] = None) -> None:
        """Lock job ``job_id``'s row; :class:`NotOwner` unless it is ours
        (or ``slave``'s part of it is, claimed: :mod:`remsh.store.pgdispatch`)."""
        row = db.execute("SELECT owner FROM remsh_jobs WHERE id = %s FOR UPDATE", (job_id,)).fetchone()
        if row is None:
            raise UnknownJob(f"no job {job_id}")
        if row[0] != self.name and not (slave and pgdispatch.claimed(db, job_id, slave, self.name, self.epoch)):
            raise NotOwner(f"job {job_id} belongs to master {row[0]}, not {self.name}", owner=str(row[0]))

    def create_job(self, kind: str, spec: Dict[str, object], uid: int, names: Sequence[str],
                   *, now: Optional[float] = None) -> JobRecord:
        if kind not in KINDS:
            raise ValueError(f"unknown job kind {kind!r}")
        started = _now(now)
        spec_text = json.dumps(spec, sort_keys=True)

        def create(db: Conn) -> JobRecord:
            while True:  # another master may have taken the id in the same millisecond
                with self._lock:
                    job_id = self._ids.next(started)
                row = db.execute("INSERT INTO remsh_jobs (id, kind, spec, uid, state, started, owner, owner_epoch) "
                                 "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING RETURNING id",
                                 (job_id, kind, spec_text, uid, JOB_RUNNING, started, self.name,
                                  self.epoch)).fetchone()
                if row is not None:
                    break
            with db.cursor() as cur:
                cur.executemany("INSERT INTO remsh_job_slaves (job_id, name, ord, state) VALUES (%s, %s, %s, %s)",
                                [(job_id, name, i, SLAVE_QUEUED) for i, name in enumerate(names)])
            return JobRecord(job_id, kind, dict(spec), uid, JOB_RUNNING, started,
                             slaves={name: SlaveRecord(name) for name in names})

        return self._write(create, repeatable=False)  # a second try could make a second job

    def update_slave(self, job_id: str, name: str, *, state: Optional[str] = None,
                     exit_status: Optional[int] = None, error: Optional[str] = None,
                     errtag: Optional[str] = None, started: Optional[float] = None,
                     finished: Optional[float] = None, progress: Optional[Tuple[int, Optional[int]]] = None,
                     summary: Optional[str] = None) -> None:
        changes = slave_changes(state=state, exit_status=exit_status, error=error, errtag=errtag,
                                started=started, finished=finished, progress=progress, summary=summary)
        if not changes:
            return
        # one statement: the job's row locked, ours (or this slave's part claimed) checked, written
        self._write(lambda db: pgwrites.update_slave(db, self.name, self.epoch, job_id, name, changes), job_id)

    def append_output(self, job_id: str, name: str, stream: str, offset: int, data: bytes, *,
                      session: Optional[Tuple[str, int]] = None) -> int:
        if stream not in STREAMS:
            raise ValueError(f"unknown stream {stream!r}")
        if self._closed:
            raise StoreError(f"the job store {self.label} is closed")
        session_id, count = session if session is not None else (None, None)

        def append(db: Conn) -> int:
            try:
                row = db.execute("SELECT remsh_append(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                                 (job_id, name, stream, offset, data, self.name, self.epoch, self.max_output,
                                  CHUNK_COST, session_id, count)).fetchone()
            except psycopg.Error as e:
                refusal = self._refusal(e, job_id, name, stream, offset)
                if refusal is None:
                    raise
                raise refusal from None
            assert row is not None
            return int(row[0])

        # one statement, fenced and announced in itself: alone, one round trip
        return self._write(append, job_id, size=len(data), alone=True)

    def _refusal(self, error: psycopg.Error, job_id: str, name: str, stream: str,
                 offset: int) -> Optional[StoreError]:
        """The store's refusal that ``remsh_append`` raised as ``error``
        (no query: the transaction is aborted)."""
        state = error.sqlstate
        detail = error.diag.message_primary or ""
        if state == STALE_EPOCH:
            return self._stale("gone" if detail == "gone" else f"now {detail}")
        if state == NOT_OWNER:
            return NotOwner(f"job {job_id} belongs to master {detail}, not {self.name}", owner=detail)
        if state == NO_JOB:
            return UnknownJob(f"no job {job_id}")
        if state == NO_SLAVE:
            return UnknownJob(f"no slave {name!r} in job {job_id}")
        if state == GAP:
            return OutputGap(f"job {job_id}, {name}: {stream} chunk at offset {offset}, "
                             f"but only {detail} bytes are stored")
        return None

    def output_position(self, job_id: str, name: str) -> Tuple[int, int]:
        def read(db: Conn) -> Tuple[int, int]:
            row = db.execute("SELECT stdout_bytes, stderr_bytes FROM remsh_job_slaves "
                             "WHERE job_id = %s AND name = %s", (job_id, name)).fetchone()
            if row is None:
                raise UnknownJob(f"no slave {name!r} in job {job_id}")
            return int(row[0]), int(row[1])

        return self._read(read)

    def open_session(self, record: SessionRecord) -> None:
        opened = record.opened or _now(None)

        self._write(lambda db: pgwrites.open_session(db, self.name, self.epoch, record, opened), record.job_id)

    def close_session(self, session_id: str) -> None:
        self._write(lambda db: db.execute("DELETE FROM remsh_sessions WHERE id = %s", (session_id,)))

    def open_sessions(self) -> List[SessionRecord]:
        """This master's recorded sessions, oldest first: those of the jobs
        it owns (its own from before a restart under the same name, and
        those of masters it adopted); another live master's are not ours to
        take back."""
        def read(db: Conn) -> List[SessionRecord]:
            rows = db.execute("SELECT id, name, job_id, op, request_box, reply_base, received, opened "
                              "FROM remsh_sessions WHERE owner = %s ORDER BY opened, id", (self.name,)).fetchall()
            return [SessionRecord(r[0], r[1], r[2], r[3], int(r[4]), int(r[5]), int(r[6]), float(r[7]))
                    for r in rows]

        return self._read(read)

    def finish_job(self, job_id: str, state: str, *, now: Optional[float] = None) -> None:
        if state not in JOB_FINAL_STATES:
            raise ValueError(f"not a final job state: {state!r}")
        finished = _now(now)

        def finish(db: Conn) -> None:
            self._own(db, job_id)
            db.execute("UPDATE remsh_jobs SET state = %s, finished = %s WHERE id = %s", (state, finished, job_id))

        self._write(finish, job_id)

    # -- reading ------------------------------------------------------------------

    @staticmethod
    def _slaves_of(db: Conn, job_ids: Sequence[str]) -> Dict[str, Dict[str, SlaveRecord]]:
        by_job: Dict[str, Dict[str, SlaveRecord]] = {job_id: {} for job_id in job_ids}
        if not job_ids:
            return by_job
        rows = db.execute(f"SELECT job_id, {', '.join(_SLAVE_COLUMNS)} FROM remsh_job_slaves "
                          f"WHERE job_id = ANY(%s) ORDER BY job_id, ord", (list(job_ids),))
        for row in rows:
            values = dict(zip(_SLAVE_COLUMNS, row[1:]))
            for column in ("stdout_bytes", "stderr_bytes", "progress_done", "progress_total"):
                if values[column] is not None:
                    values[column] = int(values[column])
            values["truncated"] = bool(values["truncated"])
            by_job[row[0]][values["name"]] = SlaveRecord(**values)
        return by_job

    @staticmethod
    def _job_of(row: Tuple[Any, ...], slaves: Dict[str, SlaveRecord]) -> JobRecord:
        job_id, kind, spec, uid, state, started, finished = row
        return JobRecord(job_id, kind, json.loads(spec), int(uid), state, started, finished, slaves)

    def get_job(self, job_id: str) -> JobRecord:
        def read(db: Conn) -> JobRecord:
            row = db.execute(f"SELECT {_JOB_COLUMNS} FROM remsh_jobs WHERE id = %s", (job_id,)).fetchone()
            if row is None:
                raise UnknownJob(f"no job {job_id}")
            return self._job_of(row, self._slaves_of(db, [job_id])[job_id])

        return self._read(read)

    def list_jobs(self, *, running: bool = False, limit: Optional[int] = None) -> List[JobRecord]:
        def read(db: Conn) -> List[JobRecord]:
            query = f"SELECT {_JOB_COLUMNS} FROM remsh_jobs"
            params: List[object] = []
            if running:
                query += " WHERE state = %s"
                params.append(JOB_RUNNING)
            query += " ORDER BY id DESC"
            if limit is not None:
                query += " LIMIT %s"
                params.append(limit)
            rows = db.execute(query, params).fetchall()
            slaves = self._slaves_of(db, [row[0] for row in rows])
            return [self._job_of(row, slaves[row[0]]) for row in rows]

        return self._read(read)

    def read_output(self, job_id: str, name: Optional[str] = None, *, after: int = -1,
                    limit: int = 1000) -> List[Tuple[str, OutputChunk]]:
        def read(db: Conn) -> List[Tuple[str, OutputChunk]]:
            query = "SELECT name, seq, stream, pos, data FROM remsh_output WHERE job_id = %s AND seq > %s"
            params: List[object] = [job_id, after]
            if name is not None:
                query += " AND name = %s"
                params.append(name)
            query += " ORDER BY seq LIMIT %s"
            params.append(limit)
            return [(row[0], OutputChunk(int(row[1]), row[2], int(row[3]), bytes(row[4])))
                    for row in db.execute(query, params)]

        return self._read(read)

    def prune(self, *, now: Optional[float] = None) -> int:
        before = _now(now) - self.keep

        def prune(db: Conn) -> int:
            cur = db.execute("DELETE FROM remsh_jobs WHERE finished IS NOT NULL AND finished < %s", (before,))
            return int(cur.rowcount)

        count = self._write(prune)
        if count:
            log.info("job store %s: %d job(s) past the retention removed", self.label, count)
        return count

    # -- the masters ----------------------------------------------------------------

    def masters(self) -> List[MasterRow]:
        """Every master the store has known, by name."""
        def read(db: Conn) -> List[MasterRow]:
            rows = db.execute(f"SELECT name, epoch, {_DB_NOW} - heartbeat, stopped FROM remsh_masters "
                              f"ORDER BY name").fetchall()
            return [MasterRow(r[0], int(r[1]), float(r[2]), bool(r[3]), not r[3] and r[2] < self.lease)
                    for r in rows]

        return self._read(read)

    def adopt_master(self, name: str, epoch: int) -> Optional[List[str]]:
        """Take over the running jobs of master ``name`` if it is still at
        ``epoch`` (as :meth:`masters` showed it) and dead (stopped, or
        silent past the lease): its epoch is raised, which fences it off,
        and its running jobs and their sessions become this master's.  The ids adopted; ``None``
        when the compare-and-set failed (it is alive, or another master
        adopted it first)."""
        if name == self.name:
            raise ValueError("a master does not adopt itself")

        def adopt(db: Conn) -> Optional[Tuple[List[str], List[int]]]:
            cur = db.execute(f"UPDATE remsh_masters SET epoch = epoch + 1, stopped = true "
                             f"WHERE name = %s AND epoch = %s AND (stopped OR {_DB_NOW} - heartbeat >= %s)",
                             (name, epoch, self.lease))
            if cur.rowcount != 1:
                return None
            moved = pgadopt.move_work(db, name, self.name, self.epoch)
            pgslaves.forget(db, name)
            return moved

        moved = self._write(adopt, repeatable=False)  # a second try would lose the race it won
        adopted = None if moved is None else moved[0]
        if moved is not None and moved[1]:
            log.warning("job store %s: master %s's claims %s of other masters' parts are %s's", self.label,
                        name, ", ".join(map(str, moved[1])), self.name)
        if adopted is not None:
            log.warning("job store %s: master %s (epoch %d) is dead; %d running job(s) adopted by %s",
                        self.label, name, epoch, len(adopted), self.name)
            with self._lock:
                self._adopted_from.update((job_id, name) for job_id in adopted)
            self._adoption.adopted(adopted)
        return adopted

    def adoption(self, job_id: str) -> Optional[str]:
        """How job ``job_id`` came to this master when it adopted it from a
        dead one ("adopted by master B from master A"); else ``None``."""
        with self._lock:
            old = self._adopted_from.get(job_id)
        return None if old is None else f"adopted by master {self.name} from master {old}"

    def watch_adoptions(self, adopted: Callable[[List[str]], None], fenced: Callable[[FencedOff], None]) -> None:
        """From now on the heartbeat adopts the work of dead masters and
        calls ``adopted(job_ids)`` after each adoption (this master's from
        then on); ``fenced(error)`` is called once, when this master finds
        its own epoch stale.  See :mod:`remsh.store.pgadopt`."""
        self._adoption.watch(adopted, fenced)

    def find_session(self, session_id: str) -> Optional[pgadopt.SessionHolder]:
        """The recorded session ``session_id`` and the master holding it."""
        return self._read(lambda db: pgadopt.find_session(db, session_id, self.lease))

    # -- the registry of slaves (remsh.slaveregistry) ----------------------------------

    def publish_slaves(self, rows: Sequence[Mapping[str, object]]) -> None:
        """This master's slaves are now ``rows`` (``remsh ls`` rows, each
        with ``name``): written fenced by its epoch, only what changed since
        the last call."""
        new, upserts, gone, replace = self._published.changes(rows)
        if not (upserts or gone or replace):
            return
        self._published.rows = None  # unknown until the write commits
        self._write(lambda db: pgslaves.write(db, self.name, upserts, gone, replace))
        self._published.rows = new

    def cluster_slaves(self) -> List[Dict[str, Any]]:
        """The slaves of the other live masters, each row with ``master``."""
        return self._read(lambda db: pgslaves.others(db, self.name, self.lease))

    # -- work crossing masters (remsh.crossmaster; the SQL: remsh.store.pgdispatch) ------

    def dispatch_write(self, fn: Callable[..., T], *args: Any, repeatable: bool = True) -> T:
        """``fn(db, name, epoch, *args)`` in a write fenced by this master's epoch."""
        size = sum(len(a) for a in args if isinstance(a, (bytes, bytearray)))
        return self._write(lambda db: fn(db, self.name, self.epoch, *args), repeatable=repeatable, size=size)

    def dispatch_read(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(db, *args)`` in a read."""
        return self._read(lambda db: fn(db, *args))

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    # -- cancels asked of any master -------------------------------------------------

    def request_cancel(self, job_id: str, reason: str) -> Optional[str]:
        """Ask the master that runs job ``job_id`` to cancel it (it hears
        of it through :meth:`watch_cancels`, at once by ``NOTIFY``, else
        within a heartbeat).  Its name; ``None`` when the job has ended.

        :raises UnknownJob: no such job
        """
        def request(db: Conn) -> Optional[str]:
            row = db.execute("UPDATE remsh_jobs SET cancel_reason = coalesce(cancel_reason, %s) "
                             "WHERE id = %s AND state = %s RETURNING owner", (reason, job_id, JOB_RUNNING)).fetchone()
            if row is None:
                if db.execute("SELECT 1 FROM remsh_jobs WHERE id = %s", (job_id,)).fetchone() is None:
                    raise UnknownJob(f"no job {job_id}")
                return None
            db.execute("SELECT pg_notify(%s, %s)", (CANCEL_CHANNEL, job_id))
            return str(row[0])

        return self._write(request, job_id)

    def watch_cancels(self, callback: Callable[[str, str], None]) -> None:
        """Call ``callback(job_id, reason)`` once for each cancel asked
        (:meth:`request_cancel`, on any master) of a running job of this
        master's: for those asked already now, later from the store's
        thread.  An exception from it is logged."""
        self._on_cancel = callback
        self._deliver_cancels()

    def _deliver_cancels(self) -> None:
        callback = self._on_cancel
        if callback is None:
            return
        try:
            asked = self._read(lambda db: db.execute(
                "SELECT id, cancel_reason FROM remsh_jobs WHERE owner = %s AND state = %s "
                "AND cancel_reason IS NOT NULL ORDER BY id", (self.name, JOB_RUNNING)).fetchall())
        except StoreError as e:
            log.warning("job store %s: cannot read the cancels asked: %s", self.label, e)
            return
        for job_id, reason in asked:
            with self._lock:
                if job_id in self._cancels_delivered:
                    continue
                self._cancels_delivered.add(job_id)
            try:
                callback(str(job_id), str(reason))
            except Exception:  # noqa: BLE001 - the caller's; the store goes on
                log.exception("job %s: the cancel asked could not be delivered", job_id)

    # -- change notification ----------------------------------------------------------

    def close(self) -> None:
        with self._changed:
            if self._closed:
                return
            self._closed = True
            self._changed.notify_all()
        self._stop.set()
        try:
            self._writer.run(self._stopped)
        except StoreError as e:
            log.warning("job store %s: could not record this master's stop: %s", self.label, e)
        self._writer.close()
        self._reader.close()
        self._watcher.join(self.poll_interval + CONNECT_TIMEOUT)

    def _stopped(self, db: Conn) -> None:
        cur = db.execute("UPDATE remsh_masters SET stopped = true WHERE name = %s AND epoch = %s",
                         (self.name, self.epoch))
        if cur.rowcount:
            pgslaves.forget(db, self.name)
        # every listener wakes: the others see this master's slaves gone, ours its stop (at once, not a poll later)
        db.execute("SELECT pg_notify(%s, '')", (CHANNEL,))

    def __enter__(self) -> "PostgresJobStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _now(value: Optional[float]) -> float:
    return now() if value is None else value


def _process_alive(pid: Optional[int]) -> bool:
    """Whether process ``pid`` of this machine exists (unknown: yes).  A
    zombie -- a killed master its parent has not reaped yet, which can last
    a while under a busy or lazy init -- is dead: its name is free."""
    if not pid or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read(4096)
    except OSError:
        return True  # no /proc (not Linux), or gone this instant: as kill said
    # "PID (COMM) STATE ...": COMM may hold spaces and parentheses, the last ')' ends it
    return stat_line[stat_line.rfind(b")") + 2:][:1] != b"Z"
