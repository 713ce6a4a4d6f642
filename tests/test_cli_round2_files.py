"""``put --force``/``--parents``, ``get --force``, a failed ``get`` leaving
nothing behind, and the master's log (default lines, ``--log-file``,
``--log-format json``, paramiko's noise kept out), with a real ``remsh
master`` and real ``remsh-slave`` processes."""

from __future__ import annotations

import json
import re
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List

import pytest

from tests.slaveproc import HOST, SECRET, WAIT
from tests.test_cli_round2 import fleet_with
from tests.test_fleet import Fleet, _env, _free_port
from tests.util import wait_until

pytestmark = pytest.mark.timeout(120)

NAMES = ("web-1", "web-2")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """A master and two slaves (web-1, web-2) for the module."""
    with fleet_with(tmp_path_factory.mktemp("files"), NAMES) as f:
        yield f


def _hidden(directory: Path) -> List[str]:
    """What a replacement would leave behind: the hidden .NAME.remsh-* entries."""
    return [n for n in os.listdir(directory) if ".remsh-" in n]


# -- put ------------------------------------------------------------------------------------


def test_put_force_replaces_a_file_and_leaves_nothing_beside_it(fleet: Fleet, tmp_path: Path) -> None:
    """put of an existing file fails (exit 3, once); with --force it is replaced, nothing left beside it."""
    src = tmp_path / "app.conf"
    src.write_bytes(b"one\n")
    r = fleet.run("put", "app.conf", "deployed.conf", cwd=tmp_path)
    assert r.returncode == 0, r.stderr.decode()
    src.write_bytes(b"two\xff\n")
    r = fleet.run("put", "app.conf", "deployed.conf", cwd=tmp_path)
    assert r.returncode == 3
    assert r.stderr.decode().count("web-1: send: destination exists") == 1
    r = fleet.run("put", "--force", "app.conf", "deployed.conf", cwd=tmp_path)
    assert r.returncode == 0, r.stderr.decode()
    assert b"web-1: replaced deployed.conf" in r.stdout
    for name in NAMES:
        assert (fleet.base(name) / "deployed.conf").read_bytes() == b"two\xff\n"
        assert _hidden(fleet.base(name)) == []


def test_put_force_replaces_a_tree_whole(fleet: Fleet, tmp_path: Path) -> None:
    """put --force of a tree replaces the existing tree: new files in, files the new tree lacks gone."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "old.html").write_text("old")
    assert fleet.run("put", str(site), "www").returncode == 0
    (site / "old.html").unlink()
    (site / "new.html").write_text("new")
    r = fleet.run("put", str(site), "www")
    assert r.returncode == 3
    r = fleet.run("put", "--force", str(site), "www")
    assert r.returncode == 0, r.stderr.decode()
    for name in NAMES:
        assert sorted(os.listdir(fleet.base(name) / "www")) == ["new.html"]
        assert _hidden(fleet.base(name)) == []


def test_put_force_of_a_file_over_a_tree_that_fails_keeps_the_tree(fleet: Fleet, tmp_path: Path) -> None:
    """put --force whose transfer fails (no such local file inside a bad tree) leaves the old copy and nothing beside it."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "fifo").touch()
    os.unlink(tree / "fifo")
    os.mkfifo(tree / "fifo")  # a special file: send_tree refuses the tree
    (fleet.base("web-1") / "kept").mkdir(exist_ok=True)
    (fleet.base("web-1") / "kept" / "file").write_text("still here")
    r = fleet.run("put", "-t", "web-1", "--force", str(tree), "kept")
    assert r.returncode == 3
    assert (fleet.base("web-1") / "kept" / "file").read_text() == "still here"
    assert _hidden(fleet.base("web-1")) == []


def test_put_parents_makes_the_missing_directories(fleet: Fleet, tmp_path: Path) -> None:
    """put to a/b/c.txt fails without --parents (exit 3) and makes a/b with it; trees too."""
    src = tmp_path / "c.txt"
    src.write_text("c")
    r = fleet.run("put", "-t", "web-1", str(src), "deep/a/b/c.txt")
    assert r.returncode == 3
    r = fleet.run("put", "-t", "web-1", "--parents", str(src), "deep/a/b/c.txt")
    assert r.returncode == 0, r.stderr.decode()
    assert (fleet.base("web-1") / "deep/a/b/c.txt").read_text() == "c"
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "x").write_text("x")
    r = fleet.run("put", "-t", "web-1", "--parents", str(tree), "deeper/p/q/t")
    assert r.returncode == 0, r.stderr.decode()
    assert (fleet.base("web-1") / "deeper/p/q/t/x").read_text() == "x"


