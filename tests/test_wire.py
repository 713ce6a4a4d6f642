"""The box codec without I/O, and the synchronous Wire over a socket pair."""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from typing import Dict, Iterator, List, Sequence, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from remsh.errors import Disconnected, PeerTimeout, ProtocolError, RemshError
from remsh.transports.base import SocketStream
from remsh.wire import (DEFAULT_MAX_BOX_BYTES, DEFAULT_MAX_KEYS, MAX_KEY_LENGTH, MAX_VALUE_LENGTH,
                        BoxDecoder, Wire, WireError, decode_bool, decode_int, decode_list,
                        encode_bool, encode_box, encode_int, encode_list)

pytestmark = pytest.mark.timeout(60)

Box = Dict[bytes, bytes]


# -- a reference AMP implementation ------------------------------------------
#
# Transcribed from Twisted (twisted/protocols/amp.py): ``AmpBox.serialize``
# sorts the items and writes each key then its value with a 2-byte big-endian
# length (``pack("!H", len)``), then ``pack("!H", 0)``; ``BinaryBoxProtocol``
# reads 2-byte lengths, a zero-length key ending the box.


def amp_serialize(box: Box) -> bytes:
    out = []
    for k, v in sorted(box.items()):
        assert len(k) <= 0xFF and len(v) <= 0xFFFF
        for kv in (k, v):
            out.append(struct.pack("!H", len(kv)))
            out.append(kv)
    out.append(struct.pack("!H", 0))
    return b"".join(out)


def amp_parse(data: bytes) -> List[Box]:
    boxes: List[Box] = []
    box: Box = {}
    key = None
    pos = 0
    while pos < len(data):
        (n,) = struct.unpack_from("!H", data, pos)
        s = data[pos + 2 : pos + 2 + n]
        assert len(s) == n
        pos += 2 + n
        if key is None:
            if n == 0:
                boxes.append(box)
                box = {}
            else:
                key = s
        else:
            box[key] = s
            key = None
    assert key is None and not box, "trailing partial box"
    return boxes


# -- feeding helpers -----------------------------------------------------------


def chunkings(data: bytes, seed: int = 1) -> Iterator[Tuple[str, List[bytes]]]:
    """The three ways every input is fed: whole, one byte at a time, random cuts."""
    yield "whole", [data]
    yield "bytewise", [data[i : i + 1] for i in range(len(data))]
    rng = random.Random(seed)
    for round_ in range(3):
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 8)))) \
            if len(data) > 1 else []
        bounds = [0] + cuts + [len(data)]
        yield f"random{round_}", [data[a:b] for a, b in zip(bounds, bounds[1:])]


def feed_chunks(decoder: BoxDecoder, chunks: Sequence[bytes]) -> List[Box]:
    boxes: List[Box] = []
    for chunk in chunks:
        boxes.extend(decoder.feed(chunk))
    return boxes


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


# -- golden vectors --------------------------------------------------------------

WIDTH = bytes.fromhex("0005") + b"width" + bytes.fromhex("0004") + b"12cm" + bytes.fromhex("0000")

# The Sum example of AMP's documentation, as Twisted writes it (keys sorted).
AMP_SUM = (bytes.fromhex("0004") + b"_ask" + bytes.fromhex("0002") + b"23"
           + bytes.fromhex("0008") + b"_command" + bytes.fromhex("0003") + b"Sum"
           + bytes.fromhex("0001") + b"a" + bytes.fromhex("0002") + b"13"
           + bytes.fromhex("0001") + b"b" + bytes.fromhex("0002") + b"81"
           + bytes.fromhex("0000"))
AMP_SUM_BOX = {b"_ask": b"23", b"_command": b"Sum", b"a": b"13", b"b": b"81"}
AMP_ANSWER = (bytes.fromhex("0007") + b"_answer" + bytes.fromhex("0002") + b"23"
              + bytes.fromhex("0005") + b"total" + bytes.fromhex("0002") + b"94"
              + bytes.fromhex("0000"))
AMP_ANSWER_BOX = {b"_answer": b"23", b"total": b"94"}

