"""Notices idle slaves whose connection ends, with one thread for all of them.

While a slave is idle nobody reads its connection, so nobody would notice
that the slave died.  :class:`IdleMonitor` watches every slave's stream from
one thread; no slave has a thread of its own.

Two ways of watching, chosen per stream:

- **Sockets on Linux** are registered once with ``EPOLLRDHUP | EPOLLONESHOT``:
  the kernel reports only the peer's FIN, a reset or an error (TCP keepalive
  giving up on a vanished host), never ordinary replies.  Operations cost the
  monitor nothing.  If the report comes while an operation holds the slave,
  that operation sees the end itself; should it finish cleanly all the same
  (the slave answered, then died), the check is made when it ends.
- **Other streams** (an SSH channel's notification pipe) are watched for
  readability only while their slave is idle: operations call :meth:`busy`
  and :meth:`idle` around their I/O.  Readable while idle means the stream
  ended, failed, or carries bytes nobody asked for: each disconnects the
  slave.

Either way a disconnected slave leaves its collection.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
from typing import TYPE_CHECKING, Dict, Optional, Set

from remsh.errors import Disconnected, ProtocolError

if TYPE_CHECKING:
    from remsh.master.slave import Slave

log = logging.getLogger(__name__)

_EPOLL = hasattr(select, "epoll")
_HANGUP_MASK = (select.EPOLLRDHUP | select.EPOLLONESHOT) if _EPOLL else 0
_READ_MASK = select.EPOLLIN if _EPOLL else select.POLLIN


class IdleMonitor:
    """Watches slaves' connections from a single thread."""

    def __init__(self, name: str = "remsh-idle-monitor") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._poller: Optional[object] = None
        self._by_fd: Dict[int, "Slave"] = {}
        self._fd_of: Dict[int, int] = {}  # id(slave) -> fd
        self._hangup_mode: Set[int] = set()  # id(slave) watched for hang-up only
        self._idle: Set[int] = set()  # id(slave), read-watched slaves now registered
        self._recheck: Set[int] = set()  # id(slave), hang-up seen while busy
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
            self._poller.register(self._wake_r, _READ_MASK)  # type: ignore[attr-defined]
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
            self._hangup_mode.clear()
            self._idle.clear()
            self._recheck.clear()

    def _wake(self) -> None:
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:
                pass

    # -- what slaves tell us --------------------------------------------------

    def add(self, slave: "Slave") -> None:
        """Start watching ``slave`` (idle now)."""
        self.start()
        stream = slave.wire.stream
        fd = stream.fileno()
        hangup_only = _EPOLL and isinstance(getattr(stream, "sock", None), socket.socket)
        with self._lock:
            if self._poller is None:
                return
            key = id(slave)
            self._by_fd[fd] = slave
            self._fd_of[key] = fd
            slave.idle_watcher = self
            if hangup_only:
                self._hangup_mode.add(key)
                self._poller.register(fd, _HANGUP_MASK)  # type: ignore[attr-defined]
                return
        self.idle(slave)

    def busy(self, slave: "Slave") -> None:
        """An operation starts on ``slave``: stop reading its stream."""
        key = id(slave)
        if key in self._hangup_mode:
            return
        with self._lock:
            if key in self._idle:
                self._idle.discard(key)
                self._unregister(self._fd_of.get(key))

    def idle(self, slave: "Slave") -> None:
        """``slave``'s operation ended (the caller still holds the slave)."""
        key = id(slave)
        if key in self._hangup_mode:
            if key in self._recheck:
                self._recheck.discard(key)
                _check_idle_stream(slave)
            return
        with self._lock:
            fd = self._fd_of.get(key)
            if fd is None or key in self._idle or self._poller is None:
                return
            try:
                self._poller.register(fd, _READ_MASK)  # type: ignore[attr-defined]
            except (ValueError, OSError):
                return  # closed meanwhile: forget() follows
            self._idle.add(key)
            if not _EPOLL:
                self._wake()  # poll() only sees changes on its next call

    def forget(self, slave: "Slave") -> None:
        """Stop watching ``slave`` for good (it disconnected)."""
        key = id(slave)
        with self._lock:
            fd = self._fd_of.pop(key, None)
            if fd is None:
                return
            if self._by_fd.get(fd) is slave:
                del self._by_fd[fd]
            if key in self._idle or key in self._hangup_mode:
                self._unregister(fd)
            self._idle.discard(key)
            self._hangup_mode.discard(key)
            self._recheck.discard(key)

    def _unregister(self, fd: Optional[int]) -> None:
        if self._poller is None or fd is None:
            return
        try:
            self._poller.unregister(fd)  # type: ignore[attr-defined]
        except (KeyError, ValueError, OSError):
            pass

    # -- the thread ----------------------------------------------------------

    def _run(self) -> None:
        poller = self._poller
        assert poller is not None
        while True:
            try:
                events = poller.poll(-1)  # type: ignore[attr-defined]
            except (OSError, ValueError):
                if self._stopping:
                    return
                raise
            if self._stopping:
                return
            for fd, _ in events:
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    continue
                with self._lock:
                    slave = self._by_fd.get(fd)
                    if slave is None:
                        continue
                    key = id(slave)
                    if key not in self._hangup_mode:
                        if key not in self._idle:
                            self._unregister(fd)
                            continue
                if slave._lock.acquire(blocking=False):
                    try:
                        _check_idle_stream(slave)
                    finally:
                        slave._lock.release()
                elif key in self._hangup_mode:
                    self._recheck.add(key)  # the operation's end will look


def _check_idle_stream(slave: "Slave") -> None:
    """Disconnect ``slave`` if its stream, read while idle, shows it ended.

    The caller holds the slave's operation lock.
    """
    if not slave.connected:
        return
    stream = slave.wire.stream
    try:
        data = stream.recv(4096, 0)
    except TimeoutError:
        return  # nothing there after all
    except OSError as e:
        slave._mark_disconnected(Disconnected(f"{slave.name}: connection lost while idle: {e}"))
        return
    if not data:
        slave._mark_disconnected(Disconnected(f"{slave.name}: slave closed the connection"))
    else:
        slave._mark_disconnected(ProtocolError(
            f"{slave.name}: slave sent {len(data)} unrequested bytes while idle"))
