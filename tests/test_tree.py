"""Directory trees: Slave.send_tree, fetch_tree and sync_tree against real
slave children (and, for the round trip and the count of turns, over every
transport).  Trees are compared by a walk: names (bytes), types, permission
bits, modification times to the second, link targets and contents."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import socket
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

from remsh.errors import (DeniedError, FailedError, LocalError, NotFoundError, OpenFailedError,
                          RemoteFileExistsError)
from remsh.master.slave import Slave
from remsh.master.tree import current_umask
from remsh.master.slavecollection.simple import SimpleSlaveCollection
from remsh.master.slavelistener.local import LocalSlaveListener
from remsh.slave.policy import Policy
from remsh.slave.server import SlaveServer
from remsh.transports.base import SocketStream
from remsh.wire import Wire, encode_box
from tests.transports import Connected
from tests.util import WAIT, UnprivilegedSetup, need_unprivileged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T0 = 1_600_000_000_000_000_000  # a fixed modification time (ns)


# -- trees and their comparison -------------------------------------------------


def b(p: Any) -> bytes:
    return os.fsencode(p)


def snapshot(top: Any) -> Dict[bytes, Tuple[Any, ...]]:
    """Every entry under ``top`` (the top itself as b""): type, mode, mtime
    (seconds), link target or content digest."""
    top = b(top)
    out: Dict[bytes, Tuple[Any, ...]] = {}

    def visit(path: bytes, rel: bytes) -> None:
        st = os.lstat(path)
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("l", os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            for name in sorted(os.listdir(path)):
                visit(os.path.join(path, name), rel + b"/" + name if rel else name)
            out[rel] = ("d", oct(mode), int(st.st_mtime))
        elif stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            out[rel] = ("f", oct(mode), int(st.st_mtime), st.st_size, digest)
        else:
            out[rel] = ("other",)

    visit(top, b"")
    return out


def as_fetched(want: Dict[bytes, Tuple[Any, ...]]) -> Dict[bytes, Tuple[Any, ...]]:
    """``want`` as fetch_tree reproduces it on the master: files and
    directories without set-ID and sticky bits, and the master's umask applied."""
    out = dict(want)
    keep = 0o777 & ~current_umask()
    for rel, entry in want.items():
        if entry[0] in ("f", "d"):
            out[rel] = (entry[0], oct(int(entry[1], 8) & keep)) + entry[2:]
    return out


def write(path: Any, data: bytes, mode: int = 0o644, mtime: int = T0) -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    os.utime(path, ns=(mtime, mtime))


def make_every_kind(top: Path) -> bytes:
    """A tree holding every kind of entry remsh copies; returns its path."""
    t = b(top)
    os.mkdir(t)
    write(t + b"/plain.txt", b"hello\n")
    write(t + b"/empty", b"", 0o600)
    write(t + b"/exec.sh", b"#!/bin/sh\n", 0o755)
    write(t + b"/setuid", b"s", 0o4711)
    write(t + b"/private", b"secret", 0o000)
    write(t + b"/big.bin", os.urandom(300_000))
    write(t + b"/edge-65535", os.urandom(65535))
    write(t + b"/edge-65536", os.urandom(65536))
    with open(t + b"/sparse", "wb") as f:
        f.truncate(3 << 20)
        f.seek(1 << 20)
        f.write(b"middle")
    os.utime(t + b"/sparse", ns=(T0, T0))
    write(t + b"/\xff\xfe-not-utf8", b"latin")
    write(t + b"/new\nline", b"nl")
    write(t + b"/" + b"n" * 255, b"longest name")
    os.makedirs(t + b"/sub/deeper/deepest")
    write(t + b"/sub/deeper/deepest/leaf", b"leaf")
    os.mkdir(t + b"/emptydir", 0o700)
    os.mkdir(t + b"/ro")
    write(t + b"/ro/inside", b"in a read-only directory")
    os.mkdir(t + b"/sticky")
    os.symlink(b"plain.txt", t + b"/link-rel")
    os.symlink(b"/etc/passwd", t + b"/link-abs")
    os.symlink(b"nowhere", t + b"/dangling")
    os.symlink(b"loop", t + b"/loop")
    os.symlink(b"loop-b", t + b"/loop-a")
    os.symlink(b"loop-a", t + b"/loop-b")
    os.symlink(b"sub", t + b"/dirlink")
    os.symlink(b"../../plain.txt", t + b"/sub/deeper/up")
    # directory bits and times last (making entries changes a directory's time)
    os.chmod(t + b"/ro", 0o555)
    os.chmod(t + b"/sticky", 0o1777)
    for d in (b"/sub/deeper/deepest", b"/sub/deeper", b"/sub", b"/emptydir", b"/ro", b"/sticky", b""):
        os.utime(t + d, ns=(T0 + 7, T0 + 7))
    return t


