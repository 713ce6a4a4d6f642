"""A running master adopts a dead master's running work through the shared
PostgreSQL store: its heartbeat sees the other silent past the lease and
adopts (a compare-and-set on the dead master's epoch: of several racing,
one wins), and slaves that fail over to it (``remsh-slave --failover``)
resume their commands there -- on a master that does not hold their
session, they are refused while its holder lives and adopted on demand
once it is dead.  A master paused past its lease and adopted is fenced off
when it resumes.  Real master, slave and PostgreSQL processes; the lease
and heartbeat shortened through the environment."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import psycopg
import pytest

from remsh.store.base import SessionRecord
from remsh.store.postgres import PostgresJobStore
from tests.pgserver import PgServer, pg_server  # noqa: F401 - fixture
from tests.slaveproc import HOST, WAIT, SlaveProcesses
from tests.test_fleet import Master, _free_port, remsh
from tests.test_restart import NAMES, SCRIPT, STATUSES, _check_complete, _record
from tests.test_store_postgres_restart import _stored
from tests.util import wait_until

pytestmark = pytest.mark.timeout(240)

#: the lease and heartbeat of every master here (seconds)
LEASE = 3.0
HEARTBEAT = 0.5
#: 30 numbered lines, then (once GO exists) 30 more, GO.NAME made, then the status (from the directory's name)
SCRIPT60 = ('for i in $(seq 1 30); do echo "line $i"; echo "err $i" >&2; sleep 0.02; done; '
            'while [ ! -e "$GO" ]; do sleep 0.05; done; '
            'for i in $(seq 31 60); do echo "line $i"; echo "err $i" >&2; sleep 0.05; done; '
            'touch "$GO.${PWD##*/}"; '
            'case "$PWD" in *r-1) exit 0;; *r-2) exit 3;; *) exit 5;; esac')


@pytest.fixture
def store_uri(pg_server: PgServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("REMSH_STORE_LEASE", str(LEASE))
    monkeypatch.setenv("REMSH_STORE_HEARTBEAT", str(HEARTBEAT))
    name = pg_server.new_database()
    try:
        yield pg_server.uri(name)
    finally:
        pg_server.drop_database(name)


def _master(tmp_path: Path, label: str, port: int, uri: str, *extra: str) -> Master:
    workdir = tmp_path / f"{label}-{time.monotonic_ns()}"
    workdir.mkdir()
    return Master(workdir, workdir / "m.sock", port, extra=["--store", uri, "--name", label, *extra]).wait_ready()


def _held_by(master: Master, names: Sequence[str], holder: str) -> bool:
    """Whether ``ls`` on ``master`` shows every slave of ``names`` connected to master ``holder``."""
    r = remsh(master.sock, "ls", "--json")
    if r.returncode != 0:
        return False
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    return all(n in rows and rows[n].get("master") == holder and rows[n].get("state") != "away" for n in names)


def _owner(uri: str, job_id: str) -> str:
    with psycopg.connect(uri) as conn:
        row = conn.execute(b"SELECT owner FROM remsh_jobs WHERE id = %s", (job_id,)).fetchone()
    assert row is not None
    return str(row[0])


def _start_job(master: Master, script: str, go: Path) -> str:
    r = remsh(master.sock, "run", "--detach", "--", "env", f"GO={go}", "sh", "-c", script)
    assert r.returncode == 0, r.stderr.decode()
    job_id = r.stdout.decode().strip()
    wait_until(lambda: all(s["stdout_bytes"] > 20 for s in _record(master, job_id)["slaves"].values()), WAIT,
               "output from every slave")
    return job_id


def _check_sixty(stored: Dict[str, Dict[str, bytes]], name: str) -> None:
    assert stored[name]["stdout"].decode().splitlines() == [f"line {i}" for i in range(1, 61)], name
    assert stored[name]["stderr"].decode().splitlines() == [f"err {i}" for i in range(1, 61)], name


def _stop_all(masters: List[Optional[Master]]) -> None:
    for m in masters:
        if m is not None and m.proc.poll() is None:
            m.proc.send_signal(signal.SIGCONT)
            m.stop()


def test_a_running_master_adopts_a_killed_masters_job(tmp_path: Path, store_uri: str) -> None:
    """Three masters; the owner SIGKILLed mid-job: one of the other two adopts it (exactly one), the slaves fail over to it, 60 lines each stored once, statuses right."""
    ports = [_free_port() for _ in range(3)]
    slaves = SlaveProcesses(tmp_path / "slaves")
    masters: List[Optional[Master]] = []
    try:
        masters = [_master(tmp_path, f"m{i + 1}", port, store_uri) for i, port in enumerate(ports)]
        m1, m2, m3 = masters
        assert m1 is not None and m2 is not None and m3 is not None
        for name in NAMES:
            slaves.start(ports[0], name, secret=None, insecure=True, max_backoff=0.3,
                         extra_args=["--failover", f"{HOST}:{ports[1]}", "--failover", f"{HOST}:{ports[2]}"])
        wait_until(lambda: _held_by(m1, NAMES, "m1"), WAIT, "the slaves on m1")
        go = tmp_path / "GO"
        job_id = _start_job(m1, SCRIPT60, go)
        m1.stop(signal.SIGKILL)
        go.touch()  # the rest is printed while no master holds the slaves
        wait_until(lambda: _record(m2, job_id)["state"] != "running", WAIT * 3, "the adopted job to end")
        rec = _record(m3, job_id)
        assert rec["state"] == "failed", rec
        for name, status in STATUSES.items():
            assert rec["slaves"][name]["exit_status"] == status, rec["slaves"][name]
        stored = _stored(store_uri, job_id)
        for name in NAMES:
            _check_sixty(stored, name)
        winner = _owner(store_uri, job_id)
        assert winner in ("m2", "m3")
        adopted = ["running job(s) adopted by" in m.text() for m in (m2, m3)]
        assert adopted == [winner == "m2", winner == "m3"], (m2.text()[-3000:], m3.text()[-3000:])
    finally:
        _stop_all(masters)
        slaves.close()


def test_masters_racing_to_adopt_a_dead_one_exactly_one_wins(store_uri: str) -> None:
    """Two running stores watch a dead master with a running job and a session: exactly one heartbeat adopts it (its callback alone hears of the job), the loser's compare-and-set fails."""
    dead = PostgresJobStore(store_uri, "dead", heartbeat=HEARTBEAT, lease=LEASE)
    record = dead.create_job("run", {"argv": ["true"]}, 0, ["s1"])
    dead.open_session(SessionRecord("sid-1", "s1", record.id, "execute", 1, 1, 1))
    old_epoch = dead.epoch
    dead.close()  # stopped: adoptable once its heartbeat is past the lease
    heard: Dict[str, List[str]] = {}
    lock = threading.Lock()
    stores = [PostgresJobStore(store_uri, name, heartbeat=0.05, lease=LEASE) for name in ("a", "b")]
    try:
        for store in stores:
            def adopted(ids: List[str], who: str = store.name) -> None:
                with lock:
                    heard.setdefault(who, []).extend(ids)

            store.watch_adoptions(adopted, lambda error: None)
        wait_until(lambda: bool(heard), LEASE + WAIT, "an adoption")
        adopted_at = time.monotonic()
        winner = next(iter(heard))
        loser = next(s for s in stores if s.name != winner)

        def loser_beat_twice_since() -> bool:  # each beat is followed by its look for masters to adopt
            row = next(m for m in winner_store.masters() if m.name == loser.name)
            return time.monotonic() - adopted_at - row.silent_for > 2 * 0.05

        winner_store = next(s for s in stores if s.name == winner)
        wait_until(loser_beat_twice_since, WAIT, "the other master's heartbeats after the adoption")
        assert list(heard.values()) == [[record.id]], heard
        assert loser.adopt_master("dead", old_epoch) is None
        assert loser.find_session("sid-1") is not None
        holder = loser.find_session("sid-1")
        assert holder is not None and holder.owner == winner and holder.job_id == record.id
        assert loser.find_session("sid-2") is None
    finally:
        for store in stores:
            store.close()


