"""Review of buffer lending and non-blocking socket sends, as an attacker
would: what a session pins in memory for what it counts, and what a peer
can make a send waiting for room do.

Lending (``SessionWire.send_lent``) keeps the sender's own buffer until the
peer acknowledges it.  The session's limits (window, ``spool_limit``) count
the bytes it was lent, not the buffer behind them: a 1 MiB block lent for a
few bytes would pin 1 MiB per piece the session counts as a few bytes.  A
command writing a little more than 64 KiB at a time made a slave pin about
16 times its window; a small ``send`` pinned a whole block per slave until
the slave's next 64 boxes.  Pinned here: what a session keeps in memory
stays within twice what it counts.

``SocketStream.send_all`` now waits for room with ``poll``: pinned here are
the properties ``SO_SNDTIMEO`` gave (a bounded wait without progress, none
with progress, a signal changes nothing) and the stream contract that
``abort()`` from another thread ends a send waiting for room, on TCP and on
a Unix socket pair (the local transport; OpenSSH's stream is one too).
Real sockets on 127.0.0.1 and real slave processes throughout.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, List, Tuple

import pytest

from remsh.master.slavelistener.tcp import TcpSlaveListener
from remsh.protocol.session import Lent
from remsh.transports.base import SocketStream
from tests.slaveproc import HOST, SlaveProcesses, slave_procs, tcp_listener, wait_registered  # noqa: F401
from tests.test_send_peer_closed import tcp_connection
from tests.util import WAIT, run_in_thread, wait_until

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


# -- what a session pins for what it counts --------------------------------------------


def _pinned(kept: object) -> int:
    """Bytes of memory a kept entry holds: a lent buffer's whole buffer."""
    if isinstance(kept, Lent):
        return memoryview(kept.data.obj).nbytes
    if isinstance(kept, (bytes, bytearray, memoryview)):
        return len(kept)
    return 0  # a place in the spool file


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


#: writes argv[2] bytes at a time, pausing so that the slave reads each write
#: on its own, and notes after each write how much it wrote (argv[1])
CHUNKS = """\
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600)
chunk = b"x" * int(sys.argv[2])
n = 0
for i in range(400):
    os.write(1, chunk)
    n += len(chunk)
    os.pwrite(fd, b"%012d" % n, 0)
    time.sleep(0.002)
"""


def test_a_slave_streaming_output_a_little_over_64k_at_a_time_pins_about_what_its_window_counts(
        tcp_listener: Callable[..., TcpSlaveListener], slave_procs: SlaveProcesses, tmp_path: Path) -> None:
    """A command writing 70000 bytes at a time to a master that stops reading: the slave's memory grows by about what it holds unacknowledged, not a 1 MiB block per read."""
    listener = tcp_listener(resume_timeout=30)
    proc = slave_procs.start(listener.port, "chunky")
    slave = wait_registered(listener, proc)
    script = tmp_path / "chunks.py"
    script.write_text(CHUNKS)
    progress = tmp_path / "progress"
    progress.write_bytes(b"0" * 12)
    base = _rss(proc.pid)
    gate = threading.Event()
    got: List[int] = []

    def stalled(data: bytes) -> None:
        got.append(len(data))
        gate.wait(WAIT * 3)  # a master whose consumer stalls: it reads and acknowledges no more

    outcome: List[object] = []
    call = threading.Thread(target=lambda: outcome.append(slave.execute(
        [sys.executable, str(script), str(progress), "70000"], stdout_cb=stalled)), daemon=True)
    call.start()
    try:
        last = [-1, time.monotonic()]

        def still() -> bool:
            now = int(progress.read_bytes()[:12] or b"0")
            if now != last[0]:
                last[:] = [now, time.monotonic()]
            return time.monotonic() - last[1] > 1.0
        wait_until(still, timeout=WAIT * 2, what="the command to block on its output")
        written = last[0]
        assert written < 400 * 70000, "the command wrote everything: nothing held back"
        grown = _rss(proc.pid) - base
        # the slave holds at most `written` bytes of output (pipe, socket,
        # kept): twice that plus room for the pool's free blocks and the
        # supervisor is generous; a 1 MiB block per 70000-byte read is not
        assert grown <= 2 * written + 16 * MiB, (
            f"the slave grew by {grown / MiB:.1f} MiB holding at most {written / MiB:.1f} MiB of output")
    finally:
        gate.set()
        call.join(WAIT * 3)
    assert outcome == [0] and sum(got) == 400 * 70000


