"""Profile one remsh operation over TCP, on both ends, to see what limits it.

    python bench/profile_op.py OP [--count N] [--size MiB] [--pin] [--how cprofile|strace]

OP is ``ping``, ``stat``, ``execute`` (``true``), ``send``, ``fetch`` or
``stream`` (``cat`` of a file to a stdout callback).  The master is this
process (``TcpSlaveListener``); the slave is a real ``remsh-slave`` process.

``--how cprofile`` (default) runs the slave under ``cProfile`` and wraps the
master's timed loop in ``cProfile``, then prints the functions with the most
own time on each side.  ``--how strace`` attaches ``strace -c -f`` to both
processes for the timed loop only and prints system calls per operation.
``--pin`` puts both ends on CPU 0 first.  Warm-up operations are excluded.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from fixtures import REPO, child_env  # noqa: E402
from harness import PIN_CPUS, set_affinity_tree  # noqa: E402

from remsh.master.slavecollection.simple import SimpleSlaveCollection  # noqa: E402
from remsh.master.slavelistener.tcp import TcpSlaveListener  # noqa: E402

MiB = 1024 * 1024


def top(stats_file: str, n: int, per: int) -> str:
    out = io.StringIO()
    st = pstats.Stats(stats_file, stream=out)
    st.sort_stats("tottime").print_stats(n)
    text = out.getvalue()
    return text[text.find("   ncalls"):] + f"(per operation: divide ncalls and times by {per})\n"


def strace_summary(path: str, per: int) -> str:
    lines = ["  calls/op  syscall"]
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                calls = int(parts[3])
                lines.append(f"  {calls / per:8.2f}  {parts[-1]}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("op", choices=["ping", "stat", "execute", "send", "fetch", "stream"])
    p.add_argument("--count", type=int, help="operations to time (default depends on OP)")
    p.add_argument("--size", type=int, default=64, help="MiB for send/fetch/stream (default 64)")
    p.add_argument("--pin", action="store_true", help="both ends on CPU 0")
    p.add_argument("--how", choices=["cprofile", "strace"], default="cprofile")
    p.add_argument("--top", type=int, default=18)
    args = p.parse_args()
    count = args.count or {"ping": 20000, "stat": 20000, "execute": 1000}.get(args.op, 5)
    work = tempfile.mkdtemp(prefix="remsh-profile-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    secret_file = os.path.join(work, "secret")
    with open(os.open(secret_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(os.urandom(16).hex())
    with open(secret_file, "rb") as f:
        secret = f.read()
    big = os.path.join(work, "big.bin")
    if args.op in ("send", "fetch", "stream"):
        with open(big, "wb") as f:
            for _ in range(args.size):
                f.write(os.urandom(MiB))
    dest = os.path.join(work, "dest.bin")
    coll = SimpleSlaveCollection()
    listener = TcpSlaveListener(port=0, host="127.0.0.1", secret=secret, slave_collection=coll)
    listener.start()
    slave_prof = os.path.join(work, "slave.prof")
    prefix = [sys.executable, "-m", "cProfile", "-o", slave_prof] if args.how == "cprofile" else [sys.executable]
    proc = subprocess.Popen([*prefix, "-m", "remsh.slave.main", "--secret-file", secret_file, "--name", "prof",
                             "--no-reconnect", "--basedir", work, "127.0.0.1", str(listener.port)],
                            env=child_env(), cwd=REPO, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    slave = coll.get_slave(True, lambda s: s.name == "prof", timeout=30)
    assert slave is not None
    if args.pin:
        set_affinity_tree(PIN_CPUS)
    got = [0]

    def cb(data: bytes) -> None:
        got[0] += len(data)

    def one() -> None:
        if args.op == "ping":
            slave.ping()
        elif args.op == "stat":
            slave.stat(work)
        elif args.op == "execute":
            slave.execute(["true"])
        elif args.op == "send":
            slave.send(big, dest)
            os.unlink(dest)
        elif args.op == "fetch":
            slave.fetch(big, dest)
            os.unlink(dest)
        else:
            slave.execute(["cat", big], stdout_cb=cb)

    for _ in range(max(1, count // 10)):
        one()
    tracers = []
    if args.how == "strace":
        for who, pid in (("master", os.getpid()), ("slave", proc.pid)):
            out = os.path.join(work, f"{who}.strace")
            tracers.append((who, out, subprocess.Popen(["strace", "-c", "-f", "-o", out, "-p", str(pid)],
                                                       stderr=subprocess.DEVNULL)))
        time.sleep(1.0)  # strace attaches
        prof = None
    else:
        prof = cProfile.Profile()
        prof.enable()
    t0 = time.perf_counter()
    for _ in range(count):
        one()
    elapsed = time.perf_counter() - t0
    if prof is not None:
        prof.disable()
    for _, _, tracer in tracers:
        tracer.terminate()
        tracer.wait()
    listener.stop()
    proc.wait(30)
    per = elapsed / count
    what = f"{per * 1e6:.1f} us per {args.op}" if args.op in ("ping", "stat", "execute") else \
        f"{per:.3f} s per {args.op} = {args.size / per:.0f} MiB/s"
    print(f"{args.op} over TCP{' (pinned)' if args.pin else ''}, {args.how}: {count} operations, {what}")
    if prof is not None:
        master_prof = os.path.join(work, "master.prof")
        prof.dump_stats(master_prof)
        print("\n== master (this process), own time\n" + top(master_prof, args.top, count))
        if os.path.exists(slave_prof):
            print("== slave (remsh-slave under cProfile), own time; includes the warm-up\n" +
                  top(slave_prof, args.top, count + max(1, count // 10)))
    for who, out, _ in tracers:
        print(f"\n== {who}: system calls per {args.op} (strace -c -f)\n" + strace_summary(out, count))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
