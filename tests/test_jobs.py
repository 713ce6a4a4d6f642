"""Jobs of a real ``remsh master`` with real ``remsh-slave`` processes,
driven by the ``remsh`` commands as real processes: detach, jobs, job,
follow, cancel, the job store across a restart, pruning, the output cap,
a corrupt store, exact bytes; and the control protocol's table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

from remsh.controlproto import (CONTROL_OPS, EVENTS, decode_control, decode_event, decode_request, encode_control,
                                encode_event, encode_request)
from remsh.errors import UsageError
from remsh.store.sqlite import CHUNK_COST
from tests.slaveproc import WAIT, SlaveProcesses
from tests.test_fleet import Fleet, Master, _env, _free_port, remsh, running_fleet, wait_names
from tests.util import interrupt_after, process_alive, wait_until

pytestmark = pytest.mark.timeout(120)

NAMES = ("web-1", "web-2")


@pytest.fixture(scope="module")
def jobs_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """One master and two slaves (web-1, web-2) for the module."""
    with running_fleet(tmp_path_factory.mktemp("jobs"), NAMES) as f:
        yield f


def detach(fleet: Fleet, *args: str) -> str:
    """Start a job with --detach; its id."""
    r = fleet.run(*args[:1], "--detach", *args[1:])
    assert r.returncode == 0, r.stderr.decode()
    job_id = r.stdout.decode()
    assert job_id.endswith("\n") and job_id.count("\n") == 1, job_id
    return job_id.strip()


def jobs_json(sock: Path, *args: str) -> List[dict]:
    r = remsh(sock, "jobs", "--json", *args)
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout)


def record(sock: Path, job_id: str) -> dict:
    return next(j for j in jobs_json(sock) if j["id"] == job_id)


def wait_state(sock: Path, job_id: str, state: str) -> dict:
    wait_until(lambda: record(sock, job_id)["state"] == state, WAIT, f"job {job_id} to be {state}")
    return record(sock, job_id)


# -- detach, jobs, job, follow --------------------------------------------------------------


def test_detach_then_jobs_job_and_follow(jobs_fleet: Fleet, tmp_path: Path) -> None:
    """run --detach prints the id alone and returns while the job runs; jobs lists it; job shows what is stored; job --follow goes on to the end with run's exit status."""
    go = tmp_path / "go"
    job_id = detach(jobs_fleet, "run", "--", "sh", "-c",
                    f"echo hi; while [ ! -e {go} ]; do sleep 0.05; done; echo bye")
    running = [j["id"] for j in jobs_json(jobs_fleet.sock, "--running")]
    assert job_id in running
    wait_until(lambda: all(s["stdout_bytes"] == 3 for s in record(jobs_fleet.sock, job_id)["slaves"].values()),
               WAIT, "both slaves to print hi")
    r = remsh(jobs_fleet.sock, "job", job_id)
    assert r.returncode == 0, r.stderr.decode()
    assert sorted(r.stdout.decode().splitlines()) == ["web-1 | hi", "web-2 | hi"]
    assert "still running" in r.stderr.decode()
    follower = subprocess.Popen([sys.executable, "-m", "remsh", "--master", str(jobs_fleet.sock), "job", job_id,
                                 "--follow"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    go.touch()
    out, err = follower.communicate(timeout=WAIT)
    assert follower.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    for name in NAMES:
        assert [x for x in lines if x.startswith(name)] == [f"{name} | hi", f"{name} | bye"]
    rec = record(jobs_fleet.sock, job_id)
    assert rec["state"] == "done" and rec["kind"] == "run" and rec["uid"] == os.geteuid()
    assert rec["argv"] == ["sh", "-c", f"echo hi; while [ ! -e {go} ]; do sleep 0.05; done; echo bye"]
    assert rec["finished"] >= rec["started"]
    for name in NAMES:
        s = rec["slaves"][name]
        assert (s["state"], s["exit_status"], s["error"], s["stdout_bytes"], s["stderr_bytes"]) == \
            ("ok", 0, None, 7, 0)
    table = remsh(jobs_fleet.sock, "jobs", "-n", "1")
    assert table.returncode == 0
    header, row = table.stdout.decode().splitlines()
    assert header.split()[:3] == ["ID", "KIND", "STATE"]
    assert row.split()[:3] == [job_id, "run", "done"] and row.split()[5:7] == ["2", "0"]


def test_job_exit_status_and_json_are_runs(jobs_fleet: Fleet) -> None:
    """job ID exits as run did (one slave: its own status), stderr kept apart; job --json prints run --json's objects."""
    job_id = detach(jobs_fleet, "run", "-t", "web-1", "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    wait_state(jobs_fleet.sock, job_id, "failed")
    r = remsh(jobs_fleet.sock, "job", job_id)
    assert r.returncode == 7
    assert r.stdout == b"web-1 | out\n"
    assert b"web-1 | err\n" in r.stderr and b"remsh: web-1: exit status 7" in r.stderr
    r = remsh(jobs_fleet.sock, "job", job_id, "--json")
    assert r.returncode == 7
    obj = json.loads(r.stdout)
    assert (obj["name"], obj["status"], obj["stdout"], obj["stderr"], obj["error"]) == \
        ("web-1", 7, "out\n", "err\n", None)


def test_job_prints_non_utf8_output_back_exactly(jobs_fleet: Fleet) -> None:
    """Output that is not UTF-8 is printed by run, stored, and printed back by job ID byte for byte."""
    r = jobs_fleet.run("run", "-t", "web-2", "--", "printf", "\\377\\376a\\0b\\r\\n")
    assert r.returncode == 0 and r.stdout == b"web-2 | \xff\xfea\x00b\r\n", r
    job_id = detach(jobs_fleet, "run", "-t", "web-2", "--", "printf", "\\377\\376a\\0b\\r\\n")
    wait_state(jobs_fleet.sock, job_id, "done")
    r = remsh(jobs_fleet.sock, "job", job_id)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == b"web-2 | \xff\xfea\x00b\r\n"


def test_put_detached_is_a_job_too(jobs_fleet: Fleet, tmp_path: Path) -> None:
    """put --detach makes a put job with its paths; job --follow reports each slave and exits 0."""
    src = tmp_path / "f.txt"
    src.write_bytes(b"payload")
    job_id = detach(jobs_fleet, "put", str(src), "put-target.txt")
    r = remsh(jobs_fleet.sock, "job", job_id, "--follow")
    assert r.returncode == 0, r.stderr.decode()
    assert sorted(line.split(":")[0] for line in r.stdout.decode().splitlines()) == list(NAMES)
    rec = record(jobs_fleet.sock, job_id)
    assert (rec["kind"], rec["state"], rec["paths"]) == ("put", "done", [str(src), "put-target.txt"])
    for name in NAMES:
        assert (jobs_fleet.base(name) / "put-target.txt").read_bytes() == b"payload"


# -- cancel ---------------------------------------------------------------------------------


def test_cancel_kills_the_command_and_records_cancelled(jobs_fleet: Fleet, tmp_path: Path) -> None:
    """cancel ID ends a running sleep on every slave (process gone), the job is cancelled, job ID exits 130, a second cancel exits 2."""
    job_id = detach(jobs_fleet, "run", "--", "sh", "-c",
                    f"echo $$ > {tmp_path}/$(basename $PWD).pid; exec sleep 60")
    pids = {}
    for name in NAMES:
        pidfile = tmp_path / f"{name}.pid"
        wait_until(lambda: pidfile.exists() and pidfile.read_text().strip() != "", WAIT, f"{name} to start")
        pids[name] = int(pidfile.read_text())
    r = remsh(jobs_fleet.sock, "cancel", job_id)
    assert r.returncode == 0, r.stderr.decode()
    for name, pid in pids.items():
        wait_until(lambda: not process_alive(pid), WAIT, f"the sleep on {name} (pid {pid}) to end")
    rec = wait_state(jobs_fleet.sock, job_id, "cancelled")
    assert {s["state"] for s in rec["slaves"].values()} == {"cancelled"}
    r = remsh(jobs_fleet.sock, "job", job_id)
    assert r.returncode == 130
    assert f"remsh: job {job_id} cancelled".encode() in r.stderr
    r = remsh(jobs_fleet.sock, "cancel", job_id)
    assert r.returncode == 2 and b"already ended" in r.stderr
    assert {row["state"] for row in json.loads(remsh(jobs_fleet.sock, "ls", "--json").stdout)} == {"idle"}


def test_ctrl_c_on_an_attached_run_cancels_its_job_and_says_so(jobs_fleet: Fleet) -> None:
    """Ctrl-C on run (not detached): the job is cancelled, the client says which job, exit 130."""
    proc = subprocess.Popen([sys.executable, "-m", "remsh", "--master", str(jobs_fleet.sock), "run", "-t", "web-1",
                             "--", "sh", "-c", "echo started; exec sleep 60"],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = interrupt_after(proc, lambda: proc.stdout.readline())  # type: ignore[union-attr]
    assert proc.returncode == 130, err
    lines = err.decode().splitlines()
    assert lines[-1] == "remsh: interrupted"
    cancelled = [x for x in lines if x.startswith("remsh: job ") and x.endswith(" cancelled")]
    assert len(cancelled) == 1, lines
    job_id = cancelled[0].split()[2]
    assert record(jobs_fleet.sock, job_id)["state"] == "cancelled"


def test_unknown_job_ids_exit_2(jobs_fleet: Fleet) -> None:
    """job and cancel of an id the store does not have, or of no id at all, exit 2 with one line."""
    for args in (("job", "0000000000-0"), ("job", "0000000000-0", "--follow"), ("cancel", "0000000000-0"),
                 ("job", "not an id"), ("cancel", "../x")):
        r = remsh(jobs_fleet.sock, *args)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.decode().splitlines()) == 1, r.stderr


def test_detach_needs_a_master_and_refuses_stdin(jobs_fleet: Fleet, tmp_path: Path) -> None:
    """--detach with --local (no master) or with --stdin is a usage error, nothing runs."""
    r = remsh(jobs_fleet.sock, "run", "--detach", "--local", "1", "--basedir", str(tmp_path), "--", "true")
    assert r.returncode == 2 and b"--detach needs a master" in r.stderr
    before = len(jobs_json(jobs_fleet.sock))
    r = remsh(jobs_fleet.sock, "run", "--detach", "--stdin", "--", "cat", input=b"x")
    assert r.returncode == 2 and b"--stdin" in r.stderr
    assert len(jobs_json(jobs_fleet.sock)) == before


# -- the store across masters --------------------------------------------------------------


@pytest.fixture
def one(tmp_path: Path) -> Iterator[Tuple[Path, SlaveProcesses, int]]:
    """A directory, slave processes to start there, and a free port for the masters."""
    port = _free_port()
    slaves = SlaveProcesses(tmp_path / "slaves")
    try:
        yield tmp_path, slaves, port
    finally:
        slaves.close()


def _start(tmp_path: Path, port: int, *extra: str) -> Master:
    return Master(tmp_path, tmp_path / "ctl" / "m.sock", port, extra=extra).wait_ready()


def _first_job(tmp_path: Path, slaves: SlaveProcesses, port: int, *extra: str) -> Tuple[Master, str]:
    """A master with slave s-1 and one ended job that printed 'kept'."""
    master = _start(tmp_path, port, *extra)
    slaves.start(port, "s-1", secret=None, insecure=True, max_backoff=0.5)
    wait_names(master.sock, ["s-1"])
    r = remsh(master.sock, "run", "--", "echo", "kept")
    assert r.returncode == 0 and r.stdout == b"s-1 | kept\n", r.stderr
    (job,) = jobs_json(master.sock)
    return master, job["id"]


def test_history_is_kept_across_a_master_restart(one: Tuple[Path, SlaveProcesses, int]) -> None:
    """A master started again on the same state dir lists the old job, with its output."""
    tmp_path, slaves, port = one
    master, job_id = _first_job(tmp_path, slaves, port)
    assert master.stop() == 0
    second = _start(tmp_path, port)
    try:
        assert [j["id"] for j in jobs_json(second.sock)] == [job_id]
        r = remsh(second.sock, "job", job_id)
        assert r.returncode == 0 and r.stdout == b"s-1 | kept\n", r.stderr
    finally:
        second.stop()


def test_jobs_past_keep_jobs_are_pruned_at_start(one: Tuple[Path, SlaveProcesses, int]) -> None:
    """A master started with --keep-jobs 1s after a job ended more than 1 s ago no longer has it; the default keeps it."""
    tmp_path, slaves, port = one
    master, job_id = _first_job(tmp_path, slaves, port)
    finished = record(master.sock, job_id)["finished"]
    assert master.stop() == 0
    kept = _start(tmp_path, port, "--keep-jobs", "1h")
    try:
        assert [j["id"] for j in jobs_json(kept.sock)] == [job_id]
    finally:
        kept.stop()
    wait_until(lambda: time.time() > finished + 1.2, WAIT, "the job to be older than 1 s")
    pruned = _start(tmp_path, port, "--keep-jobs", "1s")
    try:
        assert jobs_json(pruned.sock) == []
        assert remsh(pruned.sock, "job", job_id).returncode == 2
    finally:
        pruned.stop()


def test_output_past_max_job_output_is_truncated_and_marked(one: Tuple[Path, SlaveProcesses, int]) -> None:
    """With --max-job-output 1K, 4100 bytes of output: at most 1024 kept (less 64 a chunk), every byte counted, truncated in jobs/job --json, the command not stopped."""
    tmp_path, slaves, port = one
    master = _start(tmp_path, port, "--max-job-output", "1K")
    try:
        slaves.start(port, "s-1", secret=None, insecure=True, max_backoff=0.5)
        wait_names(master.sock, ["s-1"])
        script = "i=0; while [ $i -lt 100 ]; do echo 0123456789012345678901234567890123456789; i=$((i+1)); done"
        r = remsh(master.sock, "run", "--", "sh", "-c", script + "; echo end >&2")
        assert r.returncode == 3, r.stderr  # the command succeeded, but not all its output arrived
        assert b"s-1: incomplete: output past the master's --max-job-output was not kept" in r.stderr
        (job,) = jobs_json(master.sock)
        s = job["slaves"]["s-1"]
        assert (s["stdout_bytes"], s["stderr_bytes"], s["truncated"], s["state"]) == (4100, 4, True, "ok")
        r = remsh(master.sock, "job", job["id"], "--json")
        obj = json.loads(r.stdout)
        kept = len(obj["stdout"]) + len(obj["stderr"])
        assert obj["truncated"] is True and 0 < kept <= 1024 - CHUNK_COST
        line = "0123456789012345678901234567890123456789\n"
        assert (line * 100).startswith(obj["stdout"])
    finally:
        master.stop()


def test_a_corrupt_store_is_refused_at_start_in_one_line(tmp_path: Path) -> None:
    """A jobs.sqlite that is not a database stops the master at start: exit 2, one line naming the file."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "jobs.sqlite").write_bytes(b"this is not a database at all" * 200)
    master = Master(tmp_path, tmp_path / "ctl" / "m.sock")
    assert master.proc.wait(WAIT) == 2
    lines = master.text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("remsh: ") and "jobs.sqlite" in lines[0], lines


def test_an_unsafe_state_dir_is_refused(tmp_path: Path) -> None:
    """A state directory writable by group or others stops the master at start: exit 2, one line."""
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o777)
    master = Master(tmp_path, tmp_path / "ctl" / "m.sock")
    assert master.proc.wait(WAIT) == 2
    assert master.text().splitlines() == [f"remsh: the state directory {state} is writable by group or others "
                                          f"(mode 0777): not used; make it 0700"]


def test_a_second_master_on_the_same_store_is_refused(tmp_path: Path) -> None:
    """Two masters on different sockets but one state dir: the second exits 2 naming the store."""
    first = Master(tmp_path, tmp_path / "ctl" / "a.sock").wait_ready()
    try:
        second = Master(tmp_path, tmp_path / "ctl" / "b.sock")
        assert second.proc.wait(WAIT) == 2
        (line,) = second.text().splitlines()
        assert "in use by another master" in line
    finally:
        first.stop(signal.SIGTERM)


def test_the_state_dir_is_made_private(tmp_path: Path) -> None:
    """A missing state dir is made mode 0700, the store in it 0600."""
    master = Master(tmp_path, tmp_path / "ctl" / "m.sock").wait_ready()
    try:
        assert os.stat(master.state_dir).st_mode & 0o777 == 0o700
        assert os.stat(master.state_dir / "jobs.sqlite").st_mode & 0o777 == 0o600
    finally:
        master.stop()


# -- the protocol's table --------------------------------------------------------------------


def test_every_control_op_round_trips_through_its_table() -> None:
    """Each op of CONTROL_OPS encodes and decodes its declared keys; a missing required key or an undeclared one is refused."""
    samples = {"list": ["a", "b\xff"], "text": "x", "path": "/p/\udcff", "int": 3, "float": 1.5, "flag": True}
    for name, op in CONTROL_OPS.items():
        values = {k.name: samples[k.kind] for k in op.keys}
        back_op, back = decode_request(encode_request(name, values))
        assert back_op is op and back == values, name
        for key in op.keys:
            if key.required:
                box = encode_request(name, values)
                del box[key.name.encode()]
                with pytest.raises(UsageError, match=key.name):
                    decode_request(box)
        with pytest.raises(ValueError):
            encode_request(name, {"no_such_key": 1})
    with pytest.raises(UsageError, match="unknown request"):
        decode_request({b"op": b"reboot", b"version": b"1"})


def test_every_event_round_trips_through_its_table() -> None:
    """Each event of EVENTS decodes to what was encoded."""
    samples = {"list": ["a", "b"], "text": "t\u00e9", "bytes": b"\xff\x00", "int": -4, "float": 2.25, "flag": True,
               "json": {"argv": ["x"]}, "path": "/p"}
    for kind, keys in EVENTS.items():
        values = {k.name: samples[k.kind] for k in keys}
        event = decode_event(encode_event(kind, **values))
        assert (event.kind, event.values) == (kind, values)


def test_control_boxes_round_trip_through_their_table() -> None:
    """stdin data, its end and an interrupt decode to what was encoded; an absent key is empty."""
    assert decode_control(encode_control(stdin=b"\x00\xff", stdin_eof=True, interrupt=True)) == \
        {"stdin": b"\x00\xff", "stdin_eof": True, "interrupt": True}
    assert decode_control(encode_control(interrupt=True)) == {"stdin": None, "stdin_eof": False, "interrupt": True}
    with pytest.raises(ValueError):
        encode_control(reboot=True)


def test_a_job_left_by_a_killed_master_is_recorded_failed_by_the_next(one: Tuple[Path, SlaveProcesses, int]) -> None:
    """A master SIGKILLed mid-job: the next master on the same state dir, resuming off, records that job failed, its slave lost, its output so far kept."""
    tmp_path, slaves, port = one
    master = _start(tmp_path, port)
    slaves.start(port, "s-1", secret=None, insecure=True, max_backoff=0.5)
    wait_names(master.sock, ["s-1"])
    job_id = detach(Fleet(tmp_path, master, slaves), "run", "--", "sh", "-c", "echo before; exec sleep 30")
    wait_until(lambda: record(master.sock, job_id)["slaves"]["s-1"]["stdout_bytes"] == 7, WAIT, "the output")
    master.stop(signal.SIGKILL)
    second = _start(tmp_path, port, "--resume-timeout", "0")  # with resuming, tests/test_restart.py
    try:
        rec = wait_state(second.sock, job_id, "failed")
        assert rec["finished"] is not None
        assert rec["slaves"]["s-1"]["state"] == "lost"
        assert "the master stopped" in rec["slaves"]["s-1"]["error"]
        r = remsh(second.sock, "job", job_id, "--follow")
        assert r.returncode == 3 and r.stdout == b"s-1 | before\n", r.stderr
        assert remsh(second.sock, "jobs", "--running", "--json").stdout.strip() == b"[]"
    finally:
        second.stop()


def test_a_stopped_control_server_releases_its_job_store(tmp_path: Path) -> None:
    """ControlServer.stop closes the job store it opened: the same store can be opened again in the same process."""
    from remsh.control import ControlServer
    from remsh.fleet import FleetCollection
    from remsh.store.sqlite import SqliteJobStore

    os.chmod(tmp_path, 0o700)
    path = str(tmp_path / "jobs.sqlite")
    server = ControlServer(str(tmp_path / "ctl" / "m.sock"), FleetCollection(), store=lambda: SqliteJobStore(path))
    server.start()
    server.stop()
    SqliteJobStore(path).close()


def test_ctrl_c_on_job_follow_leaves_the_job_running_and_says_so(jobs_fleet: Fleet) -> None:
    """Ctrl-C on job ID --follow stops following only: the message says the job goes on, and it does."""
    job_id = detach(jobs_fleet, "run", "-t", "web-1", "--", "sh", "-c", "echo started; exec sleep 60")
    proc = subprocess.Popen([sys.executable, "-m", "remsh", "--master", str(jobs_fleet.sock), "job", job_id,
                             "--follow"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = interrupt_after(proc, lambda: proc.stdout.readline())  # type: ignore[union-attr]
        assert proc.returncode == 130, err
        assert err.decode().splitlines()[-1] == f"remsh: stopped following; job {job_id} goes on"
        assert record(jobs_fleet.sock, job_id)["state"] == "running"
    finally:
        remsh(jobs_fleet.sock, "cancel", job_id)
        wait_until(lambda: record(jobs_fleet.sock, job_id)["state"] == "cancelled", WAIT, "the job's end")
