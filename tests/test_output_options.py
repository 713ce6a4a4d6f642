"""How ``remsh run`` and ``remsh job ID`` show output: ``-o``/``-e``
directories, ``--no-prefix``, and lines shown promptly while a command is
slow; with a real master and real slave processes (web-1, web-2, db-1, and
for one test one whose name is not a file name), output bytes compared
exactly."""

from __future__ import annotations

import os
import select
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from remsh.outputs import OutputFiles
from tests.slaveproc import HOST, SECRET, WAIT, SlaveProcesses
from tests.test_fleet import ROOT, Fleet, Master, _env, wait_names
from tests.test_jobs import detach, wait_state

pytestmark = pytest.mark.timeout(120)

NAMES = ("web-1", "web-2", "db-1")
BAD = "bad/name"
#: the three ordinary slaves (one test adds BAD for a while)
FLEET = ["-t", "web-*", "-t", "db-*"]
#: a command printing bytes that are not UTF-8, different on each slave
EXACT = "n=$(basename \"$PWD\"); printf 'caf\\351 %s\\000\\n\\377' \"$n\"; printf 'e\\376%s' \"$n\" >&2"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """One master and three slaves (web-1, web-2, db-1) for the module."""
    workdir = tmp_path_factory.mktemp("output")
    slaves = SlaveProcesses(workdir / "slaves")
    master = Master(workdir, workdir / "ctl" / "master.sock", secret_file=slaves.secret_file(SECRET))
    try:
        master.wait_ready()
        for name in NAMES:
            slaves.start(master.port, name, max_backoff=0.5)
        wait_names(master.sock, NAMES)
        yield Fleet(workdir, master, slaves)
    finally:
        master.stop()
        slaves.close()


def exact(name: str) -> bytes:
    """What EXACT prints on stdout on slave ``name``."""
    return b"caf\xe9 " + name.encode() + b"\0\n\xff"


# -- -o DIR and -e DIR ------------------------------------------------------------------


def test_outdir_and_errdir_get_each_slaves_exact_bytes(fleet: Fleet, tmp_path: Path) -> None:
    """-o/-e put each slave's stdout/stderr, not UTF-8 and unfinished, into DIR/NAME (made if missing), not on the terminal."""
    outdir, errdir = tmp_path / "o" / "deep", tmp_path / "e"
    r = fleet.run("run", *FLEET, "-o", str(outdir), "--errdir", str(errdir), "--", "sh", "-c", EXACT)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"" and r.stderr == b""
    assert sorted(os.listdir(outdir)) == sorted(NAMES) == sorted(os.listdir(errdir))
    for name in NAMES:
        assert (outdir / name).read_bytes() == exact(name)
        assert (errdir / name).read_bytes() == b"e\xfe" + name.encode()


def test_outdir_gets_an_empty_file_for_a_silent_command_and_keeps_stderr_on_the_terminal(fleet: Fleet,
                                                                                        tmp_path: Path) -> None:
    """A command that prints nothing still gets its (empty) file; without -e its stderr is printed as usual."""
    r = fleet.run("run", "-t", "web-1", "-o", str(tmp_path), "--", "sh", "-c", "echo oops >&2")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "web-1").read_bytes() == b""
    assert r.stderr == b"web-1 | oops\n"


