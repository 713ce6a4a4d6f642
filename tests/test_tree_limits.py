"""fetch_tree bounds what a slave can make the master write: max_bytes and
max_entries abandon the transfer, leave nothing and drop the slave."""

from __future__ import annotations

import os

import pytest

from remsh.errors import ProtocolError

pytestmark = pytest.mark.timeout(60)


def _tree(basedir, files: int, size: int) -> None:
    top = os.path.join(basedir, "t")
    os.mkdir(top)
    for i in range(files):
        with open(os.path.join(top, f"f{i}"), "wb") as f:
            f.write(os.urandom(size))


@pytest.mark.parametrize("limit", [{"max_bytes": 50_000}, {"max_entries": 3}])
def test_fetch_tree_past_a_limit_leaves_nothing(listener, basedir, tmp_path, limit):
    """A tree bigger than max_bytes, or with more entries than max_entries,
    raises ProtocolError naming the limit; nothing is left beside the
    destination and the slave is dropped (it was still sending)."""
    _tree(basedir, files=10, size=20_000)
    slave = listener.start_slave(str(basedir))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ProtocolError, match=next(iter(limit))):
        slave.fetch_tree("t", str(out / "copy"), **limit)
    assert os.listdir(out) == []
    assert not slave.connected


def test_fetch_tree_within_the_limits(listener, basedir, tmp_path):
    """A tree within both limits arrives whole."""
    _tree(basedir, files=3, size=1000)
    slave = listener.start_slave(str(basedir))
    slave.fetch_tree("t", str(tmp_path / "copy"), max_bytes=3000, max_entries=4)  # the top and 3 files
    assert sorted(os.listdir(tmp_path / "copy")) == ["f0", "f1", "f2"]
