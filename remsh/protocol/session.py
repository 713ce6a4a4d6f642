"""The session layer as an object that does no I/O: :class:`SessionState`.

A session counts the boxes of a conversation both ends send and receive
(the *session boxes*), keeps what it sent until the peer acknowledges it,
and after a reconnection re-sends exactly what the peer has not received.
:mod:`remsh.session` says why and how in full; this module holds the
bookkeeping, for the threaded driver (:class:`remsh.session.SessionWire`)
and the asyncio one (:mod:`remsh.aio.session`) alike.  Time is passed in
(``now``, any monotonic clock), never read::

    attached --lose()--> away --attach(peer_received)--> attached
        \\                  \\--tick() past resume_timeout--> failed
         \\--bye box, end(), fail()-----------------------> failed

Inputs: :meth:`receive` (a box from the peer: the control boxes ``ack``,
``hb``, ``bye`` are handled, a session box is counted and returned),
:meth:`deliver` (a session box handed to the caller: acknowledgements are
due by it), :meth:`send` (encoded session boxes to send), :meth:`attach`
(a new connection, and how many of our boxes the peer has), :meth:`lose`,
:meth:`tick`.  Outputs: :attr:`to_write` (bytes due on the connection,
drained with :meth:`pop_writes`), :meth:`next_write` (kept boxes the new
connection still lacks, within the window), :meth:`next_deadline`,
:attr:`failed`.  A box the peer may not send -- an acknowledgement of boxes
never sent, more read ahead than its window allows, a link check of an
unknown kind -- raises :class:`~remsh.errors.ProtocolError`.

What the sender keeps (``kept``) is opaque here: the bytes themselves, or
whatever the driver wants back for them (a place in a spool file); each
kept entry has its size in bytes, so the limits hold either way.
"""

from __future__ import annotations

import collections
import enum
from typing import Callable, Deque, List, NamedTuple, Optional, Tuple

from remsh.errors import Disconnected, ProtocolError, RemshError
from remsh.protocol.sessionacks import AckCounter
from remsh.protocol.sessionlimits import ACK_TIMEOUT, HELD_BOXES, HELD_BYTES, WINDOW_BOXES, WINDOW_BYTES
from remsh.wire import Box, box_size, encode_box

__all__ = ["SessionState", "Phase", "SessionFailed", "Kept", "Resend", "Lent", "PING", "PONG", "BYE",
           "is_control"]

PING = encode_box({b"hb": b"ping"})
PONG = encode_box({b"hb": b"pong"})
BYE = encode_box({b"bye": b"y"})
_CONTROL_KEYS = (b"ack", b"hb", b"bye")
_tuple_new = tuple.__new__


class Lent:
    """Encoded boxes in a buffer its owner lends to a session instead of
    having them copied: kept as they are until the session forgets them
    (the peer acknowledged them, or the session is over), then handed back
    with ``give_back`` -- when the last reference goes, which CPython does at
    once.  The owner does not touch the buffer before that."""

    __slots__ = ("data", "_give_back")

    def __init__(self, data: memoryview, give_back: Callable[[], None]) -> None:
        self.data = data
        self._give_back: Optional[Callable[[], None]] = give_back

    def __len__(self) -> int:
        return self.data.nbytes

    def __del__(self) -> None:
        give_back, self._give_back = self._give_back, None
        if give_back is not None:
            give_back()


_BYTES = (bytes, bytearray, memoryview, Lent)


def is_control(box: Box) -> bool:
    """Whether ``box`` is one of the session's own control boxes (never counted)."""
    return len(box) == 1 and next(iter(box)) in _CONTROL_KEYS


class SessionFailed(Disconnected):
    """The session ended: its connection did not come back in time, the peer
    ended it, or the slave came back as a new process."""


class Phase(enum.Enum):
    ATTACHED = "attached"  #: a connection carries the session
    AWAY = "away"  #: the connection was lost; waiting for the next one
    FAILED = "failed"  #: ended for good (see :attr:`SessionState.failed`)


class Kept(NamedTuple):
    """Session boxes sent and not yet acknowledged: ``boxes`` boxes from
    number ``first``, ``size`` bytes, ``data`` as the driver kept them."""

    first: int
    boxes: int
    size: int
    data: object


