"""Helpers for the core tests: a slave child driven at the wire level, an
unprivileged slave for permission tests, and bounded waits."""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import remsh
from remsh.handshake import (MASTER_GREETING, SLAVE_GREETING, exchange_greeting,
                             master_handshake)
from remsh.transports.local import spawn_local_slave, stop_child
from remsh.wire import Box, Wire

#: Bound on every wait in the tests that is not itself under test.
WAIT = 10.0


class RawSlave:
    """A slave child process, handshake done, with the bare :class:`Wire` to it.

    For requests a correct master never sends: the test writes boxes and reads
    the slave's answers itself.
    """

    def __init__(self, basedir: str, name: str = "raw") -> None:
        self.basedir = basedir
        self.proc, stream = spawn_local_slave(basedir, name)
        self.wire = Wire(stream, label="raw slave")
        try:
            exchange_greeting(self.wire, MASTER_GREETING, SLAVE_GREETING, WAIT)
            self.registration = master_handshake(self.wire, lambda n, w: (True, None),
                                                 timeout=WAIT, greet=False)
        except BaseException:
            self.close()
            raise

    def send(self, box: Dict[Any, Any]) -> None:
        self.wire.send_box(box)

    def read(self, timeout: float = WAIT) -> Optional[Box]:
        return self.wire.read_box(timeout)

    def request(self, box: Dict[Any, Any]) -> Optional[Box]:
        """Send one box and return the slave's next box."""
        self.send(box)
        return self.read()

    def ping(self) -> Optional[Box]:
        return self.request({b"meth": b"ping", b"version": b"1"})

    def close(self) -> None:
        self.wire.close()
        stop_child(self.proc)

    def send_raw(self, data: bytes) -> None:
        """Write bytes to the slave exactly as given (no encoding)."""
        self.wire.stream.send_all(data)

    def box_reader(self) -> "RawBoxReader":
        """A reader of the slave's next boxes as their exact bytes.

        Use it instead of :meth:`read` from then on: both read the same stream.
        """
        assert not self.wire.has_buffered_box(), "boxes already buffered by the Wire"
        return RawBoxReader(self.wire.stream)


# -- boxes as bytes, without the library's decoder ------------------------------


def box_length(data: "bytes | bytearray") -> Optional[int]:
    """The length of the first complete box at the start of ``data`` (``None``
    when ``data`` does not yet hold a whole box).

    Reads only the 2-byte length prefixes, so a byte-level test does not
    depend on the decoder it checks.
    """
    pos = 0
    key_next = True
    while len(data) - pos >= 2:
        n = data[pos] << 8 | data[pos + 1]
        if key_next and n == 0:
            return pos + 2
        if len(data) - pos - 2 < n:
            return None
        pos += 2 + n
        key_next = not key_next
    return None


def box_pairs(raw: bytes) -> List[Tuple[bytes, bytes]]:
    """The (key, value) pairs of one encoded box, in wire order."""
    pairs: List[Tuple[bytes, bytes]] = []
    pos = 0
    while True:
        klen = raw[pos] << 8 | raw[pos + 1]
        pos += 2
        if klen == 0:
            assert pos == len(raw), "bytes after the end of the box"
            return pairs
        key = raw[pos:pos + klen]
        pos += klen
        vlen = raw[pos] << 8 | raw[pos + 1]
        pos += 2
        pairs.append((key, raw[pos:pos + vlen]))
        pos += vlen


class RawBoxReader:
    """Cuts a byte stream into boxes, each returned as its exact bytes."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.buf = bytearray()

    def read(self, timeout: float = WAIT) -> Optional[bytes]:
        """The next box's bytes; ``None`` at end of stream between boxes.

        Raises ``AssertionError`` when no whole box arrives within
        ``timeout`` or the stream ends inside a box.
        """
        deadline = time.monotonic() + timeout
        while True:
            n = box_length(self.buf)
            if n is not None:
                raw = bytes(self.buf[:n])
                del self.buf[:n]
                return raw
            left = deadline - time.monotonic()
            assert left > 0, f"no whole box within {timeout} s (have {bytes(self.buf[:64])!r})"
            try:
                data = self.stream.recv(1 << 20, left)
            except TimeoutError:
                continue
            if not data:
                assert not self.buf, f"stream ended inside a box: {bytes(self.buf[:64])!r}"
                return None
            self.buf += data

    def pending(self) -> bytes:
        """Bytes received but not yet returned (should be none between boxes)."""
        return bytes(self.buf)


@contextlib.contextmanager
def environment(overrides: Mapping[bytes, Optional[bytes]]) -> Iterator[None]:
    """Set (value) or remove (``None``) variables of this process's
    environment for the block, e.g. so that a slave child inherits them."""
    saved = {name: os.environb.get(name) for name in overrides}
    try:
        for name, value in overrides.items():
            if value is None:
                os.environb.pop(name, None)
            else:
                os.environb[name] = value
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environb.pop(name, None)
            else:
                os.environb[name] = old


def process_alive(pid: int) -> bool:
    """True while process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except FileNotFoundError:
        return False


