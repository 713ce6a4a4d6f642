"""Printing the output of many slaves as whole, prefixed lines.

A command's output reaches the master in chunks that need not end at a line
break, from many slaves at once.  :class:`LineBuffer` cuts one stream of
chunks into lines; :class:`LinePrinter` writes the lines of many sources to
shared text streams, each line prefixed, so that lines of different slaves
never mix.  Both ``remsh run`` and the demo use them.

:func:`printable` makes text a slave supplied (its name, its facts, its
error messages, file names it reports) safe to show on the operator's
terminal: a slave that sends ``ESC ] 0 ; ... BEL`` or ``ESC [ 2 J`` in its
platform string must not retitle or clear the operator's screen, nor forge
lines.  Every such text goes through that one function before it is printed;
the output bytes of a command are the exception and are written as they came
(they are what the operator asked to see).

Three limits keep one slave's output from hurting the others:

- A partial line is held up to :data:`MAX_LINE` bytes (64 KiB); past that it
  is written out as a line of its own and the rest continues on the next.
  A slave writing 49 MiB without a newline costs 64 KiB of memory, not 49.
- A partial line is kept as a list of pieces and joined once, when it is
  written: each byte is copied a bounded number of times, however the
  output is chunked.  (Re-joining the partial line on every chunk is
  quadratic: 49 MiB in 4 KiB chunks took 20 s.)
- All the cutting and prefixing happens outside any lock.  The only lock
  shared between slaves is the one of an output stream, first come first
  served (:class:`~remsh.master.fairlock.FairLock`), held to gather lines
  and for the write of one block of about :data:`BLOCK` bytes: a slave with
  a huge output delays another slave's line by at most one block, and a
  stream that blocks (a full pipe to stdout) does not hold up lines bound
  for another stream.

Lines are written in blocks, not one write per line (see
:class:`LinePrinter`): printing a million prefixed lines costs about what
printing them without prefixes does.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import BinaryIO, Callable, Dict, List, Optional, TextIO, Tuple

from remsh.master.fairlock import FairLock

#: Longest line written in one piece, in bytes; a longer (or unfinished)
#: line is cut into pieces of this size.
MAX_LINE = 64 * 1024

#: Bytes gathered for a stream before they are written at once.
BLOCK = 64 * 1024

#: Longest a line waits to be written, in seconds (a slow command's line
#: shows within this time).
LATENCY = 0.05

log = logging.getLogger(__name__)


#: Colours (ANSI SGR codes) of the slave names, in turn: no red (31, 91),
#: which reads as an error on a terminal.
COLOURS = [32, 33, 34, 35, 36, 92, 93, 94, 95, 96]


def _escape(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (os.fsdecode's surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str) -> str:
    """``text`` with every character a terminal could act on escaped, for
    printing text that came from a slave.

    Escaped, as ``\\xNN``, ``\\uNNNN`` or ``\\UNNNNNNNN``: all of C0 (tab and
    line feed included: the text is one field or one line), DEL, C1 (``\\x9b``
    is CSI on many terminals), and every other character Python does not
    count as printable (format characters such as bidirectional overrides,
    line and paragraph separators, unassigned code points, lone surrogates;
    a surrogate escape of an undecodable byte shows as that byte).  The
    ordinary space stays.  Text that is already printable is returned as is.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _utf8_cut(data: bytes, start: int, limit: int) -> int:
    """Where to cut ``data`` so that the piece from ``start`` is at most
    ``limit`` bytes and, where the bytes are UTF-8, no character is split."""
    cut = start + limit
    if cut >= len(data):
        return len(data)
    # data[cut] starts the next piece: step back over up to three
    # continuation bytes (10xxxxxx) so that it starts a character
    for back in range(4):
        if (data[cut - back] & 0xC0) != 0x80:
            return cut - back
    return cut  # not UTF-8: cut anywhere


