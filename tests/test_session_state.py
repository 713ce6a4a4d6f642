"""The session layer as a pure object (remsh.protocol.session.SessionState), fed boxes with no I/O at all.

Every phase (attached, away, failed), every box a peer may not send, the
acknowledgement, window, held and spool limits, expiry and the other time
limits through ``tick(now)``, and a short conversation between two ends cut
at every point and resumed: every box arrives once and in order.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import pytest

from remsh.errors import ProtocolError
from remsh.protocol.session import BYE, PING, PONG, Phase, SessionFailed, SessionState
from remsh.sessionacks import ack_box
from remsh.sessionlimits import (ACK_EVERY_BOXES, ACK_EVERY_BYTES, ACK_TIMEOUT, HELD_BOXES, HELD_BYTES, WINDOW_BOXES,
                                 WINDOW_BYTES)
from remsh.wire import Box, BoxDecoder, box_size, encode_box

RESUME = 30.0


def state(**kwargs: object) -> SessionState:
    kwargs.setdefault("resume_timeout", RESUME)
    return SessionState(label="peer", **kwargs)  # type: ignore[arg-type]


def phase(st: SessionState) -> Phase:
    """The phase, read afresh (not narrowed by an earlier check)."""
    return st.phase


def data_box(i: int, size: int = 1) -> bytes:
    return encode_box({b"n": str(i).encode(), b"d": b"x" * size})


def send(st: SessionState, i: int, size: int = 1) -> bool:
    return st.send(data_box(i, size), 1)


def decoded(data: bytes) -> List[Box]:
    return BoxDecoder().feed(data)


# -- receiving -------------------------------------------------------------------------


def test_session_box_is_counted_and_returned() -> None:
    """A box that is not a control box is counted as received and returned for delivery."""
    st = state()
    box = {b"n": b"1"}
    assert st.receive(box, 1.0) is box
    assert (st.received, st.delivered) == (1, 0)
    st.deliver(box)
    assert st.delivered == 1 and st.last_received == 1.0


def test_acknowledgement_due_every_ack_every_boxes() -> None:
    """Delivering ACK_EVERY_BOXES small boxes queues one ack of that count, not before."""
    st = state()
    for i in range(ACK_EVERY_BOXES):
        assert not st.to_write, i
        box = st.receive({b"n": b"%d" % i}, 0.0)
        assert box is not None
        st.deliver(box)
    assert decoded(st.pop_writes()) == [{b"ack": str(ACK_EVERY_BOXES).encode()}]
    assert st.to_write == []


def test_acknowledgement_due_every_ack_every_bytes() -> None:
    """One delivered box of ACK_EVERY_BYTES bytes is acknowledged at once."""
    st = state()
    box = {b"d": b"x" * 65000}
    for _ in range(ACK_EVERY_BYTES // 65000 + 1):
        assert st.receive(box, 0.0) is box
        st.deliver(box)
    assert any(b[b"ack"] for b in decoded(st.pop_writes()))


def test_commit_point_bounds_acknowledgements() -> None:
    """With a commit point set, no ack goes past it (nor waits for ACK_EVERY_BOXES); committing further acknowledges at once."""
    st = state()
    st.commit(3)
    for i in range(ACK_EVERY_BOXES + 5):
        box = st.receive({b"n": b"%d" % i}, 0.0)
        assert box is not None
        st.deliver(box)
    assert st.to_write == []
    st.commit(3)
    assert decoded(st.pop_writes()) == [{b"ack": b"3"}]
    st.commit(None)
    assert decoded(st.pop_writes()) == [{b"ack": str(ACK_EVERY_BOXES + 5).encode()}]


def test_ack_forgets_kept_boxes() -> None:
    """An ack of N drops every kept entry wholly below N, and only those."""
    st = state()
    for i in range(3):
        assert send(st, i)
    size = len(data_box(0))
    assert st.receive({b"ack": b"2"}, 0.0) is None
    assert (st.peer_acked, len(st.kept), st.kept_bytes, st.memory_bytes) == (2, 1, size, size)
    assert st.receive({b"ack": b"1"}, 0.0) is None  # an older count changes nothing
    assert st.peer_acked == 2


def test_ack_below_what_was_acknowledged_changes_nothing() -> None:
    """An ack of fewer boxes than already acknowledged (even negative) is taken and changes nothing."""
    st = state()
    for i in range(3):
        send(st, i)
    st.receive({b"ack": b"2"}, 0.0)
    for value in (b"1", b"-1", b"0"):
        assert st.receive({b"ack": value}, 0.0) is None
    assert st.peer_acked == 2 and len(st.kept) == 1


@pytest.mark.parametrize("value", [b"4", b"1" * 30, b"x", b""])
def test_bad_or_excessive_ack_is_a_protocol_error(value: bytes) -> None:
    """An ack past what was sent, or not a number, raises ProtocolError."""
    st = state()
    for i in range(3):
        send(st, i)
    with pytest.raises(ProtocolError):
        st.receive({b"ack": value}, 0.0)


def test_link_checks() -> None:
    """A ping is answered with a pong (attached only), a pong is taken silently, another kind is a protocol error."""
    st = state()
    assert st.receive({b"hb": b"ping"}, 0.0) is None
    assert st.pop_writes() == PONG
    assert st.receive({b"hb": b"pong"}, 0.0) is None and st.to_write == []
    with pytest.raises(ProtocolError):
        st.receive({b"hb": b"what"}, 0.0)
    st.lose(1.0)
    st.receive({b"hb": b"ping"}, 1.0)
    assert st.to_write == []


def test_bye_fails_the_session_and_nothing_may_follow() -> None:
    """A bye box fails the session (peer_ended, SessionFailed); a session box after it is a protocol error."""
    st = state()
    send(st, 0)
    assert st.receive({b"bye": b"y"}, 0.0) is None
    assert st.phase is Phase.FAILED and st.peer_ended and isinstance(st.failed, SessionFailed)
    assert not st.kept
    with pytest.raises(ProtocolError):
        st.receive({b"n": b"1"}, 0.0)
    with pytest.raises(SessionFailed):
        send(st, 1)


def test_receive_after_local_failure_raises_the_failure() -> None:
    """Once failed (not by the peer), every box fed raises the failure itself."""
    st = state()
    st.end()
    assert st.pop_writes() == BYE
    with pytest.raises(SessionFailed):
        st.receive({b"n": b"1"}, 0.0)
    assert not st.end()  # idempotent


def test_end_while_away_sends_no_goodbye() -> None:
    """Ending a session while away queues nothing (there is no connection)."""
    st = state()
    st.lose(0.0)
    assert st.end() and st.to_write == []


# -- held boxes ------------------------------------------------------------------------


def test_held_boxes_limit() -> None:
    """HELD_BOXES boxes may be held unread; one more is a protocol error."""
    st = state()
    box = {b"a": b""}
    for _ in range(HELD_BOXES):
        st.hold(box)
    with pytest.raises(ProtocolError):
        st.hold(box)
    assert st.held_peak[0] == HELD_BOXES


def test_held_bytes_limit() -> None:
    """Boxes past HELD_BYTES held unread are a protocol error."""
    st = state()
    box = {b"d": b"x" * 60000}
    n = HELD_BYTES // box_size(box)
    for _ in range(n):
        st.hold(box)
    with pytest.raises(ProtocolError):
        st.hold(box)


def test_held_boxes_are_delivered_in_order_and_acknowledged() -> None:
    """next_held returns held boxes oldest first, each counted as delivered."""
    st = state()
    for i in range(3):
        box = st.receive({b"n": b"%d" % i}, 0.0)
        assert box is not None
        st.hold(box)
    assert [st.next_held() for _ in range(4)] == [{b"n": b"0"}, {b"n": b"1"}, {b"n": b"2"}, None]
    assert (st.received, st.delivered, st.held_bytes) == (3, 3, 0)


def test_held_boxes_carried_across_a_resume_do_not_count_against_the_new_window() -> None:
    """Boxes held when the connection changes are on top of the peer's new window."""
    st = state()
    box = {b"a": b""}
    for _ in range(HELD_BOXES):
        st.hold(box)
    st.lose(0.0)
    st.attach(0, 1.0)
    st.hold(box)  # the new connection's first box: within its window
    assert len(st.held) == HELD_BOXES + 1


