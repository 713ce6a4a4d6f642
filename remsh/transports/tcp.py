"""TCP (and TLS over TCP) for both ends: the master's accept loop and the
slave's dialler.

The accept loop owns one thread.  Each accepted connection is handed to a
handshake worker thread, but only up to ``max_pending`` at once: beyond that
new connections are closed on arrival, so a flood of silent or hostile
connections cannot exhaust threads or file descriptors.  Every handshake is
bounded in time by the listener, so a pending slot is always given back.
Once registered, a connection needs no thread at all.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from typing import Callable, Optional, Tuple

from remsh.transports.base import SocketStream, _format_addr

log = logging.getLogger(__name__)

#: TCP keepalive (idle seconds, probe interval, probe count): a vanished peer
#: is noticed within about idle + interval * count = 25 s.
DEFAULT_KEEPALIVE: Tuple[int, int, int] = (10, 5, 3)
DEFAULT_MAX_PENDING = 64
DEFAULT_CONNECT_TIMEOUT = 10.0


class TcpServer:
    """Accepts TCP connections and hands each, as a stream, to ``handler``.

    ``handler(stream)`` runs in a worker thread and must return once the
    connection is registered or refused (it is expected to bound its own
    time).  With ``ssl_context`` the TLS handshake happens in that worker,
    bounded by ``handshake_timeout``.
    """

    def __init__(self, handler: Callable[[SocketStream], None], *, host: Optional[str] = None,
                 port: int = 0, ssl_context: Optional[ssl.SSLContext] = None,
                 max_pending: int = DEFAULT_MAX_PENDING, handshake_timeout: float = 10.0,
                 keepalive: Optional[Tuple[int, int, int]] = DEFAULT_KEEPALIVE,
                 backlog: int = 128) -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.handshake_timeout = handshake_timeout
        self.keepalive = keepalive
        self.backlog = backlog
        self._slots = threading.BoundedSemaphore(max_pending)
        self._sock: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self._pending_lock = threading.Lock()
        self._pending: set = set()
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
        """Stop accepting, close the port and drop unfinished handshakes."""
        self._stopping.set()
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._pending_lock:
            pending = list(self._pending)
        for s in pending:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        # unfinished handshakes were cut above: wait for their workers, so
        # that none registers a slave after stop() returns
        with self._drained:
            self._drained.wait_for(lambda: not self._pending, timeout)

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
            if not self._slots.acquire(blocking=False):
                log.warning("refusing connection from %s: too many unfinished handshakes", peer)
                conn.close()
                continue
            with self._pending_lock:
                self._pending.add(conn)
            t = threading.Thread(target=self._handle, args=(conn, peer), name=f"remsh-handshake-{peer}",
                                 daemon=True)
            try:
                t.start()
            except RuntimeError:
                self._release(conn)
                conn.close()

    def _release(self, conn: socket.socket) -> None:
        with self._pending_lock:
            self._pending.discard(conn)
            self._drained.notify_all()
        self._slots.release()

    def _handle(self, conn: socket.socket, peer: str) -> None:
        deadline = time.monotonic() + self.handshake_timeout
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
                    self._pending.discard(conn)
                    self._pending.add(tls)
                conn = tls
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
            self._release(conn)


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
