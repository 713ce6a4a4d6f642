"""The operation conformance tests of tests/test_operations.py, run over remsh.aio.

Every test there that needs nothing but a slave (``slave``/``any_slave``,
``basedir``, ``tmp_path``) is collected here again, with the slave an
:class:`~remsh.aio.slave.AsyncSlave` behind the synchronous facade
:class:`tests.test_aio.SyncSlave` (each call runs as a coroutine in one
event loop thread that serves every slave of this module), over local, TCP
and TLS with real slave processes, and over SSH where the master's side is
TCP: the slave reaching the aio TCP listener through a ``direct-tcpip``
tunnel of a stock OpenSSH ``sshd`` on 127.0.0.1 (``remsh-slave --via-ssh``,
as tests/transports.py ``OpenSshTransport`` does for the threaded master).

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
from typing import Any, Iterator, List, NamedTuple, Sequence

import pytest

import tests.test_operations as operations
from tests.slaveproc import SlaveProcesses
from tests.test_aio import KINDS, LoopThread, SyncSlave, aio_listener, pki, start_slave  # noqa: F401 - fixture
from tests.test_operations import file_size_limit  # noqa: F401 - a fixture the tests use
from tests.slaveproc import HOST
from tests.sshd import Sshd, make_key, require_sshd, write_known_hosts
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


#: The aio listeners' kinds, and ``openssh``: a TCP listener reached through OpenSSH's sshd.
SERVER_KINDS = [*KINDS, "openssh"]


class Server(NamedTuple):
    kind: str
    loop: LoopThread
    listener: Any
    pki: Pki
    #: what a slave is started with to reach the listener (the SSH tunnel's arguments)
    slave_args: Sequence[str] = ()


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


def _tunnel(workdir: Path) -> "tuple[Sshd, List[str]]":
    """A started sshd letting a new key through, and the slave arguments that tunnel through it."""
    require_sshd()
    workdir.mkdir(parents=True, exist_ok=True)
    identity = workdir / "id_ed25519"
    key = make_key("ed25519", identity)
    authorized = workdir / "authorized_keys"
    authorized.write_text(f"{key.get_name()} {key.get_base64()} remsh-test\n")
    sshd = Sshd(workdir / "sshd", authorized).start()
    known = write_known_hosts(workdir / "known_hosts", [(HOST, sshd.port, sshd.host_key)])
    return sshd, ["--ssh-client", "paramiko", "--via-ssh", f"{sshd.user}@{HOST}:{sshd.port}",
                  "--identity", str(identity), "--known-hosts", str(known)]


@pytest.fixture(scope="module", params=SERVER_KINDS)
def aio_server(request: pytest.FixtureRequest, loop_thread: LoopThread, pki: Pki,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A remsh.aio listener of each kind, running in the module's loop thread."""
    kind = request.param
    sshd = None
    slave_args: List[str] = []
    if kind == "openssh":
        sshd, slave_args = _tunnel(tmp_path_factory.mktemp("aio-openssh"))
    try:
        cm = aio_listener("tcp" if kind == "openssh" else kind, pki)
        listener = loop_thread.run(cm.__aenter__())
        try:
            yield Server(kind, loop_thread, listener, pki, slave_args)
        finally:
            loop_thread.run(cm.__aexit__(None, None, None))
    finally:
        if sshd is not None:
            sshd.stop()


@pytest.fixture
def any_slave(aio_server: Server, basedir: Path, tmp_path: Path) -> Iterator[Connected]:
    """A fresh slave process through the aio listener, behind the synchronous facade."""
    procs = SlaveProcesses(tmp_path / "slaves")
    try:
        kw = {"extra_args": aio_server.slave_args} if aio_server.slave_args else {}
        aslave = aio_server.loop.run(start_slave(aio_server.listener, aio_server.kind, procs, basedir,
                                                 aio_server.pki, name=f"{aio_server.kind}-aio-{next(_serial)}",
                                                 **kw))
        facade = SyncSlave(aio_server.loop, aslave)
        yield Connected(facade, basedir, aio_server.kind, aio_server.listener.slave_collection)
        facade.close()
    finally:
        procs.close()


@pytest.fixture
def slave(any_slave: Connected) -> SyncSlave:
    return any_slave.slave
