"""The TCP transport end to end: real ``remsh-slave`` processes dialling a
``TcpSlaveListener`` on 127.0.0.1.

Covers registration over TCP (the operations themselves run over every
transport in ``tests/test_operations.py``), the mutual secret proofs
(wrong secret, per-slave secrets, an impostor master played byte by byte),
blocking ``get_slave``, reconnection through a relay the test cuts, slaves
that die idle or mid-command, SIGTERM, and forty slaves at once.
"""

from __future__ import annotations

import os
import platform
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

import pytest

import remsh
from remsh.errors import Disconnected, UsageError, WaitTimeout
from remsh.handshake import (MASTER_GREETING, NONCE_LENGTH, SLAVE_GREETING, master_proof,
                             slave_proof)
from remsh.master.slavecollection.simple import SimpleSlaveCollection
from remsh.master.slavelistener.tcp import TcpSlaveListener
from remsh.wire import BoxDecoder, encode_box, encode_list
from tests.slaveproc import (HOST, SECRET, WAIT, read_until_closed, slave_procs,  # noqa: F401
                             tcp_listener, wait_registered)

pytestmark = pytest.mark.timeout(120)

EXIT_AUTH = 2


def wait_until(predicate, timeout: float, what: str) -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            pytest.fail(f"{what} within {timeout:g} s")
        time.sleep(0.02)


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


class Call:
    """A slave method call running in its own thread."""

    def __init__(self, fn, *args, **kwargs) -> None:
        self.result: object = None
        self.error: Optional[BaseException] = None
        self.done = threading.Event()
        self.ended_at = 0.0

        def run() -> None:
            try:
                self.result = fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - examined by the test
                self.error = e
            finally:
                self.ended_at = time.monotonic()
                self.done.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def wait(self, timeout: float = WAIT) -> None:
        if not self.done.wait(timeout):
            pytest.fail(f"call still running after {timeout:g} s")


class LineCollector:
    """A stdout callback that sets ``first_line`` once a whole line arrived."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.first_line = threading.Event()

    def __call__(self, data: bytes) -> None:
        self.data += data
        if b"\n" in self.data:
            self.first_line.set()


# -- registration ---------------------------------------------------


def test_slave_process_registers_with_its_name_and_facts(tcp_listener, slave_procs):
    """A remsh-slave process registers with its --name and the facts it reports about itself.

    The operations themselves run over TCP in tests/test_operations.py.
    """
    listener = tcp_listener()
    proc = slave_procs.start(listener.port, "worker-1")
    slave = wait_registered(listener, proc)
    assert slave.name == "worker-1"
    assert slave.info == {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "basedir": str(proc.basedir),
        "remsh": remsh.__version__,
    }
    assert slave.set_cwd() == str(proc.basedir)


def test_listener_opens_its_port_on_start_and_stop_closes_it_cleanly(slave_procs):
    """start() opens the port; stop() closes it and its slaves' connections, and a --no-reconnect slave exits 0."""
    listener = TcpSlaveListener(port=0, host=HOST, secret=SECRET)
    assert listener.port == 0  # nothing bound before start()
    listener.start()
    try:
        proc = slave_procs.start(listener.port, "short-lived", no_reconnect=True)
        slave = wait_registered(listener, proc)
        slave.ping()
    finally:
        listener.stop()
    assert proc.wait() == 0, proc.log_text()
    assert not slave.connected
    assert listener.slave_collection.get_all_slaves() == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, listener.port), timeout=WAIT).close()


def _free_port() -> int:
    with socket.create_server((HOST, 0)) as sock:
        return sock.getsockname()[1]


def test_no_reconnect_slave_exits_4_when_the_master_is_unreachable(slave_procs):
    """With nothing listening on the port, a --no-reconnect slave exits 4 (unreachable)."""
    proc = slave_procs.start(_free_port(), "lonely", no_reconnect=True)
    assert proc.wait() == 4, proc.log_text()


