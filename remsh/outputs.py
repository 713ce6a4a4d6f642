"""Where the output of ``remsh run`` goes besides prefixed lines, and how a
run ends on the terminal.

- :class:`OutputFiles`: ``-o DIR`` / ``-e DIR`` (as pssh): each slave's
  stdout or stderr into ``DIR/NAME``, the exact bytes.  A slave whose name is
  not a safe file name (empty, ``.``, ``..``, a ``/`` or a NUL in it) gets no
  file; its part of the job fails instead, so that nothing is written
  outside ``DIR`` and nothing is lost silently.
"""

from __future__ import annotations

import os
import threading
from typing import Dict, Optional

from remsh.errors import UsageError


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
