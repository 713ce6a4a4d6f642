"""Waiting is bounded and said: a real ``remsh master`` (and, for the Python
API, a real listener) with real ``remsh-slave`` processes, links cut and
refused by a relay, slaves killed, stopped and frozen.

A slave that goes away mid-job is said at once (``away``), again when it is
``back`` or ``lost``; ``--resume-timeout`` bounds the wait; ``--timeout``
bounds a run whose slave is away; a slave stopped by SIGTERM ends its calls at
once (``put`` too); Ctrl-C answers within a second; a cancel that comes as a
command starts is never lost."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import pytest

from remsh.client import connect
from remsh.errors import CommandTimeout, Disconnected
from remsh.fleet import SlaveResult, run_job
from remsh.master.fanout import Cancellation
from remsh.master.slave import Slave
from remsh.master.slavelistener.tcp import TcpSlaveListener
from tests.relay import Relay
from tests.slaveproc import SECRET, SlaveProcesses, wait_registered
from tests.test_fleet import Master, _env, _free_port, wait_names
from tests.util import WAIT, process_alive, run_in_thread, wait_until

pytestmark = pytest.mark.timeout(180)


class WaitFleet:
    """A master (``--resume-timeout`` as given) and slaves dialing it through
    a relay each, so that a test can cut or refuse one slave's link."""

    def __init__(self, workdir: Path, resume_timeout: Optional[float]) -> None:
        self.workdir = workdir
        self.slaves = SlaveProcesses(workdir / "slaves")
        extra = [] if resume_timeout is None else ["--resume-timeout", repr(resume_timeout)]
        self.master = Master(workdir, workdir / "ctl" / "master.sock",
                             secret_file=self.slaves.secret_file(SECRET), extra=extra)
        self.master.wait_ready()
        self.sock = self.master.sock
        self.relays: dict = {}
        self.procs: dict = {}

    def start(self, name: str, direct: bool = False) -> None:
        """Start slave ``name`` through a relay of its own (``direct``: no relay,
        so that nothing but the slave decides how its connection ends)."""
        port = self.master.port
        if not direct:
            relay = Relay("127.0.0.1", self.master.port, lifetime=300)
            self.relays[name] = relay
            port = relay.port
        self.procs[name] = self.slaves.start(port, name, max_backoff=0.3)
        wait_names(self.sock, [name])

    def popen(self, *args: str) -> "subprocess.Popen[bytes]":
        return subprocess.Popen([sys.executable, "-m", "remsh", "--master", str(self.sock), *args], env=_env(),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def slave_row(self, name: str) -> Tuple[str, Optional[str]]:
        """(state, error) of ``name`` in the newest job, read from the store."""
        db = sqlite3.connect(f"file:{self.master.state_dir / 'jobs.sqlite'}?mode=ro", uri=True, timeout=5)
        try:
            row = db.execute("SELECT state, error FROM job_slaves WHERE name = ? ORDER BY rowid DESC LIMIT 1",
                             (name,)).fetchone()
        finally:
            db.close()
        return (row[0], row[1]) if row else ("", None)

    def ls_state(self, name: str) -> str:
        rows = wait_names(self.sock, [])
        return next((r["state"] for r in rows if r["name"] == name), "")

    def close(self) -> None:
        self.master.stop()
        self.slaves.close()
        for relay in self.relays.values():
            relay.close()


@pytest.fixture
def make_fleet(tmp_path: Path) -> Iterator:
    made: List[WaitFleet] = []

    def make(resume_timeout: Optional[float] = None) -> WaitFleet:
        fleet = WaitFleet(tmp_path, resume_timeout)
        made.append(fleet)
        return fleet

    yield make
    for fleet in made:
        fleet.close()


def _wait_output(fleet: WaitFleet, name: str) -> None:
    wait_until(lambda: fleet.slave_row(name)[0] == "running" and _stdout_bytes(fleet, name) > 0, WAIT,
               f"{name}'s command to print")


def _stdout_bytes(fleet: WaitFleet, name: str) -> int:
    db = sqlite3.connect(f"file:{fleet.master.state_dir / 'jobs.sqlite'}?mode=ro", uri=True, timeout=5)
    try:
        row = db.execute("SELECT stdout_bytes FROM job_slaves WHERE name = ? ORDER BY rowid DESC LIMIT 1",
                         (name,)).fetchone()
    finally:
        db.close()
    return int(row[0]) if row else 0


# -- away, back, lost ---------------------------------------------------------------------


def test_slave_killed_mid_job_is_away_then_lost_within_resume_timeout(make_fleet) -> None:
    """SIGKILL of a slave mid-run: stderr says away at once, ls and the record say away, then lost and exit 3 within --resume-timeout 3."""
    fleet = make_fleet(resume_timeout=3)
    fleet.start("web-2")
    proc = fleet.popen("run", "--", "sh", "-c", "echo started; sleep 60")
    _wait_output(fleet, "web-2")
    fleet.procs["web-2"].signal(signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: fleet.slave_row("web-2")[0] == "away", WAIT, "the record to say away")
    assert fleet.ls_state("web-2") == "away"
    out, err = proc.communicate(timeout=WAIT + 5)
    elapsed = time.monotonic() - killed
    text = err.decode()
    assert proc.returncode == 3, text
    assert elapsed < 3 + 4, elapsed
    assert "web-2: away (connection lost); waiting up to 3 s" in text
    assert "web-2: lost" in text and text.index("web-2: away") < text.index("web-2: lost")
    state, error = fleet.slave_row("web-2")
    assert state == "lost" and error, (state, error)


def test_slave_whose_link_is_cut_is_away_then_back(make_fleet) -> None:
    """A cut link mid-run: stderr says away then back, the record goes away then running, and the run ends well."""
    fleet = make_fleet()
    fleet.start("web-1")
    go = fleet.workdir / "go"
    proc = fleet.popen("run", "--", "sh", "-c", f"echo a; while [ ! -e {go} ]; do sleep 0.05; done; echo b")
    _wait_output(fleet, "web-1")
    relay = fleet.relays["web-1"]
    relay.refuse()
    relay.cut()
    wait_until(lambda: fleet.slave_row("web-1")[0] == "away", WAIT, "the record to say away")
    relay.restore()
    wait_until(lambda: fleet.slave_row("web-1")[0] == "running", WAIT, "the record to say running again")
    go.touch()
    out, err = proc.communicate(timeout=WAIT)
    text = err.decode()
    assert proc.returncode == 0, text
    assert out == b"web-1 | a\nweb-1 | b\n"
    assert "web-1: away (connection lost); waiting up to 300 s" in text
    assert "web-1: back" in text and text.index("web-1: away") < text.index("web-1: back")
    assert fleet.slave_row("web-1")[0] == "ok"


def test_resume_timeout_zero_fails_a_dropped_slave_at_once(make_fleet) -> None:
    """--resume-timeout 0: a slave SIGKILLed mid-run fails at once (exit 3), nothing is waited for or said away."""
    fleet = make_fleet(resume_timeout=0)
    fleet.start("web-1")
    proc = fleet.popen("run", "--", "sh", "-c", "echo started; sleep 60")
    _wait_output(fleet, "web-1")
    fleet.procs["web-1"].signal(signal.SIGKILL)
    killed = time.monotonic()
    out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 3, err.decode()
    assert time.monotonic() - killed < 3
    assert "away" not in err.decode()


@pytest.mark.parametrize("value", ["-1", "inf", "soon"])
def test_resume_timeout_must_be_seconds(tmp_path: Path, value: str) -> None:
    """remsh master --resume-timeout refuses a negative, infinite or non-numeric value (exit 2)."""
    r = subprocess.run([sys.executable, "-m", "remsh", "master", "--control", str(tmp_path / "m.sock"),
                        "--listen", "127.0.0.1:0", "--insecure", "--resume-timeout", value], env=_env(),
                       capture_output=True, timeout=WAIT)
    assert r.returncode == 2
    assert b"--resume-timeout" in r.stderr


def test_standalone_run_says_away_and_back(tmp_path: Path) -> None:
    """remsh run --listen (no master) says on stderr when its slave goes away and comes back, and the run ends well."""
    procs = SlaveProcesses(tmp_path / "slaves")
    port = _free_port()
    started, go = tmp_path / "started", tmp_path / "go"
    proc = subprocess.Popen([sys.executable, "-m", "remsh", "run", "--listen", f"127.0.0.1:{port}",
                             "--secret-file", str(procs.secret_file(SECRET)), "--wait", "1", "--", "sh", "-c",
                             f"touch {started}; while [ ! -e {go} ]; do sleep 0.05; done; echo b"],
                            env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    relay = Relay("127.0.0.1", port, lifetime=120)
    try:
        procs.start(relay.port, "solo-1", max_backoff=0.3)
        wait_until(started.exists, WAIT + 5, "the command to start")
        relay.refuse()
        relay.cut()
        relay.restore()  # noticed by the run or not by then, the resume says away before back
        go.touch()
        out, err = proc.communicate(timeout=WAIT + 5)
    finally:
        if proc.poll() is None:
            proc.kill()
        relay.close()
        procs.close()
    assert proc.returncode == 0, err.decode()
    assert out == b"solo-1 | b\n"
    text = err.decode()
    assert "solo-1: away (connection lost); waiting up to 300 s" in text and "solo-1: back" in text


# -- --timeout -------------------------------------------------------------------------------


def test_run_timeout_bounds_a_run_whose_slave_is_away(make_fleet) -> None:
    """run --timeout 3 with the slave's link cut and refused: exit 3 near 3 s, state failed with a timeout error; the command dies once the slave is back."""
    fleet = make_fleet()
    fleet.start("web-1")
    pidfile = fleet.workdir / "pid"
    started = time.monotonic()
    proc = fleet.popen("run", "--timeout", "3", "--", "sh", "-c", f"echo $$ > {pidfile}; echo x; sleep 60")
    _wait_output(fleet, "web-1")
    relay = fleet.relays["web-1"]
    relay.refuse()
    relay.cut()
    out, err = proc.communicate(timeout=WAIT + 10)
    elapsed = time.monotonic() - started
    assert proc.returncode == 3, err.decode()
    assert elapsed < 3 + 4, elapsed
    assert "timed out" in err.decode()
    state, error = fleet.slave_row("web-1")
    assert state == "failed" and "timed out" in (error or ""), (state, error)
    pid = int(pidfile.read_text())
    relay.restore()
    wait_until(lambda: not _alive(pid), WAIT, "the command to die once its slave is back")


def test_run_timeout_bounds_a_run_whose_slave_is_frozen(make_fleet) -> None:
    """run --timeout 2 with the slave SIGSTOPped (connected, silent): exit 3 within the timeout and the kill grace."""
    fleet = make_fleet()
    fleet.start("web-1")
    started = time.monotonic()
    proc = fleet.popen("run", "--timeout", "2", "--", "sh", "-c", "echo x; sleep 60")
    _wait_output(fleet, "web-1")
    slave = fleet.procs["web-1"]
    slave.signal(signal.SIGSTOP)
    try:
        out, err = proc.communicate(timeout=WAIT + 10)
    finally:
        slave.signal(signal.SIGCONT)
    elapsed = time.monotonic() - started
    assert proc.returncode == 3, err.decode()
    assert elapsed < 2 + 5 + 3, elapsed
    assert "timed out" in err.decode()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- SIGTERM says goodbye -----------------------------------------------------------------------


def test_sigterm_of_a_slave_during_put_fails_at_once(make_fleet) -> None:
    """A slave SIGTERMed while a large put runs: the put fails at once (exit 3, disconnected), no resume is waited for."""
    fleet = make_fleet()
    fleet.start("web-1", direct=True)
    big = fleet.workdir / "big"
    with open(big, "wb") as f:
        f.truncate(4 << 30)  # sparse: read fast, written slowly enough on the slave
    proc = fleet.popen("put", str(big), "big")
    wait_until(lambda: _progress(fleet, "web-1") > 0, WAIT, "the put to move data")
    fleet.procs["web-1"].signal(signal.SIGTERM)
    stopped = time.monotonic()
    out, err = proc.communicate(timeout=60)
    elapsed = time.monotonic() - stopped
    assert proc.returncode == 3, (out, err)
    assert elapsed < 5, elapsed
    assert "ended the session" in err.decode() or "stopping" in err.decode(), err.decode()
    assert fleet.slave_row("web-1")[0] == "failed"


def _progress(fleet: WaitFleet, name: str) -> int:
    db = sqlite3.connect(f"file:{fleet.master.state_dir / 'jobs.sqlite'}?mode=ro", uri=True, timeout=5)
    try:
        row = db.execute("SELECT progress_done FROM job_slaves WHERE name = ? ORDER BY rowid DESC LIMIT 1",
                         (name,)).fetchone()
    finally:
        db.close()
    return int(row[0] or 0) if row else 0


def test_sigterm_of_a_slave_during_run_fails_at_once(make_fleet) -> None:
    """A slave SIGTERMed while its command runs: the run fails at once (exit 3), no resume is waited for."""
    fleet = make_fleet()
    fleet.start("web-1", direct=True)
    proc = fleet.popen("run", "--", "sh", "-c", "echo x; sleep 60")
    _wait_output(fleet, "web-1")
    fleet.procs["web-1"].signal(signal.SIGTERM)
    stopped = time.monotonic()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err.decode()
    assert time.monotonic() - stopped < 5
    assert "away" not in err.decode()


# -- Ctrl-C -------------------------------------------------------------------------------------


def test_ctrl_c_answers_within_a_second_while_a_slave_is_away(make_fleet) -> None:
    """SIGINT to run while its slave is away (link cut and refused): exit 130 within a second; the job ends cancelled soon after."""
    fleet = make_fleet()
    fleet.start("web-1")
    proc = fleet.popen("run", "--", "sh", "-c", "echo x; sleep 60")
    _wait_output(fleet, "web-1")
    relay = fleet.relays["web-1"]
    relay.refuse()
    relay.cut()
    wait_until(lambda: fleet.slave_row("web-1")[0] == "away", WAIT, "the record to say away")
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    proc.communicate(timeout=WAIT)
    assert time.monotonic() - sent < 1.5
    assert proc.returncode == 130
    wait_until(lambda: fleet.slave_row("web-1")[0] == "cancelled", 3.0, "the job to end cancelled")


def test_ctrl_c_answers_within_a_second_during_a_put(make_fleet) -> None:
    """SIGINT to a put moving a large file: exit 130 within a second (the master winds the transfer down on its own)."""
    fleet = make_fleet()
    fleet.start("web-1", direct=True)
    big = fleet.workdir / "big"
    with open(big, "wb") as f:
        f.truncate(4 << 30)
    proc = fleet.popen("put", str(big), "big")
    wait_until(lambda: _progress(fleet, "web-1") > 0, WAIT, "the put to move data")
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    proc.communicate(timeout=WAIT)
    assert time.monotonic() - sent < 1.5
    assert proc.returncode == 130
    wait_until(lambda: fleet.slave_row("web-1")[0] == "cancelled", 2 * WAIT + 5, "the job to end cancelled")


# -- a cancel as the command starts ---------------------------------------------------------------


def test_cancel_right_at_the_start_is_never_lost(make_fleet) -> None:
    """Jobs of a real master cancelled the moment they are made, 25 times: each ends cancelled within two seconds (never the 10 s grace)."""
    fleet = make_fleet()
    fleet.start("web-1")
    client = connect(fleet.sock)
    slow = []
    for i in range(25):
        job = client.run(["sleep", "30"], detach=True)
        t0 = time.monotonic()
        if i % 2:
            time.sleep(0.002 * (i % 5))
        client.cancel(job.id)
        job.wait(timeout=WAIT + 5)
        took = time.monotonic() - t0
        if took > 2.0:
            slow.append((i, round(took, 2)))
        assert job.state == "cancelled", job.state
    assert not slow, slow


class _SlowStart:
    """A job sink whose ``start`` (called once the fan-out counts the slave as
    running, before its command is registered) waits until the job has been
    cancelled and its first interrupts went out: the window in which the
    master's store write used to lose a cancel, made as wide as it can be."""

    def __init__(self, cancellation: Cancellation) -> None:
        self.cancellation = cancellation
        self.entered = threading.Event()
        self.results: List[SlaveResult] = []

    def begin(self, names: List[str]) -> None:
        pass

    def start(self, name: str) -> None:
        self.entered.set()
        with self.cancellation.cond:
            self.cancellation.cond.wait_for(lambda: self.cancellation.cancelled, WAIT)
        time.sleep(0.3)  # the interrupts of the cancel have gone out meanwhile (found nothing)

    def output(self, name: str, stream: str, data: bytes) -> None:
        pass

    def progress(self, name: str, done: int, total: Optional[int]) -> None:
        pass

    def end(self, result: SlaveResult) -> None:
        self.results.append(result)


def test_cancel_between_the_start_and_the_command_is_kept(tmp_path: Path) -> None:
    """A cancel made after the fan-out counted the slave as running but before its command was registered interrupts the command as it starts (not after the 10 s grace), five times in a row."""
    procs = SlaveProcesses(tmp_path / "slaves")
    listener = TcpSlaveListener(port=0, host="127.0.0.1", secret=SECRET)
    listener.start()
    try:
        slave = wait_registered(listener, procs.start(listener.port, "race-1", max_backoff=0.3))
        for _ in range(5):
            cancellation = Cancellation()
            sink = _SlowStart(cancellation)
            outcome = run_in_thread(lambda: run_job([slave], ["sleep", "30"], sink, cancellation=cancellation))
            assert sink.entered.wait(WAIT)
            t0 = time.monotonic()
            cancellation.cancel("interrupted")
            outcome.wait(WAIT + 5)
            assert outcome.finished_at is not None and outcome.finished_at - t0 < 2.0, outcome.finished_at - t0
            assert [r.status for r in sink.results] == [-9], [(r.status, r.error) for r in sink.results]
            assert slave.connected
    finally:
        listener.stop()
        procs.close()


# -- the Python API ----------------------------------------------------------------------------------


@pytest.fixture
def api(tmp_path: Path) -> Iterator:
    """A TCP listener with an ``on_state`` hook, and slaves through a relay."""
    procs = SlaveProcesses(tmp_path / "slaves")
    events: List[Tuple[str, str, str]] = []
    made: List[object] = []

    def on_state(slave: Slave, state: str, detail: str) -> None:
        events.append((slave.name, state, detail))

    def make(resume_timeout: float) -> Tuple[TcpSlaveListener, Relay, Slave, object]:
        listener = TcpSlaveListener(port=0, host="127.0.0.1", secret=SECRET, resume_timeout=resume_timeout,
                                    on_state=on_state)
        listener.start()
        relay = Relay("127.0.0.1", listener.port, lifetime=300)
        made.extend([listener, relay])
        proc = procs.start(relay.port, "api-1", max_backoff=0.3)
        return listener, relay, wait_registered(listener, proc), proc

    make.events = events  # type: ignore[attr-defined]
    yield make
    for thing in reversed(made):
        thing.stop() if isinstance(thing, TcpSlaveListener) else thing.close()  # type: ignore[attr-defined]
    procs.close()


def test_execute_timeout_includes_time_away(api) -> None:
    """Slave.execute(timeout=2) whose slave goes away (cut, refused): CommandTimeout within about 2 s; on_state said away."""
    listener, relay, slave, _ = api(300.0)
    started = threading.Event()
    outcome = run_in_thread(lambda: slave.execute(["sh", "-c", "echo x; sleep 60"], timeout=2,
                                                  stdout_cb=lambda d: started.set()))
    assert started.wait(WAIT)
    relay.refuse()
    relay.cut()
    t0 = time.monotonic()
    outcome.wait(WAIT)
    assert isinstance(outcome.error, CommandTimeout), outcome.error
    assert "api-1" in str(outcome.error) and "execute" in str(outcome.error)
    assert outcome.finished_at is not None and outcome.finished_at - t0 < 2.5
    assert ("api-1", "away", "connection lost; waiting up to 300 s") in api.events


def test_execute_past_its_timeout_while_away_keeps_the_slave(api) -> None:
    """After execute(timeout=) ran out while the slave was away, the slave comes back as the same object: the command was killed, the next operations answer in step."""
    listener, relay, slave, _ = api(300.0)
    started = threading.Event()
    pid: List[int] = []
    outcome = run_in_thread(lambda: slave.execute(["sh", "-c", "echo $$; sleep 60"], timeout=1,
                                                  stdout_cb=lambda d: (pid.append(int(d)), started.set())))
    assert started.wait(WAIT)
    relay.refuse()
    relay.cut()
    outcome.wait(WAIT)
    assert isinstance(outcome.error, CommandTimeout), outcome.error
    relay.restore()
    assert slave.execute(["echo", "next"], stdout_cb=lambda d: None) == 0  # waits for the killed one's end
    assert slave.connected and listener.slave_collection.get_slave(False, lambda s: s.name == "api-1") is slave
    assert not process_alive(pid[0])
    out: List[bytes] = []
    assert slave.execute(["echo", "in step"], stdout_cb=out.append) == 0 and b"".join(out) == b"in step\n"


def test_listener_reports_away_back_and_lost(api) -> None:
    """on_state(slave, state, detail) is called with away, back (after a resume) and lost (resume_timeout passed)."""
    listener, relay, slave, proc = api(2.0)
    relay.refuse()
    relay.cut()
    wait_until(lambda: [e[1] for e in api.events] == ["away"], WAIT, "away")
    relay.restore()
    wait_until(lambda: [e[1] for e in api.events] == ["away", "back"], WAIT, "away then back")
    assert slave.connected
    slave.ping()
    relay.refuse()
    relay.cut()
    t0 = time.monotonic()
    wait_until(lambda: [e[1] for e in api.events] == ["away", "back", "away", "lost"], WAIT, "away then lost")
    assert time.monotonic() - t0 < 2.0 + 2.0
    with pytest.raises(Disconnected):
        slave.ping()
