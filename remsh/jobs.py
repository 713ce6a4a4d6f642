"""The jobs of a ``remsh master``: run by the master, recorded in its job store.

Every ``run``, ``put`` and ``get`` a client gives to the master becomes a
job (:class:`JobRegistry.submit`): a record in the job store
(:mod:`remsh.store`), and threads of the master's that do the work.  The
client that asked does not own the job, it *follows* it, like any other
client may (:func:`follow`): a client that detaches, or whose connection
drops, leaves the job running (only an attached ``run`` that goes away
cancels its job, as Ctrl-C does).

What a job does goes into the store as it happens (:class:`StoreSink`):
each slave's start and end, transfer progress, and every byte of output,
appended by its position in its stream.  Followers read the store, never
the job: a follower that attaches late, or after the master restarted, sees
the same events from the start as one that was there all along.

The commands of a job survive a restart of the master (:mod:`remsh.jobadopt`):
the sink records the session that carries each command
(:meth:`StoreSink.requested`), commits output together with the count of
the slave's boxes it covers and acknowledges only that
(:meth:`StoreSink.output`); on SIGTERM the master hands its commands over
(:meth:`JobRegistry.stop`) and the next master takes them back
(:meth:`JobRegistry.start`).

Rejected: feeding attached clients straight from the job and only
recording for later ones.  Two paths would show two different histories
(a slow client would see what the store capped, or the other way round).
"""

from __future__ import annotations

import functools
import logging
import shutil
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from remsh.adoption import set_current
from remsh.jobfollow import end_event, follow, record_events
from remsh.crossmaster import Crossing, Dispatcher, serve_dispatches
from remsh.errors import RemshError
from remsh.fleet import FleetCollection, SlaveResult, Sink, StdinTee
from remsh.jobadopt import Adoptions, Part, owns_session, release_session, take_session
from remsh.master.fanout import Cancellation
from remsh.pacing import Pacing
from remsh.session import SessionFailed, SessionWire
from remsh.store.base import (JOB_CANCELLED, JOB_FAILED, SLAVE_AWAY, SLAVE_CANCELLED, SLAVE_FAILED, SLAVE_FINAL_STATES,
                              SLAVE_LOST, SLAVE_OK, SLAVE_RUNNING, SLAVE_SKIPPED, JobStore,
                              SessionRecord, StoreError, UnknownJob, job_state_from, now,
                              through_outage)
from remsh.store.fencing import FencedOff, NotOwner, SharedJobStore

log = logging.getLogger(__name__)

#: How often the master deletes jobs past the retention.
PRUNE_EVERY = 3600.0
#: Most jobs running at once in one master.
MAX_RUNNING_JOBS = 256
#: Shortest interval between two progress records of one slave.
PROGRESS_EVERY = 0.2
#: Output of one slave's stream written to the store at a time ...
OUTPUT_BATCH = 64 << 10
#: ... or once the first byte held is this old (seconds): what a follower
#: of a slowly writing command waits at most, beyond the store itself.
OUTPUT_DELAY = 0.05
#: Why the jobs of a stopping master end: they fail (nobody cancelled them),
#: except the commands handed over to the next master.
MASTER_STOPPING = "the master is stopping"
#: The error of a transfer a master that stopped left unfinished.
TRANSFER_CUT = "the master stopped during the transfer; it did not finish (run it again)"
#: The work of a job: given where to report and what cancels it, the results.
Work = Callable[[Sink, Cancellation], List[SlaveResult]]


class JobEnded(RemshError):
    """The job asked to be cancelled has already ended."""


class TooManyJobs(RemshError):
    """The master runs :data:`MAX_RUNNING_JOBS` jobs already."""


