"""Hypothesis fuzzing of the parsers that read bytes from the other end: the
box decoder, the handshake machines and the session layer's counters.
(The tree stream readers and the control socket: tests/test_fuzz_readers.py.)

Each property says what a hostile peer can and cannot do: the only
exceptions are the documented protocol errors, and the reader's state stays
consistent.  ``make test`` runs a few examples of each
(``REMSH_FUZZ_EXAMPLES``, default 40); ``make fuzz`` runs many more.
"""

from __future__ import annotations

import hashlib
import os
import socket
from typing import Dict, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from remsh.errors import AuthenticationError, ProtocolError, UsageError
from remsh.handshake import (MASTER_GREETING, NONCE_LENGTH, PROTOCOL_VERSION, SLAVE_GREETING, MasterHandshake,
                             Refused, Registered, SlaveHandshake, State, master_proof, refusal_box, slave_proof)
from remsh.session import SessionWire
from remsh.transports.base import SocketStream
from remsh.wire import MAX_KEY_LENGTH, BoxDecoder, Wire, WireError, encode_box

#: Examples per property (``make fuzz`` raises it).
EXAMPLES = int(os.environ.get("REMSH_FUZZ_EXAMPLES", "40"))

pytestmark = pytest.mark.timeout(None if EXAMPLES > 1000 else 120)


