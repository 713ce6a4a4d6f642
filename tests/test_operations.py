"""Every operation of SPEC section 5 over every transport: success, each
error tag, big transfers, concurrency and disconnection; malformed requests
at the wire level.

A test that takes ``slave`` (or ``any_transport``) runs once per transport
(local, TCP, TLS, embedded SSH, SSH through OpenSSH; see
:mod:`tests.transports`), each time with a fresh slave rooted at the test's
``basedir``.  Tests that need the local transport itself (``kill_slave``,
a slave running as another user, the raw wire) use ``listener``,
``unpriv`` or ``raw_slave`` and run once.
"""

from __future__ import annotations

import hashlib
import io
import os
import resource
import shutil
import stat
import threading
import time
from typing import Callable, Dict, List

import pytest

from remsh.errors import (CommandTimeout, Disconnected, ExecFailedError, FailedError,
                          InvalidMethError, InvalidRequestError, LocalError, NotFoundError, OpenFailedError,
                          RemoteError, RemoteFileExistsError, RemshError, UnexpectedError, UsageError,
                          VersionTooNewError, VersionUnsupportedError, remote_error)
from remsh.master.slave import Slave
from remsh.master.slavelistener.local import LocalSlaveListener

from tests.transports import Connected, TransportUnderTest
from tests.util import (NOBODY, WAIT, UnprivilegedSetup, run_in_thread, temp_files, wait_pid_exit,
                        wait_until)

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def run(slave: Slave, args, **kw) -> "tuple[int, bytes, bytes]":
    """execute, collecting both streams."""
    out: List[bytes] = []
    err: List[bytes] = []
    code = slave.execute(args, stdout_cb=out.append, stderr_cb=err.append, **kw)
    return code, b"".join(out), b"".join(err)


def slave_pid(slave: Slave) -> int:
    """The slave process's pid: the parent of a command it runs."""
    code, out, _ = run(slave, ["sh", "-c", "echo $PPID"])
    assert code == 0
    return int(out)


def path_of(basedir, *parts) -> str:
    return os.path.join(str(basedir), *parts)


@pytest.fixture
def slave(any_slave: Connected) -> Slave:
    """A fresh slave rooted at ``basedir``, once per transport."""
    return any_slave.slave


@pytest.fixture
def unpriv(collection):
    """A slave whose user is not root, for tests that need permissions to bite."""
    try:
        setup = UnprivilegedSetup()
    except RuntimeError as e:
        pytest.skip(str(e))
    lst = LocalSlaveListener(slave_collection=collection, python=setup.python)
    try:
        slave = lst.start_slave(setup.basedir)
        if setup.python is not None:
            assert run(slave, ["id", "-u"])[1] == b"%d\n" % NOBODY
        yield slave, setup
    finally:
        lst.stop()
        setup.cleanup()


# -- registration ----------------------------------------------------------------


def test_registration_info(any_slave, basedir) -> None:
    """A slave registers with its name, its base directory and its descriptive keys."""
    slave = any_slave.slave
    assert slave.name.startswith(any_slave.transport + "-")
    assert slave.info["basedir"] == os.path.abspath(str(basedir))
    assert set(slave.info) >= {"hostname", "platform", "python", "basedir", "remsh"}
    assert slave.connected
    assert any_slave.collection.get_slave(False, lambda s: s.name == slave.name) is slave


def test_local_slave_default_name(listener, basedir) -> None:
    """A local slave started without a name registers as local-<pid of the child>."""
    slave = listener.start_slave(str(basedir))
    pid = int(run(slave, ["sh", "-c", "echo $PPID"])[1])
    assert slave.name == f"local-{pid}"


# -- set_cwd ------------------------------------------------------------------------


def test_set_cwd_relative_absolute_and_back(slave, basedir) -> None:
    """set_cwd: relative is against the current dir, absolute works, None goes home."""
    base = os.path.abspath(str(basedir))
    os.makedirs(path_of(basedir, "a", "b"))
    assert slave.set_cwd("a") == os.path.join(base, "a")
    assert slave.set_cwd("b") == os.path.join(base, "a", "b")
    assert slave.set_cwd("..") == os.path.join(base, "a")
    assert slave.stat("b") == "d"  # relative paths follow the current directory
    assert slave.set_cwd(os.path.join(base, "a", "b")) == os.path.join(base, "a", "b")
    assert slave.set_cwd() == base
    assert slave.set_cwd(None) == base


def test_set_cwd_empty_changes_nothing(slave, basedir) -> None:
    """set_cwd("") reports the current directory and leaves it unchanged."""
    os.mkdir(path_of(basedir, "sub"))
    where = slave.set_cwd("sub")
    assert slave.set_cwd("") == where
    assert slave.set_cwd(b"") == where


def test_set_cwd_notfound(slave, basedir) -> None:
    """set_cwd to a missing directory or a file is notfound, and the cwd stays."""
    os.mkdir(path_of(basedir, "sub"))
    open(path_of(basedir, "sub", "file"), "w").close()
    where = slave.set_cwd("sub")
    for bad in ("missing", "file", "../missing/sub"):
        with pytest.raises(NotFoundError) as info:
            slave.set_cwd(bad)
        assert info.value.errtag == "notfound"
    assert slave.set_cwd("") == where


# -- getenv -----------------------------------------------------------------------


