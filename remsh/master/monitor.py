"""Notices idle slaves whose connection ends, with one thread for all of them.

While a slave is idle nobody reads its connection, so nobody would notice
that the slave died.  :class:`IdleMonitor` keeps every idle slave's stream in
one selector: a stream that becomes readable while its slave is idle has
either ended (the slave died: its kernel closed the socket), failed (TCP
keepalive gave up on a vanished host) or carries bytes nobody asked for (a
protocol violation).  In each case the slave is disconnected, which removes
it from its collection.

Operations tell the monitor when they start (:meth:`busy`) and end
(:meth:`idle`), so the monitor never competes with an operation for the
connection; the slave's own operation lock settles the remaining races.
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
from typing import TYPE_CHECKING, Dict, Optional

from remsh.errors import Disconnected, ProtocolError

if TYPE_CHECKING:
    from remsh.master.slave import Slave

log = logging.getLogger(__name__)


class IdleMonitor:
    """Watches idle slaves' connections from a single thread."""

    def __init__(self, name: str = "remsh-idle-monitor") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._sel: Optional[selectors.BaseSelector] = None
        self._state: Dict[int, str] = {}  # id(slave) -> "idle" | "busy"
        self._slaves: Dict[int, "Slave"] = {}
        self._thread: Optional[threading.Thread] = None
        self._wake_r = self._wake_w = -1
        self._stopping = False

    # -- life cycle --------------------------------------------------------

    def start(self) -> None:
        """Start the monitor thread (idempotent)."""
        with self._lock:
            if self._thread is not None:
                return
            self._sel = selectors.DefaultSelector()
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_w, False)
            self._sel.register(self._wake_r, selectors.EVENT_READ, None)
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
            if self._sel is not None:
                self._sel.close()
                self._sel = None
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    os.close(fd)
            self._wake_r = self._wake_w = -1
            for slave in self._slaves.values():
                slave.idle_watcher = None
            self._slaves.clear()
            self._state.clear()

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
        with self._lock:
            self._slaves[id(slave)] = slave
            slave.idle_watcher = self
        self.idle(slave)

    def busy(self, slave: "Slave") -> None:
        """An operation starts on ``slave``: stop watching its stream."""
        with self._lock:
            if self._state.get(id(slave)) == "idle":
                self._state[id(slave)] = "busy"
                self._unregister(slave)

    def idle(self, slave: "Slave") -> None:
        """``slave`` has no operation running: watch its stream."""
        with self._lock:
            if id(slave) not in self._slaves or self._state.get(id(slave)) == "idle":
                return
            self._state[id(slave)] = "idle"
            if self._sel is None:
                return
            try:
                self._sel.register(slave.wire.stream.fileno(), selectors.EVENT_READ, slave)
            except (ValueError, KeyError, OSError):
                return  # closed meanwhile: forget() follows
            if not isinstance(self._sel, getattr(selectors, "EpollSelector", ())):
                self._wake()  # other selectors only see changes on their next call

    def forget(self, slave: "Slave") -> None:
        """Stop watching ``slave`` for good (it disconnected)."""
        with self._lock:
            if self._state.pop(id(slave), None) == "idle":
                self._unregister(slave)
            self._slaves.pop(id(slave), None)

    def _unregister(self, slave: "Slave") -> None:
        if self._sel is None:
            return
        try:
            self._sel.unregister(slave.wire.stream.fileno())
        except (KeyError, ValueError, OSError):
            pass

    # -- the thread ----------------------------------------------------------

    def _run(self) -> None:
        sel = self._sel
        assert sel is not None
        while True:
            try:
                events = sel.select(None)
            except (OSError, ValueError):
                if self._stopping:
                    return
                raise
            if self._stopping:
                return
            for key, _ in events:
                if key.data is None:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    continue
                self._check(key.data)

    def _check(self, slave: "Slave") -> None:
        with self._lock:
            if self._state.get(id(slave)) != "idle":
                self._unregister(slave)
                return
        if not slave._lock.acquire(blocking=False):
            return  # an operation is just starting; it will call busy()
        try:
            if not slave.connected:
                return
            try:
                data = slave.wire.stream.recv(4096, 0)
            except TimeoutError:
                return  # spurious wake-up
            except OSError as e:
                slave._mark_disconnected(Disconnected(f"{slave.name}: connection lost while idle: {e}"))
                return
            if not data:
                slave._mark_disconnected(Disconnected(f"{slave.name}: slave closed the connection"))
            else:
                slave._mark_disconnected(ProtocolError(
                    f"{slave.name}: slave sent {len(data)} unrequested bytes while idle"))
        finally:
            slave._lock.release()
