"""The registry of slaves shared through a job store several masters use:
``remsh ls`` on any master lists every slave of the cluster, each with
``master``, the name of the master holding it.

A :class:`SlaveRegistry` (started by ``remsh master --store URI``,
:func:`share_slaves`) keeps the store's copy of this master's slaves up to
date (:meth:`~remsh.store.base.JobStore.publish_slaves`): its thread wakes
when a slave goes away, comes back or is lost (the collection's state
watchers), waits :data:`COALESCE` seconds so that a burst makes one write,
and otherwise looks every :data:`REFRESH` seconds for anything else that
changed (a slave connected or left, busy or idle).  It writes only when a
row changed, and then only that row: nothing per box or per job.

:func:`cluster_rows` is what ``ls`` (and the dashboard's slave list) show
on such a master: this master's slaves as before, each with ``master``,
plus the slaves the other *live* masters published (a master that stopped
or whose heartbeat is past the lease is left out: its slaves are not shown
as connected to it).  One row per slave name: a connected one before an
away one, this master's before another's.  On a single-master store
(SQLite) there is no registry and ``ls`` is unchanged (no ``master``).
"""

from __future__ import annotations

import fnmatch
import logging
import threading
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from remsh.errors import UsageError
from remsh.fleet import FleetCollection, slave_facts
from remsh.groups import expand_any
from remsh.store.base import JobStore, StoreError

log = logging.getLogger(__name__)

#: Seconds between looks for changes no event announces (connects, leaves, busy/idle).
REFRESH = 2.0
#: Seconds a burst of slave state changes is gathered into one write.
COALESCE = 0.2

_lock = threading.Lock()
_registries: Dict[FleetCollection, "SlaveRegistry"] = {}


class SlaveRegistry:
    """Publishes the slaves of ``collection`` to ``store`` as master ``name``
    and merges the other masters' into ``ls``."""

    def __init__(self, collection: FleetCollection, store: JobStore, name: str, *,
                 refresh: float = REFRESH, coalesce: float = COALESCE) -> None:
        self.collection = collection
        self.store = store
        self.name = name
        self.refresh = refresh
        self.coalesce = coalesce
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._last_error = ""
        self._thread = threading.Thread(target=self._run, name="remsh-slave-registry", daemon=True)

    def start(self) -> None:
        """Publish now and on every change until :meth:`stop` or the store closes."""
        self.collection.state_watchers.append(self._on_state)
        with _lock:
            _registries[self.collection] = self
        self._thread.start()

    def stop(self) -> None:
        """Stop publishing and stop merging into ``ls`` (idempotent)."""
        self._stop.set()
        self._wake.set()
        with _lock:
            if _registries.get(self.collection) is self:
                del _registries[self.collection]
        if self._on_state in self.collection.state_watchers:
            self.collection.state_watchers.remove(self._on_state)

    def _on_state(self, name: str, state: str, detail: str) -> None:
        self._wake.set()

    def local_rows(self) -> List[Dict[str, Any]]:
        """This master's slaves: their ``ls`` rows with ``master`` and,
        under ``facts``, what ``--where`` matches."""
        rows = []
        for slave in self.collection.get_all_slaves():
            row = self.collection.describe(slave)
            row["master"] = self.name
            row["facts"] = slave_facts(slave)
            rows.append(row)
        return rows

    def publish(self) -> bool:
        """Write what changed of this master's slaves; False once the store is closed."""
        try:
            self.store.publish_slaves(self.local_rows())
        except StoreError as e:
            if getattr(self.store, "closed", False):
                return False
            if str(e) != self._last_error:  # once per kind of failure, not every REFRESH
                log.warning("the slaves of master %s are not shared: %s", self.name, e)
            self._last_error = str(e)
            return True
        if self._last_error:
            log.info("the slaves of master %s are shared again", self.name)
            self._last_error = ""
        return True

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.publish():
                    return
                if self._wake.wait(self.refresh):
                    self._stop.wait(self.coalesce)  # gather the rest of a burst
                self._wake.clear()
        except Exception:  # noqa: BLE001 - logged; ls goes on with this master's slaves only
            log.exception("master %s: the registry of slaves stopped", self.name)
        finally:
            self.stop()

    def others(self) -> List[Dict[str, Any]]:
        """The other live masters' slaves (none while the store cannot be read)."""
        try:
            return self.store.cluster_slaves()
        except StoreError as e:
            log.warning("ls shows only the slaves of master %s: %s", self.name, e)
            return []


def share_slaves(collection: FleetCollection, store: JobStore) -> JobStore:
    """Start the registry of ``collection``'s slaves on the shared ``store``
    (named by its ``name``); ``store``, for chaining."""
    SlaveRegistry(collection, store, str(getattr(store, "name", "") or "")).start()
    return store


def cluster_rows(collection: FleetCollection, patterns: Sequence[str],
                 wheres: Sequence[Tuple[str, str]]) -> Optional[List[Dict[str, Any]]]:
    """The rows ``ls`` shows on a master that shares its slaves, sorted by
    name, chosen by ``patterns`` and ``wheres`` as
    :func:`remsh.choice.matching` chooses; ``None`` when ``collection``
    has no registry (one master: ``ls`` lists its own slaves).

    :raises UsageError: an unknown group, or a fact no slave has
    """
    with _lock:
        registry = _registries.get(collection)
    if registry is None:
        return None
    candidates = [(row, True) for row in registry.local_rows()] + [(row, False) for row in registry.others()]
    globs = expand_any(getattr(collection, "groups", None), patterns)
    if patterns and not globs:
        globs = ["\0"]  # an empty group chooses nothing, never everything
    best: Dict[str, Tuple[Tuple[bool, bool, str], Dict[str, Any]]] = {}
    known: Set[str] = set()
    for row, local in candidates:
        facts = row.pop("facts", None)
        facts = {str(k): str(v) for k, v in facts.items()} if isinstance(facts, dict) else {}
        facts.setdefault("name", str(row.get("name")))
        known.update(facts)
        name = facts["name"]
        if globs and not any(fnmatch.fnmatchcase(name, g) for g in globs):
            continue
        if any(k not in facts or not fnmatch.fnmatchcase(facts[k], g) for k, g in wheres):
            continue
        rank = (row.get("state") == "away", not local, str(row.get("master")))
        if name not in best or rank < best[name][0]:
            best[name] = (rank, row)
    unknown = [k for k, _ in wheres if k not in known]
    if unknown and known:
        raise UsageError(f"no connected slave has the fact {unknown[0]!r}; "
                         f"the facts are: {', '.join(sorted(known))}")
    return [best[name][1] for name in sorted(best)]


__all__ = ["SlaveRegistry", "share_slaves", "cluster_rows", "REFRESH", "COALESCE"]
