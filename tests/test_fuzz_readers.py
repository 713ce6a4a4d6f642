"""Hypothesis fuzzing of the tree stream readers (the master's for
``fetch_tree``, the slave's for ``send_tree`` and ``sync_tree``, the
master's reader of a ``sync_tree`` manifest) and of the control socket's
readers (the master's, a client's).

Properties: a hostile peer gets only the documented errors (the tree
stream's TreeStreamError, TreeDigestError and TreeTargetError, which the callers turn
into ProtocolError, LocalError or an error box; ProtocolError and the
connection's own errors on the control socket), never creates or changes
anything outside the destination directory, and leaves no descriptor open.
``REMSH_FUZZ_EXAMPLES`` sets the number of examples (see tests/test_fuzz.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import stat
import tempfile
import threading
from typing import Dict, Iterator, List, Optional, Tuple

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from remsh.control import Channel, ControlClient, ControlError, ControlServer, EventIterator
from remsh.errors import (Disconnected, LocalError, ProtocolError, RemoteError, TreeDigestError, TreeStreamError, TreeTargetError)
from remsh.fleet import FleetCollection
from remsh.handshake import slave_handshake
from remsh.master.slavecollection.simple import SimpleSlaveCollection
from remsh.master.slavelistener.tcp import TcpSlaveListener
from remsh.master.tree import FETCHED_FILE_MODES
from remsh.slave.tree import remove_dir_at
from remsh.transports.base import SocketStream
from remsh.treemanifest import ManifestReader

from remsh.treewriter import Writer
from remsh.wire import Wire, encode_box
from tests.slaveproc import HOST, SECRET, WAIT, tcp_listener  # noqa: F401 - a fixture
from tests.test_fuzz import EXAMPLES, fuzz

pytestmark = pytest.mark.timeout(None if EXAMPLES > 1000 else 120)

#: What a tree stream reader may raise (the callers map each to a documented error).
TREE_ERRORS = (TreeStreamError, TreeDigestError, TreeTargetError)

NAMES = [b"a", b"b", b"esc", b"escf", b"old", b"sub", b"..", b".", b"", b"x/y", b"\0", b"a" * 300,
         b"n\xff", b".a.0123456789ab.remsh-part"]
names = st.sampled_from(NAMES) | st.binary(min_size=1, max_size=8)
#: Numbers around and past the 64-bit range of a record's time
#: (test_tree_time_out_of_range_is_a_stream_error pins the edge apart).
WIDE = 2**70
numbers = st.sampled_from([b"0", b"420", b"493", b"4095", b"4096", b"3583", b"-1", b"", b"x", b"1e3", b" 7",
                           b"1700000000000000000", b"+5", b"1_0", b"9223372036854775807",
                           b"9223372036854775808", b"-9223372036854775808"]) | \
    st.integers(-WIDE, WIDE).map(lambda i: str(i).encode())


@st.composite
def records(draw: st.DrawFn) -> Dict[bytes, bytes]:
    """One tree record, well-formed or not."""
    box: Dict[bytes, bytes] = {}
    t = draw(st.sampled_from([b"d", b"u", b"f", b"l", b"x", b"a", b"o", b"z", None]))
    if t is not None:
        box[b"t"] = t
    if draw(st.integers(0, 5)):
        box[b"n"] = draw(names)
    for key in (b"m", b"mt", b"s"):
        if draw(st.integers(0, 4)):
            box[key] = draw(numbers)
    if t == b"l" or draw(st.integers(0, 9)) == 0:
        box[b"l"] = draw(st.sampled_from([b"../outside", b"/etc/passwd", b"", b"x\0y", b"target"]))
    if t == b"f" or t is None:
        data = draw(st.binary(max_size=200) | st.just(b"\0" * 300))
        if data or draw(st.booleans()):
            box[b"d"] = data
        h = draw(st.sampled_from(["right", "wrong", "none", "upper"]))
        if h == "right":
            box[b"h"] = hashlib.sha256(data).hexdigest().encode()
        elif h == "upper":
            box[b"h"] = hashlib.sha256(data).hexdigest().upper().encode()
        elif h == "wrong":
            box[b"h"] = draw(st.binary(max_size=64))
    return box


@st.composite
def valid_streams(draw: st.DrawFn) -> List[Dict[bytes, bytes]]:
    """A well-formed stream: directories, files (with their digests) and links."""
    out: List[Dict[bytes, bytes]] = [{b"t": b"d", b"m": b"493", b"mt": b"0"}]
    depth = 1
    for i in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["file", "dir", "up", "link"]))
        name = b"e%d" % i
        if kind == "file":
            data = draw(st.binary(max_size=100))
            out.append({b"t": b"f", b"n": name, b"m": draw(st.sampled_from([b"420", b"3565", b"493"])),
                        b"mt": b"1700000000000000000", b"d": data, b"h": hashlib.sha256(data).hexdigest().encode()})
        elif kind == "dir":
            out.append({b"t": b"d", b"n": name, b"m": b"493", b"mt": b"0"})
            depth += 1
        elif kind == "up" and depth > 1:
            out.append({b"t": b"u"})
            depth -= 1
        elif kind == "link":
            out.append({b"t": b"l", b"n": name, b"l": b"../../outside", b"mt": b"0"})
    return out + [{b"t": b"u"}] * depth


@st.composite
def mutated_streams(draw: st.DrawFn) -> List[Dict[bytes, bytes]]:
    """A well-formed stream with one record replaced, inserted or dropped."""
    boxes = draw(valid_streams())
    i = draw(st.integers(0, len(boxes) - 1))
    how = draw(st.sampled_from(["replace", "insert", "drop"]))
    if how == "drop":
        return boxes[:i] + boxes[i + 1:]
    return boxes[:i] + [draw(records())] + boxes[i + (how == "replace"):]


@st.composite
def tree_streams(draw: st.DrawFn) -> List[Dict[bytes, bytes]]:
    """Any stream: well-formed, one record off, or records at random."""
    return draw(st.one_of(valid_streams(), mutated_streams(), random_streams()))


@st.composite
def random_streams(draw: st.DrawFn) -> List[Dict[bytes, bytes]]:
    """Mostly a top directory first (so the stream gets past it), then records."""
    first: List[Dict[bytes, bytes]] = []
    if draw(st.integers(0, 7)):
        first = [{b"t": b"d", b"m": draw(numbers), b"mt": draw(numbers)}]
    return first + draw(st.lists(records(), max_size=14))


def _state(root: str) -> Dict[str, Tuple[int, int, bytes]]:
    """Every entry under ``root``: (type and mode, size, content or link target)."""
    out: Dict[str, Tuple[int, int, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st_ = os.lstat(path)
            if stat.S_ISLNK(st_.st_mode):
                content = os.fsencode(os.readlink(path))
            elif stat.S_ISREG(st_.st_mode):
                with open(path, "rb") as f:
                    content = f.read()
            else:
                content = b""
            out[os.path.relpath(path, root)] = (st_.st_mode, st_.st_size, content)
    return out


def _fds() -> List[str]:
    return sorted(os.listdir("/proc/self/fd"))


def _sandbox(sync: bool) -> Tuple[str, str]:
    """A directory holding ``outside`` (which no stream may touch) and the
    destination ``dest``; in sync mode ``dest`` holds a file, a directory
    and symbolic links that lead outside."""
    root = tempfile.mkdtemp(prefix="remsh-fuzz-")
    outside = os.path.join(root, "outside")
    os.mkdir(outside)
    with open(os.path.join(outside, "sentinel"), "wb") as f:
        f.write(b"untouched")
    dest = os.path.join(root, "dest")
    os.mkdir(dest)
    if sync:
        os.symlink("../outside", os.path.join(dest, "esc"))
        os.symlink("../outside/sentinel", os.path.join(dest, "escf"))
        with open(os.path.join(dest, "old"), "wb") as f:
            f.write(b"old")
        os.mkdir(os.path.join(dest, "sub"))
        os.symlink("/", os.path.join(dest, "sub", "esc"))
    return root, dest


def _feed_tree(boxes: List[Dict[bytes, bytes]], mode: str) -> None:
    sync = mode == "slave-sync"
    root, dest = _sandbox(sync)
    try:
        before_outside = _state(os.path.join(root, "outside"))
        fds = _fds()
        top = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
        if mode == "master-fetch":
            writer = Writer(top, file_mode_mask=FETCHED_FILE_MODES)
        elif sync:
            writer = Writer(top, sync=True, remove_dir=remove_dir_at)
        else:
            writer = Writer(top)
        try:
            for box in boxes:
                writer.feed(box)
        except TREE_ERRORS:
            pass
        finally:
            writer.close()
            os.close(top)
        assert _fds() == fds, "a descriptor left open"
        assert sorted(os.listdir(root)) == ["dest", "outside"]
        assert _state(os.path.join(root, "outside")) == before_outside
        if mode == "master-fetch":
            for rel, (mode_bits, _, _) in _state(dest).items():
                if stat.S_ISREG(mode_bits):
                    assert not mode_bits & (stat.S_ISUID | stat.S_ISGID), f"set-ID file {rel} fetched"
    finally:
        for dirpath, dirnames, _ in os.walk(root):
            for d in dirnames:
                p = os.path.join(dirpath, d)
                if not os.path.islink(p):
                    os.chmod(p, 0o700)
        shutil.rmtree(root)


@fuzz(3)
@given(boxes=tree_streams(), mode=st.sampled_from(["master-fetch", "slave-send", "slave-sync"]))
def test_tree_stream_reader_stays_in_its_destination(boxes: List[Dict[bytes, bytes]], mode: str) -> None:
    """Any record stream stays in its destination: only tree stream errors, no descriptor left, no set-ID file fetched."""
    # Any record stream, fed to the reader as the master uses it for
    # fetch_tree or the slave for send_tree and sync_tree, raises only the
    # tree stream's errors, creates and changes nothing outside the
    # destination (not through the links planted in it either), closes every
    # descriptor it opened, and on the master gives no file a set-ID bit.
    _feed_tree(boxes, mode)


@pytest.mark.parametrize("mode", ["master-fetch", "slave-send", "slave-sync"])
@pytest.mark.parametrize("record", [
    {b"t": b"l", b"n": b"a", b"l": b"target", b"mt": b"99999999999999999999999999999"},
    {b"t": b"f", b"n": b"a", b"m": b"420", b"mt": b"-99999999999999999999999999999", b"d": b"x",
     b"h": hashlib.sha256(b"x").hexdigest().encode()},
    {b"t": b"d", b"n": b"a", b"m": b"493", b"mt": b"99999999999999999999999999999"},
], ids=["link", "file", "dir"])
def test_tree_time_out_of_range_is_a_stream_error(mode: str, record: Dict[bytes, bytes]) -> None:
    """A record time no file system can take is a TreeStreamError like any other bad record."""
    # A record whose time no file system can take is refused with a
    # TreeStreamError like any other bad record (the master's fetch_tree then
    # raises ProtocolError, not the OverflowError of os.utime).
    root, dest = _sandbox(mode == "slave-sync")
    top = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    writer = Writer(top, sync=mode == "slave-sync", remove_dir=remove_dir_at)
    try:
        with pytest.raises(TreeStreamError):
            for box in [{b"t": b"d", b"m": b"493", b"mt": b"0"}, record, {b"t": b"u"}, {b"t": b"u"}]:
                writer.feed(box)
    finally:
        writer.close()
        os.close(top)
        shutil.rmtree(root)


def test_fetch_tree_with_a_time_out_of_range_raises_protocol_error(tcp_listener, tmp_path):  # noqa: F811
    """fetch_tree with a record time out of range raises ProtocolError and leaves nothing."""
    # A slave whose fetch_tree stream carries a time no file system can
    # take makes the call raise ProtocolError (not a bare OverflowError), and
    # nothing is left beside the destination.
    listener = tcp_listener()
    sock = socket.create_connection((HOST, listener.port), timeout=WAIT)
    wire = Wire(SocketStream(sock), label="master")
    slave_handshake(wire, "liar", secret=SECRET, basedir="/nonexistent", timeout=WAIT)
    slave = listener.slave_collection.get_slave(True, lambda s: s.name == "liar", timeout=WAIT)
    assert slave is not None
    outcome: List[BaseException] = []

    def call() -> None:
        try:
            slave.fetch_tree("t", str(tmp_path / "copy"))
        except BaseException as e:  # noqa: BLE001 - examined below
            outcome.append(e)
    caller = threading.Thread(target=call)
    caller.start()
    with sock:
        assert wire.read_box(WAIT)[b"meth"] == b"fetch_tree"
        boxes = [{b"files": b"0", b"size": b"0"}, {b"t": b"d", b"m": b"493", b"mt": b"0"},
                 {b"t": b"l", b"n": b"a", b"l": b"x", b"mt": b"99999999999999999999999999999"},
                 {b"t": b"u"}, {b"end": b"y"}]
        try:  # the master may drop us at the bad record, before the rest is written
            sock.sendall(b"".join(encode_box(box) for box in boxes))
        except (BrokenPipeError, ConnectionResetError):
            pass
        caller.join(WAIT)
    assert not caller.is_alive()
    assert os.listdir(tmp_path) == []
    assert len(outcome) == 1
    if not isinstance(outcome[0], ProtocolError):
        raise outcome[0]


@pytest.fixture(scope="module")
def master() -> Iterator[TcpSlaveListener]:
    """A master's TCP listener, shared by the examples (each registers anew)."""
    listener = TcpSlaveListener(port=0, host=HOST, secret=SECRET, slave_collection=SimpleSlaveCollection(),
                                io_timeout=10.0)
    listener.start()
    try:
        yield listener
    finally:
        listener.stop()


