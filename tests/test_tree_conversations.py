"""The tree conversations (remsh/protocol/trees.py) fed boxes with no I/O:
every state, every wrong box, a cut at every point; and the master's driver
over a real slave where only the driver can show it (its own disk failing)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import List

import pytest

from remsh.errors import NotFoundError, ProtocolError, UsageError
from remsh.protocol.trees import (INTERRUPT_BOX, Alive, Announced, Answered, Completed, Ended, Failed,
                                  FetchTreeCall, Manifest, Record, SendTreeCall, Stop, Stopped, SyncTreeCall,
                                  TreeState)
from remsh.treemanifest import manifest_records
from remsh.treestream import DIR, END, FILE, T, UP, encode
from remsh.wire import BoxDecoder

ERROR = {b"errtag": b"notfound", b"error": b"no such directory"}
PROGRESS = {b"progress": b"y"}
ODD_BOXES = [{b"bogus": b"1"}, {b"data": b"x"}, {b"result": b"0"}]


def decode(data: bytes) -> List[dict]:
    return BoxDecoder().feed(data)


# -- send_tree -----------------------------------------------------------------------------------


def test_send_tree_whole_conversation() -> None:
    """Request, liveness while streaming, the end box, an empty final box: completed."""
    call = SendTreeCall("dest")
    (req,) = decode(call.request())
    assert req[b"meth"] == b"send_tree" and req[b"dest"] == b"dest"
    assert call.state is TreeState.STREAMING
    assert isinstance(call.receive(PROGRESS), Alive)
    assert decode(call.finish()) == [{END: b"y"}]
    assert isinstance(call.receive(PROGRESS), Alive)
    assert isinstance(call.receive({}), Completed) and call.done


def test_send_tree_error_at_the_end() -> None:
    """An error box as the final answer is Failed with the tag's class."""
    call = SendTreeCall("dest")
    call.request()
    call.finish()
    event = call.receive(ERROR)
    assert isinstance(event, Failed) and isinstance(event.error, NotFoundError) and call.done


def test_send_tree_early_answer_aborts_the_stream() -> None:
    """A slave that answers while the master streams makes finish() an abort,
    and the early box is the outcome; a second box before that is refused."""
    call = SendTreeCall("dest")
    call.request()
    assert isinstance(call.receive(ERROR), Answered)
    (end,) = decode(call.finish())
    assert end == {b"abort": b"the slave answered before the end"}
    assert call.done and isinstance(call.outcome, Failed)
    second = SendTreeCall("d")
    second.request()
    second.receive(ERROR)
    with pytest.raises(ProtocolError, match="second box"):
        second.receive(ERROR)


def test_send_tree_early_success_is_a_protocol_error() -> None:
    """An early box that is not an error cannot mean the tree is in place: it
    is a protocol error, never a success."""
    call = SendTreeCall("dest")
    call.request()
    call.receive({})
    with pytest.raises(ProtocolError, match="final answer"):
        call.finish()


def test_send_tree_local_failure_is_an_abort_naming_it() -> None:
    """The master's own tree failing ends the stream with an abort that says so."""
    call = SendTreeCall("dest")
    call.request()
    (end,) = decode(call.finish("cannot read a/b"))
    assert end == {b"abort": b"master could not read its tree: cannot read a/b"}
    assert isinstance(call.receive(ERROR), Failed)


@pytest.mark.parametrize("box", ODD_BOXES)
def test_send_tree_final_with_other_keys_is_refused(box: dict) -> None:
    """A final box with keys that are not an error is a protocol error."""
    call = SendTreeCall("dest")
    call.request()
    call.finish()
    with pytest.raises(ProtocolError):
        call.receive(box)
    assert call.done


def test_send_tree_wrong_states() -> None:
    """A box before the request or after the end is refused; calls out of
    order are usage errors."""
    call = SendTreeCall("dest")
    with pytest.raises(ProtocolError, match="idle"):
        call.receive({})
    call = SendTreeCall("dest")
    with pytest.raises(UsageError):
        call.finish()
    call.request()
    with pytest.raises(UsageError):
        call.request()
    call.finish()
    with pytest.raises(UsageError):
        call.finish()
    call.receive({})
    with pytest.raises(ProtocolError, match="done"):
        call.receive({})


def test_send_tree_cut_at_every_point_is_never_done() -> None:
    """Whatever prefix of the conversation arrived, a cut leaves it undone
    (the driver then reports the connection's loss, not a result)."""
    script = [PROGRESS, PROGRESS, "finish", PROGRESS, {}]
    for cut in range(len(script)):
        call = SendTreeCall("dest")
        call.request()
        for step in script[:cut]:
            if step == "finish":
                call.finish()
            else:
                call.receive(step)
        assert not call.done, cut


