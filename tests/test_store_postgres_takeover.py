"""Another master takes over a dead master's running work through the
shared PostgreSQL store: a standby started under the dead master's
``--name`` (on another address, with its own state directory) takes its
name with a new epoch and its recorded sessions; the slaves, told of the
standby by ``remsh-slave --failover``, resume their commands there.  Real
master, slave and PostgreSQL processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.pgserver import PgServer, pg_server  # noqa: F401 - fixture
from tests.slaveproc import HOST, WAIT, SlaveProcesses
from tests.test_fleet import Master, _env, _free_port, remsh, wait_names
from tests.test_restart import NAMES, SCRIPT, STATUSES, _check_complete, _record
from tests.test_store_postgres_restart import _stored
from tests.util import wait_until

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def store_uri(pg_server: PgServer) -> Iterator[str]:
    name = pg_server.new_database()
    try:
        yield pg_server.uri(name)
    finally:
        pg_server.drop_database(name)


def test_a_standby_takes_over_a_killed_masters_running_commands(tmp_path: Path, store_uri: str) -> None:
    """The master SIGKILLed mid-job; a standby on another port under its --name: the slaves fail over to it, the job ends with every line once, statuses right, followed on the standby."""
    ports = [_free_port(), _free_port()]
    slaves = SlaveProcesses(tmp_path / "slaves")
    extra = ["--store", store_uri, "--name", "m1"]
    for d in ("first", "standby"):
        (tmp_path / d).mkdir()
    first = Master(tmp_path / "first", tmp_path / "first" / "m.sock", ports[0], extra=extra).wait_ready()
    standby = None
    try:
        for name in NAMES:
            slaves.start(ports[0], name, secret=None, insecure=True, max_backoff=0.3,
                         extra_args=["--failover", f"{HOST}:{ports[1]}"])
        wait_names(first.sock, NAMES)
        go = tmp_path / "GO"
        r = remsh(first.sock, "run", "--detach", "--", "env", f"GO={go}", "sh", "-c", SCRIPT)
        assert r.returncode == 0, r.stderr.decode()
        job_id = r.stdout.decode().strip()
        wait_until(lambda: all(s["stdout_bytes"] > 50 for s in _record(first, job_id)["slaves"].values()), WAIT,
                   "output from every slave")
        before = {n: s["stdout_bytes"] for n, s in _record(first, job_id)["slaves"].items()}
        first.stop(signal.SIGKILL)
        time.sleep(0.5)  # the commands go on printing while no master is there: kept by the slaves
        standby = Master(tmp_path / "standby", tmp_path / "standby" / "m.sock", ports[1], extra=extra).wait_ready()
        wait_names(standby.sock, NAMES, timeout=30)
        follower = subprocess.Popen([sys.executable, "-m", "remsh", "--master", str(standby.sock), "job", job_id,
                                     "--follow", "--no-summary"], env=_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
        go.touch()
        out, err = follower.communicate(timeout=WAIT * 2)
        assert follower.returncode == 1, err.decode() + standby.text()  # some slaves failed: as run would say
        rec = _record(standby, job_id)
        assert rec["state"] == "failed", rec
        for name, status in STATUSES.items():
            assert rec["slaves"][name]["exit_status"] == status, rec["slaves"][name]
        stored = _stored(store_uri, job_id)
        for name in NAMES:
            count = _check_complete(stored[name], name)
            assert len(stored[name]["stdout"]) > before[name], f"{name}: nothing printed after the takeover"
            shown = [line for line in out.decode().splitlines() if line.startswith(f"{name} | ")]
            assert shown == [f"{name} | line {i}" for i in range(1, count + 1)] + \
                [f"{name} | after {j}" for j in range(1, 21)], f"{name}: follow showed {shown[-3:]}"
    finally:
        for m in (first, standby):
            if m is not None:
                m.stop()
        slaves.close()


def test_a_paused_master_is_taken_over_and_fenced_off_when_it_resumes(tmp_path: Path, store_uri: str) -> None:
    """The master SIGSTOPped mid-job: a standby under its --name is refused until the lease has passed, then takes the job over and ends it; SIGCONTed, the old master's writes are refused (stale epoch) and the record stays as the standby wrote it."""
    ports = [_free_port(), _free_port()]
    slaves = SlaveProcesses(tmp_path / "slaves")
    extra = ["--store", store_uri, "--name", "m1"]
    (tmp_path / "first").mkdir()
    first = Master(tmp_path / "first", tmp_path / "first" / "m.sock", ports[0], extra=extra).wait_ready()
    standby = None
    try:
        for name in NAMES:
            slaves.start(ports[0], name, secret=None, insecure=True, max_backoff=0.3,
                         extra_args=["--failover", f"{HOST}:{ports[1]}", "--heartbeat", "1"])
        wait_names(first.sock, NAMES)
        go = tmp_path / "GO"
        r = remsh(first.sock, "run", "--detach", "--", "env", f"GO={go}", "sh", "-c", SCRIPT)
        assert r.returncode == 0, r.stderr.decode()
        job_id = r.stdout.decode().strip()
        wait_until(lambda: all(s["stdout_bytes"] > 50 for s in _record(first, job_id)["slaves"].values()), WAIT,
                   "output from every slave")
        first.proc.send_signal(signal.SIGSTOP)
        paused = time.monotonic()
        attempt = 0
        while True:  # refused while the paused master's lease lasts (its process is alive)
            attempt += 1
            workdir = tmp_path / f"standby-{attempt}"
            workdir.mkdir()
            candidate = Master(workdir, workdir / "m.sock", ports[1], extra=extra)
            wait_until(lambda: "remsh master: ready" in candidate.text() or candidate.proc.poll() is not None,
                       WAIT, "the standby to start or give up")
            if candidate.proc.poll() is None:
                standby = candidate.wait_ready()
                break
            assert "a master named 'm1' is running" in candidate.text(), candidate.text()
            assert time.monotonic() - paused < 40, "the lease never passed"
            time.sleep(1.0)  # retrying a refused start, as an operator or a supervisor would
        assert time.monotonic() - paused >= 10  # not before the lease (15 s, give or take a heartbeat)
        wait_names(standby.sock, NAMES, timeout=60)
        go.touch()
        wait_until(lambda: _record(standby, job_id)["state"] != "running", WAIT * 2, "the job to end")
        rec = _record(standby, job_id)
        for name, status in STATUSES.items():
            assert rec["slaves"][name]["exit_status"] == status, rec["slaves"][name]
        stored = _stored(store_uri, job_id)
        for name in NAMES:
            _check_complete(stored[name], name)
        first.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: "is stale" in first.text(), WAIT, "the resumed master to find itself fenced off")
        r = remsh(first.sock, "run", "--", "echo", "from the old master")
        assert r.returncode != 0
        assert _record(standby, job_id) == rec and _stored(store_uri, job_id) == stored
    finally:
        if first.proc.poll() is None:
            first.proc.send_signal(signal.SIGCONT)
        for m in (first, standby):
            if m is not None:
                m.stop()
        slaves.close()


