"""A master restart loses no running work: sessions kept in the job store
and taken back by the next master.

While a job's command runs on a slave whose work survives a dropped
connection (a session, :mod:`remsh.session`), the master records the
session in its job store (:class:`~remsh.store.base.SessionRecord`, written
just before the ``execute`` request goes out) and acknowledges the slave's
boxes only once what they carried is committed there (*ack-after-commit*,
:mod:`remsh.sessionacks`): each batch of output is appended together with
the count of the slave's boxes it covers, in one transaction.  The slave
forgets nothing the store does not have.

When the master stops -- killed, or on SIGTERM, when it hands its commands
over (:meth:`remsh.jobs.StoreSink.hand_over`: no goodbye to those slaves,
their records left running) -- the slaves keep their commands running and
their unacknowledged boxes (up to their spool limit) and redial.  A master
started on the same store (:class:`Adoptions`) loads the recorded sessions,
marks those slaves ``away`` and waits up to its ``--resume-timeout`` for
them.  A slave whose resume names a recorded session (and which registers
under the same name) gets it back: the master tells it the committed count,
the slave re-sends every box from there, and :func:`drive` carries on the
``execute`` conversation (rebuilt in its state,
:meth:`remsh.conversation.ExecuteCall.resumed`) into the job's sink: the
output is complete and stored once, the exit status recorded.  A slave that
does not come back in time ends ``lost``; one that registers afresh (a new
process: its command is gone) ends ``lost`` at once.

On a store several masters share (PostgreSQL), a *running* master takes
over the same way the work of another that died (:meth:`Adoptions.follow`):
its store's heartbeat adopts a master silent past the lease (a
compare-and-set on that master's epoch: of several racing, one wins) and
the jobs adopted are taken back here, each command waiting for its slave
for the resume time limit counted from the adoption.  A slave that resumes
here a session this master does not wait for is looked up in the store: a
dead master's is adopted on the spot, a live master's is refused
(:class:`~remsh.adoption.SessionElsewhere`: the slave keeps its command and
tries its next master).  A master that finds itself fenced off (its own
work adopted while it was paused) drops its slaves without a goodbye --
nothing more is acknowledged, so the slaves keep what the adopter needs --
and refuses every slave from then on.

What cannot survive: a command whose stdin the master still forwards is
not recorded (its input would be cut short); it ends ``lost`` as before.
``put`` and ``get`` in flight fail, their error saying the master stopped.
Boxes the old master sent that the slave never received (an interrupt, for
one) are lost with it; a job cancelled is cancelled again by asking the new
master.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import threading
import time
import weakref
from typing import Any, Callable, Dict, List, Optional, Protocol

from remsh.adoption import SessionElsewhere
from remsh.conversation import ExecuteCall, Exited, Failed, Output, State
from remsh.errors import Disconnected, PeerTimeout, RemshError
from remsh.fleet import SlaveResult, describe_error
from remsh.master.fanout import DEFAULT_GRACE, Cancellation
from remsh.session import SessionFailed, SessionWire
from remsh.store.base import SessionRecord, StoreError

log = logging.getLogger(__name__)

#: How long the adopting thread may take to hold its slave.
HOLD_TIMEOUT = 10.0
#: How often a taken-back command looks for a cancellation.
CANCEL_POLL = 0.5
#: Until a listener says how long slaves may take, this long.
DEFAULT_WAIT = 300.0
#: After the first listener's offer, wait this long for the others'.
OFFER_SETTLE = 0.5
#: Longest a command's request waits for the end of the previous command on
#: the same session to be recorded (see :func:`take_session`).
OWNER_WAIT = 5.0


def _key(session_id: str) -> bytes:
    """What recorded sessions are found by: a digest, so that the lookup
    reveals nothing of the id; the id itself is then compared in constant time."""
    return hashlib.sha256(session_id.encode("utf-8", "replace")).digest()


class Part:
    """A job's command on one slave, carried by a recorded session."""

    def __init__(self, record: SessionRecord, wire: Optional[SessionWire] = None, *,
                 sink: Optional["PartSink"] = None, cancellation: Optional[Cancellation] = None,
                 dispatched: bool = False) -> None:
        self.record = record
        #: the session, once its slave is back
        self.wire = wire
        #: where it reports and what cancels it, when not its job's (a part of another master's job)
        self.sink = sink
        self.cancellation = cancellation
        #: a part of another master's job that this master runs (remsh.crossmaster)
        self.dispatched = dispatched
        #: the master is stopping: nothing more is recorded for this part
        self.frozen = False
        #: set once the part's end is recorded (or it was handed over)
        self.done = threading.Event()
        #: reserved by a registration in progress
        self.claimed = False
        #: since when it waits for its slave (:meth:`Adoptions.expect`)
        self.since = time.monotonic()

    @property
    def session_id(self) -> str:
        return self.record.id

    @property
    def committed(self) -> int:
        return self.record.received

    @property
    def name(self) -> str:
        return self.record.name


