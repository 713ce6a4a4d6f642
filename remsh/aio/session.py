"""Resumable sessions for the asyncio master: :class:`SessionConnection`.

The asyncio counterpart of :class:`remsh.session.SessionWire`: a
:class:`~remsh.aio.connection.Channel` whose connection may be replaced,
driving the same :class:`~remsh.protocol.session.SessionState` from the
event loop.  Every box a connection decodes goes straight to the state (a
connection *sink*): acknowledgements free room as they come, link checks
are answered at once, session boxes wait in the state for the reader.  The
state's deadlines (the resume time limit, the acknowledgement time limit)
are one ``loop.call_at`` timer at a time.

When a connection goes, the session waits for the slave to redial: reads
wait (the caller's time limit is for a connected peer; the session's
``resume_timeout`` bounds the wait away), sends are kept (at most
:data:`SPOOL_LIMIT` bytes, then they wait).  The listener carries the
session onto the new connection (:meth:`SessionConnection.begin_resume`
in the handshake, :meth:`SessionConnection.attach` after it), which sends
again what the slave lacks.  Not back in time, the session fails with
:class:`~remsh.protocol.session.SessionFailed` (a
:class:`~remsh.errors.Disconnected`): an operation in progress raises it,
an idle slave is dropped.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, List, Optional, Union

from remsh.aio.connection import Connection
from remsh.errors import Disconnected, PeerTimeout, ProtocolError, RemshError
from remsh.protocol.session import Phase, SessionFailed, SessionState
from remsh.protocol.sessionlimits import MAX_IDLE_PINGS, PIECE_BOXES, PIECE_BYTES, WINDOW_BYTES
from remsh.wire import Box, count_boxes, skip_boxes, split_boxes

log = logging.getLogger(__name__)

__all__ = ["SessionConnection", "SPOOL_LIMIT"]

#: What the master keeps of its sends while the slave is away, past which
#: a send waits for it (the slave keeps its output; the master only what
#: it sends: a command's stdin, a file's data).
SPOOL_LIMIT = WINDOW_BYTES


class SessionConnection:
    """Session boxes over connections that may be replaced, for one event loop.

    One task reads at a time; several may send (each write is whole, in
    the order the boxes were counted).  ``label`` names the slave.
    """

    resumable = True

    def __init__(self, conn: Connection, session_id: str, *, resume_timeout: float, label: str,
                 spool_limit: int = SPOOL_LIMIT) -> None:
        self._loop = asyncio.get_running_loop()
        self.session_id = session_id
        self.label = label
        self.state = SessionState(resume_timeout=resume_timeout, label=label, spool_limit=spool_limit,
                                  now=self._loop.time())
        self.conn: Optional[Connection] = None
        self.busy = False
        self.on_idle_event: Optional[Callable[[RemshError], None]] = None
        self.closed = False
        self._waiters: List["asyncio.Future[None]"] = []
        self._timer: Optional[asyncio.TimerHandle] = None
        self._ping_window = 0.0
        self._pings = 0
        self._last_peer = conn.peer
        self._use(conn)

    # -- state -----------------------------------------------------------------

    @property
    def peer(self) -> str:
        return self.conn.peer if self.conn is not None else self._last_peer

    @property
    def attached(self) -> bool:
        """True while a connection carries the session."""
        return self.conn is not None and self.state.failed is None

    @property
    def failed(self) -> Optional[RemshError]:
        return self.state.failed

    def _use(self, conn: Connection) -> None:
        self.conn = conn
        self._last_peer = conn.peer
        conn.set_sink(self._on_boxes)

    def _wake(self) -> None:
        """Every waiter looks again (a box, an acknowledgement, a change)."""
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def _wait(self, timeout: Optional[float], what: str) -> None:
        """Until the next change, at most ``timeout`` s (:class:`PeerTimeout`)."""
        fut: "asyncio.Future[None]" = self._loop.create_future()
        self._waiters.append(fut)
        if timeout is None:
            await fut
            return
        handle = self._loop.call_later(timeout, _expire, fut,
                                       lambda: PeerTimeout(f"{self.label}: no {what} for {timeout:g} s"))
        try:
            await fut
        finally:
            handle.cancel()

    def _rearm(self) -> None:
        """One timer, at the state's next deadline."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = self.state.next_deadline()
        if when is not None:
            self._timer = self._loop.call_at(when + 0.01, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        state = self.state
        conn = self.conn
        why = state.tick(self._loop.time())
        if why is not None and conn is not None:
            self._detached(conn, why)
        elif state.failed is not None:
            self._failed()
        else:
            self._rearm()

    # -- the connection's events ------------------------------------------------

    def _on_boxes(self, conn: Connection, boxes: List[Box], ended: Optional[RemshError]) -> None:
        """The connection's sink: boxes decoded, or its end."""
        if conn is not self.conn:
            return  # a connection the session has left: the slave sends it all again
        state = self.state
        if boxes:
            now = self._loop.time()
            try:
                for box in boxes:
                    got = state.receive(box, now)
                    if got is not None:
                        state.hold(got)
                    elif b"hb" in box:
                        self._count_ping(now)
            except RemshError as e:
                if state.failed is None:
                    self._fail(e)
                return
            if state.failed is not None:  # the slave said goodbye
                self._failed()
                return
            self._flush()
            if state.resending:
                self._resend()
            self._wake()
            if not self.busy and state.held:
                self._idle_event(ProtocolError(f"{self.label}: sent a box nobody asked for"))
        if ended is not None and conn is self.conn:
            if isinstance(ended, ProtocolError):
                self._fail(ended)  # bad input, not a cut: the slave broke the protocol
            else:
                self._lose(conn, str(ended))

    def _count_ping(self, now: float) -> None:
        """Link checks past MAX_IDLE_PINGS a second: a slave flooding the
        loop with answers it may never read."""
        if now - self._ping_window >= 1.0:
            self._ping_window, self._pings = now, 0
        self._pings += 1
        if self._pings > MAX_IDLE_PINGS:
            raise ProtocolError(f"{self.label}: link checks faster than {MAX_IDLE_PINGS} a second")

    def _flush(self) -> None:
        """Write what the state has due (acknowledgements, answers)."""
        state = self.state
        conn = self.conn
        if not state.to_write or conn is None:
            return
        data = state.pop_writes()
        try:
            conn.write(data)
            state.last_sent = self._loop.time()
        except Disconnected as e:
            self._lose(conn, str(e))

    def _lose(self, conn: Connection, why: str) -> None:
        """``conn`` broke: keep the session and wait for the next connection."""
        if conn is not self.conn or not self.state.lose(self._loop.time()):
            return
        self._detached(conn, why)

    def _detached(self, conn: Connection, why: str) -> None:
        """The state has left ``conn``: close it, arm the resume time limit."""
        self.conn = None
        conn.abort()
        log.info("%s: %s; waiting up to %g s for it to come back", self.label, why, self.state.resume_timeout)
        self._rearm()
        self._wake()

    def _fail(self, error: RemshError) -> None:
        if self.state.fail(error):
            self._failed()

    def _failed(self) -> None:
        """The state has failed: close, wake every waiter, tell the owner if idle."""
        error = self.state.failed
        assert error is not None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
        log.info("%s: session over: %s", self.label, error)
        self._wake()
        self._idle_event(error)

    def _idle_event(self, error: RemshError) -> None:
        hook = self.on_idle_event
        if not self.busy and hook is not None and not self.closed:
            hook(error)

    # -- resuming (the listener) --------------------------------------------------

    def begin_resume(self) -> int:
        """The slave redialed naming this session (in its handshake): off the
        old connection, and how many of its boxes were received, for the
        handshake's answer.

        :raises RemshError: the session has failed
        """
        conn = self.conn
        received = self.state.begin_resume(self._loop.time())
        if conn is not None:
            self._detached(conn, "the slave redialed")
        return received

    @property
    def resuming(self) -> bool:
        """Between the slave's redial and the end of what is sent again."""
        state = self.state
        return state.resume_asked or (state.resending and self.conn is not None)

    def attach(self, conn: Connection, peer_received: int) -> None:
        """Carry the session on ``conn``; send again what the slave lacks
        (it has ``peer_received`` of our boxes).

        :raises ProtocolError: the slave claims boxes never sent
        :raises RemshError: the session has failed
        """
        try:
            self.state.attach(peer_received, self._loop.time())
        except RemshError:
            conn.close()
            raise
        self._use(conn)
        self._rearm()
        self._resend()
        self._wake()
        log.info("%s: session resumed from %s", self.label, conn.peer)

    def _resend(self) -> None:
        """Write the kept boxes the connection lacks, as far as the window goes."""
        state = self.state
        while self.conn is not None:
            resend = state.next_write(self._loop.time())
            if resend is None:
                break
            data = resend.entry.data
            assert isinstance(data, bytes)
            if resend.skip:
                data = data[skip_boxes(data, resend.skip):]
            try:
                self.conn.write(data)
            except Disconnected as e:
                self._lose(self.conn, str(e))
                return
        if state.blocked_since is not None:
            self._rearm()

    # -- the Channel ----------------------------------------------------------------

    def write(self, data: Union[bytes, bytearray, memoryview]) -> None:
        """Send session boxes without waiting for room (an interrupt).

        :raises Disconnected: the session has failed
        """
        chunk = bytes(data)
        if self.state.send(chunk, count_boxes(chunk)):
            self._write_now(chunk)
        elif self.state.resending:
            self._resend()

    def _write_now(self, chunk: bytes) -> Optional[Connection]:
        conn = self.conn
        if conn is None:
            return None
        try:
            conn.write(chunk)
        except Disconnected as e:
            self._lose(conn, str(e))
            return None
        self.state.last_sent = self._loop.time()
        return conn

    async def send(self, data: Union[bytes, bytearray, memoryview], timeout: Optional[float] = None) -> None:
        """Send session boxes: kept until acknowledged, written now if
        connected.  Waits while too much is unacknowledged (connected: for
        the slave's acknowledgement; away: for the connection).  A
        connection that takes nothing for ``timeout`` seconds is taken for
        lost (the session waits for the next).

        :raises Disconnected: the session has failed
        """
        chunk = data if type(data) is bytes else bytes(data)
        n = count_boxes(chunk)
        if n > PIECE_BOXES or len(chunk) > PIECE_BYTES:
            for piece, k in split_boxes(chunk, PIECE_BOXES, PIECE_BYTES):
                await self._send_piece(piece, k, timeout)
        elif chunk:
            await self._send_piece(chunk, n, timeout)

    async def _send_piece(self, chunk: bytes, n: int, timeout: Optional[float]) -> None:
        state = self.state
        while True:
            write = state.offer(chunk, n, self._loop.time())
            if write is not None:
                break
            if state.blocked_since is not None and self._timer is None:
                self._rearm()
            await self._wait(None, "room")
        if not write:
            if state.resending:
                self._resend()
            return
        conn = self._write_now(chunk)
        if conn is None:
            return
        try:
            await conn.drain(timeout)
        except PeerTimeout as e:
            self._lose(conn, f"the slave took nothing for {timeout:g} s: {e}")
        except Disconnected as e:
            self._lose(conn, str(e))

    def received(self) -> Optional[Box]:
        """A box already received, or ``None`` (without waiting)."""
        box = self.state.next_held()
        if box is not None and self.state.to_write:
            self._flush()
        return box

    async def read_box(self, timeout: Optional[float]) -> Optional[Box]:
        """The next session box; ``None`` when the slave ended the session.

        ``timeout`` bounds the wait while connected; away, the wait lasts
        until the slave is back (then ``timeout`` starts again) or the
        session fails.

        :raises PeerTimeout: nothing within ``timeout`` while connected
        :raises Disconnected: the session failed
        """
        state = self.state
        while True:
            box = state.next_held()
            if box is not None:
                if state.to_write:
                    self._flush()
                return box
            if state.peer_ended:
                return None
            if state.failed is not None:
                raise state.failed
            await self._wait(timeout if state.phase is Phase.ATTACHED else None, "answer")

    def idle(self) -> None:
        """The operation reading is over: events go to :attr:`on_idle_event` again."""
        self.busy = False
        state = self.state
        if state.failed is not None:
            self._idle_event(state.failed)
        elif state.held:
            self._idle_event(ProtocolError(f"{self.label}: sent a box nobody asked for"))

    def close(self) -> None:
        """End the session on purpose (the slave is told; idempotent)."""
        if self.closed:
            return
        self.closed = True
        conn = self.conn
        if self.state.end():
            data = self.state.pop_writes()
            if conn is not None and data:
                try:
                    conn.write(data)
                except Disconnected:
                    pass
            self._failed()

    def abort(self) -> None:
        """End the session and reset the connection at once."""
        conn = self.conn
        self.closed = True
        self._fail(SessionFailed(f"{self.label}: session ended"))
        if conn is not None:
            conn.abort()


def _expire(fut: "asyncio.Future[None]", error: Callable[[], BaseException]) -> None:
    if not fut.done():
        fut.set_exception(error())
