"""How fast can Python relay a command's output at all?  The floors under
remsh's streamed-output row.

    .venv/bin/python bench/streamfloor.py [--size MiB] [--runs N]

The streamed-output floor of ``bench/run.py`` has ``cat`` write a file
straight into a TCP socket read by Python.  remsh has a pipe and a slave
process between the command and the socket, and with a session the slave
must keep what it sends until the master acknowledges it.  Each row here
adds one of those steps, written as plainly as Python allows, so that the
table shows what each step costs before any protocol code runs:

- ``cat -> socket``: the floor itself;
- ``relay, splice``: ``cat`` into a pipe, a relay process moves the pipe
  into the socket with ``os.splice`` (the bytes never enter the relay: what
  a slave without a session does);
- ``relay, copy``: the relay reads the pipe into a reused 1 MiB buffer and
  sends it (one copy in, one out);
- ``relay, copy + kept copy``: and keeps a copy of each 1 MiB until it is
  acknowledged (what a session's resume needs), four at a time;
- ``relay, splice + tee kept``: the kept copy made by ``tee(2)`` into a
  second pipe (page references, no copy; through ``ctypes``, as Python's
  ``os`` has no ``tee``), drained as if acknowledged.

On the reading side every row after the first does what remsh's master
must: receive into a reused 256 KiB buffer and hand the data over as
``bytes`` of at most 65,535 (one box's value each).  The first row hands
over what each 256 KiB receive returns, as the floor of ``bench/run.py``.
Every row is pinned to one CPU and then left to the scheduler.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))  # harness.machine_info imports remsh

from harness import PINNED, UNPINNED, Results, Row, machine_info, machine_line, place  # noqa: E402

MiB = 1024 * 1024
RECV_SIZE = 256 * 1024
VALUE = 65535
F_SETPIPE_SZ = 1031
FLOOR = "cat -> socket (floor)"
ROWS = {
    "direct": FLOOR,
    "splice": "relay, splice",
    "copy": "relay, copy",
    "copykeep": "relay, copy + kept copy",
    "tee": "relay, splice + tee kept",
}


def _libc_tee() -> Optional[Callable[[int, int, int, int], int]]:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        tee = libc.tee
    except (OSError, AttributeError):
        return None
    tee.restype = ctypes.c_ssize_t
    tee.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint]
    return tee  # type: ignore[no-any-return]


def relay(mode: str, port: int, path: str) -> None:
    """The child: connect to the reader and feed it ``path`` by ``mode``."""
    sock = socket.create_connection(("127.0.0.1", port))
    if mode == "direct":
        subprocess.run(["cat", path], stdout=sock.fileno(), check=True)
        return
    r, w = os.pipe()
    fcntl.fcntl(r, F_SETPIPE_SZ, MiB)
    cat = subprocess.Popen(["cat", path], stdout=w)
    os.close(w)
    out = sock.fileno()
    if mode == "splice":
        while os.splice(r, out, MiB):
            pass
    elif mode == "tee":
        tee = _libc_tee()
        assert tee is not None
        kr, kw = os.pipe()
        fcntl.fcntl(kr, F_SETPIPE_SZ, MiB)
        devnull = os.open(os.devnull, os.O_WRONLY)
        while True:
            n = tee(r, kw, MiB, 0)
            if n < 0:
                raise OSError(ctypes.get_errno(), "tee")
            if not n:
                break
            left = n
            while left:
                left -= os.splice(r, out, left)
            os.splice(kr, devnull, n)  # acknowledged: the kept pages go
    else:
        buf = bytearray(MiB)
        view = memoryview(buf)
        kept: List[bytes] = []
        while True:
            n = os.readv(r, [buf])
            if not n:
                break
            if mode == "copykeep":
                kept.append(bytes(view[:n]))
                del kept[:-4]
            sock.sendall(view[:n])
    if cat.wait():
        raise RuntimeError("cat failed")
    sock.close()


def read_all(sock: socket.socket, boxes: bool) -> int:
    """Receive to the end, handing the data over as the mode says."""
    got = 0
    handed = 0
    if not boxes:
        while True:
            data = sock.recv(RECV_SIZE)
            if not data:
                return got
            got += len(data)
            handed += 1
    buf = memoryview(bytearray(RECV_SIZE))
    while True:
        n = sock.recv_into(buf)
        if not n:
            return got
        for start in range(0, n, VALUE):
            chunk = bytes(buf[start:min(n, start + VALUE)])
            handed += len(chunk) > 0
        got += n


def one_run(mode: str, path: str, size: int) -> float:
    """MiB/s of one transfer."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--relay", mode,
                                  "--port", str(port), "--file", path])
        try:
            server.settimeout(30)
            conn, _ = server.accept()
            with conn:
                conn.settimeout(None)
                t0 = time.perf_counter()
                got = read_all(conn, mode != "direct")
                elapsed = time.perf_counter() - t0
            if child.wait(timeout=30) != 0 or got != size:
                raise RuntimeError(f"{mode}: relay failed ({got} of {size} bytes)")
        finally:  # interrupted or failed: the relay goes too
            if child.poll() is None:
                child.kill()
                child.wait()
    return size / MiB / elapsed


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=128, help="MiB streamed per run (default 128)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per row (default 5, after one warm-up)")
    p.add_argument("--relay", choices=sorted(ROWS), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.relay:
        relay(args.relay, args.port, args.file)
        return 0
    modes = [m for m in ROWS if m != "tee" or _libc_tee() is not None]
    results = Results()
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None  # as bench/run.py: never the disk
    with tempfile.TemporaryDirectory(prefix="remsh-streamfloor-", dir=shm) as work:
        path = os.path.join(work, "data")
        size = args.size * MiB
        with open(path, "wb") as f:
            for _ in range(args.size):
                f.write(os.urandom(MiB))
        try:
            for cpus in (PINNED, UNPINNED):
                place(cpus)
                for mode in modes:
                    rates: Dict[int, float] = {}
                    for i in range(args.runs + 1):
                        rates[i] = one_run(mode, path, size)
                    results.add(Row(f"stream {args.size} MiB", ROWS[mode], cpus, kind="rate",
                                    values=[rates[i] for i in range(1, args.runs + 1)],
                                    baseline=None if mode == "direct" else FLOOR))
        finally:
            place(UNPINNED)
    print(machine_line(machine_info()))
    print(results.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