# -- sending, window, spool ------------------------------------------------------------


def test_window_boxes_bound() -> None:
    """A connected sender has room for WINDOW_BOXES unacknowledged boxes, not one more; an ack makes room."""
    st = state()
    for i in range(WINDOW_BOXES):
        assert st.has_room(10, 1, 0.0)
        send(st, i)
    assert not st.has_room(10, 1, 5.0)
    assert st.blocked_since == 5.0
    st.receive({b"ack": b"1"}, 6.0)
    assert st.has_room(10, 1, 6.0)


def test_window_bytes_bound() -> None:
    """A connected sender keeps at most WINDOW_BYTES unacknowledged bytes (a first write always has room)."""
    st = state()
    assert st.has_room(WINDOW_BYTES * 2, 1, 0.0)  # nothing kept: any write goes
    st.send(b"x" * (WINDOW_BYTES - 10), 1)
    assert st.has_room(10, 1, 0.0)
    assert not st.has_room(11, 1, 0.0)


def test_spool_limit_while_away() -> None:
    """Away, a sender keeps boxes up to spool_limit bytes, then has no room until attached."""
    st = state(spool_limit=1000)
    send(st, 0)
    st.lose(0.0)
    assert not send(st, 1, 10)  # kept, not to write now
    assert st.has_room(1000 - st.kept_bytes, 1, 0.0)
    assert not st.has_room(1001 - st.kept_bytes, 1, 0.0)
    assert st.blocked_since is None  # no ack time limit while away


