"""The ``send`` and ``fetch`` conversations of the master, as objects that do no I/O.

``send`` (:class:`SendCall`), one file from the master to the slave::

    idle --request()--> requested --go-ahead {}--> sending --finish()/abort()--> finishing
                            |                        data() repeats                |
                            \\--error box--> done                 final box ------/--> done

The slave answers the request with an empty box (go ahead) or an error box;
the master then sends the file as ``{data: ...}`` boxes and ends with
``{sha256: HEX}`` (or ``{sha256: -, abort: REASON}`` when it could not read
its source); the slave's final box is empty (the file is in place) or an
error box.  The slave sends nothing while the data flows, so a box in the
``sending`` state is refused.

``fetch`` (:class:`FetchCall`), one file from the slave to the master::

    idle --request()--> receiving --data boxes--> receiving --final box--> done

The slave sends ``{data: ...}`` boxes and then ``{sha256: HEX}``, or an
error box (at once, or instead of the digest).  The master may stop it with
``{interrupt: y}`` (past ``max_bytes``, or when its caller gives up,
:meth:`FetchCall.cancel`); what is already on its way is read and dropped,
up to ``drain_limit`` bytes (past that the slave is broken:
:class:`~remsh.errors.ProtocolError`).

The objects hash nothing: the drivers hash the data where it is cheapest
(the threaded master in a helper thread, :mod:`remsh.bulk`) and hand the
digest to :meth:`SendCall.finish` or :meth:`FetchCall.check_digest`.
Drivers: :mod:`remsh.master.sendfile`, :mod:`remsh.master.fetchfile` and
:mod:`remsh.aio`.
"""

from __future__ import annotations

import enum
import os
from typing import NamedTuple, Optional, Union

from remsh.conversation import Failed, PathArg
from remsh.errors import ProtocolError, UsageError, remote_error
from remsh.ops import FETCH, SEND
from remsh.wire import Box, encode_box, encode_data_boxes

__all__ = ["SendCall", "SendState", "FetchCall", "FetchState", "Ready", "Completed", "Data", "Stop",
           "Finished", "Stopped", "Failed", "DATA_KEY", "INTERRUPT_BOX", "DRAIN_LIMIT"]

#: The key of a data box, both ways.
DATA_KEY = b"data"
#: What stops a ``fetch`` on the slave.
INTERRUPT_BOX = encode_box({b"interrupt": b"y"})
#: Bytes a slave may still send after it was told to stop before it is
#: judged broken (the same bound as the tree operations').
DRAIN_LIMIT = 256 << 20


def _failed(box: Box) -> Failed:
    return Failed(remote_error(box[b"errtag"].decode("ascii", "replace"),
                               box.get(b"error", b"").decode("utf-8", "replace")))


# -- send --------------------------------------------------------------------------


class SendState(enum.Enum):
    IDLE = "idle"
    REQUESTED = "requested"
    SENDING = "sending"
    FINISHING = "finishing"
    DONE = "done"


class Ready(NamedTuple):
    """The slave opened the destination: send the data."""


class Completed(NamedTuple):
    """The slave verified the data and put the file in place."""


class SendCall:
    """The master's side of one ``send`` (see the module docstring).

    :ivar aborted: the master ended the data with an abort box (its source
        failed, or its caller gave up): the final box is the slave's error
        for it, whose cause is the master's own
    """

    def __init__(self, dest: PathArg, mode: Optional[int] = None) -> None:
        if mode is not None and not 0 <= mode <= 0o7777:
            raise UsageError(f"mode out of range: {mode:#o}")
        self._request = SEND.encode(dest=os.fsencode(dest), mode=mode)
        self.state = SendState.IDLE
        self.aborted = False

    @property
    def done(self) -> bool:
        return self.state is SendState.DONE

    def _expect(self, state: SendState, what: str) -> None:
        if self.state is not state:
            raise UsageError(f"send: {what} in state {self.state.value}")

    def request(self) -> bytes:
        """The request bytes."""
        self._expect(SendState.IDLE, "request")
        self.state = SendState.REQUESTED
        return self._request

    def data(self, block: Union[bytes, bytearray, memoryview]) -> bytes:
        """``block`` of the file as data boxes (any length; split as needed)."""
        self._expect(SendState.SENDING, "data")
        return encode_data_boxes(DATA_KEY, block)

    def finish(self, sha256_hex: str) -> bytes:
        """The end box after the last data: the digest of every byte sent."""
        self._expect(SendState.SENDING, "finish")
        self.state = SendState.FINISHING
        return encode_box({b"sha256": sha256_hex.encode("ascii")})

    def abort(self, reason: str) -> bytes:
        """The end box that makes the slave discard what it received."""
        self._expect(SendState.SENDING, "abort")
        self.state = SendState.FINISHING
        self.aborted = True
        return encode_box({b"sha256": b"-", b"abort": reason.encode("utf-8", "replace")[:1000]})

    def cancel(self) -> Optional[bytes]:
        """What to send when the caller gives up: the abort box while data
        flows, else nothing.  The final box is still to be read."""
        if self.state is SendState.SENDING:
            return self.abort("the master cancelled the transfer")
        return None

    def receive(self, box: Box) -> Union[Ready, Completed, Failed]:
        """The event the slave's ``box`` means.

        :raises ProtocolError: a box the state does not allow (state: done)
        """
        state = self.state
        if state is SendState.REQUESTED or state is SendState.FINISHING:
            if b"errtag" in box:
                self.state = SendState.DONE
                return _failed(box)
            if box:
                self.state = SendState.DONE
                raise ProtocolError(f"send: expected an empty or error box, got keys {sorted(box)[:8]}")
            if state is SendState.REQUESTED:
                self.state = SendState.SENDING
                return Ready()
            self.state = SendState.DONE
            return Completed()
        self.state = SendState.DONE
        raise ProtocolError(f"send: box from the slave in state {state.value}")


