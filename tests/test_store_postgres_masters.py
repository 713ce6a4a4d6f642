"""Several real ``remsh master`` processes on one PostgreSQL job store
(:mod:`tests.pgserver`), with real ``remsh-slave`` processes over TCP: a
job started on one master is listed and followed on the other; the
``--store``/``--name`` options' refusals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

from tests.pgserver import PgServer, pg_server  # noqa: F401 - fixture
from tests.slaveproc import HOST, SECRET, WAIT, SlaveProcesses
from tests.test_fleet import Master, _env, remsh, wait_names
from tests.util import wait_until

pytestmark = pytest.mark.timeout(180)

COUNT = 40
#: A command writing COUNT numbered lines, slowly enough to be followed while it runs.
SLOW_LINES = ["sh", "-c", f"i=1; while [ $i -le {COUNT} ]; do echo line $i; i=$((i+1)); sleep 0.05; done"]


def _lines(out: bytes, name: str) -> List[str]:
    """The lines of ``out`` prefixed with slave ``name`` (``NAME: `` or ``NAME | ``), without the prefix."""
    pattern = re.compile(rf"^{re.escape(name)}\s*[:|] ?(.*)$")
    return [m.group(1) for m in map(pattern.match, out.decode().splitlines()) if m]


class EnvMaster(Master):
    """A :class:`Master` with variables added to its environment."""

    def __init__(self, workdir: Path, sock: Path, extra: List[str], env: Dict[str, str]) -> None:
        self.sock = sock
        self.log = workdir / "master.log"
        self.state_dir = workdir / "state"
        argv = [sys.executable, "-m", "remsh", "master", "--control", str(sock), "--listen", f"{HOST}:0",
                "--state-dir", str(self.state_dir), "--insecure", *extra]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, env=_env(**env), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        self.port = 0


@pytest.fixture
def store_uri(pg_server: PgServer) -> Iterator[str]:
    name = pg_server.new_database()
    try:
        yield pg_server.uri(name)
    finally:
        pg_server.drop_database(name)


@pytest.fixture
def two_masters(tmp_path: Path, store_uri: str) -> Iterator[Tuple[Master, Master]]:
    """Masters ``a`` and ``b`` on one store, slave ``s-a`` connected to a, ``s-b`` to b."""
    slaves = SlaveProcesses(tmp_path / "slaves")
    secret = slaves.secret_file(SECRET)
    masters: List[Master] = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            masters.append(Master(tmp_path / name, tmp_path / name / "m.sock", secret_file=secret,
                                  extra=["--store", store_uri, "--name", name]).wait_ready())
        for master, slave in zip(masters, ("s-a", "s-b")):
            slaves.start(master.port, slave, max_backoff=0.5)
            wait_names(master.sock, [slave])
        yield masters[0], masters[1]
    finally:
        for master in masters:
            master.stop()
        slaves.close()


def test_a_job_started_on_one_master_is_listed_and_followed_on_the_other(two_masters) -> None:
    """run --detach on master a; remsh jobs on master b lists it, job ID --follow on b shows every line once and exits 0."""
    a, b = two_masters
    r = remsh(a.sock, "run", "--detach", "-t", "s-a", "--", *SLOW_LINES)
    assert r.returncode == 0, r.stderr.decode() + a.text()
    job_id = r.stdout.decode().strip()
    r = remsh(b.sock, "jobs", "--json")
    assert r.returncode == 0, r.stderr.decode()
    listed = {j["id"]: j for j in json.loads(r.stdout)}
    assert job_id in listed and list(listed[job_id]["slaves"]) == ["s-a"]
    r = remsh(b.sock, "job", job_id, "--follow")
    assert r.returncode == 0, r.stderr.decode() + b.text()
    assert _lines(r.stdout, "s-a") == [f"line {i}" for i in range(1, COUNT + 1)], r.stdout.decode()[:300]
    r = remsh(b.sock, "jobs", "--json")
    record = {j["id"]: j for j in json.loads(r.stdout)}[job_id]
    assert record["state"] == "done" and record["slaves"]["s-a"]["exit_status"] == 0


def test_jobs_of_both_masters_are_listed_on_each(two_masters) -> None:
    """A job run on each master: both masters' remsh jobs list both, each with its own slave's output."""
    a, b = two_masters
    ids = []
    for master, slave in ((a, "s-a"), (b, "s-b")):
        r = remsh(master.sock, "run", "-t", slave, "--", "echo", f"hello from {slave}")
        assert r.returncode == 0, r.stderr.decode()
        r = remsh(master.sock, "jobs", "--json", "-n", "1")
        ids.append(json.loads(r.stdout)[0]["id"])
    for master in (a, b):
        r = remsh(master.sock, "jobs", "--json")
        assert {j["id"] for j in json.loads(r.stdout)} == set(ids)
        for job_id, slave in zip(ids, ("s-a", "s-b")):
            r = remsh(master.sock, "job", job_id)
            assert _lines(r.stdout, slave) == [f"hello from {slave}"]


def test_a_second_master_of_one_name_is_refused(tmp_path: Path, store_uri: str) -> None:
    """A master started under the --name of a live master on the same store exits 2, naming the clash."""
    (tmp_path / "one").mkdir()
    first = Master(tmp_path / "one", tmp_path / "one.sock", extra=["--store", store_uri, "--name", "same"])
    try:
        first.wait_ready()
        (tmp_path / "two").mkdir()
        second = Master(tmp_path / "two", tmp_path / "two.sock", extra=["--store", store_uri, "--name", "same"])
        assert second.proc.wait(WAIT) == 2
        assert "a master named 'same' is running" in second.text()
    finally:
        first.stop()


def test_a_password_in_the_store_uri_is_refused_unshown(tmp_path: Path) -> None:
    """--store with a password in the URI (user:PASSWORD@ or ?password=) exits 2, points to a password file, and never echoes it."""
    for uri in ("postgresql://remsh:hunter2secret@db.example/remsh",
                "postgresql://remsh@db.example/remsh?password=hunter2secret"):
        r = remsh(tmp_path / "m.sock", "master", "--local", "1", "--store", uri)
        err = r.stderr.decode()
        assert r.returncode == 2 and "password file" in err and "PGPASSFILE" in err
        assert "hunter2secret" not in err + r.stdout.decode()


def test_a_store_that_is_not_a_postgresql_uri_is_refused(tmp_path: Path) -> None:
    """--store takes a postgresql:// URI; anything else is a usage error."""
    r = remsh(tmp_path / "m.sock", "master", "--local", "1", "--store", "/var/lib/jobs.sqlite")
    assert r.returncode == 2 and "postgresql://" in r.stderr.decode()


