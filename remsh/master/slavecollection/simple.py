"""A thread-safe collection of connected slaves, keyed by name."""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional

from remsh.errors import UsageError

if TYPE_CHECKING:
    from remsh.master.slave import Slave

log = logging.getLogger(__name__)

SlaveFilter = Callable[["Slave"], bool]
SlaveCmp = Callable[["Slave", "Slave"], int]


class SimpleSlaveCollection:
    """The slaves connected now, one per name, without reservations.

    A slave that disconnects leaves by itself.  A slave registering under a
    name already present replaces the old registration, whose connection is
    closed (its pending operations raise ``Disconnected``): the newcomer is
    the one that just proved it holds the name.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._slaves: Dict[str, "Slave"] = {}

    def __len__(self) -> int:
        with self._cond:
            return len(self._slaves)

    def add_slave(self, slave: "Slave", listener: Any = None) -> None:
        """Add a connected slave (``listener`` is the one that connected it)."""
        with self._cond:
            old = self._slaves.get(slave.name)
            self._slaves[slave.name] = slave
            self._cond.notify_all()
        if old is not None and old is not slave:
            log.info("slave %s re-registered; dropping its previous connection", slave.name)
            old.close()
        slave.on_disconnect(self._remove)

    def _remove(self, slave: "Slave") -> None:
        with self._cond:
            if self._slaves.get(slave.name) is slave:
                del self._slaves[slave.name]
                self._cond.notify_all()

    def get_all_slaves(self) -> List["Slave"]:
        """The slaves connected now."""
        with self._cond:
            return list(self._slaves.values())

    def get_slave(self, block: bool, filter: Optional[SlaveFilter] = None,
                  cmp: Optional[SlaveCmp] = None, timeout: Optional[float] = None) -> Optional["Slave"]:
        """A connected slave for which ``filter(slave)`` is true.

        Several matches are sorted with ``cmp`` (a two-argument comparison)
        and the first returned; without ``cmp`` one is picked at random.
        With ``block`` false, or when ``timeout`` seconds pass, returns
        ``None`` if nothing matches; otherwise waits for a match to connect.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                matches = [s for s in self._slaves.values()
                           if s.connected and (filter is None or filter(s))]
                if matches:
                    if cmp is not None:
                        matches.sort(key=functools.cmp_to_key(cmp))
                        return matches[0]
                    return random.choice(matches)
                if not block:
                    return None
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)

    def wait_for_slaves(self, count: Optional[int] = None, names: Iterable[str] = (),
                        timeout: Optional[float] = None) -> List["Slave"]:
        """Wait until ``count`` slaves (or every named one) are connected.

        Returns the connected slaves (the named ones, if names were given).
        Raises :class:`~remsh.errors.UsageError` if they are not all there
        when ``timeout`` runs out.
        """
        wanted = list(names)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if wanted:
                    have = [self._slaves[n] for n in wanted if n in self._slaves]
                    if len(have) == len(wanted):
                        return have
                elif count is None or len(self._slaves) >= count:
                    return list(self._slaves.values())
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    missing = [n for n in wanted if n not in self._slaves]
                    what = f"slaves {missing}" if wanted else f"{count} slaves (have {len(self._slaves)})"
                    raise UsageError(f"timed out after {timeout:g} s waiting for {what}")
                self._cond.wait(left)
