"""SIGTERM for the slave programs: unwind, so that clean-up runs.

Shared by ``remsh-slave`` (:mod:`remsh.slave.main`) and the local slave
child (:mod:`remsh.slave.localchild`).  SIGTERM raises ``SystemExit(143)``
in the main thread, which unwinds the server: a running command's process
group is killed on the way out (``finally`` blocks), which the signal's
default action would skip.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator


def _terminate(signum: int, frame: object) -> None:
    # Unwinds the main thread, so that the server's clean-up runs: a running
    # command's process group is killed on the way out.  Further SIGTERMs
    # are ignored while that clean-up runs (once is enough).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)


@contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """While the body runs, SIGTERM raises ``SystemExit(143)`` in the main
    thread; afterwards SIGTERM has its default action again.

    Used by both slave programs (``remsh-slave`` and the local slave child).
    Restoring the default matters: a SIGTERM that arrives after serving has
    ended -- a local child's master closes the connection and then signals
    it -- would otherwise raise ``SystemExit`` inside the interpreter's
    shutdown, which prints "Exception ignored ... SystemExit: 143".
    """
    signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