def test_without_psycopg_the_master_says_what_to_install(tmp_path: Path, store_uri: str) -> None:
    """A master asked for a PostgreSQL store where psycopg cannot be imported exits 2 with one line naming pip install 'remsh[postgres]'."""
    code = ("import sys; sys.modules['psycopg'] = None\nfrom remsh.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", code, "--master", str(tmp_path / "m.sock"), "master", "--local", "1",
                        "--basedir", str(tmp_path), "--store", store_uri],
                       capture_output=True, text=True, timeout=60, cwd=str(Path(__file__).resolve().parents[1]))
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "pip install 'remsh[postgres]'" in lines[0]


def test_a_store_uri_naming_a_password_file_is_taken(tmp_path: Path, store_uri: str) -> None:
    """--store with ?passfile=FILE (the way to give a password) is accepted: the master starts and records jobs."""
    passfile = tmp_path / "pgpass"
    passfile.write_text("*:*:*:*:notthepassword\n")
    passfile.chmod(0o600)
    (tmp_path / "m").mkdir()
    master = Master(tmp_path / "m", tmp_path / "m.sock", extra=["--store", f"{store_uri}&passfile={passfile}",
                                                                "--local", "1"])
    try:
        master.wait_ready()
        r = remsh(master.sock, "run", "--", "echo", "ok")
        assert r.returncode == 0, r.stderr.decode() + master.text()
        r = remsh(master.sock, "jobs", "--json")
        assert [j["state"] for j in json.loads(r.stdout)] == ["done"]
        assert "notthepassword" not in master.text()
    finally:
        master.stop()


