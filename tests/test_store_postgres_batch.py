"""Group commit of the PostgreSQL job store's writes (:mod:`remsh.store.pgbatch`),
on a real server (:mod:`tests.pgserver`): writes made at once share a
transaction, each caller returns only once its own write is committed, a
failing write fails alone, a fenced master's batch is refused whole, and a
server restart under a batch loses no acknowledged write.

A batch is held in flight by a second connection that locks the master's
row (``FOR UPDATE``): the batch's fence check (``FOR SHARE``) waits for it,
so the writes made meanwhile queue for the next batch, deterministically."""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, List, Tuple

import psycopg
import pytest

from remsh.store.base import SLAVE_RUNNING, SessionRecord, StoreError, UnknownJob
from remsh.store.fencing import FencedOff, NotOwner
from remsh.store.postgres import PostgresJobStore
from tests.pgserver import PgServer, pg_server, pg_uri  # noqa: F401 - fixtures
from tests.util import WAIT, Outcome, run_in_thread, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def store(pg_uri: str) -> Iterator[PostgresJobStore]:
    s = PostgresJobStore(pg_uri, "m", poll_interval=0.5)
    try:
        yield s
    finally:
        s.close()


def _query(conn: "psycopg.Connection[Tuple[object, ...]]", statement: str, params: Tuple[object, ...] = ()
           ) -> List[Tuple[object, ...]]:
    return conn.execute(statement.encode(), params).fetchall()


@contextlib.contextmanager
def _held(uri: str, master: str) -> Iterator["psycopg.Connection[Tuple[object, ...]]"]:
    """Lock ``master``'s row from another connection for the block: its
    writes' fence check waits (committed at the end of the block)."""
    conn = psycopg.connect(uri)
    try:
        _query(conn, "SELECT epoch FROM remsh_masters WHERE name = %s FOR UPDATE", (master,))
        yield conn
        conn.commit()
    finally:
        conn.close()


def _waiting_on_lock(uri: str) -> bool:
    with psycopg.connect(uri, autocommit=True) as conn:
        rows = _query(conn, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                            "AND application_name LIKE 'remsh master%%' AND datname = current_database()")
        return int(rows[0][0]) > 0  # type: ignore[call-overload]


def _stall(uri: str, store: PostgresJobStore, first: Callable[[], object]) -> Outcome:
    """Run ``first`` in a thread and wait until its batch waits on the held
    row: the writes made from now on queue for the next batch."""
    out = run_in_thread(first, "first-write")
    wait_until(lambda: _waiting_on_lock(uri), what="the first batch waiting on the master's row")
    assert store.group.queued == 0
    return out