class StoreSink:
    """The :class:`~remsh.fleet.Sink` of a job: writes what happens to the
    store.  A store that fails is logged; the job goes on.

    With ``keep_sessions`` (a store that outlives the master), a command
    that runs over a session is recorded with it (:meth:`requested`) and
    the slave's boxes are acknowledged after commit (:meth:`output`).
    ``dispatched``: the sink of a part of another master's job run here."""

    def __init__(self, store: JobStore, job_id: str, cancellation: Cancellation, *,
                 keep_sessions: bool = False, dispatched: bool = False) -> None:
        self.store = store
        self.job_id = job_id
        self.cancellation = cancellation
        self.keep_sessions = keep_sessions
        self.dispatched = dispatched
        #: the recorded sessions of this job's commands, by slave name
        self._parts: Dict[str, Part] = {}
        #: per slave: the session's count of delivered boxes after the last output held
        self._marks: Dict[str, int] = {}
        self._lock = threading.Lock()
        self._positions: Dict[Tuple[str, str], int] = {}
        self._started: Set[str] = set()
        self._progress_at: Dict[str, float] = {}
        self._failed = False
        self._ended: Set[str] = set()
        self._lost: Set[str] = set()
        self._away: Set[str] = set()
        self._noted: Set[str] = set()  # slaves whose record's summary says why they were away
        self._kept: Set[str] = set()  # slaves whose parts other masters run, left to them (keep)
        #: output not yet written, per slave: (stream, bytes, when the first came)
        self._held: Dict[str, Tuple[str, bytearray, float]] = {}
        self._wake = threading.Condition(self._lock)
        self._flusher: Optional[threading.Thread] = None

    def _store(self, what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except StoreError as e:
            if not self._failed:
                log.error("job %s: cannot record %s: %s", self.job_id, what, e)
            self._failed = True

    def begin(self, names: List[str]) -> None:
        """The slaves are in the record already (queued)."""

    def start(self, name: str) -> None:
        with self._lock:
            self._started.add(name)
        if self.keep_sessions:  # the slave's part runs in this thread (remsh.fleet)
            set_current(functools.partial(self.requested, name))
        self._store("a start", lambda: self.store.update_slave(self.job_id, name, state=SLAVE_RUNNING,
                                                                 started=now()))

    def requested(self, name: str, slave: Any, call: Any) -> None:
        """``slave`` (holding it) is about to send the ``execute`` request
        of ``call``: record the session that carries it and acknowledge the
        slave's boxes only after commit from now on.  Not for a command
        whose stdin the master forwards (that cannot survive a restart)."""
        wire = slave.wire
        if (not isinstance(wire, SessionWire) or wire.resume_timeout <= 0 or getattr(call, "want_stdin", True)
                or wire.failed is not None):
            return
        record = SessionRecord(wire.session_id, name, self.job_id, "execute", request_box=wire.sent,
                               reply_base=wire.delivered, received=wire.delivered)
        part = Part(record, wire, dispatched=self.dispatched)
        take_session(wire, part)  # after the previous command's end is recorded
        try:
            self.store.open_session(record)
        except StoreError as e:
            log.error("job %s: cannot record the session of %s (its command will not survive a restart "
                      "of the master): %s", self.job_id, name, e)
            release_session(wire, part)
            return
        with self._lock:
            self._parts[name] = part
        wire.commit(record.received)

    def output(self, name: str, stream: str, data: bytes) -> None:
        """Keep ``data`` for the store: consecutive chunks of one slave's
        stream are written together, at :data:`OUTPUT_BATCH` bytes or
        :data:`OUTPUT_DELAY` seconds after the first, whichever comes first
        (a command writing a byte at a time must not cost a transaction and
        a stored row per byte); a chunk of the slave's other stream writes
        what is held first, so the order of the two streams is kept."""
        with self._lock:
            part = self._parts.get(name)
            if part is not None and part.frozen:
                return  # handed over: the next master gets it again
            held = self._held.get(name)
            if held is not None and held[0] != stream:
                self._write_held(name)
                held = None
            if part is not None and part.wire is not None:
                # what is held covers the slave's boxes up to this one
                self._marks[name] = part.wire.delivered
            if held is None:
                self._held[name] = (stream, bytearray(data), time.monotonic())
                self._wake.notify()
            else:
                held[1].extend(data)
            if len(self._held[name][1]) >= OUTPUT_BATCH:
                self._write_held(name)
            if self._flusher is None and self._held:
                self._flusher = threading.Thread(target=self._flush_later, name=f"remsh-output-{self.job_id}",
                                                 daemon=True)
                self._flusher.start()

    def _write_held(self, name: str) -> None:
        """Write what is held of ``name``'s output (under the lock: one
        writer per stream at a time keeps the positions exact)."""
        stream, data, _ = self._held.pop(name)
        part = self._parts.get(name)
        mark = self._marks.pop(name, None)
        if part is not None and part.frozen:
            return
        session = None
        if part is not None and mark is not None and part.wire is not None and owns_session(part.wire, part):
            session = (part.session_id, mark)
        offset = self._positions.get((name, stream), 0)
        try:
            self._positions[(name, stream)] = self.store.append_output(self.job_id, name, stream, offset,
                                                                       bytes(data), session=session)
        except StoreError as e:
            self._positions[(name, stream)] = offset + len(data)
            if not self._failed:
                log.error("job %s: cannot record output of %s: %s", self.job_id, name, e)
            self._failed = True
            if isinstance(e, FencedOff):  # another master has the work: the slave keeps it for that one
                return
        if session is not None and part is not None and part.wire is not None and mark is not None:
            # committed (or the store failed, logged: the command must not stall for it)
            part.record.received = mark
            part.wire.commit(mark)

    def _flush_later(self) -> None:
        """Write held output once it is :data:`OUTPUT_DELAY` old; ends when
        nothing is held."""
        with self._lock:
            while self._held:
                due = min(since for _, _, since in self._held.values()) + OUTPUT_DELAY
                left = due - time.monotonic()
                if left > 0:
                    self._wake.wait(left)
                    continue
                t = time.monotonic()
                for name in [n for n, (_, _, since) in self._held.items() if t - since >= OUTPUT_DELAY]:
                    self._write_held(name)
            self._flusher = None

    def flush(self, name: Optional[str] = None) -> None:
        """Write what is held now (of ``name``, or of every slave)."""
        with self._lock:
            for held in ([name] if name is not None else list(self._held)):
                if held in self._held:
                    self._write_held(held)

    def progress(self, name: str, done: int, total: Optional[int]) -> None:
        t = time.monotonic()
        with self._lock:
            if t - self._progress_at.get(name, 0.0) < PROGRESS_EVERY and done != total:
                return
            self._progress_at[name] = t
        self._store("progress", lambda: self.store.update_slave(self.job_id, name, progress=(done, total)))

    def slave_state(self, name: str, state: str, detail: str) -> None:
        """Slave ``name`` went ``away`` (recorded as such, ``detail`` in the
        summary until it ends), is ``back`` (``running`` again) or is
        ``lost``; only while its part of this job runs."""
        new = {"away": SLAVE_AWAY, "back": SLAVE_RUNNING, "lost": SLAVE_LOST}.get(state)
        with self._lock:
            if state == "waiting":  # queued behind another job on that slave: said in the summary
                self._noted.add(name)
                self._store("a wait", lambda: self.store.update_slave(self.job_id, name, summary=detail))
            if new is None or name not in self._started or name in self._ended:
                return
            part = self._parts.get(name)
            if part is not None and part.frozen:
                return
            if new == SLAVE_LOST:
                self._lost.add(name)
            if new == SLAVE_AWAY:
                self._away.add(name)
            else:
                self._away.discard(name)
            self._noted.add(name)
            # under the lock: an end recorded meanwhile is never overwritten
            self._store("a state", lambda: self.store.update_slave(
                self.job_id, name, state=new, summary=detail if new == SLAVE_AWAY else "",
                error=detail if new == SLAVE_LOST else None))

    def end(self, result: SlaveResult) -> None:
        set_current(None)  # this thread's part is over (a no-op in any other thread)
        with self._lock:
            part = self._parts.get(result.name)
            if part is not None and part.frozen:
                return  # handed over: its end is the next master's to record
            if result.name in self._held:
                self._write_held(result.name)  # its output before its end
            started = result.name in self._started
            # away when it failed: lost (its session may end before the report does)
            lost = result.name in self._lost or (result.name in self._away and result.errtag != "timeout")
            noted = result.name in self._noted
            self._ended.add(result.name)
        stopping = self.cancellation.cancelled and self.cancellation.reason == MASTER_STOPPING
        if result.error is None and result.status == 0:
            state = SLAVE_OK
        elif result.errtag in ("skipped", "away"):  # never started (remsh.pacing)
            state = SLAVE_SKIPPED
        elif lost and not self.cancellation.cancelled:
            state = SLAVE_LOST
        elif self.cancellation.cancelled and not stopping:
            state = SLAVE_CANCELLED if started else SLAVE_SKIPPED
        else:
            state = SLAVE_FAILED
        error = result.error or (MASTER_STOPPING if stopping and state == SLAVE_FAILED else None)
        self._store("an end", lambda: self.store.update_slave(
            self.job_id, result.name, state=state, exit_status=result.status, error=error,
            errtag=result.errtag, finished=now(), summary=result.summary or ("" if noted else None)))
        if part is not None:
            # the end is recorded: the session no longer needs keeping, nor its boxes
            with self._lock:
                self._parts.pop(result.name, None)
            if part.wire is None or release_session(part.wire, part):
                self._store("the end of a session", lambda: self.store.close_session(part.session_id))
                if part.wire is not None:
                    part.wire.commit(None)
            part.done.set()

    # -- a restart of the master (remsh.jobadopt) -----------------------------------------

    def expect_part(self, part: Part, detail: str) -> None:
        """A command of this job that an earlier master left running: its
        slave is ``away`` until it comes back (:meth:`part_back`) or is
        given up (:meth:`end_part`)."""
        with self._lock:
            self._parts[part.name] = part
            self._started.add(part.name)
            self._away.add(part.name)
            self._noted.add(part.name)
        self._store("a state", lambda: self.store.update_slave(self.job_id, part.name, state=SLAVE_AWAY,
                                                               summary=detail))

    def part_back(self, part: Part) -> None:
        """The slave of ``part`` came back: its output goes on from what is stored."""
        try:
            positions = self.store.output_position(self.job_id, part.name)
        except StoreError as e:
            log.error("job %s: cannot read the output position of %s: %s", self.job_id, part.name, e)
            positions = (0, 0)
        with self._lock:
            self._parts[part.name] = part
            self._positions[(part.name, "stdout")], self._positions[(part.name, "stderr")] = positions
        if part.wire is not None:  # acknowledged after commit again: a second restart loses nothing either
            take_session(part.wire, part)
            part.wire.commit(part.committed)
        self.slave_state(part.name, "back", "")

    def end_part(self, part: Part, result: SlaveResult) -> None:
        """The taken-back command of ``part`` ended (or was given up)."""
        with self._lock:
            self._parts.setdefault(part.name, part)
        self.end(result)
        part.done.set()

    def hand_over(self) -> List[str]:
        """The master stops and keeps this job's recorded commands for the
        next one: what is held is committed, nothing more is recorded for
        them, and their sessions are dropped without a goodbye (the slaves
        keep their commands and redial).  The names handed over."""
        with self._lock:
            parts = [p for p in self._parts.values() if not p.frozen]
            for part in parts:
                if part.name in self._held:
                    self._write_held(part.name)
                part.frozen = True
        for part in parts:
            wire = part.wire
            if isinstance(wire, SessionWire):
                wire.fail(SessionFailed(f"{part.name}: the master is stopping; the slave keeps its command "
                                        f"for the next master"))
            part.done.set()
        return [p.name for p in parts]

    def handed_over(self) -> Set[str]:
        """The slaves whose commands were handed over (:meth:`hand_over`, :meth:`keep`)."""
        with self._lock:
            return {name for name, part in self._parts.items() if part.frozen} | self._kept

    def keep(self, names: List[str]) -> None:
        """The master stops and the parts of ``names`` that other masters
        run go on: handed over too, the next master follows them again
        (:meth:`remsh.crossmaster.Crossing.resume`)."""
        with self._lock:
            self._kept.update(names)


class RunningJob:
    """A job this master runs: its id, what cancels it, its stdin."""

    def __init__(self, job_id: str, tee: Optional[StdinTee]) -> None:
        self.id = job_id
        self.cancellation = Cancellation()
        self.tee = tee
        self.finished = threading.Event()
        #: where the job reports (set when it starts)
        self.sink: Optional[StoreSink] = None

    def cancel(self, reason: str = "cancelled") -> None:
        self.cancellation.cancel(reason)


class JobRegistry:
    """The jobs of one master, over its job store.

    Without a store, a private one is made in a temporary directory and
    removed by :meth:`stop` (for a master embedded in a program or a test).
    With the ``collection`` of slaves, on a store several masters share,
    the registry runs the parts other masters' jobs ask of these slaves
    (:mod:`remsh.crossmaster`).
    """

    def __init__(self, store: Optional[JobStore] = None, *, prune_every: float = PRUNE_EVERY,
                 collection: Optional[FleetCollection] = None) -> None:
        self._tempdir: Optional[str] = None
        if store is None:
            from remsh.store.sqlite import SqliteJobStore

            self._tempdir = tempfile.mkdtemp(prefix="remsh-jobs-")
            store = SqliteJobStore(f"{self._tempdir}/jobs.sqlite")
        self.store: JobStore = store
        #: a store that outlives this master: commands are kept across a restart
        self.keep_work = self._tempdir is None
        #: the commands an earlier master left, waiting for their slaves (remsh.jobadopt)
        self.adoptions = Adoptions(self._sink_of, self._cancellation_of)
        self.prune_every = prune_every
        self._lock = threading.Lock()
        self._jobs: Dict[str, RunningJob] = {}
        self._stopping = threading.Event()
        self._pruner: Optional[threading.Thread] = None
        self.collection = collection
        self._dispatcher: Optional[Dispatcher] = None

    def start(self) -> None:
        """Take back the jobs a previous master left running (their commands
        whose sessions are recorded wait for their slaves; the rest is
        recorded ``lost``), prune, and prune again every
        :attr:`prune_every` seconds.

        :raises StoreError: the store cannot be read or written
        """
        self._take_back()
        if isinstance(self.store, SharedJobStore):  # a cancel asked of another master reaches us
            self.store.watch_cancels(self._cancel_asked)
        if self.collection is not None:  # other masters' work on this master's slaves
            self._dispatcher = serve_dispatches(self.collection, self.store, self._part_sink, MASTER_STOPPING)
            if self._dispatcher is not None:  # the parts of other masters' jobs whose claims it adopts
                self.adoptions.carry_on_with(functools.partial(self._dispatcher.carry_on, self.adoptions))
        self.adoptions.follow(self.store, self._take_back)  # a dead master's work this one adopts, likewise
        self.adoptions.start()
        self.store.prune()
        self._pruner = threading.Thread(target=self._prune_loop, name="remsh-jobs-prune", daemon=True)
        self._pruner.start()

    def _take_back(self, only: Optional[List[str]] = None) -> None:
        """The jobs a master that stopped left running (see :mod:`remsh.jobadopt`);
        ``only`` these (just adopted from a dead master) when given."""
        sessions: Dict[str, Dict[str, SessionRecord]] = {}
        for session in self.store.open_sessions():
            sessions.setdefault(session.job_id, {})[session.name] = session
        closing = [s for by_name in sessions.values() for s in by_name.values()]
        for record in self.store.list_jobs(running=True):
            with self._lock:
                if record.id in self._jobs:  # running here already (its slave resumed first): its sessions live
                    closing = [s for s in closing if s.job_id != record.id]
                    continue
                if only is not None and record.id not in only:
                    continue
            recorded = sessions.get(record.id, {}) if self.keep_work else {}
            # its parts asked of other masters (remsh.crossmaster): followed again, their holders end them
            crossing = Crossing.resume(self.store, record, MASTER_STOPPING) if self.keep_work else None
            dispatched = set(crossing.remote) if crossing is not None else set()
            parts: List[Part] = []
            try:
                for name, rec in record.slaves.items():
                    if rec.state in SLAVE_FINAL_STATES or name in dispatched:
                        continue
                    if name in recorded:
                        parts.append(Part(recorded[name]))
                    elif record.kind != "run":  # a transfer is not taken back: it fails, cleanly
                        self.store.update_slave(record.id, name, state=SLAVE_FAILED, finished=now(),
                                                error=TRANSFER_CUT)
                    else:  # nothing runs it any more
                        self.store.update_slave(record.id, name, state=SLAVE_LOST, finished=now(),
                                                error="the master stopped before it ended")
                if not parts and not dispatched:
                    # nothing left to wait for: its state follows its slaves', as at a normal end
                    slaves = self.store.get_job(record.id).slaves.values()
                    state = job_state_from(slaves, any(s.state == SLAVE_CANCELLED for s in slaves))
                    self.store.finish_job(record.id, state)
                    log.warning("job %s: left running by a master that stopped; recorded as %s", record.id, state)
                    continue
            except NotOwner:  # another live master's job, on a shared store: not ours to end
                continue
            job = RunningJob(record.id, None)
            job.sink = StoreSink(self.store, job.id, job.cancellation, keep_sessions=True)
            adoption = getattr(self.store, "adoption", None)  # a shared store: adopted from a dead master?
            why = (adoption(record.id) if callable(adoption) else None) or "the master restarted"
            with self._lock:  # before its parts are expected: a slave claiming one at once finds its sink
                self._jobs[job.id] = job
            for part in parts:
                closing.remove(part.record)
                job.sink.expect_part(part, f"{why}; waiting for the slave to come back")
                self.adoptions.expect(part)
            log.warning("job %s: left running by a master that stopped; waiting for %d slave(s) to come back",
                        job.id, len(parts) + len(dispatched))

            def wait(sink: Sink, cancellation: Cancellation, parts: List[Part] = parts,
                     job_sink: StoreSink = job.sink) -> List[SlaveResult]:
                for part in parts:
                    while not part.done.wait(0.5):
                        if cancellation.cancelled and self.adoptions.withdraw(part):
                            # cancelled while its slave is away: it will not be taken back
                            job_sink.end_part(part, SlaveResult(part.name, error=cancellation.reason,
                                                                errtag="cancelled"))
                return []

            work = wait if crossing is None else crossing.wrap(wait)
            threading.Thread(target=self._run, args=(job, work), name=f"remsh-job-{job.id}", daemon=True).start()
        for session in closing:  # their job or command has ended: nothing to take back
            if only is None or session.job_id in only:
                self.store.close_session(session.id)

    def _part_sink(self, job_id: str, cancellation: Cancellation) -> StoreSink:
        """The sink of a part of another master's job run here: its session
        is kept, so that the master adopting this one carries it on."""
        return StoreSink(self.store, job_id, cancellation, keep_sessions=True, dispatched=True)

    def crossing(self, remote: Dict[str, str], kind: str, spec: Dict[str, Any], values: Dict[str, Any],
                 pacing: Pacing, count: int) -> Crossing:
        """How a new job reaches its slaves held by other masters
        (``remote``: name -> master; see :class:`remsh.crossmaster.Crossing`).

        :raises UsageError: what cannot cross (``--stdin``)
        """
        return Crossing(self.store, remote, kind, spec, values, pacing, count, stopping=MASTER_STOPPING)

    def _sink_of(self, job_id: str) -> StoreSink:
        with self._lock:
            job = self._jobs[job_id]
        assert job.sink is not None
        return job.sink

    def _cancellation_of(self, job_id: str) -> Cancellation:
        with self._lock:
            return self._jobs[job_id].cancellation

    def _prune_loop(self) -> None:
        while not self._stopping.wait(self.prune_every):
            try:
                self.store.prune()
            except StoreError as e:
                log.error("cannot prune the job store: %s", e)

    def submit(self, kind: str, spec: Dict[str, object], uid: int, names: List[str], work: Work,
               tee: Optional[StdinTee] = None) -> RunningJob:
        """Record a new job on ``names`` and start ``work`` in a thread of
        the master's.

        :raises TooManyJobs: the master runs :data:`MAX_RUNNING_JOBS` already
        :raises StoreError: the job cannot be recorded
        """
        with self._lock:
            if self._stopping.is_set():
                raise TooManyJobs("the master is stopping")
            if len(self._jobs) >= MAX_RUNNING_JOBS:
                raise TooManyJobs(f"the master runs {MAX_RUNNING_JOBS} jobs already; try again later")
            record = self.store.create_job(kind, spec, uid, names)
            job = RunningJob(record.id, tee)
            self._jobs[job.id] = job
        log.info("job %s started: %s on %d slave%s", job.id, kind, len(names), "" if len(names) == 1 else "s")
        threading.Thread(target=self._run, args=(job, work), name=f"remsh-job-{job.id}", daemon=True).start()
        return job

    def slave_state(self, name: str, state: str, detail: str) -> None:
        """Slave ``name`` went away, is back or is lost (see
        :meth:`StoreSink.slave_state`): recorded in every running job."""
        with self._lock:
            sinks = [job.sink for job in self._jobs.values() if job.sink is not None]
        for sink in sinks:
            sink.slave_state(name, state, detail)

    def _run(self, job: RunningJob, work: Work) -> None:
        sink = job.sink = job.sink or StoreSink(self.store, job.id, job.cancellation, keep_sessions=self.keep_work)
        failure: Optional[BaseException] = None
        try:
            work(sink, job.cancellation)
        except Exception as e:  # noqa: BLE001 - recorded as the slaves' error below
            failure = e
            if not isinstance(e, RemshError):
                log.exception("job %s failed", job.id)
        finally:
            set_current(None)
            if job.tee is not None:
                job.tee.end()
            sink.flush()
        handed = sink.handed_over()
        # a master that stops fails what it cannot hand over; nobody cancelled it
        cancelled = job.cancellation.cancelled and job.cancellation.reason != MASTER_STOPPING

        def record_end() -> None:  # all of it again after an outage: each write stores the same twice
            record = self.store.get_job(job.id)
            for name, rec in record.slaves.items():
                if rec.state not in SLAVE_FINAL_STATES and name not in handed:
                    state = SLAVE_CANCELLED if cancelled else SLAVE_FAILED
                    error = str(failure) if failure is not None else job.cancellation.reason
                    self.store.update_slave(job.id, name, state=state, error=error, finished=now())
            if handed:
                log.info("job %s: its commands on %s are kept for the next master", job.id, ", ".join(sorted(handed)))
                return
            record = self.store.get_job(job.id)
            state = job_state_from(record.slaves.values(), cancelled)
            if failure is not None and state != JOB_CANCELLED:
                state = JOB_FAILED
            self.store.finish_job(job.id, state)
            log.info("job %s ended: %s", job.id, state)

        try:
            through_outage(record_end, self.store, f"job {job.id}: recording its end")
        except StoreError as e:
            log.error("job %s: cannot record its end: %s", job.id, e)
        finally:
            with self._lock:
                self._jobs.pop(job.id, None)
            job.finished.set()

    def running(self, job_id: str) -> Optional[RunningJob]:
        """The job if this master runs it now."""
        with self._lock:
            return self._jobs.get(job_id)

    def cancel(self, job_id: str, reason: str = "cancelled") -> Optional[RunningJob]:
        """Cancel a running job: its commands are interrupted on every slave
        (their process groups killed), its transfers abandoned.  A job
        another master runs, on a shared store, is asked of that master
        (``None`` returned).

        :raises UnknownJob: no such job in the store
        :raises JobEnded: it has ended already
        """
        job = self.running(job_id)
        if job is None:
            record = self.store.get_job(job_id)
            if not record.finished_state and isinstance(self.store, SharedJobStore):
                owner = self.store.request_cancel(job_id, reason)
                if owner is not None:  # another master runs it: asked of it through the store
                    log.info("job %s: cancel asked of master %s", job_id, owner)
                    return None
                record = self.store.get_job(job_id)
            raise JobEnded(f"job {job_id} has already ended ({record.state})")
        log.info("job %s: %s", job_id, reason)
        job.cancel(reason)
        return job

    def _cancel_asked(self, job_id: str, reason: str) -> None:
        """A cancel asked of another master sharing the store, for a job of ours."""
        job = self.running(job_id)
        if job is not None:
            log.info("job %s: %s (asked of another master)", job_id, reason)
            job.cancel(reason)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop: hand the recorded commands over to the next master (see
        :meth:`StoreSink.hand_over`; the job records stay ``running``),
        cancel what cannot be kept (commands without a recorded session,
        transfers, slaves not started yet) and wait (bounded) for the
        job threads to end."""
        self._stopping.set()
        if self._dispatcher is not None:  # the parts run for other masters end first
            self._dispatcher.stop()
        self.adoptions.stop()
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            if job.sink is not None and self.keep_work:
                job.sink.hand_over()
            job.cancel(MASTER_STOPPING)
        deadline = time.monotonic() + timeout
        for job in jobs:
            job.finished.wait(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        """Close the store (after :meth:`stop`, once no one follows); a
        private store is removed.  Idempotent."""
        try:
            self.store.close()
        except StoreError as e:
            log.error("cannot close the job store: %s", e)
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None


__all__ = ["JobRegistry", "RunningJob", "StoreSink", "JobEnded", "TooManyJobs", "UnknownJob", "follow",
           "record_events", "end_event"]
