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

from remsh.conversation import ExecuteCall, Exited, Failed, Output, State
from remsh.errors import Disconnected, PeerTimeout, RemshError
from remsh.fleet import SlaveResult, describe_error
from remsh.master.fanout import DEFAULT_GRACE, Cancellation
from remsh.session import SessionWire
from remsh.store.base import SessionRecord

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

    def __init__(self, record: SessionRecord, wire: Optional[SessionWire] = None) -> None:
        self.record = record
        #: the session, once its slave is back
        self.wire = wire
        #: the master is stopping: nothing more is recorded for this part
        self.frozen = False
        #: set once the part's end is recorded (or it was handed over)
        self.done = threading.Event()
        #: reserved by a registration in progress
        self.claimed = False

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

    # -- the master's side ----------------------------------------------------------

    def expect(self, part: Part) -> None:
        """Wait for ``part``'s slave (from :meth:`start` on)."""
        with self._lock:
            self._waiting[_key(part.session_id)] = part

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

    def waiting(self) -> int:
        """How many recorded sessions still wait for their slave."""
        with self._lock:
            return len(self._waiting)

    # -- the listeners' side ---------------------------------------------------------

    def offer(self, resume_timeout: float) -> None:
        with self._lock:
            self._offers.append(max(0.0, resume_timeout))
            if self._first_offer is None:
                self._first_offer = time.monotonic()
            self._changed.notify_all()

    def claim(self, session_id: str, name: str) -> Optional[Part]:
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
        sink = self._sink_of(part.record.job_id)
        if peer_received <= part.record.request_box:
            # the request never reached the slave: nothing runs there
            sink.end_part(part, SlaveResult(part.name, error="the master stopped before the command reached "
                                                             "the slave", errtag="disconnected"))
            return
        sink.part_back(part)
        holding = threading.Event()
        threading.Thread(target=drive, args=(slave, part, sink, self._cancellation_of(part.record.job_id), holding),
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

    def _deadline(self) -> float:
        """When waiting ends (under the lock): the longest resume time limit
        of the listeners, counted from the start (:data:`DEFAULT_WAIT` until
        one says)."""
        if self._first_offer is None:
            return self._started + DEFAULT_WAIT
        return max(self._started + max(self._offers), self._first_offer + OFFER_SETTLE)

    def _expire_loop(self) -> None:
        with self._lock:
            while self._waiting and not self._stopping:
                left = self._deadline() - time.monotonic()
                if left > 0:
                    self._changed.wait(left)
                    continue
                waited = max(self._offers) if self._offers else DEFAULT_WAIT
                parts = [p for p in self._waiting.values() if not p.claimed]
                for part in parts:
                    self._waiting.pop(_key(part.session_id), None)
                self._lock.release()
                try:
                    for part in parts:
                        self._give_up(part, f"the master stopped before it ended and {part.name} did not "
                                            f"come back within {waited:g} s")
                finally:
                    self._lock.acquire()
                if self._waiting:  # claims in progress: look again soon
                    self._changed.wait(0.5)
            self._thread = None

    def _give_up(self, part: Part, why: str) -> None:
        log.warning("job %s: %s", part.record.job_id, why)
        sink = self._sink_of(part.record.job_id)
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