# -- sync_tree -----------------------------------------------------------------------------------


def _manifest(tmp_path: Path) -> List[dict]:
    (tmp_path / "t" / "sub").mkdir(parents=True)
    (tmp_path / "t" / "f").write_bytes(b"12345")
    fd = os.open(tmp_path / "t", os.O_RDONLY | os.O_DIRECTORY)
    try:
        return [box for record in manifest_records(fd, False) for box in decode(record)]
    finally:
        os.close(fd)


def test_sync_tree_manifest_then_changes(tmp_path: Path) -> None:
    """The slave's manifest is kept record by record; its end opens the
    master's stream, which ends as send_tree's."""
    records = _manifest(tmp_path)
    call = SyncTreeCall("dest", checksum=True, progress=2.0)
    (req,) = decode(call.request())
    assert req[b"meth"] == b"sync_tree" and req[b"checksum"] == b"y" and req[b"progress"] == b"2.0"
    for box in records:
        assert call.receive(box) is None
        assert isinstance(call.receive(PROGRESS), Alive)
    event = call.receive({END: b"y"})
    assert isinstance(event, Manifest)
    assert b"f" in event.manifest.entries and event.manifest.entries[b"f"].size == 5
    assert call.state is TreeState.STREAMING
    call.finish()
    assert isinstance(call.receive({}), Completed)


def test_sync_tree_error_instead_of_a_manifest() -> None:
    """An error box in the manifest phase ends the call as Failed."""
    call = SyncTreeCall("dest")
    call.request()
    event = call.receive(ERROR)
    assert isinstance(event, Failed) and call.done and call.outcome is event


@pytest.mark.parametrize("box", [encode(T, UP), encode(T, b"zz", b"n", b"x"), encode(T, FILE, b"n", b"f")])
def test_sync_tree_bad_manifest_is_a_protocol_error(box: bytes) -> None:
    """A manifest record that breaks the format is a protocol error."""
    call = SyncTreeCall("dest")
    call.request()
    with pytest.raises(ProtocolError, match="bad manifest"):
        for b in decode(box):
            call.receive(b)
    assert call.done


def test_sync_tree_cut_at_every_point_is_never_done(tmp_path: Path) -> None:
    """A cut anywhere in the manifest or the changes leaves the call undone."""
    script = _manifest(tmp_path) + [{END: b"y"}, "finish"]
    for cut in range(len(script) + 1):
        call = SyncTreeCall("dest")
        call.request()
        for step in script[:cut]:
            if step == "finish":
                call.finish()
            else:
                call.receive(step)
        assert not call.done, cut


# -- fetch_tree ----------------------------------------------------------------------------------

TREE = [encode(T, DIR, b"n", b"", b"m", b"493", b"mt", b"0"), encode(T, FILE, b"n", b"a", b"m", b"420"),
        encode(T, FILE, b"n", b"b", b"m", b"420"), encode(T, UP)]


def _records() -> List[dict]:
    return [box for r in TREE for box in decode(r)]


def test_fetch_tree_whole_conversation() -> None:
    """Totals, then records for the writer, then the end."""
    call = FetchTreeCall("src", 1.5)
    (req,) = decode(call.request())
    assert req[b"meth"] == b"fetch_tree" and req[b"progress"] == b"1.5"
    assert isinstance(call.receive(PROGRESS), Alive)
    assert call.receive({b"files": b"2", b"size": b"10"}) == Announced(10, 2, None)
    for box in _records():
        assert call.receive(box) == Record(box)
    assert call.entries == 3 and call.files == 2
    assert isinstance(call.receive({END: b"y"}), Ended) and call.done


def test_fetch_tree_refused_at_once() -> None:
    """An error box instead of the totals is Failed."""
    call = FetchTreeCall("src")
    call.request()
    event = call.receive(ERROR)
    assert isinstance(event, Failed) and isinstance(event.error, NotFoundError)


@pytest.mark.parametrize("bounds,announce,why", [
    ({"max_bytes": 5}, {b"files": b"2", b"size": b"10"}, "max_bytes (5; 10 bytes announced)"),
    ({"max_entries": 1}, {b"files": b"2", b"size": b"10"}, "max_entries (1; 2 files announced)"),
])
def test_fetch_tree_announced_past_a_bound_stops_at_once(bounds: dict, announce: dict, why: str) -> None:
    """Totals past a bound stop the transfer before any record; what still
    comes is dropped and the end is Stopped naming the bound."""
    call = FetchTreeCall("src", **bounds)
    call.request()
    event = call.receive(announce)
    assert isinstance(event, Announced) and event.stop == INTERRUPT_BOX
    for box in _records():
        assert call.receive(box) is None
    assert call.receive(ERROR) == Stopped(why) and call.limit == why


