"""Every transport's stream against the contract written in
:class:`remsh.transports.base.StreamLike`.

Each transport gives a connected pair of real streams: a socket pair (the
local transport), TCP and TLS through :class:`~remsh.transports.tcp.TcpServer`
and :func:`~remsh.transports.tcp.connect`, the embedded SSH server's channel
and the slave's (:class:`~remsh.transports.ssh.SshServer`,
:func:`~remsh.transports.ssh.connect_embedded`), and a ``direct-tcpip``
tunnel through a real OpenSSH ``sshd`` (:func:`~remsh.transports.ssh.connect_via`)
with the TCP socket it reaches.  Every test runs on both ends of every pair
(``near`` is the stream under test, ``far`` its peer): send and receive,
time limits, ``fileno()`` readiness, end of stream, a thread blocked in
``recv`` woken by ``shutdown``/``abort``/``close`` from another thread or
by the peer vanishing, and sending to a peer that is gone.
"""

from __future__ import annotations

import hashlib
import os
import queue
import select
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import paramiko
import pytest

from remsh.transports import ssh, tcp
from remsh.transports.base import SocketStream, StreamLike
from tests.slaveproc import HOST, WAIT
from tests.sshd import Sshd, make_key, require_sshd, write_known_hosts
from tests.transports import Pki, client_context, make_pki, server_context

pytestmark = pytest.mark.timeout(60)

#: How soon a woken or ended receive must return (seconds).
PROMPT = 5.0


class Pair(NamedTuple):
    near: Any  # the stream under test
    far: Any  # its peer


class Servers:
    """The module's shared parts, made on first use: a PKI, an embedded SSH
    server, an OpenSSH sshd, and TCP servers handing over accepted streams."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.cleanups: List[Callable[[], None]] = []
        self._pki: Optional[Pki] = None
        self._tcp: Dict[str, Tuple[int, "queue.Queue[SocketStream]"]] = {}
        self._ssh: Optional[Tuple[int, Path, Path, "queue.Queue[ssh.ChannelStream]"]] = None
        self._sshd: Optional[Tuple[Sshd, Path, Path]] = None

    @property
    def pki(self) -> Pki:
        if self._pki is None:
            self._pki = make_pki(self.workdir / "pki")
        return self._pki

    def tcp_server(self, tls: bool) -> Tuple[int, "queue.Queue[SocketStream]"]:
        """A started TcpServer (TLS or not) whose handler hands each accepted stream over."""
        key = "tls" if tls else "tcp"
        if key not in self._tcp:
            accepted: "queue.Queue[SocketStream]" = queue.Queue()
            server = tcp.TcpServer(accepted.put, host=HOST, port=0,
                                   ssl_context=server_context(self.pki) if tls else None)
            server.start()
            self.cleanups.append(server.stop)
            self._tcp[key] = (server.port, accepted)
        return self._tcp[key]

    def ssh_server(self) -> Tuple[int, Path, Path, "queue.Queue[ssh.ChannelStream]"]:
        """A started SshServer (port, client key file, known_hosts, accepted channel streams)."""
        if self._ssh is None:
            host_key = paramiko.ECDSAKey.generate()
            client_key = self.workdir / "client_key"
            key = make_key("ecdsa", client_key)
            authorized = self.workdir / "authorized_keys"
            authorized.write_text(ssh.authorized_keys_line(key, "conformance") + "\n")
            accepted: "queue.Queue[ssh.ChannelStream]" = queue.Queue()
            server = ssh.SshServer(accepted.put, host_key=host_key, authorized_keys=authorized, host=HOST)
            server.start()
            self.cleanups.append(server.stop)
            known = write_known_hosts(self.workdir / "known_hosts_embedded", [(HOST, server.port, host_key)])
            self._ssh = (server.port, client_key, known, accepted)
        return self._ssh

    def sshd(self) -> Tuple[Sshd, Path, Path]:
        """A started OpenSSH sshd (server, client key file, known_hosts)."""
        if self._sshd is None:
            require_sshd()
            client_key = self.workdir / "id_ed25519"
            key = make_key("ed25519", client_key)
            authorized = self.workdir / "sshd_authorized_keys"
            authorized.write_text(f"{key.get_name()} {key.get_base64()} conformance\n")
            server = Sshd(self.workdir / "sshd", authorized).start()
            self.cleanups.append(server.stop)
            known = write_known_hosts(self.workdir / "known_hosts_sshd", [(HOST, server.port, server.host_key)])
            self._sshd = (server, client_key, known)
        return self._sshd

    def close(self) -> None:
        for cleanup in reversed(self.cleanups):
            cleanup()


def _accepted(q: "queue.Queue[Any]") -> Any:
    try:
        return q.get(timeout=WAIT)
    except queue.Empty:
        pytest.fail(f"no connection accepted within {WAIT:g} s")


def local_pair(servers: Servers) -> Tuple[Any, Any]:
    a, b = socket.socketpair()
    return SocketStream(a, peer="local a", send_timeout=None), SocketStream(b, peer="local b", send_timeout=None)


def tcp_pair(servers: Servers, tls: bool = False) -> Tuple[Any, Any]:
    port, accepted = servers.tcp_server(tls)
    client = tcp.connect(HOST, port, timeout=WAIT, ssl_context=client_context(servers.pki) if tls else None)
    return client, _accepted(accepted)


def tls_pair(servers: Servers) -> Tuple[Any, Any]:
    return tcp_pair(servers, tls=True)


def ssh_pair(servers: Servers) -> Tuple[Any, Any]:
    port, key, known, accepted = servers.ssh_server()
    client = ssh.connect_embedded("remsh", HOST, port, identity=key, known_hosts=known, timeout=WAIT)
    return client, _accepted(accepted)


def openssh_pair(servers: Servers) -> Tuple[Any, Any]:
    sshd, key, known = servers.sshd()
    with socket.create_server((HOST, 0)) as listening:
        listening.settimeout(WAIT)
        client = ssh.connect_via(sshd.user, HOST, sshd.port, identity=key, known_hosts=known, dest_host=HOST,
                                 dest_port=listening.getsockname()[1], timeout=WAIT)
        sock, _ = listening.accept()
    sock.settimeout(None)
    return client, SocketStream(sock)


#: Every transport's stream pair: a new transport is checked by adding one entry.
PAIRS: Dict[str, Callable[[Servers], Tuple[Any, Any]]] = {
    "local": local_pair,
    "tcp": tcp_pair,
    "tls": tls_pair,
    "ssh": ssh_pair,
    "openssh": openssh_pair,
}


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """The module's servers, each started on first use and stopped at the end."""
    s = Servers(tmp_path_factory.mktemp("stream-conformance"))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(params=[(name, side) for name in PAIRS for side in ("a", "b")],
                ids=[f"{name}-{side}" for name in PAIRS for side in ("a", "b")])
