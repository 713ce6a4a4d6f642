"""The tree operations over asyncio: the protocol layer's
:class:`~remsh.protocol.trees.FetchTreeCall`,
:class:`~remsh.protocol.trees.SendTreeCall` and
:class:`~remsh.protocol.trees.SyncTreeCall` driven by
:class:`~remsh.aio.slave.AsyncSlave`, the local tree written by
:class:`~remsh.treewriter.Writer` and read by :class:`~remsh.treestream.Sender`
(the threaded master's reader and writer, unchanged).

``fetch_tree`` runs in the event loop alone: records are written as they
arrive, one box at a time (at most 64 KiB of file data), so the loop is
never held for long.

``send_tree`` and ``sync_tree`` read (and compare) the local tree in a
worker thread of the loop's default executor, one per call in progress
(the planning of :func:`remsh.master.tree.plan_changes` and
:func:`~remsh.master.tree.send_changes` too: file reads and hashing would
otherwise hold the loop for the length of a file): the thread's writes go
through the loop with the connection's flow control, while the loop
watches for an early answer from the slave.  The conversation itself stays
in the loop.

The guarantees are :class:`~remsh.master.slave.Slave`'s: ``send_tree`` and
``fetch_tree`` make a tree that appears complete or not at all (nothing is
left after a failure, a bound passed or a cancel); ``sync_tree`` replaces
file by file.  In every case the slave stays in step.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any, Callable, List, Optional, TypeVar

from remsh.dirremove import remove_dir_at
from remsh.errors import (LimitExceeded, LocalError, ProtocolError, RemshError, TreeDigestError,
                          TreeSourceError, TreeStreamError, TreeTargetError)
from remsh.files import O_CLOEXEC, O_DIRECTORY
from remsh.master.operation import progress_interval
from remsh.master.progress import Progress, ProgressCallback
from remsh.aio.transfers import TransferHost
from remsh.master.tree import (MAX_FETCH_DEPTH, SyncResult, fetched_modes, local_parent, open_local_dir,
                               plan_changes, send_changes)
from remsh.conversation import PathArg as Path
from remsh.protocol.trees import (Alive, Announced, Failed, FetchTreeCall, Manifest, Record, SendTreeCall, Stop,
                                  SyncTreeCall)
from remsh.treestream import Sender, others_message, scan
from remsh.treewriter import Writer, make_temp_dir, place_dir

__all__ = ["fetch_tree", "send_tree", "sync_tree"]

T = TypeVar("T")


#: What the tree bodies need of a slave: what the transfer bodies need.
TreeHost = TransferHost


class _Local:
    """The master's side of one ``fetch_tree``: the tree being written."""

    def __init__(self, counter: Progress) -> None:
        self.counter = counter
        self.tmp: Optional[bytes] = None
        self.top = -1
        self.writer: Optional[Writer] = None
        self.local_error: Optional[Exception] = None


class _Bound(Exception):
    """The file data passed ``max_bytes`` (raised out of the writer)."""


