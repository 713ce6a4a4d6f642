"""The fleet command line, round 2, with a real ``remsh master`` and real
``remsh-slave`` processes over TCP: ``--batch``, ``--max-fail``, groups
(``--groups FILE``, ``-t @NAME``, SIGHUP), ``ls -t/--where`` and its JSON
fields, away slaves reported skipped, a run queued behind another job,
``put --force/--parents``, ``get --force`` and the master's log."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Sequence

import pytest

from tests.slaveproc import SECRET, WAIT, SlaveProcesses
from tests.test_fleet import Fleet, Master, _env, ls, wait_names
from tests.util import wait_until

pytestmark = pytest.mark.timeout(120)

NAMES = ("web-1", "web-2", "db-1")
GROUPS = '[groups]\nweb = ["web-*"]\nfront = ["@web", "edge-1"]\ndbs = ["db-*"]\n'


@contextlib.contextmanager
def fleet_with(workdir: Path, names: Sequence[str], extra: Sequence[str] = ()) -> Iterator[Fleet]:
    """A master started with ``extra`` options and a slave process for each
    of ``names``, all registered; stopped at the end."""
    slaves = SlaveProcesses(workdir / "slaves")
    master = Master(workdir, workdir / "ctl" / "master.sock", secret_file=slaves.secret_file(SECRET),
                    extra=extra)
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
    """A master with a groups file and three slaves (web-1, web-2, db-1) for the module."""
    workdir = tmp_path_factory.mktemp("round2")
    groups = workdir / "groups.toml"
    groups.write_text(GROUPS)
    with fleet_with(workdir, NAMES, ["--groups", str(groups)]) as f:
        yield f


def _lines(data: bytes) -> list:
    return data.decode(errors="replace").splitlines()


# -- --batch and --max-fail ----------------------------------------------------------------


def test_batch_one_runs_the_slaves_one_after_another(fleet: Fleet, tmp_path: Path) -> None:
    """--batch 1: no two slaves run at once (a shared lock directory is never found taken)."""
    lock = tmp_path / "busy"
    script = f"mkdir {lock} || exit 9; sleep 0.3; rmdir {lock}"
    r = fleet.run("run", "--batch", "1", "--", "sh", "-c", script)
    assert r.returncode == 0, r.stderr.decode()


def test_batch_percent_and_bad_values(fleet: Fleet, tmp_path: Path) -> None:
    """--batch 34% of 3 slaves is 2 at a time (the third waits); a bad --batch or --max-fail is exit 2."""
    marks = tmp_path / "marks"
    marks.mkdir()
    # each command notes how many others run beside it
    script = f"touch {marks}/$$; sleep 0.5; ls {marks} | wc -l; rm {marks}/$$"
    r = fleet.run("run", "--batch", "34%", "--", "sh", "-c", script)
    assert r.returncode == 0, r.stderr.decode()
    counts = [int(line.split("|")[1]) for line in _lines(r.stdout)]
    assert max(counts) <= 2 and len(counts) == 3
    for bad in (["--batch", "0"], ["--batch", "x"], ["--batch", "101%"], ["--max-fail", "0"]):
        r = fleet.run("run", *bad, "--", "true")
        assert r.returncode == 2, (bad, r.stderr)
        assert b"--batch" in r.stderr or b"--max-fail" in r.stderr


def test_max_fail_skips_the_slaves_not_yet_started(fleet: Fleet) -> None:
    """--batch 1 --max-fail 1: after the first failure no slave starts; the rest are skipped, said on stderr, exit 1."""
    r = fleet.run("run", "--batch", "1", "--max-fail", "1", "--", "sh", "-c", "echo ran; exit 4")
    assert r.returncode == 1, r.stderr.decode()
    assert len(_lines(r.stdout)) == 1  # one slave ran
    err = r.stderr.decode()
    assert err.count("skipped: --max-fail 1 reached") == 2, err
    assert "remsh: failed on 1 of 3 slaves, 2 skipped" in err


def test_max_fail_with_slaves_that_cannot_run_exits_3(fleet: Fleet) -> None:
    """--max-fail counts slaves that could not run the command too; the exit status stays 3."""
    r = fleet.run("run", "--batch", "1", "--max-fail", "1", "--", "/nonexistent/command")
    assert r.returncode == 3, r.stderr.decode()
    assert r.stderr.decode().count("skipped: --max-fail 1 reached") == 2


def test_max_fail_skipped_slaves_are_in_the_summary_and_the_job_record(fleet: Fleet) -> None:
    """The summary says skipped for slaves --max-fail kept back, and so does the job record."""
    r = fleet.run("run", "--summary", "--batch", "1", "--max-fail", "1", "--", "false")
    assert r.returncode == 1
    err = r.stderr.decode()
    assert "3 slaves: 1 failed, 2 skipped" in err, err
    jobs = json.loads(fleet.run("jobs", "--json", "-n", "1").stdout)
    states = sorted(s["state"] for s in jobs[0]["slaves"].values())
    assert states == ["failed", "skipped", "skipped"]
    assert jobs[0]["max_fail"] == 1 and jobs[0]["batch"] == "1"


def test_max_fail_not_reached_runs_everywhere(fleet: Fleet) -> None:
    """--max-fail 2 with one failure: every slave runs (exit 1, nothing skipped)."""
    r = fleet.run("run", "--batch", "1", "--max-fail", "2", "-t", "web-*", "-t", "db-1", "--",
                  "sh", "-c", 'test "$(hostname)" && test "$PWD" != / && exit 0')
    assert r.returncode == 0, r.stderr.decode()
    assert b"skipped" not in r.stderr


# -- groups -------------------------------------------------------------------------------------


def test_a_group_selects_its_slaves_and_mixes_with_globs(fleet: Fleet) -> None:
    """-t @web chooses web-1 and web-2; -t @web -t db-1 all three; a group naming a group works."""
    r = fleet.run("run", "-t", "@web", "--", "echo", "hi")
    assert r.returncode == 0, r.stderr.decode()
    assert sorted(line.split(" |")[0].strip() for line in _lines(r.stdout)) == ["web-1", "web-2"]
    r = fleet.run("run", "-t", "@web", "-t", "db-1", "--", "echo", "hi")
    assert sorted(line.split(" |")[0].strip() for line in _lines(r.stdout)) == ["db-1", "web-1", "web-2"]
    r = fleet.run("run", "-t", "@front", "--", "echo", "hi")
    assert sorted(line.split(" |")[0].strip() for line in _lines(r.stdout)) == ["web-1", "web-2"]


def test_an_unknown_group_is_a_usage_error(fleet: Fleet) -> None:
    """-t @nope: exit 2, one line naming it and the groups there are; ls too."""
    r = fleet.run("run", "-t", "@nope", "--", "true")
    assert r.returncode == 2
    assert r.stderr.decode().strip().startswith("remsh: unknown group @nope (the groups of ")
    assert "@web" in r.stderr.decode()
    r = fleet.run("ls", "-t", "@nope")
    assert r.returncode == 2 and b"unknown group @nope" in r.stderr


def test_sighup_rereads_the_groups_and_a_bad_file_keeps_the_old_ones(tmp_path: Path) -> None:
    """SIGHUP reads the groups file again; a broken file then keeps the old groups and the master logs why."""
    groups = tmp_path / "groups.toml"
    groups.write_text('[groups]\nfirst = ["a-*"]\n')
    with fleet_with(tmp_path, ("a-1", "b-1"), ["--groups", str(groups)]) as f:
        assert [r["name"] for r in json.loads(f.run("ls", "--json", "-t", "@first").stdout)] == ["a-1"]
        groups.write_text('[groups]\nsecond = ["b-*"]\n')
        f.master.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "groups reloaded" in f.master.text(), WAIT, "the reload")
        assert [r["name"] for r in json.loads(f.run("ls", "--json", "-t", "@second").stdout)] == ["b-1"]
        assert f.run("ls", "-t", "@first").returncode == 2
        groups.write_text("[groups\nbroken")
        f.master.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "groups not reloaded" in f.master.text(), WAIT, "the refusal")
        assert "not TOML" in f.master.text()
        assert [r["name"] for r in json.loads(f.run("ls", "--json", "-t", "@second").stdout)] == ["b-1"]
        assert f.master.proc.poll() is None


def test_a_bad_groups_file_stops_the_master_at_start(tmp_path: Path) -> None:
    """remsh master --groups with a bad file: exit 2, one line naming the file."""
    bad = tmp_path / "g.toml"
    bad.write_text('[groups]\nweb = "web-*"\n')
    r = subprocess.run([sys.executable, "-m", "remsh", "master", "--local", "1", "--control",
                        str(tmp_path / "m.sock"), "--state-dir", str(tmp_path / "st"), "--groups", str(bad)],
                       env=_env(), capture_output=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.decode().strip() == f"remsh: {bad}: group 'web' must be a list of name globs, e.g. [\"web-*\"]"


# -- ls ----------------------------------------------------------------------------------------


def test_ls_chooses_with_globs_groups_and_facts(fleet: Fleet) -> None:
    """ls -t GLOB, -t @GROUP and --where KEY=GLOB list only what they choose; nothing matching is an empty list."""
    def names(*args: str) -> list:
        r = fleet.run("ls", "--json", *args)
        assert r.returncode == 0, r.stderr
        return [row["name"] for row in json.loads(r.stdout)]
    assert names("-t", "web-*") == ["web-1", "web-2"]
    assert names("-t", "@dbs") == ["db-1"]
    assert names("--where", "name=db-*") == ["db-1"]
    assert names("--where", "transport=tcp", "-t", "web-2") == ["web-2"]
    assert names("-t", "nothing-*") == []
    r = fleet.run("ls", "-t", "web-1")
    assert [line.split()[0] for line in _lines(r.stdout)] == ["name", "web-1"]
    r = fleet.run("ls", "--where", "nokey=x")
    assert r.returncode == 2 and b"nokey" in r.stderr


def test_ls_json_has_hostname_basedir_policy_state_and_job(fleet: Fleet) -> None:
    """ls --json also gives hostname, basedir, root, no_execute, allow_command, and the id of the job a busy slave runs."""
    rows = {row["name"]: row for row in ls(fleet.sock)}
    row = rows["web-1"]
    assert row["hostname"] and row["basedir"] == str(fleet.base("web-1"))
    assert row["root"] is None and row["no_execute"] is False and row["allow_command"] == []
    assert row["state"] == "idle" and row["job"] is None
    assert row["peer"].startswith("127.0.0.1:")
    job = fleet.run("run", "--detach", "-t", "db-1", "--", "sleep", "5").stdout.decode().strip()
    try:
        wait_until(lambda: {r["name"]: r for r in ls(fleet.sock)}["db-1"]["state"] == "busy", WAIT, "busy")
        assert {r["name"]: r for r in ls(fleet.sock)}["db-1"]["job"] == job
    finally:
        fleet.run("cancel", job)


def test_ls_json_shows_a_slaves_policy(tmp_path: Path) -> None:
    """A slave started with --root, --no-execute and --allow-command shows them in ls --json."""
    with fleet_with(tmp_path, ()) as f:
        root = tmp_path / "jail"
        root.mkdir()
        f.slaves.start(f.master.port, "locked", max_backoff=0.5, basedir=root,
                       extra_args=["--root", str(root), "--allow-command", "/bin/echo",
                                   "--allow-command", "/usr/bin/*"])
        f.slaves.start(f.master.port, "noexec", max_backoff=0.5, extra_args=["--no-execute"])
        rows = {r["name"]: r for r in wait_names(f.sock, ["locked", "noexec"])}
        assert rows["locked"]["root"] == str(root)
        assert rows["locked"]["allow_command"] == ["/bin/echo", "/usr/bin/*"]
        assert rows["locked"]["no_execute"] is False
        assert rows["noexec"]["no_execute"] is True and rows["noexec"]["root"] is None


# -- away slaves and queued runs ------------------------------------------------------------------


def test_a_slave_that_is_away_is_reported_skipped(tmp_path: Path) -> None:
    """A chosen slave whose connection dropped (away) is not left out: skipped, on stderr and in the summary; exit 3."""
    with fleet_with(tmp_path, ("up-1", "down-1")) as f:
        down = next(p for p in f.slaves.procs if p.name == "down-1")
        down.signal(signal.SIGKILL)
        down.wait()
        wait_until(lambda: {r["name"]: r["state"] for r in ls(f.sock)}.get("down-1") == "away", WAIT, "away")
        r = f.run("run", "--", "echo", "hi")
        assert r.returncode == 3, r.stderr.decode()
        assert [" ".join(line.split()) for line in _lines(r.stdout)] == ["up-1 | hi"]
        err = r.stderr.decode()
        assert "remsh: down-1: skipped: away" in err, err
        r = f.run("run", "--summary", "-t", "down-*", "--", "echo", "hi")
        assert r.returncode == 3
        assert "1 slave: 1 skipped" in r.stderr.decode()
        jobs = json.loads(f.run("jobs", "--json", "-n", "1").stdout)
        assert jobs[0]["slaves"]["down-1"]["state"] == "skipped"


def test_a_run_queued_behind_another_job_says_so(fleet: Fleet) -> None:
    """A run on a slave busy with another job says on stderr that it waits behind that job, then runs."""
    job = fleet.run("run", "--detach", "-t", "web-2", "--", "sleep", "1").stdout.decode().strip()
    r = fleet.run("run", "-t", "web-2", "--", "echo", "after")
    assert r.returncode == 0, r.stderr.decode()
    assert _lines(r.stdout) == ["web-2 | after"]
    assert f"web-2: waiting (behind job {job})" in r.stderr.decode()


def test_a_run_on_an_idle_slave_says_nothing_of_waiting(fleet: Fleet) -> None:
    """No other job on the slave: no waiting line."""
    r = fleet.run("run", "-t", "web-1", "--", "true")
    assert r.returncode == 0 and b"waiting" not in r.stderr