def fuzz(weight: float = 1.0) -> settings:
    """Settings of one property: ``weight`` times :data:`EXAMPLES` examples,
    no deadline (a busy machine), nothing written to the tree."""
    return settings(max_examples=max(5, int(EXAMPLES * weight)), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# -- the box decoder ----------------------------------------------------------------------

keys = st.binary(min_size=1, max_size=20)
small_boxes = st.dictionaries(keys, st.binary(max_size=300), max_size=5)


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    """Well-formed boxes and garbage, spliced: most inputs get somewhere
    before they break (or never break)."""
    parts = draw(st.lists(st.one_of(small_boxes.map(encode_box), st.binary(max_size=40),
                                    st.sampled_from([b"\x00", b"\x00\x00", b"\xff\xff", b"\x01\x00"])),
                          max_size=8))
    return b"".join(parts)


def _chunked(data: bytes, cuts: List[int], kinds: List[int]) -> List[object]:
    """``data`` in pieces at ``cuts``, each piece as bytes, bytearray or memoryview."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    pieces: List[object] = []
    for i, (a, b) in enumerate(zip(points, points[1:])):
        piece = data[a:b]
        kind = kinds[i % len(kinds)] if kinds else 0
        pieces.append(piece if kind == 0 else bytearray(piece) if kind == 1 else memoryview(bytearray(piece)))
    return pieces


def _decode(pieces: List[object], max_keys: int, max_box_bytes: int
            ) -> Tuple[List[Dict[bytes, bytes]], Optional[WireError], BoxDecoder]:
    decoder = BoxDecoder(max_keys=max_keys, max_box_bytes=max_box_bytes)
    boxes: List[Dict[bytes, bytes]] = []
    for piece in pieces:
        try:
            boxes += decoder.feed(piece)  # type: ignore[arg-type]
        except WireError as e:
            return boxes, e, decoder
    return boxes, None, decoder


@fuzz(3)
@given(data=streams(), cuts=st.lists(st.integers(0, 4000), max_size=12),
       kinds=st.lists(st.integers(0, 2), max_size=5), max_keys=st.integers(1, 6),
       max_box_bytes=st.integers(2, 700))
def test_decoder_result_does_not_depend_on_chunking(data: bytes, cuts: List[int], kinds: List[int],
                                                     max_keys: int, max_box_bytes: int) -> None:
    """Any bytes in any chunking decode alike (up to a failure), raise only WireError and keep limits and in_box right."""
    # Any bytes in any chunking (bytes, bytearray, memoryview) decode to the
    # same boxes (up to a failure) and fail or not alike; only WireError is raised, and it sticks;
    # every box honours the limits and re-encodes to exactly the input it came
    # from; in_box says whether bytes of an unfinished box are held.
    # the reference: one byte at a time yields every box before a failure
    # (a call that fails returns nothing, so a bigger chunk may yield fewer)
    each, each_error, _ = _decode([data[i:i + 1] for i in range(len(data))], max_keys, max_box_bytes)
    boxes, error, decoder = _decode(_chunked(data, cuts, kinds), max_keys, max_box_bytes)
    assert boxes == each[:len(boxes)]
    assert (error is None) == (each_error is None)
    if error is None:
        assert boxes == each
    consumed = b"".join(encode_box(b) for b in boxes)
    assert data.startswith(consumed)
    for box in boxes:
        assert len(box) <= max_keys
        assert len(encode_box(box)) <= max_box_bytes
        for k, v in box.items():
            assert type(k) is bytes and type(v) is bytes
            assert 1 <= len(k) <= MAX_KEY_LENGTH
    if error is not None:
        with pytest.raises(WireError):
            decoder.feed(b"\x00\x00")
        with pytest.raises(WireError):
            decoder.close()
    else:
        assert decoder.in_box == (len(consumed) != len(data))
        if decoder.in_box:
            with pytest.raises(WireError):
                decoder.close()
        else:
            decoder.close()


@fuzz(1)
@given(boxes=st.lists(small_boxes, min_size=1, max_size=5), cuts=st.lists(st.integers(0, 3000), max_size=10),
       junk=st.binary(min_size=1, max_size=50))
def test_decoded_values_do_not_alias_the_callers_buffers(boxes: List[Dict[bytes, bytes]], cuts: List[int],
                                                         junk: bytes) -> None:
    """Decoded boxes keep their values when the caller overwrites the buffers it fed."""
    # Boxes decoded from bytearrays the caller then overwrites keep their
    # values: the decoder never hands out views of the caller's buffer.
    data = b"".join(encode_box(b) for b in boxes)
    decoder = BoxDecoder()
    got: List[Dict[bytes, bytes]] = []
    for piece in _chunked(data, cuts, [1]):
        assert isinstance(piece, bytearray)
        got += decoder.feed(piece)
        piece[:] = (junk * (len(piece) // len(junk) + 1))[:len(piece)]
    assert got == boxes


# -- the handshake machines ------------------------------------------------------------------

SECRET = b"fuzzing secret"
NAMES = [b"good", b"open", b"refused", b"", b".", b"..", b"a b", b"\xff\xfe", b"x" * 256, b"tab\tname"]


def _rule(name: str) -> Tuple[bool, Optional[bytes]]:
    if name == "good":
        return True, SECRET
    if name == "open":
        return True, None
    return False, None


@st.composite
def register_boxes(draw: st.DrawFn, nonce_m: bytes) -> Dict[bytes, bytes]:
    box: Dict[bytes, bytes] = {}
    if draw(st.booleans()) or True:
        box[b"register"] = draw(st.sampled_from(NAMES) | st.binary(max_size=12))
    if draw(st.integers(0, 9)):
        box[b"version"] = draw(st.sampled_from([PROTOCOL_VERSION, b"2", b"", b"1 "]))
    nonce_s = draw(st.sampled_from([os.urandom(NONCE_LENGTH), b"", os.urandom(NONCE_LENGTH + 1)]))
    if draw(st.integers(0, 9)):
        box[b"nonce"] = nonce_s
    proof = draw(st.sampled_from(["right", "wrong", "none", "other-name"]))
    name = box.get(b"register", b"")
    if proof == "right":
        box[b"proof"] = slave_proof(SECRET, nonce_m, nonce_s, name)
    elif proof == "wrong":
        box[b"proof"] = draw(st.binary(max_size=40))
    elif proof == "other-name":
        box[b"proof"] = slave_proof(SECRET, nonce_m, nonce_s, b"open")
    for k in draw(st.lists(st.sampled_from([b"hostname", b"platform", b"basedir", b"policy_root", b"policy_x",
                                             b"policy_BAD", b"policy_" + b"y" * 80, b"resumable", b"resume",
                                             b"received", b"zzz"]), max_size=4)):
        box[k] = draw(st.binary(max_size=30) | st.just(b"z" * 17000))
    return box


@fuzz(4)
@given(data=st.data())
def test_master_handshake_registers_only_a_proved_slave(data: st.DataObject) -> None:
    """The master's machine registers only a well-formed, allowed, proved register box; else the refusal box."""
    # Whatever register box a peer sends, the master's machine never raises:
    # it registers only a well-formed box whose name the rule allows and whose
    # proof (when the name has a secret) is right, answering with its own
    # proof; anything else gets the one refusal box and the failed state.
    nonce_m = os.urandom(NONCE_LENGTH)
    m = MasterHandshake(_rule, greeted=True, nonce=nonce_m)
    m.start()
    box = data.draw(register_boxes(nonce_m))
    step = m.receive_box(box)
    if isinstance(step.event, Registered):
        name = box[b"register"]
        assert name in (b"good", b"open") and box.get(b"version") == PROTOCOL_VERSION
        assert len(box[b"nonce"]) == NONCE_LENGTH
        assert m.state is State.REGISTERED
        (reply,) = step.send
        assert reply[b"registered"] == name
        if name == b"good":
            assert box[b"proof"] == slave_proof(SECRET, nonce_m, box[b"nonce"], name)
            assert reply[b"proof"] == master_proof(SECRET, box[b"nonce"], nonce_m, name)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in step.event.info.items())
    else:
        assert isinstance(step.event, Refused)
        assert isinstance(step.event.error, (ProtocolError, AuthenticationError))
        assert step.send == [refusal_box()]
        assert m.state is State.FAILED
    with pytest.raises(UsageError):
        m.receive_box(box)  # the exchange is over either way