def test_a_slave_whose_name_is_not_a_file_name_is_refused_once(fleet: Fleet, tmp_path: Path) -> None:
    """A slave named bad/name writes nothing outside -o DIR: its part fails (exit 3), told once on stderr."""
    # started here: the test helpers name files after their slaves
    env = {k: v for k, v in _env().items() if k != "REMSH_SECRET"}
    proc = subprocess.Popen([sys.executable, "-m", "remsh.slave.main", "--name", BAD, "--basedir", str(tmp_path),
                             "--secret-file", str(fleet.slaves.secret_file(SECRET)), "--no-reconnect",
                             HOST, str(fleet.master.port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_names(fleet.sock, [BAD])
        r = fleet.run("run", "-t", "bad*", "-t", "web-1", "-o", str(tmp_path / "o"), "--", "echo", "hi")
    finally:
        proc.kill()
        proc.wait(WAIT)
    assert r.returncode == 3, r.stderr
    assert os.listdir(tmp_path / "o") == ["web-1"] and not (tmp_path / "bad").exists()
    err = r.stderr.decode()
    assert err.count("bad/name") == 1 and "not a safe file name" in err, err


def test_outdir_that_is_a_file_is_a_usage_error(fleet: Fleet, tmp_path: Path) -> None:
    """-o naming an existing file: exit 2, one line, nothing run."""
    (tmp_path / "f").write_text("")
    r = fleet.run("run", *FLEET, "-o", str(tmp_path / "f"), "--", "touch", str(tmp_path / "ran"))
    assert r.returncode == 2
    assert r.stderr.decode().count("\n") == 1 and "not a directory" in r.stderr.decode()
    assert not (tmp_path / "ran").exists()


def test_output_file_refuses_unsafe_names_and_links(tmp_path: Path) -> None:
    """OutputFiles writes no file for '..', '.', '' or a name with '/', and never through a symbolic link."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "link").symlink_to(tmp_path / "target")
    files = OutputFiles(str(tmp_path / "d"), "-o")
    for name in ("..", ".", "", "a/b", "link"):
        files.write(name, b"x")
        assert files.end(name, True) is not None, name
    assert sorted(os.listdir(tmp_path / "d")) == ["link"] and not (tmp_path / "target").exists()


# -- --no-prefix --------------------------------------------------------------------


def test_no_prefix_prints_the_exact_bytes(fleet: Fleet) -> None:
    """--no-prefix prints stdout and stderr as they came, not UTF-8 and unfinished lines included."""
    r = fleet.run("run", "-t", "web-2", "--no-prefix", "--", "sh", "-c", EXACT)
    assert r.returncode == 0, r.stderr
    assert r.stdout == exact("web-2")
    assert r.stderr == b"e\xfeweb-2"


def test_prefixed_lines_carry_the_bytes_unchanged(fleet: Fleet) -> None:
    """Prefixed lines keep bytes that are not UTF-8 as they were (no replacement character)."""
    r = fleet.run("run", "-t", "db-1", "--", "sh", "-c", EXACT)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"db-1 | caf\xe9 db-1\0\ndb-1 | \xff\n"


def test_usage_errors_of_output_options(fleet: Fleet) -> None:
    """--no-prefix with --json is a usage error (exit 2) for run and job."""
    for extra in (["--json", "--no-prefix"],):
        r = fleet.run("run", *FLEET, *extra, "--", "true")
        assert r.returncode == 2 and r.stdout == b"", (extra, r.stderr)
        r = fleet.run("job", "0" * 8, *extra)
        assert r.returncode == 2, (extra, r.stderr)


# -- slow output, and the replay of a job ---------------------------------------------------------


def test_a_slow_commands_line_shows_before_the_command_ends(fleet: Fleet, tmp_path: Path) -> None:
    """A line followed by silence is printed while the command still runs (not held for more lines)."""
    go = tmp_path / "go"
    proc = subprocess.Popen([sys.executable, "-m", "remsh", "--master", str(fleet.sock), "run", "-t", "web-1",
                             "--", "sh", "-c", f"echo first; while [ ! -e {go} ]; do sleep 0.05; done; echo second"],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], WAIT)
        assert ready, "the first line was held"
        assert proc.stdout.readline() == b"web-1 | first\n"
        assert proc.poll() is None
    finally:
        go.write_text("")
        out, _ = proc.communicate(timeout=WAIT)
    assert out == b"web-1 | second\n" and proc.returncode == 0


def test_job_replays_with_the_output_options(fleet: Fleet, tmp_path: Path) -> None:
    """remsh job ID takes --no-prefix and -o/-e like run, from the stored output."""
    job_id = detach(fleet, "run", *FLEET, "--", "sh", "-c", EXACT)
    wait_state(fleet.sock, job_id, "done")
    r = fleet.run("job", job_id, "-o", str(tmp_path / "o"), "-e", str(tmp_path / "e"))
    assert r.returncode == 0 and r.stdout == b"" and r.stderr == b"", r.stderr
    for name in NAMES:
        assert (tmp_path / "o" / name).read_bytes() == exact(name)
    raw = fleet.run("job", job_id, "--no-prefix")
    assert raw.returncode == 0 and sorted(raw.stdout.split(b"\xff")) == sorted(
        [b""] + [exact(name)[:-1] for name in NAMES])


def test_bench_script_runs_and_meets_its_target() -> None:
    """bench/cliprint.py on 20,000 lines prints its table and its target line."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "cliprint.py"), "--lines", "20000", "--runs", "1"],
                       capture_output=True, timeout=120, env=_env())
    assert b"target: prefixed <= 1.5x --no-prefix" in r.stdout, r.stderr
