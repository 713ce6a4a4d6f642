"""Work crossing masters (:mod:`remsh.crossmaster`): ``run``, ``put``,
``get`` and ``cancel`` given to one master reach a slave another master
holds.  Two real ``remsh master`` processes on one real PostgreSQL server
(:mod:`tests.pgserver`), a real ``remsh-slave`` on each (the fixture of
tests/test_store_postgres_masters.py); the store's calls on real stores."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from remsh import crossmaster
from remsh.carry import BlobReader, BlobWriter, CarryFailed, load_path, store_path
from remsh.crossmaster import Crossing
from remsh.errors import LimitExceeded
from remsh.jobs import StoreSink
from remsh.master.fanout import Cancellation
from remsh.pacing import Pacing
from remsh.store import pgdispatch
from remsh.store.fencing import NotOwner
from remsh.store.postgres import LEASE, PostgresJobStore
from tests.pgserver import PgServer, pg_server, pg_uri  # noqa: F401 - fixtures
from tests.slaveproc import SECRET, WAIT, SlaveProcesses
from tests.test_fleet import Master, ls, remsh, stop_all
from tests.test_store_postgres_masters import _lines, store_uri  # noqa: F401 - fixture
from tests.util import wait_until

pytestmark = pytest.mark.timeout(240)

COUNT = 60
#: COUNT numbered lines, then exit status 3.
LINES_THEN_3 = ["sh", "-c", f"i=1; while [ $i -le {COUNT} ]; do echo line $i; i=$((i+1)); done; exit 3"]
#: How soon a slave of one master shows on the other (the registry's look every 2 s, slack for load).
SHOWN_WITHIN = 10.0


#: The lease and heartbeat of the masters of the tests that kill one.
QUICK_LEASE, QUICK_HEARTBEAT = 5.0, 0.5
#: Their --resume-timeout: how long a master that adopted a dead one's part waits for its slave.
QUICK_RESUME = 3.0


@pytest.fixture
def cluster(tmp_path: Path, store_uri: str) -> Iterator[Tuple[Master, Master, SlaveProcesses]]:  # noqa: F811
    """Masters ``a`` and ``b`` on one store, slave ``s-a`` on a, ``s-b`` on b, both listed on a."""
    yield from _cluster(tmp_path, store_uri)


@pytest.fixture
def quick_cluster(tmp_path: Path, pg_server: PgServer,  # noqa: F811
                  monkeypatch: pytest.MonkeyPatch) -> Iterator[Tuple[Master, Master, SlaveProcesses]]:
    """:func:`cluster` with masters whose lease is QUICK_LEASE seconds, resume timeout QUICK_RESUME."""
    monkeypatch.setenv("REMSH_STORE_LEASE", str(QUICK_LEASE))
    monkeypatch.setenv("REMSH_STORE_HEARTBEAT", str(QUICK_HEARTBEAT))
    name = pg_server.new_database()
    try:
        yield from _cluster(tmp_path, pg_server.uri(name), "--resume-timeout", str(QUICK_RESUME))
    finally:
        pg_server.drop_database(name)


def _cluster(tmp_path: Path, store_uri: str,  # noqa: F811
             *extra: str) -> Iterator[Tuple[Master, Master, SlaveProcesses]]:
    slaves = SlaveProcesses(tmp_path / "slaves")
    secret = slaves.secret_file(SECRET)
    masters: List[Master] = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            masters.append(Master(tmp_path / name, tmp_path / name / "m.sock", secret_file=secret,
                                  extra=["--store", store_uri, "--name", name, *extra]).wait_ready())
        for master, slave in zip(masters, ("s-a", "s-b")):
            slaves.start(master.port, slave, max_backoff=0.5)
        a = masters[0]
        wait_until(lambda: {(r["name"], r.get("master"), r["state"]) for r in ls(a.sock)}
                   == {("s-a", "a", "idle"), ("s-b", "b", "idle")}, SHOWN_WITHIN, "both slaves listed on a")
        yield masters[0], masters[1], slaves
    finally:
        stop_all(masters)
        slaves.close()


def _record(master: Master, job_id: str) -> Dict[str, Any]:
    r = remsh(master.sock, "jobs", "--json")
    assert r.returncode == 0, r.stderr.decode()
    return {j["id"]: j for j in json.loads(r.stdout)}[job_id]


def _last_job(master: Master) -> str:
    r = remsh(master.sock, "jobs", "--json", "-n", "1")
    return str(json.loads(r.stdout)[0]["id"])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_run_on_one_master_reaches_a_slave_of_the_other(cluster) -> None:
    """run -t s-b on master a: its 60 lines stream once, exit status 3 passes through; job ID on either master shows the same."""
    a, b, _ = cluster
    r = remsh(a.sock, "run", "-t", "s-b", "--", *LINES_THEN_3)
    want = [f"line {i}" for i in range(1, COUNT + 1)]
    assert r.returncode == 3, r.stderr.decode() + a.text() + b.text()
    assert _lines(r.stdout, "s-b") == want, r.stdout.decode()[:500]
    job_id = _last_job(a)
    for master in (a, b):
        shown = remsh(master.sock, "job", job_id)
        assert _lines(shown.stdout, "s-b") == want
        record = _record(master, job_id)
        assert record["state"] == "failed" and record["slaves"]["s-b"]["exit_status"] == 3
        assert record["slaves"]["s-b"]["stdout_bytes"] == sum(len(x) + 1 for x in want)


def test_a_job_on_every_slave_runs_on_both_masters_slaves(cluster) -> None:
    """run with no -t on master a: both slaves, its own and b's, run it and end ok."""
    a, _, _ = cluster
    r = remsh(a.sock, "run", "--", "sh", "-c", "echo hello; echo done")
    assert r.returncode == 0, r.stderr.decode() + a.text()
    for name in ("s-a", "s-b"):
        assert _lines(r.stdout, name)[-1] == "done", r.stdout.decode()
    record = _record(a, _last_job(a))
    assert {n: s["state"] for n, s in record["slaves"].items()} == {"s-a": "ok", "s-b": "ok"}


