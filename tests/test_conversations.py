"""The send, fetch and simple conversations (remsh.protocol) fed boxes with no I/O at all:
every state, every wrong box, the stream cut at every point."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path
from typing import Any, Callable, List

import pytest

from remsh.errors import FailedError, NotFoundError, ProtocolError, RemoteFileExistsError, UsageError
from remsh.ops import CHMOD, EXECUTE, MKDIR, PING, SEND, STAT
from remsh.protocol.simple import Reply, SimpleCall, SimpleState
from remsh.protocol.transfer import (DATA_KEY, INTERRUPT_BOX, Completed, Data, Failed, FetchCall, FetchState,
                                     Finished, Ready, SendCall, SendState, Stop, Stopped)
from remsh.wire import BoxDecoder, WireError, encode_box

ROOT = Path(__file__).resolve().parents[1]

ERROR = {b"errtag": b"notfound", b"error": b"no such file"}
PROGRESS = {b"progress": b"y"}
#: boxes a slave could send that mean nothing at these points
ODD_BOXES = [{b"bogus": b"1"}, {b"result": b"0"}, {b"stream": b"stdout", b"data": b"x"}, {b"data": b"x"}]


def decode(data: bytes) -> List[dict]:
    return BoxDecoder().feed(data)


# -- the layer rule ---------------------------------------------------------------------


@pytest.mark.parametrize("module", sorted(p.name for p in (ROOT / "remsh" / "protocol").glob("*.py")))
def test_protocol_modules_import_no_io(module: str) -> None:
    """No module of remsh/protocol imports socket, threading, select, asyncio or time (it does no I/O)."""
    tree = ast.parse((ROOT / "remsh" / "protocol" / module).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
            if node.module.startswith("remsh."):
                assert not node.module.startswith(("remsh.master", "remsh.slave", "remsh.transports",
                                                   "remsh.aio", "remsh.session")), node.module
    assert not names & {"socket", "threading", "select", "asyncio", "time", "subprocess"}


# -- send ---------------------------------------------------------------------------------


def test_send_request_is_the_tables_encoding() -> None:
    """The request is SEND.encode of dest and mode."""
    assert SendCall("d/f", 0o640).request() == SEND.encode(dest=b"d/f", mode=0o640)
    assert SendCall(b"x").request() == SEND.encode(dest=b"x")


def test_send_mode_out_of_range_is_refused() -> None:
    """A mode beyond 0o7777 is a UsageError before anything is sent."""
    with pytest.raises(UsageError):
        SendCall("f", 0o17777)


def test_send_whole_conversation() -> None:
    """requested -> (go ahead) sending -> data, finish -> finishing -> (empty box) done."""
    call = SendCall("f")
    assert call.state is SendState.IDLE
    call.request()
    assert call.state is SendState.REQUESTED
    assert call.receive({}) == Ready()
    assert call.state is SendState.SENDING
    data = b"a" * 70000 + b"b"
    boxes = decode(call.data(data))
    assert [b[DATA_KEY] for b in boxes] == [data[:65535], data[65535:]]
    end = decode(call.finish(hashlib.sha256(data).hexdigest()))
    assert end == [{b"sha256": hashlib.sha256(data).hexdigest().encode()}]
    assert call.state is SendState.FINISHING
    assert call.receive({}) == Completed()
    assert call.done


def test_send_refused_at_once() -> None:
    """An error box answering the request ends the conversation with that error."""
    call = SendCall("f")
    call.request()
    event = call.receive({b"errtag": b"fileexists", b"error": b"there"})
    assert isinstance(event, Failed) and isinstance(event.error, RemoteFileExistsError)
    assert call.done
    assert call.cancel() is None


def test_send_fails_at_the_end() -> None:
    """An error box as the final box (digest mismatch, disk full) is the call's error."""
    call = SendCall("f")
    call.request()
    call.receive({})
    call.finish("00")
    event = call.receive({b"errtag": b"failed", b"error": b"digest"})
    assert isinstance(event, Failed) and isinstance(event.error, FailedError)


def test_send_abort_and_cancel() -> None:
    """abort() (and cancel() while data flows) sends the abort box; cancel elsewhere sends nothing."""
    call = SendCall("f")
    assert call.cancel() is None
    call.request()
    assert call.cancel() is None  # the go-ahead is still to come
    call.receive({})
    box = decode(call.cancel() or b"")
    assert box[0][b"sha256"] == b"-" and b"abort" in box[0]
    assert call.aborted and call.state is SendState.FINISHING
    assert call.cancel() is None
    assert isinstance(call.receive({b"errtag": b"failed", b"error": b"aborted"}), Failed)