def test_concurrent_writes_are_committed_once_each_and_told_after_commit(store: PostgresJobStore, pg_uri: str) -> None:
    """Writers in 12 threads share transactions; each append is in the database the moment its call returns, once."""
    names = [f"s{i}" for i in range(12)]
    job = store.create_job("run", {"argv": ["x"]}, 0, names)
    rounds = 25
    checker = psycopg.connect(pg_uri, autocommit=True)
    check_lock = threading.Lock()
    problems: List[str] = []
    gate = threading.Barrier(len(names))

    def writer(name: str) -> None:
        gate.wait(WAIT)
        store.update_slave(job.id, name, state=SLAVE_RUNNING, started=1.0)
        offset = 0
        for i in range(rounds):
            data = f"{name} line {i}\n".encode()
            assert store.append_output(job.id, name, "stdout", offset, data) == offset + len(data)
            offset += len(data)
            with check_lock:  # the moment it returned: committed, seen from another connection
                row = _query(checker, "SELECT stdout_bytes FROM remsh_job_slaves WHERE job_id = %s AND name = %s",
                             (job.id, name))
            if row[0][0] != offset:
                problems.append(f"{name}: {row[0][0]} bytes committed after an append returned {offset}")

    before = (store.group.batches, store.group.writes)
    threads = [threading.Thread(target=writer, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    checker.close()
    assert not problems
    for name in names:
        stored = b"".join(c.data for n, c in store.read_output(job.id, name, limit=10_000))
        assert stored == b"".join(f"{name} line {i}\n".encode() for i in range(rounds))
    with psycopg.connect(pg_uri, autocommit=True) as conn:
        assert _query(conn, "SELECT count(*) FROM remsh_output WHERE job_id = %s", (job.id,))[0][0] == \
            len(names) * rounds
    writes = store.group.writes - before[1]
    assert writes == len(names) * (rounds + 1)
    assert store.group.batches - before[0] < writes  # some shared a transaction


def test_callers_wait_for_their_batch_to_commit(store: PostgresJobStore, pg_uri: str) -> None:
    """Writes queued behind a batch in flight return only after the next batch commits, all in that one."""
    names = [f"s{i}" for i in range(8)]
    job = store.create_job("run", {"argv": ["x"]}, 0, names)
    with _held(pg_uri, "m"):
        first = _stall(pg_uri, store, lambda: store.append_output(job.id, "s0", "stdout", 0, b"first\n"))
        batches = store.group.batches
        later = [run_in_thread(lambda n=n: store.append_output(job.id, n, "stderr", 0, b"later\n"))  # type: ignore
                 for n in names]
        wait_until(lambda: store.group.queued == len(names), what="the later writes queued")
        assert not first.done.is_set() and not any(o.done.is_set() for o in later)
        with psycopg.connect(pg_uri, autocommit=True) as conn:
            assert _query(conn, "SELECT count(*) FROM remsh_output")[0][0] == 0
    for out in [first, *later]:
        assert out.done.wait(WAIT) and out.error is None, out.error
    assert store.group.batches - batches == 2  # the first alone, then the eight together
    assert [store.output_position(job.id, n) for n in names] == [(6, 6)] + [(0, 6)] * 7


def test_a_failing_write_fails_alone(store: PostgresJobStore, pg_uri: str) -> None:
    """In one batch an append to an unknown slave and one past the end of its stream fail; the others commit."""
    job = store.create_job("run", {"argv": ["x"]}, 0, ["a", "b", "c"])
    with _held(pg_uri, "m"):
        first = _stall(pg_uri, store, lambda: store.append_output(job.id, "a", "stdout", 0, b"one\n"))
        good_b = run_in_thread(lambda: store.append_output(job.id, "b", "stdout", 0, b"bee\n"))
        unknown = run_in_thread(lambda: store.append_output(job.id, "nobody", "stdout", 0, b"x"))
        gap = run_in_thread(lambda: store.append_output(job.id, "c", "stdout", 100, b"gap"))
        state = run_in_thread(lambda: store.update_slave(job.id, "c", state=SLAVE_RUNNING))
        wait_until(lambda: store.group.queued == 4, what="four writes queued")
        batches = store.group.batches
    for out in (first, good_b, unknown, gap, state):
        assert out.done.wait(WAIT)
    assert first.error is None and good_b.error is None and state.error is None
    assert isinstance(unknown.error, UnknownJob)
    assert isinstance(gap.error, StoreError) and "only 0 bytes" in str(gap.error)
    assert store.group.batches - batches == 2  # the first alone, then the four together
    record = store.get_job(job.id)
    assert record.slaves["c"].state == SLAVE_RUNNING
    assert [store.output_position(job.id, n) for n in ("a", "b", "c")] == [(4, 0), (4, 0), (0, 0)]


def test_a_fenced_masters_batch_is_refused_whole(store: PostgresJobStore, pg_uri: str) -> None:
    """A master whose epoch goes stale while its writes wait has every write of the batch refused, none stored."""
    job = store.create_job("run", {"argv": ["x"]}, 0, ["a", "b"])
    with _held(pg_uri, "m") as conn:
        first = _stall(pg_uri, store, lambda: store.append_output(job.id, "a", "stdout", 0, b"one\n"))
        more = [run_in_thread(lambda: store.append_output(job.id, "b", "stdout", 0, b"two\n")),
                run_in_thread(lambda: store.update_slave(job.id, "b", state=SLAVE_RUNNING)),
                run_in_thread(lambda: store.close_session("none"))]
        wait_until(lambda: store.group.queued == 3, what="three writes queued")
        _query(conn, "UPDATE remsh_masters SET epoch = epoch + 1 WHERE name = 'm' RETURNING epoch")
    for out in [first, *more]:
        assert out.done.wait(WAIT)
        assert isinstance(out.error, FencedOff), out.error
    with psycopg.connect(pg_uri, autocommit=True) as check:
        assert _query(check, "SELECT count(*) FROM remsh_output")[0][0] == 0
        assert _query(check, "SELECT state FROM remsh_job_slaves WHERE name = 'b'")[0][0] == "queued"


def test_a_server_restart_under_a_batch_loses_no_acknowledged_write(pg_server: PgServer, store: PostgresJobStore,
                                                                   pg_uri: str) -> None:
    """The server stopped under a batch of writes: its new job fails meanwhile, its appends commit once it is back."""
    names = [f"s{i}" for i in range(6)]
    job = store.create_job("run", {"argv": ["x"]}, 0, names)
    row_lock = psycopg.connect(pg_uri)  # holds the job's row: the second batch waits on it
    try:
        _query(row_lock, "SELECT id FROM remsh_jobs WHERE id = %s FOR UPDATE", (job.id,))
        with _held(pg_uri, "m"):
            first = _stall(pg_uri, store, lambda: store.close_session("none"))
            appends = [run_in_thread(lambda n=n: store.append_output(job.id, n, "stderr", 0, b"kept\n"))  # type: ignore
                       for n in names]
            new_job = run_in_thread(lambda: store.create_job("run", {"argv": ["y"]}, 0, ["z"]))
            wait_until(lambda: store.group.queued == len(names) + 1, what="the writes queued")
            batches = store.group.batches
        assert first.done.wait(WAIT) and first.error is None
        wait_until(lambda: store.group.batches == batches + 1 and store.group.queued == 0 and
                   _waiting_on_lock(pg_uri), what="the second batch waiting on the job's row")
        assert not new_job.done.is_set() and not any(o.done.is_set() for o in appends)
        # stopped until the new job is told: whichever way the batch finds the
        # connection broken, no later attempt of it can reach a server meanwhile
        pg_server.stop()  # cuts every connection, the one holding the job's row too
    finally:
        row_lock.close()
    try:
        assert new_job.done.wait(WAIT)
        assert isinstance(new_job.error, StoreError)  # not repeated: its commit was unknown
        assert not any(o.done.is_set() for o in appends)  # the repeatable writes wait out the outage
    finally:
        pg_server.start()
    for out in appends:
        assert out.done.wait(40) and out.error is None, out.error
    assert [j.id for j in store.list_jobs()] == [job.id]
    assert [store.output_position(job.id, n) for n in names] == [(0, 5)] * len(names)
    with psycopg.connect(pg_uri, autocommit=True) as check:
        assert _query(check, "SELECT count(*) FROM remsh_output")[0][0] == len(names)
    assert store.append_output(job.id, "s1", "stdout", 0, b"after\n") == 6  # and writes go on


def test_one_statement_writes_refuse_what_is_not_theirs(store: PostgresJobStore, pg_uri: str) -> None:
    """A slave's record and a session of another master's job are refused (NotOwner), an unknown job or slave too."""
    other = PostgresJobStore(pg_uri, "other", poll_interval=0.5)
    try:
        theirs = other.create_job("run", {"argv": ["x"]}, 0, ["s"])
        with pytest.raises(NotOwner):
            store.update_slave(theirs.id, "s", state=SLAVE_RUNNING)
        with pytest.raises(NotOwner):
            store.open_session(SessionRecord("e" * 32, "s", theirs.id, "execute", 4, 2, 2))
        with pytest.raises(UnknownJob):
            store.update_slave("0000000001-0", "s", state=SLAVE_RUNNING)
        with pytest.raises(UnknownJob):
            store.open_session(SessionRecord("e" * 32, "s", "0000000001-0", "execute", 4, 2, 2))
        ours = store.create_job("run", {"argv": ["x"]}, 0, ["s"])
        with pytest.raises(UnknownJob):
            store.update_slave(ours.id, "nobody", state=SLAVE_RUNNING)
        store.update_slave(ours.id, "s", state=SLAVE_RUNNING, started=5.0)
        store.open_session(SessionRecord("f" * 32, "s", ours.id, "execute", 4, 2, 2))
        assert other.get_job(theirs.id).slaves["s"].state == "queued"
        assert store.get_job(ours.id).slaves["s"].state == SLAVE_RUNNING
        assert [s.id for s in store.open_sessions()] == ["f" * 32]
        assert other.open_sessions() == []
    finally:
        other.close()
