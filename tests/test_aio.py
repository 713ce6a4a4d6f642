"""remsh.aio, the asyncio front end, with real slave processes over local, TCP and TLS.

Each test runs its own event loop (``asyncio.run``).  The helpers here
(:func:`aio_slave`, :class:`LoopThread`, :class:`SyncSlave`) are shared with
``tests/test_aio_conformance.py`` and ``tests/test_aio_scale.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import io
import itertools
import os
import ssl
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Coroutine, List, Optional, Tuple, TypeVar

import pytest

import remsh.aio as aio
from remsh.errors import (AuthenticationError, CommandTimeout, Disconnected, ExecFailedError, LimitExceeded,
                          NotFoundError, RemoteFileExistsError, UsageError, WaitTimeout)
from tests.slaveproc import HOST, SECRET, WAIT, SlaveProcesses, slave_procs  # noqa: F401 - a fixture
from tests.transports import Pki, client_context, make_pki, server_context
from tests.util import wait_pid_exit

pytestmark = pytest.mark.timeout(120)

KINDS = ["local", "tcp", "tls"]
#: How soon a cancelled command's process group must be gone: well under a
#: second on an idle machine; this bound leaves room for the shared test machine.
CANCEL_BOUND = 2.0
T = TypeVar("T")
_serial = itertools.count(1)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` in a fresh event loop, bounded by WAIT * 6."""
    return asyncio.run(asyncio.wait_for(coro, WAIT * 6))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("aio-pki"))


@contextlib.asynccontextmanager
async def aio_listener(kind: str, pki: Optional[Pki] = None, **kwargs: Any) -> AsyncIterator[Any]:
    """A started remsh.aio listener of ``kind`` (local, tcp, tls) on 127.0.0.1."""
    if kind == "local":
        listener: Any = aio.LocalSlaveListener(**kwargs)
    else:
        kwargs.setdefault("secret", SECRET)
        listener = aio.TcpSlaveListener(port=0, host=HOST, ssl_context=server_context(pki) if kind == "tls" else None,
                                        **kwargs)
    async with listener:
        yield listener


async def start_slave(listener: Any, kind: str, procs: SlaveProcesses, basedir: Path,
                      pki: Optional[Pki] = None, name: Optional[str] = None, **kw: Any) -> aio.AsyncSlave:
    """One slave process registered through ``listener``."""
    name = name or f"aio-{kind}-{next(_serial)}"
    if kind == "local":
        return await listener.start_slave(str(basedir), name)
    proc = procs.start(listener.port, name, basedir=basedir, no_reconnect=True,
                       tls_ca=pki.ca if kind == "tls" and pki is not None else None, **kw)
    try:
        return await listener.slave_collection.get_slave(filter=lambda s: s.name == name, timeout=WAIT)
    except WaitTimeout:
        pytest.fail(f"slave {name} did not register\n{proc.log_text()}")


@contextlib.asynccontextmanager
async def aio_slave(kind: str, procs: SlaveProcesses, basedir: Path, pki: Optional[Pki] = None
                    ) -> AsyncIterator[Tuple[Any, aio.AsyncSlave]]:
    """A listener of ``kind`` and one slave through it."""
    async with aio_listener(kind, pki) as listener:
        yield listener, await start_slave(listener, kind, procs, basedir, pki)


# -- a synchronous facade, for the conformance tests --------------------------------------


