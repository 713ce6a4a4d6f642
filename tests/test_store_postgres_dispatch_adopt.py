"""A slave's part of one master's job run by another master (work crossing
masters, :mod:`remsh.crossmaster`) when that holder dies: three real
``remsh master`` processes and a real ``remsh-slave --failover`` on a real
PostgreSQL server (:mod:`tests.pgserver`), and the store's side
(:mod:`remsh.store.pgdispatch`, :mod:`remsh.store.pgwrites`,
:mod:`remsh.store.pgadopt`) on real stores."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import psycopg
import pytest

from remsh.store import pgdispatch
from remsh.store.base import SessionRecord
from remsh.store.fencing import FencedOff, NotOwner
from remsh.store.postgres import PostgresJobStore
from tests.pgserver import PgServer, pg_server, pg_uri  # noqa: F401 - fixtures
from tests.slaveproc import HOST, WAIT, SlaveProcesses
from tests.test_fleet import Master, _free_port, remsh
from tests.test_store_postgres_adopt import LEASE, _held_by, _master, _stop_all, store_uri  # noqa: F401 - fixture
from tests.test_store_postgres_masters import _lines
from tests.util import wait_until

pytestmark = pytest.mark.timeout(240)

#: The lease of the store that adopts a dead one here (seconds).
SHORT_LEASE = 0.5


COUNT = 60
#: COUNT numbered lines, slowly (a holder killed mid-part), then exit status 7.
SLOW_LINES_THEN_7 = f"i=1; while [ $i -le {COUNT} ]; do echo line $i; i=$((i+1)); sleep 0.1; done; exit 7"


def _record(master: Master, job_id: str) -> Dict[str, Any]:
    r = remsh(master.sock, "jobs", "--json")
    assert r.returncode == 0, r.stderr.decode()
    return {j["id"]: j for j in json.loads(r.stdout)}[job_id]


def test_a_part_on_a_killed_holders_slave_is_carried_on_by_the_adopter(tmp_path: Path,
                                                                     store_uri: str) -> None:  # noqa: F811
    """run on a reaching s-b held by b; b SIGKILLed mid-part: the master adopting b carries the part on, its 60 lines stored once, exit status 7, a's job shows it."""
    ports = [_free_port() for _ in range(3)]
    slaves = SlaveProcesses(tmp_path / "slaves")
    masters: List[Optional[Master]] = []
    try:
        masters = [_master(tmp_path, name, port, store_uri) for name, port in zip("abc", ports)]
        a, b, _ = masters
        assert a is not None and b is not None
        slaves.start(ports[1], "s-b", secret=None, insecure=True, max_backoff=0.3,
                     extra_args=["--failover", f"{HOST}:{ports[2]}", "--failover", f"{HOST}:{ports[0]}"])
        wait_until(lambda: _held_by(a, ["s-b"], "b"), 3 * WAIT, "s-b on b, listed on a")
        r = remsh(a.sock, "run", "--detach", "-t", "s-b", "--", "sh", "-c", SLOW_LINES_THEN_7)
        assert r.returncode == 0, r.stderr.decode()
        job_id = r.stdout.decode().strip()
        wait_until(lambda: _record(a, job_id)["slaves"]["s-b"]["stdout_bytes"] > 0, WAIT, "the command to start")
        b.stop(signal.SIGKILL)
        wait_until(lambda: _record(a, job_id)["state"] != "running", LEASE + COUNT * 0.1 + 3 * WAIT,
                   "the job to end")
        record = _record(a, job_id)
        part = record["slaves"]["s-b"]
        assert (record["state"], part["state"], part["exit_status"]) == ("failed", "failed", 7), record
        shown = remsh(a.sock, "job", job_id)
        assert _lines(shown.stdout, "s-b") == [f"line {i}" for i in range(1, COUNT + 1)], shown.stdout.decode()
    finally:
        _stop_all(masters)
        slaves.close()


#: 30 numbered lines, then (once $GO exists) 30 more, $GO.done made, then exit status 7.
HALVES_THEN_7 = ('for i in $(seq 1 30); do echo "line $i"; done; while [ ! -e "$GO" ]; do sleep 0.05; done; '
                 'for i in $(seq 31 60); do echo "line $i"; sleep 0.02; done; touch "$GO.done"; exit 7')


def _claimer(uri: str, job_id: str) -> str:
    with psycopg.connect(uri) as conn:
        row = conn.execute(b"SELECT claimed_by FROM remsh_dispatch WHERE job_id = %s", (job_id,)).fetchone()
    assert row is not None
    return str(row[0])