@fuzz(1)
@given(boxes=tree_streams(), end=st.sampled_from(["end", "error", "close"]))
def test_master_fetch_tree_from_any_stream(master: TcpSlaveListener, boxes: List[Dict[bytes, bytes]],
                                           end: str) -> None:
    """fetch_tree from any record stream: the tree in place, or a documented error and nothing left."""
    # Whatever record stream a registered slave answers fetch_tree with,
    # the call succeeds with the tree in place or raises a documented error
    # (ProtocolError, LocalError, Disconnected, the slave's RemoteError), and
    # nothing is left beside the destination when it fails.
    sock = socket.create_connection((HOST, master.port), timeout=WAIT)
    wire = Wire(SocketStream(sock), label="master")
    slave_handshake(wire, "fuzzed", secret=SECRET, basedir="/nonexistent", timeout=WAIT)
    slave = master.slave_collection.get_slave(True, lambda s: s.name == "fuzzed" and s.connected, timeout=WAIT)
    assert slave is not None
    out = tempfile.mkdtemp(prefix="remsh-fuzz-out-")
    outcome: List[BaseException] = []

    def call() -> None:
        try:
            slave.fetch_tree("t", os.path.join(out, "copy"))
        except BaseException as e:  # noqa: BLE001 - examined below
            outcome.append(e)
    caller = threading.Thread(target=call)
    caller.start()
    try:
        with sock:
            assert wire.read_box(WAIT)[b"meth"] == b"fetch_tree"
            try:
                # what the stream holds, announced as a slave does
                files = sum(1 for b in boxes if b.get(b"t") == b"f")
                size = sum(len(b.get(b"d", b"")) for b in boxes)
                wire.send_box({b"files": b"%d" % files, b"size": b"%d" % size})
                for box in boxes:
                    wire.send_box(box)
                if end == "end":
                    wire.send_box({b"end": b"y"})
                elif end == "error":
                    wire.send_box({b"error": b"no", b"errtag": b"failed"})
                else:
                    sock.shutdown(socket.SHUT_RDWR)  # the slave goes away mid-stream
            except (Disconnected, OSError):
                pass  # the master dropped us (a protocol error): fine
            caller.join(WAIT)
        assert not caller.is_alive()
        event(type(outcome[0]).__name__ if outcome else "tree in place")
        if outcome:
            assert isinstance(outcome[0], (ProtocolError, LocalError, Disconnected, RemoteError)), outcome[0]
            assert os.listdir(out) == []
        else:
            assert os.listdir(out) == ["copy"]
    finally:
        slave.close()
        shutil.rmtree(out, ignore_errors=True)