def test_stdin_is_refused_for_a_slave_of_another_master(cluster) -> None:
    """run --stdin choosing b's slave on master a is refused (exit 2, naming the slave); no job is made."""
    a, _, _ = cluster
    r = remsh(a.sock, "run", "--stdin", "-t", "s-b", "--", "cat", input=b"data\n")
    assert r.returncode == 2 and "--stdin does not reach slaves held by another master (s-b)" in r.stderr.decode()
    assert json.loads(remsh(a.sock, "jobs", "--json").stdout) == []


def test_put_and_get_cross_masters_whole(cluster, tmp_path: Path) -> None:
    """put on master a to b's slave, then get back through a: a 3.5 MiB file (several 1 MiB rows) arrives with the same SHA-256, its mode kept; the store keeps no bytes after."""
    a, b, _ = cluster
    src = tmp_path / "payload.bin"
    src.write_bytes(os.urandom(3 * (1 << 20) + 12345))
    src.chmod(0o750)
    remote_dir = tmp_path / "on-s-b"
    remote_dir.mkdir()
    r = remsh(a.sock, "put", "-t", "s-b", str(src), str(remote_dir))
    assert r.returncode == 0, r.stderr.decode() + a.text() + b.text()
    landed = remote_dir / "payload.bin"
    assert _sha(landed) == _sha(src) and landed.stat().st_mode & 0o777 == 0o750
    out = tmp_path / "got"
    r = remsh(a.sock, "get", "-t", "s-b", str(landed), str(out))
    assert r.returncode == 0, r.stderr.decode() + a.text() + b.text()
    got = out / "s-b" / "payload.bin"
    assert _sha(got) == _sha(src)
    assert os.listdir(out / "s-b") == ["payload.bin"]  # no partial file left beside it
    record = _record(b, _last_job(a))
    assert record["slaves"]["s-b"]["state"] == "ok"


