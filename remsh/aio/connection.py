"""Boxes over asyncio streams, and the handshake driven over them.

:class:`Connection` is the asyncio counterpart of :class:`remsh.wire.Wire`:
the same codec (:class:`~remsh.wire.BoxDecoder`, :func:`~remsh.wire.encode_box`)
on an :class:`asyncio.StreamReader` / :class:`asyncio.StreamWriter` pair.
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
from typing import Deque, List, Optional, Union

from remsh.errors import Disconnected, PeerTimeout, ProtocolError
from remsh.handshake import GREETING_LENGTH, MasterHandshake, NameRule, Refused, Registered
from remsh.wire import DEFAULT_MAX_BOX_BYTES, DEFAULT_MAX_KEYS, Box, BoxDecoder, Wire, encode_box

log = logging.getLogger(__name__)

__all__ = ["Connection", "master_handshake", "WRITE_BUFFER_HIGH"]

#: The transport's write buffer above which :meth:`Connection.send` waits
#: for the peer to take data (big enough for one bulk block of data boxes).
WRITE_BUFFER_HIGH = 2 << 20


class Connection:
    """Boxes over one asyncio stream pair, for one task at a time reading.

    Writes are whole (a box is never interleaved with another), so several
    tasks may send.  ``label`` names the peer in error messages.
    """

    RECV_SIZE = Wire.RECV_SIZE

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, label: str = "peer",
                 max_keys: int = DEFAULT_MAX_KEYS, max_box_bytes: int = DEFAULT_MAX_BOX_BYTES) -> None:
        self.reader = reader
        self.writer = writer
        self.label = label
        self._decoder = BoxDecoder(max_keys=max_keys, max_box_bytes=max_box_bytes)
        self._ready: Deque[Box] = collections.deque()
        self.at_eof = False
        self.closed = False
        transport = writer.transport
        try:
            transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        except (AttributeError, NotImplementedError):  # pragma: no cover - every stream transport has it
            pass

    @property
    def peer(self) -> str:
        name = self.writer.get_extra_info("peername")
        return str(name) if name else self.label

    # -- sending -----------------------------------------------------------

    def write(self, data: Union[bytes, bytearray, memoryview]) -> None:
        """Queue bytes without waiting (for an interrupt from a plain function).

        :raises Disconnected: the connection is closed
        """
        if self.closed or self.writer.is_closing():
            raise Disconnected(f"{self.label}: connection already closed")
        self.writer.write(data)

    async def send(self, data: Union[bytes, bytearray, memoryview], timeout: Optional[float] = None) -> None:
        """Write bytes (encoded boxes, or the greeting) and wait while the
        peer is behind; ``timeout`` bounds that wait."""
        self.write(data)
        try:
            # asyncio.timeout, not wait_for: wait_for may swallow a cancel (3.11)
            async with asyncio.timeout(timeout):
                await self.writer.drain()
        except TimeoutError:
            raise PeerTimeout(f"{self.label}: peer stopped reading (send timed out)") from None
        except (ConnectionError, OSError) as e:
            raise Disconnected(f"{self.label}: connection lost while sending: {e}") from e

    async def send_boxes(self, boxes: List[Box], timeout: Optional[float] = None) -> None:
        """Encode boxes and send them in one write."""
        await self.send(b"".join(encode_box(b) for b in boxes), timeout)

    # -- reading -----------------------------------------------------------

    async def _recv(self, timeout: Optional[float], n: int) -> bytes:
        try:
            if timeout is None:
                return await self.reader.read(n)
            async with asyncio.timeout(timeout):
                return await self.reader.read(n)
        except TimeoutError:
            raise PeerTimeout(f"{self.label}: no answer for {timeout:g} s") from None
        except (ConnectionError, OSError) as e:
            raise Disconnected(f"{self.label}: connection lost: {e}") from e

    async def read_exact(self, n: int, timeout: Optional[float]) -> bytes:
        """Exactly ``n`` raw bytes (the greeting), before any box."""
        data = b""
        loop = asyncio.get_running_loop()
        end = None if timeout is None else loop.time() + timeout
        while len(data) < n:
            chunk = await self._recv(None if end is None else max(0.0, end - loop.time()), n - len(data))
            if not chunk:
                raise Disconnected(f"{self.label}: connection closed during the greeting")
            data += chunk
        return data

    def received(self) -> Optional[Box]:
        """A box already received, or ``None`` (without waiting)."""
        return self._ready.popleft() if self._ready else None

    async def read_box(self, timeout: Optional[float]) -> Optional[Box]:
        """The next box; ``None`` when the peer closed the connection between
        boxes.  ``timeout`` bounds the wait for each chunk of bytes.

        :raises WireError: bad input (and at every later call)
        :raises PeerTimeout: nothing arrived within ``timeout``
        :raises Disconnected: the connection broke
        """
        ready = self._ready
        while not ready:
            if self.at_eof:
                return None
            data = await self._recv(timeout, self.RECV_SIZE)
            if not data:
                self.at_eof = True
                self._decoder.close()  # a box cut short raises
                return None
            ready.extend(self._decoder.feed(data))
        return ready.popleft()

    def close(self) -> None:
        """Close the connection (idempotent; does not wait)."""
        if self.closed:
            return
        self.closed = True
        try:
            self.writer.close()
        except (ConnectionError, OSError, RuntimeError):  # pragma: no cover - closing a dead transport
            pass

    def abort(self) -> None:
        """Reset the connection at once, dropping what is unsent."""
        self.closed = True
        self.writer.transport.abort()


async def master_handshake(conn: Connection, rule: NameRule, *, timeout: float) -> Registered:
    """Greeting and registration, the master's side, within ``timeout`` seconds.

    The same machine as the threaded listeners'
    (:class:`~remsh.handshake.MasterHandshake`); a refused slave gets the
    one refusal box before the error is raised.

    :raises AuthenticationError: refused
    :raises ProtocolError: a malformed exchange
    :raises Disconnected: the peer went away or stayed silent (:class:`PeerTimeout`)
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout

    def left() -> float:
        return max(0.0, end - loop.time())

    hs = MasterHandshake(rule, label=conn.label)
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
