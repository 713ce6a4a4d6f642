"""A job on many slaves spread over three masters sharing a PostgreSQL
store, against the same job on one master (on the same store), measured in
the same run.

    .venv/bin/python bench/multimaster.py [--slaves N] [--runs N] [--command ARG ...]

PostgreSQL comes from Debian's binaries (tests/pgserver.py: a throw-away
cluster in a temporary directory, ``fsync=off``, as in the tests); without
them the benchmark says so and exits 0.

Two set-ups run side by side, each on a database of its own on that
server: one ``remsh master`` with ``--slaves`` slaves, and three masters
with the same number spread evenly over them (a third each).  The slaves
are real slave connections with sessions, as ``remsh-slave`` makes them,
many to a process (bench/fleetslaves.py, each process dialling from a
loopback address of its own).  The job is ``remsh run --json`` of
``--command`` (default ``echo hello``: one line of output per slave,
stored in PostgreSQL) on every slave of the set-up, timed from the start
of the ``remsh`` command to its exit:

- one master: one ``remsh run`` on its slaves (the baseline); and, for
  the cost of the shared store itself, the same on a master with its
  default SQLite store (``--no-sqlite`` leaves it out);
- three masters: one ``remsh run`` on each master at once, each on the
  slaves that master holds, timed until the last ends;
- three masters, one ``remsh run`` given to the first master for every
  slave of the cluster: measured only where a master's run reaches the
  slaves other masters hold; otherwise the row says how many it reached.

Every run must end with every slave's command exiting 0.  After one
warm-up run of each (thrown away), the timed runs of the rows alternate,
so that the machine's other activity hits them alike.  The table gives
the median, min and max seconds and the ratio of each row's median to the
one-master baseline (lower is faster).  ``--json PATH`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from fixtures import REPO, child_env  # noqa: E402

from tests.pgserver import PgServer, postgres_available  # noqa: E402

#: Bound on a master starting, on all slaves registering, and on one job.
START_WAIT = 60.0
REGISTER_WAIT = 600.0
JOB_WAIT = 600.0


class MasterProc:
    """One ``remsh master`` on the shared store, with its control socket, log and TCP port."""

    def __init__(self, work: str, name: str, uri: Optional[str], secret_file: str) -> None:
        self.name = name
        self.dir = os.path.join(work, name)
        os.makedirs(self.dir, mode=0o700)
        self.sock = os.path.join(self.dir, "m.sock")
        self.log = os.path.join(self.dir, "master.log")
        argv = [sys.executable, "-m", "remsh", "master", "--control", self.sock, "--listen", "127.0.0.1:0",
                "--state-dir", os.path.join(self.dir, "state"), "--secret-file", secret_file,
                *(["--store", uri, "--name", name] if uri else [])]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, env=child_env(), cwd=REPO, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        self.port = 0

    def text(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_WAIT
        while "remsh master: ready" not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"master {self.name} did not start: {self.text()[-2000:]}")
            time.sleep(0.05)
        line = next(x for x in self.text().splitlines() if "listening for TCP slaves on" in x)
        self.port = int(line.rsplit(":", 1)[1])

    def remsh(self, *args: str, timeout: float = JOB_WAIT) -> "subprocess.Popen[bytes]":
        return subprocess.Popen([sys.executable, "-m", "remsh", "--master", self.sock, *args], env=child_env(),
                                cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class Setup:
    """Masters on one database, ``slaves`` slaves spread evenly over them, named ``PREFIX-MASTER-NNNNN``."""

    sources = 0  # loopback source addresses handed out so far (one per slave process, over every set-up)

    def __init__(self, work: str, label: str, names: Sequence[str], uri: Optional[str], secret_file: str) -> None:
        self.label = label
        self.work = os.path.join(work, label)
        os.makedirs(self.work)
        self.masters = [MasterProc(self.work, name, uri, secret_file) for name in names]
        self.uri = uri
        #: the store's writes (fenced transactions) during the last run
        self.last_writes: Optional[int] = None
        self.secret_file = secret_file
        self.farms: List["subprocess.Popen[bytes]"] = []
        self.counts: Dict[str, int] = {}
        self.register_s = 0.0

    def start(self, slaves: int, per_process: int) -> None:
        for m in self.masters:
            m.wait_ready()
        started = time.perf_counter()
        log = open(os.path.join(self.work, "fleetslaves.log"), "ab")
        for i, m in enumerate(self.masters):
            self.counts[m.name] = slaves // len(self.masters) + (1 if i < slaves % len(self.masters) else 0)
            left, part = self.counts[m.name], 0
            while left > 0:
                count = min(per_process, left)
                source = Setup.sources
                Setup.sources += 1
                argv = [sys.executable, os.path.join(HERE, "fleetslaves.py"), "--port", str(m.port),
                        "--source", f"127.0.{2 + source // 250}.{1 + source % 250}",
                        "--secret-file", self.secret_file, "--count", str(count),
                        "--prefix", f"{self.prefix(m)}{part:02d}-", "--basedir", self.work, "--resumable"]
                self.farms.append(subprocess.Popen(argv, env=child_env(), cwd=REPO, stdin=subprocess.DEVNULL,
                                                   stdout=subprocess.DEVNULL, stderr=log))
                left -= count
                part += 1
        deadline = time.monotonic() + REGISTER_WAIT
        for m in self.masters:
            while len(self.held(m)) < self.counts[m.name]:
                if time.monotonic() > deadline or any(f.poll() not in (None, 0) for f in self.farms):
                    raise RuntimeError(f"{self.label}: {len(self.held(m))} of {self.counts[m.name]} slaves "
                                       f"registered with {m.name} (see {self.work}/fleetslaves.log)")
                time.sleep(0.5)
        self.register_s = time.perf_counter() - started

    def prefix(self, m: MasterProc) -> str:
        return f"{self.label}-{m.name}-"

    def held(self, m: MasterProc) -> List[Dict[str, Any]]:
        """``ls --json`` rows of the slaves connected to ``m``, as the first master lists them."""
        proc = self.masters[0].remsh("ls", "--json", "-t", f"{self.prefix(m)}*")
        out, err = proc.communicate(timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"ls on {self.masters[0].name}: {err.decode(errors='replace')}")
        return [r for r in json.loads(out) if r.get("state") == "idle" and r.get("master", m.name) == m.name]

    def run(self, command: Sequence[str], max_parallel: int, *, entry: Optional[MasterProc] = None) -> float:
        """Seconds for the job: one ``remsh run`` per master on its own slaves
        at once, or (``entry``) one on that master for all of them.  Raises
        when a slave's command did not end well or a slave was missed."""
        jobs = [(entry, f"{self.label}-*")] if entry is not None else [(m, f"{self.prefix(m)}*")
                                                                        for m in self.masters]
        before = self.writes()
        started = time.perf_counter()
        procs = [(m, m.remsh("run", "--json", "--max-parallel", str(max_parallel), "-t", target, "--", *command))
                 for m, target in jobs]
        results = [(m, *p.communicate(timeout=JOB_WAIT), p.returncode) for m, p in procs]
        took = time.perf_counter() - started
        after = self.writes()
        self.last_writes = None if before is None or after is None else after - before
        ok = 0
        for m, out, err, rc in results:
            if rc != 0:
                raise RuntimeError(f"run on {m.name} exited {rc}: {err.decode(errors='replace')[-500:]}")
            ok += sum(1 for line in out.splitlines() if line.strip() and json.loads(line).get("status") == 0)
        want = sum(self.counts.values())
        if ok != want:
            raise Missed(ok, want)
        return took

    def writes(self) -> Optional[int]:
        """How many writes the store has made (each fenced write of a master
        takes a number of the ``remsh_changes`` sequence); ``None`` on SQLite."""
        if self.uri is None:
            return None
        import psycopg

        with psycopg.connect(self.uri) as db:
            row = db.execute("SELECT last_value FROM remsh_changes").fetchone()
        return None if row is None else int(row[0])

    def stop(self) -> None:
        for m in self.masters:
            m.stop()
        for f in self.farms:
            try:
                f.wait(30)
            except subprocess.TimeoutExpired:
                f.kill()
                f.wait(10)


