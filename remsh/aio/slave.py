"""The asyncio master's handle on one connected slave: :class:`AsyncSlave`.

Every operation of :class:`remsh.master.slave.Slave` is here as a coroutine
of the same arguments, raising the same errors.  The conversations are the
protocol layer's objects (:class:`~remsh.conversation.ExecuteCall`,
:class:`~remsh.protocol.transfer.SendCall`,
:class:`~remsh.protocol.transfer.FetchCall`,
:class:`~remsh.protocol.simple.SimpleCall`); this module only moves their
bytes over a :class:`~remsh.aio.connection.Connection` (or, for a slave
with a session, a :class:`~remsh.aio.session.SessionConnection`).

Calls on one slave run one at a time, in call order (an
:class:`asyncio.Lock`).  **Cancelling** the task that awaits an operation
stops it on the slave: a command is interrupted (its process group
killed), a ``send`` is aborted (nothing is left), a ``fetch`` is stopped;
the rest of the conversation is then read by a task of the slave's own, so
the slave stays in step and usable (the next call waits for it).  When the
slave is silent past the reply deadline (``io_timeout``, plus
:data:`KILL_GRACE` for a command to die) that task drops it instead.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from typing import (Any, AsyncIterable, Awaitable, BinaryIO, Callable, Dict, List, Optional, Protocol, Sequence,
                    Set, Union)

from remsh.aio import transfers, trees
from remsh.aio.connection import Channel
from remsh.conversation import EnvArg, ExecuteCall, Exited, Failed, Output, Started, State
from remsh.errors import (CommandTimeout, Disconnected, LocalError, PeerTimeout, ProtocolError, RemoteError,
                          RemshError, UsageError)
from remsh.master.operation import progress_interval
from remsh.master.progress import ProgressCallback
from remsh.master.tree import SyncResult
from remsh.ops import (CHMOD, COPY, DEFAULT_IO_TIMEOUT, GETENV, MKDIR, PING, REMOVE, RENAME, SET_CWD, STAT, UNLINK,
                       Operation)
from remsh.protocol.simple import Reply, SimpleCall
from remsh.protocol.trees import FetchTreeCall, SendTreeCall, TreeState
from remsh.wire import Box

log = logging.getLogger(__name__)

__all__ = ["AsyncSlave", "OutputCallback", "StdinSource"]

Path = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]
#: A plain function or a coroutine function, called with each chunk of output.
OutputCallback = Callable[[bytes], Union[Any, Awaitable[Any]]]
#: What ``execute`` feeds the command: bytes, a binary file object (read in
#: the event loop: a regular file or a pipe with data ready) or an async
#: iterable of bytes (an :class:`asyncio.StreamReader`, a generator).
StdinSource = Union[bytes, BinaryIO, AsyncIterable[bytes], None]

#: How long a command interrupted at the master's ``timeout`` (or by a
#: cancel) may take to end before the slave is dropped.
KILL_GRACE = 5.0
#: Bytes of stdin per box.
STDIN_CHUNK = 65535


class _Call(Protocol):
    """What :meth:`AsyncSlave._settle` needs of a conversation object."""

    def receive(self, box: Box) -> Any: ...


def _done(call: Any) -> bool:
    if isinstance(call, ExecuteCall):
        return call.state is State.DONE
    return bool(call.done)


def _stop_bytes(call: Any) -> Optional[bytes]:
    """What to send to stop ``call`` early (``None``: nothing, or not yet)."""
    if isinstance(call, ExecuteCall):
        return call.interrupt()
    if isinstance(call, FetchTreeCall):
        return call.stop()
    if isinstance(call, SendTreeCall):  # the end of the master's stream: an abort
        return call.finish("the master cancelled the transfer") if call.state is TreeState.STREAMING else None
    data: Optional[bytes] = call.cancel()
    return data


class _Overdue(Exception):
    """An ``execute`` ran past its ``timeout`` and the slave did not end it."""


class AsyncSlave:
    """A connected slave, driven from one asyncio event loop.

    :ivar name: the name the slave registered with
    :ivar info: the descriptive keys of its ``register`` box (str -> str)
    :ivar listener: the listener that connected it (or ``None``)

    Errors are those of :class:`remsh.master.slave.Slave`:
    :class:`~remsh.errors.Disconnected` (naming slave and operation) when the
    connection is gone or goes, :class:`~remsh.errors.PeerTimeout` when the
    slave stops answering for ``io_timeout`` seconds,
    :class:`~remsh.errors.ProtocolError` when it breaks the protocol (after
    these the slave is disconnected), and :class:`~remsh.errors.RemoteError`
    subclasses for what the slave reports (it stays connected).
    """

    def __init__(self, conn: Channel, name: str, info: Optional[Dict[str, str]] = None,
                 listener: Any = None, *, io_timeout: float = DEFAULT_IO_TIMEOUT) -> None:
        self.conn = conn
        self.name = name
        self.info: Dict[str, str] = dict(info or {})
        self.listener = listener
        self.io_timeout = io_timeout
        self._lock = asyncio.Lock()
        self._disconnected: Optional[RemshError] = None
        self._callbacks: List[Callable[["AsyncSlave"], Any]] = []
        self._executions: Set[ExecuteCall] = set()
        self._settlers: Set["asyncio.Task[None]"] = set()
        # while no operation reads it, the connection tells of a slave that
        # went away (or sent what nobody asked for): it is dropped at once
        conn.on_idle_event = self._idle_event

    def _idle_event(self, error: RemshError) -> None:
        self.drop(error)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {'connected' if self.connected else 'disconnected'}>"

    # -- life cycle --------------------------------------------------------

    async def setup(self) -> None:
        """Called once by the listener after registration, before the slave
        joins its collection; an exception keeps it out."""

    @property
    def connected(self) -> bool:
        """False once the connection has closed or broken -- and, for a slave
        whose work survives a dropped connection (``resume_timeout``), while
        it is away (as :attr:`remsh.master.slave.Slave.connected`)."""
        return self._disconnected is None and bool(getattr(self.conn, "attached", True))

    @property
    def resumable(self) -> bool:
        """True when the slave's work survives a dropped connection (it
        holds a session: a listener with ``resume_timeout`` > 0)."""
        return self.conn.resumable

    def on_disconnect(self, callback: Callable[["AsyncSlave"], Any]) -> None:
        """Call ``callback(slave)`` once when the connection goes (at once
        if it already has)."""
        if self._disconnected is None:
            self._callbacks.append(callback)
        else:
            callback(self)

    def close(self) -> None:
        """Drop the connection; a running operation raises ``Disconnected``."""
        self.drop(Disconnected(f"{self.name}: connection closed by the master"))

    def drop(self, exc: RemshError) -> None:
        """Disconnect with ``exc`` as the cause (idempotent)."""
        if self._disconnected is not None:
            return
        self._disconnected = exc
        callbacks, self._callbacks = self._callbacks, []
        log.info("slave %s disconnected: %s", self.name, exc)
        self.conn.close()
        for cb in callbacks:
            try:
                cb(self)
            except Exception:  # noqa: BLE001 - one bad callback must not stop the rest
                log.exception("on_disconnect callback failed for slave %s", self.name)

    # -- the operation frame -------------------------------------------------

    def _named(self, meth: str, e: RemshError) -> RemshError:
        text = str(e)
        prefix = f"{self.name}: "
        if text.startswith(prefix):
            text = text[len(prefix):]
        named = type(e)(f"{self.name}: {meth}: {text}")
        named.__cause__ = e
        return named

    def _remote(self, meth: str, event: Failed) -> RemoteError:
        error = event.error
        return type(error)(error.remote_message, slave=self.name, operation=meth, errtag=error.errtag)

    async def _acquire(self, meth: str, timeout: Optional[float] = None) -> None:
        if timeout is None:
            await self._lock.acquire()
        else:
            try:
                async with asyncio.timeout(timeout):  # not wait_for: it may swallow a cancel (3.11)
                    await self._lock.acquire()
            except TimeoutError:
                raise _Overdue() from None
        if self._disconnected is not None:
            self._lock.release()
            raise Disconnected(f"{self.name}: {meth}: slave is disconnected ({self._disconnected})")
        self.conn.busy = True

    def _release(self) -> None:
        """End an operation: give the slave to the next caller; the
        connection is watched again while nobody holds it."""
        self._lock.release()
        if not self._lock.locked():
            self.conn.idle()

    async def _run(self, meth: str, call: Any, body: Awaitable[Any], lock_timeout: Optional[float] = None) -> Any:
        """Run ``body`` (the conversation of ``call``) holding the slave.

        A cancel (or :class:`_Overdue`) before ``call`` is done hands the
        rest of the conversation to :meth:`_settle`; a transport or
        protocol failure drops the slave; errors name slave and operation.
        """
        try:
            await self._acquire(meth, lock_timeout)
        except BaseException:
            if inspect.iscoroutine(body):
                body.close()
            raise
        handed_off = False
        try:
            return await body
        except (asyncio.CancelledError, _Overdue):
            if not _done(call) and self._disconnected is None:
                self._settle_later(meth, call)
                handed_off = True
            raise
        except RemoteError:
            raise
        except (Disconnected, ProtocolError) as e:
            self.drop(e)
            raise self._named(meth, e) from e
        except BaseException as e:
            if not _done(call):  # where the slave stands is unknown
                self.drop(Disconnected(f"{self.name}: {meth}: abandoned: {e!r}"))
            raise
        finally:
            if not handed_off:
                self._release()

    def _settle_later(self, meth: str, call: _Call) -> None:
        """Stop ``call`` on the slave and read the rest of its conversation
        in a task of its own, keeping the slave until it is in step again."""
        task = asyncio.get_running_loop().create_task(self._settle(meth, call), name=f"remsh-settle-{self.name}")
        self._settlers.add(task)
        task.add_done_callback(self._settlers.discard)

    async def _settle(self, meth: str, call: _Call) -> None:
        # each box restarts the wait, as in the operation itself: a long
        # operation's liveness boxes keep it going until its final box
        try:
            while True:
                data = _stop_bytes(call)
                if data is not None:
                    await self.conn.send(data, self.io_timeout)
                if _done(call):
                    return
                box = await self.conn.read_box(self.io_timeout + KILL_GRACE)
                if box is None:
                    raise Disconnected("slave closed the connection")
                call.receive(box)
        except Exception as e:  # noqa: BLE001 - out of step whatever it was: drop
            self.drop(Disconnected(f"{self.name}: {meth}: the cancelled operation did not end in step: {e}"))
        finally:
            self._release()

    async def _read(self, meth: str, timeout: Optional[float] = None) -> Box:
        box = await self.conn.read_box(self.io_timeout if timeout is None else timeout)
        if box is None:
            raise Disconnected(f"slave closed the connection during {meth}")
        return box

    # -- simple operations ---------------------------------------------------

    async def _call(self, op: Operation, **values: Any) -> Box:
        call = SimpleCall(op, **values)

        async def body() -> Box:
            await self.conn.send(call.request(), self.io_timeout)
            while True:
                event = call.receive(await self._read(op.meth))
                if event is not None:
                    break
            if isinstance(event, Failed):
                raise self._remote(op.meth, event)
            assert isinstance(event, Reply)
            return event.box

        result: Box = await self._run(op.meth, call, body())
        return result

    async def ping(self) -> None:
        """Round trip to the slave; raises if it does not answer."""
        await self._call(PING)

    async def set_cwd(self, cwd: Optional[Path] = None) -> str:
        """Change the slave's current directory and return the new one
        (see :meth:`Slave.set_cwd <remsh.master.slave.Slave.set_cwd>`)."""
        reply = await self._call(SET_CWD, cwd=None if cwd is None else os.fsencode(cwd))
        return os.fsdecode(reply.get(b"cwd", b""))

    async def getenv(self) -> Dict[str, str]:
        """The slave's environment (str -> str, undecodable bytes escaped)."""
        reply = await self._call(GETENV)
        return {os.fsdecode(k[4:]): os.fsdecode(v) for k, v in reply.items() if k.startswith(b"env_")}

    async def mkdir(self, dir: Path) -> None:
        """Make a directory and its parents (``mkdir -p``)."""
        await self._call(MKDIR, dir=os.fsencode(dir), progress=progress_interval(self.io_timeout))

    async def unlink(self, file: Path) -> None:
        """Remove one file."""
        await self._call(UNLINK, file=os.fsencode(file))

    async def remove(self, path: Path) -> None:
        """Remove a file or a whole tree (``rm -rf``); a missing path is fine."""
        await self._call(REMOVE, path=os.fsencode(path), progress=progress_interval(self.io_timeout))

    async def rename(self, src: Path, dest: Path) -> None:
        """Rename ``src`` to ``dest``, never replacing an existing ``dest``."""
        await self._call(RENAME, src=os.fsencode(src), dest=os.fsencode(dest))

    async def chmod(self, path: Path, mode: int) -> None:
        """Set the permission bits of ``path`` (``0o7777`` at most)."""
        await self._call(CHMOD, path=os.fsencode(path), mode=mode)

    async def copy(self, src: Path, dest: Path) -> None:
        """Copy a file's data on the slave; ``dest`` must not exist."""
        await self._call(COPY, src=os.fsencode(src), dest=os.fsencode(dest),
                         progress=progress_interval(self.io_timeout))

    async def stat(self, pathname: Path) -> Optional[str]:
        """``"d"`` for a directory, ``"f"`` for anything else, ``None`` if missing."""
        reply = await self._call(STAT, path=os.fsencode(pathname))
        result = reply.get(b"result", b"")
        if result not in (b"", b"d", b"f"):
            error = ProtocolError(f"{self.name}: stat: bad result {result[:20]!r}")
            self.drop(error)
            raise error
        return result.decode("ascii") or None

    # -- execute -----------------------------------------------------------

    async def execute(self, args: Sequence[Path] = (), stdout_cb: Optional[OutputCallback] = None,
                      stderr_cb: Optional[OutputCallback] = None, env: Optional[EnvArg] = None,
                      cwd: Optional[Path] = None, timeout: Optional[float] = None,
                      stdin: StdinSource = None, *, keep_processes: bool = False) -> int:
        """Run a command on the slave and return its exit status (``-N``
        for signal N), as :meth:`Slave.execute
        <remsh.master.slave.Slave.execute>` does.

        ``stdout_cb`` / ``stderr_cb`` may be plain functions or coroutine
        functions (awaited before the next output is read).  Cancelling
        the awaiting task kills the command's process group on the slave.

        :raises UsageError: ``args`` empty, ``timeout`` not positive and finite
        :raises ExecFailedError: the command cannot start
        :raises CommandTimeout: ``timeout`` ran out and the command was killed
        :raises LocalError: reading ``stdin`` failed (the command was interrupted)
        """
        try:
            call = ExecuteCall(args, want_stdout=stdout_cb is not None, want_stderr=stderr_cb is not None,
                               want_stdin=stdin is not None, cwd=cwd, timeout=timeout, env=env,
                               keep_processes=keep_processes)
        except UsageError as e:
            raise UsageError(f"{self.name}: execute: {e}") from None
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        self._executions.add(call)
        try:
            final, deferred = await self._run(
                "execute", call, self._run_command(call, stdout_cb, stderr_cb, timeout, stdin, deadline),
                lock_timeout=timeout)
        except _Overdue:
            raise CommandTimeout(f"command timed out after {timeout:g} s (the slave did not end it in time)",
                                 slave=self.name, operation="execute") from None
        finally:
            self._executions.discard(call)
        if deferred is not None:
            raise deferred
        if isinstance(final, Failed):
            raise self._remote("execute", final)
        code: int = final.code
        return code

    async def _run_command(self, call: ExecuteCall, stdout_cb: Optional[OutputCallback],
                           stderr_cb: Optional[OutputCallback], timeout: Optional[float],
                           stdin: StdinSource, deadline: Optional[float]) -> Any:
        conn = self.conn
        loop = asyncio.get_running_loop()
        await conn.send(call.request(), self.io_timeout)
        feeder: Optional["asyncio.Task[None]"] = None
        feed_error: List[BaseException] = []
        callback_error: Optional[BaseException] = None
        wait: Optional[float] = self.io_timeout
        overdue = False
        try:
            while True:
                limit = wait
                if deadline is not None:
                    left = max(0.0, deadline - loop.time())
                    limit = left if wait is None else min(wait, left)
                box = conn.received()  # the boxes already here, without a coroutine each
                try:
                    if box is None:
                        box = await conn.read_box(limit)
                except PeerTimeout:
                    if deadline is None or loop.time() < deadline:
                        raise
                    if overdue:
                        raise _Overdue() from None
                    overdue = True  # the master's bound: interrupt, and wait a little for the end
                    self._interrupt_call(call)
                    deadline = loop.time() + min(self.io_timeout, KILL_GRACE)
                    continue
                if box is None:
                    raise Disconnected("slave closed the connection during execute")
                event = call.receive(box)
                if type(event) is Output:
                    cb = stdout_cb if event.stream == "stdout" else stderr_cb
                    if cb is not None and callback_error is None:
                        try:
                            result = cb(event.data)
                            if result is not None and inspect.isawaitable(result):
                                await result
                        except asyncio.CancelledError:
                            raise
                        except BaseException as e:  # noqa: BLE001 - re-raised once the command ended
                            callback_error = e
                            self._interrupt_call(call)
                elif isinstance(event, Started):
                    if stdin is not None:
                        feeder = loop.create_task(self._feed(call, stdin, feed_error))
                    wait = None if timeout is None else timeout + self.io_timeout
                elif isinstance(event, (Exited, Failed)):
                    final: Union[Exited, Failed] = event
                    if overdue and isinstance(event, Exited) and event.code < 0:
                        final = Failed(CommandTimeout(f"command timed out after {timeout:g} s and was killed"))
                    break
        finally:
            if feeder is not None:
                feeder.cancel()
        if callback_error is not None:
            return final, callback_error
        if feed_error:
            err = LocalError(f"{self.name}: execute: reading stdin failed: {feed_error[0]}")
            err.__cause__ = feed_error[0]
            return final, err
        return final, None

    async def _feed(self, call: ExecuteCall, source: Any, errors: List[BaseException]) -> None:
        """Send the command's stdin, then its end (a task of its own, so that
        output is read meanwhile)."""
        try:
            if isinstance(source, (bytes, bytearray, memoryview)):
                view = memoryview(source)
                for start in range(0, len(view), STDIN_CHUNK):
                    await self.conn.send(call.stdin_box(bytes(view[start:start + STDIN_CHUNK])), self.io_timeout)
            elif hasattr(source, "__aiter__"):
                async for chunk in source:
                    view = memoryview(chunk)
                    for start in range(0, len(view), STDIN_CHUNK):
                        await self.conn.send(call.stdin_box(bytes(view[start:start + STDIN_CHUNK])),
                                             self.io_timeout)
            else:
                while True:
                    try:
                        chunk = source.read(STDIN_CHUNK)
                    except OSError as e:
                        errors.append(e)
                        self._interrupt_call(call)
                        break
                    if not chunk:
                        break
                    await self.conn.send(call.stdin_box(chunk), self.io_timeout)
            await self.conn.send(call.stdin_box(b""), self.io_timeout)
        except RemshError:
            pass  # the reading side sees the broken connection

    def _interrupt_call(self, call: ExecuteCall) -> None:
        data = call.interrupt()
        if data is None or self._disconnected is not None:
            return
        try:
            self.conn.write(data)
        except Disconnected:
            pass

    def interrupt(self) -> None:
        """Kill the command of every :meth:`execute` in progress on this
        slave (a plain function: call it from the loop's thread, or through
        ``loop.call_soon_threadsafe``).  Never raises."""
        for call in list(self._executions):
            self._interrupt_call(call)

    # -- file transfer -------------------------------------------------------

    async def send(self, src: Union[Path, BinaryIO], dest: Path, *, mode: Optional[int] = None,
                   progress: Optional[ProgressCallback] = None) -> None:
        """Copy local ``src`` (a path or binary file object) to ``dest`` on
        the slave, as :meth:`Slave.send <remsh.master.slave.Slave.send>`
        does (atomic, verified with SHA-256).  Cancelling the awaiting task
        aborts the transfer: nothing is left on the slave."""
        await transfers.send(self, src, dest, mode, progress)

    async def fetch(self, src: Path, dest: Union[Path, BinaryIO], *, max_bytes: Optional[int] = None,
                    progress: Optional[ProgressCallback] = None) -> None:
        """Copy ``src`` on the slave to local ``dest`` (a path or binary
        file object), as :meth:`Slave.fetch <remsh.master.slave.Slave.fetch>`
        does.  Cancelling the awaiting task stops the transfer: nothing is
        left at a path ``dest``."""
        await transfers.fetch(self, src, dest, max_bytes, progress)

    # -- directory trees ---------------------------------------------------------

    async def fetch_tree(self, src: Path, dest_dir: Path, *, progress: Optional[ProgressCallback] = None,
                         max_bytes: Optional[int] = None, max_entries: Optional[int] = None) -> None:
        """Copy the directory ``src`` on the slave to the new local directory
        ``dest_dir``, as :meth:`Slave.fetch_tree
        <remsh.master.slave.Slave.fetch_tree>` does (built beside it, renamed
        into place last, nothing left on failure; the same bounds and
        errors).  Cancelling the awaiting task stops the transfer: nothing
        is left and the slave stays usable."""
        await trees.fetch_tree(self, src, dest_dir, progress, max_bytes, max_entries)

    async def send_tree(self, src_dir: Path, dest: Path, *, progress: Optional[ProgressCallback] = None) -> None:
        """Copy the local directory ``src_dir`` to ``dest`` on the slave, as
        :meth:`Slave.send_tree <remsh.master.slave.Slave.send_tree>` does
        (atomic: built beside ``dest``, renamed into place last).  The
        local tree is read by a worker thread of the loop's default
        executor while the call runs.  Cancelling the awaiting task aborts
        the transfer: nothing is kept on the slave, which stays usable."""
        await trees.send_tree(self, src_dir, dest, progress)

    async def sync_tree(self, src_dir: Path, dest: Path, *, delete: bool = False, checksum: bool = False,
                        progress: Optional[ProgressCallback] = None) -> SyncResult:
        """Make ``dest`` on the slave match the local directory ``src_dir``,
        as :meth:`Slave.sync_tree <remsh.master.slave.Slave.sync_tree>` does,
        and return its :class:`~remsh.master.tree.SyncResult`.  The local
        tree is compared and read by a worker thread while the call runs.
        Cancelling the awaiting task ends the stream with an abort (what
        was already replaced stays; the slave stays usable)."""
        return await trees.sync_tree(self, src_dir, dest, delete, checksum, progress)

    # for remsh.aio.transfers and remsh.aio.trees: the frame of one conversation
    async def run_conversation(self, meth: str, call: Any, body: Awaitable[Any]) -> Any:
        """Run ``body``, the conversation of ``call``, holding the slave
        (see :meth:`_run`); for the bodies in :mod:`remsh.aio.transfers`."""
        return await self._run(meth, call, body)

    async def read_reply(self, meth: str) -> Box:
        """The next box within ``io_timeout`` (``Disconnected`` at a close)."""
        return await self._read(meth)

    def remote_error(self, meth: str, event: Failed) -> RemoteError:
        """The error to raise for the slave's error event, naming slave and operation."""
        return self._remote(meth, event)

    def protocol_error(self, meth: str, message: str) -> ProtocolError:
        """The slave broke the protocol after its final box: drop it."""
        error = ProtocolError(f"{self.name}: {meth}: {message}")
        self.drop(error)
        return error
