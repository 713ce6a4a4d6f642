"""The small things of the fleet command line, round 2, with real
processes: TLS-mismatch hints in the master's log, help texts (defaults,
descriptions, every option), ``-v`` after the subcommand, ``--wait 0``,
an interrupted command told as such, an IPv4 peer shown plain."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence, Tuple

import pytest

from remsh.cli import build_parser
from tests.slaveproc import HOST, SECRET, WAIT, SlaveProcesses
from tests.test_cli_round2 import fleet_with
from tests.test_fleet import _env, ls
from tests.transports import make_pki
from tests.util import wait_until

pytestmark = pytest.mark.timeout(120)


def _remsh(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "remsh", *args], env=_env(), capture_output=True,
                          timeout=timeout)


def _master(tmp_path: Path, *extra: str) -> Tuple["subprocess.Popen[bytes]", Path, int]:
    """A ``remsh master`` with ``extra`` options, ready; its log file and TCP port."""
    log = tmp_path / "master.log"
    argv = [sys.executable, "-m", "remsh", "master", "--control", str(tmp_path / "m.sock"), "--state-dir",
            str(tmp_path / "state"), *extra]
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, env=_env(), stdout=f, stderr=subprocess.STDOUT)
    wait_until(lambda: "remsh master: ready" in log.read_text() or proc.poll() is not None, WAIT, "ready")
    assert proc.poll() is None, log.read_text()
    line = next(x for x in log.read_text().splitlines() if "slaves on" in x)
    return proc, log, int(line.rsplit(":", 1)[1])


def _stop(proc: "subprocess.Popen[bytes]") -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(WAIT)


# -- TLS mismatch ----------------------------------------------------------------------------


def test_a_tls_slave_dialling_a_plain_master_gets_a_hint_in_the_log(tmp_path: Path) -> None:
    """A slave with --tls dialling a master without TLS: the master's line and the slave's name --tls-cert and --tls."""
    pki = make_pki(tmp_path / "pki")
    with fleet_with(tmp_path, ()) as f:
        slave = f.slaves.start(f.master.port, "tlsy", tls=True, tls_ca=pki.ca, no_reconnect=True)
        slave.wait()
        wait_until(lambda: "bad greeting" in f.master.text(), WAIT, "the refusal")
        line = next(x for x in f.master.text().splitlines() if "bad greeting" in x)
        assert "a slave started with --tls dialling a listener without TLS? give the master --tls-cert" in line
        assert "the master's listener does not speak TLS? start this slave without --tls" in slave.log_text()


def test_a_plain_slave_dialling_a_tls_master_gets_a_hint_in_the_log(tmp_path: Path) -> None:
    """A slave without --tls dialling a TLS master: the master's line and the slave's say to start it with --tls."""
    pki = make_pki(tmp_path / "pki")
    slaves = SlaveProcesses(tmp_path / "slaves")
    proc, log, port = _master(tmp_path, "--listen", f"{HOST}:0", "--tls-cert", str(pki.cert), "--tls-key",
                              str(pki.key), "--secret-file", str(slaves.secret_file(SECRET)))
    try:
        plain = slaves.start(port, "plain", no_reconnect=True)
        plain.wait()
        assert "a TLS master? start this slave with --tls --tls-ca FILE" in plain.log_text()
        wait_until(lambda: "TLS handshake" in log.read_text(), WAIT, "the refusal")
    finally:
        _stop(proc)
        slaves.close()
    line = next(x for x in log.read_text().splitlines() if "TLS handshake" in x)
    assert line.endswith("a slave without --tls dialling this TLS listener? start it with --tls --tls-ca FILE")


# -- help ------------------------------------------------------------------------------------


def _subparsers() -> List[Tuple[str, argparse.ArgumentParser]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    return sorted(sub.choices.items())


def test_every_subcommand_has_a_description_and_every_option_help() -> None:
    """Each subcommand says what it is for, and each of its options and arguments has a help text."""
    for name, parser in _subparsers():
        assert parser.description, name
        missing = [a.option_strings or a.dest for a in parser._actions if not a.help]  # noqa: SLF001
        assert missing == [], (name, missing)


def test_help_shows_the_defaults() -> None:
    """--help shows the defaults of --max-parallel, --wait-timeout, --keep-jobs and host-key's --host."""
    text = _remsh("run", "--help").stdout.decode()
    assert "(default: 64)" in " ".join(text.split()) and "(default: 60)" in " ".join(text.split())
    assert "(default: 8)" in " ".join(_remsh("put", "--help").stdout.decode().split())
    assert "default 7d" in " ".join(_remsh("master", "--help").stdout.decode().split())
    assert "default: 127.0.0.1" in " ".join(_remsh("host-key", "--help").stdout.decode().split())


