"""The session layer on its own (remsh/session.py), over socket pairs: box
counting, acknowledgements, re-sending exactly what the peer lacks after a
cut in the middle of a box, and output kept in a spool file while away."""

from __future__ import annotations

import os
import socket
import stat
import threading
from typing import Optional

import pytest

from remsh.errors import Disconnected, ProtocolError
from remsh.session import SessionWire, count_boxes
from remsh.sessionlimits import HELD_BOXES, SPOOL_MEMORY, WINDOW_BOXES
from remsh.transports.base import SocketStream
from remsh.wire import Wire, encode_box, encode_data_boxes, split_boxes
from tests.util import WAIT, wait_until

pytestmark = pytest.mark.timeout(60)


def _pair():
    a, b = socket.socketpair()
    return Wire(SocketStream(a), label="a"), Wire(SocketStream(b), label="b")


def _away_spooling(spool, label):
    """A session that spools to ``spool`` (made here), its connection just lost; and the peer's end of that connection."""
    spool.mkdir()
    mine, theirs = _pair()
    session = SessionWire(mine, label, resume_timeout=30, spool_dir=str(spool))
    session.connection_lost(why="test cut")
    return session, theirs


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
    session, theirs = _away_spooling(spool, "s3")
    payload = os.urandom(60000)
    count = (3 * SPOOL_MEMORY) // len(payload)
    for i in range(count):
        session.send_box({b"i": str(i).encode(), b"data": payload})
    assert session._spool is not None and session._spool.end > SPOOL_MEMORY
    assert os.listdir(spool) == []  # unlinked, its directory gone: nobody can open it
    assert stat.S_ISREG(os.fstat(session._spool.file.fileno()).st_mode)
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
    assert session._spool.end == 0 and not session._replay
    session.close()
    theirs.close()
    theirs2.close()


def test_a_sender_keeps_at_most_window_boxes_unacknowledged():
    """A connected sender waits for an acknowledgement once WINDOW_BOXES boxes are unacknowledged, however small they are."""
    mine, theirs = _pair()
    session = SessionWire(mine, "s4", resume_timeout=30)
    received = []
    reader = threading.Thread(target=lambda: _drain(theirs, received), daemon=True)
    reader.start()
    sent = []

    def send_all() -> None:
        for i in range(WINDOW_BOXES + 10):
            session.send_box({})
            sent.append(i)

    worker = threading.Thread(target=send_all, daemon=True)
    worker.start()
    wait_until(lambda: len(sent) >= WINDOW_BOXES, what="the window filled")
    worker.join(0.5)
    assert len(sent) == WINDOW_BOXES, "the sender passed the box window without an acknowledgement"
    theirs.send_box({b"ack": str(WINDOW_BOXES).encode()})
    worker.join(WAIT)  # the waiting sender reads the acknowledgement itself
    assert len(sent) == WINDOW_BOXES + 10
    session.close()
    reader.join(WAIT)
    assert received[:WINDOW_BOXES + 10] == [{}] * (WINDOW_BOXES + 10)
    theirs.close()


def test_boxes_read_ahead_are_bounded_by_the_window():
    """A peer that floods a sender waiting for room with unacknowledged boxes breaks the protocol: ProtocolError, held boxes bounded."""
    mine, theirs = _pair()
    session = SessionWire(mine, "s5", resume_timeout=30)
    drain = threading.Thread(target=lambda: _drain(theirs), daemon=True)
    drain.start()
    theirs.send_bytes(encode_box({}) * (HELD_BOXES + 100))
    with pytest.raises(ProtocolError, match="window"):
        for _ in range(WINDOW_BOXES + 10):
            session.send_box({})  # the peer never acknowledges: the sender reads ahead
    assert session.held_peak[0] <= HELD_BOXES
    session.close()
    theirs.close()


def test_boxes_held_across_a_resume_do_not_count_against_the_new_window():
    """Boxes read ahead before a resume (which the peer was told we have) leave the new window whole."""
    mine, theirs = _pair()
    session = SessionWire(mine, "s6", resume_timeout=30)
    theirs.send_bytes(encode_box({}) * 100)
    theirs.send_box({b"ack": b"0"})
    session.send_box({})
    with session._reader:
        for _ in range(101):
            session._pump(WAIT)
    assert len(session._held) == 100
    session.prepare_resume()
    mine2, theirs2 = _pair()
    session.attach(mine2, 1)
    theirs2.send_bytes(encode_box({}) * HELD_BOXES)
    with session._reader:
        for _ in range(HELD_BOXES):
            session._pump(WAIT)
    assert len(session._held) == HELD_BOXES + 100
    assert session.read_box(WAIT) == {}
    session.close()
    for w in (theirs, theirs2):
        w.close()


def _drain(wire: Wire, into: Optional[list] = None) -> None:
    """Read what the other end sends (and keep it in ``into``), until it closes."""
    try:
        while True:
            box = wire.read_box(WAIT)
            if box is None:
                return
            if into is not None:
                into.append(box)
    except (Disconnected, ProtocolError):
        pass


