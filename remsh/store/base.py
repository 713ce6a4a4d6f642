"""What a job store holds and promises, whatever database keeps it.

A *job* is one ``run``, ``put`` or ``get`` given to a master: an id, what
was asked, who asked, when, its state, and per slave a record of what
happened there -- including the command's output, stdout and stderr kept
apart and in the order they came, byte for byte.

The store is the one place that state outlives a master process, so it is
written before anything is acknowledged: output is appended *by position*
(:meth:`JobStore.append_output` takes the offset of the chunk's first byte
in its stream), which makes a chunk that arrives twice -- a slave re-sending
what a master that died had not acknowledged -- land once, and a chunk that
skips ahead an error rather than a silent hole.

The interface is narrow on purpose (a handful of calls, records out, no
cursor or connection leaks through it) so that a server database can back
several masters with the same calls; :mod:`remsh.store.sqlite` is the
default, one master per store.

The store also keeps the *sessions* that carry a job's command
(:class:`SessionRecord`, :meth:`JobStore.open_session`): enough for a master
started again on the same store to take the commands of the one that
stopped back from their slaves (:mod:`remsh.jobadopt`).  A session's count
of committed boxes moves in the same transaction as the output it covers
(:meth:`JobStore.append_output` with ``session``), so that the slave,
told that count, re-sends exactly what the store does not have.

Job ids are short and sort by start time: the start time in milliseconds
and a sequence number, both in Crockford's base 32, e.g. ``01jcz3v8qd-0``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Protocol, Sequence, Tuple, TypeVar

from remsh.errors import LocalError, UsageError

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Job states.
JOB_RUNNING = "running"
JOB_DONE = "done"
JOB_FAILED = "failed"
JOB_CANCELLED = "cancelled"
JOB_STATES = (JOB_RUNNING, JOB_DONE, JOB_FAILED, JOB_CANCELLED)
JOB_FINAL_STATES = (JOB_DONE, JOB_FAILED, JOB_CANCELLED)

#: Per-slave states.
SLAVE_QUEUED = "queued"
SLAVE_RUNNING = "running"
SLAVE_AWAY = "away"
SLAVE_OK = "ok"
SLAVE_FAILED = "failed"
SLAVE_LOST = "lost"
SLAVE_CANCELLED = "cancelled"
SLAVE_SKIPPED = "skipped"
SLAVE_STATES = (SLAVE_QUEUED, SLAVE_RUNNING, SLAVE_AWAY, SLAVE_OK, SLAVE_FAILED, SLAVE_LOST,
                SLAVE_CANCELLED, SLAVE_SKIPPED)
SLAVE_FINAL_STATES = (SLAVE_OK, SLAVE_FAILED, SLAVE_LOST, SLAVE_CANCELLED, SLAVE_SKIPPED)

#: Job kinds.
KINDS = ("run", "put", "get")

#: Output streams, as stored.
STDOUT = "stdout"
STDERR = "stderr"
STREAMS = (STDOUT, STDERR)

#: Defaults of ``remsh master --keep-jobs`` and ``--max-job-output``.
DEFAULT_KEEP_SECONDS = 7 * 86400.0
DEFAULT_MAX_OUTPUT = 64 << 20


class StoreError(LocalError):
    """The job store cannot be opened, read or written (corrupt file,
    unwritable directory, a schema newer than this remsh, a second master on
    a single-master store); the database's own error is chained."""


class StoreAway(StoreError):
    """The database is away: the connection broke under a call, or none could
    be made.  Unlike the other store errors, the same call may succeed once
    the database is back (see :func:`through_outage`)."""


def through_outage(fn: Callable[[], T], store: object, what: str,
                   waiting: Optional[Callable[[], object]] = None) -> T:
    """``fn()``, called again while the store is away (:class:`StoreAway`),
    for up to the store's ``outage_wait`` seconds (none for a store without
    one): a database restart is ridden out by what must not give up on the
    first refused call.  ``what`` names the work in the log; ``waiting()``
    is called before each new try (to tell someone who waits that we do).

    :raises StoreAway: still away past that time
    """
    wait = float(getattr(store, "outage_wait", 0.0))
    deadline: Optional[float] = None
    while True:
        try:
            return fn()
        except StoreAway as e:
            now = time.monotonic()
            if deadline is None:
                deadline = now + wait
                if wait > 0:
                    log.warning("%s: the job store is away (%s); trying again for up to %.0fs", what, e, wait)
            if now >= deadline or getattr(store, "closed", False):
                raise
            time.sleep(min(_AWAY_POLL, deadline - now))
            if waiting is not None:
                waiting()


