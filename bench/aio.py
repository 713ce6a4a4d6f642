"""remsh.aio against the threaded master, side by side, on local slaves and over TCP.

Rows: ``ping`` and ``execute true`` round trips (microseconds per call,
lower is better), streamed stdout of ``head -c SIZE /dev/zero`` and ``send``
and ``fetch`` of SIZE bytes (MiB/s, higher is better), and ``fan-out``: one
``execute echo`` on each of N slaves at once (milliseconds for all).  The
same slave program serves both masters; each figure is the median of
``--runs`` runs, the drivers taking turns run by run.

    .venv/bin/python bench/aio.py [--quick] [--transport local|tcp] [--pin] [--sessions] [--json PATH]

``--pin`` puts this process, its threads and every slave it starts on CPU 0
(as ``bench/run.py``'s pinned rows: no wake-up crosses CPUs, so what is
measured is the CPU each end spends).  ``--sessions`` (TCP) gives both
listeners ``resume_timeout=300``, the threaded listener's default: every
slave gets a session that survives a dropped connection; without it both
run with sessions off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import remsh.aio as aio  # noqa: E402
from remsh.master.slavecollection.simple import SimpleSlaveCollection  # noqa: E402
from remsh.master.slavelistener.local import LocalSlaveListener  # noqa: E402
from remsh.master.slavelistener.tcp import TcpSlaveListener  # noqa: E402

SECRET = b"bench secret"
MiB = 1 << 20


def start_tcp_slave(port: int, name: str, basedir: str) -> "subprocess.Popen[bytes]":
    secret_file = os.path.join(basedir, "..", f"{name}.secret")
    with open(secret_file, "wb") as f:
        f.write(SECRET)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("REMSH_SECRET", None)
    return subprocess.Popen([sys.executable, "-m", "remsh.slave.main", "--name", name, "--basedir", basedir,
                             "--secret-file", secret_file, "--no-reconnect", "127.0.0.1", str(port)],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def median_of(runs: List[float]) -> Dict[str, float]:
    return {"median": statistics.median(runs), "min": min(runs), "max": max(runs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--transport", choices=("local", "tcp"), default="local")
    ap.add_argument("--json")
    ap.add_argument("--runs", type=int)
    ap.add_argument("--pin", action="store_true", help="run everything on CPU 0")
    ap.add_argument("--sessions", action="store_true", help="TCP slaves with sessions (resume_timeout=300)")
    args = ap.parse_args()
    if args.pin:
        os.sched_setaffinity(0, {0})  # inherited by every thread and child started from here on
    runs = args.runs or (3 if args.quick else 5)
    calls = 300 if args.quick else 2000
    size = (16 if args.quick else 128) * MiB
    fan = 20 if args.quick else 100
    resume_timeout = 300.0 if args.sessions else 0.0
    work = Path(tempfile.mkdtemp(prefix="remsh-bench-aio-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    src = work / "src"
    with open(src, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    results: Dict[str, Dict[str, List[float]]] = {}

    def record(row: str, driver: str, value: float) -> None:
        results.setdefault(row, {}).setdefault(driver, []).append(value)

    def fresh(d: str) -> str:
        path = work / d
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    # -- threaded -------------------------------------------------------------
    procs: List["subprocess.Popen[bytes]"] = []
    collection = SimpleSlaveCollection()
    if args.transport == "local":
        tlistener: Any = LocalSlaveListener(slave_collection=collection)
        tlistener.start()
        tslaves = [tlistener.start_slave(fresh(f"t{i}"), f"t{i}") for i in range(fan)]
    else:
        tlistener = TcpSlaveListener(port=0, host="127.0.0.1", secret=SECRET, resume_timeout=resume_timeout,
                                     slave_collection=collection)
        tlistener.start()
        procs += [start_tcp_slave(tlistener.port, f"t{i}", fresh(f"t{i}")) for i in range(fan)]
        tslaves = collection.wait_for_slaves(fan, timeout=120)
    ts = tslaves[0]

    def threaded_round(row: str) -> float:
        if row == "ping":
            t0 = time.perf_counter()
            for _ in range(calls):
                ts.ping()
            return (time.perf_counter() - t0) / calls * 1e6
        if row == "execute true":
            n = max(10, calls // 20)
            t0 = time.perf_counter()
            for _ in range(n):
                ts.execute(["true"])
            return (time.perf_counter() - t0) / n * 1e6
        if row == "stream stdout":
            t0 = time.perf_counter()
            ts.execute(["head", "-c", str(size), "/dev/zero"], stdout_cb=lambda d: None)
            return size / MiB / (time.perf_counter() - t0)
        if row == "send":
            ts.remove("f")
            t0 = time.perf_counter()
            ts.send(str(src), "f")
            return size / MiB / (time.perf_counter() - t0)
        if row == "fetch":
            dest = work / "tback"
            if dest.exists():
                dest.unlink()
            t0 = time.perf_counter()
            ts.fetch("f", str(dest))
            return size / MiB / (time.perf_counter() - t0)
        # fan-out: one thread per slave, as remsh.master.fanout does
        import threading
        t0 = time.perf_counter()
        threads = [threading.Thread(target=s.execute, args=(["echo"],)) for s in tslaves]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return (time.perf_counter() - t0) * 1e3

    # -- asyncio --------------------------------------------------------------
    async def aio_rounds() -> None:
        if args.transport == "local":
            alistener: Any = aio.LocalSlaveListener()
        else:
            alistener = aio.TcpSlaveListener(port=0, host="127.0.0.1", secret=SECRET, resume_timeout=resume_timeout)
        async with alistener:
            if args.transport == "local":
                aslaves = []
                for first in range(0, fan, 20):
                    aslaves += await asyncio.gather(*(alistener.start_slave(fresh(f"a{i}"), f"a{i}")
                                                      for i in range(first, min(fan, first + 20))))
            else:
                procs.extend(start_tcp_slave(alistener.port, f"a{i}", fresh(f"a{i}")) for i in range(fan))
                aslaves = await alistener.slave_collection.wait_for_slaves(fan, timeout=120)
            s = aslaves[0]

            async def aio_round(row: str) -> float:
                if row == "ping":
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        await s.ping()
                    return (time.perf_counter() - t0) / calls * 1e6
                if row == "execute true":
                    n = max(10, calls // 20)
                    t0 = time.perf_counter()
                    for _ in range(n):
                        await s.execute(["true"])
                    return (time.perf_counter() - t0) / n * 1e6
                if row == "stream stdout":
                    t0 = time.perf_counter()
                    await s.execute(["head", "-c", str(size), "/dev/zero"], stdout_cb=lambda d: None)
                    return size / MiB / (time.perf_counter() - t0)
                if row == "send":
                    await s.remove("f")
                    t0 = time.perf_counter()
                    await s.send(str(src), "f")
                    return size / MiB / (time.perf_counter() - t0)
                if row == "fetch":
                    dest = work / "aback"
                    if dest.exists():
                        dest.unlink()
                    t0 = time.perf_counter()
                    await s.fetch("f", str(dest))
                    return size / MiB / (time.perf_counter() - t0)
                t0 = time.perf_counter()
                await asyncio.gather(*(x.execute(["echo"]) for x in aslaves))
                return (time.perf_counter() - t0) * 1e3

            for row in ROWS:
                await aio_round(row)  # warm-up
                threaded_round(row)
                for i in range(runs):
                    # the drivers take turns, the order alternating
                    if i % 2:
                        record(row, "asyncio", await aio_round(row))
                        record(row, "threaded", threaded_round(row))
                    else:
                        record(row, "threaded", threaded_round(row))
                        record(row, "asyncio", await aio_round(row))

    try:
        asyncio.run(aio_rounds())
    finally:
        tlistener.stop()
        for p in procs:
            p.kill()
            p.wait()
        subprocess.run(["rm", "-rf", str(work)], check=False)

    units = {"ping": "us/call", "execute true": "us/call", "stream stdout": "MiB/s", "send": "MiB/s",
             "fetch": "MiB/s", f"fan-out x{fan}": "ms"}
    print(f"remsh.aio vs threaded master, {args.transport} slaves, median of {runs} runs"
          f"{', pinned to CPU 0' if args.pin else ''}{', sessions on' if args.sessions else ''}")
    print(f"{'row':<18}{'unit':<9}{'threaded':>10}{'asyncio':>10}{'aio/thr':>9}")
    out: Dict[str, Any] = {"transport": args.transport, "runs": runs, "size": size, "pinned": args.pin,
                           "sessions": args.sessions, "rows": {}}
    for row, by in results.items():
        name = f"fan-out x{fan}" if row == "fan-out" else row
        t = statistics.median(by["threaded"])
        a = statistics.median(by["asyncio"])
        print(f"{name:<18}{units[name]:<9}{t:>10.1f}{a:>10.1f}{a / t:>9.2f}")
        out["rows"][name] = {"unit": units[name], "threaded": median_of(by["threaded"]),
                             "asyncio": median_of(by["asyncio"])}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


ROWS: List[str] = ["ping", "execute true", "stream stdout", "send", "fetch", "fan-out"]
_: Callable[..., Any] = main

if __name__ == "__main__":
    main()
