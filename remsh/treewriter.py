"""The receiving end of a tree stream (:mod:`remsh.treestream` has the
format): :class:`Writer` applies records under a directory descriptor with
the ``*at`` calls, a file through a temporary file renamed into place, a
directory's bits and time when it is left, runs of zero bytes as holes."""

from __future__ import annotations

import errno
import hashlib
import os
import stat as stat_mod
from typing import Callable, List, Optional

from remsh.errors import TreeDigestError, TreeStreamError, TreeTargetError
from remsh.files import O_CLOEXEC, O_NOFOLLOW, O_PATH, TEMP_SUFFIX, rename_dir_noreplace_at
from remsh.treestream import (ATTRS, DIR, DIR_OPEN, FILE, LINK, MAX_TREE_PATH, REMOVE, UP, ZEROS, D, H, L, N, T,
                              check_name, mode_of, mtime_of, show)
from remsh.wire import MAX_VALUE_LENGTH, Box


def temp_name(name: bytes) -> bytes:
    """A fresh temporary name beside ``name`` (fits where ``name`` fits)."""
    return b".%s.%s%s" % (name[:200], os.urandom(6).hex().encode("ascii"), TEMP_SUFFIX)


def make_temp_dir(parent_fd: int, name: bytes) -> bytes:
    """Make an empty private directory beside ``name`` in ``parent_fd``;
    return its name.  Raises ``OSError``."""
    for attempt in range(100):
        tmp = temp_name(name)
        try:
            os.mkdir(tmp, 0o700, dir_fd=parent_fd)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "could not make a temporary directory", name)


def place_dir(parent_fd: int, tmp: bytes, name: bytes) -> None:
    """Rename directory ``tmp`` to ``name`` in ``parent_fd``, never replacing
    anything (:func:`remsh.files.rename_dir_noreplace_at`).
    Raises ``FileExistsError`` when ``name`` exists, ``OSError`` otherwise."""
    rename_dir_noreplace_at(tmp, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)


RemoveTree = Callable[[int, bytes], None]


def remove_entry(parent_fd: int, name: bytes, remove_dir: RemoveTree) -> None:
    """Remove ``name`` (file, link or whole directory) from ``parent_fd``; a
    missing one is fine.  Raises ``OSError``."""
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat_mod.S_ISDIR(st.st_mode):
        remove_dir(parent_fd, name)
    else:
        os.unlink(name, dir_fd=parent_fd)


class _Dir:
    __slots__ = ("fd", "mode", "mtime", "rel")

    def __init__(self, fd: int, mode: int, mtime: int, rel: bytes) -> None:
        self.fd = fd
        self.mode = mode
        self.mtime = mtime
        self.rel = rel


