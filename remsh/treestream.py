"""Directory trees as a stream of boxes, for ``send_tree``, ``fetch_tree``
and ``sync_tree``: the record format, the checks of a record, and the walk
and sender that produce it (the writer that applies it is
:mod:`remsh.treewriter`, manifests :mod:`remsh.treemanifest`).  Both ends use
these modules: the sender of a tree is
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

import hashlib
import os
import stat as stat_mod
from typing import Any, Callable, Iterator, List, NamedTuple, Optional, Tuple, Union

from remsh.errors import PeerTimeout, TreeSourceError, TreeStreamError
from remsh.files import O_CLOEXEC, O_DIRECTORY, O_NOCTTY, O_NOFOLLOW, O_NONBLOCK
from remsh.wire import END_OF_BOX, LENGTH, MAX_VALUE_LENGTH, Box, decode_int, encode_pairs, key_head

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

_pack = LENGTH.pack
#: the framed keys of a file's data and digest values
_DATA_HEAD = key_head(b"d")
_DIGEST_HEAD = key_head(b"h")
ZEROS = bytes(MAX_VALUE_LENGTH)


#: A box from alternating keys and values (short values only).
encode = encode_pairs


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
    """``name`` if it is one path component, else :class:`TreeStreamError`."""
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise TreeStreamError(f"bad name in tree stream: {name!r:.80}")
    return name


def mode_of(box: Box) -> int:
    try:
        mode = decode_int(box[M])
    except (KeyError, ValueError):
        raise TreeStreamError("a tree record without valid 'm'") from None
    if not 0 <= mode <= 0o7777:
        raise TreeStreamError(f"mode out of range: {mode}")
    return mode


#: The range of a record's ``mt`` (nanoseconds since the epoch): what a
#: signed 64-bit ``time_t`` of nanoseconds holds, about the years 1678 to 2262.
MIN_MTIME = -(1 << 63)
MAX_MTIME = (1 << 63) - 1


def mtime_of(box: Box) -> int:
    try:
        mtime = decode_int(box[MT])
    except (KeyError, ValueError):
        raise TreeStreamError("a tree record without valid 'mt'") from None
    if not MIN_MTIME <= mtime <= MAX_MTIME:
        raise TreeStreamError(f"modification time out of range: {mtime}")
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
        raise TreeSourceError(f"cannot list directory: {e.strerror}: {show(rel)}") from None


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
    Raises :class:`TreeSourceError` for a directory that cannot be listed or
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
                raise TreeSourceError(f"vanished while being read: {show(rel)}") from None
            except OSError as e:
                raise TreeSourceError(f"{e.strerror}: {show(rel)}") from None
            fmt = stat_mod.S_IFMT(st.st_mode)
            if fmt == stat_mod.S_IFDIR:
                try:
                    child = os.open(name, DIR_OPEN, dir_fd=fd)
                except OSError as e:
                    raise TreeSourceError(f"cannot open directory: {e.strerror}: {show(rel)}") from None
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
    what cannot be copied.  Raises :class:`TreeSourceError` (see :func:`walk`)."""
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
            raise TreeSourceError(f"cannot read symbolic link: {e2.strerror}: {show(e.rel)}") from None
        self.add(encode(T, LINK, N, e.name, L, target, MT, b"%d" % e.st.st_mtime_ns))

    def file(self, e: Entry) -> int:
        """Send regular file ``e``; return its size."""
        try:
            fd = os.open(e.name, FILE_OPEN, dir_fd=e.dir_fd)
        except OSError as err:
            raise TreeSourceError(f"cannot open: {err.strerror}: {show(e.rel)}") from None
        try:
            st = os.fstat(fd)
            if not stat_mod.S_ISREG(st.st_mode):
                raise TreeSourceError(f"changed while being read (now {kind_of(st.st_mode)}): {show(e.rel)}")
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
                raise TreeSourceError(f"read failed: {err.strerror}: {show(e.rel)}") from None
            if not block:
                break
            total += len(block)
            if total > expected:
                raise TreeSourceError(f"changed size while being sent (grew past {expected} bytes): {show(e.rel)}")
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
            raise TreeSourceError(f"changed size while being sent ({expected} bytes, then {total}): {show(e.rel)}")
        self._piece(head, pending or b"", digest.hexdigest().encode("ascii"))
        return total

    def _piece(self, head: Optional[bytes], data: bytes, digest: Optional[bytes]) -> None:
        """One box of a file: the record's keys (first box), data, digest (last box)."""
        parts = [head if head is not None else b""]
        if data:
            parts += (_DATA_HEAD, _pack(len(data)), data)
        if digest is not None:
            parts += (_DIGEST_HEAD, _pack(len(digest)), digest)
        parts.append(END_OF_BOX)
        self.add(b"".join(parts))

    def _data_boxes(self, view: memoryview) -> None:
        parts: List[Union[bytes, memoryview]] = []
        for start in range(0, len(view), MAX_VALUE_LENGTH):
            piece = view[start:start + MAX_VALUE_LENGTH]
            parts += (_DATA_HEAD, _pack(len(piece)), piece, END_OF_BOX)
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
                raise TreeSourceError(f"cannot be copied ({kind_of(e.st.st_mode)}): {show(e.rel)}")
        return True