def test_a_slave_that_never_comes_back_to_the_standby_ends_lost(tmp_path: Path, store_uri: str) -> None:
    """Master killed and one slave killed with it: the standby ends that slave's part lost after its --resume-timeout, the other's command completes, the job fails."""
    ports = [_free_port(), _free_port()]
    slaves = SlaveProcesses(tmp_path / "slaves")
    extra = ["--store", store_uri, "--name", "m1", "--resume-timeout", "3"]
    for d in ("first", "standby"):
        (tmp_path / d).mkdir()
    first = Master(tmp_path / "first", tmp_path / "first" / "m.sock", ports[0], extra=extra).wait_ready()
    standby = None
    names = ("r-1", "r-2")
    try:
        procs = {name: slaves.start(ports[0], name, secret=None, insecure=True, max_backoff=0.3,
                                    extra_args=["--failover", f"{HOST}:{ports[1]}"]) for name in names}
        wait_names(first.sock, names)
        go = tmp_path / "GO"
        r = remsh(first.sock, "run", "--detach", "--", "env", f"GO={go}", "sh", "-c", SCRIPT)
        assert r.returncode == 0, r.stderr.decode()
        job_id = r.stdout.decode().strip()
        wait_until(lambda: all(s["stdout_bytes"] > 50 for s in _record(first, job_id)["slaves"].values()), WAIT,
                   "output from every slave")
        first.stop(signal.SIGKILL)
        procs["r-2"].signal(signal.SIGKILL)
        procs["r-2"].wait()
        standby = Master(tmp_path / "standby", tmp_path / "standby" / "m.sock", ports[1], extra=extra).wait_ready()
        wait_names(standby.sock, ["r-1"], timeout=30)
        go.touch()
        wait_until(lambda: _record(standby, job_id)["state"] != "running", WAIT * 2, "the job to end")
        rec = _record(standby, job_id)
        assert rec["state"] == "failed", rec
        assert rec["slaves"]["r-1"]["state"] == "ok" and rec["slaves"]["r-1"]["exit_status"] == 0, rec
        assert rec["slaves"]["r-2"]["state"] == "lost", rec
        _check_complete(_stored(store_uri, job_id)["r-1"], "r-1")
    finally:
        for m in (first, standby):
            if m is not None:
                m.stop()
        slaves.close()
