"""Directory trees as a stream of boxes, for ``send_tree``, ``fetch_tree``
and ``sync_tree``: the record format, the walk that produces it and the
writer that applies it.  Both ends use this module: the sender of a tree is
the master for ``send_tree``/``sync_tree`` and the slave for ``fetch_tree``.

The format (docs/protocol.rst, "Directory trees", is the reference)
====================================================================

A tree travels as one stream of *records*, in the order of a depth-first
walk with each directory's entries sorted by name (as bytes).  Every record
is one box with a ``t`` (type) key; a regular file's data may continue over
more boxes.  A name (``n``) is one path component: non-empty, no ``/``, no
NUL, not ``.`` or ``..``; so a record can never reach outside the directory
it is in.

``{t: d, n, m, mt}``
    enter the directory ``n`` (made in the current one); the first record of
    a stream is the top directory itself and has no ``n``.  ``m`` is the
    permission bits (decimal, up to 4095), ``mt`` the modification time in
    nanoseconds since the epoch; both are applied when the directory is
    left, so that a read-only directory can still be filled.
``{t: u}``
    leave the current directory (the one entered last).
``{t: f, n, m, mt}`` + data
    a regular file.  The record box and the boxes after it may carry ``d``
    (data, up to 65535 bytes); the box that carries ``h`` (the SHA-256 of the
    file's data, 64 lower-case hex digits) ends the file.  A file of up to
    65535 bytes is one box: ``{t: f, n, m, mt, d, h}``.
``{t: l, n, l, mt}``
    a symbolic link with target ``l`` (never followed, on either end).
``{t: x, n}`` (``sync_tree`` only)
    remove ``n`` (file, link or whole directory) from the current directory.
``{t: a, n, m, mt}`` (``sync_tree`` only)
    an unchanged file whose permission bits or time differ: set them.

A *manifest* (what ``sync_tree``'s slave reports of its destination) uses
the same records without data: a file is ``{t: f, n, m, mt, s}`` (``s`` the
size, plus ``h`` when checksums were asked for), anything else that is not
a directory or a link ``{t: o, n}``.

Verification is per file: the sender hashes exactly the bytes it read and
sent, the receiver the bytes it received and wrote, and a mismatch fails the
whole call naming the file.  The sender also checks that a file's size did
not change while it was read (it reads past the size it found at ``open``
and compares): a file that grows or shrinks meanwhile fails the call; one
rewritten in place at the same size is sent as read, and its digest is of
what was read.

Why per-file digests rather than one over the stream: the error can name
the file, a receiver can check each file before it goes on, and ``sync_tree``
needs per-file digests anyway to compare content.

The walk holds one descriptor per directory level (opened with
``O_NOFOLLOW`` relative to its parent) and the sorted names of each
directory on the way down, never the whole tree; every file is opened with
``O_NOFOLLOW | O_NONBLOCK`` relative to its directory, so a symbolic link or
a FIFO swapped in cannot be followed or block the walk.  The writer works
the same way, with the ``*at`` calls on descriptors, and writes runs of zero
bytes as holes (a sparse file stays sparse, and needs no disk for them).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat as stat_mod
import struct
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

from remsh.errors import PeerTimeout
from remsh.files import (O_CLOEXEC, O_DIRECTORY, O_NOCTTY, O_NOFOLLOW, O_NONBLOCK, O_PATH, TEMP_SUFFIX,
                         rename_dir_noreplace_at)
from remsh.wire import END_OF_BOX, MAX_VALUE_LENGTH, Box, decode_int


#: Flags of a directory opened for listing, never through a symbolic link.
DIR_OPEN = os.O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC
#: Flags of a file opened for reading by the walk.
FILE_OPEN = os.O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC

#: Bytes read from a file at a time.
READ_BLOCK = 1 << 20
#: Encoded records are gathered up to this many bytes before one write.
SEND_BUFFER = 256 * 1024
#: At most this many offending paths are named in one error message.
MAX_NAMED = 50
#: Longest relative path (bytes) of a directory a received stream may make:
#: the system's path limit.  Deeper nesting is refused, so that a hostile
#: sender cannot make the receiver hold a descriptor and a path per level
#: without bound (memory grows with the square of the depth).
MAX_TREE_PATH = 4096

T, N, M, MT, D, H, L, S = b"t", b"n", b"m", b"mt", b"d", b"h", b"l", b"s"
DIR, UP, FILE, LINK, REMOVE, ATTRS, OTHER = b"d", b"u", b"f", b"l", b"x", b"a", b"o"
#: The end of a stream, and the sender giving up.
END = b"end"
ABORT = b"abort"

_pack = struct.Struct(">H").pack
_ZEROS = bytes(MAX_VALUE_LENGTH)


class SourceError(Exception):
    """The sending side cannot read its tree (a file unreadable, changed
    midway, a special file); the message names the path."""


class TargetError(Exception):
    """The receiving side cannot write the tree; the message names the path."""


class StreamError(Exception):
    """The records received break the format."""


class DigestError(Exception):
    """A file's data does not match the digest its sender sent."""


