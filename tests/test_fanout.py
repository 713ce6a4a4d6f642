"""The fan-out helper: bounded workers, overall timeout, cancellation, and
per-slave results that never hide one another."""

from __future__ import annotations

import threading
import time

import pytest

from remsh.errors import Cancelled, Disconnected, NotFoundError
from remsh.master.fanout import Cancellation, fan_out

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def slaves(listener, tmp_path):
    out = []
    for i in range(4):
        d = tmp_path / f"s{i}"
        d.mkdir()
        out.append(listener.start_slave(str(d), name=f"s{i}"))
    return out


def test_results_in_order_with_per_slave_values(slaves):
    """Each outcome carries its own slave's result, in the order given."""
    outcomes = fan_out(slaves, lambda s: s.set_cwd(), max_workers=2)
    assert [o.slave for o in outcomes] == slaves
    assert all(o.ok for o in outcomes)
    assert [o.result() for o in outcomes] == [s.info["basedir"] for s in slaves]


def test_one_failure_does_not_hide_the_others(slaves):
    """A slave whose operation raises gets that exception; the rest succeed."""
    victim = slaves[1].name

    def op(s):
        if s.name == victim:
            s.unlink("missing-file")
        return s.execute(["true"])

    outcomes = fan_out(slaves, op)
    by_name = {o.slave.name: o for o in outcomes}
    assert isinstance(by_name[victim].error, NotFoundError)
    with pytest.raises(NotFoundError):
        by_name[victim].result()
    assert all(o.ok and o.value == 0 for n, o in by_name.items() if n != victim)


def test_workers_are_bounded(slaves):
    """No more than max_workers operations run at the same time."""
    lock = threading.Lock()
    running = 0
    peak = 0

    def op(s):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            return s.execute(["sleep", "0.2"])
        finally:
            with lock:
                running -= 1

    outcomes = fan_out(slaves, op, max_workers=2)
    assert all(o.ok for o in outcomes)
    assert peak == 2


def test_timeout_interrupts_running_and_cancels_pending(slaves):
    """The overall timeout interrupts running commands and cancels unstarted ones."""
    t0 = time.monotonic()
    outcomes = fan_out(slaves, lambda s: s.execute(["sleep", "60"]), max_workers=2, timeout=1.0)
    assert time.monotonic() - t0 < 30
    started = outcomes[:2]
    pending = outcomes[2:]
    # interrupted commands end with SIGKILL's status
    assert [o.value for o in started] == [-9, -9]
    assert all(isinstance(o.error, Cancelled) for o in pending)
    assert "timed out" in str(pending[0].error)
    # the slaves stay usable
    assert slaves[0].execute(["true"]) == 0


def test_cancel_from_another_thread(slaves):
    """Cancellation from another thread stops the fan-out promptly."""
    cancellation = Cancellation()
    started = threading.Event()

    def op(s):
        started.set()
        return s.execute(["sleep", "60"])

    result = {}
    t = threading.Thread(target=lambda: result.update(
        out=fan_out(slaves, op, max_workers=1, cancellation=cancellation)))
    t.start()
    assert started.wait(20)
    cancellation.cancel("stop now")
    t.join(30)
    assert not t.is_alive()
    outcomes = result["out"]
    assert outcomes[0].value == -9
    assert all(isinstance(o.error, Cancelled) and "stop now" in str(o.error) for o in outcomes[1:])


def test_stuck_operation_loses_its_connection_after_grace(slaves):
    """An operation that ignores interrupts is cut off by dropping its connection."""
    release = threading.Event()

    def op(s):
        # a callback that blocks: interrupt cannot end it, only the grace does
        return s.execute(["sh", "-c", "echo x; sleep 60"], stdout_cb=lambda d: release.wait(60))

    t0 = time.monotonic()
    outcomes = fan_out(slaves[:1], op, timeout=0.5, grace=1.0)
    release.set()
    assert time.monotonic() - t0 < 20
    assert isinstance(outcomes[0].error, (Disconnected, Cancelled))


def test_empty_and_bad_arguments():
    """No slaves gives no outcomes; max_workers must be positive."""
    assert fan_out([], lambda s: 1) == []
    with pytest.raises(ValueError):
        fan_out([], lambda s: 1, max_workers=0)


def test_returns_within_timeout_plus_two_graces_whatever_the_callable(slaves):
    """A callable that ignores remsh altogether (so neither interrupt nor a
    dropped connection stops it) still lets fan_out return within
    timeout + 2 * grace: the stuck threads are not joined one after another."""
    release = threading.Event()
    try:
        start = time.monotonic()
        outcomes = fan_out(slaves * 4, lambda s: release.wait(60), timeout=0.3, grace=0.3)
        elapsed = time.monotonic() - start
    finally:
        release.set()
    assert all(isinstance(o.error, Cancelled) for o in outcomes)
    # the bound plus room for a loaded machine's scheduling; joined one by
    # one, the 16 stuck threads would take 16 graces (4.8 s) and more
    assert elapsed < 0.3 + 2 * 0.3 + 1.5, elapsed


def test_interrupt_reaches_a_call_still_waiting_for_its_turn(slaves):
    """interrupt() kills the running command and is kept for the execute call
    queued behind it, which is killed as soon as its request goes out."""
    slave = slaves[0]
    results: list = []
    started = threading.Event()

    def run() -> None:
        results.append(slave.execute(["sh", "-c", "echo up; exec sleep 60"],
                                     stdout_cb=lambda _b: started.set()))

    first = threading.Thread(target=run)
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=lambda: results.append(slave.execute(["sleep", "60"])))
    second.start()
    deadline = time.monotonic() + 10
    while len(slave._executions) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(slave._executions) == 2
    slave.interrupt()
    first.join(20)
    second.join(20)
    assert results == [-9, -9]
    assert slave.execute(["true"]) == 0
