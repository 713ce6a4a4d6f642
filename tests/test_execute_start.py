"""When the slave sends execute's start box: before any output, soon for a
command that keeps running, and together with the final box for a command
that ends at once (one message and one wake-up of the master instead of two).

Most tests run the slave in this process with the hold-back raised to 30 s,
so that what they check cannot depend on how fast the machine is: the start
box can then only go out with the first output, with the final box, or at
once (stdin).
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

from remsh.ops import EXECUTE
from remsh.slave import execute as slave_execute
from remsh.slave.server import SlaveServer
from remsh.transports.base import SocketStream
from remsh.wire import Wire, encode_box
from tests.util import WAIT, RawBoxReader, RawSlave, box_length, box_pairs


def execute(**values: object) -> bytes:
    """An execute request with no environment changes."""
    return EXECUTE.encode(env_={}, unset_={}, **values)


@pytest.fixture
def held_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SocketStream]:
    """The master's raw end of a slave served in this process whose start box waits up to 30 s."""
    monkeypatch.setattr(slave_execute, "START_DELAY", 30.0)
    a, c = socket.socketpair()
    server = SlaveServer(Wire(SocketStream(c, send_timeout=WAIT), label="slave"), str(tmp_path))
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    stream = SocketStream(a, send_timeout=WAIT)
    try:
        yield stream
    finally:
        stream.close()
        thread.join(WAIT)


def boxes(data: bytes) -> List[List[Tuple[bytes, bytes]]]:
    out = []
    while data:
        n = box_length(data)
        assert n is not None, f"a partial box: {data[:64]!r}"
        out.append(box_pairs(data[:n]))
        data = data[n:]
    return out


def test_a_command_that_ends_at_once_sends_start_and_result_in_one_write(held_back: SocketStream) -> None:
    """For `true` the start box goes out in the same write as the result: one receive holds both."""
    held_back.send_all(execute(args=[b"true"], want_stdout=False, want_stderr=False))
    data = held_back.recv(1 << 16, WAIT)
    assert boxes(bytes(data)) == [[], [(b"result", b"0")]]


def test_the_start_box_comes_before_the_first_output(held_back: SocketStream) -> None:
    """Output of a command still follows its start box, and the result follows the output."""
    held_back.send_all(execute(args=[b"echo", b"hi"], want_stdout=True, want_stderr=True))
    reader = RawBoxReader(held_back)
    got = [box_pairs(reader.read()) for _ in range(3)]
    assert got == [[], [(b"stream", b"stdout"), (b"data", b"hi\n")], [(b"result", b"0")]]


def test_with_stdin_the_start_box_does_not_wait_for_the_command(held_back: SocketStream) -> None:
    """With want_stdin the start box comes at once, while the command waits for its input."""
    held_back.send_all(execute(args=[b"cat"], want_stdin=True, want_stdout=True, want_stderr=False))
    reader = RawBoxReader(held_back)
    assert box_pairs(reader.read(timeout=WAIT)) == []
    held_back.send_all(encode_box({b"stream": b"stdin", b"data": b"abc", b"eof": b"y"}))
    assert box_pairs(reader.read()) == [(b"stream", b"stdout"), (b"data", b"abc")]
    assert box_pairs(reader.read()) == [(b"result", b"0")]


def test_a_running_command_gets_its_start_box_long_before_it_ends(raw_slave: RawSlave) -> None:
    """A slave process sends the start box of a command that runs on silently within a fraction of a second."""
    raw_slave.send_raw(execute(args=[b"sleep", b"3"], want_stdout=False, want_stderr=False))
    reader = raw_slave.box_reader()
    started = time.monotonic()
    assert box_pairs(reader.read(timeout=1.0)) == []
    assert time.monotonic() - started < 1.0
    assert box_pairs(reader.read(timeout=WAIT)) == [(b"result", b"0")]