class LoopThread:
    """One event loop running in one thread (for every slave of a test module)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="aio-test-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[T], timeout: Optional[float] = None) -> T:
        async def wrap() -> T:
            return await coro
        return asyncio.run_coroutine_threadsafe(wrap(), self.loop).result(timeout)

    def call(self, fn: Callable[[], Any]) -> None:
        self.loop.call_soon_threadsafe(fn)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()


class SyncSlave:
    """The threaded ``Slave`` API over an ``AsyncSlave`` (each call runs in the loop thread)."""

    def __init__(self, loop: LoopThread, slave: aio.AsyncSlave) -> None:
        self.loop = loop
        self.aslave = slave
        self.name = slave.name
        self.info = slave.info

    def __getattr__(self, meth: str) -> Callable[..., Any]:
        target = getattr(self.aslave, meth)
        if not inspect.iscoroutinefunction(target):
            raise AttributeError(meth)
        return lambda *a, **kw: self.loop.run(target(*a, **kw))

    @property
    def connected(self) -> bool:
        return self.aslave.connected

    def interrupt(self) -> None:
        self.loop.call(self.aslave.interrupt)

    def close(self) -> None:
        self.loop.call(self.aslave.close)


# -- the operations ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_operations_over_each_transport(kind: str, tmp_path: Path, slave_procs: SlaveProcesses, pki: Pki) -> None:
    """Every simple operation, execute with both streams, send and fetch work over local, TCP and TLS."""
    basedir = tmp_path / "base"
    basedir.mkdir()

    async def main() -> None:
        async with aio_slave(kind, slave_procs, basedir, pki) as (listener, slave):
            assert slave.info["basedir"] == str(basedir)
            assert listener.slave_collection.get_all_slaves() == [slave]
            await slave.ping()
            assert await slave.set_cwd("") == str(basedir)
            assert "PATH" in await slave.getenv()
            await slave.mkdir("a/b")
            assert await slave.stat("a/b") == "d"
            assert await slave.stat("nothing") is None
            out: List[bytes] = []
            err: List[bytes] = []
            code = await slave.execute(["sh", "-c", "echo out; echo err >&2; exit 7"],
                                       stdout_cb=out.append, stderr_cb=err.append)
            assert (code, b"".join(out), b"".join(err)) == (7, b"out\n", b"err\n")
            data = os.urandom(3 << 20)
            src = tmp_path / "src"
            src.write_bytes(data)
            done: List[Tuple[int, Optional[int]]] = []
            await slave.send(src, "a/f", mode=0o640, progress=lambda d, t: done.append((d, t)))
            assert done[-1] == (len(data), len(data))
            assert (basedir / "a" / "f").read_bytes() == data
            assert (basedir / "a" / "f").stat().st_mode & 0o777 == 0o640
            await slave.copy("a/f", "a/g")
            await slave.chmod("a/g", 0o600)
            await slave.rename("a/g", "a/h")
            await slave.fetch("a/h", tmp_path / "back")
            assert hashlib.sha256((tmp_path / "back").read_bytes()).digest() == hashlib.sha256(data).digest()
            await slave.unlink("a/h")
            with pytest.raises(NotFoundError) as e:
                await slave.unlink("a/h")
            assert slave.name in str(e.value) and "unlink" in str(e.value)
            await slave.remove("a")
            assert not (basedir / "a").exists()

    run(main())


def test_errors_are_the_threaded_masters(tmp_path: Path, slave_procs: SlaveProcesses) -> None:
    """Remote errors keep the slave; UsageError, ExecFailedError, RemoteFileExistsError, LimitExceeded as Slave's."""
    basedir = tmp_path / "base"
    basedir.mkdir()
    (basedir / "f").write_bytes(b"x" * 1000)

    async def main() -> None:
        async with aio_slave("local", slave_procs, basedir) as (_, slave):
            with pytest.raises(UsageError):
                await slave.execute([])
            with pytest.raises(ExecFailedError):
                await slave.execute(["/no/such/program"])
            with pytest.raises(RemoteFileExistsError):
                await slave.send(io.BytesIO(b"y"), "f")
            with pytest.raises(LimitExceeded):
                await slave.fetch("f", tmp_path / "g", max_bytes=10)
            assert not (tmp_path / "g").exists()
            with pytest.raises(CommandTimeout):
                await slave.execute(["sleep", "30"], timeout=0.5)
            await slave.ping()
            assert slave.connected

    run(main())


def test_coroutine_callbacks_and_async_stdin(tmp_path: Path, slave_procs: SlaveProcesses) -> None:
    """Coroutine callbacks are awaited in order; stdin may be bytes, a file or an async iterable."""
    basedir = tmp_path / "base"
    basedir.mkdir()

    async def main() -> None:
        async with aio_slave("local", slave_procs, basedir) as (_, slave):
            got: List[bytes] = []

            async def slow(data: bytes) -> None:
                await asyncio.sleep(0)
                got.append(data)

            payload = os.urandom(1 << 20)
            assert await slave.execute(["cat"], stdout_cb=slow, stdin=payload) == 0
            assert b"".join(got) == payload

            async def chunks() -> AsyncIterator[bytes]:
                for i in range(3):
                    yield b"%d\n" % i

            got.clear()
            assert await slave.execute(["cat"], stdout_cb=got.append, stdin=chunks()) == 0
            assert b"".join(got) == b"0\n1\n2\n"
            got.clear()
            assert await slave.execute(["cat"], stdout_cb=got.append, stdin=io.BytesIO(b"file")) == 0
            assert b"".join(got) == b"file"

    run(main())


def test_calls_on_one_slave_run_in_call_order(tmp_path: Path, slave_procs: SlaveProcesses) -> None:
    """Concurrent calls on one slave are served one at a time, in the order they were made."""
    basedir = tmp_path / "base"
    basedir.mkdir()

    async def main() -> None:
        async with aio_slave("local", slave_procs, basedir) as (_, slave):
            order: List[int] = []

            async def one(i: int) -> None:
                await slave.execute(["sh", "-c", f"echo {i}"], stdout_cb=lambda d: order.append(int(d)))

            await asyncio.gather(*(one(i) for i in range(20)))
            assert order == list(range(20))

    run(main())