GOLDEN = [
    ({b"width": b"12cm"}, WIDTH),
    ({}, b"\x00\x00"),
    ({b"k": b""}, b"\x00\x01k\x00\x00\x00\x00"),
    ({b"\x00": b"\x00\x00"}, b"\x00\x01\x00\x00\x02\x00\x00\x00\x00"),
    (AMP_SUM_BOX, AMP_SUM),
    (AMP_ANSWER_BOX, AMP_ANSWER),
    ({b"K" * 255: b"V" * 65535}, u16(255) + b"K" * 255 + u16(65535) + b"V" * 65535 + b"\x00\x00"),
]
GOLDEN_IDS = ["width", "empty-box", "empty-value", "nul-bytes", "amp-sum", "amp-answer", "maximal"]


@pytest.mark.parametrize("box,data", GOLDEN, ids=GOLDEN_IDS)
def test_encode_golden(box: Box, data: bytes) -> None:
    """encode_box writes the exact AMP byte layout (keys in the order given)."""
    assert encode_box(box) == data


@pytest.mark.parametrize("box,data", GOLDEN, ids=GOLDEN_IDS)
def test_decode_golden_every_chunking(box: Box, data: bytes) -> None:
    """A golden box decodes the same whole, byte by byte and in random chunks."""
    for how, chunks in chunkings(data):
        decoder = BoxDecoder()
        assert feed_chunks(decoder, chunks) == [box], how
        assert not decoder.in_box, how
        decoder.close()


@pytest.mark.parametrize("box,data", GOLDEN, ids=GOLDEN_IDS)
def test_decode_leaves_next_box_in_buffer(box: Box, data: bytes) -> None:
    """Trailing bytes of the next box stay buffered until that box completes."""
    nxt = encode_box({b"next": b"box"})
    for cut in range(1, len(nxt)):
        ways = list(chunkings(data + nxt[:cut]))
        if len(data) > 1000 and cut > 1:
            ways = [w for w in ways if w[0] != "bytewise"]  # once is enough for the big one
        for how, chunks in ways:
            decoder = BoxDecoder()
            assert feed_chunks(decoder, chunks) == [box], (how, cut)
            assert decoder.in_box, (how, cut)
            assert decoder.feed(nxt[cut:]) == [{b"next": b"box"}], (how, cut)
            assert not decoder.in_box
            decoder.close()


def test_several_boxes_in_one_feed() -> None:
    """One feed completing several boxes returns them all, in order."""
    boxes = [{b"a": b"1"}, {}, {b"b": b"2", b"c": b""}, AMP_SUM_BOX]
    data = b"".join(encode_box(b) for b in boxes)
    for how, chunks in chunkings(data):
        assert feed_chunks(BoxDecoder(), chunks) == boxes, how


def test_str_keys_and_values_are_utf8() -> None:
    """str keys and values are encoded as UTF-8."""
    assert encode_box({"wïdth": "12 cm€"}) == encode_box({"wïdth".encode(): "12 cm€".encode()})
    assert BoxDecoder().feed(encode_box({"clé": "été"})) == [{"clé".encode(): "été".encode()}]


def test_amp_serialized_boxes_decode() -> None:
    """Boxes written by (a transcription of) Twisted's AMP serializer decode here."""
    boxes = [AMP_SUM_BOX, AMP_ANSWER_BOX, {b"_error": b"1", b"_error_code": b"UNKNOWN",
                                           b"_error_description": b"Unknown Error"}]
    data = b"".join(amp_serialize(b) for b in boxes)
    assert amp_serialize(AMP_SUM_BOX) == AMP_SUM
    for how, chunks in chunkings(data):
        assert feed_chunks(BoxDecoder(), chunks) == boxes, how


# -- limits and bad input ----------------------------------------------------------


def assert_wire_error(decoder: BoxDecoder, data: bytes) -> WireError:
    with pytest.raises(WireError) as info:
        decoder.feed(data)
    err = info.value
    assert isinstance(err, ProtocolError) and isinstance(err, RemshError)
    return err


def assert_stays_failed(decoder: BoxDecoder) -> None:
    with pytest.raises(WireError):
        decoder.feed(b"\x00\x00")
    with pytest.raises(WireError):
        decoder.feed(b"")
    with pytest.raises(WireError):
        decoder.close()


