"""Hostile peers against the newest parts: a slave feeding the master's
``fetch_tree`` a crafted tree stream, a slave with a session that never
acknowledges, and a slave flooding link checks while idle.

Each hostile slave is a real TCP peer on 127.0.0.1 that registers with the
right secret and then speaks the protocol by hand.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest

from remsh import session as session_mod
from remsh.control import ControlClient, ControlError
from remsh.errors import Disconnected, LocalError, PeerTimeout, ProtocolError, RemshError
from remsh.handshake import slave_handshake
from remsh.master.slavelistener.tcp import TcpSlaveListener
from remsh.slave.fsops import remove_tree
from remsh.transports.base import SocketStream
from remsh.treestream import DIR, END, FILE, LINK, UP, D, H, M, MT, N, T
from remsh.wire import Box, Wire, encode_box
from tests.slaveproc import HOST, SECRET, tcp_listener  # noqa: F401
from tests.util import NOBODY, WAIT, need_unprivileged, run_in_thread, wait_until

pytestmark = pytest.mark.timeout(120)

MTIME = b"1700000000000000000"


class FakeSlave:
    """A registered slave driven by the test (socket, wire, master's object)."""

    def __init__(self, listener: TcpSlaveListener, name: str, *, resumable: bool = False) -> None:
        self.sock = socket.create_connection((HOST, listener.port), timeout=WAIT)
        self.wire = Wire(SocketStream(self.sock), label="master")
        extra = {"resumable": "y"} if resumable else None
        self.reg = slave_handshake(self.wire, name, secret=SECRET, basedir="/nonexistent", timeout=WAIT,
                                   extra_info=extra)
        slave = listener.slave_collection.get_slave(True, lambda s: s.name == name, timeout=WAIT)
        assert slave is not None
        self.slave: Any = slave

    def close(self) -> None:
        self.wire.close()


def rec(**kw: bytes) -> Box:
    return {k.encode("ascii"): v for k, v in kw.items()}


def tree_box(t: bytes, name: Optional[bytes] = None, **more: bytes) -> bytes:
    box: Dict[bytes, bytes] = {T: t}
    if name is not None:
        box[N] = name
    box.update(rec(**more))
    return encode_box(box)


def top(mode: bytes = b"493") -> bytes:
    return tree_box(DIR, m=mode, mt=MTIME)


def small_file(name: bytes, data: bytes, mode: bytes = b"420") -> bytes:
    import hashlib
    return encode_box({T: FILE, N: name, M: mode, MT: MTIME, D: data,
                       H: hashlib.sha256(data).hexdigest().encode("ascii")})


def serve_fetch_tree(fake: FakeSlave, records: List[bytes]) -> None:
    """Answer one fetch_tree request with ``records`` (then the end box)."""
    request = fake.wire.read_box(WAIT)
    assert request is not None and request.get(b"meth") == b"fetch_tree", request
    try:
        # totals that cover every stream here: only what the records do is under test
        fake.wire.send_bytes(encode_box({b"files": b"100", b"size": b"1048576"}))
        for chunk in records:
            fake.wire.send_bytes(chunk)
        fake.wire.send_bytes(encode_box({END: b"y"}))
    except Disconnected:
        pass  # the master gave up on us midway


def fetch_with(listener: TcpSlaveListener, tmp_path: Path, records: List[bytes]) -> Tuple[Any, Path]:
    """Run the master's fetch_tree against a fake slave sending ``records``;
    return what it raised (``None``: it succeeded) and the destination."""
    fake = FakeSlave(listener, "hostile")
    dest = tmp_path / "dest" / "got"
    dest.parent.mkdir()
    outcome = run_in_thread(lambda: fake.slave.fetch_tree("src", dest))
    try:
        serve_fetch_tree(fake, records)
        outcome.wait(WAIT)
    finally:
        fake.close()
    return outcome.error, dest


# -- fetch_tree: the master's destination -----------------------------------------


@pytest.mark.parametrize("records", [
    [top(), tree_box(DIR, b"..", m=b"493", mt=MTIME), tree_box(UP), tree_box(UP)],
    [top(), small_file(b"../escaped", b"x"), tree_box(UP)],
    [top(), small_file(b"a/../../escaped", b"x"), tree_box(UP)],
    [top(), tree_box(DIR, b"/", m=b"493", mt=MTIME), tree_box(UP), tree_box(UP)],
    [top(), tree_box(LINK, b"ln", l=b"../..", mt=MTIME), tree_box(DIR, b"ln", m=b"493", mt=MTIME),
     small_file(b"escaped", b"x"), tree_box(UP), tree_box(UP)],
    [top(), tree_box(LINK, b"escaped", l=b"../../outside/escaped", mt=MTIME),
     small_file(b"escaped", b"x"), tree_box(UP)],
], ids=["dotdot-dir", "dotdot-file", "slash-in-name", "root-name", "dir-through-link", "file-through-link"])
def test_fetch_tree_names_from_a_slave_never_leave_dest(records: List[bytes], tcp_listener: Any,
                                                         tmp_path: Path) -> None:
    """A slave's crafted names (.., /, a link then a dir or file of the same name) fail fetch_tree and write nothing outside dest_dir."""
    outside = tmp_path / "outside"
    outside.mkdir()
    error, dest = fetch_with(tcp_listener(), tmp_path, records)
    assert isinstance(error, (ProtocolError, LocalError)), error
    assert sorted(os.listdir(tmp_path)) == ["dest", "outside"]
    assert os.listdir(outside) == []
    assert os.listdir(dest.parent) == [], "a failed fetch_tree left something behind"


def test_fetch_tree_drops_setuid_and_setgid_bits(tcp_listener: Any, tmp_path: Path) -> None:
    """A slave cannot make fetch_tree leave set-user-ID or set-group-ID files (runnable as the master's user) on the master."""
    records = [top(), small_file(b"tool", b"#!/bin/sh\n", mode=b"%d" % 0o6755),
               tree_box(DIR, b"sub", m=b"%d" % 0o2755, mt=MTIME),
               small_file(b"tool2", b"#!/bin/sh\n", mode=b"%d" % 0o4711), tree_box(UP), tree_box(UP)]
    error, dest = fetch_with(tcp_listener(), tmp_path, records)
    assert error is None, error
    assert stat.S_IMODE(os.stat(dest / "tool").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(dest / "sub" / "tool2").st_mode) == 0o711


def test_fetch_tree_refuses_a_tree_nested_past_path_max(tcp_listener: Any, tmp_path: Path) -> None:
    """A slave nesting directories past PATH_MAX fails fetch_tree with ProtocolError and nothing left (descriptors and path memory stay bounded)."""
    depth = 3000
    name = b"dd"
    down = tree_box(DIR, name, m=b"493", mt=MTIME)
    records = [top() + down * depth + tree_box(UP) * (depth + 1)]
    fds_before = len(os.listdir("/proc/self/fd"))
    peak: List[int] = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], len(os.listdir("/proc/self/fd")))
            except OSError:
                pass
            stop.wait(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    dest = tmp_path / "dest" / "got"
    try:
        error, dest = fetch_with(tcp_listener(), tmp_path, records)
    finally:
        stop.set()
        watcher.join(WAIT)
        # a deep tree that got through must not be left to pytest's recursive clean-up
        remove_tree(os.fsencode(dest))
    assert isinstance(error, ProtocolError), error
    assert os.listdir(dest.parent) == []
    assert peak[0] - fds_before < 2100, f"{peak[0] - fds_before} descriptors open at once"


# -- sessions ---------------------------------------------------------------------------


def test_session_peer_that_never_acknowledges_cannot_hold_a_send_forever(
        tcp_listener: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A resumable slave that reads everything but never acknowledges makes the master's send fail within ACK_TIMEOUT plus resume_timeout, not hang with its window full."""
    monkeypatch.setattr(session_mod, "ACK_TIMEOUT", 1.0)
    listener = tcp_listener(resume_timeout=1.0)
    fake = FakeSlave(listener, "no-acks", resumable=True)
    assert "session" in fake.reg.info, fake.reg.info
    src = tmp_path / "big"
    src.write_bytes(os.urandom(3 * session_mod.WINDOW_BYTES))
    stop = threading.Event()

    def swallow() -> None:
        """Answer the request, then read every box and acknowledge none."""
        try:
            request = fake.wire.read_box(WAIT)
            assert request is not None and request.get(b"meth") == b"send", request
            fake.wire.send_box({})  # the go-ahead: an empty box
            while not stop.is_set():
                try:
                    if fake.wire.read_box(0.2) is None:
                        return
                except PeerTimeout:
                    continue
        except RemshError:
            return

    reader = threading.Thread(target=swallow, daemon=True)
    reader.start()
    started = time.monotonic()
    outcome = run_in_thread(lambda: fake.slave.send(src, "dest"))
    try:
        outcome.wait(WAIT)
    finally:
        stop.set()
        reader.join(WAIT)
        fake.close()
    assert isinstance(outcome.error, Disconnected), outcome.error
    assert time.monotonic() - started < 10.0


# -- the control socket ------------------------------------------------------------------------

IMPOSTOR = """
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1])
s.listen(1)
print("listening", flush=True)
c, _ = s.accept()
c.settimeout(5)
try:
    print("got", len(c.recv(65536)), flush=True)
except OSError:
    print("got 0", flush=True)
"""


@pytest.mark.skipif(not need_unprivileged(), reason="needs root to run the impostor as another user")
def test_control_client_refuses_a_socket_of_another_user(tmp_path: Path) -> None:
    """A control socket made first by another local user at a shared path is refused by the client before any request goes out."""
    setpriv = shutil.which("setpriv")
    assert setpriv is not None
    outer = Path(tempfile.mkdtemp(prefix="remsh-attack-"))  # reachable by the other user
    os.chmod(outer, 0o755)
    shared = outer / "shared"
    shared.mkdir()
    os.chown(shared, NOBODY, NOBODY)
    path = str(shared / "master.sock")
    proc = subprocess.Popen([setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                             sys.executable, "-c", IMPOSTOR, path], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"listening\n"
        with pytest.raises(ControlError, match="another user"):
            client = ControlClient(path)
            try:
                client.request("run", args=["echo", "secret"], targets=[], where=[])
            finally:
                client.close()
        assert proc.stdout.readline() == b"got 0\n", "the request reached the other user's socket"
    finally:
        proc.kill()
        proc.wait(WAIT)
        shutil.rmtree(outer)


def test_ping_flood_from_a_slave_that_never_reads_does_not_stall_the_idle_monitor(tcp_listener: Any) -> None:
    """A resumable slave that floods link checks while idle and never reads cannot keep the idle monitor from noticing another slave going away."""
    listener = tcp_listener(resume_timeout=30.0)
    flooder = FakeSlave(listener, "flooder", resumable=True)
    victim = FakeSlave(listener, "victim", resumable=True)
    flooder.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    pings = encode_box({b"hb": b"ping"}) * 2_000_000
    sent = run_in_thread(lambda: flooder.sock.sendall(pings))
    try:
        # the master's pongs fill our unread receive buffer and then its send
        # buffer; the flood stops going in once the monitor blocks on a pong
        sent.done.wait(5.0)
        victim.sock.close()
        wait_until(lambda: not victim.slave.connected, timeout=5.0, what="the monitor to notice the victim left")
    finally:
        flooder.close()
        victim.close()