# -- cancelling --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_cancel_kills_the_process_group(kind: str, tmp_path: Path, slave_procs: SlaveProcesses, pki: Pki) -> None:
    """Cancelling the task awaiting execute kills the command's process group within a second; the slave stays."""
    basedir = tmp_path / "base"
    basedir.mkdir()

    async def main() -> None:
        async with aio_slave(kind, slave_procs, basedir, pki) as (_, slave):
            pids: List[int] = []
            started = asyncio.Event()

            def out(data: bytes) -> None:
                pids.extend(int(x) for x in data.split())
                started.set()

            task = asyncio.create_task(slave.execute(["sh", "-c", "sleep 60 & echo $$ $!; wait"], stdout_cb=out))
            await asyncio.wait_for(started.wait(), WAIT)
            pidfds = [os.pidfd_open(p) for p in pids]
            try:
                t0 = time.monotonic()
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                gone = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: all(wait_pid_exit(fd, CANCEL_BOUND) for fd in pidfds))
                assert gone, f"the command's process group outlived the cancel by {CANCEL_BOUND} s"
                assert time.monotonic() - t0 < CANCEL_BOUND
            finally:
                for fd in pidfds:
                    os.close(fd)
            assert slave.connected
            await slave.ping()
            assert await slave.execute(["true"]) == 0

    run(main())


def test_cancel_send_and_fetch_leave_nothing_and_keep_the_slave(tmp_path: Path,
                                                                  slave_procs: SlaveProcesses) -> None:
    """A cancelled send leaves no file on the slave, a cancelled fetch none locally; the slave stays usable."""
    basedir = tmp_path / "base"
    basedir.mkdir()
    (basedir / "big").write_bytes(os.urandom(64 << 20))

    class Endless(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, b: Any) -> int:
            b[:] = b"z" * len(b)
            return len(b)

    async def main() -> None:
        async with aio_slave("local", slave_procs, basedir) as (_, slave):
            moved: List[int] = []
            task = asyncio.create_task(slave.send(Endless(), "out", progress=lambda d, t: moved.append(d)))
            while sum(1 for _ in moved) < 2:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await slave.ping()
            assert await slave.stat("out") is None
            assert [n for n in os.listdir(basedir) if n.endswith(".remsh-part")] == []

            got: List[int] = []
            task = asyncio.create_task(slave.fetch("big", tmp_path / "got", progress=lambda d, t: got.append(d)))
            while not got:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await slave.ping()
            assert not (tmp_path / "got").exists()
            assert [n for n in os.listdir(tmp_path) if n.endswith(".remsh-part")] == []
            await slave.fetch("big", tmp_path / "again")
            assert (tmp_path / "again").stat().st_size == 64 << 20

    run(main())


def test_cancel_while_waiting_for_the_turn(tmp_path: Path, slave_procs: SlaveProcesses) -> None:
    """A call cancelled while it waits for its turn never reaches the slave; the others go on."""
    basedir = tmp_path / "base"
    basedir.mkdir()

    async def main() -> None:
        async with aio_slave("local", slave_procs, basedir) as (_, slave):
            first = asyncio.create_task(slave.execute(["sleep", "0.3"]))
            second = asyncio.create_task(slave.mkdir("never"))
            await asyncio.sleep(0.05)
            second.cancel()
            assert await first == 0
            with pytest.raises(asyncio.CancelledError):
                await second
            assert await slave.stat("never") is None

    run(main())


# -- listeners -----------------------------------------------------------------------------------


def test_wrong_secret_is_refused_while_the_listener_serves(tmp_path: Path, slave_procs: SlaveProcesses) -> None:
    """A slave with the wrong secret never registers (it exits refused); one with the right one then does."""

    async def main() -> None:
        async with aio_listener("tcp") as listener:
            bad = slave_procs.start(listener.port, "intruder", secret=b"wrong secret", no_reconnect=True)
            status = await asyncio.get_running_loop().run_in_executor(None, bad.wait)
            assert status != 0
            assert listener.slave_collection.get_all_slaves() == []
            good = await start_slave(listener, "tcp", slave_procs, tmp_path / "g" if (tmp_path / "g").mkdir()
                                     is None else tmp_path)
            await good.ping()
            assert [s.name for s in listener.slave_collection.get_all_slaves()] == [good.name]

    run(main())