def test_a_tree_crosses_masters_both_ways(cluster, tmp_path: Path) -> None:
    """put of a directory tree on master a to b's slave, then get of it back through a: every file arrives with its content."""
    a, _, _ = cluster
    tree = tmp_path / "tree"
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tree / "one.txt").write_text("one\n")
    (tree / "sub" / "two.txt").write_text("two\n")
    dest = tmp_path / "tree-on-s-b"
    r = remsh(a.sock, "put", "-t", "s-b", str(tree), str(dest))
    assert r.returncode == 0, r.stderr.decode() + a.text()
    assert (dest / "one.txt").read_text() == "one\n" and (dest / "sub" / "two.txt").read_text() == "two\n"
    out = tmp_path / "got"
    r = remsh(a.sock, "get", "-t", "s-b", str(dest), str(out))
    assert r.returncode == 0, r.stderr.decode() + a.text()
    back = out / "s-b" / dest.name
    assert (back / "one.txt").read_text() == "one\n" and (back / "sub" / "two.txt").read_text() == "two\n"
    assert os.listdir(out / "s-b") == [dest.name]


def test_a_failed_get_across_masters_leaves_nothing(cluster, tmp_path: Path) -> None:
    """get through master a from b's slave of a missing file, and of one past --max-bytes: both fail, and LOCALDIR holds no file, partial or whole."""
    a, _, _ = cluster
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(200_000))
    out = tmp_path / "got"
    r = remsh(a.sock, "get", "-t", "s-b", str(tmp_path / "missing"), str(out))
    assert r.returncode != 0
    r2 = remsh(a.sock, "get", "--max-bytes", "100000", "-t", "s-b", str(big), str(out))
    assert r2.returncode != 0, r2.stdout.decode()
    left = [str(p) for p in out.rglob("*")] if out.exists() else []
    assert left == [], left
    record = _record(a, _last_job(a))
    assert record["slaves"]["s-b"]["state"] == "failed"


def test_cancel_from_one_master_stops_a_command_on_the_others_slave(cluster, tmp_path: Path) -> None:
    """run --detach on a of a long command on b's slave, then remsh cancel on a: its process is gone within seconds and the job ends cancelled."""
    a, b, _ = cluster
    pidfile = tmp_path / "pid"
    r = remsh(a.sock, "run", "--detach", "-t", "s-b", "--", "sh", "-c", f"echo $$ > {pidfile}; echo started; "
              f"exec sleep 120")
    assert r.returncode == 0, r.stderr.decode()
    job_id = r.stdout.decode().strip()
    wait_until(lambda: _record(a, job_id)["slaves"]["s-b"]["stdout_bytes"] > 0, WAIT, "the command to start")
    pid = int(pidfile.read_text())
    r = remsh(a.sock, "cancel", job_id)
    assert r.returncode == 0, r.stderr.decode()

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat") as f:  # a zombie not yet reaped is gone too
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"

    wait_until(gone, 3.0, "the command's process to be gone")
    wait_until(lambda: _record(a, job_id)["state"] == "cancelled", WAIT, "the job to end cancelled")
    assert _record(b, job_id)["slaves"]["s-b"]["state"] == "cancelled"


def test_cancel_on_the_holder_of_another_masters_job(cluster, tmp_path: Path) -> None:
    """A job of master a running on b's slave, cancelled on b: it reaches a, which owns the job, and back to b's slave."""
    a, b, _ = cluster
    r = remsh(a.sock, "run", "--detach", "-t", "s-b", "--", "sh", "-c", "echo started; exec sleep 120")
    job_id = r.stdout.decode().strip()
    wait_until(lambda: _record(b, job_id)["slaves"]["s-b"]["stdout_bytes"] > 0, WAIT, "the command to start")
    r = remsh(b.sock, "cancel", job_id)
    assert r.returncode == 0, r.stderr.decode()
    wait_until(lambda: _record(b, job_id)["state"] == "cancelled", WAIT, "the job to end cancelled")