# -- options -------------------------------------------------------------------------------------


def test_v_after_the_subcommand_is_accepted_and_counted(tmp_path: Path) -> None:
    """-v after the subcommand is accepted, adds to one before it, and gives the same log as before it."""
    assert build_parser().parse_args(["-v", "ls", "-v"]).verbose_after == 1
    quiet = _remsh("run", "--local", "1", "--basedir", str(tmp_path), "--", "true")
    after = _remsh("run", "--local", "1", "--basedir", str(tmp_path), "-v", "--", "true")
    before = _remsh("-v", "run", "--local", "1", "--basedir", str(tmp_path), "--", "true")
    assert quiet.returncode == after.returncode == before.returncode == 0, after.stderr
    assert b"INFO" not in quiet.stderr
    assert b"INFO" in after.stderr and b"INFO" in before.stderr


@pytest.mark.parametrize("args", [("--wait", "0"), ("--local", "0"), ("--max-fail", "0"), ("--batch", "0")])
def test_zero_where_it_means_nothing_is_a_usage_error(args: Sequence[str]) -> None:
    """--wait 0, --local 0, --max-fail 0, --batch 0: exit 2 with a line naming the option."""
    r = _remsh("run", "--listen", f"{HOST}:0", "--insecure", *args, "--", "true")
    assert r.returncode == 2
    assert args[0].encode() in r.stderr