class Resend(NamedTuple):
    """A kept entry to write again on a new connection, without its first
    ``skip`` boxes (the peer has them)."""

    entry: Kept
    skip: int


class SessionState:
    """One end of a session: counts, kept boxes, held boxes, acknowledgements.

    :param resume_timeout: how long the session waits away before it fails
    :param label: names the peer in error messages
    :param spool_limit: most bytes kept while away
    :param counts: ``(sent, received)`` to start from (a session taken over
        with nothing kept to send again)
    :param heartbeat: send a link check when nothing was sent for this long,
        and take the link for lost after three times as long with nothing
        received (the slave's end; ``None``: never)
    :param now: the time of the first connection
    """

    def __init__(self, *, resume_timeout: float, label: str = "peer", spool_limit: int = 256 << 20,
                 counts: Tuple[int, int] = (0, 0), heartbeat: Optional[float] = None, now: float = 0.0) -> None:
        self.label = label
        self.resume_timeout = resume_timeout
        self.spool_limit = spool_limit
        self.heartbeat = heartbeat
        self.phase = Phase.ATTACHED
        #: connections that carried the session (and losses): each change +1
        self.generation = 0
        self.sent = self.peer_acked = counts[0]
        self.received = self.delivered = counts[1]
        #: the first kept box not yet written on the current connection
        self.written = counts[0]
        self.kept: Deque[Kept] = collections.deque()
        self.kept_bytes = 0
        #: bytes of kept entries the driver holds as bytes (not spooled)
        self.memory_bytes = 0
        #: kept entries the driver keeps outside memory (not bytes, :meth:`send`)
        self.spooled = 0
        self.acked_bytes = 0
        self.held: Deque[Tuple[Box, int]] = collections.deque()
        self.held_bytes = 0
        #: boxes (and bytes) held across a resume: the peer's new window is on top
        self.carried = (0, 0)
        self.held_peak = (0, 0)
        self.acks = AckCounter(counts[1])
        self.to_write: List[bytes] = []
        self.lost_at: Optional[float] = None
        self.failed: Optional[RemshError] = None
        self.expired = False  #: failed because the connection did not come back in time
        self.peer_ended = False  #: the peer said goodbye
        self.last_sent = self.last_received = now
        #: since when a sender has waited for room with the window full (ack time limit)
        self.blocked_since: Optional[float] = None
        #: the peer redialed and is being carried on (from begin_resume to attach)
        self.resume_asked = False
        #: since the last attach, writes go out through next_write until it
        #: has returned everything kept (so that they go out in order)
        self.resending = False

    # -- state -------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return self.phase is Phase.ATTACHED

    def _check(self) -> None:
        if self.failed is not None:
            raise self.failed

    def pop_writes(self) -> bytes:
        """The bytes due on the connection (control boxes), and forget them."""
        data = b"".join(self.to_write)
        self.to_write.clear()
        return data

    # -- receiving ---------------------------------------------------------------

    def receive(self, box: Box, now: float) -> Optional[Box]:
        """A box from the peer: ``None`` for a control box (handled), else the
        session box, counted as received; the caller hands it over at once
        (:meth:`deliver`) or keeps it (:meth:`hold`).

        Boxes still come while away (what the old connection held when it
        went); once failed, :meth:`receive` raises the failure.

        :raises ProtocolError: an acknowledgement of boxes never sent, a
            malformed control box, a session box after the peer's goodbye
        """
        if self.failed is not None and not self.peer_ended:
            raise self.failed
        self.last_received = now
        if len(box) != 1 or next(iter(box)) not in _CONTROL_KEYS:
            if self.peer_ended:
                raise ProtocolError(f"{self.label}: a session box after the peer ended the session")
            self.received += 1
            return box
        if b"ack" in box:
            try:
                count = int(box[b"ack"])
            except ValueError:
                raise ProtocolError(f"{self.label}: bad ack {box[b'ack'][:20]!r}") from None
            if count > self.sent:
                raise ProtocolError(f"{self.label}: ack of boxes never sent ({count} > {self.sent})")
            self.ack_to(count, now)
        elif b"hb" in box:
            kind = box[b"hb"]
            if kind == b"ping":
                if self.phase is Phase.ATTACHED:
                    self.to_write.append(PONG)
            elif kind != b"pong":
                raise ProtocolError(f"{self.label}: unknown link check {kind[:20]!r}")
        elif not self.peer_ended:  # bye: the peer ends the session; no resume
            self.peer_ended = True
            self.fail(SessionFailed(f"{self.label}: the peer ended the session (it is stopping)"))
        return None

    def take(self, box: Box, now: float) -> Optional[Box]:
        """:meth:`receive` and, for a session box, :meth:`deliver` in one
        (the hot path of a reader handing each box over as it comes)."""
        if self.failed is None and (len(box) != 1 or next(iter(box)) not in _CONTROL_KEYS):
            self.last_received = now
            self.received += 1
            delivered = self.delivered = self.delivered + 1
            size = 2  # box_size, written out: a box of one to three keys costs less so
            for key, value in box.items():
                size += len(key) + len(value) + 4
            ack = self.acks.delivered(delivered, size)
            if ack is not None and self.phase is Phase.ATTACHED:
                self.to_write.append(ack)
            return box
        got = self.receive(box, now)
        if got is not None:
            self._delivered(box_size(got))
        return got

    def hold(self, box: Box) -> None:
        """Keep a received session box for a later :meth:`next_held`.

        :raises ProtocolError: past :data:`HELD_BOXES` / :data:`HELD_BYTES`
            beyond what was carried across a resume: the peer sent more than
            its window allows without an acknowledgement
        """
        size = box_size(box)
        boxes = len(self.held) + 1
        held_bytes = self.held_bytes + size
        carried_boxes, carried_bytes = self.carried
        if boxes - carried_boxes > HELD_BOXES or held_bytes - carried_bytes > HELD_BYTES:
            raise ProtocolError(f"{self.label}: the peer sent more than its window allows without an "
                                f"acknowledgement ({boxes} boxes, {held_bytes} bytes unread)")
        self.held.append((box, size))
        self.held_bytes = held_bytes
        peak_boxes, peak_bytes = self.held_peak
        if boxes > peak_boxes or held_bytes > peak_bytes:
            self.held_peak = (max(peak_boxes, boxes), max(peak_bytes, held_bytes))

    def next_held(self) -> Optional[Box]:
        """The oldest held box, delivered (``None``: none held)."""
        if not self.held:
            return None
        box, size = self.held.popleft()
        self.held_bytes -= size
        carried_boxes, carried_bytes = self.carried
        if carried_boxes:
            self.carried = (carried_boxes - 1, max(0, carried_bytes - size))
        self._delivered(size)
        return box

    def deliver(self, box: Box) -> None:
        """``box`` (just returned by :meth:`receive`) is handed to the caller."""
        self._delivered(box_size(box))

    def _delivered(self, size: int) -> None:
        self.delivered += 1
        ack = self.acks.delivered(self.delivered, size)
        if ack is not None and self.phase is Phase.ATTACHED:
            self.to_write.append(ack)

    def commit(self, count: Optional[int]) -> None:
        """Acknowledge no more than ``count`` boxes from now on, and that many
        now (``None``: as delivered); see :mod:`remsh.sessionacks`."""
        ack = self.acks.commit(count, self.delivered)
        if ack is not None and self.phase is Phase.ATTACHED:
            self.to_write.append(ack)

    # -- sending -----------------------------------------------------------------

    def has_room(self, size: int, boxes: int, now: float) -> bool:
        """Whether ``boxes`` more boxes of ``size`` bytes may be kept now:
        within the window while attached, within ``spool_limit`` while away.
        A sender that finds none waits (for :meth:`receive` of an
        acknowledgement, or for :meth:`attach`) and looks again; waiting so
        with the window full past :data:`ACK_TIMEOUT` makes :meth:`tick`
        take the connection for lost.

        :raises RemshError: the session failed
        """
        self._check()
        if not self.kept:
            return True
        if self.phase is Phase.AWAY:
            return self.kept_bytes + size <= self.spool_limit
        if self.kept_bytes + size <= WINDOW_BYTES and self.sent - self.peer_acked + boxes <= WINDOW_BOXES:
            return True
        if self.blocked_since is None:
            self.blocked_since = now
        return False

    def send(self, data: "bytes | Lent", boxes: int, kept: object = None) -> bool:
        """Keep ``boxes`` encoded session boxes (``data``) until acknowledged;
        True when the caller is to write ``data`` now (attached and not
        :attr:`resending`), else it goes out through :meth:`next_write`
        (after the next :meth:`attach`, or now while resending).  ``kept`` is what
        the driver keeps for them (default: ``data``; anything but bytes
        counts as kept outside memory, :attr:`spooled`).  Room is the caller's to check
        (:meth:`has_room`).

        :raises RemshError: the session failed
        """
        if self.failed is not None:
            raise self.failed
        size = len(data)
        first = self.sent
        stored = data if kept is None else kept
        self.kept.append(_tuple_new(Kept, (first, boxes, size, stored)))
        self.kept_bytes += size
        if isinstance(stored, _BYTES):
            self.memory_bytes += size
        else:
            self.spooled += 1
        self.sent = first + boxes
        if self.phase is Phase.ATTACHED and not self.resending:
            self.written = self.sent
            return True
        return False

    def offer(self, data: "bytes | Lent", boxes: int, now: float) -> Optional[bool]:
        """:meth:`has_room` and :meth:`send` in one (the hot path of a
        sender keeping bytes in memory): ``None`` when there is no room
        (nothing kept), else what :meth:`send` returns.

        :raises RemshError: the session failed
        """
        if self.failed is not None:
            raise self.failed
        size = len(data)
        if self.kept:
            if self.phase is Phase.AWAY:
                if self.kept_bytes + size > self.spool_limit:
                    return None
            elif (self.kept_bytes + size > WINDOW_BYTES
                  or self.sent - self.peer_acked + boxes > WINDOW_BOXES):
                if self.blocked_since is None:
                    self.blocked_since = now
                return None
        first = self.sent
        self.kept.append(_tuple_new(Kept, (first, boxes, size, data)))
        self.kept_bytes += size
        self.memory_bytes += size
        self.sent = first + boxes
        if self.phase is Phase.ATTACHED and not self.resending:
            self.written = self.sent
            return True
        return False

    def sent_now(self, now: float) -> None:
        """Bytes went out on the connection at ``now`` (heartbeat bookkeeping)."""
        self.last_sent = now

    def next_write(self, now: float = 0.0) -> Optional[Resend]:
        """The next kept entry the current connection lacks, if the window
        lets it go now (counted as written); ``None`` when nothing is left
        (:attr:`resending` false) or the window is full (wait for an
        acknowledgement, at most :data:`ACK_TIMEOUT` from ``now``: see
        :meth:`tick`).  Entries are resent whole, without the boxes the
        peer has (``skip``)."""
        if self.phase is not Phase.ATTACHED:
            return None
        if self.written >= self.sent:
            self.resending = False
            return None
        in_flight_boxes = self.written - self.peer_acked
        in_flight_bytes = 0
        entry = None
        for kept in self.kept:
            if kept.first + kept.boxes <= self.written:
                in_flight_bytes += kept.size
            else:
                entry = kept
                break
        assert entry is not None
        end = entry.first + entry.boxes
        if in_flight_boxes > 0 and (in_flight_boxes + end - self.written > WINDOW_BOXES
                                    or in_flight_bytes + entry.size > WINDOW_BYTES):
            if self.blocked_since is None:
                self.blocked_since = now
            return None
        skip = max(0, self.written - entry.first)
        self.written = end
        return Resend(entry, skip)

    def ack_to(self, count: int, now: float) -> List[Kept]:
        """The peer has our first ``count`` boxes: forget them; the entries forgotten."""
        if count <= self.peer_acked:
            return []
        self.peer_acked = count
        self.blocked_since = None if self.blocked_since is None else now
        forgotten = []
        kept = self.kept
        freed = in_memory = 0
        while kept:
            entry = kept[0]
            if entry[0] + entry[1] > count:
                break
            kept.popleft()
            forgotten.append(entry)
            size = entry[2]
            freed += size
            if isinstance(entry[3], _BYTES):
                in_memory += size
            else:
                self.spooled -= 1
        self.kept_bytes -= freed
        self.acked_bytes += freed
        self.memory_bytes -= in_memory
        if not kept:
            self.blocked_since = None
        return forgotten

    # -- the connection ----------------------------------------------------------

    def lose(self, now: float) -> bool:
        """The connection broke (at ``now``): keep the session and wait for
        the next; False if it was not attached (already away, or failed)."""
        if self.phase is not Phase.ATTACHED:
            return False
        self.phase = Phase.AWAY
        self.generation += 1
        self.lost_at = now
        self.blocked_since = None
        self.to_write.clear()
        return True

    def begin_resume(self, now: float) -> int:
        """The peer redialed naming this session: off the old connection
        (if still on it), and our count of the peer's boxes, for the
        handshake's answer.

        :raises RemshError: the session failed
        """
        self._check()
        self.lose(now)
        self.resume_asked = True
        return self.received

    def attach(self, peer_received: int, now: float) -> None:
        """A new connection carries the session; the peer has received
        ``peer_received`` of our boxes.  What it lacks comes out of
        :meth:`next_write`.

        :raises ProtocolError: the peer claims boxes we never sent, or
            forgets boxes it acknowledged
        :raises RemshError: the session failed
        """
        self._check()
        if not self.peer_acked <= peer_received <= self.sent:
            raise ProtocolError(f"{self.label}: resume from box {peer_received}, but "
                                f"{self.peer_acked}..{self.sent} are the boxes it may have")
        self.resume_asked = False
        self.ack_to(peer_received, now)
        self.phase = Phase.ATTACHED
        self.generation += 1
        self.lost_at = None
        self.blocked_since = None
        self.written = peer_received
        self.resending = True
        self.acks.reset_bytes()
        self.last_received = self.last_sent = now
        self.carried = (len(self.held), self.held_bytes)
        self.to_write.clear()

    def fail(self, error: RemshError) -> bool:
        """End the session with ``error`` (False if it had failed already)."""
        if self.failed is not None:
            return False
        self.failed = error
        self.phase = Phase.FAILED
        self.resume_asked = self.resending = False
        self.kept.clear()
        self.kept_bytes = self.memory_bytes = self.spooled = 0
        self.to_write.clear()
        self.blocked_since = None
        return True

    def end(self) -> bool:
        """End the session on purpose: the goodbye to send (if attached) is
        in :attr:`to_write`, then the session fails."""
        attached = self.phase is Phase.ATTACHED
        if not self.fail(SessionFailed(f"{self.label}: session ended")):
            return False
        if attached:
            self.to_write.append(BYE)
        return True

    # -- time ------------------------------------------------------------------

    def next_deadline(self) -> Optional[float]:
        """When :meth:`tick` has something to do next (``None``: nothing is due)."""
        if self.phase is Phase.AWAY:
            return None if self.lost_at is None or self.resume_timeout <= 0 else self.lost_at + self.resume_timeout
        if self.phase is Phase.FAILED:
            return None
        due: List[float] = []
        if self.blocked_since is not None:
            due.append(self.blocked_since + ACK_TIMEOUT)
        if self.heartbeat is not None:
            due.append(self.last_sent + self.heartbeat)
            due.append(self.last_received + 3 * self.heartbeat)
        return min(due) if due else None

    def tick(self, now: float) -> Optional[str]:
        """Time has come to ``now``: fail a session away past
        ``resume_timeout`` (:attr:`expired`), take a connection for lost
        whose peer acknowledged nothing for :data:`ACK_TIMEOUT` with the
        window full or said nothing for three heartbeats (returns why: the
        driver drops the connection), queue a link check when one is due."""
        if self.phase is Phase.AWAY:
            if self.lost_at is not None and now - self.lost_at >= self.resume_timeout:
                waited = now - self.lost_at
                self.expired = True
                self.fail(SessionFailed(f"{self.label}: the connection did not come back within "
                                        f"{self.resume_timeout:g} s (waited {waited:.1f} s)"))
            return None
        if self.phase is Phase.FAILED:
            return None
        if self.blocked_since is not None and now - self.blocked_since >= ACK_TIMEOUT:
            why = f"the peer acknowledged nothing for {ACK_TIMEOUT:g} s"
            self.lose(now)
            return why
        if self.heartbeat is not None:
            if now - self.last_received >= 3 * self.heartbeat:
                why = f"nothing heard for {now - self.last_received:.1f} s"
                self.lose(now)
                return why
            if now - self.last_sent >= self.heartbeat:
                self.to_write.append(PING)
                self.last_sent = now
        return None
