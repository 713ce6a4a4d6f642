"""Boxes over an asyncio transport, and the handshake driven over them.

:class:`Connection` is the asyncio counterpart of :class:`remsh.wire.Wire`:
the same codec (:class:`~remsh.wire.BoxDecoder`, :func:`~remsh.wire.encode_box`)
as an :class:`asyncio.Protocol` (decoded in ``data_received``, so a box
costs no stream-reader copy, and a wait costs one future and one timer).
:func:`master_handshake` drives :class:`remsh.handshake.MasterHandshake`,
the machine the threaded listeners use, over one.

Every wait is bounded by the caller's timeout: a read past it raises
:class:`~remsh.errors.PeerTimeout`, and so does a write the peer does not
take within it (:meth:`Connection.send`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl as ssl_module
import threading
from typing import Callable, Deque, List, Mapping, Optional, Protocol, Union

from remsh.errors import Disconnected, PeerTimeout, ProtocolError, RemshError, UsageError
from remsh.handshake import GREETING_LENGTH, MasterHandshake, NameRule, Refused, Registered
from remsh.wire import DEFAULT_MAX_BOX_BYTES, DEFAULT_MAX_KEYS, Box, BoxDecoder, Wire, WireError, encode_box

log = logging.getLogger(__name__)

__all__ = ["Channel", "Connection", "master_handshake", "WRITE_BUFFER_HIGH"]

#: The transport's write buffer above which :meth:`Connection.send` waits
#: for the peer to take data (big enough for one bulk block of data boxes).
WRITE_BUFFER_HIGH = 2 << 20
#: Received boxes waiting to be read past which the connection stops
#: reading from the peer (until half of them are read).
MAX_QUEUED_BOXES = 64


_scratch = threading.local()

#: ``sink(conn, boxes, ended)``: what a connection with a sink calls with
#: every batch of boxes it decodes, and once with ``ended`` when it ends
#: (:class:`~remsh.errors.Disconnected`) or its input turns bad
#: (:class:`~remsh.errors.WireError`).
Sink = Callable[["Connection", List[Box], Optional[RemshError]], None]


class Channel(Protocol):
    """What an :class:`~remsh.aio.slave.AsyncSlave` talks through: a
    :class:`Connection`, or a session over connections that may be replaced
    (:class:`remsh.aio.session.SessionConnection`)."""

    label: str
    busy: bool
    on_idle_event: Optional[Callable[[RemshError], None]]
    #: whether the channel survives a dropped connection
    resumable: bool

    @property
    def peer(self) -> str: ...

    def write(self, data: Union[bytes, bytearray, memoryview]) -> None: ...

    async def send(self, data: Union[bytes, bytearray, memoryview], timeout: Optional[float] = None) -> None: ...

    def received(self) -> Optional[Box]: ...

    async def read_box(self, timeout: Optional[float]) -> Optional[Box]: ...

    def idle(self) -> None: ...

    def close(self) -> None: ...


def _receive_buffer() -> memoryview:
    """This thread's receive buffer (one per event loop thread): what is
    received into it is decoded -- the decoder copies what it keeps --
    before the loop receives again, so every connection shares it."""
    buf: Optional[memoryview] = getattr(_scratch, "buf", None)
    if buf is None:
        buf = _scratch.buf = memoryview(bytearray(Wire.RECV_SIZE))
    return buf


class Connection(asyncio.BufferedProtocol):
    """Boxes over one asyncio transport (an :class:`asyncio.BufferedProtocol`:
    received into one buffer per loop thread, no allocation per receive), for
    one task at a time reading.

    Writes are whole (a box is never interleaved with another), so several
    tasks may send.  Received boxes wait in a queue of at most
    :data:`MAX_QUEUED_BOXES`; past it the connection stops reading from the
    peer until the queue drains (flow control both ways, bounded memory).
    ``label`` names the peer in error messages.
    """

    RECV_SIZE = Wire.RECV_SIZE
    resumable = False

    def __init__(self, *, label: str = "peer", max_keys: int = DEFAULT_MAX_KEYS,
                 max_box_bytes: int = DEFAULT_MAX_BOX_BYTES,
                 on_made: Optional[Callable[["Connection"], None]] = None) -> None:
        self.label = label
        self.transport: Optional[asyncio.Transport] = None
        self._decoder = BoxDecoder(max_keys=max_keys, max_box_bytes=max_box_bytes)
        self._ready: Deque[Box] = collections.deque()
        self._raw: Optional[bytearray] = bytearray()  # bytes before the first box (the greeting)
        self._on_made = on_made
        self._waiter: Optional["asyncio.Future[None]"] = None
        self._drain_waiter: Optional["asyncio.Future[None]"] = None
        self._write_paused = False
        self._read_paused = False
        self._lost: Optional[BaseException] = None  # why the transport went (None: not gone, or clean)
        self._gone = False
        self._bad_input: Optional[WireError] = None
        self.at_eof = False
        self.closed = False
        #: an operation is reading this connection (set by its owner); while
        #: it is not, any event -- a box nobody asked for, the end of the
        #: stream -- goes to :attr:`on_idle_event`
        self.busy = False
        #: ``on_idle_event(error)``: the idle connection ended
        #: (:class:`~remsh.errors.Disconnected`) or the peer sent a box
        #: nobody asked for (:class:`~remsh.errors.ProtocolError`)
        self.on_idle_event: Optional[Callable[[RemshError], None]] = None
        #: where boxes go instead of the queue (see :meth:`set_sink`)
        self._sink: Optional[Sink] = None

    @classmethod
    async def open(cls, host: str, port: int, *, ssl: Optional["ssl_module.SSLContext"] = None,
                   server_hostname: Optional[str] = None, label: Optional[str] = None) -> "Connection":
        """Dial ``host:port`` (TLS with ``ssl``) and return the connection."""
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: cls(label=label or f"{host}:{port}"), host, port, ssl=ssl,
                                               server_hostname=server_hostname)
        return conn

    # -- asyncio.Protocol --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        try:
            transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        except (AttributeError, NotImplementedError):  # pragma: no cover - every stream transport has it
            pass
        if self._on_made is not None:
            self._on_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return _receive_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(_receive_buffer()[:nbytes])

    def data_received(self, data: Union[bytes, memoryview]) -> None:
        sink = self._sink
        if sink is not None:
            if self._bad_input is None:
                try:
                    boxes = self._decoder.feed(data)
                except WireError as e:
                    self._bad_input = e
                    sink(self, [], e)
                    return
                if boxes:
                    sink(self, boxes, None)
            return
        if self._raw is not None:
            self._raw += data
        elif self._bad_input is None:
            try:
                self._ready.extend(self._decoder.feed(data))
            except WireError as e:
                self._bad_input = e
        if len(self._ready) >= MAX_QUEUED_BOXES and not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()
        self._wake()
        self._check_idle()

    def eof_received(self) -> Optional[bool]:
        self.at_eof = True
        if self._sink is not None:
            self._sink(self, [], Disconnected(f"{self.label}: connection closed"))
        self._wake()
        self._check_idle()
        return False  # close the transport

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._gone = True
        self.at_eof = True
        self._lost = exc
        if self._sink is not None:
            self._sink(self, [], Disconnected(f"{self.label}: connection lost" + (f": {exc}" if exc else "")))
        self._wake()
        self._check_idle()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(Disconnected(f"{self.label}: connection lost while sending"
                                              + (f": {exc}" if exc else "")))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def set_sink(self, sink: Sink) -> None:
        """From now on hand every decoded box to ``sink`` (and the end of
        the connection), at once, instead of queueing them for
        :meth:`read_box`: a session (:mod:`remsh.aio.session`) takes its
        acknowledgements as they come.  Boxes already queued go first."""
        raw, self._raw = self._raw, None
        if raw:
            self.data_received(bytes(raw))
        self._sink = sink
        queued = list(self._ready)
        self._ready.clear()
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()
        if queued:
            sink(self, queued, None)
        if self._bad_input is not None:
            sink(self, [], self._bad_input)
        elif self.at_eof or self._gone:
            sink(self, [], Disconnected(f"{self.label}: connection closed"))

    def _check_idle(self) -> None:
        """Tell the owner of an event while no operation reads."""
        hook = self.on_idle_event
        if self.busy or hook is None or self.closed:
            return
        if self._ready or self._bad_input is not None:
            hook(ProtocolError(f"{self.label}: sent a box nobody asked for"))
        elif self.at_eof:
            hook(Disconnected(f"{self.label}: connection closed"
                              + (f" ({self._lost})" if self._lost is not None else "")))

    def idle(self) -> None:
        """The operation reading this connection is over: from now on
        events go to :attr:`on_idle_event` (at once, for any that came
        meanwhile)."""
        self.busy = False
        self._check_idle()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def peer(self) -> str:
        name = None if self.transport is None else self.transport.get_extra_info("peername")
        return str(name) if name else self.label

    # -- waiting -----------------------------------------------------------

    async def _wait(self, timeout: Optional[float], what: str) -> None:
        """Wait for the next event on the connection, at most ``timeout`` s."""
        loop = asyncio.get_running_loop()
        fut: "asyncio.Future[None]" = loop.create_future()
        handle = None
        if timeout is not None:
            handle = loop.call_later(timeout, _expire, fut,
                                     lambda: PeerTimeout(f"{self.label}: no {what} for {timeout:g} s"))
        self._waiter = fut
        try:
            await fut
        finally:
            self._waiter = None
            if handle is not None:
                handle.cancel()

    # -- sending -----------------------------------------------------------

    def write(self, data: Union[bytes, bytearray, memoryview]) -> None:
        """Queue bytes without waiting (an interrupt from a plain function).

        :raises Disconnected: the connection is closed
        """
        transport = self.transport
        if self.closed or self._gone or transport is None or transport.is_closing():
            raise Disconnected(f"{self.label}: connection already closed")
        transport.write(data)

    async def send(self, data: Union[bytes, bytearray, memoryview], timeout: Optional[float] = None) -> None:
        """Write bytes (encoded boxes, or the greeting) and, while the peer
        is behind (more than :data:`WRITE_BUFFER_HIGH` unsent), wait for it;
        ``timeout`` bounds that wait (:class:`PeerTimeout`)."""
        self.write(data)
        if self._write_paused:
            await self.drain(timeout)

    async def drain(self, timeout: Optional[float] = None) -> None:
        """While the peer is behind (more than :data:`WRITE_BUFFER_HIGH`
        unsent), wait for it, at most ``timeout`` s (:class:`PeerTimeout`).

        :raises Disconnected: the connection broke meanwhile
        """
        if not self._write_paused:
            return
        loop = asyncio.get_running_loop()
        fut: "asyncio.Future[None]" = loop.create_future()
        handle = None
        if timeout is not None:
            handle = loop.call_later(timeout, _expire, fut,
                                     lambda: PeerTimeout(f"{self.label}: peer stopped reading (send timed out)"))
        self._drain_waiter = fut
        try:
            await fut
        finally:
            self._drain_waiter = None
            if handle is not None:
                handle.cancel()

    async def send_boxes(self, boxes: List[Box], timeout: Optional[float] = None) -> None:
        """Encode boxes and send them in one write."""
        await self.send(b"".join(encode_box(b) for b in boxes), timeout)

    # -- reading -----------------------------------------------------------

    def _check_gone(self) -> None:
        if self._lost is not None:
            raise Disconnected(f"{self.label}: connection lost: {self._lost}") from self._lost

    async def read_exact(self, n: int, timeout: Optional[float]) -> bytes:
        """Exactly ``n`` raw bytes (the greeting), before any box; what
        follows them is decoded as boxes from then on."""
        raw = self._raw
        if raw is None:
            raise UsageError(f"{self.label}: raw bytes are read only before the first box")
        loop = asyncio.get_running_loop()
        end = None if timeout is None else loop.time() + timeout
        while len(raw) < n:
            self._check_gone()
            if self.at_eof:
                raise Disconnected(f"{self.label}: connection closed during the greeting")
            await self._wait(None if end is None else max(0.0, end - loop.time()), "greeting")
        data = bytes(raw[:n])
        self._raw = None
        if len(raw) > n:
            self.data_received(bytes(raw[n:]))
        return data

    def received(self) -> Optional[Box]:
        """A box already received, or ``None`` (without waiting)."""
        return self._next() if self._ready else None

    def _next(self) -> Box:
        box = self._ready.popleft()
        if self._read_paused and len(self._ready) < MAX_QUEUED_BOXES // 2 and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()
        return box

    async def read_box(self, timeout: Optional[float]) -> Optional[Box]:
        """The next box; ``None`` when the peer closed the connection between
        boxes.  ``timeout`` bounds the wait for each chunk of bytes.

        :raises WireError: bad input (and at every later call)
        :raises PeerTimeout: nothing arrived within ``timeout``
        :raises Disconnected: the connection broke
        """
        if self._raw is not None:  # no greeting on this connection: its bytes are boxes
            raw, self._raw = self._raw, None
            if raw:
                self.data_received(bytes(raw))
        while not self._ready:
            if self._bad_input is not None:
                raise WireError(str(self._bad_input))
            self._check_gone()
            if self.at_eof:
                self._decoder.close()  # a box cut short raises
                return None
            await self._wait(timeout, "answer")
        return self._next()

    def close(self) -> None:
        """Close the connection (idempotent; what is queued is still sent)."""
        if self.closed:
            return
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Reset the connection at once, dropping what is unsent."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


def _expire(fut: "asyncio.Future[None]", error: Callable[[], BaseException]) -> None:
    if not fut.done():
        fut.set_exception(error())


SessionKeys = Callable[[str, Box], Mapping[bytes, bytes]]


async def master_handshake(conn: Connection, rule: NameRule, *, timeout: float,
                           session_keys: Optional[SessionKeys] = None) -> Registered:
    """Greeting and registration, the master's side, within ``timeout`` seconds.

    The same machine as the threaded listeners'
    (:class:`~remsh.handshake.MasterHandshake`); a refused slave gets the
    one refusal box before the error is raised.  ``session_keys(name,
    register_box)`` adds the answer's session keys, as for the threaded
    listeners (:func:`remsh.handshake.master_handshake`).

    :raises AuthenticationError: refused
    :raises ProtocolError: a malformed exchange
    :raises Disconnected: the peer went away or stayed silent (:class:`PeerTimeout`)
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout

    def left() -> float:
        return max(0.0, end - loop.time())

    hs = MasterHandshake(rule, label=conn.label, session_keys=session_keys)
    await conn.send(hs.greeting, left())
    hs.receive_greeting(await conn.read_exact(GREETING_LENGTH, left()))
    await conn.send_boxes(hs.start(), left())
    box = await conn.read_box(left())
    if box is None:
        raise Disconnected(f"{conn.label}: connection closed while waiting for register")
    step = hs.receive_box(box)
    if isinstance(step.event, Refused):
        try:
            await conn.send_boxes(step.send, left())
        except (Disconnected, ProtocolError):
            pass  # the refusal is a courtesy: the error below is what counts
        raise step.event.error
    await conn.send_boxes(step.send, left())
    assert isinstance(step.event, Registered)
    return step.event