def test_a_holder_killed_mid_part_leaves_it_lost_not_running(quick_cluster) -> None:
    """Master b SIGKILLed while it runs a's job on its slave, which never comes back: a adopts b's session of the part, and past the resume timeout the part ends lost and the job ends, never running forever."""
    a, b, slaves = quick_cluster
    r = remsh(a.sock, "run", "--detach", "-t", "s-b", "--", "sh", "-c", "echo started; exec sleep 300")
    job_id = r.stdout.decode().strip()
    wait_until(lambda: _record(a, job_id)["slaves"]["s-b"]["stdout_bytes"] > 0, WAIT, "the command to start")
    b.stop(signal.SIGKILL)
    wait_until(lambda: _record(a, job_id)["state"] != "running", QUICK_LEASE + QUICK_RESUME + 2 * WAIT,
               "the job to end")
    record = _record(a, job_id)
    assert record["slaves"]["s-b"]["state"] == "lost", record
    assert f"did not come back within {QUICK_RESUME:g} s" in (record["slaves"]["s-b"]["error"] or ""), record


def test_a_holder_stopped_cleanly_ends_its_part_failed_at_once(cluster) -> None:
    """Master b stopped with SIGTERM while it runs a's job on its slave: the part ends failed, "the master is stopping", without waiting for a lease."""
    a, b, _ = cluster
    r = remsh(a.sock, "run", "--detach", "-t", "s-b", "--", "sh", "-c", "echo started; exec sleep 300")
    job_id = r.stdout.decode().strip()
    wait_until(lambda: _record(a, job_id)["slaves"]["s-b"]["stdout_bytes"] > 0, WAIT, "the command to start")
    assert b.stop() == 0
    wait_until(lambda: _record(a, job_id)["state"] != "running", LEASE - 5, "the job to end, before b's lease passed")
    part = _record(a, job_id)["slaves"]["s-b"]
    assert (part["state"], part["error"]) == ("failed", "the master is stopping"), part


def test_an_origin_killed_mid_part_is_followed_by_the_master_adopting_its_job(quick_cluster) -> None:
    """Master a SIGKILLed while b runs a's job on s-b: b adopts the job and follows the part again; its 60 lines are stored once and the job ends done."""
    a, b, _ = quick_cluster
    slow = ["sh", "-c", f"i=1; while [ $i -le {COUNT} ]; do echo line $i; i=$((i+1)); sleep 0.15; done"]
    r = remsh(a.sock, "run", "--detach", "-t", "s-b", "--", *slow)
    job_id = r.stdout.decode().strip()
    wait_until(lambda: _record(b, job_id)["slaves"]["s-b"]["stdout_bytes"] > 0, WAIT, "the command to start")
    a.stop(signal.SIGKILL)
    wait_until(lambda: _record(b, job_id)["state"] != "running", QUICK_LEASE + 3 * WAIT, "the job to end")
    record = _record(b, job_id)
    assert record["state"] == "done" and record["slaves"]["s-b"]["exit_status"] == 0, record
    shown = remsh(b.sock, "job", job_id)
    assert _lines(shown.stdout, "s-b") == [f"line {i}" for i in range(1, COUNT + 1)]