@fuzz(1)
@given(greeting=st.binary(max_size=12) | st.sampled_from([MASTER_GREETING, SLAVE_GREETING]),
       side=st.sampled_from(["master", "slave"]))
def test_greeting_check_accepts_exactly_the_peers_greeting(greeting: bytes, side: str) -> None:
    """A greeting is accepted only when it is exactly the peer's; anything else is a ProtocolError."""
    # A greeting is accepted only when it is exactly the peer's; anything
    # else is a ProtocolError and leaves the machine failed.
    machine = (MasterHandshake(_rule) if side == "master"
               else SlaveHandshake("good", secret=SECRET, info={}))
    expected = SLAVE_GREETING if side == "master" else MASTER_GREETING
    if greeting == expected:
        machine.receive_greeting(greeting)
        assert machine.state is State.GREETED
    else:
        with pytest.raises(ProtocolError):
            machine.receive_greeting(greeting)
        assert machine.state is State.FAILED


@st.composite
def master_answers(draw: st.DrawFn, nonce_s: bytes, nonce_m: bytes) -> Dict[bytes, bytes]:
    box: Dict[bytes, bytes] = {}
    kind = draw(st.sampled_from(["right", "wrong-proof", "no-proof", "other-name", "refusal", "junk"]))
    if kind == "refusal":
        box.update(refusal_box())
    elif kind != "junk":
        box[b"registered"] = b"someone" if kind == "other-name" else b"good"
        if kind == "right" or kind == "other-name":
            box[b"proof"] = master_proof(SECRET, nonce_s, nonce_m, b"good")
        elif kind == "wrong-proof":
            box[b"proof"] = draw(st.binary(max_size=40))
    for k in draw(st.lists(st.sampled_from([b"session", b"resumed", b"received", b"resume_timeout", b"errtag",
                                             b"error", b"x"]), max_size=3)):
        box[k] = draw(st.binary(max_size=20))
    return box


@fuzz(4)
@given(data=st.data())
def test_slave_handshake_accepts_only_a_proved_master(data: st.DataObject) -> None:
    """The slave's machine raises only ProtocolError or AuthenticationError and trusts only the master's right proof."""
    # Whatever hello and answer a peer sends, the slave's machine raises
    # only ProtocolError or AuthenticationError (then it is failed), and takes
    # itself for registered only when the answer names it and carries the
    # master's right proof.
    nonce_s = os.urandom(NONCE_LENGTH)
    s = SlaveHandshake("good", secret=SECRET, info={"hostname": "h"}, greeted=True, nonce=nonce_s)
    nonce_m = os.urandom(NONCE_LENGTH)
    hello = data.draw(st.sampled_from([
        {b"hello": b"remsh", b"version": PROTOCOL_VERSION, b"nonce": nonce_m},
        {b"hello": b"remsh", b"version": b"2", b"nonce": nonce_m},
        {b"hello": b"remsh", b"version": PROTOCOL_VERSION, b"nonce": nonce_m[:5]},
        {b"hello": b"other", b"version": PROTOCOL_VERSION, b"nonce": nonce_m},
        {b"errtag": b"x"},
    ]))
    try:
        step = s.receive_box(hello)
    except (ProtocolError, AuthenticationError):
        assert s.state is State.FAILED
        return
    (register,) = step.send
    assert register[b"proof"] == slave_proof(SECRET, nonce_m, nonce_s, b"good")
    answer = data.draw(master_answers(nonce_s, nonce_m))
    try:
        step = s.receive_box(answer)
    except (ProtocolError, AuthenticationError):
        assert s.state is State.FAILED
        return
    assert isinstance(step.event, Registered)
    assert s.state is State.REGISTERED
    assert b"errtag" not in answer and answer[b"registered"] == b"good"
    assert answer[b"proof"] == master_proof(SECRET, nonce_s, nonce_m, b"good")


