"""How fast ``remsh run`` prints a command's many short lines.

One local slave runs ``seq 1 N`` (1,000,000 lines by default; ``--quick``
200,000); ``remsh run --local 1`` prints them to a file in /dev/shm (or a
temporary directory) as prefixed lines, with ``--no-prefix``, and with
``--json``.  The table gives each variant's median wall time over the runs
and its ratio to ``--no-prefix`` (the cost of moving the bytes alone); the
target of the output issue is a prefixed run at most 1.5 times a
``--no-prefix`` one.  Exit status 1 when the target is missed.

    python bench/cliprint.py [--quick] [--lines N] [--runs R]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = 1.5
VARIANTS = [("--no-prefix", ["--no-prefix"]), ("prefixed", []), ("--json", ["--json"])]


def one_run(extra: List[str], lines: int, workdir: str) -> float:
    """Wall time of one ``remsh run`` printing ``lines`` lines into a file."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("REMSH_SECRET", None)
    argv = [sys.executable, "-m", "remsh", "run", "--local", "1", "--basedir", workdir, "--color", "never",
            "--no-summary", *extra, "--", "seq", "1", str(lines)]
    with open(os.path.join(workdir, "out"), "wb") as out:
        start = time.perf_counter()
        done = subprocess.run(argv, stdout=out, stderr=subprocess.PIPE, env=env, timeout=600)
        took = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode(errors='replace')}")
    size = os.path.getsize(os.path.join(workdir, "out"))
    if size < lines:
        raise SystemExit(f"{' '.join(argv)} printed only {size} bytes")
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="200,000 lines, 3 runs")
    ap.add_argument("--lines", type=int, help="lines printed (default 1,000,000)")
    ap.add_argument("--runs", type=int, help="runs of each variant (default 5)")
    args = ap.parse_args()
    lines = args.lines or (200_000 if args.quick else 1_000_000)
    runs = args.runs or (3 if args.quick else 5)
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    times: Dict[str, List[float]] = {name: [] for name, _ in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="remsh-cliprint-", dir=base) as workdir:
        one_run([], 1000, workdir)  # warm-up: imports compiled, page cache
        for _ in range(runs):  # interleaved, so that a busy moment hits every variant alike
            for name, extra in VARIANTS:
                times[name].append(one_run(extra, lines, workdir))
    floor = statistics.median(times["--no-prefix"])
    print(f"remsh run printing {lines:,} lines of seq (median of {runs} runs, output to a file)")
    print(f"{'variant':<14}{'median s':>10}{'min s':>9}{'x no-prefix':>13}")
    for name, _ in VARIANTS:
        med = statistics.median(times[name])
        print(f"{name:<14}{med:>10.3f}{min(times[name]):>9.3f}{med / floor:>13.2f}")
    ratio = statistics.median(times["prefixed"]) / floor
    ok = ratio <= TARGET
    print(f"target: prefixed <= {TARGET}x --no-prefix: {ratio:.2f}x {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
