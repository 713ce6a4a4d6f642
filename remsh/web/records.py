"""What the dashboard shows, made by the functions the command line uses:
a slave is the row of ``remsh ls --json`` (the master's ``ls`` answer,
:func:`remsh.choice.ls_events`, read back by :func:`remsh.choice.ls_row`),
a job the record of ``remsh jobs --json``
(:meth:`remsh.store.base.JobRecord.to_json`).  Nothing here encodes a
record a second way.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from remsh.choice import ls_events, ls_row
from remsh.controlproto import EVENTS, decode_event
from remsh.fleet import FleetCollection
from remsh.slaveregistry import cluster_rows
from remsh.store.base import JobStore

#: The fields of a slave (those of ``remsh ls --json``).
SLAVE_FIELDS = tuple(key.name for key in EVENTS["slave"])
#: Most jobs the jobs' page shows (the newest).
JOBS_SHOWN = 200


def slave_rows(fleet: FleetCollection) -> List[Dict[str, Optional[Any]]]:
    """Every slave as ``remsh ls --json`` gives it, sorted by name."""
    rows = []
    for box in ls_events(fleet, {}):
        event = decode_event(box)
        if event.kind == "slave":
            rows.append(ls_row(event.values, SLAVE_FIELDS))
    return rows


def fleet_rows(fleet: FleetCollection) -> Dict[str, Dict[str, Optional[Any]]]:
    """The fleet page's rows by name: :func:`slave_rows` without the
    control protocol's round trip (the same :meth:`describe
    <remsh.fleet.FleetCollection.describe>` rows, read by the same
    :func:`~remsh.choice.ls_row`; three times faster with 10,000 slaves).

    On a master that shares its slaves through a PostgreSQL store, every
    slave of the cluster, each with ``master`` (the rows of ``ls``,
    :func:`remsh.slaveregistry.cluster_rows`: one read of the store)."""
    shared = cluster_rows(fleet, (), ())
    if shared is not None:
        rows = (ls_row(row, SLAVE_FIELDS) for row in shared)
    else:
        rows = (ls_row(fleet.describe(s), SLAVE_FIELDS) for s in fleet.get_all_slaves())
    return {str(row["name"]): row for row in rows}


def fleet_signature(fleet: FleetCollection, store: JobStore) -> object:
    """Something that changes whenever a fleet row may have: a slave came,
    went, went away or came back (the collection), or a job started or
    ended on one (the store).  Cheap (no row is made), so the fleet's
    watch makes its rows again only when it changed.

    Another master's slaves are covered by the store's version too: on a
    shared PostgreSQL store every write, another master's
    :meth:`~remsh.store.base.JobStore.publish_slaves` included, ends with
    a ``NOTIFY`` that moves this master's version (a poll is the safety
    net), and a master whose heartbeat passed its lease drops out at the
    watch's refresh (every 2 s)."""
    return store.version(), [(id(s), s.connected) for s in fleet.get_all_slaves()]


def job_rows(store: JobStore, limit: int = JOBS_SHOWN) -> Dict[str, Dict[str, object]]:
    """The newest jobs' records, by id."""
    return {r.id: r.to_json() for r in store.list_jobs(limit=limit)}
