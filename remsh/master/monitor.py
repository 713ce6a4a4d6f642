"""Notices idle slaves whose connection ends, with one thread for all of them.

While a slave is idle nobody reads its connection, so nobody would notice
that the slave died.  :class:`IdleMonitor` watches every slave's stream from
one thread; no slave has a thread of its own.

A stream is *armed* (watched for input, hang-up and errors) while its slave
is idle, and *quiet* (on Linux: watched for hang-up and errors only) while an
operation runs, so that ordinary replies never wake the monitor.  An
operation that finds its stream armed makes it quiet (:meth:`busy`, one
``epoll_ctl``); one that ends leaves it quiet and asks the monitor to arm it
(:meth:`idle`), which the thread does :data:`ARM_DELAY` later if the slave is
still idle then.  Back-to-back operations thus cost no system call of the
monitor's, and a slave that dies between them is still noticed at once (its
hang-up is watched while quiet); only bytes a slave sends while idle (a
protocol violation, or a session's link check) wait up to :data:`ARM_DELAY`
to be read.  An event on an idle slave means the stream ended (the slave
died: its kernel closed the socket), failed (TCP keepalive gave up on a
vanished host), or carries bytes nobody asked for (a protocol violation): in
each case the slave is disconnected, which removes it from its collection.
An event that arrives while an operation holds the slave is left to that
operation, and looked at again when it ends.

Registrations are one-shot on Linux: an event disarms its stream until the
next :meth:`idle`, so a dead stream cannot make the thread spin.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from typing import Any, Dict, Optional, Protocol, Set

from remsh.errors import Disconnected, ProtocolError, RemshError

log = logging.getLogger(__name__)

_EPOLL = hasattr(select, "epoll")
if _EPOLL:
    _ARMED = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLONESHOT
    _QUIET = select.EPOLLRDHUP | select.EPOLLONESHOT
    _WAKE = select.EPOLLIN
else:  # pragma: no cover - poll(2) fallback: unregister while busy
    _ARMED = select.POLLIN
    _QUIET = 0
    _WAKE = select.POLLIN


#: How long after an operation ends its stream is armed (seconds), if the
#: slave is idle then; the next operation usually comes sooner.
ARM_DELAY = 0.05


class Slave(Protocol):
    """What the monitor needs of a slave (:class:`remsh.master.slave.Slave`)."""

    name: str
    idle_watcher: Any

    @property
    def wire(self) -> Any: ...

    @property
    def connected(self) -> bool: ...

    def try_hold(self) -> bool:
        """Take the slave if no operation holds it."""

    def release(self) -> None:
        """Give back what :meth:`try_hold` took."""

    def drop(self, exc: RemshError) -> None:
        """Disconnect the slave with ``exc`` as the cause."""


class IdleMonitor:
    """Watches slaves' connections from a single thread."""

    def __init__(self, name: str = "remsh-idle-monitor") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._poller: Optional[object] = None
        self._by_fd: Dict[int, "Slave"] = {}
        self._fd_of: Dict[int, int] = {}  # id(slave) -> fd
        self._recheck: Set[int] = set()  # id(slave): an event came while it was busy
        self._armed: Set[int] = set()  # id(slave): its stream is armed
        self._pending: Dict[int, "Slave"] = {}  # id(slave): to arm once ARM_DELAY has passed
        self._due = 0.0  # when the oldest of _pending is to be armed (time.monotonic())
        self._asleep = False  # the thread waits with no time limit: wake it for _pending
        self._thread: Optional[threading.Thread] = None
        self._wake_r = self._wake_w = -1
        self._stopping = False

    # -- life cycle --------------------------------------------------------

    def start(self) -> None:
        """Start the monitor thread (idempotent)."""
        with self._lock:
            if self._thread is not None:
                return
            self._poller = select.epoll() if _EPOLL else select.poll()
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_w, False)
            os.set_blocking(self._wake_r, False)
            self._poller.register(self._wake_r, _WAKE)
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and forget every slave (idempotent)."""
        with self._lock:
            thread, self._thread = self._thread, None
            self._stopping = True
            self._wake()
        if thread is not None:
            thread.join(timeout)
        with self._lock:
            if self._poller is not None and _EPOLL:
                self._poller.close()  # type: ignore[attr-defined]
            self._poller = None
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    os.close(fd)
            self._wake_r = self._wake_w = -1
            for slave in self._by_fd.values():
                slave.idle_watcher = None
            self._by_fd.clear()
            self._fd_of.clear()
            self._recheck.clear()
            self._armed.clear()
            self._pending.clear()

    def _wake(self) -> None:
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:
                pass

    # -- what slaves tell us --------------------------------------------------

    def add(self, slave: "Slave") -> None:
        """Start watching ``slave`` (idle now)."""
        fd = slave.wire.stream.fileno()
        with self._lock:
            poller = self._poller
            if poller is None:
                return
            self._by_fd[fd] = slave
            self._fd_of[id(slave)] = fd
            slave.idle_watcher = self
            poller.register(fd, _ARMED)  # type: ignore[attr-defined]
            self._armed.add(id(slave))
        if not _EPOLL:
            self._wake()

    def busy(self, slave: "Slave") -> None:
        """An operation starts on ``slave`` (which it holds): go quiet (a
        stream not armed since the last operation already is)."""
        key = id(slave)
        if _EPOLL and key not in self._armed:
            return
        fd = self._fd_of.get(key)
        poller = self._poller
        if fd is None or poller is None:
            return
        self._armed.discard(key)
        try:
            if _EPOLL:
                poller.modify(fd, _QUIET)  # type: ignore[attr-defined]
            else:
                poller.unregister(fd)  # type: ignore[attr-defined]
        except (KeyError, ValueError, OSError):
            pass

    def idle(self, slave: "Slave") -> None:
        """``slave``'s operation ended (the caller still holds the slave):
        arm its stream :data:`ARM_DELAY` from now, or at once if an event
        came while it was held."""
        key = id(slave)
        if not _EPOLL or key in self._recheck:
            self._arm(slave)
            return
        if key in self._pending or key in self._armed:
            return
        if not self._pending:
            self._due = time.monotonic() + ARM_DELAY
        self._pending[key] = slave
        if self._asleep:
            self._asleep = False
            self._wake()

    def _arm(self, slave: "Slave") -> None:
        """Arm ``slave``'s stream now (the caller holds the slave), after
        reading it if an event came while it was held."""
        key = id(slave)
        self._pending.pop(key, None)
        fd = self._fd_of.get(key)
        poller = self._poller
        if fd is None or poller is None:
            return
        if key in self._recheck:
            self._recheck.discard(key)
            if not _check_idle_stream(slave):
                return
        try:
            if _EPOLL:
                poller.modify(fd, _ARMED)  # type: ignore[attr-defined]
                self._armed.add(key)
            else:
                poller.register(fd, _ARMED)  # type: ignore[attr-defined]
                self._wake()
        except (KeyError, ValueError, OSError):
            pass  # closed meanwhile: forget() follows

    def needs_recheck(self, slave: "Slave") -> bool:
        """True when an event for ``slave`` came while it was held."""
        return id(slave) in self._recheck

    def forget(self, slave: "Slave") -> None:
        """Stop watching ``slave`` for good (it disconnected)."""
        key = id(slave)
        with self._lock:
            fd = self._fd_of.pop(key, None)
            self._recheck.discard(key)
            self._armed.discard(key)
            self._pending.pop(key, None)
            if fd is None:
                return
            if self._by_fd.get(fd) is slave:
                del self._by_fd[fd]
            if self._poller is not None:
                try:
                    self._poller.unregister(fd)  # type: ignore[attr-defined]
                except (KeyError, ValueError, OSError):
                    pass

    # -- the thread ----------------------------------------------------------

    def _run(self) -> None:
        poller = self._poller
        assert poller is not None
        while True:
            self._asleep = True  # before looking at _pending: idle() wakes us if it adds
            timeout: float = -1
            if self._pending:
                self._asleep = False
                timeout = max(0.0, self._due - time.monotonic())
            try:
                events = poller.poll(timeout)  # type: ignore[attr-defined]
            except (OSError, ValueError) as e:
                if self._stopping:
                    return
                # nothing can be watched any more: say so, and leave no slave
                # that nobody would notice dying
                log.exception("idle monitor %s failed; disconnecting the slaves it watched", self.name)
                self._fail_all(Disconnected(f"idle monitor failed: {e}"))
                return
            if self._stopping:
                return
            for fd, _ in events:
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    continue
                slave = self._by_fd.get(fd)
                if slave is None:
                    continue
                if not slave.try_hold():
                    # an operation holds it: it sees a dead stream itself, and
                    # idle() looks again when it ends
                    self._recheck.add(id(slave))
                    if not _EPOLL:
                        self.busy(slave)
                    continue
                self._armed.discard(id(slave))  # one-shot: the event disarmed it
                try:
                    if _check_idle_stream(slave):
                        self._arm(slave)  # spurious: arm again
                except Exception as e:  # noqa: BLE001 - one slave must not stop the thread
                    log.exception("idle monitor: checking slave %s failed", slave.name)
                    slave.drop(Disconnected(f"{slave.name}: idle check failed: {e!r}"))
                finally:
                    slave.release()
            if self._pending and time.monotonic() >= self._due:
                self._arm_pending()

    def _arm_pending(self) -> None:
        """Arm the streams of the slaves still idle ARM_DELAY after their
        last operation; a held one is tried again ARM_DELAY later (its
        operation's end asks again in any case)."""
        for key, slave in list(self._pending.items()):
            if not slave.try_hold():
                continue
            try:
                if self._pending.get(key) is slave and slave.connected:
                    self._arm(slave)
                else:
                    self._pending.pop(key, None)
            except Exception as e:  # noqa: BLE001 - one slave must not stop the thread
                log.exception("idle monitor: checking slave %s failed", slave.name)
                slave.drop(Disconnected(f"{slave.name}: idle check failed: {e!r}"))
            finally:
                slave.release()
        self._due = time.monotonic() + ARM_DELAY

    def _fail_all(self, exc: RemshError) -> None:
        with self._lock:
            slaves = list(self._by_fd.values())
        for slave in slaves:
            slave.drop(exc)


def _check_idle_stream(slave: "Slave") -> bool:
    """Read ``slave``'s stream while it is idle; disconnect the slave if the
    stream ended, failed or carried bytes.  Returns True if all was well.

    A resumable slave (:mod:`remsh.session`) is only marked away when its
    stream ends or fails, and may send the session's control boxes (link
    checks, acknowledgements) while idle.  The caller holds the slave.
    """
    if not slave.connected:
        return False
    wire = slave.wire
    stream = wire.stream
    session = hasattr(wire, "idle_input")
    try:
        data = stream.recv(4096, 0)
    except TimeoutError:
        return True  # nothing there after all
    except OSError as e:
        if session:
            wire.connection_lost(why=f"connection lost while idle: {e}")
        else:
            slave.drop(Disconnected(f"{slave.name}: connection lost while idle: {e}"))
        return False
    if not data:
        if session:
            wire.connection_lost(why="slave closed the connection")
        else:
            slave.drop(Disconnected(f"{slave.name}: slave closed the connection"))
        return False
    if session:
        try:
            if wire.idle_input(data):
                return True
        except ProtocolError:
            pass
    slave.drop(ProtocolError(f"{slave.name}: slave sent {len(data)} unrequested bytes while idle"))
    return False
