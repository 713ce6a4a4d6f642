"""The slave programs as real processes: the secret leaves their environment,
logging levels, Ctrl-C, SIGTERM, and the policy options."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from remsh.errors import DeniedError, RemshError
from remsh.handshake import MASTER_GREETING, SLAVE_GREETING, exchange_greeting, master_handshake
from remsh.master.slavelistener.local import LocalSlaveListener
from remsh.slave.main import log_level
from remsh.transports.base import SocketStream
from remsh.wire import Wire
from tests.slaveproc import SECRET, slave_procs, tcp_listener, wait_registered  # noqa: F401
from tests.util import WAIT, wait_until

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]


def _run_env(slave, argv):
    out = bytearray()
    status = slave.execute(argv, stdout_cb=out.extend)
    assert status == 0
    return bytes(out)


# -- the secret leaves the environment ----------------------------------------


def test_getenv_and_commands_of_a_tcp_slave_never_see_remsh_secret(tcp_listener, slave_procs):
    """A remsh-slave started with REMSH_SECRET in its environment registers with it, but getenv and commands never see it."""
    listener = tcp_listener()
    proc = slave_procs.start(listener.port, "env-secret", secret_env=True, env={"REMSH_MARKER": "here"})
    slave = wait_registered(listener, proc)
    env = slave.getenv()
    assert env.get("REMSH_MARKER") == "here"  # the environment is reported...
    assert "REMSH_SECRET" not in env  # ...without the secret
    assert all(SECRET.decode() not in v for v in env.values())
    out = _run_env(slave, ["env"])
    assert b"REMSH_MARKER=here" in out
    assert b"REMSH_SECRET" not in out and SECRET not in out
    # nor a command started with environment overrides (a copy of the slave's environment)
    out = bytearray()
    status = slave.execute(["env"], stdout_cb=out.extend, env={"EXTRA": "1"})
    assert status == 0 and b"EXTRA=1" in out and SECRET not in out


def test_local_slave_child_does_not_inherit_the_masters_secret(tmp_path, monkeypatch):
    """A local slave started by a master holding REMSH_SECRET: neither getenv nor its commands see it."""
    monkeypatch.setenv("REMSH_SECRET", "masters-own-secret")
    with LocalSlaveListener() as listener:
        slave = listener.start_slave(str(tmp_path), name="child")
        assert "REMSH_SECRET" not in slave.getenv()
        out = _run_env(slave, ["env"])
        assert b"masters-own-secret" not in out and b"REMSH_SECRET" not in out


# -- logging levels, Ctrl-C, --version -------------------------------------------


def test_log_levels_of_verbose_flags():
    """No -v is WARNING, -v INFO, -vv (or more) DEBUG."""
    import logging

    assert [log_level(n) for n in range(4)] == [logging.WARNING, logging.INFO, logging.DEBUG, logging.DEBUG]


@pytest.mark.parametrize("verbose, shown", [((), False), (("-v",), True)])
def test_one_v_shows_registrations(tcp_listener, slave_procs, verbose, shown):
    """remsh-slave logs its registration (INFO) with -v, and not without."""
    listener = tcp_listener()
    proc = slave_procs.start(listener.port, "loud" if shown else "quiet", no_reconnect=True,
                             extra_args=verbose)
    slave = wait_registered(listener, proc)
    if shown:
        wait_until(lambda: "registered with the master" in proc.log_text(), what="the registration line")
    slave.close()
    assert proc.wait() == 0, proc.log_text()
    log = proc.log_text()
    assert ("registered with the master" in log) is shown, log
    assert ("INFO" in log) is shown, log


def test_ctrl_c_during_reconnect_backoff_prints_one_line_and_exits_130(slave_procs):
    """Ctrl-C while remsh-slave waits to redial: exit 130, one 'interrupted' line, no traceback."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = slave_procs.start(port, "backoff", max_backoff=60.0, extra_args=["--connect-timeout", "2"])
    wait_until(lambda: "reconnecting in" in proc.log_text(), what="the back-off line")
    proc.signal(signal.SIGINT)
    assert proc.wait() == 130, proc.log_text()
    log = proc.log_text()
    assert "Traceback" not in log, log
    assert log.rstrip().splitlines()[-1] == "remsh-slave: interrupted"


def test_secret_file_open_to_others_gets_a_warning_naming_it(tcp_listener, slave_procs, tmp_path):
    """remsh-slave uses a secret file readable by others, with a warning naming the file."""
    listener = tcp_listener()
    path = tmp_path / "open-secret"
    path.write_bytes(SECRET + b"\n")
    path.chmod(0o644)
    proc = slave_procs.start(listener.port, "open-file", secret=None, no_reconnect=True,
                             extra_args=["--secret-file", str(path)])
    wait_registered(listener, proc).close()
    assert proc.wait() == 0
    assert f"secret file {path} is accessible by group or others" in proc.log_text()


# -- SIGTERM -------------------------------------------------------------------


#: Put on a child's PYTHONPATH: once the interpreter is shutting down (an
#: atexit callback), it says so in a file and waits for a signal.
_SITECUSTOMIZE = """
import atexit, os, time

def _at_exit():
    flag = os.environ.get("REMSH_TEST_EXIT_FLAG")
    if flag:
        open(flag, "w").close()
        time.sleep(10)

atexit.register(_at_exit)
"""


