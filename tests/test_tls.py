"""TLS on the TCP transport, with a throwaway CA made by ``cryptography``.

The slave verifies the master's certificate against ``--tls-ca``: the right
CA works, another CA is refused, and a plain TCP slave cannot register with
a TLS listener, which keeps serving through all of it.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import ssl
import time

import pytest

from remsh.errors import Disconnected, PeerTimeout
from remsh.handshake import SLAVE_GREETING, slave_handshake
from remsh.transports.base import SocketStream
from remsh.wire import Wire
from tests.slaveproc import (HOST, SECRET, WAIT, read_until_closed, slave_procs,  # noqa: F401
                             tcp_listener, wait_registered)
from tests.transports import Pki, make_pki, server_context

pytestmark = pytest.mark.timeout(120)

EXIT_AUTH = 2


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    """A CA, another CA and the master's certificate, for the whole module."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_listener(tcp_listener, pki):
    def make(**kwargs):
        return tcp_listener(ssl_context=server_context(pki), **kwargs)

    return make


def test_slave_with_the_right_ca_registers_over_tls(tls_listener, slave_procs, pki):
    """A slave given --tls-ca of the CA that signed the master's certificate registers over TLS 1.2 or later.

    The operations themselves run over TLS in tests/test_operations.py.
    """
    listener = tls_listener()
    proc = slave_procs.start(listener.port, "trusting", tls_ca=pki.ca)
    slave = wait_registered(listener, proc)
    assert slave.wire.stream.sock.version() in ("TLSv1.2", "TLSv1.3")
    slave.ping()


def test_slave_with_another_ca_refuses_the_master(tls_listener, slave_procs, pki):
    """A --no-reconnect slave that cannot verify the master's certificate exits 2 unregistered; the listener keeps serving."""
    listener = tls_listener()
    doubter = slave_procs.start(listener.port, "doubter", tls_ca=pki.other_ca, no_reconnect=True)
    assert doubter.wait() == EXIT_AUTH, doubter.log_text()
    assert "certificate verify failed" in doubter.log_text()
    assert listener.slave_collection.get_all_slaves() == []
    good = slave_procs.start(listener.port, "trusting", tls_ca=pki.ca)
    wait_registered(listener, good).ping()
    assert [s.name for s in listener.slave_collection.get_all_slaves()] == ["trusting"]


def test_plain_tcp_slave_cannot_register_with_a_tls_listener(tls_listener, slave_procs, pki):
    """A slave without TLS fails against a TLS listener (non-zero exit, nothing registered), and TLS slaves still register."""
    listener = tls_listener()
    plain = slave_procs.start(listener.port, "plain", no_reconnect=True)
    status = plain.wait()
    assert status != 0, plain.log_text()
    assert listener.slave_collection.get_all_slaves() == []
    good = slave_procs.start(listener.port, "trusting", tls_ca=pki.ca)
    wait_registered(listener, good).ping()


def test_tls_listener_drops_a_silent_connection_at_the_time_limit(tls_listener, slave_procs, pki):
    """A connection that never starts TLS is closed at the handshake time limit, and a TLS slave registers afterwards."""
    listener = tls_listener(handshake_timeout=1.0)
    with socket.create_connection((HOST, listener.port), timeout=WAIT) as sock:
        started = time.monotonic()
        assert read_until_closed(sock, 6.0) == b""
        assert time.monotonic() - started >= 0.9
    good = slave_procs.start(listener.port, "trusting", tls_ca=pki.ca)
    wait_registered(listener, good).ping()


def test_tls_listener_survives_garbage_instead_of_a_client_hello(tls_listener, slave_procs, pki):
    """Bytes that are not TLS cost one closed connection on a TLS listener, and a TLS slave registers afterwards."""
    listener = tls_listener(handshake_timeout=1.0)
    with socket.create_connection((HOST, listener.port), timeout=WAIT) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        started = time.monotonic()
        read_until_closed(sock, 6.0)
        assert time.monotonic() - started < 1.0
    good = slave_procs.start(listener.port, "trusting", tls_ca=pki.ca)
    wait_registered(listener, good).ping()


def test_tls_listener_drops_a_client_hello_sent_byte_by_byte_at_the_time_limit(tls_listener, slave_procs, pki):
    """A peer dribbling its ClientHello one byte at a time is dropped at the handshake time limit, not kept per byte."""
    listener = tls_listener(handshake_timeout=1.0)
    client = ssl.create_default_context(cafile=str(pki.ca))
    outgoing = ssl.MemoryBIO()
    tls = client.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=HOST)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    with socket.create_connection((HOST, listener.port), timeout=WAIT) as sock:
        started = time.monotonic()
        closed = False
        for byte in hello:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            sock.settimeout(0.2)
            try:
                closed = sock.recv(1) == b""
            except ConnectionResetError:
                closed = True
            except socket.timeout:
                pass
            if closed or time.monotonic() - started > 6.0:
                break
        elapsed = time.monotonic() - started
    assert closed, f"still open after {elapsed:.1f} s of dribbling"
    assert 0.9 <= elapsed < 4.0
    good = slave_procs.start(listener.port, "trusting", tls_ca=pki.ca)
    wait_registered(listener, good).ping()