def test_getenv(any_transport: TransportUnderTest, basedir) -> None:
    """getenv returns the slave's environment, undecodable bytes included."""
    slave = any_transport.start(basedir, env={"REMSH_TEST_GETENV": "some value=1",
                                              "REMSH_TEST_BYTES": os.fsdecode(b"caf\xe9")}).slave
    env = slave.getenv()
    assert env["REMSH_TEST_GETENV"] == "some value=1"
    assert os.fsencode(env["REMSH_TEST_BYTES"]) == b"caf\xe9"
    assert "PATH" in env


# -- mkdir / unlink -----------------------------------------------------------------


def test_mkdir_makes_parents_and_accepts_existing(slave, basedir) -> None:
    """mkdir works like mkdir -p: parents made, an existing directory is fine."""
    slave.mkdir("a/b/c")
    assert os.path.isdir(path_of(basedir, "a", "b", "c"))
    slave.mkdir("a/b/c")
    slave.mkdir("a")
    assert slave.stat("a/b/c") == "d"


def test_mkdir_fails_when_a_file_is_in_the_way(slave, basedir) -> None:
    """mkdir over a file, or through one, is failed."""
    open(path_of(basedir, "f"), "w").close()
    with pytest.raises(FailedError) as info:
        slave.mkdir("f")
    assert info.value.errtag == "failed"
    with pytest.raises(FailedError):
        slave.mkdir("f/sub")
    assert os.path.isfile(path_of(basedir, "f"))


def test_mkdir_fails_without_permission(unpriv) -> None:
    """mkdir in a directory the slave may not write is failed."""
    slave, setup = unpriv
    ro = os.path.join(setup.basedir, "ro")
    os.mkdir(ro, 0o555)
    setup.own(ro)
    with pytest.raises(FailedError):
        slave.mkdir("ro/sub")
    assert not os.path.exists(os.path.join(ro, "sub"))


def test_stat_failed_without_permission(unpriv) -> None:
    """stat through a directory the slave may not search is failed, not "missing"."""
    slave, setup = unpriv
    closed = os.path.join(setup.basedir, "closed")
    os.mkdir(closed, 0)
    setup.own(closed)
    with pytest.raises(FailedError):
        slave.stat("closed/x")
    os.chmod(closed, 0o755)


def test_unlink(slave, basedir) -> None:
    """unlink removes a file; a missing file is notfound; a directory is failed."""
    open(path_of(basedir, "f"), "w").close()
    slave.unlink("f")
    assert not os.path.exists(path_of(basedir, "f"))
    with pytest.raises(NotFoundError):
        slave.unlink("f")
    os.mkdir(path_of(basedir, "d"))
    with pytest.raises(FailedError):
        slave.unlink("d")
    assert os.path.isdir(path_of(basedir, "d"))


# -- execute ------------------------------------------------------------------------


def test_execute_exit_code(slave) -> None:
    """execute returns the command's exit code."""
    assert slave.execute(["true"]) == 0
    assert slave.execute(["sh", "-c", "exit 3"]) == 3
    assert slave.execute(["sh", "-c", "exit 255"]) == 255


def test_execute_signal_is_negative(slave) -> None:
    """A command killed by signal N returns -N."""
    assert slave.execute(["sh", "-c", "kill -TERM $$"]) == -15
    assert slave.execute(["sh", "-c", "kill -KILL $$"]) == -9


def test_execute_streams_are_separate_and_ordered(slave) -> None:
    """stdout and stderr reach their own callbacks, each in order."""
    code, out, err = run(slave, ["sh", "-c", "echo out1; echo err1 >&2; echo out2; echo err2 >&2"])
    assert code == 0
    assert out == b"out1\nout2\n"
    assert err == b"err1\nerr2\n"
    code, out, _ = run(slave, ["seq", "1", "200000"])
    assert out == b"".join(b"%d\n" % i for i in range(1, 200001))


def test_execute_without_callbacks_discards_output(slave) -> None:
    """A stream with no callback is discarded; the command still completes."""
    err: List[bytes] = []
    code = slave.execute(["sh", "-c", "head -c 3000000 /dev/zero; echo e >&2; exit 4"], stderr_cb=err.append)
    assert code == 4
    assert b"".join(err) == b"e\n"


def test_execute_binary_arguments(slave) -> None:
    """Arguments are passed byte for byte, including non-UTF-8 bytes."""
    code, out, _ = run(slave, ["printf", "%s|%s", b"caf\xe9", "été"])
    assert code == 0
    assert out == b"caf\xe9|" + "été".encode()


def test_execute_missing_program_is_execfailed(slave) -> None:
    """A program that does not exist is execfailed, and the slave keeps serving."""
    with pytest.raises(ExecFailedError) as info:
        slave.execute(["/nonexistent/program", "x"])
    assert info.value.errtag == "execfailed"
    with pytest.raises(ExecFailedError):
        slave.execute(["remsh-no-such-program-on-path"])
    slave.ping()
    assert slave.execute(["true"]) == 0


def test_execute_empty_args_is_usage_error(slave) -> None:
    """execute with no arguments is refused on the master."""
    with pytest.raises(UsageError):
        slave.execute([])
    slave.ping()


def test_execute_timeout(slave) -> None:
    """A command past its timeout is killed and raises CommandTimeout promptly."""
    start = time.monotonic()
    with pytest.raises(CommandTimeout) as info:
        slave.execute(["sleep", "60"], timeout=0.5)
    assert info.value.errtag == "timeout"
    assert time.monotonic() - start < 10
    assert slave.execute(["true"], timeout=30) == 0


def test_execute_long_timeout(slave) -> None:
    """A time limit of weeks is accepted on both sides (it outlasts a poll(2) timeout)."""
    assert slave.execute(["true"], timeout=30 * 86400.0) == 0
    assert slave.execute(["sh", "-c", "exit 2"], timeout=1e9) == 2
    slave.ping()


