"""The master's side of file transfers against sources and slaves that do
not keep to what they promise: a file-like object that reads more than it
was asked for, and ``fetch`` past its ``max_bytes``."""

from __future__ import annotations

import io
import os

import pytest

from remsh.errors import UsageError
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