def test_spooled_entries_are_counted_apart_from_memory() -> None:
    """An entry kept as something other than bytes counts in spooled, not memory_bytes; its ack clears it."""
    st = state()
    st.lose(0.0)
    st.send(data_box(0), 1, kept=(0, 9))
    assert (st.spooled, st.memory_bytes) == (1, 0)
    st.attach(0, 1.0)
    resend = st.next_write()
    assert resend is not None and resend.entry.data == (0, 9)
    st.receive({b"ack": b"1"}, 1.0)
    assert st.spooled == 0


def test_send_after_failure_raises() -> None:
    """send and has_room raise the failure once the session failed."""
    st = state()
    st.fail(SessionFailed("gone"))
    with pytest.raises(SessionFailed):
        st.has_room(1, 1, 0.0)
    with pytest.raises(SessionFailed):
        send(st, 0)


# -- away and back ---------------------------------------------------------------------


def test_lose_and_attach_resend_what_the_peer_lacks() -> None:
    """After a loss, attach(k) forgets what the peer has and next_write gives the rest, skipping boxes inside an entry."""
    st = state()
    two = data_box(0) + data_box(1)
    assert st.send(two, 2)
    assert send(st, 2)
    assert st.lose(1.0) and not st.lose(2.0)
    assert st.phase is Phase.AWAY and st.generation == 1
    assert not send(st, 3)  # kept for the next connection
    assert st.begin_resume(3.0) == 0 and st.resume_asked
    st.attach(1, 4.0)
    assert phase(st) is Phase.ATTACHED and not st.resume_asked and st.peer_acked == 1
    got = []
    while True:
        resend = st.next_write()
        if resend is None:
            break
        got.append((resend.entry.first, resend.skip))
    assert got == [(0, 1), (2, 0), (3, 0)]
    assert not st.resending
    assert send(st, 4)  # caught up: written at once again


def test_send_during_resend_waits_its_turn() -> None:
    """A box sent while kept boxes still wait to be written again is not written at once (order kept)."""
    st = state()
    send(st, 0)
    st.lose(0.0)
    st.attach(0, 1.0)
    assert not send(st, 1)
    assert [r.entry.first for r in iter(st.next_write, None)] == [0, 1]


def test_resend_is_paced_by_the_window() -> None:
    """Re-sending kept boxes stops at the window and goes on after acks."""
    st = state()
    st.lose(0.0)
    for i in range(WINDOW_BOXES + 10):
        send(st, i)
    st.attach(0, 1.0)
    n = len(list(iter(st.next_write, None)))
    assert n == WINDOW_BOXES and st.resending
    st.receive({b"ack": b"10"}, 2.0)
    assert len(list(iter(st.next_write, None))) == 10 and not st.resending


