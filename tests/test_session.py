"""The session layer on its own (remsh/session.py), over socket pairs: box
counting, acknowledgements, re-sending exactly what the peer lacks after a
cut in the middle of a box, and output kept in a spool file while away."""

from __future__ import annotations

import os
import socket
import stat
import threading

import pytest

from remsh.session import SPOOL_MEMORY, SessionWire, count_boxes
from remsh.transports.base import SocketStream
from remsh.wire import Wire, encode_box, encode_data_boxes

pytestmark = pytest.mark.timeout(60)


def _pair():
    a, b = socket.socketpair()
    return Wire(SocketStream(a), label="a"), Wire(SocketStream(b), label="b")


def test_count_boxes_counts_whole_boxes():
    """count_boxes counts the boxes of an encoded run, empty ones too."""
    data = encode_box({}) + encode_box({b"k": b"v"}) + encode_data_boxes(b"data", b"x" * 200000)
    assert count_boxes(data) == 2 + 4


def test_resume_sends_exactly_what_the_peer_lacks(tmp_path):
    """After a cut, the receiver that got k boxes gets boxes k.. again and
    nothing twice, even when the cut fell inside a box."""
    mine, theirs = _pair()
    session = SessionWire(mine, "s1", resume_timeout=30)
    boxes = [{b"n": str(i).encode(), b"pad": b"x" * 5000} for i in range(50)]
    for box in boxes[:30]:
        session.send_box(box)
    got = [theirs.read_box(5) for _ in range(20)]  # the peer read 20
    session.connection_lost(why="test cut")
    for box in boxes[30:]:
        session.send_box(box)  # kept while away
    mine2, theirs2 = _pair()
    session.attach(mine2, 20)
    got += [theirs2.read_box(5) for _ in range(30)]
    assert got == boxes
    theirs.close()
    theirs2.close()
    session.close()


def test_acknowledged_boxes_are_forgotten():
    """An ack from the peer frees what it covers."""
    mine, theirs = _pair()
    session = SessionWire(mine, "s2", resume_timeout=30)
    for i in range(10):
        session.send_box({b"n": str(i).encode()})
    assert len(session._replay) == 10
    theirs.send_box({b"ack": b"7"})
    session._pump(5)
    assert session.peer_acked == 7 and len(session._replay) == 3
    theirs.send_box({b"ack": b"11"})  # more than was ever sent
    with pytest.raises(Exception, match="never sent"):
        session._pump(5)
    session.close()
    theirs.close()


def test_output_kept_while_away_goes_to_a_spool_file(tmp_path):
    """Past SPOOL_MEMORY, what a disconnected sender keeps goes to an unlinked
    file (in a private directory made and removed at once under the spool
    directory); it comes back byte for byte, and the file is emptied once
    acknowledged."""
    spool = tmp_path / "spool"
    spool.mkdir()
    mine, theirs = _pair()
    session = SessionWire(mine, "s3", resume_timeout=30, spool_dir=str(spool))
    session.connection_lost(why="test cut")
    payload = os.urandom(60000)
    count = (3 * SPOOL_MEMORY) // len(payload)
    for i in range(count):
        session.send_box({b"i": str(i).encode(), b"data": payload})
    assert session._spool is not None and session._spool_end > SPOOL_MEMORY
    assert os.listdir(spool) == []  # unlinked, its directory gone: nobody can open it
    assert stat.S_ISREG(os.fstat(session._spool.fileno()).st_mode)
    mine2, theirs2 = _pair()
    got: list = []
    reader = threading.Thread(target=lambda: got.extend(theirs2.read_box(10) for _ in range(count)))
    reader.start()
    session.attach(mine2, 0)
    reader.join(30)
    assert [b[b"i"] for b in got] == [str(i).encode() for i in range(count)]
    assert all(b[b"data"] == payload for b in got)
    theirs2.send_box({b"ack": str(count).encode()})
    session._pump(5)
    assert session._spool_end == 0 and not session._replay
    session.close()
    theirs.close()
    theirs2.close()