# -- the session layer's counters ----------------------------------------------------------------

session_steps = st.lists(st.one_of(
    st.tuples(st.just("send"), st.integers(1, 3000)),
    st.tuples(st.just("ack"), st.integers(-3, 40)),
    st.tuples(st.just("bad-ack"), st.sampled_from([b"", b"x", b"1.5", b"\xff", b"9" * 50, b"0x10"])),
    st.tuples(st.just("box"), st.integers(0, 2000)),
    st.tuples(st.just("boxes"), st.integers(50, 140)),  # enough for an acknowledgement to be due
    st.tuples(st.just("ping"), st.just(0)),
), max_size=40)


def _read_all(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    out = bytearray()
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            out += chunk
    except BlockingIOError:
        pass
    sock.setblocking(True)
    return bytes(out)


@fuzz(3)
@given(steps=session_steps)
def test_session_counters_follow_what_the_peer_sends(steps: List[Tuple[str, object]]) -> None:
    """Acks, link checks and boxes from the peer keep the session's counters right; a bad ack is a ProtocolError."""
    # Whatever acknowledgements, link checks and boxes the peer sends: an
    # acknowledgement of boxes never sent, or not a decimal count, is a
    # ProtocolError (and the only exception); otherwise ``sent`` counts our
    # boxes, ``peer_acked`` is the highest acknowledgement (never above
    # ``sent``, never going down), every session box is delivered once and
    # in order, and the acknowledgements we send count what was delivered.
    a, b = socket.socketpair()
    session = SessionWire(Wire(SocketStream(a), label="fuzz"), "fuzz", resume_timeout=30)
    peer = Wire(SocketStream(b), label="peer")
    sent = acked = 0
    peer_boxes: List[Dict[bytes, bytes]] = []
    delivered: List[Dict[bytes, bytes]] = []
    received = bytearray()
    try:
        for kind, value in steps:
            expect_error = False
            if kind == "send":
                assert isinstance(value, int)
                session.send_box({b"d": b"s" * value})
                sent += 1
                received += _read_all(b)  # the peer reads what we send
                assert session.sent == sent
                continue
            if kind == "ack":
                assert isinstance(value, int)
                peer.send_box({b"ack": str(value).encode()})
                expect_error = value > sent
                if not expect_error:
                    acked = max(acked, value)
            elif kind == "bad-ack":
                assert isinstance(value, bytes)
                peer.send_box({b"ack": value})
                expect_error = True
            elif kind in ("box", "boxes"):
                assert isinstance(value, int)
                for _ in range(1 if kind == "box" else value):
                    box = {b"n": str(len(peer_boxes)).encode(), b"pad": b"p" * (value if kind == "box" else 1)}
                    peer_boxes.append(box)
                    peer.send_box(box)
            else:
                peer.send_box({b"hb": b"ping"})
            try:
                session.feed_available()
                while True:
                    got = session.poll_box()
                    if got is None:
                        break
                    delivered.append(dict(got))
            except ProtocolError:
                assert expect_error, "a ProtocolError for valid input"
                return
            assert not expect_error, f"{kind} {value!r} was accepted"
            assert session.peer_acked == acked <= session.sent == sent
            assert delivered == peer_boxes
            assert session.delivered == session.received == len(peer_boxes)
        # what we acknowledged: increasing counts, none past what we delivered
        counts = []
        decoder = BoxDecoder()
        for box in decoder.feed(bytes(received) + _read_all(b)):
            if b"ack" in box:
                counts.append(int(box[b"ack"]))
        assert counts == sorted(counts) and all(c <= len(delivered) for c in counts)
        if len(delivered) >= 64:
            assert counts, "no acknowledgement for 64 boxes delivered"
    finally:
        session.close()
        peer.close()


@fuzz(1)
@given(data=st.binary(min_size=1, max_size=40))
def test_session_box_digest_is_what_arrived(data: bytes) -> None:
    """A session box's bytes reach the reader as sent."""
    # A session box's bytes reach the reader as sent (sanity of the property
    # above: the peer's boxes are compared by content, here with a digest).
    a, b = socket.socketpair()
    session = SessionWire(Wire(SocketStream(a), label="fuzz"), "fuzz2", resume_timeout=30)
    peer = Wire(SocketStream(b), label="peer")
    try:
        peer.send_box({b"d": data, b"h": hashlib.sha256(data).hexdigest().encode()})
        box = session.read_box(5)
        assert box is not None and hashlib.sha256(box[b"d"]).hexdigest().encode() == box[b"h"]
    finally:
        session.close()
        peer.close()
