"""How ``remsh run`` and ``remsh job ID`` show output: ``-o``/``-e``
directories, ``--no-prefix``, ``--fold``, the closing summary, each failure
told once, and lines shown promptly while a command is slow; with a real
master and real slave processes (web-1, web-2, db-1, and for one test one
whose name is not a file name), output bytes compared exactly."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, List

import pytest

from remsh.outputs import OutputFiles, compress_names, summary_lines
from tests.slaveproc import HOST, SECRET, WAIT
from tests.test_fleet import ROOT, Fleet, _env, running_fleet, wait_names
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
    with running_fleet(tmp_path_factory.mktemp("output"), NAMES) as f:
        yield f


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


# -- --fold ---------------------------------------------------------------------------


def test_fold_prints_identical_slaves_once_under_one_header(fleet: Fleet) -> None:
    """--fold: the web slaves agree and print once under web-[1-2]; db-1 differs and has its own header."""
    script = "case $(basename \"$PWD\") in db-*) echo db; exit 1;; *) printf 'web\\n\\351';; esac"
    r = fleet.run("run", *FLEET, "--fold", "--no-summary", "--", "sh", "-c", script)
    assert r.returncode == 1, r.stderr
    db_header = "db-1 (failed: exit status 1)"
    assert r.stdout == (f"{'-' * 28}\n{db_header}\n{'-' * 28}\ndb\n"
                        f"{'-' * 16}\nweb-[1-2]\n{'-' * 16}\nweb\n\xe9\n").encode("latin-1")
    assert r.stderr.decode() == "remsh: db-1: exit status 1\nremsh: failed on 1 of 3 slaves\n"


def test_fold_of_all_alike_is_one_group_with_stderr_under_the_same_header(fleet: Fleet) -> None:
    """All three alike: one header naming db-1, web-[1-2]; their common stderr once under it on stderr."""
    r = fleet.run("run", *FLEET, "--fold", "--", "sh", "-c", "echo same; echo warn >&2")
    assert r.returncode == 0, r.stderr
    block = f"{'-' * 16}\ndb-1, web-[1-2]\n{'-' * 16}\n"
    assert r.stdout.decode() == block + "same\n"
    assert r.stderr.decode() == block + "warn\n"


def test_names_are_compressed_into_numeric_ranges() -> None:
    """Consecutive numbers of a stem become ranges; lone names stay as they are; zero padding is kept."""
    assert compress_names(["web-1", "web-2", "db-1"]) == "db-1, web-[1-2]"
    assert compress_names(["n1", "n2", "n3", "n5", "n10", "x"]) == "n[1-3,5,10], x"
    assert compress_names(["n08", "n09", "n10"]) == "n[08-10]"
    assert compress_names(["a\x1b"]) == "a\\x1b"


def test_usage_errors_of_output_options(fleet: Fleet) -> None:
    """--fold or --no-prefix with --json, and --fold with --no-prefix, are usage errors (exit 2) for run and job."""
    for extra in (["--json", "--fold"], ["--json", "--no-prefix"], ["--fold", "--no-prefix"]):
        r = fleet.run("run", *FLEET, *extra, "--", "true")
        assert r.returncode == 2 and r.stdout == b"", (extra, r.stderr)
        r = fleet.run("job", "0" * 8, *extra)
        assert r.returncode == 2, (extra, r.stderr)


# -- the summary, each failure once ----------------------------------------------------------


def _on_pty(fleet: Fleet, *args: str) -> bytes:
    """What ``remsh ARGS`` writes to stdout and stderr, both a pseudo-terminal."""
    master_fd, slave_fd = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "remsh", "--master", str(fleet.sock), *args], env=_env(),
                            stdin=subprocess.DEVNULL, stdout=slave_fd, stderr=slave_fd, close_fds=True)
    os.close(slave_fd)
    chunks: List[bytes] = []
    deadline = time.monotonic() + WAIT
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master_fd], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master_fd, 65536)
                except OSError:  # EIO: every writer has gone
                    break
                if not data:
                    break
                chunks.append(data)
        assert proc.wait(WAIT) is not None
    finally:
        os.close(master_fd)
        if proc.poll() is None:
            proc.kill()
    return b"".join(chunks).replace(b"\r\n", b"\n")


def test_summary_on_a_terminal_tells_each_slave_once(fleet: Fleet) -> None:
    """On a terminal run ends with one line per slave (state, duration) and the totals; a failure is not told twice."""
    out = _on_pty(fleet, "run", *FLEET, "--color", "never", "--", "sh", "-c",
                  "case $(basename \"$PWD\") in db-*) exit 4;; esac; echo fine").decode()
    lines = out.splitlines()
    assert lines[-1] == "3 slaves: 2 ok, 1 failed", out
    summary = lines[-4:-1]
    assert [s.split()[:2] for s in summary] == [["db-1", "failed"], ["web-1", "ok"], ["web-2", "ok"]], out
    assert summary[0].endswith("exit status 4") and summary[0].split()[3] == "s", out
    assert out.count("exit status 4") == 1 and "failed on" not in out, out
    assert sorted(line for line in lines if " | " in line) == ["web-1 | fine", "web-2 | fine"]


def test_summary_when_asked_and_one_slave_is_one_slave(fleet: Fleet) -> None:
    """--summary prints the recap when not on a terminal too, and says '1 slave'."""
    r = fleet.run("run", "-t", "web-1", "--summary", "--", "true")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.decode().splitlines()
    assert lines[-1] == "1 slave: 1 ok" and lines[0].split()[:2] == ["web-1", "ok"], lines


def test_one_failed_slave_of_one_is_one_slave(fleet: Fleet) -> None:
    """Without the summary, one failing slave of one is told once and counted as '1 slave'."""
    r = fleet.run("run", "-t", "web-1", "--", "sh", "-c", "exit 5")
    assert r.returncode == 5
    assert r.stderr.decode() == "remsh: web-1: exit status 5\nremsh: failed on 1 of 1 slave\n"


def test_no_summary_when_not_on_a_terminal(fleet: Fleet) -> None:
    """Piped, without --summary, a run that succeeds prints nothing but the output."""
    r = fleet.run("run", "-t", "web-1", "--", "echo", "x")
    assert r.returncode == 0 and r.stdout == b"web-1 | x\n" and r.stderr == b""


def test_summary_lines_state_every_outcome() -> None:
    """ok, failed with its status, error, away and skipped, each counted in the totals."""
    lines = summary_lines([("a", 0, None, None, 1.0), ("b", 2, None, None, 0.5),
                           ("c", None, "timed out", "error", 2.0), ("d", None, "lost", "disconnected", 0.0),
                           ("e", None, "cancelled", "cancelled", 0.0)])
    assert [line.split()[1] for line in lines[:-1]] == ["ok", "failed", "error", "away", "skipped"]
    assert lines[1].endswith("exit status 2") and lines[0].split()[2:] == ["1.00", "s"]
    assert lines[-1] == "5 slaves: 1 ok, 1 failed, 1 error, 1 away, 1 skipped"


def test_a_failed_put_is_reported_once(fleet: Fleet, tmp_path: Path) -> None:
    """put to a missing directory: each slave's failure once on stderr, nothing about it on stdout."""
    src = tmp_path / "f"
    src.write_text("x")
    r = fleet.run("put", *FLEET, str(src), "/nonexistent/dir/f")
    assert r.returncode == 3, r.stderr
    assert b"failed" not in r.stdout and b"nonexistent" not in r.stdout, r.stdout
    err = r.stderr.decode()
    for name in NAMES:
        assert err.count(f"remsh: {name}: ") == 1, err


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
    """remsh job ID takes --fold, --no-prefix and -o like run, from the stored output."""
    job_id = detach(fleet, "run", *FLEET, "--", "sh", "-c", EXACT)
    wait_state(fleet.sock, job_id, "done")
    r = fleet.run("job", job_id, "-o", str(tmp_path / "o"), "-e", str(tmp_path / "e"))
    assert r.returncode == 0 and r.stdout == b"" and r.stderr == b"", r.stderr
    for name in NAMES:
        assert (tmp_path / "o" / name).read_bytes() == exact(name)
    folded = fleet.run("job", job_id, "--fold")
    assert folded.returncode == 0
    for name in NAMES:
        assert exact(name) + b"\n" in folded.stdout
    raw = fleet.run("job", job_id, "--no-prefix")
    assert raw.returncode == 0 and sorted(raw.stdout.split(b"\xff")) == sorted(
        [b""] + [exact(name)[:-1] for name in NAMES])


def test_bench_script_runs_and_meets_its_target() -> None:
    """bench/cliprint.py on 20,000 lines prints its table and its target line."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "cliprint.py"), "--lines", "20000", "--runs", "1"],
                       capture_output=True, timeout=120, env=_env())
    assert b"target: prefixed <= 1.5x --no-prefix" in r.stdout, r.stderr
