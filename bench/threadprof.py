"""Run a module under cProfile in every thread, for ``bench/profile_op.py``.

    python bench/threadprof.py OUT.prof -m MODULE [ARGS ...]

``python -m cProfile`` profiles the main thread only, and the slave serves
its master from a thread of its own (the session keeper holds the main
thread).  This wrapper gives every thread its own profiler and writes the
merged statistics to ``OUT.prof`` when the process exits.
"""

from __future__ import annotations

import atexit
import cProfile
import pstats
import runpy
import sys
import threading
from typing import List

_profiles: List[cProfile.Profile] = []
_lock = threading.Lock()


def _keep(prof: cProfile.Profile) -> None:
    prof.disable()
    with _lock:
        _profiles.append(prof)


def _dump(path: str) -> None:
    with _lock:
        profs = list(_profiles)
    if not profs:
        return
    stats = pstats.Stats(profs[0])
    for prof in profs[1:]:
        stats.add(prof)
    stats.dump_stats(path)


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[2] != "-m":
        raise SystemExit(__doc__)
    out, module = sys.argv[1], sys.argv[3]
    sys.argv = [module, *sys.argv[4:]]
    run = threading.Thread.run

    def profiled_run(self: threading.Thread) -> None:
        prof = cProfile.Profile()
        prof.enable()
        try:
            run(self)
        finally:
            _keep(prof)

    threading.Thread.run = profiled_run  # type: ignore[method-assign]
    atexit.register(_dump, out)
    main_prof = cProfile.Profile()
    main_prof.enable()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        _keep(main_prof)
        _dump(out)


if __name__ == "__main__":
    main()
