"""Feeding a command's stdin from the master: :class:`StdinFeeder`, used by
:meth:`remsh.master.slave.Slave.execute`."""

from __future__ import annotations

import io
import logging
import threading
from typing import Any, BinaryIO, Callable, Optional, Union

from remsh.conversation import ExecuteCall
from remsh.errors import Disconnected, RemshError
from remsh.wire import MAX_VALUE_LENGTH

log = logging.getLogger(__name__)

#: How long :meth:`Slave.interrupt <remsh.master.slave.Slave.interrupt>`
#: waits for the connection before giving up on a polite interrupt and
#: dropping the connection (and how long a stopped feeder may take, plus one).
INTERRUPT_SEND_TIMEOUT = 5.0
CHUNK = MAX_VALUE_LENGTH


class StdinFeeder:
    """Sends a command's stdin from its own thread, so that reading output
    and writing input can never wait on each other."""

    def __init__(self, wire: Any, name: str, call: ExecuteCall, source: Union[bytes, BinaryIO], *,
                 interrupt: Callable[[], None], drop: Callable[[RemshError], None]) -> None:
        self.wire = wire
        self.name = name
        self.call = call
        self.interrupt = interrupt
        self.drop = drop
        self.source: BinaryIO = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
        self.error: Optional[OSError] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"remsh-stdin-{self.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        wire = self.wire
        try:
            while True:
                try:
                    chunk = self.source.read(CHUNK)
                except OSError as e:
                    self.error = e
                    self.interrupt()
                    chunk = b""
                # nothing may go out once the command has ended: a late box
                # would land in the middle of the next operation
                if not wire.send_bytes_unless(self.call.stdin_box(chunk), self._stop):
                    return
                if not chunk:
                    return
        except RemshError:
            pass  # the reading side sees the broken connection

    def stop(self) -> None:
        """Stop sending; if the thread cannot be stopped in time (blocked
        reading the source), the conversation can no longer be trusted.

        A source with a ``cancel()`` method is told first, so that a
        ``read()`` blocked waiting for input can return at once."""
        self._stop.set()
        cancel = getattr(self.source, "cancel", None)
        if callable(cancel):
            try:
                cancel()
            except Exception:  # noqa: BLE001 - the join below bounds the wait anyway
                log.exception("slave %s: cancelling the stdin source failed", self.name)
        if self._thread is not None:
            self._thread.join(INTERRUPT_SEND_TIMEOUT + 1.0)
            if self._thread.is_alive():
                self.drop(Disconnected(
                    f"{self.name}: execute: the stdin source did not return; connection dropped"))
