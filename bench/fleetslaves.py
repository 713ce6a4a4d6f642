"""Slave side of the ``farm`` scenario (bench/fleet.py): many real slave
connections in one process.

``fleetslaves.py --count N --prefix P --source 127.0.1.K ...`` runs N slave
connections in this process, one thread each (a small stack: a slave thread
blocked in ``recv`` touches little of it).  Every connection is a real
slave, the sequence of ``remsh-slave`` (``remsh.slave.main.serve_once``):
dial, greetings, the slave handshake with the shared secret, then
``SlaveServer(...).serve()`` until the master closes.  With ``--resumable``
the register box asks for a session, as ``remsh-slave`` always does, and
the server runs over a ``SessionWire`` (the slave's link check is left out:
the idle slaves of this benchmark never lose their link).

Each process dials from a loopback source address of its own (``--source``),
so that the master sees as many hosts as there are processes, as it would on
a network; at most ``--dial-concurrency`` handshakes of a process are in
flight at once (below the listener's default of 16 unfinished handshakes per
address), and one the master turns away anyway is retried after a short
random pause, as ``remsh-slave`` would.

Prints ``registered N`` on stdout once all of this process's slaves are
registered, and exits once the master has closed all of them.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import sys
import threading
import time
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from remsh.errors import RemshError  # noqa: E402
from remsh.handshake import (HANDSHAKE_TIMEOUT, MASTER_GREETING, SLAVE_GREETING,  # noqa: E402
                             exchange_greeting, slave_handshake)
from remsh.session import SessionWire  # noqa: E402
from remsh.slave.server import SlaveServer  # noqa: E402
from remsh.transports.base import SocketStream  # noqa: E402
from remsh.transports.tcp import DEFAULT_KEEPALIVE  # noqa: E402
from remsh.wire import Wire  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--source", default=None, help="local address to dial from")
    p.add_argument("--secret-file", required=True)
    p.add_argument("--basedir", required=True)
    p.add_argument("--count", type=int, default=500)
    p.add_argument("--prefix", default="fleet-")
    p.add_argument("--resumable", action="store_true")
    p.add_argument("--dial-concurrency", type=int, default=8)
    p.add_argument("--register-timeout", type=float, default=600.0)
    args = p.parse_args()
    with open(args.secret_file, "rb") as f:
        secret = f.read().rstrip(b"\r\n")
    threading.stack_size(256 * 1024)
    gate = threading.BoundedSemaphore(args.dial_concurrency)
    failures: List[str] = []
    registered = [0]
    lock = threading.Lock()
    all_in = threading.Event()
    extra = {"resumable": "y"} if args.resumable else {}

    def register(name: str) -> Wire:
        sock = socket.create_connection((args.host, args.port), timeout=30,
                                        source_address=(args.source, 0) if args.source else None)
        sock.settimeout(None)
        stream = SocketStream(sock, peer=f"{args.host}:{args.port}", keepalive=DEFAULT_KEEPALIVE)
        wire = Wire(stream, label=f"master at {stream.peer}")
        try:
            exchange_greeting(wire, SLAVE_GREETING, MASTER_GREETING, HANDSHAKE_TIMEOUT)
            reg = slave_handshake(wire, name, secret=secret, basedir=args.basedir, greet=False, extra_info=extra)
        except BaseException:
            wire.close()
            raise
        wire.registration = reg  # type: ignore[attr-defined]
        return wire

    def one(name: str) -> None:
        deadline = time.monotonic() + args.register_timeout
        pause = 0.05
        wire: Optional[Wire] = None
        while wire is None:
            with gate:
                try:
                    wire = register(name)
                except (OSError, RemshError) as e:
                    if time.monotonic() > deadline:
                        failures.append(f"{name}: {e}")
                        all_in.set()
                        return
            if wire is None:
                time.sleep(random.uniform(pause / 2, pause))
                pause = min(pause * 2, 1.0)
        with lock:
            registered[0] += 1
            if registered[0] == args.count:
                all_in.set()
        reg = wire.registration  # type: ignore[attr-defined]
        sid = reg.info.get("session")
        conn = wire if sid is None else SessionWire(wire, sid, resume_timeout=float(reg.info["resume_timeout"]))
        try:
            SlaveServer(conn, args.basedir).serve()
        except RemshError:
            pass
        finally:
            conn.close()

    names = [f"{args.prefix}{i:05d}" for i in range(args.count)]
    threads = [threading.Thread(target=one, args=(name,), daemon=True) for name in names]
    for t in threads:
        t.start()
    all_in.wait(args.register_timeout + 30)
    if failures:
        for f in failures[:5]:
            print(f"fleetslaves: could not register {f}", file=sys.stderr, flush=True)
        return 1
    print(f"registered {registered[0]}", flush=True)
    for t in threads:
        t.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
