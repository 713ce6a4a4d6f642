"""Hostile input never stops the TCP listener.

Each kind of bad connection must cost exactly that connection: the listener
closes it (within the handshake time limit at worst), logs it with the peer's
address, and a real slave process registers afterwards.  A flood of silent
connections beyond ``max_pending`` pushes out the oldest silent ones
rather than locking newcomers out.  A slave that
registers properly and then misbehaves loses only its own registration.
"""

from __future__ import annotations

import io
import os
import socket
import threading
import time
from typing import Callable, Dict, List, Tuple

import pytest

from remsh.errors import Disconnected, PeerTimeout, ProtocolError
from remsh.sessionlimits import HELD_BOXES, HELD_BYTES, WINDOW_BYTES
from remsh.handshake import AUTH_FAILED, MASTER_GREETING, SLAVE_GREETING, slave_handshake
from remsh.transports.base import SocketStream
from remsh.wire import (DEFAULT_MAX_BOX_BYTES, DEFAULT_MAX_KEYS, MAX_VALUE_LENGTH, BoxDecoder, Wire,
                        encode_box)
from tests.slaveproc import (HOST, SECRET, WAIT, read_until_closed, slave_procs,  # noqa: F401
                             tcp_listener, wait_registered)

pytestmark = pytest.mark.timeout(120)

#: The listener's handshake time limit in these tests.
HANDSHAKE_TIMEOUT = 1.0


def _box_header(key: bytes, value_length: int) -> bytes:
    return len(key).to_bytes(2, "big") + key + value_length.to_bytes(2, "big")


def _over_byte_limit() -> bytes:
    count = DEFAULT_MAX_BOX_BYTES // (MAX_VALUE_LENGTH + 8) + 2
    return SLAVE_GREETING + b"".join(_box_header(b"k%d" % i, MAX_VALUE_LENGTH) + bytes(MAX_VALUE_LENGTH)
                                     for i in range(count))


#: name -> bytes the hostile peer sends; then it waits for the listener to close.
HOSTILE: Dict[str, Callable[[], bytes]] = {
    "random-bytes": lambda: os.urandom(4096),
    "wrong-greeting": lambda: b"REMSH-X\n" + encode_box({b"register": b"x"}),
    "http-request": lambda: b"GET / HTTP/1.0\r\n\r\n",
    "key-length-over-255": lambda: SLAVE_GREETING + b"\x01\x00" + b"k" * 256,
    "key-length-65535": lambda: SLAVE_GREETING + b"\xff\xff" + b"k" * 1000,
    "box-over-byte-limit": _over_byte_limit,
    "endless-keys": lambda: SLAVE_GREETING + b"".join(_box_header(b"k%d" % i, 0)
                                                      for i in range(DEFAULT_MAX_KEYS * 5)),
    "register-with-bad-nonce": lambda: SLAVE_GREETING + encode_box(
        {b"register": b"intruder", b"version": b"1", b"nonce": b"too short"}),
    "register-before-greeting": lambda: encode_box({b"register": b"intruder", b"version": b"1"}),
}


