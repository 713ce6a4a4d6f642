"""The numbers of the session layer (:mod:`remsh.protocol.session`, :mod:`remsh.session`): how often the
receiver acknowledges, the window a sender keeps unacknowledged, what a
receiver holds read ahead, and the time limits.  Both ends use them; the
module docstring of :mod:`remsh.session` says what each bounds and why."""

#: Acknowledge after this many session boxes received, or this many bytes.
ACK_EVERY_BOXES = 64
ACK_EVERY_BYTES = 1 << 20
#: Most bytes of unacknowledged boxes a connected sender keeps before it
#: waits for an acknowledgement.
WINDOW_BYTES = 8 << 20
#: Most unacknowledged session boxes a connected sender keeps: the byte
#: window alone would let a peer send 8 MiB of 2-byte boxes, each a Python
#: dict on the receiving side.
WINDOW_BOXES = 4096
#: A write of more boxes or bytes goes out in pieces, each within the window.
PIECE_BOXES = WINDOW_BOXES // 4
PIECE_BYTES = 2 << 20
#: Most boxes (and bytes, as encoded) a receiver holds read ahead of its
#: reader (see the module docstring): twice the window.
HELD_BOXES = 2 * WINDOW_BOXES
HELD_BYTES = 2 * WINDOW_BYTES
#: Longest a connected sender with a full window waits for the peer's next
#: acknowledgement before it takes the connection for lost (as long as a
#: stalled send may take, remsh.transports.base.DEFAULT_SEND_TIMEOUT).
ACK_TIMEOUT = 120.0
#: Default bound on what a disconnected sender keeps (bytes); past it the
#: sender waits for the connection to come back.
DEFAULT_SPOOL_LIMIT = 256 << 20
#: Default interval of the slave's link check (seconds).
DEFAULT_HEARTBEAT = 15.0
#: Most link checks a peer may send in one second while idle (a slave sends
#: one per heartbeat interval); more is taken for an attack on the thread
#: that answers them.
MAX_IDLE_PINGS = 10
#: While away, what a sender keeps in memory before it writes the rest to
#: its spool file (when it has a spool directory).
SPOOL_MEMORY = 1 << 20