def make_many(top: Path, files: int, dirs: int = 100, size: int = 16) -> None:
    """``files`` small files spread over ``dirs`` directories."""
    os.mkdir(top)
    for d in range(dirs):
        os.mkdir(top / f"d{d:03d}")
    for i in range(files):
        (top / f"d{i % dirs:03d}" / f"f{i:05d}").write_bytes(b"%0*d" % (size, i))


def leftovers(directory: Any) -> List[bytes]:
    """Temporary files or directories remsh left in ``directory``."""
    return [n for n in os.listdir(b(directory)) if n.endswith(b".remsh-part")]


def slave_pid(slave: Slave) -> int:
    """The slave process's pid (the parent of a command it runs)."""
    out: List[bytes] = []
    assert slave.execute(["sh", "-c", "echo $PPID"], stdout_cb=out.append) == 0
    return int(b"".join(out))


# -- the round trip ------------------------------------------------------------------


def test_round_trip_of_every_kind(slave: Slave, basedir: Path, tmp_path: Path) -> None:
    """send_tree then fetch_tree reproduce every kind of entry: names as bytes, types, modes, mtimes, link targets, contents."""
    src = make_every_kind(tmp_path / "src")
    want = snapshot(src)
    slave.send_tree(src, "copy")
    assert snapshot(basedir / "copy") == want
    slave.fetch_tree("copy", tmp_path / "back")
    assert snapshot(tmp_path / "back") == as_fetched(want)
    assert leftovers(basedir) == [] and leftovers(tmp_path) == []
    assert os.stat(tmp_path / "back" / "sparse").st_blocks * 512 < 1 << 20, "the hole was written out"


def test_round_trip_over_every_transport(any_slave: Connected, tmp_path: Path) -> None:
    """Over every transport, send_tree and fetch_tree reproduce a tree of every kind exactly."""
    src = make_every_kind(tmp_path / "src")
    want = snapshot(src)
    any_slave.slave.send_tree(src, "copy")
    assert snapshot(any_slave.basedir / "copy") == want
    any_slave.slave.fetch_tree("copy", tmp_path / "back")
    assert snapshot(tmp_path / "back") == as_fetched(want)