def test_overlong_key_refused_from_its_length_prefix() -> None:
    """A key length over 255 is refused as soon as its prefix arrives."""
    decoder = BoxDecoder()
    assert decoder.feed(encode_box({b"ok": b"1"})) == [{b"ok": b"1"}]
    assert_wire_error(decoder, u16(MAX_KEY_LENGTH + 1))
    assert_stays_failed(decoder)


def test_key_of_255_bytes_accepted_byte_by_byte() -> None:
    """A key of exactly 255 bytes is accepted."""
    data = encode_box({b"k" * 255: b"v"})
    decoder = BoxDecoder()
    assert feed_chunks(decoder, [data[i : i + 1] for i in range(len(data))]) == [{b"k" * 255: b"v"}]


def test_overlong_key_after_a_value() -> None:
    """A second key over 255 bytes is refused too (not just the first)."""
    decoder = BoxDecoder()
    assert decoder.feed(b"\x00\x01a\x00\x01x") == []
    assert_wire_error(decoder, b"\xff\xff")
    assert_stays_failed(decoder)


def test_duplicate_key_refused() -> None:
    """A key repeated in one box is a protocol error, raised when the key arrives."""
    data = b"\x00\x01a\x00\x01x" + b"\x00\x01a"
    for how, chunks in chunkings(data):
        decoder = BoxDecoder()
        with pytest.raises(WireError, match="duplicate"):
            feed_chunks(decoder, chunks)
        assert_stays_failed(decoder)


def test_same_key_in_two_boxes_is_fine() -> None:
    """Duplicate-key detection is per box."""
    data = encode_box({b"a": b"1"}) + encode_box({b"a": b"2"})
    assert BoxDecoder().feed(data) == [{b"a": b"1"}, {b"a": b"2"}]


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 6, 7, len(WIDTH) - 1])
def test_truncated_box_fails_on_close(cut: int) -> None:
    """End of stream inside a box (at any byte) is a truncated box."""
    decoder = BoxDecoder()
    assert decoder.feed(WIDTH[:cut]) == []
    assert decoder.in_box
    with pytest.raises(WireError, match="truncated"):
        decoder.close()
    assert_stays_failed(decoder)


def test_close_between_boxes_is_clean() -> None:
    """End of stream exactly between boxes is a clean close."""
    decoder = BoxDecoder()
    decoder.close()
    decoder = BoxDecoder()
    assert decoder.feed(WIDTH + WIDTH) == [{b"width": b"12cm"}] * 2
    decoder.close()


def test_key_count_limit() -> None:
    """max_keys keys pass; one more is refused at that key's length prefix."""
    ok = encode_box({b"a": b"", b"b": b"", b"c": b""})
    assert BoxDecoder(max_keys=3).feed(ok) == [{b"a": b"", b"b": b"", b"c": b""}]
    decoder = BoxDecoder(max_keys=2)
    assert decoder.feed(ok[:10]) == []  # a, b and their (empty) values
    assert_wire_error(decoder, ok[10:12])  # just the prefix of the third key
    assert_stays_failed(decoder)


def test_default_key_count_limit() -> None:
    """The default key limit holds: DEFAULT_MAX_KEYS + 1 keys are refused."""
    box = {b"%d" % i: b"" for i in range(DEFAULT_MAX_KEYS)}
    assert BoxDecoder().feed(encode_box(box)) == [box]
    box[b"one-more"] = b""
    with pytest.raises(WireError):
        BoxDecoder().feed(encode_box(box))


def test_box_byte_limit_exact_and_over() -> None:
    """A box of exactly max_box_bytes passes; one byte more is refused."""
    box = {b"key": b"v" * 100}
    data = encode_box(box)
    assert BoxDecoder(max_box_bytes=len(data)).feed(data) == [box]
    decoder = BoxDecoder(max_box_bytes=len(data) - 1)
    with pytest.raises(WireError, match="larger"):
        decoder.feed(data)
    assert_stays_failed(decoder)


def test_box_byte_limit_refuses_before_the_value_arrives() -> None:
    """An oversize value is refused from its length prefix, before its bytes."""
    decoder = BoxDecoder(max_box_bytes=1000)
    assert decoder.feed(b"\x00\x04data") == []
    assert_wire_error(decoder, u16(60000))
    assert_stays_failed(decoder)


