"""Slave-side helper for the benchmark: many slaves in one process, or a
timed loop of connection set-ups.

``slavefarm.py serve --count N --prefix P ...`` runs N slave connections in
this one process, one thread each.  Every connection is a real slave: the
same sequence as ``remsh-slave`` (``remsh.slave.main.serve_once``): dial
with ``remsh.transports.tcp.connect``, exchange greetings, run the slave
handshake with the shared secret, then ``SlaveServer(...).serve()`` until the
master closes.  A connection the master turns away (too many unfinished
handshakes) is retried after a short random pause, as ``remsh-slave``
would.

``slavefarm.py dial --times N ...`` dials, authenticates and registers N
times in a row, closing each connection once registered, and prints the
seconds each took as a JSON list.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import ssl
import sys
import threading
import time
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from remsh.errors import RemshError  # noqa: E402
from remsh.handshake import (HANDSHAKE_TIMEOUT, MASTER_GREETING, SLAVE_GREETING,  # noqa: E402
                             exchange_greeting, slave_handshake)
from remsh.slave.server import SlaveServer  # noqa: E402
from remsh.transports import tcp  # noqa: E402
from remsh.wire import Wire  # noqa: E402


class Dialer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.secret: Optional[bytes] = None
        if args.secret_file:
            with open(args.secret_file, "rb") as f:
                self.secret = f.read().rstrip(b"\r\n")
        self.ctx = ssl.create_default_context(cafile=args.tls_ca) if args.tls_ca else None

    def register(self, name: str) -> Wire:
        a = self.args
        if a.ssh:
            from remsh.transports import ssh

            user, _, hostport = a.ssh.partition("@")
            host, _, port = hostport.rpartition(":")
            stream = ssh.connect_embedded(user, host, int(port), identity=a.identity,
                                          known_hosts=a.known_hosts, timeout=10.0)
        else:
            stream = tcp.connect(a.host, a.port, ssl_context=self.ctx)
        wire = Wire(stream, label=f"master at {stream.peer}")
        try:
            exchange_greeting(wire, SLAVE_GREETING, MASTER_GREETING, HANDSHAKE_TIMEOUT)
            slave_handshake(wire, name, secret=self.secret, basedir=a.basedir, greet=False)
        except BaseException:
            wire.close()
            raise
        return wire


def serve(args: argparse.Namespace) -> int:
    dialer = Dialer(args)
    threading.stack_size(512 * 1024)
    failures: List[str] = []

    def one(name: str) -> None:
        deadline = time.monotonic() + args.register_timeout
        pause = 0.05
        while True:
            try:
                wire = dialer.register(name)
                break
            except (OSError, RemshError) as e:
                if time.monotonic() > deadline:
                    failures.append(f"{name}: {e}")
                    return
                time.sleep(random.uniform(pause / 2, pause))
                pause = min(pause * 2, 1.0)
        try:
            SlaveServer(wire, args.basedir).serve()
        except RemshError:
            pass
        finally:
            wire.close()

    names = [args.prefix] if args.count == 1 else [f"{args.prefix}{i:04d}" for i in range(args.count)]
    threads = [threading.Thread(target=one, args=(name,), daemon=True) for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for f in failures[:5]:
        print(f"slavefarm: could not register {f}", file=sys.stderr)
    return 1 if failures else 0


def dial(args: argparse.Namespace) -> int:
    dialer = Dialer(args)
    times = []
    for _ in range(args.times):
        t0 = time.perf_counter()
        wire = dialer.register(args.name)
        times.append(time.perf_counter() - t0)
        wire.close()
        time.sleep(0.01)  # let the master drop the old connection before the next
    print(json.dumps(times), flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["serve", "dial"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int)
    p.add_argument("--secret-file")
    p.add_argument("--tls-ca")
    p.add_argument("--ssh", metavar="USER@HOST:PORT")
    p.add_argument("--identity")
    p.add_argument("--known-hosts")
    p.add_argument("--basedir", default=".")
    p.add_argument("--count", type=int, default=50)
    p.add_argument("--prefix", default="farm-", help="slave names: PREFIX0000, PREFIX0001...; with --count 1, PREFIX")
    p.add_argument("--register-timeout", type=float, default=120.0)
    p.add_argument("--times", type=int, default=10)
    p.add_argument("--name", default="bench-dial")
    args = p.parse_args()
    return serve(args) if args.mode == "serve" else dial(args)


if __name__ == "__main__":
    sys.exit(main())