_owners: "weakref.WeakKeyDictionary[SessionWire, Part]" = weakref.WeakKeyDictionary()
_owners_lock = threading.Lock()


def take_session(wire: SessionWire, part: Part) -> None:
    """``part``'s command now runs over ``wire`` (the slave is held for
    it).  The previous command on the same session (another job's) may
    still be recording its end, in its own thread, after it gave the slave
    up: wait for that (at most :data:`OWNER_WAIT`), so that its output and
    end are committed before the session's record and commit point are
    this command's.  Without it the previous job could lose its last
    output, or overwrite the new command's count with its own."""
    with _owners_lock:
        previous = _owners.get(wire)
    if previous is not None and previous is not part and not previous.done.wait(OWNER_WAIT):
        log.warning("job %s: the previous command on %s did not record its end within %g s",
                    previous.record.job_id, part.name, OWNER_WAIT)
    with _owners_lock:
        _owners[wire] = part


def owns_session(wire: SessionWire, part: Part) -> bool:
    """Whether ``part``'s command is the one ``wire``'s record and commit point are for."""
    with _owners_lock:
        return _owners.get(wire) is part


def release_session(wire: SessionWire, part: Part) -> bool:
    """``part``'s command ended; True if it still owned ``wire`` (its record
    is then to be closed and the commit point dropped)."""
    with _owners_lock:
        if _owners.get(wire) is not part:
            return False
        del _owners[wire]
        return True


