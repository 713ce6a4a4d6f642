"""The public frame of one operation on a slave: :class:`OperationFrame`.

:meth:`remsh.master.slave.Slave.operation` holds the slave for one
conversation and yields an :class:`OperationFrame`, through which the bodies
of the longer operations (:mod:`remsh.master.sendfile`,
:mod:`remsh.master.fetchfile`, :mod:`remsh.master.tree`) talk to the slave.
Those modules depend on this one only (and on :class:`OperationHost`, what
they need of a slave), never on :mod:`remsh.master.slave`, which imports
them: the layers stay one-way.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable, ContextManager, Iterator, Optional, Protocol, Union

from remsh.bulk import lender
from remsh.errors import Disconnected, ProtocolError, RemoteError, RemshError, remote_error
from remsh.treestream import received_boxes
from remsh.wire import Box, Wire

if TYPE_CHECKING:
    from remsh.bulk import Lend
    from remsh.session import SessionWire
    from remsh.transports.base import StreamLike

__all__ = ["OperationFrame", "OperationHost", "Path", "progress_interval"]

#: A path on either side: ``str``, ``bytes`` or a path-like object.
Path = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]


def progress_interval(io_timeout: float) -> float:
    """How often a long operation should show it is alive: a quarter of
    the reply deadline, so a slow link cannot make a busy slave look dead."""
    return max(0.05, io_timeout / 4)


class OperationFrame:
    """One operation's view of its slave's connection.

    Valid for sending and reading only inside the ``with`` of
    :meth:`Slave.operation <remsh.master.slave.Slave.operation>` that made it
    (the slave is held for the operation there); :meth:`raise_if_error` and
    :meth:`protocol_error` may also be used after it, on the final box.

    :ivar name: the slave's name
    :ivar meth: the operation's name (used in every error message)
    :ivar io_timeout: the longest wait for the next box (seconds)
    """

    __slots__ = ("wire", "name", "meth", "io_timeout", "drop")

    def __init__(self, wire: "Union[Wire, SessionWire]", name: str, meth: str, io_timeout: float,
                 drop: Callable[[RemshError], None]) -> None:
        #: the connection (a ``Wire`` or ``SessionWire``)
        self.wire = wire
        self.name = name
        self.meth = meth
        self.io_timeout = io_timeout
        #: disconnects the slave with an error (``Slave.drop``)
        self.drop = drop

    @property
    def stream(self) -> "StreamLike":
        """The transport stream under the wire (for bulk I/O helpers that
        release it to other threads while they wait)."""
        return self.wire.stream

    @property
    def progress_interval(self) -> float:
        """How often the slave should show a long operation is alive."""
        return progress_interval(self.io_timeout)

    def send_bytes(self, data: Union[bytes, bytearray, memoryview]) -> None:
        """Send already encoded boxes."""
        self.wire.send_bytes(data)

    @property
    def lend(self) -> "Optional[Lend]":
        """How to send bulk boxes from a lent buffer (a session keeps the
        buffer until acknowledged instead of a copy: :func:`remsh.bulk.send_blocks`);
        ``None`` without a session, or where lending saves no copy."""
        return lender(self.wire)

    def send_box(self, box: Box) -> None:
        """Send one box."""
        self.wire.send_box(box)

    def read_box(self, timeout: Optional[float]) -> Optional[Box]:
        """The next box, or ``None`` when the slave closed the connection."""
        box: Optional[Box] = self.wire.read_box(timeout)
        return box

    def read(self) -> Box:
        """The next box within ``io_timeout``; a closed connection raises
        :class:`~remsh.errors.Disconnected`."""
        box: Optional[Box] = self.wire.read_box(self.io_timeout)
        if box is None:
            raise Disconnected(f"slave closed the connection during {self.meth}")
        return box

    def received(self) -> Iterator[Box]:
        """The boxes the slave has already sent, without waiting for more."""
        return received_boxes(self.wire)

    def raise_if_error(self, box: Box) -> Box:
        """``box``, unless it is an error box: then the
        :class:`~remsh.errors.RemoteError` subclass its tag names."""
        if b"errtag" in box:
            raise remote_error(box[b"errtag"].decode("ascii", "replace"),
                               box.get(b"error", b"").decode("utf-8", "replace"),
                               slave=self.name, operation=self.meth)
        return box

    def named(self, error: RemoteError) -> RemoteError:
        """``error`` (a slave's error as a conversation object decoded it)
        again, naming this slave and operation."""
        return type(error)(error.remote_message, slave=self.name, operation=self.meth, errtag=error.errtag)

    def protocol_error(self, message: str) -> ProtocolError:
        """The slave broke the protocol after its final box: drop it, and
        return the error to raise."""
        error = ProtocolError(f"{self.name}: {self.meth}: {message}")
        self.drop(error)
        return error


class OperationHost(Protocol):
    """What the bodies of the longer operations need of a slave
    (:class:`remsh.master.slave.Slave` is one)."""

    name: str

    def operation(self, meth: str, deadline: Optional[float] = None) -> ContextManager[OperationFrame]:
        """Hold the slave for one operation; see :meth:`Slave.operation
        <remsh.master.slave.Slave.operation>`."""
        ...
