"""``remsh-slave --failover HOST:PORT``: a real slave process and real
``remsh master`` processes over TCP; the slave moves to the next master when
its own is gone, and back; the order of the masters it tries."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import List

import pytest

from remsh.slave.failover import Rotation, parse_master
from tests.slaveproc import HOST, SECRET, WAIT, SlaveProcesses
from tests.test_fleet import Master, _free_port, remsh, wait_names
from tests.util import wait_until

pytestmark = pytest.mark.timeout(180)


def _master(tmp_path: Path, label: str, secret: Path, port: int = 0) -> Master:
    workdir = tmp_path / label
    workdir.mkdir(exist_ok=True)
    return Master(workdir, workdir / "m.sock", port=port, secret_file=secret).wait_ready()


def test_rotation_tries_masters_in_order_and_backs_off_after_a_round() -> None:
    """Unreachable masters are skipped at once to the next; a whole round unreached, or a lost master, asks for a wait; a lost master restarts the list from the top."""
    r = Rotation(3)
    assert r.index == 0
    assert r.ended(False) is False and r.index == 1
    assert r.ended(False) is False and r.index == 2
    assert r.ended(False) is True and r.index == 0      # a round with no master: back off
    assert r.ended(False) is False and r.index == 1
    assert r.ended(True) is True and r.index == 0       # served by 1, which is gone: from the top
    single = Rotation(1)
    assert single.ended(False) is True and single.ended(True) is True and single.index == 0


def test_failover_addresses_are_host_and_port() -> None:
    """--failover takes HOST:PORT (IPv6 in brackets); anything else is refused."""
    assert parse_master("m2.example:7447") == ("m2.example", 7447)
    assert parse_master("[::1]:7447") == ("::1", 7447)
    for bad in ("m2.example", ":7447", "m2:0", "m2:http"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_master(bad)


def test_a_slave_fails_over_and_back_three_times(tmp_path: Path) -> None:
    """The slave's master killed: it registers with the --failover master and serves there; killed in turn, the slave returns to the first, restarted; three times."""
    slaves = SlaveProcesses(tmp_path / "slaves")
    secret = slaves.secret_file(SECRET)
    masters: List[Master] = [_master(tmp_path, "m0", secret), _master(tmp_path, "m1", secret)]
    ports = [m.port for m in masters]
    try:
        slaves.start(ports[0], "s1", max_backoff=0.5, extra_args=["--failover", f"{HOST}:{ports[1]}"])
        wait_names(masters[0].sock, ["s1"])
        current = 0
        for _ in range(3):
            masters[current].stop(signal.SIGKILL)
            other = 1 - current
            wait_names(masters[other].sock, ["s1"], timeout=30)
            r = remsh(masters[other].sock, "run", "-t", "s1", "--", "echo", f"on m{other}")
            assert r.returncode == 0 and f"on m{other}" in r.stdout.decode(), r.stderr.decode()
            masters[current] = _master(tmp_path, f"m{current}", secret, port=ports[current])
            current = other
    finally:
        for m in masters:
            m.stop()
        slaves.close()


def test_a_slave_whose_first_master_is_down_registers_with_the_next(tmp_path: Path) -> None:
    """With the first master unreachable from the start, the slave registers with the --failover master."""
    slaves = SlaveProcesses(tmp_path / "slaves")
    secret = slaves.secret_file(SECRET)
    master = _master(tmp_path, "m1", secret)
    try:
        slaves.start(_free_port(), "s1", max_backoff=0.5, extra_args=["--failover", f"{HOST}:{master.port}"])
        wait_names(master.sock, ["s1"])
    finally:
        master.stop()
        slaves.close()


def test_a_slave_started_with_every_master_down_registers_with_the_first_to_come_up(tmp_path: Path) -> None:
    """No master reachable when the slave starts: it keeps trying the list and registers with the --failover master once that one starts."""
    slaves = SlaveProcesses(tmp_path / "slaves")
    secret = slaves.secret_file(SECRET)
    ports = [_free_port(), _free_port()]
    master = None
    try:
        proc = slaves.start(ports[0], "s1", max_backoff=0.5, extra_args=["--failover", f"{HOST}:{ports[1]}"])
        wait_until(lambda: proc.log_text().count("trying the next master") >= 2 or proc.poll() is not None, WAIT,
                   "the slave to go round the list")
        assert proc.poll() is None, proc.log_text()
        master = _master(tmp_path, "m1", secret, port=ports[1])
        wait_names(master.sock, ["s1"])
    finally:
        if master is not None:
            master.stop()
        slaves.close()
