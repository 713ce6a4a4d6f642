"""The registry of slaves in the PostgreSQL job store: each master's slaves
(``remsh_slaves``, one row per master and slave: the slave's ``remsh ls``
row as JSON), so that ``remsh ls`` on any master lists every slave of the
cluster with the master holding it (:mod:`remsh.slaveregistry`).

A master writes only its own rows, in a transaction fenced by its epoch
(:meth:`remsh.store.postgres.PostgresJobStore.publish_slaves`), and only
what changed since its last write (:class:`Published`): a row is written
when the slave connects, goes away, comes back, changes state, or leaves
(deleted), never per box or per job.  Readers ignore the rows of a master
that stopped or whose heartbeat is past the lease: a dead master's slaves
are not shown as connected to it.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from remsh.store.pglink import Conn

_DB_NOW = "extract(epoch from clock_timestamp())::double precision"


class Published:
    """What this master last wrote of its slaves (name -> JSON row), so that
    the next write carries only the differences.  Unknown (``None``) after
    opening and after a failed write: the next write replaces them all."""

    def __init__(self) -> None:
        self.rows: Optional[Dict[str, str]] = None

    def changes(self, rows: Sequence[Mapping[str, object]]) -> Tuple[Dict[str, str], List[Tuple[str, str]],
                                                                      List[str], bool]:
        """``(new state, rows to upsert, names to delete, replace all)``
        that bring the store from :attr:`rows` to ``rows``."""
        new = {str(row["name"]): json.dumps(row, sort_keys=True, default=str) for row in rows}
        if self.rows is None:
            return new, sorted(new.items()), [], True
        upserts = sorted((name, text) for name, text in new.items() if self.rows.get(name) != text)
        gone = sorted(name for name in self.rows if name not in new)
        return new, upserts, gone, False


def write(db: Conn, master: str, upserts: Sequence[Tuple[str, str]], gone: Sequence[str], replace: bool) -> None:
    """Bring ``master``'s rows up to date in the transaction of ``db``."""
    if replace:
        db.execute("DELETE FROM remsh_slaves WHERE master = %s", (master,))
    elif gone:
        db.execute("DELETE FROM remsh_slaves WHERE master = %s AND name = ANY(%s)", (master, list(gone)))
    if upserts:
        with db.cursor() as cur:
            cur.executemany(f"INSERT INTO remsh_slaves (master, name, row, updated) VALUES (%s, %s, %s, {_DB_NOW}) "
                            f"ON CONFLICT (master, name) DO UPDATE SET row = excluded.row, updated = excluded.updated",
                            [(master, name, text) for name, text in upserts])


def forget(db: Conn, master: str) -> None:
    """Remove ``master``'s rows (it stops, starts again, or was adopted)."""
    db.execute("DELETE FROM remsh_slaves WHERE master = %s", (master,))


def others(db: Conn, master: str, lease: float) -> List[Dict[str, Any]]:
    """The rows of the slaves of every live master but ``master`` (not
    stopped, heartbeat within ``lease``), each with ``master`` set, by
    name then master."""
    rows = db.execute(f"SELECT s.master, s.row FROM remsh_slaves s JOIN remsh_masters m ON m.name = s.master "
                      f"WHERE s.master <> %s AND NOT m.stopped AND {_DB_NOW} - m.heartbeat < %s "
                      f"ORDER BY s.name, s.master", (master, lease)).fetchall()
    out = []
    for holder, text in rows:
        row = json.loads(text)
        if isinstance(row, dict):
            row["master"] = str(holder)
            out.append(row)
    return out


__all__ = ["Published", "write", "forget", "others"]