def test_put_force_with_sync_is_a_usage_error(fleet: Fleet, tmp_path: Path) -> None:
    """--force and --sync together: exit 2, one line."""
    r = fleet.run("put", "--force", "--sync", str(tmp_path), "x")
    assert r.returncode == 2 and b"--force" in r.stderr


# -- get ------------------------------------------------------------------------------------------


def test_get_again_fails_and_get_force_replaces(fleet: Fleet, tmp_path: Path) -> None:
    """A second get of the same file fails naming --force; get --force replaces the earlier copy (files and trees)."""
    (fleet.base("web-1") / "log.txt").write_bytes(b"first\n")
    out = tmp_path / "out"
    assert fleet.run("get", "-t", "web-1", "log.txt", str(out)).returncode == 0
    (fleet.base("web-1") / "log.txt").write_bytes(b"second\n")
    r = fleet.run("get", "-t", "web-1", "log.txt", str(out))
    assert r.returncode == 3
    assert b"exists (get --force replaces it)" in r.stderr
    assert (out / "web-1" / "log.txt").read_bytes() == b"first\n"
    r = fleet.run("get", "-t", "web-1", "--force", "log.txt", str(out))
    assert r.returncode == 0, r.stderr.decode()
    assert (out / "web-1" / "log.txt").read_bytes() == b"second\n"
    tree = fleet.base("web-1") / "logs"
    tree.mkdir()
    (tree / "a").write_text("a")
    assert fleet.run("get", "-t", "web-1", "logs", str(out)).returncode == 0
    (tree / "a").unlink()
    (tree / "b").write_text("b")
    r = fleet.run("get", "-t", "web-1", "--force", "logs", str(out))
    assert r.returncode == 0, r.stderr.decode()
    assert sorted(os.listdir(out / "web-1" / "logs")) == ["b"]
    assert _hidden(out / "web-1") == []


def test_a_failed_get_leaves_no_empty_directory(fleet: Fleet, tmp_path: Path) -> None:
    """get of a missing file: exit 3 and no empty LOCALDIR/NAME/ left behind (one that was there stays)."""
    out = tmp_path / "out"
    r = fleet.run("get", "missing.txt", str(out))
    assert r.returncode == 3
    assert not (out / "web-1").exists() and not (out / "web-2").exists()
    (out / "web-2").mkdir(parents=True)
    r = fleet.run("get", "missing.txt", str(out))
    assert r.returncode == 3
    assert (out / "web-2").is_dir() and not (out / "web-1").exists()


# -- the master's log -------------------------------------------------------------------------------


def test_the_master_logs_slaves_and_jobs_by_default(tmp_path: Path) -> None:
    """By default the master logs a slave registered, refused (why), away and gone, and a job started and ended."""
    with fleet_with(tmp_path, ("log-1",)) as f:
        text = f.master.text()
        assert "remsh master: slave log-1 registered from 127.0.0.1:" in text
        assert "listening for TCP slaves on" in text
        job = f.run("run", "--detach", "--", "true").stdout.decode().strip()
        wait_until(lambda: f"job {job} ended: done" in f.master.text(), WAIT, "the job's end")
        assert f"remsh master: job {job} started: run on 1 slave\n" in f.master.text()
        bad = f.slaves.start(f.master.port, "intruder", secret=b"wrong secret", no_reconnect=True)
        bad.wait()
        wait_until(lambda: "refused slave from 127.0.0.1:" in f.master.text(), WAIT, "the refusal")
        line = next(x for x in f.master.text().splitlines() if "refused slave" in x)
        assert "'intruder' failed authentication (a wrong proof: not the master's secret" in line
        proc = f.slaves.procs[0]
        proc.signal(signal.SIGKILL)
        proc.wait()
        wait_until(lambda: "slave log-1: away" in f.master.text(), WAIT, "away")


