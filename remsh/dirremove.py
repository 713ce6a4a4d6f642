"""Removing a directory tree below a directory descriptor, depth first and
never through a symbolic link: :func:`remove_dir_at`.

Used by both ends (the slave's ``remove`` and failed tree transfers, the
master's failed ``fetch_tree``), so it lives below both.
"""

from __future__ import annotations

import errno
import os
import stat as stat_mod
from typing import Callable, List, Optional

from remsh.files import O_CLOEXEC, O_DIRECTORY, O_NOFOLLOW, O_PATH

__all__ = ["Tick", "remove_dir_at"]

#: Called for each entry removed (``None``: nothing to call).
Tick = Optional[Callable[[], None]]

#: The directory of the process's open descriptors (Linux).
PROC_FD = b"/proc/self/fd"


def _open_dir_in_tree(parent_fd: Optional[int], name: bytes) -> Optional[int]:
    """Open directory ``name`` (never through a symbolic link) for listing,
    giving it ``u+rwx`` if it lacks them: it is inside the tree being
    removed.  ``None`` if it vanished meanwhile."""
    flags = os.O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=parent_fd)
    except FileNotFoundError:
        return None
    except PermissionError:
        # no read right: change it through a descriptor that needs none, so
        # that the change lands on this very directory (a symbolic link
        # swapped in meanwhile is not followed)
        pfd = os.open(name, O_PATH | O_NOFOLLOW | O_CLOEXEC, dir_fd=parent_fd)
        try:
            st = os.fstat(pfd)
            if not stat_mod.S_ISDIR(st.st_mode):
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), name) from None
            by_fd = b"%s/%d" % (PROC_FD, pfd)
            if os.path.isdir(by_fd):
                os.chmod(by_fd, stat_mod.S_IMODE(st.st_mode) | stat_mod.S_IRWXU)
                return os.open(by_fd, flags & ~O_NOFOLLOW)
            # no /proc: by name (a directory swapped in for this one in the
            # instant between would get the change instead)
            os.chmod(name, stat_mod.S_IMODE(st.st_mode) | stat_mod.S_IRWXU, dir_fd=parent_fd)
            return os.open(name, flags, dir_fd=parent_fd)
        finally:
            os.close(pfd)
    try:
        mode = os.fstat(fd).st_mode
        if mode & stat_mod.S_IRWXU != stat_mod.S_IRWXU:
            try:
                os.fchmod(fd, stat_mod.S_IMODE(mode) | stat_mod.S_IRWXU)
            except PermissionError:
                pass  # not ours: the removal reports what fails
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Frame:
    """One directory on the way down in :func:`remove_dir_at`."""

    __slots__ = ("fd", "names", "parent_fd", "name")

    def __init__(self, fd: int, names: List[bytes], parent_fd: Optional[int], name: bytes) -> None:
        self.fd = fd  # the directory, open for listing
        self.names = names  # its entries not yet removed
        self.parent_fd = parent_fd  # the directory holding it
        self.name = name  # its name there


def remove_dir_at(parent_fd: Optional[int], name: bytes, tick: Tick) -> None:
    """Remove directory ``name`` and everything in it, depth first, holding a
    descriptor of each directory on the way down (no path is resolved twice,
    no recursion limit; the depth is bounded by the descriptor limit)."""
    top = _open_dir_in_tree(parent_fd, name)
    if top is None:
        return
    try:
        listing = [os.fsencode(n) for n in os.listdir(top)]
    except BaseException:
        os.close(top)
        raise
    frames: List[_Frame] = [_Frame(top, listing, parent_fd, name)]
    try:
        while frames:
            frame = frames[-1]
            fd, names = frame.fd, frame.names
            descended = False
            while names:
                entry = names.pop()
                if tick is not None:
                    tick()
                try:
                    st = os.stat(entry, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat_mod.S_ISDIR(st.st_mode):
                    child = _open_dir_in_tree(fd, entry)
                    if child is None:
                        continue
                    try:
                        listing = [os.fsencode(n) for n in os.listdir(child)]
                    except BaseException:
                        os.close(child)
                        raise
                    frames.append(_Frame(child, listing, fd, entry))
                    descended = True
                    break
                try:
                    os.unlink(entry, dir_fd=fd)
                except FileNotFoundError:
                    pass
            if descended:
                continue
            frames.pop()
            os.close(fd)
            try:
                os.rmdir(frame.name, dir_fd=frame.parent_fd)
            except FileNotFoundError:
                pass
    finally:
        for frame in frames:
            os.close(frame.fd)