def test_tls_listener_refuses_plain_tcp(tmp_path: Path, slave_procs: SlaveProcesses, pki: Pki) -> None:
    """A slave speaking plain TCP to a TLS listener does not register; a TLS slave then does."""

    async def main() -> None:
        async with aio_listener("tls", pki) as listener:
            plain = slave_procs.start(listener.port, "plain", no_reconnect=True)
            await asyncio.get_running_loop().run_in_executor(None, plain.wait)
            assert listener.slave_collection.get_all_slaves() == []
            (tmp_path / "b").mkdir()
            slave = await start_slave(listener, "tls", slave_procs, tmp_path / "b", pki)
            await slave.ping()

    assert isinstance(client_context(pki), ssl.SSLContext)
    run(main())


def test_resume_timeout_offers_sessions() -> None:
    """resume_timeout > 0 offers sessions (tests/test_aio_resume.py), 0 none; a negative one is a UsageError."""
    with pytest.raises(UsageError, match="resume_timeout"):
        aio.TcpSlaveListener(port=0, secret=SECRET, resume_timeout=-1)
    assert aio.TcpSlaveListener(port=0, secret=SECRET, resume_timeout=5).resume_timeout == 5
    assert aio.TcpSlaveListener(port=0, secret=SECRET, resume_timeout=0).resume_timeout == 0


def test_tcp_listener_needs_credentials() -> None:
    """No secret, no authenticator, no allow_insecure: UsageError."""
    with pytest.raises(UsageError):
        aio.TcpSlaveListener(port=0)


def test_get_slave_waits_and_times_out(tmp_path: Path, slave_procs: SlaveProcesses) -> None:
    """get_slave waits for a match to connect, picks by cmp, and raises WaitTimeout (a RemshError) on timeout."""
    async def main() -> None:
        async with aio_listener("local") as listener:
            coll = listener.slave_collection
            with pytest.raises(WaitTimeout):
                await coll.get_slave(timeout=0.1)
            (tmp_path / "a").mkdir()
            (tmp_path / "b").mkdir()
            waiter = asyncio.create_task(coll.get_slave(filter=lambda s: s.name == "b", timeout=WAIT))
            await listener.start_slave(str(tmp_path / "a"), "a")
            assert not waiter.done()
            b = await listener.start_slave(str(tmp_path / "b"), "b")
            assert await waiter is b
            first = await coll.get_slave(cmp=lambda x, y: (x.name > y.name) - (x.name < y.name))
            assert first.name == "a"
            assert sorted(s.name for s in await coll.wait_for_slaves(2, timeout=WAIT)) == ["a", "b"]
            await listener.kill_slave(first)
            assert [s.name for s in coll.get_all_slaves()] == ["b"]
            with pytest.raises(Disconnected):
                await first.ping()

    run(main())


def test_no_thread_is_started(tmp_path: Path, slave_procs: SlaveProcesses) -> None:
    """Serving slaves over local and TCP starts no thread at all."""
    before = set(threading.enumerate())

    async def main() -> None:
        async with aio_listener("tcp") as tcp, aio_listener("local") as local:
            slaves = []
            for i in range(3):
                (tmp_path / str(i)).mkdir()
                slaves.append(await start_slave(tcp if i else local, "tcp" if i else "local", slave_procs,
                                                tmp_path / str(i)))
            src = tmp_path / "f"
            src.write_bytes(b"x" * 100000)
            for slave in slaves:
                await slave.execute(["echo"], stdout_cb=lambda d: None)
                await slave.send(src, "f")
                await slave.fetch("f", tmp_path / f"back-{slave.name}")
            assert set(threading.enumerate()) - before == set()

    run(main())


def test_authentication_error_type_is_a_remsh_error() -> None:
    """The refusal error the listener logs is an AuthenticationError (a RemshError subclass)."""
    assert issubclass(AuthenticationError, Exception) and issubclass(WaitTimeout, Exception)


# -- hostile and silent peers ------------------------------------------------------------------


async def fake_slave(port: int, name: str, secret: bytes = SECRET) -> aio.Connection:
    """A peer that registers like a slave (the same handshake machine) and then does what the test says."""
    from remsh.handshake import SlaveHandshake

    conn = await aio.Connection.open(HOST, port, label="master")
    hs = SlaveHandshake(name, secret=secret, info={"basedir": "/nonexistent"})
    await conn.send(hs.greeting)
    hs.receive_greeting(await conn.read_exact(8, WAIT))
    while True:
        box = await conn.read_box(WAIT)
        assert box is not None
        step = hs.receive_box(box)
        await conn.send_boxes(step.send)
        if step.event is not None:
            return conn


