"""The one-request, one-reply operations as an object that does no I/O.

:class:`SimpleCall` serves every operation of :data:`remsh.ops.OPERATIONS`
that is not a multi-box conversation (``ping``, ``stat``, ``mkdir``, ...)::

    idle --request()--> requested --reply or error box--> done
                           \\--liveness box (long operations only)--/ (stays)

A liveness box (``{progress: y}``) is allowed only for an operation the
table declares ``long``; any other box after the request is the reply.
"""

from __future__ import annotations

import enum
from typing import Any, NamedTuple, Optional, Union

from remsh.conversation import Failed
from remsh.errors import ProtocolError, UsageError, remote_error
from remsh.ops import Operation, is_progress
from remsh.wire import Box

__all__ = ["SimpleCall", "SimpleState", "Reply", "Failed"]


class SimpleState(enum.Enum):
    IDLE = "idle"
    REQUESTED = "requested"
    DONE = "done"


class Reply(NamedTuple):
    """The operation's reply box (no error)."""

    box: Box


class SimpleCall:
    """The master's side of one simple operation ``op`` (see the module docstring).

    :raises TypeError: from the constructor, for arguments the table does
        not declare or a missing required one
    """

    def __init__(self, op: Operation, **values: Any) -> None:
        if op.conversation:
            raise UsageError(f"{op.meth} is a conversation of its own, not a simple call")
        self.op = op
        self._request = op.encode(**values) if values else op.bare_request
        self.state = SimpleState.IDLE

    @property
    def done(self) -> bool:
        return self.state is SimpleState.DONE

    def request(self) -> bytes:
        """The request bytes (once)."""
        if self.state is not SimpleState.IDLE:
            raise UsageError(f"{self.op.meth}: request already made")
        self.state = SimpleState.REQUESTED
        return self._request

    def cancel(self) -> Optional[bytes]:
        """What to send to stop the operation early: nothing (the slave
        answers soon by itself); the reply is still to be read."""
        return None

    def receive(self, box: Box) -> Union[Reply, Failed, None]:
        """The event ``box`` from the slave means (``None``: a liveness box).

        :raises ProtocolError: no request is outstanding, or a liveness box
            for an operation that is not long
        """
        if self.state is not SimpleState.REQUESTED:
            raise ProtocolError(f"{self.op.meth}: box from the slave in state {self.state.value}")
        if is_progress(box):
            if self.op.long:
                return None
            self.state = SimpleState.DONE
            raise ProtocolError(f"{self.op.meth}: liveness box for an operation that is not long")
        self.state = SimpleState.DONE
        if b"errtag" in box:
            return Failed(remote_error(box[b"errtag"].decode("ascii", "replace"),
                                       box.get(b"error", b"").decode("utf-8", "replace")))
        return Reply(box)


