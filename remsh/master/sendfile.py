"""The body of :meth:`remsh.master.slave.Slave.send` (one file from the
master to the slave), kept apart so that the slave's module stays short."""

from __future__ import annotations

import io
import os
from typing import IO, TYPE_CHECKING, BinaryIO, Optional, Union

from remsh.bulk import OverlongRead, reader_for, send_blocks
from remsh.errors import LocalError, UsageError
from remsh.master.progress import Progress, ProgressCallback
from remsh.ops import SEND

if TYPE_CHECKING:
    from remsh.master.slave import Path, Slave


def send(self: "Slave", src: "Union[Path, BinaryIO]", dest: "Path", mode: Optional[int],
         progress: Optional[ProgressCallback]) -> None:
    """See :meth:`remsh.master.slave.Slave.send`."""
    request = SEND.encode(dest=os.fsencode(dest), mode=mode)
    if hasattr(src, "read"):
        f: IO[bytes] = src  # type: ignore[assignment]
        own = False
    else:
        try:
            f = open(src, "rb", buffering=0)
        except OSError as e:
            raise LocalError(f"{self.name}: send: cannot open local file: {e}") from e
        own = True
    try:
        total: Optional[int] = None
        if progress is not None:
            try:
                total = os.fstat(f.fileno()).st_size
            except (OSError, AttributeError, io.UnsupportedOperation):
                total = None
        with self._operation("send"):
            self.wire.send_bytes(request)
            self._raise_if_error("send", self._read("send"))
            local_error = _send_data(self, f, Progress(progress, total))
            reply = self._read("send")
        # the slave's error for an aborted transfer only echoes the local cause
        if isinstance(local_error, OverlongRead):
            raise UsageError(f"{self.name}: send: the source is not a file-like object: {local_error}")
        if local_error is not None:
            raise LocalError(f"{self.name}: send: reading local file failed: {local_error}") from local_error
        self._raise_if_error("send", reply)
    finally:
        if own:
            f.close()


def _send_data(self: "Slave", f: IO[bytes], progress: Progress) -> Optional[OSError]:
    # file data read in place into pre-framed data boxes, hashed in a
    # helper thread while the next block is read and sent (remsh.bulk)
    digest, error = send_blocks(reader_for(f), self.wire.send_bytes, progress.add, stream=self.wire.stream)
    if error is not None:
        self.wire.send_box({b"sha256": b"-", b"abort": b"master could not read the source"})
        return error
    self.wire.send_box({b"sha256": digest.encode("ascii")})
    progress.finish()
    return None
