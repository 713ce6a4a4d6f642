"""A real ``remsh master`` with real ``remsh-slave`` processes over TCP, driven
by the ``remsh`` commands as real processes: ls, run, put, get, the control
socket's protection, one master per socket, and a master restart."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import shutil
import re
import select
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import pytest

from remsh import __version__
from remsh.control import ControlClient, ControlError, ControlServer
from remsh.fleet import FleetCollection
from tests.slaveproc import HOST, SECRET, WAIT, SlaveProcesses
from tests.util import NOBODY, interrupt_after, process_alive, wait_until

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("web-1", "web-2", "db-1")
LS_FIELDS = {"name", "transport", "peer", "since", "platform", "python", "remsh", "state", "hostname", "basedir",
             "root", "no_execute", "allow_command", "job"}


#: The default state directory of the masters started here (never the user's own).
STATE_HOME = tempfile.mkdtemp(prefix="remsh-test-state-")


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("REMSH_SECRET", "REMSH_MASTER", "PYTHONPATH")}
    env["PYTHONPATH"] = str(ROOT)
    env["XDG_STATE_HOME"] = STATE_HOME
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Master:
    """A ``remsh master`` process on its own control socket and TCP port."""

    def __init__(self, workdir: Path, sock: Path, port: int = 0, secret_file: Optional[Path] = None,
                 extra: Sequence[str] = ()) -> None:
        self.sock = sock
        self.log = workdir / f"master-{time.monotonic_ns()}.log"
        self.state_dir = workdir / "state"
        argv = [sys.executable, "-m", "remsh", "master", "--control", str(sock), "--listen", f"{HOST}:{port}",
                "--state-dir", str(self.state_dir), *extra]
        argv += ["--secret-file", str(secret_file)] if secret_file else ["--insecure"]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, env=_env(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        self.port = 0

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self) -> "Master":
        """Wait for the 'ready' line and read the bound port from the log."""
        wait_until(lambda: "remsh master: ready" in self.text() or self.proc.poll() is not None,
                   WAIT, "the master to be ready")
        assert self.proc.poll() is None, self.text()
        line = next(x for x in self.text().splitlines() if "listening for TCP slaves on" in x)
        self.port = int(line.rsplit(":", 1)[1])
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the master and wait for it (bounded); one that does not
        end is killed -- never left behind -- and fails the test with its log."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(WAIT)
            raise AssertionError(f"the master did not end within {WAIT:g} s of signal {sig}; "
                                 f"its log:\n{self.text()[-4000:]}") from None


def stop_all(masters: Sequence["Master"]) -> None:
    """Stop every master, each even when one before it would not end; the
    first failure is raised after."""
    failure: Optional[BaseException] = None
    for master in masters:
        try:
            master.stop()
        except AssertionError as e:
            failure = failure or e
    if failure is not None:
        raise failure


def remsh(sock: Path, *args: str, input: Optional[bytes] = None, cwd: Optional[Path] = None,
          timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "remsh", "--master", str(sock), *args], env=_env(),
                          input=input, capture_output=True, timeout=timeout, cwd=cwd)


def ls(sock: Path) -> List[dict]:
    r = remsh(sock, "ls", "--json")
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout)


def wait_names(sock: Path, names: Sequence[str], timeout: float = WAIT) -> List[dict]:
    """``ls --json`` once every name in ``names`` is connected (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = ls(sock)
        if set(names) <= {r["name"] for r in rows}:
            return rows
        assert time.monotonic() < deadline, f"slaves {names} not all connected: {rows}"
        time.sleep(0.1)


class Fleet:
    def __init__(self, workdir: Path, master: Master, slaves: SlaveProcesses) -> None:
        self.workdir = workdir
        self.master = master
        self.sock = master.sock
        self.slaves = slaves

    def base(self, name: str) -> Path:
        return self.workdir / "slaves" / "base" / name

    def run(self, *args: str, **kw: object) -> subprocess.CompletedProcess:
        return remsh(self.sock, *args, **kw)  # type: ignore[arg-type]


@contextlib.contextmanager
def running_fleet(workdir: Path, names: Sequence[str]) -> Iterator[Fleet]:
    """A master in ``workdir`` and a slave process for each of ``names``,
    all registered; stopped at the end."""
    slaves = SlaveProcesses(workdir / "slaves")
    master = Master(workdir, workdir / "ctl" / "master.sock", secret_file=slaves.secret_file(SECRET))
    try:
        master.wait_ready()
        for name in names:
            slaves.start(master.port, name, max_backoff=0.5)
        wait_names(master.sock, names)
        yield Fleet(workdir, master, slaves)
    finally:
        master.stop()
        slaves.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """One master and three slaves (web-1, web-2, db-1) for the whole module."""
    with running_fleet(tmp_path_factory.mktemp("fleet"), NAMES) as f:
        yield f


# -- ls -----------------------------------------------------------------------------------


def test_ls_json_lists_every_slave_with_its_fields(fleet: Fleet) -> None:
    """ls --json: one object per slave with name, transport, peer, since, platform, python, remsh, state."""
    rows = ls(fleet.sock)
    assert sorted(r["name"] for r in rows) == sorted(NAMES)
    for row in rows:
        assert set(row) == LS_FIELDS
        assert row["transport"] == "tcp"
        assert row["peer"].startswith("127.0.0.1:")
        assert row["since"].endswith("Z") and row["since"][:2] == "20"
        assert row["platform"] and row["python"] == ".".join(map(str, sys.version_info[:3]))
        assert row["remsh"] == __version__
        assert row["state"] == "idle"


def test_ls_prints_one_line_per_slave_under_a_header(fleet: Fleet) -> None:
    """Plain ls: a header line, then one line per slave starting with its name."""
    r = fleet.run("ls")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0].split() == ["name", "transport", "peer", "since", "platform", "python", "remsh", "state"]
    assert sorted(line.split()[0] for line in lines[1:]) == sorted(NAMES)
    assert all(line.split()[-1] == "idle" for line in lines[1:])


