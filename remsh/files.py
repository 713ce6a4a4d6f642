"""File placement (on slave and master) that never shows a reader a partial file.

Data is written to a temporary file beside the destination (same directory,
so same file system) and moved into place only when complete.  The move uses
``link`` + ``unlink`` so that a destination created meanwhile is never
overwritten; where the file system has no hard links it falls back to
``rename`` after a last existence check.
"""

from __future__ import annotations

import errno
import os
from typing import Optional

TEMP_SUFFIX = b".remsh-part"


class PartialFile:
    """A temporary file beside ``dest`` that becomes ``dest`` on :meth:`commit`.

    Raises ``OSError`` from the constructor when the temporary file cannot be
    created (e.g. the directory is missing or not writable).
    """

    def __init__(self, dest: bytes, mode: Optional[int] = None) -> None:
        self.dest = dest
        directory, base = os.path.split(dest)
        self._dir = directory or b"."
        for attempt in range(100):
            # cut the base so that the temporary name fits where dest fits
            name = b".%s.%s%s" % (base[:200], os.urandom(6).hex().encode("ascii"), TEMP_SUFFIX)
            path = os.path.join(self._dir, name)
            try:
                # 0o666 less the umask: the permissions the file will have
                # (reading the umask would mean changing it, racing other threads)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
            except FileExistsError:
                continue
            break
        else:  # pragma: no cover - 100 collisions of 48 random bits
            raise FileExistsError(errno.EEXIST, "could not create a temporary file", dest)
        self.path = path
        self.fd = fd
        self._done = False
        self.mode = mode

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def commit(self) -> None:
        """Flush to disk and move into place; raises ``FileExistsError`` if
        ``dest`` appeared meanwhile (the temporary file is then removed)."""
        try:
            if self.mode is not None:
                os.fchmod(self.fd, self.mode)
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            try:
                os.link(self.path, self.dest)
            except FileExistsError:
                raise
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV,
                                   errno.EMLINK, errno.ENOSYS):
                    raise
                if os.path.lexists(self.dest):
                    raise FileExistsError(errno.EEXIST, "destination exists", self.dest) from None
                os.rename(self.path, self.dest)
                self._done = True
                return
            os.unlink(self.path)
            self._done = True
        finally:
            if not self._done:
                self.discard()

    def discard(self) -> None:
        """Remove the temporary file; idempotent, never raises."""
        if self._done:
            return
        self._done = True
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1
        try:
            os.unlink(self.path)
        except OSError:
            pass