def test_a_box_out_of_turn_drops_the_slave_and_the_listener_goes_on(tmp_path: Path,
                                                                       slave_procs: SlaveProcesses) -> None:
    """A slave answering execute with a box the conversation does not allow: ProtocolError naming it, slave dropped;
    a liar's stat result too; the listener still registers others."""
    from remsh.errors import ProtocolError
    from remsh.wire import encode_box

    async def main() -> None:
        async with aio_listener("tcp") as listener:
            coll = listener.slave_collection
            liar = await fake_slave(listener.port, "liar")
            slave = await coll.get_slave(filter=lambda s: s.name == "liar", timeout=WAIT)
            call = asyncio.create_task(slave.execute(["true"]))
            assert (await liar.read_box(WAIT) or {}).get(b"meth") == b"execute"
            await liar.send(encode_box({b"result": b"0"}))  # the exit status before the start reply
            with pytest.raises(ProtocolError, match="liar: execute"):
                await call
            assert not slave.connected and coll.get_all_slaves() == []
            assert await liar.read_box(WAIT) is None  # the master closed the connection

            other = await fake_slave(listener.port, "other")
            slave = await coll.get_slave(filter=lambda s: s.name == "other", timeout=WAIT)
            call2 = asyncio.create_task(slave.stat("x"))
            assert (await other.read_box(WAIT) or {}).get(b"meth") == b"stat"
            await other.send(encode_box({b"result": b"zzz"}))
            with pytest.raises(ProtocolError):
                await call2
            assert not slave.connected
            (tmp_path / "b").mkdir()
            real = await start_slave(listener, "tcp", slave_procs, tmp_path / "b")
            await real.ping()

    run(main())


def test_a_silent_slave_times_out_and_is_dropped() -> None:
    """A registered slave that never answers makes the call raise PeerTimeout after io_timeout; it is dropped."""
    from remsh.errors import PeerTimeout

    async def main() -> None:
        async with aio_listener("tcp", io_timeout=0.5) as listener:
            mute = await fake_slave(listener.port, "mute")
            slave = await listener.slave_collection.get_slave(timeout=WAIT)
            t0 = time.monotonic()
            with pytest.raises(PeerTimeout, match="mute: ping"):
                await slave.ping()
            assert time.monotonic() - t0 < 3
            assert not slave.connected
            mute.close()

    run(main())


def test_a_silent_connection_is_dropped_at_the_handshake_time_limit() -> None:
    """A connection that never greets is closed at handshake_timeout; one that greets wrongly at once."""

    async def main() -> None:
        async with aio_listener("tcp", handshake_timeout=0.5) as listener:
            reader, writer = await asyncio.open_connection(HOST, listener.port)
            t0 = time.monotonic()
            got = b""
            async with asyncio.timeout(WAIT):
                while chunk := await reader.read(100):
                    got += chunk
            assert time.monotonic() - t0 < 3
            assert got == b"REMSH-M\n"
            writer.close()
            reader, writer = await asyncio.open_connection(HOST, listener.port)
            writer.write(b"GET / HTTP/1.0\r\n\r\n")
            async with asyncio.timeout(WAIT):
                while await reader.read(100):
                    pass
            writer.close()
            assert listener.slave_collection.get_all_slaves() == []

    run(main())


# -- fetch_tree -------------------------------------------------------------------------------------


def _make_tree(top: Path, files: int = 20, size: int = 50_000) -> None:
    (top / "sub" / "deeper").mkdir(parents=True)
    (top / "empty").mkdir()
    for i in range(files):
        (top / ("sub" if i % 2 else "sub/deeper") / f"f{i}").write_bytes(os.urandom(size + i))
    (top / "link").symlink_to("sub/f1")
    (top / "sub" / "f1").chmod(0o640)


def _snapshot(top: Path) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = str(p.relative_to(top))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", p.read_bytes(), p.stat().st_mode & 0o777)
    return out


@pytest.mark.parametrize("kind", ["local", "tls"])
def test_fetch_tree_copies_files_directories_and_links(kind: str, tmp_path: Path, slave_procs: SlaveProcesses,
                                                       pki: Pki) -> None:
    """fetch_tree over aio copies every file, directory (empty too) and link, with progress to the total."""
    basedir = tmp_path / "base"
    basedir.mkdir()
    _make_tree(basedir / "tree")

    async def main() -> None:
        async with aio_slave(kind, slave_procs, basedir, pki) as (_, slave):
            seen: List[Tuple[int, Optional[int]]] = []
            await slave.fetch_tree("tree", tmp_path / "copy", progress=lambda d, t: seen.append((d, t)))
            assert _snapshot(tmp_path / "copy") == _snapshot(basedir / "tree")
            assert seen[-1][0] == seen[-1][1] == sum(50_000 + i for i in range(20))
            with pytest.raises(LocalError):
                await slave.fetch_tree("tree", tmp_path / "copy")
            with pytest.raises(NotFoundError):
                await slave.fetch_tree("nothing", tmp_path / "copy2")
            await slave.ping()

    from remsh.errors import LocalError
    run(main())


