"""The ``remsh`` master program, run as a real process."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from remsh import __version__
from remsh.cli import PrintableFormatter
from tests.util import interrupt_after, process_alive, wait_until

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


def test_one_local_slave_and_its_failure_is_passed_through(tmp_path):
    """--local 1 runs the command on one local slave; its failure status (3) is passed through."""
    r = remsh("run", "--local", "1", "--basedir", str(tmp_path), "--", "sh", "-c", "pwd; exit 3")
    assert r.returncode == 3
    assert r.stdout.decode().strip() == f"local1 | {tmp_path}"
    assert "exit status 3" in r.stderr.decode()


def _no_master_env(tmp_path):
    """An environment whose default control path (under XDG_RUNTIME_DIR) has no master."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = _env(XDG_RUNTIME_DIR=str(runtime), HOME=str(tmp_path))
    env.pop("REMSH_MASTER", None)
    return env, runtime / "remsh" / "master.sock"


def test_no_master_and_no_local_option_runs_nothing_on_this_machine(tmp_path):
    """run/put/get with no master reachable and no --local N: exit 2, one line naming the path, nothing done here."""
    env, path = _no_master_env(tmp_path)
    marker = tmp_path / "ran-here"
    src = tmp_path / "src.txt"
    src.write_text("x\n")
    for args in (("run", "--", "sh", "-c", f"touch {marker}"), ("put", str(src), str(tmp_path / "copy.txt")),
                 ("get", str(src), str(tmp_path / "got"))):
        r = remsh("--verbose", *args, cwd=tmp_path, env=env)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        _no_traceback(r)
        lines = r.stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"remsh: no remsh master running at {path}"), lines
        assert "--local N" in lines[0]
        assert r.stdout == b""
    assert not marker.exists()
    assert not (tmp_path / "copy.txt").exists() and not (tmp_path / "got").exists()


def test_local_0_is_a_usage_error(tmp_path):
    """--local 0 (and a negative count) is refused with exit 2 before anything starts."""
    env, _ = _no_master_env(tmp_path)
    for n in ("0", "-1"):
        r = remsh("run", "--local", n, "--basedir", str(tmp_path), "--", "sh", "-c", f"touch {tmp_path}/ran",
                  env=env)
        assert r.returncode == 2
        _no_traceback(r)
        assert b"--local: must be at least 1" in r.stderr
    assert not (tmp_path / "ran").exists()


def test_timeout_is_reported(tmp_path):
    """--timeout kills the command and the run fails naming the slave (exit 3: the slaves failed to run it)."""
    r = remsh("run", "--local", "2", "--timeout", "0.5", "--basedir", str(tmp_path), "--", "sleep", "30")
    assert r.returncode == 3
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


# -- exit statuses, one-line errors ------------------------------------------


def _no_traceback(r):
    assert b"Traceback" not in r.stderr, r.stderr.decode()


def test_exit_statuses_of_commands(tmp_path):
    """0 on success; one slave's status 1-125 passed through; 1 for other statuses or several slaves."""
    base = ["run", "--local", "1", "--basedir", str(tmp_path), "--"]
    assert remsh(*base, "true").returncode == 0
    assert remsh(*base, "sh", "-c", "exit 7").returncode == 7
    assert remsh(*base, "sh", "-c", "exit 125").returncode == 125
    assert remsh(*base, "sh", "-c", "exit 126").returncode == 1
    assert remsh(*base, "sh", "-c", "kill -9 $$").returncode == 1
    two = remsh("run", "--local", "2", "--basedir", str(tmp_path), "--", "sh", "-c", "exit 7")
    assert two.returncode == 1
    assert "remsh: failed on 2 of 2 slaves" in two.stderr.decode()


def test_command_that_cannot_start_exits_3_naming_the_slave_once(tmp_path):
    """execfailed is 'the slave failed to run it' (3), and the message names the slave once."""
    r = remsh("run", "--local", "1", "--basedir", str(tmp_path), "--", "no-such-command-here")
    assert r.returncode == 3
    err = r.stderr.decode()
    assert "remsh: local1: execute: " in err
    assert "local1: local1" not in err
    assert "[execfailed]" in err


def test_missing_secret_file_is_one_line_and_exit_2(tmp_path):
    """remsh run with a secret file that does not exist: one line naming it, exit 2, no traceback."""
    missing = tmp_path / "no-such-secret"
    r = remsh("run", "--listen", "127.0.0.1:0", "--secret-file", str(missing), "--", "true")
    assert r.returncode == 2
    _no_traceback(r)
    assert r.stderr.decode().splitlines() == [
        f"remsh: cannot read secret file {missing}: No such file or directory"]


