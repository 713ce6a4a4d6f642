"""The verified bulk transfer pieces (remsh.bulk) and the decoder's handling
of data boxes split across receives."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import socket
import threading

import pytest

from remsh.bulk import FramedBlock, Sink, reader_for, send_blocks, writer_for_fd
from remsh.wire import DATA_BLOCK, MAX_VALUE_LENGTH, BoxDecoder, WireError, encode_data_boxes

SIZES = [0, 1, MAX_VALUE_LENGTH - 1, MAX_VALUE_LENGTH, MAX_VALUE_LENGTH + 1, DATA_BLOCK - 1, DATA_BLOCK]


def _file(tmp_path, data: bytes) -> str:
    path = os.path.join(tmp_path, "src.bin")
    with open(path, "wb") as f:
        f.write(data)
    return path


@pytest.mark.parametrize("size", SIZES)
def test_framed_block_from_a_file_encodes_like_encode_data_boxes(tmp_path, size):
    """A block filled from a file descriptor holds exactly the boxes encode_data_boxes makes of the same bytes."""
    data = os.urandom(size)
    block = FramedBlock(b"data")
    with open(_file(tmp_path, data), "rb", buffering=0) as f:
        assert block.fill(f.fileno()) == size
    assert bytes(block.encoded()) == (encode_data_boxes(b"data", data) if size else b"")
    assert b"".join(block.data()) == data


def test_framed_block_reused_after_a_short_fill_is_whole_again(tmp_path):
    """A block refilled after a short (end-of-file) fill encodes full boxes again, not the old short one."""
    block = FramedBlock(b"data")
    block.fill_with(io.BytesIO(b"x" * 1000).readinto)
    data = os.urandom(DATA_BLOCK)
    assert block.fill_with(io.BytesIO(data).readinto) == DATA_BLOCK
    assert bytes(block.encoded()) == encode_data_boxes(b"data", data)


class _Trickle(io.RawIOBase):
    """A raw stream that returns at most 1000 bytes per read (like a pipe)."""

    def __init__(self, data: bytes) -> None:
        self._src = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        chunk = self._src.read(min(len(b), 1000))
        b[: len(chunk)] = chunk
        return len(chunk)


@pytest.mark.parametrize("source", ["fileio", "buffered", "trickle", "read-only"])
def test_send_blocks_sends_every_byte_in_order_with_its_digest(tmp_path, source):
    """send_blocks sends the whole source as data boxes (reusing its buffers) and returns its SHA-256, from any kind of file object."""
    data = os.urandom(3 * DATA_BLOCK + 12345)
    path = _file(tmp_path, data)
    if source == "fileio":
        f = open(path, "rb", buffering=0)
    elif source == "buffered":
        f = open(path, "rb")
    elif source == "trickle":
        f = _Trickle(data)
    else:
        class ReadOnly:
            def __init__(self) -> None:
                self._src = io.BytesIO(data)

            def read(self, n: int) -> bytes:
                return self._src.read(min(n, 7000))

        f = ReadOnly()
    sent = []
    progress = []
    with f if hasattr(f, "close") else contextlib.nullcontext():
        digest, error = send_blocks(reader_for(f), lambda view: sent.append(bytes(view)), progress.append)
    assert error is None
    assert digest == hashlib.sha256(data).hexdigest()
    decoder = BoxDecoder()
    boxes = decoder.feed(b"".join(sent))
    assert b"".join(box[b"data"] for box in boxes) == data
    assert all(len(box[b"data"]) <= MAX_VALUE_LENGTH for box in boxes)
    assert sum(progress) == len(data)


def test_send_blocks_reports_a_read_error_after_sending_what_was_read():
    """A source failing on its third block: the first two were sent, the OSError is returned, and no helper thread is left."""
    reads = [0]

    def fill(block: FramedBlock) -> int:
        reads[0] += 1
        if reads[0] == 3:
            raise OSError(5, "Input/output error")
        return block.fill_with(io.BytesIO(b"z" * DATA_BLOCK).readinto)

    sent = []
    before = threading.active_count()
    digest, error = send_blocks(fill, lambda view: sent.append(len(view)))
    assert digest == ""
    assert isinstance(error, OSError) and error.errno == 5
    assert len(sent) == 2
    assert threading.active_count() == before


def test_send_blocks_stops_its_helper_when_sending_fails():
    """An exception from send propagates and the hashing thread is stopped."""
    before = threading.active_count()
    src = io.BytesIO(os.urandom(3 * DATA_BLOCK))

    def send(view: memoryview) -> None:
        raise ConnectionResetError("gone")

    with pytest.raises(ConnectionResetError):
        send_blocks(reader_for(src), send)
    assert threading.active_count() == before


def test_sink_hashes_and_writes_every_chunk_in_order(tmp_path):
    """Chunks handed to a threaded sink land in the file in order, with the SHA-256 of all of them."""
    path = os.path.join(tmp_path, "out.bin")
    chunks = [os.urandom(random.randint(1, MAX_VALUE_LENGTH)) for _ in range(200)]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        sink = Sink(writer_for_fd(fd))
        for c in chunks:
            sink.add(c)
        digest = sink.finish()
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        assert f.read() == b"".join(chunks)
    assert digest == hashlib.sha256(b"".join(chunks)).hexdigest()
    assert sink.error is None


def test_sink_keeps_the_first_write_error_and_still_hashes():
    """A failing write is kept as the sink's error, later batches are not written, and the digest still covers everything."""
    calls = []

    def write(batch):
        calls.append(len(batch))
        raise OSError(28, "No space left on device")

    sink = Sink(write)
    data = [b"a" * MAX_VALUE_LENGTH] * 64
    for d in data:
        sink.add(d)
    digest = sink.finish()
    assert isinstance(sink.error, OSError) and sink.error.errno == 28
    assert len(calls) == 1
    assert digest == hashlib.sha256(b"".join(data)).hexdigest()


