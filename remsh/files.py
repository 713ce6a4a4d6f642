"""File placement (on slave and master) that never shows a reader a partial file.

Data is written to a temporary file beside the destination (same directory,
so same file system) and moved into place only when complete.  The move uses
``link`` + ``unlink`` so that a destination created meanwhile is never
overwritten; where the file system has no hard links it uses
``renameat2(RENAME_NOREPLACE)`` (:func:`rename_noreplace_at`), and only where
the kernel lacks that too a ``rename`` after a last existence check (a
destination created in that last instant would be replaced).

The temporary file is created with the permission bits it will end with
(``mode & 0o777``, narrowed by the umask) or, without a ``mode``, with the
ordinary ``0o666`` less the umask: it is never more open during the transfer
than afterwards, so another local user cannot open a file meant to be
private while it is being written.  Only the bits the umask took away and
the set-id/sticky bits are applied at :meth:`PartialFile.commit`, when the
content is complete.

All paths may be given relative to a directory descriptor (``dir_fd``), the
way the slave's policy hands out a directory it resolved inside its root.
"""

from __future__ import annotations

import errno
import os
from typing import Optional, Union

#: Open flags, 0 where the system has no such flag.
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
O_PATH = getattr(os, "O_PATH", 0)
O_NOCTTY = getattr(os, "O_NOCTTY", 0)
O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)

TEMP_SUFFIX = b".remsh-part"

#: ``renameat2`` flag: fail with ``EEXIST`` rather than replace the destination.
RENAME_NOREPLACE = 1
#: ``AT_FDCWD``: "relative to the current directory" for the ``*at`` calls.
AT_FDCWD = -100
#: ``renameat2`` system call numbers where libc may lack the wrapper.
_SYS_RENAMEAT2 = {"x86_64": 316, "amd64": 316, "aarch64": 276, "arm64": 276}
#: Errors meaning "this kernel or file system cannot rename without replacing".
NOREPLACE_UNSUPPORTED = (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM)

_renameat2_impl: "Optional[object]" = None  # resolved on first use: a callable, or False


def _load_renameat2() -> object:
    """The ``renameat2`` entry point (libc's, or the raw system call), or False."""
    try:
        import ctypes
        import platform
    except ImportError:  # pragma: no cover - a Python built without ctypes
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover
        return False
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int

        def call(sfd: int, src: bytes, dfd: int, dst: bytes, flags: int) -> int:
            return int(fn(sfd, src, dfd, dst, flags))
    else:
        number = _SYS_RENAMEAT2.get(platform.machine().lower())
        syscall = getattr(libc, "syscall", None)
        if number is None or syscall is None:
            return False
        syscall.restype = ctypes.c_long

        def call(sfd: int, src: bytes, dfd: int, dst: bytes, flags: int) -> int:
            return int(syscall(ctypes.c_long(number), ctypes.c_int(sfd), ctypes.c_char_p(src),
                               ctypes.c_int(dfd), ctypes.c_char_p(dst), ctypes.c_uint(flags)))

    def checked(sfd: int, src: bytes, dfd: int, dst: bytes, flags: int) -> None:
        if call(sfd, src, dfd, dst, flags) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), src, None, dst)

    return checked


def rename_noreplace_at(src: bytes, dest: bytes, *, src_dir_fd: Optional[int] = None,
                        dst_dir_fd: Optional[int] = None) -> None:
    """``renameat2(src, dest, RENAME_NOREPLACE)``: rename unless ``dest`` exists.

    Raises ``FileExistsError`` when ``dest`` exists (atomically: nothing is
    replaced), and ``OSError`` with ``errno`` in :data:`NOREPLACE_UNSUPPORTED`
    when the kernel, libc or file system cannot do it (``ENOSYS`` without
    ``ctypes`` or the system call); other ``OSError`` as ``rename`` would.
    """
    global _renameat2_impl
    if _renameat2_impl is None:
        _renameat2_impl = _load_renameat2()
    impl = _renameat2_impl
    if not callable(impl):
        raise OSError(errno.ENOSYS, "renameat2 is not available", src)
    impl(AT_FDCWD if src_dir_fd is None else src_dir_fd, src,
         AT_FDCWD if dst_dir_fd is None else dst_dir_fd, dest, RENAME_NOREPLACE)