@pytest.mark.parametrize("peer_received", [-1, 4])
def test_attach_with_impossible_count_is_a_protocol_error(peer_received: int) -> None:
    """A resume claiming boxes never sent, or fewer than it acknowledged, is refused."""
    st = state()
    for i in range(3):
        send(st, i)
    st.receive({b"ack": b"0"}, 0.0)
    st.lose(0.0)
    with pytest.raises(ProtocolError):
        st.attach(peer_received, 1.0)


def test_attach_or_resume_after_failure_raises() -> None:
    """A failed session cannot be resumed or attached."""
    st = state()
    st.fail(SessionFailed("over"))
    with pytest.raises(SessionFailed):
        st.begin_resume(0.0)
    with pytest.raises(SessionFailed):
        st.attach(0, 0.0)


# -- time ------------------------------------------------------------------------------


def test_expiry_via_tick() -> None:
    """Away, the deadline is lost_at + resume_timeout; a tick before it changes nothing, at it the session fails (expired)."""
    st = state(resume_timeout=5.0)
    assert st.next_deadline() is None
    st.lose(10.0)
    assert st.next_deadline() == 15.0
    st.tick(14.9)
    assert st.phase is Phase.AWAY
    st.tick(15.0)
    assert phase(st) is Phase.FAILED and st.expired and isinstance(st.failed, SessionFailed)
    assert "5 s" in str(st.failed) and st.next_deadline() is None


def test_resume_before_expiry_cancels_it() -> None:
    """Attached again before the limit, a later tick does not fail the session."""
    st = state(resume_timeout=5.0)
    st.lose(0.0)
    st.attach(0, 1.0)
    st.tick(100.0)
    assert st.phase is Phase.ATTACHED and st.failed is None


def test_ack_timeout_takes_the_connection_for_lost() -> None:
    """A sender blocked on a full window with no ack for ACK_TIMEOUT: tick loses the connection; an ack restarts the clock."""
    st = state()
    for i in range(WINDOW_BOXES):
        send(st, i)
    assert not st.has_room(1, 1, 0.0)
    assert st.next_deadline() == ACK_TIMEOUT
    st.receive({b"ack": b"1"}, 50.0)
    st.has_room(1, 2, 50.0)
    assert st.next_deadline() == 50.0 + ACK_TIMEOUT
    assert st.tick(50.0 + ACK_TIMEOUT - 1) is None
    why = st.tick(50.0 + ACK_TIMEOUT)
    assert why is not None and "acknowledged nothing" in why
    assert st.phase is Phase.AWAY


def test_heartbeat_and_silent_link() -> None:
    """With a heartbeat, a ping is queued after an idle interval; three intervals without a word lose the link."""
    st = state(heartbeat=1.0)
    assert st.next_deadline() == 1.0
    st.tick(1.0)
    assert st.pop_writes() == PING
    st.receive({b"hb": b"pong"}, 1.5)
    assert st.tick(2.9) is None
    why = st.tick(4.5)
    assert why is not None and st.phase is Phase.AWAY


# -- a short conversation, cut at every point ------------------------------------------


class End:
    """One end of a simulated link: its SessionState and what it got."""

    def __init__(self, name: str) -> None:
        self.st = SessionState(resume_timeout=RESUME, label=name)
        self.got: List[bytes] = []

    def take(self, data: bytes, now: float) -> None:
        for box in BoxDecoder().feed(data):
            got = self.st.receive(box, now)
            if got is not None:
                self.st.deliver(got)
                self.got.append(got[b"n"])


def run_conversation(cut_at: Optional[int]) -> Tuple[End, End, int]:
    """Master and slave each send 20 boxes; every step moves one write across
    the link; at step ``cut_at`` the link is cut (what is in flight lost) and
    the ends resume through the handshake's counts.  Returns the ends and the
    number of steps."""
    master, slave = End("master"), End("slave")
    flight: List[Tuple[End, bytes]] = []  # (receiver, bytes) in order
    to_send = {id(master): [b"m%d" % i for i in range(20)], id(slave): [b"s%d" % i for i in range(20)]}
    now, step = 0.0, 0
    while step < 1000:
        now += 0.01
        if step == cut_at:
            flight.clear()
            master.st.lose(now)
            slave.st.lose(now)
            received = master.st.begin_resume(now)  # the slave's register names its session
            master.st.attach(slave.st.received, now)
            slave.st.attach(received, now)
            for end, peer in ((master, slave), (slave, master)):
                for resend in iter(end.st.next_write, None):
                    data = resend.entry.data
                    assert isinstance(data, bytes)
                    flight.append((peer, data))
        step += 1
        for end, peer in ((master, slave), (slave, master)):
            pending = to_send[id(end)]
            if pending and end.st.has_room(10, 1, now):
                if end.st.send(encode_box({b"n": pending.pop(0)}), 1):
                    flight.append((peer, end.st.kept[-1].data))  # type: ignore[arg-type]
            acks = end.st.pop_writes()
            if acks:
                flight.append((peer, acks))
        if flight:
            receiver, data = flight.pop(0)
            receiver.take(data, now)
        elif not to_send[id(master)] and not to_send[id(slave)]:
            break
    return master, slave, step


