"""Work survives a dropped connection (issue 10), with real processes.

A real ``remsh-slave`` process dials a :class:`TcpSlaveListener` on
127.0.0.1 through the relay of :mod:`tests.relay`, which the test cuts
(reset both ends), refuses (connect fails), silences (a half-open link) and
restores.  The slave runs with a short link check (``--heartbeat``) and a
short reconnection back-off, so a resume takes a fraction of a second.

What is pinned: the ``Slave`` object outlives its connections; a call in
progress completes as if nothing happened (``execute`` output and stdin
exactly once and in order, ``send``/``fetch`` resumed, not restarted);
calls made while away wait; a slave not back within ``resume_timeout``
fails every call with ``Disconnected`` and its command's process group is
killed; a slave back as a new process fails the old calls at once; a
half-open link is noticed by the slave; nobody else can present a session.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import pytest

from remsh.errors import Disconnected
from remsh.handshake import MASTER_GREETING, SLAVE_GREETING, exchange_greeting, refusal_box, slave_proof
from remsh.master.slave import Slave
from remsh.master.slavelistener.tcp import TcpSlaveListener
from remsh.transports.base import SocketStream
from remsh.wire import Box, Wire
from tests.relay import Relay
from tests.slaveproc import (SECRET, SlaveProcess, SlaveProcesses, slave_procs, tcp_listener,  # noqa: F401
                             wait_registered)
from tests.util import WAIT, Outcome, box_length, box_pairs, run_in_thread, wait_until

MiB = 1 << 20
#: The slave's link check interval in these tests (``--heartbeat``).
HEARTBEAT = 0.3
#: Longest wait between the slave's reconnection attempts (``--max-backoff``).
MAX_BACKOFF = 0.2
#: What the slave may spool while away (``--spool-limit``).
SPOOL_LIMIT = 128 * MiB
#: Bound on a whole call that survives cuts.
CALL_WAIT = 60.0
#: How long a test watches for something that must NOT happen.
QUIET = 0.5
#: A resume_timeout no test reaches by accident.
LONG_RESUME = 30.0


# -- the rig: listener <- relay <- remsh-slave process ---------------------------------


class Rig:
    """One listener, one relay in front of it, slave processes dialing the relay."""

    def __init__(self, listener: TcpSlaveListener, relay: Relay, procs: SlaveProcesses) -> None:
        self.listener = listener
        self.relay = relay
        self.procs = procs
        self.proc: Optional[SlaveProcess] = None

    def start_slave(self, name: str, spool_limit: int = SPOOL_LIMIT) -> Slave:
        """Start ``remsh-slave NAME`` through the relay and return its ``Slave`` once registered."""
        self.proc = self.procs.start(
            self.relay.port, name, max_backoff=MAX_BACKOFF,
            extra_args=["--heartbeat", repr(HEARTBEAT), "--spool-limit", str(spool_limit)])
        slave: Slave = wait_registered(self.listener, self.proc)
        return slave

    @property
    def basedir(self) -> Path:
        assert self.proc is not None
        return self.proc.basedir

    def lookup(self, name: str, timeout: float = 0.0) -> Optional[Slave]:
        """What the collection returns for ``name`` (waiting up to ``timeout``)."""
        found: Optional[Slave] = self.listener.slave_collection.get_slave(
            timeout > 0, lambda s: s.name == name, timeout=timeout)
        return found

    def logs(self) -> str:
        return self.procs.logs()

    def away(self) -> None:
        """Take the slave away and keep it away: cut, and refuse new connections."""
        self.relay.refuse()
        self.relay.cut()


@pytest.fixture
def rig(tcp_listener: Callable[..., TcpSlaveListener],
        slave_procs: SlaveProcesses) -> Iterator[Callable[..., Rig]]:
    """``rig(resume_timeout=S, record=N)``: a listener, a relay in front of it
    (recording the first ``record`` bytes of each connection), and the slave
    processes; all closed at teardown."""
    relays: List[Relay] = []

    def make(resume_timeout: float = LONG_RESUME, record: int = 0) -> Rig:
        listener = tcp_listener(resume_timeout=resume_timeout)
        relay = Relay("127.0.0.1", listener.port, record=record, lifetime=300)
        relays.append(relay)
        return Rig(listener, relay, slave_procs)

    try:
        yield make
    finally:
        for relay in relays:
            relay.close()


@pytest.fixture
def stray_groups() -> Iterator[List[int]]:
    """Process groups of commands that may outlive their slave (a SIGKILLed
    slave cannot end them): every process still in them is killed at teardown."""
    groups: List[int] = []
    try:
        yield groups
    finally:
        for pgid in groups:
            for pid in group_members(pgid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


# -- commands and checks -------------------------------------------------------------------

NUMBERED = """\
import sys
n = int(sys.argv[1])
w = sys.stdout.buffer.write
for start in range(0, n, 4096):
    w(b"".join(b"%09d\\n" % i for i in range(start, min(n, start + 4096))))