def test_progress_reaches_the_total(slave: Slave, basedir: Path, tmp_path: Path) -> None:
    """progress(done, total) is called with the tree's byte total, ending at done == total, both ways."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(3 << 20))
    (src / "b").write_bytes(b"x" * 1000)
    calls: List[Tuple[int, Optional[int]]] = []
    slave.send_tree(src, "copy", progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == ((3 << 20) + 1000, (3 << 20) + 1000)
    assert all(total == (3 << 20) + 1000 for _, total in calls)
    back: List[Tuple[int, Optional[int]]] = []
    slave.fetch_tree("copy", tmp_path / "back", progress=lambda done, total: back.append((done, total)))
    assert back[-1] == ((3 << 20) + 1000, (3 << 20) + 1000)


# -- bad input --------------------------------------------------------------------------


def test_source_missing_or_not_a_directory(slave: Slave, basedir: Path, tmp_path: Path) -> None:
    """A local source that is missing or a file is a LocalError; a remote one is notfound/openfailed."""
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(LocalError, match="missing"):
        slave.send_tree(tmp_path / "missing", "copy")
    with pytest.raises(LocalError, match="not a directory"):
        slave.send_tree(tmp_path / "file", "copy")
    with pytest.raises(LocalError):
        slave.sync_tree(tmp_path / "file", "copy")
    (basedir / "rfile").write_bytes(b"x")
    with pytest.raises(NotFoundError):
        slave.fetch_tree("missing", tmp_path / "back")
    with pytest.raises(OpenFailedError, match="not a directory"):
        slave.fetch_tree("rfile", tmp_path / "back")
    assert not (tmp_path / "back").exists() and leftovers(tmp_path) == []
    assert sorted(os.listdir(basedir)) == ["rfile"]
    slave.ping()


def test_destination_exists_or_its_parent_is_missing(slave: Slave, basedir: Path, tmp_path: Path) -> None:
    """An existing destination is refused (nothing changed), a missing parent is notfound / LocalError; the slave stays in step."""
    src = tmp_path / "src"
    make_many(src, 300, 10)
    (basedir / "taken").mkdir()
    (basedir / "taken" / "keep").write_bytes(b"keep")
    with pytest.raises(RemoteFileExistsError):
        slave.send_tree(src, "taken")
    assert os.listdir(basedir / "taken") == ["keep"]
    with pytest.raises(NotFoundError):
        slave.send_tree(src, "no/such/parent")
    with pytest.raises(NotFoundError):
        slave.sync_tree(src, "no/such/parent")
    assert sorted(os.listdir(basedir)) == ["taken"]
    (tmp_path / "here").mkdir()
    with pytest.raises(LocalError, match="exists"):
        slave.fetch_tree("taken", tmp_path / "here")
    with pytest.raises(LocalError):
        slave.fetch_tree("taken", tmp_path / "no" / "parent")
    (basedir / "afile").write_bytes(b"x")
    with pytest.raises(FailedError, match="not a directory"):
        slave.sync_tree(src, "afile")
    slave.send_tree(src, "fresh")  # still in step
    assert snapshot(basedir / "fresh") == snapshot(src)


def test_special_files_fail_before_anything_is_written(slave: Slave, basedir: Path, tmp_path: Path) -> None:
    """A FIFO and a socket in the source fail send_tree, sync_tree and fetch_tree before anything is written, naming each path."""
    src = tmp_path / "src"
    make_many(src, 20, 2)
    os.mkfifo(src / "d000" / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "sock"))
    try:
        for call in (lambda: slave.send_tree(src, "copy"), lambda: slave.sync_tree(src, "synced")):
            with pytest.raises(LocalError) as info:
                call()
            assert "d000/fifo (a FIFO)" in str(info.value) and "sock (a socket)" in str(info.value)
        assert os.listdir(basedir) == []
        os.rename(src, basedir / "remote")
        with pytest.raises(FailedError) as info2:
            slave.fetch_tree("remote", tmp_path / "back")
        assert "d000/fifo (a FIFO)" in str(info2.value) and "sock (a socket)" in str(info2.value)
        assert not (tmp_path / "back").exists() and leftovers(tmp_path) == []
    finally:
        sock.close()
    slave.ping()


def test_disk_full_on_the_slave_leaves_nothing(slave: Slave, basedir: Path, tmp_path: Path) -> None:
    """A write failing midway (file-size limit in the slave) fails send_tree with nothing left, and sync_tree keeps the old file whole."""
    src = tmp_path / "src"
    make_many(src, 50, 5)
    (src / "huge").write_bytes(os.urandom(3 << 20))
    slave.sync_tree(src, "synced")
    resource.prlimit(slave_pid(slave), resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    with pytest.raises(FailedError, match="huge"):
        slave.send_tree(src, "copy")
    assert sorted(os.listdir(basedir)) == ["synced"]
    old = (src / "huge").read_bytes()
    (src / "huge").write_bytes(os.urandom(3 << 20))
    with pytest.raises(FailedError, match="huge"):
        slave.sync_tree(src, "synced")
    assert (basedir / "synced" / "huge").read_bytes() == old
    assert leftovers(basedir / "synced") == []
    slave.ping()


def test_unreadable_file_fails_fetch_tree(tmp_path: Path) -> None:
    """A file the slave's user cannot read fails fetch_tree naming it; nothing is left on the master."""
    setup = UnprivilegedSetup()
    try:
        tree = os.path.join(setup.basedir, "t")
        os.mkdir(tree)
        setup.own(tree)
        for name in ("a", "c"):
            with open(os.path.join(tree, name), "wb") as f:
                f.write(b"readable")
            setup.own(os.path.join(tree, name))
        with open(os.path.join(tree, "b-secret"), "wb") as f:
            f.write(b"no")
        os.chmod(os.path.join(tree, "b-secret"), 0o600)
        if not need_unprivileged():
            os.chmod(os.path.join(tree, "b-secret"), 0o000)
        with LocalSlaveListener(slave_collection=SimpleSlaveCollection(), python=setup.python) as lst:
            slave = lst.start_slave(setup.basedir)
            with pytest.raises(FailedError, match="b-secret"):
                slave.fetch_tree("t", tmp_path / "back")
            assert not (tmp_path / "back").exists() and leftovers(tmp_path) == []
            slave.ping()
    finally:
        setup.cleanup()