@pytest.mark.parametrize("box", [*ODD_BOXES, PROGRESS])
def test_send_wrong_box_after_request(box: dict) -> None:
    """Anything but an empty or error box answering the request is a ProtocolError."""
    call = SendCall("f")
    call.request()
    with pytest.raises(ProtocolError):
        call.receive(box)
    assert call.done


@pytest.mark.parametrize("box", [{}, ERROR, *ODD_BOXES])
def test_send_any_box_while_sending_is_refused(box: dict) -> None:
    """The slave sends nothing while the data flows: any box then is a ProtocolError."""
    call = SendCall("f")
    call.request()
    call.receive({})
    with pytest.raises(ProtocolError):
        call.receive(box)
    assert call.done


@pytest.mark.parametrize("box", [*ODD_BOXES, PROGRESS])
def test_send_wrong_final_box(box: dict) -> None:
    """A final box with other keys is a ProtocolError."""
    call = SendCall("f")
    call.request()
    call.receive({})
    call.finish("00")
    with pytest.raises(ProtocolError):
        call.receive(box)


@pytest.mark.parametrize("box", [{}, ERROR])
def test_send_box_before_request_or_after_end(box: dict) -> None:
    """A box in the idle or done state is a ProtocolError."""
    call = SendCall("f")
    with pytest.raises(ProtocolError):
        call.receive(box)
    call = SendCall("f")
    call.request()
    call.receive(ERROR)
    with pytest.raises(ProtocolError):
        call.receive(box)


@pytest.mark.parametrize("step", ["request", "data", "finish", "abort"])
def test_send_caller_steps_out_of_order_are_usage_errors(step: str) -> None:
    """request twice, data/finish/abort before the go-ahead: UsageError, nothing made."""
    call = SendCall("f")
    call.request()
    method: Callable[..., Any] = getattr(call, step)
    args = {"request": (), "data": (b"x",), "finish": ("00",), "abort": ("r",)}[step]
    with pytest.raises(UsageError):
        method(*args)


def test_send_reply_stream_cut_at_every_point() -> None:
    """The slave's replies cut at any byte: the call is done only once the final box is whole,
    and a cut inside a box is a WireError at the end of the stream."""
    stream = encode_box({}) + encode_box({})
    for cut in range(len(stream) + 1):
        call = SendCall("f")
        call.request()
        decoder = BoxDecoder()
        for box in decoder.feed(stream[:cut]):
            if call.state is SendState.SENDING:
                call.finish("00")
            call.receive(box)
        assert call.done == (cut == len(stream))
        if cut in (0, 2, len(stream)):
            decoder.close()
        else:
            with pytest.raises(WireError):
                decoder.close()


# -- fetch --------------------------------------------------------------------------------


def test_fetch_whole_conversation_and_digest() -> None:
    """Data events in order, then Finished with the slave's digest, which check_digest compares."""
    call = FetchCall("f")
    assert call.state is FetchState.IDLE
    assert decode(call.request()) == decode(b"" + encode_box({b"meth": b"fetch", b"version": b"1", b"src": b"f"}))
    assert call.receive({b"data": b"ab"}) == Data(b"ab")
    assert call.receive({b"data": b"c"}) == Data(b"c")
    digest = hashlib.sha256(b"abc").hexdigest()
    assert call.receive({b"sha256": digest.encode()}) == Finished(digest.encode())
    call.check_digest(digest)
    with pytest.raises(ProtocolError):
        call.check_digest(hashlib.sha256(b"abd").hexdigest())


def test_fetch_digest_check_before_the_end_is_a_usage_error() -> None:
    """check_digest while data may still come is a UsageError."""
    call = FetchCall("f")
    call.request()
    with pytest.raises(UsageError):
        call.check_digest("00")


def test_fetch_error_at_once_and_after_data() -> None:
    """An error box, first or after data, is the Failed event."""
    for before in ([], [{b"data": b"x"}]):
        call = FetchCall("f")
        call.request()
        for box in before:
            call.receive(box)
        event = call.receive(ERROR)
        assert isinstance(event, Failed) and isinstance(event.error, NotFoundError)
        assert call.done


def test_fetch_max_bytes_stops_once_and_drops_the_rest() -> None:
    """Past max_bytes: one Stop carrying the interrupt, later data dropped, the end is Stopped(limit)."""
    call = FetchCall("f", max_bytes=3)
    call.request()
    assert call.receive({b"data": b"abc"}) == Data(b"abc")
    assert call.receive({b"data": b"d"}) == Stop(INTERRUPT_BOX)
    assert call.stopped
    assert call.receive({b"data": b"e"}) is None
    assert call.receive(ERROR) == Stopped(True)


