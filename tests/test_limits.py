"""The master's descriptor budget (remsh.master.limits): a network listener
raises the soft RLIMIT_NOFILE to the hard limit when it starts, and fails at
once, saying how many slaves fit, when the hard limit cannot hold them.

Each case runs in a child process whose limits the test sets with
``resource.setrlimit`` before starting a real ``TcpSlaveListener`` on
127.0.0.1, so the test's own process keeps its limits.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import Any, Dict, Optional

import pytest

from remsh.master.limits import FDS_PER_SESSION_SLAVE, FDS_PER_SLAVE, RESERVE, Capacity, descriptors_per_slave
from remsh.session import SessionWire
from remsh.transports.base import SocketStream
from remsh.wire import Wire

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, resource, socket, sys
soft, hard, expected, resume = json.loads(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
from remsh.errors import LocalError
from remsh.master.slavelistener.tcp import TcpSlaveListener
kw = {} if resume is None else {"resume_timeout": resume}
listener = TcpSlaveListener(port=0, host="127.0.0.1", secret=b"s" * 32, **kw)
listener.expected_slaves = expected
out = {}
try:
    listener.start()
except LocalError as e:
    out["error"] = str(e)
else:
    try:
        socket.create_connection(("127.0.0.1", listener.port), timeout=5).close()
        out["port_open"] = True
    finally:
        listener.stop()
out["started"] = listener.started
out["limits"] = resource.getrlimit(resource.RLIMIT_NOFILE)
print(json.dumps(out))
"""


def run_child(soft: int, hard: int, expected: Optional[int] = None,
              resume: Optional[float] = None) -> Dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps([soft, hard, expected, resume])],
                       capture_output=True, text=True, timeout=60, env=env, cwd=REPO)
    assert p.returncode == 0, p.stderr
    result: Dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    return result


def test_start_raises_soft_limit_to_hard() -> None:
    """A network listener's start() raises the soft open-file limit to the hard limit."""
    out = run_child(soft=256, hard=4096)
    assert "error" not in out, out
    assert out["port_open"] is True
    assert out["limits"] == [4096, 4096]


def test_hard_limit_too_low_for_expected_slaves_says_how_many_fit() -> None:
    """With sessions (default resume_timeout) a hard limit of 200 holds (200 - reserve) / per-slave
    descriptors, and start() fails naming that number, before the port is opened."""
    fit = (200 - RESERVE) // FDS_PER_SESSION_SLAVE
    out = run_child(soft=150, hard=200, expected=fit + 8)
    assert out["started"] is False
    assert "port_open" not in out
    msg = out["error"]
    assert f"holds {fit} slaves" in msg
    assert f"the {fit + 8} expected" in msg
    assert "hard 200" in msg
    assert out["limits"] == [200, 200]  # the soft limit was still raised


def test_sessions_off_fit_one_descriptor_a_slave() -> None:
    """With resume_timeout=0 each slave costs one descriptor: what fits under the same hard limit grows."""
    fit = (200 - RESERVE) // FDS_PER_SLAVE
    ok = run_child(soft=200, hard=200, expected=fit, resume=0)
    assert "error" not in ok, ok
    assert ok["port_open"] is True
    over = run_child(soft=200, hard=200, expected=fit + 1, resume=0)
    assert f"holds {fit} slaves at 1 descriptor each" in over["error"]


def test_no_slave_fits_without_expected_count() -> None:
    """A hard limit below the master's own reserve fails start() even when no slave count was given."""
    out = run_child(soft=100, hard=100)
    assert out["started"] is False
    assert "not even one" in out["error"]
    assert "holds 0 slaves" in out["error"]


def test_capacity_arithmetic() -> None:
    """Capacity counts slaves under the soft limit after the reserve, never below zero."""
    assert Capacity(soft=20_000, hard=20_000, per_slave=1).slaves == 20_000 - RESERVE
    assert Capacity(soft=20_000, hard=20_000, per_slave=3).slaves == (20_000 - RESERVE) // 3
    assert Capacity(soft=10, hard=10, per_slave=1).slaves == 0
    assert descriptors_per_slave(0) == FDS_PER_SLAVE
    assert descriptors_per_slave(300) == FDS_PER_SESSION_SLAVE


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_session_descriptor_count_matches_what_a_session_holds() -> None:
    """The budget's descriptors per session slave are what a master-side SessionWire really holds."""
    a, b = socket.socketpair()
    try:
        before = _open_fds()
        wire = Wire(SocketStream(a, peer="test"), label="test")
        plain = _open_fds() - before
        session = SessionWire(wire, "0" * 32, resume_timeout=300.0)
        with_session = _open_fds() - before
        session.close()
    finally:
        a.close()
        b.close()
    # the socket was open before: a Wire adds nothing, a session adds what it adds
    assert plain == 0
    assert 1 + with_session == FDS_PER_SESSION_SLAVE
