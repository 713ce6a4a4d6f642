"""``fetch_tree`` over asyncio: :class:`~remsh.protocol.trees.FetchTreeCall`
driven by :class:`~remsh.aio.slave.AsyncSlave`, the local tree written by
:class:`~remsh.treewriter.Writer` (the threaded master's reader and writer,
unchanged).

The records are written in the event loop as they arrive, one box at a
time (a box holds at most 64 KiB of file data), so the loop is never held
for long.  The guarantees are :meth:`Slave.fetch_tree
<remsh.master.slave.Slave.fetch_tree>`'s: the tree is built in a temporary
directory beside ``dest_dir`` and renamed into place last; on any failure,
a bound passed or a cancel, nothing is left.
"""

from __future__ import annotations

import os
from typing import Any, Awaitable, Optional, Protocol, Tuple

from remsh.aio.connection import Connection
from remsh.dirremove import remove_dir_at
from remsh.errors import (LimitExceeded, LocalError, ProtocolError, RemoteError, TreeDigestError, TreeStreamError,
                          TreeTargetError, UsageError)
from remsh.files import O_CLOEXEC, O_DIRECTORY
from remsh.master.operation import progress_interval
from remsh.master.progress import Progress, ProgressCallback
from remsh.master.tree import MAX_FETCH_DEPTH, fetched_modes
from remsh.conversation import PathArg as Path
from remsh.protocol.trees import Alive, Announced, Failed, FetchTreeCall, Record, Stop
from remsh.treewriter import Writer, make_temp_dir, place_dir
from remsh.wire import Box

__all__ = ["fetch_tree"]


class TreeHost(Protocol):
    """What the tree bodies need of a slave (:class:`~remsh.aio.slave.AsyncSlave` is one)."""

    name: str
    conn: Connection
    io_timeout: float

    async def run_conversation(self, meth: str, call: Any, body: Awaitable[Any]) -> Any: ...

    async def read_reply(self, meth: str) -> Box: ...

    def remote_error(self, meth: str, event: Failed) -> RemoteError: ...

    def protocol_error(self, meth: str, message: str) -> ProtocolError: ...


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


def _local_parent(name: str, meth: str, path: Path) -> Tuple[int, bytes]:
    """A descriptor of the local directory that will hold ``path``, and its
    last component; ``path`` must not exist."""
    p = os.fsencode(path).rstrip(b"/")
    head, _, last = p.rpartition(b"/")
    if last in (b"", b".", b".."):
        raise UsageError(f"{name}: {meth}: the destination must end in a name: {os.fsdecode(path)}")
    if not head and p.startswith(b"/"):
        head = b"/"
    if os.path.lexists(p):
        raise LocalError(f"{name}: {meth}: local destination exists: {os.fsdecode(p)}")
    try:
        return os.open(head or b".", os.O_RDONLY | O_DIRECTORY | O_CLOEXEC), last
    except OSError as e:
        raise LocalError(f"{name}: {meth}: cannot open the local destination's directory: {e}") from e


async def fetch_tree(slave: TreeHost, src: Path, dest_dir: Path, progress: Optional[ProgressCallback],
                     max_bytes: Optional[int], max_entries: Optional[int]) -> None:
    """See :meth:`remsh.aio.slave.AsyncSlave.fetch_tree`."""
    meth = "fetch_tree"
    parent, name = _local_parent(slave.name, meth, dest_dir)
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
