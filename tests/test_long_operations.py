"""Long operations stay alive past the master's reply deadline; what the
master accepts from a slave is bounded; a slave that breaks the protocol
after its final box is dropped; special files never block the slave."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from remsh.errors import FailedError, LimitExceeded, OpenFailedError, ProtocolError
from remsh.master.slave import Slave
from remsh.ops import is_progress
from remsh.transports.base import SocketStream
from remsh.wire import Wire

from tests.util import WAIT, process_alive

pytestmark = pytest.mark.timeout(120)

GiB = 1 << 30


def test_copy_longer_than_the_reply_deadline_succeeds(slave, basedir):
    """A copy that takes longer than io_timeout keeps the slave connected:
    the slave sends liveness boxes while it works."""
    with open(os.path.join(basedir, "big"), "wb") as f:
        f.truncate(GiB)
    slave.io_timeout = 0.3  # the copy takes longer; liveness boxes come every 0.075 s
    slave.copy("big", "copy")
    assert os.path.getsize(os.path.join(basedir, "copy")) == GiB
    assert slave.connected
    slave.io_timeout = WAIT
    slave.remove("copy")
    slave.ping()


def test_liveness_boxes_come_before_the_final_box(raw_slave):
    """Asked for liveness boxes every 0.05 s, the slave sends them while a
    long copy runs and none after its final box."""
    with open(os.path.join(raw_slave.basedir, "big"), "wb") as f:
        f.truncate(GiB)
    raw_slave.send({b"meth": b"copy", b"version": b"1", b"src": b"big", b"dest": b"copy",
                    b"progress": b"0.05"})
    seen = 0
    while True:
        box = raw_slave.read(WAIT)
        assert box is not None
        if not is_progress(box):
            break
        seen += 1
    assert box == {}
    assert seen >= 1
    assert raw_slave.ping() == {}


def test_no_liveness_boxes_unless_asked(raw_slave):
    """A master that does not ask for liveness boxes gets only the final box."""
    with open(os.path.join(raw_slave.basedir, "big"), "wb") as f:
        f.truncate(GiB // 4)
    assert raw_slave.request({b"meth": b"copy", b"version": b"1", b"src": b"big", b"dest": b"c"}) == {}
    assert raw_slave.ping() == {}


def test_fetch_max_bytes_bounds_what_the_master_writes(slave, basedir, tmp_path):
    """fetch(max_bytes=N) of a bigger file fails with LimitExceeded, leaves
    nothing at the destination and keeps the slave (the transfer was stopped)."""
    with open(os.path.join(basedir, "big"), "wb") as f:
        f.write(os.urandom(1 << 20))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(LimitExceeded, match="max_bytes"):
        slave.fetch("big", str(out / "f"), max_bytes=1000)
    assert os.listdir(out) == []
    assert slave.connected


def test_fetch_within_max_bytes(slave, basedir, tmp_path):
    """A file no bigger than max_bytes arrives whole."""
    data = os.urandom(5000)
    with open(os.path.join(basedir, "small"), "wb") as f:
        f.write(data)
    slave.fetch("small", str(tmp_path / "out"), max_bytes=5000)
    assert (tmp_path / "out").read_bytes() == data


def test_fetch_and_copy_of_a_fifo_fail_at_once(slave, basedir, tmp_path):
    """fetch or copy of a FIFO answers an error box instead of blocking the
    slave for ever; the slave goes on serving."""
    os.mkfifo(os.path.join(basedir, "fifo"))
    with pytest.raises(OpenFailedError, match="FIFO"):
        slave.fetch("fifo", str(tmp_path / "out"))
    with pytest.raises(FailedError, match="FIFO"):
        slave.copy("fifo", "copy")
    assert not os.path.exists(os.path.join(basedir, "copy"))
    slave.ping()


def _fake_slave(answer):
    """A master Slave on one end of a socket pair; the other end answers
    every request with ``answer(request)``'s boxes."""
    a, b = socket.socketpair()
    master = Slave(Wire(SocketStream(a), label="fake"), "fake")
    peer = Wire(SocketStream(b), label="master")

    def serve():
        while True:
            try:
                box = peer.read_box(WAIT)
            except Exception:  # noqa: BLE001 - the master closed
                return
            if box is None:
                return
            for reply in answer(box):
                peer.send_box(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return master, peer


def test_bad_stat_result_drops_the_slave():
    """A stat reply the protocol does not allow raises ProtocolError and the
    slave is disconnected, as ProtocolError promises."""
    slave, peer = _fake_slave(lambda box: [{b"result": b"x"}])
    with pytest.raises(ProtocolError, match="fake: stat"):
        slave.stat("a")
    assert not slave.connected
    peer.close()


def test_fetch_digest_mismatch_drops_the_slave(tmp_path):
    """Data that does not match the slave's own digest raises ProtocolError,
    leaves nothing, and disconnects the slave."""
    slave, peer = _fake_slave(lambda box: [{b"data": b"abc"}, {b"sha256": b"0" * 64}])
    with pytest.raises(ProtocolError, match="sha256"):
        slave.fetch("f", str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []
    assert not slave.connected
    peer.close()


def test_processes_left_behind_are_killed(slave):
    """A background process the command leaves in its process group dies
    when the command exits (and does not hold the output open)."""
    out: list = []
    assert slave.execute(["sh", "-c", "sleep 300 & echo $!"], stdout_cb=out.append) == 0
    pid = int(b"".join(out))
    deadline = time.monotonic() + WAIT
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not process_alive(pid)


def test_keep_processes_leaves_them_running(slave):
    """keep_processes=True leaves the command's background processes running."""
    out: list = []
    code = slave.execute(["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"], stdout_cb=out.append,
                         keep_processes=True)
    assert code == 0
    pid = int(b"".join(out))
    try:
        assert process_alive(pid)
    finally:
        os.kill(pid, 9)
