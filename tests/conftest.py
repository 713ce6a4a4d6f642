"""Fixtures shared by the core test suite: local slaves in real child processes.

``listener`` is a :class:`LocalSlaveListener` with its own collection, stopped
(every child killed) at the end of the test; ``slave`` is one slave it started,
rooted at ``basedir`` (an empty directory of the test's own).  ``raw_slave``
is a slave child with nothing of the master library between the test and the
wire, for tests that must send what a correct master never would.

``any_transport`` and ``any_slave`` (from :mod:`tests.transports`) run a test
once per transport: local, TCP, TLS, embedded SSH and SSH through OpenSSH.
"""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from remsh.master.slavecollection.simple import SimpleSlaveCollection  # noqa: E402
from remsh.master.slavelistener.local import LocalSlaveListener  # noqa: E402

from tests.transports import any_slave, any_transport, transport_params, transport_pool  # noqa: E402,F401
from tests.util import RawSlave  # noqa: E402


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test that uses ``any_transport`` (or ``any_slave``) gets one item per transport."""
    if "any_transport" in metafunc.fixturenames:
        metafunc.parametrize("any_transport", transport_params(metafunc.definition), indirect=True)


@pytest.fixture
def basedir(tmp_path):
    """An empty directory for the slave's base directory."""
    path = tmp_path / "base"
    path.mkdir()
    return path


@pytest.fixture
def collection():
    return SimpleSlaveCollection()


@pytest.fixture
def listener(collection):
    lst = LocalSlaveListener(slave_collection=collection)
    try:
        yield lst
    finally:
        lst.stop()


@pytest.fixture
def slave(listener, basedir):
    return listener.start_slave(str(basedir))


@pytest.fixture
def raw_slave(basedir):
    raw = RawSlave(str(basedir))
    try:
        yield raw
    finally:
        raw.close()
