"""The PostgreSQL job store's own behaviour, on a real server
(:mod:`tests.pgserver`): several masters on one database, change
notification between them, names, epochs and fencing, adoption of a dead
master's jobs, schema versions, a server restart.  What every store
promises is tested in tests/test_store.py on both stores."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from remsh.store.base import JOB_CANCELLED, JOB_DONE, SLAVE_OK, OutputGap, SessionRecord, StoreError, UnknownJob
from remsh.store.fencing import FencedOff, MasterNameInUse, NotOwner
from remsh.store.pgschema import MIGRATIONS, SCHEMA_VERSION
from remsh.store.pglink import redacted
from remsh.store.postgres import PostgresJobStore
from tests.pgserver import pg_server, pg_uri  # noqa: F401 - fixtures
from tests.util import WAIT, run_in_thread, wait_until


@pytest.fixture
def open_store(pg_uri):
    """Opens stores on the test's database; all closed at the end."""
    opened = []

    def make(name: str, **kw) -> PostgresJobStore:
        kw.setdefault("poll_interval", 0.5)
        opened.append(PostgresJobStore(pg_uri, name, **kw))
        return opened[-1]

    yield make
    for s in opened:
        s.close()


def _sql(uri: str, statement: str, params=()):
    with psycopg.connect(uri, autocommit=True) as conn:
        cur = conn.execute(statement.encode(), params)
        return cur.fetchall() if cur.description else None


def test_two_masters_see_each_others_jobs_and_output(open_store) -> None:
    """A job and its output written through one master's store are read through another's."""
    a, b = open_store("a"), open_store("b")
    job = a.create_job("run", {"argv": ["echo"]}, 0, ["s1"])
    a.append_output(job.id, "s1", "stdout", 0, b"from a\n")
    assert [j.id for j in b.list_jobs(running=True)] == [job.id]
    assert b.read_output(job.id)[0][1].data == b"from a\n"
    assert b.output_position(job.id, "s1") == (7, 0)


def test_another_masters_write_wakes_a_waiter_by_notify(open_store) -> None:
    """wait_change on one master wakes on another master's commit at once (NOTIFY), not at the next poll."""
    a = open_store("a")
    b = open_store("b", poll_interval=60.0)
    job = a.create_job("run", {"argv": ["x"]}, 0, ["s1"])
    v = b.version()
    waiter = run_in_thread(lambda: b.wait_change(v, 30.0))
    started = time.monotonic()
    a.append_output(job.id, "s1", "stdout", 0, b"x")
    assert waiter.done.wait(WAIT) and waiter.result > v
    assert time.monotonic() - started < 5.0


def test_a_change_without_notification_is_found_by_the_poll(open_store, pg_uri) -> None:
    """A change whose notification never came (only the change sequence moved) still wakes waiters within the poll."""
    b = open_store("b", poll_interval=0.3)
    v = b.version()
    assert b.wait_change(v, 0.8) == v  # nothing changed: no spurious wake
    _sql(pg_uri, "SELECT nextval('remsh_changes')")
    assert b.wait_change(v, WAIT) > v


def test_a_live_masters_name_is_refused_and_free_after_close(open_store, pg_uri) -> None:
    """A second store under a live master's name is refused; after a clean close the name is taken with a higher epoch."""
    a = open_store("a")
    with pytest.raises(MasterNameInUse, match="another --name"):
        PostgresJobStore(pg_uri, "a")
    first = a.epoch
    a.close()
    again = open_store("a")
    assert again.epoch == first + 1


def test_a_job_is_written_only_by_its_owner(open_store) -> None:
    """Another master's update, output or end of a job is refused with NotOwner naming the owner; nothing changes."""
    a, b = open_store("a"), open_store("b")
    job = a.create_job("run", {"argv": ["x"]}, 0, ["s1"])
    for write in (lambda: b.update_slave(job.id, "s1", state=SLAVE_OK),
                  lambda: b.append_output(job.id, "s1", "stdout", 0, b"x"),
                  lambda: b.finish_job(job.id, JOB_DONE)):
        with pytest.raises(NotOwner) as info:
            write()
        assert info.value.owner == "a"
    back = a.get_job(job.id)
    assert back.state == "running" and back.slaves["s1"].state == "queued" and back.slaves["s1"].stdout_bytes == 0


