"""The slave's file-system operations (remsh.slave.fsops, remsh.files) on the
real file system: special files refused without blocking, rename that never
replaces, rm -rf that changes nothing outside the tree, atomic copies, and
temporary files that are never more open than the final file.

Every test runs with its own empty directory as the current directory, so
that a relative path (``.``, ``..``) can only ever name something the test
made.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import tempfile
from typing import Iterator, List

import pytest

from remsh.errors import (DeniedError, FailedError, InvalidRequestError, NotFoundError, OpenFailedError,
                          RemoteFileExistsError)
from remsh.files import PartialFile, rename_noreplace_at
from remsh.slave import fsops
from remsh.slave.policy import Policy
from tests.util import NOBODY, WAIT, need_unprivileged, run_in_thread, temp_files, wait_pid_exit


def b(p: object) -> bytes:
    return os.fsencode(p)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def own_cwd(tmp_path, monkeypatch) -> None:
    """The current directory is a scratch directory of the test's own."""
    scratch = tmp_path / "cwd" / "inner"
    scratch.mkdir(parents=True)
    monkeypatch.chdir(scratch)


@pytest.fixture
def d(tmp_path) -> bytes:
    """An empty directory, as bytes."""
    path = tmp_path / "d"
    path.mkdir()
    return b(path)


@pytest.fixture(params=["renameat2", "fallback"])
def rename_impl(request, monkeypatch) -> str:
    """Run a rename test once with renameat2 and once with it forced unavailable."""
    if request.param == "fallback":
        def unavailable(*args: object, **kwargs: object) -> None:
            raise OSError(errno.ENOSYS, "forced off for the test")
        monkeypatch.setattr(fsops, "_noreplace", unavailable)
    return str(request.param)