def test_no_reconnect_slave_exits_3_on_a_wrong_master_greeting(slave_procs):
    """A peer that answers with the wrong greeting is a protocol failure: exit 3, no register box sent."""
    with socket.create_server((HOST, 0)) as server:
        server.settimeout(WAIT)
        proc = slave_procs.start(server.getsockname()[1], "puzzled", no_reconnect=True)
        sock, _ = server.accept()
    with sock:
        sock.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
        received = read_until_closed(sock, WAIT)
    assert received == SLAVE_GREETING
    assert proc.wait() == 3, proc.log_text()


def test_slave_started_before_the_master_keeps_trying_until_it_registers(slave_procs):
    """A slave whose master is not up yet retries with back-off and registers once the listener starts."""
    port = _free_port()
    proc = slave_procs.start(port, "early-bird", max_backoff=0.5)
    wait_until(lambda: proc.log_text().count("reconnecting in") >= 2 or proc.poll() is not None, WAIT,
               "the slave did not retry")
    assert proc.poll() is None, proc.log_text()
    listener = TcpSlaveListener(port=port, host=HOST, secret=SECRET)
    listener.start()
    try:
        wait_registered(listener, proc).ping()
    finally:
        listener.stop()


# -- credentials ------------------------------------------------------------------


def test_listener_needs_secret_or_authenticator_unless_insecure_is_asked():
    """TcpSlaveListener with neither secret nor authenticator raises UsageError unless allow_insecure=True."""
    with pytest.raises(UsageError):
        TcpSlaveListener(port=0, host=HOST, slave_collection=SimpleSlaveCollection())
    TcpSlaveListener(port=0, host=HOST, allow_insecure=True)  # builds; the port is not opened yet
    TcpSlaveListener(port=0, host=HOST, secret=SECRET)
    TcpSlaveListener(port=0, host=HOST, authenticator=lambda name: None)


def test_insecure_listener_serves_insecure_slave(tcp_listener, slave_procs):
    """An allow_insecure listener registers an --insecure slave, and operations work."""
    listener = tcp_listener(allow_insecure=True)
    proc = slave_procs.start(listener.port, "open-door", secret=None, insecure=True)
    slave = wait_registered(listener, proc)
    slave.ping()
    out: List[bytes] = []
    assert slave.execute(["echo", "hello"], stdout_cb=out.append) == 0
    assert b"".join(out) == b"hello\n"


def test_slave_without_any_secret_refuses_to_start(tcp_listener, slave_procs):
    """A slave with no secret and no --insecure exits 2 without registering, even with an open master."""
    listener = tcp_listener(allow_insecure=True)
    proc = slave_procs.start(listener.port, "no-secret", secret=None, no_reconnect=True)
    assert proc.wait() == EXIT_AUTH, proc.log_text()
    assert listener.slave_collection.get_all_slaves() == []


def test_slave_with_secret_refuses_master_that_proves_nothing(tcp_listener, slave_procs):
    """A slave holding a secret refuses an insecure master (no proof in `registered`): exit 2."""
    listener = tcp_listener(allow_insecure=True)
    proc = slave_procs.start(listener.port, "careful", no_reconnect=True)
    assert proc.wait() == EXIT_AUTH, proc.log_text()


def test_authenticator_gives_each_slave_its_own_secret(tcp_listener, slave_procs):
    """With an authenticator, a slave registers with its own secret; another name's secret or an unknown name fails."""
    secrets = {"alpha": b"alpha's own secret", "beta": b"beta's own secret"}
    listener = tcp_listener(authenticator=secrets.get)
    beta_with_alphas = slave_procs.start(listener.port, "beta", secret=secrets["alpha"], no_reconnect=True)
    unknown = slave_procs.start(listener.port, "gamma", secret=secrets["alpha"], no_reconnect=True)
    alpha = slave_procs.start(listener.port, "alpha", secret=secrets["alpha"])
    assert beta_with_alphas.wait() == EXIT_AUTH, beta_with_alphas.log_text()
    assert unknown.wait() == EXIT_AUTH, unknown.log_text()
    wait_registered(listener, alpha).ping()
    beta = slave_procs.start(listener.port, "beta", secret=secrets["beta"], secret_env=True)
    wait_registered(listener, beta).ping()
    assert sorted(s.name for s in listener.slave_collection.get_all_slaves()) == ["alpha", "beta"]