def test_fetch_tree_bounds_and_cancel_leave_nothing(tmp_path: Path, slave_procs: SlaveProcesses) -> None:
    """Past max_bytes or max_entries, or cancelled midway, fetch_tree leaves nothing locally; the slave stays."""
    basedir = tmp_path / "base"
    basedir.mkdir()
    _make_tree(basedir / "tree", files=200, size=200_000)
    out = tmp_path / "out"
    out.mkdir()

    async def main() -> None:
        async with aio_slave("local", slave_procs, basedir) as (_, slave):
            with pytest.raises(LimitExceeded):
                await slave.fetch_tree("tree", out / "a", max_bytes=1000)
            with pytest.raises(LimitExceeded):
                await slave.fetch_tree("tree", out / "b", max_entries=3)
            assert os.listdir(out) == []
            got: List[int] = []
            task = asyncio.create_task(slave.fetch_tree("tree", out / "c", progress=lambda d, t: got.append(d)))
            while not got:
                await asyncio.sleep(0.005)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await slave.ping()
            assert os.listdir(out) == []
            await slave.fetch_tree("tree", out / "d")
            assert _snapshot(out / "d") == _snapshot(basedir / "tree")

    run(main())


# -- send_tree --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["local", "tcp"])
def test_send_tree_round_trip(kind: str, tmp_path: Path, slave_procs: SlaveProcesses) -> None:
    """send_tree over aio copies a tree the slave then holds as it was; fetch_tree brings it back the same."""
    basedir = tmp_path / "base"
    basedir.mkdir()
    _make_tree(tmp_path / "src", files=30, size=300_000)

    async def main() -> None:
        async with aio_slave(kind, slave_procs, basedir) as (_, slave):
            seen: List[Tuple[int, Optional[int]]] = []
            await slave.send_tree(tmp_path / "src", "dest", progress=lambda d, t: seen.append((d, t)))
            assert _snapshot(basedir / "dest") == _snapshot(tmp_path / "src")
            assert seen[-1][0] == seen[-1][1] == sum(300_000 + i for i in range(30))
            with pytest.raises(RemoteFileExistsError):
                await slave.send_tree(tmp_path / "src", "dest")
            await slave.fetch_tree("dest", tmp_path / "back")
            assert _snapshot(tmp_path / "back") == _snapshot(tmp_path / "src")
            await slave.ping()

    run(main())


def test_send_tree_failures_and_cancel_keep_nothing_and_the_slave(tmp_path: Path,
                                                                   slave_procs: SlaveProcesses) -> None:
    """A missing source, a special file, an early answer or a cancel: nothing kept, the slave in step."""
    from remsh.errors import LocalError

    basedir = tmp_path / "base"
    basedir.mkdir()
    _make_tree(tmp_path / "src", files=200, size=500_000)
    special = tmp_path / "special"
    special.mkdir()
    os.mkfifo(special / "fifo")

    async def main() -> None:
        async with aio_slave("local", slave_procs, basedir) as (_, slave):
            with pytest.raises(LocalError):
                await slave.send_tree(tmp_path / "missing", "a")
            with pytest.raises(LocalError, match="fifo"):
                await slave.send_tree(special, "b")
            with pytest.raises(NotFoundError):  # the slave answers before the stream ends
                await slave.send_tree(tmp_path / "src", "nodir/b")
            await slave.ping()
            moved: List[int] = []
            task = asyncio.create_task(slave.send_tree(tmp_path / "src", "c", progress=lambda d, t: moved.append(d)))
            while not moved:
                await asyncio.sleep(0.005)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await slave.ping()
            assert sorted(os.listdir(basedir)) == []
            await slave.send_tree(tmp_path / "src", "d")
            assert _snapshot(basedir / "d") == _snapshot(tmp_path / "src")

    run(main())


def test_every_operation_of_the_table_is_a_coroutine_with_slaves_arguments() -> None:
    """AsyncSlave has every operation of remsh.ops.OPERATIONS as a coroutine with the threaded Slave's
    parameters (less execute's `interrupted`: a cancel does that)."""
    from remsh.master.slave import Slave
    from remsh.ops import OPERATIONS

    for meth in OPERATIONS:
        amethod = getattr(aio.AsyncSlave, meth)
        assert inspect.iscoroutinefunction(amethod), meth
        theirs = {n: p.default for n, p in inspect.signature(getattr(Slave, meth)).parameters.items()
                  if n != "interrupted"}
        ours = {n: p.default for n, p in inspect.signature(amethod).parameters.items()}
        assert ours == theirs, meth
    assert not inspect.iscoroutinefunction(aio.AsyncSlave.interrupt)