def pair(request: pytest.FixtureRequest, servers: Servers) -> Iterator[Pair]:
    """A connected pair of one transport; ``near`` is the side under test (a: the dialling side)."""
    name, side = request.param
    a, b = PAIRS[name](servers)
    try:
        yield Pair(a, b) if side == "a" else Pair(b, a)
    finally:
        a.close()
        b.close()


# -- helpers -------------------------------------------------------------------------------


def receive_all(stream: Any, timeout: float = WAIT) -> bytes:
    """Everything ``stream`` receives until end of stream; fails past ``timeout``."""
    deadline = time.monotonic() + timeout
    data = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"no end of stream within {timeout:g} s ({len(data)} bytes received)")
        try:
            chunk = stream.recv(65536, left)
        except TimeoutError:
            continue
        if not chunk:
            return bytes(data)
        data += chunk


def receive_exactly(stream: Any, size: int, timeout: float = WAIT) -> bytes:
    deadline = time.monotonic() + timeout
    data = bytearray()
    while len(data) < size:
        chunk = stream.recv(size - len(data), max(0.0, deadline - time.monotonic()))
        assert chunk, f"end of stream after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


class BlockedReceive:
    """A thread blocked in ``stream.recv(…, None)``; ``outcome`` is what ended it."""

    def __init__(self, stream: Any) -> None:
        self.outcome: List[object] = []
        self.started = threading.Event()
        self.ended_at = 0.0

        def run() -> None:
            self.started.set()
            try:
                self.outcome.append(stream.recv(4096, None))
            except OSError as e:
                self.outcome.append(e)
            self.ended_at = time.monotonic()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert self.started.wait(WAIT)
        # it has nothing to read: still running after a moment means blocked
        self.thread.join(0.2)
        assert self.thread.is_alive(), f"recv returned with nothing sent: {self.outcome}"

    def ended(self, since: float) -> object:
        """What ended the receive; fails unless it ended within PROMPT of ``since``."""
        self.thread.join(PROMPT)
        assert not self.thread.is_alive(), f"recv still blocked {PROMPT:g} s later"
        assert self.ended_at - since < PROMPT
        return self.outcome[0]


