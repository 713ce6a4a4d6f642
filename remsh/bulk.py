"""Verified bulk transfer: file data as ``{data: chunk}`` boxes with SHA-256
computed on both ends, hashing overlapped with the I/O.

Both ends of ``send`` and ``fetch`` use these pieces:

- :class:`FramedBlock` -- a reusable buffer laid out as
  :data:`~remsh.wire.DATA_BOXES_PER_WRITE` encoded data boxes: file data is
  read straight into the boxes' value areas (one ``readv`` per block), so
  the encoded boxes are sent from the buffer as they are, with no copy to
  frame them.
- :func:`send_blocks` -- read, hash and send a whole source.  A source
  larger than one block is hashed in a helper thread (``hashlib`` releases
  the GIL on large updates) while the caller's thread reads and sends the
  next block; two blocks take turns.  Without a CPU to spare for the
  helper (one CPU, or two shared with the other end on this host) it
  hashes inline (see :func:`overlap`).
- Over a session (which keeps what it sends until the peer acknowledges
  it) a block is *lent* instead of copied: the session keeps the block
  itself, and the block goes back to the pool once the session and the
  hashing are both done with it.
- :class:`Sink` -- the receiving end: hashes and writes what arrives, in a
  helper thread once more than one batch came in, so receiving and decoding
  overlap with hashing and writing.

The wire format is unchanged (boxes of at most 65535 bytes of data), and the
digest is the same SHA-256 of every byte, in order.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import os
import queue
import socket
import threading
from typing import Any, Callable, List, Optional, Tuple, Union

from remsh.session import SessionWire
from remsh.wire import DATA_BOXES_PER_WRITE, END_OF_BOX, LENGTH, MAX_VALUE_LENGTH

Buffer = Union[bytes, bytearray, memoryview]

#: Bytes of received data hashed and written at a time (handed to the
#: sink's helper thread at a time): small enough that a batch is still in
#: the CPU's L2 cache when it is hashed and then written (1 MiB batches cost
#: the receiving master of a fetch about 10 % more CPU).
SINK_BATCH = 256 << 10
#: ... or this many chunks, whichever comes first (a peer sending tiny data
#: boxes must not make a batch hold a list entry per byte).
SINK_BATCH_CHUNKS = 4096
#: Batches the sink's helper may have queued before the receiver waits
#: (bounds the memory of a transfer whose disk is slower than its network).
SINK_QUEUE = 16
#: How often a wait on a helper thread checks that it is still alive (s).
_HELPER_CHECK = 1.0

_U16 = LENGTH


class OverlongRead(OSError):
    """A source's ``read(n)`` (or ``readinto(view)``) gave more than it was
    asked for: a broken file-like object, reported as a read error so that
    the transfer is aborted in the protocol (the peer keeps nothing and
    stays usable) and the caller can name the object (``source``)."""

    def __init__(self, source: Any, asked: int, got: int) -> None:
        super().__init__(f"{source!r} returned {got} bytes when asked for at most {asked}")
        self.source = source


class FramedBlock:
    """A buffer of ``boxes`` encoded ``{key: chunk}`` boxes whose value areas
    are filled with file data in place (see the module docstring).

    After :meth:`fill` (or :meth:`fill_with`), :meth:`data` holds the views
    of the bytes read and :meth:`encoded` the boxes that carry them, the
    last one shortened if the source ended inside it.  Both are valid until
    the next fill.
    """

    def __init__(self, key: bytes, boxes: int = DATA_BOXES_PER_WRITE, prefix: bytes = b"") -> None:
        self.key = key
        #: encoded keys before ``key`` in every box (a command's output
        #: boxes: ``stream``), as :func:`~remsh.wire.encode_data_boxes` takes it
        self.prefix = prefix
        head = prefix + _U16.pack(len(key)) + key + _U16.pack(MAX_VALUE_LENGTH)
        self._head = len(head)
        self._stride = self._head + MAX_VALUE_LENGTH + 2
        buf = bytearray(self._stride * boxes)
        for i in range(boxes):
            off = i * self._stride
            buf[off : off + self._head] = head
            buf[off + self._stride - 2 : off + self._stride] = END_OF_BOX
        self._buf = buf
        self._view = memoryview(buf)
        self.slots = [self._view[i * self._stride + self._head : (i + 1) * self._stride - 2] for i in range(boxes)]
        self.capacity = MAX_VALUE_LENGTH * boxes
        self.size = 0
        self._end = 0
        self._short = -1  # the box whose length prefix was shortened by the last fill

    def _restore(self) -> None:
        if self._short >= 0:
            _U16.pack_into(self._buf, self._short * self._stride + self._head - 2, MAX_VALUE_LENGTH)
            self._short = -1

    def fill(self, fd: int) -> int:
        """Read up to :attr:`capacity` bytes from ``fd`` (until full or end of
        file); returns the count (0 at end of file).  Raises ``OSError``."""
        self._restore()
        slots = self.slots
        total = 0
        while total < self.capacity:
            i, off = divmod(total, MAX_VALUE_LENGTH)
            n = os.readv(fd, [slots[i][off:], *slots[i + 1 :]])
            if not n:
                break
            total += n
        return self._finish(total)

    def fill_once(self, fd: int, limit: int) -> int:
        """One ``readv`` of up to ``limit`` bytes (at most :attr:`capacity`)
        from ``fd``: what a pipe holds now, without waiting for more.
        Returns the count (0 at end of file); raises ``OSError``
        (``BlockingIOError`` when a non-blocking ``fd`` has nothing)."""
        self._restore()
        limit = min(limit, self.capacity)
        full, rem = divmod(limit, MAX_VALUE_LENGTH)
        views = self.slots[:full]
        if rem:
            views = views + [self.slots[full][:rem]]
        return self._finish(os.readv(fd, views))

    def fill_with(self, read: Callable[[memoryview], Optional[int]]) -> int:
        """As :meth:`fill`, with ``read(view)`` (a ``readinto``) for each read;
        ``None`` from ``read`` (nothing available yet) counts as end of data."""
        self._restore()
        total = 0
        for slot in self.slots:
            off = 0
            while off < MAX_VALUE_LENGTH:
                n = read(slot[off:])
                if not n:
                    return self._finish(total + off)
                if n < 0 or n > MAX_VALUE_LENGTH - off:
                    raise OverlongRead(getattr(read, "__self__", read), MAX_VALUE_LENGTH - off, n)
                off += n
            total += off
        return self._finish(total)

    def _finish(self, n: int) -> int:
        self.size = n
        full, rem = divmod(n, MAX_VALUE_LENGTH)
        if rem:
            off = full * self._stride + self._head
            _U16.pack_into(self._buf, off - 2, rem)
            self._buf[off + rem : off + rem + 2] = END_OF_BOX
            self._short = full
            self._end = off + rem + 2
        else:
            self._end = full * self._stride
        return n

    def data(self) -> List[memoryview]:
        """Views of the bytes read by the last fill, in order."""
        full, rem = divmod(self.size, MAX_VALUE_LENGTH)
        views = self.slots[:full]
        if rem:
            views = views + [self.slots[full][:rem]]
        return views

    def encoded(self) -> memoryview:
        """The encoded boxes carrying the bytes of the last fill."""
        return self._view[: self._end]


#: Free blocks kept for the next transfers: making a block (1 MiB, zeroed,
#: headers written) costs about 0.5 ms, a tenth of a 1 MiB transfer.  A
#: session holds up to its window (8 MiB) of lent blocks: with a few more
#: free a long transfer over a session makes no new ones.
POOL_BLOCKS = 12
_pool: List[FramedBlock] = []
_pool_lock = threading.Lock()


def take_block(key: bytes, prefix: bytes = b"", boxes: int = DATA_BOXES_PER_WRITE) -> FramedBlock:
    """A block for ``key`` (after ``prefix``, ``boxes`` boxes) from the pool
    of free ones, or a new one."""
    with _pool_lock:
        for i in range(len(_pool) - 1, -1, -1):  # the last returned first: likeliest still cached
            block = _pool[i]
            if block.key == key and block.prefix == prefix and len(block.slots) == boxes:
                return _pool.pop(i)
    return FramedBlock(key, boxes, prefix)


def give_back(block: FramedBlock) -> None:
    """Return a block nothing uses any more (kept if the pool has room)."""
    with _pool_lock:
        if len(_pool) < POOL_BLOCKS:
            _pool.append(block)


def reader_for(f: Any) -> Callable[[FramedBlock], int]:
    """How to fill a :class:`FramedBlock` from the file object ``f``: ``readv``
    on its descriptor for an unbuffered ``io.FileIO`` (no buffer of its own
    to bypass), else its ``readinto``, else its ``read``."""
    import io

    if type(f) is io.FileIO:
        fd = f.fileno()
        return lambda block: block.fill(fd)
    readinto = getattr(f, "readinto", None)
    if readinto is not None:
        return lambda block: block.fill_with(readinto)
    read = f.read

    def read_into(view: memoryview) -> int:
        data = read(len(view))
        if not data:
            return 0
        if len(data) > len(view):
            raise OverlongRead(f, len(view), len(data))
        view[: len(data)] = data
        return len(data)

    return lambda block: block.fill_with(read_into)


def overlap(stream: Any = None) -> bool:
    """Whether hashing in a helper thread can overlap the I/O: only when a
    CPU is free for the helper.  The transfer already keeps one CPU busy on
    each end, so: with 3 or more CPUs yes; with 2 only when the other end
    (``stream``'s peer) is on another host; with 1 never (the helper would
    add thread switches and gain nothing).  On two CPUs shared with the
    other end, hashing inline measured 5-20 % faster than with the helper.
    Asked at each transfer, since the affinity may change while the process
    runs."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    if cpus != 2:
        return cpus > 2
    return not _peer_on_this_host(stream)


