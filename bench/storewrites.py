"""The writes of ``remsh run -- echo hello`` straight on the PostgreSQL job
store, as a master's job makes them: for each slave, one after the other,
its start, its session recorded, its output, its end, its session closed;
``--parallel`` slaves at once (a master's ``--max-parallel``).

    .venv/bin/python bench/storewrites.py [--slaves N] [--parallel N] [--runs N] [--tree DIR]

``--tree DIR`` measures the ``remsh`` package of another checkout (e.g.
``git archive COMMIT | tar -x -C DIR``), for before and after.  PostgreSQL
comes from Debian's binaries (tests/pgserver.py, ``fsync=off``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from typing import Any, Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_run(store: Any, slaves: int, parallel: int, session_record: Any) -> float:
    names = [f"s{i}" for i in range(slaves)]
    job = store.create_job("run", {"argv": ["x"]}, 0, names)
    todo: Iterator[str] = iter(names)
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                name = next(todo, None)
            if name is None:
                return
            store.update_slave(job.id, name, state="running", started=time.time())
            sid = name.rjust(32, "x")
            store.open_session(session_record(sid, name, job.id, "execute", 4, 2, 2))
            store.append_output(job.id, name, "stdout", 0, b"hello\n", session=(sid, 3))
            store.update_slave(job.id, name, state="ok", exit_status=0, finished=time.time())
            store.close_session(sid)

    threads = [threading.Thread(target=worker) for _ in range(parallel)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slaves", type=int, default=1000)
    p.add_argument("--parallel", type=int, default=64)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--tree", default=ROOT, help="the checkout whose remsh package is measured")
    args = p.parse_args()
    sys.path.insert(0, ROOT)
    from tests.pgserver import PgServer, postgres_available

    missing = postgres_available()
    if missing is not None:
        print(f"PostgreSQL: n/a ({missing})")
        return 0
    sys.path.insert(0, os.path.abspath(args.tree))
    for module in [m for m in sys.modules if m == "remsh" or m.startswith("remsh.")]:
        del sys.modules[module]
    from remsh.store.base import SessionRecord
    from remsh.store.postgres import PostgresJobStore

    server = PgServer()
    try:
        server.start()
        store = PostgresJobStore(server.uri(server.new_database()), "bench")
        try:
            times = [one_run(store, args.slaves, args.parallel, SessionRecord) for _ in range(args.runs)]
            group = getattr(store, "group", None)
        finally:
            store.close()
    finally:
        server.cleanup()
    line = (f"{args.slaves} slaves x 5 writes, {args.parallel} at once: median {statistics.median(times):.2f} s "
            f"(min {min(times):.2f}, max {max(times):.2f})")
    if group is not None:
        line += f"; {group.writes} writes in {group.batches} transactions"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