def _send(sock: socket.socket, data: bytes) -> None:
    """Send what the listener will take; it may close (and reset) before the end."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def _connect(port: int) -> socket.socket:
    return socket.create_connection((HOST, port), timeout=WAIT)


def _logged_about(caplog, port: int) -> bool:
    peer = f"{HOST}:{port}"
    return any(r.levelname in ("WARNING", "ERROR") and peer in r.getMessage() for r in caplog.records)


def _wait_logged(caplog, port: int) -> None:
    deadline = time.monotonic() + WAIT
    while not _logged_about(caplog, port):
        if time.monotonic() >= deadline:
            pytest.fail(f"nothing logged about {HOST}:{port}: {[r.getMessage() for r in caplog.records]}")
        time.sleep(0.02)


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_input_costs_one_connection(kind, tcp_listener, slave_procs, caplog):
    """Bad input is answered by closing that connection (logged with the peer address); a good slave still registers."""
    listener = tcp_listener(handshake_timeout=WAIT)
    with _connect(listener.port) as sock:
        port = sock.getsockname()[1]
        started = time.monotonic()
        _send(sock, HOSTILE[kind]())
        received = read_until_closed(sock, WAIT)
    # closed for the input, long before the handshake time limit
    assert time.monotonic() - started < WAIT / 4
    assert received.startswith(MASTER_GREETING) or received == b""
    _wait_logged(caplog, port)
    assert listener.slave_collection.get_all_slaves() == []
    good = slave_procs.start(listener.port, "good")
    wait_registered(listener, good).ping()


def test_malformed_register_box_gets_the_auth_failed_answer(tcp_listener):
    """A register box with a bad nonce is answered with the auth-failed error box before the close."""
    listener = tcp_listener(handshake_timeout=HANDSHAKE_TIMEOUT)
    with _connect(listener.port) as sock:
        _send(sock, HOSTILE["register-with-bad-nonce"]())
        received = read_until_closed(sock, WAIT)
    assert received.startswith(MASTER_GREETING)
    hello, refusal = BoxDecoder().feed(received[len(MASTER_GREETING):])
    assert hello[b"hello"] == b"remsh"
    assert refusal[b"errtag"] == AUTH_FAILED


@pytest.mark.parametrize("sends", [b"", SLAVE_GREETING, SLAVE_GREETING + b"\x00\x08regis"],
                         ids=["nothing", "greeting-only", "half-a-box"])
def test_silent_connection_is_dropped_at_the_handshake_time_limit(sends, tcp_listener, slave_procs, caplog):
    """A peer that goes silent during the handshake is dropped once the handshake time limit passes."""
    listener = tcp_listener(handshake_timeout=HANDSHAKE_TIMEOUT)
    with _connect(listener.port) as sock:
        port = sock.getsockname()[1]
        started = time.monotonic()
        _send(sock, sends)
        received = read_until_closed(sock, HANDSHAKE_TIMEOUT + 5.0)
        elapsed = time.monotonic() - started
    assert HANDSHAKE_TIMEOUT * 0.9 <= elapsed < HANDSHAKE_TIMEOUT + 2.0
    assert received.startswith(MASTER_GREETING)
    _wait_logged(caplog, port)
    good = slave_procs.start(listener.port, "good")
    wait_registered(listener, good).ping()


def test_handshake_dribbled_byte_by_byte_is_dropped_at_the_time_limit(tcp_listener, slave_procs):
    """A peer sending a valid greeting and register box a byte at a time is dropped when the whole handshake's limit passes."""
    timeout = 2.0
    listener = tcp_listener(handshake_timeout=timeout)
    register = encode_box({b"register": b"slowpoke", b"version": b"1", b"nonce": bytes(32), b"proof": bytes(32)})
    with _connect(listener.port) as sock:
        started = time.monotonic()
        closed = False
        # the greeting alone takes most of the limit: a limit per step (or per
        # byte) would keep the connection open well past it
        for byte in SLAVE_GREETING + register:
            _send(sock, bytes([byte]))
            sock.settimeout(0.2)
            try:
                closed = sock.recv(65536) == b""
            except ConnectionResetError:
                closed = True
            except socket.timeout:
                pass
            if closed or time.monotonic() - started > timeout + 5.0:
                break
        elapsed = time.monotonic() - started
    assert closed, f"still open after {elapsed:.1f} s of dribbling"
    assert timeout * 0.9 <= elapsed < timeout + 0.8
    good = slave_procs.start(listener.port, "good")
    wait_registered(listener, good).ping()


def test_flood_beyond_max_pending_pushes_out_the_oldest_quiet_handshakes(tcp_listener, slave_procs, caplog):
    """Past max_pending the oldest silent handshakes are dropped to make room (logged); newcomers are served and a slave registers at once."""
    timeout = 30.0  # far beyond the test: only pushing out frees slots here
    listener = tcp_listener(max_pending=4, handshake_timeout=timeout)
    holders: List[socket.socket] = []
    extras: List[socket.socket] = []
    try:
        for _ in range(4):
            holders.append(_connect(listener.port))
        for sock in holders:  # each got a handshake worker: it is greeted
            assert _read_exact(sock, len(MASTER_GREETING)) == MASTER_GREETING
        for _ in range(4):
            extras.append(_connect(listener.port))
            # each newcomer is served (greeted) and pushes out one holder, oldest first
            assert _read_exact(extras[-1], len(MASTER_GREETING)) == MASTER_GREETING
        for sock in holders:
            assert read_until_closed(sock, WAIT) == b"", "an older silent handshake was kept"
        drops = [r for r in caplog.records if "to make room for" in r.getMessage()]
        assert len(drops) == len(holders)
        good = slave_procs.start(listener.port, "good")
        wait_registered(listener, good, timeout=WAIT).ping()
    finally:
        for sock in holders + extras:
            sock.close()


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    sock.settimeout(WAIT)
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


