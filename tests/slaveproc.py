"""Real ``remsh-slave`` processes and TCP listeners for the network tests.

:class:`SlaveProcesses` starts ``python -m remsh.slave.main`` children with
the repository on ``PYTHONPATH``; a secret reaches them through a file
(``--secret-file``) or the ``REMSH_SECRET`` environment variable, never the
command line.  Each child's output goes to a log file of its own, which
:meth:`SlaveProcess.log_text` returns for assertion messages.  The
``slave_procs`` fixture kills and reaps every child at teardown;
``tcp_listener`` builds started :class:`TcpSlaveListener` objects on
127.0.0.1 and stops them at teardown.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import pytest

from remsh.master.slave import Slave
from remsh.master.slavecollection.simple import SimpleSlaveCollection
from remsh.master.slavelistener.tcp import TcpSlaveListener

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
SECRET = b"correct horse battery staple"
#: Bound on every wait for a slave process to register, exit or vanish.
WAIT = 20.0


class SlaveProcess:
    """One running ``remsh-slave`` child."""

    def __init__(self, name: str, popen: "subprocess.Popen[bytes]", basedir: Path, log_path: Path) -> None:
        self.name = name
        self.popen = popen
        self.basedir = basedir
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> Optional[int]:
        return self.popen.poll()

    def wait(self, timeout: float = WAIT) -> int:
        """The exit status; fails the test if the process is still running after ``timeout``."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"slave {self.name} still running after {timeout:g} s\n{self.log_text()}")

    def signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def log_text(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            text = ""
        return f"--- log of slave {self.name} (pid {self.pid}) ---\n{text[-4000:]}"


class SlaveProcesses:
    """Starts ``remsh-slave`` processes under ``workdir`` and reaps them all in :meth:`close`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.procs: List[SlaveProcess] = []
        self._secret_files: Dict[bytes, Path] = {}

    def secret_file(self, secret: bytes) -> Path:
        """A file (mode 0600) holding ``secret``."""
        path = self._secret_files.get(secret)
        if path is None:
            path = self.workdir / f"secret-{len(self._secret_files)}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secret + b"\n")
            self._secret_files[secret] = path
        return path

    def start(self, port: Optional[int], name: str, *, host: str = HOST, secret: Optional[bytes] = SECRET,
              secret_env: bool = False, insecure: bool = False, tls: bool = False,
              tls_ca: Union[Path, str, None] = None, no_reconnect: bool = False,
              max_backoff: Optional[float] = 1.0, basedir: Optional[Path] = None,
              extra_args: Sequence[str] = (), env: Optional[Mapping[str, Optional[str]]] = None) -> SlaveProcess:
        """Start ``remsh-slave --name NAME ... HOST PORT``.

        ``secret`` goes through ``--secret-file`` or, with ``secret_env``, through
        ``REMSH_SECRET``; ``None`` sends no secret at all.  ``basedir`` defaults
        to a fresh directory named after the slave.  ``port=None`` gives no
        ``HOST PORT`` (for ``--ssh`` in ``extra_args``).  ``env`` sets
        variables in the child's environment, or removes those given ``None``.
        """
        if basedir is None:
            basedir = self.workdir / "base" / name
            basedir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "remsh.slave.main", "--name", name, "--basedir", str(basedir)]
        child_env = {k: v for k, v in os.environ.items() if k not in ("REMSH_SECRET", "PYTHONPATH")}
        child_env["PYTHONPATH"] = str(ROOT)
        # the slave's record of running commands (remsh.slave.pgroups): not in the tester's home
        child_env["XDG_STATE_HOME"] = str(self.workdir / "state")
        if secret is not None:
            if secret_env:
                child_env["REMSH_SECRET"] = secret.decode("utf-8")
            else:
                argv += ["--secret-file", str(self.secret_file(secret))]
        if insecure:
            argv.append("--insecure")
        if tls:
            argv.append("--tls")
        if tls_ca is not None:
            argv += ["--tls-ca", str(tls_ca)]
        if no_reconnect:
            argv.append("--no-reconnect")
        if max_backoff is not None:
            argv += ["--max-backoff", repr(max_backoff)]
        argv += list(extra_args)
        if port is not None:
            argv += [host, str(port)]
        for key, value in (env or {}).items():
            if value is None:
                child_env.pop(key, None)
            else:
                child_env[key] = value
        assert secret is None or secret.decode("utf-8", "replace") not in " ".join(argv)
        log_path = self.workdir / f"{name}-{len(self.procs)}.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(argv, env=child_env, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, cwd=str(basedir))
        proc = SlaveProcess(name, popen, basedir, log_path)
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        """Every child's log, for assertion messages."""
        return "\n".join(p.log_text() for p in self.procs)

    def close(self) -> None:
        """Kill every child still running and reap them all."""
        for proc in self.procs:
            if proc.popen.poll() is None:
                try:
                    proc.popen.send_signal(signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.popen.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
                pass
        self.procs.clear()


@pytest.fixture
def slave_procs(tmp_path: Path) -> Iterator[SlaveProcesses]:
    """Starts ``remsh-slave`` processes; every one is killed and reaped at teardown."""
    procs = SlaveProcesses(tmp_path / "slaves")
    try:
        yield procs
    finally:
        procs.close()


@pytest.fixture
def tcp_listener() -> Iterator[Callable[..., TcpSlaveListener]]:
    """``tcp_listener(**kwargs)``: a started listener on 127.0.0.1 with its own
    collection (``secret=SECRET`` unless other credentials are given), stopped at teardown."""
    made: List[TcpSlaveListener] = []

    def make(**kwargs: object) -> TcpSlaveListener:
        if not {"secret", "authenticator", "allow_insecure"} & set(kwargs):
            kwargs["secret"] = SECRET
        kwargs.setdefault("host", HOST)
        kwargs.setdefault("slave_collection", SimpleSlaveCollection())
        listener = TcpSlaveListener(port=0, **kwargs)  # type: ignore[arg-type]
        listener.start()
        made.append(listener)
        return listener

    try:
        yield make
    finally:
        for listener in reversed(made):
            listener.stop()


def wait_registered(listener: TcpSlaveListener, proc: SlaveProcess, timeout: float = WAIT) -> Slave:
    """The slave object ``proc`` registered as; fails with its log if it does not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        slave = listener.slave_collection.get_slave(
            True, lambda s: s.name == proc.name, timeout=min(0.5, max(0.0, deadline - time.monotonic())))
        if slave is not None:
            return slave
        if proc.poll() is not None or time.monotonic() >= deadline:
            pytest.fail(f"slave {proc.name} did not register (exit status {proc.poll()})\n{proc.log_text()}")


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the peer sends until it closes (or resets) the connection.

    Fails the test if the connection is still open after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    data = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"connection still open after {timeout:g} s (received {bytes(data[:80])!r})")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return bytes(data)
        except socket.timeout:
            continue
        if not chunk:
            return bytes(data)
        data += chunk