def encode(*pairs: bytes) -> bytes:
    """A box from alternating keys and values (short values only)."""
    parts: List[bytes] = []
    for i in range(0, len(pairs), 2):
        k, v = pairs[i], pairs[i + 1]
        parts += (_pack(len(k)), k, _pack(len(v)), v)
    parts.append(END_OF_BOX)
    return b"".join(parts)


def show(rel: bytes) -> str:
    """A relative path for a message."""
    return os.fsdecode(rel) if rel else "."


def kind_of(mode: int) -> str:
    """A file type in words, for messages."""
    kinds = {stat_mod.S_IFIFO: "a FIFO", stat_mod.S_IFSOCK: "a socket", stat_mod.S_IFCHR: "a character device",
             stat_mod.S_IFBLK: "a block device", stat_mod.S_IFDIR: "a directory", stat_mod.S_IFLNK: "a symbolic link",
             stat_mod.S_IFREG: "a regular file"}
    return kinds.get(stat_mod.S_IFMT(mode), "an unknown kind of file")


def check_name(name: Optional[bytes]) -> bytes:
    """``name`` if it is one path component, else :class:`StreamError`."""
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise StreamError(f"bad name in tree stream: {name!r:.80}")
    return name


def mode_of(box: Box) -> int:
    try:
        mode = decode_int(box[M])
    except (KeyError, ValueError):
        raise StreamError("a tree record without valid 'm'") from None
    if not 0 <= mode <= 0o7777:
        raise StreamError(f"mode out of range: {mode}")
    return mode


#: The range of a record's ``mt`` (nanoseconds since the epoch): what a
#: signed 64-bit ``time_t`` of nanoseconds holds, about the years 1678 to 2262.
MIN_MTIME = -(1 << 63)
MAX_MTIME = (1 << 63) - 1


def mtime_of(box: Box) -> int:
    try:
        mtime = decode_int(box[MT])
    except (KeyError, ValueError):
        raise StreamError("a tree record without valid 'mt'") from None
    if not MIN_MTIME <= mtime <= MAX_MTIME:
        raise StreamError(f"modification time out of range: {mtime}")
    return mtime


def received_boxes(wire: Any) -> Iterator[Box]:
    """The boxes the peer has already sent, without waiting for more (a
    ``Wire``, or a wire of the same interface that may hold boxes of its own
    that are not for the caller: those are skipped, never waited for)."""
    wire.feed_available()
    poll = getattr(wire, "poll_box", None)
    if poll is not None:
        while True:
            box = poll()
            if box is None:
                return
            yield box
    while wire.has_buffered_box():
        try:
            box = wire.read_box(0)
        except PeerTimeout:
            return
        if box is None:
            return
        yield box


# -- walking -------------------------------------------------------------------------


class Entry(NamedTuple):
    """One step of :func:`walk`."""

    kind: bytes  # DIR, UP, FILE, LINK or OTHER
    name: bytes  # b"" for the top directory and for UP
    rel: bytes  # path relative to the top (b"" for the top)
    st: Optional[os.stat_result]  # None for UP
    dir_fd: int  # the directory holding the entry (for DIR: the directory itself)
    names: Tuple[bytes, ...]  # for DIR: its entries, sorted


def _listing(fd: int, rel: bytes) -> Tuple[bytes, ...]:
    try:
        return tuple(sorted(os.fsencode(n) for n in os.listdir(fd)))
    except OSError as e:
        raise SourceError(f"cannot list directory: {e.strerror}: {show(rel)}") from None


