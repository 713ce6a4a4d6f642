"""The numbers of the session layer, now in :mod:`remsh.protocol.sessionlimits`
(kept here so that every import of ``remsh.sessionlimits`` goes on working)."""

from remsh.protocol.sessionlimits import (ACK_EVERY_BOXES, ACK_EVERY_BYTES, ACK_TIMEOUT, DEFAULT_HEARTBEAT,
                                          DEFAULT_SPOOL_LIMIT, HELD_BOXES, HELD_BYTES, MAX_IDLE_PINGS, PIECE_BOXES,
                                          PIECE_BYTES, SPOOL_MEMORY, WINDOW_BOXES, WINDOW_BYTES)

__all__ = ["ACK_EVERY_BOXES", "ACK_EVERY_BYTES", "ACK_TIMEOUT", "DEFAULT_HEARTBEAT", "DEFAULT_SPOOL_LIMIT",
           "HELD_BOXES", "HELD_BYTES", "MAX_IDLE_PINGS", "PIECE_BOXES", "PIECE_BYTES", "SPOOL_MEMORY", "WINDOW_BOXES",
           "WINDOW_BYTES"]