class Adoptions:
    """The sessions a master found in its store at start, waiting for their
    slaves (an :class:`~remsh.adoption.Adopter` for the listeners).

    ``sink_of(job_id)`` gives the job's sink; ``cancellation_of(job_id)``
    its cancellation."""

    def __init__(self, sink_of: "SinkLookup", cancellation_of: "CancelLookup") -> None:
        self._sink_of = sink_of
        self._cancellation_of = cancellation_of
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._waiting: Dict[bytes, Part] = {}
        self._started = time.monotonic()
        self._offers: List[float] = []
        self._first_offer: Optional[float] = None
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        #: a store several masters share (:meth:`follow`), and how this master takes back what it adopts
        self._store: Any = None
        self._take_over: Optional[Callable[[List[str]], None]] = None
        self._take_lock = threading.Lock()  # one take-over at a time: a job is taken back once
        #: why slaves are refused here: this master was fenced off
        self._refusal: Optional[str] = None
        #: the listeners' ``drop_all(why)``, called once when it is
        self._refusal_watchers: List[Callable[[str], None]] = []
        #: expects the parts of other masters' jobs whose claims this master adopted (remsh.crossmaster)
        self._carry_on: Optional[Callable[[], None]] = None

    # -- the master's side ----------------------------------------------------------

    def expect(self, part: Part) -> None:
        """Wait for ``part``'s slave (from :meth:`start` on), for the
        listeners' resume time limit from now."""
        with self._lock:
            part.since = time.monotonic()
            self._waiting[_key(part.session_id)] = part
            self._changed.notify_all()

    def start(self) -> None:
        """Start the thread that gives up on slaves past their time."""
        with self._lock:
            if not self._waiting or self._thread is not None:
                return
            self._thread = threading.Thread(target=self._expire_loop, name="remsh-jobs-adopt", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """The master stops: nothing more is taken back or given up on (the
        sessions stay recorded for the next master)."""
        with self._lock:
            self._stopping = True
            parts = list(self._waiting.values())
            self._waiting.clear()
            self._changed.notify_all()
        for part in parts:
            part.frozen = True
            part.done.set()

    @property
    def handing_over(self) -> bool:
        with self._lock:
            return self._stopping

    @property
    def refusal(self) -> Optional[str]:
        """Why no slave may register here any more (this master was fenced
        off: another master has its work), else ``None``."""
        with self._lock:
            return self._refusal

    def waiting(self) -> int:
        """How many recorded sessions still wait for their slave."""
        with self._lock:
            return len(self._waiting)

    # -- the listeners' side ---------------------------------------------------------

    def watch_refusal(self, drop_all: Callable[[str], None]) -> None:
        """Call ``drop_all(why)`` once when this master is fenced off (at
        once if it is already): a listener drops its slaves then."""
        with self._lock:
            refusal = self._refusal
            if refusal is None:
                self._refusal_watchers.append(drop_all)
        if refusal is not None:
            drop_all(refusal)

    def offer(self, resume_timeout: float) -> None:
        with self._lock:
            self._offers.append(max(0.0, resume_timeout))
            if self._first_offer is None:
                self._first_offer = time.monotonic()
            self._changed.notify_all()

    def claim(self, session_id: str, name: str) -> Optional[Part]:
        part = self._claim_here(session_id, name)
        if part is None and self._store is not None and not self.handing_over and self.refusal is None:
            part = self._claim_from_store(session_id, name)
        return part

    def _claim_here(self, session_id: str, name: str) -> Optional[Part]:
        with self._lock:
            part = self._waiting.get(_key(session_id))
            if part is None or part.claimed or self._stopping:
                return None
            if not hmac.compare_digest(part.session_id.encode(), session_id.encode()):
                return None
            if not hmac.compare_digest(part.name.encode("utf-8"), name.encode("utf-8")):
                log.warning("slave %r named the session of another slave (%r): refused", name, part.name)
                return None
            part.claimed = True
            return part

    def release(self, claim: object) -> None:
        assert isinstance(claim, Part)
        with self._lock:
            claim.claimed = False

    def attach(self, claim: object, slave: Any, peer_received: int) -> None:
        assert isinstance(claim, Part)
        part = claim
        with self._lock:
            self._waiting.pop(_key(part.session_id), None)
        part.wire = slave.wire
        sink = self._part_sink(part)
        if peer_received <= part.record.request_box:
            # the request never reached the slave: nothing runs there
            sink.end_part(part, SlaveResult(part.name, error="the master stopped before the command reached "
                                                             "the slave", errtag="disconnected"))
            return
        sink.part_back(part)
        holding = threading.Event()
        cancellation = part.cancellation or self._cancellation_of(part.record.job_id)
        threading.Thread(target=drive, args=(slave, part, sink, cancellation, holding),
                         name=f"remsh-adopted-{part.name}", daemon=True).start()
        if not holding.wait(HOLD_TIMEOUT):
            log.warning("slave %s: the taken-back command did not get hold of the slave in time", part.name)
        log.info("job %s: took back the command on %s (from box %d)", part.record.job_id, part.name,
                 part.committed)

    def withdraw(self, part: Part) -> bool:
        """Stop waiting for ``part``'s slave (its job was cancelled); False
        when it is already back (or being registered)."""
        with self._lock:
            if part.claimed or self._waiting.get(_key(part.session_id)) is not part:
                return False
            del self._waiting[_key(part.session_id)]
            return True

    def slave_restarted(self, name: str) -> None:
        with self._lock:
            parts = [p for p in self._waiting.values() if p.name == name and not p.claimed]
            for part in parts:
                self._waiting.pop(_key(part.session_id), None)
        for part in parts:
            self._give_up(part, f"{name} came back as a new process: its command is gone")

    # -- giving up --------------------------------------------------------------------

    def _deadline(self, part: Part) -> float:
        """When waiting for ``part``'s slave ends (under the lock): the
        longest resume time limit of the listeners, counted from the start
        or, for work adopted later from a dead master, from its adoption
        (:data:`DEFAULT_WAIT` until a listener says)."""
        if self._first_offer is None:
            return max(self._started, part.since) + DEFAULT_WAIT
        return max(max(self._started, part.since) + max(self._offers), self._first_offer + OFFER_SETTLE)

    def _expire_loop(self) -> None:
        with self._lock:
            while self._waiting and not self._stopping:
                now = time.monotonic()
                parts = [p for p in self._waiting.values() if not p.claimed and self._deadline(p) <= now]
                if not parts:
                    left = min(self._deadline(p) for p in self._waiting.values()) - now
                    self._changed.wait(left if left > 0 else 0.5)  # past it and claimed: look again soon
                    continue
                waited = max(self._offers) if self._offers else DEFAULT_WAIT
                for part in parts:
                    self._waiting.pop(_key(part.session_id), None)
                self._lock.release()
                try:
                    for part in parts:
                        self._give_up(part, f"the master stopped before it ended and {part.name} did not "
                                            f"come back within {waited:g} s")
                finally:
                    self._lock.acquire()
            self._thread = None

    # -- a running master adopting a dead one's work (a store several masters share) ----------

    def carry_on_with(self, carry_on: Callable[[], None]) -> None:
        """After each adoption (and for a slave resuming a session adopted
        here), ``carry_on()`` :meth:`expect`-s the parts of other masters'
        jobs whose claims came with it (:meth:`remsh.crossmaster.Dispatcher.carry_on`)."""
        self._carry_on = carry_on

    def _carry_on_now(self) -> None:
        carry_on = self._carry_on
        if carry_on is None:
            return
        try:
            carry_on()
        except StoreError as e:
            log.error("the adopted parts of other masters' jobs could not be taken back: %s", e)

    def follow(self, store: Any, take_over: Callable[[List[str]], None]) -> None:
        """On a store several masters share (one with ``watch_adoptions``,
        :mod:`remsh.store.pgadopt`; any other: nothing to do): the
        heartbeat adopts the work of dead masters and ``take_over(job_ids)``
        takes it back (the parts of those jobs are :meth:`expect`-ed); a
        slave resuming here a session this master does not wait for is
        adopted on demand (:meth:`claim`); when this master finds itself
        fenced off it stops serving its commands' slaves."""
        watch = getattr(store, "watch_adoptions", None)
        if watch is None:
            return
        self._store, self._take_over = store, take_over
        watch(self._adopted, self._fenced)

    def _adopted(self, job_ids: List[str]) -> None:
        """Jobs of a dead master are this master's now: take them back, in a
        thread of their own (the store's thread, which adopted them, must go
        on beating: a large job's take-back could outlast the lease)."""
        if self._take_over is not None and not self.handing_over:
            threading.Thread(target=self._take_back, args=(job_ids,), name="remsh-jobs-adopted",
                             daemon=True).start()

    def _take_back(self, job_ids: List[str]) -> None:
        take_over = self._take_over
        assert take_over is not None
        with self._take_lock:
            if self.handing_over or self.refusal is not None:
                return  # left in the store: the next master of this name, or another, takes them
            try:
                take_over(job_ids)
            except StoreError as e:
                log.error("the adopted jobs %s could not be taken back: %s", ", ".join(job_ids), e)
            self._carry_on_now()
        self.start()

    def _claim_from_store(self, session_id: str, name: str) -> Optional[Part]:
        """The session ``session_id`` that this master does not wait for,
        looked up in the shared store: adopted by this master a moment ago
        (its job is taken back now), a dead master's (adopted now: of
        several masters racing one wins), or a live master's -- refused
        (:class:`~remsh.adoption.SessionElsewhere`), so that the slave tries
        its next master instead of dropping its work.  ``None``: the store
        has no such session (its work is gone)."""
        store = self._store
        try:
            holder = store.find_session(session_id)
            if holder is None:
                return None
            if not hmac.compare_digest(holder.name.encode("utf-8"), name.encode("utf-8")):
                log.warning("slave %r named the session of another slave (%r): refused", name, holder.name)
                return None
            if holder.owner != store.name and not holder.alive:
                log.warning("slave %s resumes a session of master %s, which is dead: adopting its work",
                            name, holder.owner)
                store.adopt_master(holder.owner, holder.epoch)  # taken back by _adopted if this one won
                holder = store.find_session(session_id)
                if holder is None:
                    return None
        except StoreError as e:
            raise SessionElsewhere(f"slave {name}: its session cannot be looked up in the job store ({e}); "
                                   f"it may try again") from e
        if holder.owner != store.name:
            raise SessionElsewhere(f"slave {name}: its session belongs to master {holder.owner}, which is alive "
                                   f"(or adopted it): not carried on here; the slave tries its next master")
        with self._take_lock:  # adopted here, perhaps not taken back yet
            part = self._claim_here(session_id, name)
            if part is None and not self.handing_over:  # a part of another master's job, adopted here?
                self._carry_on_now()
                part = self._claim_here(session_id, name)
            if part is None and self._take_over is not None and not self.handing_over:
                self._take_over([holder.job_id])
                part = self._claim_here(session_id, name)
        if part is None:  # this master's, but being registered on another connection
            raise SessionElsewhere(f"slave {name}: its session is being carried on by this master over another "
                                   f"connection; it may try again")
        self.start()
        return part

    def _fenced(self, error: StoreError) -> None:
        """This master's epoch is stale: another master adopted its work.
        Its commands' sessions are dropped without a goodbye (the slaves
        keep their commands and go to the master that adopted them; nothing
        more is acknowledged here, since nothing more is stored), their
        records left to the adopter, and no slave registers here again."""
        with self._lock:
            if self._refusal is not None:
                return
            self._refusal = refusal = f"this master was fenced off ({error})"
            watchers, self._refusal_watchers = self._refusal_watchers, []
            waiting = list(self._waiting.values())
            self._waiting.clear()
            self._changed.notify_all()
        with _owners_lock:
            running = [(wire, part) for wire, part in _owners.items()
                       if part.dispatched or self._ours(part.record.job_id)]
        log.error("fenced off: this master stops serving the slaves of its %d running command(s)%s; they "
                  "go to the master that adopted its work", len(running) + len(waiting),
                  f" ({', '.join(sorted(p.name for _, p in running))})" if running else "")
        for part in waiting:
            part.frozen = True
            part.done.set()
        why = SessionFailed("the master was fenced off: another master adopted its work; the slave keeps its "
                            "command for that master")
        # failing a session runs its slave's callbacks: not in a thread that may hold a job's lock
        def fail_all() -> None:
            for wire, _ in running:
                wire.fail(why)

        failing = threading.Thread(target=fail_all, name="remsh-fenced", daemon=True)
        failing.start()
        failing.join(HOLD_TIMEOUT)
        threading.Thread(target=self._hand_over, args=(sorted({p.record.job_id for _, p in running
                                                               if not p.dispatched}),
                                                       watchers, refusal),
                         name="remsh-fenced-jobs", daemon=True).start()

    def _part_sink(self, part: Part) -> "PartSink":
        """Where ``part`` reports: its own sink, else its job's."""
        return part.sink if part.sink is not None else self._sink_of(part.record.job_id)

    def _ours(self, job_id: str) -> bool:
        try:
            self._cancellation_of(job_id)
        except KeyError:
            return False
        return True

    def _hand_over(self, job_ids: List[str], watchers: List[Callable[[str], None]], why: str) -> None:
        """Record nothing more of these jobs (their sinks hand over), and
        have the listeners drop every slave (``watchers``)."""
        for job_id in job_ids:
            try:
                sink = self._sink_of(job_id)
            except KeyError:
                continue
            hand_over = getattr(sink, "hand_over", None)
            if hand_over is not None:
                hand_over()
        for drop_all in watchers:
            try:
                drop_all(why)
            except Exception:  # noqa: BLE001 - a listener's; the others still drop theirs
                log.exception("a listener could not drop its slaves")

    def _give_up(self, part: Part, why: str) -> None:
        log.warning("job %s: %s", part.record.job_id, why)
        sink = self._part_sink(part)
        sink.slave_state(part.name, "lost", why)
        sink.end_part(part, SlaveResult(part.name, error=why, errtag="disconnected"))


def drive(slave: Any, part: Part, sink: "PartSink", cancellation: Cancellation,
          holding: threading.Event) -> None:
    """Carry on the ``execute`` conversation of ``part`` on ``slave`` (whose
    session resumed from the committed count) into ``sink``, to its end."""
    name = part.name
    state = State.RUNNING if part.committed > part.record.reply_base else State.REQUESTED
    call = ExecuteCall.resumed(state)
    result: Optional[SlaveResult] = None
    started = time.monotonic()
    #: when the interrupt went out: a slave still not done after DEFAULT_GRACE is dropped
    interrupted: Optional[float] = None
    # busy with its job in ``remsh ls``, as a job the master started itself is
    collection = getattr(getattr(slave, "listener", None), "slave_collection", None)
    hold = getattr(collection, "holding", None)
    busy = hold(slave, part.record.job_id) if hold is not None else contextlib.nullcontext()
    try:
        with busy, slave.operation("execute") as frame:
            holding.set()
            wire = frame.wire
            while result is None:
                if cancellation.cancelled and not call.interrupt_wanted:
                    interrupted = time.monotonic()
                    data = call.interrupt()
                    if data is not None:
                        wire.send_bytes(data, lock_timeout=5.0)
                if interrupted is not None and (not slave.connected or
                                                time.monotonic() - interrupted > DEFAULT_GRACE):
                    # as a cancelled fan-out does (remsh.master.fanout): an away slave's session is
                    # ended at once, one that does not stop within the grace is dropped
                    log.warning("job %s: %s did not stop when cancelled; dropping its connection",
                                part.record.job_id, name)
                    interrupted = None
                    slave.close()
                try:
                    box = wire.read_box(CANCEL_POLL)
                except PeerTimeout:
                    continue
                if box is None:
                    raise Disconnected(f"{name}: the slave ended its session during execute (it is stopping)")
                event = call.receive(box)
                if isinstance(event, Output):
                    sink.output(name, event.stream, event.data)
                elif isinstance(event, Exited):
                    result = SlaveResult(name, status=event.code)
                elif isinstance(event, Failed):
                    error = event.error
                    result = SlaveResult(name, error=f"execute: {error.remote_message} [{error.errtag}]",
                                         errtag=error.errtag)
    except RemshError as e:
        result = SlaveResult(name, error=describe_error(e, name), errtag="disconnected")
    except Exception as e:  # noqa: BLE001 - recorded as the slave's error
        log.exception("job %s: the taken-back command on %s failed", part.record.job_id, name)
        result = SlaveResult(name, error=f"{e!r}", errtag="error")
    finally:
        holding.set()
    result.duration_s = time.monotonic() - started
    sink.end_part(part, result)


class PartSink(Protocol):
    """What this module needs of a job's sink (:class:`remsh.jobs.StoreSink`)."""

    def output(self, name: str, stream: str, data: bytes) -> None: ...

    def slave_state(self, name: str, state: str, detail: str) -> None: ...

    def part_back(self, part: Part) -> None: ...

    def end_part(self, part: Part, result: SlaveResult) -> None: ...


#: ``sink_of(job_id)``: the sink of a job taken back.
SinkLookup = Callable[[str], PartSink]
#: ``cancellation_of(job_id)``: what cancels it.
CancelLookup = Callable[[str], Cancellation]
