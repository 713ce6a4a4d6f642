"""Work crossing masters: a ``run``, ``put`` or ``get`` given to one master
of a shared PostgreSQL store reaches the slaves the other masters hold.

The master given the command (the *origin*) chooses its slaves over the
whole cluster (:func:`remsh.choice.choose_cluster`: the registry of slaves,
:mod:`remsh.slaveregistry`).  Its own slaves it drives itself, as always;
for each slave held by another live master it records a *dispatch* in the
store (:mod:`remsh.store.pgdispatch`: the job, the slave, what to do), which
every master hears of at once (the write's ``NOTIFY``; the store's poll is
the safety net).  Each master runs a :class:`Dispatcher`: it claims the
pending dispatches of the slaves connected to it -- whichever master the
origin believed held them, so a slave that moved meanwhile is found by its
new master -- with a compare-and-set fenced by its epoch, and runs each on
its slave as it runs a part of its own jobs, writing the slave's start,
output, progress and end into the origin's job record (the claim lets it
write that slave's rows of that job, and only while it holds the claim).
Followers of the job on any master read the store as usual: ``remsh run``
on one master streams the output of a slave held by another.

The origin's side (:class:`Crossing`) waits for its dispatches to end and
settles those nobody can finish: a dispatch no master claims within
:data:`PENDING_WAIT` seconds, or whose claimer died (its heartbeat past the
lease, or it started again under a new epoch), ends ``lost``; the claim is
then void, and a claimer that comes back cannot write over the record.
Except a ``run`` part whose dead claimer recorded its command's session:
the master adopting that claimer takes the claim with the session
(:func:`remsh.store.pgdispatch.move_claims`) and carries the part on
(:meth:`Dispatcher.carry_on`) when the slave resumes its session there.
A cancel of the job (from any master: the cancel reaches the origin, which
owns the job) is carried to the claimers through the store.  A stopping
origin leaves its parts to their claimers (:meth:`Crossing.resume`: the
master that takes the job back follows them again).

Bytes cross through the store, in rows of 1 MiB (``remsh_blobs``) checked
by their SHA-256 and deleted when the part ends: a ``put``'s source (a
file, or a tree as a tar stream) is stored once by the origin and read by
each claimer into a private temporary directory, from which it is sent as
a local put would; a ``get`` is fetched by the claimer into a private
temporary directory and stored, and the origin writes it in place under
``LOCALDIR/NAME/`` atomically (a partial file beside it, renamed when whole
and checked: nothing partial where the user looks).  At most
:data:`MAX_CARRIED` bytes cross per part (a clear error beyond).

What does not cross: ``--stdin`` (refused with slaves of another master),
and ``--batch``/``--max-parallel`` bound this master's slaves and, apart,
the dispatched ones (``--max-fail`` counts them all).  A single master
(SQLite) has no dispatches: nothing here runs.

Rejected: forwarding the command to the other master's control socket (it
is local to that machine, and the job would be two jobs); proxying the
slave's connection between masters (every byte twice over the network,
and a dead proxy kills the command of a healthy slave).
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, cast

from remsh.carry import CarryFailed, DispatchingStore, dispatching, load_path, store_path
from remsh.errors import LocalError, RemshError, UsageError, error_tag
from remsh.jobadopt import Adoptions, Part
from remsh.jobadopt import PartSink as AdoptedPartSink
from remsh.fleet import (DEFAULT_GET_MAX_BYTES, DEFAULT_GET_MAX_FILES, DEFAULT_PARALLEL, DEFAULT_TRANSFER_PARALLEL,
                         FleetCollection, SlaveResult, Sink, describe_error, get_job, put_job, run_job)
from remsh.master.fanout import Cancellation
from remsh.master.slave import Slave
from remsh.master.tree import fetched_modes
from remsh.pacing import ERRTAG_SKIPPED, Pacing
from remsh.replace import get_directory, get_replacing
from remsh.store import pgdispatch
from remsh.store.base import (SLAVE_FAILED, SLAVE_FINAL_STATES, SLAVE_LOST, SLAVE_OK, SLAVE_SKIPPED, JobRecord,
                              JobStore, StoreError, now, through_outage)
from remsh.store.pgdispatch import Dispatch

log = logging.getLogger(__name__)

#: Seconds a dispatch waits for a master holding its slave to claim it.
PENDING_WAIT = 45.0
#: Most bytes a put's source or a get's result carries through the store per part.
MAX_CARRIED = 256 << 20
#: The origin looks at its dispatches at least this often (seconds) ...
LOOK_EVERY = 1.0
#: ... and at which masters are alive this often while a claimer runs one.
MASTERS_EVERY = 3.0
#: A holder looks for dispatches (an origin at its own) at most this often
#: (every write of the cluster wakes it), and a holder at least every POLL seconds.
LOOK_GAP = 0.05
POLL = 2.0
#: How long a stopping holder waits for its parts to record their end ...
STOP_WAIT = 5.0
#: ... and how soon its thread sees the stop while it waits for a change.
STOP_SLICE = 0.25

#: The work of a job (:data:`remsh.jobs.Work`).
Work = Callable[[Sink, Cancellation], List[SlaveResult]]


class PartSink(Sink, Protocol):
    """Where a holder's part reports: a :class:`remsh.jobs.StoreSink` of
    the origin's job (made by the registry of jobs, which this module
    does not import)."""

    job_id: str

    def slave_state(self, name: str, state: str, detail: str) -> None: ...

    def flush(self, name: Optional[str] = None) -> None: ...


#: Makes the sink of a part: ``(job id, its cancellation)``.
NewSink = Callable[[str, Cancellation], PartSink]


class AdoptedSink(AdoptedPartSink, Protocol):
    """What a part carried on after its holder died needs of its sink (:class:`remsh.jobs.StoreSink`)."""

    def expect_part(self, part: Part, detail: str) -> None: ...


# -- the origin's side ---------------------------------------------------------------------


class Crossing:
    """The slaves of a job held by other masters (``remote``: name ->
    holder), and how their parts are dispatched; :meth:`wrap` adds them to
    the work of the job's own slaves.

    A job stopped by ``stopping`` (its master stops) leaves its parts to
    their holders and to the next master, which follows them again
    (:meth:`resume`).

    :raises UsageError: ``--stdin`` with slaves of another master
    """

    def __init__(self, store: JobStore, remote: Mapping[str, str], kind: str, spec: Dict[str, Any],
                 values: Mapping[str, Any], pacing: Pacing, count: int, *, stopping: str = "") -> None:
        self.remote = dict(remote)
        self.stopping = stopping
        #: the parts were asked already (by a master that stopped): followed, not asked
        self.asked = False
        self.store = dispatching(store)
        if self.remote and values.get("stdin"):
            raise UsageError(f"--stdin does not reach slaves held by another master ({', '.join(sorted(remote))})")
        if self.remote and self.store is None:
            raise UsageError("slaves of another master need a shared job store")
        self.kind, self.spec, self.values, self.pacing, self.count = kind, spec, values, pacing, count

    @classmethod
    def resume(cls, store: JobStore, job: JobRecord, stopping: str) -> Optional["Crossing"]:
        """The parts job ``job`` of this master left asked of other masters,
        to follow again (this master restarted, or adopted the job's dead
        master); ``None`` when none is open, or on a store of one master.
        A get's parts are cancelled: the directory it was for was the
        asking master's."""
        shared = dispatching(store)
        if shared is None:
            return None
        rows = shared.dispatch_read(pgdispatch.open_of, job.id, shared.name)
        if not rows:
            return None
        crossing = cls(store, {d.slave: d.holder for d in rows}, job.kind, dict(job.spec), {}, Pacing(),
                       len(job.slaves), stopping=stopping)
        crossing.asked = True
        return crossing

    def wrap(self, local: Work) -> Work:
        """The job's work: ``local`` (its own slaves) and, beside it, the
        dispatched parts; it ends when all have ended."""
        if not self.remote:
            return local

        def work(sink: Sink, cancellation: Cancellation) -> List[SlaveResult]:
            origin = _Origin(self, str(getattr(sink, "job_id", "")), cancellation, sink)
            thread = threading.Thread(target=origin.run, name=f"remsh-dispatch-{origin.job_id}", daemon=True)
            thread.start()
            try:
                results = local(sink, cancellation)
            finally:
                thread.join()
            return results + origin.results

        return work

    def part_spec(self) -> Dict[str, Any]:
        """What a holder needs to do one slave's part."""
        spec, values = self.spec, self.values
        if self.kind == "run":
            return {"argv": spec["argv"], "cwd": spec.get("cwd"), "timeout": spec.get("timeout")}
        paths = cast(List[str], spec["paths"])
        if self.kind == "put":
            return {"dest": paths[1], "base": os.path.basename(paths[0].rstrip("/")) or "root",
                    **{k: bool(spec.get(k)) for k in ("sync", "delete", "checksum", "force", "parents")}}
        return {"src": paths[0], "max_bytes": values.get("max_bytes") or DEFAULT_GET_MAX_BYTES,
                "max_files": values.get("max_files") or DEFAULT_GET_MAX_FILES}