def test_idle_slaves_that_die_or_speak_out_of_turn_leave_the_collection(tmp_path: Path,
                                                                        slave_procs: SlaveProcesses) -> None:
    """An idle TCP slave whose process is killed, and an idle slave sending a box nobody asked for, are dropped
    (and leave the collection) without any call being made; a busy slave's replies are not mistaken for that."""
    import signal

    from remsh.wire import encode_box

    async def main() -> None:
        async with aio_listener("tcp") as listener:
            coll = listener.slave_collection
            (tmp_path / "a").mkdir()
            slave = await start_slave(listener, "tcp", slave_procs, tmp_path / "a", name="victim")
            for _ in range(20):  # replies while busy are the operation's, never "out of turn"
                await slave.execute(["echo", "x"], stdout_cb=lambda d: None)
            assert slave.connected
            gone = asyncio.Event()
            slave.on_disconnect(lambda s: gone.set())
            slave_procs.procs[0].signal(signal.SIGKILL)
            await asyncio.wait_for(gone.wait(), WAIT)
            assert coll.get_all_slaves() == []

            chatty = await fake_slave(listener.port, "chatty")
            fake = await coll.get_slave(timeout=WAIT)
            dropped = asyncio.Event()
            fake.on_disconnect(lambda s: dropped.set())
            await chatty.send(encode_box({b"result": b"0"}))
            await asyncio.wait_for(dropped.wait(), WAIT)
            assert coll.get_all_slaves() == []
            assert await chatty.read_box(WAIT) is None

    run(main())


def test_accepted_connections_have_tcp_keepalive(tmp_path: Path, slave_procs: SlaveProcesses) -> None:
    """The TCP listener turns keepalive on for each slave's socket (a vanished host is noticed while idle)."""
    import socket as socket_mod

    async def main() -> None:
        async with aio_listener("tcp", keepalive=(7, 3, 2)) as listener:
            (tmp_path / "a").mkdir()
            slave = await start_slave(listener, "tcp", slave_procs, tmp_path / "a")
            assert slave.conn.transport is not None
            sock = slave.conn.transport.get_extra_info("socket")
            assert sock.getsockopt(socket_mod.SOL_SOCKET, socket_mod.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket_mod.IPPROTO_TCP, socket_mod.TCP_KEEPIDLE) == 7

    run(main())


def test_sync_tree_sends_only_what_differs_and_deletes(tmp_path: Path, slave_procs: SlaveProcesses) -> None:
    """sync_tree over aio: first everything, then only the changed file, with delete the extra entry goes;
    checksum finds a same-size, same-time change; a cancel keeps the slave usable."""
    basedir = tmp_path / "base"
    basedir.mkdir()
    src = tmp_path / "src"
    _make_tree(src, files=10, size=10_000)

    async def main() -> None:
        async with aio_slave("local", slave_procs, basedir) as (_, slave):
            first = await slave.sync_tree(src, "dest")
            assert (first.sent_files, first.deleted) == (11, 0)  # ten files and the link
            assert _snapshot(basedir / "dest") == _snapshot(src)
            (src / "sub" / "f1").write_bytes(b"changed")
            (basedir / "dest" / "extra").write_bytes(b"x")
            second = await slave.sync_tree(src, "dest", delete=True)
            assert (second.sent_files, second.sent_bytes, second.deleted, second.unchanged) == (1, 7, 1, 10)
            assert _snapshot(basedir / "dest") == _snapshot(src)
            st = (src / "sub" / "f3").stat()
            (src / "sub" / "f3").write_bytes(os.urandom(st.st_size))
            os.utime(src / "sub" / "f3", ns=(st.st_atime_ns, st.st_mtime_ns))
            assert (await slave.sync_tree(src, "dest")).sent_files == 0
            assert (await slave.sync_tree(src, "dest", checksum=True)).sent_files == 1
            assert _snapshot(basedir / "dest") == _snapshot(src)
            with pytest.raises(NotFoundError):
                await slave.sync_tree(src, "nodir/dest")

            big = tmp_path / "big"
            _make_tree(big, files=100, size=1_000_000)
            moved: List[int] = []
            task = asyncio.create_task(slave.sync_tree(big, "bigdest", progress=lambda d, t: moved.append(d)))
            while not moved:
                await asyncio.sleep(0.005)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await slave.ping()
            await slave.sync_tree(big, "bigdest")
            assert _snapshot(basedir / "bigdest") == _snapshot(big)

    run(main())