def test_a_paused_holder_acknowledges_nothing_it_could_not_store(tmp_path: Path, store_uri: str) -> None:  # noqa: F811
    """b SIGSTOPped mid-part past its lease, its part adopted, the rest printed into its connection, SIGCONTed: fenced off, it acknowledges none of it; the adopter carries the part on, 60 lines once, exit status 7."""
    ports = [_free_port() for _ in range(3)]
    slaves = SlaveProcesses(tmp_path / "slaves")
    masters: List[Optional[Master]] = []
    try:
        masters = [_master(tmp_path, name, port, store_uri) for name, port in zip("abc", ports)]
        a, b, _ = masters
        assert a is not None and b is not None
        slaves.start(ports[1], "s-b", secret=None, insecure=True, max_backoff=0.3,
                     extra_args=["--failover", f"{HOST}:{ports[2]}", "--failover", f"{HOST}:{ports[0]}",
                                 "--heartbeat", "15"])
        wait_until(lambda: _held_by(a, ["s-b"], "b"), 3 * WAIT, "s-b on b, listed on a")
        go = tmp_path / "GO"
        r = remsh(a.sock, "run", "--detach", "-t", "s-b", "--", "env", f"GO={go}", "sh", "-c", HALVES_THEN_7)
        assert r.returncode == 0, r.stderr.decode()
        job_id = r.stdout.decode().strip()
        half = sum(len(f"line {i}\n") for i in range(1, 31))
        wait_until(lambda: _record(a, job_id)["slaves"]["s-b"]["stdout_bytes"] == half, WAIT, "the first 30 lines")
        b.proc.send_signal(signal.SIGSTOP)
        wait_until(lambda: _claimer(store_uri, job_id) != "b", LEASE + 2 * WAIT, "b's claim to be adopted")
        go.touch()
        wait_until(lambda: (tmp_path / "GO.done").exists(), WAIT, "the rest printed into the paused b's connection")
        b.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: _record(a, job_id)["state"] != "running", LEASE + 3 * WAIT, "the job to end")
        record = _record(a, job_id)
        part = record["slaves"]["s-b"]
        assert (part["state"], part["exit_status"]) == ("failed", 7), record
        shown = remsh(a.sock, "job", job_id)
        assert _lines(shown.stdout, "s-b") == [f"line {i}" for i in range(1, COUNT + 1)], shown.stdout.decode()
        wait_until(lambda: "fenced off" in b.text(), WAIT, "b to find itself fenced off")
    finally:
        _stop_all(masters)
        slaves.close()


def _received(uri: str, session_id: str) -> int:
    with psycopg.connect(uri) as conn:
        row = conn.execute(b"SELECT received FROM remsh_sessions WHERE id = %s", (session_id,)).fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def claimed_part(pg_uri: str) -> Iterator[List[object]]:  # noqa: F811
    """Origin ``x`` with a job on slaves s and t, both parts claimed by ``y`` (which never beats again)."""
    x = PostgresJobStore(pg_uri, "x")
    y = PostgresJobStore(pg_uri, "y", heartbeat=600.0)
    try:
        job = x.create_job("run", {"argv": ["true"]}, 0, ["s", "t"])
        x.dispatch_write(pgdispatch.ask, job.id, [("s", "y"), ("t", "y")], "run", {"argv": ["true"]})
        ids = [d.id for d in y.dispatch_read(pgdispatch.for_holder, "y", ["s", "t"])]
        assert y.dispatch_write(pgdispatch.claim, ids, repeatable=False) == sorted(ids)
        yield [x, y, job.id]
    finally:
        x.close()
        y.close()


def test_a_claimer_records_the_session_of_its_part_and_of_no_other(claimed_part: List[object],
                                                                   pg_uri: str) -> None:  # noqa: F811
    """y may record a session for the part it claimed in x's job; not for a part it did not claim, nor over x's session id."""
    x, y, job_id = claimed_part
    assert isinstance(x, PostgresJobStore) and isinstance(y, PostgresJobStore) and isinstance(job_id, str)
    z = PostgresJobStore(pg_uri, "z")
    try:
        job = x.create_job("run", {"argv": ["true"]}, 0, ["u"])
        x.open_session(SessionRecord("sid-x", "u", job.id, "execute", 1, 1, 1))
        y.open_session(SessionRecord("sid-y", "s", job_id, "execute", 1, 1, 1))
        holder = x.find_session("sid-y")
        assert holder is not None and (holder.owner, holder.job_id, holder.name) == ("y", job_id, "s")
        with pytest.raises(NotOwner):  # a part claimed by nobody (z did not claim s)
            z.open_session(SessionRecord("sid-z", "s", job_id, "execute", 1, 1, 1))
        with pytest.raises(NotOwner, match="held by another master"):  # x's id, named under y's claim
            y.open_session(SessionRecord("sid-x", "s", job_id, "execute", 1, 1, 1))
        holder = x.find_session("sid-x")
        assert holder is not None and (holder.owner, holder.job_id) == ("x", job.id)
    finally:
        z.close()