def test_fetch_drain_limit() -> None:
    """More than drain_limit bytes past max_bytes is a ProtocolError."""
    call = FetchCall("f", max_bytes=0, drain_limit=10)
    call.request()
    assert isinstance(call.receive({b"data": b"x"}), Stop)
    assert call.receive({b"data": b"x" * 9}) is None
    with pytest.raises(ProtocolError):
        call.receive({b"data": b"x"})
    assert call.done


def test_fetch_cancel() -> None:
    """cancel() gives the interrupt once while receiving; the end is Stopped (not the limit)."""
    call = FetchCall("f")
    assert call.cancel() is None
    call.request()
    assert call.cancel() == INTERRUPT_BOX
    assert call.cancel() is None
    assert call.receive({b"data": b"x"}) is None
    assert call.receive({b"sha256": b"00"}) == Stopped(False)
    assert call.cancel() is None


@pytest.mark.parametrize("box", [{b"data": b"x", b"more": b"y"}, {b"bogus": b"1"}, PROGRESS,
                                 {b"sha256": b"00", b"extra": b"1"}])
def test_fetch_wrong_boxes(box: dict) -> None:
    """A data box with other keys, or a final box with keys besides sha256, is a ProtocolError."""
    call = FetchCall("f")
    call.request()
    with pytest.raises(ProtocolError):
        call.receive(box)
    assert call.done


@pytest.mark.parametrize("box", [{}, {b"data": b"x"}, ERROR])
def test_fetch_box_before_request_or_after_end(box: dict) -> None:
    """A box in the idle or done state is a ProtocolError."""
    with pytest.raises(ProtocolError):
        FetchCall("f").receive(box)
    call = FetchCall("f")
    call.request()
    call.receive({})
    with pytest.raises(ProtocolError):
        call.receive(box)


def test_fetch_negative_max_bytes_and_second_request_are_usage_errors() -> None:
    """max_bytes < 0 and a second request() are UsageErrors."""
    with pytest.raises(UsageError):
        FetchCall("f", max_bytes=-1)
    call = FetchCall("f")
    call.request()
    with pytest.raises(UsageError):
        call.request()


def test_fetch_stream_cut_at_every_point() -> None:
    """The slave's data and digest cut at any byte: the data events so far are a prefix of the
    file, done only with the final box whole, and a cut inside a box is a WireError."""
    payload = b"0123456789" * 3
    stream = encode_box({b"data": payload[:12]}) + encode_box({b"data": payload[12:]}) + \
        encode_box({b"sha256": hashlib.sha256(payload).hexdigest().encode()})
    boundaries = {0, len(encode_box({b"data": payload[:12]})),
                  len(stream) - len(encode_box({b"sha256": b"0" * 64})), len(stream)}
    for cut in range(len(stream) + 1):
        call = FetchCall("f")
        call.request()
        decoder = BoxDecoder()
        got = b""
        for box in decoder.feed(stream[:cut]):
            event = call.receive(box)
            if isinstance(event, Data):
                got += event.data
        assert payload.startswith(got)
        assert call.done == (cut == len(stream))
        if cut in boundaries:
            decoder.close()
        else:
            with pytest.raises(WireError):
                decoder.close()


# -- simple ---------------------------------------------------------------------------------


def test_simple_call_reply_and_error() -> None:
    """A reply box is the Reply event; an error box the Failed event."""
    call = SimpleCall(STAT, path=b"x")
    assert call.request() == STAT.encode(path=b"x")
    assert call.receive({b"result": b"d"}) == Reply({b"result": b"d"})
    assert call.state is SimpleState.DONE
    call = SimpleCall(CHMOD, path=b"x", mode=0o600)
    call.request()
    assert isinstance(call.receive(ERROR), Failed)


def test_simple_call_progress_only_for_long_operations() -> None:
    """Liveness boxes are skipped for a long operation and a ProtocolError for another."""
    call = SimpleCall(MKDIR, dir=b"d", progress=1.0)
    call.request()
    assert call.receive(PROGRESS) is None
    assert call.receive({}) == Reply({})
    call = SimpleCall(PING)
    call.request()
    with pytest.raises(ProtocolError):
        call.receive(PROGRESS)


def test_simple_call_wrong_states_and_conversations() -> None:
    """A box before the request or after the reply is a ProtocolError; a conversation
    operation is not a simple call; unknown arguments are a TypeError."""
    call = SimpleCall(PING)
    with pytest.raises(ProtocolError):
        call.receive({})
    call.request()
    call.receive({})
    with pytest.raises(ProtocolError):
        call.receive({})
    with pytest.raises(UsageError):
        call.request()
    with pytest.raises(UsageError):
        SimpleCall(EXECUTE, args=[b"true"])
    with pytest.raises(TypeError):
        SimpleCall(PING, bogus=1)
    assert SimpleCall(PING).cancel() is None
