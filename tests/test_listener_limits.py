"""Unfinished handshakes cannot lock slaves out, over TCP and the embedded SSH
server, and the SSH set-up shares one time limit with the remsh handshake.

The flood is 200 idle connections from 127.0.0.1 -- the good slave's own
address -- each opened again as soon as the listener closes it (at its time
limit or to make room), so the table of unfinished handshakes never empties.
"""

from __future__ import annotations

import selectors
from contextlib import closing
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator, Optional, Tuple

import paramiko
import pytest

from remsh.handshake import slave_handshake
from remsh.master.slavecollection.simple import SimpleSlaveCollection
from remsh.master.slavelistener.ssh import SshSlaveListener
from remsh.transports import ssh, tcp
from remsh.transports.base import StreamLike
from remsh.transports.tcp import DEFAULT_MAX_PENDING_PER_ADDRESS
from remsh.wire import Wire
from tests.slaveproc import HOST, SECRET, slave_procs, tcp_listener, wait_registered  # noqa: F401
from tests.sshd import make_key, write_authorized_keys, write_known_hosts
from tests.util import WAIT, wait_until

pytestmark = pytest.mark.timeout(120)

#: The listeners' handshake time limit in these tests.
LIMIT = 1.0
FLOOD = 200


class Flood:
    """``count`` idle connections to ``port``, each reopened once the listener closes it."""

    def __init__(self, port: int, count: int = FLOOD) -> None:
        self.port = port
        self.count = count
        self.reopened = 0
        self.open = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flood", daemon=True)
        self.error: Optional[BaseException] = None

    def __enter__(self) -> "Flood":
        self._thread.start()
        wait_until(lambda: self.open >= self.count or self.error is not None, WAIT, "the flood to connect")
        assert self.error is None, self.error
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(WAIT)

    def _connect(self, sel: selectors.BaseSelector) -> None:
        sock = socket.create_connection((HOST, self.port), timeout=WAIT)
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        try:
            for _ in range(self.count):
                self._connect(sel)
                self.open += 1
            while not self._stop.is_set():
                for key, _ in sel.select(0.05):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    try:
                        if sock.recv(4096):
                            continue  # the greeting: an idle peer says nothing back
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        pass
                    sel.unregister(sock)
                    sock.close()
                    self._connect(sel)
                    self.reopened += 1
        except BaseException as e:  # noqa: BLE001 - examined by the test
            self.error = e
        finally:
            for key in list(sel.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]
            sel.close()


def register_once(connect: Callable[[], StreamLike], name: str, secret: Optional[bytes],
                  bound: float) -> Tuple[float, Wire]:
    """Dial once and register as ``name`` within ``bound`` seconds; returns the
    seconds it took and the registered wire (the caller closes it).  One
    attempt, no retry: a listener that closes newcomers when full fails this."""
    started = time.monotonic()
    wire = Wire(connect(), label="master")
    try:
        slave_handshake(wire, name, secret=secret, basedir="/nonexistent", timeout=bound)
    except BaseException:
        wire.close()
        raise
    return time.monotonic() - started, wire


def test_good_slave_registers_under_an_idle_flood_from_its_own_address(tcp_listener):  # noqa: F811
    """Under 200 idle connections from its own address, renewed as they close, a slave's first attempt registers within two handshake time limits."""
    listener = tcp_listener(handshake_timeout=LIMIT)
    with Flood(listener.port) as flood:
        wait_until(lambda: listener._server.pending_count >= DEFAULT_MAX_PENDING_PER_ADDRESS,
                   WAIT, "the flood to fill its share of the table")
        took, wire = register_once(lambda: tcp.connect(HOST, listener.port, timeout=WAIT), "good",
                                     SECRET, 2 * LIMIT)
        with closing(wire):
            assert took < 2 * LIMIT
            assert flood.error is None
            assert listener.slave_collection.get_slave(True, lambda s: s.name == "good", timeout=WAIT)