def test_fetch_tree_entries_past_max_entries_stop() -> None:
    """The entry past max_entries is not given to the writer: Stop with the interrupt."""
    call = FetchTreeCall("src", max_entries=2)
    call.request()
    call.receive({})
    boxes = _records()
    assert isinstance(call.receive(boxes[0]), Record)
    assert isinstance(call.receive(boxes[1]), Record)
    assert call.receive(boxes[2]) == Stop(INTERRUPT_BOX)
    assert call.receive({END: b"y"}) == Stopped("max_entries (2)")


def test_fetch_tree_more_than_announced_is_a_protocol_error() -> None:
    """More files, or more file data, than the slave announced breaks the protocol."""
    call = FetchTreeCall("src")
    call.request()
    call.receive({b"files": b"1", b"size": b"4"})
    boxes = _records()
    call.receive(boxes[0])
    call.receive(boxes[1])
    with pytest.raises(ProtocolError, match="more files"):
        call.receive(boxes[2])
    call = FetchTreeCall("src")
    call.request()
    call.receive({b"files": b"1", b"size": b"4"})
    assert call.file_data(4)
    with pytest.raises(ProtocolError, match="more file data"):
        call.file_data(1)


def test_fetch_tree_data_past_max_bytes() -> None:
    """file_data says False past max_bytes and stop_for_limit gives the interrupt."""
    call = FetchTreeCall("src", max_bytes=3)
    call.request()
    call.receive({})
    assert call.file_data(3)
    assert not call.file_data(1)
    assert call.stop_for_limit() == INTERRUPT_BOX and call.stopped
    assert call.receive({END: b"y"}) == Stopped("max_bytes (3)")


def test_fetch_tree_local_stop_and_drain_limit() -> None:
    """stop() for the master's own failure is given once; past drain_limit
    bytes after it the slave is broken."""
    call = FetchTreeCall("src", drain_limit=10)
    call.request()
    assert call.stop() is None  # nothing to stop before the totals
    call.receive({})
    assert call.stop() == INTERRUPT_BOX
    assert call.stop() is None
    assert call.receive({b"data": b"x" * 9}) is None
    with pytest.raises(ProtocolError, match="after the interrupt"):
        call.receive({b"data": b"xx"})
    assert call.done


def test_fetch_tree_wrong_states_and_bounds() -> None:
    """Boxes before the request or after the end are refused; negative
    bounds are usage errors."""
    with pytest.raises(UsageError):
        FetchTreeCall("src", max_bytes=-1)
    call = FetchTreeCall("src")
    with pytest.raises(ProtocolError, match="idle"):
        call.receive({})
    call = FetchTreeCall("src")
    call.request()
    call.receive({})
    call.receive({END: b"y"})
    with pytest.raises(ProtocolError, match="done"):
        call.receive({})


def test_fetch_tree_cut_at_every_point_is_never_done() -> None:
    """A cut anywhere before the end box leaves the call undone."""
    script = [{b"files": b"2", b"size": b"0"}, PROGRESS] + _records()
    for cut in range(len(script) + 1):
        call = FetchTreeCall("src")
        call.request()
        for box in script[:cut]:
            call.receive(box)
        assert not call.done, cut


# -- the driver: the master's own disk failing ---------------------------------------------------

DRIVER = textwrap.dedent('''
    import os, resource, signal, sys
    from remsh.errors import LocalError
    from remsh.master.slavelistener.local import LocalSlaveListener
    base, dest = sys.argv[1], sys.argv[2]
    listener = LocalSlaveListener()
    slave = listener.start_slave(base)
    with open(os.path.join(base, "t", "big"), "wb") as f:
        f.write(b"x" * (2 << 20))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        slave.fetch_tree("t", dest)
    except LocalError as e:
        print("LocalError", e)
    except Exception as e:
        print("other", type(e).__name__, e)
    else:
        print("no error")
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    slave.ping()
    print("slave still usable")
    listener.stop()
''')


def test_fetch_tree_local_write_failure_is_a_local_error_and_leaves_nothing(tmp_path: Path) -> None:
    """The master's disk refusing a file (RLIMIT_FSIZE) stops the transfer:
    LocalError naming the cause, nothing left beside the destination, and the
    slave stays usable."""
    base = tmp_path / "base"
    (base / "t").mkdir(parents=True)
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run([sys.executable, "-c", DRIVER, str(base), str(out / "copy")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("LocalError") and "writing the local tree failed" in lines[0], lines
    assert lines[1] == "slave still usable"
    assert os.listdir(out) == []
