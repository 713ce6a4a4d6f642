"""chmod, over every transport: the operation added to show the shape of
the table of operations (one declaration, one slave handler, one master
method, one protocol section)."""

from __future__ import annotations

import os
import stat

import pytest

from remsh.errors import FailedError, NotFoundError

pytestmark = pytest.mark.timeout(60)


def test_chmod_sets_the_bits_and_refuses_links(any_slave, basedir):
    """chmod sets a file's and a directory's bits, answers notfound for a
    missing path and refuses a symbolic link without touching its target."""
    slave = any_slave.slave
    f = os.path.join(basedir, "f")
    with open(f, "wb"):
        pass
    os.mkdir(os.path.join(basedir, "d"))
    os.symlink("f", os.path.join(basedir, "link"))
    slave.chmod("f", 0o640)
    slave.chmod("d", 0o711)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o640
    assert stat.S_IMODE(os.stat(os.path.join(basedir, "d")).st_mode) == 0o711
    with pytest.raises(NotFoundError):
        slave.chmod("missing", 0o600)
    with pytest.raises(FailedError, match="symbolic link"):
        slave.chmod("link", 0o777)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o640
    slave.ping()