def test_small_sink_starts_no_thread():
    """Less than one batch of data is hashed and written in the caller's thread."""
    before = threading.active_count()
    written = []
    sink = Sink(lambda batch: written.extend(batch))
    sink.add(b"hello")
    assert threading.active_count() == before
    assert sink.finish() == hashlib.sha256(b"hello").hexdigest()
    assert written == [b"hello"]


@pytest.mark.parametrize("seed", range(5))
def test_decoder_reassembles_data_boxes_split_anywhere(seed):
    """Data boxes fed in random pieces (from 1 byte to several boxes) decode to the same boxes as fed whole."""
    rng = random.Random(seed)
    data = rng.randbytes(5 * MAX_VALUE_LENGTH + 777)
    stream = encode_data_boxes(b"data", data) + b"\x00\x01k\x00\x01v\x00\x00"
    decoder = BoxDecoder()
    boxes = []
    pos = 0
    buf = memoryview(bytearray(len(stream)))
    while pos < len(stream):
        n = rng.choice([1, 2, 3, rng.randint(1, 300), rng.randint(1, 3 * MAX_VALUE_LENGTH)])
        piece = stream[pos : pos + n]
        buf[: len(piece)] = piece  # like a reused receive buffer
        boxes += decoder.feed(buf[: len(piece)])
        buf[: len(piece)] = b"\xff" * len(piece)  # overwritten before the next receive
        pos += n
    assert boxes[-1] == {b"k": b"v"}
    assert b"".join(b[b"data"] for b in boxes[:-1]) == data
    assert not decoder.in_box


def test_decoder_refuses_an_oversized_value_as_soon_as_its_prefix_completes():
    """A value length over the box limit is refused when its second prefix byte arrives, split across feeds."""
    decoder = BoxDecoder(max_box_bytes=1000)
    assert decoder.feed(b"\x00\x01k\x00\x01v\x00\x01") == []
    assert decoder.feed(b"x\x04") == []
    with pytest.raises(WireError):
        decoder.feed(b"\x00")


