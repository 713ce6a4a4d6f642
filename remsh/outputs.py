"""Where the output of ``remsh run`` goes besides prefixed lines, and how a
run ends on the terminal.

- :class:`OutputFiles`: ``-o DIR`` / ``-e DIR`` (as pssh): each slave's
  stdout or stderr into ``DIR/NAME``, the exact bytes.  A slave whose name is
  not a safe file name (empty, ``.``, ``..``, a ``/`` or a NUL in it) gets no
  file; its part of the job fails instead, so that nothing is written
  outside ``DIR`` and nothing is lost silently.
- :class:`Folder`: ``--fold`` (dshbak -c): every slave's output kept (up to
  :data:`MAX_FOLD_OUTPUT` a stream) until all have ended, then slaves with
  the same stdout, stderr and status printed once under one header naming
  them all, numeric ranges compressed (:func:`compress_names`).
- :func:`summary_lines`: the closing summary (one line a slave, then the
  totals), like Ansible's recap.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Dict, Iterable, List, Optional, Sequence, TextIO, Tuple

from remsh.errors import UsageError
from remsh.lineprinter import LinePrinter, printable

#: Most bytes of one stream of one slave kept for ``--fold``; past that the
#: rest is dropped and the group's header says so.
MAX_FOLD_OUTPUT = 16 * 1024 * 1024


def safe_file_name(name: str) -> bool:
    """Whether ``name`` can be a file directly inside a directory (and
    nothing else): not empty, not ``.`` or ``..``, no ``/`` and no NUL."""
    return name not in ("", ".", "..") and "/" not in name and "\0" not in name


def prepare_dir(path: str, option: str) -> str:
    """Make the directory ``path`` of ``option`` if missing; its absolute path.

    :raises UsageError: it cannot be made, or it is not a directory
    """
    path = os.path.abspath(path)
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError as e:
        raise UsageError(f"{option}: not a directory: {path}") from e
    except OSError as e:
        raise UsageError(f"{option}: cannot make {path}: {e.strerror or e}") from e
    return path


class OutputFiles:
    """One stream of every slave into ``DIR/NAME`` (``-o`` or ``-e``).

    A file is made when the slave's first output comes, or when the slave
    ends having run its command (an empty file for a command that printed
    nothing); an earlier file of that name is replaced.  Thread-safe.
    """

    def __init__(self, directory: str, option: str) -> None:
        self.directory = directory
        self.option = option
        self._lock = threading.Lock()
        self._fds: Dict[str, int] = {}
        self._failed: Dict[str, str] = {}

    def write(self, name: str, data: bytes) -> None:
        """Append ``data`` to ``name``'s file."""
        with self._lock:
            fd = self._open(name)
            if fd is None:
                return
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            except OSError as e:
                self._fail(name, f"cannot write {self._path(name)}: {e.strerror or e}")

    def end(self, name: str, ran: bool) -> Optional[str]:
        """``name`` has ended: its file closed (made first when ``ran``);
        why its output could not be saved, or None."""
        with self._lock:
            if ran:
                self._open(name)
            fd = self._fds.pop(name, None)
            if fd is not None:
                os.close(fd)
            return self._failed.pop(name, None)

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def _open(self, name: str) -> Optional[int]:
        if name in self._failed:
            return None
        fd = self._fds.get(name)
        if fd is not None:
            return fd
        if not safe_file_name(name):
            self._failed[name] = f"{self.option}: the name is not a safe file name; output not saved"
            return None
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self._path(name), flags, 0o666)
        except OSError as e:
            self._fail(name, f"cannot write {self._path(name)}: {e.strerror or e}")
            return None
        self._fds[name] = fd
        return fd

    def _fail(self, name: str, why: str) -> None:
        self._failed[name] = f"{self.option}: {why}"
        fd = self._fds.pop(name, None)
        if fd is not None:
            os.close(fd)


_NUMBERED = re.compile(r"^(.*?)(\d+)$")


def _runs(numbers: List[Tuple[int, str]]) -> str:
    """``[(1, "1"), (2, "2"), (5, "5")]`` -> ``1-2,5`` (zero-padded numbers
    only run on with numbers of their own width)."""
    parts: List[str] = []
    i = 0
    while i < len(numbers):
        j = i
        while j + 1 < len(numbers) and numbers[j + 1][0] == numbers[j][0] + 1 and \
                (len(numbers[j + 1][1]) == len(numbers[j][1]) or not numbers[j + 1][1].startswith("0")):
            j += 1
        parts.append(numbers[i][1] if i == j else f"{numbers[i][1]}-{numbers[j][1]}")
        i = j + 1
    return ",".join(parts)


def compress_names(names: Iterable[str]) -> str:
    """Names as one short text, numeric ranges compressed: ``web-1``,
    ``web-2``, ``db-1`` -> ``db-1, web-[1-2]`` (dshbak's way).  Each name is
    passed through :func:`printable`."""
    numbered: Dict[str, List[Tuple[int, str]]] = {}
    plain: List[str] = []
    for name in sorted(set(names)):
        m = _NUMBERED.match(name)
        if m is None:
            plain.append(name)
        else:
            numbered.setdefault(m.group(1), []).append((int(m.group(2)), m.group(2)))
    items: List[Tuple[str, str]] = [(name, printable(name)) for name in plain]
    for stem, numbers in numbered.items():
        numbers.sort()
        if len(numbers) == 1:
            items.append((stem + numbers[0][1], printable(stem + numbers[0][1])))
        else:
            items.append((stem, f"{printable(stem)}[{_runs(numbers)}]"))
    return ", ".join(text for _, text in sorted(items))


