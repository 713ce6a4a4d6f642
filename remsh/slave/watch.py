"""The slave's look, while it streams data to the master, for the master's
``{interrupt: y}``: the master stops a ``fetch`` that passed its
``max_bytes`` this way, and keeps the connection (see docs/protocol.rst)."""

from __future__ import annotations

from typing import Any

from remsh.treestream import received_boxes


class InterruptWatch:
    """``watch()`` is True once the master has sent ``{interrupt: y}``.
    Never blocks; each look costs one non-blocking receive, so the caller
    looks once per block of data (1 MiB), first before the first block --
    an interrupt sent with the request stops the transfer before any data.
    Other boxes the master may send meanwhile carry nothing for the
    operation (there are none in ``fetch``) and are dropped."""

    def __init__(self, wire: Any) -> None:
        self.wire = wire
        self.seen = False

    def __call__(self) -> bool:
        if not self.seen:
            for box in received_boxes(self.wire):
                if b"interrupt" in box:
                    self.seen = True
        return self.seen
