"""The master's side of the raw-socket floors (see ``floorpeer.py``).

These are what a careful programmer writes with nothing but Python sockets:
the lower bound that any protocol written in Python pays on this machine.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
from typing import Callable, Optional

from floorpeer import LeastSession, receive_file, recv_exact, send_chunks

HERE = os.path.dirname(os.path.abspath(__file__))
TCP = "tcp"
UNIX = "unix"


class FloorPeer:
    """A ``floorpeer.py`` process and connections to it (TCP or socket pair)."""

    def __init__(self, family: str) -> None:
        self.family = family
        self.proc: Optional[subprocess.Popen] = None
        self._port = 0

    def start(self) -> None:
        if self.family == TCP:
            self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "floorpeer.py"), "--listen"],
                                         stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
            assert self.proc.stdout is not None
            self._port = int(self.proc.stdout.readline())

    def connect(self) -> socket.socket:
        """A new connection (for ``unix``: a socket pair to a new peer process)."""
        if self.family == TCP:
            sock = socket.create_connection(("127.0.0.1", self._port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        mine, theirs = socket.socketpair()
        fd = theirs.fileno()
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "floorpeer.py"), "--fd", str(fd)],
                                pass_fds=(fd,), stdin=subprocess.DEVNULL)
        theirs.close()
        self._unix_procs = getattr(self, "_unix_procs", []) + [proc]
        return mine

    def stop(self) -> None:
        for proc in [self.proc, *getattr(self, "_unix_procs", [])]:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


class PingPong:
    """Request/reply of fixed sizes over one connection."""

    def __init__(self, sock: socket.socket, request: int, reply: int) -> None:
        self.sock = sock
        self.request = b"\1" * request
        self.reply = reply
        sock.sendall(b"P" + struct.pack(">II", request, reply))

    def __call__(self) -> None:
        self.sock.sendall(self.request)
        data = self.sock.recv(self.reply)
        if len(data) != self.reply:
            if not data:
                raise EOFError("floor peer went away")
            recv_exact(self.sock, self.reply - len(data))

    def close(self) -> None:
        self.sock.close()


class BoxPingPong:
    """The remsh ping as little Python as can do it: the request box sent
    as bytes encoded once, the reply decoded with remsh's ``BoxDecoder``;
    ``level`` 2 adds on both ends the least a session does per box
    (``floorpeer.LeastSession``).  What remsh's own ping costs above this
    is its structure (operation frame, layers, table), not the protocol."""

    def __init__(self, sock: socket.socket, level: int) -> None:
        from remsh.ops import OPERATIONS
        from remsh.wire import BoxDecoder
        self.sock = sock
        self.request = OPERATIONS["ping"].bare_request
        self.decoder = BoxDecoder()
        self.buf = memoryview(bytearray(65536))
        self.session = LeastSession() if level >= 2 else None
        self.lock = threading.Lock()  # the operation's hold on the slave
        sock.sendall(b"B" + bytes([level]))

    def __call__(self) -> None:
        session = self.session
        with self.lock:
            if session is not None:
                session.sent_box(self.request)
            self.sock.sendall(self.request)
            while True:
                n = self.sock.recv_into(self.buf)
                if not n:
                    raise EOFError("floor peer went away")
                boxes = self.decoder.feed(self.buf[:n])
                if boxes:
                    break
            if session is not None:
                session.received_box()
            if b"errtag" in boxes[0]:
                raise RuntimeError("floor peer: error reply")

    def close(self) -> None:
        self.sock.close()


def send_file(sock: socket.socket, src: str, dest: str) -> None:
    """The verified-transfer floor, master to peer."""
    path = dest.encode()
    with open(src, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        sock.sendall(b"R" + struct.pack(">QH", size, len(path)) + path)
        send_chunks(sock, f)
    if recv_exact(sock, 1) != b"\x01":
        raise RuntimeError("floor peer: digest mismatch")


def fetch_file(sock: socket.socket, src: str, dest: str) -> None:
    """The verified-transfer floor, peer to master."""
    path = src.encode()
    sock.sendall(b"S" + struct.pack(">H", len(path)) + path)
    (size,) = struct.unpack(">Q", recv_exact(sock, 8))
    if not receive_file(sock, size, dest):
        raise RuntimeError("floor: digest mismatch")


def raw_send(sock: socket.socket, size: int) -> None:
    """The connection alone: ``size`` bytes from a reused 1 MiB buffer, no
    file and no hashing on either end (what the socket carries at best)."""
    block = memoryview(bytearray(1 << 20))
    sock.sendall(b"D" + struct.pack(">Q", size))
    left = size
    while left > 0:
        n = min(left, len(block))
        sock.sendall(block[:n])
        left -= n
    if recv_exact(sock, 1) != b"\x01":
        raise RuntimeError("floor peer: raw receive failed")


def sha256_rate(size: int) -> None:
    """SHA-256 of ``size`` bytes from memory in 1 MiB updates: one core's hashing alone."""
    import hashlib

    block = memoryview(bytearray(1 << 20))
    digest = hashlib.sha256()
    left = size
    while left > 0:
        n = min(left, len(block))
        digest.update(block[:n])
        left -= n


def stream_cat(path: str, family: str, callback: Callable[[bytes], object], recv_size: int = 256 * 1024) -> None:
    """The streamed-output floor: a child ``cat`` writes the file straight
    into a socket and the master hands every ``recv`` to ``callback``."""
    if family == UNIX:
        mine, theirs = socket.socketpair()
    else:
        with socket.create_server(("127.0.0.1", 0)) as server:
            theirs = socket.create_connection(server.getsockname())
            mine, _ = server.accept()
    try:
        proc = subprocess.Popen(["cat", path], stdout=theirs.fileno(), stdin=subprocess.DEVNULL)
    finally:
        theirs.close()
    with mine:
        recv = mine.recv
        while True:
            data = recv(recv_size)
            if not data:
                break
            callback(data)
    if proc.wait() != 0:
        raise RuntimeError("cat failed")