class Writer:
    """Applies a record stream under the directory ``top_fd`` (which the
    caller keeps and closes).

    In ``sync`` mode an entry replaces what is there (a file through a
    temporary file renamed over it, so a reader sees the old file or the new
    one), directories that exist are kept, and ``x``/``a`` records are
    allowed; otherwise the top directory is new and empty and every name is
    created once (``O_EXCL``).  ``remove_dir(parent_fd, name)`` removes a
    whole directory (sync mode).  ``on_data(n)`` counts file data written.
    ``file_mode_mask`` and ``dir_mode_mask`` narrow the permission bits
    given to files and directories (the master passes its umask without
    the set-ID and sticky bits for ``fetch_tree``, so that a slave cannot
    plant a program that runs as the master's user, nor open a directory
    to everyone).  Directories nested past :data:`MAX_TREE_PATH` bytes, or
    more than ``max_depth`` levels below the top, are refused (each level
    holds a descriptor open).

    :meth:`feed` raises :class:`TreeStreamError` (bad records),
    :class:`TreeDigestError` (a file's data does not match its digest) and
    :class:`TreeTargetError` (a write failed; the message names the path).
    """

    def __init__(self, top_fd: int, *, sync: bool = False, remove_dir: Optional[RemoveTree] = None,
                 on_data: Callable[[int], None] = lambda n: None, file_mode_mask: int = 0o7777,
                 dir_mode_mask: int = 0o7777, max_depth: Optional[int] = None) -> None:
        self.top_fd = top_fd
        self.sync = sync
        self.file_mode_mask = file_mode_mask
        self.dir_mode_mask = dir_mode_mask
        self.max_depth = max_depth
        self.remove_dir = remove_dir
        self.on_data = on_data
        self.stack: List[_Dir] = []
        self.done = False
        self.started = False
        # the file being written
        self._fd = -1
        self._tmp: Optional[bytes] = None
        self._name = b""
        self._rel = b""
        self._mode = 0
        self._mtime = 0
        self._digest: "Optional[hashlib._Hash]" = None
        self._size = 0
        self._hole = False

    # -- helpers --

    def _where(self, name: bytes = b"") -> bytes:
        base = self.stack[-1].rel if self.stack else b""
        return (base + b"/" + name if base else name) if name else base

    def _fail(self, what: str, e: OSError, name: bytes = b"") -> TreeTargetError:
        return TreeTargetError(f"{what}: {e.strerror or e}: {show(self._where(name))}")

    def close(self) -> None:
        """Release every descriptor (after a failure; nothing is removed)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            if self._tmp is not None and self.stack:
                try:
                    os.unlink(self._tmp, dir_fd=self.stack[-1].fd)
                except OSError:
                    pass
        for d in self.stack:
            if d.fd != self.top_fd:
                os.close(d.fd)
        self.stack = []

    @property
    def in_file(self) -> bool:
        return self._digest is not None

    # -- records --

    def feed(self, box: Box) -> None:
        """Apply one box of the stream."""
        if self._digest is not None:
            self._file_box(box)
            return
        if self.done:
            raise TreeStreamError("a record after the end of the tree")
        t = box.get(T)
        if not self.started:
            if t != DIR or N in box:
                raise TreeStreamError("a tree stream must start with its top directory")
            self.started = True
            self.stack.append(_Dir(self.top_fd, mode_of(box) & self.dir_mode_mask, mtime_of(box), b""))
            if self.sync:
                try:
                    mode = stat_mod.S_IMODE(os.fstat(self.top_fd).st_mode)
                    if mode & 0o700 != 0o700:
                        os.fchmod(self.top_fd, mode | 0o700)  # to fill it; set at the end
                except OSError as e:
                    raise TreeTargetError(f"cannot make the top directory writable: {e.strerror}") from None
            return
        cur = self.stack[-1].fd
        if t == FILE:
            self._start_file(cur, box)
            self._file_box(box, first=True)
        elif t == DIR:
            self._enter(cur, box)
        elif t == UP:
            self._leave()
        elif t == LINK:
            self._link(cur, box)
        elif t == REMOVE and self.sync:
            name = check_name(box.get(N))
            assert self.remove_dir is not None
            try:
                remove_entry(cur, name, self.remove_dir)
            except OSError as e:
                raise self._fail("cannot remove", e, name) from None
        elif t == ATTRS and self.sync:
            self._attrs(cur, box)
        else:
            raise TreeStreamError(f"unknown tree record {t!r:.20}")

    def _enter(self, cur: int, box: Box) -> None:
        name = check_name(box.get(N))
        mode, mtime = mode_of(box) & self.dir_mode_mask, mtime_of(box)
        if len(self._where(name)) > MAX_TREE_PATH:
            raise TreeStreamError(f"directories nested past {MAX_TREE_PATH} bytes of path: "
                              f"{show(self._where())[:80]}...")
        if self.max_depth is not None and len(self.stack) > self.max_depth:
            raise TreeStreamError(f"directories nested more than {self.max_depth} levels deep: "
                              f"{show(self._where())[:80]}...")
        try:
            if self.sync:
                try:
                    st = os.stat(name, dir_fd=cur, follow_symlinks=False)
                except FileNotFoundError:
                    os.mkdir(name, 0o700, dir_fd=cur)
                else:
                    if not stat_mod.S_ISDIR(st.st_mode):
                        os.unlink(name, dir_fd=cur)
                        os.mkdir(name, 0o700, dir_fd=cur)
            else:
                os.mkdir(name, 0o700, dir_fd=cur)
            fd = os.open(name, DIR_OPEN, dir_fd=cur)
        except OSError as e:
            raise self._fail("cannot make directory", e, name) from None
        if self.sync:
            try:
                st = os.fstat(fd)
                if stat_mod.S_IMODE(st.st_mode) & 0o700 != 0o700:
                    os.fchmod(fd, stat_mod.S_IMODE(st.st_mode) | 0o700)  # to fill it; set at the end
            except OSError as e:
                os.close(fd)
                raise self._fail("cannot make directory writable", e, name) from None
        self.stack.append(_Dir(fd, mode, mtime, self._where(name)))

    def _leave(self) -> None:
        d = self.stack.pop()
        try:
            os.fchmod(d.fd, d.mode)
            os.utime(d.fd, ns=(d.mtime, d.mtime))
        except OSError as e:
            raise TreeTargetError(f"cannot set mode or time: {e.strerror}: {show(d.rel)}") from None
        finally:
            if d.fd != self.top_fd:
                os.close(d.fd)
        if not self.stack:
            self.done = True

    def _link(self, cur: int, box: Box) -> None:
        name = check_name(box.get(N))
        target = box.get(L)
        if not target or b"\0" in target:
            raise TreeStreamError(f"bad link target for {show(self._where(name))}")
        mtime = mtime_of(box)
        try:
            if self.sync:
                tmp = temp_name(name)
                os.symlink(target, tmp, dir_fd=cur)
                try:
                    os.utime(tmp, ns=(mtime, mtime), dir_fd=cur, follow_symlinks=False)
                    self._replace(cur, tmp, name)
                except BaseException:
                    try:
                        os.unlink(tmp, dir_fd=cur)
                    except OSError:
                        pass
                    raise
            else:
                os.symlink(target, name, dir_fd=cur)
                os.utime(name, ns=(mtime, mtime), dir_fd=cur, follow_symlinks=False)
        except OSError as e:
            raise self._fail("cannot make symbolic link", e, name) from None

    def _replace(self, cur: int, tmp: bytes, name: bytes) -> None:
        """Rename ``tmp`` over ``name``; a directory in the way is removed first."""
        try:
            os.rename(tmp, name, src_dir_fd=cur, dst_dir_fd=cur)
        except OSError as e:
            if e.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
            assert self.remove_dir is not None
            remove_entry(cur, name, self.remove_dir)
            os.rename(tmp, name, src_dir_fd=cur, dst_dir_fd=cur)

    def _attrs(self, cur: int, box: Box) -> None:
        name = check_name(box.get(N))
        mode, mtime = mode_of(box) & self.file_mode_mask, mtime_of(box)
        try:
            fd = os.open(name, (O_PATH or os.O_RDONLY) | O_NOFOLLOW | O_CLOEXEC, dir_fd=cur)
            try:
                if not stat_mod.S_ISREG(os.fstat(fd).st_mode):
                    return  # replaced meanwhile: leave it
                by_fd = b"/proc/self/fd/%d" % fd
                if O_PATH and os.path.exists(by_fd):
                    os.chmod(by_fd, mode)
                else:
                    os.chmod(name, mode, dir_fd=cur)
            finally:
                os.close(fd)
            os.utime(name, ns=(mtime, mtime), dir_fd=cur, follow_symlinks=False)
        except FileNotFoundError:
            return
        except OSError as e:
            raise self._fail("cannot set mode or time", e, name) from None

    def _start_file(self, cur: int, box: Box) -> None:
        name = check_name(box.get(N))
        self._mode, self._mtime = mode_of(box) & self.file_mode_mask, mtime_of(box)
        self._name = name
        self._rel = self._where(name)
        self._tmp = temp_name(name) if self.sync else None
        try:
            self._fd = os.open(self._tmp or name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                               0o600, dir_fd=cur)
        except OSError as e:
            raise self._fail("cannot create", e, name) from None
        self._digest = hashlib.sha256()
        self._size = 0
        self._hole = False

    def _file_box(self, box: Box, first: bool = False) -> None:
        if not first and T in box:
            raise TreeStreamError(f"a record inside file {show(self._rel)}")
        data = box.get(D)
        if data:
            assert self._digest is not None
            self._digest.update(data)
            n = len(data)
            self._size += n
            try:
                if data[0] == 0 and data[-1] == 0 and data == (ZEROS if n == MAX_VALUE_LENGTH else bytes(n)):
                    os.lseek(self._fd, n, os.SEEK_CUR)  # a hole
                    self._hole = True
                else:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(self._fd, view):]
                    self._hole = False
            except OSError as e:
                raise TreeTargetError(f"write failed: {e.strerror}: {show(self._rel)}") from None
            self.on_data(n)
        if H in box:
            self._end_file(box[H])
        elif not first and D not in box:
            raise TreeStreamError(f"a box that is neither data nor the end of file {show(self._rel)}")

    def _end_file(self, digest: bytes) -> None:
        assert self._digest is not None
        ok = digest.lower() == self._digest.hexdigest().encode("ascii")
        self._digest = None
        fd, self._fd = self._fd, -1
        cur = self.stack[-1].fd
        try:
            if not ok:
                raise TreeDigestError(f"data does not match its sha256 digest: {show(self._rel)}")
            try:
                if self._hole:
                    os.ftruncate(fd, self._size)
                os.fchmod(fd, self._mode)
                os.utime(fd, ns=(self._mtime, self._mtime))
            except OSError as e:
                raise TreeTargetError(f"write failed: {e.strerror}: {show(self._rel)}") from None
        except BaseException:
            os.close(fd)
            if self._tmp is not None:
                try:
                    os.unlink(self._tmp, dir_fd=cur)
                except OSError:
                    pass
            raise
        os.close(fd)
        if self._tmp is not None:
            tmp, self._tmp = self._tmp, None
            try:
                self._replace(cur, tmp, self._name)
            except OSError as e:
                try:
                    os.unlink(tmp, dir_fd=cur)
                except OSError:
                    pass
                raise TreeTargetError(f"cannot put in place: {e.strerror}: {show(self._rel)}") from None
