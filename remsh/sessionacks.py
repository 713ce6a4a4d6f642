"""When a receiver acknowledges, now in :mod:`remsh.protocol.sessionacks`
(kept here so that every import of ``remsh.sessionacks`` goes on working)."""

from remsh.protocol.sessionacks import AckCounter, ack_box

__all__ = ["AckCounter", "ack_box"]