@fuzz(2)
@given(boxes=tree_streams())
def test_manifest_reader_raises_only_stream_errors(boxes: List[Dict[bytes, bytes]]) -> None:
    """Any sync_tree manifest is read or refused with a TreeStreamError; every kept path is made of valid names."""
    # Any manifest a slave sends for sync_tree is read or refused with a
    # TreeStreamError (turned into ProtocolError by the master); every entry it
    # keeps has a path made of valid names.
    reader = ManifestReader()
    try:
        for box in boxes:
            reader.feed(box)
    except TreeStreamError:
        return
    for rel in reader.entries:
        parts = rel.split(b"/") if rel else []
        assert all(p and p not in (b".", b"..") and b"\0" not in p for p in parts)


# -- the control socket ------------------------------------------------------------------------


class _Errors(logging.Handler):
    """Collects the ERROR records of the control socket's code."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def control() -> Iterator[Tuple[str, _Errors]]:
    """A control server on an empty fleet, shared by the examples."""
    d = tempfile.mkdtemp(prefix="remsh-fuzz-ctl-")
    os.chmod(d, 0o700)
    path = os.path.join(d, "control")
    server = ControlServer(path, FleetCollection())
    errors = _Errors()
    logger = logging.getLogger("remsh.control")
    logger.addHandler(errors)
    server.start()
    try:
        yield path, errors
    finally:
        server.stop()
        logger.removeHandler(errors)
        shutil.rmtree(d, ignore_errors=True)


def _exchange(path: str, data: bytes) -> Tuple[List[Dict[bytes, bytes]], Optional[BaseException]]:
    """Send ``data`` then end our side; the master's boxes until it closes
    (and the error that ended the reading, if any)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    try:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the master may close first (a box it refused)
        channel = Channel(sock)
        boxes: List[Dict[bytes, bytes]] = []
        while True:
            try:
                box = channel.read(20)
            except (ProtocolError, ConnectionResetError) as e:
                return boxes, e
            if box is None:
                return boxes, None
            boxes.append(dict(box))
    finally:
        sock.close()