def test_idle_tls_slave_killed_leaves_the_collection(tls_listener, slave_procs, pki):
    """An idle slave on TLS killed with SIGKILL is disconnected and leaves the collection within 10 s."""
    listener = tls_listener(resume_timeout=0)
    proc = slave_procs.start(listener.port, "mayfly", tls_ca=pki.ca)
    slave = wait_registered(listener, proc)
    slave.ping()
    gone = threading.Event()
    slave.on_disconnect(lambda s: gone.set())
    proc.signal(signal.SIGKILL)
    proc.wait()
    assert gone.wait(10.0), "the killed TLS slave is still considered connected"
    assert listener.slave_collection.get_all_slaves() == []
    with pytest.raises(Disconnected):
        slave.ping()


def _read_tls_until_closed(tls: ssl.SSLSocket, timeout: float) -> float:
    """Seconds until the peer closes (or resets) the TLS connection; fails after ``timeout``."""
    started = time.monotonic()
    deadline = started + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"TLS connection still open after {timeout:g} s")
        tls.settimeout(left)
        try:
            if not tls.recv(65536):
                break
        except socket.timeout:
            continue
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            break
    return time.monotonic() - started


#: The header of a TLS application-data record announcing 64 bytes, and 10 of them.
PARTIAL_RECORD = b"\x17\x03\x03\x00\x40" + bytes(10)


def test_tls_peer_stalling_inside_a_record_is_dropped_at_the_time_limit(tls_listener, slave_procs, pki):
    """A TLS peer that stops inside a TLS record during the handshake is dropped at the time limit, freeing its slot."""
    listener = tls_listener(handshake_timeout=1.0, max_pending=1)
    client = ssl.create_default_context(cafile=str(pki.ca))
    with socket.create_connection((HOST, listener.port), timeout=WAIT) as raw:
        with client.wrap_socket(raw, server_hostname=HOST) as tls:
            tls.sendall(SLAVE_GREETING)
            os.write(tls.fileno(), PARTIAL_RECORD)  # beneath TLS, straight onto the TCP stream
            elapsed = _read_tls_until_closed(tls, 6.0)
    assert elapsed < 3.0
    good = slave_procs.start(listener.port, "trusting", tls_ca=pki.ca)
    wait_registered(listener, good).ping()


def _registered_tls_fake_slave(listener, pki, name: str):
    """A TLS peer that completes the handshake with the right secret; returns its
    TLS socket and wire, and the master's slave object for it."""
    client = ssl.create_default_context(cafile=str(pki.ca))
    tls = client.wrap_socket(socket.create_connection((HOST, listener.port), timeout=WAIT), server_hostname=HOST)
    wire = Wire(SocketStream(tls), label="master")
    slave_handshake(wire, name, secret=SECRET, basedir="/nonexistent", timeout=WAIT)
    slave = listener.slave_collection.get_slave(True, lambda s: s.name == name, timeout=WAIT)
    assert slave is not None
    return tls, wire, slave


def test_tls_slave_stalling_inside_a_reply_record_times_out(tls_listener, pki):
    """A TLS slave that stops inside the record of its reply makes the call raise PeerTimeout after io_timeout."""
    listener = tls_listener(io_timeout=1.0)
    tls, wire, slave = _registered_tls_fake_slave(listener, pki, "stutter")
    with tls:
        done = threading.Event()
        outcome: list = []

        def ping() -> None:
            try:
                slave.ping()
            except BaseException as e:  # noqa: BLE001 - examined below
                outcome.append(e)
            done.set()

        threading.Thread(target=ping, daemon=True).start()
        assert wire.read_box(WAIT) == {b"meth": b"ping", b"version": b"1"}
        started = time.monotonic()
        os.write(tls.fileno(), PARTIAL_RECORD)
        assert done.wait(WAIT), "the call waited past io_timeout inside a TLS record"
        assert isinstance(outcome[0], PeerTimeout), outcome
        assert time.monotonic() - started < 5.0
    assert listener.slave_collection.get_all_slaves() == []


def test_idle_monitor_is_not_stalled_by_a_partial_tls_record(tls_listener, slave_procs, pki):
    """A registered TLS slave that leaves half a record while idle does not stop the monitor noticing another slave die."""
    listener = tls_listener(resume_timeout=0)
    tls, wire, stutter = _registered_tls_fake_slave(listener, pki, "stutter")
    proc = slave_procs.start(listener.port, "mayfly", tls_ca=pki.ca)
    mayfly = wait_registered(listener, proc)
    with tls:
        os.write(tls.fileno(), PARTIAL_RECORD)
        gone = threading.Event()
        mayfly.on_disconnect(lambda s: gone.set())
        proc.signal(signal.SIGKILL)
        proc.wait()
        assert gone.wait(10.0), "the idle monitor did not notice a killed slave"
