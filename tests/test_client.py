"""remsh.client against a real ``remsh master`` with real ``remsh-slave``
processes: slaves(), run with exact output and exit statuses, stdin as
bytes and as a file, detach then job(id).wait(), wait's bound, cancel,
put and get, jobs(), unknown ids, no master at the path, threads."""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from remsh.client import Client, Job, JobAlreadyEnded, NoSuchJob, connect
from remsh.control import ControlClient, ControlError, NoMaster
from remsh.errors import RemshError, UsageError, WaitTimeout
from tests.slaveproc import WAIT
from tests.test_fleet import Fleet, ls, running_fleet, wait_names
from tests.test_fleet import remsh as remsh_command
from tests.util import process_alive, wait_until

pytestmark = pytest.mark.timeout(120)

NAMES = ("web-1", "web-2", "db-1")
#: A job id no store has.
NO_SUCH_ID = "0000000000-0"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """One master and three slaves (web-1, web-2, db-1) for the module."""
    with running_fleet(tmp_path_factory.mktemp("client"), NAMES) as f:
        yield f


@pytest.fixture
def client(fleet: Fleet) -> Client:
    return connect(fleet.sock)


def _gate(tmp_path: Path, then: str = "echo bye") -> "tuple[Path, List[str]]":
    """A command that prints hi, waits for a file, then runs ``then``."""
    go = tmp_path / "go"
    return go, ["sh", "-c", f"echo hi; while [ ! -e {go} ]; do sleep 0.05; done; {then}"]


def _all_back(fleet: Fleet) -> None:
    """Wait for every slave to be connected: a cancel that comes as a command
    starts can cost a slave its connection (the fan-out's grace), and it redials."""
    wait_names(fleet.sock, NAMES)


# -- slaves, run -----------------------------------------------------------------------------


def test_slaves_lists_what_ls_json_lists(fleet: Fleet, client: Client) -> None:
    """slaves() gives every connected slave with ls --json's fields and values, sorted by name."""
    rows = client.slaves()
    assert [r["name"] for r in rows] == sorted(NAMES)
    expected = {r["name"]: r for r in ls(fleet.sock)}
    for row in rows:
        mine = dict(row, state=None)
        theirs = dict(expected[row["name"]], state=None)
        assert mine == theirs
        assert row["transport"] == "tcp" and row["since"]


def test_run_returns_each_slaves_exact_output_and_exit_status(client: Client) -> None:
    """run() follows the job to its end: per slave the exact stdout and stderr bytes apart, exit status, state, byte counts."""
    script = ("printf '\\377\\376a\\0b\\r\\n'; printf 'to err\\n' >&2; "
              "case $(basename $PWD) in web-1) exit 0;; web-2) exit 7;; esac; exit 0")
    job = client.run(["sh", "-c", script], targets=["web-*"])
    assert job.done and job.state == "failed" and job.kind == "run"
    assert job.spec["argv"] == ["sh", "-c", script]
    assert sorted(job.results) == ["web-1", "web-2"]
    for name in ("web-1", "web-2"):
        assert job.output(name) == (b"\xff\xfea\x00b\r\n", b"to err\n")
        r = job.results[name]
        assert (r.stdout_bytes, r.stderr_bytes, r.truncated, r.name) == (7, 7, False, name)
        assert r.duration is not None and r.duration >= 0
    one, seven = job.results["web-1"], job.results["web-2"]
    assert (one.state, one.exit_status, one.ok) == ("ok", 0, True)
    assert (seven.state, seven.exit_status, seven.ok) == ("failed", 7, False)
    with pytest.raises(KeyError):
        job.output("db-1")


def test_run_where_and_a_choice_nothing_matches(client: Client) -> None:
    """where= selects by fact; a choice that matches no slave is the master's refusal, a ControlError with exit 2."""
    job = client.run(["true"], where=["name=db-*"])
    assert list(job.results) == ["db-1"] and job.state == "done"
    with pytest.raises(ControlError) as e:
        client.run(["true"], targets=["nosuch-*"])
    assert e.value.exit == 2 and "nosuch-*" in str(e.value)


