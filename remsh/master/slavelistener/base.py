"""The listener base every transport ends in.

A transport delivers a :class:`~remsh.wire.Wire` whose greeting has been
exchanged; :meth:`SlaveListener.handle_new_connection` runs the rest of the
handshake (SPEC section 4, steps 2-5), builds the slave object, calls its
``setup()`` and adds it to the collection.  Subclasses decide who may
register by overriding :meth:`SlaveListener.authorize`.

Each listener keeps the slaves *it* registered (:attr:`SlaveListener.slaves`)
and :meth:`SlaveListener.stop` closes exactly those: listeners sharing a
collection never touch each other's slaves.

Names across listeners (several listeners behind one collection, as
``remsh run`` sets up): a name held by a connected slave is only ever
replaced through the listener that registered it, and a name that another
listener binds to a credential of its own (the SSH listener's key-bound
names, see :meth:`SlaveListener.claims_name`) is never given out here.  The
check is made before the registration is answered (a refusal like any
other) and again, atomically, by the collection's ``add_slave``.

Rejected: letting the newest registration win across listeners.  Any holder
of the shared secret could then take over an SSH slave's name, whose
holder proved a key the secret-holder does not have, or a local slave's.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, Union

from remsh.adoption import Claim, SessionElsewhere, adopter_for
from remsh.deadlines import Deadlines
from remsh.errors import AuthenticationError, Disconnected, RemshError, UsageError
from remsh.handshake import (HANDSHAKE_TIMEOUT, MASTER_GREETING, SLAVE_GREETING, Secret,
                             as_secret, exchange_greeting, master_handshake, resume_ask, session_grant)
from remsh.master.limits import prepare_descriptors
from remsh.master.monitor import IdleMonitor
from remsh.master.slave import DEFAULT_IO_TIMEOUT, Slave
from remsh.master.slavecollection.simple import SimpleSlaveCollection
from remsh.session import SessionFailed, SessionWire, new_session_id
from remsh.sessionlimits import WINDOW_BYTES
from remsh.wire import Box, Wire

log = logging.getLogger(__name__)

#: ``authenticator(name) -> secret``: that slave's secret, or ``None`` if unknown.
Authenticator = Callable[[str], Optional[Secret]]
#: ``on_state(slave, state, detail)``: a resumable slave went ``away``, came
#: ``back`` or was ``lost`` (see :meth:`SlaveListener.slave_state`).
StateCallback = Callable[[Slave, str, str], Any]


class SlaveListener:
    """Abstract base of the slave listeners.

    A listener has one thread of its own, the idle monitor that notices
    idle slaves going away.  :meth:`start` starts it and :meth:`stop` stops
    it (both idempotent); ``with listener:`` does both.

    :param slave_class: class instantiated for each new slave
        (default :class:`~remsh.master.slave.Slave`)
    :param slave_collection: where new slaves are added (default: a new
        :class:`~remsh.master.slavecollection.simple.SimpleSlaveCollection`)
    :param handshake_timeout: bound on the whole handshake, in seconds
    :param io_timeout: passed to each slave (bound on each wait for a reply)
    :param on_state: called as ``on_state(slave, state, detail)`` when a
        slave whose work survives a dropped connection goes ``away``, is
        ``back`` or is ``lost`` (see :meth:`slave_state`)
    """


    #: ``resume_timeout`` when none is given: work does not survive a
    #: dropped connection (a local child never redials)
    DEFAULT_RESUME_TIMEOUT = 0.0

    def __init__(self, slave_class: Optional[Type[Slave]] = None, slave_collection: Any = None, *,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 io_timeout: float = DEFAULT_IO_TIMEOUT,
                 resume_timeout: Optional[float] = None, on_state: Optional[StateCallback] = None) -> None:
        self.slave_class: Type[Slave] = slave_class or Slave
        self.slave_collection = slave_collection if slave_collection is not None else SimpleSlaveCollection()
        self.handshake_timeout = handshake_timeout
        self.io_timeout = io_timeout
        #: the thread that notices idle slaves going away (see :meth:`start`)
        self.monitor = IdleMonitor()
        self._life_lock = threading.RLock()
        self._started = False
        self._slaves_lock = threading.Lock()
        self._slaves: Dict[int, Slave] = {}
        #: how long (seconds) a slave whose connection dropped may take to
        #: come back and carry on its work (0: it may not; see remsh.session)
        self.resume_timeout = self.DEFAULT_RESUME_TIMEOUT if resume_timeout is None else float(resume_timeout)
        if not 0 <= self.resume_timeout < float("inf"):
            raise UsageError("resume_timeout must be a finite number of seconds, 0 or more")
        self._sessions: Dict[str, Slave] = {}
        #: the resume time limits of every away session, on one thread
        self.deadlines = Deadlines("remsh-resume-deadlines")
        #: the hook :meth:`slave_state` calls (may be set after construction)
        self.on_state = on_state

    def slave_state(self, slave: Slave, state: str, detail: str = "") -> None:
        """A slave of this listener went ``away`` (its connection dropped;
        ``detail`` says how long its work waits), is ``back`` (it resumed)
        or is ``lost`` (it did not come back in time; its calls fail).

        Logs one line (a warning for ``away`` and ``lost``), then calls the
        ``on_state`` hook and the collection's ``slave_state`` (if it has
        one).  Called from the thread that noticed; never raises."""
        level = logging.INFO if state == "back" else logging.WARNING
        log.log(level, "slave %s: %s%s", slave.name, state, f" ({detail})" if detail else "")
        for hook in (self.on_state, getattr(self.slave_collection, "slave_state", None)):
            if hook is None:
                continue
            try:
                hook(slave, state, detail)
            except Exception:  # noqa: BLE001 - a failing hook must not break the session
                log.exception("slave state hook failed for %s", slave.name)

    # -- life cycle --------------------------------------------------------

    @property
    def started(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._started

    def start(self) -> None:
        """Start the idle monitor and take part in the collection's name
        rules; idempotent.  Network listeners also open their port here."""
        with self._life_lock:
            if self._started:
                return
            self.monitor.start()
            attach = getattr(self.slave_collection, "attach_listener", None)
            if attach is not None:
                attach(self)
            adopter = adopter_for(self.slave_collection)
            if adopter is not None:  # slaves of an earlier master may come back this long
                adopter.offer(self.resume_timeout)
                watch = getattr(adopter, "watch_refusal", None)
                if watch is not None:  # a master fenced off serves no slave (remsh.jobadopt)
                    watch(self._refuse_all)
            self._started = True

    def _refuse_all(self, why: str) -> None:
        """No slave is served here any more (``why``: the master was fenced
        off): drop this listener's slaves without a goodbye, so that they
        keep their work and take it to another master."""
        slaves = self.slaves
        if slaves:
            log.error("dropping the %d slave(s) of this listener: %s", len(slaves), why)
        for slave in slaves:
            session = slave.session_wire
            if session is not None:
                session.fail(SessionFailed(f"{slave.name}: not served: {why}"))
            slave.drop(Disconnected(f"{slave.name}: not served: {why}"))

    def stop(self) -> None:
        """Close the slaves this listener registered and stop the idle
        monitor; idempotent.  Slaves of other listeners are left alone."""
        with self._life_lock:
            for slave in self.slaves:
                slave.close()
            self.monitor.stop()
            self.deadlines.stop()
            detach = getattr(self.slave_collection, "detach_listener", None)
            if detach is not None:
                detach(self)
            self._started = False

    def __enter__(self) -> "SlaveListener":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def slaves(self) -> List[Slave]:
        """The connected slaves this listener registered."""
        with self._slaves_lock:
            return list(self._slaves.values())

    def _forget(self, slave: Slave) -> None:
        with self._slaves_lock:
            if self._slaves.get(id(slave)) is slave:
                del self._slaves[id(slave)]
            sid = getattr(slave.wire, "session_id", None)
            if sid is not None and self._sessions.get(sid) is slave:
                del self._sessions[sid]

    # -- who may register ----------------------------------------------------

    def authorize(self, name: str, wire: Wire) -> Tuple[bool, Optional[bytes]]:
        """Whether ``name`` may register over ``wire``, and the secret its
        proof must be made with (``None``: no proof).  The base trusts all."""
        return True, None

    def claims_name(self, name: str) -> bool:
        """True when this listener binds ``name`` to a credential of its own
        (e.g. an SSH key), so that no other listener may register it.  The
        base claims nothing."""
        return False

    def _name_free_here(self, name: str) -> bool:
        """The cross-listener rules (see the module docstring)."""
        may_register = getattr(self.slave_collection, "may_register", None)
        if may_register is not None and not may_register(name, self):
            log.warning("slave name %r is held or claimed by another listener", name)
            return False
        return True

    def _authorize_registration(self, name: str, wire: Wire) -> Tuple[bool, Optional[bytes]]:
        """:meth:`authorize`, then the cross-listener name rules."""
        allowed, secret = self.authorize(name, wire)
        if allowed and not self._name_free_here(name):
            return False, secret  # the proof is still computed: a refusal costs the same
        return allowed, secret

    # -- registration ----------------------------------------------------------

    def handle_new_connection(self, wire: Wire, timeout: Optional[float] = None) -> Slave:
        """Authenticate and register the slave at the other end of ``wire``.

        The greeting must already have been exchanged.  Returns the slave,
        now in the collection and in :attr:`slaves`.  ``timeout`` bounds the
        exchange (default: ``handshake_timeout``).  A listener that was never
        started is started first, except a network listener, which only
        registers between :meth:`start` and :meth:`stop`.

        On failure the wire is closed and nothing reaches the collection.

        :raises AuthenticationError: the slave was refused (after the
            refusal box), or its name was taken through another listener
            meanwhile
        :raises ProtocolError: the slave broke the protocol
        :raises Disconnected: the slave went away or stayed silent, or the
            (network) listener is stopped
        """
        if not self._started:
            wire.close()
            raise Disconnected(f"{wire.label}: listener not started (or stopped)")
        resuming: List[Tuple[Slave, SessionWire, int]] = []
        new_session: List[str] = []
        adopting: List[Tuple[Claim, int]] = []
        adopter = adopter_for(self.slave_collection)

        def session_keys(name: str, box: Box) -> Dict[bytes, bytes]:
            """The registered box's session keys (remsh.session): a slave
            that can resume gets a session; one naming its session (and
            name) carries on with it; anything else starts afresh."""
            ask = resume_ask(box, wire.label) if self.resume_timeout > 0 else None
            if ask is None:
                return {}
            if adopter is not None and adopter.handing_over:
                # a session of a job being handed over must not be started afresh here
                raise Disconnected(f"{wire.label}: the master is stopping")
            refusal = getattr(adopter, "refusal", None)
            if refusal is not None:  # fenced off: the slave's work is another master's (remsh.jobadopt)
                raise Disconnected(f"{wire.label}: slave {name!r} not served: {refusal}")
            if ask.session is not None:
                sid = ask.session
                with self._slaves_lock:
                    old = self._sessions.get(sid)
                if old is not None and old.name != name:
                    raise AuthenticationError(f"{wire.label}: slave {name!r} named another slave's session")
                session = old.session_wire if old is not None else None
                if old is not None and session is not None and session.failed is None:
                    received = session.prepare_resume()
                    resuming.append((old, session, ask.received))
                    return session_grant(sid, self.resume_timeout, received)
                claim = adopter.claim(sid, name) if adopter is not None and old is None else None
                if claim is not None:  # a session an earlier master recorded (remsh.jobadopt)
                    adopting.append((claim, ask.received))
                    return session_grant(sid, self.resume_timeout, claim.committed)
            if adopter is not None:
                adopter.slave_restarted(name)  # a command it ran for an earlier master is gone
            sid = new_session_id()
            new_session.append(sid)
            return session_grant(sid, self.resume_timeout)

        try:
            reg = master_handshake(wire, self._authorize_registration, greet=False,
                                   timeout=self.handshake_timeout if timeout is None else timeout,
                                   session_keys=session_keys)
            if resuming:
                old, session, peer_received = resuming[0]
                session.attach(wire, peer_received)
                self.monitor.add(old)
                old.attached()
                changed = getattr(self.slave_collection, "changed", None)
                if changed is not None:
                    changed()
                log.info("slave %s resumed from %s", old.name, wire.stream.peer)
                return old
            conn: Union[Wire, SessionWire] = wire
            if adopting:
                claim, peer_received = adopting[0]
                new_session.append(claim.session_id)
                # goes on from the counts both ends agree on: nothing of the old master's to send again
                conn = SessionWire(wire, claim.session_id, resume_timeout=self.resume_timeout,
                                   spool_limit=WINDOW_BYTES, deadlines=self.deadlines,
                                   counts=(peer_received, claim.committed))
            elif new_session:
                # the master's senders wait for an away slave rather than keep much
                conn = SessionWire(wire, new_session[0], resume_timeout=self.resume_timeout,
                                   spool_limit=WINDOW_BYTES, deadlines=self.deadlines)
            slave = self.slave_class(conn, reg.name, reg.info, self, io_timeout=self.io_timeout)
            if adopting and adopter is not None:
                adopter.attach(adopting.pop()[0], slave, peer_received)  # holds the slave for its command first
            slave.setup()
        except AuthenticationError as e:
            log.warning("refused slave from %s: %s", wire.stream.peer, e)
            wire.close()
            if resuming:
                resuming[0][1].connection_lost(why="a resume failed")
            if adopting and adopter is not None:
                adopter.release(adopting[0][0])
            raise
        except BaseException:
            wire.close()
            if adopting and adopter is not None:
                adopter.release(adopting[0][0])
            raise
        with self._slaves_lock:
            self._slaves[id(slave)] = slave
            if new_session:
                self._sessions[new_session[0]] = slave
        slave.on_disconnect(self._forget)
        self.monitor.add(slave)
        try:
            self.slave_collection.add_slave(slave, self)
        except RemshError as e:
            log.warning("refused slave %s from %s: %s", slave.name, wire.stream.peer, e)
            slave.close()
            raise
        log.info("slave %s registered from %s", slave.name, wire.stream.peer)
        return slave

    def accept_wire(self, wire: Wire, on_progress: Optional[Callable[[], None]] = None) -> Optional[Slave]:
        """Greeting plus :meth:`handle_new_connection`, with failures logged
        rather than raised (for accept loops).  Returns the slave or ``None``.

        One time limit covers the greeting, the handshake and whatever the
        transport's own set-up (TLS, SSH) already used: the stream's
        ``handshake_deadline`` (a ``time.monotonic()`` value) when it has
        one.  ``on_progress`` is called once the peer's greeting checked out
        (the accept loop then knows the connection is no idle squatter).
        """
        deadline = getattr(wire.stream, "handshake_deadline", None)
        if deadline is None:
            deadline = time.monotonic() + self.handshake_timeout
        try:
            exchange_greeting(wire, MASTER_GREETING, SLAVE_GREETING, max(0.0, deadline - time.monotonic()))
            if on_progress is not None:
                on_progress()
            return self.handle_new_connection(wire, timeout=max(0.0, deadline - time.monotonic()))
        except AuthenticationError:
            return None  # logged by handle_new_connection
        except SessionElsewhere as e:  # the slave tries another master: it is told so in time, not an error
            log.info("refused slave from %s: %s", wire.stream.peer, e)
        except RemshError as e:
            log.warning("dropped connection from %s during handshake: %s", wire.stream.peer, e)
        except Exception:  # noqa: BLE001 - a bad connection must never stop the listener
            log.exception("unexpected failure handling connection from %s", wire.stream.peer)
        wire.close()
        return None


class NetworkSlaveListener(SlaveListener):
    """A listener with a server that accepts connections on a port.

    A slave's work survives a dropped connection for ``resume_timeout``
    seconds (default 300; ``0``: not at all): see :mod:`remsh.session`.

    Subclasses set ``self._server`` (an object with ``start()``, ``stop()``
    and ``port``) in their constructor.
    """

    DEFAULT_RESUME_TIMEOUT = 300.0

    port: int
    _server: Any
    #: how many slaves this listener is meant to hold (``None``: not said);
    #: :meth:`start` fails when the open-file limit cannot hold them
    expected_slaves: Optional[int] = None

    def start(self) -> None:
        """Open the port and accept slaves in the background (the port is
        not opened before); idempotent.

        First raises the soft ``RLIMIT_NOFILE`` to the hard limit
        (:mod:`remsh.master.limits`).

        :raises LocalError: the hard limit cannot hold
            :attr:`expected_slaves` (or a single slave); the message says
            how many fit
        """
        with self._life_lock:
            if self._started:
                return
            prepare_descriptors(self.expected_slaves, self.resume_timeout, label=type(self).__name__)
            self._server.start()
            self.port = self._server.port
            super().start()

    def stop(self) -> None:
        """Close the port, drop unfinished handshakes and disconnect the
        slaves this listener registered; idempotent."""
        with self._life_lock:
            self._server.stop()
            super().stop()

    def __enter__(self) -> "NetworkSlaveListener":
        self.start()
        return self


def secret_authorizer(secret: Optional[Secret], authenticator: Optional[Authenticator]
                      ) -> Callable[[str], Tuple[bool, Optional[bytes]]]:
    """The name -> (allowed, secret) rule for a shared secret or an authenticator."""
    shared = as_secret(secret)

    def rule(name: str) -> Tuple[bool, Optional[bytes]]:
        if authenticator is not None:
            try:
                found = authenticator(name)
            except Exception:  # noqa: BLE001 - a failing authenticator refuses
                log.exception("authenticator failed for slave name %r", name)
                return False, None
            if found is not None:
                return True, as_secret(found)
            if shared is None:
                return False, None
        if shared is not None:
            return True, shared
        return True, None

    return rule