def rename_dir_noreplace_at(src: bytes, dest: bytes, *, src_dir_fd: Optional[int] = None,
                            dst_dir_fd: Optional[int] = None) -> None:
    """Rename the directory ``src`` to ``dest``, never replacing anything:
    ``renameat2(RENAME_NOREPLACE)`` where the system has it, else
    :func:`rename_dir_reserving_at`.

    Raises ``FileExistsError`` when ``dest`` exists, ``OSError`` otherwise.
    """
    try:
        rename_noreplace_at(src, dest, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
        return
    except OSError as e:
        if e.errno not in NOREPLACE_UNSUPPORTED:
            raise
    rename_dir_reserving_at(src, dest, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)


def rename_dir_reserving_at(src: bytes, dest: bytes, *, src_dir_fd: Optional[int] = None,
                            dst_dir_fd: Optional[int] = None) -> None:
    """Rename the directory ``src`` to ``dest`` without ``renameat2``: an
    empty directory reserves the name (``mkdir`` fails if anything is
    there) and the rename replaces only that -- rename(2) replaces only an
    empty directory.  The window left: someone who removes the reservation
    and puts an empty directory of their own there in the instant before the
    rename loses that empty directory; a non-empty one or a file makes the
    rename fail (``ENOTEMPTY``/``ENOTDIR``): nothing is lost.

    Raises ``FileExistsError`` when ``dest`` exists, ``OSError`` otherwise.
    """
    os.mkdir(dest, 0o700, dir_fd=dst_dir_fd)
    try:
        os.rename(src, dest, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
    except BaseException:
        try:
            os.rmdir(dest, dir_fd=dst_dir_fd)
        except OSError:
            pass
        raise


class PartialFile:
    """A temporary file beside ``dest`` that becomes ``dest`` on :meth:`commit`.

    ``mode`` (permission bits, up to ``0o7777``) is what ``dest`` gets; the
    temporary file starts with ``mode & 0o777`` less the umask, never wider.
    With ``dir_fd``, ``dest`` is relative to that directory descriptor (which
    is duplicated: the caller may close its own at once).

    Raises ``OSError`` from the constructor when the temporary file cannot be
    created (e.g. the directory is missing or not writable).
    """

    def __init__(self, dest: bytes, mode: Optional[int] = None, *, dir_fd: Optional[int] = None) -> None:
        self.dest = dest
        self.mode = mode
        directory, base = os.path.split(dest)
        self._dir = directory or b"."
        self._dir_fd: Optional[int] = None
        self.fd = -1
        self._done = True  # until the temporary file exists
        create_mode = 0o666 if mode is None else mode & 0o777
        if dir_fd is not None:
            self._dir_fd = os.dup(dir_fd)
        try:
            for attempt in range(100):
                # cut the base so that the temporary name fits where dest fits
                name = b".%s.%s%s" % (base[:200], os.urandom(6).hex().encode("ascii"), TEMP_SUFFIX)
                path = os.path.join(self._dir, name)
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                                 create_mode, dir_fd=self._dir_fd)
                except FileExistsError:
                    continue
                break
            else:  # pragma: no cover - 100 collisions of 48 random bits
                raise FileExistsError(errno.EEXIST, "could not create a temporary file", dest)
        except BaseException:
            self._close_dir()
            raise
        self.path = path
        self.fd = fd
        self._done = False

    def write(self, data: Union[bytes, bytearray, memoryview]) -> None:
        """Append ``data``; raises ``OSError`` (disk full, ...)."""
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def commit(self) -> None:
        """Flush to disk and move into place; raises ``FileExistsError`` if
        ``dest`` appeared meanwhile, ``OSError`` on other failures (the
        temporary file is removed in both cases)."""
        dfd = self._dir_fd
        try:
            if self.mode is not None:
                # the bits the umask removed, and set-id bits only now that
                # the content is complete
                os.fchmod(self.fd, self.mode)
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            try:
                os.link(self.path, self.dest, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
            except FileExistsError:
                raise
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV,
                                   errno.EMLINK, errno.ENOSYS):
                    raise
                self._move_without_link()
                self._done = True
                self._close_dir()
                return
            os.unlink(self.path, dir_fd=dfd)
            self._done = True
            self._close_dir()
        finally:
            if not self._done:
                self.discard()

    def _move_without_link(self) -> None:
        """The move on a file system without hard links."""
        dfd = self._dir_fd
        try:
            rename_noreplace_at(self.path, self.dest, src_dir_fd=dfd, dst_dir_fd=dfd)
            return
        except OSError as e:
            if e.errno not in NOREPLACE_UNSUPPORTED:
                raise
        try:
            os.stat(self.dest, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:
            raise FileExistsError(errno.EEXIST, "destination exists", self.dest)
        os.rename(self.path, self.dest, src_dir_fd=dfd, dst_dir_fd=dfd)

    def discard(self) -> None:
        """Remove the temporary file; idempotent, never raises."""
        if self._done:
            self._close_dir()
            return
        self._done = True
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1
        try:
            os.unlink(self.path, dir_fd=self._dir_fd)
        except OSError:
            pass
        self._close_dir()

    def _close_dir(self) -> None:
        if self._dir_fd is not None:
            try:
                os.close(self._dir_fd)
            except OSError:
                pass
            self._dir_fd = None
