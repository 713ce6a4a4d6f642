"""The job store: records, exactly-once output by position, truncation,
retention, schema versions and refusals at start.

The behaviour every store promises (:class:`~remsh.store.base.JobStore`) is
tested on each store through ``make_store``: a real SQLite file, and a real
PostgreSQL server (:mod:`tests.pgserver`; skipped without one, unless
``$CI`` is set).  What only the SQLite file does (its lock, its file, its
migrations) is tested on SQLite alone; the PostgreSQL store's own in
``tests/test_store_postgres.py``."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading

import pytest

from remsh.errors import LocalError, UsageError
from remsh.store.base import (JOB_CANCELLED, JOB_DONE, JOB_RUNNING, SLAVE_OK, SLAVE_QUEUED, SLAVE_RUNNING,
                              OutputGap, SlaveRecord, StoreError, UnknownJob, check_job_id, job_state_from,
                              make_job_id, parse_duration, parse_size)
from remsh.store.sqlite import CHUNK_COST, SCHEMA_VERSION, SqliteJobStore
from tests.pgserver import pg_server, pg_uri  # noqa: F401 - the PostgreSQL server of the conformance tests
from tests.util import run_in_thread

#: The stores every conformance test runs on.
STORES = ("sqlite", "postgresql")


@pytest.fixture
def path(tmp_path) -> str:
    return str(tmp_path / "jobs.sqlite")


@pytest.fixture(params=STORES)
def make_store(request, path):
    """Opens a store of the parameter's kind on one database (the same each
    call: a reopened store sees what an earlier one wrote), with the given
    ``keep``/``max_output``; every store opened is closed at the end."""
    opened = []
    if request.param == "sqlite":
        def make(**kw):
            opened.append(SqliteJobStore(path, **kw))
            return opened[-1]
    else:
        from remsh.store.postgres import PostgresJobStore

        uri = request.getfixturevalue("pg_uri")

        def make(**kw):
            opened.append(PostgresJobStore(uri, "test-master", poll_interval=0.5, **kw))
            return opened[-1]
    yield make
    for s in opened:
        s.close()


@pytest.fixture
def store(make_store):
    return make_store()


def test_job_record_round_trip(store) -> None:
    """A job is stored with its kind, spec, uid and per-slave records, and read back as written."""
    job = store.create_job("run", {"argv": ["echo", "hi"], "targets": ["web-*"]}, 1000, ["a", "b"], now=100.0)
    assert job.state == JOB_RUNNING
    store.update_slave(job.id, "a", state=SLAVE_RUNNING, started=101.0)
    store.update_slave(job.id, "a", state=SLAVE_OK, exit_status=0, finished=102.5)
    back = store.get_job(job.id)
    assert back.kind == "run" and back.uid == 1000 and back.started == 100.0
    assert back.spec == {"argv": ["echo", "hi"], "targets": ["web-*"]}
    assert list(back.slaves) == ["a", "b"]
    assert back.slaves["a"] == SlaveRecord("a", SLAVE_OK, 0, None, None, 101.0, 102.5)
    assert back.slaves["b"].state == SLAVE_QUEUED
    store.finish_job(job.id, JOB_DONE, now=103.0)
    back = store.get_job(job.id)
    assert (back.state, back.finished) == (JOB_DONE, 103.0)
    js = back.to_json()
    assert js["argv"] == ["echo", "hi"] and js["slaves"]["a"]["exit_status"] == 0


def test_output_exactly_once_by_position(store) -> None:
    """A chunk sent again is stored once, an overlapping one adds only its new bytes, a gap is refused."""
    job = store.create_job("run", {"argv": ["x"]}, 0, ["a"])
    assert store.append_output(job.id, "a", "stdout", 0, b"hello ") == 6
    assert store.append_output(job.id, "a", "stdout", 0, b"hello ") == 6      # again: nothing new
    assert store.append_output(job.id, "a", "stdout", 3, b"lo world") == 11   # overlap: "world" only
    assert store.append_output(job.id, "a", "stderr", 0, b"oops\n") == 5
    with pytest.raises(OutputGap):
        store.append_output(job.id, "a", "stdout", 20, b"later")
    chunks = store.read_output(job.id)
    assert b"".join(c.data for n, c in chunks if c.stream == "stdout") == b"hello world"
    assert [c.stream for _, c in chunks] == ["stdout", "stdout", "stderr"]  # in arrival order
    assert store.output_position(job.id, "a") == (11, 5)
    assert store.get_job(job.id).slaves["a"].stdout_bytes == 11


def test_output_keeps_exact_bytes(store) -> None:
    """Output that is not UTF-8, and NUL bytes, come back byte for byte."""
    job = store.create_job("run", {"argv": ["x"]}, 0, ["a"])
    data = bytes(range(256)) * 3
    store.append_output(job.id, "a", "stdout", 0, data)
    assert b"".join(c.data for _, c in store.read_output(job.id, "a")) == data


def test_output_past_the_cap_is_counted_not_kept(make_store) -> None:
    """Past max_output the stream's position still moves (exactly once holds) and the record says truncated."""
    with make_store(max_output=10 + 2 * CHUNK_COST) as store:
        job = store.create_job("run", {"argv": ["x"]}, 0, ["a"])
        store.append_output(job.id, "a", "stdout", 0, b"0123456")
        assert store.append_output(job.id, "a", "stderr", 0, b"abcdef") == 6
        assert store.append_output(job.id, "a", "stdout", 7, b"789") == 10
        kept = b"".join(c.data for _, c in store.read_output(job.id))
        assert kept == b"0123456abc"
        rec = store.get_job(job.id).slaves["a"]
        assert rec.truncated and (rec.stdout_bytes, rec.stderr_bytes) == (10, 6)


