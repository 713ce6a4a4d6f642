"""One thread for many deadlines (remsh.deadlines), and a listener whose
away sessions wait on it rather than on a timer thread each."""

from __future__ import annotations

import socket
import threading
import time
from typing import List

from remsh.deadlines import Deadlines, call_later
from remsh.handshake import slave_handshake
from remsh.master.slavelistener.tcp import TcpSlaveListener
from remsh.transports.base import SocketStream
from remsh.wire import Wire
from tests.slaveproc import HOST, SECRET
from tests.util import WAIT, wait_until


def test_deadlines_fire_in_order_and_cancelled_ones_do_not() -> None:
    """Callbacks run at their time in time order on one thread; a cancelled one never runs; the thread ends when none is left."""
    d = Deadlines()
    fired: List[str] = []
    threads = set()
    done = threading.Event()

    def note(name: str) -> None:
        fired.append(name)
        threads.add(threading.get_ident())
        if name == "last":
            done.set()

    d.call_later(0.2, lambda: note("b"))
    d.call_later(0.1, lambda: note("a"))
    d.call_later(0.15, lambda: note("never")).cancel()
    d.call_later(0.3, lambda: note("last"))
    assert done.wait(WAIT)
    assert fired == ["a", "b", "last"] and len(threads) == 1
    wait_until(lambda: d.pending() == 0 and not any(t.name == d.name for t in threading.enumerate()),
               WAIT, "the deadlines thread to end")


def test_a_failing_callback_does_not_stop_the_others() -> None:
    """An exception in one callback is logged; the next deadline still fires."""
    d = Deadlines()
    ok = threading.Event()
    d.call_later(0.01, lambda: 1 / 0)
    d.call_later(0.05, ok.set)
    assert ok.wait(WAIT)


def test_stop_drops_pending_deadlines_and_a_later_one_still_fires() -> None:
    """stop() cancels what is pending; a deadline given afterwards starts the thread again."""
    d = Deadlines()
    fired = threading.Event()
    d.call_later(0.2, fired.set)
    d.stop()
    time.sleep(0.3)  # past the dropped deadline: it must not have fired
    assert not fired.is_set()
    again = threading.Event()
    d.call_later(0.01, again.set)
    assert again.wait(WAIT)


def test_call_later_without_deadlines_uses_a_timer() -> None:
    """call_later(None, ...) still calls back (on a timer thread of its own) and can be cancelled."""
    fired = threading.Event()
    call_later(None, 0.01, fired.set)
    assert fired.wait(WAIT)
    never = threading.Event()
    call_later(None, 0.2, never.set).cancel()
    time.sleep(0.3)
    assert not never.is_set()


def test_many_away_sessions_cost_no_thread_each() -> None:
    """200 resumable slaves registered and dropped: the listener waits for all of them on one deadlines thread, not a timer thread each."""
    listener = TcpSlaveListener(port=0, host=HOST, secret=SECRET, resume_timeout=300)
    listener.start()
    try:
        before = threading.active_count()
        wires = []
        for i in range(200):
            sock = socket.create_connection((HOST, listener.port), timeout=WAIT)
            wire = Wire(SocketStream(sock), label="fake")
            slave_handshake(wire, f"away-{i}", secret=SECRET, basedir="/nonexistent", timeout=WAIT,
                            extra_info={"resumable": "y"})
            wires.append(wire)
        wait_until(lambda: len(listener.slave_collection.get_all_slaves()) == 200, WAIT, "200 registrations")
        for wire in wires:
            wire.close()
        wait_until(lambda: listener.deadlines.pending() == 200, WAIT, "200 sessions away")
        assert threading.active_count() <= before + 5, threading.active_count() - before
    finally:
        listener.stop()
    assert listener.deadlines.pending() == 0