# -- slaves that register properly and misbehave afterwards ----------------------------------


def _registered_fake_slave(listener, name: str) -> Tuple[socket.socket, Wire, object]:
    """A peer that completes the handshake with the right secret and is then driven by the test.

    Returns its socket, its wire and the master's slave object for it.
    """
    sock = socket.create_connection((HOST, listener.port), timeout=WAIT)
    wire = Wire(SocketStream(sock), label="master")
    slave_handshake(wire, name, secret=SECRET, basedir="/nonexistent", timeout=WAIT)
    slave = listener.slave_collection.get_slave(True, lambda s: s.name == name, timeout=WAIT)
    assert slave is not None
    return sock, wire, slave


def _call_in_thread(fn) -> Tuple[threading.Event, list]:
    done = threading.Event()
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(fn())
        except BaseException as e:  # noqa: BLE001 - examined by the test
            outcome.append(e)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done, outcome


def test_registered_slave_sending_unrequested_bytes_is_dropped(tcp_listener, slave_procs):
    """A registered slave that sends bytes while idle is disconnected, leaves the collection, and others still register."""
    listener = tcp_listener()
    sock, wire, slave = _registered_fake_slave(listener, "chatty")
    gone = threading.Event()
    slave.on_disconnect(lambda s: gone.set())
    with sock:
        sock.sendall(encode_box({b"unasked": b"for"}))
        assert gone.wait(WAIT), "the master ignored bytes from an idle slave"
        read_until_closed(sock, WAIT)
    assert listener.slave_collection.get_all_slaves() == []
    with pytest.raises(Disconnected):
        slave.ping()
    good = slave_procs.start(listener.port, "good")
    wait_registered(listener, good).ping()


@pytest.mark.parametrize("reply", [b"\x01\x00" + b"k" * 300, b"\x00\x01k\x00\x00\x00\x01k"],
                         ids=["oversize-key", "duplicate-key"])
def test_registered_slave_answering_garbage_fails_the_call_only(reply, tcp_listener, slave_procs):
    """A malformed reply makes that call raise ProtocolError and drops that slave; the listener keeps serving."""
    listener = tcp_listener()
    sock, wire, slave = _registered_fake_slave(listener, "garbled")
    with sock:
        done, outcome = _call_in_thread(slave.ping)
        assert wire.read_box(WAIT) == {b"meth": b"ping", b"version": b"1"}
        sock.sendall(reply)
        assert done.wait(WAIT)
        assert isinstance(outcome[0], ProtocolError), outcome
        read_until_closed(sock, WAIT)
    assert not slave.connected
    assert listener.slave_collection.get_all_slaves() == []
    good = slave_procs.start(listener.port, "good")
    wait_registered(listener, good).ping()


@pytest.mark.parametrize("call,request_box,reply", [
    (lambda s: s.stat("p"), {b"meth": b"stat", b"version": b"1", b"path": b"p"}, {b"result": b"x"}),
    (lambda s: s.stat("p"), {b"meth": b"stat", b"version": b"1", b"path": b"p"}, {}),
    (lambda s: s.set_cwd("d"), {b"meth": b"set_cwd", b"version": b"1", b"cwd": b"d"}, {b"cwd": b""}),
], ids=["stat-result-outside-its-choices", "stat-without-result", "set_cwd-empty-cwd"])
def test_reply_outside_the_table_is_a_protocol_error(call, request_box, reply, tcp_listener):
    """A reply whose values are not what the operation table declares raises
    ProtocolError naming slave and operation, never a wrong answer."""
    listener = tcp_listener()
    sock, wire, slave = _registered_fake_slave(listener, "liar")
    meth = request_box[b"meth"].decode()
    with sock:
        done, outcome = _call_in_thread(lambda: call(slave))
        assert wire.read_box(WAIT) == request_box
        sock.sendall(encode_box(reply))
        assert done.wait(WAIT)
        assert isinstance(outcome[0], ProtocolError), outcome
        assert str(outcome[0]).startswith(f"liar: {meth}"), outcome