class _Frame:
    __slots__ = ("fd", "names", "next", "rel")

    def __init__(self, fd: int, names: Tuple[bytes, ...], rel: bytes) -> None:
        self.fd = fd
        self.names = names
        self.next = 0
        self.rel = rel


def walk(top_fd: int) -> Iterator[Entry]:
    """The entries under directory ``top_fd``, depth first, sorted by name:
    the top (``DIR``, no name), then for each directory ``DIR``, its
    entries, ``UP``.  Symbolic links are reported, never followed.

    ``top_fd`` stays the caller's; the descriptors of the directories below
    are closed as the walk leaves them (or when the generator is closed).
    Raises :class:`SourceError` for a directory that cannot be listed or
    entered, or an entry that vanishes meanwhile.
    """
    names = _listing(top_fd, b"")
    yield Entry(DIR, b"", b"", os.fstat(top_fd), top_fd, names)
    stack = [_Frame(top_fd, names, b"")]
    try:
        while stack:
            frame = stack[-1]
            fd = frame.fd
            if frame.next >= len(frame.names):
                stack.pop()
                if fd != top_fd:
                    os.close(fd)
                yield Entry(UP, b"", frame.rel, None, -1, ())
                continue
            name = frame.names[frame.next]
            frame.next += 1
            rel = frame.rel + b"/" + name if frame.rel else name
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                raise SourceError(f"vanished while being read: {show(rel)}") from None
            except OSError as e:
                raise SourceError(f"{e.strerror}: {show(rel)}") from None
            fmt = stat_mod.S_IFMT(st.st_mode)
            if fmt == stat_mod.S_IFDIR:
                try:
                    child = os.open(name, DIR_OPEN, dir_fd=fd)
                except OSError as e:
                    raise SourceError(f"cannot open directory: {e.strerror}: {show(rel)}") from None
                try:
                    st = os.fstat(child)
                    sub = _listing(child, rel)
                except BaseException:
                    os.close(child)
                    raise
                stack.append(_Frame(child, sub, rel))
                yield Entry(DIR, name, rel, st, child, sub)
            elif fmt == stat_mod.S_IFREG:
                yield Entry(FILE, name, rel, st, fd, ())
            elif fmt == stat_mod.S_IFLNK:
                yield Entry(LINK, name, rel, st, fd, ())
            else:
                yield Entry(OTHER, name, rel, st, fd, ())
    finally:
        for frame in stack:
            if frame.fd != top_fd:
                os.close(frame.fd)


class Scan(NamedTuple):
    """What :func:`scan` found."""

    files: int
    size: int
    others: List[bytes]  # paths of entries that cannot be copied (FIFOs, sockets, devices)


def scan(top_fd: int) -> Scan:
    """Count the regular files and their bytes under ``top_fd`` and list
    what cannot be copied.  Raises :class:`SourceError` (see :func:`walk`)."""
    files = size = 0
    others: List[bytes] = []
    for e in walk(top_fd):
        if e.kind == FILE:
            assert e.st is not None
            files += 1
            size += e.st.st_size
        elif e.kind == OTHER:
            others.append(e.rel)
    return Scan(files, size, others)


def others_message(others: List[bytes], top_fd: int) -> str:
    """The error naming every entry that cannot be copied."""
    parts = []
    for rel in others[:MAX_NAMED]:
        try:
            kind = kind_of(os.stat(rel, dir_fd=top_fd, follow_symlinks=False).st_mode)
        except OSError:
            kind = "gone"
        parts.append(f"{show(rel)} ({kind})")
    more = f" and {len(others) - MAX_NAMED} more" if len(others) > MAX_NAMED else ""
    return "only regular files, directories and symbolic links can be copied: " + ", ".join(parts) + more


# -- sending ----------------------------------------------------------------------------


