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

The bookkeeping (counts, kept and held boxes, acknowledgements, limits) is
:class:`remsh.protocol.session.SessionState`, which does no I/O; this
module drives it with threads (a reader, senders, a timer for the resume
time limit), as :mod:`remsh.aio.session` drives it from an event loop.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Deque, Optional, Tuple, Union

from remsh.deadlines import Cancellable, Deadlines, call_later
from remsh.errors import Disconnected, PeerTimeout, ProtocolError, RemshError, WaitTimeout
from remsh.protocol.session import BYE, PING, Kept, Lent, Phase, SessionFailed, SessionState, is_control
from remsh.protocol.sessionlimits import (ACK_TIMEOUT, DEFAULT_SPOOL_LIMIT, HELD_BOXES, HELD_BYTES,  # noqa: F401
                                          MAX_IDLE_PINGS, PIECE_BOXES, PIECE_BYTES, SPOOL_MEMORY, WINDOW_BOXES,
                                          WINDOW_BYTES)
from remsh.spool import SpoolFile, WakePipe
from remsh.wire import Box, BoxLike, Wire, count_boxes, encode_box, skip_boxes, split_boxes

if TYPE_CHECKING:
    from remsh.transports.base import StreamLike

log = logging.getLogger(__name__)

__all__ = ["SessionWire", "SessionFailed", "new_session_id"]
# (the limits imported above stay readable here, as before: remsh.session.WINDOW_BYTES)

Data = Union[bytes, bytearray, memoryview]

_now = time.monotonic


def new_session_id() -> str:
    """A fresh session id: 128 random bits, as 32 hex digits."""
    return os.urandom(16).hex()


def _cut_short(conn: Wire, error: ProtocolError) -> bool:
    """Whether ``error`` only says the stream ended inside a box (a lost connection)."""
    return bool(getattr(conn, "_eof", False))


def _control(box: Box) -> bool:
    return is_control(box)


