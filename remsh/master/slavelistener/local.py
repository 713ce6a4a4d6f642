"""Slaves in local child processes: for tests, and for running operations on
the master's own machine with the same API."""

from __future__ import annotations

import logging
import os
import subprocess
import threading
from typing import Any, Dict, List, Optional, Type

from remsh.errors import UsageError
from remsh.handshake import MASTER_GREETING, SLAVE_GREETING, exchange_greeting
from remsh.master.slave import Slave
from remsh.master.slavelistener.base import SlaveListener
from remsh.transports.local import spawn_local_slave, stop_child
from remsh.wire import Wire

log = logging.getLogger(__name__)


class LocalSlaveListener(SlaveListener):
    """Spawns slaves as child processes of the master.

    The child is trusted (the master made it), so no secret is involved.
    Use it as a context manager, or call :meth:`stop`, to end every child.
    """

    def __init__(self, slave_class: Optional[Type[Slave]] = None, slave_collection: Any = None,
                 *, python: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(slave_class=slave_class, slave_collection=slave_collection, **kwargs)
        self.python = python
        self._procs: Dict[int, "subprocess.Popen[bytes]"] = {}
        self._lock = threading.Lock()

    def start_slave(self, basedir: str, name: Optional[str] = None) -> Slave:
        """Start a new slave rooted at ``basedir`` and return it, registered.

        ``name`` defaults to ``local-<pid>``.  Starts the listener (its idle
        monitor) if it is not started yet.

        :raises UsageError: ``basedir`` is not a directory
        :raises RemshError: the child cannot be started or fails its handshake
        """
        if not os.path.isdir(basedir):
            raise UsageError(f"base directory does not exist: {basedir}")
        self.start()
        proc, stream = spawn_local_slave(basedir, name, python=self.python)
        wire = Wire(stream, label=f"local slave (pid {proc.pid})")
        try:
            exchange_greeting(wire, MASTER_GREETING, SLAVE_GREETING, self.handshake_timeout)
            slave = self.handle_new_connection(wire)
        except BaseException:
            wire.close()
            stop_child(proc)
            raise
        with self._lock:
            self._procs[id(slave)] = proc
        slave.on_disconnect(self._reap)
        return slave

    def _reap(self, slave: Slave) -> None:
        with self._lock:
            proc = self._procs.pop(id(slave), None)
        if proc is not None:
            stop_child(proc)

    def kill_slave(self, slave: Slave) -> None:
        """Kill the slave, interrupting any operation it is performing.

        The running command (if any) is killed with the slave; a caller
        blocked in an operation on it gets ``Disconnected``.
        """
        with self._lock:
            proc = self._procs.get(id(slave))
        if proc is None:
            if not slave.connected:
                return  # already gone (and reaped)
            raise UsageError(f"{slave.name} was not started by this listener")
        stop_child(proc)
        slave.close()

    def __enter__(self) -> "LocalSlaveListener":
        self.start()
        return self

    def stop(self) -> None:
        """Kill every slave this listener started and stop its idle monitor;
        idempotent."""
        with self._lock:
            procs: List["subprocess.Popen[bytes]"] = list(self._procs.values())
        super().stop()
        for proc in procs:
            stop_child(proc)
