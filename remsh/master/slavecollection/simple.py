"""A thread-safe collection of connected slaves, keyed by name.

Several listeners may share one collection (``remsh run`` puts its TCP, SSH
and local listeners behind one).  A name then belongs to the listener that
registered it while that slave is connected: a newcomer under the same name
replaces the old registration only when it comes through the same listener
(a slave reconnecting after a network failure), never through another one
(a holder of the shared secret must not take over an SSH slave, whose holder
proved a key, or a local slave).  Names that a started listener binds to a
credential of its own (:meth:`SlaveListener.claims_name
<remsh.master.slavelistener.base.SlaveListener.claims_name>`: the SSH
listener's key-bound names) are never given to another listener at all.
"""

from __future__ import annotations

import builtins
import functools
import logging
import random
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional

from remsh.errors import AuthenticationError, WaitTimeout

if TYPE_CHECKING:
    from remsh.master.slave import Slave

log = logging.getLogger(__name__)
_filter = builtins.filter

SlaveFilter = Callable[["Slave"], bool]
SlaveCmp = Callable[["Slave", "Slave"], int]


class SimpleSlaveCollection:
    """The slaves connected now, one per name, without reservations.

    A slave that disconnects leaves by itself.  A slave registering under a
    name already present, through the listener that registered the old one,
    replaces the old registration, whose connection is closed (its pending
    operations raise ``Disconnected``): the newcomer is the one that just
    proved it holds the name.  Through another listener it is refused (see
    the module docstring).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._slaves: Dict[str, "Slave"] = {}
        self._listeners: List[Any] = []

    def __len__(self) -> int:
        with self._cond:
            return len(self._slaves)

    def attach_listener(self, listener: Any) -> None:
        """Note a started listener, whose ``claims_name`` then binds names
        for every other listener (called by listeners' ``start()``)."""
        with self._cond:
            if not any(x is listener for x in self._listeners):
                self._listeners.append(listener)

    def detach_listener(self, listener: Any) -> None:
        """Forget a stopped listener (called by listeners' ``stop()``)."""
        with self._cond:
            self._listeners = [x for x in self._listeners if x is not listener]

    def may_register(self, name: str, listener: Any) -> bool:
        """Whether ``listener`` may register a slave called ``name`` now:
        false while a connected slave of another listener holds the name,
        or when another attached listener claims it.  Raises nothing."""
        with self._cond:
            return self._may_register(name, listener)

    def _may_register(self, name: str, listener: Any) -> bool:
        old = self._slaves.get(name)
        if old is not None and old.connected and old.listener is not listener:
            return False
        for other in self._listeners:
            if other is not listener and other.claims_name(name):
                return False
        return True

    def add_slave(self, slave: "Slave", listener: Any = None) -> None:
        """Add a connected slave (``listener`` is the one that connected it;
        default: ``slave.listener``).

        A connected slave of the same name registered through the same
        listener is replaced and closed.

        :raises AuthenticationError: the name is held by a connected slave
            of another listener, or claimed by another listener (nothing
            changes; the caller closes the newcomer)
        """
        if listener is None:
            listener = slave.listener
        with self._cond:
            if not self._may_register(slave.name, listener):
                raise AuthenticationError(f"slave name {slave.name!r} belongs to another listener")
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

    def changed(self) -> None:
        """A slave's state changed (a resumable slave came back): wake the
        waiters of :meth:`get_slave` and :meth:`wait_for_slaves`."""
        with self._cond:
            self._cond.notify_all()

    def get_all_slaves(self) -> List["Slave"]:
        """The slaves connected now.  Raises nothing."""
        with self._cond:
            return list(self._slaves.values())

    def get_slave(self, block: bool, filter: Optional[SlaveFilter] = None,
                  cmp: Optional[SlaveCmp] = None, timeout: Optional[float] = None) -> Optional["Slave"]:
        """A connected slave for which ``filter(slave)`` is true.

        Several matches are sorted with ``cmp`` (a two-argument comparison)
        and the first returned; without ``cmp`` one is picked at random.
        With ``block`` false, or when ``timeout`` seconds pass, returns
        ``None`` if nothing matches; otherwise waits for a match to connect.
        Raises nothing.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                # the filter is called from C (the builtin ``filter``, which
                # the parameter hides), not from a bytecode loop per slave
                candidates = self._slaves.values() if filter is None else _filter(filter, self._slaves.values())
                matches = [s for s in candidates if s.connected]
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

        :raises WaitTimeout: they are not all there when ``timeout`` runs out
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
                    raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}")
                self._cond.wait(left)