class Sender:
    """Encodes records and hands them to ``write`` in writes of about
    :data:`SEND_BUFFER` bytes.  ``on_data(n)`` is told of every ``n`` bytes
    of file data sent (progress); ``poll()`` is called between files and
    between blocks of a big file and returns True to stop early."""

    def __init__(self, write: Callable[[bytes], None], on_data: Callable[[int], None] = lambda n: None,
                 poll: Callable[[], bool] = lambda: False) -> None:
        self._write = write
        self._on_data = on_data
        self.poll = poll
        self._parts: List[bytes] = []
        self._size = 0
        self.stopped = False

    def add(self, data: bytes) -> None:
        self._parts.append(data)
        self._size += len(data)
        if self._size >= SEND_BUFFER:
            self.flush()

    def flush(self) -> None:
        if self._parts:
            data = b"".join(self._parts) if len(self._parts) > 1 else self._parts[0]
            self._parts = []
            self._size = 0
            self._write(data)

    def dir(self, e: Entry) -> None:
        assert e.st is not None
        mode = b"%d" % stat_mod.S_IMODE(e.st.st_mode)
        mtime = b"%d" % e.st.st_mtime_ns
        if e.name:
            self.add(encode(T, DIR, N, e.name, M, mode, MT, mtime))
        else:
            self.add(encode(T, DIR, M, mode, MT, mtime))

    def up(self) -> None:
        self.add(encode(T, UP))

    def link(self, e: Entry) -> None:
        assert e.st is not None
        try:
            target = os.readlink(e.name, dir_fd=e.dir_fd)
        except OSError as e2:
            raise SourceError(f"cannot read symbolic link: {e2.strerror}: {show(e.rel)}") from None
        self.add(encode(T, LINK, N, e.name, L, target, MT, b"%d" % e.st.st_mtime_ns))

    def file(self, e: Entry) -> int:
        """Send regular file ``e``; return its size."""
        try:
            fd = os.open(e.name, FILE_OPEN, dir_fd=e.dir_fd)
        except OSError as err:
            raise SourceError(f"cannot open: {err.strerror}: {show(e.rel)}") from None
        try:
            st = os.fstat(fd)
            if not stat_mod.S_ISREG(st.st_mode):
                raise SourceError(f"changed while being read (now {kind_of(st.st_mode)}): {show(e.rel)}")
            os.set_blocking(fd, True)
            return self._file_data(fd, e, st)
        finally:
            os.close(fd)

    def _file_data(self, fd: int, e: Entry, st: os.stat_result) -> int:
        digest = hashlib.sha256()
        # the record's keys; the first piece of data travels in the same box
        head: Optional[bytes] = encode(T, FILE, N, e.name, M, b"%d" % stat_mod.S_IMODE(st.st_mode),
                                       MT, b"%d" % st.st_mtime_ns)[:-2]
        pending: Optional[bytes] = None  # the last piece read, held until we know if it ends the file
        total = 0
        expected = st.st_size
        while True:
            try:
                block = os.read(fd, READ_BLOCK)
            except OSError as err:
                raise SourceError(f"read failed: {err.strerror}: {show(e.rel)}") from None
            if not block:
                break
            total += len(block)
            if total > expected:
                raise SourceError(f"changed size while being sent (grew past {expected} bytes): {show(e.rel)}")
            digest.update(block)
            view = memoryview(block)
            last = (len(view) - 1) // MAX_VALUE_LENGTH * MAX_VALUE_LENGTH  # start of the last piece
            if pending is not None:
                self._piece(head, pending, None)
                head = None
            if last:
                if head is not None:
                    self._piece(head, bytes(view[:MAX_VALUE_LENGTH]), None)
                    head = None
                    view = view[MAX_VALUE_LENGTH:]
                    last -= MAX_VALUE_LENGTH
                if last:
                    self._data_boxes(view[:last])
            pending = bytes(view[last:])
            self._on_data(len(block))
            if self.poll():
                self.stopped = True
                return total
        if total != expected:
            raise SourceError(f"changed size while being sent ({expected} bytes, then {total}): {show(e.rel)}")
        self._piece(head, pending or b"", digest.hexdigest().encode("ascii"))
        return total

    def _piece(self, head: Optional[bytes], data: bytes, digest: Optional[bytes]) -> None:
        """One box of a file: the record's keys (first box), data, digest (last box)."""
        parts = [head if head is not None else b""]
        if data:
            parts += (b"\x00\x01d", _pack(len(data)), data)
        if digest is not None:
            parts += (b"\x00\x01h", _pack(len(digest)), digest)
        parts.append(END_OF_BOX)
        self.add(b"".join(parts))

    def _data_boxes(self, view: memoryview) -> None:
        parts: List[Union[bytes, memoryview]] = []
        for start in range(0, len(view), MAX_VALUE_LENGTH):
            piece = view[start:start + MAX_VALUE_LENGTH]
            parts += (b"\x00\x01d", _pack(len(piece)), piece, END_OF_BOX)
        self.flush()
        self._write(b"".join(parts))

    def tree(self, top_fd: int) -> bool:
        """Send the whole tree under ``top_fd`` (without the end box); False
        when ``poll`` stopped it."""
        for e in walk(top_fd):
            if e.kind == FILE:
                self.file(e)
                if self.stopped or self.poll():
                    self.stopped = True
                    return False
            elif e.kind == DIR:
                self.dir(e)
            elif e.kind == UP:
                self.up()
            elif e.kind == LINK:
                self.link(e)
            else:
                assert e.st is not None
                raise SourceError(f"cannot be copied ({kind_of(e.st.st_mode)}): {show(e.rel)}")
        return True