def test_log_file_in_json_one_object_a_line(tmp_path: Path) -> None:
    """--log-file FILE --log-format json: every line of FILE is a JSON object with time, level, logger, message."""
    log = tmp_path / "master.log"
    argv = [sys.executable, "-m", "remsh", "master", "--local", "1", "--basedir", str(tmp_path), "--control",
            str(tmp_path / "m.sock"), "--state-dir", str(tmp_path / "st"), "--log-file", str(log),
            "--log-format", "json"]
    proc = subprocess.Popen(argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: log.exists() and '"ready"' in log.read_text(), WAIT, "ready in the log file")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0
    assert err == b"" and out == b""  # all of it went to the file
    objects = [json.loads(line) for line in log.read_text().splitlines()]
    assert all(set(o) == {"time", "level", "logger", "message"} for o in objects)
    messages = [o["message"] for o in objects]
    assert "slave local1 registered from local child pid" in " ".join(messages)
    assert "ready" in messages and messages[-1] in ("stopping", "slave local1 left")
    assert objects[0]["time"].endswith("Z")
    assert oct(log.stat().st_mode & 0o777) == "0o600"


def test_a_log_file_that_cannot_be_opened_is_a_usage_error(tmp_path: Path) -> None:
    """--log-file in a missing directory: exit 2, one line."""
    r = subprocess.run([sys.executable, "-m", "remsh", "master", "--local", "1", "--control", str(tmp_path / "m"),
                        "--state-dir", str(tmp_path / "st"), "--log-file", str(tmp_path / "no" / "log")],
                       env=_env(), capture_output=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.decode().startswith("remsh: cannot open the log file ")


def test_paramikos_errors_for_a_refused_client_are_not_shown(tmp_path: Path) -> None:
    """A client that sends garbage to the SSH listener: the master logs its own line, no paramiko ERROR or traceback."""
    key = tmp_path / "host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    keys = tmp_path / "authorized_keys"
    keys.write_text("")
    port = _free_port()
    log = tmp_path / "master.err"
    argv = [sys.executable, "-m", "remsh", "master", "--ssh-listen", f"{HOST}:{port}", "--host-key", str(key),
            "--authorized-keys", str(keys), "--control", str(tmp_path / "m.sock"), "--state-dir",
            str(tmp_path / "st"), "--insecure"]
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, env=_env(REMSH_SECRET=SECRET.decode()), stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "ready" in log.read_text(), WAIT, "ready")
        for _ in range(2):
            with socket.create_connection((HOST, port)) as s:
                s.sendall(b"this is not ssh\r\n" * 4)
                s.settimeout(WAIT)
                try:
                    while s.recv(4096):
                        pass
                except OSError:
                    pass
        # an ordinary refusal: a real SSH client whose key is not authorised
        subprocess.run(["ssh", "-p", str(port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                        "-o", "UserKnownHostsFile=/dev/null", "-i", str(key), f"slave@{HOST}", "true"],
                       capture_output=True, timeout=30)
        wait_until(lambda: "is not in" in log.read_text(), WAIT, "the master's own refusal line")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(WAIT)
    text = log.read_text()
    for noise in ("Traceback", "SSHException", "Exception (server)", "Auth rejected", "Connected (version"):
        assert noise not in text, text
    assert "dropped: SSH negotiation failed" in text  # the listener's own line for each


def test_log_file_in_text_each_line_with_its_utc_time(tmp_path: Path) -> None:
    """--log-file FILE (text): the lines go to FILE, not stderr, each starting with its UTC time."""
    log = tmp_path / "master.log"
    argv = [sys.executable, "-m", "remsh", "master", "--local", "1", "--basedir", str(tmp_path), "--control",
            str(tmp_path / "m.sock"), "--state-dir", str(tmp_path / "st"), "--log-file", str(log)]
    proc = subprocess.Popen(argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: log.exists() and "remsh master: ready" in log.read_text(), WAIT, "ready in the file")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0 and err == b"" and out == b""
    lines = log.read_text().splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ remsh master: ", line) for line in lines), lines
    assert any("slave local1 registered from local child pid" in line for line in lines)