def test_box_byte_limit_counts_the_whole_box() -> None:
    """Many small keys add up to the box-byte limit."""
    box = {b"%03d" % i: b"x" * 50 for i in range(40)}
    data = encode_box(box)
    assert BoxDecoder(max_box_bytes=len(data)).feed(data) == [box]
    decoder = BoxDecoder(max_box_bytes=len(data) // 2)
    with pytest.raises(WireError):
        feed_chunks(decoder, [data[i : i + 7] for i in range(0, len(data), 7)])


def test_default_box_byte_limit() -> None:
    """The default box-byte limit holds for a box of many large values."""
    n = DEFAULT_MAX_BOX_BYTES // MAX_VALUE_LENGTH + 1
    data = encode_box({b"%d" % i: b"x" * MAX_VALUE_LENGTH for i in range(n)})
    with pytest.raises(WireError):
        BoxDecoder().feed(data)


def test_limits_must_be_sane() -> None:
    """BoxDecoder refuses limits that could never admit a box."""
    with pytest.raises(ValueError):
        BoxDecoder(max_keys=0)
    with pytest.raises(ValueError):
        BoxDecoder(max_box_bytes=1)


# -- encode_box argument checks -----------------------------------------------------


def test_encode_rejects_bad_lengths() -> None:
    """encode_box refuses an empty key, a 256-byte key and a 65536-byte value."""
    with pytest.raises(ValueError):
        encode_box({b"": b"x"})
    with pytest.raises(ValueError):
        encode_box({"": "x"})
    with pytest.raises(ValueError):
        encode_box({b"k" * 256: b"x"})
    with pytest.raises(ValueError):
        encode_box({b"k": b"x" * 65536})


def test_encode_rejects_non_bytes() -> None:
    """encode_box refuses keys and values that are neither bytes nor str."""
    with pytest.raises(TypeError):
        encode_box({b"k": 1})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        encode_box({1: b"v"})  # type: ignore[dict-item]


@settings(max_examples=200, deadline=None)
@given(klen=st.integers(0, 600), vlen=st.integers(0, 70000))
def test_encode_length_rule(klen: int, vlen: int) -> None:
    """encode_box accepts exactly keys of 1..255 bytes and values of 0..65535."""
    box = {b"k" * klen: b"v" * vlen}
    if 1 <= klen <= MAX_KEY_LENGTH and vlen <= MAX_VALUE_LENGTH:
        assert BoxDecoder().feed(encode_box(box)) == [box]
    else:
        with pytest.raises(ValueError):
            encode_box(box)


# -- value conventions -----------------------------------------------------------------


def test_value_conventions() -> None:
    """Integers are ASCII decimal, booleans y/n, lists NUL-joined; bad input is ValueError."""
    assert encode_int(-15) == b"-15" and decode_int(b"-15") == -15 and decode_int(b"0") == 0
    assert encode_bool(True) == b"y" and encode_bool(False) == b"n"
    assert decode_bool(b"y") is True and decode_bool(b"n") is False
    assert encode_list([b"sh", b"-c", b""]) == b"sh\0-c\0"
    assert decode_list(b"sh\0-c\0") == [b"sh", b"-c", b""]
    assert decode_list(b"") == []
    for bad in (b"", b"1.5", b"x", b"--1"):
        with pytest.raises(ValueError):
            decode_int(bad)
    with pytest.raises(ValueError):
        decode_bool(b"yes")
    with pytest.raises(ValueError):
        encode_list([b"a\0b"])


# -- property tests --------------------------------------------------------------------

keys = st.binary(min_size=1, max_size=MAX_KEY_LENGTH)
values = st.one_of(
    st.binary(max_size=64),
    st.tuples(st.integers(0, 2**32), st.integers(60000, MAX_VALUE_LENGTH)).map(
        lambda t: random.Random(t[0]).randbytes(t[1])),
)
boxes_st = st.dictionaries(keys, st.binary(max_size=300), max_size=8)


def split(data: bytes, cuts: List[int]) -> List[bytes]:
    bounds = sorted({0, len(data), *[c % (len(data) + 1) for c in cuts]})
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(boxes=st.lists(boxes_st, max_size=6), cuts=st.lists(st.integers(0, 1 << 20), max_size=30))
def test_round_trip_any_chunking(boxes: List[Box], cuts: List[int]) -> None:
    """Any boxes, encoded and fed in any chunking, decode to the same boxes."""
    data = b"".join(encode_box(b) for b in boxes)
    decoder = BoxDecoder()
    assert feed_chunks(decoder, split(data, cuts)) == boxes
    assert not decoder.in_box
    decoder.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(box=st.dictionaries(keys, values, max_size=3), cuts=st.lists(st.integers(0, 1 << 20), max_size=10))
def test_round_trip_large_values(box: Box, cuts: List[int]) -> None:
    """Values up to the 65535-byte maximum round-trip in any chunking."""
    data = encode_box(box)
    assert feed_chunks(BoxDecoder(), split(data, cuts)) == [box]


@settings(max_examples=200, deadline=None)
@given(boxes=st.lists(boxes_st, max_size=4))
def test_byte_compatible_with_amp(boxes: List[Box]) -> None:
    """Sorted boxes encode exactly as AMP serializes them, and decode both ways."""
    ours = b"".join(encode_box(dict(sorted(b.items()))) for b in boxes)
    amps = b"".join(amp_serialize(b) for b in boxes)
    assert ours == amps
    assert amp_parse(ours) == boxes
    assert BoxDecoder().feed(amps) == boxes


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 1000), max_size=10),
       max_keys=st.integers(1, 8), max_box_bytes=st.integers(2, 400))
