"""Which slaves a command reaches, and how its job is paced: the master's
side of ``-t``/``--where``/``@GROUP``, ``--batch``, ``--max-fail``,
``put --force``/``--parents``, ``get --force`` and ``remsh ls -t/--where``.

:func:`choose` is :func:`remsh.fleet.filter_slaves` with two additions:
``-t @NAME`` names a group (:mod:`remsh.groups`), and chosen slaves that
are *away* (in the collection, their connection dropped, their session
waiting) are returned apart, so that the job reports them skipped instead
of leaving them out silently.

On a store several masters share, :func:`choose_cluster` chooses over the
whole cluster (the registry of slaves, :mod:`remsh.slaveregistry`): the
slaves connected to another live master come back apart, by the name of
the master holding them, for :mod:`remsh.crossmaster` to reach.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from remsh.controlproto import EVENTS, encode_event, slave_event
from remsh.errors import UsageError
from remsh.fleet import FleetCollection, filter_slaves, parse_where
from remsh.groups import expand_any
from remsh.master.slave import Slave
from remsh.pacing import Pacing
from remsh.slaveregistry import cluster_rows


def matching(slaves: Sequence[Slave], patterns: Sequence[str], wheres: Sequence[Tuple[str, str]],
             groups: Any = None) -> List[Slave]:
    """The slaves (connected or away) that ``patterns`` (globs and
    ``@GROUP``; none: all) and every ``(key, glob)`` of ``wheres`` match,
    sorted by name.

    :raises UsageError: an unknown ``@GROUP``, or a fact key no slave has
    """
    globs = expand_any(groups, patterns)
    if patterns and not globs:
        globs = ["\0"]  # an empty group chooses nothing, never everything
    return sorted(filter_slaves(slaves, globs, wheres, connected_only=False), key=lambda s: s.name)


def choose(slaves: Sequence[Slave], patterns: Sequence[str], wheres: Sequence[Tuple[str, str]],
           groups: Any = None) -> Tuple[List[Slave], List[str]]:
    """The connected slaves chosen, and the names of those chosen but away.

    :raises UsageError: as :func:`matching`, or nothing matches (naming the choice)
    """
    found = matching(slaves, patterns, wheres, groups)
    connected = [s for s in found if s.connected]
    away = [s.name for s in found if not s.connected]
    if not found:
        what = []
        if patterns:
            what.append("-t " + " -t ".join(patterns))
        if wheres:
            what.append(" ".join(f"--where {k}={g}" for k, g in wheres))
        raise UsageError(f"no connected slave matches {' '.join(what)}" if what else "no slaves connected")
    return connected, away


def choose_cluster(collection: FleetCollection, patterns: Sequence[str], wheres: Sequence[Tuple[str, str]]
                   ) -> Tuple[List[Slave], List[str], Dict[str, str]]:
    """:func:`choose` over every master's slaves: this master's connected
    slaves chosen, the names of those chosen but away (here, or on the
    master that lists them), and the slaves connected to another live
    master (name -> that master).  Without shared slaves (one master, or
    the store cannot be read: logged) it is :func:`choose` on this master's.

    :raises UsageError: as :func:`choose`
    """
    groups = getattr(collection, "groups", None)
    shared = cluster_rows(collection, patterns, wheres)
    if shared is None:
        return (*choose(collection.get_all_slaves(), patterns, wheres, groups), {})
    mine = {s.name: s for s in collection.get_all_slaves()}
    local: List[Slave] = []
    away: List[str] = []
    remote: Dict[str, str] = {}
    for row in shared:
        name = str(row.get("name"))
        slave = mine.get(name)
        if slave is not None and slave.connected:
            local.append(slave)
        elif row.get("state") != "away" and row.get("master"):  # its part waits for the master holding it
            remote[name] = str(row["master"])
        else:
            away.append(name)
    if not shared:
        choose([], patterns, wheres, groups)  # raises, naming the choice
    return local, away, remote


def job_options(kind: str, values: Dict[str, Any], away: Sequence[str]) -> Dict[str, Any]:
    """The keyword arguments of :func:`~remsh.fleet.run_job`,
    :func:`~remsh.fleet.put_job` or :func:`~remsh.fleet.get_job` that a
    request's pacing and replacing keys ask for.

    :raises UsageError: a bad ``batch`` or ``max_fail``
    """
    options: Dict[str, Any] = {"pacing": Pacing(values.get("batch") or None, values.get("max_fail"), away)}
    if kind == "put":
        options.update(force=bool(values.get("force")), parents=bool(values.get("parents")))
        if options["force"] and values.get("sync"):
            raise UsageError("put: --force replaces, --sync updates in place: not both")
    elif kind == "get":
        options["force"] = bool(values.get("force"))
    return options


def job_spec(values: Dict[str, Any]) -> Dict[str, object]:
    """What a job's record keeps of its pacing (only what was asked)."""
    return {k: values[k] for k in ("batch", "max_fail", "force", "parents") if values.get(k)}


def ls_events(collection: FleetCollection, values: Dict[str, Any]) -> List[Dict[bytes, bytes]]:
    """``ls``'s answer: a ``slave`` event for each slave ``targets`` and
    ``where`` choose (all without them; away ones too), then ``done``.

    :raises UsageError: an unknown group, a bad ``--where``, a fact no slave has
    """
    wheres = [parse_where(w) for w in values.get("where") or []]
    shared = cluster_rows(collection, values.get("targets") or [], wheres)  # several masters: all their slaves
    if shared is not None:
        fields = {key.name for key in EVENTS["slave"]}
        return [slave_event({k: v for k, v in row.items() if k in fields}) for row in shared] + [encode_event("done")]
    chosen = matching(collection.get_all_slaves(), values.get("targets") or [], wheres,
                      getattr(collection, "groups", None))
    return [slave_event(collection.describe(s)) for s in chosen] + [encode_event("done")]


def ls_row(values: Dict[str, Any], fields: Sequence[str]) -> Dict[str, Optional[Any]]:
    """A ``slave`` event's values as ``remsh ls --json`` prints them
    (``since``, ``root`` and ``job`` ``None`` when empty; no ``master``
    unless the master shares its store, :mod:`remsh.slaveregistry`)."""
    row: Dict[str, Optional[Any]] = {f: values.get(f) for f in fields}
    if not row.get("master"):
        row.pop("master", None)
    for key in ("since", "root", "job"):
        if key in row and not row[key]:
            row[key] = None
    return row