async def fetch_tree(slave: TreeHost, src: Path, dest_dir: Path, progress: Optional[ProgressCallback],
                     max_bytes: Optional[int], max_entries: Optional[int]) -> None:
    """See :meth:`remsh.aio.slave.AsyncSlave.fetch_tree`."""
    meth = "fetch_tree"
    parent, name = local_parent(slave.name, meth, dest_dir)
    state = _Local(Progress(progress, None))
    call = FetchTreeCall(src, progress_interval(slave.io_timeout), max_bytes=max_bytes, max_entries=max_entries)
    conn = slave.conn

    def on_data(n: int) -> None:
        state.counter.add(n)
        if not call.file_data(n):
            raise _Bound()

    async def body() -> Any:
        await conn.send(call.request(), slave.io_timeout)
        while True:
            event = call.receive(await slave.read_reply(meth))
            if event is None or isinstance(event, Alive):
                continue
            if isinstance(event, Record):
                if state.writer is None:
                    raise ProtocolError("a record before the totals")
                try:
                    state.writer.feed(event.box)
                except _Bound:
                    await conn.send(call.stop_for_limit(), slave.io_timeout)
                except TreeTargetError as e:
                    state.local_error = e
                    await conn.send(call.stop() or b"", slave.io_timeout)
                except (TreeStreamError, TreeDigestError) as e:
                    raise ProtocolError(str(e)) from None
            elif isinstance(event, Announced):
                if event.stop is not None:
                    await conn.send(event.stop, slave.io_timeout)
                    continue
                state.counter = Progress(progress, event.size)
                try:
                    state.tmp = make_temp_dir(parent, name)
                    state.top = os.open(state.tmp, os.O_RDONLY | O_DIRECTORY | O_CLOEXEC, dir_fd=parent)
                    modes = fetched_modes()
                    state.writer = Writer(state.top, on_data=on_data, file_mode_mask=modes,
                                             dir_mode_mask=modes, max_depth=MAX_FETCH_DEPTH)
                except OSError as e:
                    state.local_error = e
                    await conn.send(call.stop() or b"", slave.io_timeout)
            elif isinstance(event, Stop):
                await conn.send(event.send, slave.io_timeout)
            else:  # Ended, Stopped, Failed: the last box
                return event

    try:
        event = await slave.run_conversation(meth, call, body())
        if call.limit is not None:  # whatever the final box says: ours is the cause
            raise LimitExceeded(f"{slave.name}: {meth}: {os.fsdecode(src)} passed {call.limit}; the transfer "
                                f"was stopped and nothing was kept")
        local_error = state.local_error
        if local_error is not None:
            raise LocalError(f"{slave.name}: {meth}: writing the local tree failed: {local_error}; "
                             f"nothing was kept") from local_error
        if isinstance(event, Failed):
            raise slave.remote_error(meth, event)
        writer, tmp = state.writer, state.tmp
        if writer is None or tmp is None or not writer.done:
            raise slave.protocol_error(meth, "the tree stream ended before its top directory was left")
        writer.close()
        os.close(state.top)
        state.top = -1
        try:
            place_dir(parent, tmp, name)
        except FileExistsError:
            raise LocalError(f"{slave.name}: {meth}: local destination appeared meanwhile: "
                             f"{os.fsdecode(dest_dir)}") from None
        except OSError as e:
            raise LocalError(f"{slave.name}: {meth}: cannot put the local tree in place: {e}") from e
        state.tmp = None
        state.counter.finish()
    finally:
        if state.writer is not None:
            state.writer.close()
        if state.top >= 0:
            os.close(state.top)
        if state.tmp is not None:
            try:
                remove_dir_at(parent, state.tmp, None)
            except OSError:
                pass
        os.close(parent)


# -- send_tree -----------------------------------------------------------------------------------


