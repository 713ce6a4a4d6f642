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

from tests.pgserver import PgServer, pg_server, pg_uri  # noqa: F401 - fixtures
from tests.slaveproc import WAIT
from tests.test_fleet import remsh
from tests.test_store_postgres_masters import _lines, store_uri  # noqa: F401 - fixture
from tests.test_store_postgres_work import _last_job, _record, cluster  # noqa: F401 - fixture
from tests.util import wait_until

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
