"""Slave.operation: the public frame the longer operations (send, fetch, the
tree transfers) use to talk to a slave, over a real local slave."""

from __future__ import annotations

import pytest

from remsh.errors import Disconnected, NotFoundError, ProtocolError
from remsh.master.operation import OperationFrame, OperationHost
from remsh.master.slave import Slave
from remsh.ops import PING, UNLINK


def test_a_conversation_through_the_frame(slave: Slave) -> None:
    """A request sent and its reply read through the frame; the slave stays usable."""
    with slave.operation("ping") as op:
        assert isinstance(op, OperationFrame)
        assert (op.name, op.meth, op.io_timeout) == (slave.name, "ping", slave.io_timeout)
        op.send_bytes(PING.encode())
        reply = op.read()
    assert op.raise_if_error(reply) is reply
    slave.ping()


def test_raise_if_error_names_slave_and_operation(slave: Slave) -> None:
    """An error box read through the frame raises its RemoteError, naming slave and operation."""
    with slave.operation("unlink") as op:
        op.send_bytes(UNLINK.encode(file=b"missing"))
        box = op.read()
    with pytest.raises(NotFoundError) as info:
        op.raise_if_error(box)
    assert (info.value.slave, info.value.operation) == (slave.name, "unlink")
    assert slave.connected


def test_progress_interval_is_a_quarter_of_the_io_timeout(slave: Slave) -> None:
    """A long operation asks for liveness boxes four times per reply deadline (at least every 50 ms)."""
    with slave.operation("ping") as op:
        assert op.progress_interval == max(0.05, slave.io_timeout / 4)


def test_protocol_error_drops_the_slave(slave: Slave) -> None:
    """A broken protocol reported through the frame disconnects the slave."""
    with slave.operation("stat") as op:
        pass
    error = op.protocol_error("bad result")
    assert isinstance(error, ProtocolError) and slave.name in str(error) and "stat" in str(error)
    assert not slave.connected
    with pytest.raises(Disconnected):
        slave.ping()


def test_a_slave_is_an_operation_host(slave: Slave) -> None:
    """Slave satisfies the protocol the transfer bodies are typed against."""
    host: OperationHost = slave
    assert host.name == slave.name