def test_run_refuses_a_string_argv_and_stdin_with_detach(client: Client) -> None:
    """A string argv, an empty one and stdin with detach are usage errors before anything runs."""
    before = len(client.jobs())
    for call in (lambda: client.run("echo hi"), lambda: client.run([]),  # type: ignore[arg-type]
                 lambda: client.run(["cat"], stdin=b"x", detach=True), lambda: client.run(["true"], targets="web-1")):
        with pytest.raises(UsageError):
            call()
    assert len(client.jobs()) == before


def test_stdin_as_bytes_and_as_a_file_reaches_every_command(client: Client) -> None:
    """stdin= bytes (larger than a chunk, any byte) and a binary file object are forwarded whole to each command."""
    data = bytes(range(256)) * 1200  # 300 KiB: several chunks, flow control
    job = client.run(["cat"], targets=["web-*"], stdin=data)
    assert job.state == "done"
    for name in ("web-1", "web-2"):
        assert job.output(name) == (data, b"")
    job = client.run(["wc", "-c"], targets=["db-1"], stdin=io.BytesIO(b"12345"))
    assert job.output("db-1")[0].strip() == b"5"


# -- detached jobs ------------------------------------------------------------------------------


def test_detach_then_job_wait_with_and_past_its_bound(client: Client, tmp_path: Path) -> None:
    """run(detach=True) returns the running job at once; wait(timeout) past the bound raises WaitTimeout and the job goes on; job(id).wait() ends with all output."""
    go, argv = _gate(tmp_path)
    job = client.run(argv, targets=["web-1", "db-1"], detach=True)
    assert job.state == "running" and not job.done
    assert job.id in [j.id for j in client.jobs(running=True)]
    with pytest.raises(WaitTimeout) as e:
        job.wait(timeout=0.3)
    assert job.id in str(e.value) and isinstance(e.value, RemshError)
    wait_until(lambda: client.job(job.id).output("web-1")[0] == b"hi\n", WAIT, "web-1 to print hi")
    again = client.job(job.id)
    assert again.state == "running" and again.output("db-1")[0] in (b"", b"hi\n")
    go.touch()
    assert again.wait(WAIT) is again
    assert again.state == "done" and again.finished is not None
    for name in ("web-1", "db-1"):
        assert again.output(name) == (b"hi\nbye\n", b"")
        assert again.results[name].state == "ok" and again.results[name].stdout_bytes == 7
    assert job.refresh().state == "done"
    newest = client.jobs(limit=1)
    assert [j.id for j in newest] == [job.id] and job.id not in [j.id for j in client.jobs(running=True)]


def test_cancel_ends_the_commands_and_a_second_cancel_is_told_apart(client: Client, tmp_path: Path) -> None:
    """cancel(id) kills the commands and the job is cancelled; cancelling it again raises JobAlreadyEnded, not NoSuchJob."""
    job = client.run(["sh", "-c", f"echo $$ > {tmp_path}/$(basename $PWD).pid; exec sleep 60"],
                     targets=["web-*"], detach=True)
    pids: Dict[str, int] = {}
    for name in ("web-1", "web-2"):
        pidfile = tmp_path / f"{name}.pid"
        wait_until(lambda: pidfile.exists() and pidfile.read_text().strip() != "", WAIT, f"{name} to start")
        pids[name] = int(pidfile.read_text())
    client.cancel(job.id)
    job.wait(WAIT)
    assert job.state == "cancelled"
    assert {r.state for r in job.results.values()} == {"cancelled"}
    for name, pid in pids.items():
        wait_until(lambda: not process_alive(pid), WAIT, f"the sleep on {name} to end")
    with pytest.raises(JobAlreadyEnded) as e:
        job.cancel()
    assert not isinstance(e.value, NoSuchJob) and "already ended" in str(e.value) and e.value.exit == 2


def test_unknown_and_malformed_ids(client: Client) -> None:
    """An id the store lacks raises NoSuchJob from job() and cancel(); a malformed id is a UsageError."""
    with pytest.raises(NoSuchJob) as e:
        client.job(NO_SUCH_ID)
    assert NO_SUCH_ID in str(e.value)
    with pytest.raises(NoSuchJob):
        client.cancel(NO_SUCH_ID)
    with pytest.raises(NoSuchJob):
        client.transcript(NO_SUCH_ID, follow=True)
    for bad in ("not an id", "../x"):
        with pytest.raises(UsageError):
            client.job(bad)