def test_peer_on_this_host_is_told_from_the_socket():
    """A socket pair and loopback TCP reach this host; a stream without a socket counts as remote."""
    from remsh.bulk import _peer_on_this_host
    from remsh.transports.base import SocketStream

    a, b = socket.socketpair()
    with a, b:
        assert _peer_on_this_host(SocketStream(a, peer="pair", send_timeout=None))
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        with client, conn:
            assert _peer_on_this_host(SocketStream(client))
    assert not _peer_on_this_host(object())


def test_peer_on_this_host_looks_through_an_ssh_channel():
    """A stream over an SSH channel is judged by the socket of the channel's transport."""
    from remsh.bulk import _peer_on_this_host

    class Transport:
        def __init__(self, sock: socket.socket) -> None:
            self.sock = sock

    class Channel:
        def __init__(self, sock: socket.socket) -> None:
            self._transport = Transport(sock)

        def get_transport(self) -> Transport:
            return self._transport

    class ChannelStream:
        def __init__(self, sock: socket.socket) -> None:
            self.channel = Channel(sock)

    a, b = socket.socketpair()
    with a, b:
        assert _peer_on_this_host(ChannelStream(a))


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity")
def test_no_helper_thread_on_one_cpu():
    """A thread allowed on one CPU hashes inline: no helper thread is started for a multi-block source."""
    from remsh.bulk import overlap

    started = []
    original = threading.Thread.start

    def spy(self):  # type: ignore[no-untyped-def]
        started.append(self.name)
        original(self)

    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    threading.Thread.start = spy  # type: ignore[method-assign]
    try:
        assert not overlap()
        data = os.urandom(3 * DATA_BLOCK)
        digest, error = send_blocks(reader_for(io.BytesIO(data)), lambda view: None)
        sink = Sink(lambda batch: None)
        for i in range(0, len(data), MAX_VALUE_LENGTH):
            sink.add(data[i : i + MAX_VALUE_LENGTH])
        assert sink.finish() == digest == hashlib.sha256(data).hexdigest()
    finally:
        threading.Thread.start = original  # type: ignore[method-assign]
        os.sched_setaffinity(0, cpus)
    assert started == []


def test_blocks_are_reused_across_transfers_and_never_shared():
    """A finished transfer's block serves the next one; transfers running at once in threads each get their own and send exactly their own data."""
    from remsh.bulk import give_back, take_block

    held = [take_block(b"data") for _ in range(5)]  # the pool is empty now
    give_back(held[0])
    assert take_block(b"data") is held[0]
    for block in held:
        give_back(block)

    sources = [os.urandom(2 * DATA_BLOCK + i * 1000) for i in range(4)]
    results: dict = {}

    def one(i: int) -> None:
        sent = []
        digest, error = send_blocks(reader_for(io.BytesIO(sources[i])), lambda view: sent.append(bytes(view)))
        boxes = BoxDecoder().feed(b"".join(sent))
        results[i] = (digest, b"".join(b[b"data"] for b in boxes), error)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, src in enumerate(sources):
        assert results[i] == (hashlib.sha256(src).hexdigest(), src, None)


def test_send_and_fetch_with_the_helper_threads_round_trip(slave, basedir, tmp_path, monkeypatch):
    """With the hashing helpers forced on in the master, a multi-block send and fetch through a real slave arrive whole and verified."""
    import remsh.bulk

    monkeypatch.setattr(remsh.bulk, "overlap", lambda stream=None: True)
    started = []
    original = threading.Thread.start

    def spy(self):  # type: ignore[no-untyped-def]
        started.append(self.name)
        original(self)

    monkeypatch.setattr(threading.Thread, "start", spy)
    data = os.urandom(5 * DATA_BLOCK + 4321)
    src = os.path.join(tmp_path, "src.bin")
    with open(src, "wb") as f:
        f.write(data)
    slave.send(src, "copy.bin")
    with open(os.path.join(basedir, "copy.bin"), "rb") as f:
        assert f.read() == data
    back = os.path.join(tmp_path, "back.bin")
    slave.fetch("copy.bin", back)
    with open(back, "rb") as f:
        assert f.read() == data
    assert started.count("remsh-sha256") == 2  # one for the send, one for the fetch
    assert not [t for t in threading.enumerate() if t.name == "remsh-sha256"]


