"""Conversations that survive a dropped connection: :class:`SessionWire`.

A session sits above the per-connection :class:`~remsh.wire.Wire`.  Both ends
count the boxes of the conversation they send and receive (the *session
boxes*: everything after registration except the session's own control
boxes), keep what they sent until the peer acknowledges it, and after a
reconnection re-send exactly what the peer has not received -- so every
operation in progress (a command's output, its stdin, a file's data) goes on
as if nothing happened, every box arriving once and in order, and nothing is
sent twice or lost.

Why boxes and not bytes: a box cut in the middle is simply sent again in
full, and each connection starts with a clean decoder.

Control boxes (one key each, never counted, never re-sent):

- ``{ack: N}`` -- "I have received your first N session boxes"; sent after
  every :data:`ACK_EVERY_BOXES` boxes or :data:`ACK_EVERY_BYTES` bytes
  received, so the sender can forget them.  A sender whose unacknowledged
  boxes would pass :data:`WINDOW_BYTES` bytes or :data:`WINDOW_BOXES`
  boxes waits for an acknowledgement (flow control, and a bound on what it
  keeps); a bigger write goes out in pieces.  After a resume the boxes
  sent again are paced the same way.
- ``{hb: ping}`` / ``{hb: pong}`` -- the slave's link check: sent when it
  has sent nothing for a while; the master answers at once.  A slave that
  hears nothing for three intervals takes the link for dead and redials
  (a half-open link never ends by itself).
- ``{bye: y}`` -- the peer ends the session on purpose (a master closing a
  slave, a slave stopping on SIGTERM): no resume is waited for, every waiter
  fails at once; one that arrived just before the connection broke counts.

The window also bounds what a receiver reads ahead while it waits for room
to send (acknowledgements count the boxes *handed to the caller*): at most
:data:`HELD_BOXES` boxes and :data:`HELD_BYTES` bytes; a peer that sends
more has broken the protocol (a flooding slave costs its own connection,
never the master's memory).

The resume itself happens in the handshake (:mod:`remsh.handshake`): the
``registered`` box gives a ``session`` id, a redialing slave names it
(``resume``) with its count (``received``), the master answers with its own.
While the connection is away, sending keeps the boxes (up to
``spool_limit`` bytes, past which the sender waits), and receiving waits for
the next connection, up to ``resume_timeout`` after the loss; then the
session fails and every waiter gets :class:`~remsh.errors.Disconnected`.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Deque, Optional, Tuple, Union

from remsh.deadlines import Cancellable, Deadlines, call_later
from remsh.errors import Disconnected, PeerTimeout, ProtocolError, RemshError, WaitTimeout
from remsh.sessionacks import AckCounter
from remsh.sessionlimits import (WINDOW_BYTES, WINDOW_BOXES, PIECE_BOXES, PIECE_BYTES, HELD_BOXES, HELD_BYTES,
                                 ACK_TIMEOUT, DEFAULT_SPOOL_LIMIT, MAX_IDLE_PINGS, SPOOL_MEMORY)
from remsh.spool import SpoolFile, WakePipe
from remsh.wire import Box, BoxLike, Wire, box_size, count_boxes, encode_box, skip_boxes, split_boxes

if TYPE_CHECKING:
    from remsh.transports.base import StreamLike

log = logging.getLogger(__name__)

Data = Union[bytes, bytearray, memoryview]

_PING = encode_box({b"hb": b"ping"})
_PONG = encode_box({b"hb": b"pong"})
_BYE = encode_box({b"bye": b"y"})
_CONTROL_KEYS = (b"ack", b"hb", b"bye")


def new_session_id() -> str:
    """A fresh session id: 128 random bits, as 32 hex digits."""
    return os.urandom(16).hex()


def _cut_short(conn: Wire, error: ProtocolError) -> bool:
    """Whether ``error`` only says the stream ended inside a box (a lost connection)."""
    return bool(getattr(conn, "_eof", False))


def _control(box: Box) -> bool:
    return len(box) == 1 and next(iter(box)) in _CONTROL_KEYS


class SessionFailed(Disconnected):
    """The session ended: its connection did not come back in time, the peer
    ended it, or the slave came back as a new process."""


class SessionWire:
    """A :class:`~remsh.wire.Wire` look-alike whose connection may be replaced.

    Sending is thread-safe; reading is for one thread at a time, as with
    ``Wire``.  ``resume_timeout`` bounds how long the session waits for a
    lost connection to come back (counted from the loss, on ``deadlines``
    when given: one thread for a listener's sessions); ``on_lost``/
    ``on_failed`` are called (from the thread that noticed) so the owner can
    follow the state.  ``counts``, ``(sent, received)``: a session taken
    back by a master started anew (:mod:`remsh.jobadopt`) goes on from
    these counts, with nothing kept to send again."""

    def __init__(self, conn: Wire, session_id: str, *, resume_timeout: float,
                 label: Optional[str] = None, spool_limit: int = DEFAULT_SPOOL_LIMIT,
                 spool_dir: Optional[str] = None, on_lost: Optional[Callable[[], Any]] = None,
                 on_failed: Optional[Callable[[RemshError], Any]] = None,
                 deadlines: Optional[Deadlines] = None, counts: Tuple[int, int] = (0, 0)) -> None:
        self.session_id = session_id
        self._deadlines = deadlines
        self.resume_timeout = resume_timeout
        self.label = label or conn.label
        self.spool_limit = spool_limit
        self.on_lost = on_lost
        self.on_failed = on_failed
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self._reader = threading.Lock()
        self.conn: Optional[Wire] = conn
        self._last_conn = conn
        self._resending = False
        self._idle_window = 0.0
        self._idle_pings = 0
        self.generation = 0
        #: the peer redialed and asked to carry the session on (until attach)
        self._resume_asked = False
        self.sent = self.peer_acked = counts[0]
        self.received = counts[1]
        #: session boxes handed to the caller (received may be ahead: _held)
        self.delivered = counts[1]
        self._held: Deque[Tuple[Box, int]] = collections.deque()
        self._held_bytes = 0
        #: boxes (and bytes) held across a resume: the peer's new window is on top
        self._carried = (0, 0)
        self.held_peak = (0, 0)  # the most boxes and bytes ever held at once
        self._acked_bytes = 0
        self._acks = AckCounter(counts[1])
        # (first box, boxes, data): data is bytes, or (offset, length) in the
        # spool file for what was kept while away past SPOOL_MEMORY
        self._replay: Deque[Tuple[int, int, Union[bytes, Tuple[int, int]]]] = collections.deque()
        self._replay_bytes = 0
        self._memory_bytes = 0
        self.spool_dir = spool_dir
        self._spool: Optional[SpoolFile] = None
        self.lost_at: Optional[float] = None
        self.failed: Optional[RemshError] = None
        self.expired = False  #: failed because the connection did not come back in time
        self.peer_ended = False
        self.last_sent = self.last_received = time.monotonic()
        self.closed = False
        self._timer: Optional[Cancellable] = None
        self._wakepipe = WakePipe()  # readable at every change (attach, failure)

    # -- state -------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        """True while a connection carries the session."""
        return self.conn is not None and self.failed is None

    @property
    def stream(self) -> StreamLike:
        """The current connection's stream (the last one while away)."""
        conn = self.conn or self._last_conn
        return conn.stream

    def wake_fd(self) -> int:
        """A descriptor that turns readable when the connection changes or
        the session fails (drain it with :meth:`clear_wake`)."""
        with self._cond:
            return self._wakepipe.fd()

    def clear_wake(self) -> None:
        self._wakepipe.clear()

    def connection_lost(self, conn: Optional[Wire] = None, why: str = "connection lost") -> None:
        """The connection ``conn`` (default: the current one) broke: keep
        the session and wait for the next one."""
        with self._cond:
            self._resume_asked = False
            if self.conn is None or (conn is not None and conn is not self.conn) or self.failed:
                return
            old = self._last_conn = self.conn
            self.conn = None
            self.generation += 1
            self.lost_at = time.monotonic()
            self._cond.notify_all()
        if self._reader.acquire(blocking=False):  # else the reader reads what is left itself
            try:
                self._drain(old)
            finally:
                self._reader.release()
        try:
            getattr(old.stream, "abort", lambda: None)()
        except OSError:
            pass
        old.close()
        self._wakepipe.wake()
        if self.failed is not None:
            return  # the peer said goodbye before the connection went
        log.info("%s: %s; waiting up to %g s for it to come back", self.label, why, self.resume_timeout)
        if self._timer is None and self.resume_timeout > 0:
            self._arm(self.resume_timeout)
        if self.on_lost is not None:
            self.on_lost()

    def _drain(self, conn: Wire) -> None:
        """Take in what the peer sent before ``conn`` went (no waiting): a
        goodbye in it ends the session now, not after the resume time limit
        (a slave stopped by SIGTERM while the master only sends: ``put``)."""
        try:
            for _ in range(HELD_BOXES):
                conn.feed_available()
                if not conn.has_buffered_box():
                    return
                while self.failed is None and conn.has_buffered_box():
                    box = conn.poll_box()
                    if box is not None and self._take(box, conn) is not None:
                        self._hold(box)
        except RemshError:
            pass  # what could not be read is sent again on a resume

    def _arm(self, seconds: float) -> None:
        self._timer = call_later(self._deadlines, seconds + 0.05, self._expire)

    def _expire(self) -> None:
        with self._cond:
            self._timer = None
            if self.conn is not None or self.failed is not None or self.lost_at is None:
                return
            waited = time.monotonic() - self.lost_at
            if waited < self.resume_timeout:
                self._arm(self.resume_timeout - waited)
                return
            self.expired = True
        self.fail(SessionFailed(f"{self.label}: the connection did not come back within "
                                f"{self.resume_timeout:g} s (waited {waited:.1f} s)"))

    def fail(self, error: RemshError) -> None:
        """End the session: every waiter and every later call raises ``error``."""
        with self._cond:
            if self.failed is not None:
                return
            self.failed, self._resume_asked = error, False
            conn, self.conn = self.conn, None
            if conn is not None:
                self._last_conn = conn
            timer, self._timer = self._timer, None
            self._replay.clear()
            self._replay_bytes = self._memory_bytes = 0
            spool, self._spool = self._spool, None
            if spool is not None:
                spool.close()
            self._cond.notify_all()
        if timer is not None:
            timer.cancel()
        if conn is not None:
            conn.close()
        self._wakepipe.wake()
        if self.on_failed is not None:
            self.on_failed(error)

    def prepare_resume(self) -> int:
        """Take the session off its current connection (if any) so that no
        box arrives on it any more, and return how many session boxes were
        received: what the resuming handshake tells the peer."""
        self.connection_lost(why="the slave redialed")
        with self._reader:  # no reader is between a receive and its count
            with self._cond:
                self._resume_asked = self.failed is None
                return self.received

    @property
    def resuming(self) -> bool:
        """The peer has redialed and the session is being carried onto its
        new connection: the handshake, then what the peer missed sent again
        (``ls`` and the dashboard show it as ``resuming``)."""
        return self._resume_asked or (self._resending and self.conn is not None)

    def attach(self, conn: Wire, peer_received: int) -> None:
        """Carry the session on ``conn`` from now on; re-send what the peer
        has not received (it received ``peer_received`` of our boxes).

        Senders are not held up meanwhile (one may be waiting for the
        connection with its boxes kept): what they add while the kept boxes
        go out is sent after them, in order.

        :raises ProtocolError: the peer claims boxes we never sent
        :raises SessionFailed: the session has already failed
        """
        with self._cond:
            if self.failed is not None:
                conn.close()
                raise self.failed
            if not self.peer_acked <= peer_received <= self.sent:
                conn.close()
                raise ProtocolError(f"{self.label}: resume from box {peer_received}, but "
                                    f"{self.peer_acked}..{self.sent} are the boxes it may have")
            self._resume_asked = False
            old = self.conn
            if old is not None:
                self._last_conn = old
            self._ack_to(peer_received)
            self.conn = conn
            self.generation += 1
            self.lost_at = None
            self._acks.reset_bytes()
            self.last_received = time.monotonic()
            self._resending = True
            self._carried = (len(self._held), self._held_bytes)
            timer, self._timer = self._timer, None
            next_box = peer_received
            acked_bytes = self._acked_bytes
        resent_bytes = 0
        if timer is not None:
            timer.cancel()
        if old is not None:
            old.close()
        try:
            while True:
                with self._cond:
                    if self.conn is not conn:
                        return  # lost again (or failed): the next attach re-sends
                    pending = [(first, n, data) for first, n, data in self._replay
                               if first + n > next_box]
                    if not pending:
                        self._resending = False
                        self._cond.notify_all()
                        break
                for first, n, kept in pending:
                    if isinstance(kept, bytes):
                        data = kept
                    else:
                        with self._cond:  # read back from the spool, one entry at a time
                            if first + n <= self.peer_acked:
                                next_box = first + n
                                continue
                            data = self._data(kept)
                    skip = next_box - first
                    data = data[skip_boxes(data, skip):] if skip > 0 else data
                    if not self._pace(conn, next_box, first + n, acked_bytes, resent_bytes, len(data)):
                        return
                    conn.send_bytes(data)
                    resent_bytes += len(data)
                    next_box = first + n
                self.last_sent = time.monotonic()
        except Disconnected as e:
            self.connection_lost(conn, f"connection lost while resuming: {e}")
            return
        self._wakepipe.wake()
        log.info("%s: session resumed (%d boxes sent again)", self.label, next_box - peer_received)

    def _pace(self, conn: Wire, sent_to: int, upto: int, acked_bytes: int, resent: int, size: int) -> bool:
        """Wait until re-sending boxes ``sent_to..upto`` (``size`` bytes;
        ``resent`` bytes so far, ``_acked_bytes`` was ``acked_bytes`` at the
        start) stays within the window.  False when the connection went (or
        acknowledged nothing for :data:`ACK_TIMEOUT`: taken as lost)."""
        since, acked = time.monotonic(), -1
        with self._cond:
            while True:
                if self.conn is not conn:
                    return False
                boxes = max(0, sent_to - self.peer_acked)
                in_flight = max(0, resent - (self._acked_bytes - acked_bytes))
                if boxes == 0 or (boxes + upto - sent_to <= WINDOW_BOXES
                                  and in_flight + size <= WINDOW_BYTES):
                    return True
                if self.peer_acked != acked:
                    acked, since = self.peer_acked, time.monotonic()
                elif time.monotonic() - since >= ACK_TIMEOUT:
                    break
                self._cond.wait(1.0)
        self.connection_lost(conn, f"the peer acknowledged nothing for {ACK_TIMEOUT:g} s while we resumed")
        return False

    def end(self) -> None:
        """End the session on purpose: tell the peer (best effort) and fail
        every waiter with ``Disconnected``."""
        conn = self.conn
        if conn is not None:
            try:
                conn.send_bytes(_BYE, lock_timeout=1.0)
            except RemshError:
                pass
        self.fail(SessionFailed(f"{self.label}: session ended"))

    def close(self) -> None:
        """Close for good (as ``Wire.close``): ends the session."""
        if self.closed:
            return
        self.closed = True
        self.end()
        self._wakepipe.close()

    def _ack_to(self, count: int) -> None:
        """The peer has our first ``count`` boxes: forget them (under _cond)."""
        if count <= self.peer_acked:
            return
        self.peer_acked = count
        replay = self._replay
        while replay and replay[0][0] + replay[0][1] <= count:
            data = replay.popleft()[2]
            size = len(data) if isinstance(data, bytes) else data[1]
            self._replay_bytes -= size
            self._acked_bytes += size
            if isinstance(data, bytes):
                self._memory_bytes -= size
        if self._spool is not None and not any(not isinstance(d, bytes) for _, _, d in replay):
            self._spool.clear()
        self._cond.notify_all()

    def wait_change(self, timeout: float) -> None:
        """Wait at most ``timeout`` s for a change (connection lost, failure,
        :meth:`wake`), unless it has no connection or has failed already."""
        with self._cond:
            if self.conn is not None and self.failed is None:
                self._cond.wait(timeout)

    def wake(self) -> None:
        """End every :meth:`wait_change` now (its caller looks again)."""
        with self._cond:
            self._cond.notify_all()

    def wait_attached(self, timeout: Optional[float] = None) -> None:
        """Wait while away: until a connection carries the session again.

        :raises Disconnected: the session failed (its resume time limit ran
            out, or it was ended)
        :raises PeerTimeout: still away after ``timeout`` seconds
        """
        with self._cond:
            self._wait_connected(None if timeout is None else time.monotonic() + timeout)

    def _wait_connected(self, deadline: Optional[float]) -> Wire:
        """The current connection, waiting for one while away (under _cond)."""
        while True:
            if self.failed is not None:
                raise self.failed
            if self.conn is not None:
                return self.conn
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise PeerTimeout(f"{self.label}: no connection within the time limit")
            self._cond.wait(left)

    # -- sending -------------------------------------------------------------------

    def send_bytes(self, data: Data, *, lock_timeout: Optional[float] = None) -> None:
        """Send encoded session boxes: kept until acknowledged, sent now if
        connected.  Waits while too much is unacknowledged (connected: for
        the peer's acknowledgement; away: for the connection, past
        ``spool_limit``).

        :raises WaitTimeout: ``lock_timeout`` passed waiting for another sender
        :raises Disconnected: the session has failed
        """
        if lock_timeout is None:
            self._send_lock.acquire()
        elif not self._send_lock.acquire(timeout=lock_timeout):
            raise WaitTimeout(f"{self.label}: connection busy sending for {lock_timeout:g} s")
        try:
            self._send_locked(data)
        finally:
            self._send_lock.release()

    def send_bytes_unless(self, data: Data, stop: threading.Event) -> bool:
        """Send unless ``stop`` is set (checked under the send lock)."""
        with self._send_lock:
            if stop.is_set():
                return False
            self._send_locked(data)
        return True

    def _send_locked(self, data: Data) -> None:
        chunk = bytes(data)
        n = count_boxes(chunk)
        if n > PIECE_BOXES or len(chunk) > PIECE_BYTES:  # each piece waits for room in the window
            for piece, k in split_boxes(chunk, PIECE_BOXES, PIECE_BYTES):
                self._send_piece(piece, k)
        elif chunk:
            self._send_piece(chunk, n)

    def _send_piece(self, chunk: bytes, n: int) -> None:
        self._make_room(len(chunk), n)
        with self._cond:
            if self.failed is not None:
                raise self.failed
            self._replay.append((self.sent, n, self._keep(chunk)))
            self._replay_bytes += len(chunk)
            self.sent += n
            # while a resume re-sends the kept boxes, it sends this one too
            conn = None if self._resending else self.conn
        if conn is not None:
            try:
                conn.send_bytes(chunk)
                self.last_sent = time.monotonic()
            except Disconnected as e:
                self.connection_lost(conn, f"connection lost while sending: {e}")

    def _keep(self, chunk: bytes) -> Union[bytes, Tuple[int, int]]:
        """What the replay holds for ``chunk`` (under _cond): the bytes, or
        while away past SPOOL_MEMORY, where they are in the spool file."""
        if self.conn is None and self.spool_dir is not None and self._memory_bytes >= SPOOL_MEMORY:
            try:
                if self._spool is None:
                    self._spool = SpoolFile(self.spool_dir)
                return self._spool.append(chunk)
            except OSError as e:
                log.warning("%s: cannot spool to %s (%s); keeping output in memory", self.label,
                            self.spool_dir, e)
                self.spool_dir = None
        self._memory_bytes += len(chunk)
        return chunk

    def _data(self, kept: Union[bytes, Tuple[int, int]]) -> bytes:
        """The bytes of a replay entry (under _cond)."""
        if isinstance(kept, bytes):
            return kept
        assert self._spool is not None
        return self._spool.read(kept)

    def _make_room(self, size: int, boxes: int) -> None:
        """Wait until ``size`` more bytes in ``boxes`` boxes may be kept
        (holding the send lock).

        A connected peer that acknowledges nothing for :data:`ACK_TIMEOUT`
        while the window is full is taken as lost (as a stalled send is):
        the wait goes on as while away, bounded by ``resume_timeout``."""
        acked, since = -1, 0.0
        while True:
            with self._cond:
                if self.failed is not None:
                    raise self.failed
                if not self._replay:
                    return
                if self.conn is None:
                    if self._replay_bytes + size <= self.spool_limit:
                        return
                elif (self._replay_bytes + size <= WINDOW_BYTES
                      and self.sent - self.peer_acked + boxes <= WINDOW_BOXES):
                    return
                if self.conn is None:
                    self._cond.wait(1.0)
                    continue
                conn = self.conn
                now = time.monotonic()
                if self.peer_acked != acked:
                    acked, since = self.peer_acked, now
                stalled = now - since >= ACK_TIMEOUT
            if stalled:
                self.connection_lost(conn, f"the peer acknowledged nothing for {ACK_TIMEOUT:g} s")
                continue
            # connected: the acknowledgement is on its way; read it ourselves
            # if no other thread reads, else let the reader handle it
            if self._reader.acquire(blocking=False):
                try:
                    self._pump(1.0)
                finally:
                    self._reader.release()
            else:
                with self._cond:
                    self._cond.wait(0.2)

    def _pump(self, timeout: float) -> None:
        """Read one box while waiting for room, keeping a session box for
        the next ``read_box`` (holding the reader lock)."""
        with self._cond:
            conn = self.conn
        if conn is None:
            return
        try:
            box = self._read_conn(conn, timeout)
        except PeerTimeout:
            return
        if box is not None and self._take(box, conn) is not None:
            # a box for the reader, read ahead to reach the acknowledgement
            # behind it: received now, delivered by the next read
            self._hold(box)

    def _hold(self, box: Box) -> None:
        """Keep a session box read ahead (holding the reader lock).

        :raises ProtocolError: past HELD_BOXES / HELD_BYTES (beyond the window)
        """
        size = box_size(box)
        with self._cond:
            self.received += 1
            carried_boxes, carried_bytes = self._carried
            boxes = len(self._held) + 1
            held_bytes = self._held_bytes + size
            if boxes - carried_boxes > HELD_BOXES or held_bytes - carried_bytes > HELD_BYTES:
                raise ProtocolError(
                    f"{self.label}: the peer sent more than its window allows without an "
                    f"acknowledgement ({boxes} boxes, {held_bytes} bytes unread)")
            self._held.append((box, size))
            self._held_bytes = held_bytes
            peak_boxes, peak_bytes = self.held_peak
            self.held_peak = (max(peak_boxes, boxes), max(peak_bytes, held_bytes))

    def _unhold(self) -> Box:
        """The oldest box held (holding the reader lock, with one held)."""
        with self._cond:
            box, size = self._held.popleft()
            self._held_bytes -= size
            carried_boxes, carried_bytes = self._carried
            if carried_boxes:
                self._carried = (carried_boxes - 1, max(0, carried_bytes - size))
        return box

    def _read_conn(self, conn: Wire, timeout: Optional[float]) -> Optional[Box]:
        """The next box from ``conn``, or ``None`` when the connection
        turned out lost (noted as such: the session waits for the next).

        :raises PeerTimeout: nothing within ``timeout``
        :raises ProtocolError: the peer broke the protocol
        """
        try:
            box = conn.read_box(timeout)
        except PeerTimeout:
            raise
        except ProtocolError as e:
            if not _cut_short(conn, e):
                raise
            self.connection_lost(conn, f"connection lost inside a box: {e}")
            return None
        except Disconnected as e:
            self.connection_lost(conn, f"connection lost: {e}")
            return None
        if box is None:
            self.connection_lost(conn, "connection closed")
        return box

    def send_box(self, box: BoxLike, *, lock_timeout: Optional[float] = None) -> None:
        self.send_bytes(encode_box(box), lock_timeout=lock_timeout)

    def _send_control(self, conn: Wire, data: bytes) -> None:
        try:
            conn.send_bytes(data, lock_timeout=5.0)
            self.last_sent = time.monotonic()
        except (Disconnected, WaitTimeout):
            pass

    def heartbeat(self) -> None:
        """Send a link check if connected (the slave's connection keeper)."""
        conn = self.conn
        if conn is not None:
            self._send_control(conn, _PING)

    # -- receiving -----------------------------------------------------------------

    def _take(self, box: Box, conn: Wire) -> Optional[Box]:
        """Handle a control box (``None``), or return a session box."""
        self.last_received = time.monotonic()
        if not _control(box):
            return box
        if b"ack" in box:
            try:
                count = int(box[b"ack"])
            except ValueError:
                raise ProtocolError(f"{self.label}: bad ack {box[b'ack'][:20]!r}") from None
            with self._cond:
                if count > self.sent:
                    raise ProtocolError(f"{self.label}: ack of boxes never sent")
                self._ack_to(count)
        elif box.get(b"hb") == b"ping":
            self._send_control(conn, _PONG)
        elif b"bye" in box:  # the peer ends the session: no resume, every waiter is told at once
            self.peer_ended = True
            self.fail(SessionFailed(f"{self.label}: the peer ended the session (it is stopping)"))
        return None

    def _deliver(self, box: Box, conn: Optional[Wire]) -> Box:
        """Hand a session box to the caller; acknowledge when due.

        Acknowledgements count what was *delivered*, not what was read
        ahead (:meth:`_pump`): the peer's window then bounds what is held;
        and never past the commit point (:meth:`commit`)."""
        with self._cond:
            self.delivered += 1
            ack = self._acks.delivered(self.delivered, box_size(box))
            conn = self.conn
        if ack is not None and conn is not None:
            self._send_control(conn, ack)
        return box

    def commit(self, count: Optional[int]) -> None:
        """Acknowledge no more than ``count`` of the peer's boxes from now
        on, and that many now (``None``: back to acknowledging what was
        delivered): ack-after-commit, :mod:`remsh.sessionacks`."""
        with self._cond:
            ack = self._acks.commit(count, self.delivered)
            conn = self.conn
        if ack is not None and conn is not None:
            self._send_control(conn, ack)

    def _count(self, box: Box, conn: Wire) -> Box:
        """A session box read from the connection and handed over at once."""
        with self._cond:
            self.received += 1
        return self._deliver(box, conn)

    def read_box(self, timeout: Optional[float] = None) -> Optional[Box]:
        """The next session box; ``None`` when the peer ended the session.

        While the connection is away, waits for the next one (the session's
        own time limit applies, ``timeout`` too).

        :raises PeerTimeout: nothing within ``timeout``
        :raises Disconnected: the session failed
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._held:
                with self._reader:
                    if self._held:
                        return self._deliver(self._unhold(), self.conn)
            if self.peer_ended:
                return None
            with self._cond:
                conn = self._wait_connected(deadline)
            with self._reader:
                if self._held:
                    continue
                if conn is not self.conn:
                    continue
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                box = self._read_conn(conn, left)
                if box is not None and self._take(box, conn) is not None:
                    return self._count(box, conn)

    def poll_box(self) -> Optional[Box]:
        """A session box already buffered, or ``None`` (no I/O)."""
        with self._reader:
            conn = self.conn
            if self._held:
                return self._deliver(self._unhold(), conn)
            while conn is not None:
                box = conn.poll_box()
                if box is None:
                    break
                if self._take(box, conn) is not None:
                    return self._count(box, conn)
        return None

    def has_buffered_box(self) -> bool:
        conn = self.conn
        return bool(self._held) or (conn is not None and conn.has_buffered_box())

    def feed_available(self) -> None:
        """As ``Wire.feed_available``; a broken connection is noted as lost
        (not raised)."""
        conn = self.conn
        if conn is None:
            return
        try:
            conn.feed_available()
        except ProtocolError as e:
            if not _cut_short(conn, e):
                raise
            self.connection_lost(conn, f"connection lost inside a box: {e}")
            return
        except Disconnected as e:
            self.connection_lost(conn, f"connection lost: {e}")
            return
        if conn.at_eof:
            self.connection_lost(conn, "connection closed")

    @property
    def at_eof(self) -> bool:
        """True once the session has ended (never while it may resume)."""
        return self.peer_ended or self.failed is not None

    def idle_input(self, data: bytes) -> bool:
        """Bytes that arrived while no operation runs (the master's idle
        monitor): control boxes are handled; False if a session box came
        (nobody asked for one) or link checks came faster than any slave
        sends them (one thread answers every idle slave: a slave that
        floods it, and does not read the answers, must not stall it)."""
        conn = self.conn
        if conn is None:
            return True
        now = time.monotonic()
        if now - self._idle_window >= 1.0:
            self._idle_window, self._idle_pings = now, 0
        with self._reader:
            for box in conn.decode(data):
                if box.get(b"hb") == b"ping":
                    self._idle_pings += 1
                    if self._idle_pings > MAX_IDLE_PINGS:
                        log.warning("%s: link checks faster than %d a second while idle", self.label,
                                    MAX_IDLE_PINGS)
                        return False
                if self._take(box, conn) is not None:
                    return False
        return not self.peer_ended
