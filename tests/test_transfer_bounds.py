"""The master's side of file transfers past what was promised or allowed: a
file-like object that reads more than it was asked for, and ``fetch`` past
its ``max_bytes`` (stopped in the protocol; the slave stays usable)."""

from __future__ import annotations

import io
import os

import pytest

from remsh.errors import LimitExceeded, UsageError
from tests.slaveproc import slave_procs, tcp_listener, wait_registered  # noqa: F401
from tests.util import temp_files

pytestmark = pytest.mark.timeout(60)


class _OverlongReadinto:
    """A file-like object whose readinto(view) claims more bytes than the view holds."""

    def readinto(self, view: memoryview) -> int:
        view[:] = b"x" * len(view)
        return len(view) + 1

    def read(self, n: int) -> bytes:
        return b""  # never called: readinto is preferred

    def __repr__(self) -> str:
        return "<overlong readinto>"


class _OverlongRead:
    """A minimal file-like object (read only) that returns more than asked."""

    def read(self, n: int) -> bytes:
        return b"y" * (n + 1)

    def __repr__(self) -> str:
        return "<overlong read>"


@pytest.mark.parametrize("source", [_OverlongReadinto, _OverlongRead], ids=["readinto", "read"])
def test_send_from_a_source_that_reads_too_much_is_a_usage_error(source, slave, basedir):
    """send from a file-like object whose read(n) returns more than n bytes raises UsageError naming it; nothing is left and the slave stays usable."""
    src = source()
    with pytest.raises(UsageError) as info:
        slave.send(src, "dest")
    assert repr(src) in str(info.value) and slave.name in str(info.value)
    assert os.listdir(str(basedir)) == [] and temp_files(basedir) == []
    slave.send(io.BytesIO(b"fine"), "dest")
    assert open(os.path.join(str(basedir), "dest"), "rb").read() == b"fine"


def _file(basedir, name: str, size: int) -> bytes:
    data = os.urandom(size)
    with open(os.path.join(str(basedir), name), "wb") as f:
        f.write(data)
    return data


@pytest.mark.parametrize("size", [3 << 20, 40 << 20], ids=["3MiB", "40MiB"])
def test_fetch_past_max_bytes_stops_the_transfer_and_keeps_the_slave(slave, basedir, tmp_path, size):
    """fetch past max_bytes raises LimitExceeded naming slave and operation; nothing is left at dest and the same slave object fetches again."""
    data = _file(basedir, "big", size)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(LimitExceeded) as info:
        slave.fetch("big", str(out / "big"), max_bytes=1 << 20)
    assert slave.name in str(info.value) and "fetch" in str(info.value) and "max_bytes" in str(info.value)
    assert os.listdir(out) == [] and temp_files(out) == []
    assert slave.connected
    slave.fetch("big", str(out / "big"))
    assert (out / "big").read_bytes() == data
    assert slave.execute(["true"]) == 0


def test_fetch_past_max_bytes_over_tcp_keeps_the_slave(tcp_listener, slave_procs, tmp_path):
    """Over TCP (a resumable session) too, a fetch stopped at max_bytes leaves the slave usable."""
    listener = tcp_listener()
    proc = slave_procs.start(listener.port, "tcp-slave")
    slave = wait_registered(listener, proc)
    slave.execute(["sh", "-c", "head -c 20000000 /dev/zero > big"])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(LimitExceeded):
        slave.fetch("big", str(out / "big"), max_bytes=100_000)
    assert os.listdir(out) == []
    slave.fetch("big", str(out / "big"))
    assert os.path.getsize(out / "big") == 20_000_000


def test_fetch_within_max_bytes_is_whole(slave, basedir, tmp_path):
    """A file exactly max_bytes long arrives whole."""
    data = _file(basedir, "f", 100_000)
    slave.fetch("f", str(tmp_path / "f"), max_bytes=100_000)
    assert (tmp_path / "f").read_bytes() == data
