"""Names across listeners sharing one collection (as ``remsh run`` sets up):
a holder of the shared secret over TCP cannot take over a name registered
through the SSH listener, a name bound to an SSH key, or a local slave's."""

from __future__ import annotations

import socket
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest

from remsh.errors import AuthenticationError
from remsh.handshake import slave_handshake
from remsh.master.slavecollection.simple import SimpleSlaveCollection
from remsh.master.slavelistener.local import LocalSlaveListener
from remsh.master.slavelistener.ssh import SshSlaveListener
from remsh.master.slavelistener.tcp import TcpSlaveListener
from remsh.transports import ssh
from remsh.transports.base import SocketStream
from remsh.wire import Wire
from tests.sshd import make_key, write_authorized_keys, write_known_hosts
from tests.util import WAIT

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"
SECRET = b"one secret behind both listeners"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("keys")
    return SimpleNamespace(host=make_key("ecdsa", d / "host"), host_path=d / "host",
                           alpha=make_key("ecdsa", d / "alpha"), alpha_path=d / "alpha")


@pytest.fixture
def setup(keys: SimpleNamespace, tmp_path: Path) -> Iterator[SimpleNamespace]:
    """One collection and one secret behind a TCP, an SSH (alpha's key bound to 'alpha') and a local listener."""
    collection = SimpleSlaveCollection()
    authorized = write_authorized_keys(tmp_path / "authorized_keys", [(keys.alpha, "alpha")])
    tcp_l = TcpSlaveListener(host=HOST, secret=SECRET, slave_collection=collection)
    ssh_l = SshSlaveListener(host=HOST, host_key=keys.host_path, authorized_keys=authorized,
                             secret=SECRET, slave_collection=collection)
    local = LocalSlaveListener(slave_collection=collection)
    with tcp_l, ssh_l, local:
        known = write_known_hosts(tmp_path / "known_hosts", [(HOST, ssh_l.port, keys.host)])
        base = tmp_path / "base"
        base.mkdir()
        yield SimpleNamespace(collection=collection, tcp=tcp_l, ssh=ssh_l, local=local, known=known, base=base)


def tcp_register(port: int, name: str) -> Wire:
    """Register as ``name`` over TCP with the shared secret; returns the wire."""
    wire = Wire(SocketStream(socket.create_connection((HOST, port), timeout=WAIT)), label="master")
    try:
        slave_handshake(wire, name, secret=SECRET, basedir="/nonexistent", timeout=WAIT)
    except BaseException:
        wire.close()
        raise
    return wire


def ssh_register(s: SimpleNamespace, keys: SimpleNamespace, name: str = "alpha") -> Wire:
    stream = ssh.connect_embedded("remsh", HOST, s.ssh.port, identity=keys.alpha_path,
                                  known_hosts=s.known, timeout=WAIT)
    wire = Wire(stream, label="master")
    try:
        slave_handshake(wire, name, secret=SECRET, basedir="/nonexistent", timeout=WAIT)
    except BaseException:
        wire.close()
        raise
    return wire


def named(collection: SimpleSlaveCollection, name: str):
    slave = collection.get_slave(True, lambda x: x.name == name, timeout=WAIT)
    assert slave is not None
    return slave


def test_tcp_secret_cannot_replace_a_connected_ssh_slave(setup, keys) -> None:
    """A TCP slave with the shared secret registering an SSH slave's name is refused; the SSH slave stays."""
    with closing(ssh_register(setup, keys)):
        original = named(setup.collection, "alpha")
        with pytest.raises(AuthenticationError):
            tcp_register(setup.tcp.port, "alpha")
        assert original.connected
        assert setup.collection.get_all_slaves() == [original]


def test_key_bound_name_is_never_taken_by_a_secret_alone(setup) -> None:
    """A name bound to an SSH key is refused over TCP even while no SSH slave holds it."""
    with pytest.raises(AuthenticationError):
        tcp_register(setup.tcp.port, "alpha")
    assert setup.collection.get_all_slaves() == []


def test_tcp_secret_cannot_replace_a_local_slave(setup) -> None:
    """A TCP slave with the shared secret registering a local slave's name is refused; the local slave stays and works."""
    local = setup.local.start_slave(str(setup.base), name="local1")
    with pytest.raises(AuthenticationError):
        tcp_register(setup.tcp.port, "local1")
    local.ping()
    assert local.connected
    assert setup.collection.get_all_slaves() == [local]


def test_ssh_key_cannot_replace_a_tcp_slave(setup, keys, tmp_path) -> None:
    """A name registered through TCP is not replaced through the SSH listener either."""
    with closing(tcp_register(setup.tcp.port, "gamma")):
        held = named(setup.collection, "gamma")
        # the key now binds gamma (the file is read at every login)
        write_authorized_keys(tmp_path / "authorized_keys", [(keys.alpha, "gamma")])
        with pytest.raises(AuthenticationError):
            ssh_register(setup, keys, "gamma")
        assert held.connected
        assert setup.collection.get_all_slaves() == [held]


def test_same_listener_reconnect_still_replaces(setup) -> None:
    """A slave reconnecting through the listener that registered it replaces its old registration."""
    with closing(tcp_register(setup.tcp.port, "beta")):
        old = named(setup.collection, "beta")
        with closing(tcp_register(setup.tcp.port, "beta")):
            new = setup.collection.get_slave(True, lambda x: x.name == "beta" and x is not old, timeout=WAIT)
            assert new is not None and not old.connected
            assert setup.collection.get_all_slaves() == [new]


def test_stop_closes_only_the_listeners_own_slaves(setup) -> None:
    """Stopping the TCP listener closes its slaves and leaves the local listener's slaves connected."""
    local = setup.local.start_slave(str(setup.base), name="local1")
    with closing(tcp_register(setup.tcp.port, "beta")):
        remote = named(setup.collection, "beta")
        assert setup.tcp.slaves == [remote] and setup.local.slaves == [local]
        setup.tcp.stop()
        setup.tcp.stop()  # idempotent
        assert not remote.connected
        assert local.connected
        assert setup.collection.get_all_slaves() == [local]