def test_sink_holds_no_empty_chunks_and_flushes_many_tiny_ones():
    """A peer's empty data boxes are not kept, and tiny ones are written every SINK_BATCH_CHUNKS chunks: what a sink holds is bounded by count as well as bytes."""
    from remsh.bulk import SINK_BATCH_CHUNKS
    written = []
    sink = Sink(lambda batch: written.append(b"".join(batch)), threaded=False)
    try:
        for _ in range(100_000):
            sink.add(b"")
        assert written == [] and len(sink._batch) == 0
        for _ in range(SINK_BATCH_CHUNKS * 3 + 5):
            sink.add(b"x")
        assert [len(w) for w in written] == [SINK_BATCH_CHUNKS] * 3
        assert len(sink._batch) == 5
        assert sink.finish() == hashlib.sha256(b"x" * (SINK_BATCH_CHUNKS * 3 + 5)).hexdigest()
    finally:
        sink.close()


@pytest.mark.parametrize("helper", [False, True], ids=["inline", "helper"])
def test_lent_blocks_are_never_refilled_until_given_back(tmp_path, monkeypatch, helper):
    """Lending blocks (a session's sender): every block lent holds its data until given back, even while other transfers take blocks from the pool; the digest is that of the source; given back, the blocks return to the pool."""
    import remsh.bulk
    from remsh.bulk import give_back, take_block

    monkeypatch.setattr(remsh.bulk, "overlap", lambda stream=None: helper)
    data = os.urandom(6 * DATA_BLOCK + 777)
    lent: list = []

    def lend(view: memoryview, boxes: int, back) -> None:  # type: ignore[no-untyped-def]
        lent.append((view, bytes(view), boxes, back))
        other = take_block(b"data")  # another transfer, scribbling on whatever the pool hands out
        other.fill_with(io.BytesIO(b"\xff" * DATA_BLOCK).readinto)
        give_back(other)

    with open(_file(tmp_path, data), "rb", buffering=0) as f:
        digest, error = send_blocks(reader_for(f), lambda view: pytest.fail("sent, not lent"), lend=lend)
    assert (digest, error) == (hashlib.sha256(data).hexdigest(), None)
    assert all(bytes(view) == snapshot for view, snapshot, _, _ in lent)
    boxes = BoxDecoder().feed(b"".join(snapshot for _, snapshot, _, _ in lent))
    assert b"".join(box[b"data"] for box in boxes) == data
    assert [n for _, _, n, _ in lent] == [16] * 6 + [1]
    assert len({id(view.obj) for view, _, _, _ in lent}) == len(lent)  # each lent a block of its own
    for _, _, _, back in lent:
        back()
    pooled = [take_block(b"data") for _ in range(3)]
    lent_buffers = {id(view.obj) for view, _, _, _ in lent}
    assert any(id(block.encoded().obj) in lent_buffers for block in pooled)
    for block in pooled:
        give_back(block)


def test_a_block_given_back_by_its_session_before_it_is_hashed_is_not_reused_too_early(tmp_path, monkeypatch):
    """A session that forgets a lent block at once (an ack racing the hashing) does not free it for another transfer before it is hashed: the digest stays right."""
    import remsh.bulk
    from remsh.bulk import give_back, take_block

    monkeypatch.setattr(remsh.bulk, "overlap", lambda stream=None: False)
    data = os.urandom(3 * DATA_BLOCK)

    def lend(view: memoryview, boxes: int, back) -> None:  # type: ignore[no-untyped-def]
        back()  # acknowledged before the sender hashes the block
        others = [take_block(b"data") for _ in range(remsh.bulk.POOL_BLOCKS + 1)]
        for other in others:  # every block the pool has, overwritten
            other.fill_with(io.BytesIO(b"\xee" * DATA_BLOCK).readinto)
        for other in others:
            give_back(other)

    with open(_file(tmp_path, data), "rb", buffering=0) as f:
        digest, error = send_blocks(reader_for(f), lambda view: pytest.fail("sent, not lent"), lend=lend)
    assert (digest, error) == (hashlib.sha256(data).hexdigest(), None)