def test_file_changing_size_midway_fails(slave: Slave, basedir: Path, tmp_path: Path) -> None:
    """A file that grows while it is sent fails send_tree with a LocalError naming it; nothing is kept on the slave."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a-growing").write_bytes(os.urandom(8 << 20))
    (src / "b").write_bytes(b"b")

    def grow(done: int, total: Optional[int]) -> None:
        if done < 8 << 20:
            with open(src / "a-growing", "ab") as f:
                f.write(b"more")

    with pytest.raises(LocalError, match="a-growing"):
        slave.send_tree(src, "copy", progress=grow)
    assert os.listdir(basedir) == []
    slave.ping()


# -- sync_tree ---------------------------------------------------------------------------


def test_sync_tree_counts_each_kind_of_change(slave: Slave, basedir: Path, tmp_path: Path) -> None:
    """sync_tree sends only what differs (size, mtime; content with checksum), deletes extras only with delete, and counts it all."""
    src = tmp_path / "src"
    make_many(src, 40, 4)
    os.symlink("d000", src / "link")
    dest = basedir / "dest"

    def sync(**kw: Any) -> Tuple[int, int, int, int]:
        r = slave.sync_tree(src, "dest", **kw)
        return r.sent_files, r.sent_bytes, r.deleted, r.unchanged

    assert sync() == (41, 40 * 16, 0, 0)  # missing: made, everything sent
    assert snapshot(dest) == snapshot(src)
    assert sync() == (0, 0, 0, 41)
    (src / "d001" / "f00001").write_bytes(b"a longer content!")  # size
    assert sync() == (1, 17, 0, 40)
    os.utime(src / "d002" / "f00002", ns=(T0, T0))  # time only
    assert sync() == (1, 16, 0, 40)
    os.chmod(src / "d003" / "f00003", 0o600)  # bits only: set, not sent
    assert sync() == (0, 0, 0, 41)
    assert snapshot(dest) == snapshot(src)
    f = src / "d000" / "f00000"
    st = f.stat()
    f.write_bytes(b"X" * 16)  # same size, same time, new content
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert sync() == (0, 0, 0, 41)
    assert sync(checksum=True) == (1, 16, 0, 40)
    assert (dest / "d000" / "f00000").read_bytes() == b"X" * 16
    (src / "new").write_bytes(b"new")  # added
    os.unlink(src / "link")
    os.symlink("d001", src / "link")  # link target changed
    assert sync() == (2, 3, 0, 40)
    os.unlink(src / "d000" / "f00020")
    os.unlink(src / "new")
    (dest / "extra-dir" / "deep").mkdir(parents=True)
    (dest / "extra-dir" / "deep" / "x").write_bytes(b"x")
    assert sync() == (0, 0, 0, 40)  # extras stay without delete
    assert (dest / "new").exists()
    assert sync(delete=True) == (0, 0, 5, 40)  # f00020, new, extra-dir, deep, x
    assert snapshot(dest) == snapshot(src)
    for p in (src / "d003").iterdir():
        p.unlink()
    (src / "d003").rmdir()
    (src / "d003").write_bytes(b"now a file")  # a directory becomes a file
    assert sync(delete=True) == (1, 10, 10, 30)  # d003's ten files go with it
    assert snapshot(dest) == snapshot(src)
    assert leftovers(dest) == []


def test_sync_tree_replaces_files_atomically(slave: Slave, basedir: Path, tmp_path: Path) -> None:
    """sync_tree puts a new file in place by rename: an open descriptor of the old file still reads the old content."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"old")
    slave.sync_tree(src, "dest")
    with open(basedir / "dest" / "f", "rb") as old:
        (src / "f").write_bytes(b"new content")
        slave.sync_tree(src, "dest")
        assert old.read() == b"old"
    assert (basedir / "dest" / "f").read_bytes() == b"new content"