def test_the_command_line_sees_the_clients_jobs(fleet: Fleet, client: Client) -> None:
    """A job the client ran is the command line's too: remsh job ID prints its output and exits with its status."""
    job = client.run(["sh", "-c", "echo out; exit 4"], targets=["db-1"])
    r = remsh_command(fleet.sock, "job", job.id)
    assert r.returncode == 4 and r.stdout == b"db-1 | out\n"
    r = remsh_command(fleet.sock, "cancel", job.id)
    assert r.returncode == 2 and b"already ended" in r.stderr


# -- put, get -----------------------------------------------------------------------------------


def test_put_then_get_round_trip(fleet: Fleet, client: Client, tmp_path: Path) -> None:
    """put() copies a local file to the chosen slaves, get() brings it back into DEST/NAME/ (bounded by max_bytes); both are ended jobs."""
    src = tmp_path / "payload.bin"
    src.write_bytes(b"\x00payload\xff")
    job = client.put(str(src), "payload.bin", targets=["web-1"])
    assert job.kind == "put" and job.state == "done" and job.results["web-1"].ok
    assert (fleet.base("web-1") / "payload.bin").read_bytes() == b"\x00payload\xff"
    job = client.get("payload.bin", str(tmp_path / "back"), targets=["web-1"])
    assert job.kind == "get" and job.state == "done"
    assert (tmp_path / "back" / "web-1" / "payload.bin").read_bytes() == b"\x00payload\xff"
    job = client.get("payload.bin", str(tmp_path / "small"), targets=["web-1"], max_bytes=4)
    assert job.state == "failed" and job.results["web-1"].state == "failed"
    assert "max_bytes" in (job.results["web-1"].error or "")
    assert not (tmp_path / "small" / "web-1").exists()  # a failed get leaves no empty directory
    with pytest.raises(ControlError) as e:
        client.put(str(tmp_path / "missing"), "x", targets=["web-1"])
    assert "missing" in str(e.value)


# -- connecting ----------------------------------------------------------------------------------


def test_no_master_at_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """connect() to a path where no master runs raises NoMaster naming the path, given or from $REMSH_MASTER."""
    path = tmp_path / "none.sock"
    with pytest.raises(NoMaster) as e:
        connect(str(path))
    assert str(path) in str(e.value)
    monkeypatch.setenv("REMSH_MASTER", str(path))
    with pytest.raises(NoMaster):
        connect()


