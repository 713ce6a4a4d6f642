"""The slave's file-system operations, safe against the races and traps a
plain ``os`` call falls into.

Each function takes the operation's path(s) as the server built them (the
request's value joined to the slave's current directory) and the slave's
:class:`~remsh.slave.policy.Policy`; it resolves every path through the
policy (so inside ``--root`` when there is one, race-free), does the work
with the ``*at`` calls on the descriptors the policy gives, and reports every
failure as the :class:`~remsh.errors.RemoteError` subclass the operation
answers with.  Nothing here touches the wire.

What each guards against:

- :func:`open_regular` (``fetch``, ``copy``): a FIFO would block ``open``
  forever, a device would stream without end; it opens with ``O_NONBLOCK``
  and accepts only a regular file.
- :func:`rename_noreplace`: "check the destination, then rename" replaces a
  destination created in between; ``renameat2(RENAME_NOREPLACE)`` refuses
  atomically.  Where the kernel lacks it: ``link`` + ``unlink`` for a file
  (atomic too), and for a directory an empty directory made as a reservation
  and then renamed over (see :func:`_rename_at` for the remaining window).
- :func:`remove_tree`: ``rm -rf`` that makes directories *inside* the tree
  writable where needed, never anything outside it (the parent, a symbolic
  link's target), never follows a symbolic link, and refuses a path ending
  in ``.`` or ``..`` (which would name the current or parent directory).
- :func:`copy_file` and :func:`create_partial`: the destination appears
  complete or not at all (:class:`~remsh.files.PartialFile`), never replaces
  an existing file, and is never more open than its final mode.

Long operations call an optional ``tick()`` now and then (each directory
entry, each block copied), so the server can show the master it is alive.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat as stat_mod
from typing import List, Optional

from remsh.dirremove import Tick as Tick, remove_dir_at as remove_dir_at  # re-exported: fsops.remove_dir_at
from remsh.errors import DeniedError, FailedError, NotFoundError, OpenFailedError, RemoteFileExistsError
from remsh.files import (NOREPLACE_UNSUPPORTED, O_NOCTTY, O_NOFOLLOW, O_NONBLOCK, O_PATH,
                         PartialFile, rename_dir_reserving_at, rename_noreplace_at)
from remsh.slave.policy import DIR_FLAGS, PLAIN, PROC_FD, Policy, check_path_value


#: Bytes read and written at a time by :func:`copy_file`.
COPY_BLOCK = 1 << 20

_KINDS = {
    stat_mod.S_IFDIR: "a directory",
    stat_mod.S_IFIFO: "a FIFO",
    stat_mod.S_IFSOCK: "a socket",
    stat_mod.S_IFCHR: "a character device",
    stat_mod.S_IFBLK: "a block device",
    stat_mod.S_IFLNK: "a symbolic link",
}


def _name(path: bytes) -> str:
    return os.fsdecode(path)


def _message(e: OSError, path: bytes) -> str:
    """``strerror: path`` (the path as requested, not the name relative to
    a directory descriptor that the ``OSError`` carries)."""
    return f"{e.strerror or e}: {_name(path)}"


def kind_of(mode: int) -> str:
    """What a ``st_mode`` is, in words ("a FIFO", "a directory", ...)."""
    return _KINDS.get(stat_mod.S_IFMT(mode), "not a regular file")


# -- reading -----------------------------------------------------------------------

def open_regular(path: bytes, policy: Policy = PLAIN) -> io.FileIO:
    """Open ``path`` for reading, refusing anything but a regular file.

    The open uses ``O_NONBLOCK`` (a FIFO with no writer cannot block it, a
    terminal does not become the controlling one), then ``fstat`` checks the
    file type, then ``O_NONBLOCK`` is cleared for ordinary reads.  Symbolic
    links are followed (inside the root, with one).  The caller closes the
    returned unbuffered file.

    Raises :class:`NotFoundError` (no such file), :class:`OpenFailedError`
    (not a regular file -- the message names the path and its type --,
    permission denied, a socket, ...), :class:`DeniedError` (outside the
    root), :class:`InvalidRequestError` (empty path, NUL).
    """
    try:
        fd = policy.open(path, os.O_RDONLY | O_NONBLOCK | O_NOCTTY)
    except (FileNotFoundError, NotADirectoryError):
        raise NotFoundError(f"no such file: {_name(path)}") from None
    except OSError as e:
        raise OpenFailedError(_message(e, path)) from None
    try:
        st = os.fstat(fd)
        if not stat_mod.S_ISREG(st.st_mode):
            raise OpenFailedError(f"not a regular file ({kind_of(st.st_mode)}): {_name(path)}")
        os.set_blocking(fd, True)
        return io.FileIO(fd, "r", closefd=True)
    except OSError as e:
        os.close(fd)
        raise OpenFailedError(_message(e, path)) from None
    except BaseException:
        os.close(fd)
        raise


def stat_kind(path: bytes, policy: Policy = PLAIN) -> bytes:
    """``b"d"`` for a directory, ``b"f"`` for anything else that exists,
    ``b""`` when nothing is there (symbolic links followed, inside the root).

    Raises :class:`FailedError` (e.g. permission denied on the way),
    :class:`DeniedError`, :class:`InvalidRequestError`.
    """
    check_path_value(path)
    try:
        if not policy.confined:
            st = os.stat(path)
        else:
            fd = policy.open(path, O_PATH or os.O_RDONLY)
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
    except (FileNotFoundError, NotADirectoryError):
        return b""
    except OSError as e:
        raise FailedError(_message(e, path)) from None
    return b"d" if stat_mod.S_ISDIR(st.st_mode) else b"f"


# -- creating ---------------------------------------------------------------------

def create_partial(dest: bytes, mode: Optional[int] = None, policy: Policy = PLAIN) -> PartialFile:
    """A :class:`~remsh.files.PartialFile` that will become ``dest`` (for
    ``send`` and :func:`copy_file`).

    The temporary file is made in ``dest``'s directory, resolved inside the
    root with one (the :class:`PartialFile` keeps its own descriptor of that
    directory, so a later swap of the path changes nothing); it starts with
    ``mode & 0o777`` (less the umask), or ``0o666`` less the umask, and ends
    with ``mode`` less the set-ID bits when the policy restricts anything
    (:meth:`Policy.file_mode`).  Its
    ``commit()`` raises ``FileExistsError`` if ``dest`` appeared meanwhile,
    ``OSError`` otherwise: map them to :class:`RemoteFileExistsError` and
    :class:`FailedError`.  Call ``discard()`` in a ``finally``.

    Raises :class:`RemoteFileExistsError` (``dest`` exists),
    :class:`OpenFailedError` (the directory is missing or not writable),
    :class:`DeniedError`, :class:`InvalidRequestError`.
    """
    try:
        with policy.parent(dest) as (dir_fd, name):
            refuse_existing(dir_fd, name, dest)
            return PartialFile(name, None if mode is None else policy.file_mode(mode), dir_fd=dir_fd)
    except OSError as e:
        raise OpenFailedError(_message(e, dest)) from None


def refuse_existing(dir_fd: Optional[int], name: bytes, dest: bytes) -> None:
    """:class:`RemoteFileExistsError` when ``name`` (in ``dir_fd``, if given) exists (as
    anything, a dangling symbolic link too): ``dest`` must be new."""
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    raise RemoteFileExistsError(f"destination exists: {_name(dest)}")


def copy_file(src: bytes, dest: bytes, mode: Optional[int] = None, policy: Policy = PLAIN,
              tick: Tick = None) -> None:
    """Copy the data of regular file ``src`` to new file ``dest``, atomically.

    ``src`` is opened with :func:`open_regular`; ``dest`` must not exist and
    appears only complete (:func:`create_partial`), with ``mode`` if given.
    ``tick()`` is called after each block.

    Raises :class:`NotFoundError` (no ``src``), :class:`RemoteFileExistsError`
    (``dest`` exists, or appeared during the copy), :class:`FailedError`
    (``src`` is not a regular file or cannot be read, ``dest`` cannot be
    written), :class:`DeniedError`, :class:`InvalidRequestError`.
    """
    try:
        f = open_regular(src, policy)
    except OpenFailedError as e:
        raise FailedError(e.remote_message) from None
    with f:
        try:
            part = create_partial(dest, mode, policy)
        except OpenFailedError as e:
            raise FailedError(e.remote_message) from None
        try:
            buf = bytearray(COPY_BLOCK)
            view = memoryview(buf)
            while True:
                try:
                    n = f.readinto(buf)
                except OSError as e:
                    raise FailedError(_message(e, src)) from None
                if not n:
                    break
                try:
                    part.write(view[:n])
                except OSError as e:
                    raise FailedError(_message(e, dest)) from None
                if tick is not None:
                    tick()
            try:
                part.commit()
            except FileExistsError:
                raise RemoteFileExistsError(f"destination appeared meanwhile: {_name(dest)}") from None
            except OSError as e:
                raise FailedError(_message(e, dest)) from None
        finally:
            part.discard()


def make_dirs(path: bytes, policy: Policy = PLAIN) -> None:
    """``mkdir -p``: make ``path`` and its missing parents; an existing
    directory is fine (a symbolic link to one too, inside the root).

    Raises :class:`FailedError` (a component exists and is not a directory,
    permission denied, ...), :class:`DeniedError`, :class:`InvalidRequestError`.
    """
    check_path_value(path)
    if not policy.confined:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise FailedError(_message(e, path)) from None
        return
    try:
        # find the deepest existing ancestor, then make the rest downwards
        missing: List[bytes] = []
        p = path
        while True:
            try:
                os.close(policy.open(p, DIR_FLAGS))
                break
            except FileNotFoundError:
                missing.append(p)
                up = os.path.dirname(p.rstrip(b"/"))
                if not up or up == p:
                    break  # relative: the root itself is next, and exists
                p = up
        for p in reversed(missing):
            last = p.rstrip(b"/").rpartition(b"/")[2]
            if last not in (b".", b".."):
                with policy.parent(p) as (dir_fd, name):
                    try:
                        os.mkdir(name, 0o777, dir_fd=dir_fd)
                        continue
                    except FileExistsError:
                        pass
            os.close(policy.open(p, DIR_FLAGS))  # exists (now): a directory?
    except OSError as e:
        raise FailedError(_message(e, path)) from None


# -- removing and renaming ------------------------------------------------------------

def unlink_file(path: bytes, policy: Policy = PLAIN) -> None:
    """Remove the file (or symbolic link) ``path``; a missing one is an error.

    Raises :class:`NotFoundError` (nothing there), :class:`FailedError` (a
    directory, permission denied, ...), :class:`DeniedError`,
    :class:`InvalidRequestError`.
    """
    try:
        with policy.parent(path) as (dir_fd, name):
            os.unlink(name, dir_fd=dir_fd)
    except (FileNotFoundError, NotADirectoryError):
        raise NotFoundError(f"no such file: {_name(path)}") from None
    except OSError as e:
        raise FailedError(_message(e, path)) from None


#: The ``renameat2`` call, looked up here so that tests can force the fallback.
_noreplace = rename_noreplace_at


def _rename_at(sname: bytes, dname: bytes, sfd: Optional[int], dfd: Optional[int]) -> None:
    """Rename without replacing; ``FileExistsError`` when ``dname`` exists."""
    try:
        _noreplace(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
        return
    except OSError as e:
        if e.errno not in NOREPLACE_UNSUPPORTED:
            raise
    st = os.stat(sname, dir_fd=sfd, follow_symlinks=False)
    if stat_mod.S_ISDIR(st.st_mode):
        rename_dir_reserving_at(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
        return
    try:
        os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        # no hard links here either: check, then rename (a destination made
        # in the instant between would be replaced)
        try:
            os.stat(dname, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
            return
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dname) from None
    try:
        os.unlink(sname, dir_fd=sfd)
    except BaseException:
        try:
            os.unlink(dname, dir_fd=dfd)
        except OSError:
            pass
        raise


def rename_noreplace(src: bytes, dest: bytes, policy: Policy = PLAIN) -> None:
    """Rename ``src`` (file, link or directory) to ``dest``, which must not exist.

    Atomic where the kernel has ``renameat2(RENAME_NOREPLACE)`` (Linux 3.15,
    most local file systems) and for files everywhere (``link`` +
    ``unlink``); for a directory without ``renameat2`` see
    :func:`_rename_at` for the one remaining window.

    Raises :class:`NotFoundError` (no ``src``), :class:`RemoteFileExistsError`
    (``dest`` exists), :class:`FailedError` (anything else: ``dest``'s
    directory missing, another file system, permission denied, a directory
    into itself), :class:`DeniedError`, :class:`InvalidRequestError` (also
    for a path ending in ``.`` or ``..``).
    """
    with contextlib.ExitStack() as stack:
        try:
            sfd, sname = stack.enter_context(policy.parent(src))
        except (FileNotFoundError, NotADirectoryError):
            raise NotFoundError(f"no such file or directory: {_name(src)}") from None
        except OSError as e:
            raise FailedError(_message(e, src)) from None
        try:
            dfd, dname = stack.enter_context(policy.parent(dest))
        except OSError as e:
            raise FailedError(_message(e, dest)) from None
        try:
            _rename_at(sname, dname, sfd, dfd)
        except FileExistsError:
            raise RemoteFileExistsError(f"destination exists: {_name(dest)}") from None
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                try:
                    os.stat(sname, dir_fd=sfd, follow_symlinks=False)
                except (FileNotFoundError, NotADirectoryError):
                    raise NotFoundError(f"no such file or directory: {_name(src)}") from None
                except OSError:
                    pass
            raise FailedError(f"{e.strerror or e}: {_name(src)} -> {_name(dest)}") from None


def remove_tree(path: bytes, policy: Policy = PLAIN, tick: Tick = None) -> None:
    """``rm -rf path``: remove a file, link or whole tree; a missing path is fine.

    Symbolic links are removed, never followed.  Where a directory *inside*
    the tree (``path`` itself included) lacks read, write or search rights
    for its owner, they are added (it is about to go); nothing outside the
    tree changes, not even ``path``'s parent: when the parent itself forbids
    the removal, it fails.  ``tick()`` is called for each entry.

    Raises :class:`FailedError` (permission denied, busy, ...: whatever is
    left stays), :class:`DeniedError` (outside the root, or the root
    itself), :class:`InvalidRequestError` (empty, NUL, ending in ``.`` or
    ``..`` or ``/`` alone).
    """
    try:
        with policy.parent(path) as (dir_fd, name):
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                return
            if stat_mod.S_ISDIR(st.st_mode):
                remove_dir_at(dir_fd, name, tick)
            else:
                try:
                    os.unlink(name, dir_fd=dir_fd)
                except FileNotFoundError:
                    pass
    except (FileNotFoundError, NotADirectoryError):
        return  # no parent directory: nothing to remove
    except OSError as e:
        raise FailedError(_message(e, path)) from None


def chmod(path: bytes, mode: int, policy: Policy = PLAIN) -> None:
    """Set the permission bits of ``path`` to ``mode``, never through a
    symbolic link (a link is refused: its target may lie anywhere).

    Under a restricting policy the set-user-ID and set-group-ID bits are
    dropped from ``mode`` (:meth:`Policy.file_mode`), and the root itself
    may not be changed (the master could open it to everyone, or close it
    to the slave's own user).

    :raises NotFoundError: ``path`` does not exist
    :raises FailedError: it is a symbolic link, or the change failed
    :raises DeniedError: ``path`` is outside the root, or the root itself
    """
    mode = policy.file_mode(mode)
    try:
        fd = policy.open(path, O_PATH | O_NOFOLLOW)
    except FileNotFoundError:
        raise NotFoundError(f"no such file or directory: {_name(path)}") from None
    except OSError as e:
        raise FailedError(_message(e, path)) from None
    try:
        st = os.fstat(fd)
        if stat_mod.S_ISLNK(st.st_mode):
            raise FailedError(f"is a symbolic link (chmod never follows one): {_name(path)}")
        if policy.is_root(st):
            raise DeniedError(f"the slave's root itself cannot be changed: {_name(path)}")
        by_fd = b"%s/%d" % (PROC_FD, fd)
        os.chmod(by_fd if os.path.exists(by_fd) else path, mode)
    except OSError as e:
        raise FailedError(_message(e, path)) from None
    finally:
        os.close(fd)
