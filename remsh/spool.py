"""Parts of :mod:`remsh.session`: where a session keeps what it sent while
its connection is away, past what it keeps in memory (:class:`SpoolFile`),
and the pipe that tells a ``select`` loop of its changes (:class:`WakePipe`).

The spool is an unlinked file in a private (0700) directory that is
removed at once: nobody else can open it, and nothing is left behind,
however the process ends.  Apart from the session only to keep that module
short.
"""

from __future__ import annotations

import os
import tempfile
from typing import IO, Optional, Tuple


class SpoolFile:
    """An append-only store of byte strings, each found again by the
    ``(offset, length)`` that :meth:`append` returned.  Not thread-safe:
    the session calls it under its own lock."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.file: Optional[IO[bytes]] = None
        #: bytes written since the last :meth:`clear`
        self.end = 0

    def append(self, data: bytes) -> Tuple[int, int]:
        """Write ``data`` at the end; where it is.  Raises ``OSError``."""
        if self.file is None:
            private = tempfile.mkdtemp(prefix=".remsh-spool-", dir=self.directory)
            try:
                self.file = tempfile.TemporaryFile(dir=private)
            finally:
                os.rmdir(private)
        self.file.seek(self.end)
        self.file.write(data)
        where = (self.end, len(data))
        self.end += len(data)
        return where

    def read(self, where: Tuple[int, int]) -> bytes:
        """The bytes :meth:`append` wrote at ``where``."""
        assert self.file is not None
        self.file.seek(where[0])
        return self.file.read(where[1])

    def clear(self) -> None:
        """Forget everything written (nothing in it is needed any more)."""
        if self.file is not None:
            self.file.seek(0)
            self.file.truncate()
        self.end = 0

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        self.end = 0


class WakePipe:
    """A pipe whose read end turns readable at every :meth:`wake`, for a
    thread that waits with ``select`` (the slave's execute) on a session's
    changes; made on first use, so that a session nobody selects on costs
    no descriptor.  :meth:`fd` is called under the session's lock."""

    def __init__(self) -> None:
        self._r = self._w = -1

    def fd(self) -> int:
        if self._r < 0:
            self._r, self._w = os.pipe()
            os.set_blocking(self._r, False)
            os.set_blocking(self._w, False)
        return self._r

    def clear(self) -> None:
        """Drain what :meth:`wake` wrote."""
        try:
            while self._r >= 0 and os.read(self._r, 4096):
                pass
        except OSError:
            pass

    def wake(self) -> None:
        try:
            if self._w >= 0:
                os.write(self._w, b"x")
        except OSError:
            pass

    def close(self) -> None:
        for fd in (self._r, self._w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._r = self._w = -1