class LineBuffer:
    """Cuts a stream of byte chunks into lines, passing each to ``emit``
    (without its ``\\n``).

    A line longer than ``max_line`` bytes, finished or not, is passed on in
    pieces of at most ``max_line`` bytes (cut between UTF-8 characters where
    possible), so at most ``max_line`` bytes are ever held.  Not thread-safe:
    one buffer per stream of chunks.
    """

    def __init__(self, emit: Callable[[bytes], None], max_line: int = MAX_LINE) -> None:
        if max_line < 4:
            raise ValueError("max_line must be at least 4")
        self._emit = emit
        self.max_line = max_line
        self._pieces: List[bytes] = []
        self._held = 0
        #: bytes copied by joining held pieces, over the buffer's life: the
        #: work done on partial lines, which stays linear in the output
        self.bytes_joined = 0

    @property
    def held(self) -> int:
        """Bytes of the unfinished line held now (always ``< max_line``)."""
        return self._held

    def feed(self, data: bytes) -> None:
        """Add a chunk; every line it completes is emitted."""
        start = 0
        end = len(data)
        while start < end:
            nl = data.find(b"\n", start)
            if nl < 0:
                self._hold(data[start:] if start else data)
                return
            segment = data[start:nl]
            if self._pieces:
                self._pieces.append(segment)
                line = self._take()
            else:
                line = segment
            self._emit_cut(line, final=True)
            start = nl + 1

    def flush(self) -> None:
        """Emit the unfinished line, if any (at the end of the output)."""
        if self._pieces:
            self._emit_cut(self._take(), final=True)

    def _take(self) -> bytes:
        if len(self._pieces) > 1:
            line = b"".join(self._pieces)
            self.bytes_joined += len(line)
        else:
            line = self._pieces[0]
        self._pieces = []
        self._held = 0
        return line

    def _hold(self, data: bytes) -> None:
        self._pieces.append(data)
        self._held += len(data)
        if self._held >= self.max_line:
            self._emit_cut(self._take(), final=False)

    def _emit_cut(self, line: bytes, final: bool) -> None:
        """Emit ``line`` in pieces of at most ``max_line`` bytes; unless
        ``final``, a last piece shorter than that is held again instead."""
        view = memoryview(line)
        start = 0
        while len(line) - start >= self.max_line:
            cut = _utf8_cut(line, start, self.max_line)
            self._emit(bytes(view[start:cut]))
            start = cut
        if start < len(line) or (final and not line):
            rest = bytes(view[start:]) if start else line
            if final:
                self._emit(rest)
            else:
                self._pieces = [rest]
                self._held = len(rest)