def interrupt_after(proc: "subprocess.Popen[bytes]", ready: Callable[[], object],
                    timeout: float = 30.0) -> Tuple[bytes, bytes]:
    """Once ``ready()`` returns, Ctrl-C for ``proc`` (SIGINT); then its whole
    stdout and stderr once it ended.  ``proc`` is killed and reaped if it has
    not ended when this returns or raises (``ready`` failing, too)."""
    try:
        ready()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return out, err


def run_in_thread(fn: Callable[[], Any], name: str = "test-worker") -> "Outcome":
    """Run ``fn`` in a daemon thread; the returned :class:`Outcome` holds its
    result or exception once ``done`` is set."""
    out = Outcome()

    def target() -> None:
        try:
            out.result = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out.error = e
        finally:
            out.finished_at = time.monotonic()
            out.done.set()

    out.thread = threading.Thread(target=target, name=name, daemon=True)
    out.thread.start()
    return out


class Outcome:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.finished_at: Optional[float] = None
        self.thread: Optional[threading.Thread] = None

    def wait(self, timeout: float = WAIT) -> "Outcome":
        assert self.done.wait(timeout), f"worker still running after {timeout} s"
        assert self.thread is not None
        self.thread.join(timeout)
        return self


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT, what: str = "condition") -> None:
    """Poll ``predicate`` until true, failing the test after ``timeout`` s.

    Only for state that offers nothing to wait on (another object's private
    counter); everything else waits on an event.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.002)


def wait_pid_exit(pidfd: int, timeout: float = WAIT) -> bool:
    """True once the process behind ``pidfd`` has ended (within ``timeout``)."""
    ready, _, _ = select.select([pidfd], [], [], timeout)
    return bool(ready)


def temp_files(directory: "str | os.PathLike[str]") -> List[bytes]:
    """The names of ``*.remsh-part`` temporary files in ``directory``."""
    return [n for n in os.listdir(os.fsencode(directory)) if n.endswith(b".remsh-part")]


# -- an unprivileged slave (permission tests when the suite runs as root) -------

NOBODY = 65534


def need_unprivileged() -> bool:
    """True when the tests run as root, so permission tests need another user."""
    return os.geteuid() == 0


def _readable_by_all(top: str) -> None:
    for dirpath, _dirs, files in os.walk(top):
        os.chmod(dirpath, 0o755)
        for name in files:
            os.chmod(os.path.join(dirpath, name), 0o644)


_NOBODY_PYTHON: Optional[str] = None


def _python_for(setpriv: str) -> str:
    """An interpreter of this Python version that ``nobody`` can start."""
    global _NOBODY_PYTHON
    if _NOBODY_PYTHON is None:
        version = "%d.%d" % sys.version_info[:2]
        candidates = [sys.executable, os.path.realpath(sys.executable),
                      getattr(sys, "_base_executable", sys.executable),
                      f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"]
        for cand in dict.fromkeys(candidates):
            probe = subprocess.run([setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", cand,
                                    "-I", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                   capture_output=True, timeout=WAIT, cwd="/")
            if probe.returncode == 0 and probe.stdout.decode().strip() == version:
                _NOBODY_PYTHON = cand
                break
        else:
            raise RuntimeError(f"no Python {version} interpreter that nobody can run")
    return _NOBODY_PYTHON


class UnprivilegedSetup:
    """A base directory and python wrapper that run a local slave as ``nobody``
    when the tests run as root (as the current user otherwise)."""

    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="remsh-unpriv-")
        os.chmod(self.root, 0o755)
        self.basedir = os.path.join(self.root, "base")
        os.mkdir(self.basedir)
        self.python: Optional[str] = None
        if need_unprivileged():
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                raise RuntimeError("setpriv is missing")
            os.chown(self.basedir, NOBODY, NOBODY)
            # The checkout (and the virtualenv in it) may sit below a directory
            # only root can enter: the slave gets a copy of the package it can
            # read and an interpreter it can run.
            lib = os.path.join(self.root, "lib")
            shutil.copytree(os.path.dirname(os.path.abspath(remsh.__file__)), os.path.join(lib, "remsh"),
                            ignore=shutil.ignore_patterns("__pycache__"))
            _readable_by_all(lib)
            python = _python_for(setpriv)
            wrapper = os.path.join(self.root, "python-as-nobody")
            with open(wrapper, "w") as f:
                f.write(f"#!/bin/sh\nPYTHONPATH={shlex.quote(lib)} PYTHONDONTWRITEBYTECODE=1 "
                        f"exec {setpriv} --reuid={NOBODY} --regid={NOBODY} "
                        f"--clear-groups {shlex.quote(python)} \"$@\"\n")
            os.chmod(wrapper, 0o755)
            self.python = wrapper

    def own(self, path: str) -> None:
        """Give ``path`` to the slave's user (after the test made it as root)."""
        if need_unprivileged():
            os.lchown(path, NOBODY, NOBODY)

    def cleanup(self) -> None:
        def fix(func: Callable, p: str, exc: object) -> None:
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            func(p)

        shutil.rmtree(self.root, onerror=fix)