def test_sigterm_while_a_local_child_shuts_down_prints_nothing(tmp_path):
    """A local child signalled while its interpreter shuts down (after serving) dies silently: no 'Exception ignored ... SystemExit'."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    base = tmp_path / "base"
    base.mkdir()
    flag = tmp_path / "exiting"
    master_sock, child_sock = socket.socketpair()
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{ROOT}", REMSH_TEST_EXIT_FLAG=str(flag))
    with open(tmp_path / "stderr", "w+b") as err:
        proc = subprocess.Popen([sys.executable, "-m", "remsh.slave.localchild", "--fd", str(child_sock.fileno()),
                                 "--basedir", str(base), "--name", "term"], pass_fds=(child_sock.fileno(),),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env,
                                start_new_session=True)
        child_sock.close()
        wire = Wire(SocketStream(master_sock, peer="child", send_timeout=None), label="child")
        try:
            exchange_greeting(wire, MASTER_GREETING, SLAVE_GREETING, WAIT)
            master_handshake(wire, lambda n, w: (True, None), timeout=WAIT, greet=False)
            wire.close()  # the master is done with it: the child stops serving and exits
            wait_until(flag.exists, what="the child to reach its interpreter's shutdown")
            proc.send_signal(signal.SIGTERM)  # as LocalSlaveListener.stop does
            proc.wait(WAIT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        text = err.read().decode(errors="replace")
    assert "Exception ignored" not in text and "SystemExit" not in text, text
    assert proc.returncode == -signal.SIGTERM


def test_sigterm_while_serving_kills_the_command_and_exits_143(tmp_path, slave_procs, tcp_listener):
    """SIGTERM to a serving remsh-slave kills its running command's process group and exits 143."""
    listener = tcp_listener()
    proc = slave_procs.start(listener.port, "termed")
    slave = wait_registered(listener, proc)
    pidfile = tmp_path / "cmd.pid"
    from tests.util import run_in_thread

    started = []
    run = run_in_thread(lambda: slave.execute(
        ["sh", "-c", f"echo $$ > {pidfile}; echo go; exec sleep 60"], stdout_cb=started.append))
    wait_until(lambda: started, what="the command to start")
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 143, proc.log_text()
    assert "Exception ignored" not in proc.log_text()
    pid = int(pidfile.read_text())
    wait_until(lambda: not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(") ")[-1][0] == "Z",
               what="the command to be killed")
    run.done.wait(WAIT)
    assert isinstance(run.error, RemshError)


# -- policy options ------------------------------------------------------------------


def test_policy_options_are_parsed():
    """--root, --no-execute and repeatable --allow-command reach the parsed options."""
    from remsh.slave.main import build_parser

    args = build_parser().parse_args(["--root", "/srv", "--no-execute", "--allow-command", "make",
                                      "--allow-command", "/usr/bin/*", "h", "1"])
    assert (args.root, args.no_execute, args.allow_command) == ("/srv", True, ["make", "/usr/bin/*"])


def test_no_execute_slave_answers_denied(tcp_listener, slave_procs):
    """remsh-slave --no-execute registers, and execute raises DeniedError."""
    listener = tcp_listener()
    proc = slave_procs.start(listener.port, "no-exec", extra_args=["--no-execute"])
    slave = wait_registered(listener, proc)
    with pytest.raises(DeniedError):
        slave.execute(["true"])
    assert slave.stat(".") == "d"  # other operations still work


def test_allow_command_limits_programs(tcp_listener, slave_procs):
    """remsh-slave --allow-command 'ech*' runs echo and refuses true with DeniedError."""
    listener = tcp_listener()
    proc = slave_procs.start(listener.port, "allow", extra_args=["--allow-command", "*/ech*"])
    slave = wait_registered(listener, proc)
    out = bytearray()
    assert slave.execute(["echo", "hi"], stdout_cb=out.extend) == 0 and out == b"hi\n"
    with pytest.raises(DeniedError):
        slave.execute(["true"])


def test_root_confines_paths(tcp_listener, slave_procs, tmp_path):
    """remsh-slave --root DIR refuses a path outside DIR with DeniedError."""
    root = tmp_path / "jail"
    root.mkdir()
    listener = tcp_listener()
    proc = slave_procs.start(listener.port, "rooted", basedir=root, extra_args=["--root", str(root)])
    slave = wait_registered(listener, proc)
    slave.mkdir("inside")
    assert (root / "inside").is_dir()
    with pytest.raises(DeniedError):
        slave.mkdir("../outside")
    assert not (tmp_path / "outside").exists()


def test_root_that_is_not_a_directory_is_a_usage_error(slave_procs, tmp_path):
    """--root naming no directory: exit 2 before dialling."""
    proc = slave_procs.start(1, "badroot", no_reconnect=True, extra_args=["--root", str(tmp_path / "nope")])
    assert proc.wait() == 2
    assert "policy: the root is not a directory" in proc.log_text()



def test_python_m_remsh_slave_is_the_slave_program():
    """python -m remsh.slave runs remsh-slave (its --version and its usage error for a missing master)."""
    import subprocess
    import sys

    import remsh

    r = subprocess.run([sys.executable, "-m", "remsh.slave", "--version"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"remsh-slave {remsh.__version__}", r
    r = subprocess.run([sys.executable, "-m", "remsh.slave"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r


def test_ssh_without_paramiko_is_one_line(tmp_path):
    """remsh-slave --ssh with the paramiko client where paramiko is missing: one line naming the extra, exit 2, no traceback."""
    import subprocess
    import sys

    for name in ("k", "kh"):
        (tmp_path / name).write_text("")
    code = ("import sys; sys.modules['paramiko'] = None\n"
            "from remsh.slave.main import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", code, "--no-reconnect", "--ssh-client", "paramiko",
                        "--ssh", "me@127.0.0.1:1", "--identity", str(tmp_path / "k"),
                        "--known-hosts", str(tmp_path / "kh")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r
    assert "Traceback" not in r.stderr and "remsh[ssh]" in r.stderr, r.stderr
