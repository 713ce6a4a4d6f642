"""A slave's part of one master's job run by another master (work crossing
masters, :mod:`remsh.crossmaster`) when that holder dies: the store's side
(:mod:`remsh.store.pgdispatch`, :mod:`remsh.store.pgwrites`,
:mod:`remsh.store.pgadopt`) on a real PostgreSQL server
(:mod:`tests.pgserver`)."""

from __future__ import annotations

from typing import Iterator, List

import psycopg
import pytest

from remsh.store import pgdispatch
from remsh.store.base import SessionRecord
from remsh.store.fencing import FencedOff, NotOwner
from remsh.store.postgres import PostgresJobStore
from tests.pgserver import PgServer, pg_server, pg_uri  # noqa: F401 - fixtures
from tests.slaveproc import WAIT
from tests.util import wait_until

pytestmark = pytest.mark.timeout(240)

#: The lease of the store that adopts a dead one here (seconds).
SHORT_LEASE = 0.5


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
