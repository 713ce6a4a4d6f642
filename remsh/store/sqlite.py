"""The default job store: one SQLite file in the master's state directory.

SQLite through the standard library, in WAL mode so that readers (``remsh
jobs`` answered while output is being appended) never wait for the writer.
A commit in WAL mode with ``synchronous=NORMAL`` survives the master process
being killed; with ``durable=True`` (``synchronous=FULL``) it survives a
power cut as well, at the price of an fsync per commit.

One master per store: the store holds an exclusive ``flock`` on
``PATH.lock`` for as long as it is open, and a second one is refused with a
:class:`~remsh.store.base.StoreError` (several masters share a server
database instead).

The schema is versioned with ``PRAGMA user_version``; :data:`MIGRATIONS`
lists the steps from each version to the next, applied in one transaction
when an older file is opened.  A file from a newer remsh is refused rather
than guessed at.

Output is kept per chunk (a row per chunk as it was appended, with its
stream and offset), up to ``max_output`` bytes per slave per job, each
chunk counting :data:`CHUNK_COST` bytes more; past it
the chunk is counted (the stream's position moves on, so exactly-once still
holds) but not kept, and the record says ``truncated``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from remsh.files import O_CLOEXEC, O_NOFOLLOW
from remsh.store.base import (DEFAULT_KEEP_SECONDS, DEFAULT_MAX_OUTPUT, JOB_FINAL_STATES, JOB_RUNNING, KINDS,
                              SLAVE_QUEUED, STREAMS, ChangeCounter, JobIds, JobRecord, OutputChunk, OutputGap,
                              SessionRecord, SlaveRecord, StoreError, UnknownJob, now, slave_changes)

log = logging.getLogger(__name__)

#: The schema this code writes.
SCHEMA_VERSION = 3

#: ``MIGRATIONS[n]`` turns a version ``n`` file into version ``n + 1``.
MIGRATIONS: Dict[int, Sequence[str]] = {
    0: (
        """CREATE TABLE jobs (
               id TEXT PRIMARY KEY,
               kind TEXT NOT NULL,
               spec TEXT NOT NULL,
               uid INTEGER NOT NULL,
               state TEXT NOT NULL,
               started REAL NOT NULL,
               finished REAL
           )""",
        "CREATE INDEX jobs_state ON jobs (state)",
        "CREATE INDEX jobs_finished ON jobs (finished)",
        """CREATE TABLE job_slaves (
               job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
               name TEXT NOT NULL,
               state TEXT NOT NULL,
               exit_status INTEGER,
               error TEXT,
               errtag TEXT,
               started REAL,
               finished REAL,
               stdout_bytes INTEGER NOT NULL DEFAULT 0,
               stderr_bytes INTEGER NOT NULL DEFAULT 0,
               kept_bytes INTEGER NOT NULL DEFAULT 0,
               truncated INTEGER NOT NULL DEFAULT 0,
               progress_done INTEGER,
               progress_total INTEGER,
               PRIMARY KEY (job_id, name)
           )""",
        """CREATE TABLE output (
               job_id TEXT NOT NULL,
               seq INTEGER NOT NULL,
               name TEXT NOT NULL,
               stream TEXT NOT NULL,
               offset INTEGER NOT NULL,
               data BLOB NOT NULL,
               PRIMARY KEY (job_id, seq),
               FOREIGN KEY (job_id, name) REFERENCES job_slaves (job_id, name) ON DELETE CASCADE
           )""",
    ),
    # what a transfer moved, in words ("sent to /srv/x", "synced: ...")
    1: ("ALTER TABLE job_slaves ADD COLUMN summary TEXT",),
    # the sessions that carry running commands (remsh.store.base.SessionRecord)
    2: (
        """CREATE TABLE sessions (
               id TEXT PRIMARY KEY,
               name TEXT NOT NULL,
               job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
               op TEXT NOT NULL,
               request_box INTEGER NOT NULL,
               reply_base INTEGER NOT NULL,
               received INTEGER NOT NULL,
               opened REAL NOT NULL
           )""",
        "CREATE INDEX sessions_job ON sessions (job_id)",
    ),
}

#: What a stored chunk counts against ``max_output`` beyond its bytes (its
#: row and index entry take about this much): output that comes a byte at a
#: time cannot make the store many times larger than the cap.
CHUNK_COST = 64

_SLAVE_COLUMNS = ("name", "state", "exit_status", "error", "errtag", "started", "finished",
                  "stdout_bytes", "stderr_bytes", "truncated", "progress_done", "progress_total", "summary")


class SqliteJobStore(ChangeCounter):
    """A :class:`~remsh.store.base.JobStore` in one SQLite file.

    ``path`` is made (mode 0600) when missing; its directory must exist.
    ``keep`` is the retention in seconds of ended jobs, ``max_output`` the
    bytes of output kept per slave per job.

    Raises :class:`StoreError` with one line saying what is wrong when the
    file is not a database, is damaged, has a newer schema, cannot be
    written, or is held by another master.
    """

    def __init__(self, path: str, *, keep: float = DEFAULT_KEEP_SECONDS, max_output: int = DEFAULT_MAX_OUTPUT,
                 durable: bool = False) -> None:
        self.path = path
        self.keep = keep
        self.max_output = max_output
        self._init_changes()
        self._ids = JobIds()
        self._closed = False
        self._lock_fd = self._take_lock(path + ".lock")
        try:
            self._db = self._open(path, durable)
        except BaseException:
            os.close(self._lock_fd)
            raise

    # -- opening ------------------------------------------------------------------

    @staticmethod
    def _take_lock(lock_path: str) -> int:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0o600)
        except OSError as e:
            raise StoreError(f"cannot open the job store's lock {lock_path}: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise StoreError(f"the job store {lock_path[:-5]} is in use by another master "
                             f"(a SQLite store serves one master)") from e
        return fd

    def _open(self, path: str, durable: bool) -> sqlite3.Connection:
        if not os.path.exists(path):
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600))
            except OSError as e:
                raise StoreError(f"cannot create the job store {path}: {e.strerror}") from e
        try:
            db = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the job store {path}: {e}") from e
        try:
            db.execute("PRAGMA foreign_keys = ON")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("job store %s: journal mode %s, not WAL", path, mode)
            db.execute("PRAGMA synchronous = %s" % ("FULL" if durable else "NORMAL"))
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise StoreError(f"the job store {path} is damaged: {check}")
            self._migrate(db, path)
        except sqlite3.DatabaseError as e:
            db.close()
            raise StoreError(f"the job store {path} is not a usable database: {e}") from e
        except BaseException:
            db.close()
            raise
        return db

    @staticmethod
    def _migrate(db: sqlite3.Connection, path: str) -> None:
        db.execute("BEGIN IMMEDIATE")  # also proves the file can be written
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"the job store {path} has schema version {version}; this remsh "
                                 f"knows up to {SCHEMA_VERSION} (a newer remsh made it)")
            if version == 0 and db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                raise StoreError(f"{path} is a SQLite database but not a remsh job store")
            while version < SCHEMA_VERSION:
                for statement in MIGRATIONS[version]:
                    db.execute(statement)
                version += 1
                log.info("job store %s: schema now version %d", path, version)
            db.execute("PRAGMA user_version = %d" % version)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    # -- writing ------------------------------------------------------------------

    def _write(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(db, *args)`` in one immediate transaction; wake waiters."""
        with self._lock:
            if self._closed:
                raise StoreError(f"the job store {self.path} is closed")
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(db, *args)
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                raise StoreError(f"job store {self.path}: {e}") from e
            self._version += 1
            self._changed.notify_all()
            return result

    def _read(self, fn: Any, *args: Any) -> Any:
        with self._lock:
            if self._closed:
                raise StoreError(f"the job store {self.path} is closed")
            try:
                return fn(self._db, *args)
            except sqlite3.Error as e:
                raise StoreError(f"job store {self.path}: {e}") from e

    def create_job(self, kind: str, spec: Dict[str, object], uid: int, names: Sequence[str],
                   *, now: Optional[float] = None) -> JobRecord:
        if kind not in KINDS:
            raise ValueError(f"unknown job kind {kind!r}")
        started = _now(now)
        spec_text = json.dumps(spec, sort_keys=True)

        def create(db: sqlite3.Connection) -> JobRecord:
            while True:
                job_id = self._ids.next(started)
                if db.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
                    break
            db.execute("INSERT INTO jobs (id, kind, spec, uid, state, started) VALUES (?, ?, ?, ?, ?, ?)",
                       (job_id, kind, spec_text, uid, JOB_RUNNING, started))
            db.executemany("INSERT INTO job_slaves (job_id, name, state) VALUES (?, ?, ?)",
                           [(job_id, name, SLAVE_QUEUED) for name in names])
            return JobRecord(job_id, kind, dict(spec), uid, JOB_RUNNING, started,
                             slaves={name: SlaveRecord(name) for name in names})

        record: JobRecord = self._write(create)
        return record

    def update_slave(self, job_id: str, name: str, *, state: Optional[str] = None,
                     exit_status: Optional[int] = None, error: Optional[str] = None,
                     errtag: Optional[str] = None, started: Optional[float] = None,
                     finished: Optional[float] = None, progress: Optional[Tuple[int, Optional[int]]] = None,
                     summary: Optional[str] = None) -> None:
        changes = slave_changes(state=state, exit_status=exit_status, error=error, errtag=errtag,
                                started=started, finished=finished, progress=progress, summary=summary)
        if not changes:
            return
        assignments = ", ".join(f"{column} = ?" for column in changes)

        def update(db: sqlite3.Connection) -> None:
            cur = db.execute(f"UPDATE job_slaves SET {assignments} WHERE job_id = ? AND name = ?",
                             (*changes.values(), job_id, name))
            if cur.rowcount == 0:
                raise UnknownJob(f"no slave {name!r} in job {job_id}")

        self._write(update)

    def append_output(self, job_id: str, name: str, stream: str, offset: int, data: bytes, *,
                      session: Optional[Tuple[str, int]] = None) -> int:
        if stream not in STREAMS:
            raise ValueError(f"unknown stream {stream!r}")
        column = f"{stream}_bytes"

        def append(db: sqlite3.Connection) -> int:
            row = db.execute(f"SELECT {column}, kept_bytes FROM job_slaves WHERE job_id = ? AND name = ?",
                             (job_id, name)).fetchone()
            if row is None:
                raise UnknownJob(f"no slave {name!r} in job {job_id}")
            if session is not None:  # committed with the output it covers
                db.execute("UPDATE sessions SET received = ? WHERE id = ?", (session[1], session[0]))
            position, kept = row
            if offset > position:
                raise OutputGap(f"job {job_id}, {name}: {stream} chunk at offset {offset}, "
                                f"but only {position} bytes are stored")
            fresh = data[position - offset:]
            if not fresh:
                return int(position)
            room = max(0, self.max_output - kept - CHUNK_COST)
            keep = fresh[:room]
            if keep:
                seq = db.execute("SELECT coalesce(max(seq), -1) + 1 FROM output WHERE job_id = ?",
                                 (job_id,)).fetchone()[0]
                db.execute("INSERT INTO output (job_id, seq, name, stream, offset, data) VALUES (?, ?, ?, ?, ?, ?)",
                           (job_id, seq, name, stream, position, keep))
            truncated = len(keep) < len(fresh)
            db.execute(f"UPDATE job_slaves SET {column} = ?, kept_bytes = ?, truncated = truncated OR ? "
                       f"WHERE job_id = ? AND name = ?",
                       (position + len(fresh), kept + (len(keep) + CHUNK_COST if keep else 0),
                        int(truncated), job_id, name))
            return int(position + len(fresh))

        result: int = self._write(append)
        return result

    def output_position(self, job_id: str, name: str) -> Tuple[int, int]:
        def read(db: sqlite3.Connection) -> Tuple[int, int]:
            row = db.execute("SELECT stdout_bytes, stderr_bytes FROM job_slaves WHERE job_id = ? AND name = ?",
                             (job_id, name)).fetchone()
            if row is None:
                raise UnknownJob(f"no slave {name!r} in job {job_id}")
            return int(row[0]), int(row[1])

        result: Tuple[int, int] = self._read(read)
        return result

    def open_session(self, record: SessionRecord) -> None:
        opened = record.opened or _now(None)

        def write(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR REPLACE INTO sessions (id, name, job_id, op, request_box, reply_base, received, "
                       "opened) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (record.id, record.name, record.job_id, record.op, record.request_box,
                        record.reply_base, record.received, opened))

        self._write(write)

    def close_session(self, session_id: str) -> None:
        self._write(lambda db: db.execute("DELETE FROM sessions WHERE id = ?", (session_id,)))

    def publish_slaves(self, rows: Sequence[Mapping[str, object]]) -> None:
        """Nothing to share: one master per SQLite store, whose own
        slaves its ``remsh ls`` lists from memory."""

    def cluster_slaves(self) -> List[Dict[str, Any]]:
        """No other master shares this store: none."""
        return []

    def open_sessions(self) -> List[SessionRecord]:
        def read(db: sqlite3.Connection) -> List[SessionRecord]:
            rows = db.execute("SELECT id, name, job_id, op, request_box, reply_base, received, opened "
                              "FROM sessions ORDER BY opened, rowid").fetchall()
            return [SessionRecord(*row) for row in rows]

        result: List[SessionRecord] = self._read(read)
        return result

    def finish_job(self, job_id: str, state: str, *, now: Optional[float] = None) -> None:
        if state not in JOB_FINAL_STATES:
            raise ValueError(f"not a final job state: {state!r}")
        finished = _now(now)

        def finish(db: sqlite3.Connection) -> None:
            cur = db.execute("UPDATE jobs SET state = ?, finished = ? WHERE id = ?", (state, finished, job_id))
            if cur.rowcount == 0:
                raise UnknownJob(f"no job {job_id}")

        self._write(finish)

    # -- reading ------------------------------------------------------------------

    @staticmethod
    def _slaves_of(db: sqlite3.Connection, job_ids: Sequence[str]) -> Dict[str, Dict[str, SlaveRecord]]:
        by_job: Dict[str, Dict[str, SlaveRecord]] = {job_id: {} for job_id in job_ids}
        if not job_ids:
            return by_job
        marks = ", ".join("?" for _ in job_ids)
        rows = db.execute(f"SELECT job_id, {', '.join(_SLAVE_COLUMNS)} FROM job_slaves "
                          f"WHERE job_id IN ({marks}) ORDER BY job_id, rowid", tuple(job_ids))
        for row in rows:
            values = dict(zip(_SLAVE_COLUMNS, row[1:]))
            values["truncated"] = bool(values["truncated"])
            by_job[row[0]][values["name"]] = SlaveRecord(**values)
        return by_job

    @staticmethod
    def _job_of(row: Tuple[Any, ...], slaves: Dict[str, SlaveRecord]) -> JobRecord:
        job_id, kind, spec, uid, state, started, finished = row
        return JobRecord(job_id, kind, json.loads(spec), uid, state, started, finished, slaves)

    def get_job(self, job_id: str) -> JobRecord:
        def read(db: sqlite3.Connection) -> JobRecord:
            row = db.execute("SELECT id, kind, spec, uid, state, started, finished FROM jobs WHERE id = ?",
                             (job_id,)).fetchone()
            if row is None:
                raise UnknownJob(f"no job {job_id}")
            return self._job_of(row, self._slaves_of(db, [job_id])[job_id])

        result: JobRecord = self._read(read)
        return result

    def list_jobs(self, *, running: bool = False, limit: Optional[int] = None) -> List[JobRecord]:
        def read(db: sqlite3.Connection) -> List[JobRecord]:
            query = "SELECT id, kind, spec, uid, state, started, finished FROM jobs"
            params: List[object] = []
            if running:
                query += " WHERE state = ?"
                params.append(JOB_RUNNING)
            query += " ORDER BY id DESC"
            if limit is not None:
                query += " LIMIT ?"
                params.append(limit)
            rows = db.execute(query, params).fetchall()
            slaves = self._slaves_of(db, [row[0] for row in rows])
            return [self._job_of(row, slaves[row[0]]) for row in rows]

        result: List[JobRecord] = self._read(read)
        return result

    def read_output(self, job_id: str, name: Optional[str] = None, *, after: int = -1,
                    limit: int = 1000) -> List[Tuple[str, OutputChunk]]:
        def read(db: sqlite3.Connection) -> List[Tuple[str, OutputChunk]]:
            query = "SELECT name, seq, stream, offset, data FROM output WHERE job_id = ? AND seq > ?"
            params: List[object] = [job_id, after]
            if name is not None:
                query += " AND name = ?"
                params.append(name)
            query += " ORDER BY seq LIMIT ?"
            params.append(limit)
            return [(row[0], OutputChunk(row[1], row[2], row[3], bytes(row[4])))
                    for row in db.execute(query, params)]

        result: List[Tuple[str, OutputChunk]] = self._read(read)
        return result

    def prune(self, *, now: Optional[float] = None) -> int:
        before = _now(now) - self.keep

        def prune(db: sqlite3.Connection) -> int:
            cur = db.execute("DELETE FROM jobs WHERE finished IS NOT NULL AND finished < ?", (before,))
            return int(cur.rowcount)

        count: int = self._write(prune)
        if count:
            log.info("job store %s: %d job(s) past the retention removed", self.path, count)
        return count

    # -- change notification ----------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._changed.notify_all()
            try:
                self._db.close()
            finally:
                os.close(self._lock_fd)

    def __enter__(self) -> "SqliteJobStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _now(value: Optional[float]) -> float:
    return now() if value is None else value