class _Stream:
    """One output stream: the lock its writes take and the block waiting to
    be written to it."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.lock = FairLock()
        self.pending: List[bytes] = []
        self.size = 0
        binary = getattr(out, "buffer", None)
        #: the binary layer under a text stream: written bytes are exact
        self.binary: Optional[BinaryIO] = binary if hasattr(binary, "write") else None
        # a text-only stream that writes lone surrogates back as the bytes
        # they stand for gets the output's bytes exactly, UTF-8 or not
        self.errors = "surrogateescape" if getattr(out, "errors", None) == "surrogateescape" and \
            str(getattr(out, "encoding", "")).lower().replace("-", "") == "utf8" else "replace"
        #: write calls made on the stream
        self.writes = 0
        #: a timer will write what waits (guarded by the printer's timer lock)
        self.armed = False

    def write_locked(self) -> None:
        """Write the pending block (the caller holds :attr:`lock`)."""
        if not self.pending:
            return
        data = self.pending[0] if len(self.pending) == 1 else b"".join(self.pending)
        self.pending = []
        self.size = 0
        self.writes += 1
        if self.binary is not None:
            self.out.flush()  # what was written as text comes first
            self.binary.write(data)
            self.binary.flush()
        else:
            self.out.write(data.decode("utf-8", self.errors))
            self.out.flush()


class _Source:
    """One source's output bound for one stream: its prefix and its
    unfinished line."""

    def __init__(self, prefix: bytes, stream: _Stream, max_line: int) -> None:
        self.prefix = prefix
        self.joint = b"\n" + prefix
        self.stream = stream
        self.max_line = max_line
        self.parts: List[bytes] = []
        self.buffer = LineBuffer(self._emit, max_line)

    def _emit(self, line: bytes) -> None:
        self.parts.append(self.prefix + line + b"\n")

    def cut(self, data: bytes) -> Tuple[List[bytes], int]:
        """The prefixed lines ``data`` completes, in blocks, and how many
        lines they are.  Whole lines of at most ``max_line`` bytes are
        prefixed all at once (``bytes.replace``), not line by line."""
        self.parts = []
        lines = 0
        start = 0
        last = data.rfind(b"\n")
        if last >= 0 and self.buffer.held:  # the unfinished line ends first
            first = data.find(b"\n")
            self.buffer.feed(data[:first + 1])
            lines += len(self.parts)
            start = first + 1
        if last >= start:
            segment = data[start:last]
            if len(segment) <= self.max_line or max(map(len, segment.split(b"\n"))) <= self.max_line:
                self.parts.append(self.prefix + segment.replace(b"\n", self.joint) + b"\n")
                lines += segment.count(b"\n") + 1
            else:  # a line to cut: line by line
                before = len(self.parts)
                self.buffer.feed(data[start:last + 1])
                lines += len(self.parts) - before
            start = last + 1
        if start < len(data):
            before = len(self.parts)
            self.buffer.feed(data[start:] if start else data)
            lines += len(self.parts) - before
        parts, self.parts = self.parts, []
        return parts, lines

    def end(self) -> List[bytes]:
        """The unfinished line, prefixed (or nothing)."""
        self.parts = []
        self.buffer.flush()
        parts, self.parts = self.parts, []
        return parts


class LinePrinter:
    """Writes the output of many sources (slaves) to shared text streams as
    whole lines, each prefixed with its source's label.

    :meth:`write` takes a chunk of one source's output bound for ``out``;
    :meth:`flush` ends that output (writes its unfinished line).  Lines of
    one source to one stream keep their order; lines of different sources
    never mix.  Thread-safe: each source may write from its own thread.

    Lines are gathered into blocks: a stream is written when
    :data:`BLOCK` bytes wait for it, when a source ends or the program
    writes a line of its own, and otherwise :data:`LATENCY` seconds after
    the first waiting line (a timer thread, started while anything waits).
    A million short lines cost a few dozen writes, and a line of a slow
    command is still shown within :data:`LATENCY`.  The output's bytes are
    written as they came, through the binary layer of a text stream that has
    one.
    """

    def __init__(self, names: List[str], colour: bool = False, *,
                 label: Optional[Callable[[str], str]] = None, max_line: int = MAX_LINE) -> None:
        """``names`` are the sources; each line starts with the name padded
        to the longest one and ``" | "`` (coloured when ``colour``), or with
        ``label(name)`` when ``label`` is given.  A source not in ``names``
        gets ``label(name)``, or ``name + " | "``.  The name is passed
        through :func:`printable` first (also before ``label``)."""
        width = max((len(printable(n)) for n in names), default=0)
        self.prefix: Dict[str, str] = {}
        for i, name in enumerate(sorted(names)):
            if label is not None:
                text = label(printable(name))
            else:
                text = printable(name).ljust(width)
                if colour:
                    text = f"\033[{COLOURS[i % len(COLOURS)]}m{text}\033[0m"
                text += " | "
            self.prefix[name] = text
        self._label = label
        self.max_line = max_line
        #: lines written so far
        self.lines = 0
        self._sources: Dict[Tuple[str, int], _Source] = {}
        self._streams: Dict[int, _Stream] = {}
        self._table_lock = threading.Lock()  # only for the two dicts above
        self._timer_lock = threading.Lock()  # only for the streams' ``armed``

    def write(self, name: str, out: TextIO, data: bytes) -> None:
        """Add a chunk of ``name``'s output bound for ``out``."""
        source = self._source(name, out)
        parts, lines = source.cut(data)
        for part in parts:
            self._put(source.stream, part, lines)
            lines = 0

    def write_raw(self, out: TextIO, data: bytes) -> None:
        """Add output bytes to write to ``out`` as they are (no prefix, no
        cutting into lines), in the same blocks as the lines."""
        if data:
            self._put(self._stream(out), data, 0)

    def flush(self, name: str, out: TextIO) -> None:
        """Write ``name``'s unfinished line to ``out``, if any, and what
        waits for ``out``."""
        with self._table_lock:
            source = self._sources.pop((name, id(out)), None)
        stream = self._stream(out)
        if source is not None:
            for part in source.end():
                self._put(stream, part, 1)
        with stream.lock:
            stream.write_locked()

    def flush_all(self) -> None:
        """Write what waits for every stream now."""
        with self._table_lock:
            streams = list(self._streams.values())
        for stream in streams:
            with stream.lock:
                stream.write_locked()

    def close(self) -> None:
        """Write what waits, whatever path the program leaves by (a stream
        already closed takes nothing more); idempotent.  Lines held for the
        timer are lost to a program that ends without it: its owner calls
        this in a ``finally`` (or uses the printer with ``with``)."""
        try:
            self.flush_all()
        except (OSError, ValueError):
            pass

    def __enter__(self) -> "LinePrinter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def writes(self, out: TextIO) -> int:
        """Write calls made on ``out`` so far."""
        return self._stream(out).writes

    def write_line(self, out: TextIO, text: str) -> None:
        """Write one line of the program's own (``text`` without its line
        break) to ``out`` now, never in the middle of a source's line, after
        what waits for ``out``."""
        try:
            data = (text + "\n").encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            data = (text + "\n").encode("utf-8", "replace")
        stream = self._stream(out)
        with stream.lock:
            self.lines += 1
            stream.pending.append(data)
            stream.write_locked()

    def sink(self, name: str, out: TextIO) -> Callable[[bytes], None]:
        """An output callback (``stdout_cb``/``stderr_cb``) for ``name`` to ``out``."""
        return lambda data: self.write(name, out, data)

    def _source(self, name: str, out: TextIO) -> _Source:
        key = (name, id(out))
        with self._table_lock:
            source = self._sources.get(key)
        if source is None:
            prefix = self.prefix.get(name)
            if prefix is None:
                shown = printable(name)
                prefix = self._label(shown) if self._label is not None else shown + " | "
            source = _Source(prefix.encode("utf-8"), self._stream(out), self.max_line)
            with self._table_lock:
                source = self._sources.setdefault(key, source)
        return source

    def _stream(self, out: TextIO) -> _Stream:
        with self._table_lock:
            stream = self._streams.get(id(out))
            if stream is None:
                stream = self._streams[id(out)] = _Stream(out)
            return stream

    def _put(self, stream: _Stream, data: bytes, lines: int) -> None:
        # ``data`` was formatted outside the lock; only the gathering and
        # the write are inside.  A big piece is written on its own, so that
        # the lines of others waiting behind it are not held up by more
        with stream.lock:
            self.lines += lines
            if stream.pending and stream.size + len(data) >= BLOCK:
                stream.write_locked()
            stream.pending.append(data)
            stream.size += len(data)
            if stream.size >= BLOCK:
                stream.write_locked()
            waiting = bool(stream.pending)
        if waiting:
            self._arm(stream)

    def _arm(self, stream: _Stream) -> None:
        """Have what waits for ``stream`` written within :data:`LATENCY`
        (one timer thread per stream: a blocked stream holds up no other)."""
        with self._timer_lock:
            if stream.armed:
                return
            stream.armed = True
        threading.Thread(target=self._timer, args=(stream,), name="remsh-lineprinter", daemon=True).start()

    def _timer(self, stream: _Stream) -> None:
        time.sleep(LATENCY)
        with self._timer_lock:
            stream.armed = False  # what comes from now on arms a timer again
        try:
            with stream.lock:
                stream.write_locked()
        except (OSError, ValueError) as e:  # a closed stream: the writer sees it on its next write
            log.debug("writing output on the timer: %s", e)