def test_execute_non_finite_timeout_refused(slave) -> None:
    """A timeout that is not a positive finite number is refused on the master."""
    for bad in (float("inf"), float("nan"), 0, -1):
        with pytest.raises(UsageError):
            slave.execute(["true"], timeout=bad)
    slave.ping()


def test_execute_timeout_kills_process_group(slave) -> None:
    """The time limit kills the command's whole process group, background children too."""
    pidfds: List[int] = []

    def grab(data: bytes) -> None:
        pidfds.append(os.pidfd_open(int(data)))

    try:
        with pytest.raises(CommandTimeout):
            slave.execute(["sh", "-c", "sleep 60 & echo $!; wait"], stdout_cb=grab, timeout=1)
        assert len(pidfds) == 1
        assert wait_pid_exit(pidfds[0]), "background child survived the timeout"
    finally:
        for fd in pidfds:
            os.close(fd)


def start_and_wait(slave: Slave, script: str, **kw):
    """Run ``sh -c script`` in a thread; return (outcome, first stdout line)."""
    started = threading.Event()
    lines: List[bytes] = []

    def out(data: bytes) -> None:
        lines.append(data)
        started.set()

    outcome = run_in_thread(lambda: slave.execute(["sh", "-c", script], stdout_cb=out, **kw))
    assert started.wait(WAIT), "command did not start"
    return outcome, lines[0]


def test_interrupt_from_another_thread(slave) -> None:
    """interrupt() from another thread kills a running command promptly (-9)."""
    outcome, _ = start_and_wait(slave, "echo started; exec sleep 60")
    t0 = time.monotonic()
    slave.interrupt()
    outcome.wait(WAIT)
    assert outcome.error is None, outcome.error
    assert outcome.result == -9
    assert outcome.finished_at - t0 < 5
    slave.ping()


def test_interrupt_kills_process_group(slave) -> None:
    """interrupt() kills background children of the command too."""
    outcome, line = start_and_wait(slave, "sleep 60 & echo $!; wait")
    pidfd = os.pidfd_open(int(line))
    try:
        slave.interrupt()
        outcome.wait(WAIT)
        assert outcome.error is None, outcome.error
        assert wait_pid_exit(pidfd), "background child survived the interrupt"
    finally:
        os.close(pidfd)


def test_interrupt_when_idle_does_nothing(slave) -> None:
    """interrupt() with no command running does nothing, not even to the next command."""
    slave.interrupt()
    slave.ping()
    assert slave.execute(["sh", "-c", "exit 7"]) == 7


def test_callback_exception_interrupts_and_propagates(slave) -> None:
    """An exception from an output callback kills the command and is re-raised."""

    class Stop(Exception):
        pass

    def cb(data: bytes) -> None:
        raise Stop()

    start = time.monotonic()
    with pytest.raises(Stop):
        slave.execute(["sh", "-c", "echo x; exec sleep 60"], stdout_cb=cb)
    assert time.monotonic() - start < 10
    slave.ping()
    assert slave.execute(["true"]) == 0


def test_execute_env_override_and_removal(any_transport: TransportUnderTest, basedir) -> None:
    """env overrides variables, a None value removes one, others are inherited."""
    slave = any_transport.start(basedir, env={"HOME": "/home/remsh-test", "REMSH_KEEP": "kept",
                                              "FOO": None, "EMPTY": None}).slave
    script = 'printf "%s|%s|%s|%s" "$FOO" "${HOME-unset}" "$REMSH_KEEP" "${EMPTY-unset}"'
    code, out, _ = run(slave, ["sh", "-c", script], env={"FOO": "bar", "HOME": None, b"EMPTY": b""})
    assert code == 0
    assert out == b"bar|unset|kept|"
    # the overrides were for that command only
    code, out, _ = run(slave, ["sh", "-c", script])
    assert out == b"|/home/remsh-test|kept|unset"


def test_execute_cwd(slave, basedir) -> None:
    """cwd runs the command there, relative to the slave's current directory."""
    base = os.path.realpath(str(basedir))
    os.makedirs(path_of(basedir, "a", "b"))
    assert run(slave, ["pwd"])[1] == os.fsencode(base) + b"\n"
    assert run(slave, ["pwd"], cwd="a")[1] == os.fsencode(os.path.join(base, "a")) + b"\n"
    slave.set_cwd("a")
    assert run(slave, ["pwd"])[1] == os.fsencode(os.path.join(base, "a")) + b"\n"
    assert run(slave, ["pwd"], cwd="b")[1] == os.fsencode(os.path.join(base, "a", "b")) + b"\n"
    with pytest.raises(ExecFailedError):
        slave.execute(["pwd"], cwd="missing")


def test_execute_stdin_bytes_and_file(slave, tmp_path) -> None:
    """stdin is fed from bytes or from a binary file object."""
    code, out, _ = run(slave, ["cat"], stdin=b"hello\x00world\n")
    assert (code, out) == (0, b"hello\x00world\n")
    src = tmp_path / "input"
    data = os.urandom(300_000)
    src.write_bytes(data)
    with open(src, "rb") as f:
        code, out, _ = run(slave, ["cat"], stdin=f)
    assert (code, out) == (0, data)
    code, out, _ = run(slave, ["wc", "-c"], stdin=io.BytesIO(b"12345"))
    assert out.strip() == b"5"
    code, out, _ = run(slave, ["cat"], stdin=b"")
    assert (code, out) == (0, b"")