class SessionWire:
    """A :class:`~remsh.wire.Wire` look-alike whose connection may be replaced.

    Sending is thread-safe; reading is for one thread at a time, as with
    ``Wire``.  ``resume_timeout`` bounds how long the session waits for a
    lost connection to come back (counted from the loss, on ``deadlines``
    when given: one thread for a listener's sessions); ``on_lost``/
    ``on_failed`` are called (from the thread that noticed) so the owner can
    follow the state.  ``counts``, ``(sent, received)``: a session taken
    back by a master started anew (:mod:`remsh.jobadopt`) goes on from
    these counts, with nothing kept to send again.

    The counts and every limit are the :class:`SessionState`'s
    (:attr:`state`), changed under one lock (``_mutex``, with the condition ``_cond`` on it); I/O happens
    outside it.  Senders are serialised by a send lock, so boxes go out in
    the order they were counted."""

    def __init__(self, conn: Wire, session_id: str, *, resume_timeout: float,
                 label: Optional[str] = None, spool_limit: int = DEFAULT_SPOOL_LIMIT,
                 spool_dir: Optional[str] = None, on_lost: Optional[Callable[[], Any]] = None,
                 on_failed: Optional[Callable[[RemshError], Any]] = None,
                 deadlines: Optional[Deadlines] = None, counts: Tuple[int, int] = (0, 0)) -> None:
        self.session_id = session_id
        self._deadlines = deadlines
        self.label = label or conn.label
        self.state = SessionState(resume_timeout=resume_timeout, label=self.label, spool_limit=spool_limit,
                                  counts=counts, now=_now())
        self.on_lost = on_lost
        self.on_failed = on_failed
        # one plain lock (its context manager is C code: the hot paths take
        # it once a box), and the condition senders and readers wait on
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._send_lock = threading.Lock()
        self._reader = threading.Lock()
        self.conn: Optional[Wire] = conn
        self._last_conn = conn
        self._idle_window = 0.0
        self._idle_pings = 0
        self.spool_dir = spool_dir
        self._spool: Optional[SpoolFile] = None
        self.closed = False
        self._timer: Optional[Cancellable] = None
        self._wakepipe = WakePipe()  # readable at every change (attach, failure)

    # -- state -------------------------------------------------------------------

    resume_timeout = property(lambda self: self.state.resume_timeout)
    spool_limit = property(lambda self: self.state.spool_limit)
    sent = property(lambda self: self.state.sent)
    peer_acked = property(lambda self: self.state.peer_acked)
    received = property(lambda self: self.state.received)
    #: session boxes handed to the caller (received may be ahead: held)
    delivered = property(lambda self: self.state.delivered)
    #: the most boxes and bytes ever held at once
    held_peak = property(lambda self: self.state.held_peak)
    generation = property(lambda self: self.state.generation)
    lost_at = property(lambda self: self.state.lost_at)
    #: failed because the connection did not come back in time
    expired = property(lambda self: self.state.expired)
    peer_ended = property(lambda self: self.state.peer_ended)
    last_sent = property(lambda self: self.state.last_sent)
    last_received = property(lambda self: self.state.last_received)

    @property
    def failed(self) -> Optional[RemshError]:
        """The error every call raises once the session has ended (else ``None``)."""
        return self.state.failed

    @property
    def _replay(self) -> Deque[Kept]:
        return self.state.kept

    @property
    def _held(self) -> Deque[Tuple[Box, int]]:
        return self.state.held

    @property
    def attached(self) -> bool:
        """True while a connection carries the session."""
        return self.conn is not None and self.state.failed is None

    @property
    def stream(self) -> StreamLike:
        """The current connection's stream (the last one while away)."""
        conn = self.conn or self._last_conn
        return conn.stream

    def wake_fd(self) -> int:
        """A descriptor that turns readable when the connection changes or
        the session fails (drain it with :meth:`clear_wake`)."""
        with self._mutex:
            return self._wakepipe.fd()

    def clear_wake(self) -> None:
        self._wakepipe.clear()

    def _detach(self) -> Optional[Wire]:
        """Off the current connection (under _mutex): the one it was on."""
        old = self.conn
        if old is not None:
            self._last_conn = old
        self.conn = None
        self._cond.notify_all()
        return old

    def connection_lost(self, conn: Optional[Wire] = None, why: str = "connection lost") -> None:
        """The connection ``conn`` (default: the current one) broke: keep
        the session and wait for the next one."""
        with self._mutex:
            self.state.resume_asked = False
            if self.conn is None or (conn is not None and conn is not self.conn) or self.state.failed:
                return
            self.state.lose(_now())
            old = self._detach()
        assert old is not None
        self._after_loss(old, why)

    def _after_loss(self, old: Wire, why: str) -> None:
        """What follows a loss, outside the lock: what the old connection
        still holds is read, it is closed, the resume time limit armed."""
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
        if self.state.failed is not None:
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
                while self.state.failed is None and conn.has_buffered_box():
                    box = conn.poll_box()
                    if box is not None and self._take(box, conn) is not None:
                        self._hold(box)
        except RemshError:
            pass  # what could not be read is sent again on a resume

    def _arm(self, seconds: float) -> None:
        self._timer = call_later(self._deadlines, seconds + 0.05, self._expire)

    def _expire(self) -> None:
        with self._mutex:
            self._timer = None
            state = self.state
            if self.conn is not None or state.phase is not Phase.AWAY:
                return
            deadline = state.next_deadline()
            now = _now()
            if deadline is not None and now < deadline:
                self._arm(deadline - now)
                return
            state.tick(now)
            error = state.failed
            if error is None:
                return
            done = self._failed_locked()
        self._after_failure(error, *done)

    def fail(self, error: RemshError) -> None:
        """End the session: every waiter and every later call raises ``error``."""
        with self._mutex:
            if not self.state.fail(error):
                return
            done = self._failed_locked()
        self._after_failure(error, *done)

    def _failed_locked(self) -> Tuple[Optional[Wire], Optional[Cancellable]]:
        """The state has just failed (under _mutex): off the connection, the
        spool dropped; the connection and timer to close outside the lock."""
        conn = self._detach()
        timer, self._timer = self._timer, None
        spool, self._spool = self._spool, None
        if spool is not None:
            spool.close()
        return conn, timer

    def _after_failure(self, error: RemshError, conn: Optional[Wire], timer: Optional[Cancellable]) -> None:
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
            with self._mutex:
                if self.state.failed is None:
                    return self.state.begin_resume(_now())
                return self.state.received

    @property
    def resuming(self) -> bool:
        """The peer has redialed and the session is being carried onto its
        new connection: the handshake, then what the peer missed sent again
        (``ls`` and the dashboard show it as ``resuming``)."""
        state = self.state
        return state.resume_asked or (state.resending and self.conn is not None)

    def attach(self, conn: Wire, peer_received: int) -> None:
        """Carry the session on ``conn`` from now on; re-send what the peer
        has not received (it received ``peer_received`` of our boxes).

        Senders are not held up meanwhile (one may be waiting for the
        connection with its boxes kept): what they add while the kept boxes
        go out is sent after them, in order.

        :raises ProtocolError: the peer claims boxes we never sent
        :raises SessionFailed: the session has already failed
        """
        state = self.state
        with self._mutex:
            try:
                state.attach(peer_received, _now())
            except RemshError:
                conn.close()
                raise
            old = self.conn
            if old is not None:
                self._last_conn = old
            self.conn = conn
            self._clear_spool_locked()
            timer, self._timer = self._timer, None
            self._cond.notify_all()
        if timer is not None:
            timer.cancel()
        if old is not None:
            old.close()
        resent = 0
        try:
            while True:
                with self._mutex:
                    if self.conn is not conn:
                        return  # lost again (or failed): the next attach re-sends
                    now = _now()
                    resend = state.next_write(now)
                    if resend is None:
                        if not state.resending:
                            self._cond.notify_all()
                            break
                        if state.blocked_since is not None and now - state.blocked_since >= ACK_TIMEOUT:
                            why = f"the peer acknowledged nothing for {ACK_TIMEOUT:g} s while we resumed"
                        else:
                            self._cond.wait(1.0)
                            continue
                    else:
                        why = ""
                        entry, skip = resend
                        data = self._data(entry.data)
                if why:
                    self.connection_lost(conn, why)
                    return
                if skip:
                    data = data[skip_boxes(data, skip):]
                conn.send_bytes(data)
                resent += entry.boxes - skip
                state.last_sent = _now()
        except Disconnected as e:
            self.connection_lost(conn, f"connection lost while resuming: {e}")
            return
        self._wakepipe.wake()
        log.info("%s: session resumed (%d boxes sent again)", self.label, resent)

    def end(self) -> None:
        """End the session on purpose: tell the peer (best effort) and fail
        every waiter with ``Disconnected``."""
        conn = self.conn
        if conn is not None:
            try:
                conn.send_bytes(BYE, lock_timeout=1.0)
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

    def wait_change(self, timeout: float) -> None:
        """Wait at most ``timeout`` s for a change (connection lost, failure,
        :meth:`wake`), unless it has no connection or has failed already."""
        with self._mutex:
            if self.conn is not None and self.state.failed is None:
                self._cond.wait(timeout)

    def wake(self) -> None:
        """End every :meth:`wait_change` now (its caller looks again)."""
        with self._mutex:
            self._cond.notify_all()

    def wait_attached(self, timeout: Optional[float] = None) -> None:
        """Wait while away: until a connection carries the session again.

        :raises Disconnected: the session failed (its resume time limit ran
            out, or it was ended)
        :raises PeerTimeout: still away after ``timeout`` seconds
        """
        with self._mutex:
            self._wait_connected(None if timeout is None else _now() + timeout)

    def _wait_connected(self, deadline: Optional[float]) -> Wire:
        """The current connection, waiting for one while away (under _mutex)."""
        while True:
            if self.state.failed is not None:
                raise self.state.failed
            if self.conn is not None:
                return self.conn
            left = None if deadline is None else deadline - _now()
            if left is not None and left <= 0:
                raise PeerTimeout(f"{self.label}: no connection within the time limit")
            self._cond.wait(left)

    # -- sending -------------------------------------------------------------------

    def send_bytes(self, data: Data, *, lock_timeout: Optional[float] = None,
                   boxes: Optional[int] = None) -> None:
        """Send encoded session boxes: kept until acknowledged, sent now if
        connected.  Waits while too much is unacknowledged (connected: for
        the peer's acknowledgement; away: for the connection, past
        ``spool_limit``).  ``boxes`` is how many boxes ``data`` holds, from
        a caller that knows it (they are counted otherwise).

        :raises WaitTimeout: ``lock_timeout`` passed waiting for another sender
        :raises Disconnected: the session has failed
        """
        if lock_timeout is None:
            self._send_lock.acquire()
        elif not self._send_lock.acquire(timeout=lock_timeout):
            raise WaitTimeout(f"{self.label}: connection busy sending for {lock_timeout:g} s")
        try:
            self._send_locked(data, boxes)
        finally:
            self._send_lock.release()

    @property
    def lends(self) -> bool:
        """Whether :meth:`send_lent` saves a copy: the connection's stream
        sends from the caller's buffer (a socket; an SSH channel copies what
        it is given anyway, and a lent buffer is colder than a fresh copy)."""
        conn = self.conn
        return conn is not None and bool(getattr(conn.stream, "sends_views", False))

    def send_lent(self, data: memoryview, boxes: int, give_back: Callable[[], None]) -> None:
        """Send encoded session boxes (at most a piece: :data:`PIECE_BOXES`,
        :data:`PIECE_BYTES`) from a buffer the caller lends instead of
        having it copied (as :meth:`send_bytes`): ``give_back`` is called
        once the session no longer needs it, and until then the caller
        leaves the buffer alone.  Bulk data (file blocks) saves a copy so.
        ``data`` under half its buffer is copied and given back at once: the
        limits count ``data``, a kept buffer pins all of it (kept memory
        stays within twice what is counted)."""
        base = data.obj
        chunk: "bytes | Lent"
        if base is not None and 2 * data.nbytes < memoryview(base).nbytes:
            chunk = bytes(data)
            give_back()
        else:
            chunk = Lent(data, give_back)
        with self._send_lock:
            self._send_piece(chunk, boxes)

    def send_bytes_unless(self, data: Data, stop: threading.Event) -> bool:
        """Send unless ``stop`` is set (checked under the send lock)."""
        with self._send_lock:
            if stop.is_set():
                return False
            self._send_locked(data)
        return True

    def _send_locked(self, data: Data, boxes: Optional[int] = None) -> None:
        chunk = data if type(data) is bytes else bytes(data)
        n = count_boxes(chunk) if boxes is None else boxes
        if n > PIECE_BOXES or len(chunk) > PIECE_BYTES:  # each piece waits for room in the window
            for piece, k in split_boxes(chunk, PIECE_BOXES, PIECE_BYTES):
                self._send_piece(piece, k)
        elif chunk:
            self._send_piece(chunk, n)

    def _send_piece(self, chunk: "bytes | Lent", n: int) -> None:
        """Keep and send one piece, once it has room (holding the send lock):
        one trip through the lock when there is room, as there mostly is."""
        state = self.state
        while True:
            now = _now()
            with self._mutex:
                conn = self.conn
                if conn is not None:
                    write = state.offer(chunk, n, now)
                    if write is not None:
                        if not write:
                            conn = None  # a resume is sending the kept boxes: it sends this one too
                        break
                elif state.has_room(len(chunk), n, now):
                    state.send(chunk, n, self._keep(chunk))
                    break
                blocked = state.blocked_since
            self._wait_room(conn, blocked, now)
        if conn is not None:
            try:
                conn.send_bytes(chunk.data if isinstance(chunk, Lent) else chunk)
                state.last_sent = now
            except Disconnected as e:
                self.connection_lost(conn, f"connection lost while sending: {e}")

    def _wait_room(self, conn: Optional[Wire], blocked: Optional[float], now: float) -> None:
        """No room to keep more (holding the send lock): wait for it.

        Away, for the connection to come back.  Connected, for the peer's
        acknowledgement (read here if no other thread reads); a peer that
        acknowledges nothing for :data:`ACK_TIMEOUT` while the window is
        full is taken as lost (as a stalled send is): the wait goes on as
        while away, bounded by ``resume_timeout``."""
        if conn is None:
            with self._mutex:
                if self.conn is None and self.state.failed is None:
                    self._cond.wait(1.0)
            return
        if blocked is not None and now - blocked >= ACK_TIMEOUT:
            self.connection_lost(conn, f"the peer acknowledged nothing for {ACK_TIMEOUT:g} s")
            return
        # connected: the acknowledgement is on its way; read it ourselves
        # if no other thread reads, else let the reader handle it
        if self._reader.acquire(blocking=False):
            try:
                self._pump(1.0)
            finally:
                self._reader.release()
        else:
            with self._mutex:
                self._cond.wait(0.2)

    def _keep(self, chunk: "bytes | Lent") -> Optional[Tuple[int, int]]:
        """Where a chunk kept while away goes (under _mutex): ``None`` for
        memory, or past SPOOL_MEMORY (with a spool directory) its place in
        the spool file."""
        if self.spool_dir is not None and self.state.memory_bytes >= SPOOL_MEMORY:
            try:
                if self._spool is None:
                    self._spool = SpoolFile(self.spool_dir)
                return self._spool.append(bytes(chunk.data) if isinstance(chunk, Lent) else chunk)
            except OSError as e:
                log.warning("%s: cannot spool to %s (%s); keeping output in memory", self.label,
                            self.spool_dir, e)
                self.spool_dir = None
        return None

    def _data(self, kept: object) -> Data:
        """The bytes of a kept entry: itself, or read from the spool file
        (under _mutex)."""
        if isinstance(kept, bytes):
            return kept
        if type(kept) is Lent:
            return kept.data
        assert self._spool is not None and isinstance(kept, tuple)
        return self._spool.read(kept)

    def _clear_spool_locked(self) -> None:
        if self._spool is not None and not self.state.spooled:
            self._spool.clear()

    def _pump(self, timeout: float) -> None:
        """Read one box while waiting for room, keeping a session box for
        the next ``read_box`` (holding the reader lock)."""
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
        """Keep a session box read ahead (holding the reader lock; already counted).

        :raises ProtocolError: past HELD_BOXES / HELD_BYTES (beyond the window)
        """
        with self._mutex:
            self.state.hold(box)

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
        """Send one session box (as :meth:`send_bytes`; one box needs no counting)."""
        data = encode_box(box)
        if lock_timeout is None:
            self._send_lock.acquire()
        elif not self._send_lock.acquire(timeout=lock_timeout):
            raise WaitTimeout(f"{self.label}: connection busy sending for {lock_timeout:g} s")
        try:
            self._send_piece(data, 1)
        finally:
            self._send_lock.release()

    def _send_control(self, conn: Optional[Wire], data: bytes) -> None:
        if conn is None:
            return
        try:
            conn.send_bytes(data, lock_timeout=5.0)
            self.state.last_sent = _now()
        except (Disconnected, WaitTimeout):
            pass

    def heartbeat(self) -> None:
        """Send a link check if connected (the slave's connection keeper)."""
        self._send_control(self.conn, PING)

    # -- receiving -----------------------------------------------------------------

    def _take(self, box: Box, conn: Wire, deliver: bool = False) -> Optional[Box]:
        """Handle a control box (``None``), or return a session box, counted
        as received (and, ``deliver``, as handed to the caller)."""
        state = self.state
        now = _now()
        failure = None
        with self._mutex:
            was_failed = state.failed is not None
            got = state.take(box, now) if deliver else state.receive(box, now)
            if got is None:
                if b"ack" in box:
                    self._clear_spool_locked()
                    self._cond.notify_all()
                elif state.failed is not None and not was_failed:  # a goodbye: no resume
                    failure = (state.failed, self._failed_locked())
            writes = state.pop_writes() if state.to_write else None
        if writes is not None:
            self._send_control(conn, writes)
        if failure is not None:
            self._after_failure(failure[0], *failure[1])
        return got

    def _unhold(self) -> Box:
        """The oldest box held, delivered (holding the reader lock, with one held)."""
        with self._mutex:
            box = self.state.next_held()
            writes = self.state.pop_writes() if self.state.to_write else None
            conn = self.conn
        assert box is not None
        if writes is not None:
            self._send_control(conn, writes)
        return box

    def commit(self, count: Optional[int]) -> None:
        """Acknowledge no more than ``count`` of the peer's boxes from now
        on, and that many now (``None``: back to acknowledging what was
        delivered): ack-after-commit, :mod:`remsh.protocol.sessionacks`."""
        with self._mutex:
            self.state.commit(count)
            writes = self.state.pop_writes() if self.state.to_write else None
            conn = self.conn
        if writes is not None:
            self._send_control(conn, writes)

    def read_box(self, timeout: Optional[float] = None) -> Optional[Box]:
        """The next session box; ``None`` when the peer ended the session.

        While the connection is away, waits for the next one (the session's
        own time limit applies, ``timeout`` too).

        :raises PeerTimeout: nothing within ``timeout``
        :raises Disconnected: the session failed
        """
        state = self.state
        deadline = None if timeout is None else _now() + timeout
        while True:
            if state.held:
                with self._reader:
                    if state.held:
                        return self._unhold()
            if state.peer_ended:
                return None
            conn = self.conn
            if conn is None or state.failed is not None:
                with self._mutex:
                    conn = self._wait_connected(deadline)
            with self._reader:
                if state.held or conn is not self.conn:
                    continue
                left = None if deadline is None else max(0.0, deadline - _now())
                box = self._read_conn(conn, left)
                if box is not None and self._take(box, conn, True) is not None:
                    return box

    def poll_box(self) -> Optional[Box]:
        """A session box already buffered, or ``None`` (no I/O)."""
        with self._reader:
            if self.state.held:
                return self._unhold()
            conn = self.conn
            while conn is not None:
                box = conn.poll_box()
                if box is None:
                    break
                if self._take(box, conn, True) is not None:
                    return box
        return None

    def has_buffered_box(self) -> bool:
        conn = self.conn
        return bool(self.state.held) or (conn is not None and conn.has_buffered_box())

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
        return self.state.peer_ended or self.state.failed is not None

    def idle_input(self, data: bytes) -> bool:
        """Bytes that arrived while no operation runs (the master's idle
        monitor): control boxes are handled; False if a session box came
        (nobody asked for one) or link checks came faster than any slave
        sends them (one thread answers every idle slave: a slave that
        floods it, and does not read the answers, must not stall it)."""
        conn = self.conn
        if conn is None:
            return True
        now = _now()
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
        return not self.state.peer_ended