def test_conversation_without_cut() -> None:
    """With no cut, each end gets the other's 20 boxes in order."""
    master, slave, _ = run_conversation(None)
    assert slave.got == [b"m%d" % i for i in range(20)]
    assert master.got == [b"s%d" % i for i in range(20)]


def test_conversation_cut_at_every_point() -> None:
    """A cut at any step of the conversation, then a resume: every box arrives exactly once and in order."""
    _, _, steps = run_conversation(None)
    for cut in range(steps):
        master, slave, _ = run_conversation(cut)
        assert slave.got == [b"m%d" % i for i in range(20)], cut
        assert master.got == [b"s%d" % i for i in range(20)], cut
        assert master.st.generation == slave.st.generation == 2


def test_ack_box_encoding() -> None:
    """The ack a receiver queues is the ack box of sessionacks."""
    st = state()
    st.commit(0)
    for i in range(2):
        box = st.receive({b"n": b"%d" % i}, 0.0)
        assert box is not None
        st.deliver(box)
    st.commit(2)
    assert st.pop_writes() == ack_box(2)


def test_offer_is_has_room_and_send_in_one() -> None:
    """offer keeps and says to write when there is room, says None (keeping nothing) at the window, and keeps without writing while away."""
    st = state()
    for i in range(WINDOW_BOXES):
        assert st.offer(data_box(i), 1, 0.0) is True
    assert st.offer(data_box(0), 1, 3.0) is None
    assert st.sent == WINDOW_BOXES and st.blocked_since == 3.0
    st.receive({b"ack": str(WINDOW_BOXES).encode()}, 4.0)
    st.lose(5.0)
    assert st.offer(data_box(0), 1, 5.0) is False
    assert len(st.kept) == 1 and st.memory_bytes == len(data_box(0))
    st.fail(SessionFailed("over"))
    with pytest.raises(SessionFailed):
        st.offer(data_box(0), 1, 6.0)


def test_boxes_left_on_a_lost_connection_still_count() -> None:
    """Away, boxes the old connection still held are taken (counted, held; acks forget), but no acknowledgement is queued for a connection that is gone."""
    st = state()
    send(st, 0)
    st.lose(1.0)
    box = st.receive({b"n": b"0"}, 1.5)
    assert box is not None and st.received == 1
    st.hold(box)
    st.receive({b"ack": b"1"}, 1.5)
    assert not st.kept
    st.commit(1)
    assert st.next_held() == {b"n": b"0"} and st.to_write == []
    assert st.phase is Phase.AWAY


def test_take_is_receive_and_deliver_in_one() -> None:
    """take counts a session box as received and delivered (acks due alike), handles control boxes as receive does, and refuses a box after a goodbye."""
    st = state()
    send(st, 0)
    for i in range(ACK_EVERY_BOXES):
        box = {b"n": b"%d" % i}
        assert st.take(box, 2.0) is box
    assert (st.received, st.delivered, st.last_received) == (ACK_EVERY_BOXES, ACK_EVERY_BOXES, 2.0)
    assert decoded(st.pop_writes()) == [{b"ack": str(ACK_EVERY_BOXES).encode()}]
    assert st.take({b"ack": b"1"}, 3.0) is None and not st.kept
    with pytest.raises(ProtocolError):
        st.take({b"ack": b"2"}, 3.0)
    st.take({b"bye": b"y"}, 4.0)
    with pytest.raises(ProtocolError):
        st.take({b"n": b"x"}, 5.0)