# -- fetch -------------------------------------------------------------------------


class FetchState(enum.Enum):
    IDLE = "idle"
    RECEIVING = "receiving"
    DONE = "done"


class Data(NamedTuple):
    """Bytes of the file, in order."""

    data: bytes


class Stop(NamedTuple):
    """The file passed ``max_bytes``: send ``send`` (the interrupt) now;
    the data still coming is dropped."""

    send: bytes


class Finished(NamedTuple):
    """The slave sent every byte; ``sha256`` is its digest (hex, or
    ``None`` if it sent none)."""

    sha256: Optional[bytes]


class Stopped(NamedTuple):
    """The transfer ended after the master stopped it (``max_bytes`` or a
    cancel); whatever the slave's final box said, the master's is the cause."""

    limit: bool


FetchEvent = Union[Data, Stop, Finished, Stopped, Failed, None]


class FetchCall:
    """The master's side of one ``fetch`` (see the module docstring).

    :ivar received: data bytes received so far (dropped ones included)
    """

    def __init__(self, src: PathArg, max_bytes: Optional[int] = None, *,
                 drain_limit: int = DRAIN_LIMIT) -> None:
        if max_bytes is not None and max_bytes < 0:
            raise UsageError("max_bytes must be 0 or more")
        self._request = FETCH.encode(src=os.fsencode(src))
        self.max_bytes = max_bytes
        self.drain_limit = drain_limit
        self.state = FetchState.IDLE
        self.received = 0
        self._stopped_at: Optional[int] = None
        self._limit = False
        self._expected: Optional[bytes] = None

    @property
    def done(self) -> bool:
        return self.state is FetchState.DONE

    @property
    def stopped(self) -> bool:
        """The master told the slave to stop."""
        return self._stopped_at is not None

    def request(self) -> bytes:
        """The request bytes."""
        if self.state is not FetchState.IDLE:
            raise UsageError(f"fetch: request in state {self.state.value}")
        self.state = FetchState.RECEIVING
        return self._request

    def cancel(self) -> Optional[bytes]:
        """What to send when the caller gives up: the interrupt (once,
        while data may still come), else nothing."""
        if self.state is not FetchState.RECEIVING or self._stopped_at is not None:
            return None
        self._stopped_at = self.received
        return INTERRUPT_BOX

    def receive(self, box: Box) -> FetchEvent:
        """The event the slave's ``box`` means (``None``: data dropped
        after a stop).

        :raises ProtocolError: a box in the wrong state, or more than
            ``drain_limit`` bytes after the stop (state: done)
        """
        if self.state is not FetchState.RECEIVING:
            raise ProtocolError(f"fetch: box from the slave in state {self.state.value}")
        data = box.get(DATA_KEY)
        if data is not None:
            if len(box) != 1:
                self.state = FetchState.DONE
                raise ProtocolError(f"fetch: data box with other keys {sorted(box)[:8]}")
            self.received += len(data)
            stopped_at = self._stopped_at
            if stopped_at is not None:
                if self.received > stopped_at + self.drain_limit:
                    self.state = FetchState.DONE
                    raise ProtocolError(f"still sending {self.drain_limit} bytes after the interrupt")
                return None
            if self.max_bytes is not None and self.received > self.max_bytes:
                self._stopped_at = self.max_bytes
                self._limit = True
                return Stop(INTERRUPT_BOX)
            return Data(data)
        self.state = FetchState.DONE
        if self._stopped_at is not None:
            return Stopped(self._limit)
        if b"errtag" in box:
            return _failed(box)
        extra = set(box) - {b"sha256"}
        if extra:
            raise ProtocolError(f"fetch: unexpected keys {sorted(extra)[:8]} in the final box")
        self._expected = box.get(b"sha256")
        return Finished(self._expected)

    def check_digest(self, sha256_hex: str) -> None:
        """Compare the digest of the data received with the slave's.

        :raises ProtocolError: they differ
        """
        if self.state is not FetchState.DONE:
            raise UsageError("fetch: digest checked before the end")
        if self._expected is not None and self._expected.lower() != sha256_hex.encode("ascii"):
            raise ProtocolError("data does not match the slave's sha256 digest")