def test_ls_shows_busy_while_a_command_runs(fleet: Fleet) -> None:
    """A slave running a command through the master is 'busy' in ls; the others stay 'idle'."""
    proc = subprocess.Popen([sys.executable, "-m", "remsh", "--master", str(fleet.sock), "run", "-t", "db-1",
                             "--", "sh", "-c", "echo started; sleep 30"], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert b"started" in proc.stdout.readline()
        states = {r["name"]: r["state"] for r in ls(fleet.sock)}
        assert states == {"db-1": "busy", "web-1": "idle", "web-2": "idle"}
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=WAIT)
    assert proc.returncode == 130


# -- run -------------------------------------------------------------------------------


def _prefixes(out: bytes) -> List[str]:
    return sorted(line.split(" | ")[0].strip() for line in out.decode().splitlines())


def test_run_target_glob_reaches_exactly_the_matching_slaves(fleet: Fleet) -> None:
    """run -t 'web-*' runs on web-1 and web-2 only, each line prefixed with the name."""
    r = fleet.run("run", "-t", "web-*", "--", "sh", "-c", "pwd")
    assert r.returncode == 0, r.stderr
    lines = sorted(r.stdout.decode().splitlines())
    assert lines == [f"web-1 | {fleet.base('web-1')}", f"web-2 | {fleet.base('web-2')}"]


def test_run_targets_are_a_union_and_default_is_all(fleet: Fleet) -> None:
    """Several -t patterns add up; with none the command runs on every connected slave."""
    r = fleet.run("run", "-t", "web-1", "-t", "db-*", "--", "echo", "x")
    assert r.returncode == 0, r.stderr
    assert _prefixes(r.stdout) == ["db-1", "web-1"]
    r = fleet.run("run", "--", "echo", "x")
    assert _prefixes(r.stdout) == sorted(NAMES)


def test_where_selects_by_registration_fact(fleet: Fleet) -> None:
    """--where platform=Linux* matches all; --where name=db-* one; a python that matches nothing exits 2."""
    r = fleet.run("run", "--where", "platform=Linux*", "--", "true")
    assert r.returncode == 0, r.stderr
    py = ".".join(map(str, sys.version_info[:2]))
    r = fleet.run("run", "--where", f"python={py}.*", "--where", "name=db-*", "--", "echo", "y")
    assert r.returncode == 0, r.stderr
    assert _prefixes(r.stdout) == ["db-1"]
    r = fleet.run("run", "--where", "python=2.*", "--", "true")
    assert r.returncode == 2
    assert r.stderr.decode().splitlines() == ["remsh: no connected slave matches --where python=2.*"]