@pytest.fixture
def umask() -> Iterator[None]:
    """Set the umask to 022 for the test and restore it after."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


# -- open_regular -----------------------------------------------------------------

def test_open_regular_reads_file_in_blocking_mode(d):
    """A regular file opens, reads whole, and its descriptor is back in blocking mode."""
    path = os.path.join(d, b"f")
    with open(path, "wb") as f:
        f.write(b"hello")
    with fsops.open_regular(path) as f:
        assert os.get_blocking(f.fileno())
        assert f.read() == b"hello"


@pytest.mark.timeout(20)
def test_open_regular_refuses_fifo_without_blocking(d):
    """A FIFO with no writer is refused at once (OpenFailedError naming it), not waited on."""
    path = os.path.join(d, b"pipe")
    os.mkfifo(path)
    out = run_in_thread(lambda: fsops.open_regular(path)).wait(WAIT)
    assert isinstance(out.error, OpenFailedError), out.error
    assert "FIFO" in out.error.remote_message and "pipe" in out.error.remote_message


@pytest.mark.parametrize("kind", ["directory", "char-device", "socket"])
def test_open_regular_refuses_other_special_files(d, kind):
    """A directory and a device are refused with their type in the message; a socket cannot be opened at all."""
    if kind == "directory":
        path, word = d, "directory"
    elif kind == "char-device":
        path, word = b"/dev/null", "character device"
    else:
        path, word = os.path.join(d, b"sock"), "No such device or address"  # ENXIO
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        s.close()
    with pytest.raises(OpenFailedError, match=word):
        fsops.open_regular(path)


def test_open_regular_missing_is_notfound(d):
    """A missing file (or a path through a file) is NotFoundError."""
    with pytest.raises(NotFoundError):
        fsops.open_regular(os.path.join(d, b"nope"))
    open(os.path.join(d, b"file"), "wb").close()
    with pytest.raises(NotFoundError):
        fsops.open_regular(os.path.join(d, b"file", b"x"))


@pytest.mark.timeout(20)
def test_copy_from_fifo_fails_without_blocking(d):
    """copy of a FIFO fails at once with FailedError and leaves no destination."""
    src = os.path.join(d, b"pipe")
    os.mkfifo(src)
    out = run_in_thread(lambda: fsops.copy_file(src, os.path.join(d, b"dest"))).wait(WAIT)
    assert isinstance(out.error, FailedError), out.error
    assert "FIFO" in str(out.error)
    assert sorted(os.listdir(d)) == [b"pipe"]


# -- PartialFile and its mode ----------------------------------------------------

@pytest.mark.parametrize("mode, during, after", [
    (0o600, 0o600, 0o600),
    (0o640, 0o640, 0o640),
    (0o666, 0o644, 0o666),      # the umask narrows it during, the exact mode after
    (0o4755, 0o755, 0o4755),    # set-id only once complete
    (0o000, 0o000, 0o000),
    (None, 0o644, 0o644),
])
def test_partial_file_never_wider_than_final_mode(d, umask, mode, during, after):
    """The temporary file has the final permission bits (less the umask, no set-id) from creation; commit gives the exact mode."""
    dest = os.path.join(d, b"dest")
    part = PartialFile(dest, mode)
    try:
        part.write(b"data")
        assert stat.S_IMODE(os.stat(part.path).st_mode) == during
        part.commit()
    finally:
        part.discard()
    assert stat.S_IMODE(os.stat(dest).st_mode) == after
    assert temp_files(d) == []
    with open(dest, "rb") as f:
        assert f.read() == b"data"


def test_partial_file_with_dir_fd_stays_in_that_directory(d):
    """With dir_fd the file lands in the directory that was opened, even after the path is moved."""
    os.mkdir(os.path.join(d, b"a"))
    fd = os.open(os.path.join(d, b"a"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        part = PartialFile(b"f", 0o600, dir_fd=fd)
    finally:
        os.close(fd)  # the PartialFile holds its own
    os.rename(os.path.join(d, b"a"), os.path.join(d, b"moved"))
    os.mkdir(os.path.join(d, b"a"))
    part.write(b"x")
    part.commit()
    assert os.listdir(os.path.join(d, b"moved")) == [b"f"]
    assert os.listdir(os.path.join(d, b"a")) == []


def test_partial_file_commit_refuses_destination_made_meanwhile(d):
    """A destination created during the transfer is kept, and commit raises FileExistsError."""
    dest = os.path.join(d, b"dest")
    part = PartialFile(dest)
    part.write(b"new")
    with open(dest, "wb") as f:
        f.write(b"theirs")
    with pytest.raises(FileExistsError):
        part.commit()
    with open(dest, "rb") as f:
        assert f.read() == b"theirs"
    assert temp_files(d) == []


# -- rename_noreplace ----------------------------------------------------------------

def test_renameat2_is_used_on_this_kernel(d):
    """The renameat2 entry point works here, and refuses an existing destination with EEXIST."""
    for n in (b"a", b"b"):
        open(os.path.join(d, n), "wb").close()
    with pytest.raises(FileExistsError):
        rename_noreplace_at(os.path.join(d, b"a"), os.path.join(d, b"b"))
    rename_noreplace_at(os.path.join(d, b"a"), os.path.join(d, b"c"))
    assert sorted(os.listdir(d)) == [b"b", b"c"]


def test_rename_moves_file_and_directory(d, rename_impl):
    """A file and a directory with contents are renamed."""
    with open(os.path.join(d, b"f"), "wb") as f:
        f.write(b"1")
    os.makedirs(os.path.join(d, b"dir", b"sub"))
    fsops.rename_noreplace(os.path.join(d, b"f"), os.path.join(d, b"g"))
    fsops.rename_noreplace(os.path.join(d, b"dir"), os.path.join(d, b"dir2"))
    assert sorted(os.listdir(d)) == [b"dir2", b"g"]
    assert os.listdir(os.path.join(d, b"dir2")) == [b"sub"]


@pytest.mark.parametrize("src_kind", ["file", "dir", "symlink"])
@pytest.mark.parametrize("dest_kind", ["file", "empty-dir", "symlink"])
def test_rename_refuses_existing_destination(d, rename_impl, src_kind, dest_kind):
    """An existing destination (even an empty directory, which rename(2) would replace) gives fileexists and stays."""
    src, dest = os.path.join(d, b"src"), os.path.join(d, b"dest")
    if src_kind == "file":
        open(src, "wb").close()
    elif src_kind == "dir":
        os.mkdir(src)
    else:
        os.symlink(b"nowhere", src)
    if dest_kind == "file":
        with open(dest, "wb") as f:
            f.write(b"keep")
    elif dest_kind == "empty-dir":
        os.mkdir(dest)
    else:
        os.symlink(b"elsewhere", dest)
    before = os.lstat(dest)
    with pytest.raises(RemoteFileExistsError):
        fsops.rename_noreplace(src, dest)
    assert os.path.lexists(src)
    assert os.lstat(dest).st_ino == before.st_ino


@pytest.mark.parametrize("src_kind", ["file", "dir"])
def test_rename_refuses_destination_created_in_between(d, monkeypatch, rename_impl, src_kind):
    """A destination that appears after every check the caller could make, just before the move, is not overwritten."""
    src, dest = os.path.join(d, b"src"), os.path.join(d, b"dest")
    if src_kind == "file":
        open(src, "wb").close()
    else:
        os.mkdir(src)
    inner = fsops._noreplace

    def create_then_rename(*args: object, **kwargs: object) -> None:
        with open(dest, "wb") as f:
            f.write(b"theirs")
        inner(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fsops, "_noreplace", create_then_rename)
    with pytest.raises(RemoteFileExistsError):
        fsops.rename_noreplace(src, dest)
    with open(dest, "rb") as f:
        assert f.read() == b"theirs"
    assert os.path.lexists(src)


def test_rename_missing_source_is_notfound(d, rename_impl):
    """A missing source (or missing source directory) is NotFoundError, not failed."""
    with pytest.raises(NotFoundError):
        fsops.rename_noreplace(os.path.join(d, b"nope"), os.path.join(d, b"x"))
    with pytest.raises(NotFoundError):
        fsops.rename_noreplace(os.path.join(d, b"nodir", b"nope"), os.path.join(d, b"x"))


def test_rename_into_missing_directory_or_itself_fails(d, rename_impl):
    """A missing destination directory, or a directory into itself, is FailedError and changes nothing."""
    os.mkdir(os.path.join(d, b"dir"))
    with pytest.raises(FailedError):
        fsops.rename_noreplace(os.path.join(d, b"dir"), os.path.join(d, b"nodir", b"x"))
    with pytest.raises(FailedError):
        fsops.rename_noreplace(os.path.join(d, b"dir"), os.path.join(d, b"dir", b"inside"))
    assert os.listdir(os.path.join(d, b"dir")) == []
    assert os.listdir(d) == [b"dir"]


def test_rename_of_dot_dot_is_invalid(d):
    """A path ending in '..' is refused as invalid, not resolved to the parent."""
    os.mkdir(os.path.join(d, b"a"))
    with pytest.raises(InvalidRequestError):
        fsops.rename_noreplace(os.path.join(d, b"a", b".."), os.path.join(d, b"x"))
    assert os.listdir(d) == [b"a"]


# -- remove_tree -----------------------------------------------------------------------

def test_remove_tree_missing_file_and_symlink(d):
    """A missing path is fine; a file goes; a symlink to a directory goes without touching the target."""
    fsops.remove_tree(os.path.join(d, b"nope"))
    fsops.remove_tree(os.path.join(d, b"nodir", b"nope"))
    target = os.path.join(d, b"target")
    os.mkdir(target)
    open(os.path.join(target, b"keep"), "wb").close()
    os.symlink(target, os.path.join(d, b"link"))
    open(os.path.join(d, b"file"), "wb").close()
    fsops.remove_tree(os.path.join(d, b"link"))
    fsops.remove_tree(os.path.join(d, b"file"))
    assert os.listdir(d) == [b"target"]
    assert os.listdir(target) == [b"keep"]


def test_remove_tree_does_not_follow_symlinks_inside(d):
    """Symlinks inside the tree are removed; what they point to (files, directories) is untouched."""
    outside = os.path.join(d, b"outside")
    os.mkdir(outside)
    open(os.path.join(outside, b"keep"), "wb").close()
    os.chmod(outside, 0o500)
    tree = os.path.join(d, b"tree")
    os.makedirs(os.path.join(tree, b"sub"))
    os.symlink(outside, os.path.join(tree, b"sub", b"to-dir"))
    os.symlink(os.path.join(outside, b"keep"), os.path.join(tree, b"to-file"))
    ticks: List[int] = []
    fsops.remove_tree(tree, tick=lambda: ticks.append(1))
    assert os.listdir(d) == [b"outside"]
    assert os.listdir(outside) == [b"keep"]
    assert stat.S_IMODE(os.stat(outside).st_mode) == 0o500
    assert len(ticks) == 3


def test_remove_tree_of_dot_and_dot_dot_is_invalid(d):
    """remove of '.', '..' or a path ending in them is refused and removes nothing (the current directory here is the test's own)."""
    inner = os.path.join(d, b"a", b"b")
    os.makedirs(inner)
    os.chdir(inner)
    for p in (b".", b"..", b"./", os.path.join(d, b"a", b".."), os.path.join(d, b"a", b"."), b"/"):
        with pytest.raises(InvalidRequestError):
            fsops.remove_tree(p)
    assert os.listdir(d) == [b"a"]
    assert os.listdir(os.path.join(d, b"a")) == [b"b"]


class Unprivileged:
    """A directory owned by the unprivileged user (nobody when the tests run
    as root) and a way to run ``remove_tree`` as that user, in a forked child
    (the interpreter may live where nobody cannot execute it)."""

    def __init__(self) -> None:
        self.top = tempfile.mkdtemp(prefix="remsh-fsops-")
        os.chmod(self.top, 0o755)
        self.work = os.path.join(self.top, "work")
        os.mkdir(self.work, 0o755)

    def own(self) -> None:
        """Give everything under ``work`` to the unprivileged user."""
        if need_unprivileged():
            for dirpath, dirnames, filenames in os.walk(self.work):
                for n in [dirpath] + [os.path.join(dirpath, x) for x in dirnames + filenames]:
                    os.lchown(n, NOBODY, NOBODY)

    def remove(self, path: str) -> str:
        """``remove_tree(path)`` as the unprivileged user: "OK" or "FAILED message"."""
        assert os.path.isabs(path) and path.startswith(self.work + "/")
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: drop privileges, remove, report, exit
            try:
                os.close(r)
                os.chdir(self.top)
                if need_unprivileged():
                    os.setgroups([])
                    os.setgid(NOBODY)
                    os.setuid(NOBODY)
                try:
                    fsops.remove_tree(os.fsencode(path))
                    result = "OK"
                except FailedError as e:
                    result = f"FAILED {e.remote_message}"
                os.write(w, result.encode())
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                os.write(w, f"ERROR {e!r}".encode())
            finally:
                os._exit(0)
        os.close(w)
        pidfd = os.pidfd_open(pid)
        try:
            assert wait_pid_exit(pidfd, WAIT), "the unprivileged child did not finish"
        finally:
            os.close(pidfd)
            os.waitpid(pid, 0)
        with os.fdopen(r, "rb") as f:
            return f.read().decode()

    def cleanup(self) -> None:
        for dirpath, dirnames, filenames in os.walk(self.top):
            for n in dirnames:
                os.chmod(os.path.join(dirpath, n), 0o700)
        shutil.rmtree(self.top)


@pytest.fixture
def unpriv() -> Iterator[Unprivileged]:
    u = Unprivileged()
    try:
        yield u
    finally:
        u.cleanup()


def _locked_tree(top: str) -> None:
    """A tree whose directories lack every kind of owner permission."""
    for sub in ("none", "none/deeper", "ronly", "noread", "nosearch"):
        os.makedirs(os.path.join(top, sub))
    for sub in ("none/f", "none/deeper/f", "ronly/f", "noread/f", "nosearch/f", "f"):
        with open(os.path.join(top, sub), "w") as f:
            f.write("x")
        os.chmod(os.path.join(top, sub), 0o000)
    for sub, mode in (("none/deeper", 0o000), ("none", 0o000), ("ronly", 0o500), ("noread", 0o300),
                      ("nosearch", 0o600)):
        os.chmod(os.path.join(top, sub), mode)


def test_remove_tree_unlocks_inside_only(unpriv):
    """As an unprivileged user, a tree of 0o000/0o500/0o300/0o600 directories and 0o000 files is removed; the parent keeps its mode."""
    tree = os.path.join(unpriv.work, "tree")
    os.mkdir(tree)
    _locked_tree(tree)
    os.chmod(tree, 0o500)  # the top of the tree itself is inside it too
    unpriv.own()
    before = os.stat(unpriv.work)
    assert unpriv.remove(tree) == "OK"
    assert os.listdir(unpriv.work) == []
    after = os.stat(unpriv.work)
    assert stat.S_IMODE(after.st_mode) == stat.S_IMODE(before.st_mode) == 0o755


def test_remove_tree_leaves_locked_parent_alone(unpriv):
    """When the parent itself forbids removal, remove fails and the parent's mode is unchanged (it was set to 0o700 before)."""
    parent = os.path.join(unpriv.work, "ro")
    os.makedirs(os.path.join(parent, "tree", "sub"))
    open(os.path.join(parent, "file"), "w").close()
    unpriv.own()
    os.chmod(parent, 0o555)
    for name in ("tree", "file"):
        out = unpriv.remove(os.path.join(parent, name))
        assert out.startswith("FAILED") and "ermission denied" in out, out
        assert stat.S_IMODE(os.stat(parent).st_mode) == 0o555
    assert sorted(os.listdir(parent)) == ["file", "tree"]


def test_remove_tree_never_changes_symlink_targets(unpriv):
    """A locked directory outside the tree, reached through a symlink inside it, keeps its mode and content."""
    outside = os.path.join(unpriv.work, "outside")
    os.makedirs(os.path.join(outside, "inner"))
    tree = os.path.join(unpriv.work, "tree")
    os.mkdir(tree)
    os.symlink(outside, os.path.join(tree, "link"))
    os.symlink(os.path.join(outside, "inner"), os.path.join(tree, "link2"))
    unpriv.own()
    os.chmod(os.path.join(outside, "inner"), 0o000)
    os.chmod(outside, 0o500)
    assert unpriv.remove(tree) == "OK"
    assert os.listdir(unpriv.work) == ["outside"]
    assert stat.S_IMODE(os.stat(outside).st_mode) == 0o500
    assert stat.S_IMODE(os.stat(os.path.join(outside, "inner")).st_mode) == 0o000


# -- copy_file, make_dirs, unlink_file, stat_kind, create_partial ---------------------

def test_copy_file_copies_with_mode(d, umask):
    """copy makes a new file with the same data (several blocks) and the given mode."""
    src, dest = os.path.join(d, b"src"), os.path.join(d, b"dest")
    data = os.urandom(fsops.COPY_BLOCK * 2 + 17)
    with open(src, "wb") as f:
        f.write(data)
    fsops.copy_file(src, dest, 0o640)
    with open(dest, "rb") as f:
        assert f.read() == data
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o640
    assert temp_files(d) == []


def test_copy_file_errors(d):
    """copy: missing source notfound, directory source failed, existing destination fileexists (kept)."""
    src, dest = os.path.join(d, b"src"), os.path.join(d, b"dest")
    with pytest.raises(NotFoundError):
        fsops.copy_file(src, dest)
    with pytest.raises(FailedError, match="directory"):
        fsops.copy_file(d, dest)
    with open(src, "wb") as f:
        f.write(b"new")
    with open(dest, "wb") as f:
        f.write(b"old")
    with pytest.raises(RemoteFileExistsError):
        fsops.copy_file(src, dest)
    with pytest.raises(FailedError):
        fsops.copy_file(src, os.path.join(d, b"nodir", b"x"))
    with open(dest, "rb") as f:
        assert f.read() == b"old"
    assert temp_files(d) == []


def test_copy_file_destination_appearing_meanwhile_is_kept(d):
    """A destination created during the copy is not overwritten (fileexists) and no temporary file remains."""
    src, dest = os.path.join(d, b"src"), os.path.join(d, b"dest")
    with open(src, "wb") as f:
        f.write(b"new")

    def appear() -> None:
        with open(dest, "wb") as f:
            f.write(b"theirs")

    with pytest.raises(RemoteFileExistsError):
        fsops.copy_file(src, dest, tick=appear)
    with open(dest, "rb") as f:
        assert f.read() == b"theirs"
    assert temp_files(d) == []


def test_create_partial_refuses_existing_and_missing_directory(d):
    """create_partial: an existing destination is fileexists, a missing directory openfailed."""
    open(os.path.join(d, b"x"), "wb").close()
    with pytest.raises(RemoteFileExistsError):
        fsops.create_partial(os.path.join(d, b"x"))
    with pytest.raises(OpenFailedError):
        fsops.create_partial(os.path.join(d, b"nodir", b"x"))


def test_make_dirs_unlink_and_stat(d):
    """mkdir -p semantics, unlink of a missing file notfound, and stat's d/f/empty."""
    deep = os.path.join(d, b"a", b"b", b"c")
    fsops.make_dirs(deep)
    fsops.make_dirs(deep)
    assert fsops.stat_kind(deep) == b"d"
    open(os.path.join(deep, b"f"), "wb").close()
    assert fsops.stat_kind(os.path.join(deep, b"f")) == b"f"
    with pytest.raises(FailedError):
        fsops.make_dirs(os.path.join(deep, b"f", b"g"))
    fsops.unlink_file(os.path.join(deep, b"f"))
    assert fsops.stat_kind(os.path.join(deep, b"f")) == b""
    with pytest.raises(NotFoundError):
        fsops.unlink_file(os.path.join(deep, b"f"))
    with pytest.raises(FailedError):
        fsops.unlink_file(deep)


@pytest.mark.parametrize("call", [
    lambda p, pol: fsops.open_regular(p, pol),
    lambda p, pol: fsops.stat_kind(p, pol),
    lambda p, pol: fsops.make_dirs(p, pol),
    lambda p, pol: fsops.unlink_file(p, pol),
    lambda p, pol: fsops.remove_tree(p, pol),
    lambda p, pol: fsops.copy_file(p, p + b"x", policy=pol),
    lambda p, pol: fsops.rename_noreplace(p, p + b"x", pol),
    lambda p, pol: fsops.create_partial(p, policy=pol),
], ids=["open_regular", "stat_kind", "make_dirs", "unlink_file", "remove_tree", "copy_file", "rename", "partial"])
@pytest.mark.parametrize("confined", [False, True], ids=["no-root", "root"])
def test_nul_in_name_is_invalid(d, call, confined):
    """Every operation refuses a path with NUL as an invalid request (with or without a root)."""
    policy = Policy(root=d) if confined else Policy()
    with pytest.raises(InvalidRequestError):
        call(os.path.join(d, b"a\0b"), policy)


def test_denied_is_a_remote_error():
    """DeniedError carries the errtag 'denied' that the server sends."""
    assert DeniedError("x").errtag == "denied"
