"""What a slave agrees to do for its master: its ``--root``, ``--no-execute``
and ``--allow-command`` options.

A slave run by someone who does not fully trust the master narrows what the
master may do; every refusal is a :class:`~remsh.errors.DeniedError`
(errtag ``denied``).

Confinement to a root
---------------------

With a root, every path of every operation must resolve inside the root
after ``..``, absolute paths and symbolic links.  Checking a path string and
then using it would race: a symbolic link swapped in between the check and
the use would lead outside.  So the policy never hands out a checked *path*;
it hands out *descriptors* opened beneath the root, and the operation works
relative to them with the ``*at`` calls (``os.open(name, dir_fd=...)``,
``os.mkdir(name, dir_fd=...)``, ``os.rename(..., src_dir_fd=, dst_dir_fd=)``,
``os.unlink(name, dir_fd=...)``, ``os.stat(name, dir_fd=..., follow_symlinks=False)``):

- :meth:`Policy.open` opens a whole path (following symbolic links that stay
  inside the root);
- :meth:`Policy.parent` opens the directory holding a path's last component
  and gives back ``(dir_fd, name)``; the ``*at`` calls on a single name never
  follow a symbolic link in ``name`` (except ``open`` without
  ``O_NOFOLLOW``), so nothing leaves the directory that was resolved.

Resolution uses Linux's ``openat2`` with ``RESOLVE_BENEATH`` (and
``RESOLVE_NO_MAGICLINKS``) where the kernel has it (5.6 and later); the
kernel then refuses, atomically, any step out of the root.  Elsewhere it walks
the path one component at a time from a descriptor of the root, opening each
with ``O_NOFOLLOW``, reading symbolic links itself and keeping a stack of the
directories it went through so that ``..`` can never climb above the root.
Both refuse an absolute symbolic link (even one naming a place inside the
root: ``RESOLVE_BENEATH`` does, and the walk does the same so that the
behaviour does not depend on the kernel).

The root is named by its real path and opened afresh by each operation; who
can rename the root's own ancestors is trusted (the master cannot: it only
reaches inside the root, unless commands may run -- see below).

Rejected alternatives: ``os.path.realpath`` + prefix check (races with a
swapped symbolic link); ``chroot`` (needs root, and would hide the Python
installation from ``execute``); ``RESOLVE_IN_ROOT`` (it silently re-roots
absolute symbolic links instead of refusing them, which would make the same
link mean different things inside and outside remsh).

Without a root, resolution is the plain system one: :meth:`Policy.open` is
``os.open`` and :meth:`Policy.parent` gives ``(None, path)`` without a system
call (``dir_fd=None`` is what the ``*at`` calls take for "no directory").

Commands
--------

``execute=False`` refuses every command.  ``allow_commands`` (glob patterns,
:func:`fnmatch.fnmatchcase`) lets a command run only when its program -- the
file ``argv[0]`` names, after the same ``PATH`` search the command's start
would do (see :meth:`Policy.check_execute`) -- matches.  A policy that lets
commands run cannot confine them: a command can do what the slave's user can
do, root or no root.

The environment decides what an allowed program does as much as the program
does: ``LD_PRELOAD``, ``LD_LIBRARY_PATH`` or ``LD_AUDIT`` load any library
into it, ``GCONV_PATH``, ``PYTHONPATH``, ``BASH_ENV``, ``PERL5OPT`` and many
more make it run code of the master's choosing (a library the master has
just sent into the root, say).  So with ``allow_commands`` every variable a
request sets or removes must match one of ``allow_env``'s patterns
(:meth:`Policy.check_env`; none by default: the commands get the slave's own
environment, unchanged).

Set-ID files
------------

A slave with any policy (:attr:`Policy.restricted`) never makes a file
set-user-ID or set-group-ID: :meth:`Policy.file_mode` drops those bits from
every mode a master asks for (``send``, ``chmod``, the records of
``send_tree`` and ``sync_tree``), so a confined master cannot plant a program
that runs with someone else's rights, and ``chmod`` of the root itself is
refused.

Reading the environment
-----------------------

``getenv`` is refused unless commands may run freely
(:meth:`Policy.check_getenv`): under ``execute=False`` or ``allow_commands``
the slave's own variables (credentials, often) stay on the slave.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import logging
import os
import stat as stat_mod
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from remsh.errors import DeniedError, InvalidRequestError, NotFoundError, UsageError
from remsh.files import O_CLOEXEC, O_DIRECTORY, O_NOFOLLOW, O_PATH
from remsh.handshake import MAX_POLICY_BYTES, MAX_POLICY_VALUE_LENGTH

log = logging.getLogger(__name__)

#: Flags of a descriptor used only to name a directory (no read right needed).
DIR_FLAGS = (O_PATH or os.O_RDONLY) | O_DIRECTORY | O_CLOEXEC

#: openat2's ``resolve`` flags (linux/openat2.h).
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08
SYS_OPENAT2 = 437  # the same on every architecture (new system call numbering)
#: Bound on symbolic links followed in one resolution (the kernel's own).
MAX_SYMLINKS = 40
#: How often a resolution is retried when openat2 answers EAGAIN (a rename
#: elsewhere on the system raced with it).
OPENAT2_RETRIES = 16
#: Longest ``policy_allow_command`` or ``policy_allow_env`` value: what the
#: master accepts in a register box (a longer one would be refused there).
MAX_INFO_VALUE = MAX_POLICY_VALUE_LENGTH
#: The set-user-ID and set-group-ID bits, dropped by a restricting policy.
SETID_BITS = stat_mod.S_ISUID | stat_mod.S_ISGID

#: Where this process's descriptors appear as paths (for chdir to a descriptor
#: in a command about to start).
PROC_FD = b"/proc/self/fd"


def _patterns(given: Sequence[str], what: str) -> Tuple[str, ...]:
    """``given`` as a tuple, checked: non-empty strings without NUL that fit,
    joined, in one box value (:class:`UsageError` otherwise)."""
    patterns = tuple(given)
    for p in patterns:
        if not isinstance(p, str) or not p or "\0" in p:
            raise UsageError(f"{'an' if what[0] in 'aeiou' else 'a'} {what} pattern must be a non-empty "
                             f"string without NUL: {p!r}")
    if len("\0".join(patterns).encode("utf-8", "surrogateescape")) > MAX_INFO_VALUE:
        raise UsageError(f"the {what} patterns are too long to report to the master")
    return patterns


def _denied(path: bytes, why: str = "outside the slave's root") -> DeniedError:
    return DeniedError(f"{why}: {os.fsdecode(path)}")


def check_path_value(path: bytes, what: str = "path") -> bytes:
    """``path`` itself if it is a usable path: non-empty and without NUL.

    Raises :class:`InvalidRequestError` otherwise.
    """
    if not path or b"\0" in path:
        raise InvalidRequestError(f"{what!r} must be a non-empty path without NUL")
    return path


def _split_last(path: bytes) -> Tuple[bytes, bytes]:
    """``(head, name)`` of a path whose last component is a real name.

    Raises :class:`InvalidRequestError` for a last component of ``.``, ``..``
    or nothing (``/``).
    """
    trimmed = path.rstrip(b"/")
    head, _, name = trimmed.rpartition(b"/")
    if name in (b"", b".", b".."):
        raise InvalidRequestError(f"path must end in a name (not '.', '..' or '/'): {os.fsdecode(path)}")
    if not head and trimmed.startswith(b"/"):
        head = b"/"
    return head, name


# -- openat2 ------------------------------------------------------------------

_openat2: "Optional[object]" = None  # resolved on first use: a callable, or False


def _load_openat2() -> object:
    """A callable ``(dirfd, path, flags, mode, resolve) -> fd`` for openat2, or
    False when this system has none (no ctypes, no system call, or a sandbox
    that refuses it)."""
    try:
        import ctypes
    except ImportError:  # pragma: no cover
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        syscall = libc.syscall
    except (OSError, AttributeError):  # pragma: no cover
        return False
    syscall.restype = ctypes.c_long

    class OpenHow(ctypes.Structure):
        _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]

    def call(dirfd: int, path: bytes, flags: int, mode: int, resolve: int) -> int:
        how = OpenHow(flags, mode if flags & os.O_CREAT else 0, resolve)
        for attempt in range(OPENAT2_RETRIES):
            fd = int(syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dirfd), ctypes.c_char_p(path),
                             ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how))))
            if fd >= 0:
                return fd
            err = ctypes.get_errno()
            if err != errno.EAGAIN:
                raise OSError(err, os.strerror(err), path)
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), path)

    probe = os.open(b"/", DIR_FLAGS)
    try:
        os.close(call(probe, b".", DIR_FLAGS, 0, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS))
    except OSError as e:
        log.debug("openat2 unavailable (%s): paths are checked by a component walk", e)
        return False
    finally:
        os.close(probe)
    return call


def _openat2_fn() -> Optional[Callable[[int, bytes, int, int, int], int]]:
    global _openat2
    if _openat2 is None:
        _openat2 = _load_openat2()
    return _openat2 if callable(_openat2) else None


def openat2_available() -> bool:
    """True when this kernel resolves paths beneath a root by itself."""
    return _openat2_fn() is not None


# -- the component walk (no openat2) ---------------------------------------------

def _walk_open(root_fd: int, rel: bytes, flags: int, mode: int, whole: bytes) -> int:
    """Open ``rel`` beneath ``root_fd`` one component at a time.

    Every component is opened with ``O_NOFOLLOW``; symbolic links are read and
    their (relative) targets spliced into the rest of the path; ``..`` pops
    the stack of directories walked through and is refused at the root.
    ``whole`` is the path as requested, for messages.  Raises
    :class:`DeniedError` for a step out, ``OSError`` for the rest.
    """
    comps: List[bytes] = [c for c in rel.split(b"/") if c and c != b"."]
    comps.reverse()  # a stack: the next component is comps[-1]
    stack: List[int] = []  # directories below the root, innermost last
    follow_last = not flags & O_NOFOLLOW
    links = 0
    try:
        if not comps:
            return os.open(b".", flags | O_CLOEXEC, mode, dir_fd=root_fd)
        while comps:
            comp = comps.pop()
            if comp == b".":
                continue
            if comp == b"..":
                if not stack:
                    raise _denied(whole)
                os.close(stack.pop())
                continue
            cur = stack[-1] if stack else root_fd
            if comps:  # a directory on the way
                fd = os.open(comp, O_PATH | O_NOFOLLOW | O_CLOEXEC, dir_fd=cur)
                kind = stat_mod.S_IFMT(os.fstat(fd).st_mode)
                if kind == stat_mod.S_IFDIR:
                    stack.append(fd)
                    continue
                os.close(fd)
                if kind != stat_mod.S_IFLNK:
                    raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), whole)
            else:  # the last component
                try:
                    fd = os.open(comp, flags | O_NOFOLLOW | O_CLOEXEC, mode, dir_fd=cur)
                except OSError as e:
                    # a symbolic link opened with O_NOFOLLOW: ELOOP, or
                    # ENOTDIR with O_DIRECTORY
                    if not follow_last or e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    try:
                        is_link = stat_mod.S_ISLNK(os.stat(comp, dir_fd=cur, follow_symlinks=False).st_mode)
                    except OSError:
                        is_link = False
                    if not is_link:
                        raise
                else:
                    if not (follow_last and flags & O_PATH and stat_mod.S_ISLNK(os.fstat(fd).st_mode)):
                        return fd
                    os.close(fd)  # O_PATH opened the link itself: follow it
            links += 1
            if links > MAX_SYMLINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), whole)
            target = os.readlink(comp, dir_fd=cur)
            if target.startswith(b"/"):
                raise _denied(whole, "absolute symbolic link on the way")
            comps.extend(reversed([c for c in target.split(b"/") if c and c != b"."]))
        # only reached when the path ended in "..", or in a link to "."
        cur = stack[-1] if stack else root_fd
        return os.open(b".", (flags & ~O_NOFOLLOW) | O_CLOEXEC, mode, dir_fd=cur)
    finally:
        for fd in stack:
            os.close(fd)


# -- the policy -------------------------------------------------------------------

class Policy:
    """What this slave agrees to do; immutable.

    ``root``: confine every path to this directory (its real path is kept);
    ``None`` for no confinement.  ``execute``: whether ``execute`` may run
    commands at all.  ``allow_commands``: glob patterns the program of a
    command must match (empty: any program).  ``allow_env``: glob patterns
    (case counts) the name of every variable a command's request sets or
    removes must match when there are ``allow_commands`` (empty: none may).

    Raises :class:`~remsh.errors.UsageError` when ``root`` is not an existing
    directory, a pattern is empty, contains NUL, or the patterns do not fit
    in a box value, or ``allow_env`` is given without ``allow_commands``
    (where it would mean nothing: any command may then change its own
    environment).
    """

    __slots__ = ("root", "execute", "allow_commands", "allow_env", "_root_parts")

    root: Optional[bytes]
    execute: bool
    allow_commands: Tuple[str, ...]
    allow_env: Tuple[str, ...]
    _root_parts: Tuple[bytes, ...]

    def __init__(self, root: Optional[Union[str, bytes]] = None, execute: bool = True,
                 allow_commands: Sequence[str] = (), allow_env: Sequence[str] = ()) -> None:
        root_b: Optional[bytes] = None
        if root is not None:
            given = os.fsencode(root)
            if not given or b"\0" in given:
                raise UsageError("the root must be a non-empty path without NUL")
            root_b = os.path.realpath(os.path.abspath(given))
            if not os.path.isdir(root_b):
                raise UsageError(f"the root is not a directory: {os.fsdecode(given)}")
        patterns = _patterns(allow_commands, "command")
        env_patterns = _patterns(allow_env, "environment")
        if env_patterns and not patterns:
            raise UsageError("environment patterns (--allow-env) apply only with command patterns "
                             "(--allow-command)")
        if sum(len(os.fsencode(k)) + len(os.fsencode(v)) for k, v in self._info(root_b, execute, patterns,
                                                                                 env_patterns).items()) \
                > MAX_POLICY_BYTES:
            raise UsageError(f"the policy is too long to report to the master (over {MAX_POLICY_BYTES} bytes)")
        object.__setattr__(self, "root", root_b)
        object.__setattr__(self, "execute", bool(execute))
        object.__setattr__(self, "allow_commands", patterns)
        object.__setattr__(self, "allow_env", env_patterns)
        object.__setattr__(self, "_root_parts",
                           tuple(c for c in root_b.split(b"/") if c) if root_b is not None else ())

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("a Policy is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("a Policy is immutable")

    def __repr__(self) -> str:
        return (f"Policy(root={self.root!r}, execute={self.execute!r}, "
                f"allow_commands={self.allow_commands!r}, allow_env={self.allow_env!r})")

    def key(self) -> Tuple[Optional[bytes], bool, Tuple[str, ...], Tuple[str, ...]]:
        """What decides equality: root, execute, allowed commands and environment."""
        return (self.root, self.execute, self.allow_commands, self.allow_env)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Policy):
            return NotImplemented
        return self.key() == other.key()

    def __hash__(self) -> int:
        return hash(self.key())

    @property
    def confined(self) -> bool:
        """True when paths are confined to a root."""
        return self.root is not None

    @property
    def restricted(self) -> bool:
        """True when this policy narrows anything (a root, no commands, or
        command patterns): the master is not fully trusted."""
        return self.root is not None or not self.execute or bool(self.allow_commands)

    # -- what the master is told ---------------------------------------------

    def info(self) -> Dict[str, str]:
        """The keys the slave adds to its register box (values as ``str``;
        encode them with ``os.fsencode``): ``policy_execute`` (``y``/``n``)
        always, ``policy_root`` with a root, ``policy_allow_command`` (the
        patterns joined with NUL) with command patterns, ``policy_allow_env``
        (likewise) with environment patterns."""
        return self._info(self.root, self.execute, self.allow_commands, self.allow_env)

    @staticmethod
    def _info(root: Optional[bytes], execute: bool, allow_commands: Tuple[str, ...],
              allow_env: Tuple[str, ...]) -> Dict[str, str]:
        out = {"policy_execute": "y" if execute else "n"}
        if root is not None:
            out["policy_root"] = os.fsdecode(root)
        if allow_commands:
            out["policy_allow_command"] = "\0".join(allow_commands)
        if allow_env:
            out["policy_allow_env"] = "\0".join(allow_env)
        return out

    # -- paths -------------------------------------------------------------------

    def _relative(self, path: bytes) -> bytes:
        """``path`` relative to the root (``b"."`` for the root itself).

        An absolute path must be spelt under the root's real path (the one
        :meth:`info` reports); a relative one is taken against the root.
        Raises :class:`DeniedError` for an absolute path elsewhere.
        """
        if not path.startswith(b"/"):
            return path
        parts = [c for c in path.split(b"/") if c and c != b"."]
        n = len(self._root_parts)
        if tuple(parts[:n]) != self._root_parts:
            raise _denied(path)
        return b"/".join(parts[n:]) or b"."

    def _open_root(self) -> int:
        assert self.root is not None
        try:
            return os.open(self.root, DIR_FLAGS)
        except OSError as e:
            raise DeniedError(f"the slave's root is unavailable: {e.strerror}") from None

    def _open_beneath(self, root_fd: int, rel: bytes, flags: int, mode: int, whole: bytes) -> int:
        openat2 = _openat2_fn()
        if openat2 is None:
            return _walk_open(root_fd, rel, flags, mode, whole)
        try:
            return openat2(root_fd, rel, flags | O_CLOEXEC, mode, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
        except OSError as e:
            if e.errno == errno.EXDEV:
                raise _denied(whole) from None
            raise OSError(e.errno, e.strerror, whole) from None

    def open(self, path: bytes, flags: int, mode: int = 0o666) -> int:
        """``os.open(path, flags, mode)``, inside the root when there is one.

        Symbolic links are followed while they stay inside the root (the last
        one too, unless ``flags`` has ``O_NOFOLLOW``).  The descriptor is
        close-on-exec; the caller closes it.

        Raises :class:`InvalidRequestError` for an empty path or one with
        NUL, :class:`DeniedError` for a path that leads out of the root, and
        ``OSError`` for what ``open`` itself fails with (``ENOENT``, ...).
        """
        check_path_value(path)
        if self.root is None:
            return os.open(path, flags | O_CLOEXEC, mode)
        rel = self._relative(path)
        root_fd = self._open_root()
        try:
            return self._open_beneath(root_fd, rel, flags, mode, path)
        finally:
            os.close(root_fd)

    @contextlib.contextmanager
    def parent(self, path: bytes) -> Iterator[Tuple[Optional[int], bytes]]:
        """``(dir_fd, name)`` for a path's last component, for the ``*at`` calls.

        With a root, ``dir_fd`` is a descriptor (``O_PATH``) of the directory
        holding ``name``, resolved inside the root and closed when the block
        ends; ``name`` is a single component.  Without a root, ``(None,
        path)``: the plain call on the whole path, at no cost.

        Use ``name`` only through calls that do not follow a symbolic link in
        it: ``os.unlink``, ``os.rmdir``, ``os.mkdir``, ``os.rename``,
        ``os.link(..., follow_symlinks=False)``, ``os.stat(...,
        follow_symlinks=False)``, ``os.open`` with ``O_NOFOLLOW`` or
        ``O_CREAT | O_EXCL``.

        Raises :class:`InvalidRequestError` for a path with NUL or ending in
        ``.``, ``..`` or ``/`` alone; :class:`DeniedError` for a path out of
        the root or the root itself; ``OSError`` when the directory cannot be
        opened (``ENOENT``, ``ENOTDIR``, ``EACCES``, ...).
        """
        check_path_value(path)
        head, name = _split_last(path)
        if self.root is None:
            yield None, path
            return
        rel = self._relative(head or b".")
        root_fd = self._open_root()
        try:
            dir_fd = self._open_beneath(root_fd, rel, DIR_FLAGS, 0, path)
        finally:
            os.close(root_fd)
        try:
            yield dir_fd, name
        finally:
            os.close(dir_fd)

    def check_cwd(self, path: bytes) -> bytes:
        """The directory a ``set_cwd`` (or an ``execute`` ``cwd``) lands in.

        Without a root: ``path`` normalised (``os.path.normpath``), checked to
        be a directory.  With a root: the directory's real path, after
        resolving ``path`` inside the root (symbolic links resolved, as
        ``pwd -P`` shows it).

        Raises :class:`InvalidRequestError` (empty, NUL),
        :class:`NotFoundError` (no such directory), :class:`DeniedError`
        (outside the root).
        """
        check_path_value(path, "cwd")
        if self.root is None:
            new = os.path.normpath(path)
            if not os.path.isdir(new):
                raise NotFoundError(f"no such directory: {os.fsdecode(new)}")
            return new
        fd = self._open_dir(path)
        try:
            return self._real_dir(fd, path)
        finally:
            os.close(fd)

    def _open_dir(self, path: bytes) -> int:
        """A descriptor naming the directory ``path`` inside the root;
        :class:`NotFoundError` or :class:`DeniedError` when it cannot be had."""
        try:
            return self.open(path, DIR_FLAGS)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                raise NotFoundError(f"no such directory: {os.fsdecode(path)}") from None
            raise DeniedError(f"cannot use the directory {os.fsdecode(path)}: {e.strerror}") from None

    def _real_dir(self, fd: int, path: bytes) -> bytes:
        """The path of directory ``fd`` (opened inside the root)."""
        assert self.root is not None
        try:
            real = os.readlink(b"%s/%d" % (PROC_FD, fd))
        except OSError:
            real = b""
        if real.startswith(b"/"):
            try:
                rel = self._relative(real)
            except DeniedError:
                rel = b""  # e.g. the root itself was moved: fall back below
            if rel:
                return real
        norm = os.path.normpath(path if path.startswith(b"/") else os.path.join(self.root, path))
        self._relative(norm)
        return norm

    @contextlib.contextmanager
    def exec_cwd(self, path: bytes) -> Iterator[bytes]:
        """The ``cwd`` to give ``subprocess.Popen`` for a command to start in
        ``path``, valid until the block ends.

        Without a root: ``path`` as given (the start reports a missing
        directory, as before).  With a root: the directory is opened inside
        the root and the command starts in *that* directory through
        ``/proc/self/fd/N`` (the child changes to it before the descriptor is
        closed at ``exec``), so a symbolic link swapped in after the check
        cannot move the command out.  Without ``/proc`` the checked real path
        is given (a swap in the instant before the start would then win).

        Raises what :meth:`check_cwd` raises.
        """
        check_path_value(path, "cwd")
        if self.root is None:
            yield path
            return
        fd = self._open_dir(path)
        try:
            by_fd = b"%s/%d" % (PROC_FD, fd)
            yield by_fd if os.path.isdir(by_fd) else self._real_dir(fd, path)
        finally:
            os.close(fd)

    # -- commands ------------------------------------------------------------------

    def check_execute(self, argv: Sequence[bytes], env_path: Optional[bytes],
                      cwd: Optional[bytes] = None) -> Optional[bytes]:
        """Check that ``argv`` may run; the program to start, or ``None``.

        ``env_path`` is the command's effective ``PATH`` (its own environment's,
        ``None`` when it has none: then ``os.defpath``), ``cwd`` the directory
        it starts in (for ``./prog`` and relative ``PATH`` entries; default
        the slave's own).

        With ``allow_commands``, the program is found the way ``execvp``
        finds it: ``argv[0]`` itself when it contains a ``/``, else the first
        executable non-directory ``DIR/argv[0]`` along ``PATH``.  It may run
        when its absolute, normalised path or that path with every symbolic
        link resolved (``os.path.realpath``) matches a pattern
        (:func:`fnmatch.fnmatchcase`; ``*`` also matches ``/``).  ``argv[0]``
        as given is never matched by itself: a bare name would let any
        program of that name anywhere on a ``PATH`` the master chooses run.
        The path that matched is returned: start exactly that program
        (``Popen(executable=...)``), so that the ``PATH`` search cannot find
        something else the second time.  Without ``allow_commands``: ``None``
        (search as usual).

        Raises :class:`InvalidRequestError` for an empty ``argv`` or NUL in
        ``argv[0]``; :class:`DeniedError` when execution is off, the program
        is not found, or it matches no pattern.
        """
        if not argv or not argv[0]:
            raise InvalidRequestError("'args' is empty")
        name = argv[0]
        if b"\0" in name:
            raise InvalidRequestError("the program name contains NUL")
        if not self.execute:
            raise DeniedError("this slave does not run commands (--no-execute)")
        if not self.allow_commands:
            return None
        base = cwd if cwd is not None else os.getcwdb()
        if b"/" in name:
            candidates = [name]
        else:
            search = env_path if env_path is not None else os.defpath.encode()
            candidates = [os.path.join(d or b".", name) for d in search.split(b":")]
        found: Optional[bytes] = None
        for cand in candidates:
            full = os.path.join(base, cand)
            try:
                st = os.stat(full)
            except (OSError, ValueError):
                continue
            if not stat_mod.S_ISDIR(st.st_mode) and os.access(full, os.X_OK):
                found = full
                break
        if found is None:
            raise DeniedError(f"command not allowed: {os.fsdecode(name)} (not found"
                              f"{'' if b'/' in name else ' on PATH'})")
        for path in (os.path.normpath(found), os.path.realpath(found)):
            text = os.fsdecode(path)
            if any(fnmatch.fnmatchcase(text, p) for p in self.allow_commands):
                return path
        raise DeniedError(f"command not allowed: {os.fsdecode(name)} ({os.fsdecode(os.path.normpath(found))}"
                          " matches no --allow-command pattern)")


    def check_env(self, names: Iterable[bytes]) -> None:
        """Check that a command's request may set or remove the variables ``names``.

        Without ``allow_commands`` anything goes (a command that may be
        anything may as well set its own environment).  With them, every
        name must match an ``allow_env`` pattern
        (:func:`fnmatch.fnmatchcase`): the dynamic loader's ``LD_*``
        variables, ``PYTHONPATH``, ``BASH_ENV`` and their like would
        otherwise make an allowed program run code of the master's choosing.

        Raises :class:`DeniedError` naming the first name that matches no
        pattern.
        """
        if not self.allow_commands:
            return
        for name in names:
            text = os.fsdecode(name)
            if not any(fnmatch.fnmatchcase(text, p) for p in self.allow_env):
                raise DeniedError(f"environment variable not allowed: {text[:80]} (matches no --allow-env "
                                  "pattern; with --allow-command a request may not change the environment "
                                  "otherwise)")

    def check_getenv(self) -> None:
        """Check that the master may read the slave's environment (``getenv``).

        Refused (:class:`DeniedError`) under ``execute=False`` and under
        ``allow_commands``: the environment of a slave often holds
        credentials (cloud keys, tokens) that a master kept from running
        arbitrary commands must not read.  With a root alone it is allowed:
        any command may run, and ``env`` would print the same.
        """
        if not self.execute or self.allow_commands:
            raise DeniedError("getenv refused: this slave does not let its master read its environment "
                              "(--no-execute or --allow-command)")

    def is_root(self, st: os.stat_result) -> bool:
        """True when ``st`` (of something opened through this policy) is the
        root directory itself; always False without a root."""
        if self.root is None:
            return False
        try:
            here = os.stat(self.root)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)

    def file_mode(self, mode: int) -> int:
        """``mode`` as this slave applies it: without the set-user-ID and
        set-group-ID bits when the policy restricts anything
        (:attr:`restricted`), as given otherwise."""
        return mode & ~SETID_BITS if self.restricted else mode


#: The policy of a slave started without options: no root, every command.
PLAIN = Policy()
