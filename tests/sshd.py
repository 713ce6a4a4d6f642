"""Helpers for the SSH tests: key files, ``known_hosts`` / ``authorized_keys``
files, ``remsh-slave`` child processes, and a throwaway OpenSSH ``sshd``.

:class:`Sshd` runs the system's ``sshd`` in the foreground with a config of
its own in a temporary directory (its own host key, ``authorized_keys`` and
PID file; 127.0.0.1 and a free port only), waits until the port accepts and
kills it by PID in :meth:`Sshd.stop`.  :func:`require_sshd` skips a test
when ``sshd`` is missing, except under CI (``CI`` set in the environment),
where a missing ``sshd`` is a failure.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import paramiko
import pytest

from remsh.transports import ssh

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
SSHD = "/usr/sbin/sshd"
#: Bound on waiting for a child to start, register, exit or vanish.
WAIT = 20.0


# -- keys ----------------------------------------------------------------------


def make_key(kind: str, path: Path) -> paramiko.PKey:
    """Write a new unencrypted private key of ``kind`` (``rsa``, ``ecdsa`` or
    ``ed25519``) to ``path`` (mode 0600) and return it.  paramiko cannot
    generate Ed25519 keys, so ``ssh-keygen`` does those."""
    if kind == "ed25519":
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", str(path)],
                       check=True, stdin=subprocess.DEVNULL, timeout=WAIT)
    else:
        key = paramiko.RSAKey.generate(2048) if kind == "rsa" else paramiko.ECDSAKey.generate()
        key.write_private_key_file(str(path))
    os.chmod(path, 0o600)
    return ssh.load_private_key(path)


def write_authorized_keys(path: Path, entries: Iterable[Tuple[paramiko.PKey, str]]) -> Path:
    """An ``authorized_keys`` file letting each key register as its name."""
    path.write_text("".join(ssh.authorized_keys_line(k, n) + "\n" for k, n in entries))
    return path


def write_known_hosts(path: Path, entries: Iterable[Tuple[str, int, paramiko.PKey]]) -> Path:
    """A ``known_hosts`` file trusting each key for its host and port."""
    path.write_text("".join(ssh.known_hosts_line(h, p, k) + "\n" for h, p, k in entries))
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_until(condition: Callable[[], object], timeout: float = WAIT, what: str = "condition") -> None:
    """Poll ``condition()`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


# -- remsh-slave processes -----------------------------------------------------------


class SlaveProcs:
    """Starts ``python -m remsh.slave.main`` children (output to a log file
    each) and kills and reaps them all in :meth:`close`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: List[Tuple["subprocess.Popen[bytes]", Path]] = []

    def start(self, args: Sequence[str], name: str = "slave") -> "subprocess.Popen[bytes]":
        basedir = self.workdir / f"base-{name}-{len(self.procs)}"
        basedir.mkdir(parents=True)
        log_path = self.workdir / f"{name}-{len(self.procs)}.log"
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("REMSH_SECRET", None)
        with open(log_path, "wb") as log:
            p = subprocess.Popen([sys.executable, "-m", "remsh.slave.main", "--basedir", str(basedir),
                                  "--name", name, "--connect-timeout", "10", *args],
                                 cwd=str(ROOT), env=env, stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT)
        p.basedir = basedir  # type: ignore[attr-defined]
        p.log_path = log_path  # type: ignore[attr-defined]
        self.procs.append((p, log_path))
        return p

    @staticmethod
    def log_text(p: "subprocess.Popen[bytes]") -> str:
        try:
            return str(p.log_path.read_text(errors="replace")[-4000:])  # type: ignore[attr-defined]
        except OSError:
            return ""

    def wait(self, p: "subprocess.Popen[bytes]", timeout: float = WAIT) -> int:
        """The exit status; fails the test if still running after ``timeout``."""
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"slave still running after {timeout:g} s\n{self.log_text(p)}")

    def close(self) -> None:
        for p, _ in self.procs:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass


# -- a throwaway OpenSSH server ----------------------------------------------------


def require_sshd() -> str:
    """The sshd program; skip the test if missing (fail instead under CI)."""
    path = SSHD if os.access(SSHD, os.X_OK) else shutil.which("sshd")
    if path:
        return path
    message = "OpenSSH sshd is not installed (apt-get install openssh-server)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


class Sshd:
    """An OpenSSH server on 127.0.0.1 for one test, configured only by files
    in ``workdir``; ``authorized_keys`` lists the keys that may log in."""

    def __init__(self, workdir: Path, authorized_keys: Path) -> None:
        self.program = require_sshd()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.host_key_path = workdir / "ssh_host_ed25519_key"
        self.host_key = make_key("ed25519", self.host_key_path)
        self.authorized_keys = authorized_keys
        self.user = getpass.getuser()
        self.port = 0
        self.log_path = workdir / "sshd.log"
        self.proc: Optional["subprocess.Popen[bytes]"] = None

    def _config(self, port: int) -> Path:
        config = self.workdir / "sshd_config"
        config.write_text("\n".join([
            "ListenAddress 127.0.0.1",
            f"Port {port}",
            f"HostKey {self.host_key_path}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            f"PidFile {self.workdir / 'sshd.pid'}",
            "UsePAM no",
            "StrictModes no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "AuthenticationMethods publickey",
            # the tests run as root in CI: keys only, as for any user
            "PermitRootLogin prohibit-password",
            "AllowTcpForwarding yes",
            "PermitOpen any",
            "UseDNS no",
            "LogLevel VERBOSE",
            "",
        ]))
        return config

    def start(self) -> "Sshd":
        """Start sshd on a free port and wait (bounded) until it accepts."""
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        last_error = ""
        for _ in range(3):  # the free port may be taken before sshd binds it
            port = free_port()
            config = self._config(port)
            check = subprocess.run([self.program, "-t", "-f", str(config)], capture_output=True, text=True,
                                   timeout=WAIT)
            if check.returncode != 0:
                pytest.fail(f"sshd rejects its test configuration: {check.stderr}")
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen([self.program, "-D", "-e", "-f", str(config)],
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with socket.create_connection((HOST, port), timeout=1.0):
                        self.port = port
                        return self
                except OSError:
                    time.sleep(0.05)
            last_error = self.log_text()
            self.stop()
        pytest.fail(f"sshd did not start:\n{last_error}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Kill sshd by its PID and reap it."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
