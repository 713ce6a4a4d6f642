"""Streamed output moved from the command's pipe into the connection by the
kernel (``splice``), on connections that keep no copy: the local transport
and a network listener with sessions off.  The bytes on the wire must be the
ones ``send_box`` would have sent, and a stalled master must still end the
send within its time limit."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, List, Tuple

import pytest

from remsh.conversation import ExecuteControl
from remsh.errors import PeerTimeout
from remsh.master.slave import Slave
from remsh.slave.server import SlaveServer
from remsh.transports import base
from remsh.transports.base import SocketStream
from remsh.wire import MAX_VALUE_LENGTH, Wire, encode_box
from tests.slaveproc import WAIT, SlaveProcesses, slave_procs, tcp_listener, wait_registered  # noqa: F401

pytestmark = pytest.mark.skipif(base._splice is None, reason="splice(2) is Linux only")

#: A command writing two different streams, in writes of odd sizes.
WRITER = r"""
import os, sys
out, err = sys.stdout.buffer, sys.stderr.buffer
for i in range(300):
    out.write(bytes([i % 251]) * (7919 + i * 13)); out.flush()
    if i % 7 == 0:
        err.write(b"e%d," % i); err.flush()
"""


def expected_output() -> Tuple[bytes, bytes]:
    out = b"".join(bytes([i % 251]) * (7919 + i * 13) for i in range(300))
    err = b"".join(b"e%d," % i for i in range(300) if i % 7 == 0)
    return out, err


@contextlib.contextmanager
def pipe_and_pair(data: bytes) -> Iterator[Tuple[int, socket.socket, socket.socket]]:
    """The read end of a pipe holding ``data`` (grown to fit it) and a
    socket pair; all closed afterwards."""
    r, w = os.pipe()
    a, b = socket.socketpair()
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)
        assert os.write(w, data) == len(data)
        yield r, a, b
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def read_exactly(sock: socket.socket, n: int) -> bytes:
    sock.settimeout(WAIT)
    got = bytearray()
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        assert chunk, f"connection ended after {len(got)} of {n} bytes"
        got += chunk
    return bytes(got)


def splice_and_read(data: bytes, stream: bytes) -> Tuple[Wire, bytes, bytes]:
    """``data`` sent from a pipe as ``stream`` output boxes through a socket
    pair: the wire, what the other end read (as many bytes as the boxes
    send_box would send take) and those boxes; nothing more may follow."""
    with pipe_and_pair(data) as (r, a, b):
        wire = Wire(SocketStream(a, send_timeout=5.0), label="splicer")
        head, key = ExecuteControl.output_head(stream)
        want = b"".join(encode_box(ExecuteControl.output_box(stream, data[i:i + MAX_VALUE_LENGTH]))
                        for i in range(0, len(data), MAX_VALUE_LENGTH))
        got: List[bytes] = []
        reader = threading.Thread(target=lambda: got.append(read_exactly(b, len(want))), daemon=True)
        reader.start()
        wire.send_values_spliced(head, key, r, len(data))
        reader.join(WAIT)
        assert got, "the reader got nothing"
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recv(1)  # nothing more than the boxes
        return wire, got[0], want


def test_spliced_boxes_are_the_bytes_send_box_would_send() -> None:
    """send_values_spliced puts on the wire exactly the output boxes send_box would, split at the value limit."""
    wire, got, want = splice_and_read(os.urandom(3 * MAX_VALUE_LENGTH + 12345), b"stdout")
    assert wire.can_splice
    assert got == want


def test_a_refused_splice_falls_back_to_copying(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the kernel refuses splice (a sandbox), the same boxes go out copied, and splice is not tried again."""
    calls: List[int] = []

    def refuse(*args: object, **kwargs: object) -> int:
        calls.append(1)
        raise OSError(errno.EINVAL, "splice refused")

    monkeypatch.setattr(base, "_splice", refuse)
    wire, got, want = splice_and_read(os.urandom(2 * MAX_VALUE_LENGTH + 777), b"stderr")
    assert got == want
    assert calls == [1] and base._splice is None
    assert not wire.can_splice