def _peer_on_this_host(stream: Any) -> bool:
    """True when ``stream`` reaches a process on this host (a socket pair,
    a Unix socket, or TCP between two addresses of this host), looking
    through an SSH channel to its transport's socket; unknown streams count
    as remote."""
    sock = getattr(stream, "sock", None)
    if sock is None:  # an SSH channel (paramiko): its transport's socket
        get_transport = getattr(getattr(stream, "channel", None), "get_transport", None)
        sock = getattr(get_transport(), "sock", None) if callable(get_transport) else None
    if not isinstance(sock, socket.socket):
        return False
    try:
        if sock.family == socket.AF_UNIX:
            return True  # a local slave, or the ssh program we talk through
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            peer = ipaddress.ip_address(sock.getpeername()[0])
            return bool(peer.is_loopback) or peer == ipaddress.ip_address(sock.getsockname()[0])
    except (OSError, ValueError):
        pass
    return False


#: ``lend(encoded, boxes, give_back)``: send encoded boxes from a buffer
#: lent until ``give_back()`` (:meth:`remsh.session.SessionWire.send_lent`)
Lend = Callable[[memoryview, int, Callable[[], None]], object]


def lender(wire: object) -> Optional[Lend]:
    """``wire``'s :meth:`~remsh.session.SessionWire.send_lent` where lending
    saves a copy (a session whose stream sends from the caller's buffer),
    else ``None`` (send a copy: no session, or one over an SSH channel)."""
    return wire.send_lent if isinstance(wire, SessionWire) and wire.lends else None