# -- turns: one conversation per tree -------------------------------------------------------


class TurnCounter:
    """Counts a master's turns on one slave's wire, whatever the transport:
    a box received after the master has sent something since the last box
    it received."""

    def __init__(self, wire: Any) -> None:
        self.turns = 0
        self._sent = False
        send_bytes, read_box = wire.send_bytes, wire.read_box

        def counted_send(data: Any, **kw: Any) -> None:
            self._sent = True
            send_bytes(data, **kw)

        def counted_read(timeout: Optional[float] = None) -> Any:
            box = read_box(timeout)
            if box is not None and self._sent:
                self.turns += 1
                self._sent = False
            return box

        wire.send_bytes = counted_send
        wire.read_box = counted_read
        wire.send_box = lambda box, **kw: counted_send(encode_box(box), **kw)


def count_turns(slave: Slave) -> TurnCounter:
    return TurnCounter(slave.wire)


def check_turns(slave: Slave, basedir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_many(src, 10_000, 200)
    turns = count_turns(slave)
    slave.ping()
    slave.ping()
    assert turns.turns == 2  # the counter counts
    slave.send_tree(src, "copy")
    assert turns.turns == 3, "send_tree: one turn"
    slave.fetch_tree("copy", tmp_path / "back")
    assert turns.turns == 4, "fetch_tree: one turn"
    assert slave.sync_tree(src, "copy").unchanged == 10_000
    assert turns.turns == 6, "sync_tree: two turns"
    for i in range(0, 10_000, 100):
        os.utime(src / f"d{i % 200:03d}" / f"f{i:05d}", ns=(T0, T0))
    assert slave.sync_tree(src, "copy").sent_files == 100
    assert turns.turns == 8, "sync_tree after changes: two turns"
    assert snapshot(src) == snapshot(basedir / "copy")


def test_ten_thousand_files_cost_no_round_trip_each(slave: Slave, basedir: Path, tmp_path: Path) -> None:
    """10,000 files: send_tree and fetch_tree take one request/response turn, sync_tree two."""
    check_turns(slave, basedir, tmp_path)


def test_turns_over_every_transport(any_slave: Connected, tmp_path: Path) -> None:
    """Over every transport, 10,000 files cost one turn per send_tree/fetch_tree and two per sync_tree."""
    check_turns(any_slave.slave, any_slave.basedir, tmp_path)


# -- memory -------------------------------------------------------------------------------------

MEMORY_SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, sys.argv[1])
    from remsh.master.slavecollection.simple import SimpleSlaveCollection
    from remsh.master.slavelistener.local import LocalSlaveListener

    def hwm(pid):
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    work = sys.argv[2]
    src = os.path.join(work, "src")
    os.makedirs(os.path.join(src, "d"))
    for i in range(20):
        with open(os.path.join(src, "d", f"small{i}"), "wb") as f:
            f.write(os.urandom(70000))
    with open(os.path.join(src, "d", "huge"), "wb") as f:
        f.truncate(1 << 30)
        f.seek(512 << 20)
        f.write(b"in the middle")
    base = os.path.join(work, "base")
    os.mkdir(base)
    with LocalSlaveListener(slave_collection=SimpleSlaveCollection()) as lst:
        slave = lst.start_slave(base)
        out = []
        slave.execute(["sh", "-c", "echo $PPID"], stdout_cb=out.append)
        pid = int(b"".join(out))
        warm = os.path.join(work, "warm")
        os.mkdir(warm)
        with open(os.path.join(warm, "f"), "wb") as f:
            f.write(os.urandom(4 << 20))
        slave.send_tree(warm, "warm")
        slave.fetch_tree("warm", os.path.join(work, "warm-back"))
        slave.sync_tree(warm, "warm", checksum=True)
        before = {"master": hwm(os.getpid()), "slave": hwm(pid)}
        slave.send_tree(src, "big")
        slave.fetch_tree("big", os.path.join(work, "back"))
        with open(os.path.join(src, "d", "huge"), "r+b") as f:
            f.write(b"changed")
        slave.sync_tree(src, "big")
        after = {"master": hwm(os.getpid()), "slave": hwm(pid)}
        size = os.stat(os.path.join(work, "back", "d", "huge")).st_size
    print(json.dumps({"before": before, "after": after, "size": size}))