def test_a_restarted_origin_follows_the_parts_it_left_to_other_masters(cluster, tmp_path: Path,
                                                                        store_uri: str) -> None:  # noqa: F811
    """Master a stopped (SIGTERM) and started again while b runs its job on s-b: the part goes on untouched and the new a ends the job done with every line once."""
    a, b, slaves = cluster
    slow = ["sh", "-c", f"i=1; while [ $i -le {COUNT} ]; do echo line $i; i=$((i+1)); sleep 0.1; done"]
    r = remsh(a.sock, "run", "--detach", "-t", "s-b", "--", *slow)
    job_id = r.stdout.decode().strip()
    wait_until(lambda: _record(b, job_id)["slaves"]["s-b"]["stdout_bytes"] > 0, WAIT, "the command to start")
    assert a.stop() == 0
    assert _record(b, job_id)["state"] == "running"
    (tmp_path / "a2").mkdir()
    again = Master(tmp_path / "a2", tmp_path / "a2" / "m.sock", secret_file=slaves.secret_file(SECRET),
                   extra=["--store", store_uri, "--name", "a"]).wait_ready()
    try:
        r = remsh(again.sock, "job", job_id, "--follow")
        assert r.returncode == 0, r.stderr.decode() + again.text()
        assert _lines(r.stdout, "s-b") == [f"line {i}" for i in range(1, COUNT + 1)]
        assert _record(b, job_id)["state"] == "done"
    finally:
        again.stop()


# -- the store's calls ---------------------------------------------------------------------


def test_a_claim_lets_one_master_write_another_masters_job_and_only_while_it_runs(pg_uri) -> None:  # noqa: F811
    """Master y may write slave s's record and output of x's job only while it holds the claim of s's part; two claims race, one wins; a settled claim refuses y's writes."""
    x = PostgresJobStore(pg_uri, "x")
    y = PostgresJobStore(pg_uri, "y")
    z = PostgresJobStore(pg_uri, "z")
    try:
        job = x.create_job("run", {"argv": ["true"]}, 0, ["s", "t"])
        with pytest.raises(NotOwner):
            y.update_slave(job.id, "s", state="running")
        x.dispatch_write(pgdispatch.ask, job.id, [("s", "y"), ("t", "y")], "run", {"argv": ["true"]})
        pending = {d.slave: d for d in y.dispatch_read(pgdispatch.for_holder, "y", ["s"])}
        assert list(pending) == ["s"] and pending["s"].state == "pending"
        won = [store.dispatch_write(pgdispatch.claim, [pending["s"].id], repeatable=False) for store in (y, z)]
        assert won == [[pending["s"].id], []]
        y.update_slave(job.id, "s", state="running")
        assert y.append_output(job.id, "s", "stdout", 0, b"hello\n") == 6
        with pytest.raises(NotOwner):  # t's part is not y's
            y.append_output(job.id, "t", "stdout", 0, b"no\n")
        with pytest.raises(NotOwner):
            z.update_slave(job.id, "s", state="ok")
        d = pending["s"]
        assert x.dispatch_write(pgdispatch.settle, d.id, "running", "lost", "y", y.epoch)
        with pytest.raises(NotOwner):
            y.append_output(job.id, "s", "stdout", 6, b"late\n")
        assert not y.dispatch_write(pgdispatch.finish, d.id, {"status": 0})
        assert [c.data for _, c in x.read_output(job.id)] == [b"hello\n"]
    finally:
        for store in (x, y, z):
            store.close()


def test_bytes_cross_the_store_checked_and_bounded(pg_uri, tmp_path: Path) -> None:  # noqa: F811
    """A file stored and loaded through blobs keeps its SHA-256 and mode; a changed chunk is refused and leaves no file; a blob past its limit is refused with the limit named."""
    x = PostgresJobStore(pg_uri, "x")
    try:
        job = x.create_job("put", {}, 0, ["s"])
        src = tmp_path / "src.bin"
        src.write_bytes(os.urandom((1 << 20) * 2 + 7))
        src.chmod(0o640)
        meta = store_path(x, job.id, "", str(src), 8 << 20, "put")
        assert meta["size"] == src.stat().st_size and meta["sha256"] == _sha(src)
        dest = tmp_path / "dest.bin"
        load_path(x, job.id, "", meta, str(dest), "put")
        assert _sha(dest) == _sha(src) and dest.stat().st_mode & 0o777 == 0o640
        x.dispatch_write(pgdispatch.put_chunk, job.id, "", 1, b"tampered")
        with pytest.raises(CarryFailed):
            load_path(x, job.id, "", meta, str(tmp_path / "other.bin"), "put")
        assert sorted(os.listdir(tmp_path)) == ["dest.bin", "src.bin"]
        writer = BlobWriter(x, job.id, "big", 1000, "s: get")
        with pytest.raises(LimitExceeded, match="at most 1000 bytes"):
            writer.write(b"x" * 1001)
        reader = BlobReader(x, job.id, "nothing", {"size": 10, "sha256": "0"}, "s: get")
        with pytest.raises(CarryFailed, match="missing"):
            reader.read()
        x.dispatch_write(pgdispatch.drop_blob, job.id, "")
        assert x.dispatch_read(pgdispatch.chunk, job.id, "", 0) is None
    finally:
        x.close()