def test_heartbeat_keeps_a_master_alive_and_silence_kills_it(open_store) -> None:
    """A master that beats stays alive past its lease; one that stops beating (paused) is seen dead after the lease."""
    alive = open_store("alive", heartbeat=0.1, lease=1.0)
    paused = open_store("paused", heartbeat=3600.0, lease=1.0)  # never beats again: as if SIGSTOPped
    time.sleep(1.5)  # past the lease, on purpose: the two sides of it are what is tested
    rows = {m.name: m for m in alive.masters()}
    assert rows["alive"].alive and rows["alive"].silent_for < 1.0
    assert not rows["paused"].alive and rows["paused"].silent_for >= 1.0
    assert paused.masters()  # the paused one can still read


def test_a_master_killed_here_gets_its_name_back_at_once(open_store, pg_uri) -> None:
    """A master process SIGKILLed on this machine: a master started again under its name takes it at once (its process is gone), with a higher epoch."""
    code = ("import sys\nfrom remsh.store.postgres import PostgresJobStore\n"
            "s = PostgresJobStore(sys.argv[1], 'crashy', lease=60.0)\n"
            "print(s.epoch, flush=True)\nsys.stdin.read()  # alive until killed or the test ends\n")
    proc = subprocess.Popen([sys.executable, "-c", code, pg_uri], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        assert proc.stdout is not None
        epoch = int(proc.stdout.readline())
        with pytest.raises(MasterNameInUse):  # alive: refused
            PostgresJobStore(pg_uri, "crashy", lease=60.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait(WAIT)
        again = open_store("crashy", lease=60.0)  # well within the lease
        assert again.epoch == epoch + 1
    finally:
        proc.kill()
        proc.wait(WAIT)


def test_a_version_1_store_is_migrated_and_keeps_its_masters_and_jobs(pg_uri) -> None:
    """A database of schema 1 opens, is migrated to the current version in place, and keeps its jobs and master rows."""
    with psycopg.connect(pg_uri, autocommit=True) as conn:
        with conn.transaction():
            for statement in MIGRATIONS[0]:
                conn.execute(statement.encode())
            conn.execute(b"INSERT INTO remsh_meta VALUES ('schema_version', '1')")
            conn.execute(b"INSERT INTO remsh_masters (name, epoch, heartbeat, started, stopped) "
                         b"VALUES ('old', 4, 0, 0, true)")
            conn.execute(b"INSERT INTO remsh_jobs VALUES ('0000000001-0', 'run', '{}', 0, 'done', 1, 2, 'old', 4)")
    with PostgresJobStore(pg_uri, "old") as store:
        assert store.epoch == 5 and store.get_job("0000000001-0").state == "done"
    assert _sql(pg_uri, "SELECT value FROM remsh_meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]
    assert SCHEMA_VERSION == 7
    assert _sql(pg_uri, "SELECT count(*) FROM remsh_slaves") == [(0,)]  # version 5: the registry of slaves
    assert _sql(pg_uri, "SELECT count(*) FROM remsh_dispatch") == [(0,)]  # version 6: work crossing masters
    # version 7: an append counts only the appending master's own session
    (source,) = _sql(pg_uri, "SELECT prosrc FROM pg_proc WHERE proname = 'remsh_append'")
    assert "AND job_id = p_job AND owner = p_master;" in source[0]
    assert _sql(pg_uri, "SELECT host IS NOT NULL, pid IS NOT NULL FROM remsh_masters") == [(True, True)]


def test_a_killed_master_process_is_noticed_dead(open_store, pg_uri) -> None:
    """A master process SIGKILLed stops beating: another master sees it alive, then dead past the lease."""
    watcher = open_store("watcher", heartbeat=0.1, lease=1.0)
    code = ("import sys\nfrom remsh.store.postgres import PostgresJobStore\n"
            "s = PostgresJobStore(sys.argv[1], 'doomed', heartbeat=0.1, lease=1.0)\n"
            "print('ready', flush=True)\nsys.stdin.read()  # alive until killed or the test ends\n")
    proc = subprocess.Popen([sys.executable, "-c", code, pg_uri], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        assert {m.name: m.alive for m in watcher.masters()}["doomed"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(WAIT)
        wait_until(lambda: not {m.name: m.alive for m in watcher.masters()}["doomed"], WAIT,
                   "the killed master to be seen dead")
    finally:
        proc.kill()
        proc.wait(WAIT)


def test_a_paused_master_adopted_is_fenced_off(open_store) -> None:
    """A master silent past its lease is adopted: its running jobs and sessions become the adopter's, and every write it tries after is refused (FencedOff)."""
    old = open_store("old", heartbeat=3600.0, lease=0.5)
    new = open_store("new", heartbeat=0.1, lease=0.5)
    job = old.create_job("run", {"argv": ["x"]}, 0, ["s1"])
    old.append_output(job.id, "s1", "stdout", 0, b"before\n")
    old.open_session(SessionRecord("ab" * 16, "s1", job.id, "execute", 1, 0, 0))
    ended = old.create_job("run", {"argv": ["y"]}, 0, ["s1"])
    old.finish_job(ended.id, JOB_DONE)
    wait_until(lambda: not {m.name: m.alive for m in new.masters()}["old"], WAIT, "the paused master's lease")
    row = {m.name: m for m in new.masters()}["old"]
    assert new.adopt_master("old", row.epoch) == [job.id]
    assert [s.id for s in new.open_sessions()] == ["ab" * 16] and old.open_sessions() == []
    # the paused master comes back: nothing it writes is taken
    for write in (lambda: old.append_output(job.id, "s1", "stdout", 7, b"after\n"),
                  lambda: old.update_slave(job.id, "s1", state=SLAVE_OK),
                  lambda: old.create_job("run", {"argv": ["z"]}, 0, ["s1"]),
                  lambda: old.finish_job(job.id, JOB_DONE)):
        with pytest.raises(FencedOff, match="stale"):
            write()
    # the adopter goes on from what is committed
    assert new.append_output(job.id, "s1", "stdout", 7, b"after\n") == 13
    new.finish_job(job.id, JOB_DONE)
    assert b"".join(c.data for _, c in new.read_output(job.id)) == b"before\nafter\n"
    assert len(new.list_jobs()) == 2


def test_a_live_master_is_not_adopted(open_store) -> None:
    """adopt_master refuses (None) while the master beats within its lease, and leaves its jobs alone."""
    a = open_store("a", heartbeat=0.1, lease=5.0)
    b = open_store("b")
    job = a.create_job("run", {"argv": ["x"]}, 0, ["s1"])
    assert b.adopt_master("a", a.epoch) is None
    a.update_slave(job.id, "s1", state=SLAVE_OK)  # still a's


def test_two_masters_racing_to_adopt_one_winner(open_store, pg_uri) -> None:
    """Several masters adopting one dead master at once: exactly one wins and holds its jobs."""
    dead = open_store("dead", heartbeat=3600.0, lease=0.3)
    jobs = [dead.create_job("run", {"argv": ["x"]}, 0, ["s1"]).id for _ in range(3)]
    racers = [open_store(f"r{i}", lease=0.3) for i in range(4)]
    wait_until(lambda: not {m.name: m.alive for m in racers[0].masters()}["dead"], WAIT, "the dead master's lease")
    epoch = dead.epoch
    barrier = threading.Barrier(len(racers))
    results = {}

    def race(store: PostgresJobStore) -> None:
        barrier.wait(WAIT)
        results[store.name] = store.adopt_master("dead", epoch)

    threads = [threading.Thread(target=race, args=(s,)) for s in racers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    winners = [name for name, got in results.items() if got is not None]
    assert len(results) == 4 and len(winners) == 1
    assert results[winners[0]] == sorted(jobs)
    assert _sql(pg_uri, "SELECT DISTINCT owner FROM remsh_jobs") == [(winners[0],)]


def test_schema_is_versioned_and_a_newer_one_refused(open_store, pg_uri) -> None:
    """A new database gets the current schema version; one marked newer is refused, not guessed at."""
    open_store("a").close()
    assert _sql(pg_uri, "SELECT value FROM remsh_meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]
    _sql(pg_uri, "UPDATE remsh_meta SET value = %s WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(StoreError, match="newer remsh"):
        PostgresJobStore(pg_uri, "b")


def test_masters_starting_together_migrate_once(pg_uri) -> None:
    """Several masters opening a new database at the same moment: one migrates, all open."""
    barrier = threading.Barrier(4)
    stores, errors = [], []

    def start(i: int) -> None:
        barrier.wait(WAIT)
        try:
            stores.append(PostgresJobStore(pg_uri, f"m{i}"))
        except Exception as e:  # noqa: BLE001 - the test reports it
            errors.append(e)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 3)
    try:
        assert errors == [] and len(stores) == 4
    finally:
        for s in stores:
            s.close()


def test_foreign_tables_are_refused(pg_uri) -> None:
    """A database with remsh_ tables but no remsh schema record is not taken over."""
    _sql(pg_uri, "CREATE TABLE remsh_jobs (x int)")
    with pytest.raises(StoreError, match="not a remsh job store"):
        PostgresJobStore(pg_uri, "a")


def test_unreachable_server_is_one_line_without_password(tmp_path) -> None:
    """A store that cannot connect fails with one StoreError line that shows no password."""
    uri = f"postgresql://u:sekrit@/db?host={tmp_path}&port=1"
    with pytest.raises(StoreError) as info:
        PostgresJobStore(uri, "a")
    assert "sekrit" not in str(info.value) and "\n" not in str(info.value)
    assert "sekrit" not in redacted(uri) and "password" not in redacted(uri)


def test_server_restart_fails_one_call_then_reconnects(open_store, pg_server) -> None:
    """pg_ctl restart: a call in the gap fails with StoreError, later calls reconnect, and waiters hear changes again."""
    a = open_store("a", heartbeat=0.2, lease=30.0)
    b = open_store("b", poll_interval=0.3, heartbeat=0.2, lease=30.0)
    job = a.create_job("run", {"argv": ["x"]}, 0, ["s1"])
    pg_server.restart()

    def append_works() -> bool:
        try:
            a.append_output(job.id, "s1", "stdout", 0, b"x")
            return True
        except StoreError:
            return False

    wait_until(append_works, WAIT, "the store to reconnect after the restart")
    assert b.output_position(job.id, "s1") == (1, 0)  # a read reconnects by itself
    v = b.version()
    a.append_output(job.id, "s1", "stdout", 1, b"y")
    assert b.wait_change(v, WAIT) > v
    assert {m.name: m.alive for m in b.masters()} == {"a": True, "b": True}


def test_a_master_notices_another_going_silent_and_coming_back(open_store, caplog) -> None:
    """A master's watcher logs a warning naming another master whose heartbeat passes the lease, and when it is back."""
    caplog.set_level("INFO", logger="remsh.store.postgres")
    open_store("watcher", heartbeat=0.1, lease=0.6)
    other = open_store("other", heartbeat=3600.0, lease=0.6)  # beats at open only: then as if paused
    wait_until(lambda: "master other is dead" in caplog.text, WAIT, "the watcher to notice the silence")
    other.beat()  # it beats again
    wait_until(lambda: "master other is back" in caplog.text, WAIT, "the watcher to notice it back")


def test_an_outage_is_waited_out_by_output_and_refused_to_new_jobs(open_store, pg_server) -> None:
    """PostgreSQL stopped: appending output waits and completes once it is back (stored once), a new job fails at once with StoreError."""
    a = open_store("a", outage_wait=60.0)
    job = a.create_job("run", {"argv": ["x"]}, 0, ["s1"])
    a.append_output(job.id, "s1", "stdout", 0, b"before ")
    pg_server.stop()
    try:
        started = time.monotonic()
        with pytest.raises(StoreError):
            a.create_job("run", {"argv": ["y"]}, 0, ["s1"])
        assert time.monotonic() - started < 5.0
        writer = run_in_thread(lambda: a.append_output(job.id, "s1", "stdout", 7, b"during\n"))
        assert not writer.done.wait(1.0)  # waiting for the database, not failed
    finally:
        pg_server.start()
    assert writer.done.wait(WAIT) and writer.error is None and writer.result == 14
    a.update_slave(job.id, "s1", state=SLAVE_OK, exit_status=0)
    assert b"".join(c.data for _, c in a.read_output(job.id)) == b"before during\n"
    assert [j.id for j in a.list_jobs()] == [job.id]


def test_two_standbys_racing_for_a_dead_masters_name_one_wins(open_store, pg_uri) -> None:
    """A dead master's name taken by several standbys at once: exactly one opens the store, the others are refused."""
    dead = open_store("m1", heartbeat=3600.0, lease=0.5)
    wait_until(lambda: _sql(pg_uri, "SELECT extract(epoch from clock_timestamp()) - heartbeat > 0.6 "
                                    "FROM remsh_masters WHERE name = 'm1'") == [(True,)],
               WAIT, "the dead master's lease")
    barrier = threading.Barrier(4)
    opened, refused = [], []

    def standby() -> None:
        barrier.wait(WAIT)
        try:
            opened.append(PostgresJobStore(pg_uri, "m1", lease=0.5, heartbeat=0.1))
        except MasterNameInUse as e:
            refused.append(e)

    threads = [threading.Thread(target=standby) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 2)
    try:
        assert len(opened) == 1 and len(refused) == 3
        assert opened[0].epoch == dead.epoch + 1
    finally:
        for s in opened:
            s.close()


def test_a_cancel_asked_of_any_master_reaches_the_owner_once(open_store) -> None:
    """request_cancel on one master: the owner's watch_cancels callback hears it once (at once, by NOTIFY); an ended job answers None, an unknown one UnknownJob."""
    a, b = open_store("a", poll_interval=60.0), open_store("b")
    heard = []
    got = threading.Event()

    def on_cancel(job_id: str, reason: str) -> None:
        heard.append((job_id, reason))
        got.set()

    a.watch_cancels(on_cancel)
    job = a.create_job("run", {"argv": ["x"]}, 0, ["s1"])
    assert b.request_cancel(job.id, "stop it") == "a"
    assert got.wait(WAIT) and heard == [(job.id, "stop it")]
    assert b.request_cancel(job.id, "again") == "a"
    a.watch_cancels(on_cancel)  # delivers what is pending: nothing new
    assert heard == [(job.id, "stop it")]
    a.finish_job(job.id, JOB_CANCELLED)
    assert b.request_cancel(job.id, "late") is None
    with pytest.raises(UnknownJob):
        b.request_cancel("0000000000-0", "nothing")


def test_sessions_are_kept_moved_with_output_and_dropped_with_their_job(open_store) -> None:
    """open_session/open_sessions round-trip; append_output moves a session's count in its transaction (not when it fails); close_session and pruning drop it."""
    store = open_store("a", keep=1.0)
    job = store.create_job("run", {"argv": ["x"]}, 0, ["s"])
    store.open_session(SessionRecord("b" * 32, "s", job.id, "execute", 7, 3, 3))
    assert [(s.id, s.name, s.request_box, s.reply_base, s.received) for s in store.open_sessions()] == \
        [("b" * 32, "s", 7, 3, 3)]
    store.append_output(job.id, "s", "stdout", 0, b"hello", session=("b" * 32, 9))
    assert store.open_sessions()[0].received == 9
    with pytest.raises(OutputGap):
        store.append_output(job.id, "s", "stdout", 50, b"later", session=("b" * 32, 12))
    assert store.open_sessions()[0].received == 9  # rolled back with the refused chunk
    store.close_session("b" * 32)
    assert store.open_sessions() == []
    store.open_session(SessionRecord("c" * 32, "s", job.id, "execute", 1, 1, 1))
    store.finish_job(job.id, JOB_DONE, now=time.time() - 10)
    assert store.prune() == 1 and store.open_sessions() == []


def test_close_wakes_the_listening_thread_at_once(pg_uri) -> None:  # noqa: F811
    """close() returns without waiting for the listener's next poll or heartbeat (30 s here): stopping a master is not held up by its store."""
    store = PostgresJobStore(pg_uri, "quick-close", poll_interval=30.0, heartbeat=30.0, lease=90.0)
    started = time.monotonic()
    store.close()
    assert time.monotonic() - started < 10.0