@pytest.mark.parametrize("slave_heartbeat", ["1", "15"], ids=["slaves-leave", "slaves-stay"])
def test_a_paused_master_adopted_by_a_running_one_is_fenced_off_when_it_resumes(tmp_path: Path, store_uri: str,
                                                                               slave_heartbeat: str) -> None:
    """m1 SIGSTOPped mid-job past its lease, its slaves gone over to m2 or still connected to it: m2 adopts the job; SIGCONTed, m1 finds itself fenced off, says so, drops its slaves (an idle one too) unacknowledged and refuses them, its writes refused; the job ends on m2 with every line once."""
    ports = [_free_port(), _free_port()]
    slaves = SlaveProcesses(tmp_path / "slaves")
    masters: List[Optional[Master]] = []
    try:
        masters = [_master(tmp_path, f"m{i + 1}", port, store_uri) for i, port in enumerate(ports)]
        m1, m2 = masters
        assert m1 is not None and m2 is not None
        options = ["--failover", f"{HOST}:{ports[1]}", "--heartbeat", slave_heartbeat]
        for name in NAMES:
            slaves.start(ports[0], name, secret=None, insecure=True, max_backoff=0.3, extra_args=options)
        wait_until(lambda: _held_by(m1, NAMES, "m1"), WAIT, "the slaves on m1")
        go = tmp_path / "GO"
        job_id = _start_job(m1, SCRIPT60, go)
        slaves.start(ports[0], "idle-1", secret=None, insecure=True, max_backoff=0.3, extra_args=options)
        wait_until(lambda: _held_by(m1, ["idle-1"], "m1"), WAIT, "a slave outside the job on m1")
        m1.proc.send_signal(signal.SIGSTOP)
        paused = time.monotonic()
        wait_until(lambda: _owner(store_uri, job_id) == "m2", WAIT * 2, "m2 to adopt the paused master's job")
        assert time.monotonic() - paused >= LEASE - HEARTBEAT * 2  # not before the lease
        go.touch()  # the rest goes to m2, or (slaves that stayed) to the paused m1, unacknowledged
        if slave_heartbeat == "15":
            wait_until(lambda: all((tmp_path / f"GO.{n}").exists() for n in NAMES), WAIT,
                       "the commands to print all into the paused master's connections")
            m1.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: _record(m2, job_id)["state"] != "running", WAIT * 3, "the adopted job to end")
        rec = _record(m2, job_id)
        for name, status in STATUSES.items():
            assert rec["slaves"][name]["exit_status"] == status, rec["slaves"][name]
        stored = _stored(store_uri, job_id)
        for name in NAMES:
            _check_sixty(stored, name)
        m1.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: "is stale" in m1.text() and "fenced off" in m1.text(), WAIT,
                   "the resumed master to find itself fenced off")
        r = remsh(m1.sock, "run", "--", "echo", "from the old master")
        assert r.returncode != 0
        assert _held_by(m2, NAMES, "m2"), "the slaves left the master that adopted their work"
        wait_until(lambda: _held_by(m2, ["idle-1"], "m2"), WAIT, "the idle slave to leave the fenced master")
        assert _record(m2, job_id) == rec and _stored(store_uri, job_id) == stored
    finally:
        _stop_all(masters)
        slaves.close()