def send_blocks(fill: Callable[[FramedBlock], int], send: Callable[[memoryview], object],
                progress: Optional[Callable[[int], object]] = None,
                key: bytes = b"data", *, stream: Any = None,
                lend: Optional[Lend] = None) -> Tuple[str, Optional[OSError]]:
    """Read a source block by block with ``fill``, send each block's encoded
    data boxes with ``send``, and return the SHA-256 hex digest of the data
    with ``None`` -- or, when ``fill`` raised ``OSError``, ``("", error)``
    (what was read before was sent).

    ``send`` must be done with the buffer when it returns (``Wire.send_bytes``
    is: the kernel, or a session's kept copy, holds the bytes then).
    Errors of ``send`` propagate.  ``stream`` (the connection's stream)
    tells :func:`overlap` where the other end is.  With ``lend`` (a
    session's sender), blocks are lent to it instead (no copy kept).
    """
    if lend is not None:
        return _lend_blocks(key, fill, lend, progress, stream)
    block = take_block(key)
    try:
        return _send_blocks(block, fill, send, progress, stream)
    finally:
        give_back(block)


def _send_blocks(block: FramedBlock, fill: Callable[[FramedBlock], int], send: Callable[[memoryview], object],
                 progress: Optional[Callable[[int], object]], stream: Any) -> Tuple[str, Optional[OSError]]:
    digest = hashlib.sha256()
    try:
        n = fill(block)
    except OSError as e:
        return "", e
    if n < block.capacity or not overlap(stream):  # one block, or no CPU to spare: no helper
        while True:
            if n:
                # sent first, hashed while the bytes are on their way: the
                # block stays as it is until the next fill
                send(block.encoded())
                if progress is not None:
                    progress(n)
            for view in block.data():
                digest.update(view)
            if n < block.capacity:
                return digest.hexdigest(), None
            try:
                n = fill(block)
            except OSError as e:
                return "", e
    spare = take_block(block.key)
    hasher = _Hasher(digest)
    free: "queue.SimpleQueue[FramedBlock]" = queue.SimpleQueue()  # hashed and sent: to be filled again
    free.put(spare)
    try:
        while True:
            hasher.submit(block, functools.partial(free.put, block))
            send(block.encoded())
            if progress is not None:
                progress(n)
            block = _get(free, hasher.thread)
            try:
                n = fill(block)
            except OSError as e:
                return "", e
            if not n:
                break
        return hasher.finish(), None
    finally:
        hasher.stop()
        give_back(spare)


