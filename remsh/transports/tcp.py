"""TCP (and TLS over TCP) for both ends: the master's accept loop and the
slave's dialler.

The accept loop owns one thread.  Each accepted connection is handed to a
handshake worker thread and stays *unfinished* until its handler returns
(registered or refused; every handshake is bounded in time by the
listener).  The table of unfinished handshakes is bounded twice: at most
``max_pending`` in all, and at most ``max_pending_per_address`` from one
source address.  When a newcomer finds its share (or the table) full, the
*oldest quiet* unfinished handshake of that address (or of all) is dropped
to make room -- quiet meaning its peer has not been heard from: no greeting
checked (:meth:`TcpServer.mark_progress`) and no byte waiting in its
socket.  When none is quiet, the oldest is dropped.

Why drop the oldest rather than refuse the newcomer: refusing let 64 idle
connections from one address, renewed as they time out, lock every real
slave out for good.  Dropping the oldest quiet one means an idle squatter
lives only until newer connections push it out, while a real slave, which
speaks at once, is not a candidate; and the per-address share keeps one
address from pushing out everybody else's handshakes.  Workers of dropped
connections end at once (their socket is shut down), and the number of
worker threads alive is capped at twice ``max_pending``: beyond it a
newcomer is closed on arrival.

Once registered, a connection needs no thread at all.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple, Union

from remsh.transports.base import SocketStream, _format_addr, cut, cut_and_close

log = logging.getLogger(__name__)

#: TCP keepalive (idle seconds, probe interval, probe count): a vanished peer
#: is noticed within about idle + interval * count = 25 s.
DEFAULT_KEEPALIVE: Tuple[int, int, int] = (10, 5, 3)
#: Most unfinished handshakes at once.
DEFAULT_MAX_PENDING = 64
#: Most unfinished handshakes from one source address.
DEFAULT_MAX_PENDING_PER_ADDRESS = 16
DEFAULT_CONNECT_TIMEOUT = 10.0

_AnySocket = Union[socket.socket, ssl.SSLSocket]


class _Pending:
    """One unfinished handshake."""

    __slots__ = ("sock", "address", "peer", "progressed", "dropped")

    def __init__(self, sock: _AnySocket, address: str, peer: str) -> None:
        self.sock = sock
        self.address = address
        self.peer = peer
        self.progressed = False
        self.dropped = False

    def quiet(self) -> bool:
        """True when the peer has not been heard from (or is gone)."""
        if self.progressed:
            return False
        if isinstance(self.sock, ssl.SSLSocket):
            return False  # TLS is up: the peer spoke
        try:
            return not self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return True  # broken: as good as quiet


class TcpServer:
    """Accepts TCP connections and hands each, as a stream, to ``handler``.

    ``handler(stream)`` runs in a worker thread and must return once the
    connection is registered or refused (it is expected to bound its own
    time, by the stream's ``handshake_deadline``).  With ``ssl_context`` the
    TLS handshake happens in that worker, within the same limit.

    :param max_pending: most unfinished handshakes at once
    :param max_pending_per_address: most unfinished handshakes from one
        source address (at most ``max_pending``)
    """

    def __init__(self, handler: Callable[[SocketStream], None], *, host: Optional[str] = None,
                 port: int = 0, ssl_context: Optional[ssl.SSLContext] = None,
                 max_pending: int = DEFAULT_MAX_PENDING,
                 max_pending_per_address: int = DEFAULT_MAX_PENDING_PER_ADDRESS,
                 handshake_timeout: float = 10.0,
                 keepalive: Optional[Tuple[int, int, int]] = DEFAULT_KEEPALIVE,
                 backlog: int = 128) -> None:
        if max_pending < 1 or max_pending_per_address < 1:
            raise ValueError("max_pending and max_pending_per_address must be at least 1")
        self.handler = handler
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.handshake_timeout = handshake_timeout
        self.keepalive = keepalive
        self.backlog = backlog
        self.max_pending = max_pending
        self.max_pending_per_address = min(max_pending_per_address, max_pending)
        self.max_workers = 2 * max_pending
        self._sock: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self._pending_lock = threading.Lock()
        self._pending: Dict[int, _Pending] = {}  # id -> entry, oldest first
        self._workers = 0
        self._drained = threading.Condition(self._pending_lock)

    def start(self) -> None:
        """Bind, listen and start accepting; ``port`` then holds the bound port."""
        if self._sock is not None:
            raise RuntimeError("already started")
        host = self.host
        if host in (None, "", "*"):
            if socket.has_dualstack_ipv6():
                sock = socket.create_server(("", self.port), family=socket.AF_INET6,
                                            dualstack_ipv6=True, backlog=self.backlog)
            else:
                sock = socket.create_server(("", self.port), backlog=self.backlog)
        else:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.create_server((host, self.port), family=family, backlog=self.backlog)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._stopping.clear()
        self._thread = threading.Thread(target=self._accept_loop, name=f"remsh-accept-{self.port}",
                                        daemon=True)
        self._thread.start()
        log.info("listening on %s port %d%s", host or "all interfaces", self.port,
                 " (TLS)" if self.ssl_context else "")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close the port and drop unfinished handshakes;
        idempotent.  Returns once their workers are done (or ``timeout``)."""
        self._stopping.set()
        sock, self._sock = self._sock, None
        if sock is not None:
            cut_and_close(sock)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._pending_lock:
            pending = list(self._pending.values())
        for entry in pending:
            cut(entry.sock)
        # unfinished handshakes were cut above: wait for their workers, so
        # that none registers a slave after stop() returns
        with self._drained:
            self._drained.wait_for(lambda: self._workers == 0, timeout)

    @property
    def pending_count(self) -> int:
        """How many handshakes are unfinished now."""
        with self._pending_lock:
            return len(self._pending)

    def mark_progress(self, sock: _AnySocket) -> None:
        """The peer on ``sock`` was heard from (its greeting checked out):
        its handshake is no longer a candidate for dropping while quiet ones
        are left."""
        with self._pending_lock:
            for entry in self._pending.values():
                if entry.sock is sock:
                    entry.progressed = True
                    return

    def _choose_victim(self, entries: List[_Pending]) -> _Pending:
        for entry in entries:  # oldest first
            if entry.quiet():
                return entry
        return entries[0]

    def _admit(self, conn: socket.socket, address: str, peer: str) -> Optional[_Pending]:
        """Enter a new connection in the table, dropping an older one if
        its share or the table is full; ``None`` when it must be refused."""
        with self._pending_lock:
            if self._workers >= self.max_workers:
                return None
            same = [e for e in self._pending.values() if e.address == address]
            victim = None
            if len(same) >= self.max_pending_per_address:
                victim = self._choose_victim(same)
            elif len(self._pending) >= self.max_pending:
                victim = self._choose_victim(list(self._pending.values()))
            if victim is not None:
                del self._pending[id(victim)]
                victim.dropped = True
            entry = _Pending(conn, address, peer)
            self._pending[id(entry)] = entry
            self._workers += 1
        if victim is not None:
            log.warning("dropped the unfinished handshake of %s to make room for %s", victim.peer, peer)
            cut(victim.sock)
        return entry

    def _accept_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._stopping.is_set():
            try:
                conn, addr = sock.accept()
            except OSError as e:
                if self._stopping.is_set():
                    return
                log.warning("accept failed: %s", e)
                # EMFILE and friends: do not spin while the condition lasts
                self._stopping.wait(0.1)
                continue
            peer = _format_addr(addr)
            entry = self._admit(conn, str(addr[0]), peer)
            if entry is None:
                log.warning("refusing connection from %s: too many unfinished handshakes", peer)
                conn.close()
                continue
            t = threading.Thread(target=self._handle, args=(entry,), name=f"remsh-handshake-{peer}",
                                 daemon=True)
            try:
                t.start()
            except RuntimeError:
                self._release(entry)
                conn.close()

    def _release(self, entry: _Pending) -> None:
        with self._pending_lock:
            self._pending.pop(id(entry), None)
            self._workers -= 1
            self._drained.notify_all()

    def _handle(self, entry: _Pending) -> None:
        deadline = time.monotonic() + self.handshake_timeout
        conn: _AnySocket = entry.sock
        peer = entry.peer
        try:
            if self.ssl_context is not None:
                conn.settimeout(self.handshake_timeout)
                try:
                    tls = self.ssl_context.wrap_socket(conn, server_side=True)
                except (OSError, ssl.SSLError) as e:
                    log.warning("TLS handshake with %s failed: %s", peer, e)
                    conn.close()
                    return
                with self._pending_lock:
                    dropped = entry.dropped
                    entry.sock = tls
                    entry.progressed = True
                conn = tls
                if dropped:
                    conn.close()
                    return
                conn.settimeout(None)
            stream = SocketStream(conn, peer=peer, keepalive=self.keepalive)
            # what the TLS handshake used counts against the remsh handshake
            stream.handshake_deadline = deadline
            self.handler(stream)
        except Exception:  # noqa: BLE001 - one connection must never stop the listener
            log.exception("connection from %s failed", peer)
            try:
                conn.close()
            except OSError:
                pass
        finally:
            self._release(entry)




def connect(host: str, port: int, *, timeout: float = DEFAULT_CONNECT_TIMEOUT,
            ssl_context: Optional[ssl.SSLContext] = None, server_hostname: Optional[str] = None,
            keepalive: Optional[Tuple[int, int, int]] = DEFAULT_KEEPALIVE) -> SocketStream:
    """Dial a master; returns a stream (TLS-wrapped and verified if
    ``ssl_context`` is given).  Raises ``OSError`` / ``ssl.SSLError``."""
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        if ssl_context is not None:
            sock = ssl_context.wrap_socket(sock, server_hostname=server_hostname or host)
        sock.settimeout(None)
        return SocketStream(sock, peer=_format_addr((host, port)), keepalive=keepalive)
    except BaseException:
        sock.close()
        raise
