"""When the slave sends execute's start box: before any output, soon for a
command that keeps running, and together with the final box for a command
that ends at once (one message and one wake-up of the master instead of two).
"""

from __future__ import annotations

import time

from remsh.ops import EXECUTE
from tests.util import WAIT, RawSlave, box_length, box_pairs


def execute(**values: object) -> bytes:
    """An execute request with no environment changes."""
    return EXECUTE.encode(env_={}, unset_={}, **values)


def first_receive(raw_slave: RawSlave) -> bytes:
    """What the first receive after the request brings (at least one byte)."""
    data = raw_slave.wire.stream.recv(1 << 16, WAIT)
    assert data, "the slave closed the connection"
    return bytes(data)


def boxes(data: bytes) -> list:
    out = []
    while data:
        n = box_length(data)
        assert n is not None, f"a partial box: {data[:64]!r}"
        out.append(box_pairs(data[:n]))
        data = data[n:]
    return out


def test_a_command_that_ends_at_once_sends_start_and_result_in_one_write(raw_slave: RawSlave) -> None:
    """For `true` the start box and the result arrive in the same write: one receive holds both."""
    raw_slave.send_raw(execute(args=[b"true"], want_stdout=False, want_stderr=False))
    assert boxes(first_receive(raw_slave)) == [[], [(b"result", b"0")]]


def test_a_running_command_gets_its_start_box_long_before_it_ends(raw_slave: RawSlave) -> None:
    """A command that runs on silently still has its start box sent within a fraction of a second."""
    raw_slave.send_raw(execute(args=[b"sleep", b"3"], want_stdout=False, want_stderr=False))
    reader = raw_slave.box_reader()
    started = time.monotonic()
    assert box_pairs(reader.read(timeout=1.0)) == []
    assert time.monotonic() - started < 1.0
    assert box_pairs(reader.read(timeout=WAIT)) == [(b"result", b"0")]


def test_the_start_box_comes_before_the_first_output(raw_slave: RawSlave) -> None:
    """Output of a command that ends at once still follows its start box, and the result follows the output."""
    raw_slave.send_raw(execute(args=[b"echo", b"hi"], want_stdout=True, want_stderr=True))
    reader = raw_slave.box_reader()
    got = [box_pairs(reader.read()) for _ in range(3)]
    assert got == [[], [(b"stream", b"stdout"), (b"data", b"hi\n")], [(b"result", b"0")]]


def test_with_stdin_the_start_box_does_not_wait_for_the_command(raw_slave: RawSlave) -> None:
    """With want_stdin the start box comes while the command waits for its input, which then goes through."""
    raw_slave.send_raw(execute(args=[b"cat"], want_stdin=True, want_stdout=True, want_stderr=False))
    reader = raw_slave.box_reader()
    assert box_pairs(reader.read(timeout=1.0)) == []
    raw_slave.send({b"stream": b"stdin", b"data": b"abc", b"eof": b"y"})
    assert box_pairs(reader.read()) == [(b"stream", b"stdout"), (b"data", b"abc")]
    assert box_pairs(reader.read()) == [(b"result", b"0")]