def test_read_output_pages_by_sequence(store) -> None:
    """read_output(after=, limit=) pages through the job's chunks in order."""
    job = store.create_job("run", {"argv": ["x"]}, 0, ["a", "b"])
    for i in range(5):
        store.append_output(job.id, "a" if i % 2 else "b", "stdout", i // 2 if i % 2 else (i + 1) // 2, b"x")
    first = store.read_output(job.id, limit=2)
    rest = store.read_output(job.id, after=first[-1][1].seq)
    assert [c.seq for _, c in first + rest] == [0, 1, 2, 3, 4]
    assert [n for n, _ in store.read_output(job.id, "a")] == ["a", "a"]


def test_ids_sort_by_start_and_are_unique(store) -> None:
    """Ids of jobs started in the same millisecond differ; ids sort as start times do; newest listed first."""
    ids = [store.create_job("run", {"argv": ["x"]}, 0, [], now=1000.0).id for _ in range(3)]
    later = store.create_job("put", {"paths": ["a", "b"]}, 0, [], now=1000.002).id
    assert len(set(ids)) == 3 and ids == sorted(ids) and later > max(ids)
    assert [j.id for j in store.list_jobs()] == [later] + ids[::-1]
    assert [j.id for j in store.list_jobs(limit=2)] == [later, ids[2]]
    store.finish_job(later, JOB_CANCELLED)
    assert later not in [j.id for j in store.list_jobs(running=True)]
    for job_id in ids:
        assert check_job_id(job_id) == job_id
    with pytest.raises(UsageError):
        check_job_id("../etc")


def test_make_job_id_is_fixed_width() -> None:
    """A job id's time part has one width, so string order is time order."""
    assert make_job_id(0, 0) == "0000000000-0"
    assert len(make_job_id(2**49, 31).split("-")[0]) == 10
    assert make_job_id(1, 0) < make_job_id(32, 0) < make_job_id(32, 1)


def test_unknown_job_and_slave(store) -> None:
    """An unknown job or slave is UnknownJob (a StoreError, a LocalError)."""
    with pytest.raises(UnknownJob):
        store.get_job("0000000000-0")
    job = store.create_job("run", {"argv": ["x"]}, 0, ["a"])
    with pytest.raises(UnknownJob):
        store.append_output(job.id, "nobody", "stdout", 0, b"x")
    with pytest.raises(UnknownJob):
        store.update_slave(job.id, "nobody", state=SLAVE_OK)
    assert issubclass(UnknownJob, StoreError) and issubclass(StoreError, LocalError)


def test_prune_keeps_running_and_recent_jobs(make_store) -> None:
    """Pruning removes jobs that ended before the retention, with their output; running jobs stay."""
    with make_store(keep=3600) as store:
        old = store.create_job("run", {"argv": ["x"]}, 0, ["a"], now=0.0)
        store.append_output(old.id, "a", "stdout", 0, b"old output")
        store.finish_job(old.id, JOB_DONE, now=10.0)
        recent = store.create_job("run", {"argv": ["x"]}, 0, ["a"], now=5000.0)
        store.finish_job(recent.id, JOB_DONE, now=5000.0)
        running = store.create_job("run", {"argv": ["x"]}, 0, ["a"], now=1.0)
        assert store.prune(now=6000.0) == 1
        assert {j.id for j in store.list_jobs()} == {recent.id, running.id}
        assert store.read_output(old.id) == []


def test_history_survives_reopening(make_store) -> None:
    """What one store wrote, a store opened later on the same file reads."""
    with make_store() as store:
        job = store.create_job("get", {"paths": ["/etc/hosts", "/tmp/x"]}, 7, ["a"])
        store.append_output(job.id, "a", "stderr", 0, b"warning\n")
    with make_store() as store:
        back = store.get_job(job.id)
        assert back.spec["paths"] == ["/etc/hosts", "/tmp/x"]
        assert store.output_position(job.id, "a") == (0, 8)


def test_second_store_on_one_file_is_refused(path) -> None:
    """A SQLite store serves one master: a second opener is refused while the first holds it."""
    with SqliteJobStore(path):
        with pytest.raises(StoreError, match="in use by another master"):
            SqliteJobStore(path)
    SqliteJobStore(path).close()  # free again once closed


def test_second_store_in_another_process_is_refused(path) -> None:
    """The lock holds across processes too."""
    with SqliteJobStore(path):
        r = subprocess.run([sys.executable, "-c", "import sys; from remsh.store.sqlite import SqliteJobStore\n"
                            "try:\n    SqliteJobStore(sys.argv[1])\nexcept Exception as e:\n"
                            "    print(type(e).__name__, e)\n", path],
                           capture_output=True, text=True, timeout=30)
        assert r.stdout.startswith("StoreError") and "in use by another master" in r.stdout


def test_corrupt_file_is_refused_with_one_line(path) -> None:
    """A file that is not a database is refused at open with a one-line StoreError naming it."""
    with open(path, "wb") as f:
        f.write(b"this is not a database" * 100)
    with pytest.raises(StoreError) as info:
        SqliteJobStore(path)
    assert path in str(info.value) and "\n" not in str(info.value)


def test_foreign_database_is_refused(path) -> None:
    """A SQLite file of something else is not taken over."""
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE mine (x)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="not a remsh job store"):
        SqliteJobStore(path)


