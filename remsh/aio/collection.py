"""The slaves connected to an asyncio master, keyed by name: :class:`AsyncSlaveCollection`."""

from __future__ import annotations

import asyncio
import builtins
import functools
import logging
import random
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional

from remsh.errors import AuthenticationError, WaitTimeout

if TYPE_CHECKING:
    from remsh.aio.slave import AsyncSlave

log = logging.getLogger(__name__)
_filter = builtins.filter

SlaveFilter = Callable[["AsyncSlave"], bool]
SlaveCmp = Callable[["AsyncSlave", "AsyncSlave"], int]

__all__ = ["AsyncSlaveCollection"]


class AsyncSlaveCollection:
    """The slaves connected now, one per name (for one event loop).

    A slave that disconnects leaves by itself; one registering under a name
    already present through the same listener replaces the old
    registration, whose connection is closed (the newcomer is the one that
    just proved it holds the name); through another listener it is refused.
    """

    def __init__(self) -> None:
        self._slaves: Dict[str, "AsyncSlave"] = {}
        self._changed: Optional[asyncio.Condition] = None

    def __len__(self) -> int:
        return len(self._slaves)

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def _notify(self) -> None:
        cond = self._condition()
        async with cond:
            cond.notify_all()

    def _wake(self) -> None:
        try:
            asyncio.get_running_loop().create_task(self._notify())
        except RuntimeError:  # no loop running (shutting down): nobody waits
            pass

    def may_register(self, name: str, listener: Any) -> bool:
        """Whether ``listener`` may register a slave called ``name`` now:
        false while a connected slave of another listener holds the name."""
        old = self._slaves.get(name)
        return old is None or not old.connected or old.listener is listener

    def changed(self) -> None:
        """A slave's connection came back (a resumed session): whoever
        waits in :meth:`get_slave` looks again."""
        self._wake()

    def add_slave(self, slave: "AsyncSlave") -> None:
        """Add a connected slave, replacing (and closing) one of the same name
        registered through the same listener.

        :raises AuthenticationError: a connected slave of another listener
            holds the name (nothing changes; the caller closes the newcomer:
            a holder of a TCP secret must not take over a local slave's name)
        """
        old = self._slaves.get(slave.name)
        if old is not slave and not self.may_register(slave.name, slave.listener):
            raise AuthenticationError(f"slave name {slave.name!r} belongs to another listener")
        self._slaves[slave.name] = slave
        if old is not None and old is not slave:
            log.info("slave %s re-registered; dropping its previous connection", slave.name)
            old.close()
        slave.on_disconnect(self._remove)
        self._wake()

    def _remove(self, slave: "AsyncSlave") -> None:
        if self._slaves.get(slave.name) is slave:
            del self._slaves[slave.name]
            self._wake()

    def get_all_slaves(self) -> List["AsyncSlave"]:
        """The slaves connected now.  Raises nothing."""
        return [s for s in self._slaves.values() if s.connected]

    def _match(self, filter: Optional[SlaveFilter], cmp: Optional[SlaveCmp]) -> Optional["AsyncSlave"]:
        candidates = self._slaves.values() if filter is None else _filter(filter, self._slaves.values())
        matches = [s for s in candidates if s.connected]
        if not matches:
            return None
        if cmp is not None:
            matches.sort(key=functools.cmp_to_key(cmp))
            return matches[0]
        return random.choice(matches)

    async def get_slave(self, filter: Optional[SlaveFilter] = None, cmp: Optional[SlaveCmp] = None,
                        timeout: Optional[float] = None) -> "AsyncSlave":
        """A connected slave for which ``filter(slave)`` is true, waiting
        for one to connect.  Several matches are sorted with ``cmp`` (a
        two-argument comparison) and the first returned; without ``cmp``
        one is picked at random.

        :raises WaitTimeout: nothing matched within ``timeout`` seconds
        """
        found = self._match(filter, cmp)
        if found is not None:
            return found
        cond = self._condition()
        try:
            async with asyncio.timeout(timeout):
                async with cond:
                    while True:
                        found = self._match(filter, cmp)
                        if found is not None:
                            return found
                        await cond.wait()
        except TimeoutError:
            raise WaitTimeout(f"no matching slave connected within {timeout:g} s") from None

    async def wait_for_slaves(self, count: Optional[int] = None, names: Iterable[str] = (),
                              timeout: Optional[float] = None) -> List["AsyncSlave"]:
        """Wait until ``count`` slaves (or every named one) are connected;
        return them (the named ones, if names were given).

        :raises WaitTimeout: they are not all there within ``timeout`` seconds
        """
        wanted = list(names)

        def ready() -> Optional[List["AsyncSlave"]]:
            if wanted:
                have = [self._slaves[n] for n in wanted if n in self._slaves]
                return have if len(have) == len(wanted) else None
            if count is None or len(self._slaves) >= count:
                return list(self._slaves.values())
            return None

        cond = self._condition()
        try:
            async with asyncio.timeout(timeout):
                async with cond:
                    while True:
                        got = ready()
                        if got is not None:
                            return got
                        await cond.wait()
        except TimeoutError:
            missing = [n for n in wanted if n not in self._slaves]
            what = f"slaves {missing}" if wanted else f"{count} slaves (have {len(self._slaves)})"
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}") from None