class Missed(RuntimeError):
    """A run reached fewer slaves than the set-up has."""

    def __init__(self, reached: int, total: int) -> None:
        super().__init__(f"reached {reached} of {total} slaves")
        self.reached = reached


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slaves", type=int, default=1000, help="slaves of each set-up (default %(default)d)")
    p.add_argument("--runs", type=int, default=5, help="timed runs of each row (default %(default)d)")
    p.add_argument("--per-process", type=int, default=170, help="slave connections per fleetslaves process")
    p.add_argument("--max-parallel", type=int, default=64, help="remsh run --max-parallel (default: run's own)")
    p.add_argument("--command", nargs="+", default=["echo", "hello"])
    p.add_argument("--json", metavar="PATH", help="write the figures here too")
    p.add_argument("--no-sqlite", dest="sqlite", action="store_false",
                   help="leave out the row of one master on its SQLite store")
    args = p.parse_args()
    missing = postgres_available()
    if missing is not None:
        print(f"multimaster: not measured: {missing}")
        return 0
    work = tempfile.mkdtemp(prefix="remsh-bench-mm-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    secret_file = os.path.join(work, "secret")
    with open(os.open(secret_file, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as secret:
        secret.write(os.urandom(24).hex().encode())
    server = PgServer()
    setups: List[Setup] = []
    try:
        server.start()
        one = Setup(work, "one", ["solo"], server.uri(server.new_database()), secret_file)
        setups.append(one)
        if args.sqlite:
            setups.append(Setup(work, "sqlite", ["sqlite"], None, secret_file))
        three = Setup(work, "three", ["m1", "m2", "m3"], server.uri(server.new_database()), secret_file)
        setups.append(three)
        for s in setups:
            s.start(args.slaves, args.per_process)
        rows: Dict[str, Tuple[Setup, Optional[MasterProc]]] = {
            "1 master": (one, None),
            **({"1 master, SQLite (no --store)": (setups[1], None)} if args.sqlite else {}),
            "3 masters, a run on each": (three, None),
            "3 masters, one run on m1": (three, three.masters[0]),
        }
        times: Dict[str, List[float]] = {k: [] for k in rows}
        writes: Dict[str, List[int]] = {k: [] for k in rows}
        notes: Dict[str, str] = {}

        def measure(label: str) -> float:
            setup, entry = rows[label]
            took = setup.run(args.command, args.max_parallel, entry=entry)
            if setup.last_writes is not None:
                writes[label].append(setup.last_writes)
            return took

        for label in list(rows):  # the warm-up, thrown away
            try:
                measure(label)
            except Missed as e:
                notes[label] = f"n/a: a master's run reaches only its own slaves ({e})"
                del rows[label]
            except RuntimeError as e:
                if "one run" not in label:
                    raise
                notes[label] = f"n/a: {str(e)[:120]}"
                del rows[label]
        order = list(rows)
        for i in range(args.runs):
            for label in order[i % len(order):] + order[:i % len(order)]:
                times[label].append(measure(label))
    finally:
        for s in setups:
            s.stop()
        server.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(times["1 master"])
    print(f"remsh run --json -- {' '.join(args.command)} on {args.slaves:,} slaves (sessions on; "
          f"--max-parallel {args.max_parallel}; PostgreSQL, fsync off; {args.runs} runs after a warm-up; "
          f"{os.cpu_count()} CPUs)")
    width = max(len(k) for k in times)
    print(f"{'':{width}}  median s    min s    max s  ratio  store writes/slave")
    figures: Dict[str, Any] = {"slaves": args.slaves, "runs": args.runs, "command": args.command,
                               "max_parallel": args.max_parallel,
                               "register_s": {s.label: round(s.register_s, 2) for s in setups}, "rows": {}}
    for label, values in times.items():
        if label in notes:
            print(f"{label:{width}}  {notes[label]}")
            figures["rows"][label] = {"na": notes[label]}
            continue
        med = statistics.median(values)
        per_slave = statistics.median(writes[label]) / args.slaves if writes[label] else None
        print(f"{label:{width}}  {med:8.2f} {min(values):8.2f} {max(values):8.2f}  {med / base:5.2f}x  "
              + ("-" if per_slave is None else f"{per_slave:.1f}"))
        figures["rows"][label] = {"median_s": med, "runs_s": values, "ratio": med / base,
                                  "store_writes_per_slave": per_slave}
    print(f"(all slaves registered in {one.register_s:.1f} s on one master, {three.register_s:.1f} s on three)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