def test_execute_stdin_read_error(slave, tmp_path) -> None:
    """A stdin file that fails to read interrupts the command, raises, and keeps the slave."""
    # reading address 0 of one's own memory fails with EIO
    with open("/proc/self/mem", "rb", buffering=0) as bad:
        with pytest.raises(RemshError) as info:
            slave.execute(["sleep", "60"], stdin=bad)
    assert isinstance(info.value.__cause__, OSError)
    assert slave.connected
    slave.ping()


def test_execute_stdin_not_read(slave) -> None:
    """A command that ignores a large stdin still completes."""
    assert slave.execute(["true"], stdin=b"x" * (8 * MiB)) == 0
    slave.ping()


@pytest.mark.slow_over("tls", "ssh", "openssh")
def test_execute_cat_10mib_both_ways(slave) -> None:
    """cat of 10 MiB of stdin returns it all on stdout, without deadlock."""
    data = os.urandom(10 * MiB)
    digest = hashlib.sha256()
    size = [0]

    def out(chunk: bytes) -> None:
        digest.update(chunk)
        size[0] += len(chunk)

    assert slave.execute(["cat"], stdout_cb=out, stdin=data) == 0
    assert size[0] == len(data)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()


# -- send / fetch ---------------------------------------------------------------------


def test_send_and_fetch_small(slave, basedir, tmp_path) -> None:
    """send puts a file on the slave and fetch brings it back, byte for byte."""
    src = tmp_path / "src"
    src.write_bytes(b"hello\nworld\x00\xff")
    slave.send(str(src), "f")
    assert open(path_of(basedir, "f"), "rb").read() == b"hello\nworld\x00\xff"
    dest = tmp_path / "dest"
    slave.fetch("f", str(dest))
    assert dest.read_bytes() == b"hello\nworld\x00\xff"
    assert temp_files(basedir) == [] and temp_files(tmp_path) == []


def test_send_and_fetch_empty_file(slave, basedir, tmp_path) -> None:
    """An empty file survives send and fetch."""
    src = tmp_path / "empty"
    src.write_bytes(b"")
    slave.send(str(src), "e")
    assert os.path.getsize(path_of(basedir, "e")) == 0
    slave.fetch("e", str(tmp_path / "back"))
    assert (tmp_path / "back").read_bytes() == b""


def test_send_and_fetch_file_objects(slave, basedir) -> None:
    """send reads from a binary file object and fetch writes to one."""
    data = os.urandom(200_000)
    slave.send(io.BytesIO(data), "obj")
    assert open(path_of(basedir, "obj"), "rb").read() == data
    out = io.BytesIO()
    slave.fetch("obj", out)
    assert out.getvalue() == data


@pytest.mark.slow_over("tls", "ssh", "openssh")
def test_send_fetch_20mib_digest(slave, basedir, tmp_path) -> None:
    """A 20 MiB random file makes the round trip with its sha256 intact."""
    src = tmp_path / "big"
    with open(src, "wb") as f:
        f.write(os.urandom(20 * MiB))
    want = sha256_file(src)
    slave.send(str(src), "big")
    assert sha256_file(path_of(basedir, "big")) == want
    back = tmp_path / "back"
    slave.fetch("big", str(back))
    assert sha256_file(back) == want
    assert temp_files(basedir) == [] and temp_files(tmp_path) == []


def test_send_mode(slave, basedir) -> None:
    """send sets the requested permission bits."""
    slave.send(io.BytesIO(b"#!/bin/sh\necho run\n"), "script", mode=0o750)
    assert stat.S_IMODE(os.stat(path_of(basedir, "script")).st_mode) == 0o750
    assert run(slave, ["./script"])[1] == b"run\n"


def test_send_fileexists(slave, basedir) -> None:
    """send to an existing destination is fileexists and leaves it untouched."""
    with open(path_of(basedir, "f"), "wb") as f:
        f.write(b"original")
    with pytest.raises(RemoteFileExistsError) as info:
        slave.send(io.BytesIO(b"new"), "f")
    assert info.value.errtag == "fileexists"
    assert open(path_of(basedir, "f"), "rb").read() == b"original"
    assert temp_files(basedir) == []
    slave.ping()


def test_send_openfailed_missing_directory(slave, basedir) -> None:
    """send into a directory that does not exist is openfailed."""
    with pytest.raises(OpenFailedError):
        slave.send(io.BytesIO(b"x"), "nodir/f")
    slave.ping()


def test_send_openfailed_read_only_directory(unpriv) -> None:
    """send into a directory the slave may not write is openfailed."""
    slave, setup = unpriv
    ro = os.path.join(setup.basedir, "ro")
    os.mkdir(ro, 0o555)
    setup.own(ro)
    with pytest.raises(OpenFailedError):
        slave.send(io.BytesIO(b"x"), "ro/f")
    assert os.listdir(ro) == []


def test_send_write_failure_midway(slave, basedir) -> None:
    """A send whose writing fails midway is failed and leaves no file, not even a temporary one."""
    pid = slave_pid(slave)
    soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (MiB, hard))
    data = os.urandom(3 * MiB)
    with pytest.raises(FailedError):
        slave.send(io.BytesIO(data), "big")
    assert not os.path.exists(path_of(basedir, "big"))
    assert temp_files(basedir) == []
    # the conversation stayed in step
    slave.ping()
    slave.send(io.BytesIO(b"small"), "small")
    assert open(path_of(basedir, "small"), "rb").read() == b"small"