#: How often :func:`through_outage` tries again.
_AWAY_POLL = 0.2


class UnknownJob(StoreError):
    """No job with that id is in the store (never was, or pruned)."""


class OutputGap(StoreError):
    """A chunk of output starts past the end of what is stored: bytes in
    between were never given to the store.  Storing it would leave a hole."""


@dataclasses.dataclass
class SlaveRecord:
    """What one job did on one slave."""

    name: str
    state: str = SLAVE_QUEUED
    exit_status: Optional[int] = None
    error: Optional[str] = None
    errtag: Optional[str] = None
    started: Optional[float] = None
    finished: Optional[float] = None
    #: every byte the command wrote, stored or not (positions in the streams)
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    #: True once output past the store's limit was counted but not kept
    truncated: bool = False
    progress_done: Optional[int] = None
    progress_total: Optional[int] = None
    #: for a transfer: what was moved, in words
    summary: Optional[str] = None

    def to_json(self) -> Dict[str, object]:
        """The record as the command line's and the web API's JSON give it."""
        return {"state": self.state, "exit_status": self.exit_status, "error": self.error,
                "stdout_bytes": self.stdout_bytes, "stderr_bytes": self.stderr_bytes,
                "started": self.started, "finished": self.finished, "truncated": self.truncated}


@dataclasses.dataclass
class JobRecord:
    """One job: what was asked, by whom, when, and what became of it."""

    id: str
    kind: str
    #: what the job does: ``argv`` for run, ``paths`` for put/get, and the
    #: target options (``targets``, ``where``, ...), as JSON-able values
    spec: Dict[str, object]
    uid: int
    state: str
    started: float
    finished: Optional[float] = None
    slaves: Dict[str, SlaveRecord] = dataclasses.field(default_factory=dict)

    @property
    def finished_state(self) -> bool:
        return self.state in JOB_FINAL_STATES

    def to_json(self) -> Dict[str, object]:
        """The record as ``remsh jobs --json`` prints it."""
        out: Dict[str, object] = {"id": self.id, "kind": self.kind, "state": self.state,
                                  "started": self.started, "finished": self.finished, "uid": self.uid}
        for key, value in self.spec.items():
            out.setdefault(key, value)
        out["slaves"] = {name: rec.to_json() for name, rec in self.slaves.items()}
        return out


@dataclasses.dataclass(frozen=True)
class OutputChunk:
    """A stored piece of a slave's output: its place in the job's order
    (``seq``), its stream, the offset of its first byte in that stream."""

    seq: int
    stream: str
    offset: int
    data: bytes


@dataclasses.dataclass
class SessionRecord:
    """A session (:mod:`remsh.session`) that carries one job's command on
    one slave, as the store keeps it while the command runs.

    The id is a bearer secret (whoever names it resumes the session): a
    store keeps it where only the master's user can read it and never
    shows it in a job's record; a master compares it in constant time.
    """

    #: the session id (32 hex digits)
    id: str
    #: the slave's name (a resume must come from the same name)
    name: str
    job_id: str
    #: the operation in flight (``execute``)
    op: str
    #: the number of the request box among the master's session boxes: a
    #: slave that received no more than this many never saw the request
    request_box: int
    #: how many of the slave's boxes the master had received when it sent
    #: the request: the first box of the reply is this one
    reply_base: int
    #: how many of the slave's boxes are committed: their output is in the
    #: store, the slave may forget them; a resume starts from here
    received: int
    #: when the session was recorded (seconds since the epoch)
    opened: float = 0.0