def test_arbitrary_bytes_raise_only_wire_error(data: bytes, cuts: List[int], max_keys: int,
                                               max_box_bytes: int) -> None:
    """Arbitrary bytes, in any chunking and under any limits, raise nothing but WireError."""
    decoder = BoxDecoder(max_keys=max_keys, max_box_bytes=max_box_bytes)
    try:
        for chunk in split(data, cuts):
            for box in decoder.feed(chunk):
                assert len(box) <= max_keys
                assert len(encode_box(box)) <= max_box_bytes
        decoder.close()
    except WireError:
        assert_stays_failed(decoder)


token = st.one_of(
    st.integers(0, 300).map(u16),  # plausible length prefixes, some over the key limit
    st.binary(min_size=1, max_size=40),
    st.just(b"\x00\x00"),
)


@settings(max_examples=250, deadline=None)
@given(tokens=st.lists(token, max_size=40), cuts=st.lists(st.integers(0, 2000), max_size=10))
def test_near_valid_streams_raise_only_wire_error(tokens: List[bytes], cuts: List[int]) -> None:
    """Streams of plausible prefixes and payloads raise nothing but WireError."""
    data = b"".join(tokens)
    decoder = BoxDecoder(max_keys=4, max_box_bytes=200)
    try:
        feed_chunks(decoder, split(data, cuts))
        decoder.close()
    except WireError:
        assert_stays_failed(decoder)


# -- Wire over a socket pair ---------------------------------------------------------


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    wire = Wire(SocketStream(a, peer="test peer"), label="test peer")
    try:
        yield wire, b
    finally:
        wire.close()
        b.close()


def test_wire_reads_boxes_then_none_at_clean_eof(pair) -> None:
    """read_box returns each box, then None when the peer closes between boxes."""
    wire, peer = pair
    peer.sendall(encode_box({b"a": b"1"}) + encode_box({b"b": b"2"}))
    peer.shutdown(socket.SHUT_WR)
    assert wire.read_box(5) == {b"a": b"1"}
    assert wire.read_box(5) == {b"b": b"2"}
    assert wire.read_box(5) is None
    assert wire.at_eof
    assert wire.read_box(5) is None


def test_wire_eof_mid_box_is_wire_error(pair) -> None:
    """EOF inside a box raises WireError, and keeps raising afterwards."""
    wire, peer = pair
    peer.sendall(encode_box({b"a": b"1"}) + WIDTH[:7])
    peer.shutdown(socket.SHUT_WR)
    assert wire.read_box(5) == {b"a": b"1"}
    with pytest.raises(WireError):
        wire.read_box(5)
    with pytest.raises(WireError):
        wire.read_box(5)


