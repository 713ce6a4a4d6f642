"""Many slaves on one master (the ``farm`` scenario of bench/run.py): run in
a process of its own, so that its threads, descriptors and memory are the
master's alone.

Starts a ``TcpSlaveListener`` (shared secret, default limits, the given
``resume_timeout``) told to expect ``--slaves`` slaves; its ``start()``
raises the soft ``RLIMIT_NOFILE`` to the hard limit and fails, saying how
many slaves fit, when the hard limit cannot hold them (then this prints
``{"error": ...}``).  ``--hard-limit`` first sets this process's hard
limit (raising it needs the superuser: as ``LimitNOFILE=`` would).

Then ``--procs`` processes of ``fleetslaves.py``, each dialling from a
loopback address of its own, register ``--slaves`` real slave connections
between them.  Once all are registered, reports the master's threads
(counted in ``/proc/self/task``: before the first slave, the most seen while
they registered, with all registered, after the fan-outs), descriptors and
resident memory per slave (growth of ``VmRSS`` from before the first slave
to all registered, divided by the count); times ``get_slave`` with a filter
that picks one slave by name, against the same filter run over the
collection's dict (floor); and times a fan-out of ``execute(['true'])`` on
every slave (``fan_out(..., max_workers=K)``) against the same number of
``subprocess.run(['true'])`` made by a pool of K threads in this process
(the local pool), their runs interleaved.  Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from fixtures import REPO, child_env  # noqa: E402
from harness import measure  # noqa: E402

from remsh.errors import LocalError  # noqa: E402
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


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def time_calls(fn: Any, calls: int, rounds: int = 7) -> List[float]:
    """Mean seconds per call of ``rounds`` batches of ``calls`` calls (after one batch thrown away)."""
    return measure(fn, runs=rounds, warmup=1, batch=calls)


def pool_server(count: int, workers: int) -> int:
    """``fleet.py --pool-server``: for every line read, run the local pool
    (``count`` ``subprocess.run(['true'])`` on ``workers`` threads) and
    write its seconds.  A process of its own, started before the listener:
    none of the master's slave sockets is open in it, so its children start
    as on a master with no slaves (a child of a process with 10,000 open
    descriptors has them all to close)."""
    for _ in sys.stdin:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            codes = list(pool.map(lambda _: subprocess.run(["true"]).returncode, range(count)))
        elapsed = time.perf_counter() - t0
        if any(codes):
            return 1
        print(elapsed, flush=True)
    return 0


class PoolPeer:
    """The clean local pool in a helper process (see :func:`pool_server`)."""

    def __init__(self, count: int, workers: int) -> None:
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--pool-server",
                                      "--slaves", str(count), "--workers", str(workers), "--work", "-"],
                                     env=child_env(), cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)

    def run(self) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the local pool process failed")
        return float(line)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--pool-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--slaves", type=int, default=10_000)
    p.add_argument("--procs", type=int, default=20)
    p.add_argument("--workers", type=int, default=32)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--resume-timeout", type=float, default=0.0)
    p.add_argument("--hard-limit", type=int, default=None)
    p.add_argument("--skip-fanout", action="store_true")
    p.add_argument("--work", default=None)
    args = p.parse_args()
    if args.pool_server:
        return pool_server(args.slaves, args.workers)
    out: Dict[str, Any] = {"slaves": args.slaves, "procs": args.procs, "workers": args.workers,
                           "resume_timeout": args.resume_timeout}
    if args.hard_limit is not None:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, args.hard_limit), args.hard_limit))
        except (ValueError, OSError) as e:
            out["error"] = f"cannot set the hard open-file limit to {args.hard_limit}: {e}"
            out["hard_limit_refused"] = True
            print(json.dumps(out), flush=True)
            return 0
    assert args.work, "--work is required"
    out["rlimit_nofile_at_start"] = list(resource.getrlimit(resource.RLIMIT_NOFILE))
    os.makedirs(args.work, exist_ok=True)
    secret_file = os.path.join(args.work, "fleet-secret")
    with open(os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(os.urandom(24).hex())
    with open(secret_file, "rb") as f:
        secret = f.read()

    clean_pool = None if args.skip_fanout else PoolPeer(args.slaves, args.workers)
    collection = SimpleSlaveCollection()
    listener = TcpSlaveListener(port=0, host="127.0.0.1", secret=secret, slave_collection=collection,
                                resume_timeout=args.resume_timeout)
    listener.expected_slaves = args.slaves
    try:
        listener.start()
    except LocalError as e:
        if clean_pool is not None:
            clean_pool.close()
        out["error"] = str(e)
        print(json.dumps(out), flush=True)
        return 0
    out["rlimit_nofile_after_start"] = list(resource.getrlimit(resource.RLIMIT_NOFILE))
    threads_before, rss_before, fds_before = thread_count(), rss_kib(), fd_count()
    per_proc = [args.slaves // args.procs + (1 if i < args.slaves % args.procs else 0) for i in range(args.procs)]
    procs = []
    log = open(os.path.join(args.work, "fleetslaves.log"), "ab")
    t0 = time.perf_counter()
    for i, count in enumerate(per_proc):
        argv = [sys.executable, os.path.join(HERE, "fleetslaves.py"), "--port", str(listener.port),
                "--source", f"127.0.{1 + i // 250}.{1 + i % 250}", "--secret-file", secret_file,
                "--count", str(count), "--prefix", f"fleet-{i:03d}-", "--basedir", args.work]
        if args.resume_timeout > 0:
            argv.append("--resumable")
        procs.append(subprocess.Popen(argv, env=child_env(), cwd=REPO, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=log))
    peak = threads_before
    tenth: List[int] = []  # (slaves, RSS KiB) once a tenth have registered: for the marginal cost
    try:
        deadline = time.monotonic() + 900
        while len(collection) < args.slaves:
            peak = max(peak, thread_count())
            if not tenth and len(collection) >= args.slaves // 10:
                tenth = [len(collection), rss_kib()]
            if time.monotonic() > deadline or any(pr.poll() not in (None, 0) for pr in procs):
                raise RuntimeError(f"{len(collection)} of {args.slaves} slaves registered "
                                   "(see fleetslaves.log)")
            time.sleep(0.05)  # sampling the thread count while they register
        slaves = collection.get_all_slaves()
        out["register_all_s"] = time.perf_counter() - t0
        # the handshake threads of the last slaves end once their slave is added
        end_wait = time.monotonic() + 10
        while thread_count() > threads_before and time.monotonic() < end_wait:
            time.sleep(0.05)
        out["master_threads_before"] = threads_before
        out["master_threads_peak_registering"] = peak
        out["master_threads_registered"] = thread_count()
        out["master_thread_names"] = sorted({t.name.rstrip("0123456789-") for t in threading.enumerate()})
        out["master_rss_before_kib"] = rss_before
        out["master_rss_registered_kib"] = rss_kib()
        out["rss_per_slave_kib"] = (out["master_rss_registered_kib"] - rss_before) / args.slaves
        if tenth and args.slaves > tenth[0]:
            # the cost of one more slave, without what the first ones paid once (imports, arenas)
            out["rss_marginal_kib"] = (out["master_rss_registered_kib"] - tenth[1]) / (args.slaves - tenth[0])
        out["master_fds_before"] = fds_before
        out["master_fds_registered"] = fd_count()
        out["fds_per_slave"] = (out["master_fds_registered"] - fds_before) / args.slaves
        out["sessions"] = sum(1 for s in slaves if s.resumable)

        # get_slave with a filter that picks one slave by name, against that filter over the dict
        target = slaves[len(slaves) // 2].name

        def by_name(s: Any) -> bool:
            return bool(s.name == target)

        def pick() -> None:
            if collection.get_slave(False, by_name) is None:
                raise RuntimeError("get_slave found nothing")

        table = dict(collection._slaves)  # the same dict get_slave scans, read here without its lock

        def pick_floor() -> None:
            if not [s for s in table.values() if by_name(s)]:
                raise RuntimeError("nothing")

        calls = 200
        out["get_slave_s"] = time_calls(pick, calls)
        out["get_slave_floor_s"] = time_calls(pick_floor, calls)
        # the same, in this thread's CPU time: what the scan costs, without other work on the machine
        t0 = time.thread_time()
        for _ in range(calls):
            pick()
        out["get_slave_cpu_s"] = (time.thread_time() - t0) / calls
        t0 = time.thread_time()
        for _ in range(calls):
            pick_floor()
        out["get_slave_floor_cpu_s"] = (time.thread_time() - t0) / calls

        if not args.skip_fanout:
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

            assert clean_pool is not None
            pool_times: List[float] = []
            for _ in range(args.warmup):
                remsh_fanout()
                local_pool()
                clean_pool.run()
            out["fanout_s"], out["local_pool_s"], out["clean_pool_s"] = [], [], []
            for i in range(args.runs):
                trio = [("fanout_s", remsh_fanout), ("local_pool_s", local_pool),
                        ("clean_pool_s", lambda: pool_times.append(clean_pool.run()))]
                for key, fn in trio[i % 3:] + trio[:i % 3]:
                    if key == "clean_pool_s":
                        fn()
                        out[key].append(pool_times[-1])
                    else:
                        out[key] += measure(fn, runs=1, warmup=0)
            out["master_threads_after_fanout"] = thread_count()
            out["thread_names_after_fanout"] = sorted(t.name for t in threading.enumerate())
            out["master_rss_after_fanout_kib"] = rss_kib()
        out["get_slave_median_s"] = statistics.median(out["get_slave_s"])
    finally:
        if clean_pool is not None:
            clean_pool.close()
        listener.stop()
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
