"""CPU per box of each layer, with no thread switch and no second process.

    .venv/bin/python bench/boxcost.py [--count N] [--profile raw|wire|session]

Both ends of a socket pair live in this one thread, and one *round trip* is
what a ping costs the two ends together apart from waking each other: end
A sends the empty request box and end B reads it, then B sends the empty
reply and A reads it.  Rows:

- ``raw socket``: ``sendall`` and ``recv_into`` of the same bytes (the
  system calls alone);
- ``Wire``: :class:`remsh.wire.Wire` on both ends (framing, decoding, the
  send lock and the reused receive buffer);
- ``SessionWire``: :class:`remsh.session.SessionWire` over a ``Wire`` on
  both ends (box counting, the copy kept until acknowledged, the locks and
  the acknowledgements every 64 boxes).

The difference between two rows is what the upper layer costs per round
trip, on both ends together.  ``--profile LAYER`` prints the functions with
the most own time for one layer (cProfile adds its own cost to every call,
so read the split, not the sum).  Pin it (``taskset -c 0``) for steadier
figures.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import socket
import sys
import time
from typing import Callable, Dict, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from remsh.session import SessionWire  # noqa: E402
from remsh.transports.base import SocketStream  # noqa: E402
from remsh.wire import END_OF_BOX, Wire  # noqa: E402

PING = b"\x00\x04meth\x00\x04ping\x00\x07version\x00\x011" + END_OF_BOX


def raw_pair() -> Callable[[], None]:
    a, b = socket.socketpair()
    buf = bytearray(65536)

    def trip() -> None:
        a.sendall(PING)
        b.recv_into(buf)
        b.sendall(END_OF_BOX)
        a.recv_into(buf)
    return trip


def wire_pair(session: bool) -> Callable[[], None]:
    a, b = socket.socketpair()
    wa: object = Wire(SocketStream(a), label="a")
    wb: object = Wire(SocketStream(b), label="b")
    if session:
        wa = SessionWire(wa, "bench-a", resume_timeout=30)  # type: ignore[arg-type]
        wb = SessionWire(wb, "bench-b", resume_timeout=30)  # type: ignore[arg-type]
    send_a, read_a = wa.send_bytes, wa.read_box  # type: ignore[attr-defined]
    send_b, read_b = wb.send_bytes, wb.read_box  # type: ignore[attr-defined]

    def trip() -> None:
        send_a(PING)
        read_b(30.0)
        send_b(END_OF_BOX)
        read_a(30.0)
    return trip


LAYERS: Dict[str, Callable[[], Callable[[], None]]] = {
    "raw": raw_pair,
    "wire": lambda: wire_pair(False),
    "session": lambda: wire_pair(True),
}
NAMES = {"raw": "raw socket", "wire": "Wire", "session": "SessionWire"}


def measure(trip: Callable[[], None], count: int) -> Tuple[float, float]:
    """(wall, CPU) microseconds per round trip, the best of 5 runs."""
    for _ in range(count // 10):
        trip()
    best = (float("inf"), float("inf"))
    for _ in range(5):
        t0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(count):
            trip()
        t1, c1 = time.perf_counter(), time.thread_time()
        run = ((t1 - t0) / count * 1e6, (c1 - c0) / count * 1e6)
        best = min(best, run)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--profile", choices=sorted(LAYERS))
    args = ap.parse_args()
    if args.profile:
        trip = LAYERS[args.profile]()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.count):
            trip()
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
        text = out.getvalue()
        print(text[text.find("   ncalls"):] + f"(per round trip: divide by {args.count})")
        return
    print(f"{'layer':<12} {'µs/trip':>8} {'CPU µs':>8} {'+ over the row above':>22}")
    last = None
    for key, make in LAYERS.items():
        wall, cpu = measure(make(), args.count)
        extra = "" if last is None else f"{wall - last:+.1f}"
        print(f"{NAMES[key]:<12} {wall:8.1f} {cpu:8.1f} {extra:>22}")
        last = wall


if __name__ == "__main__":
    main()