class JobStore(Protocol):
    """The calls a master makes on its job store.

    Every call is thread-safe and commits before it returns; every failure is
    a :class:`StoreError`.
    """

    def create_job(self, kind: str, spec: Dict[str, object], uid: int, names: Sequence[str],
                   *, now: Optional[float] = None) -> JobRecord:
        """A new running job for ``names`` (each ``queued``), with a fresh id."""

    def update_slave(self, job_id: str, name: str, *, state: Optional[str] = None,
                     exit_status: Optional[int] = None, error: Optional[str] = None,
                     errtag: Optional[str] = None, started: Optional[float] = None,
                     finished: Optional[float] = None, progress: Optional[Tuple[int, Optional[int]]] = None,
                     summary: Optional[str] = None) -> None:
        """Change what the record of ``name`` in ``job_id`` says (``None``: unchanged)."""

    def append_output(self, job_id: str, name: str, stream: str, offset: int, data: bytes, *,
                      session: Optional[Tuple[str, int]] = None) -> int:
        """Store ``data``, whose first byte is at ``offset`` in ``stream``.

        Bytes already stored (a chunk sent again) are skipped; a chunk that
        starts past the end raises :class:`OutputGap`.  Returns the stream's
        length after the call: what may be acknowledged.

        ``session``, ``(session id, count)``: in the same transaction, set
        that session's ``received`` (:class:`SessionRecord`) to ``count``
        (no session of that id: nothing to set, not an error).  The master
        acknowledges the slave's boxes only up to a count so committed.
        """

    def output_position(self, job_id: str, name: str) -> Tuple[int, int]:
        """``(stdout_bytes, stderr_bytes)`` committed for ``name`` in ``job_id``."""

    def open_session(self, record: SessionRecord) -> None:
        """Record (or replace, by id) the session that now carries a command
        of ``record.job_id`` on ``record.name``; ``record.opened`` is set to
        now when 0.  Dropped with its job (pruning).  Called before the
        request is sent, so a master that stops after sending it finds it."""

    def close_session(self, session_id: str) -> None:
        """Forget a session: its command ended and its end is recorded (or
        it can no longer be resumed).  An unknown id is not an error."""

    def open_sessions(self) -> List[SessionRecord]:
        """Every recorded session, oldest first: what a master starting on
        this store may take back (:mod:`remsh.jobadopt`)."""

    def publish_slaves(self, rows: Sequence[Mapping[str, object]]) -> None:
        """This master's slaves are now ``rows`` (their ``remsh ls`` rows,
        each with ``name``), for the other masters' ``ls``
        (:mod:`remsh.slaveregistry`).  Called when they change, never per
        job or box; a single-master store keeps nothing."""

    def cluster_slaves(self) -> List[Dict[str, Any]]:
        """The rows the *other* live masters published, each with
        ``master`` (who holds the slave); none on a single-master store."""

    def finish_job(self, job_id: str, state: str, *, now: Optional[float] = None) -> None:
        """Mark the job ended in ``state`` (one of :data:`JOB_FINAL_STATES`)."""

    def get_job(self, job_id: str) -> JobRecord:
        """The job's record; :class:`UnknownJob` when there is none."""

    def list_jobs(self, *, running: bool = False, limit: Optional[int] = None) -> List[JobRecord]:
        """Jobs newest first; only running ones with ``running``."""

    def read_output(self, job_id: str, name: Optional[str] = None, *, after: int = -1,
                    limit: int = 1000) -> List[Tuple[str, OutputChunk]]:
        """Stored output in the job's order, ``(slave name, chunk)``, after sequence ``after``."""

    def prune(self, *, now: Optional[float] = None) -> int:
        """Delete jobs that ended longer ago than the retention; how many."""

    def wait_change(self, version: int, timeout: float) -> int:
        """Block until the store changed after ``version`` or ``timeout``
        passed; the current version (start with :meth:`version`)."""

    def version(self) -> int:
        """A number that grows with every change the store has seen."""

    def close(self) -> None:
        """Release the database (idempotent)."""


# -- job ids ----------------------------------------------------------------------

_B32 = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford's, lower case
_ID_RE = re.compile(r"^[0-9a-hjkmnp-tv-z]{1,16}-[0-9a-hjkmnp-tv-z]{1,8}$")