def test_newer_schema_is_refused(path) -> None:
    """A store written by a newer remsh (higher schema version) is refused, not guessed at."""
    SqliteJobStore(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = %d" % (SCHEMA_VERSION + 1))
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema version"):
        SqliteJobStore(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_store_is_refused(tmp_path) -> None:
    """A store in a directory that cannot be written is refused at start."""
    os.chmod(tmp_path, 0o500)
    try:
        with pytest.raises(StoreError):
            SqliteJobStore(str(tmp_path / "jobs.sqlite"))
    finally:
        os.chmod(tmp_path, 0o700)


def test_unwritable_file_is_refused_even_as_root(path) -> None:
    """A store that cannot be written (a read-only file system stand-in: a directory in its place) is refused."""
    os.mkdir(path)
    with pytest.raises(StoreError):
        SqliteJobStore(path)


def test_store_file_is_private(path) -> None:
    """The store and its lock are made mode 0600."""
    SqliteJobStore(path).close()
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(path + ".lock").st_mode & 0o777 == 0o600


def test_wait_change_wakes_on_write(store) -> None:
    """A waiter on the store wakes when something is written, and times out when nothing is."""
    v = store.version()
    assert store.wait_change(v, 0.05) == v
    job = store.create_job("run", {"argv": ["x"]}, 0, ["a"])
    v = store.version()
    waiter = run_in_thread(lambda: store.wait_change(v, 10.0))
    store.append_output(job.id, "a", "stdout", 0, b"x")
    assert waiter.done.wait(10) and waiter.error is None
    assert waiter.result > v


def test_concurrent_appends_lose_nothing(store) -> None:
    """Threads appending to several slaves at once: every stream complete, nothing doubled."""
    names = [f"s{i}" for i in range(4)]
    job = store.create_job("run", {"argv": ["x"]}, 0, names)

    def writer(name: str) -> None:
        pos = 0
        for i in range(200):
            chunk = b"%s:%d\n" % (name.encode(), i)
            store.append_output(job.id, name, "stdout", pos, chunk)
            store.append_output(job.id, name, "stdout", pos, chunk)  # a re-send
            pos += len(chunk)

    threads = [threading.Thread(target=writer, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for name in names:
        got = b"".join(c.data for _, c in store.read_output(job.id, name, limit=10_000))
        assert got == b"".join(b"%s:%d\n" % (name.encode(), i) for i in range(200))


def test_units() -> None:
    """--keep-jobs and --max-job-output take a number with a unit; anything else is a UsageError."""
    assert parse_duration("7d") == 7 * 86400 and parse_duration("90") == 90 and parse_duration("1.5h") == 5400
    assert parse_size("64M") == 64 << 20 and parse_size("1GiB") == 1 << 30 and parse_size("512") == 512
    for bad in ("", "-1", "7 days", "1e3"):
        with pytest.raises(UsageError):
            parse_duration(bad)
    for bad in ("", "1.5M", "lots"):
        with pytest.raises(UsageError):
            parse_size(bad)


def test_job_state_from_slaves() -> None:
    """A job is done when every slave is ok, failed otherwise, cancelled when cancelled."""
    ok = SlaveRecord("a", SLAVE_OK)
    assert job_state_from([ok, ok]) == JOB_DONE
    assert job_state_from([ok, SlaveRecord("b", "failed")]) == "failed"
    assert job_state_from([ok], cancelled=True) == JOB_CANCELLED


def test_a_version_1_store_is_migrated_and_keeps_its_jobs(path) -> None:
    """A store written with schema 1 (no summary column) opens, keeps its jobs, and records a transfer's summary."""
    from remsh.store.sqlite import MIGRATIONS

    db = sqlite3.connect(path)
    for statement in MIGRATIONS[0]:
        db.execute(statement)
    db.execute("PRAGMA user_version = 1")
    db.execute("INSERT INTO jobs (id, kind, spec, uid, state, started) VALUES ('0000000001-0', 'put', '{}', 0, "
               "'running', 1.0)")
    db.execute("INSERT INTO job_slaves (job_id, name, state) VALUES ('0000000001-0', 'a', 'queued')")
    db.commit()
    db.close()
    with SqliteJobStore(path) as store:
        assert store.get_job("0000000001-0").slaves["a"].summary is None
        store.update_slave("0000000001-0", "a", state=SLAVE_OK, summary="sent to /srv/x")
        assert store.get_job("0000000001-0").slaves["a"].summary == "sent to /srv/x"
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    db.close()


def test_tiny_chunks_count_their_rows_against_the_cap(make_store) -> None:
    """Output that comes a byte at a time is capped by its rows too: the store keeps far fewer than max_output one-byte chunks."""
    with make_store(max_output=100 * (1 + CHUNK_COST)) as store:
        job = store.create_job("run", {"argv": ["x"]}, 0, ["a"])
        for i in range(1000):
            store.append_output(job.id, "a", "stdout", i, b"x")
        rec = store.get_job(job.id).slaves["a"]
        assert len(store.read_output(job.id, limit=10_000)) == 100
        assert rec.truncated and rec.stdout_bytes == 1000


def test_job_output_is_written_in_chunks_in_order(make_store) -> None:
    """A job's sink writes a stream's consecutive small chunks as one row, keeps the order of the two streams, and writes held output within its delay."""
    from remsh.jobs import OUTPUT_DELAY, StoreSink
    from remsh.master.fanout import Cancellation
    from tests.util import wait_until

    with make_store() as store:
        job = store.create_job("run", {"argv": ["x"]}, 0, ["a"])
        sink = StoreSink(store, job.id, Cancellation())
        for _ in range(2000):
            sink.output("a", "stdout", b"x")
        sink.output("a", "stderr", b"E")
        sink.output("a", "stdout", b"y")
        wait_until(lambda: store.output_position(job.id, "a") == (2001, 1), 10 * OUTPUT_DELAY + 5,
                   "the held output to be written")
        chunks = store.read_output(job.id)
        assert [(c.stream, c.data) for _, c in chunks] == [("stdout", b"x" * 2000), ("stderr", b"E"),
                                                          ("stdout", b"y")]