# -- writing -----------------------------------------------------------------------------


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

    :meth:`feed` raises :class:`StreamError` (bad records),
    :class:`DigestError` (a file's data does not match its digest) and
    :class:`TargetError` (a write failed; the message names the path).
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

    def _fail(self, what: str, e: OSError, name: bytes = b"") -> TargetError:
        return TargetError(f"{what}: {e.strerror or e}: {show(self._where(name))}")

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
            raise StreamError("a record after the end of the tree")
        t = box.get(T)
        if not self.started:
            if t != DIR or N in box:
                raise StreamError("a tree stream must start with its top directory")
            self.started = True
            self.stack.append(_Dir(self.top_fd, mode_of(box) & self.dir_mode_mask, mtime_of(box), b""))
            if self.sync:
                try:
                    mode = stat_mod.S_IMODE(os.fstat(self.top_fd).st_mode)
                    if mode & 0o700 != 0o700:
                        os.fchmod(self.top_fd, mode | 0o700)  # to fill it; set at the end
                except OSError as e:
                    raise TargetError(f"cannot make the top directory writable: {e.strerror}") from None
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
            raise StreamError(f"unknown tree record {t!r:.20}")

    def _enter(self, cur: int, box: Box) -> None:
        name = check_name(box.get(N))
        mode, mtime = mode_of(box) & self.dir_mode_mask, mtime_of(box)
        if len(self._where(name)) > MAX_TREE_PATH:
            raise StreamError(f"directories nested past {MAX_TREE_PATH} bytes of path: "
                              f"{show(self._where())[:80]}...")
        if self.max_depth is not None and len(self.stack) > self.max_depth:
            raise StreamError(f"directories nested more than {self.max_depth} levels deep: "
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
            raise TargetError(f"cannot set mode or time: {e.strerror}: {show(d.rel)}") from None
        finally:
            if d.fd != self.top_fd:
                os.close(d.fd)
        if not self.stack:
            self.done = True

    def _link(self, cur: int, box: Box) -> None:
        name = check_name(box.get(N))
        target = box.get(L)
        if not target or b"\0" in target:
            raise StreamError(f"bad link target for {show(self._where(name))}")
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
            raise StreamError(f"a record inside file {show(self._rel)}")
        data = box.get(D)
        if data:
            assert self._digest is not None
            self._digest.update(data)
            n = len(data)
            self._size += n
            try:
                if data[0] == 0 and data[-1] == 0 and data == (_ZEROS if n == MAX_VALUE_LENGTH else bytes(n)):
                    os.lseek(self._fd, n, os.SEEK_CUR)  # a hole
                    self._hole = True
                else:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(self._fd, view):]
                    self._hole = False
            except OSError as e:
                raise TargetError(f"write failed: {e.strerror}: {show(self._rel)}") from None
            self.on_data(n)
        if H in box:
            self._end_file(box[H])
        elif not first and D not in box:
            raise StreamError(f"a box that is neither data nor the end of file {show(self._rel)}")

    def _end_file(self, digest: bytes) -> None:
        assert self._digest is not None
        ok = digest.lower() == self._digest.hexdigest().encode("ascii")
        self._digest = None
        fd, self._fd = self._fd, -1
        cur = self.stack[-1].fd
        try:
            if not ok:
                raise DigestError(f"data does not match its sha256 digest: {show(self._rel)}")
            try:
                if self._hole:
                    os.ftruncate(fd, self._size)
                os.fchmod(fd, self._mode)
                os.utime(fd, ns=(self._mtime, self._mtime))
            except OSError as e:
                raise TargetError(f"write failed: {e.strerror}: {show(self._rel)}") from None
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
                raise TargetError(f"cannot put in place: {e.strerror}: {show(self._rel)}") from None


# -- manifests (sync_tree) ------------------------------------------------------------------


class Known(NamedTuple):
    """One entry of a manifest."""

    kind: bytes
    mode: int
    mtime: int
    size: int
    digest: Optional[bytes]
    target: Optional[bytes]
    entries: int  # entries in its subtree, itself included (for counting deletions)


def file_digest(dir_fd: int, name: bytes) -> Optional[bytes]:
    """The SHA-256 (hex) of regular file ``name``, or ``None`` when it
    cannot be read."""
    try:
        fd = os.open(name, FILE_OPEN, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        if not stat_mod.S_ISREG(os.fstat(fd).st_mode):
            return None
        os.set_blocking(fd, True)
        digest = hashlib.sha256()
        while True:
            block = os.read(fd, READ_BLOCK)
            if not block:
                return digest.hexdigest().encode("ascii")
            digest.update(block)
    except OSError:
        return None
    finally:
        os.close(fd)


def manifest_records(top_fd: int, checksum: bool, tick: Callable[[], None] = lambda: None) -> Iterator[bytes]:
    """The encoded manifest records of the tree under ``top_fd``."""
    for e in walk(top_fd):
        st = e.st
        if e.kind == UP:
            yield encode(T, UP)
            continue
        assert st is not None
        mode = b"%d" % stat_mod.S_IMODE(st.st_mode)
        mtime = b"%d" % st.st_mtime_ns
        if e.kind == DIR:
            yield encode(T, DIR, N, e.name, M, mode, MT, mtime) if e.name else encode(T, DIR, M, mode, MT, mtime)
        elif e.kind == FILE:
            pairs = [T, FILE, N, e.name, M, mode, MT, mtime, S, b"%d" % st.st_size]
            if checksum:
                digest = file_digest(e.dir_fd, e.name)
                tick()
                if digest is not None:
                    pairs += [H, digest]
            yield encode(*pairs)
        elif e.kind == LINK:
            try:
                target = os.readlink(e.name, dir_fd=e.dir_fd)
            except OSError:
                target = b""
            yield encode(T, LINK, N, e.name, L, target, MT, mtime)
        else:
            yield encode(T, OTHER, N, e.name)


class ManifestReader:
    """Builds ``{relative path: Known}`` from manifest boxes fed in order."""

    def __init__(self) -> None:
        self.entries: Dict[bytes, Known] = {}
        self.children: Dict[bytes, List[bytes]] = {}
        self._stack: List[Tuple[bytes, int]] = []  # (rel, entries seen when entered)
        self._seen = 0
        self.done = False

    def feed(self, box: Box) -> None:
        t = box.get(T)
        if self.done:
            raise StreamError("a manifest record after the end of the tree")
        if t == UP:
            if not self._stack:
                raise StreamError("'u' with no directory open")
            rel, before = self._stack.pop()
            k = self.entries[rel]
            self.entries[rel] = k._replace(entries=self._seen - before)
            self.done = not self._stack
            return
        if not self._stack:
            if t != DIR or N in box:
                raise StreamError("a manifest must start with its top directory")
            name = b""
            rel = b""
        else:
            name = check_name(box.get(N))
            base = self._stack[-1][0]
            rel = base + b"/" + name if base else name
            if t == DIR and len(rel) > MAX_TREE_PATH:
                raise StreamError(f"directories nested past {MAX_TREE_PATH} bytes of path")
            self.children[base].append(name)
        self._seen += 1
        if t == DIR:
            self.entries[rel] = Known(DIR, mode_of(box), mtime_of(box), 0, None, None, 1)
            self.children[rel] = []
            self._stack.append((rel, self._seen - 1))
        elif t == FILE:
            try:
                size = int(box[S])
            except (KeyError, ValueError):
                raise StreamError("a manifest file without valid 's'") from None
            self.entries[rel] = Known(FILE, mode_of(box), mtime_of(box), size, box.get(H), None, 1)
        elif t == LINK:
            self.entries[rel] = Known(LINK, 0, 0, 0, None, box.get(L, b""), 1)
        elif t == OTHER:
            self.entries[rel] = Known(OTHER, 0, 0, 0, None, None, 1)
        else:
            raise StreamError(f"unknown manifest record {t!r:.20}")