def test_where_on_a_key_no_slave_has_is_an_error_naming_it(fleet: Fleet) -> None:
    """--where nonsense=* selects nothing: exit 2, one line naming the key, nothing run."""
    for spec in ("nonsense=*", "nonsense="):
        r = fleet.run("run", "--where", spec, "--", "echo", "ran")
        assert r.returncode == 2, r.stdout
        assert r.stdout == b""
        lines = r.stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith("remsh: no connected slave has the fact 'nonsense'"), lines


def test_no_match_is_a_usage_error(fleet: Fleet) -> None:
    """-t matching nothing exits 2 with one line and runs nothing; a bad --where is also 2."""
    r = fleet.run("run", "-t", "mail-*", "--", "true")
    assert r.returncode == 2
    assert r.stderr.decode().splitlines() == ["remsh: no connected slave matches -t mail-*"]
    assert r.stdout == b""
    r = fleet.run("run", "--where", "platform", "--", "true")
    assert r.returncode == 2 and b"Traceback" not in r.stderr


def test_exit_statuses_through_the_master(fleet: Fleet) -> None:
    """0 all succeeded; one slave's 1-125 status passed through; 1 for several; 3 when a command cannot start."""
    assert fleet.run("run", "--", "true").returncode == 0
    assert fleet.run("run", "-t", "web-1", "--", "sh", "-c", "exit 7").returncode == 7
    assert fleet.run("run", "-t", "web-1", "--", "sh", "-c", "exit 126").returncode == 1
    several = fleet.run("run", "-t", "web-*", "--", "sh", "-c", "exit 7")
    assert several.returncode == 1
    assert "remsh: failed on 2 of 2 slaves" in several.stderr.decode()
    r = fleet.run("run", "-t", "db-1", "--", "no-such-command-here")
    assert r.returncode == 3
    assert "remsh: db-1: execute: " in r.stderr.decode() and "[execfailed]" in r.stderr.decode()
    r = fleet.run("run", "-t", "web-1", "--timeout", "0.3", "--", "sleep", "30")
    assert r.returncode == 3 and "web-1: timed out" in r.stderr.decode()


def test_missing_command_and_missing_master_exit_2(fleet: Fleet, tmp_path: Path) -> None:
    """run with no command, and any command naming a master that is not running, exit 2 with one line."""
    r = fleet.run("run", "-t", "web-1")
    assert r.returncode == 2 and b"no command" in r.stderr
    for args in (("ls",), ("run", "--", "true"), ("put", __file__, "x"), ("get", "x", str(tmp_path))):
        r = remsh(tmp_path / "none.sock", *args)
        assert r.returncode == 2, args
        lines = r.stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"remsh: no remsh master running at {tmp_path / 'none.sock'}")


