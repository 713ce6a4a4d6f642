"""Ownership on a job store shared by several masters, and its refusals.

A store that several masters share (:mod:`remsh.store.postgres`) knows each
master by a *name* (``remsh master --name``, by default ``HOST:PORT``) and an
*epoch*: a number the store raises every time a master of that name starts,
and every time another master adopts the work of one that stopped
answering.  Every write a master makes carries its name and epoch, and the
store refuses a write whose epoch is no longer the current one
(:class:`FencedOff`): a master that was paused (SIGSTOP, a VM frozen, a long
garbage collection) past its lease and comes back cannot write over the
master that took its work.  A job belongs to the master that created or
adopted it; another master's write to it is refused (:class:`NotOwner`).

These classes live apart from the PostgreSQL store so that the rest of the
master can tell the refusals from other store errors without importing
psycopg.  A single-master store (SQLite) raises none of them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Protocol, runtime_checkable

from remsh.store.base import StoreError


class FencedOff(StoreError):
    """This master's epoch is stale: it was declared dead and its work
    adopted by another master (or another master of the same name started).
    Nothing it writes is taken any more; it should stop."""


class NotOwner(StoreError):
    """The job belongs to another master (``owner``), which alone writes its
    records."""

    def __init__(self, message: str, owner: Optional[str] = None) -> None:
        super().__init__(message)
        self.owner = owner


class MasterNameInUse(StoreError):
    """A live master (its heartbeat within the lease) already uses this name
    on the store: two masters of one name would fence each other off."""


@runtime_checkable
class SharedJobStore(Protocol):
    """What a store several masters share adds to
    :class:`~remsh.store.base.JobStore`: a cancel asked of any master
    reaches the master that runs the job."""

    def request_cancel(self, job_id: str, reason: str) -> Optional[str]:
        """Ask the master that runs ``job_id`` to cancel it; its name, or
        ``None`` when the job has ended.  :class:`UnknownJob` when there is
        no such job."""

    def watch_cancels(self, callback: Callable[[str, str], None]) -> None:
        """Call ``callback(job_id, reason)`` once for each cancel asked of a
        running job of this master's."""


@dataclasses.dataclass(frozen=True)
class MasterRow:
    """A master as the shared store knows it."""

    name: str
    epoch: int
    #: seconds since its last heartbeat, by the database's clock
    silent_for: float
    #: it closed the store itself (a clean stop)
    stopped: bool
    #: within its lease and not stopped
    alive: bool


__all__ = ["FencedOff", "NotOwner", "MasterNameInUse", "MasterRow", "SharedJobStore"]