def test_failover_and_back_three_times_loses_nothing(tmp_path: Path, store_uri: str) -> None:
    """m1 -> m2 -> m1 -> m2: the master holding the job SIGKILLed three times, restarted after each hop; the other running master adopts it each time, and the job ends with every line once."""
    ports = [_free_port(), _free_port()]
    slaves = SlaveProcesses(tmp_path / "slaves")
    labels = ("m1", "m2")
    masters: List[Optional[Master]] = [None, None]
    try:
        masters = [_master(tmp_path, label, port, store_uri) for label, port in zip(labels, ports)]
        for name in NAMES:
            slaves.start(ports[0], name, secret=None, insecure=True, max_backoff=0.3,
                         extra_args=["--failover", f"{HOST}:{ports[1]}"])
        first = masters[0]
        assert first is not None
        wait_until(lambda: _held_by(first, NAMES, "m1"), WAIT, "the slaves on m1")
        go = tmp_path / "GO"
        job_id = _start_job(first, SCRIPT, go)
        holder = 0
        for hop in range(3):
            dying = masters[holder]
            assert dying is not None
            dying.stop(signal.SIGKILL)
            other = 1 - holder
            survivor = masters[other]
            assert survivor is not None
            wait_until(lambda: _owner(store_uri, job_id) == labels[other], WAIT * 2, f"hop {hop + 1}: adoption")
            wait_until(lambda: _held_by(survivor, NAMES, labels[other]), WAIT * 2,
                       f"hop {hop + 1}: the slaves on {labels[other]}")
            masters[holder] = _master(tmp_path, labels[holder], ports[holder], store_uri)
            holder = other
        go.touch()
        last = masters[holder]
        assert last is not None
        wait_until(lambda: _record(last, job_id)["state"] != "running", WAIT * 3, "the job to end")
        rec = _record(last, job_id)
        for name, status in STATUSES.items():
            assert rec["slaves"][name]["exit_status"] == status, rec["slaves"][name]
        stored = _stored(store_uri, job_id)
        for name in NAMES:
            _check_complete(stored[name], name)
    finally:
        _stop_all(masters)
        slaves.close()


