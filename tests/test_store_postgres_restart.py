"""A master on a PostgreSQL job store killed mid-job and started again under
its name takes back its running commands (:mod:`remsh.jobadopt`) as it does
on SQLite: every line stored once and in order, exit statuses right.  Real
master, slave and PostgreSQL processes (:mod:`tests.pgserver`)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator

import psycopg
import pytest

from tests.pgserver import PgServer, pg_server  # noqa: F401 - fixture
from tests.slaveproc import WAIT, SlaveProcesses
from tests.test_fleet import Master, _env, _free_port, remsh, wait_names
from tests.test_restart import NAMES, SCRIPT, STATUSES, _check_complete, _record
from tests.util import wait_until

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def store_uri(pg_server: PgServer) -> Iterator[str]:
    name = pg_server.new_database()
    try:
        yield pg_server.uri(name)
    finally:
        pg_server.drop_database(name)


def _stored(uri: str, job_id: str) -> Dict[str, Dict[str, bytes]]:
    """Each slave's stored stdout and stderr, read straight from the database, checking the chunks abut."""
    out: Dict[str, Dict[str, bytes]] = {}
    with psycopg.connect(uri) as conn:
        rows = conn.execute(b"SELECT name, stream, pos, data FROM remsh_output WHERE job_id = %s ORDER BY seq",
                            (job_id,)).fetchall()
    for name, stream, pos, data in rows:
        streams = out.setdefault(name, {"stdout": b"", "stderr": b""})
        assert pos == len(streams[stream]), f"{name} {stream}: a chunk at {pos} after {len(streams[stream])}"
        streams[stream] += bytes(data)
    return out


def test_a_killed_master_on_postgresql_restarted_takes_back_running_commands(tmp_path: Path,
                                                                             store_uri: str) -> None:
    """SIGKILL the master mid-job, start it again under its --name on the same PostgreSQL store: the job ends with every line once, statuses right, followed on the new master."""
    port = _free_port()
    slaves = SlaveProcesses(tmp_path / "slaves")
    extra = ["--store", store_uri, "--name", "m1"]
    sock = tmp_path / "ctl" / "m.sock"
    master = Master(tmp_path, sock, port, extra=extra).wait_ready()
    second = None
    try:
        for name in NAMES:
            slaves.start(port, name, secret=None, insecure=True, max_backoff=0.3)
        wait_names(master.sock, NAMES)
        go = tmp_path / "GO"
        r = remsh(master.sock, "run", "--detach", "--", "env", f"GO={go}", "sh", "-c", SCRIPT)
        assert r.returncode == 0, r.stderr.decode()
        job_id = r.stdout.decode().strip()
        wait_until(lambda: all(s["stdout_bytes"] > 50 for s in _record(master, job_id)["slaves"].values()), WAIT,
                   "output from every slave")
        before = {n: s["stdout_bytes"] for n, s in _record(master, job_id)["slaves"].items()}
        master.stop(signal.SIGKILL)
        time.sleep(0.5)  # the commands go on printing while no master is there: kept by the slaves
        second = Master(tmp_path, sock, port, extra=extra).wait_ready()
        wait_names(second.sock, NAMES)
        follower = subprocess.Popen([sys.executable, "-m", "remsh", "--master", str(second.sock), "job", job_id,
                                     "--follow", "--no-summary"], env=_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
        go.touch()
        out, err = follower.communicate(timeout=WAIT)
        assert follower.returncode == 1, err.decode() + second.text()  # some slaves failed: as run would say
        rec = _record(second, job_id)
        assert rec["state"] == "failed", rec
        for name, status in STATUSES.items():
            assert rec["slaves"][name]["exit_status"] == status, rec["slaves"][name]
        stored = _stored(store_uri, job_id)
        for name in NAMES:
            count = _check_complete(stored[name], name)
            assert len(stored[name]["stdout"]) > before[name], f"{name}: nothing printed after the restart"
            shown = [line for line in out.decode().splitlines() if line.startswith(f"{name} | ")]
            assert shown == [f"{name} | line {i}" for i in range(1, count + 1)] + \
                [f"{name} | after {j}" for j in range(1, 21)], f"{name}: follow showed {shown[-3:]}"
    finally:
        for m in (master, second):
            if m is not None:
                m.stop()
        slaves.close()


def test_a_postgresql_restart_mid_job_loses_no_output(tmp_path: Path, pg_server: PgServer, store_uri: str) -> None:
    """pg_ctl restart while a job prints on two slaves: the job ends done, every line of both streams stored once and in order."""
    port = _free_port()
    slaves = SlaveProcesses(tmp_path / "slaves")
    master = Master(tmp_path, tmp_path / "ctl" / "m.sock", port, extra=["--store", store_uri, "--name", "m1"])
    names = ("p-1", "p-2")
    script = ('for i in $(seq 1 150); do echo "line $i"; echo "err $i" >&2; sleep 0.02; done; '
              'for j in $(seq 1 20); do echo "after $j"; done')
    try:
        master.wait_ready()
        for name in names:
            slaves.start(port, name, secret=None, insecure=True, max_backoff=0.3)
        wait_names(master.sock, names)
        r = remsh(master.sock, "run", "--detach", "--", "sh", "-c", script)
        assert r.returncode == 0, r.stderr.decode()
        job_id = r.stdout.decode().strip()
        wait_until(lambda: all(s["stdout_bytes"] > 50 for s in _record(master, job_id)["slaves"].values()), WAIT,
                   "output from every slave")
        pg_server.restart()

        def ended() -> bool:
            try:
                return _record(master, job_id)["state"] != "running"
            except AssertionError:  # the master could not read the store just then
                return False

        wait_until(ended, WAIT * 2, "the job to end")
        rec = _record(master, job_id)
        assert rec["state"] == "done", rec
        stored = _stored(store_uri, job_id)
        for name in names:
            assert _check_complete(stored[name], name) == 150
            assert rec["slaves"][name]["stdout_bytes"] == len(stored[name]["stdout"])
    finally:
        master.stop()
        slaves.close()
