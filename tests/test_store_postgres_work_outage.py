"""Work crossing masters (:mod:`remsh.crossmaster`) through a PostgreSQL
outage: a job given to master ``a`` running on a slave master ``b`` holds
goes on while the database is stopped for a few seconds, and ends with its
real state and every line once -- the asking master rides the outage out
(:func:`remsh.store.base.through_outage`) instead of giving its parts up."""

from __future__ import annotations

import threading
import time
from typing import Dict, List

import pytest

from remsh.jobfollow import follow
from remsh.store.base import JOB_DONE
from remsh.store.postgres import PostgresJobStore
from tests.pgserver import PgServer, pg_server, pg_uri  # noqa: F401 - fixtures
from tests.slaveproc import WAIT
from tests.test_fleet import remsh
from tests.test_store_postgres_masters import _lines, store_uri  # noqa: F401 - fixture
from tests.test_store_postgres_work import _last_job, _record, cluster  # noqa: F401 - fixture
from tests.util import run_in_thread, wait_until

pytestmark = pytest.mark.timeout(240)

COUNT = 60
#: How long the database stays stopped (within the store's 30 s outage wait).
OUTAGE = 4.0


def test_a_job_across_masters_rides_out_a_database_outage(cluster, pg_server: PgServer) -> None:  # noqa: F811
    """PostgreSQL stopped for 4 s while a's job runs on b's slave: the job ends done with its 60 lines once, not failed or running for good."""
    a, b, _ = cluster
    script = f"i=1; while [ $i -le {COUNT} ]; do echo line $i; i=$((i+1)); sleep 0.1; done"
    result: Dict[str, object] = {}

    def run() -> None:
        result["r"] = remsh(a.sock, "run", "-t", "s-b", "--", "sh", "-c", script, timeout=180)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()

    def started() -> bool:
        try:
            jobs: List[str] = [_last_job(a)]
            return _record(a, jobs[0])["slaves"]["s-b"]["stdout_bytes"] > 20
        except (AssertionError, IndexError, KeyError, ValueError):
            return False

    wait_until(started, WAIT, "b's slave printing for a's job")
    pg_server.stop()
    try:
        time.sleep(OUTAGE)  # the fault itself: the database stays away this long
    finally:
        pg_server.start()
    runner.join(180)
    assert not runner.is_alive(), "remsh run did not end"
    r = result["r"]
    assert r.returncode == 0, r.stderr.decode() + a.text()[-3000:] + b.text()[-3000:]  # type: ignore[attr-defined]
    job_id = _last_job(a)

    def ended() -> bool:
        try:
            return _record(a, job_id)["state"] != "running"
        except AssertionError:
            return False

    wait_until(ended, WAIT, "the job's end recorded")
    record = _record(a, job_id)
    assert record["state"] == "done" and record["slaves"]["s-b"]["state"] == "ok", record
    shown = remsh(b.sock, "job", job_id)
    assert _lines(shown.stdout, "s-b") == [f"line {i}" for i in range(1, COUNT + 1)]


def test_a_follower_rides_out_a_database_outage(pg_server: PgServer, pg_uri: str) -> None:  # noqa: F811
    """follow() reading a running job while PostgreSQL is stopped: it goes on telling its follower it is alive, and once the database is back it ends with the job's end -- not with the outage's error (remsh run failed with 'cannot reach the job store')."""
    store = PostgresJobStore(pg_uri, "follower", poll_interval=0.2)
    try:
        job = store.create_job("run", {"argv": ["x"]}, 0, ["s1"])
        events: List[Dict[bytes, bytes]] = []
        following = run_in_thread(lambda: follow(store, job.id, events.extend, live=True, alive_every=0.2))
        wait_until(lambda: any(e[b"ev"] == b"begin" for e in events), WAIT, "the follower to begin")
        pg_server.stop()
        try:
            seen = len(events)
            wait_until(lambda: sum(e[b"ev"] == b"alive" for e in events[seen:]) >= 5 or following.done.is_set(),
                       WAIT, "the follower to go on while the database is away")
            assert not following.done.is_set(), f"the follower gave up: {following.error!r}"
        finally:
            pg_server.start()
        store.finish_job(job.id, JOB_DONE)
        assert following.done.wait(WAIT), "the follower did not end with the job"
        assert following.error is None, following.error
        assert events[-1][b"ev"] == b"done" and following.result.state == JOB_DONE
    finally:
        store.close()
