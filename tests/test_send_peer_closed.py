"""A send blocked against a peer that stops reading and closes its end ends
at once, not at the send time limit: a slave SIGTERMed in the middle of a
``put`` says goodbye and exits, and the master, its data stuck behind the
slave's shut window, must see that goodbye now (it saw it 25 s later, when
TCP_USER_TIMEOUT gave up, under a loaded CPU)."""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
import time
from typing import Iterator, Tuple

import pytest

from remsh.errors import Disconnected
from remsh.session import SessionWire
from remsh.transports.base import SocketStream
from remsh.wire import Wire, encode_box, encode_data_boxes
from tests.slaveproc import HOST
from tests.util import WAIT, Outcome, run_in_thread, wait_until

pytestmark = pytest.mark.timeout(60)

#: far longer than any test here may take: a send that waits for it fails the test
SEND_TIMEOUT = 120.0
#: how soon the blocked send must end once the peer has closed its end
PROMPT = 5.0


def _queued(sock: socket.socket) -> int:
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0])


def tcp_connection() -> Tuple[socket.socket, socket.socket]:
    """A TCP connection on loopback whose far end has a small receive buffer."""
    with socket.create_server((HOST, 0)) as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        near = socket.create_connection(server.getsockname())
        far, _ = server.accept()
    return near, far


@pytest.fixture
def tcp_pair() -> Iterator[Tuple[socket.socket, socket.socket]]:
    """:func:`tcp_connection`, closed after the test."""
    near, far = tcp_connection()
    try:
        yield near, far
    finally:
        near.close()
        far.close()


def _last_words_then_close(far: socket.socket, words: bytes, sender: Outcome) -> None:
    """Once the sender's data has reached ``far`` (which reads none of it),
    send ``words`` and shut ``far``'s end; the sender must end promptly."""
    wait_until(lambda: _queued(far) > 0, WAIT, "data to reach the peer")
    assert not sender.done.is_set(), "everything fit in the socket buffers: nothing blocked"
    far.sendall(words)
    far.shutdown(socket.SHUT_WR)
    closed = time.monotonic()
    assert sender.done.wait(PROMPT), f"the send still waits {PROMPT:g} s after the peer closed its end"
    assert sender.finished_at is not None and sender.finished_at - closed < PROMPT


def test_a_send_stuck_behind_a_shut_window_ends_when_the_peer_closes_its_end(tcp_pair) -> None:
    """SocketStream.send_all blocked by a peer that reads nothing raises ConnectionResetError as soon as the peer shuts its end (FIN), well before the send time limit."""
    near, far = tcp_pair
    stream = SocketStream(near, peer="far", send_timeout=SEND_TIMEOUT)
    sender = run_in_thread(lambda: stream.send_all(b"x" * (32 << 20)))
    _last_words_then_close(far, b"last words", sender)
    assert isinstance(sender.error, ConnectionResetError), sender.error
    assert stream.recv(100, 1.0) == b"last words"  # what the peer said before is still there


def test_a_session_blocked_sending_sees_the_peers_goodbye_at_once(tcp_pair) -> None:
    """A session sending bulk data to a peer that says goodbye and closes its end without reading fails with the goodbye at once, not after the send time limit."""
    near, far = tcp_pair
    session = SessionWire(Wire(SocketStream(near, peer="far", send_timeout=SEND_TIMEOUT), label="far"),
                          "far", resume_timeout=300)
    data = encode_data_boxes(b"data", b"y" * (6 << 20))  # three pieces: more than the socket buffers hold
    sender = run_in_thread(lambda: session.send_bytes(data))
    _last_words_then_close(far, encode_box({b"bye": b"y"}), sender)
    assert isinstance(sender.error, Disconnected), sender.error
    assert "ended the session" in str(sender.error)
    session.close()