def test_ctrl_c_interrupts_the_remote_commands_and_exits_130(fleet: Fleet, tmp_path: Path) -> None:
    """Ctrl-C on the client: the master interrupts the commands on every slave, the client exits 130."""
    proc = subprocess.Popen([sys.executable, "-m", "remsh", "--master", str(fleet.sock), "run", "-t", "web-*",
                             "--", "sh", "-c", f"echo $$ > {tmp_path}/$(basename $PWD).pid; echo started; "
                                               "exec sleep 60"],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    def both_started() -> None:
        for _ in range(2):
            assert b"started" in proc.stdout.readline()

    out, err = interrupt_after(proc, both_started)
    assert proc.returncode == 130, err
    assert b"Traceback" not in err
    assert err.decode().splitlines()[-1] == "remsh: interrupted"
    for name in ("web-1", "web-2"):
        pid = int((tmp_path / f"{name}.pid").read_text())
        wait_until(lambda: not process_alive(pid), what=f"the command on {name} (pid {pid}) to end")
    assert {r["state"] for r in ls(fleet.sock)} == {"idle"}


def test_stdin_is_forwarded_to_every_selected_command(fleet: Fleet) -> None:
    """--stdin: this process's stdin reaches each selected slave's command, and its end ends them."""
    data = b"".join(b"line %d\n" % i for i in range(2000))
    r = fleet.run("run", "--stdin", "-t", "web-*", "--", "sh", "-c", "cat; echo end", input=data)
    assert r.returncode == 0, r.stderr
    for name in ("web-1", "web-2"):
        mine = [line[len(name) + 3:] for line in r.stdout.decode().splitlines() if line.startswith(name + " | ")]
        assert mine == [f"line {i}" for i in range(2000)] + ["end"]


def test_stdin_left_unread_does_not_hold_the_slave(fleet: Fleet) -> None:
    """--stdin with a command that never reads it and an input that never ends: the run ends with the command."""
    proc = subprocess.Popen([sys.executable, "-m", "remsh", "--master", str(fleet.sock), "run", "--stdin", "-t",
                             "web-1", "--", "echo", "done"], env=_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        start = time.monotonic()
        proc.stdin.write(b"never read\n")
        proc.stdin.flush()
        assert proc.wait(WAIT) == 0
        assert time.monotonic() - start < 4, "the stdin reader held the slave"
        assert proc.stdout.read() == b"web-1 | done\n"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdin.close()
    assert fleet.run("run", "-t", "web-1", "--", "true").returncode == 0


def test_json_prints_one_object_per_slave(fleet: Fleet) -> None:
    """--json: one JSON object per slave with name, status, stdout, stderr, duration_s, error."""
    r = fleet.run("run", "--json", "-t", "web-*", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert r.returncode == 1, r.stderr
    objs = sorted((json.loads(line) for line in r.stdout.decode().splitlines()), key=lambda o: o["name"])
    assert [o["name"] for o in objs] == ["web-1", "web-2"]
    for o in objs:
        assert set(o) == {"name", "status", "stdout", "stderr", "duration_s", "error"}
        assert (o["status"], o["stdout"], o["stderr"], o["error"]) == (3, "out\n", "err\n", None)
        assert 0 <= o["duration_s"] < 30
    r = fleet.run("run", "--json", "-t", "db-1", "--", "no-such-command-here")
    o = json.loads(r.stdout)
    assert o["status"] is None and "execfailed" in o["error"]


# -- slaves that differ in their facts ------------------------------------------------------


#: What the hostile slave evil-1 announces as its platform: a terminal title
#: (OSC), clear screen, a C1 CSI, DEL, and a line break with a forged line.
HOSTILE_PLATFORM = "Linux\x1b]0;owned\x07\x1b[2J\x9b31m\x7f\nremsh: all good"
#: The name of a FIFO in evil-1's tree: the slave's error message quotes it.
HOSTILE_FILE = "\x1b[2J\x1b]0;pwned\x07fifo"
#: Raw control characters (C0 but the line feed, DEL, C1 as UTF-8).
RAW_CONTROL = re.compile(rb"[\x00-\x09\x0b-\x1f\x7f]|\xc2[\x80-\x9f]")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """A master of its own with plain-1 (no policy), rooted-1 (--root: it has the fact policy_root) and
    evil-1, a real slave whose platform fact carries escape sequences (a sitecustomize patches it in)."""
    workdir = tmp_path_factory.mktemp("mixed")
    slaves = SlaveProcesses(workdir / "slaves")
    master = Master(workdir, workdir / "ctl" / "master.sock", secret_file=slaves.secret_file(SECRET))
    try:
        master.wait_ready()
        slaves.start(master.port, "plain-1", max_backoff=0.5)
        rooted = workdir / "slaves" / "base" / "rooted-1"
        rooted.mkdir(parents=True)
        slaves.start(master.port, "rooted-1", max_backoff=0.5, basedir=rooted, extra_args=["--root", str(rooted)])
        hostile = workdir / "hostile"
        hostile.mkdir()
        (hostile / "sitecustomize.py").write_text(
            f"import platform\nplatform.platform = lambda *args, **kwargs: {HOSTILE_PLATFORM!r}\n")
        slaves.start(master.port, "evil-1", max_backoff=0.5, env={"PYTHONPATH": f"{hostile}{os.pathsep}{ROOT}"})
        wait_names(master.sock, ["plain-1", "rooted-1", "evil-1"])
        yield Fleet(workdir, master, slaves)
    finally:
        master.stop()
        slaves.close()


def test_where_never_matches_a_slave_that_lacks_the_fact(mixed: Fleet) -> None:
    """--where policy_root=* chooses rooted-1 only; policy_root= (empty) matches no slave, not the one without it."""
    r = mixed.run("run", "--where", "policy_root=*", "--", "echo", "x")
    assert r.returncode == 0, r.stderr
    assert _prefixes(r.stdout) == ["rooted-1"]
    r = mixed.run("run", "--where", "policy_root=", "--", "echo", "x")
    assert r.returncode == 2
    assert r.stdout == b""
    assert r.stderr.decode().splitlines() == ["remsh: no connected slave matches --where policy_root="]


def test_slave_supplied_text_reaches_the_terminal_escaped(mixed: Fleet, tmp_path: Path) -> None:
    """A slave's facts (ls) and error text (a file name it quotes) are printed with control characters escaped."""
    rows = {r["name"]: r for r in ls(mixed.sock)}
    assert rows["evil-1"]["platform"] == HOSTILE_PLATFORM  # --json: JSON's own escapes, the text exact
    r = mixed.run("ls")
    assert r.returncode == 0, r.stderr
    assert not RAW_CONTROL.search(r.stdout + r.stderr), r.stdout
    evil = [line for line in r.stdout.decode().splitlines() if line.startswith("evil-1 ")]
    assert len(evil) == 1 and "Linux\\x1b]0;owned\\x07\\x1b[2J\\x9b31m\\x7f\\x0aremsh: all good" in evil[0], evil
    tree = mixed.base("evil-1") / "tree"
    tree.mkdir()
    os.mkfifo(tree / HOSTILE_FILE)
    r = mixed.run("get", "-t", "evil-1", "tree", str(tmp_path / "got"))
    assert r.returncode == 3, r.stderr
    assert not RAW_CONTROL.search(r.stdout + r.stderr), r.stdout + r.stderr
    assert "\\x1b[2J\\x1b]0;pwned\\x07fifo (a FIFO)" in r.stderr.decode()


def test_command_output_bytes_stay_exact(mixed: Fleet) -> None:
    """The command's own output is not escaped: escape sequences it prints reach stdout as they were."""
    r = mixed.run("run", "-t", "evil-1", "--", "printf", "\\033[1mbold\\033[0m\\tx\\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"evil-1 | \x1b[1mbold\x1b[0m\tx\n"


# -- put and get ----------------------------------------------------------------------------


def test_put_file_reaches_every_chosen_slave(fleet: Fleet, tmp_path: Path) -> None:
    """put LOCAL DEST copies a file to each chosen slave; into DEST when that is a directory there."""
    src = tmp_path / "conf.txt"
    src.write_bytes(b"setting = 1\n" * 1000)
    r = fleet.run("put", "-t", "web-*", str(src), "put-file.txt")
    assert r.returncode == 0, r.stderr
    for name in ("web-1", "web-2"):
        assert (fleet.base(name) / "put-file.txt").read_bytes() == src.read_bytes()
    assert not (fleet.base("db-1") / "put-file.txt").exists()
    assert sorted(line.split(":")[0] for line in r.stdout.decode().splitlines()) == ["web-1", "web-2"]
    (fleet.base("db-1") / "incoming").mkdir()
    r = fleet.run("put", "-t", "db-1", str(src), "incoming")
    assert r.returncode == 0, r.stderr
    assert (fleet.base("db-1") / "incoming" / "conf.txt").read_bytes() == src.read_bytes()
    again = fleet.run("put", "-t", "db-1", str(src), "incoming")
    assert again.returncode == 3 and b"exists" in again.stderr


def test_relative_local_paths_are_the_clients(fleet: Fleet, tmp_path: Path) -> None:
    """put and get resolve relative local paths against the client's directory, not the master's."""
    (tmp_path / "rel.txt").write_bytes(b"relative\n")
    r = fleet.run("put", "-t", "web-2", "rel.txt", "rel.txt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = fleet.run("get", "-t", "web-2", "rel.txt", "back", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "back" / "web-2" / "rel.txt").read_bytes() == b"relative\n"


def test_get_lands_in_localdir_slash_name(fleet: Fleet, tmp_path: Path) -> None:
    """get REMOTE LOCALDIR puts each slave's copy in LOCALDIR/NAME/; a missing file on one slave exits 3."""
    for name in NAMES:
        (fleet.base(name) / "id.txt").write_text(f"I am {name}\n")
    r = fleet.run("get", "id.txt", str(tmp_path / "got"))
    assert r.returncode == 0, r.stderr
    for name in NAMES:
        assert (tmp_path / "got" / name / "id.txt").read_text() == f"I am {name}\n"
    (fleet.base("db-1") / "id.txt").unlink()
    r = fleet.run("get", "id.txt", str(tmp_path / "got2"))
    assert r.returncode == 3
    assert "remsh: db-1: fetch: " in r.stderr.decode() and "[notfound]" in r.stderr.decode()
    assert (tmp_path / "got2" / "web-1" / "id.txt").exists()


def _has_trees() -> bool:
    from remsh.master.slave import Slave
    return all(hasattr(Slave, m) for m in ("send_tree", "fetch_tree", "sync_tree"))


@pytest.mark.skipif(not _has_trees(), reason="Slave.send_tree/fetch_tree/sync_tree not there yet")
def test_put_and_get_of_a_tree(fleet: Fleet, tmp_path: Path) -> None:
    """put of a directory sends the tree, --sync sends what changed, get of a directory fetches it per slave."""
    src = tmp_path / "site"
    (src / "sub").mkdir(parents=True)
    (src / "index.html").write_text("<h1>hi</h1>\n")
    (src / "sub" / "a.txt").write_text("a\n")
    r = fleet.run("put", "-t", "web-*", str(src), "site")
    assert r.returncode == 0, r.stderr
    for name in ("web-1", "web-2"):
        assert (fleet.base(name) / "site" / "sub" / "a.txt").read_text() == "a\n"
    (src / "sub" / "a.txt").write_text("changed\n")
    r = fleet.run("put", "--sync", "-t", "web-*", str(src), "site")
    assert r.returncode == 0, r.stderr
    assert (fleet.base("web-1") / "site" / "sub" / "a.txt").read_text() == "changed\n"
    r = fleet.run("get", "-t", "web-*", "site", str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr
    for name in ("web-1", "web-2"):
        assert (tmp_path / "back" / name / "site" / "index.html").read_text() == "<h1>hi</h1>\n"


def _run_on_pty(args: Sequence[str], timeout: float = 60) -> "tuple[int, bytes]":
    """Run a remsh client with stdout and stderr on a pseudo-terminal; its status and all it wrote."""
    master_fd, slave_fd = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "remsh", *args], env=_env(), stdin=subprocess.DEVNULL,
                            stdout=slave_fd, stderr=slave_fd)
    os.close(slave_fd)
    data = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master_fd], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master_fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                data += chunk
            elif proc.poll() is not None:
                break
        return proc.wait(WAIT), bytes(data)
    finally:
        os.close(master_fd)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_progress_bars_on_a_terminal_plain_lines_when_piped(fleet: Fleet, tmp_path: Path) -> None:
    """On a pty put draws bars (bytes, rate, per slave and a total, redrawn in place); piped it prints plain lines."""
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(4 * 1024 * 1024))
    code, text = _run_on_pty(["--master", str(fleet.sock), "put", "-t", "web-*", str(src), "big-pty.bin"])
    assert code == 0, text
    out = text.decode(errors="replace")
    assert "\033[3F" in out  # redrawn in place: three lines up
    plain = re.sub(r"\033\[[0-9]*[A-Za-z]", "", out).replace("\r", "")
    for label in ("web-1", "web-2", "total"):
        size = "8.0 MiB / 8.0 MiB" if label == "total" else "4.0 MiB / 4.0 MiB"
        assert any(line.startswith(label) and f"{size} 100%" in line and "/s done" in line
                   for line in plain.splitlines()), out
    r = fleet.run("put", "-t", "web-*", str(src), "big-pipe.bin")
    assert r.returncode == 0, r.stderr
    assert b"\033[" not in r.stdout + r.stderr
    assert sorted(line.split(":")[0] for line in r.stdout.decode().splitlines()) == ["web-1", "web-2"]


# -- the control socket ---------------------------------------------------------------------


def test_control_socket_is_owner_only(fleet: Fleet) -> None:
    """The control socket is mode 0600 in a 0700 directory, owned by the master's user."""
    st = os.lstat(fleet.sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    assert stat.S_IMODE(os.stat(fleet.sock.parent).st_mode) == 0o700


def _client_as_nobody(argv: List[str]) -> "tuple[int, str]":
    """Run remsh's main() in a forked child that became uid/gid nobody; its status and stderr."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            sys.stderr = open(write_fd, "w", closefd=False)
            # imported while still root: the checkout may be out of nobody's reach
            from remsh.cli import main
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            code = main(argv)
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write_fd)
    chunks = []
    while True:
        chunk = os.read(read_fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_another_user_is_refused_by_mode_and_by_peer_credentials() -> None:
    """Another uid cannot use the control socket: the mode bits stop it, and with them opened SO_PEERCRED does."""
    # a directory others may traverse (pytest's own are 0700), so that only
    # the master's 0700 directory and 0600 socket stand in the way
    root = Path(tempfile.mkdtemp(prefix="remsh-fleet-uid-"))
    os.chmod(root, 0o711)
    sock = root / "ctl" / "m.sock"
    master = Master(root, sock)
    try:
        master.wait_ready()
        code, err = _client_as_nobody(["--master", str(sock), "ls"])
        assert code == 2, err
        assert err.splitlines() == [f"remsh: permission denied on the control socket {sock}"]
        os.chmod(sock.parent, 0o711)
        os.chmod(sock, 0o666)
        code, err = _client_as_nobody(["--master", str(sock), "run", "--", "true"])
        assert code == 2, err
        # both ends check the other's uid: the client refuses the master's socket,
        # and the master (SO_PEERCRED) refuses the client
        assert err.splitlines() == [f"remsh: the control socket {sock} belongs to another user "
                                    f"(uid {os.geteuid()}): not used"]
        wait_until(lambda: "refused a connection from uid 65534" in master.text(),
                   what="the master to log the refusal")
        assert len(ls(sock)) == 0  # still serving its own user
    finally:
        master.stop()
        shutil.rmtree(root)


def _master_outcome(workdir: Path, sock: Path) -> "tuple[Optional[int], str]":
    """Start a master on ``sock``: its exit status and output if it stops by itself, ``None`` if it
    came up (it is stopped again)."""
    master = Master(workdir, sock)
    wait_until(lambda: master.proc.poll() is not None or "remsh master: ready" in master.text(), WAIT,
               "the master to stop or be ready")
    if master.proc.poll() is None:
        master.stop()
        return None, master.text()
    return master.proc.returncode, master.text()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")
def test_control_directory_of_another_user_or_writable_by_others_is_refused(tmp_path: Path) -> None:
    """A master refuses (exit 2, one line) a control directory of another uid, or one group or others can write."""
    ctl = tmp_path / "ctl"
    ctl.mkdir(mode=0o700)
    os.chown(ctl, NOBODY, NOBODY)
    code, text = _master_outcome(tmp_path, ctl / "m.sock")
    assert code == 2, text
    assert text.splitlines() == [f"remsh: the control directory {ctl} belongs to uid {NOBODY}, not to this user "
                                 f"(uid {os.geteuid()}): not used"]
    os.chown(ctl, os.geteuid(), os.getegid())
    for mode in (0o777, 0o1777, 0o770, 0o702):
        os.chmod(ctl, mode)
        code, text = _master_outcome(tmp_path, ctl / "m.sock")
        assert code == 2, (oct(mode), text)
        assert text.splitlines() == [f"remsh: the control directory {ctl} is writable by group or others "
                                     f"(mode {mode:04o}): not used; make it 0700"]
        assert os.listdir(ctl) == []
    os.chmod(ctl, 0o755)  # others may read and enter, not write: served
    code, text = _master_outcome(tmp_path, ctl / "m.sock")
    assert code is None, text


def test_lock_file_is_never_opened_through_a_symbolic_link(tmp_path: Path) -> None:
    """A symbolic link where PATH.lock goes: the master exits 2 naming it, and creates nothing at the link's target."""
    ctl = tmp_path / "ctl"
    ctl.mkdir(mode=0o700)
    target = tmp_path / "elsewhere" / "victim"
    target.parent.mkdir()
    os.symlink(target, ctl / "m.sock.lock")
    code, text = _master_outcome(tmp_path, ctl / "m.sock")
    assert code == 2, text
    assert text.splitlines() == [f"remsh: cannot open {ctl / 'm.sock.lock'}: it is a symbolic link; not followed"]
    assert not os.path.lexists(target)
    assert not (ctl / "m.sock").exists()


def test_a_peer_whose_uid_cannot_be_read_is_refused_at_both_ends(fleet: Fleet, tmp_path: Path) -> None:
    """Where the uid at the other end cannot be read, the master refuses the client and the client the master."""
    # the client's side, against the running master: no way to read its uid, so it is not used
    with pytest.raises(ControlError) as caught:
        ControlClient(str(fleet.sock), credentials=())
    assert f"the control socket {fleet.sock}: cannot tell which user" in str(caught.value)
    assert caught.value.exit == 2
    # the master's side: a server that cannot read a client's uid refuses it
    server = ControlServer(str(tmp_path / "ctl" / "m.sock"), FleetCollection(), credentials=())
    server.start()
    try:
        client = ControlClient(server.path)
        try:
            client.request("ls")
            boxes = list(client.events())
        finally:
            client.close()
    finally:
        server.stop()
    assert [b.get(b"ev") for b in boxes] == [b"fail"]
    assert boxes[0][b"message"] == b"permission denied: the master cannot tell which user connected"


def test_second_master_on_the_same_socket_exits_2(fleet: Fleet) -> None:
    """A second master on a live master's socket exits 2 with one clear line and leaves the first serving."""
    r = subprocess.run([sys.executable, "-m", "remsh", "master", "--control", str(fleet.sock), "--listen",
                        f"{HOST}:0", "--insecure"], env=_env(), capture_output=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.decode().splitlines() == [f"remsh: a remsh master is already running on {fleet.sock}"]
    assert len(ls(fleet.sock)) == 3


def test_master_restart_and_stale_socket(tmp_path: Path) -> None:
    """SIGTERM stops a master cleanly (socket removed); a killed master's stale socket is replaced; slaves come back."""
    sock = tmp_path / "ctl" / "m.sock"
    port = _free_port()
    slaves = SlaveProcesses(tmp_path / "slaves")
    try:
        first = Master(tmp_path, sock, port).wait_ready()
        slaves.start(port, "back-1", secret=None, insecure=True, max_backoff=0.5)
        wait_names(sock, ["back-1"])
        assert first.stop(signal.SIGTERM) == 0
        assert not sock.exists()
        second = Master(tmp_path, sock, port).wait_ready()
        rows = wait_names(sock, ["back-1"])
        assert [r["name"] for r in rows] == ["back-1"]
        second.stop(signal.SIGKILL)
        assert stat.S_ISSOCK(os.lstat(sock).st_mode)  # left behind by the killed master
        r = remsh(sock, "ls")
        assert r.returncode == 2 and b"stale" in r.stderr
        third = Master(tmp_path, sock, port).wait_ready()
        try:
            wait_names(sock, ["back-1"])
            r = remsh(sock, "run", "--", "echo", "again")
            assert r.returncode == 0 and r.stdout == b"back-1 | again\n", r.stderr
        finally:
            assert third.stop(signal.SIGINT) == 0
    finally:
        slaves.close()


def test_ls_state_resuming_while_a_session_is_carried_on(tmp_path: Path) -> None:
    """describe() says resuming for a slave whose session is being carried
    onto a new connection, away while it is gone, idle once it is back."""
    import socket as socket_mod

    from remsh.fleet import FleetCollection
    from remsh.master.slave import Slave
    from remsh.session import SessionWire
    from remsh.transports.base import SocketStream
    from remsh.wire import Wire

    a, b = socket_mod.socketpair()
    session = SessionWire(Wire(SocketStream(a), label="a"), "s1", resume_timeout=30)
    slave = Slave(session, "web-1", {}, None)
    fleet = FleetCollection()
    assert fleet.describe(slave)["state"] == "idle"
    session.connection_lost(why="cut")
    assert fleet.describe(slave)["state"] == "away"
    session.prepare_resume()
    assert fleet.describe(slave)["state"] == "resuming"
    c, d = socket_mod.socketpair()
    session.attach(Wire(SocketStream(c), label="c"), 0)
    assert fleet.describe(slave)["state"] == "idle"
    session.close()
    for s in (b, d):
        s.close()


def _tgkill(pid: int, tid: int, sig: int) -> None:
    """Send ``sig`` to thread ``tid`` of process ``pid`` (the system call; Python has no wrapper)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(234, pid, tid, sig) != 0:  # SYS_tgkill on x86-64
        raise OSError(ctypes.get_errno(), "tgkill")


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the tgkill system call number is x86-64's")
def test_a_sigterm_given_to_another_thread_of_the_master_stops_it_at_once(tmp_path: Path) -> None:
    """SIGTERM that the kernel hands to one of the master's other threads (not the main one, waiting) still stops it within a second or two, not after a long wait's timeout."""
    master = Master(tmp_path, tmp_path / "m.sock").wait_ready()
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{master.proc.pid}/task") if int(t) != master.proc.pid]
        assert tids, "the master runs threads besides its main one"
        started = time.monotonic()
        _tgkill(master.proc.pid, tids[0], signal.SIGTERM)
        assert master.proc.wait(10) == 0
        assert time.monotonic() - started < 10
        assert "stopping" in master.text()
    finally:
        if master.proc.poll() is None:
            master.proc.kill()
            master.proc.wait(WAIT)
