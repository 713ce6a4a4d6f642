"""The master's operation frame: the fair lock of a slave and the idle
monitor's registration of its stream, on real slaves over TCP.

Back-to-back operations leave a slave's stream quiet (no ``epoll_ctl`` per
operation); the monitor arms it once the slave has stayed idle, and a slave
that dies or talks out of turn right after an operation is still noticed.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, List, Tuple

from remsh.handshake import slave_handshake
from remsh.master.fairlock import FairLock
from remsh.master.monitor import ARM_DELAY
from remsh.transports.base import SocketStream
from remsh.wire import Wire, encode_box
from tests.slaveproc import HOST, SECRET, WAIT, slave_procs, tcp_listener, wait_registered  # noqa: F401
from tests.util import wait_until


class _CountingPoller:
    """A real epoll object that counts the ``modify`` calls made through it."""

    def __init__(self, poller: Any) -> None:
        self.poller = poller
        self.modified = 0

    def modify(self, fd: int, mask: int) -> None:
        self.modified += 1
        self.poller.modify(fd, mask)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.poller, name)


def _fake_slave(listener: Any, name: str) -> Tuple[socket.socket, Wire, Any]:
    """A peer registered with the right secret, then driven by the test."""
    sock = socket.create_connection((HOST, listener.port), timeout=WAIT)
    wire = Wire(SocketStream(sock), label="master")
    slave_handshake(wire, name, secret=SECRET, basedir="/nonexistent", timeout=WAIT)
    slave = listener.slave_collection.get_slave(True, lambda s: s.name == name, timeout=WAIT)
    assert slave is not None
    return sock, wire, slave


def _answer_one_ping(wire: Wire, slave: Any) -> None:
    """Let ``slave.ping()`` run to its end, answered by hand."""
    errors: List[BaseException] = []

    def ping() -> None:
        try:
            slave.ping()
        except BaseException as e:  # noqa: BLE001 - examined below
            errors.append(e)

    t = threading.Thread(target=ping, daemon=True)
    t.start()
    assert wire.read_box(WAIT) == {b"meth": b"ping", b"version": b"1"}
    wire.send_box({})
    t.join(WAIT)
    assert not t.is_alive() and not errors, errors


def test_back_to_back_operations_make_no_epoll_calls(tcp_listener, slave_procs):
    """A run of operations on one slave does not switch its stream's idle watch twice per operation."""
    listener = tcp_listener(resume_timeout=0)
    slave = wait_registered(listener, slave_procs.start(listener.port, "busy"))
    counting = _CountingPoller(listener.monitor._poller)
    listener.monitor._poller = counting
    started = time.monotonic()
    for _ in range(200):
        slave.ping()
    # at most a quiet/arm pair each time the monitor found the slave idle
    # between two pings (once per ARM_DELAY); it was two per ping
    bound = min(100, 2 * ((time.monotonic() - started) / ARM_DELAY + 2))
    assert counting.modified <= bound, f"{counting.modified} epoll_ctl calls for 200 pings"


def test_idle_stream_is_armed_after_the_arm_delay(tcp_listener):
    """A slave left idle after an operation has its stream watched for input again within a bound."""
    listener = tcp_listener()
    sock, wire, slave = _fake_slave(listener, "rest")
    with sock:
        _answer_one_ping(wire, slave)
        wait_until(lambda: id(slave) in listener.monitor._armed, timeout=WAIT, what="the stream armed")
        assert ARM_DELAY <= 1.0


def test_bytes_right_after_an_operation_drop_the_slave(tcp_listener):
    """A slave that sends unrequested bytes just after an operation ended is disconnected."""
    listener = tcp_listener()
    sock, wire, slave = _fake_slave(listener, "chatty")
    gone = threading.Event()
    slave.on_disconnect(lambda s: gone.set())
    with sock:
        _answer_one_ping(wire, slave)
        sock.sendall(encode_box({b"unasked": b"for"}))
        assert gone.wait(WAIT), "the master ignored bytes from a slave idle since an operation"
    assert listener.slave_collection.get_all_slaves() == []


def test_slave_dying_right_after_an_operation_is_noticed(tcp_listener):
    """A slave whose connection ends just after an operation leaves its collection without another operation."""
    listener = tcp_listener()
    sock, wire, slave = _fake_slave(listener, "mortal")
    gone = threading.Event()
    slave.on_disconnect(lambda s: gone.set())
    _answer_one_ping(wire, slave)
    sock.close()
    assert gone.wait(WAIT), "the master did not notice a slave closing right after an operation"
    assert listener.slave_collection.get_all_slaves() == []


def test_fair_lock_serves_waiters_in_order():
    """Threads blocked on a FairLock get it in the order they asked, and a non-blocking try never queues."""
    lock = FairLock()
    assert lock.acquire()
    assert not lock.acquire(blocking=False)
    order: List[int] = []
    threads = []
    for i in range(5):
        t = threading.Thread(target=lambda i=i: (lock.acquire(), order.append(i), lock.release()), daemon=True)
        t.start()
        threads.append(t)
        wait_until(lambda n=i + 1: lock._waiters == n, what="the waiter queued")
    lock.release()
    for t in threads:
        t.join(WAIT)
    assert order == [0, 1, 2, 3, 4]
    assert not lock.locked()
    assert lock.acquire(blocking=False)
    lock.release()


def test_fair_lock_timed_out_waiter_gives_its_turn_up():
    """A waiter that times out is skipped: the next waiter and later callers still get the lock."""
    lock = FairLock()
    assert lock.acquire()
    assert not lock.acquire(timeout=0.05)
    got = threading.Event()
    t = threading.Thread(target=lambda: (lock.acquire(), got.set()), daemon=True)
    t.start()
    wait_until(lambda: lock._waiters == 1, what="the waiter queued")
    lock.release()
    assert got.wait(WAIT)
    lock.release()
    assert not lock.locked()