""")


def test_a_1_gib_file_in_a_tree_takes_bounded_memory(tmp_path: Path) -> None:
    """A 1 GiB (sparse) file sent, fetched and synced inside a tree grows neither end's peak RSS by 64 MiB."""
    script = tmp_path / "memory.py"
    script.write_text(MEMORY_SCRIPT)
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([sys.executable, str(script), ROOT, str(work)], capture_output=True, timeout=240)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    result = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert result["size"] == 1 << 30
    for end in ("master", "slave"):
        growth = result["after"][end] - result["before"][end]
        assert growth < 64 << 20, (end, growth, result)


# -- a slave confined to a root ----------------------------------------------------------------


@pytest.fixture
def rooted(tmp_path: Path) -> Iterator[Tuple[Slave, Path, Path]]:
    """A slave server confined to tmp_path/root (in this process), its root and a directory outside."""
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (root / "t").mkdir()
    (root / "t" / "f").write_bytes(b"f")
    os.symlink(outside, root / "t" / "out")
    os.symlink(outside, root / "link-out")
    a, c = socket.socketpair()
    server = SlaveServer(Wire(SocketStream(c, send_timeout=None), label="rooted slave"), str(root),
                         policy=Policy(root=str(root)))
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    slave = Slave(Wire(SocketStream(a, send_timeout=None), label="rooted"), "rooted", io_timeout=WAIT)
    try:
        yield slave, root, outside
    finally:
        slave.close()
        thread.join(WAIT)


def test_root_confines_tree_operations(rooted: Tuple[Slave, Path, Path], tmp_path: Path) -> None:
    """With --root, tree operations outside the root are denied and links inside are copied, not followed."""
    slave, root, outside = rooted
    src = tmp_path / "src"
    make_many(src, 10, 2)
    for dest in (str(outside / "copy"), "../outside/copy", "link-out/copy"):
        with pytest.raises(DeniedError):
            slave.send_tree(src, dest)
        with pytest.raises(DeniedError):
            slave.sync_tree(src, dest)
    assert os.listdir(outside) == ["secret"]
    for where in ("link-out", "../outside", str(outside)):
        with pytest.raises(DeniedError):
            slave.fetch_tree(where, tmp_path / "back")
    slave.send_tree(src, "copy")
    assert snapshot(root / "copy") == snapshot(src)
    slave.fetch_tree("t", tmp_path / "back")
    assert os.readlink(tmp_path / "back" / "out") == str(outside)
    assert sorted(os.listdir(tmp_path / "back")) == ["f", "out"]