sys.stdout.flush()
"""

DIGEST = """\
import hashlib, sys
h = hashlib.sha256()
n = 0
while True:
    block = sys.stdin.buffer.read(65536)
    if not block:
        break
    h.update(block)
    n += len(block)
print(h.hexdigest(), n, flush=True)
"""

# prints its pid, process group and a child's pid, then waits for the child
# (which sleeps): the test checks both are gone when the slave gives up
SLEEPER = """\
import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(os.getpid(), os.getpgid(0), child.pid, flush=True)
child.wait()
"""

# prints a numbered line every few milliseconds until the file "go" exists in
# its directory, then END (bounded: gives up with status 3 after 60 s)
TICKER = """\
import os, sys, time
deadline = time.monotonic() + 60
i = 0
while not os.path.exists("go"):
    if time.monotonic() > deadline:
        sys.exit(3)
    sys.stdout.write("%06d\\n" % i)
    sys.stdout.flush()
    i += 1
    time.sleep(0.005)
print("END", flush=True)
"""


# NUMBERED, noting after each write how many bytes it wrote (12 digits at
# the start of the file argv[2])
NUMBERED_PROGRESS = """\
import os, sys
n = int(sys.argv[1])
fd = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT, 0o600)
w = sys.stdout.buffer
for start in range(0, n, 4096):
    end = min(n, start + 4096)
    w.write(b"".join(b"%09d\\n" % i for i in range(start, end)))
    w.flush()
    os.pwrite(fd, b"%012d" % (end * 10), 0)
