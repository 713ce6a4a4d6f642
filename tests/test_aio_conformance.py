"""The operation conformance tests of tests/test_operations.py, run over remsh.aio.

Every test there that needs nothing but a slave (``slave``/``any_slave``,
``basedir``, ``tmp_path``) is collected here again, with the slave an
:class:`~remsh.aio.slave.AsyncSlave` behind the synchronous facade
:class:`tests.test_aio.SyncSlave` (each call runs as a coroutine in one
event loop thread that serves every slave of this module), over local, TCP
and TLS with real slave processes.

Left out, and why:

- tests that take the threaded listener, an unprivileged slave or a raw
  wire (they test those, not the master's API);
- ``test_registration_info`` and ``test_queued_calls_run_in_call_order``
  look into the threaded collection and lock (tests/test_aio.py has their
  aio counterparts);
- ``test_stdin_source_that_never_returns_drops_the_connection``: remsh.aio
  reads a file object given as stdin in the event loop (a source that may
  block belongs in an async iterable), so it cannot stop a read() that
  never returns.
"""

from __future__ import annotations

import inspect
import itertools
from pathlib import Path
from typing import Any, Iterator, List, NamedTuple

import pytest

import tests.test_operations as operations
from tests.slaveproc import SlaveProcesses
from tests.test_aio import KINDS, LoopThread, SyncSlave, aio_listener, pki, start_slave  # noqa: F401 - fixture
from tests.test_operations import file_size_limit  # noqa: F401 - a fixture the tests use
from tests.transports import Pki

pytestmark = pytest.mark.timeout(60)

#: what a conformance test may ask for to be run here
_USABLE = {"slave", "any_slave", "basedir", "tmp_path", "file_size_limit"}
_LEFT_OUT = {"test_stdin_source_that_never_returns_drops_the_connection",
             # the threaded collection's get_slave(block, ...) and Slave's lock: covered for
             # remsh.aio by tests/test_aio.py (get_slave, call order)
             "test_registration_info", "test_queued_calls_run_in_call_order"}

_serial = itertools.count(1)
_names: List[str] = []
for _name, _fn in list(vars(operations).items()):
    if _name.startswith("test_") and inspect.isfunction(_fn) and _name not in _LEFT_OUT:
        if set(inspect.signature(_fn).parameters) <= _USABLE and inspect.signature(_fn).parameters:
            globals()[_name] = _fn
            _names.append(_name)


def test_the_conformance_tests_are_collected() -> None:
    """The operation tests collected here cover execute, send, fetch and every simple operation."""
    assert len(_names) >= 55, _names
    for part in ("execute", "send", "fetch", "stat", "rename", "copy", "remove", "mkdir", "ping", "set_cwd",
                 "interrupt", "unlink"):
        assert any(part in n for n in _names), part


class Server(NamedTuple):
    kind: str
    loop: LoopThread
    listener: Any
    pki: Pki


class Connected(NamedTuple):
    slave: SyncSlave
    basedir: Path
    transport: str
    collection: Any


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    loop = LoopThread()
    try:
        yield loop
    finally:
        loop.close()


@pytest.fixture(scope="module", params=KINDS)
def aio_server(request: pytest.FixtureRequest, loop_thread: LoopThread, pki: Pki) -> Iterator[Server]:
    """A remsh.aio listener of each kind, running in the module's loop thread."""
    cm = aio_listener(request.param, pki)
    listener = loop_thread.run(cm.__aenter__())
    try:
        yield Server(request.param, loop_thread, listener, pki)
    finally:
        loop_thread.run(cm.__aexit__(None, None, None))


@pytest.fixture
def any_slave(aio_server: Server, basedir: Path, tmp_path: Path) -> Iterator[Connected]:
    """A fresh slave process through the aio listener, behind the synchronous facade."""
    procs = SlaveProcesses(tmp_path / "slaves")
    try:
        aslave = aio_server.loop.run(start_slave(aio_server.listener, aio_server.kind, procs, basedir,
                                                 aio_server.pki, name=f"{aio_server.kind}-aio-{next(_serial)}"))
        facade = SyncSlave(aio_server.loop, aslave)
        yield Connected(facade, basedir, aio_server.kind, aio_server.listener.slave_collection)
        facade.close()
    finally:
        procs.close()


@pytest.fixture
def slave(any_slave: Connected) -> SyncSlave:
    return any_slave.slave