class _Loan:
    """A block lent to a session and being hashed: back to the pool once
    both are done with it."""

    __slots__ = ("block", "holds")

    def __init__(self, block: FramedBlock) -> None:
        self.block = block
        self.holds = 2  # the session's, the hashing's

    def release(self) -> None:
        with _pool_lock:
            self.holds -= 1
            if self.holds:
                return
        give_back(self.block)


def _lend_blocks(key: bytes, fill: Callable[[FramedBlock], int], lend: Lend,
                 progress: Optional[Callable[[int], object]], stream: Any) -> Tuple[str, Optional[OSError]]:
    """:func:`send_blocks` lending each block to the sender: a fresh block
    from the pool for every fill, never one the session may still resend."""
    digest = hashlib.sha256()
    hasher = _Hasher(digest) if overlap(stream) else None
    block: Optional[FramedBlock] = take_block(key)
    try:
        while block is not None:
            try:
                n = fill(block)
            except OSError as e:
                return "", e
            if not n:
                break
            loan = _Loan(block)
            last = n < block.capacity
            block = None  # the loan's now
            lend(loan.block.encoded(), -(-n // MAX_VALUE_LENGTH), loan.release)
            if hasher is not None:
                hasher.submit(loan.block, loan.release)
            else:  # hashed while the session may still hold it: untouched until both let go
                for view in loan.block.data():
                    digest.update(view)
                loan.release()
            if progress is not None:
                progress(n)
            if not last:
                block = take_block(key)
        return (digest.hexdigest() if hasher is None else hasher.finish()), None
    finally:
        if block is not None:
            give_back(block)
        if hasher is not None:
            hasher.stop()


class _Hasher:
    """A helper thread that hashes submitted blocks in order and calls each
    one's ``done`` once hashed (the block may be filled again then, as far
    as hashing goes)."""

    def __init__(self, digest: Any) -> None:
        self.digest = digest
        self._work: "queue.SimpleQueue[Optional[Tuple[FramedBlock, Callable[[], object]]]]" = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="remsh-sha256", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        update = self.digest.update
        while True:
            item = self._work.get()
            if item is None:
                return
            block, done = item
            for view in block.data():
                update(view)
            done()

    def submit(self, block: FramedBlock, done: Callable[[], object]) -> None:
        self._work.put((block, done))

    def finish(self) -> str:
        """Wait for every submitted block; the digest."""
        self.stop()
        return str(self.digest.hexdigest())

    def stop(self) -> None:
        if self.thread.is_alive():
            self._work.put(None)
            self.thread.join()


def _get(q: "queue.SimpleQueue[Any]", helper: threading.Thread) -> Any:
    """The next item of ``q``, which ``helper`` fills; never waits on a dead helper."""
    while True:
        try:
            return q.get(timeout=_HELPER_CHECK)
        except queue.Empty:
            if not helper.is_alive():
                # drained by the time it died?  one last look before giving up
                try:
                    return q.get_nowait()
                except queue.Empty:
                    raise RuntimeError("bulk transfer helper thread ended unexpectedly") from None


def writer_for_fd(fd: int) -> Callable[[List[Buffer]], None]:
    """Write a batch of buffers to ``fd`` with ``writev`` (all of them, or ``OSError``)."""
    def write(batch: List[Buffer]) -> None:
        bufs: List[Buffer] = list(batch)
        while bufs:
            n = os.writev(fd, bufs)
            i = 0
            while i < len(bufs) and n >= len(bufs[i]):
                n -= len(bufs[i])
                i += 1
            bufs = bufs[i:]
            if n:
                bufs[0] = memoryview(bufs[0])[n:]
    return write


class Sink:
    """The receiving end: every chunk is hashed and written, in order.

    ``write(batch)`` writes a list of chunks.  With ``threaded`` (and a CPU
    to spare, see :func:`overlap` and its ``stream``), batches of
    :data:`SINK_BATCH` bytes go to a helper thread (started with the first
    full batch, so a small transfer never starts one); at most
    :data:`SINK_QUEUE` batches wait for it.

    The first exception of ``write`` is kept in :attr:`error`; later chunks
    are still hashed but not written.  Call :meth:`finish` for the digest
    and :meth:`close` in any case (it stops the helper).
    """

    def __init__(self, write: Callable[[List[Buffer]], object], *, threaded: bool = True,
                 stream: Any = None) -> None:
        self.digest = hashlib.sha256()
        self.error: Optional[BaseException] = None
        self._write = write
        self._threaded = threaded and overlap(stream)
        self._batch: List[Buffer] = []
        self._batch_bytes = 0
        self._thread: Optional[threading.Thread] = None
        self._work: "queue.SimpleQueue[Optional[List[Buffer]]]" = queue.SimpleQueue()
        self._tokens: "queue.SimpleQueue[bool]" = queue.SimpleQueue()

    def add(self, data: Buffer) -> None:
        """Take one received chunk (kept until hashed and written: it must not change).

        An empty chunk carries nothing and is not kept: a peer sending empty
        data boxes must not grow a batch that its byte count never flushes."""
        if not len(data):
            return
        self._batch.append(data)
        self._batch_bytes += len(data)
        if self._batch_bytes >= SINK_BATCH or len(self._batch) >= SINK_BATCH_CHUNKS:
            self._flush()

    def _flush(self) -> None:
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        if not self._threaded:
            self._process(batch)
            return
        thread = self._thread
        if thread is None:
            for _ in range(SINK_QUEUE):
                self._tokens.put(True)
            thread = self._thread = threading.Thread(target=self._run, name="remsh-sha256", daemon=True)
            thread.start()
        _get(self._tokens, thread)
        self._work.put(batch)

    def _process(self, batch: List[Buffer]) -> None:
        update = self.digest.update
        for data in batch:
            update(data)
        if self.error is None:
            try:
                self._write(batch)
            except Exception as e:  # noqa: BLE001 - kept for the caller, who decides
                self.error = e

    def _run(self) -> None:
        while True:
            batch = self._work.get()
            if batch is None:
                return
            self._process(batch)
            self._tokens.put(True)

    def finish(self) -> str:
        """Hash and write what is left; the SHA-256 hex digest of everything added."""
        if self._batch:
            if self._thread is None:  # all of it fit in one batch: no helper needed
                batch, self._batch, self._batch_bytes = self._batch, [], 0
                self._process(batch)
            else:
                self._flush()
        self.close()
        return self.digest.hexdigest()

    def close(self) -> None:
        """Stop the helper thread (after it has done what it was given)."""
        thread, self._thread = self._thread, None
        if thread is not None and thread.is_alive():
            self._work.put(None)
            thread.join()