def test_a_slave_through_an_openssh_tunnel(tmp_path: Path, slave_procs: SlaveProcesses) -> None:
    """A slave reaching the aio TCP listener through a real sshd's tunnel (remsh-slave --via-ssh) works as any."""
    from tests.sshd import Sshd, make_key, require_sshd, write_known_hosts

    require_sshd()
    identity = tmp_path / "id_ed25519"
    key = make_key("ed25519", identity)
    authorized = tmp_path / "authorized_keys"
    authorized.write_text(f"{key.get_name()} {key.get_base64()} remsh-test\n")
    sshd = Sshd(tmp_path / "sshd", authorized).start()
    try:
        known = write_known_hosts(tmp_path / "known_hosts", [(HOST, sshd.port, sshd.host_key)])
        basedir = tmp_path / "base"
        basedir.mkdir()

        async def main() -> None:
            async with aio_listener("tcp") as listener:
                proc = slave_procs.start(listener.port, "tunnelled", basedir=basedir, no_reconnect=True,
                                         extra_args=["--ssh-client", "paramiko", "--via-ssh",
                                                     f"{sshd.user}@{HOST}:{sshd.port}", "--identity",
                                                     str(identity), "--known-hosts", str(known)])
                try:
                    slave = await listener.slave_collection.get_slave(timeout=WAIT * 2)
                except WaitTimeout:
                    pytest.fail(f"no registration\n{proc.log_text()}\n{sshd.log_text()}")
                out: List[bytes] = []
                assert await slave.execute(["echo", "through ssh"], stdout_cb=out.append) == 0
                assert b"".join(out) == b"through ssh\n"
                data = os.urandom(2 << 20)
                await slave.send(io.BytesIO(data), "f")
                back = io.BytesIO()
                await slave.fetch("f", back)
                assert back.getvalue() == data

        run(main())
    finally:
        sshd.stop()


def test_a_cancelled_long_operation_is_followed_while_the_slave_shows_it_is_alive() -> None:
    """After a cancel, a long operation's liveness boxes keep the slave (each restarts the wait, as in the
    call itself) until its final box, however long past io_timeout plus the kill grace that takes."""
    from remsh.aio.slave import KILL_GRACE
    from remsh.wire import encode_box

    async def main() -> None:
        async with aio_listener("tcp", io_timeout=0.2) as listener:
            peer = await fake_slave(listener.port, "slow")
            slave = await listener.slave_collection.get_slave(timeout=WAIT)
            task = asyncio.create_task(slave.remove("big"))
            assert (await peer.read_box(WAIT) or {}).get(b"meth") == b"remove"
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            end = time.monotonic() + 0.2 + KILL_GRACE + 0.5
            while time.monotonic() < end:
                await peer.send(encode_box({b"progress": b"y"}))
                await asyncio.sleep(0.05)
            assert slave.connected
            await peer.send(encode_box({}))  # the final box
            ping = asyncio.create_task(slave.ping())
            assert (await peer.read_box(WAIT) or {}).get(b"meth") == b"ping"
            await peer.send(encode_box({}))
            await ping
            assert slave.connected

    run(main())


def test_a_name_held_through_one_listener_is_refused_through_another(tmp_path: Path,
                                                                    slave_procs: SlaveProcesses) -> None:
    """A TCP slave taking the name of a connected local slave (listeners sharing a collection) is refused and the
    local slave stays; through the same listener a newcomer replaces the old registration."""

    async def main() -> None:
        coll = aio.AsyncSlaveCollection()
        async with aio_listener("local", slave_collection=coll) as local, \
                aio_listener("tcp", slave_collection=coll) as tcp:
            (tmp_path / "a").mkdir()
            held = await local.start_slave(str(tmp_path / "a"), "shared-name")
            intruder = slave_procs.start(tcp.port, "shared-name", no_reconnect=True)
            status = await asyncio.get_running_loop().run_in_executor(None, intruder.wait)
            assert status != 0, "the intruder was not refused at registration"
            assert coll.get_all_slaves() == [held] and held.connected
            await held.ping()
            (tmp_path / "b").mkdir()
            first = await start_slave(tcp, "tcp", slave_procs, tmp_path / "b", name="again")
            (tmp_path / "c").mkdir()
            slave_procs.start(tcp.port, "again", basedir=tmp_path / "c", no_reconnect=True)
            second = await coll.get_slave(filter=lambda s: s.name == "again" and s is not first, timeout=WAIT)
            assert not first.connected and second.connected

    run(main())
