"""The job stores side by side: output appended per second (one job, many
slaves writing at once, as a master's sinks do) on SQLite and on
PostgreSQL, and how long a write on one master takes to wake a follower on
another (PostgreSQL: NOTIFY between two stores on one database).

    .venv/bin/python bench/store.py [--slaves N] [--chunks N] [--size BYTES]

PostgreSQL comes from Debian's binaries (tests/pgserver.py: a throw-away
cluster in a temporary directory, fsync off, as in the tests); without them
only SQLite is measured.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from typing import Any, Callable, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from remsh.store.sqlite import SqliteJobStore  # noqa: E402
from tests.pgserver import PgServer, postgres_available  # noqa: E402


def appends_per_second(store: Any, slaves: int, chunks: int, size: int) -> float:
    """Every slave appends ``chunks`` chunks of ``size`` bytes, all at once."""
    names = [f"s{i}" for i in range(slaves)]
    job = store.create_job("run", {"argv": ["bench"]}, 0, names)
    data = b"x" * size

    def writer(name: str) -> None:
        for i in range(chunks):
            store.append_output(job.id, name, "stdout", i * size, data)

    threads = [threading.Thread(target=writer, args=(n,)) for n in names]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return slaves * chunks / (time.perf_counter() - started)


def wake_latency(writer: Any, follower: Any, rounds: int = 50) -> List[float]:
    """Seconds from an append on ``writer`` to ``follower.wait_change`` returning
    (one announcement per append: each round waits for its own)."""
    job = writer.create_job("run", {"argv": ["bench"]}, 0, ["s"])
    follower.wait_change(follower.version(), 1.0)  # the job's own announcement
    out = []
    for i in range(rounds):
        version = follower.version()
        sent = time.perf_counter()
        writer.append_output(job.id, "s", "stdout", i, b"x")
        if follower.wait_change(version, 10.0) > version:
            out.append(time.perf_counter() - sent)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slaves", type=int, default=50)
    p.add_argument("--chunks", type=int, default=100)
    p.add_argument("--size", type=int, default=100)
    args = p.parse_args()
    rows: List[List[str]] = []

    def measure(label: str, make: Callable[[], Any]) -> None:
        store = make()
        try:
            rate = appends_per_second(store, args.slaves, args.chunks, args.size)
        finally:
            store.close()
        rows.append([label, f"{rate:,.0f} appends/s"])

    with tempfile.TemporaryDirectory() as tmp:
        measure("SQLite", lambda: SqliteJobStore(os.path.join(tmp, "jobs.sqlite")))
    missing = postgres_available()
    if missing is not None:
        rows.append(["PostgreSQL", f"n/a ({missing})"])
    else:
        from remsh.store.postgres import PostgresJobStore

        server = PgServer()
        try:
            server.start()
            uri = server.uri(server.new_database())
            measure("PostgreSQL", lambda: PostgresJobStore(uri, "bench"))
            a, b = PostgresJobStore(uri, "a"), PostgresJobStore(uri, "b", poll_interval=60.0)
            try:
                lat = wake_latency(a, b)
            finally:
                a.close()
                b.close()
            rows.append(["PostgreSQL, another master woken",
                         f"median {statistics.median(lat) * 1000:.1f} ms, max {max(lat) * 1000:.1f} ms"])
        finally:
            server.cleanup()
    print(f"{args.slaves} slaves x {args.chunks} chunks of {args.size} bytes")
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        print(f"{label.ljust(width)}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
