"""Timing, CPU pinning, results and the table: what every scenario shares.

A *row* is one contender in one scenario under one CPU placement.  Its
figures are per-run values: for a latency row the mean time of one
operation within a run (a run is a batch of operations, timed as a whole);
for a throughput row the MiB/s of one transfer.  Warm-up runs are made and
thrown away before the timed runs.  The table shows median, min and max of
the timed runs and the ratio of the medians to the row's baseline:

- latency rows: contender time / baseline time (lower is better, 1.0 = as
  fast as the baseline);
- throughput rows: contender MiB/s / baseline MiB/s (higher is better,
  1.0 = as fast as the baseline).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

PINNED = "pinned"  # both ends on CPU 0
UNPINNED = "2 CPUs"  # the scheduler places each end
ANY = "-"  # placement not controlled (throughput, connection set-up)

ALL_CPUS = frozenset(os.sched_getaffinity(0))
PIN_CPUS = frozenset({min(ALL_CPUS)})


# -- CPU placement -------------------------------------------------------------


def _children_map() -> Dict[int, List[int]]:
    kids: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: split after the last ')'
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def process_tree(root: int) -> List[int]:
    """``root`` and every process descended from it."""
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, ()))
    return out


def set_affinity_tree(cpus: Iterable[int], root: Optional[int] = None) -> int:
    """Set the CPU affinity of every thread of ``root`` (default: this
    process) and of all its descendants; processes they fork later inherit
    it.  Returns the number of threads changed."""
    cpus = set(cpus)
    n = 0
    for pid in process_tree(os.getpid() if root is None else root):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(int(tid), cpus)
                n += 1
            except OSError:
                pass  # exited meanwhile
    return n


def place(mode: str) -> None:
    """Apply a CPU placement to the whole benchmark process tree (the master,
    its slaves and the peer processes all descend from this process)."""
    set_affinity_tree(PIN_CPUS if mode == PINNED else ALL_CPUS)


# -- measuring -------------------------------------------------------------------


def measure(op: Callable[[], object], *, runs: int, warmup: int = 1, batch: int = 1,
            before: Optional[Callable[[], object]] = None,
            after: Optional[Callable[[], object]] = None) -> List[float]:
    """Time ``op``; return the mean seconds per call of each timed run.

    Each run calls ``op`` ``batch`` times back to back.  ``before`` and
    ``after`` run around every call and are not timed (e.g. to remove a
    transferred file).  ``warmup`` runs are made first and discarded.
    """
    results = []
    clock = time.perf_counter
    for i in range(warmup + runs):
        elapsed = 0.0
        if before is None and after is None:
            t0 = clock()
            for _ in range(batch):
                op()
            elapsed = clock() - t0
        else:
            for _ in range(batch):
                if before is not None:
                    before()
                t0 = clock()
                op()
                elapsed += clock() - t0
                if after is not None:
                    after()
        if i >= warmup:
            results.append(elapsed / batch)
    return results


@dataclass
class Row:
    scenario: str
    contender: str
    cpus: str = ANY
    kind: str = "time"  # "time" (seconds, lower is better) or "rate" (MiB/s)
    values: List[float] = field(default_factory=list)
    baseline: Optional[str] = None  # contender name of the baseline, same scenario and cpus
    na: Optional[str] = None  # reason the row could not be measured
    note: str = ""

    @property
    def median(self) -> Optional[float]:
        return statistics.median(self.values) if self.values else None

    def key(self) -> tuple:
        return (self.scenario, self.contender, self.cpus)


class Results:
    """All rows of one benchmark run, in the order they were measured."""

    def __init__(self) -> None:
        self.rows: List[Row] = []
        self.extra: Dict[str, object] = {}

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        status = f"n/a ({row.na})" if row.na else _fmt(row.median, row.kind)
        print(f"  {row.scenario:<28} {row.contender:<28} {row.cpus:<7} {status}", flush=True)
        return row

    def find(self, scenario: str, contender: str, cpus: str = ANY) -> Optional[Row]:
        for row in self.rows:
            if row.key() == (scenario, contender, cpus):
                return row
        return None

    def ratio(self, row: Row) -> Optional[float]:
        if row.baseline is None or row.median is None:
            return None
        base = self.find(row.scenario, row.baseline, row.cpus)
        if base is None or not base.median:
            return None
        return row.median / base.median

    # -- output ----------------------------------------------------------------

    def table(self) -> str:
        head = ["scenario", "contender", "cpus", "median", "min", "max", "ratio", "baseline"]
        lines = [head]
        for row in self.rows:
            if row.na:
                cells = [row.scenario, row.contender, row.cpus, f"n/a ({row.na})", "", "", "", ""]
            else:
                ratio = self.ratio(row)
                cells = [row.scenario, row.contender, row.cpus, _fmt(row.median, row.kind),
                         _fmt(min(row.values), row.kind), _fmt(max(row.values), row.kind),
                         fmt_ratio(ratio), row.baseline or ""]
            lines.append(cells)
        widths = [max(len(str(line[i])) for line in lines if len(line) > i and not _wide(line, i))
                  for i in range(len(head))]
        out = []
        for n, line in enumerate(lines):
            if _wide(line, 3):
                cells = [f"{line[0]:<{widths[0]}}", f"{line[1]:<{widths[1]}}", f"{line[2]:<{widths[2]}}",
                         line[3]]
            else:
                cells = [f"{c:<{w}}" if i < 3 or i == 7 else f"{c:>{w}}"
                         for i, (c, w) in enumerate(zip(line, widths))]
            out.append(" | ".join(cells).rstrip())
            if n == 0:
                out.append("-+-".join("-" * w for w in widths))
        return "\n".join(out)

    def markdown(self) -> str:
        out = ["| scenario | contender | cpus | median | min | max | ratio | baseline |",
               "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]

        def cell(text: object) -> str:
            return str(text).replace("|", "\\|")  # "tar | ssh | tar" is one cell

        for row in self.rows:
            name = f"| {cell(row.scenario)} | {cell(row.contender)} | {row.cpus} |"
            if row.na:
                out.append(f"{name} n/a ({cell(row.na)}) | | | | |")
                continue
            ratio = self.ratio(row)
            out.append(f"{name} {_fmt(row.median, row.kind)} | "
                       f"{_fmt(min(row.values), row.kind)} | {_fmt(max(row.values), row.kind)} | "
                       f"{fmt_ratio(ratio)} | {cell(row.baseline or '')} |")
        return "\n".join(out)

    def as_json(self, machine: Dict[str, object], config: Dict[str, object]) -> str:
        rows = []
        for row in self.rows:
            rows.append({
                "scenario": row.scenario, "contender": row.contender, "cpus": row.cpus,
                "unit": "s" if row.kind == "time" else "MiB/s",
                "median": row.median, "min": min(row.values) if row.values else None,
                "max": max(row.values) if row.values else None, "runs": row.values,
                "baseline": row.baseline, "ratio": self.ratio(row), "na": row.na, "note": row.note,
            })
        return json.dumps({"machine": machine, "config": config, "rows": rows, **self.extra},
                          indent=1, default=str)


def _wide(line: List[str], i: int) -> bool:
    return i == 3 and str(line[3]).startswith("n/a (")


def fmt_ratio(ratio: Optional[float]) -> str:
    """Three significant digits: 1.45, 203, 0.00395."""
    return "" if ratio is None else f"{ratio:.3g}"


def _fmt(value: Optional[float], kind: str) -> str:
    if value is None:
        return "-"
    if kind == "rate":
        return f"{value:.0f} MiB/s"
    if value < 1e-3:
        return f"{value * 1e6:.1f} µs"
    if value < 1.0:
        return f"{value * 1e3:.2f} ms"
    return f"{value:.2f} s"


# -- the machine -----------------------------------------------------------------------


def _cmd_version(argv: List[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"
    return (p.stdout + p.stderr).strip().splitlines()[0] if (p.stdout + p.stderr).strip() else ""


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def machine_info() -> Dict[str, object]:
    """CPU model, cores, memory, kernel, Python and peer versions."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                    break
    except OSError:
        pass
    versions: Dict[str, str] = {}
    for mod in ("paramiko", "fabric", "execnet", "rpyc", "cryptography"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            versions[mod] = f"unavailable ({type(e).__name__})"
    import remsh

    versions["remsh"] = remsh.__version__
    repo = os.path.dirname(os.path.dirname(os.path.abspath(remsh.__file__)))
    commit = _cmd_version(["git", "-C", repo, "rev-parse", "--short", "HEAD"])
    dirty = _cmd_version(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no", "--", "remsh"])
    versions["remsh_commit"] = commit + (" + uncommitted changes in remsh/" if dirty else "")
    versions["openssh"] = _cmd_version(["ssh", "-V"])
    return {
        "hostname": socket.gethostname(),
        "cpu_model": model,
        "cores": os.cpu_count(),
        "cpus_usable": len(ALL_CPUS),
        "memory": mem,
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "python_impl": platform.python_implementation(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpuidle_driver": _read("/sys/devices/system/cpu/cpuidle/current_driver"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
    }


def machine_line(m: Dict[str, object]) -> str:
    return (f"{m['cpu_model']}, {m['cores']} cores, {m['memory']} RAM, Linux {m['kernel']}, "
            f"Python {m['python']}, {m['date']}")