def test_a_part_is_claimed_by_the_master_its_slave_is_on_now(cluster, store_uri: str) -> None:  # noqa: F811
    """A part asked naming master b as the holder of s-a, which is on master a: a claims and runs it, writing into the asking master's job."""
    a, _, _ = cluster
    x = PostgresJobStore(store_uri, "x")
    try:
        job = x.create_job("run", {"argv": ["echo", "moved"]}, 0, ["s-a"])
        x.dispatch_write(pgdispatch.ask, job.id, [("s-a", "b")], "run", {"argv": ["echo", "moved"]})
        wait_until(lambda: x.dispatch_read(pgdispatch.of_job, job.id)[0].state == "done", WAIT, "s-a's part to end")
        assert x.get_job(job.id).slaves["s-a"].state == "ok"
        assert b"".join(c.data for _, c in x.read_output(job.id)) == b"moved\n"
        (d,) = x.dispatch_read(pgdispatch.of_job, job.id)
        assert (d.state, d.claimed_by, d.result["status"]) == ("done", "a", 0)
    finally:
        x.close()


def _origin(store: PostgresJobStore, job_id: str, cancellation: Cancellation) -> threading.Thread:
    """The work of job ``job_id`` on slave ``ghost``, said to be held by master y, in a thread."""
    crossing = Crossing(store, {"ghost": "y"}, "run", {"argv": ["true"]}, {}, Pacing(), 1)
    work = crossing.wrap(lambda sink, c: [])
    thread = threading.Thread(target=work, args=(StoreSink(store, job_id, cancellation), cancellation))
    thread.start()
    return thread


def test_a_part_nobody_claims_ends_lost_and_one_cancelled_before_its_claim_skipped(pg_uri, monkeypatch) -> None:  # noqa: F811
    """A part no master claims ends lost after PENDING_WAIT; one whose job is cancelled before any master claims it ends skipped, its dispatch cancelled."""
    monkeypatch.setattr(crossmaster, "PENDING_WAIT", 0.5)
    x = PostgresJobStore(pg_uri, "x")
    try:
        job = x.create_job("run", {"argv": ["true"]}, 0, ["ghost"])
        _origin(x, job.id, Cancellation()).join(WAIT)
        record = x.get_job(job.id).slaves["ghost"]
        assert record.state == "lost" and "no master holding it took its part" in (record.error or "")
        assert [d.state for d in x.dispatch_read(pgdispatch.of_job, job.id)] == ["lost"]
        monkeypatch.setattr(crossmaster, "PENDING_WAIT", 60.0)
        job = x.create_job("run", {"argv": ["true"]}, 0, ["ghost"])
        cancellation = Cancellation()
        thread = _origin(x, job.id, cancellation)
        wait_until(lambda: x.dispatch_read(pgdispatch.of_job, job.id) != [], WAIT, "the part to be asked")
        cancellation.cancel("interrupted")
        thread.join(WAIT)
        assert not thread.is_alive()
        record = x.get_job(job.id).slaves["ghost"]
        assert (record.state, record.error) == ("skipped", "interrupted")
        assert [d.state for d in x.dispatch_read(pgdispatch.of_job, job.id)] == ["cancelled"]
    finally:
        x.close()
