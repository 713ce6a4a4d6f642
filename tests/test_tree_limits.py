"""fetch_tree bounds what a slave can make the master write: max_bytes and
max_entries stop the transfer in the protocol and leave nothing, and the
slave stays usable; modes arrive narrowed by the master's umask, with no
set-ID or sticky bit."""

from __future__ import annotations

import os
import stat

import pytest

from remsh.errors import LimitExceeded

pytestmark = pytest.mark.timeout(60)


def _tree(basedir, files: int, size: int) -> None:
    top = os.path.join(basedir, "t")
    os.mkdir(top)
    for i in range(files):
        with open(os.path.join(top, f"f{i}"), "wb") as f:
            f.write(os.urandom(size))


@pytest.mark.parametrize("limit", [{"max_bytes": 50_000}, {"max_entries": 3}])
def test_fetch_tree_past_a_limit_leaves_nothing_and_keeps_the_slave(listener, basedir, tmp_path, limit):
    """A tree bigger than max_bytes, or with more entries than max_entries, raises LimitExceeded naming the slave and the limit; nothing is left beside the destination and the same slave object fetches again."""
    _tree(basedir, files=10, size=20_000)
    slave = listener.start_slave(str(basedir))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(LimitExceeded, match=next(iter(limit))) as info:
        slave.fetch_tree("t", str(out / "copy"), **limit)
    assert slave.name in str(info.value) and "fetch_tree" in str(info.value)
    assert os.listdir(out) == []
    assert slave.connected
    slave.fetch_tree("t", str(out / "again"))
    assert len(os.listdir(out / "again")) == 10


def test_fetch_tree_within_the_limits(listener, basedir, tmp_path):
    """A tree within both limits arrives whole."""
    _tree(basedir, files=3, size=1000)
    slave = listener.start_slave(str(basedir))
    slave.fetch_tree("t", str(tmp_path / "copy"), max_bytes=3000, max_entries=4)  # the top and 3 files
    assert sorted(os.listdir(tmp_path / "copy")) == ["f0", "f1", "f2"]


def test_fetch_tree_applies_the_umask_and_drops_set_id_and_sticky_bits(listener, basedir, tmp_path):
    """Directories sent as 0o7777 / set-group-ID and files as 0o4777 arrive with the master's umask applied and no set-ID or sticky bit."""
    top = os.path.join(basedir, "t")
    os.mkdir(top)
    os.mkdir(os.path.join(top, "d"))
    with open(os.path.join(top, "d", "f"), "wb") as f:
        f.write(b"program")
    os.chmod(os.path.join(top, "d", "f"), 0o4777)
    os.chmod(os.path.join(top, "d"), 0o2777)
    os.chmod(top, 0o7777)
    slave = listener.start_slave(str(basedir))
    old = os.umask(0o027)
    try:
        slave.fetch_tree("t", str(tmp_path / "copy"))
    finally:
        os.umask(old)
    copy = tmp_path / "copy"
    modes = {p: stat.S_IMODE(os.lstat(copy / p).st_mode) for p in ("", "d", "d/f")}
    assert modes == {"": 0o750, "d": 0o750, "d/f": 0o750}


def test_fetch_tree_past_max_entries_in_directories_keeps_the_slave(listener, basedir, tmp_path):
    """A tree whose announced files are within max_entries but whose directories pass it is stopped mid-stream: LimitExceeded, nothing left, the slave usable."""
    top = os.path.join(basedir, "t")
    for i in range(20):
        os.makedirs(os.path.join(top, f"d{i}", "sub"))
    slave = listener.start_slave(str(basedir))
    with pytest.raises(LimitExceeded, match="max_entries"):
        slave.fetch_tree("t", str(tmp_path / "copy"), max_entries=10)
    assert not (tmp_path / "copy").exists() and os.listdir(tmp_path) == ["base"]
    slave.ping()
    slave.fetch_tree("t", str(tmp_path / "copy"))
    assert len(os.listdir(tmp_path / "copy")) == 20