def test_registered_slave_that_never_answers_times_out(tcp_listener):
    """A slave that reads a request and never answers makes the call raise PeerTimeout after io_timeout, and it is dropped."""
    listener = tcp_listener(io_timeout=1.0)
    sock, wire, slave = _registered_fake_slave(listener, "mute")
    with sock:
        done, outcome = _call_in_thread(slave.ping)
        assert wire.read_box(WAIT) == {b"meth": b"ping", b"version": b"1"}
        started = time.monotonic()
        assert done.wait(WAIT)
        assert isinstance(outcome[0], PeerTimeout), outcome
        assert 0.9 <= time.monotonic() - started < 5.0
        read_until_closed(sock, WAIT)
    assert listener.slave_collection.get_all_slaves() == []


@pytest.mark.parametrize("box", [encode_box({}), encode_box({b"x": bytes(60000)})], ids=["tiny", "large"])
def test_slave_flooding_a_waiting_sender_is_dropped_and_the_master_holds_a_window(box, tcp_listener,
                                                                                    slave_procs):
    """A slave that answers a send with a flood of unacknowledged boxes gets ProtocolError; the master holds no more than the window; other slaves go on."""
    listener = tcp_listener()
    good = wait_registered(listener, slave_procs.start(listener.port, "good"))
    sock = socket.create_connection((HOST, listener.port), timeout=WAIT)
    wire = Wire(SocketStream(sock), label="master")
    slave_handshake(wire, "flooder", secret=SECRET, basedir="/nonexistent", timeout=WAIT,
                    extra_info={"resumable": "y"})
    slave = listener.slave_collection.get_slave(True, lambda s: s.name == "flooder", timeout=WAIT)
    assert slave is not None and slave.resumable
    with sock:
        done, outcome = _call_in_thread(lambda: slave.send(io.BytesIO(bytes(3 * WINDOW_BYTES)), "dest"))
        assert wire.read_box(WAIT)[b"meth"] == b"send"
        wire.send_box({})  # go ahead
        # read everything the master sends, acknowledge nothing, and flood it
        reader = threading.Thread(target=read_until_closed, args=(sock, 3 * WAIT), daemon=True)
        reader.start()
        flood = box * (max(HELD_BOXES, HELD_BYTES // len(box)) + 100)
        flooder = threading.Thread(target=_send, args=(sock, flood), daemon=True)
        flooder.start()
        assert done.wait(WAIT), "the master kept reading the flood"
        assert isinstance(outcome[0], ProtocolError), outcome
        for thread in (reader, flooder):  # both end as the master closes the connection
            thread.join(WAIT)
        boxes, held = slave.wire.held_peak
        assert boxes <= HELD_BOXES and held <= HELD_BYTES
    assert not slave.connected
    assert listener.slave_collection.get_all_slaves() == [good]
    good.ping()
    good.send(io.BytesIO(b"still fine"), "f")


def test_conversation_errors_name_slave_and_operation_once(tcp_listener, tmp_path):
    """A send answered with a box the conversation does not allow raises
    ProtocolError naming slave and operation once ("liar: send: ..."), and
    the slave is dropped."""
    listener = tcp_listener()
    sock, wire, slave = _registered_fake_slave(listener, "liar")
    src = tmp_path / "f"
    src.write_bytes(b"data")
    with sock:
        done, outcome = _call_in_thread(lambda: slave.send(str(src), "dest"))
        request = wire.read_box(WAIT)
        assert request is not None and request[b"meth"] == b"send"
        sock.sendall(encode_box({b"bogus": b"1"}))
        assert done.wait(WAIT)
        error = outcome[0]
        assert isinstance(error, ProtocolError), outcome
        assert str(error).startswith("liar: send: ") and "send: send:" not in str(error), error
    assert not slave.connected