def test_splice_into_a_peer_that_stopped_reading_times_out() -> None:
    """A peer that reads nothing makes the spliced send fail with PeerTimeout within the send time limit."""
    data = os.urandom(1 << 20)
    with pipe_and_pair(data) as (r, a, b):
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        wire = Wire(SocketStream(a, send_timeout=0.5), label="splicer")
        head, key = ExecuteControl.output_head(b"stdout")
        started = time.monotonic()
        with pytest.raises(PeerTimeout):
            wire.send_values_spliced(head, key, r, len(data))
        assert time.monotonic() - started < WAIT


def test_tls_streams_never_splice() -> None:
    """A TLS socket must see every byte it sends, so its stream refuses the kernel path."""
    import ssl

    a, b = socket.socketpair()
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        tls = ctx.wrap_socket(a, do_handshake_on_connect=False, server_hostname="x")
        assert not SocketStream(tls, send_timeout=None).can_splice
        assert SocketStream(b, send_timeout=None).can_splice
    finally:
        a.close()
        b.close()


@pytest.fixture
def in_process_slave(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Tuple[Slave, List[int]]]:
    """A slave server in this process over a socket pair, and the byte counts its splices moved."""
    moved: List[int] = []
    real = base._splice
    assert real is not None

    def counting(*args: int, **kwargs: int) -> int:
        n = real(*args, **kwargs)
        moved.append(n)
        return n

    monkeypatch.setattr(base, "_splice", counting)
    a, c = socket.socketpair()
    server = SlaveServer(Wire(SocketStream(c, send_timeout=WAIT), label="slave"), str(tmp_path))
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    slave = Slave(Wire(SocketStream(a, send_timeout=None), label="master"), "in-process", io_timeout=WAIT)
    try:
        yield slave, moved
    finally:
        slave.close()
        thread.join(WAIT)


def collect(slave: Slave, argv: List[str]) -> Tuple[int, bytes, bytes]:
    out: List[bytes] = []
    err: List[bytes] = []
    status = slave.execute(argv, stdout_cb=out.append, stderr_cb=err.append)
    return status, b"".join(out), b"".join(err)


def test_output_of_a_plain_connection_goes_through_the_kernel(in_process_slave: Tuple[Slave, List[int]],
                                                              tmp_path: Path) -> None:
    """On a plain socket the slave splices the command's output, and the master gets every byte in order."""
    slave, moved = in_process_slave
    big = tmp_path / "big"
    big.write_bytes(os.urandom(5 << 20))
    status, out, err = collect(slave, ["cat", str(big)])
    assert (status, err) == (0, b"")
    assert hashlib.sha256(out).digest() == hashlib.sha256(big.read_bytes()).digest()
    assert sum(moved) == 5 << 20  # every byte went through splice, none through a read



@pytest.fixture(params=["local", "tcp without sessions"])
def plain_slave(request: pytest.FixtureRequest, tmp_path: Path, slave_procs: SlaveProcesses,
                tcp_listener: Callable[..., object]) -> Slave:
    """A real slave process on a connection without a session: local, or TCP with resume_timeout=0."""
    basedir = tmp_path / "base"
    basedir.mkdir()
    if request.param == "local":
        from remsh.master.slavelistener.local import LocalSlaveListener

        listener = LocalSlaveListener()
        request.addfinalizer(listener.stop)
        return listener.start_slave(str(basedir), name="plain-local")
    tcp = tcp_listener(resume_timeout=0)
    proc = slave_procs.start(tcp.port, "plain-tcp", basedir=basedir, no_reconnect=True)  # type: ignore[attr-defined]
    return wait_registered(tcp, proc)  # type: ignore[arg-type]


def test_both_streams_arrive_exact_from_a_real_slave(plain_slave: Slave) -> None:
    """stdout and stderr written in odd-sized pieces arrive whole and apart from a slave process that splices."""
    status, out, err = collect(plain_slave, [sys.executable, "-c", WRITER])
    want_out, want_err = expected_output()
    assert status == 0
    assert len(out) == len(want_out) and out == want_out
    assert err == want_err
