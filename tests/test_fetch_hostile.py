"""fetch and fetch_tree against a slave driven by hand at the wire level:
one that ignores the master's interrupt (an old slave, or data already in
flight), one that sends more than it announced, one that nests directories
without end.  Each costs at most its own connection."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from typing import Any, Callable, List, Tuple

import pytest

from remsh.errors import LimitExceeded, ProtocolError
from remsh.handshake import slave_handshake
from remsh.master.tree import MAX_FETCH_DEPTH
from remsh.transports.base import SocketStream
from remsh.treestream import DIR, END, FILE, MT, UP, D, H, M, N, T, encode
from remsh.wire import Wire, encode_data_boxes
from tests.slaveproc import HOST, SECRET, WAIT, tcp_listener  # noqa: F401
from tests.util import temp_files

pytestmark = pytest.mark.timeout(60)


def _fake_slave(listener: Any, name: str) -> Tuple[socket.socket, Wire, Any]:
    """A peer that registers properly (no session) and is then driven by the test."""
    sock = socket.create_connection((HOST, listener.port), timeout=WAIT)
    wire = Wire(SocketStream(sock), label="master")
    slave_handshake(wire, name, secret=SECRET, basedir="/nonexistent", timeout=WAIT)
    slave = listener.slave_collection.get_slave(True, lambda s: s.name == name, timeout=WAIT)
    assert slave is not None
    return sock, wire, slave


def _in_thread(fn: Callable[[], Any]) -> Tuple[threading.Thread, List[Any]]:
    outcome: List[Any] = []

    def run() -> None:
        try:
            outcome.append(fn())
        except BaseException as e:  # noqa: BLE001 - examined by the test
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _answer_ping(wire: Wire) -> None:
    assert wire.read_box(WAIT) == {b"meth": b"ping", b"version": b"1"}
    wire.send_box({})


def _file_record(name: bytes, data: bytes) -> bytes:
    return encode(T, FILE, N, name, M, b"420", MT, b"0", D, data, H, hashlib.sha256(data).hexdigest().encode())


def test_fetch_from_a_slave_that_ignores_the_interrupt_drains_and_keeps_it(tcp_listener, tmp_path):
    """A slave that sends its whole file after the master's interrupt (data in flight) is drained: LimitExceeded, nothing left, the slave still answers."""
    listener = tcp_listener()
    sock, wire, slave = _fake_slave(listener, "deaf")
    out = tmp_path / "out"
    out.mkdir()
    with sock:
        thread, outcome = _in_thread(lambda: slave.fetch("f", str(out / "f"), max_bytes=100_000))
        assert wire.read_box(WAIT)[b"meth"] == b"fetch"
        data = os.urandom(3 << 20)
        wire.send_bytes(encode_data_boxes(b"data", data))
        wire.send_box({b"sha256": hashlib.sha256(data).hexdigest().encode()})
        assert wire.read_box(WAIT) == {b"interrupt": b"y"}  # the stop, which came too late
        thread.join(WAIT)
        assert isinstance(outcome[0], LimitExceeded), outcome
        assert os.listdir(out) == [] and temp_files(out) == []
        thread, outcome = _in_thread(slave.ping)
        _answer_ping(wire)
        thread.join(WAIT)
        assert outcome == [None] and slave.connected


@pytest.mark.parametrize("extra", ["file", "bytes"])
def test_fetch_tree_of_more_than_announced_is_a_protocol_error(tcp_listener, tmp_path, extra):
    """A tree stream with more files or more file data than its first box announced raises ProtocolError; nothing is left."""
    listener = tcp_listener()
    sock, wire, slave = _fake_slave(listener, "liar")
    with sock:
        thread, outcome = _in_thread(lambda: slave.fetch_tree("t", str(tmp_path / "copy")))
        assert wire.read_box(WAIT)[b"meth"] == b"fetch_tree"
        wire.send_box({b"files": b"1", b"size": b"10"})
        records = encode(T, DIR, M, b"493", MT, b"0") + _file_record(b"a", b"0123456789")
        records += _file_record(b"b", b"x") if extra == "file" else b""
        if extra == "bytes":
            records = encode(T, DIR, M, b"493", MT, b"0") + _file_record(b"a", b"0123456789ab")
        wire.send_bytes(records + encode(T, UP) + encode(END, b"y"))
        thread.join(WAIT)
        assert isinstance(outcome[0], ProtocolError) and "announced" in str(outcome[0]), outcome
    assert os.listdir(tmp_path) == [] and not slave.connected


def test_fetch_tree_deeper_than_the_cap_is_refused(tcp_listener, tmp_path):
    """A stream nesting directories past MAX_FETCH_DEPTH raises ProtocolError before the master holds more descriptors; nothing is left."""
    listener = tcp_listener()
    sock, wire, slave = _fake_slave(listener, "deep")
    fds_before = len(os.listdir("/proc/self/fd"))
    with sock:
        thread, outcome = _in_thread(lambda: slave.fetch_tree("t", str(tmp_path / "copy")))
        assert wire.read_box(WAIT)[b"meth"] == b"fetch_tree"
        wire.send_box({b"files": b"0", b"size": b"0"})
        depth = MAX_FETCH_DEPTH + 50
        records = encode(T, DIR, M, b"493", MT, b"0")
        records += encode(T, DIR, N, b"d", M, b"493", MT, b"0") * depth + encode(T, UP) * (depth + 1)
        wire.send_bytes(records + encode(END, b"y"))
        thread.join(WAIT)
        assert isinstance(outcome[0], ProtocolError) and "levels" in str(outcome[0]), outcome
    assert os.listdir(tmp_path) == []
    assert len(os.listdir("/proc/self/fd")) <= fds_before


@pytest.mark.parametrize("limit", [{"max_bytes": 15}, {"max_entries": 2}])
def test_fetch_tree_stopped_in_the_stream_drains_and_keeps_the_slave(tcp_listener, tmp_path, limit):
    """A tree stream that passes a bound (no totals announced) gets an interrupt; what follows is drained, LimitExceeded is raised, nothing is left, the slave still answers."""
    listener = tcp_listener()
    sock, wire, slave = _fake_slave(listener, "quiet")
    with sock:
        thread, outcome = _in_thread(lambda: slave.fetch_tree("t", str(tmp_path / "copy"), **limit))
        assert wire.read_box(WAIT)[b"meth"] == b"fetch_tree"
        wire.send_box({})  # a header without totals
        records = encode(T, DIR, M, b"493", MT, b"0") + b"".join(_file_record(b"f%d" % i, b"0123456789")
                                                                 for i in range(5))
        wire.send_bytes(records)
        assert wire.read_box(WAIT) == {b"interrupt": b"y"}
        wire.send_bytes(_file_record(b"late", b"in flight"))
        wire.send_box({b"errtag": b"failed", b"error": b"stopped at the master's request"})
        thread.join(WAIT)
        assert isinstance(outcome[0], LimitExceeded) and next(iter(limit)) in str(outcome[0]), outcome
        assert os.listdir(tmp_path) == []
        thread, outcome = _in_thread(slave.ping)
        _answer_ping(wire)
        thread.join(WAIT)
        assert outcome == [None] and slave.connected
