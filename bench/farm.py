"""Many slaves on one master: run in a process of its own, so that its
thread count and memory are the master's alone.

Starts a ``TcpSlaveListener`` (shared secret, default limits), then
``--procs`` helper processes of ``slavefarm.py serve`` with ``--slaves /
--procs`` connections each, and waits until every slave has registered.
Reports the master's threads and resident memory per slave at that point,
then times a fan-out ``execute(['true'])`` on every slave with
``remsh.master.fanout.fan_out(..., max_workers=K)`` against the same number
of ``subprocess.run(['true'])`` calls made by a pool of K threads in this
process.  Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from fixtures import REPO, child_env  # noqa: E402
from harness import measure  # noqa: E402

from remsh.master.fanout import fan_out  # noqa: E402
from remsh.master.slavecollection.simple import SimpleSlaveCollection  # noqa: E402
from remsh.master.slavelistener.tcp import TcpSlaveListener  # noqa: E402


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--slaves", type=int, default=1000)
    p.add_argument("--procs", type=int, default=20)
    p.add_argument("--workers", type=int, default=32)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--work", required=True)
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.slaves + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))
    os.makedirs(args.work, exist_ok=True)
    secret_file = os.path.join(args.work, "farm-secret")
    with open(os.open(secret_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(os.urandom(24).hex())
    with open(secret_file, "rb") as f:
        secret = f.read()

    collection = SimpleSlaveCollection()
    listener = TcpSlaveListener(port=0, host="127.0.0.1", secret=secret, slave_collection=collection)
    listener.start()
    threads_before, rss_before = thread_count(), rss_kib()
    per_proc = [args.slaves // args.procs + (1 if i < args.slaves % args.procs else 0) for i in range(args.procs)]
    procs = []
    log = open(os.path.join(args.work, "slavefarm.log"), "ab")
    t0 = time.perf_counter()
    for i, count in enumerate(per_proc):
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(HERE, "slavefarm.py"), "serve", "--port", str(listener.port),
             "--secret-file", secret_file, "--count", str(count), "--prefix", f"farm-{i:02d}-",
             "--basedir", args.work], env=child_env(), cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log))
    out = {"slaves": args.slaves, "procs": args.procs, "workers": args.workers}
    try:
        slaves = collection.wait_for_slaves(count=args.slaves, timeout=300)
        out["register_all_s"] = time.perf_counter() - t0
        time.sleep(1.0)  # let the handshake threads of the last slaves end
        out["master_threads_before"] = threads_before
        out["master_threads_registered"] = thread_count()
        out["master_thread_names"] = sorted({t.name.rstrip("0123456789-") for t in threading.enumerate()})
        out["master_rss_before_kib"] = rss_before
        out["master_rss_registered_kib"] = rss_kib()
        out["rss_per_slave_kib"] = (out["master_rss_registered_kib"] - rss_before) / args.slaves
        out["master_fds"] = len(os.listdir("/proc/self/fd"))

        def remsh_fanout() -> None:
            outcomes = fan_out(slaves, lambda s: s.execute(["true"]), max_workers=args.workers)
            bad = [o for o in outcomes if not (o.ok and o.value == 0)]
            if bad:
                raise RuntimeError(f"{len(bad)} slaves failed, e.g. {bad[0]!r}")

        def local_pool() -> None:
            with ThreadPoolExecutor(max_workers=args.workers) as pool:
                codes = list(pool.map(lambda _: subprocess.run(["true"]).returncode, range(args.slaves)))
            if any(codes):
                raise RuntimeError("true failed locally")

        # warm-up, then the runs of the two interleaved (a burst of other work hits both alike)
        measure(remsh_fanout, runs=0, warmup=args.warmup)
        measure(local_pool, runs=0, warmup=args.warmup)
        out["fanout_s"], out["local_pool_s"] = [], []
        for i in range(args.runs):
            pair = [("fanout_s", remsh_fanout), ("local_pool_s", local_pool)]
            for key, fn in pair[i % 2:] + pair[:i % 2]:
                out[key] += measure(fn, runs=1, warmup=0)
        out["master_threads_after_fanout"] = thread_count()
    finally:
        listener.stop()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