def test_small_files_sent_over_a_session_pin_no_more_than_twice_what_it_counts(
        tcp_listener: Callable[..., TcpSlaveListener], slave_procs: SlaveProcesses, tmp_path: Path) -> None:
    """Small files sent to a slave: what the master's session keeps until the slave acknowledges (every 64 boxes) pins at most twice the bytes it counts, not a 1 MiB block per file."""
    listener = tcp_listener(resume_timeout=30)
    proc = slave_procs.start(listener.port, "smallfiles")
    slave = wait_registered(listener, proc)
    data = os.urandom(300)
    src = tmp_path / "small"
    src.write_bytes(data)
    for i in range(4):
        slave.send(src, Path(f"copy{i}"))
    session = slave.session_wire
    assert session is not None
    kept = list(session.state.kept)
    assert kept, "the slave acknowledged everything: nothing kept to look at"
    counted = sum(entry.size for entry in kept)
    pinned = sum(_pinned(entry.data) for entry in kept)
    assert pinned <= 2 * counted, f"{pinned} bytes pinned for {counted} counted ({len(kept)} entries)"
    for i in range(4):
        assert (proc.basedir / f"copy{i}").read_bytes() == data


def test_a_file_with_a_short_tail_sent_over_a_session_pins_at_most_twice_what_it_counts(
        tcp_listener: Callable[..., TcpSlaveListener], slave_procs: SlaveProcesses, tmp_path: Path) -> None:
    """A file of full blocks and a short tail sent over a session: the data arrives intact, and what stays kept pins at most twice what is counted."""
    listener = tcp_listener(resume_timeout=30)
    proc = slave_procs.start(listener.port, "bigfile")
    slave = wait_registered(listener, proc)
    data = os.urandom(5 * MiB + 12345)
    src = tmp_path / "big"
    src.write_bytes(data)
    slave.send(src, Path("big"))
    session = slave.session_wire
    assert session is not None
    kept = list(session.state.kept)
    assert sum(_pinned(e.data) for e in kept) <= 2 * sum(e.size for e in kept)
    got = (proc.basedir / "big").read_bytes()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


# -- sends waiting for room ------------------------------------------------------------


@pytest.fixture(params=["tcp", "unix"])
def stuck_pair(request: pytest.FixtureRequest) -> Iterator[Tuple[socket.socket, socket.socket]]:
    """A connected pair whose far end reads nothing (small buffers): TCP on
    127.0.0.1, or a Unix socket pair (the local transport, OpenSSH's stream)."""
    near, far = tcp_connection() if request.param == "tcp" else socket.socketpair()
    near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    try:
        yield near, far
    finally:
        near.close()
        far.close()


def test_a_send_waiting_for_room_ends_at_its_time_limit_when_the_peer_reads_nothing(stuck_pair) -> None:
    """A peer that neither reads nor closes: the send waiting for room raises TimeoutError after the send time limit, as SO_SNDTIMEO made it."""
    near, far = stuck_pair
    stream = SocketStream(near, peer="test", send_timeout=0.5)
    start = time.monotonic()
    sender = run_in_thread(lambda: stream.send_all(b"z" * (16 * MiB)))
    assert sender.done.wait(WAIT), f"the send still waits {WAIT:g} s on a peer that reads nothing"
    assert isinstance(sender.error, TimeoutError), sender.error
    assert sender.finished_at is not None and 0.4 <= sender.finished_at - start < 5.0


def test_a_send_to_a_slow_reader_is_not_cut_by_the_time_limit(stuck_pair) -> None:
    """A peer that reads a little at intervals shorter than the send time limit: the send goes on past that limit (it bounds a wait without progress) and every byte arrives in order."""
    near, far = stuck_pair
    stream = SocketStream(near, peer="test", send_timeout=1.0)
    data = os.urandom(2 * MiB)
    start = time.monotonic()
    sender = run_in_thread(lambda: stream.send_all(data))
    received = bytearray()
    far.settimeout(WAIT)
    while len(received) < len(data):
        time.sleep(0.03)  # a slow consumer: the send must wait for room again and again
        received += far.recv(32 << 10)
    assert sender.done.wait(WAIT) and sender.error is None
    assert sender.finished_at is not None and sender.finished_at - start > 1.0, \
        "the reader was not slow enough to outlast the time limit"
    assert bytes(received) == data


@pytest.mark.parametrize("how", ["abort", "shutdown"])
def test_abort_or_shutdown_from_another_thread_ends_a_send_waiting_for_room(stuck_pair, how: str) -> None:
    """The stream contract: abort() or shutdown() from another thread wakes a send waiting for room at once (it raises OSError), with no time limit to fall back on."""
    near, far = stuck_pair
    stream = SocketStream(near, peer="test", send_timeout=None)
    sender = run_in_thread(lambda: stream.send_all(b"z" * (16 * MiB)))
    wait_until(lambda: sender.done.is_set() or _blocked(near), WAIT, "the send to wait for room")
    assert not sender.done.is_set(), "everything fit in the socket buffers: nothing waited"
    woken = time.monotonic()
    getattr(stream, how)()
    assert sender.done.wait(5.0), f"{how}() did not wake the send waiting for room"
    assert isinstance(sender.error, OSError), sender.error
    assert sender.finished_at is not None and sender.finished_at - woken < 5.0