def test_a_password_from_a_password_file_reaches_the_server_and_nowhere_else(tmp_path: Path,
                                                                           pg_server: PgServer) -> None:
    """A role that must give a password: the master started with ?passfile=FILE (or $PGPASSFILE) connects and records jobs, the password in neither its command line nor its log; without the file it exits 2 with one line."""
    password = "pw-" + os.urandom(8).hex()
    role = pg_server.new_role(password)
    db = pg_server.new_database(owner=role)
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"127.0.0.1:{pg_server.port}:{db}:{role}:{password}\n")
    passfile.chmod(0o600)
    uri = f"postgresql://{role}@127.0.0.1:{pg_server.port}/{db}"
    for label, store, env in (("file", f"{uri}?passfile={passfile}", {}),
                              ("env", uri, {"PGPASSFILE": str(passfile)})):
        (tmp_path / label).mkdir()
        master = EnvMaster(tmp_path / label, tmp_path / label / "m.sock", ["--store", store, "--local", "1"], env)
        try:
            master.wait_ready()
            with open(f"/proc/{master.proc.pid}/cmdline", "rb") as f:
                assert password.encode() not in f.read()
            r = remsh(master.sock, "run", "--", "echo", "ok")
            assert r.returncode == 0, r.stderr.decode() + master.text()
        finally:
            master.stop()
        assert password not in master.text()
    (tmp_path / "none").mkdir()
    master = EnvMaster(tmp_path / "none", tmp_path / "none" / "m.sock", ["--store", uri, "--local", "1"],
                       {"HOME": str(tmp_path)})
    assert master.proc.wait(WAIT) == 2
    lines = [x for x in master.text().splitlines() if x.strip()]
    assert len(lines) == 1 and "password" in lines[0], lines


def test_a_master_restarted_leaves_another_live_masters_running_job_alone(two_masters, tmp_path: Path,
                                                                          store_uri: str) -> None:
    """Master b restarted while a runs a job: b starts (it does not take or end a's job), and the job ends done on a with every line."""
    a, b = two_masters
    r = remsh(a.sock, "run", "--detach", "-t", "s-a", "--", *SLOW_LINES)
    assert r.returncode == 0, r.stderr.decode()
    job_id = r.stdout.decode().strip()
    b.stop()
    (tmp_path / "b2").mkdir()
    again = Master(tmp_path / "b2", tmp_path / "b2" / "m.sock", extra=["--store", store_uri, "--name", "b"])
    try:
        again.wait_ready()
        r = remsh(again.sock, "job", job_id, "--follow")
        assert r.returncode == 0, r.stderr.decode() + again.text()
        assert _lines(r.stdout, "s-a") == [f"line {i}" for i in range(1, COUNT + 1)]
        r = remsh(a.sock, "jobs", "--json")
        assert {j["id"]: j for j in json.loads(r.stdout)}[job_id]["state"] == "done"
    finally:
        again.stop()


def test_a_job_is_cancelled_from_the_other_master(two_masters) -> None:
    """remsh cancel ID on master b for a job master a runs: the command is stopped and the job ends cancelled, seen on both."""
    a, b = two_masters
    r = remsh(a.sock, "run", "--detach", "-t", "s-a", "--", "sh", "-c", "echo started; sleep 120")
    assert r.returncode == 0, r.stderr.decode()
    job_id = r.stdout.decode().strip()

    def state(master: Master) -> dict:
        r = remsh(master.sock, "jobs", "--json")
        return {j["id"]: j for j in json.loads(r.stdout)}[job_id]

    wait_until(lambda: state(b)["slaves"]["s-a"]["stdout_bytes"] > 0, WAIT, "the command to start")
    r = remsh(b.sock, "cancel", job_id)
    assert r.returncode == 0, r.stderr.decode() + b.text()
    wait_until(lambda: state(a)["state"] == "cancelled", WAIT, "the job to end cancelled")
    assert state(b)["slaves"]["s-a"]["state"] == "cancelled"
    r = remsh(b.sock, "cancel", job_id)
    assert r.returncode != 0 and "already ended" in r.stderr.decode()


def test_a_name_that_cannot_name_a_master_is_refused(tmp_path: Path) -> None:
    """--name empty, with spaces or control characters, or too long is a usage error naming the rule."""
    for bad in ("", "two words", "esc\x1b[2J", "x" * 201):
        r = remsh(tmp_path / "m.sock", "master", "--local", "1", "--store", "postgresql://remsh@db/remsh",
                  "--name", bad)
        assert r.returncode == 2 and "printable characters without spaces" in r.stderr.decode(), bad


def test_a_master_notices_another_one_dead(two_masters) -> None:
    """Master a SIGKILLed: master b's log says a is dead once a's heartbeat is past the lease (15 s)."""
    a, b = two_masters
    a.stop(signal.SIGKILL)
    wait_until(lambda: "master a is dead" in b.text(), 30, "master b to notice a's death")
    assert "master b is dead" not in a.text()