def test_wrong_secret_is_refused_and_listener_keeps_serving(tcp_listener, slave_procs, caplog):
    """A slave with the wrong secret exits 2, never joins the collection, and a good slave registers afterwards."""
    listener = tcp_listener()
    bad = slave_procs.start(listener.port, "intruder", secret=b"not the secret", no_reconnect=True)
    assert bad.wait() == EXIT_AUTH, bad.log_text()
    assert "auth-failed" in bad.log_text()
    assert listener.slave_collection.get_all_slaves() == []
    assert any("intruder" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    good = slave_procs.start(listener.port, "honest", secret_env=True)
    wait_registered(listener, good).ping()
    assert [s.name for s in listener.slave_collection.get_all_slaves()] == ["honest"]


# -- a master without the secret, played byte by byte ------------------------------------


class ByteConn:
    """The test's end of a raw connection: exact reads and box reads with a bound."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.decoder = BoxDecoder()
        self.boxes: List[Dict[bytes, bytes]] = []

    def _more(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail("peer sent too little in time")
        self.sock.settimeout(left)
        chunk = self.sock.recv(65536)
        if not chunk:
            pytest.fail(f"peer closed early (buffered {bytes(self.buf[:80])!r})")
        self.buf += chunk

    def read_exact(self, n: int, timeout: float = WAIT) -> bytes:
        deadline = time.monotonic() + timeout
        while len(self.buf) < n:
            self._more(deadline)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_box(self, timeout: float = WAIT) -> Dict[bytes, bytes]:
        deadline = time.monotonic() + timeout
        while True:
            self.boxes.extend(self.decoder.feed(bytes(self.buf)))
            self.buf.clear()
            if self.boxes:
                return self.boxes.pop(0)
            self._more(deadline)


def play_master(slave_procs, name: str):
    """Listen on 127.0.0.1, let a real --no-reconnect slave dial in, and run the
    master's side up to the slave's register box.  Returns (proc, conn, nonce_m, register box)."""
    with socket.create_server((HOST, 0)) as server:
        server.settimeout(WAIT)
        proc = slave_procs.start(server.getsockname()[1], name, no_reconnect=True)
        sock, _ = server.accept()
    conn = ByteConn(sock)
    sock.sendall(MASTER_GREETING)
    assert conn.read_exact(len(SLAVE_GREETING)) == SLAVE_GREETING
    nonce_m = os.urandom(NONCE_LENGTH)
    sock.sendall(encode_box({b"hello": b"remsh", b"version": b"1", b"nonce": nonce_m}))
    register = conn.read_box()
    assert register[b"register"] == name.encode()
    assert register[b"version"] == b"1"
    assert len(register[b"nonce"]) == NONCE_LENGTH
    assert register[b"proof"] == slave_proof(SECRET, nonce_m, register[b"nonce"], name.encode())
    return proc, conn, nonce_m, register


def touch_request(marker: Path) -> bytes:
    return encode_box({b"meth": b"execute", b"version": b"1",
                       b"args": encode_list([b"touch", os.fsencode(marker)]),
                       b"want_stdout": b"n", b"want_stderr": b"n"})


@pytest.mark.parametrize("forgery", ["missing-proof", "wrong-secret", "stale-nonce"])
def test_impostor_master_cannot_make_slave_run_anything(slave_procs, tmp_path, forgery):
    """A master that cannot prove the secret gets the connection closed and its execute request is never run."""
    name = "target"
    proc, conn, nonce_m, register = play_master(slave_procs, name)
    nonce_s = register[b"nonce"]
    registered = {b"registered": name.encode()}
    if forgery == "wrong-secret":
        registered[b"proof"] = master_proof(b"a guess", nonce_s, nonce_m, name.encode())
    elif forgery == "stale-nonce":  # the right secret, but not over this connection's nonces
        registered[b"proof"] = master_proof(SECRET, os.urandom(NONCE_LENGTH), nonce_m, name.encode())
    marker = tmp_path / "marker"
    with conn.sock:
        # both boxes in one write: the request is already in the slave's buffer
        # when it checks the proof
        conn.sock.sendall(encode_box(registered) + touch_request(marker))
        answered = read_until_closed(conn.sock, WAIT)
    assert answered == b""
    assert proc.wait() == EXIT_AUTH, proc.log_text()
    assert not marker.exists()


def test_byte_level_master_with_the_secret_is_obeyed(slave_procs, tmp_path):
    """Control for the impostor test: the same bytes with the right proof run the command, and a clean close exits 0."""
    name = "target"
    proc, conn, nonce_m, register = play_master(slave_procs, name)
    proof = master_proof(SECRET, register[b"nonce"], nonce_m, name.encode())
    marker = tmp_path / "marker"
    with conn.sock:
        conn.sock.sendall(encode_box({b"registered": name.encode(), b"proof": proof}) + touch_request(marker))
        assert conn.read_box() == {}
        assert conn.read_box() == {b"result": b"0"}
    assert marker.exists()
    assert proc.wait() == 0, proc.log_text()


# -- waiting for slaves --------------------------------------------------------------


def test_get_slave_blocks_until_a_matching_slave_connects(tcp_listener, slave_procs):
    """get_slave(True, filter) waits through a non-matching registration and returns the matching slave once it connects."""
    listener = tcp_listener()
    collection = listener.slave_collection
    calling = threading.Event()

    def wait_for_late():
        calling.set()
        return collection.get_slave(True, lambda s: s.name == "late", timeout=WAIT)

    call = Call(wait_for_late)
    assert calling.wait(WAIT)
    early = slave_procs.start(listener.port, "early")
    wait_registered(listener, early)
    assert not call.done.is_set(), "get_slave returned before a matching slave connected"
    late = slave_procs.start(listener.port, "late")
    call.wait()
    assert call.error is None
    assert call.result is not None and call.result.name == "late"
    assert call.result.info["basedir"] == str(late.basedir)
    call.result.ping()


# -- reconnection ---------------------------------------------------------------------


class Relay:
    """A TCP relay on 127.0.0.1 in front of a listener, which the test can cut."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.server = socket.create_server((HOST, 0))
        self.port = self.server.getsockname()[1]
        self.cond = threading.Condition()
        self.pairs: List[dict] = []
        self.threads: List[threading.Thread] = []
        self._spawn(self._accept_loop)

    def _spawn(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                down, _ = self.server.accept()
            except OSError:
                return
            try:
                up = socket.create_connection((HOST, self.target_port), timeout=WAIT)
            except OSError:
                down.close()
                continue
            up.settimeout(None)
            pair = {"down": down, "up": up, "frozen": False}
            with self.cond:
                self.pairs.append(pair)
                self.cond.notify_all()
            self._spawn(self._pump, down, up, pair)
            self._spawn(self._pump, up, down, pair)

    def _pump(self, src: socket.socket, dst: socket.socket, pair: dict) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        if not pair["frozen"]:
            _shut(src)
            _shut(dst)

    def connections(self) -> int:
        with self.cond:
            return len(self.pairs)

    def cut(self) -> None:
        """Close both sides of every relayed connection."""
        with self.cond:
            pairs = list(self.pairs)
        for pair in pairs:
            _shut(pair["down"])
            _shut(pair["up"])

    def cut_slave_side(self) -> None:
        """Close only the slave's side: the master's side stays open and silent."""
        with self.cond:
            pairs = list(self.pairs)
        for pair in pairs:
            pair["frozen"] = True
            _shut(pair["down"])

    def close(self) -> None:
        _shut(self.server)
        self.server.close()
        with self.cond:
            pairs = list(self.pairs)
        for pair in pairs:
            _shut(pair["down"])
            _shut(pair["up"])
        for t in self.threads:
            t.join(5)
        for pair in pairs:
            pair["down"].close()
            pair["up"].close()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


@pytest.fixture
def relay_to():
    made: List[Relay] = []

    def make(port: int) -> Relay:
        relay = Relay(port)
        made.append(relay)
        return relay

    try:
        yield make
    finally:
        for relay in made:
            relay.close()


def test_slave_reconnects_after_the_connection_is_cut(tcp_listener, slave_procs, relay_to):
    """With resume_timeout=0, when the relay is cut the old slave object is disconnected and leaves; the slave
    reconnects and is usable again as a new object."""
    listener = tcp_listener(resume_timeout=0)
    relay = relay_to(listener.port)
    proc = slave_procs.start(relay.port, "phoenix", max_backoff=1.0)
    old = wait_registered(listener, proc)
    old.ping()
    gone = threading.Event()
    old.on_disconnect(lambda s: gone.set())

    relay.cut()
    assert gone.wait(WAIT), "the master did not notice the cut"
    assert old not in listener.slave_collection.get_all_slaves()
    with pytest.raises(Disconnected):
        old.ping()

    new = listener.slave_collection.get_slave(True, lambda s: s.name == "phoenix" and s is not old,
                                              timeout=WAIT)
    assert new is not None, slave_procs.logs()
    assert relay.connections() == 2
    out: List[bytes] = []
    assert new.execute(["echo", "back"], stdout_cb=out.append) == 0
    assert b"".join(out) == b"back\n"
    assert listener.slave_collection.get_all_slaves() == [new]


def test_reconnect_replaces_a_stale_registration_and_fails_its_pending_call(tcp_listener, slave_procs, relay_to):
    """With resume_timeout=0, a slave that re-registers under its name replaces the stale registration, whose
    pending execute raises Disconnected."""
    listener = tcp_listener(resume_timeout=0)
    relay = relay_to(listener.port)
    proc = slave_procs.start(relay.port, "phoenix", max_backoff=1.0)
    old = wait_registered(listener, proc)
    out = LineCollector()
    call = Call(old.execute, ["sh", "-c", "echo $$; exec sleep 60"], stdout_cb=out)
    assert out.first_line.wait(WAIT), slave_procs.logs()
    command_pid = int(out.data.split(b"\n")[0])

    # the master's side stays open and silent: only the new registration can end it
    relay.cut_slave_side()
    new = listener.slave_collection.get_slave(True, lambda s: s.name == "phoenix" and s is not old,
                                              timeout=WAIT)
    assert new is not None, slave_procs.logs()
    call.wait()
    assert isinstance(call.error, Disconnected), call.error
    assert not old.connected
    with pytest.raises(Disconnected):
        old.ping()
    new.ping()
    assert listener.slave_collection.get_all_slaves() == [new]
    # the slave killed the command when its master went away
    wait_until(lambda: pid_gone(command_pid), WAIT, "the orphaned command was not killed")


# -- slaves that die -----------------------------------------------------------------


def test_idle_slave_killed_leaves_the_collection(tcp_listener, slave_procs):
    """With resume_timeout=0, an idle slave killed with SIGKILL is disconnected and leaves the collection within
    10 s (with a resume time limit it would be waited for: tests/test_resume.py)."""
    listener = tcp_listener(resume_timeout=0)
    proc = slave_procs.start(listener.port, "mayfly")
    slave = wait_registered(listener, proc)
    gone = threading.Event()
    slave.on_disconnect(lambda s: gone.set())
    proc.signal(signal.SIGKILL)
    proc.wait()
    assert gone.wait(10.0), "the killed slave is still considered connected"
    assert listener.slave_collection.get_all_slaves() == []
    with pytest.raises(Disconnected):
        slave.ping()


def test_slave_killed_mid_execute_makes_the_call_raise(tcp_listener, slave_procs):
    """With resume_timeout=0, a slave killed with SIGKILL during a long execute makes that call raise Disconnected
    within 10 s."""
    listener = tcp_listener(resume_timeout=0)
    proc = slave_procs.start(listener.port, "doomed")
    slave = wait_registered(listener, proc)
    out = LineCollector()
    call = Call(slave.execute, ["sh", "-c", "echo $$; exec sleep 60"], stdout_cb=out)
    assert out.first_line.wait(WAIT), proc.log_text()
    command_pid = int(out.data.split(b"\n")[0])
    try:
        killed_at = time.monotonic()
        proc.signal(signal.SIGKILL)
        call.wait(10.0)
        assert isinstance(call.error, Disconnected), call.error
        assert call.ended_at - killed_at < 10.0
        assert listener.slave_collection.get_all_slaves() == []
    finally:
        # the command lives in a session of its own and outlives a SIGKILLed slave
        try:
            os.kill(command_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_sigterm_ends_slave_and_kills_its_running_command(tcp_listener, slave_procs, tmp_path):
    """SIGTERM to a slave running a long command ends the slave (by its handler) and kills the command."""
    listener = tcp_listener()
    proc = slave_procs.start(listener.port, "terminated")
    slave = wait_registered(listener, proc)
    pidfile = tmp_path / "command.pid"
    out = LineCollector()
    call = Call(slave.execute, ["sh", "-c", 'echo $$ > "$1"; echo ready; exec sleep 60', "sh", str(pidfile)],
                stdout_cb=out)
    assert out.first_line.wait(WAIT), proc.log_text()
    command_pid = int(pidfile.read_text())
    assert not pid_gone(command_pid)
    try:
        proc.signal(signal.SIGTERM)
        status = proc.wait()
        assert status >= 0, f"slave died of the signal instead of ending cleanly\n{proc.log_text()}"
        assert "Traceback" not in proc.log_text()
        wait_until(lambda: pid_gone(command_pid), WAIT, "the slave's command survived SIGTERM")
        call.wait()
        assert isinstance(call.error, Disconnected), call.error
    finally:
        if not pid_gone(command_pid):
            os.kill(command_pid, signal.SIGKILL)


# -- many slaves ------------------------------------------------------------------------


def test_forty_slaves_register_at_once_and_execute_in_parallel(tcp_listener, slave_procs):
    """Forty slave processes started together all register, and a parallel execute returns each slave's own result."""
    listener = tcp_listener()
    names = [f"swarm-{i:02d}" for i in range(40)]
    for name in names:
        slave_procs.start(listener.port, name)
    try:
        slaves = listener.slave_collection.wait_for_slaves(40, timeout=60)
    except WaitTimeout:
        pytest.fail(slave_procs.logs())
    assert sorted(s.name for s in slaves) == names

    def run(slave):
        out: List[bytes] = []
        # the output comes from the slave's side: its base directory is named after it
        rc = slave.execute(["sh", "-c", 'echo "$(basename "$PWD")-ok"'], stdout_cb=out.append, timeout=60)
        return slave.name, rc, b"".join(out)

    with ThreadPoolExecutor(max_workers=len(slaves)) as pool:
        results = list(pool.map(run, slaves))
    assert sorted(results) == [(name, 0, f"{name}-ok\n".encode()) for name in names]


class _CountingReader:
    """A binary source of ``size`` bytes that counts what has been read."""

    def __init__(self, size: int) -> None:
        self.left = size
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        n = min(self.left, n if n >= 0 else self.left)
        self.left -= n
        self.count += n
        return b"x" * n


def test_interrupt_with_stdin_backed_up_still_ends_the_command(tcp_listener, slave_procs):
    """With stdin backed up (the command reads none), interrupt() drops the connection and the slave still kills the command."""
    listener = tcp_listener()
    proc = slave_procs.start(listener.port, "backed-up")
    slave = wait_registered(listener, proc)
    out = LineCollector()
    source = _CountingReader(256 << 20)  # far more than every buffer on the way holds
    call = Call(slave.execute, ["sh", "-c", "echo $$; exec sleep 60"], stdout_cb=out, stdin=source)
    assert out.first_line.wait(WAIT), proc.log_text()
    command_pid = int(out.data.split(b"\n")[0])
    try:
        # the feeder is blocked once what it has read stops growing
        deadline = time.monotonic() + 20
        last, still = -1, 0
        while still < 5 and time.monotonic() < deadline:
            still = still + 1 if source.count == last else 0
            last = source.count
            time.sleep(0.1)
        assert still >= 5 and source.left > 0, "stdin never backed up"
        slave.interrupt()
        call.wait(30.0)
        assert isinstance(call.error, Disconnected), call.error
        wait_until(lambda: pid_gone(command_pid), 10.0, "the command to be killed")
    finally:
        try:
            os.kill(command_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