def test_an_interrupted_command_is_told_interrupted(tmp_path: Path) -> None:
    """Ctrl-C on run: each killed command is reported 'interrupted', never 'exit status -9'."""
    proc = subprocess.Popen([sys.executable, "-m", "remsh", "run", "--local", "2", "--basedir", str(tmp_path),
                             "--no-summary", "--", "sh", "-c", "echo started; sleep 30"], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert b"started" in proc.stdout.readline()  # type: ignore[union-attr]
        assert b"started" in proc.stdout.readline()  # type: ignore[union-attr]
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 130
    text = err.decode()
    assert "exit status -" not in text and "signal" not in text
    assert "remsh: local1: interrupted" in text and "remsh: local2: interrupted" in text


def test_an_ipv4_peer_of_a_dual_stack_listener_is_shown_plain(tmp_path: Path) -> None:
    """A master listening on every address (dual stack): ls and the log show 127.0.0.1:PORT, not [::ffff:...]."""
    slaves = SlaveProcesses(tmp_path / "slaves")
    proc, log, port = _master(tmp_path, "--listen", "0", "--secret-file", str(slaves.secret_file(SECRET)))
    try:
        slaves.start(port, "four", host="127.0.0.1", max_backoff=0.5)
        wait_until(lambda: any(r["name"] == "four" for r in ls(tmp_path / "m.sock")), WAIT, "registered")
        row = next(r for r in ls(tmp_path / "m.sock") if r["name"] == "four")
        assert row["peer"].startswith("127.0.0.1:"), row
        wait_until(lambda: "slave four registered" in log.read_text(), WAIT, "the log line")
        assert "slave four registered from 127.0.0.1:" in log.read_text()
        assert "::ffff:" not in log.read_text()
    finally:
        _stop(proc)
        slaves.close()


@pytest.mark.parametrize("args", [("run", "--batch"), ("run", "--nope", "--", "true"), (), ("frobnicate",),
                                  ("run", "--max-fail", "x", "--", "true")])
def test_an_option_argparse_refuses_is_one_line(args: Sequence[str]) -> None:
    """What argparse refuses is one line naming where to read more, exit 2 (not the whole usage block)."""
    r = _remsh(*args)
    assert r.returncode == 2
    lines = r.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("remsh: ") and lines[0].endswith("--help)"), lines


def test_the_groups_file_of_the_docs_is_a_groups_file() -> None:
    """The [groups] example of docs/using.rst reads as the groups it shows."""
    from remsh.groups import parse_groups

    text = (Path(__file__).resolve().parents[1] / "docs" / "using.rst").read_text()
    block = text.split("list of name globs or other groups (``@NAME``)::\n\n", 1)[1].split("\n\n", 1)[0]
    groups = parse_groups("\n".join(line[4:] for line in block.splitlines()), "docs")
    assert groups == {"web": ["web-*", "edge-1"], "db": ["db-[0-9]*"], "frontline": ["@web", "proxy-1"]}


def test_no_slave_name_is_coloured_red(tmp_path: Path) -> None:
    """--color always: the slaves' names take colours in turn, never red (31 or 91), which reads as an error."""
    r = _remsh("run", "--local", "3", "--basedir", str(tmp_path), "--color", "always", "--", "echo", "x")
    assert r.returncode == 0, r.stderr
    colours = {line.split("m", 1)[0] for line in r.stdout.decode().splitlines()}
    assert len(colours) == 3 and all(c.startswith("\x1b[") for c in colours), colours
    assert not colours & {"\x1b[31", "\x1b[91"}, colours


@pytest.mark.skipif(not Path("/bin").is_symlink(), reason="not a merged-/usr system")
def test_allow_command_on_merged_usr_is_as_documented(tmp_path: Path) -> None:
    """Merged /usr: --allow-command /usr/bin/echo allows /bin/echo; /bin/echo allows only a command naming /bin/echo."""
    with fleet_with(tmp_path, ()) as f:
        f.slaves.start(f.master.port, "usr", max_backoff=0.5, extra_args=["--allow-command", "/usr/bin/echo"])
        f.slaves.start(f.master.port, "bin", max_backoff=0.5, extra_args=["--allow-command", "/bin/echo"])
        wait_until(lambda: {r["name"] for r in ls(f.sock)} == {"usr", "bin"}, WAIT, "both registered")
        assert f.run("run", "-t", "usr", "--", "/bin/echo", "hi").returncode == 0
        assert f.run("run", "-t", "usr", "--", "echo", "hi").returncode == 0
        assert f.run("run", "-t", "bin", "--", "/bin/echo", "hi").returncode == 0
        denied = f.run("run", "-t", "bin", "--", "echo", "hi")
        assert denied.returncode == 3 and b"denied" in denied.stderr


def test_batch_and_max_fail_without_a_master(tmp_path: Path) -> None:
    """run --local with --batch 1 --max-fail 1: one slave runs and fails, the others are skipped; exit 1."""
    r = _remsh("run", "--local", "3", "--basedir", str(tmp_path), "--batch", "1", "--max-fail", "1", "--no-summary",
               "--", "sh", "-c", "echo ran; exit 5")
    assert r.returncode == 1, r.stderr
    assert r.stdout.decode().count("ran") == 1
    assert r.stderr.decode().count("skipped: --max-fail 1 reached") == 2


@pytest.mark.parametrize("args", [("--max-backoff", "0"), ("--connect-timeout", "0"), ("--heartbeat", "-1"),
                                  ("--spool-limit", "0"), ("--max-backoff", "nan")])
def test_slave_options_refuse_zero_where_it_means_nothing(args: Sequence[str]) -> None:
    """remsh-slave --max-backoff 0 (a tight redial loop), --connect-timeout 0 ...: exit 2 naming the option."""
    r = subprocess.run([sys.executable, "-m", "remsh.slave.main", "--insecure", *args, HOST, "1"], env=_env(),
                       capture_output=True, timeout=60)
    assert r.returncode == 2
    assert f"argument {args[0]}".encode() in r.stderr


def test_slave_port_zero_is_a_usage_error_and_help_shows_defaults() -> None:
    """remsh-slave HOST 0: exit 2; its --help shows the defaults of --connect-timeout and --max-backoff."""
    r = subprocess.run([sys.executable, "-m", "remsh.slave.main", "--insecure", HOST, "0"], env=_env(),
                       capture_output=True, timeout=60)
    assert r.returncode == 2 and b"a port is 1 to 65535" in r.stderr
    text = " ".join(subprocess.run([sys.executable, "-m", "remsh.slave.main", "--help"], env=_env(),
                                   capture_output=True, timeout=60).stdout.decode().split())
    assert "attempt (default 10)" in text and "reconnection attempts (default 60)" in text


def test_keep_jobs_takes_a_bare_number_of_seconds_and_says_why_not_otherwise() -> None:
    """--keep-jobs 90 is 90 seconds (as 90s); a value it cannot read is one line naming the units, exit 2."""
    assert build_parser().parse_args(["master", "--keep-jobs", "90"]).keep_jobs == 90.0
    assert build_parser().parse_args(["master", "--keep-jobs", "90s"]).keep_jobs == 90.0
    r = _remsh("master", "--keep-jobs", "7x")
    assert r.returncode == 2
    lines = r.stderr.decode().splitlines()
    assert len(lines) == 1 and "--keep-jobs" in lines[0], lines