def test_a_claimers_append_counts_only_its_own_session(claimed_part: List[object], pg_uri: str) -> None:  # noqa: F811
    """y's append under its claim moves the count of its own session, never of x's session of the same job."""
    x, y, job_id = claimed_part
    assert isinstance(x, PostgresJobStore) and isinstance(y, PostgresJobStore) and isinstance(job_id, str)
    x.open_session(SessionRecord("sid-x", "t", job_id, "execute", 1, 1, 1))
    y.open_session(SessionRecord("sid-y", "s", job_id, "execute", 1, 1, 1))
    assert y.append_output(job_id, "s", "stdout", 0, b"one\n", session=("sid-x", 99)) == 4
    assert _received(pg_uri, "sid-x") == 1
    assert y.append_output(job_id, "s", "stdout", 4, b"two\n", session=("sid-y", 7)) == 8
    assert _received(pg_uri, "sid-y") == 7


def test_a_dead_claimers_part_with_a_session_moves_to_its_adopter(claimed_part: List[object],
                                                                  pg_uri: str) -> None:  # noqa: F811
    """y dies holding s's part with a recorded session and t's without: x may settle t lost but not s; the adopter z takes s's claim, y's writes are refused, z's taken."""
    x, y, job_id = claimed_part
    assert isinstance(x, PostgresJobStore) and isinstance(y, PostgresJobStore) and isinstance(job_id, str)
    y.open_session(SessionRecord("sid-y", "s", job_id, "execute", 1, 1, 1))
    y.append_output(job_id, "s", "stdout", 0, b"one\n", session=("sid-y", 2))
    parts = {d.slave: d for d in x.dispatch_read(pgdispatch.of_job, job_id)}
    y_epoch = y.epoch
    assert not x.dispatch_write(pgdispatch.settle, parts["s"].id, "running", "lost", "y", y_epoch)
    assert x.dispatch_write(pgdispatch.settle, parts["t"].id, "running", "lost", "y", y_epoch)
    z = PostgresJobStore(pg_uri, "z", lease=SHORT_LEASE)
    try:
        wait_until(lambda: z.adopt_master("y", y_epoch) is not None, WAIT, "z to adopt y past the lease")
        parts = {d.slave: d for d in x.dispatch_read(pgdispatch.of_job, job_id)}
        assert (parts["s"].state, parts["s"].claimed_by, parts["s"].claim_epoch) == ("running", "z", z.epoch)
        assert (parts["t"].state, parts["t"].claimed_by) == ("lost", "y")
        holder = x.find_session("sid-y")
        assert holder is not None and holder.owner == "z"
        with pytest.raises(FencedOff):
            y.append_output(job_id, "s", "stdout", 4, b"late\n")
        with pytest.raises(FencedOff):
            y.dispatch_write(pgdispatch.finish, parts["s"].id, {"status": 0})
        assert z.append_output(job_id, "s", "stdout", 4, b"two\n", session=("sid-y", 3)) == 8
        assert _received(pg_uri, "sid-y") == 3
        z.update_slave(job_id, "s", state="ok", exit_status=0)
        assert z.dispatch_write(pgdispatch.finish, parts["s"].id, {"status": 0})
        assert [c.data for _, c in x.read_output(job_id)] == [b"one\n", b"two\n"]
        assert x.get_job(job_id).slaves["s"].state == "ok"
    finally:
        z.close()


def test_a_claimer_restarted_under_its_name_drops_its_parts_sessions(claimed_part: List[object],
                                                                     pg_uri: str) -> None:  # noqa: F811
    """y restarted under its own name (its claims void with its old epoch): its session of x's part is gone, so x settles the part lost; its own job's session stays."""
    x, y, job_id = claimed_part
    assert isinstance(x, PostgresJobStore) and isinstance(y, PostgresJobStore) and isinstance(job_id, str)
    own = y.create_job("run", {"argv": ["true"]}, 0, ["u"])
    y.open_session(SessionRecord("sid-y", "s", job_id, "execute", 1, 1, 1))
    y.open_session(SessionRecord("sid-own", "u", own.id, "execute", 1, 1, 1))
    old_epoch = y.epoch
    y.close()
    again = PostgresJobStore(pg_uri, "y")
    try:
        assert again.find_session("sid-y") is None
        assert [s.id for s in again.open_sessions()] == ["sid-own"]
        parts = {d.slave: d for d in x.dispatch_read(pgdispatch.of_job, job_id)}
        assert x.dispatch_write(pgdispatch.settle, parts["s"].id, "running", "lost", "y", old_epoch)
    finally:
        again.close()
