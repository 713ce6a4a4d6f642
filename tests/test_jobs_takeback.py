"""What a master does with a job it takes back (:meth:`remsh.jobs.JobRegistry.start`,
and the jobs it adopts from a dead master on a shared store): a job with
nothing left to wait for ends in the state its slaves' states give, as at
a normal end; an adopted command's record says which master adopted it
from which.  Real stores (SQLite; PostgreSQL from tests/pgserver.py), no
slave processes."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import pytest

from remsh.jobs import JobRegistry
from remsh.store.base import SessionRecord
from remsh.store.postgres import PostgresJobStore
from remsh.store.sqlite import SqliteJobStore
from tests.pgserver import pg_server, pg_uri  # noqa: F401 - fixtures
from tests.util import WAIT, wait_until


@pytest.mark.parametrize("slaves, expected", [
    ({"a": "ok", "b": "ok"}, "done"),
    ({"a": "ok", "b": "failed"}, "failed"),
    ({"a": "ok", "b": "cancelled"}, "cancelled"),
])
def test_a_job_taken_back_with_every_slave_ended_gets_the_state_its_slaves_give(
        tmp_path: Path, slaves: Dict[str, str], expected: str) -> None:
    """A job left running whose slaves all ended (the master died before the job's end was recorded) ends done when all are ok."""
    store = SqliteJobStore(str(tmp_path / "jobs.sqlite"))
    job = store.create_job("run", {"argv": ["x"]}, 0, list(slaves))
    for name, state in slaves.items():
        store.update_slave(job.id, name, state=state, exit_status=0 if state == "ok" else 1, finished=2.0)
    registry = JobRegistry(store)
    registry.start()
    try:
        record = store.get_job(job.id)
        assert record.state == expected
        assert {n: s.state for n, s in record.slaves.items()} == slaves  # the slaves' records untouched
    finally:
        registry.stop()
        registry.close()


def test_a_job_adopted_from_a_dead_master_says_who_adopted_it_from_whom(pg_uri: str) -> None:
    """An adopted command waiting for its slave reads 'adopted by master m2 from master m1', not 'the master restarted'."""
    old = PostgresJobStore(pg_uri, "m1", poll_interval=0.5)
    job = old.create_job("run", {"argv": ["x"]}, 0, ["s"])
    old.update_slave(job.id, "s", state="running", started=1.0)
    old.open_session(SessionRecord("e" * 32, "s", job.id, "execute", 4, 2, 2))
    old.close()  # stopped, its running job left: the next heartbeat of m2 adopts it
    store = PostgresJobStore(pg_uri, "m2", poll_interval=0.5, heartbeat=0.2, lease=1.0)
    registry = JobRegistry(store)
    try:
        registry.start()
        wait_until(lambda: store.get_job(job.id).slaves["s"].state == "away", WAIT, "the job adopted")
        summary = store.get_job(job.id).slaves["s"].summary or ""
        assert summary.startswith("adopted by master m2 from master m1; waiting for the slave"), summary
    finally:
        registry.stop()
        registry.close()
        store.close()