class _Origin:
    """The dispatched parts of one job on the master that owns it."""

    def __init__(self, crossing: Crossing, job_id: str, cancellation: Cancellation, sink: Sink) -> None:
        assert crossing.store is not None
        self.sink = sink
        self.store = crossing.store
        self.jobs = cast(JobStore, crossing.store)
        self.crossing = crossing
        self.job_id = job_id
        self.cancellation = cancellation
        self.queue = [] if crossing.asked else sorted(crossing.remote)
        #: parts asked and not ended: slave -> when asked
        self.open: Dict[str, float] = {n: time.monotonic() for n in crossing.remote} if crossing.asked else {}
        self.results: List[SlaveResult] = []
        parallel = crossing.values.get("parallel") or (DEFAULT_PARALLEL if crossing.kind == "run"
                                                       else DEFAULT_TRANSFER_PARALLEL)
        self.limit = crossing.pacing.parallel(parallel, crossing.count)
        self.spec = crossing.part_spec()
        self._alive: Optional[Dict[str, int]] = None
        self._alive_at = 0.0
        self._asked_cancel = False
        #: why the parts are given up whatever their end (a get taken back)
        self._abandon: Optional[str] = None
        #: the parts were left to the next master (this one stops)
        self._kept = False

    def run(self) -> None:
        try:
            if self.crossing.asked and self.crossing.kind == "get":
                self._abandon = "the master that asked this get stopped: the file is not put in place"
                self.store.dispatch_write(pgdispatch.ask_cancel, self.job_id, self._abandon)
                self._asked_cancel = True
            if self.crossing.kind == "put" and not self.crossing.asked:
                try:
                    named = ", ".join(self.queue[:3]) + (" ..." if len(self.queue) > 3 else "")
                    self.spec["blob"] = store_path(self.store, self.job_id, pgdispatch.SOURCE,
                                                   cast(List[str], self.crossing.spec["paths"])[0], MAX_CARRIED,
                                                   f"put to {named}")
                except RemshError as e:
                    for name in self.queue:
                        self._end(SlaveResult(name, error=describe_error(e, name), errtag=error_tag(e)))
                    return
            while self.queue or self.open:
                version = self.jobs.version()
                through_outage(self._step, self.store, f"job {self.job_id}: following its parts on other masters")
                if getattr(self.store, "closed", False):
                    return
                if self.queue or self.open:
                    time.sleep(LOOK_GAP)  # every write of the cluster wakes it: at most this often
                    self.jobs.wait_change(version, LOOK_EVERY)
        except StoreError as e:  # the parts left end failed with the job (remsh.jobs)
            log.error("job %s: cannot follow its parts on other masters: %s", self.job_id, e)
        except Exception:  # noqa: BLE001 - logged; the parts left end failed with the job
            log.exception("job %s: following its parts on other masters failed", self.job_id)
        finally:
            if self.crossing.kind == "put" and not self._kept:
                try:
                    self.store.dispatch_write(pgdispatch.drop_blob, self.job_id, pgdispatch.SOURCE)
                except StoreError as e:
                    log.warning("job %s: cannot delete the put's bytes from the store: %s", self.job_id, e)

    def _step(self) -> None:
        if self.cancellation.cancelled and self.crossing.stopping and \
                self.cancellation.reason == self.crossing.stopping:
            # this master stops: the parts go on, the next master follows them (Crossing.resume)
            keep = getattr(self.sink, "keep", None)
            if keep is not None and self.open:
                keep(sorted(self.open))
                self._kept = True
                log.info("job %s: its parts on %s are left to their masters", self.job_id, ", ".join(self.open))
                self.open.clear()
            self.queue = []  # never asked: they end with the job
            return
        if self.cancellation.cancelled:
            for name in self.queue:  # never asked: never started
                self._end(SlaveResult(name, error=self.cancellation.reason, errtag="cancelled"), SLAVE_SKIPPED)
            self.queue = []
            if self.open and not self._asked_cancel:
                self.store.dispatch_write(pgdispatch.ask_cancel, self.job_id, self.cancellation.reason)
                self._asked_cancel = True
        self._ask_more()
        if not self.open:
            return
        rows = [d for d in self.store.dispatch_read(pgdispatch.of_job, self.job_id) if d.slave in self.open]
        if any(d.state == pgdispatch.RUNNING for d in rows) and time.monotonic() >= self._alive_at:
            self._alive = {m.name: m.epoch for m in self.store.masters() if m.alive}
            self._alive_at = time.monotonic() + MASTERS_EVERY
        for d in rows:
            self._look(d)

    def _ask_more(self) -> None:
        room = self.limit - len(self.open)
        if not self.queue or room <= 0 or self.cancellation.cancelled:
            return
        why = self.crossing.pacing.skip_reason()
        if why is not None:
            for name in self.queue:
                self._end(SlaveResult(name, error=why, errtag=ERRTAG_SKIPPED), SLAVE_SKIPPED)
            self.queue = []
            return
        batch = self.queue[:room]  # asked twice (after an outage) is asked once: the rows are the same
        self.store.dispatch_write(pgdispatch.ask, self.job_id, [(n, self.crossing.remote[n]) for n in batch],
                                  self.crossing.kind, self.spec)
        self.queue = self.queue[room:]
        for name in batch:
            self.open[name] = time.monotonic()
        log.info("job %s: %s asked of %s", self.job_id, ", ".join(batch),
                 ", ".join(sorted({self.crossing.remote[n] for n in batch})))

    def _look(self, d: Dispatch) -> None:
        name = d.slave
        if d.state == pgdispatch.DONE:
            result = d.result or {}
            ended = SlaveResult(name, status=result.get("status"), error=result.get("error"),
                                errtag=result.get("errtag"), summary=result.get("summary") or "")
            if self._abandon is not None:
                self._drop(name)
                self._end(SlaveResult(name, error=self._abandon, errtag="lost"), SLAVE_LOST)
            elif self.crossing.kind == "get":  # the holder fetched it; it goes in place here
                ended = self._place(d, ended)
                self._end(ended)
            else:  # the holder recorded its end
                self._ended(name, ended)
        elif d.state == pgdispatch.PENDING:
            if self._asked_cancel:
                why, state, errtag = self._abandon or self.cancellation.reason, pgdispatch.CANCELLED, "cancelled"
            elif time.monotonic() - self.open[name] > PENDING_WAIT:
                why, state, errtag = (f"no master holding it took its part within {PENDING_WAIT:g} s",
                                      pgdispatch.LOST, "lost")
            else:
                return
            if self.store.dispatch_write(pgdispatch.settle, d.id, d.state, state, None, None):
                self._end(SlaveResult(name, error=why, errtag=errtag),
                          SLAVE_SKIPPED if state == pgdispatch.CANCELLED else SLAVE_LOST)
        elif d.state == pgdispatch.RUNNING:
            if self._alive is None or d.claimed_by is None or self._alive.get(d.claimed_by) == d.claim_epoch:
                return
            if self.store.dispatch_write(pgdispatch.settle, d.id, d.state, pgdispatch.LOST, d.claimed_by,
                                         d.claim_epoch):
                log.warning("job %s: master %s running the part of %s is dead: the part is lost", self.job_id,
                            d.claimed_by, name)
                if self.crossing.kind == "get":  # what it stored before it died goes with its claim
                    self._drop(name)
                record = self.jobs.get_job(self.job_id).slaves.get(name)
                if record is not None and record.state in SLAVE_FINAL_STATES:  # its end was recorded
                    self._ended(name, SlaveResult(name, status=record.exit_status, error=record.error))
                else:
                    self._end(SlaveResult(name, error=f"master {d.claimed_by} running it died", errtag="lost"),
                              SLAVE_LOST)
        else:  # settled elsewhere: nothing more will come
            self._ended(name, SlaveResult(name, error=d.state, errtag=d.state))

    def _ended(self, name: str, result: SlaveResult) -> None:
        self.open.pop(name, None)
        self.results.append(result)
        if result.errtag not in (ERRTAG_SKIPPED, "cancelled"):
            self.crossing.pacing.ended(result.error is not None or result.status != 0)

    def _end(self, result: SlaveResult, state: Optional[str] = None) -> None:
        """Record the end of a part the origin decided (it owns the job)."""
        if state is None:
            state = SLAVE_OK if result.error is None and result.status == 0 else SLAVE_FAILED
        try:
            self.jobs.update_slave(self.job_id, result.name, state=state, exit_status=result.status,
                                   error=result.error, errtag=result.errtag, finished=now(),
                                   summary=result.summary or None)
        except StoreError as e:
            log.error("job %s: cannot record the end of %s: %s", self.job_id, result.name, e)
        self._ended(result.name, result)

    def _place(self, d: Dispatch, ended: SlaveResult) -> SlaveResult:
        """Put what the holder fetched for a get in place under ``LOCALDIR/NAME/``."""
        name = d.slave
        meta = (d.result or {}).get("blob")
        try:
            if ended.error is not None:
                return ended
            if not isinstance(meta, dict):  # an end without the bytes is not a get done
                raise CarryFailed(f"{name}: get: master {d.claimed_by} reported it done with no bytes stored")
            paths = cast(List[str], self.crossing.spec["paths"])
            base = posixpath.basename(paths[0].rstrip("/")) or "root"
            mine, made, target = get_directory(name, paths[1], base)
            try:
                get_replacing(target, lambda path: load_path(
                    self.store, self.job_id, name, meta, path, f"{name}: get", limit=MAX_CARRIED,
                    max_entries=int(self.spec.get("max_files") or DEFAULT_GET_MAX_FILES), modes=fetched_modes()),
                    bool(self.crossing.spec.get("force")))
            except BaseException:
                if made:
                    try:
                        os.rmdir(mine)
                    except OSError:
                        pass
                raise
            return SlaveResult(name, status=0, summary=f"{'tree ' if meta.get('tree') else ''}into {target}")
        except RemshError as e:
            return SlaveResult(name, error=describe_error(e, name), errtag=error_tag(e))
        finally:
            self._drop(name)

    def _drop(self, name: str) -> None:
        """Delete what slave ``name``'s get stored."""
        try:
            self.store.dispatch_write(pgdispatch.drop_blob, self.job_id, name)
        except StoreError as e:
            log.warning("job %s: cannot delete the get's bytes of %s from the store: %s", self.job_id, name, e)