def _b32(n: int) -> str:
    digits = []
    while True:
        n, r = divmod(n, 32)
        digits.append(_B32[r])
        if not n:
            return "".join(reversed(digits))


def make_job_id(millis: int, seq: int) -> str:
    """The id of the ``seq``-th job started in millisecond ``millis``.

    Ten digits of milliseconds (good until the year 36812) keep ids of the
    same length, so they sort by start time as plain strings.
    """
    return _b32(millis).rjust(10, "0") + "-" + _b32(seq)


def check_job_id(text: str) -> str:
    """``text`` if it has the shape of a job id; :class:`UsageError` otherwise."""
    if not _ID_RE.match(text):
        raise UsageError(f"not a job id: {text!r}")
    return text


# -- the command line's units -----------------------------------------------------

_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_duration(text: str) -> float:
    """Seconds in ``text``: a number with an optional unit ``s m h d w``
    (``90``, ``30m``, ``7d``, ``1.5h``)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text.lower())
    if m is None:
        raise UsageError(f"not a duration (seconds, or a number with s, m, h, d or w: 90, 30m, 7d): {text!r}")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_size(text: str) -> int:
    """Bytes in ``text``: an integer with an optional binary unit ``K M G T``
    (``65536``, ``64M``, ``1G``; an ``iB``/``B`` suffix is accepted)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if m is None:
        raise UsageError(f"not a size (an integer with K, M, G or T): {text!r}")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


def now() -> float:
    """Wall-clock time as stored (seconds since the epoch)."""
    return time.time()


def job_state_from(slaves: Iterable[SlaveRecord], cancelled: bool = False) -> str:
    """The final state of a job whose slaves ended as given: ``cancelled``
    when it was cancelled, ``done`` when every slave is ``ok``, else
    ``failed``."""
    if cancelled:
        return JOB_CANCELLED
    return JOB_DONE if all(s.state == SLAVE_OK for s in slaves) else JOB_FAILED


class ChangeCounter:
    """What both stores share for :meth:`JobStore.version` and
    :meth:`JobStore.wait_change`: a counter bumped on every commit and a
    condition to wait on it (a store sets the attributes in its
    constructor; :meth:`changed` wakes the waiters)."""

    _lock: threading.Lock
    _changed: threading.Condition
    _version: int
    _closed: bool

    def _init_changes(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._version = 0
        self._closed = False

    def version(self) -> int:
        with self._lock:
            return self._version

    def wait_change(self, version: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._version <= version and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            return self._version


def slave_changes(*, state: Optional[str] = None, exit_status: Optional[int] = None, error: Optional[str] = None,
                  errtag: Optional[str] = None, started: Optional[float] = None, finished: Optional[float] = None,
                  progress: Optional[Tuple[int, Optional[int]]] = None,
                  summary: Optional[str] = None) -> Dict[str, object]:
    """The columns :meth:`JobStore.update_slave` sets: the arguments given
    (``progress`` as ``progress_done`` and ``progress_total``).

    :raises ValueError: an unknown slave state
    """
    if state is not None and state not in SLAVE_STATES:
        raise ValueError(f"unknown slave state {state!r}")
    changes: Dict[str, object] = {}
    for column, value in (("state", state), ("exit_status", exit_status), ("error", error),
                          ("errtag", errtag), ("started", started), ("finished", finished),
                          ("summary", summary)):
        if value is not None:
            changes[column] = value
    if progress is not None:
        changes["progress_done"], changes["progress_total"] = progress
    return changes


class JobIds:
    """Job ids of one store, sortable by start time: the start in
    milliseconds and a sequence number within the millisecond
    (:func:`make_job_id`), never the same twice from one store."""

    def __init__(self) -> None:
        self._last_millis = 0
        self._seq_in_millis = 0

    def next(self, started: float) -> str:
        """A new id for a job started at ``started`` (seconds since the epoch)."""
        millis = int(started * 1000)
        if millis <= self._last_millis:
            millis = self._last_millis
            self._seq_in_millis += 1
        else:
            self._last_millis = millis
            self._seq_in_millis = 0
        return make_job_id(millis, self._seq_in_millis)