def test_a_slave_that_never_comes_back_to_the_adopter_ends_lost(tmp_path: Path, store_uri: str) -> None:
    """The owner SIGKILLed with one of its two slaves: the running master adopts the job, the surviving slave's command completes there, the other ends lost after the --resume-timeout counted from the adoption."""
    ports = [_free_port(), _free_port()]
    slaves = SlaveProcesses(tmp_path / "slaves")
    masters: List[Optional[Master]] = []
    names = ("r-1", "r-2")
    try:
        masters = [_master(tmp_path, f"m{i + 1}", port, store_uri, "--resume-timeout", "4")
                   for i, port in enumerate(ports)]
        m1, m2 = masters
        assert m1 is not None and m2 is not None
        procs = {name: slaves.start(ports[0], name, secret=None, insecure=True, max_backoff=0.3,
                                    extra_args=["--failover", f"{HOST}:{ports[1]}"]) for name in names}
        wait_until(lambda: _held_by(m1, names, "m1"), WAIT, "the slaves on m1")
        go = tmp_path / "GO"
        job_id = _start_job(m1, SCRIPT60, go)
        procs["r-2"].signal(signal.SIGKILL)
        procs["r-2"].wait()
        m1.stop(signal.SIGKILL)
        wait_until(lambda: _owner(store_uri, job_id) == "m2", WAIT * 2, "m2 to adopt the job")
        adopted = time.monotonic()
        go.touch()
        wait_until(lambda: _record(m2, job_id)["state"] != "running", WAIT * 3, "the job to end")
        assert time.monotonic() - adopted >= 2  # r-2 was waited for, not given up at once
        rec = _record(m2, job_id)
        assert rec["state"] == "failed", rec
        assert rec["slaves"]["r-1"]["state"] == "ok" and rec["slaves"]["r-1"]["exit_status"] == 0, rec
        assert rec["slaves"]["r-2"]["state"] == "lost", rec
        assert "did not come back within 4 s" in rec["slaves"]["r-2"]["error"], rec
        _check_sixty(_stored(store_uri, job_id), "r-1")
    finally:
        _stop_all(masters)
        slaves.close()