def test_busy_port_is_one_line_and_exit_2(tmp_path):
    """remsh run --listen on a port in use: one line, exit 2, no traceback."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = remsh("run", "--listen", f"127.0.0.1:{port}", "--insecure", "--", "true")
    assert r.returncode == 2
    _no_traceback(r)
    lines = r.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"remsh: cannot listen on 127.0.0.1:{port}: "), lines


def test_missing_host_key_is_one_line_and_exit_2(tmp_path):
    """remsh run --ssh-listen with a host key file that does not exist: one line, exit 2."""
    pytest.importorskip("paramiko")
    keys = tmp_path / "authorized_keys"
    keys.write_text("")
    r = remsh("run", "--ssh-listen", "127.0.0.1:0", "--host-key", str(tmp_path / "nokey"),
              "--authorized-keys", str(keys), "--", "true")
    assert r.returncode == 2
    _no_traceback(r)
    lines = r.stderr.decode().splitlines()
    assert len(lines) == 1 and str(tmp_path / "nokey") in lines[0], lines


def test_tls_key_without_cert_is_a_usage_error(tmp_path):
    """--tls-key without --tls-cert is refused (exit 2), not silently ignored."""
    r = remsh("run", "--listen", "127.0.0.1:0", "--insecure", "--tls-key", str(tmp_path / "k.pem"), "--", "true")
    assert r.returncode == 2
    assert b"--tls-key needs --tls-cert" in r.stderr


def test_slave_that_never_comes_exits_3(tmp_path):
    """Waiting for a named slave that never registers ends with exit 3, one line."""
    r = remsh("run", "--listen", "127.0.0.1:0", "--insecure", "--slave", "nobody", "--wait-timeout", "0.3",
              "--", "true")
    assert r.returncode == 3
    _no_traceback(r)
    assert len(r.stderr.decode().splitlines()) == 1


def test_version_of_both_programs_and_python_dash_m_remsh():
    """remsh --version, remsh-slave --version and python -m remsh --version print the package version."""
    for module, program in (("remsh.cli", "remsh"), ("remsh", "remsh"), ("remsh.slave.main", "remsh-slave")):
        r = subprocess.run([sys.executable, "-m", module, "--version"], env=_env(), capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().split() == [program, __version__]


def test_python_dash_m_remsh_runs_the_master_program(tmp_path):
    """python -m remsh run --local 1 -- CMD runs the command on a local slave like the remsh program."""
    r = subprocess.run([sys.executable, "-m", "remsh", "run", "--local", "1", "--basedir", str(tmp_path), "--",
                        "echo", "hi"],
                       env=_env(), capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == "local1 | hi\n"


def _start(args, tmp_path, **popen):
    return subprocess.Popen([sys.executable, "-m", "remsh", *args], env=_env(), cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def _read_line_with(stream, text: bytes) -> bytes:
    """Read lines from ``stream`` until one contains ``text`` (bounded by the test timeout)."""
    seen = b""
    while True:
        line = stream.readline()
        seen += line
        if not line:
            raise AssertionError(f"stream ended before {text!r}: {seen!r}")
        if text in line:
            return line


def test_ctrl_c_interrupts_the_remote_commands_and_exits_130(tmp_path):
    """Ctrl-C while commands run: they are killed, one 'interrupted' line, exit 130, no traceback."""
    pidfile = tmp_path / "pid"
    proc = _start(["run", "--local", "1", "--basedir", str(tmp_path), "--", "sh", "-c",
                   f"echo $$ > {pidfile}; echo started; exec sleep 60"], tmp_path)
    out, err = interrupt_after(proc, lambda: _read_line_with(proc.stdout, b"started"))
    assert proc.returncode == 130, err
    assert b"Traceback" not in err
    assert err.decode().splitlines()[-1] == "remsh: interrupted"
    pid = int(pidfile.read_text())
    wait_until(lambda: not process_alive(pid), what=f"the command (pid {pid}) to end")


def test_ctrl_c_while_waiting_for_slaves_exits_130(tmp_path):
    """Ctrl-C while waiting for slaves to register: one line, exit 130, no traceback."""
    proc = _start(["-v", "run", "--listen", "127.0.0.1:0", "--insecure", "--wait", "1", "--wait-timeout", "60",
                   "--", "true"], tmp_path)
    out, err = interrupt_after(proc, lambda: _read_line_with(proc.stderr, b"waiting for TCP slaves"))
    assert proc.returncode == 130, err
    assert err.decode().splitlines() == ["remsh: interrupted"]


def test_stopping_local_slaves_prints_no_exception_ignored(tmp_path):
    """Ending a run on many local slaves never prints 'Exception ignored' or a traceback from the children."""
    for attempt in range(5):
        r = remsh("run", "--local", "8", "--basedir", str(tmp_path), "--", "true")
        assert r.returncode == 0, r.stderr
        assert r.stderr == b"", r.stderr.decode()


# -- the secret ------------------------------------------------------------------


def test_secret_in_environment_never_reaches_local_slaves_or_commands(tmp_path):
    """REMSH_SECRET in remsh's environment is not in a local slave's getenv or a command's environment."""
    r = remsh("run", "--local", "2", "--basedir", str(tmp_path), "--", "env",
              env=_env(REMSH_SECRET="do-not-leak-me"))
    assert r.returncode == 0, r.stderr
    assert b"do-not-leak-me" not in r.stdout
    assert b"REMSH_SECRET" not in r.stdout
    assert b"PATH=" in r.stdout  # the rest of the environment is there


