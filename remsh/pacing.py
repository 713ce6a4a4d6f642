"""Pacing a job over its slaves: ``--batch`` and ``--max-fail``, and the
slaves it cannot start.

- ``--batch N`` (Ansible's ``serial``, Salt's ``-b``): at most ``N`` slaves
  at a time, rolling: as one ends the next starts.  ``N%`` is that share of
  the chosen slaves (rounded up, at least one).  It bounds the fan-out
  together with ``--max-parallel`` (the smaller wins).
- ``--max-fail K``: once ``K`` slaves have failed (a command exited
  non-zero, or the slave could not do its part), no further slave is
  started; the rest end ``skipped`` (errtag :data:`ERRTAG_SKIPPED`).  What
  already runs goes on.  Skipped slaves do not change the exit status by
  themselves: it is 1 or 3 from the failures, as without the option.
- Slaves chosen but *away* (their connection dropped, their session waits
  for them) are not started either: each ends at once, ``skipped`` with
  the reason (errtag :data:`ERRTAG_AWAY`), and counts as a slave that could
  not do its part (exit 3): never silently left out.
"""

from __future__ import annotations

import math
import threading
from typing import Optional, Sequence

from remsh.errors import UsageError

#: The ``errtag`` of a slave not started because ``--max-fail`` was reached.
ERRTAG_SKIPPED = "skipped"
#: The ``errtag`` of a slave not started because it was away.
ERRTAG_AWAY = "away"
#: The ``errtag``\ s of a slave that was never started by the pacing.
SKIPPED_TAGS = (ERRTAG_SKIPPED, ERRTAG_AWAY)
#: The error text of a chosen slave that is away.
AWAY_ERROR = "away (its connection dropped; its session waits for it): not started"


def check_batch(text: Optional[str]) -> Optional[str]:
    """``--batch``'s value checked: ``N`` or ``N%`` with ``N`` at least 1.

    :raises UsageError: anything else
    """
    if text is None:
        return None
    number = text[:-1] if text.endswith("%") else text
    if not number.isdigit() or int(number) < 1 or (text.endswith("%") and int(number) > 100):
        raise UsageError(f"--batch expects N or N% (N at least 1, a share at most 100%), got {text!r}")
    return text


def check_max_fail(value: Optional[int]) -> Optional[int]:
    """``--max-fail``'s value checked.  :raises UsageError: less than 1"""
    if value is not None and value < 1:
        raise UsageError(f"--max-fail must be at least 1, got {value}")
    return value


class Pacing:
    """How a job's fan-out is paced: ``batch`` (``N`` or ``N%``, see
    :func:`check_batch`), ``max_fail`` and the names of the chosen slaves
    that are ``away``.  Counts failures from several threads."""

    def __init__(self, batch: Optional[str] = None, max_fail: Optional[int] = None,
                 away: Sequence[str] = ()) -> None:
        """:raises UsageError: a bad ``batch`` or ``max_fail``"""
        self.batch = check_batch(batch)
        self.max_fail = check_max_fail(max_fail)
        self.away = list(away)
        self._lock = threading.Lock()
        self._failures = 0

    def parallel(self, max_parallel: int, count: int) -> int:
        """Slaves driven at once for ``count`` slaves: ``max_parallel``,
        bounded by the batch."""
        if self.batch is None:
            return max_parallel
        if self.batch.endswith("%"):
            size = max(1, math.ceil(count * int(self.batch[:-1]) / 100))
        else:
            size = int(self.batch)
        return max(1, min(max_parallel, size))

    def skip_reason(self) -> Optional[str]:
        """Why the next slave must not start (``--max-fail`` reached), or ``None``."""
        with self._lock:
            if self.max_fail is not None and self._failures >= self.max_fail:
                return f"--max-fail {self.max_fail} reached: not started"
        return None

    def ended(self, failed: bool) -> None:
        """A slave this pacing started has ended, ``failed`` or not."""
        if failed:
            with self._lock:
                self._failures += 1