"""


def script(tmp_path: Path, name: str, text: str) -> List[str]:
    """argv running ``text`` as a Python script saved under ``tmp_path``."""
    path = tmp_path / f"{name}.py"
    path.write_text(text)
    return [sys.executable, str(path)]


def numbered(n: int) -> bytes:
    """What NUMBERED prints for ``n``."""
    return b"".join(b"%09d\n" % i for i in range(n))


def same_bytes(got: "bytes | bytearray", expected: bytes) -> Optional[str]:
    """``None`` when equal, else a short description of the first difference
    (never the whole of a 30 MiB stream in an assertion message)."""
    if got == expected:
        return None
    n = min(len(got), len(expected))
    first = next((i for i in range(0, n, 4096) if got[i:i + 4096] != expected[i:i + 4096]), n)
    if first < n:
        first = next(i for i in range(first, min(first + 4096, n)) if got[i] != expected[i])
    return (f"{len(got)} bytes received, {len(expected)} expected; first difference at byte {first}: "
            f"got {bytes(got[max(0, first - 20):first + 20])!r}, "
            f"expected {expected[max(0, first - 20):first + 20]!r}")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def _stat_fields(pid: int) -> Optional[List[str]]:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie has ended)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def group_members(pgid: int) -> List[int]:
    """The live processes of process group ``pgid``."""
    assert pgid != os.getpgid(0), "the command runs in the test's own process group"
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
                members.append(int(entry))
    return members


def assert_disconnected(outcome: Outcome, name: str, op: str, *, waited: bool = True) -> Disconnected:
    """The call ended with a ``Disconnected`` naming the slave, the operation
    and (``waited``) the time waited."""
    error = outcome.error
    assert isinstance(error, Disconnected), f"{op} ended with {error!r} (result {outcome.result!r})"
    text = str(error)
    assert name in text and op in text, f"message does not name slave and operation: {text!r}"
    assert not waited or re.search(r"\d(\.\d+)?\s*s", text), f"message does not give the time waited: {text!r}"
    return error


class Collector:
    """An output callback keeping every byte, with an event for a pattern."""

    def __init__(self, on_data: Optional[Callable[["Collector"], None]] = None) -> None:
        self.data = bytearray()
        self.on_data = on_data
        self.first_after: Dict[int, float] = {}
        self.changed = threading.Condition()

    def __call__(self, data: bytes) -> None:
        with self.changed:
            self.data += data
            self.changed.notify_all()
        if self.on_data is not None:
            self.on_data(self)

    def wait_for(self, predicate: Callable[[bytes], bool], timeout: float = WAIT) -> None:
        """Wait until ``predicate(data so far)``; fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate(bytes(self.data)):
                left = deadline - time.monotonic()
                assert left > 0, f"output never matched within {timeout} s (have {bytes(self.data[-200:])!r})"
                self.changed.wait(left)


# -- the Slave object across a resume ------------------------------------------------------


def test_slave_object_outlives_its_connection(rig: Callable[..., Rig]) -> None:
    """Away: connected is False, get_slave does not return it, calls made meanwhile wait; back: the SAME object, connected, those calls complete, on_disconnect never fired."""
    r = rig()
    slave = r.start_slave("phoenix")
    fired: List[Slave] = []
    slave.on_disconnect(fired.append)
    r.away()
    wait_until(lambda: not slave.connected, what="the master to notice the slave is away")
    assert r.lookup("phoenix") is None, "a slave that is away is returned by get_slave"
    out = Collector()
    waiting = run_in_thread(lambda: slave.execute(["echo", "made while away"], stdout_cb=out))
    pinging = run_in_thread(slave.ping)
    assert not waiting.done.wait(QUIET), f"a call made while away did not wait: {waiting.error!r}"
    assert not pinging.done.is_set()
    r.relay.restore()
    assert waiting.wait(WAIT).error is None, f"{waiting.error!r}\n{r.logs()}"
    assert waiting.result == 0 and bytes(out.data) == b"made while away\n"
    assert pinging.wait(WAIT).error is None, repr(pinging.error)
    assert slave.connected
    assert r.lookup("phoenix", timeout=WAIT) is slave
    assert [s for s in r.listener.slave_collection.get_all_slaves() if s.name == "phoenix"] == [slave]
    assert fired == [], "on_disconnect fired for a slave that came back"
    assert r.relay.accepted >= 2
    slave.ping()


# -- a call in progress completes as if nothing happened -----------------------------------


