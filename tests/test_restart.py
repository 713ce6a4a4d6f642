"""A master restart loses no running work (issue 19): a real ``remsh
master`` killed (SIGKILL) or stopped (SIGTERM) mid-job and started again on
the same state dir, with real ``remsh-slave`` processes whose commands keep
running meanwhile; and the ack-after-commit rule on its own, with no
processes (a session over a socket pair, a real SQLite store)."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

from remsh.jobs import StoreSink
from remsh.master.fanout import Cancellation
from remsh.session import SessionWire
from remsh.sessionacks import AckCounter
from remsh.store.base import SessionRecord
from remsh.store.sqlite import MIGRATIONS, SqliteJobStore
from remsh.transports.base import SocketStream
from remsh.wire import Wire, encode_box
from tests.slaveproc import WAIT, SlaveProcesses
from tests.test_fleet import Master, _env, _free_port, remsh, wait_names
from tests.util import wait_until

pytestmark = pytest.mark.timeout(150)

NAMES = ("r-1", "r-2", "r-3")
#: exit status of each slave's command (the command reads it from its directory's name)
STATUSES = {"r-1": 0, "r-2": 3, "r-3": 5}
#: numbered lines until GO exists (the master is away meanwhile), then 20 more, then the status
SCRIPT = ('i=0; while [ ! -e "$GO" ]; do i=$((i+1)); echo "line $i"; echo "err $i" >&2; sleep 0.02; done; '
          'for j in $(seq 1 20); do echo "after $j"; done; '
          'case "$PWD" in *r-1) exit 0;; *r-2) exit 3;; *) exit 5;; esac')


def _start(tmp_path: Path, port: int, *extra: str) -> Master:
    return Master(tmp_path, tmp_path / "ctl" / "m.sock", port, extra=extra).wait_ready()


def _jobs(master: Master) -> List[dict]:
    r = remsh(master.sock, "jobs", "--json")
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout)


def _record(master: Master, job_id: str) -> dict:
    return next(j for j in _jobs(master) if j["id"] == job_id)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Tuple[Path, SlaveProcesses, int]]:
    """A directory, slave processes to start there, and a free port for the masters."""
    port = _free_port()
    slaves = SlaveProcesses(tmp_path / "slaves")
    try:
        yield tmp_path, slaves, port
    finally:
        slaves.close()


def _job_mid_run(tmp_path: Path, slaves: SlaveProcesses, port: int, names=NAMES) -> Tuple[Master, str, Path]:
    """A master with ``names`` running SCRIPT as a detached job that has printed some lines."""
    master = _start(tmp_path, port)
    for name in names:
        slaves.start(port, name, secret=None, insecure=True, max_backoff=0.3)
    wait_names(master.sock, names)
    go = tmp_path / "GO"
    r = remsh(master.sock, "run", "--detach", "--", "env", f"GO={go}", "sh", "-c", SCRIPT)
    assert r.returncode == 0, r.stderr.decode()
    job_id = r.stdout.decode().strip()
    wait_until(lambda: all(s["stdout_bytes"] > 50 for s in _record(master, job_id)["slaves"].values()), WAIT,
               "output from every slave")
    return master, job_id, go


def _stored(sock: Path, job_id: str) -> Dict[str, Dict[str, bytes]]:
    """Each slave's stored stdout and stderr, read straight from the store."""
    db = sqlite3.connect(sock.parent.parent / "state" / "jobs.sqlite")
    try:
        out: Dict[str, Dict[str, bytes]] = {}
        for name, stream, offset, data in db.execute(
                "SELECT name, stream, offset, data FROM output WHERE job_id = ? ORDER BY seq", (job_id,)):
            streams = out.setdefault(name, {"stdout": b"", "stderr": b""})
            assert offset == len(streams[stream]), f"{name} {stream}: a chunk at {offset} after {len(streams[stream])}"
            streams[stream] += bytes(data)
        return out
    finally:
        db.close()