requests = st.fixed_dictionaries(
    {b"op": st.sampled_from([b"ls", b"run", b"put", b"get", b"", b"nope", b"\xff"])},
    optional={b"version": st.sampled_from([b"1", b"2", b""]),
              b"targets": st.sampled_from([b"", b"*", b"a\0b", b"\xff"]),
              b"where": st.sampled_from([b"", b"k=v", b"=", b"k", b"a=b\0c=d", b"\xff=\xfe"]),
              b"parallel": numbers,
              b"timeout": st.sampled_from([b"1", b"nan", b"inf", b"-1", b"x", b"1e999"]),
              b"args": st.sampled_from([b"", b"true", b"\0"]),
              b"cwd": st.binary(max_size=5),
              b"src": st.sampled_from([b"", b"/", b"rel", b"/nonexistent/x"]),
              b"dest": st.sampled_from([b"", b"/nonexistent/y", b"rel"]),
              b"stdin": st.sampled_from([b"y", b"n"])})


@fuzz(2)
@given(request=requests, tail=st.binary(max_size=30), raw=st.binary(max_size=60), use_raw=st.booleans())
def test_control_socket_answers_any_input_and_lives_on(control: Tuple[str, _Errors], request: Dict[bytes, bytes],
                                                       tail: bytes, raw: bytes, use_raw: bool) -> None:
    """The control socket answers any input with well-formed boxes, logs no error and serves the next client."""
    # Whatever a client of the master's own user sends (framing garbage, a
    # request with any keys and values), the master answers with well-formed
    # boxes ending in 'fail' or 'done' (or closes at a framing error), logs no
    # error of its own, and serves the next client.
    path, errors = control
    before = len(errors.records)
    data = raw if use_raw else encode_box(request) + tail
    boxes, _ = _exchange(path, data)
    if boxes:
        assert boxes[-1].get(b"ev") in (b"fail", b"done"), boxes[-1]
        if boxes[-1][b"ev"] == b"fail":
            int(boxes[-1][b"exit"])
    assert errors.records[before:] == [], [r.getMessage() for r in errors.records[before:]]
    client = ControlClient(path)
    try:
        client.request("ls")
        assert [dict(b) for b in client.events()] == [{b"ev": b"done"}]
    finally:
        client.close()


@fuzz(2)
@given(data=st.binary(max_size=200) | st.lists(st.dictionaries(st.sampled_from([b"ev", b"slave", b"status",
                                                                                 b"data", b"exit"]),
                                                                st.binary(max_size=8)), max_size=4)
       .map(lambda bs: b"".join(encode_box(b) for b in bs)),
       cut=st.integers(0, 300))
def test_control_client_reader_raises_only_control_errors(data: bytes, cut: int) -> None:
    """A control client reading anything at all raises only ControlError."""
    # A client reading the events of whatever a peer at the control socket
    # sends gets boxes, then the end or a ControlError: nothing else.
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        done = threading.Event()

        def write() -> None:
            try:
                b.sendall(data[:cut])
                b.sendall(data[cut:])
            except OSError:
                pass
            finally:
                b.shutdown(socket.SHUT_WR)
                done.set()
        writer = threading.Thread(target=write)
        writer.start()
        events = EventIterator(Channel(a))
        got = []
        try:
            for box in events:
                got.append(box)
        except ControlError:
            pass
        writer.join(10)
        assert done.is_set()
        assert len(got) <= data.count(b"\x00\x00")
    finally:
        a.close()
        b.close()