def needs(stream: Any, member: str) -> None:
    """xfail a behaviour test whose stream lacks ``member`` (test_attributes_and_protocol_members fails for it)."""
    if not hasattr(stream, member):
        pytest.xfail(f"{type(stream).__name__} has no {member}() yet")


def ended_quietly_or_failed(result: object) -> bool:
    return result == b"" or (isinstance(result, OSError) and not isinstance(result, TimeoutError))


# -- the contract --------------------------------------------------------------------------


def test_attributes_and_protocol_members(pair: Pair) -> None:
    """A stream names its peer, says what identity it proved (or None) and offers every StreamLike member."""
    near = pair.near
    assert isinstance(near.peer, str) and near.peer
    assert near.identity is None or isinstance(near.identity, str)
    assert near.handshake_deadline is None or isinstance(near.handshake_deadline, float)
    members = [m for m in StreamLike.__dict__ if not m.startswith("_")] + list(StreamLike.__annotations__)
    missing = sorted(m for m in set(members) if not hasattr(near, m))
    assert missing == [], f"{type(near).__name__} lacks {missing}"
    assert isinstance(near.pending(), int) and near.pending() >= 0


def test_send_and_receive_in_order(pair: Pair) -> None:
    """4 MiB sent with send_all arrive whole and in order, while the peer sends back at the same time."""
    data = os.urandom(4 << 20)
    back: List[bytes] = []
    peer = threading.Thread(target=lambda: back.append(receive_exactly(pair.far, len(data))), daemon=True)
    peer.start()
    echo = os.urandom(1 << 20)
    sender = threading.Thread(target=pair.far.send_all, args=(echo,), daemon=True)
    sender.start()
    pair.near.send_all(memoryview(data))
    assert receive_exactly(pair.near, len(echo)) == echo
    peer.join(WAIT)
    sender.join(WAIT)
    assert back and hashlib.sha256(back[0]).digest() == hashlib.sha256(data).digest()


def test_recv_returns_at_most_size_as_soon_as_data_is_there(pair: Pair) -> None:
    """recv gives no more than it is asked for, and returns what has arrived without waiting for more."""
    pair.far.send_all(b"0123456789")
    got = pair.near.recv(4, WAIT)
    assert 1 <= len(got) <= 4 and b"0123456789".startswith(got)
    rest = receive_exactly(pair.near, 10 - len(got))
    assert got + rest == b"0123456789"


def test_recv_into_fills_the_buffer_start(pair: Pair) -> None:
    """recv_into writes the bytes to the start of the buffer and returns their count."""
    needs(pair.near, "recv_into")
    pair.far.send_all(b"hello")
    buf = memoryview(bytearray(64))
    got = b""
    deadline = time.monotonic() + WAIT
    while len(got) < 5:
        n = pair.near.recv_into(buf, max(0.0, deadline - time.monotonic()))
        assert 0 < n <= 64
        got += bytes(buf[:n])
    assert got == b"hello"


def test_recv_time_limits(pair: Pair) -> None:
    """With nothing to read, recv(…, 0) raises TimeoutError at once and recv(…, 0.3) after about 0.3 s."""
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        pair.near.recv(100, 0)
    assert time.monotonic() - start < 1.0
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        pair.near.recv(100, 0.3)
    assert 0.25 <= time.monotonic() - start < PROMPT
    # the stream is still usable after a time limit passed
    pair.far.send_all(b"after")
    assert receive_exactly(pair.near, 5) == b"after"


def test_fileno_readable_when_data_arrives(pair: Pair) -> None:
    """fileno() becomes readable once the peer sends; readiness with nothing to read (a TLS ticket) makes recv(…, 0) time out."""
    near = pair.near
    if select.select([near.fileno()], [], [], 0.1)[0]:
        with pytest.raises(TimeoutError):  # spurious: a record with no data in it
            near.recv(100, 0)
    pair.far.send_all(b"ping")
    readable, _, _ = select.select([near.fileno()], [], [], WAIT)
    assert readable == [near.fileno()] or near.pending() > 0
    assert receive_exactly(near, 4, timeout=1.0) == b"ping"