def test_group_readable_secret_file_is_used_with_a_warning_naming_it(tmp_path):
    """A secret file readable by others is used, and a warning names it (as OpenSSH does for keys)."""
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    secret.chmod(0o644)
    r = remsh("run", "--listen", "127.0.0.1:0", "--secret-file", str(secret), "--wait", "1",
              "--wait-timeout", "0.2", "--", "true")
    assert r.returncode == 3  # it went on to wait for slaves
    err = r.stderr.decode()
    assert f"secret file {secret} is accessible by group or others" in err
    secret.chmod(0o600)
    r = remsh("run", "--listen", "127.0.0.1:0", "--secret-file", str(secret), "--wait", "1",
              "--wait-timeout", "0.2", "--", "true")
    assert b"accessible by group or others" not in r.stderr


def test_secret_file_read_by_master_and_slave_alike(tmp_path):
    """One secret file with a significant trailing blank line works for remsh run and remsh-slave together."""
    secret = tmp_path / "secret"
    secret.write_bytes(b" spaced secret \n\n")  # the secret is " spaced secret \n": one newline dropped
    secret.chmod(0o600)
    port = _free_port()
    master = _start(["run", "--listen", f"127.0.0.1:{port}", "--secret-file", str(secret), "--slave", "same-file",
                     "--wait-timeout", "30", "--", "echo", "ok"], tmp_path)
    slave = subprocess.Popen(
        [sys.executable, "-m", "remsh.slave.main", "--name", "same-file", "--basedir", str(tmp_path),
         "--secret-file", str(secret), "--max-backoff", "0.5", "127.0.0.1", str(port)],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        out, err = master.communicate(timeout=60)
    finally:
        for p in (master, slave):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert master.returncode == 0, err
    assert out.decode() == "same-file | ok\n"


# -- output --------------------------------------------------------------------


def test_49_mib_without_newline_comes_out_in_64_kib_lines(tmp_path):
    """A command writing 49 MiB with no newline: remsh prints it as 64 KiB lines, every byte once."""
    size = 49 * 1024 * 1024 + 100
    code = ("import sys; b = b'x' * 65536\n"
            f"n = {size}\n"
            "while n: k = min(n, len(b)); sys.stdout.buffer.write(b[:k]); n -= k")
    r = remsh("run", "--local", "1", "--basedir", str(tmp_path), "--", sys.executable, "-c", code, timeout=110)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.split(b"\n")
    assert lines[-1] == b""
    lines = lines[:-1]
    assert len(lines) == size // 65536 + 1
    assert all(line == b"local1 | " + b"x" * 65536 for line in lines[:-1])
    assert lines[-1] == b"local1 | " + b"x" * 100


# -- the master's log -----------------------------------------------------------


def test_log_lines_escape_what_they_quote_and_keep_the_traceback():
    """remsh's log formatter escapes control characters in a message (slave text) and leaves a traceback's lines."""
    formatter = PrintableFormatter("remsh %(levelname)s %(name)s: %(message)s")
    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("remsh.master", logging.WARNING, __file__, 1, "refused slave %s: %s",
                               ("evil\x1b]0;owned\x07", "text\x1b[2J\nforged"), exc_info)
    text = formatter.format(record)
    first, *rest = text.split("\n")
    assert first == "remsh WARNING remsh.master: refused slave evil\\x1b]0;owned\\x07: text\\x1b[2J\\x0aforged"
    assert rest[0] == "Traceback (most recent call last):" and rest[-1] == "ValueError: boom"


def test_listen_without_a_secret_names_the_options(tmp_path):
    """remsh master --listen with no secret says, in the command line's words, what to give: one line, exit 2."""
    env = _env()
    env.pop("REMSH_SECRET", None)
    r = remsh("--master", str(tmp_path / "m.sock"), "master", "--listen", "127.0.0.1:0",
              "--state-dir", str(tmp_path / "state"), env=env)
    assert r.returncode == 2, r.stderr
    (line,) = r.stderr.decode().splitlines()
    assert "--secret-file" in line and "--insecure" in line and "TcpSlaveListener" not in line


@pytest.mark.parametrize("spec", ["99999", "127.0.0.1:65536", "-5"])
def test_listen_port_out_of_range_is_a_usage_error(tmp_path, spec):
    """A port outside 0-65535 is refused when the option is read: exit 2, no traceback."""
    r = remsh("run", "--listen", spec, "--insecure", "--wait", "1", "--", "true")
    assert r.returncode == 2, r.stderr
    assert b"Traceback" not in r.stderr and b"port must be 0 to 65535" in r.stderr


def test_wait_for_more_local_slaves_than_started_fails_at_once(tmp_path):
    """--wait N with fewer local slaves and no listener can never be met: a usage error at once, not a minute's wait."""
    t0 = time.monotonic()
    r = remsh("run", "--local", "1", "--wait", "2", "--basedir", str(tmp_path), "--", "true")
    assert r.returncode == 2, r.stderr
    assert b"no more slaves can come" in r.stderr and time.monotonic() - t0 < 30