def test_remsh_slave_registers_under_an_idle_flood(tcp_listener, slave_procs):  # noqa: F811
    """A real remsh-slave process registers and serves while 200 idle connections from its address keep the table full."""
    listener = tcp_listener(handshake_timeout=LIMIT)
    with Flood(listener.port):
        good = slave_procs.start(listener.port, "good")
        wait_registered(listener, good, timeout=WAIT).ping()


def test_per_address_share_bounds_one_address(tcp_listener):  # noqa: F811
    """A flood from one address never holds more than its share of unfinished handshakes."""
    listener = tcp_listener(handshake_timeout=LIMIT, max_pending=64, max_pending_per_address=8)
    with Flood(listener.port, count=40) as flood:
        wait_until(lambda: flood.reopened >= 32, WAIT, "the flood to be pushed out")
        assert listener._server.pending_count <= 8


# -- the embedded SSH server ---------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("keys")
    return SimpleNamespace(host=make_key("ecdsa", d / "host"), host_path=d / "host",
                           alpha=make_key("ecdsa", d / "alpha"), alpha_path=d / "alpha")


def _ssh_listener(keys: SimpleNamespace, tmp_path: Path, limit: float) -> SshSlaveListener:
    authorized = write_authorized_keys(tmp_path / "authorized_keys", [(keys.alpha, "alpha")])
    lst = SshSlaveListener(host=HOST, host_key=keys.host_path, authorized_keys=authorized,
                           slave_collection=SimpleSlaveCollection(), handshake_timeout=limit)
    lst.start()
    return lst


@pytest.fixture
def ssh_listener(keys: SimpleNamespace, tmp_path: Path) -> Iterator[SshSlaveListener]:
    """An embedded SSH listener on 127.0.0.1 with LIMIT as its handshake time limit; alpha's key may register as alpha."""
    with _ssh_listener(keys, tmp_path, LIMIT) as lst:
        yield lst


def test_ssh_slave_registers_under_an_idle_flood_from_its_own_address(ssh_listener, keys, tmp_path):
    """Under 200 idle connections to the SSH port, renewed as they close, an SSH slave's first attempt registers within two handshake time limits."""
    known = write_known_hosts(tmp_path / "known_hosts", [(HOST, ssh_listener.port, keys.host)])
    with Flood(ssh_listener.port):
        wait_until(lambda: ssh_listener._server.pending_count >= DEFAULT_MAX_PENDING_PER_ADDRESS,
                   WAIT, "the flood to fill its share of the table")
        took, wire = register_once(
            lambda: ssh.connect_embedded("remsh", HOST, ssh_listener.port, identity=keys.alpha_path,
                                         known_hosts=known, timeout=WAIT),
            "alpha", None, 2 * LIMIT)
        with closing(wire):
            assert took < 2 * LIMIT
            assert ssh_listener.slave_collection.get_slave(True, lambda s: s.name == "alpha", timeout=WAIT)


def test_ssh_setup_and_remsh_handshake_share_one_time_limit(keys, tmp_path):
    """A client that spends most of the limit before SSH and then stays silent is dropped one limit after it connected, not later."""
    limit = 2.0
    with _ssh_listener(keys, tmp_path, limit) as ssh_listener, \
            socket.create_connection((HOST, ssh_listener.port), timeout=WAIT) as sock:
        connected = time.monotonic()
        # deliberately idle for 60 % of the limit before speaking SSH: with a
        # fresh limit after the SSH set-up the channel would live 1.2 s longer
        time.sleep(0.6 * limit)
        t = paramiko.Transport(sock)
        try:
            t.start_client(timeout=WAIT)
            t.auth_publickey("remsh", keys.alpha)
            chan = t.open_session(timeout=WAIT)
            chan.invoke_subsystem("remsh")
            chan.settimeout(WAIT)
            received = b""
            while True:
                try:
                    data = chan.recv(4096)
                except OSError:
                    break
                if not data:
                    break
                received += data
            elapsed = time.monotonic() - connected
        finally:
            t.close()
        assert ssh_listener.slave_collection.get_all_slaves() == []
    assert received == b"REMSH-M\n"
    assert limit * 0.9 <= elapsed < limit + 0.6, f"channel closed {elapsed:.2f} s after connecting"
