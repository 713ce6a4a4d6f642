"""The fault-injection relay of tests/relay.py, on its own: it forwards, and
cut, refuse, silence and restore do what the resume tests rely on."""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Iterator, List, Optional

import pytest

from tests.relay import BUFFER_LIMIT, READ_SIZE, Forwarded, Relay, RelayError
from tests.util import WAIT, wait_until

#: How long a test watches for something that must NOT happen.
QUIET = 0.5


class _Conn:
    """One connection as the target server saw it."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.ended: Optional[str] = None  # "eof" or "reset"
        self.lock = threading.Lock()


class TargetServer:
    """A threaded TCP server on 127.0.0.1: echoes what it gets (unless
    ``echo`` is false: then it reads nothing at all) and records, for each
    connection, what arrived and how it ended."""

    def __init__(self, echo: bool = True) -> None:
        self.echo = echo
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.conns: List[_Conn] = []
        self.lock = threading.Lock()
        self._socks: List[socket.socket] = []
        self._stop = threading.Event()
        self.sock.settimeout(0.2)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                s, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn = _Conn()
            with self.lock:
                self.conns.append(conn)
                self._socks.append(s)
            threading.Thread(target=self._serve, args=(s, conn), daemon=True).start()

    def _serve(self, s: socket.socket, conn: _Conn) -> None:
        if not self.echo:
            return  # never read: the sender's window fills
        try:
            s.settimeout(WAIT)
            while True:
                data = s.recv(65536)
                if not data:
                    conn.ended = "eof"
                    s.sendall(b"bye")
                    s.close()
                    return
                with conn.lock:
                    conn.received += data
                s.sendall(data)
        except ConnectionResetError:
            conn.ended = "reset"
        except OSError as e:
            conn.ended = f"error {e!r}"

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        with self.lock:
            for s in self._socks:
                try:
                    s.close()
                except OSError:
                    pass


@pytest.fixture
def server() -> Iterator[TargetServer]:
    srv = TargetServer()
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def relay(server: TargetServer) -> Iterator[Relay]:
    with Relay("127.0.0.1", server.port, record=4096) as r:
        yield r


def dial(relay: Relay) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", relay.port), timeout=WAIT)
    s.settimeout(WAIT)
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(min(1 << 20, n - len(out)))
        assert chunk, f"connection ended after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)


def nothing_arrives(s: socket.socket, within: float = QUIET) -> bool:
    """True when neither data nor an end of stream arrives within ``within`` s."""
    s.settimeout(within)
    try:
        s.recv(1)
    except socket.timeout:
        return True
    finally:
        s.settimeout(WAIT)
    return False


def test_forwards_both_ways_and_counts_each_direction(relay: Relay, server: TargetServer) -> None:
    """Bytes go through both ways unchanged; bytes_forwarded counts each direction, since_mark from the mark."""
    payload = os.urandom(1 << 20)
    with dial(relay) as c:
        c.sendall(payload)
        assert recv_exact(c, len(payload)) == payload
        # the count follows the write: it may trail the reader by an instant
        wait_until(lambda: relay.bytes_forwarded == Forwarded(len(payload), len(payload)),
                   what="the counters to reach the payload")
        relay.mark()
        assert relay.since_mark() == Forwarded(0, 0)
        c.sendall(b"0123456789")
        assert recv_exact(c, 10) == b"0123456789"
        wait_until(lambda: relay.since_mark() == Forwarded(10, 10), what="since_mark to count 10 each way")
        assert relay.bytes_forwarded == Forwarded(len(payload) + 10, len(payload) + 10)
    assert relay.accepted == 1


def test_cut_resets_both_ends_at_once(relay: Relay, server: TargetServer) -> None:
    """cut() gives a client blocked in recv a reset at once, and the target a reset too."""
    with dial(relay) as c:
        c.sendall(b"ping")
        assert recv_exact(c, 4) == b"ping"
        outcome: List[BaseException] = []
        got = threading.Event()

        def reader() -> None:
            try:
                c.recv(10)
            except BaseException as e:  # noqa: BLE001 - inspected below
                outcome.append(e)
            got.set()
        threading.Thread(target=reader, daemon=True).start()
        t0 = time.monotonic()
        assert relay.cut() == 1
        assert got.wait(WAIT)
        assert time.monotonic() - t0 < 1.0
        assert outcome and isinstance(outcome[0], ConnectionResetError), outcome
        wait_until(lambda: server.conns[0].ended is not None, what="the target to see the end")
        assert server.conns[0].ended == "reset"
        assert relay.active == 0


def test_cut_with_mark_and_the_counters_after_it(relay: Relay, server: TargetServer) -> None:
    """cut(mark=True) marks the counters at the cut; a new connection counts from there."""
    with dial(relay) as c:
        c.sendall(b"x" * 1000)
        recv_exact(c, 1000)
    wait_until(lambda: relay.active == 0, what="the first connection to close")
    with dial(relay) as c:
        c.sendall(b"y" * 10)
        recv_exact(c, 10)
        relay.cut(mark=True)
    with dial(relay) as c:
        c.sendall(b"z" * 7)
        recv_exact(c, 7)
        # (inside: the target's goodbye after the close would count too)
        wait_until(lambda: relay.since_mark() == Forwarded(7, 7), what="since_mark to count 7 each way")
    assert relay.bytes_forwarded.to_target >= 1017


def test_refuse_makes_connect_fail_at_once_and_restore_accepts_again(relay: Relay, server: TargetServer) -> None:
    """refuse(): a new connect fails at once (connection refused) while an open connection goes on; restore(): the same port accepts again."""
    with dial(relay) as old:
        relay.refuse()
        t0 = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", relay.port), timeout=WAIT)
        assert time.monotonic() - t0 < 1.0
        old.sendall(b"still here")
        assert recv_exact(old, 10) == b"still here"
        relay.restore()
        with dial(relay) as new:
            new.sendall(b"back")
            assert recv_exact(new, 4) == b"back"
    assert relay.accepted == 2


def test_refuse_is_idempotent_and_cut_leaves_nothing(relay: Relay, server: TargetServer) -> None:
    """refuse() twice and restore() twice are harmless; after cut() + refuse() nothing reaches the target."""
    with dial(relay):
        relay.cut()
        relay.refuse()
        relay.refuse()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", relay.port), timeout=WAIT)
        relay.restore()
        relay.restore()
        with dial(relay) as c:
            c.sendall(b"ok")
            assert recv_exact(c, 2) == b"ok"


def test_silence_delivers_nothing_closes_nothing_and_stays_after_restore(relay: Relay, server: TargetServer) -> None:
    """silence(): nothing passes either way and neither end sees a close; new connections are stalled too; after restore() the old ones stay stalled and new ones forward."""
    with dial(relay) as c:
        c.sendall(b"before")
        assert recv_exact(c, 6) == b"before"
        wait_until(lambda: relay.bytes_forwarded == Forwarded(6, 6), what="the counters to count the echo")
        before = relay.bytes_forwarded
        relay.silence()
        c.sendall(b"during")
        assert nothing_arrives(c)
        assert bytes(server.conns[0].received) == b"before"
        assert server.conns[0].ended is None
        assert relay.bytes_forwarded == before
        with dial(relay) as during:
            during.sendall(b"hello?")
            assert nothing_arrives(during)
            assert len(server.conns) == 1, "a connection made while silenced reached the target"
            assert relay.stalled == 2 and relay.active == 0
            relay.restore()
            with dial(relay) as after:
                after.sendall(b"after")
                assert recv_exact(after, 5) == b"after"
            c.sendall(b"more")
            assert nothing_arrives(c)
            assert nothing_arrives(during, 0.05)
        assert bytes(server.conns[0].received) == b"before"
        # the stalled ones still go when cut
        assert relay.cut() >= 1
        with pytest.raises(ConnectionResetError):
            c.recv(1)


def test_cut_when_fires_at_the_byte_count(relay: Relay, server: TargetServer) -> None:
    """cut_when(to_target=N) cuts as the count passes N and marks the counters there."""
    fired = relay.cut_when(to_target=100_000)
    with dial(relay) as c:
        got = bytearray()
        try:
            for _ in range(50):
                c.sendall(b"a" * 10_000)
                got += c.recv(1 << 20)
        except (ConnectionResetError, BrokenPipeError):
            pass
        assert fired.wait(WAIT)
        # one write delivers at most what the relay holds for that direction
        assert 100_000 <= relay.bytes_forwarded.to_target < 100_000 + BUFFER_LIMIT + READ_SIZE
        assert relay.since_mark() == Forwarded(0, 0)
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            for _ in range(100):
                c.sendall(b"b" * 10_000)
                c.recv(1 << 20)


def test_disarm_forgets_an_armed_cut(relay: Relay, server: TargetServer) -> None:
    """disarm(): an armed cut that has not happened never happens."""
    fired = relay.cut_when(to_client=1000)
    relay.disarm()
    with dial(relay) as c:
        c.sendall(b"w" * 5000)
        assert recv_exact(c, 5000) == b"w" * 5000
    assert not fired.is_set()


def test_cut_when_wants_one_direction(relay: Relay) -> None:
    """cut_when() with both or no directions is a usage error."""
    with pytest.raises(ValueError):
        relay.cut_when()
    with pytest.raises(ValueError):
        relay.cut_when(to_target=1, to_client=1)


def test_half_close_is_passed_on(relay: Relay, server: TargetServer) -> None:
    """A client's shutdown(SHUT_WR) reaches the target as end of stream; the target's answer and close come back."""
    with dial(relay) as c:
        c.sendall(b"last words")
        c.shutdown(socket.SHUT_WR)
        data = bytearray()
        while True:
            chunk = c.recv(4096)
            if not chunk:
                break
            data += chunk
        assert bytes(data) == b"last words" + b"bye"
    wait_until(lambda: server.conns[0].ended == "eof", what="the target to see end of stream")
    wait_until(lambda: relay.active == 0, what="the relay to drop the finished connection")


def test_a_reader_that_stops_stops_the_writer() -> None:
    """Backpressure: a target that reads nothing blocks the client after a bounded amount, the relay holding at most BUFFER_LIMIT of it."""
    srv = TargetServer(echo=False)
    try:
        with Relay("127.0.0.1", srv.port) as relay, dial(relay) as c:
            c.setblocking(False)
            sent = 0
            block = b"q" * 65536
            deadline = time.monotonic() + WAIT
            blocked_since: Optional[float] = None
            while time.monotonic() < deadline:
                try:
                    sent += c.send(block)
                    blocked_since = None
                except BlockingIOError:
                    # blocked for a while: the relay has stopped reading
                    if blocked_since is None:
                        blocked_since = time.monotonic()
                    elif time.monotonic() - blocked_since > QUIET:
                        break
                    time.sleep(0.01)
                assert sent < 64 << 20, "the relay buffers without bound"
            assert blocked_since is not None, "the client was never blocked"
            # what left the client: kernel buffers on three sockets plus the relay's own
            assert relay.bytes_forwarded.to_target <= sent
            assert sent - relay.bytes_forwarded.to_target <= BUFFER_LIMIT + (16 << 20)
    finally:
        srv.close()


def test_target_down_resets_the_client(server: TargetServer) -> None:
    """A connection the target refuses is reset at once, not held."""
    with Relay("127.0.0.1", server.port) as relay:
        server.close()
        with dial(relay) as c:
            with pytest.raises(ConnectionResetError):
                c.recv(1)


def test_transcripts_keep_the_first_bytes_of_each_connection(relay: Relay, server: TargetServer) -> None:
    """record=N keeps the first N bytes each direction, per connection, in accept order, with the time and count of each delivery."""
    for i, word in enumerate((b"first", b"second")):
        with dial(relay) as c:
            c.sendall(word)
            recv_exact(c, len(word))
            wait_until(lambda: len(relay.transcripts()) == i + 1 and relay.transcripts()[i].to_client == word,
                       what="the echo in the transcript")
    ts = relay.transcripts()
    assert [t.to_target for t in ts] == [b"first", b"second"]
    assert ts[0].to_client.startswith(b"first") and ts[1].to_client.startswith(b"second")
    assert [n for _, n in ts[0].to_target_times] == [5]
    assert ts[1].to_client_times[0][1] == 6
    assert ts[0].to_target_times[0][0] <= ts[0].to_client_times[0][0] <= ts[1].to_target_times[0][0]


def test_accept_times_and_wait_accepted(relay: Relay, server: TargetServer) -> None:
    """wait_accepted counts connections, bounded by its timeout; accept_times has one entry each."""
    assert not relay.wait_accepted(1, 0.05)
    t0 = time.monotonic()
    with dial(relay):
        assert relay.wait_accepted(1, WAIT)
    times = relay.accept_times
    assert len(times) == 1 and times[0] >= t0 - 0.01


def test_close_stops_everything_and_is_idempotent(server: TargetServer) -> None:
    """close(): connections reset, the port refuses, the thread ends, control calls raise RelayError."""
    relay = Relay("127.0.0.1", server.port)
    c = dial(relay)
    relay.close()
    relay.close()
    assert relay.closed
    assert not relay._thread.is_alive()
    with pytest.raises(ConnectionResetError):
        c.recv(1)
    c.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", relay.port), timeout=WAIT)
    with pytest.raises(RelayError):
        relay.cut()


def test_the_relay_stops_by_itself_after_its_lifetime(server: TargetServer) -> None:
    """A relay nobody closes ends by itself after its lifetime."""
    relay = Relay("127.0.0.1", server.port, lifetime=0.3)
    wait_until(lambda: relay.closed, timeout=5, what="the relay to end by itself")
    relay._thread.join(5)
    assert not relay._thread.is_alive()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", relay.port), timeout=WAIT)
