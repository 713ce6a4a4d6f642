"""The far end of the raw-socket floors: plain Python sockets, no framing
beyond a fixed header, nothing a real protocol would need.

Run as ``floorpeer.py --listen`` (prints its TCP port, then serves each
connection in a thread) or ``floorpeer.py --fd N`` (serves one inherited
socket, e.g. one end of a socket pair).  Each connection starts with one
command byte:

``P`` + u32 request size + u32 reply size
    ping-pong until end of stream: read exactly the request, write the reply.
``R`` + u64 size + u16 path length + path
    receive ``size`` bytes in 64 KiB chunks, hashing them with SHA-256 and
    writing them to ``path``; then read the sender's 32-byte digest and
    answer one byte: 1 if it matches, 0 if not.
``S`` + u16 path length + path
    send u64 size, then the file in 64 KiB chunks, hashing as it goes, then
    the 32-byte SHA-256 digest.
``B`` + u8 level
    box ping-pong until end of stream, as little as a Python end of the
    remsh protocol can do per ping (see :class:`floor.BoxPingPong`): level
    1 decodes each request box with remsh's ``BoxDecoder`` and answers
    the empty box; level 2 also does the least a session does per box (a
    lock, the counts, the reply kept until acknowledged, the clock).
``D`` + u64 size
    receive ``size`` bytes into a reused 1 MiB buffer and throw them away
    (no hashing, no file), then answer one byte: what the connection alone
    carries.

After ``R`` or ``S`` the next command byte follows on the same connection.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import struct
import sys
import threading
import time
from collections import deque
from typing import BinaryIO

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from remsh.wire import END_OF_BOX, BoxDecoder  # noqa: E402

CHUNK = 64 * 1024
_CMD_P = struct.Struct(">II")
_U64 = struct.Struct(">Q")
_U16 = struct.Struct(">H")


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = sock.recv(n)
    if len(data) == n:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        if not data:
            raise EOFError
        data = sock.recv(n - got)
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def receive_file(sock: socket.socket, size: int, path: str) -> bool:
    """Receive ``size`` bytes to ``path`` and check the digest that follows."""
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    left = size
    with open(path, "wb", buffering=0) as f:
        while left:
            n = sock.recv_into(buf, min(left, CHUNK))
            if not n:
                raise EOFError
            chunk = view[:n]
            digest.update(chunk)
            f.write(chunk)
            left -= n
    return recv_exact(sock, 32) == digest.digest()


def send_chunks(sock: socket.socket, f: BinaryIO) -> None:
    """Send the rest of ``f`` in 64 KiB chunks, then its SHA-256 digest."""
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while True:
        n = f.readinto(buf)
        if not n:
            break
        chunk = view[:n]
        digest.update(chunk)
        sock.sendall(chunk)
    sock.sendall(digest.digest())


def send_file(sock: socket.socket, path: str) -> None:
    """Send size, the file in 64 KiB chunks, then its digest."""
    with open(path, "rb", buffering=0) as f:
        sock.sendall(_U64.pack(os.fstat(f.fileno()).st_size))
        send_chunks(sock, f)


def serve(sock: socket.socket) -> None:
    if sock.family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            cmd = sock.recv(1)
            if not cmd:
                return
            if cmd == b"P":
                req, rep = _CMD_P.unpack(recv_exact(sock, _CMD_P.size))
                reply = b"\0" * rep
                recv, send = sock.recv, sock.sendall
                while True:
                    data = recv(req)
                    if len(data) != req:  # short read (or end of stream)
                        if not data:
                            return
                        data += recv_exact(sock, req - len(data))
                    send(reply)
            elif cmd == b"B":
                box_pingpong(sock, recv_exact(sock, 1)[0])
                return
            elif cmd == b"R":
                (size,) = _U64.unpack(recv_exact(sock, 8))
                (plen,) = _U16.unpack(recv_exact(sock, 2))
                path = recv_exact(sock, plen).decode()
                ok = receive_file(sock, size, path)
                sock.sendall(b"\x01" if ok else b"\x00")
            elif cmd == b"D":
                (size,) = _U64.unpack(recv_exact(sock, 8))
                sink = bytearray(1 << 20)
                while size > 0:
                    n = sock.recv_into(sink, min(size, len(sink)))
                    if not n:
                        raise EOFError
                    size -= n
                sock.sendall(b"\x01")
            elif cmd == b"S":
                (plen,) = _U16.unpack(recv_exact(sock, 2))
                send_file(sock, recv_exact(sock, plen).decode())
            else:
                return
    except (EOFError, ConnectionError):
        return
    finally:
        sock.close()


class LeastSession:
    """The least a session end does per box: count it under a lock, keep
    what it sends until the peer acknowledges it (every 64 boxes), note the
    time.  Shared by both ends of the box ping-pong floor."""

    ACK_EVERY = 64

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.kept: "deque[bytes]" = deque()
        self.received = self.acked = self.sent = 0
        self.last = 0.0

    def sent_box(self, data: bytes) -> None:
        with self.lock:
            self.kept.append(data)
            self.sent += 1
            self.last = time.monotonic()
            if len(self.kept) > self.ACK_EVERY:  # as if the peer's ack came
                self.kept.clear()

    def received_box(self) -> None:
        with self.lock:
            self.received += 1
            self.last = time.monotonic()
            if self.received - self.acked >= self.ACK_EVERY:
                self.acked = self.received


def box_pingpong(sock: socket.socket, level: int) -> None:
    """Answer each ``ping`` request box with the empty box (level 1), with
    the least session bookkeeping on both boxes (level 2)."""
    decoder = BoxDecoder()
    session = LeastSession() if level >= 2 else None
    buf = memoryview(bytearray(65536))
    while True:
        n = sock.recv_into(buf)
        if not n:
            return
        for box in decoder.feed(buf[:n]):
            if session is not None:
                session.received_box()
            if box.get(b"meth") != b"ping":
                raise ValueError(f"box ping-pong: unexpected box {box!r}")
            if session is not None:
                session.sent_box(END_OF_BOX)
            sock.sendall(END_OF_BOX)


def main() -> int:
    p = argparse.ArgumentParser()
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--listen", action="store_true")
    g.add_argument("--fd", type=int)
    args = p.parse_args()
    if args.fd is not None:
        serve(socket.socket(fileno=args.fd))
        return 0
    server = socket.create_server(("127.0.0.1", 0))
    print(server.getsockname()[1], flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