def test_a_write_of_more_boxes_than_the_window_goes_out_in_pieces():
    """Writes of many more tiny boxes than WINDOW_BOXES reach a peer that acknowledges every 64 boxes (no wait for an ack that never comes)."""
    mine, theirs = _pair()
    session = SessionWire(mine, "s7", resume_timeout=30)
    peer = SessionWire(theirs, "s7", resume_timeout=30)
    count = 3 * WINDOW_BOXES + 5

    def write_twice() -> None:
        for _ in range(2):
            session.send_bytes(encode_box({}) * count)

    writer = threading.Thread(target=write_twice, daemon=True)
    writer.start()
    got = [peer.read_box(WAIT) for _ in range(2 * count)]
    writer.join(WAIT)
    assert got == [{}] * (2 * count) and not writer.is_alive()
    assert count_boxes(b"".join(p for p, _ in split_boxes(encode_box({}) * count, 1024, 1 << 20))) == count
    session.close()
    peer.close()


def test_a_session_is_resuming_from_the_redial_to_the_end_of_the_resend():
    """resuming is true from the redial (prepare_resume) until attach has
    sent again what the peer missed, and false again when the resume fails
    or the session ends."""
    mine, theirs = _pair()
    session = SessionWire(mine, "s9", resume_timeout=30)
    assert not session.resuming
    session.send_box({b"n": b"1"})
    session.prepare_resume()
    assert session.resuming
    session.connection_lost(why="the resume failed")
    assert not session.resuming
    session.prepare_resume()
    assert session.resuming
    mine2, theirs2 = _pair()
    session.attach(mine2, 0)
    assert theirs2.read_box(WAIT) == {b"n": b"1"}
    assert not session.resuming
    session.prepare_resume()
    session.fail(Disconnected("gone"))
    assert not session.resuming
    for w in (theirs, theirs2):
        w.close()


def test_a_lent_buffer_is_kept_uncopied_and_given_back_once_acknowledged():
    """send_lent keeps the caller's buffer itself (a resume after a cut sends what it holds then) and calls give_back only when the peer's ack covers it."""
    mine, theirs = _pair()
    session = SessionWire(mine, "s-lent", resume_timeout=30)
    buf = bytearray(encode_data_boxes(b"data", b"a" * 100000))  # 2 boxes
    given: list = []
    session.send_lent(memoryview(buf), 2, lambda: given.append(1))
    assert [theirs.read_box(5)[b"data"] for _ in range(2)] == [b"a" * 65535, b"a" * (100000 - 65535)]
    # not copied: what the session would send again is the buffer as it is now
    buf[-3] = ord("b")
    session.connection_lost(why="test cut")
    mine2, theirs2 = _pair()
    session.attach(mine2, 1)  # the peer has the first box only
    assert theirs2.read_box(5)[b"data"] == b"a" * (100000 - 65535 - 1) + b"b"
    assert given == []
    theirs2.send_box({b"ack": b"1"})
    session._pump(5)
    assert given == []  # the ack covers only part of it
    theirs2.send_box({b"ack": b"2"})
    session._pump(5)
    assert given == [1] and not session._replay
    session.close()
    for w in (theirs, theirs2):
        w.close()


def test_a_lent_buffer_spooled_while_away_is_copied_and_given_back_at_once(tmp_path):
    """Away and past SPOOL_MEMORY, a lent buffer goes to the spool file as a copy and is given back at once; what comes back after the resume is the data as lent."""
    session, theirs = _away_spooling(tmp_path / "spool", "s-lent-spool")
    payload = os.urandom(65535)
    filler = encode_box({b"data": payload})
    count = SPOOL_MEMORY // len(filler) + 1
    for _ in range(count):
        session.send_bytes(filler)  # memory full now
    given: list = []
    buf = bytearray(encode_box({b"data": payload[::-1]}))
    session.send_lent(memoryview(buf), 1, lambda: given.append(1))
    assert given == [1]
    buf[:] = b"\0" * len(buf)  # the owner reuses it: the spool has its own copy
    mine2, theirs2 = _pair()
    got: list = []
    reader = threading.Thread(target=lambda: got.extend(theirs2.read_box(10) for _ in range(count + 1)))
    reader.start()
    session.attach(mine2, 0)
    reader.join(30)
    assert len(got) == count + 1 and got[-1][b"data"] == payload[::-1]
    session.close()
    for w in (theirs, theirs2):
        w.close()


def test_a_session_lends_only_where_it_saves_a_copy():
    """A session over a socket stream takes lent buffers (the socket sends from them); an SSH channel stream copies what it is given, so there a session is not lent to."""
    from remsh.transports.ssh import ChannelStream

    mine, theirs = _pair()
    session = SessionWire(mine, "s-lends", resume_timeout=30)
    assert session.lends
    assert not getattr(ChannelStream, "sends_views", False)
    session.connection_lost(why="test cut")
    assert not session.lends  # away: nothing to send from
    session.close()
    theirs.close()