class _Stopped(Exception):
    """Raised in the worker thread at its next write once the loop said stop."""


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread; a cancel waits for it to end (it
    may hold the caller's descriptors) before it is raised."""
    fut = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    cancelled = False
    while True:
        try:
            result: T = await asyncio.shield(fut)
        except asyncio.CancelledError:
            if fut.done():
                raise
            cancelled = True
            continue
        if cancelled:
            raise asyncio.CancelledError()
        return result


async def _stream(slave: TreeHost, call: SendTreeCall, work: Callable[[Sender], None],
                  on_data: Callable[[int], None]) -> Optional[Exception]:
    """Run ``work(sender)`` in a worker thread, its writes sent by the loop;
    meanwhile read what the slave says (liveness, or an early answer, which
    stops the sender).  Returns the local tree's failure, if any.  Never
    returns before the thread ended: the conversation is the loop's again."""
    loop = asyncio.get_running_loop()
    conn = slave.conn
    stop = threading.Event()
    sent_error: List[BaseException] = []

    def write(data: bytes) -> None:
        if stop.is_set():
            raise _Stopped()
        try:
            asyncio.run_coroutine_threadsafe(conn.send(data, slave.io_timeout), loop).result()
        except BaseException as e:  # noqa: BLE001 - the loop side raises it
            sent_error.append(e)
            stop.set()
            raise _Stopped() from None

    def poll() -> bool:
        return stop.is_set() or call.answered is not None

    def data_sent(n: int) -> None:
        loop.call_soon_threadsafe(on_data, n)

    sender = Sender(write, data_sent, poll)

    def run() -> Optional[Exception]:
        local_error: Optional[Exception] = None
        try:
            try:
                work(sender)
            except TreeSourceError as e:
                local_error = e
            if call.answered is None and (local_error is not None or not sender.stopped):
                sender.flush()
        except _Stopped:
            pass
        return local_error

    async def watch() -> None:
        while call.answered is None:
            box = await conn.read_box(None)  # the sender's writes are bounded by io_timeout
            if box is None:
                raise ProtocolError("the slave closed the connection during the stream")
            call.receive(box)

    worker: "asyncio.Future[Optional[Exception]]" = loop.run_in_executor(None, run)
    watcher: "asyncio.Future[None]" = loop.create_task(watch())
    try:
        both: List["asyncio.Future[Any]"] = [worker, watcher]
        await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
        failure = watcher.exception() if watcher.done() else None
        if failure is not None:
            stop.set()
            await asyncio.wait([worker])
            raise failure
        local_error: Optional[Exception] = await worker
    finally:
        stop.set()
        if not watcher.done():
            watcher.cancel()
        # the thread must be done before anyone else writes (a cancel waits for it)
        while not worker.done():
            try:
                await asyncio.shield(worker)
            except asyncio.CancelledError:
                continue
            except BaseException:  # noqa: BLE001 - its outcome is read below, or not wanted
                break
        if not watcher.cancelled():
            try:
                await watcher
            except BaseException:  # noqa: BLE001 - raised above when it mattered
                pass
    if sent_error:
        error = sent_error[0]
        raise error if isinstance(error, RemshError) else ProtocolError(str(error))
    return local_error


async def send_tree(slave: TreeHost, src_dir: Path, dest: Path, progress: Optional[ProgressCallback]) -> None:
    """See :meth:`remsh.aio.slave.AsyncSlave.send_tree`."""
    meth = "send_tree"
    top = open_local_dir(slave.name, meth, src_dir)
    try:
        try:
            found = await _in_thread(scan, top)
        except TreeSourceError as e:
            raise LocalError(f"{slave.name}: {meth}: {e}") from None
        if found.others:
            raise LocalError(f"{slave.name}: {meth}: {others_message(found.others, top)}")
        counter = Progress(progress, found.size)
        call = SendTreeCall(dest)
        conn = slave.conn

        async def body() -> Any:
            await conn.send(call.request(), slave.io_timeout)
            def work(sender: Sender) -> None:
                sender.tree(top)

            local_error = await _stream(slave, call, work, counter.add)
            await conn.send(call.finish(None if local_error is None else str(local_error)), slave.io_timeout)
            while not call.done:
                call.receive(await slave.read_reply(meth))
            return local_error, call.outcome

        local_error, outcome = await slave.run_conversation(meth, call, body())
        if local_error is not None:
            raise LocalError(f"{slave.name}: {meth}: {local_error}; nothing was kept on the slave")
        if isinstance(outcome, Failed):
            raise slave.remote_error(meth, outcome)
        counter.finish()
    finally:
        os.close(top)


# -- sync_tree -----------------------------------------------------------------------------------


async def sync_tree(slave: TreeHost, src_dir: Path, dest: Path, delete: bool, checksum: bool,
                    progress: Optional[ProgressCallback]) -> SyncResult:
    """See :meth:`remsh.aio.slave.AsyncSlave.sync_tree`."""
    meth = "sync_tree"
    top = open_local_dir(slave.name, meth, src_dir)
    result = SyncResult()
    call = SyncTreeCall(dest, checksum, progress_interval(slave.io_timeout))
    conn = slave.conn
    counters: List[Progress] = []

    async def body() -> Any:
        await conn.send(call.request(), slave.io_timeout)
        event = None
        while not call.done and not isinstance(event, Manifest):
            event = call.receive(await slave.read_reply(meth))
        if not isinstance(event, Manifest):
            return None  # the slave refused: call.outcome says why
        manifest = event.manifest
        local_error: Optional[Exception] = None
        plan: Any = None
        try:  # the local tree walked (and, with checksum, read) in a worker thread
            plan, total, others = await _in_thread(plan_changes, top, manifest, checksum)
            if others:
                local_error = TreeSourceError(others_message(others, top))
            counters.append(Progress(progress, total))
        except TreeSourceError as e:
            local_error = e

        def work(sender: Sender) -> None:
            if local_error is None:
                send_changes(sender, top, manifest, plan, delete, result)

        streamed = await _stream(slave, call, work, counters[0].add if counters else (lambda n: None))
        local_error = local_error or streamed
        await conn.send(call.finish(None if local_error is None else str(local_error)), slave.io_timeout)
        while not call.done:
            call.receive(await slave.read_reply(meth))
        return local_error

    try:
        local_error = await slave.run_conversation(meth, call, body())
        if local_error is not None:
            raise LocalError(f"{slave.name}: {meth}: {local_error}")
        if isinstance(call.outcome, Failed):
            raise slave.remote_error(meth, call.outcome)
        if counters:
            counters[0].finish()
        return result
    finally:
        os.close(top)