def _check_complete(streams: Dict[str, bytes], name: str) -> int:
    """Every line once and in order in both streams; how many numbered lines."""
    lines = streams["stdout"].decode().splitlines()
    numbered = [line for line in lines if line.startswith("line ")]
    assert numbered == [f"line {i}" for i in range(1, len(numbered) + 1)], f"{name}: {lines[:5]}..."
    assert lines[len(numbered):] == [f"after {j}" for j in range(1, 21)], f"{name}: {lines[-25:]}"
    errors = streams["stderr"].decode().splitlines()
    assert errors == [f"err {i}" for i in range(1, len(numbered) + 1)], f"{name}: stderr differs"
    return len(numbered)


def _restart_and_finish(tmp_path: Path, slaves: SlaveProcesses, port: int, sig: int, times: int = 1) -> None:
    master, job_id, go = _job_mid_run(tmp_path, slaves, port)
    before = {n: s["stdout_bytes"] for n, s in _record(master, job_id)["slaves"].items()}
    old_follower = subprocess.Popen([sys.executable, "-m", "remsh", "--master", str(master.sock), "job", job_id,
                                     "--follow", "--no-summary"], env=_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
    wait_until(lambda: old_follower.stdout is not None and old_follower.stdout.peek(1), WAIT, "the follower's output")
    for _ in range(times):
        master.stop(sig)
        time.sleep(0.5)  # the commands go on printing while no master is there: kept by the slaves
        master = _start(tmp_path, port)
        wait_names(master.sock, NAMES)
        rows = json.loads(remsh(master.sock, "ls", "--json").stdout)
        assert {(r["name"], r["state"], r["job"]) for r in rows} == {(n, "busy", job_id) for n in NAMES}, rows
        seen = {n: s["stdout_bytes"] for n, s in _record(master, job_id)["slaves"].items()}
        wait_until(lambda: all(s["stdout_bytes"] > seen[n] for n, s in _record(master, job_id)["slaves"].items()),
                   WAIT, "output stored by the new master")
    second = master
    _, err = old_follower.communicate(timeout=WAIT)
    assert old_follower.returncode == 3 and b"lost the master" in err, err  # the job goes on without it
    try:
        wait_names(second.sock, NAMES)
        follower = subprocess.Popen([sys.executable, "-m", "remsh", "--master", str(second.sock), "job", job_id,
                                     "--follow", "--no-summary"], env=_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
        go.touch()
        out, err = follower.communicate(timeout=WAIT)
        assert follower.returncode == 1, err.decode()  # several slaves, some failed: as run would say
        rec = _record(second, job_id)
        assert rec["state"] == "failed", rec
        for name, status in STATUSES.items():
            slave = rec["slaves"][name]
            assert slave["state"] == ("ok" if status == 0 else "failed"), slave
            assert slave["exit_status"] == status, slave
        stored = _stored(second.sock, job_id)
        for name in NAMES:
            count = _check_complete(stored[name], name)
            assert len(stored[name]["stdout"]) > before[name], f"{name}: nothing printed after the restart"
            shown = [line for line in out.decode().splitlines() if line.startswith(f"{name} | ")]
            assert shown == [f"{name} | line {i}" for i in range(1, count + 1)] + \
                [f"{name} | after {j}" for j in range(1, 21)], f"{name}: follow showed {shown[-3:]}"
        fresh = remsh(second.sock, "run", "--", "echo", "fresh")
        assert fresh.returncode == 0, fresh.stderr.decode()
        assert sorted(fresh.stdout.decode().splitlines()) == [f"{n} | fresh" for n in NAMES]
        assert remsh(second.sock, "jobs", "--running", "--json").stdout.strip() == b"[]"
    finally:
        second.stop()


def test_a_killed_master_restarted_takes_back_running_commands(fleet: Tuple[Path, SlaveProcesses, int]) -> None:
    """SIGKILL mid-job, twice, restarts on the same state dir: every line stored once, exit statuses right, follow shows all, a new job works."""
    _restart_and_finish(*fleet, signal.SIGKILL, times=2)


def test_a_master_stopped_by_sigterm_hands_its_commands_to_the_next(fleet: Tuple[Path, SlaveProcesses, int]) -> None:
    """SIGTERM mid-job keeps the commands running; the next master on the same state dir takes them back completely."""
    _restart_and_finish(*fleet, signal.SIGTERM)


def test_a_slave_that_does_not_come_back_ends_lost_after_the_resume_timeout(
        fleet: Tuple[Path, SlaveProcesses, int]) -> None:
    """Master killed, one slave killed too: the next master (--resume-timeout 3) records it lost, the other's command completes."""
    tmp_path, slaves, port = fleet
    master, job_id, go = _job_mid_run(tmp_path, slaves, port, names=NAMES[:2])
    master.stop(signal.SIGKILL)
    victim = next(p for p in slaves.procs if p.name == "r-2")
    victim.popen.send_signal(signal.SIGKILL)
    victim.popen.wait(WAIT)
    started = time.monotonic()
    second = _start(tmp_path, port, "--resume-timeout", "3")
    try:
        wait_until(lambda: _record(second, job_id)["slaves"]["r-2"]["state"] in ("away", "lost"), WAIT,
                   "r-2 to be away")
        go.touch()
        wait_until(lambda: _record(second, job_id)["state"] != "running", WAIT, "the job to end")
        elapsed = time.monotonic() - started
        rec = _record(second, job_id)
        assert rec["slaves"]["r-2"]["state"] == "lost", rec
        assert "did not come back within 3 s" in rec["slaves"]["r-2"]["error"], rec
        assert rec["slaves"]["r-1"]["state"] == "ok" and rec["slaves"]["r-1"]["exit_status"] == 0, rec
        assert rec["state"] == "failed"
        assert elapsed < 3 + WAIT / 2
        _check_complete(_stored(second.sock, job_id)["r-1"], "r-1")
        r = remsh(second.sock, "job", job_id, "--follow", "--no-summary")
        assert r.returncode == 3, r.stderr.decode()  # a slave lost: as run would say
    finally:
        second.stop()


# -- ack-after-commit, no processes ---------------------------------------------------------


def test_ack_counter_never_acknowledges_past_the_commit_point() -> None:
    """With a commit point, delivered boxes are acknowledged only up to it; commit moves it at once; None goes back to delivered."""
    acks = AckCounter()
    acks.commit(0, 0)
    assert all(acks.delivered(n, 1 << 20) is None for n in range(1, 200))  # big and many: still held
    assert acks.commit(150, 199) == encode_box({b"ack": b"150"})
    assert acks.delivered(200, 10) is None and acks.acked == 150
    assert acks.commit(None, 200) == encode_box({b"ack": b"200"})
    plain = AckCounter()
    assert plain.delivered(1, 2 << 20) == encode_box({b"ack": b"1"})  # today's rule: by bytes


def _pair() -> Tuple[Wire, Wire]:
    a, b = socket.socketpair()
    return Wire(SocketStream(a), label="master"), Wire(SocketStream(b), label="slave")


class _FakeSlave:
    """Only what the sink reads of a slave: its session."""

    def __init__(self, wire: SessionWire) -> None:
        self.wire = wire


def test_output_is_acknowledged_only_once_committed_with_its_session_count(tmp_path: Path) -> None:
    """A job's sink acknowledges a slave's boxes only after the store has their output, and the stored session count is the acknowledged one."""
    mine, theirs = _pair()
    slave_side = SessionWire(theirs, "a" * 32, resume_timeout=30)
    master_side = SessionWire(mine, "a" * 32, resume_timeout=30)
    with SqliteJobStore(str(tmp_path / "jobs.sqlite")) as store:
        job = store.create_job("run", {"argv": ["x"]}, 0, ["s"])
        sink = StoreSink(store, job.id, Cancellation(), keep_sessions=True)

        class Call:
            want_stdin = False

        sink.requested("s", _FakeSlave(master_side), Call())
        for i in range(300):  # more than ACK_EVERY_BOXES: today's rule would have acknowledged
            slave_side.send_box({b"stream": b"stdout", b"data": b"%d\n" % i})
            box = master_side.read_box(5)
            assert box is not None
            sink.output("s", "stdout", box[b"data"])
            # nothing the store lacks is acknowledged: the slave still keeps it
            slave_side.feed_available()
            slave_side.poll_box()
            assert slave_side.peer_acked <= store.open_sessions()[0].received
        sink.flush()
        assert store.open_sessions()[0].received == 300
        wait_until(lambda: (slave_side.feed_available(), slave_side.poll_box(), slave_side.peer_acked)[2] == 300,
                   WAIT, "the acknowledgement of the committed boxes")
        assert store.output_position(job.id, "s") == (sum(len(b"%d\n" % i) for i in range(300)), 0)
        from remsh.fleet import SlaveResult

        sink.end(SlaveResult("s", status=0))
        assert store.open_sessions() == []
    master_side.close()
    slave_side.close()


def test_sessions_are_stored_updated_with_output_and_dropped_with_their_job(tmp_path: Path) -> None:
    """open_session/open_sessions round-trip; append_output moves the count in its transaction; pruning the job drops it."""
    with SqliteJobStore(str(tmp_path / "jobs.sqlite"), keep=1.0) as store:
        job = store.create_job("run", {"argv": ["x"]}, 0, ["s"])
        store.open_session(SessionRecord("b" * 32, "s", job.id, "execute", 7, 3, 3))
        assert [(s.id, s.request_box, s.reply_base, s.received) for s in store.open_sessions()] == \
            [("b" * 32, 7, 3, 3)]
        store.append_output(job.id, "s", "stdout", 0, b"hello", session=("b" * 32, 9))
        assert store.open_sessions()[0].received == 9
        store.close_session("b" * 32)
        assert store.open_sessions() == []
        store.open_session(SessionRecord("c" * 32, "s", job.id, "execute", 1, 1, 1))
        store.finish_job(job.id, "done", now=time.time() - 10)
        assert store.prune() == 1 and store.open_sessions() == []


def test_a_version_2_store_is_migrated_to_keep_sessions(tmp_path: Path) -> None:
    """A store written with schema 2 opens as version 3, its jobs kept, and can record sessions."""
    path = str(tmp_path / "jobs.sqlite")
    db = sqlite3.connect(path)
    for version in (0, 1):
        for statement in MIGRATIONS[version]:
            db.execute(statement)
    db.execute("PRAGMA user_version = 2")
    db.execute("INSERT INTO jobs (id, kind, spec, uid, state, started) VALUES ('0000000001-0', 'run', '{}', 0, "
               "'running', 1.0)")
    db.execute("INSERT INTO job_slaves (job_id, name, state) VALUES ('0000000001-0', 's', 'running')")
    db.commit()
    db.close()
    with SqliteJobStore(path) as store:
        assert store.get_job("0000000001-0").slaves["s"].state == "running"
        store.open_session(SessionRecord("d" * 32, "s", "0000000001-0", "execute", 0, 0, 0))
        assert len(store.open_sessions()) == 1
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 3
    db.close()


# -- what a new master does with what the old one left, no processes -------------------------


def test_a_new_master_fails_transfers_and_loses_commands_it_cannot_take_back(tmp_path: Path) -> None:
    """At start: a put left running fails with the transfer error; a run without a recorded session is lost; both jobs end failed."""
    from remsh.jobs import TRANSFER_CUT, JobRegistry

    store = SqliteJobStore(str(tmp_path / "jobs.sqlite"))
    put = store.create_job("put", {"paths": ["/a", "/b"]}, 0, ["s"])
    run = store.create_job("run", {"argv": ["x"]}, 0, ["s"])
    for job in (put, run):
        store.update_slave(job.id, "s", state="running")
    registry = JobRegistry(store)
    registry.start()
    try:
        assert store.get_job(put.id).slaves["s"].state == "failed"
        assert store.get_job(put.id).slaves["s"].error == TRANSFER_CUT
        assert store.get_job(run.id).slaves["s"].state == "lost"
        assert store.get_job(put.id).state == store.get_job(run.id).state == "failed"
    finally:
        registry.stop()
        registry.close()


def test_a_recorded_command_waits_away_then_ends_lost_at_the_resume_timeout(tmp_path: Path) -> None:
    """A run whose session is recorded waits 'away' for its slave; with no slave back within the listeners' time it ends lost and its session is forgotten."""
    from remsh.jobs import JobRegistry

    store = SqliteJobStore(str(tmp_path / "jobs.sqlite"))
    job = store.create_job("run", {"argv": ["x"]}, 0, ["s"])
    store.update_slave(job.id, "s", state="running")
    store.open_session(SessionRecord("e" * 32, "s", job.id, "execute", 4, 2, 2))
    registry = JobRegistry(store)
    registry.start()
    try:
        assert store.get_job(job.id).slaves["s"].state == "away"
        assert registry.adoptions.claim("f" * 32, "s") is None  # another id: nothing
        assert registry.adoptions.claim("e" * 32, "t") is None  # another slave's name: nothing
        registry.adoptions.offer(1.0)
        wait_until(lambda: store.get_job(job.id).state == "failed", WAIT, "the job to end")
        rec = store.get_job(job.id).slaves["s"]
        assert rec.state == "lost" and "did not come back within 1 s" in (rec.error or "")
        assert store.open_sessions() == []
    finally:
        registry.stop()
        registry.close()


def test_jobs_a_stopping_master_cannot_hand_over_fail_rather_than_cancel(tmp_path: Path) -> None:
    """A job with nothing to hand over (no session) is failed by a stopping master, its slave failed with 'the master is stopping'."""
    import threading

    from remsh.fleet import SlaveResult
    from remsh.jobs import MASTER_STOPPING, JobRegistry

    store = SqliteJobStore(str(tmp_path / "jobs.sqlite"))
    registry = JobRegistry(store)
    registry.start()
    started = threading.Event()

    def work(sink, cancellation):
        sink.start("s")
        started.set()
        while not cancellation.cancelled:
            time.sleep(0.01)
        result = SlaveResult("s", status=-9)
        sink.end(result)
        return [result]

    job = registry.submit("run", {"argv": ["x"]}, 0, ["s"], work)
    assert started.wait(WAIT)
    registry.stop()
    try:
        record = store.get_job(job.id)
        assert record.state == "failed", record
        assert record.slaves["s"].state == "failed" and record.slaves["s"].error == MASTER_STOPPING
    finally:
        registry.close()


class _SlaveOfSession:
    """Only what taking a command back uses of a slave: its name, its session, its operation frame."""

    def __init__(self, name: str, wire: SessionWire) -> None:
        self.name = name
        self.wire = wire

    def operation(self, meth: str):
        import contextlib
        import types

        @contextlib.contextmanager
        def frame():
            yield types.SimpleNamespace(wire=self.wire)

        return frame()


def test_a_command_taken_back_goes_on_into_its_record_acknowledged_after_commit(tmp_path: Path) -> None:
    """A recorded session claimed and attached: the slave's boxes from the committed count go into the job exactly once, acknowledged only once stored, and the exit ends the job."""
    from remsh.jobs import JobRegistry

    store = SqliteJobStore(str(tmp_path / "jobs.sqlite"))
    job = store.create_job("run", {"argv": ["x"]}, 0, ["s"])
    store.update_slave(job.id, "s", state="running")
    store.append_output(job.id, "s", "stdout", 0, b"before\n")
    store.open_session(SessionRecord("9" * 32, "s", job.id, "execute", 4, 2, 5))  # start reply and output committed
    registry = JobRegistry(store)
    registry.start()
    try:
        claim = registry.adoptions.claim("9" * 32, "s")
        assert claim is not None and claim.committed == 5
        assert registry.adoptions.claim("9" * 32, "s") is None  # claimed once
        mine, theirs = _pair()
        slave_side = SessionWire(theirs, "9" * 32, resume_timeout=30, counts=(5, 5))
        master_side = SessionWire(mine, "9" * 32, resume_timeout=30, counts=(5, 5))
        registry.adoptions.attach(claim, _SlaveOfSession("s", master_side), 5)
        assert store.get_job(job.id).slaves["s"].state == "running"
        for i in range(300):
            slave_side.send_box({b"stream": b"stdout", b"data": b"%d\n" % i})
            slave_side.feed_available()
            slave_side.poll_box()
            assert slave_side.peer_acked <= store.open_sessions()[0].received
        slave_side.send_box({b"result": b"4"})
        wait_until(lambda: store.get_job(job.id).state != "running", WAIT, "the job to end")
        record = store.get_job(job.id)
        assert record.state == "failed" and record.slaves["s"].exit_status == 4, record
        out = b"".join(c.data for _, c in store.read_output(job.id, limit=10_000))
        assert out == b"before\n" + b"".join(b"%d\n" % i for i in range(300))
        assert store.open_sessions() == []
        slave_side.close()
    finally:
        registry.stop()
        registry.close()


def test_a_slave_registering_afresh_ends_its_recorded_command_lost_at_once(tmp_path: Path) -> None:
    """A slave that registers as a new process (no resume) while its recorded command waits: that command is lost at once, not after the resume time."""
    from remsh.jobs import JobRegistry

    store = SqliteJobStore(str(tmp_path / "jobs.sqlite"))
    job = store.create_job("run", {"argv": ["x"]}, 0, ["s", "t"])
    for name in ("s", "t"):
        store.update_slave(job.id, name, state="running")
    store.open_session(SessionRecord("a1" * 16, "s", job.id, "execute", 4, 2, 2))
    store.open_session(SessionRecord("b2" * 16, "t", job.id, "execute", 4, 2, 2))
    registry = JobRegistry(store)
    registry.start()
    try:
        registry.adoptions.slave_restarted("s")
        rec = store.get_job(job.id).slaves
        assert rec["s"].state == "lost" and "new process" in (rec["s"].error or "")
        assert rec["t"].state == "away" and registry.adoptions.waiting() == 1
        assert [s.name for s in store.open_sessions()] == ["t"]
    finally:
        registry.stop()
        registry.close()


def test_the_next_command_on_a_session_waits_for_the_previous_jobs_end_to_be_recorded(tmp_path: Path) -> None:
    """Job B's request on a session whose previous command (job A) has not recorded its end yet waits for it; A's output and end are kept, and the session's record is then B's."""
    import threading

    from remsh.fleet import SlaveResult

    mine, theirs = _pair()
    slave_side = SessionWire(theirs, "c3" * 16, resume_timeout=30)
    master_side = SessionWire(mine, "c3" * 16, resume_timeout=30)

    class Call:
        want_stdin = False

    with SqliteJobStore(str(tmp_path / "jobs.sqlite")) as store:
        a = store.create_job("run", {"argv": ["a"]}, 0, ["s"])
        b = store.create_job("run", {"argv": ["b"]}, 0, ["s"])
        sink_a = StoreSink(store, a.id, Cancellation(), keep_sessions=True)
        sink_b = StoreSink(store, b.id, Cancellation(), keep_sessions=True)
        sink_a.requested("s", _FakeSlave(master_side), Call())
        slave_side.send_box({b"stream": b"stdout", b"data": b"last words\n"})
        box = master_side.read_box(5)
        assert box is not None
        sink_a.output("s", "stdout", box[b"data"])  # held, not yet written: A's end is still to come
        b_recorded = threading.Event()
        thread = threading.Thread(target=lambda: (sink_b.requested("s", _FakeSlave(master_side), Call()),
                                                  b_recorded.set()))
        thread.start()
        assert not b_recorded.wait(0.3), "B's request went ahead of A's end"
        sink_a.end(SlaveResult("s", status=0))
        assert b_recorded.wait(WAIT)
        thread.join(WAIT)
        assert store.output_position(a.id, "s") == (len(b"last words\n"), 0)
        assert store.get_job(a.id).slaves["s"].state == "ok"
        assert [(s.job_id, s.received) for s in store.open_sessions()] == [(b.id, 1)]
    master_side.close()
    slave_side.close()
