"""Where a session keeps what it sent while its connection is away, past
what it keeps in memory: :class:`SpoolFile`.

An unlinked file in a private (0700) directory that is removed at once:
nobody else can open it, and nothing is left behind, however the process
ends.  Part of :mod:`remsh.session`, apart only to keep that module short.
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
