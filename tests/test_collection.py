"""SimpleSlaveCollection with real local slaves: lookup, blocking, ordering,
and slaves leaving or being replaced."""

from __future__ import annotations

import functools
import os
import threading
import time

import pytest

from remsh.errors import Disconnected, UsageError, WaitTimeout
from remsh.master.slavecollection.simple import SimpleSlaveCollection

from tests.util import WAIT, run_in_thread, wait_pid_exit

pytestmark = pytest.mark.timeout(60)


def by_name(a, b) -> int:
    return (a.name > b.name) - (a.name < b.name)


def names(slaves) -> set:
    return {s.name for s in slaves}


def test_empty_collection_nonblocking() -> None:
    """get_slave(block=False) on an empty collection returns None at once."""
    coll = SimpleSlaveCollection()
    assert coll.get_slave(False) is None
    assert coll.get_slave(False, lambda s: True) is None
    assert coll.get_all_slaves() == []
    assert len(coll) == 0


def test_nonblocking_without_a_match(listener, collection, basedir) -> None:
    """get_slave(block=False) returns None when no slave matches the filter."""
    listener.start_slave(str(basedir), name="one")
    assert collection.get_slave(False, lambda s: s.name == "two") is None
    assert collection.get_slave(False, lambda s: s.name == "one").name == "one"


def test_blocking_get_slave_times_out() -> None:
    """get_slave(True, ..., timeout) returns None after about the timeout."""
    coll = SimpleSlaveCollection()
    start = time.monotonic()
    assert coll.get_slave(True, None, timeout=0.3) is None
    assert 0.25 <= time.monotonic() - start < 5


def test_blocking_get_slave_waits_for_a_match(listener, collection, basedir) -> None:
    """A blocked get_slave returns the matching slave added later from another thread."""
    entered = threading.Event()

    def wait_for_wanted():
        entered.set()
        return collection.get_slave(True, lambda s: s.name == "wanted", timeout=WAIT)

    waiter = run_in_thread(wait_for_wanted)
    assert entered.wait(WAIT)
    listener.start_slave(str(basedir), name="other")
    assert not waiter.done.is_set(), f"get_slave returned before a match: {waiter.result!r}"
    wanted = listener.start_slave(str(basedir), name="wanted")
    waiter.wait(WAIT)
    assert waiter.error is None, waiter.error
    assert waiter.result is wanted


def test_cmp_orders_matches(listener, collection, basedir) -> None:
    """Several matches are sorted with cmp and the first is returned."""
    for name in ("b", "a", "c"):
        listener.start_slave(str(basedir), name=name)
    assert collection.get_slave(False, None, by_name).name == "a"
    assert collection.get_slave(False, None, lambda x, y: -by_name(x, y)).name == "c"
    assert collection.get_slave(False, lambda s: s.name != "a", by_name).name == "b"
    assert collection.get_slave(True, lambda s: s.name != "a", cmp=by_name, timeout=1).name == "b"
    key = functools.cmp_to_key(by_name)
    assert [s.name for s in sorted(collection.get_all_slaves(), key=key)] == ["a", "b", "c"]


def test_without_cmp_matches_are_shuffled(listener, collection, basedir) -> None:
    """Without cmp, repeated lookups do not always return the same slave."""
    for name in ("a", "b", "c"):
        listener.start_slave(str(basedir), name=name)
    picked = {collection.get_slave(False).name for _ in range(60)}
    assert len(picked) > 1


def test_get_all_slaves(listener, collection, basedir) -> None:
    """get_all_slaves lists every connected slave, and no longer a killed one."""
    slaves = [listener.start_slave(str(basedir), name=f"s{i}") for i in range(3)]
    assert names(collection.get_all_slaves()) == {"s0", "s1", "s2"}
    assert len(collection) == 3
    listener.kill_slave(slaves[1])
    assert names(collection.get_all_slaves()) == {"s0", "s2"}
    assert collection.get_slave(False, lambda s: s.name == "s1") is None


def test_dead_idle_slave_leaves_by_itself(listener, collection, basedir) -> None:
    """An idle slave whose process dies leaves the collection without any call on it."""
    slave = listener.start_slave(str(basedir), name="doomed")
    keep = listener.start_slave(str(basedir), name="keep")
    out = []
    slave.execute(["sh", "-c", "echo $PPID"], stdout_cb=out.append)
    pid = int(b"".join(out))
    gone = threading.Event()
    slave.on_disconnect(lambda s: gone.set())
    pidfd = os.pidfd_open(pid)
    try:
        os.kill(pid, 9)
        assert wait_pid_exit(pidfd)
    finally:
        os.close(pidfd)
    assert gone.wait(WAIT), "the dead slave was not noticed"
    assert collection.get_all_slaves() == [keep]
    assert collection.get_slave(False, lambda s: s.name == "doomed") is None
    with pytest.raises(Disconnected):
        slave.ping()
    keep.ping()


def test_blocked_waiter_ignores_departed_slave(listener, collection, basedir) -> None:
    """A slave that left is never handed out, even to a waiter that matches it."""
    slave = listener.start_slave(str(basedir), name="x")
    slave.close()
    assert collection.get_slave(True, lambda s: s.name == "x", timeout=0.2) is None


def test_reregistering_replaces_and_closes_the_old(listener, collection, basedir) -> None:
    """A second slave with the same name replaces the first, whose pending call raises Disconnected."""
    old = listener.start_slave(str(basedir), name="dup")
    started = threading.Event()
    running = run_in_thread(lambda: old.execute(["sh", "-c", "echo go; exec sleep 60"],
                                                stdout_cb=lambda d: started.set()))
    assert started.wait(WAIT)
    new = listener.start_slave(str(basedir), name="dup")
    running.wait(WAIT)
    assert isinstance(running.error, Disconnected), running.error
    assert not old.connected and new.connected
    assert collection.get_all_slaves() == [new]
    assert collection.get_slave(False, lambda s: s.name == "dup") is new
    with pytest.raises(Disconnected):
        old.ping()
    new.ping()
    # the old one's departure must not take the new one out with it
    assert collection.get_all_slaves() == [new]


def test_wait_for_slaves(listener, collection, basedir) -> None:
    """wait_for_slaves returns once enough slaves are there, and raises WaitTimeout (not UsageError) on timeout."""
    listener.start_slave(str(basedir), name="a")
    with pytest.raises(WaitTimeout) as info:
        collection.wait_for_slaves(count=2, timeout=0.2)
    assert not isinstance(info.value, UsageError)
    with pytest.raises(WaitTimeout):
        collection.wait_for_slaves(names=["a", "b"], timeout=0.2)
    waiter = run_in_thread(lambda: collection.wait_for_slaves(names=["a", "b"], timeout=WAIT))
    listener.start_slave(str(basedir), name="b")
    waiter.wait(WAIT)
    assert waiter.error is None and [s.name for s in waiter.result] == ["a", "b"]
    assert len(collection.wait_for_slaves(count=2, timeout=1)) == 2
