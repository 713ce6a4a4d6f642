"""Profile one remsh operation, on both ends, to see what limits it.

    python bench/profile_op.py OP [--transport T] [--count N] [--size MiB] [--pin] [--how cprofile|strace]

OP is ``ping``, ``stat``, ``execute`` (``true``), ``send``, ``fetch`` or
``stream`` (``cat`` of a file to a stdout callback); T is ``TCP`` (default),
``"TCP, sessions off"``, ``TLS``, ``SSH``, ``"SSH via ssh"``, ``"SSH via ssh -W"`` or
``local``.  The master is this process; the slave is a
real ``remsh-slave`` process (for ``local``: the local child, whose side is
traced but not profiled).

``--how cprofile`` (default) runs the slave under ``cProfile`` in every
thread (``bench/threadprof.py``: the slave serves from a thread of its own)
and wraps the master's timed loop in ``cProfile``, then prints the
functions with the most own time on each side (time waiting on a lock or a
queue is a thread waiting for another, not work).  ``--how strace`` attaches ``strace -c -f`` to both
processes for the timed loop only and prints system calls per operation.
``--how time`` runs neither and reports only wall and CPU time per operation.
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

from fixtures import ALL_TRANSPORTS, SSH, SSH_OPENSSH, SSH_TUNNEL, TCP, RemshSlaves  # noqa: E402
from sshd import Sshd  # noqa: E402
from harness import PIN_CPUS, process_tree, set_affinity_tree  # noqa: E402

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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("op", choices=["ping", "stat", "execute", "send", "fetch", "stream"])
    p.add_argument("--transport", choices=ALL_TRANSPORTS, default="TCP")
    p.add_argument("--count", type=int, help="operations to time (default depends on OP)")
    p.add_argument("--size", type=int, default=64, help="MiB for send/fetch/stream (default 64)")
    p.add_argument("--pin", action="store_true", help="both ends on CPU 0")
    p.add_argument("--how", choices=["cprofile", "strace", "time"], default="cprofile",
                   help="time: no profiler, only wall and CPU time per operation")
    p.add_argument("--top", type=int, default=18)
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="remsh-profile-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        return run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: str) -> int:
    count = args.count or {"ping": 20000, "stat": 20000, "execute": 1000}.get(args.op, 5)
    big = os.path.join(work, "big.bin")
    if args.op in ("send", "fetch", "stream"):
        with open(big, "wb") as f:
            subprocess.run(["head", "-c", str(args.size * MiB), "/dev/urandom"], stdout=f, check=True)
    dest = os.path.join(work, "dest.bin")
    slave_prof = os.path.join(work, "slave.prof")
    sshd = None
    if args.transport == SSH_TUNNEL:
        sshd = Sshd(work)
        sshd.start()
    remsh = RemshSlaves(work, python_args=[os.path.join(HERE, "threadprof.py"), slave_prof]
                        if args.how == "cprofile" else [], sshd=sshd)
    # the system ssh client reaches the embedded server of the SSH transport,
    # or the TCP listener through the tunnel
    remsh.start({SSH_OPENSSH: (SSH, SSH_OPENSSH), SSH_TUNNEL: (TCP, SSH_TUNNEL)}.get(args.transport,
                                                                                  (args.transport,)))
    if args.transport in remsh.na:
        print(f"cannot start remsh {args.transport}: {remsh.na[args.transport]}")
        remsh.stop()
        if sshd is not None:
            sshd.stop()
        return 1
    tracers: list = []
    try:
        slave = remsh.slaves[args.transport]
        slave_pids = [p for p in process_tree(os.getpid()) if p != os.getpid()]
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
        if args.how == "strace":
            for who, pid in (("master", os.getpid()), ("slave", slave_pids[0])):
                out = os.path.join(work, f"{who}.strace")
                tracers.append((who, out, subprocess.Popen(["strace", "-c", "-f", "-o", out, "-p", str(pid)],
                                                           stderr=subprocess.DEVNULL)))
            time.sleep(1.0)  # strace attaches
            prof = None
        elif args.how == "cprofile":
            prof = cProfile.Profile()
            prof.enable()
        else:
            prof = None
        cpu0 = {pid: cpu_seconds(pid) for pid in (os.getpid(), slave_pids[0])}
        t0 = time.perf_counter()
        for _ in range(count):
            one()
        elapsed = time.perf_counter() - t0
        cpu = {pid: cpu_seconds(pid) - c for pid, c in cpu0.items()}
        if prof is not None:
            prof.disable()
    finally:
        for _, _, tracer in tracers:
            tracer.terminate()
            tracer.wait()
        remsh.stop()
        if sshd is not None:
            sshd.stop()
    per = elapsed / count
    what = f"{per * 1e6:.1f} us per {args.op}" if args.op in ("ping", "stat", "execute") else \
        f"{per:.3f} s per {args.op} = {args.size / per:.0f} MiB/s"
    print(f"{args.op} over {args.transport}{' (pinned)' if args.pin else ''}, {args.how}: {count} operations, {what}")
    print(f"CPU per {args.op}: master {cpu[os.getpid()] / count * 1e6:.0f} us, "
          f"slave {cpu[slave_pids[0]] / count * 1e6:.0f} us (children such as the command not included; "
          f"10 ms clock ticks, so use a large --count)")
    if prof is not None:
        master_prof = os.path.join(work, "master.prof")
        prof.dump_stats(master_prof)
        print("\n== master (this process), own time\n" + top(master_prof, args.top, count))
        if os.path.exists(slave_prof):
            print("== slave (remsh-slave, every thread under cProfile), own time; includes the warm-up\n" +
                  top(slave_prof, args.top, count + max(1, count // 10)))
    for who, out, _ in tracers:
        print(f"\n== {who}: system calls per {args.op} (strace -c -f)\n" + strace_summary(out, count))
    return 0


if __name__ == "__main__":
    sys.exit(main())