# -- the holder's side ---------------------------------------------------------------------


class _Catch:
    """The sink of a get a holder runs for another master: everything goes
    to the record but the end, which the origin writes once the file is in
    place there."""

    def __init__(self, sink: PartSink) -> None:
        self.sink = sink
        self.job_id = sink.job_id
        self.result: Optional[SlaveResult] = None

    def begin(self, names: List[str]) -> None:
        self.sink.begin(names)

    def start(self, name: str) -> None:
        self.sink.start(name)

    def output(self, name: str, stream: str, data: bytes) -> None:
        self.sink.output(name, stream, data)

    def progress(self, name: str, done: int, total: Optional[int]) -> None:
        self.sink.progress(name, done, total)

    def slave_state(self, name: str, state: str, detail: str) -> None:
        self.sink.slave_state(name, state, detail)

    def end(self, result: SlaveResult) -> None:
        self.result = result


class _Part:
    """A dispatch this master claimed and runs."""

    def __init__(self, dispatch: Dispatch) -> None:
        self.dispatch = dispatch
        self.cancellation = Cancellation()
        self.sink: Optional[PartSink] = None
        self.done = threading.Event()


class Dispatcher:
    """Claims and runs the dispatches of the slaves connected to this
    master (see the module docstring); :meth:`stop` cancels the parts it
    runs (they end failed: ``stopping`` is the reason).  ``new_sink`` makes
    the sink each part reports to."""

    def __init__(self, store: DispatchingStore, collection: FleetCollection, new_sink: NewSink,
                 stopping: str) -> None:
        self.store = store
        self.new_sink = new_sink
        self.stopping = stopping
        self.jobs = cast(JobStore, store)
        self.collection = collection
        self._lock = threading.Lock()
        self._parts: Dict[int, _Part] = {}
        self._stop = threading.Event()
        self._failing = ""
        self._thread = threading.Thread(target=self._loop, name="remsh-dispatcher", daemon=True)

    def start(self) -> None:
        self.collection.state_watchers.append(self.slave_state)
        self._thread.start()

    def stop(self) -> None:
        """Stop claiming, cancel the parts running, wait (bounded) for their ends."""
        self._stop.set()
        with self._lock:
            parts = list(self._parts.values())
        for part in parts:
            part.cancellation.cancel(self.stopping)
        deadline = time.monotonic() + STOP_WAIT
        for part in parts:
            part.done.wait(max(0.0, deadline - time.monotonic()))
        if self.slave_state in self.collection.state_watchers:
            self.collection.state_watchers.remove(self.slave_state)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(max(0.0, deadline - time.monotonic()) + 2 * STOP_SLICE)

    def __enter__(self) -> "Dispatcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def slave_state(self, name: str, state: str, detail: str) -> None:
        """A slave went away, came back or was lost: said in the parts it runs."""
        with self._lock:
            sinks = [p.sink for p in self._parts.values() if p.sink is not None and p.dispatch.slave == name]
        for sink in sinks:
            sink.slave_state(name, state, detail)

    def _loop(self) -> None:
        while not self._stop.is_set():
            version = self.jobs.version()
            try:
                self.look()
                if self._failing:
                    log.info("master %s: looking for work of other masters again", self.store.name)
                    self._failing = ""
            except StoreError as e:
                if getattr(self.store, "closed", False):
                    return
                if str(e) != self._failing:
                    log.warning("master %s: cannot look for work of other masters: %s", self.store.name, e)
                self._failing = str(e)
            except Exception:  # noqa: BLE001 - this thread must go on: other masters' work depends on it
                log.exception("master %s: looking for work of other masters failed", self.store.name)
            if self._stop.wait(LOOK_GAP):
                return
            deadline = time.monotonic() + POLL
            # a change, the poll, or a stop (seen within STOP_SLICE), whichever comes first
            while self.jobs.wait_change(version, min(STOP_SLICE, max(0.0, deadline - time.monotonic()))) == version:
                if self._stop.is_set() or getattr(self.store, "closed", False) or time.monotonic() >= deadline:
                    break
            if getattr(self.store, "closed", False) or self._stop.is_set():
                return

    def look(self) -> None:
        """Claim the pending dispatches of this master's connected slaves;
        carry the cancels asked of the parts it runs."""
        slaves = {s.name: s for s in self.collection.get_all_slaves() if s.connected}
        pending: Dict[int, Dispatch] = {}
        for d in self.store.dispatch_read(pgdispatch.for_holder, self.store.name, sorted(slaves)):
            with self._lock:
                part = self._parts.get(d.id)
            if part is not None:
                if d.cancel_reason:
                    part.cancellation.cancel(d.cancel_reason)
            elif d.state == pgdispatch.PENDING and d.slave in slaves:
                pending[d.id] = d
        if not pending or self._stop.is_set():
            return
        # one write claims them all; those another master took first are left out
        for dispatch_id in self.store.dispatch_write(pgdispatch.claim, sorted(pending), repeatable=False):
            d = pending[dispatch_id]
            slave = slaves[d.slave]
            part = _Part(d)
            if d.cancel_reason or self._stop.is_set():  # asked, or this master began to stop meanwhile
                part.cancellation.cancel(d.cancel_reason or self.stopping)
            with self._lock:
                self._parts[d.id] = part
            log.info("job %s: running the part of %s for master %s", d.job_id, d.slave, d.origin)
            threading.Thread(target=self._serve, args=(part, slave), name=f"remsh-part-{d.job_id}",
                             daemon=True).start()

    def carry_on(self, adoptions: Adoptions) -> None:
        """The parts of other masters' jobs whose claims this master adopted
        with a dead master's sessions (:func:`remsh.store.pgdispatch.move_claims`):
        each waits for its slave to resume its session here (``adoptions``),
        its command's output and end go on into the origin's job, and its end
        is reported to the origin as a part run here from the start is."""
        found = self.store.dispatch_read(pgdispatch.carried_on, self.store.name, self.store.epoch)
        for d, record in found:
            with self._lock:
                if d.id in self._parts or self._stop.is_set():
                    continue
                part = self._parts[d.id] = _Part(d)
            if d.cancel_reason:
                part.cancellation.cancel(d.cancel_reason)
            sink = part.sink = self.new_sink(d.job_id, part.cancellation)
            taken = Part(record, sink=cast(AdoptedSink, sink), cancellation=part.cancellation, dispatched=True)
            cast(AdoptedSink, sink).expect_part(taken, f"adopted by master {self.store.name}; waiting for the "
                                                       f"slave")
            adoptions.expect(taken)
            log.info("job %s: the part of %s for master %s is carried on here", d.job_id, d.slave, d.origin)
            threading.Thread(target=self._carried, args=(part, taken), name=f"remsh-part-{d.job_id}",
                             daemon=True).start()
        if found:
            adoptions.start()

    def _carried(self, part: _Part, taken: Part) -> None:
        """Report the end of a part carried on here (:meth:`carry_on`) once its sink recorded it."""
        d = part.dispatch
        taken.done.wait()
        if taken.frozen:  # this master stops: its session stays recorded for the next one
            self._forget(part)
            return
        try:
            record = self.jobs.get_job(d.job_id).slaves.get(d.slave)
        except StoreError as e:
            log.error("job %s: cannot report the end of %s to master %s: %s", d.job_id, d.slave, d.origin, e)
            self._forget(part)
            return
        report: Dict[str, Any] = {"status": None, "error": "no record", "errtag": "error"}
        if record is not None:
            report = {"status": record.exit_status, "error": record.error, "errtag": record.errtag}
        self._report(part, report)

    def _serve(self, part: _Part, slave: Slave) -> None:
        d = part.dispatch
        sink = part.sink = self.new_sink(d.job_id, part.cancellation)
        tmp = tempfile.mkdtemp(prefix="remsh-part-")
        report: Dict[str, Any] = {}
        try:
            results = self._do(d, slave, sink, part.cancellation, tmp, report)
            sink.flush()
            result = results[0] if results else SlaveResult(d.slave, error="no result", errtag="error")
            report.update(status=result.status, error=result.error, errtag=result.errtag, summary=result.summary)
        except RemshError as e:
            report.update(status=None, error=describe_error(e, d.slave), errtag=error_tag(e))
            if d.kind != "get":
                sink.end(SlaveResult(d.slave, error=report["error"], errtag=report["errtag"]))
        except Exception as e:  # noqa: BLE001 - reported to the origin; this master goes on
            log.exception("job %s: the part of %s failed", d.job_id, d.slave)
            report.update(status=None, error=str(e) or type(e).__name__, errtag="error")
            if d.kind != "get":
                sink.end(SlaveResult(d.slave, error=report["error"], errtag="error"))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._report(part, report)

    def _report(self, part: _Part, report: Dict[str, Any]) -> None:
        """Tell the part's origin how it ended (its dispatch row); the part is over here."""
        d = part.dispatch
        try:
            if not self.store.dispatch_write(pgdispatch.finish, d.id, report):
                log.warning("job %s: the part of %s was settled by master %s meanwhile (its result is not "
                            "taken)", d.job_id, d.slave, d.origin)
        except StoreError as e:
            log.error("job %s: cannot report the end of %s to master %s: %s", d.job_id, d.slave, d.origin, e)
        finally:
            self._forget(part)

    def _forget(self, part: _Part) -> None:
        """The part is over here."""
        with self._lock:
            self._parts.pop(part.dispatch.id, None)
        part.done.set()

    def _do(self, d: Dispatch, slave: Slave, sink: PartSink, cancellation: Cancellation, tmp: str,
            report: Dict[str, Any]) -> List[SlaveResult]:
        spec = d.spec
        common: Dict[str, Any] = {"cancellation": cancellation, "holder": self.collection}
        if d.kind == "run":
            return run_job([slave], spec["argv"], sink, cwd=spec.get("cwd"), timeout=spec.get("timeout"), **common)
        if d.kind == "put":
            base = str(spec["base"])
            if base in ("", "..") or "/" in base or "\0" in base:  # another master's word: nothing outside tmp
                raise LocalError(f"{d.slave}: put: {base!r} from master {d.origin} is not a file name")
            local = os.path.join(tmp, base)
            load_path(self.store, d.job_id, pgdispatch.SOURCE, spec["blob"], local, f"{d.slave}: put",
                      limit=MAX_CARRIED)
            return put_job([slave], local, spec["dest"], sink, sync=bool(spec.get("sync")),
                           delete=bool(spec.get("delete")), checksum=bool(spec.get("checksum")),
                           force=bool(spec.get("force")), parents=bool(spec.get("parents")), **common)
        catch = _Catch(sink)
        limit = min(int(spec.get("max_bytes") or MAX_CARRIED), MAX_CARRIED)
        get_job([slave], spec["src"], tmp, catch, max_bytes=limit, max_files=int(spec["max_files"]), **common)
        result = catch.result or SlaveResult(d.slave, error="no result", errtag="error")
        if result.error is None:
            base = posixpath.basename(str(spec["src"]).rstrip("/")) or "root"
            report["blob"] = store_path(self.store, d.job_id, d.slave, os.path.join(tmp, d.slave, base), limit,
                                        f"{d.slave}: get")
        return [result]


def serve_dispatches(collection: FleetCollection, store: JobStore, new_sink: NewSink,
                     stopping: str) -> Optional[Dispatcher]:
    """Start the :class:`Dispatcher` of a master on a shared ``store``
    (``None`` on a store of one master)."""
    shared = dispatching(store)
    if shared is None:
        return None
    dispatcher = Dispatcher(shared, collection, new_sink, stopping)
    dispatcher.start()
    return dispatcher


__all__ = ["Crossing", "Dispatcher", "PartSink", "NewSink", "serve_dispatches", "PENDING_WAIT", "MAX_CARRIED"]
