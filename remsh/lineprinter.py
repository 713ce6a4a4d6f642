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
- All the cutting and decoding happens outside any lock.  The only lock
  shared between slaves is the one of an output stream, first come first
  served (:class:`~remsh.master.fairlock.FairLock`), held for the write of
  one line of at most :data:`MAX_LINE` bytes: a slave with a huge output
  delays another slave's line by at most one line, and a stream that blocks
  (a full pipe to stdout) does not hold up lines bound for another stream.
"""

from __future__ import annotations

import threading
from typing import Callable, Dict, List, Optional, TextIO, Tuple

from remsh.master.fairlock import FairLock

#: Longest line written in one piece, in bytes; a longer (or unfinished)
#: line is cut into pieces of this size.
MAX_LINE = 64 * 1024

#: Colours (ANSI SGR codes) of the slave names, in turn.
COLOURS = [31, 32, 33, 34, 35, 36, 91, 92, 93, 94, 95, 96]


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


class LinePrinter:
    """Writes the output of many sources (slaves) to shared text streams as
    whole lines, each prefixed with its source's label.

    :meth:`write` takes a chunk of one source's output bound for ``out``;
    :meth:`flush` ends that output (writes its unfinished line).  Lines of
    one source to one stream keep their order; lines of different sources
    never mix.  Thread-safe: each source may write from its own thread.
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
        self._buffers: Dict[Tuple[str, int], LineBuffer] = {}
        self._out_locks: Dict[int, FairLock] = {}
        self._table_lock = threading.Lock()  # only for the two dicts above

    def write(self, name: str, out: TextIO, data: bytes) -> None:
        """Add a chunk of ``name``'s output bound for ``out``."""
        self._buffer(name, out).feed(data)

    def flush(self, name: str, out: TextIO) -> None:
        """Write ``name``'s unfinished line to ``out``, if any."""
        with self._table_lock:
            buf = self._buffers.pop((name, id(out)), None)
        if buf is not None:
            buf.flush()

    def write_line(self, out: TextIO, text: str) -> None:
        """Write one line of the program's own (``text`` without its line
        break) to ``out``, never in the middle of a source's line."""
        self._write(self._lock_for(out), out, text + "\n")

    def sink(self, name: str, out: TextIO) -> Callable[[bytes], None]:
        """An output callback (``stdout_cb``/``stderr_cb``) for ``name`` to ``out``."""
        return lambda data: self.write(name, out, data)

    def _buffer(self, name: str, out: TextIO) -> LineBuffer:
        key = (name, id(out))
        with self._table_lock:
            buf = self._buffers.get(key)
        if buf is None:
            prefix = self.prefix.get(name)
            if prefix is None:
                shown = printable(name)
                prefix = self._label(shown) if self._label is not None else shown + " | "
            lock = self._lock_for(out)
            # a stream that writes lone surrogates back as the bytes they
            # stand for gets the output's bytes exactly, UTF-8 or not
            errors = "surrogateescape" if getattr(out, "errors", None) == "surrogateescape" and \
                str(getattr(out, "encoding", "")).lower().replace("-", "") == "utf8" else "replace"
            buf = LineBuffer(lambda line: self._write(lock, out, prefix + line.decode("utf-8", errors) + "\n"),
                             self.max_line)
            with self._table_lock:
                buf = self._buffers.setdefault(key, buf)
        return buf

    def _lock_for(self, out: TextIO) -> FairLock:
        with self._table_lock:
            return self._out_locks.setdefault(id(out), FairLock())

    def _write(self, lock: FairLock, out: TextIO, text: str) -> None:
        # ``text`` was formatted outside the lock; only the write is inside
        with lock:
            self.lines += 1
            out.write(text)
            out.flush()
