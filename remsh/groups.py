"""Named groups of slaves: ``remsh master --groups FILE`` and ``-t @NAME``.

The file is TOML (read with :mod:`tomllib`, Python 3.11 and later), one
table ``[groups]`` whose keys are group names and whose values are lists
of name globs, or of other groups as ``@NAME``::

    [groups]
    web = ["web-*", "edge-1"]
    db = ["db-[0-9]*"]
    frontline = ["@web", "proxy-1"]

``-t @web`` then chooses the slaves that any of the group's globs match,
and mixes with plain globs (``-t @web -t 'db-1'``).  An unknown group is a
usage error (exit 2) naming the groups there are.  The master reads the
file again on SIGHUP; a file that has become bad then keeps the groups it
had, and the master logs why.

Rejected: groups of the slave's own choosing (a fact the slave announces).
Which machines a command reaches is the operator's decision, kept on the
master's side; ``--where`` already matches what slaves say.
"""

from __future__ import annotations

import logging
import os
import re
import select
import threading
from typing import Any, Dict, List, Optional, Sequence

from remsh.errors import UsageError

log = logging.getLogger(__name__)

#: Largest groups file read.
MAX_GROUPS_FILE = 1 << 20
#: What a group name may be.
GROUP_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\Z")
#: Deepest chain of groups naming groups.
MAX_NESTING = 16


class GroupsError(UsageError):
    """The groups file cannot be read or is not a groups file, or a
    ``-t @NAME`` names no group (one line, exit 2)."""


def parse_groups(text: str, source: str) -> Dict[str, List[str]]:
    """The groups of a groups file's ``text`` (``source`` names it in errors).

    :raises GroupsError: not TOML, no ``[groups]`` table, a bad name or
        member, or a group naming a group that is not there
    """
    try:
        import tomllib
    except ImportError:  # pragma: no cover - Python before 3.11
        raise GroupsError(f"{source}: --groups needs Python 3.11 or later (tomllib)") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise GroupsError(f"{source}: not TOML: {e}") from None
    table = data.get("groups")
    if not isinstance(table, dict):
        raise GroupsError(f"{source}: no [groups] table (expected e.g. web = [\"web-*\", \"edge-1\"])")
    groups: Dict[str, List[str]] = {}
    for name, members in table.items():
        if not GROUP_NAME.match(name):
            raise GroupsError(f"{source}: bad group name {name!r} (letters, digits, _ . -)")
        if not isinstance(members, list) or not all(isinstance(m, str) and m for m in members):
            raise GroupsError(f"{source}: group {name!r} must be a list of name globs, e.g. [\"web-*\"]")
        groups[name] = list(members)
    for name, members in groups.items():
        for member in members:
            if member.startswith("@") and member[1:] not in groups:
                raise GroupsError(f"{source}: group {name!r} names {member!r}, which is not a group")
    return groups


def load_groups(path: str) -> Dict[str, List[str]]:
    """The groups of the file ``path``.  :raises GroupsError: see :func:`parse_groups`"""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_GROUPS_FILE + 1)
    except OSError as e:
        raise GroupsError(f"cannot read the groups file {path}: {e.strerror or e}") from None
    if len(data) > MAX_GROUPS_FILE:
        raise GroupsError(f"{path}: a groups file is at most {MAX_GROUPS_FILE} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise GroupsError(f"{path}: not UTF-8") from None
    return parse_groups(text, path)


class Groups:
    """The groups of a master, read from ``path`` (none without a path);
    thread-safe, reread by :meth:`reload`."""

    def __init__(self, path: Optional[str] = None) -> None:
        """:raises GroupsError: the file is bad (the master does not start)"""
        self.path = path
        self._lock = threading.Lock()
        self._groups: Dict[str, List[str]] = load_groups(path) if path else {}

    def names(self) -> List[str]:
        with self._lock:
            return sorted(self._groups)

    def reload(self) -> bool:
        """Read the file again (SIGHUP).  A bad file keeps the groups there
        were; either way one line is logged.  True when the new groups are in."""
        if not self.path:
            log.info("SIGHUP: no --groups file to read")
            return False
        try:
            groups = load_groups(self.path)
        except GroupsError as e:
            log.error("groups not reloaded, the old ones stay: %s", e)
            return False
        with self._lock:
            self._groups = groups
        log.info("groups reloaded from %s: %s", self.path, ", ".join(sorted(groups)) or "none")
        return True

    def expand(self, patterns: Sequence[str]) -> List[str]:
        """``patterns`` with each ``@NAME`` replaced by its group's globs.

        :raises GroupsError: an ``@NAME`` that is no group
        """
        with self._lock:
            groups = dict(self._groups)
        return expand(patterns, groups, self.path)


def expand(patterns: Sequence[str], groups: Dict[str, List[str]], path: Optional[str] = None,
           depth: int = 0) -> List[str]:
    """See :meth:`Groups.expand`."""
    out: List[str] = []
    for pattern in patterns:
        if not pattern.startswith("@"):
            out.append(pattern)
            continue
        name = pattern[1:]
        if name not in groups:
            if path is None:
                raise GroupsError(f"unknown group {pattern}: the master has no groups (remsh master --groups FILE)")
            known = ", ".join("@" + g for g in sorted(groups)) or "none"
            raise GroupsError(f"unknown group {pattern} (the groups of {path}: {known})")
        if depth >= MAX_NESTING:
            raise GroupsError(f"group {pattern}: groups nest deeper than {MAX_NESTING} (a loop?)")
        out.extend(expand(groups[name], groups, path, depth + 1))
    return out


def expand_any(groups: Any, patterns: Sequence[str]) -> List[str]:
    """``patterns`` expanded by ``groups`` (a :class:`Groups`, or ``None``:
    no groups, so that any ``@NAME`` is unknown)."""
    if isinstance(groups, Groups):
        return groups.expand(patterns)
    return expand(patterns, {})


#: How long the master's main wait sleeps at most: a signal the kernel gives
#: to another of its threads interrupts nothing, and its Python handler
#: runs only when the main thread wakes.
MAIN_WAIT = 0.25


def serve_until_stopped(wake: int, groups: Groups) -> None:
    """The master's main wait, on the read end ``wake`` of its signal
    pipe: ``h`` (SIGHUP) rereads ``groups``; any other byte (SIGTERM,
    SIGINT), or the pipe's end, returns."""
    while True:
        if not select.select([wake], [], [], MAIN_WAIT)[0]:
            continue
        data = os.read(wake, 64)
        if not data or data.strip(b"h"):
            return
        groups.reload()
