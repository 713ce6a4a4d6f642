"""What keeps the cost per box and per byte down, pinned as behaviour: a
command's output read in large pieces and framed as many boxes at once,
with the same bytes on the wire as one box at a time."""

from __future__ import annotations

import fcntl
import os

import pytest

from remsh.conversation import ExecuteControl
from remsh.slave.execute import MAX_READ, PIPE_SIZE, read_output_boxes
from remsh.wire import MAX_VALUE_LENGTH, BoxDecoder, encode_box, encode_data_boxes

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("size", [1, MAX_VALUE_LENGTH, MAX_VALUE_LENGTH + 1, 3 * MAX_VALUE_LENGTH + 7])
def test_data_boxes_with_a_prefix_are_the_boxes_one_at_a_time(size: int) -> None:
    """encode_data_boxes with a prefix gives exactly the output boxes encoded one by one."""
    data = bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    prefix, key = ExecuteControl.output_head(b"stderr")
    one_by_one = b"".join(encode_box(ExecuteControl.output_box(b"stderr", data[i:i + MAX_VALUE_LENGTH]))
                          for i in range(0, size, MAX_VALUE_LENGTH))
    assert encode_data_boxes(key, data, prefix) == one_by_one


def test_a_full_output_pipe_is_read_and_framed_at_once() -> None:
    """What a grown output pipe holds (up to MAX_READ) is read in one go and
    sent as consecutive output boxes, each within a box's value limit."""
    r, w = os.pipe()
    try:
        try:
            fcntl.fcntl(r, fcntl.F_SETPIPE_SZ, PIPE_SIZE)  # type: ignore[attr-defined]
        except (AttributeError, OSError):
            pytest.skip("the pipe cannot be grown here")
        os.set_blocking(r, False)
        size = min(MAX_READ, PIPE_SIZE) - 3
        data = os.urandom(size)
        assert os.write(w, data) == size
        prefix, key = ExecuteControl.output_head(b"stdout")
        encoded = read_output_boxes(r, prefix, key)
        assert encoded is not None
        boxes = BoxDecoder().feed(encoded)
        assert len(boxes) == -(-size // MAX_VALUE_LENGTH)
        assert all(box.keys() == {b"stream", b"data"} and box[b"stream"] == b"stdout" for box in boxes)
        assert all(len(box[b"data"]) <= MAX_VALUE_LENGTH for box in boxes)
        assert b"".join(box[b"data"] for box in boxes) == data
        assert read_output_boxes(r, prefix, key) is None  # nothing more yet
        os.close(w)
        w = -1
        assert read_output_boxes(r, prefix, key) == b""  # the end of the output
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_a_framed_block_with_a_prefix_takes_what_a_pipe_holds_in_one_read() -> None:
    """FramedBlock.fill_once reads what the pipe holds (up to the limit) in
    place into output boxes: the same bytes encode_data_boxes makes of it."""
    from remsh.bulk import FramedBlock

    prefix, key = ExecuteControl.output_head(b"stdout")
    block = FramedBlock(key, 4, prefix)
    r, w = os.pipe()
    try:
        try:
            fcntl.fcntl(r, fcntl.F_SETPIPE_SZ, PIPE_SIZE)  # type: ignore[attr-defined]
        except (AttributeError, OSError):
            pytest.skip("the pipe cannot be grown here")
        os.set_blocking(r, False)
        data = os.urandom(3 * MAX_VALUE_LENGTH + 11)
        assert os.write(w, data) == len(data)
        assert block.fill_once(r, 2 * MAX_VALUE_LENGTH + 5) == 2 * MAX_VALUE_LENGTH + 5  # no more than asked
        assert bytes(block.encoded()) == encode_data_boxes(key, data[:2 * MAX_VALUE_LENGTH + 5], prefix)
        assert block.fill_once(r, 1 << 20) == MAX_VALUE_LENGTH + 6  # the rest, no wait for more
        assert bytes(block.encoded()) == encode_data_boxes(key, data[2 * MAX_VALUE_LENGTH + 5:], prefix)
        with pytest.raises(BlockingIOError):
            block.fill_once(r, 1 << 20)
        os.close(w)
        w = -1
        assert block.fill_once(r, 1 << 20) == 0
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_a_read_with_a_timeout_already_past_does_not_wait() -> None:
    """Wire.read_box with a timeout of 0 or less (a deadline already past)
    takes what is there and raises PeerTimeout at once when nothing is."""
    import socket

    from remsh.errors import PeerTimeout
    from remsh.transports.base import SocketStream
    from remsh.wire import Wire

    a, b = socket.socketpair()
    wa, wb = Wire(SocketStream(a), label="a"), Wire(SocketStream(b), label="b")
    try:
        for timeout in (0.0, -1.0):
            with pytest.raises(PeerTimeout):
                wa.read_box(timeout)
            wb.send_box({b"k": b"v"})
            assert wa.read_box(timeout) == {b"k": b"v"}
    finally:
        wa.close()
        wb.close()


def test_count_boxes_takes_bytes_bytearray_and_views() -> None:
    """count_boxes counts the same boxes in bytes, a bytearray and a memoryview of them."""
    from remsh.wire import count_boxes

    prefix, key = ExecuteControl.output_head(b"stdout")
    data = encode_box({}) + encode_data_boxes(key, bytes(3 * MAX_VALUE_LENGTH + 1), prefix) + encode_box({b"k": b""})
    for form in (data, bytearray(data), memoryview(data)):
        assert count_boxes(form) == 1 + 4 + 1