def test_a_short_read_leaves_the_rest_announced_and_close_drops_it(pair: Pair) -> None:
    """After a short recv of a large arrival the rest is announced (fileno or pending); after close pending() is 0 and recv raises OSError."""
    near, far = pair.near, pair.far
    data = os.urandom(1 << 20)
    sender = threading.Thread(target=far.send_all, args=(data,), daemon=True)
    sender.start()
    first = near.recv(1000, WAIT)
    assert 1 <= len(first) <= 1000
    assert select.select([near.fileno()], [], [], WAIT)[0] or near.pending() > 0
    assert first + receive_exactly(near, len(data) - len(first)) == data
    sender.join(WAIT)

    def send_quietly() -> None:
        try:
            far.send_all(data)
        except OSError:
            pass  # the near end closed while this was sending

    sender = threading.Thread(target=send_quietly, daemon=True)
    sender.start()
    assert 1 <= len(near.recv(1000, WAIT)) <= 1000
    near.close()
    assert near.pending() == 0
    with pytest.raises(OSError) as info:
        near.recv(1000, 0)
    assert not isinstance(info.value, TimeoutError)
    far.shutdown()
    sender.join(WAIT)


def test_end_of_stream_after_the_data(pair: Pair) -> None:
    """When the peer sends and closes, recv returns all the data, then b"" and fileno() is readable."""
    pair.far.send_all(b"last words")
    pair.far.close()
    readable, _, _ = select.select([pair.near.fileno()], [], [], WAIT)
    assert readable
    assert receive_all(pair.near) == b"last words"


def test_shutdown_wakes_a_blocked_recv(pair: Pair) -> None:
    """shutdown() from another thread ends a recv blocked without a time limit (b"" or OSError), and the peer sees the end."""
    blocked = BlockedReceive(pair.near)
    t0 = time.monotonic()
    pair.near.shutdown()
    assert ended_quietly_or_failed(blocked.ended(t0))
    pair.near.shutdown()  # idempotent
    assert ended_quietly_or_failed(_receive_end(pair.far))


def test_abort_wakes_a_blocked_recv_and_the_peer_sees_the_end_at_once(pair: Pair) -> None:
    """abort() from another thread ends a blocked recv, and the peer sees the end although data is still queued."""
    needs(pair.near, "abort")
    blocked = BlockedReceive(pair.near)
    # queue more than the peer will read: abort must not wait behind it
    try:
        pair.near.send_all(os.urandom(64 << 10))
    except OSError:
        pass
    t0 = time.monotonic()
    pair.near.abort()
    assert ended_quietly_or_failed(blocked.ended(t0))
    pair.near.abort()  # idempotent
    assert ended_quietly_or_failed(_receive_end(pair.far, discard_data=True))


def test_close_wakes_a_blocked_recv(pair: Pair) -> None:
    """close() from another thread ends a blocked recv; a second close() is harmless; recv afterwards does not hang."""
    blocked = BlockedReceive(pair.near)
    t0 = time.monotonic()
    pair.near.close()
    assert ended_quietly_or_failed(blocked.ended(t0))
    pair.near.close()
    try:
        result: object = pair.near.recv(10, 0.1)
    except OSError as e:
        result = e
    assert ended_quietly_or_failed(result)


def test_peer_vanishing_wakes_a_blocked_recv(pair: Pair) -> None:
    """A recv blocked without a time limit ends (b"" or OSError) when the peer closes the connection."""
    blocked = BlockedReceive(pair.near)
    t0 = time.monotonic()
    pair.far.close()
    assert ended_quietly_or_failed(blocked.ended(t0))


def test_sending_to_a_vanished_peer_raises_oserror(pair: Pair) -> None:
    """send_all to a peer that closed raises OSError (not TimeoutError) within a bound, instead of succeeding for ever."""
    pair.far.close()
    _receive_end(pair.near, discard_data=True)
    chunk = b"x" * 65536
    deadline = time.monotonic() + PROMPT
    with pytest.raises(OSError) as info:
        while time.monotonic() < deadline:
            pair.near.send_all(chunk)
    assert not isinstance(info.value, TimeoutError)


def _receive_end(stream: Any, discard_data: bool = False) -> object:
    """What ``stream`` sees at the end: b"" or the OSError; fails if it still waits after PROMPT."""
    deadline = time.monotonic() + PROMPT
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"the end of the connection did not reach the peer within {PROMPT:g} s")
        try:
            data = stream.recv(65536, left)
        except TimeoutError:
            continue
        except OSError as e:
            return e
        if not data:
            return b""
        assert discard_data, f"unexpected data {data[:40]!r}"