def _blocked(sock: socket.socket) -> bool:
    """Whether ``sock`` has no room to send (a poll for POLLOUT says no)."""
    import select

    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    return not poller.poll(0)


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs pthread_kill")
def test_signals_while_a_send_waits_for_room_change_nothing(stuck_pair) -> None:
    """A storm of signals (a handler that returns) at the main thread while its send waits for room: the send neither fails nor loses or repeats a byte."""
    near, far = stuck_pair
    stream = SocketStream(near, peer="test", send_timeout=5.0)
    data = os.urandom(2 * MiB)
    received = bytearray()
    far.settimeout(WAIT)
    main = threading.main_thread().ident
    assert main == threading.get_ident()
    done = threading.Event()
    fired = [0]

    def handler(signum: int, frame: object) -> None:
        fired[0] += 1

    def storm() -> None:
        while not done.wait(0.005):
            signal.pthread_kill(main, signal.SIGUSR1)  # type: ignore[arg-type]

    def reader() -> None:
        time.sleep(0.3)  # the send waits for room meanwhile, under the signals
        while len(received) < len(data):
            chunk = far.recv(64 << 10)
            if not chunk:
                return
            received.extend(chunk)
            time.sleep(0.005)

    old = signal.signal(signal.SIGUSR1, handler)
    threads = [threading.Thread(target=f, daemon=True) for f in (storm, reader)]
    for t in threads:
        t.start()
    try:
        stream.send_all(data)
    finally:
        done.set()
        threads[0].join(WAIT)
        signal.signal(signal.SIGUSR1, old)
    threads[1].join(WAIT)
    assert fired[0] > 5, "too few signals arrived during the send to test anything"
    assert bytes(received) == data


# -- lent blocks across a cut while other transfers churn the pool ---------------------


def test_a_send_cut_and_resumed_while_another_send_churns_the_block_pool_arrives_intact(
        tcp_listener: Callable[..., TcpSlaveListener], slave_procs: SlaveProcesses, tmp_path: Path) -> None:
    """Two sends from one master (one block pool): one slave is cut mid-send and kept away while the other send takes and returns blocks; what the first session kept lent is resent as it was lent, and both files arrive intact."""
    from tests.relay import Relay

    listener = tcp_listener(resume_timeout=60)
    relay = Relay(HOST, listener.port, lifetime=300)
    try:
        cut_proc = slave_procs.start(relay.port, "cutoff", max_backoff=0.2, extra_args=["--heartbeat", "0.3"])
        cut_slave = wait_registered(listener, cut_proc)
        busy_proc = slave_procs.start(listener.port, "busy")
        busy_slave = wait_registered(listener, busy_proc)
        size = 24 * MiB
        cut_data, busy_data = os.urandom(size), os.urandom(size)
        (tmp_path / "cut").write_bytes(cut_data)
        (tmp_path / "busy").write_bytes(busy_data)
        relay.refuse()  # the registration's connection goes on; a redial will not, until restored
        fired = relay.cut_when(to_client=relay.bytes_forwarded.to_client + size // 3)
        errors: List[BaseException] = []

        def send(slave, name: str) -> None:  # type: ignore[no-untyped-def]
            try:
                slave.send(tmp_path / name, Path(name))
            except BaseException as e:  # noqa: BLE001 - the test looks at it
                errors.append(e)

        threads = [threading.Thread(target=send, args=(cut_slave, "cut"), daemon=True)]
        threads[0].start()
        assert fired.wait(WAIT), "the send never reached the cut"
        wait_until(lambda: not cut_slave.connected, what="the master to notice the cut")
        cut_session = cut_slave.session_wire
        assert cut_session is not None
        assert any(isinstance(e.data, Lent) for e in list(cut_session.state.kept)), "no lent block kept while away"
        busy_session = busy_slave.session_wire
        assert busy_session is not None
        start = busy_session.sent
        threads.append(threading.Thread(target=send, args=(busy_slave, "busy"), daemon=True))
        threads[1].start()
        # the other send churns the pool while the cut session holds its lent blocks
        wait_until(lambda: busy_session.sent - start > 128 or not threads[1].is_alive(),
                   what="the other send to go on")
        relay.restore()
        for t in threads:
            t.join(WAIT * 3)
        assert not any(t.is_alive() for t in threads), "a send did not finish"
        assert errors == [], errors
        assert hashlib.sha256((cut_proc.basedir / "cut").read_bytes()).digest() == hashlib.sha256(cut_data).digest()
        assert hashlib.sha256((busy_proc.basedir / "busy").read_bytes()).digest() == \
            hashlib.sha256(busy_data).digest()
        assert relay.accepted >= 2
    finally:
        relay.close()