def test_send_local_read_failure(slave, basedir) -> None:
    """A send whose local source fails to read raises LocalError and leaves nothing on the slave."""
    # reading address 0 of one's own memory fails with EIO
    with open("/proc/self/mem", "rb", buffering=0) as bad:
        with pytest.raises(LocalError) as info:
            slave.send(bad, "f")
    assert isinstance(info.value.__cause__, OSError)
    assert os.listdir(str(basedir)) == []
    slave.ping()


def test_send_local_source_missing(slave, basedir, tmp_path) -> None:
    """A send whose local source cannot be opened raises LocalError (OSError chained) and leaves nothing."""
    with pytest.raises(LocalError) as info:
        slave.send(str(tmp_path / "missing"), "f")
    assert isinstance(info.value.__cause__, OSError)
    assert os.listdir(str(basedir)) == []
    slave.ping()


def test_fetch_notfound(slave, tmp_path) -> None:
    """fetch of a missing file is notfound and creates nothing locally."""
    outdir = tmp_path / "out"
    outdir.mkdir()
    with pytest.raises(NotFoundError):
        slave.fetch("missing", str(outdir / "f"))
    assert os.listdir(outdir) == []
    slave.ping()


def test_fetch_directory_is_openfailed(slave, basedir, tmp_path) -> None:
    """fetch of a directory is openfailed."""
    os.mkdir(path_of(basedir, "d"))
    with pytest.raises(OpenFailedError):
        slave.fetch("d", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and temp_files(tmp_path) == []


def test_fetch_unreadable_is_openfailed(unpriv, tmp_path) -> None:
    """fetch of a file the slave may not read is openfailed."""
    slave, setup = unpriv
    secret = os.path.join(setup.basedir, "secret")
    with open(secret, "wb") as f:
        f.write(b"x")
    os.chmod(secret, 0)
    setup.own(secret)
    with pytest.raises(OpenFailedError):
        slave.fetch("secret", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_fetch_destination_exists(slave, basedir, tmp_path) -> None:
    """fetch refuses a local destination that exists, leaving it untouched."""
    with open(path_of(basedir, "f"), "wb") as f:
        f.write(b"remote")
    dest = tmp_path / "dest"
    dest.write_bytes(b"local")
    with pytest.raises(LocalError):
        slave.fetch("f", str(dest))
    assert dest.read_bytes() == b"local"
    slave.ping()


@pytest.fixture
def file_size_limit():
    """Set RLIMIT_FSIZE of this (master) process for the test's duration."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def limit(n: int) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))

    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_fetch_local_write_failure(slave, basedir, tmp_path, file_size_limit) -> None:
    """A fetch whose local write fails leaves no file and no temporary file on the master."""
    with open(path_of(basedir, "big"), "wb") as f:
        f.write(os.urandom(3 * MiB))
    outdir = tmp_path / "out"
    outdir.mkdir()
    file_size_limit(MiB)
    try:
        with pytest.raises(LocalError) as info:
            slave.fetch("big", str(outdir / "big"))
    finally:
        file_size_limit(resource.RLIM_INFINITY)
    assert isinstance(info.value.__cause__, OSError)
    assert os.listdir(outdir) == []
    # the slave sent everything and is ready for more
    slave.ping()
    slave.fetch("big", str(outdir / "big"))
    assert sha256_file(outdir / "big") == sha256_file(path_of(basedir, "big"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_fetch_into_read_only_directory(slave, basedir, tmp_path) -> None:
    """A fetch into a directory the master may not write fails and leaves nothing."""
    with open(path_of(basedir, "f"), "wb") as f:
        f.write(b"data")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(LocalError):
            slave.fetch("f", str(ro / "f"))
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)
    slave.ping()


def test_fetch_parent_vanishes(slave, basedir, tmp_path) -> None:
    """A fetch whose destination directory vanishes midway fails and leaves nothing."""
    with open(path_of(basedir, "big"), "wb") as f:
        f.truncate(8 * MiB)
    outdir = tmp_path / "out"
    outdir.mkdir()
    seen: List[int] = []

    def progress(done: int, total) -> None:
        # called as the first data arrives: the temporary file is there
        if not seen:
            seen.append(len(temp_files(outdir)))
            shutil.rmtree(outdir)

    with pytest.raises(LocalError):
        slave.fetch("big", str(outdir / "f"), progress=progress)
    assert seen == [1], "fetch writes beside its destination"
    assert not outdir.exists()
    slave.ping()


# -- remove / rename / copy / stat / ping -----------------------------------------------


def make_tree(root: str) -> None:
    os.makedirs(os.path.join(root, "ro", "sub"))
    for rel in ("top", "ro/file", "ro/sub/deep"):
        with open(os.path.join(root, rel), "w") as f:
            f.write(rel)


def test_remove_tree_with_read_only_subdirectory(unpriv) -> None:
    """remove deletes a tree even where a subdirectory is read-only."""
    slave, setup = unpriv
    tree = os.path.join(setup.basedir, "tree")
    make_tree(tree)
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            setup.own(os.path.join(dirpath, name))
    setup.own(tree)
    os.chmod(os.path.join(tree, "ro", "sub"), 0o500)
    os.chmod(os.path.join(tree, "ro"), 0o500)
    slave.remove("tree")
    assert not os.path.lexists(tree)
    assert slave.stat("tree") is None


def test_remove_file_and_missing_path(slave, basedir) -> None:
    """remove deletes a single file; a missing path is fine."""
    open(path_of(basedir, "f"), "w").close()
    slave.remove("f")
    assert not os.path.exists(path_of(basedir, "f"))
    slave.remove("f")
    slave.remove("no/such/path")


def test_remove_symlink_keeps_target(slave, basedir, tmp_path) -> None:
    """remove of a symlink to a directory removes the link, not what it points to."""
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_text("keep")
    os.symlink(str(target), path_of(basedir, "link"))
    slave.remove("link")
    assert not os.path.lexists(path_of(basedir, "link"))
    assert (target / "keep").read_text() == "keep"


def test_rename(slave, basedir) -> None:
    """rename moves a file or a directory."""
    with open(path_of(basedir, "a"), "w") as f:
        f.write("A")
    slave.rename("a", "b")
    assert not os.path.exists(path_of(basedir, "a"))
    assert open(path_of(basedir, "b")).read() == "A"
    os.mkdir(path_of(basedir, "d"))
    slave.rename("d", "e")
    assert os.path.isdir(path_of(basedir, "e"))


def test_rename_errors(slave, basedir) -> None:
    """rename of a missing source is notfound; onto an existing path is fileexists."""
    with pytest.raises(NotFoundError):
        slave.rename("missing", "x")
    assert not os.path.exists(path_of(basedir, "x"))
    for name, text in (("a", "A"), ("b", "B")):
        with open(path_of(basedir, name), "w") as f:
            f.write(text)
    with pytest.raises(RemoteFileExistsError):
        slave.rename("a", "b")
    assert open(path_of(basedir, "a")).read() == "A"
    assert open(path_of(basedir, "b")).read() == "B"


def test_copy(slave, basedir) -> None:
    """copy duplicates a file's data and leaves the source."""
    data = os.urandom(3 * MiB + 17)
    with open(path_of(basedir, "src"), "wb") as f:
        f.write(data)
    slave.copy("src", "dst")
    assert open(path_of(basedir, "dst"), "rb").read() == data
    assert open(path_of(basedir, "src"), "rb").read() == data
    assert temp_files(basedir) == []


def test_copy_errors(slave, basedir) -> None:
    """copy: missing source notfound, existing dest fileexists, directory source failed."""
    with pytest.raises(NotFoundError):
        slave.copy("missing", "x")
    for name, text in (("a", "A"), ("b", "B")):
        with open(path_of(basedir, name), "w") as f:
            f.write(text)
    with pytest.raises(RemoteFileExistsError):
        slave.copy("a", "b")
    assert open(path_of(basedir, "b")).read() == "B"
    os.mkdir(path_of(basedir, "d"))
    with pytest.raises(FailedError):
        slave.copy("d", "d2")
    assert not os.path.exists(path_of(basedir, "d2"))
    assert temp_files(basedir) == []


def test_stat(slave, basedir) -> None:
    """stat says d for a directory, f for a file, None for nothing."""
    os.mkdir(path_of(basedir, "d"))
    open(path_of(basedir, "f"), "w").close()
    assert slave.stat("d") == "d"
    assert slave.stat("f") == "f"
    assert slave.stat("missing") is None
    assert slave.stat("f/through-a-file") is None
    assert slave.stat(str(basedir)) == "d"


def test_ping(slave) -> None:
    """ping answers with nothing."""
    assert slave.ping() is None


def test_non_utf8_names(slave, basedir, tmp_path) -> None:
    """File names that are not UTF-8 survive send, stat, fetch, rename, copy and mkdir."""
    name = b"caf\xe9"
    slave.send(io.BytesIO(b"data"), name)
    assert name in os.listdir(os.fsencode(str(basedir)))
    assert slave.stat(name) == "f"
    assert slave.stat(os.fsdecode(name)) == "f"  # the same name as a surrogate-escaped str
    local = os.path.join(os.fsencode(str(tmp_path)), b"local-\xff")
    slave.fetch(name, local)
    assert open(local, "rb").read() == b"data"
    slave.rename(name, b"\xff\xfe")
    assert slave.stat(name) is None
    slave.copy(b"\xff\xfe", b"copy-\x80")
    slave.mkdir(b"dir-\xe9")
    assert sorted(os.listdir(os.fsencode(str(basedir)))) == sorted([b"\xff\xfe", b"copy-\x80", b"dir-\xe9"])
    assert slave.set_cwd(b"dir-\xe9").endswith(os.fsdecode(b"dir-\xe9"))


# -- errors name slave and operation --------------------------------------------------


def test_remote_error_names_slave_and_operation(slave) -> None:
    """A remote error carries its tag, the slave's name and the operation."""
    with pytest.raises(NotFoundError) as info:
        slave.unlink("missing")
    e = info.value
    assert (e.errtag, e.slave, e.operation) == ("notfound", slave.name, "unlink")
    assert slave.name in str(e) and "unlink" in str(e)
    assert isinstance(e, RemoteError) and isinstance(e, RemshError)


def test_errtag_table() -> None:
    """Each tag maps to its class; unknown tags become unexpected."""
    cases = {"notfound": NotFoundError, "fileexists": RemoteFileExistsError, "openfailed": OpenFailedError,
             "failed": FailedError, "execfailed": ExecFailedError, "timeout": CommandTimeout,
             "invalid-meth": InvalidMethError, "version-too-new": VersionTooNewError,
             "version-unsupported": VersionUnsupportedError, "invalid": InvalidRequestError,
             "unexpected": UnexpectedError}
    for tag, cls in cases.items():
        e = remote_error(tag, "msg", slave="s", operation="op")
        assert type(e) is cls and e.errtag == tag
    e = remote_error("no-such-tag", "msg")
    assert type(e) is UnexpectedError and e.errtag == "unexpected"


# -- malformed requests at the wire level -----------------------------------------------

MALFORMED = [
    ({b"meth": b"nosuch", b"version": b"1"}, b"invalid-meth"),
    ({b"meth": b"PING", b"version": b"1"}, b"invalid-meth"),
    ({b"meth": b"ping", b"version": b"99"}, b"version-too-new"),
    ({b"meth": b"ping", b"version": b"0"}, b"version-unsupported"),
    ({b"version": b"1", b"dir": b"x"}, b"invalid"),
    ({b"meth": b"ping"}, b"invalid"),
    ({b"meth": b"ping", b"version": b"one"}, b"invalid"),
    ({b"meth": b"mkdir", b"version": b"1"}, b"invalid"),
    ({b"meth": b"rename", b"version": b"1", b"src": b"a"}, b"invalid"),
    ({b"meth": b"stat", b"version": b"1", b"path": b""}, b"invalid"),
    ({b"meth": b"execute", b"version": b"1"}, b"invalid"),
    ({b"meth": b"execute", b"version": b"1", b"args": b"true", b"timeout": b"-1"}, b"invalid"),
    ({b"meth": b"execute", b"version": b"1", b"args": b"true", b"timeout": b"inf"}, b"invalid"),
    ({b"meth": b"execute", b"version": b"1", b"args": b"true", b"timeout": b"1e400"}, b"invalid"),
    ({b"meth": b"execute", b"version": b"1", b"args": b"true", b"want_stdout": b"maybe"}, b"invalid"),
    ({b"meth": b"send", b"version": b"1", b"dest": b"x", b"mode": b"abc"}, b"invalid"),
]


@pytest.mark.parametrize("request_box,errtag", MALFORMED,
                         ids=[f"{b.get(b'meth', b'-').decode()}-{t.decode()}" for b, t in MALFORMED])
def test_malformed_request(raw_slave, basedir, request_box, errtag) -> None:
    """A malformed request gets the matching error box and the slave keeps serving."""
    reply = raw_slave.request(request_box)
    assert reply is not None and reply[b"errtag"] == errtag, reply
    assert reply[b"error"]
    assert set(reply) == {b"error", b"errtag"}
    assert raw_slave.ping() == {}
    assert raw_slave.ping() == {}
    assert os.listdir(str(basedir)) == []


def test_late_execute_control_box_is_ignored(raw_slave) -> None:
    """A stray interrupt or stdin box between operations gets no answer at all."""
    raw_slave.send({b"interrupt": b"y"})
    raw_slave.send({b"stream": b"stdin", b"eof": b"y"})
    assert raw_slave.ping() == {}
    assert raw_slave.ping() == {}


def start_raw_send(raw, dest: bytes = b"f") -> None:
    assert raw.request({b"meth": b"send", b"version": b"1", b"dest": dest}) == {}


def test_raw_send_good_digest(raw_slave, basedir) -> None:
    """A send with the right sha256 is placed (the control for the tests below)."""
    start_raw_send(raw_slave)
    raw_slave.wire.send_boxes([{b"data": b"abc"}, {b"data": b"def"}])
    reply = raw_slave.request({b"sha256": hashlib.sha256(b"abcdef").hexdigest().encode()})
    assert reply == {}
    assert open(path_of(basedir, "f"), "rb").read() == b"abcdef"
    assert temp_files(basedir) == []


def test_raw_send_bad_digest(raw_slave, basedir) -> None:
    """A send whose digest does not match is failed and leaves no file or temporary file."""
    start_raw_send(raw_slave)
    assert len(temp_files(basedir)) == 1, "the data goes to a temporary file beside dest"
    raw_slave.wire.send_boxes([{b"data": os.urandom(60000)} for _ in range(20)])
    assert not os.path.exists(path_of(basedir, "f")), "dest seen before the transfer ended"
    reply = raw_slave.request({b"sha256": b"0" * 64})
    assert reply is not None and reply[b"errtag"] == b"failed"
    assert os.listdir(str(basedir)) == []
    assert raw_slave.ping() == {}


def test_raw_send_abort(raw_slave, basedir) -> None:
    """A send the master aborts is failed and leaves nothing behind."""
    start_raw_send(raw_slave)
    raw_slave.wire.send_boxes([{b"data": b"x" * 1000}])
    reply = raw_slave.request({b"sha256": b"-", b"abort": b"cannot read"})
    assert reply is not None and reply[b"errtag"] == b"failed"
    assert os.listdir(str(basedir)) == []
    assert raw_slave.ping() == {}


def test_raw_send_connection_lost(raw_slave, basedir) -> None:
    """A send cut off by the connection leaves no file or temporary file."""
    start_raw_send(raw_slave)
    raw_slave.wire.send_boxes([{b"data": b"x" * 60000} for _ in range(5)])
    raw_slave.wire.close()
    assert raw_slave.proc.wait(WAIT) is not None
    assert os.listdir(str(basedir)) == []


# -- concurrency ----------------------------------------------------------------------


def test_threads_hammering_one_slave(slave, basedir) -> None:
    """8 threads mixing execute, stat and ping on one slave get their own, unmixed results."""
    nthreads, rounds = 8, 12
    for t in range(nthreads):
        if t % 2:
            os.mkdir(path_of(basedir, f"item{t}"))
        else:
            open(path_of(basedir, f"item{t}"), "w").close()
    barrier = threading.Barrier(nthreads)
    errors: List[BaseException] = []

    def worker(t: int) -> None:
        try:
            barrier.wait(WAIT)
            for r in range(rounds):
                token = f"thread{t}-round{r}-" + "x" * (t * 100)
                code, out, err = run(slave, ["sh", "-c", 'echo "$1"; echo "$1" >&2; exit $2',
                                             "sh", token, str(t)])
                assert (code, out, err) == (t, token.encode() + b"\n", token.encode() + b"\n")
                assert slave.stat(f"item{t}") == ("d" if t % 2 else "f")
                assert slave.ping() is None
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(nthreads)]
    for th in threads:
        th.start()
    deadline = time.monotonic() + 40
    for th in threads:
        th.join(max(0.0, deadline - time.monotonic()))
        assert not th.is_alive(), "a worker hung"
    assert errors == []


def test_queued_calls_run_in_call_order(slave, tmp_path) -> None:
    """Calls queued behind a running operation run in the order they were made."""
    r, w = os.pipe()
    stdin = os.fdopen(r, "rb", buffering=0)
    try:
        holder, _ = start_and_wait(slave, "echo ready; cat >/dev/null", stdin=stdin)
        order: List[int] = []
        outcomes = []
        lock = slave._lock  # the FIFO lock every operation takes
        for i in range(6):
            issued = lock._next
            outcomes.append(run_in_thread(
                lambda i=i: slave.execute(["echo", str(i)], stdout_cb=lambda d, i=i: order.append(i))))
            wait_until(lambda: lock._next > issued, what=f"call {i} to queue")
        os.close(w)
        w = -1
        holder.wait(WAIT)
        assert holder.error is None and holder.result == 0
        for o in outcomes:
            o.wait(WAIT)
            assert o.error is None and o.result == 0
        assert order == list(range(6))
    finally:
        if w >= 0:
            os.close(w)
        stdin.close()


# -- disconnection -----------------------------------------------------------------------


def test_kill_slave_during_execute(listener, collection, basedir, tmp_path) -> None:
    """kill_slave mid-execute: Disconnected promptly, command killed, slave gone, later calls fail at once."""
    slave = listener.start_slave(str(basedir))
    gone = threading.Event()
    slave.on_disconnect(lambda s: gone.set())
    outcome, line = start_and_wait(slave, "echo $$; exec sleep 60")
    pidfd = os.pidfd_open(int(line))
    try:
        t0 = time.monotonic()
        listener.kill_slave(slave)
        outcome.wait(WAIT)
        assert isinstance(outcome.error, Disconnected), outcome.error
        assert outcome.finished_at - t0 < 5
        assert gone.wait(WAIT)
        assert wait_pid_exit(pidfd), "the command survived its slave"
    finally:
        os.close(pidfd)
    assert not slave.connected
    assert slave not in collection.get_all_slaves()
    calls: Dict[str, Callable[[], object]] = {
        "ping": slave.ping,
        "execute": lambda: slave.execute(["true"]),
        "stat": lambda: slave.stat("x"),
        "send": lambda: slave.send(io.BytesIO(b"x"), "x"),
        "fetch": lambda: slave.fetch("x", str(tmp_path / "fetched")),
        "set_cwd": slave.set_cwd,
    }
    for what, call in calls.items():
        t0 = time.monotonic()
        with pytest.raises(Disconnected):
            call()
        assert time.monotonic() - t0 < 1, what
    assert not (tmp_path / "fetched").exists() and temp_files(tmp_path) == []


def test_close_during_execute(any_slave) -> None:
    """Slave.close() from another thread ends a running execute with Disconnected."""
    slave, collection = any_slave.slave, any_slave.collection
    outcome, _ = start_and_wait(slave, "echo started; exec sleep 60")
    slave.close()
    outcome.wait(WAIT)
    assert isinstance(outcome.error, Disconnected), outcome.error
    assert slave not in collection.get_all_slaves()
    with pytest.raises(Disconnected):
        slave.ping()


def test_slave_process_dies_during_execute(any_slave) -> None:
    """When the slave process dies, the running execute raises Disconnected and the slave leaves."""
    slave, collection = any_slave.slave, any_slave.collection
    pid = slave_pid(slave)
    pidfd = os.pidfd_open(pid)
    command_pid = None
    try:
        outcome, first = start_and_wait(slave, "echo $$; exec sleep 60")
        command_pid = int(first.split()[0])
        os.kill(pid, 9)
        assert wait_pid_exit(pidfd)
        outcome.wait(WAIT)
        assert isinstance(outcome.error, Disconnected), outcome.error
    finally:
        os.close(pidfd)
        if command_pid is not None:  # SIGKILL gave the slave no chance to end it
            try:
                os.killpg(command_pid, 9)
            except ProcessLookupError:
                pass
    assert not slave.connected
    assert slave not in collection.get_all_slaves()


@pytest.mark.slow_over()
def test_stdin_source_that_never_returns_drops_the_connection(slave) -> None:
    """A stdin source still blocked after the command ended cannot desynchronise the slave: it is dropped."""
    r, w = os.pipe()
    try:
        with os.fdopen(r, "rb", buffering=0, closefd=False) as source:
            # 'true' ends at once; the feeder stays blocked reading the empty pipe
            assert slave.execute(["true"], stdin=source) == 0
            assert not slave.connected
            with pytest.raises(Disconnected):
                slave.ping()
    finally:
        os.close(w)  # lets the feeder's read return; it must send nothing more
        os.close(r)


def test_long_file_names_send_and_fetch(slave, basedir, tmp_path) -> None:
    """A destination name near NAME_MAX still gets a temporary file beside it."""
    name = "n" * 250
    src = tmp_path / "src"
    src.write_bytes(b"long name")
    slave.send(str(src), name)
    assert (basedir / name).read_bytes() == b"long name"
    slave.fetch(name, str(tmp_path / name))
    assert (tmp_path / name).read_bytes() == b"long name"