def outcome_words(status: Optional[int], error: Optional[str], errtag: Optional[str]) -> Tuple[str, str]:
    """(state, detail) of a slave's end: ``ok``, ``failed`` (exit status),
    ``error``, ``away`` (its connection was lost) or ``skipped`` (never
    started: cancelled or interrupted first)."""
    if error is not None:
        if errtag in ("cancelled", "skipped", "away"):  # never started (remsh.pacing's tags too)
            return "skipped", error
        if errtag == "disconnected":
            return "away", error
        return "error", error
    if status == 0:
        return "ok", ""
    return "failed", status_words(status)


def status_words(status: Optional[int], interrupted: bool = False) -> str:
    """A command's exit status in words: ``exit status 4``; one a signal
    ended, ``interrupted`` when the run was, else ``killed by signal 9``."""
    if status is not None and status < 0:
        return "interrupted" if interrupted else f"killed by signal {-status}"
    return f"exit status {status}"


def summary_lines(results: Sequence[Tuple[str, Optional[int], Optional[str], Optional[str], float]]) -> List[str]:
    """The closing summary: one line a slave (name, state, detail,
    duration), then the totals (``3 slaves: 2 ok, 1 failed``).  ``results``
    are (name, status, error, errtag, duration in seconds)."""
    rows = []
    counts: Dict[str, int] = {}
    for name, status, error, errtag, duration in sorted(results):
        state, detail = outcome_words(status, error, errtag)
        counts[state] = counts.get(state, 0) + 1
        rows.append((printable(name), state, printable(detail), f"{duration:.2f} s"))
    width = max((len(r[0]) for r in rows), default=0)
    lines = []
    for shown, state, detail, took in rows:
        lines.append(f"{shown.ljust(width)}  {state.ljust(7)} {took.rjust(8)}" + (f"  {detail}" if detail else ""))
    n = len(rows)
    order = ("ok", "failed", "error", "away", "skipped")
    totals = ", ".join(f"{counts[s]} {s}" for s in order if counts.get(s))
    lines.append(f"{n} slave{'' if n == 1 else 's'}" + (f": {totals}" if totals else ""))
    return lines


class Folder:
    """``--fold``: every slave's output kept until the end, then printed
    once per group of slaves with the same stdout, stderr and outcome."""

    def __init__(self, limit: int = MAX_FOLD_OUTPUT) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._kept: Dict[Tuple[str, str], bytearray] = {}
        self._truncated: Dict[str, bool] = {}

    def output(self, name: str, stream: str, data: bytes) -> None:
        """Keep a chunk of ``name``'s ``stdout`` or ``stderr``."""
        with self._lock:
            buf = self._kept.setdefault((name, stream), bytearray())
            room = self.limit - len(buf)
            if len(data) > room:
                self._truncated[name] = True
            buf += data[:max(0, room)]

    def groups(self, outcomes: Dict[str, Tuple[str, str]]) -> List[Tuple[str, bytes, bytes, bool]]:
        """(header, stdout, stderr, truncated) for each group of the slaves
        in ``outcomes`` (name -> (state, detail)), in the order of their
        first name.  The header is ``web-[1-2], db-1`` plus the outcome when
        it is not ``ok``."""
        with self._lock:
            by_key: Dict[Tuple[bytes, bytes, str, str], List[str]] = {}
            truncated: Dict[Tuple[bytes, bytes, str, str], bool] = {}
            for name in sorted(outcomes):
                out = bytes(self._kept.pop((name, "stdout"), b""))
                err = bytes(self._kept.pop((name, "stderr"), b""))
                key = (out, err) + outcomes[name]
                by_key.setdefault(key, []).append(name)
                truncated[key] = truncated.get(key, False) or self._truncated.pop(name, False)
        result = []
        for key, names in by_key.items():
            out, err, state, detail = key
            header = compress_names(names)
            if state != "ok":
                header += f" ({state}{': ' + printable(detail) if detail else ''})"
            result.append((header, out, err, truncated[key]))
        return result

    def print_groups(self, printer: LinePrinter, out: TextIO, err: TextIO,
                     outcomes: Dict[str, Tuple[str, str]]) -> None:
        """Print each group once: a header naming its slaves (dshbak's
        three lines), then their stdout as it was; the same header on
        ``err`` before their stderr when they wrote there.  Output that does
        not end with a line break gets one, so that the next header starts
        a line."""
        for header, stdout, stderr, truncated in self.groups(outcomes):
            rule = "-" * min(max(len(header), 16), 78)
            if truncated:
                header += f" (output past {self.limit >> 20} MiB a stream not kept)"
            for stream, data in ((out, stdout), (err, stderr)):
                if stream is out or data:
                    for line in (rule, header, rule):
                        printer.write_line(stream, line)
                    printer.write_raw(stream, data if data.endswith(b"\n") or not data else data + b"\n")
                    printer.flush_all()