@pytest.mark.parametrize("size, cuts", [
    pytest.param(3 * MiB, 3, id="3MiB-3cuts"),
    pytest.param(30 * MiB, 20, id="30MiB-20cuts", marks=pytest.mark.slow),
])
def test_execute_output_exactly_once_across_cuts(rig: Callable[..., Rig], tmp_path: Path, size: int,
                                                 cuts: int) -> None:
    """Cuts at random moments during an execute streaming numbered lines: the callback gets exactly the expected bytes, in order, then status 0."""
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    lines = size // 10
    expected = numbered(lines)
    # each connection is cut after a random number of bytes from the slave,
    # at most 80% of the stream in all: the stream cannot end before the last cut
    budgets = [rng.randrange(1024, int(size * 0.8) // cuts) for _ in range(cuts)]
    r = rig()
    slave = r.start_slave("streamer")
    relay = r.relay
    out = Collector()
    call = run_in_thread(lambda: slave.execute(script(tmp_path, "numbered", NUMBERED) + [str(lines)],
                                               stdout_cb=out))
    made: List[int] = []  # bytes received by the callback at each cut

    def chaos() -> None:
        for budget in budgets:
            # a connection made since the last cut (the first: the registration's)
            assert relay.wait_accepted(len(made) + 1, WAIT), "the slave did not redial"
            fired = relay.cut_when(to_target=relay.bytes_forwarded.to_target + budget, mark=False)
            while not fired.wait(0.05):
                if call.done.is_set():
                    return
            made.append(len(out.data))
    cutter = run_in_thread(chaos, name="chaos")
    call.wait(CALL_WAIT)
    cutter.wait(WAIT)
    relay.disarm()
    context = f"seed {seed}, budgets {budgets}, cuts at {made}\n{r.logs()}"
    assert cutter.error is None, f"{cutter.error!r}; {context}"
    assert call.error is None, f"execute raised {call.error!r}; {context}"
    assert call.result == 0, context
    problem = same_bytes(out.data, expected)
    assert problem is None, f"{problem}; {context}"
    assert len(made) == cuts, f"only {len(made)} of {cuts} cuts happened; {context}"
    assert slave.connected and r.lookup("streamer") is slave


@pytest.mark.parametrize("size", [
    pytest.param(16 * MiB, id="16MiB"),
    pytest.param(64 * MiB, id="64MiB", marks=pytest.mark.slow),
])
def test_send_resumes_after_a_cut(rig: Callable[..., Rig], tmp_path: Path, size: int) -> None:
    """A cut halfway through send: the slave's file is identical, and fewer bytes than the whole file go to the slave after the resume."""
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(size))
    r = rig()
    slave = r.start_slave("receiver")
    fired = r.relay.cut_when(to_client=r.relay.bytes_forwarded.to_client + size // 2)
    call = run_in_thread(lambda: slave.send(str(src), "dest.bin")).wait(CALL_WAIT)
    assert call.error is None, f"send raised {call.error!r}\n{r.logs()}"
    assert fired.is_set(), "the transfer never reached the cut"
    assert file_digest(r.basedir / "dest.bin") == file_digest(src)
    after = r.relay.since_mark().to_client
    assert 0 < after < size, f"{after} bytes sent after the resume for a {size}-byte file"
    assert r.relay.accepted >= 2 and slave.connected


@pytest.mark.parametrize("size", [
    pytest.param(16 * MiB, id="16MiB"),
    pytest.param(64 * MiB, id="64MiB", marks=pytest.mark.slow),
])
def test_fetch_resumes_after_a_cut(rig: Callable[..., Rig], tmp_path: Path, size: int) -> None:
    """A cut halfway through fetch: the local file is identical, and fewer bytes than the whole file come from the slave after the resume."""
    r = rig()
    slave = r.start_slave("sender")
    (r.basedir / "src.bin").write_bytes(os.urandom(size))
    dest = tmp_path / "fetched.bin"
    fired = r.relay.cut_when(to_target=r.relay.bytes_forwarded.to_target + size // 2)
    call = run_in_thread(lambda: slave.fetch("src.bin", str(dest))).wait(CALL_WAIT)
    assert call.error is None, f"fetch raised {call.error!r}\n{r.logs()}"
    assert fired.is_set(), "the transfer never reached the cut"
    assert file_digest(dest) == file_digest(r.basedir / "src.bin")
    after = r.relay.since_mark().to_target
    assert 0 < after < size, f"{after} bytes came after the resume for a {size}-byte file"
    assert r.relay.accepted >= 2 and slave.connected


def test_stdin_arrives_exactly_once_across_a_cut(rig: Callable[..., Rig], tmp_path: Path) -> None:
    """A cut while a command reads 10 MiB of stdin: the digest it prints is that of the data given, byte count included."""
    data = os.urandom(10 * MiB)
    r = rig()
    slave = r.start_slave("reader")
    fired = r.relay.cut_when(to_client=r.relay.bytes_forwarded.to_client + 5 * MiB)
    out = Collector()
    call = run_in_thread(lambda: slave.execute(script(tmp_path, "digest", DIGEST), stdout_cb=out,
                                               stdin=data)).wait(CALL_WAIT)
    assert call.error is None, f"execute raised {call.error!r}\n{r.logs()}"
    assert fired.is_set(), "stdin never reached the cut"
    assert call.result == 0
    assert bytes(out.data).decode() == f"{hashlib.sha256(data).hexdigest()} {len(data)}\n"


def test_spool_limit_blocks_the_command_instead_of_losing_output(rig: Callable[..., Rig], tmp_path: Path) -> None:
    """Away with a small --spool-limit: the command blocks on its writes (it gets nowhere near the end of its output) and, back, every byte arrives exactly once."""
    spool = 2 * MiB
    lines = 24 * MiB // 10
    progress = tmp_path / "progress"
    progress.write_bytes(b"0" * 12)
    r = rig()
    slave = r.start_slave("spooler", spool_limit=spool)
    r.relay.refuse()  # the registration's connection goes on; a redial will not
    fired = r.relay.cut_when(to_target=r.relay.bytes_forwarded.to_target + MiB)
    out = Collector()
    call = run_in_thread(lambda: slave.execute(
        script(tmp_path, "numbered_progress", NUMBERED_PROGRESS) + [str(lines), str(progress)], stdout_cb=out))
    assert fired.wait(WAIT), f"the output never reached the cut\n{r.logs()}"
    wait_until(lambda: not slave.connected, what="the master to notice the slave is away")

    def written() -> int:
        return int(progress.read_bytes()[:12] or b"0")
    # the command writes until the slave stops reading: wait for it to stand still
    last = [-1, time.monotonic()]

    def still() -> bool:
        now = written()
        if now != last[0]:
            last[:] = [now, time.monotonic()]
        return time.monotonic() - last[1] > QUIET
    wait_until(still, timeout=WAIT, what="the command to block on its output")
    # what the slave holds: its spool, plus at most the session's window of
    # unacknowledged output and the pipe (8 + 2 MiB)
    held = written() - len(out.data)
    assert written() < lines * 10, "the command wrote all its output while the slave was away"
    assert held <= spool + 10 * MiB, f"the slave read {held} bytes of output it could not send (limit {spool})"
    assert not call.done.is_set(), f"the call ended while away: {call.error!r}"
    r.relay.restore()
    call.wait(CALL_WAIT)
    assert call.error is None, f"execute raised {call.error!r}\n{r.logs()}"
    assert call.result == 0
    problem = same_bytes(out.data, numbered(lines))
    assert problem is None, problem


# -- not back in time ------------------------------------------------------------------------


def test_not_back_within_resume_timeout(rig: Callable[..., Rig], tmp_path: Path) -> None:
    """Refused for longer than resume_timeout=3: the call in progress and one made while away raise Disconnected after ~3 s; on_disconnect fires; the slave leaves the collection; the command's process group is killed."""
    r = rig(resume_timeout=3)
    slave = r.start_slave("gone")
    fired = threading.Event()
    slave.on_disconnect(lambda s: fired.set())
    out = Collector()
    running = run_in_thread(lambda: slave.execute(script(tmp_path, "sleeper", SLEEPER), stdout_cb=out))
    out.wait_for(lambda d: d.endswith(b"\n"))
    pid, pgid, child = (int(x) for x in bytes(out.data).split())
    assert alive(pid) and alive(child) and set(group_members(pgid)) >= {pid, child}
    r.away()
    t0 = time.monotonic()
    wait_until(lambda: not slave.connected, what="the master to notice the slave is away")
    waiting = run_in_thread(slave.ping)
    running.wait(10)
    waiting.wait(10)
    assert_disconnected(running, "gone", "execute")
    assert_disconnected(waiting, "gone", "ping")
    for what, outcome in (("execute", running), ("ping", waiting)):
        assert outcome.finished_at is not None
        elapsed = outcome.finished_at - t0
        assert 2.5 <= elapsed < 6, f"{what} failed {elapsed:.2f} s after the drop (resume_timeout 3)"
    assert fired.wait(WAIT), "on_disconnect did not fire"
    assert not slave.connected
    assert r.lookup("gone") is None
    assert slave not in r.listener.slave_collection.get_all_slaves()
    t1 = time.monotonic()
    with pytest.raises(Disconnected):
        slave.ping()
    assert time.monotonic() - t1 < 1.0, "a call after the session failed did not fail at once"
    # the slave process gave up too and ended the command's whole group
    wait_until(lambda: not group_members(pgid), timeout=10,
               what=f"process group {pgid} of the abandoned command to end")
    assert not alive(pid) and not alive(child)


def test_a_slave_back_as_a_new_process_fails_the_old_calls_at_once(
        rig: Callable[..., Rig], tmp_path: Path, stray_groups: List[int]) -> None:
    """SIGKILL the slave mid-command and start it again: the old call waits until the newcomer registers, then fails at once (Disconnected); the newcomer is a new Slave object."""
    r = rig(resume_timeout=LONG_RESUME)
    old = r.start_slave("lazarus")
    out = Collector()
    running = run_in_thread(lambda: old.execute(script(tmp_path, "sleeper", SLEEPER), stdout_cb=out))
    out.wait_for(lambda d: d.endswith(b"\n"))
    _, pgid, _ = (int(x) for x in bytes(out.data).split())
    stray_groups.append(pgid)
    assert r.proc is not None
    r.proc.signal(signal.SIGKILL)
    r.proc.wait()
    wait_until(lambda: not old.connected, what="the master to notice the connection is gone")
    assert not running.done.wait(QUIET), f"the call failed before any newcomer: {running.error!r}"
    restarted = time.monotonic()
    new = r.start_slave("lazarus")
    registered = time.monotonic()
    running.wait(WAIT)
    assert_disconnected(running, "lazarus", "execute", waited=False)
    assert running.finished_at is not None
    assert restarted <= running.finished_at <= registered + 2.0, (
        f"the old call failed {running.finished_at - registered:+.2f} s from the newcomer's registration")
    assert new is not old
    assert new.connected and not old.connected
    assert r.lookup("lazarus") is new
    t1 = time.monotonic()
    with pytest.raises(Disconnected):
        old.ping()
    assert time.monotonic() - t1 < 1.0
    new.ping()


# -- half-open link -------------------------------------------------------------------------


def test_half_open_link_is_noticed_and_redialed(rig: Callable[..., Rig], tmp_path: Path) -> None:
    """The relay stops forwarding without closing: the slave notices within a few heartbeats, redials, and the streaming call completes with every line once."""
    r = rig()
    slave = r.start_slave("halfopen")
    fired: List[Slave] = []
    slave.on_disconnect(fired.append)
    out = Collector()
    call = run_in_thread(lambda: slave.execute(script(tmp_path, "ticker", TICKER), stdout_cb=out,
                                               cwd=str(tmp_path)))
    out.wait_for(lambda d: d.count(b"\n") >= 50)
    before = r.relay.accepted
    r.relay.silence()
    r.relay.restore()  # the stalled connection stays stalled; a new one may come
    silenced = time.monotonic()
    assert r.relay.wait_accepted(before + 1, 10 * HEARTBEAT + 5), f"the slave never redialed\n{r.logs()}"
    redial = r.relay.accept_times[before] - silenced
    assert redial < 6 * HEARTBEAT + 1.0, f"the slave took {redial:.2f} s to notice a dead link"
    # output flows again over the new connection
    seen = len(out.data)
    out.wait_for(lambda d: len(d) > seen + 70)
    (tmp_path / "go").write_bytes(b"")
    call.wait(CALL_WAIT)
    assert call.error is None, f"execute raised {call.error!r}\n{r.logs()}"
    assert call.result == 0
    lines = bytes(out.data).split(b"\n")
    assert lines[-2:] == [b"END", b""], lines[-3:]
    numbers = [int(x) for x in lines[:-2]]
    assert numbers == list(range(len(numbers))), "lines lost, repeated or out of order"
    assert fired == [] and slave.connected and r.lookup("halfopen") is slave


# -- security -------------------------------------------------------------------------------


def registered_box(to_client: bytes) -> Optional[Dict[bytes, bytes]]:
    """The master's ``registered`` box among the first bytes it sent (``None``: not there yet)."""
    assert to_client[:len(MASTER_GREETING)] == MASTER_GREETING[:len(to_client)], to_client[:20]
    rest = to_client[len(MASTER_GREETING):]
    while True:
        n = box_length(rest)
        if n is None:
            return None
        pairs = dict(box_pairs(rest[:n]))
        rest = rest[n:]
        if b"registered" in pairs:
            return pairs


def session_of(relay: Relay) -> bytes:
    """The session id the master gave in the ``registered`` box of the relay's first connection."""
    found: List[Dict[bytes, bytes]] = []

    def look() -> bool:
        # the relay counts a delivery just after making it: wait for it
        box = registered_box(relay.transcripts()[0].to_client)
        if box is not None:
            found.append(box)
        return box is not None
    wait_until(look, what="the registered box in the relay's transcript")
    assert b"session" in found[0], f"the registered box carries no session: {sorted(found[0])}"
    return found[0][b"session"]


def impostor_register(port: int, name: bytes, extra: Dict[bytes, bytes]) -> Optional[Box]:
    """Register as ``name`` with the right secret and ``extra`` keys, straight
    to the listener; returns the master's answer (``None``: it just closed)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    wire = Wire(SocketStream(sock), label="impostor")
    try:
        exchange_greeting(wire, SLAVE_GREETING, MASTER_GREETING, WAIT)
        hello = wire.read_box(WAIT)
        assert hello is not None and b"nonce" in hello
        nonce = os.urandom(32)
        box: Dict[bytes, bytes] = {b"register": name, b"version": b"1", b"nonce": nonce,
                                   b"proof": slave_proof(SECRET, hello[b"nonce"], nonce, name)}
        box.update(extra)
        wire.send_box(box)
        try:
            return wire.read_box(WAIT)
        except Disconnected:
            return None
    finally:
        wire.close()


def test_impostor_with_the_secret_cannot_take_another_slaves_session(rig: Callable[..., Rig]) -> None:
    """Another name presenting a slave's session id is refused (the uniform refusal), while the slave is connected and while it is away; the slave then resumes untouched."""
    r = rig(record=4096)
    slave = r.start_slave("victim")
    session = session_of(r.relay)
    # the crafted box is well formed: the same, without the session, registers
    plain = impostor_register(r.listener.port, b"bystander", {})
    assert plain is not None and plain.get(b"registered") == b"bystander", plain
    for moment in ("connected", "away"):
        if moment == "away":
            r.away()
            wait_until(lambda: not slave.connected, what="the master to notice the slave is away")
        answer = impostor_register(r.listener.port, b"mallory", {b"resumable": b"y", b"resume": session, b"received": b"0"})
        assert answer is None or answer == refusal_box(), f"{moment}: impostor got {answer!r}"
        assert r.lookup("mallory") is None, f"{moment}: the impostor registered"
    r.relay.restore()
    wait_until(lambda: slave.connected, what="the slave to resume", timeout=WAIT)
    assert r.lookup("victim", timeout=WAIT) is slave
    slave.ping()
