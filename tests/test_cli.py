"""The ``remsh`` master program, run as a real process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.timeout(120)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("REMSH_SECRET", None)
    env.update(extra)
    return env


def remsh(*args, cwd=None, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "remsh.cli", *args], cwd=cwd, env=env or _env(),
                          capture_output=True, timeout=timeout)


def test_run_prefixes_each_line_with_the_slave_name(tmp_path):
    """Output lines carry the slave name; stderr stays on stderr; success is 0."""
    r = remsh("run", "--local", "3", "--basedir", str(tmp_path), "--",
              "sh", "-c", "printf 'one\\ntwo\\n'; echo err >&2")
    assert r.returncode == 0, r.stderr
    lines = sorted(r.stdout.decode().splitlines())
    assert lines == sorted(f"local{i} | {w}" for i in (1, 2, 3) for w in ("one", "two"))
    assert sorted(r.stderr.decode().splitlines()) == [f"local{i} | err" for i in (1, 2, 3)]
    assert "\033[" not in r.stdout.decode()  # plain when piped


def test_default_is_one_local_slave_and_failure_is_nonzero(tmp_path):
    """With no options one local slave runs the command; a failure exits 1."""
    r = remsh("run", "--basedir", str(tmp_path), "--", "sh", "-c", "pwd; exit 3")
    assert r.returncode == 1
    assert r.stdout.decode().strip() == f"local1 | {tmp_path}"
    assert "exit status 3" in r.stderr.decode()


def test_timeout_is_reported(tmp_path):
    """--timeout kills the command and the run fails naming the slave."""
    r = remsh("run", "--local", "2", "--timeout", "0.5", "--basedir", str(tmp_path), "--", "sleep", "30")
    assert r.returncode == 1
    assert "local1: timed out" in r.stderr.decode()
    assert "local2: timed out" in r.stderr.decode()


def test_missing_command_is_a_usage_error():
    """No command after 'run' exits 2 with a message."""
    r = remsh("run", "--local", "1")
    assert r.returncode == 2
    assert b"no command" in r.stderr


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_on_tcp_slaves_waiting_for_named_slave(tmp_path):
    """remsh listens on TCP with a secret, waits for a named slave and runs there."""
    secret = tmp_path / "secret"
    secret.write_text("cli-secret\n")
    port = _free_port()
    master = subprocess.Popen(
        [sys.executable, "-m", "remsh.cli", "run", "--listen", f"127.0.0.1:{port}",
         "--secret-file", str(secret), "--slave", "tcp-a", "--wait-timeout", "30", "--",
         "sh", "-c", "echo via tcp"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    slave = None
    try:
        deadline = time.monotonic() + 20
        slave = subprocess.Popen(
            [sys.executable, "-m", "remsh.slave.main", "--name", "tcp-a", "--basedir", str(tmp_path),
             "--max-backoff", "0.5", "127.0.0.1", str(port)],
            env=_env(REMSH_SECRET="cli-secret"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out, err = master.communicate(timeout=max(1, deadline - time.monotonic()) + 30)
        assert master.returncode == 0, err
        assert out.decode().strip() == "tcp-a | via tcp"
    finally:
        for p in (master, slave):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def test_host_key_prints_openssh_fingerprint_and_known_hosts_line(tmp_path):
    """'remsh host-key' prints the fingerprint ssh-keygen prints and a known_hosts line."""
    key = tmp_path / "host_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    expected = subprocess.run(["ssh-keygen", "-l", "-f", str(key)], check=True,
                              capture_output=True).stdout.decode().split()[1]
    r = remsh("host-key", "--host-key", str(key), "--host", "127.0.0.1", "--port", "2222")
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(": ", 1) for line in r.stdout.decode().splitlines())
    assert lines["fingerprint"] == expected
    public = (tmp_path / "host_ed25519.pub").read_text().split()
    assert lines["known_hosts"].split() == ["[127.0.0.1]:2222", public[0], public[1]]
