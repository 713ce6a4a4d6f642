"""The registry of slaves shared through the PostgreSQL job store
(:mod:`remsh.slaveregistry`): ``remsh ls`` on any master lists every slave
of the cluster with the master holding it.  Two real ``remsh master``
processes on one real PostgreSQL server, a real slave on each (the
fixtures of tests/test_store_postgres_masters.py); the store's calls on
both stores."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from remsh.store.fencing import FencedOff
from remsh.store.postgres import LEASE, PostgresJobStore
from remsh.store.sqlite import SqliteJobStore
from tests.pgserver import pg_server, pg_uri  # noqa: F401 - fixtures
from tests.slaveproc import SECRET, SlaveProcesses
from tests.test_fleet import Master, ls, remsh, stop_all
from tests.test_store_postgres_masters import store_uri  # noqa: F401 - fixture
from tests.util import wait_until

pytestmark = pytest.mark.timeout(180)

#: How soon a slave's change on one master shows on the other: the
#: registry's look every 2 s, its write, and slack for a loaded machine.
SHOWN_WITHIN = 10.0


def _held(sock: Path) -> Dict[str, List[str]]:
    """``ls --json`` on ``sock`` as slave name -> [master, state]."""
    return {row["name"]: [row.get("master"), row["state"]] for row in ls(sock)}


@pytest.fixture
def cluster(tmp_path: Path, store_uri: str) -> Iterator[Dict[str, object]]:  # noqa: F811 - fixture
    """Masters ``a`` and ``b`` on one store, slave ``s-a`` on a, ``s-b`` on b; the slaves' handle too."""
    slaves = SlaveProcesses(tmp_path / "slaves")
    secret = slaves.secret_file(SECRET)
    masters: List[Master] = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            masters.append(Master(tmp_path / name, tmp_path / name / "m.sock", secret_file=secret,
                                  extra=["--store", store_uri, "--name", name]).wait_ready())
        for master, slave in zip(masters, ("s-a", "s-b")):
            slaves.start(master.port, slave, max_backoff=0.5)
        yield {"a": masters[0], "b": masters[1], "slaves": slaves}
    finally:
        stop_all(masters)
        slaves.close()


def test_ls_on_either_master_lists_every_slave_with_its_master(cluster) -> None:
    """ls --json on each of two masters lists both slaves, each with the master holding it; the table has a master column."""
    a, b = cluster["a"], cluster["b"]
    want = {"s-a": ["a", "idle"], "s-b": ["b", "idle"]}
    for master in (a, b):
        wait_until(lambda: _held(master.sock) == want, SHOWN_WITHIN, f"both slaves on {master.sock}")
    table = remsh(a.sock, "ls").stdout.decode().splitlines()
    assert table[0].split()[-1] == "master", table
    assert [line.split()[0] + " " + line.split()[-1] for line in table[1:]] == ["s-a a", "s-b b"], table
    chosen = json.loads(remsh(a.sock, "ls", "--json", "-t", "s-b").stdout)
    assert [(r["name"], r["master"]) for r in chosen] == [("s-b", "b")]


def test_a_slave_away_on_one_master_shows_away_on_the_other(cluster) -> None:
    """The slave of master b killed: ls on master a shows it away, held by b, within a bound."""
    a = cluster["a"]
    wait_until(lambda: _held(a.sock).get("s-b") == ["b", "idle"], SHOWN_WITHIN, "s-b on a")
    down = next(p for p in cluster["slaves"].procs if p.name == "s-b")
    down.signal(signal.SIGKILL)
    down.wait()
    wait_until(lambda: _held(a.sock).get("s-b") == ["b", "away"], SHOWN_WITHIN, "s-b away on a")
    assert _held(a.sock)["s-a"] == ["a", "idle"]


def test_a_killed_masters_slaves_are_not_shown_held_by_it_after_its_lease(cluster) -> None:
    """Master b SIGKILLed: ls on a still shows s-b held by b within the lease, and not at all once it passed."""
    a, b = cluster["a"], cluster["b"]
    wait_until(lambda: _held(a.sock).get("s-b") == ["b", "idle"], SHOWN_WITHIN, "s-b on a")
    b.stop(signal.SIGKILL)
    killed = time.monotonic()
    assert _held(a.sock).get("s-b", [None])[0] == "b"  # its heartbeat is fresh: not yet known dead
    wait_until(lambda: "s-b" not in _held(a.sock), LEASE + SHOWN_WITHIN, "s-b gone from a")
    assert time.monotonic() - killed >= LEASE - 4.0  # ignored for its lease, not for its death being seen
    assert _held(a.sock) == {"s-a": ["a", "idle"]}


def test_a_master_stopped_cleanly_takes_its_slaves_out_at_once(cluster) -> None:
    """Master b stopped with SIGTERM: its slave leaves ls on a at once (its rows go with its stop)."""
    a, b = cluster["a"], cluster["b"]
    wait_until(lambda: _held(a.sock).get("s-b") == ["b", "idle"], SHOWN_WITHIN, "s-b on a")
    assert b.stop() == 0
    assert _held(a.sock) == {"s-a": ["a", "idle"]}


# -- the store's calls ---------------------------------------------------------------------


def _changes(uri: str) -> int:
    """The store's change counter (every write moves it), read straight from the database."""
    import psycopg

    with psycopg.connect(uri, autocommit=True) as db:
        row = db.execute("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM remsh_changes").fetchone()
    assert row is not None
    return int(row[0])


def test_the_postgres_store_shares_only_what_changed_and_only_live_masters(pg_uri) -> None:  # noqa: F811
    """publish_slaves writes a master's slaves (changes only), cluster_slaves shows the other live masters' with master."""
    x = PostgresJobStore(pg_uri, "x", heartbeat=3600.0)  # never beats again: dead past y's lease
    y = PostgresJobStore(pg_uri, "y", lease=3.0)
    try:
        x.publish_slaves([{"name": "s1", "state": "idle"}, {"name": "s2", "state": "busy"}])
        assert y.cluster_slaves() == [{"name": "s1", "state": "idle", "master": "x"},
                                      {"name": "s2", "state": "busy", "master": "x"}]
        assert x.cluster_slaves() == []  # its own are not "others"
        x.publish_slaves([{"name": "s2", "state": "away"}])
        assert y.cluster_slaves() == [{"name": "s2", "state": "away", "master": "x"}]
        before = _changes(pg_uri)
        x.publish_slaves([{"name": "s2", "state": "away"}])  # nothing changed: nothing written
        assert _changes(pg_uri) == before
        wait_until(lambda: y.cluster_slaves() == [], 10.0, "x's slaves ignored past the lease")
        assert y.adopt_master("x", x.epoch) == []
        with pytest.raises(FencedOff):
            x.publish_slaves([{"name": "s3", "state": "idle"}])
    finally:
        x.close()
        y.close()


def test_the_sqlite_store_shares_nothing(tmp_path: Path) -> None:
    """On SQLite (one master) publish_slaves keeps nothing and cluster_slaves lists no other master's slave."""
    store = SqliteJobStore(str(tmp_path / "jobs.sqlite"))
    try:
        store.publish_slaves([{"name": "s1", "state": "idle"}])
        assert store.cluster_slaves() == []
    finally:
        store.close()
