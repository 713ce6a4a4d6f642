"""Part of :mod:`remsh.session`: when a receiver acknowledges, and how far.

Today's rule (:meth:`AckCounter.delivered`): the receiver acknowledges the
boxes it handed to its caller, every :data:`ACK_EVERY_BOXES` boxes or
:data:`ACK_EVERY_BYTES` bytes.

*Ack-after-commit* (:meth:`AckCounter.commit`): a master that records a
job's output in its job store acknowledges a box only once what it carried
is committed there, so that a master that stops loses nothing the slave
has forgotten: the slave keeps every box past the committed count, and a
master started again on the same store tells it that count and gets the
rest again (:mod:`remsh.jobadopt`).  While a commit point is set, no
acknowledgement goes past it; :meth:`AckCounter.commit` moves it (and says
what to acknowledge now), ``commit(None)`` drops it and acknowledges what
was delivered, as today.  Sessions that carry no stored job never set one
and pay nothing.

Not thread-safe: the session calls it under its own lock.  Apart from the
session only to keep that module short.
"""

from __future__ import annotations

from typing import Optional

from remsh.protocol.sessionlimits import ACK_EVERY_BOXES, ACK_EVERY_BYTES
from remsh.wire import encode_box


def ack_box(count: int) -> bytes:
    """The encoded ``{ack: count}`` control box."""
    return encode_box({b"ack": str(count).encode("ascii")})


class AckCounter:
    """What one receiving end of a session has acknowledged, and what it may."""

    def __init__(self, acked: int = 0) -> None:
        #: the count last sent to the peer
        self.acked = acked
        #: bytes delivered since the last acknowledgement
        self.bytes_since = 0
        #: the most boxes that may be acknowledged (``None``: no limit)
        self.commit_point: Optional[int] = None

    def reset_bytes(self) -> None:
        """A new connection: start counting bytes afresh."""
        self.bytes_since = 0

    def delivered(self, delivered: int, size: int) -> Optional[bytes]:
        """A box of ``size`` bytes was handed over (``delivered`` in all):
        the acknowledgement to send now, if one is due."""
        self.bytes_since += size
        upto = delivered if self.commit_point is None else min(delivered, self.commit_point)
        if upto <= self.acked:
            return None
        if upto - self.acked >= ACK_EVERY_BOXES or self.bytes_since >= ACK_EVERY_BYTES:
            return self._ack(upto)
        return None

    def commit(self, point: Optional[int], delivered: int) -> Optional[bytes]:
        """Acknowledge at most ``point`` boxes from now on (``None``: as
        delivered); the acknowledgement to send now, if it moves forward.

        A commit acknowledges at once (the store's commits are already
        batched, :mod:`remsh.jobs`): the sender's window must not wait for
        :data:`ACK_EVERY_BOXES` more boxes that may never come."""
        self.commit_point = point
        upto = delivered if point is None else min(delivered, point)
        if upto <= self.acked:
            return None
        return self._ack(upto)

    def _ack(self, upto: int) -> bytes:
        self.acked = upto
        self.bytes_since = 0
        return ack_box(upto)