def test_wire_bad_input_is_wire_error(pair) -> None:
    """A key length over the limit on the stream raises WireError from read_box."""
    wire, peer = pair
    peer.sendall(b"\x01\x00")
    with pytest.raises(WireError):
        wire.read_box(5)
    peer.sendall(encode_box({b"a": b"1"}))
    with pytest.raises(WireError):
        wire.read_box(5)


def test_wire_limits_are_enforced(pair) -> None:
    """Wire applies its max_keys limit to incoming boxes."""
    _, peer = pair
    a, b = socket.socketpair()
    wire = Wire(SocketStream(a), max_keys=1)
    try:
        b.sendall(encode_box({b"a": b"", b"b": b""}))
        with pytest.raises(WireError):
            wire.read_box(5)
    finally:
        wire.close()
        b.close()


def test_wire_timeout_is_peer_timeout(pair) -> None:
    """A silent peer makes read_box raise PeerTimeout after about its timeout."""
    wire, peer = pair
    start = time.monotonic()
    with pytest.raises(PeerTimeout):
        wire.read_box(0.2)
    elapsed = time.monotonic() - start
    assert 0.15 <= elapsed < 5
    assert isinstance(PeerTimeout("x"), Disconnected)


def test_wire_timeout_covers_a_partial_box(pair) -> None:
    """A box that starts but never finishes also times out."""
    wire, peer = pair
    peer.sendall(WIDTH[:5])
    with pytest.raises(PeerTimeout):
        wire.read_box(0.2)


def test_wire_greeting_then_box_in_one_segment(pair) -> None:
    """Raw greeting bytes and the first box arriving together are split correctly."""
    wire, peer = pair
    peer.sendall(b"REMSH-S\n" + encode_box({b"x": b"y"}))
    assert wire.read_exact(8, 5) == b"REMSH-S\n"
    assert wire.read_box(5) == {b"x": b"y"}


def test_wire_short_greeting_is_disconnected(pair) -> None:
    """A stream that ends before the greeting is complete raises Disconnected."""
    wire, peer = pair
    peer.sendall(b"REMSH")
    peer.shutdown(socket.SHUT_WR)
    with pytest.raises(Disconnected):
        wire.read_exact(8, 5)


def test_wire_send_after_close_is_disconnected(pair) -> None:
    """Sending on a closed Wire raises Disconnected."""
    wire, _ = pair
    wire.close()
    wire.close()  # idempotent
    with pytest.raises(Disconnected):
        wire.send_box({b"a": b"b"})


def test_wire_send_to_vanished_peer_is_disconnected(pair) -> None:
    """Sending to a peer that closed its end raises Disconnected."""
    wire, peer = pair
    peer.close()
    with pytest.raises(Disconnected):
        for _ in range(100):
            wire.send_box({b"data": b"x" * 60000})


def test_wire_concurrent_senders_never_interleave(pair) -> None:
    """Boxes sent from several threads at once arrive whole."""
    wire, peer = pair
    reader = Wire(SocketStream(peer, peer="reader"))
    per_thread = 200

    def sender(tag: bytes) -> None:
        for i in range(per_thread):
            wire.send_box({b"tag": tag, b"i": b"%d" % i, b"data": tag * 3000})

    threads = [threading.Thread(target=sender, args=(b"%d" % t,), daemon=True) for t in range(4)]
    for t in threads:
        t.start()
    seen: Dict[bytes, List[int]] = {}
    for _ in range(per_thread * len(threads)):
        box = reader.read_box(10)
        assert box is not None
        assert box[b"data"] == box[b"tag"] * 3000
        seen.setdefault(box[b"tag"], []).append(int(box[b"i"]))
    for t in threads:
        t.join(10)
    assert {k: v for k, v in seen.items()} == {b"%d" % t: list(range(per_thread)) for t in range(4)}


def test_box_framing_is_written_once():
    """Only remsh/wire.py spells out the framing (16-bit lengths, the end of
    a box): every other module frames boxes through its functions or its
    LENGTH, so the format has one definition."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1] / "remsh"
    pattern = re.compile(r'">H"|\\x00\\x0[0-9a-f]|to_bytes\(2')
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p.name != "wire.py" and pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []
