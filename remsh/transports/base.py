"""The stream contract every transport provides (:class:`StreamLike`), and
its socket form (:class:`SocketStream`).

A stream is: send all these bytes, receive up to N bytes (``b""`` at end of
stream) within an optional time limit, close.  It also exposes ``fileno()``
so that a caller can wait on several streams with ``select``, and
``pending()`` for bytes already decrypted inside the stream (TLS) that
``select`` cannot see.

Sockets stay in blocking mode and a receive is a single system call (the
hot path of every operation): its time limit is the kernel's
(``SO_RCVTIMEO``, set only when the limit changes).  Sends are bounded by ``SO_SNDTIMEO`` so that a peer that stops
reading cannot block a sender for ever.

TLS sockets are the exception: OpenSSL reads whole records, so a blocking
read of a peer that stops inside a record would wait past any time limit
(and a peer doing so during the handshake would hold its listener slot for
ever).  A TLS socket is therefore non-blocking, and every wait for it is a
poll bounded by the caller's limit (for sends: ``send_timeout`` without
progress).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import ssl
import struct
import sys
import threading
import time
from typing import Any, Callable, List, Optional, Protocol, Tuple, Union

Buffer = Union[bytes, bytearray, memoryview]
#: TCP keepalive: (idle seconds, probe interval seconds, probe count).
Keepalive = Tuple[int, int, int]

#: Default bound on one blocked send (seconds): a peer that reads nothing for
#: this long is considered gone.
DEFAULT_SEND_TIMEOUT = 120.0


_MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0x40)
_MSG_MORE = getattr(socket, "MSG_MORE", 0)
#: the peer shut down its sending side (Linux; elsewhere a hang-up shows at the next send)
_POLLRDHUP = getattr(select, "POLLRDHUP", 0)
_splice: Optional[Callable[..., int]] = getattr(os, "splice", None) if sys.platform.startswith("linux") else None
_SPLICE_F_MORE = getattr(os, "SPLICE_F_MORE", 0)
#: what splice(2) fails with where it cannot be used at all
_SPLICE_REFUSED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM)
log = logging.getLogger(__name__)


def _timeval(seconds: float) -> bytes:
    """A ``struct timeval`` (0 = no limit), capped at what the kernel takes."""
    seconds = min(max(seconds, 0.0), 2.0 ** 31 - 1)
    if 0 < seconds < 1e-6:
        seconds = 1e-6
    sec = int(seconds)
    return struct.pack("ll", sec, int((seconds - sec) * 1e6))


class StreamLike(Protocol):
    """The transport contract: everything remsh does with a connection.

    :class:`remsh.wire.Wire` sends and receives through it, the listeners
    read ``peer``, ``identity`` and ``handshake_deadline``, the master's idle
    monitor and the slave's execute loop wait on ``fileno()`` (and
    ``pending()``), and :class:`remsh.master.slave.Slave` ends a connection
    it cannot keep in step with ``abort()``.  Every transport's stream
    (:class:`SocketStream` for local socket pairs, TCP and TLS;
    :class:`remsh.transports.ssh.ChannelStream` for SSH) provides all of it,
    and ``tests/test_stream_conformance.py`` checks each against what is
    promised here.

    Threads: one thread may send while another receives (the stdin feeder
    writes while the operation's thread reads); two threads never send at
    once, nor receive at once (``Wire`` holds a lock for sending, and
    receiving belongs to the thread that owns the conversation).
    ``shutdown()``, ``abort()`` and ``close()`` may be called from any
    thread at any time, and wake a thread blocked in ``recv`` or
    ``send_all``: that call then returns ``b""`` (``0``) or raises
    ``OSError``, promptly.

    Errors: only ``OSError`` and its subclasses; ``TimeoutError`` (a
    subclass) means a time limit passed with the connection not known to be
    broken.  :class:`~remsh.wire.Wire` turns ``TimeoutError`` into
    :class:`~remsh.errors.PeerTimeout` and any other ``OSError`` into
    :class:`~remsh.errors.Disconnected`.
    """

    #: The other end, for logs and error messages (never empty).
    peer: str
    #: The slave name the transport itself authenticated for the peer (the
    #: comment of the SSH key it logged in with), or ``None`` when the
    #: transport proves nothing about who the peer is.
    identity: Optional[str]
    #: ``time.monotonic()`` by which the remsh handshake must be done, when
    #: the transport already spent part of the handshake time limit on its
    #: own set-up (TLS, SSH); ``None`` otherwise.
    handshake_deadline: Optional[float]

    def send_all(self, data: Buffer) -> None:
        """Send every byte of ``data``, or raise.

        :raises TimeoutError: the peer read nothing for the transport's send
            time limit (how much of ``data`` went is unknown: the connection
            must be given up)
        :raises OSError: the connection is broken, or the stream was shut
            down or closed
        """
        ...

    def recv(self, size: int, timeout: Optional[float]) -> bytes:
        """Between 1 and ``size`` bytes, as soon as any are there; ``b""`` at
        end of stream (the peer closed, or this side was shut down).

        ``timeout``: ``None`` waits as long as it takes, ``0`` does not wait
        at all, a positive number waits at most that many seconds.

        :raises TimeoutError: nothing arrived within ``timeout``
        :raises OSError: the connection failed (reset, vanished peer), or
            the stream was closed
        """
        ...

    def recv_into(self, buffer: memoryview, timeout: Optional[float]) -> int:
        """Like :meth:`recv`, into ``buffer``: returns how many bytes were
        written to its start (1 to ``len(buffer)``), ``0`` at end of stream.
        Same time limit and errors as :meth:`recv`."""
        ...

    def fileno(self) -> int:
        """A descriptor that ``select``/``poll`` report readable whenever
        data, end of stream or an error is there for :meth:`recv`.  It may
        also be readable with nothing for the caller (a TLS record that
        carries no data): ``recv(…, 0)`` then raises ``TimeoutError``, so a
        caller that waits on it must take that as "nothing yet".  Valid
        until :meth:`close`."""
        ...

    def pending(self) -> int:
        """How many bytes the stream holds already received (decrypted TLS
        records) that make :meth:`fileno` no readier; ``0`` when the
        descriptor shows everything.  Never raises."""
        ...

    def shutdown(self) -> None:
        """End both directions now; the peer sees end of stream once what
        was sent reaches it.  Wakes any thread blocked on the stream.
        Idempotent; never raises."""
        ...

    def abort(self) -> None:
        """End the connection now, throwing away what is still queued to
        send: the peer sees the end at once (a reset), not after the queued
        data.  Wakes any thread blocked on the stream.  Idempotent; never
        raises."""
        ...

    def close(self) -> None:
        """:meth:`shutdown`, then release the descriptor.  Idempotent; never
        raises."""
        ...


def tune_socket(sock: socket.socket, *, send_timeout: Optional[float] = DEFAULT_SEND_TIMEOUT,
                keepalive: Optional[Keepalive] = None) -> None:
    """Set TCP_NODELAY (and TCP keepalive, if asked) and the send time limit.

    ``keepalive`` is ``(idle, interval, count)`` in seconds/probes.
    """
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if keepalive is not None:
            idle, interval, count = keepalive
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if hasattr(socket, "TCP_KEEPIDLE"):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(idle)))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, int(interval)))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, max(1, int(count)))
            if hasattr(socket, "TCP_USER_TIMEOUT"):
                # unacknowledged data also ends the connection in bounded time
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                                int((idle + interval * count) * 1000))
    if send_timeout is not None and sys.platform.startswith("linux"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(send_timeout))


class SocketStream:
    """A stream over a connected socket (TCP, TLS, Unix, socketpair).

    ``peer`` describes the other end for logs and errors; ``identity`` is the
    name a transport authenticated for the peer (``None`` when the transport
    itself proves nothing).
    """

    #: :meth:`send_all` sends from the caller's buffer (no copy of its
    #: own): a buffer lent to a session saves a copy here (``SessionWire.lends``)
    sends_views = True

    def __init__(self, sock: socket.socket, *, peer: Optional[str] = None,
                 identity: Optional[str] = None,
                 send_timeout: Optional[float] = DEFAULT_SEND_TIMEOUT,
                 keepalive: Optional[Keepalive] = None) -> None:
        self._tls = isinstance(sock, ssl.SSLSocket)
        sock.setblocking(not self._tls)
        tune_socket(sock, send_timeout=send_timeout, keepalive=keepalive)
        self._send_timeout = send_timeout
        # an OpenSSL connection must never be used by two threads at once
        # (the stdin feeder writes while the operation's thread reads): each
        # non-blocking TLS call is made under this lock, the waits outside it
        self._tls_lock = threading.Lock()
        self.sock = sock
        self.identity = identity
        #: time.monotonic() by which the connection set-up must be done, if
        #: the transport already spent part of the handshake time limit
        self.handshake_deadline: Optional[float] = None
        if peer is None:
            try:
                peer = _format_addr(sock.getpeername())
            except OSError:
                peer = "unknown peer"
        self.peer = peer
        self._fd = sock.fileno()
        self._pending = getattr(sock, "pending", None)
        self._rcvtimeo: Optional[float] = None  # SO_RCVTIMEO in force (None: none)

    def send_all(self, data: Buffer) -> None:
        if self._tls:
            self._tls_send_all(data)
            return
        try:
            sent = self.sock.send(data, _MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        if sent != len(data):
            self._send_rest(memoryview(data)[sent:])

    def _send_rest(self, view: memoryview) -> None:
        """Send what the socket did not take at once, waiting for room (at
        most the send time limit without progress, as ``SO_SNDTIMEO``) --
        and not past the peer closing its end: a peer gone without reading
        more (its window shut) would hold the send until the time limit,
        with its last words (a session's goodbye) unread behind it."""
        sock = self.sock
        timeout = self._send_timeout
        deadline = None
        while len(view):
            try:
                view = view[sock.send(view, _MSG_DONTWAIT):]
                deadline = None  # progress: the time limit starts again
                continue
            except BlockingIOError:
                pass
            if deadline is None and timeout is not None:
                # counted from the first refusal, not from each wait: a socket
                # that says it has room and then refuses (the kernel short of
                # memory for TCP) ends at the limit too
                deadline = time.monotonic() + timeout
            _wait_to_send(self._fd, deadline)

    def recv(self, size: int, timeout: Optional[float]) -> bytes:
        if self._tls:
            return bytes(self._tls_io(self.sock.recv, size, timeout))
        try:
            if timeout is not None and timeout <= 0:
                return self.sock.recv(size, _MSG_DONTWAIT)
            self._limit_receive(timeout)
            return self.sock.recv(size)
        except BlockingIOError as e:
            raise TimeoutError(errno.ETIMEDOUT, "receive timed out") from e

    def recv_into(self, buffer: memoryview, timeout: Optional[float]) -> int:
        """Like :meth:`recv`, into ``buffer``; returns the byte count (0 at EOF)."""
        if self._tls:
            return int(self._tls_io(self.sock.recv_into, buffer, timeout))
        try:
            if timeout is not None and timeout <= 0:
                return self.sock.recv_into(buffer, 0, _MSG_DONTWAIT)
            self._limit_receive(timeout)
            return self.sock.recv_into(buffer)
        except BlockingIOError as e:
            raise TimeoutError(errno.ETIMEDOUT, "receive timed out") from e

    def _limit_receive(self, timeout: Optional[float]) -> None:
        """Make the kernel bound the next receive (SO_RCVTIMEO).

        Set only when it changes, so that a receive stays one system call
        (no poll first); a limit within 1% (and 1 ms) of the one in force is
        kept, since callers recompute what is left of a deadline every call.
        """
        current = self._rcvtimeo
        if timeout is None:
            if current is None:
                return
        elif current is not None and abs(timeout - current) <= 0.01 * current + 0.001:
            return
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(timeout or 0.0))
        self._rcvtimeo = timeout

    def _tls_io(self, op: Callable[[Any], Any], arg: Any, timeout: Optional[float]) -> Any:
        """Run a read on the non-blocking TLS socket, waiting until ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                with self._tls_lock:
                    return op(arg)
            except ssl.SSLWantReadError:
                events = select.POLLIN
            except ssl.SSLWantWriteError:
                events = select.POLLOUT
            _wait_for(self._fd, events, deadline, "receive")

    def _tls_send_all(self, data: Buffer) -> None:
        view = memoryview(data)
        while len(view):
            try:
                with self._tls_lock:
                    sent = self.sock.send(view)
                view = view[sent:]
                continue
            except ssl.SSLWantWriteError:
                events = select.POLLOUT
            except ssl.SSLWantReadError:
                events = select.POLLIN
            timeout = self._send_timeout
            _wait_for(self._fd, events, None if timeout is None else time.monotonic() + timeout, "send")

    @property
    def can_splice(self) -> bool:
        """Whether :meth:`send_spliced` may be used: a plain socket (TLS must
        see every byte) on a system with ``splice(2)``."""
        return not self._tls and _splice is not None

    def send_spliced(self, pieces: List[Tuple[bytes, int]], fd: int, tail: bytes) -> None:
        """Send each ``(head, count)`` of ``pieces`` as ``head`` followed by
        ``count`` bytes moved from the pipe ``fd`` straight into the socket,
        then ``tail``: bytes that only pass through are never copied into
        this process.  The pipe must hold every byte asked for (``FIONREAD``).

        Same time limit and errors as :meth:`send_all`; after an error part of
        the pieces may have been sent, so the connection is of no further use.
        """
        assert not self._tls
        sock = self.sock
        try:
            for head, count in pieces:
                sock.sendall(head, _MSG_MORE)
                while count:
                    moved = self._move(fd, count)
                    if moved <= 0:
                        raise OSError(errno.EIO, "the pipe ran dry while splicing")
                    count -= moved
            sock.sendall(tail)
        except BlockingIOError as e:  # SO_SNDTIMEO expired
            raise TimeoutError(errno.ETIMEDOUT, "send timed out") from e

    def _move(self, fd: int, count: int) -> int:
        """Up to ``count`` bytes from the pipe ``fd`` into the socket: by
        ``splice(2)``, or copied through this process where the kernel
        refuses it (a sandbox's system call filter), from then on."""
        global _splice
        splice = _splice
        if splice is not None:
            try:
                return splice(fd, self._fd, count, flags=_SPLICE_F_MORE)
            except OSError as e:
                if e.errno not in _SPLICE_REFUSED:
                    raise
                log.warning("splice(2) refused (%s); command output is copied instead", e)
                _splice = None
        data = os.read(fd, min(count, 1 << 20))
        self.sock.sendall(data, _MSG_MORE)
        return len(data)

    def fileno(self) -> int:
        return self._fd

    def pending(self) -> int:
        return self._pending() if self._pending else 0

    def abort(self) -> None:
        """Reset the connection: what is still queued is thrown away and the
        peer sees the end at once (a plain shutdown's FIN would wait behind
        the queued data).  Wakes any thread blocked on the socket."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.shutdown()

    def shutdown(self) -> None:
        """Stop both directions now, waking any thread blocked on the socket."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.shutdown()
        self.sock.close()


def cut(sock: socket.socket) -> None:
    """Shut ``sock`` down in both directions, waking any thread blocked on it
    (in ``accept`` or ``recv``); never raises."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def cut_and_close(sock: socket.socket) -> None:
    """:func:`cut`, then release the descriptor."""
    cut(sock)
    sock.close()


def _wait_to_send(fd: int, deadline: Optional[float]) -> None:
    """Wait until the socket ``fd`` takes more bytes (or has an error for
    the next send to raise).

    :raises ConnectionResetError: the peer closed its end (it will read no more)
    :raises TimeoutError: past ``deadline``
    """
    poller = select.poll()
    poller.register(fd, select.POLLOUT | _POLLRDHUP)
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError(errno.ETIMEDOUT, "send timed out")
        for _, revents in poller.poll(None if left is None else left * 1000.0):
            if revents & _POLLRDHUP:
                raise ConnectionResetError(errno.ECONNRESET, "the peer closed the connection while we were sending")
            return


def _wait_for(fd: int, events: int, deadline: Optional[float], what: str) -> None:
    """Wait until ``fd`` is ready for ``events`` (or hung up); ``TimeoutError`` past ``deadline``."""
    poller = select.poll()
    poller.register(fd, events)
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError(errno.ETIMEDOUT, f"{what} timed out")
        if poller.poll(None if left is None else left * 1000.0):
            return


def _format_addr(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr) or "local socket"
