"""Helpers for the core tests: a slave child driven at the wire level, an
unprivileged slave for permission tests, and bounded waits."""

from __future__ import annotations

import os
import select
import shutil
import stat
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional

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
            wrapper = os.path.join(self.root, "python-as-nobody")
            with open(wrapper, "w") as f:
                f.write(f"#!/bin/sh\nexec {setpriv} --reuid={NOBODY} --regid={NOBODY} "
                        f"--clear-groups {sys.executable} \"$@\"\n")
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