def test_connect_without_a_path_uses_remsh_master(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """connect() with no path reaches the master $REMSH_MASTER names, as the command line does."""
    monkeypatch.setenv("REMSH_MASTER", str(fleet.sock))
    client = connect()
    assert client.path == str(fleet.sock)
    assert [r["name"] for r in client.slaves()] == sorted(NAMES)


def test_one_client_serves_several_threads(client: Client) -> None:
    """Runs from four threads at once through one client each get their own job and output."""
    results: Dict[int, bytes] = {}
    errors: List[BaseException] = []

    def work(i: int) -> None:
        try:
            job = client.run(["echo", f"thread {i}"], targets=["db-1"])
            results[i] = job.output("db-1")[0]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert errors == [] and results == {i: f"thread {i}\n".encode() for i in range(4)}


def test_an_exception_while_following_cancels_the_job(fleet: Fleet, client: Client, tmp_path: Path) -> None:
    """An exception raised in the following thread (a KeyboardInterrupt) closes the connection and the master cancels the job."""
    _, argv = _gate(tmp_path, then="sleep 60")
    seen: List[str] = []

    def mine() -> List[str]:
        return [j.id for j in client.jobs(running=True) if j.spec.get("argv") == argv]

    def interrupt_when_started() -> None:
        wait_until(lambda: bool(mine()), WAIT, "the job to start")
        seen.extend(mine())
        # its command running (a slave not yet started when the job is cancelled ends skipped)
        wait_until(lambda: client.job(seen[0]).results["web-2"].state == "running", WAIT,
                   "the command to start")
        # the follower reads the socket: closing it from here is what an
        # exception in that thread does to the connection
        os.kill(os.getpid(), 2)

    timer = threading.Thread(target=interrupt_when_started)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        client.run(argv, targets=["web-2"])
    timer.join(WAIT)
    assert len(seen) == 1
    job = client.job(seen[0])
    job.wait(WAIT)
    assert job.state == "cancelled" and job.results["web-2"].state == "cancelled"
    _all_back(fleet)


def test_a_client_gone_before_it_hears_the_job_id_leaves_no_job_running(fleet: Fleet, client: Client,
                                                                         tmp_path: Path) -> None:
    """An attached run whose client closes right after its request (before the job event) is cancelled, not left running."""
    argv = ["sh", "-c", f"exec sleep 60 # {tmp_path}"]
    conn = ControlClient(str(fleet.sock))
    conn.request("run", args=argv, targets=["web-1"])
    conn.close()

    def mine() -> List[Job]:
        return [j for j in client.jobs() if j.spec.get("argv") == argv]

    wait_until(lambda: bool(mine()), WAIT, "the job to be recorded")
    job = mine()[0]
    job.wait(WAIT)
    assert job.state == "cancelled"
    _all_back(fleet)


def test_run_timeout_bounds_the_command(client: Client) -> None:
    """run(timeout=) interrupts a command past it: the slave's part failed with a timeout error, the call returns well before the command would."""
    started = time.monotonic()
    job = client.run(["sleep", "30"], targets=["db-1"], timeout=1.0)
    assert time.monotonic() - started < 15
    result = job.results["db-1"]
    assert job.state == "failed" and result.state == "failed" and result.exit_status is None
    assert "timeout" in (result.error or "") + (result.errtag or ""), result


# -- pacing and replacing ------------------------------------------------------------------------


def test_run_batch_and_max_fail_skip_the_rest(client: Client) -> None:
    """run(batch=1, max_fail=1) starts one slave at a time and, after the first failure, leaves the rest skipped."""
    job = client.run(["sh", "-c", "exit 3"], batch=1, max_fail=1)
    states = sorted(r.state for r in job.results.values())
    assert states == ["failed", "skipped", "skipped"], states
    assert [r.exit_status for r in job.results.values() if r.state == "failed"] == [3]
    job = client.run(["true"], batch="50%", max_fail=1)
    assert job.state == "done" and sorted(job.results) == sorted(NAMES)
    with pytest.raises(UsageError, match="--batch"):
        client.run(["true"], batch="0")
    with pytest.raises(UsageError, match="--max-fail"):
        client.put(__file__, "x", max_fail=0)
    with pytest.raises(UsageError, match="parallel"):
        client.get("x", "y", parallel=0)


def test_put_force_and_parents_get_force(fleet: Fleet, client: Client, tmp_path: Path) -> None:
    """put() refuses an existing file without force and a missing parent without parents; get(force=True) replaces DEST/NAME/."""
    src = tmp_path / "one.txt"
    src.write_bytes(b"one\n")
    assert client.put(str(src), "deep/er/one.txt", targets=["db-1"], parents=True).state == "done"
    assert (fleet.base("db-1") / "deep" / "er" / "one.txt").read_bytes() == b"one\n"
    src.write_bytes(b"two\n")
    job = client.put(str(src), "deep/er/one.txt", targets=["db-1"])
    assert job.state == "failed" and "--force" in (job.results["db-1"].error or "")
    assert (fleet.base("db-1") / "deep" / "er" / "one.txt").read_bytes() == b"one\n"
    assert client.put(str(src), "deep/er/one.txt", targets=["db-1"], force=True).state == "done"
    assert (fleet.base("db-1") / "deep" / "er" / "one.txt").read_bytes() == b"two\n"
    job = client.put(str(src), "nowhere/here/one.txt", targets=["db-1"])
    assert job.state == "failed" and not (fleet.base("db-1") / "nowhere").exists()
    back = tmp_path / "back"
    assert client.get("deep/er/one.txt", str(back), targets=["db-1"]).state == "done"
    assert client.get("deep/er/one.txt", str(back), targets=["db-1"]).state == "failed"
    src.write_bytes(b"three\n")
    client.put(str(src), "deep/er/one.txt", targets=["db-1"], force=True)
    assert client.get("deep/er/one.txt", str(back), targets=["db-1"], force=True).state == "done"
    assert (back / "db-1" / "one.txt").read_bytes() == b"three\n"
