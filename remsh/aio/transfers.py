"""The bodies of :meth:`AsyncSlave.send <remsh.aio.slave.AsyncSlave.send>`
and :meth:`AsyncSlave.fetch <remsh.aio.slave.AsyncSlave.fetch>`: the
protocol layer's :class:`~remsh.protocol.transfer.SendCall` and
:class:`~remsh.protocol.transfer.FetchCall` driven over asyncio.

Local files are read, written and hashed in the event loop, one block
(:data:`~remsh.wire.DATA_BLOCK`, 1 MiB) at a time between waits for the
peer.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any, Awaitable, BinaryIO, Optional, Protocol, Union

from remsh.errors import Disconnected, LimitExceeded, LocalError, ProtocolError, UsageError
from remsh.master.progress import Progress, ProgressCallback
from remsh.protocol.transfer import Data, Failed, FetchCall, Finished, SendCall, Stop
from remsh.sendsource import fetch_target, place_fetched, send_source
from remsh.aio.connection import Channel
from remsh.conversation import PathArg as Path
from remsh.errors import RemoteError
from remsh.wire import DATA_BLOCK, Box


class TransferHost(Protocol):
    """What the transfer bodies need of a slave
    (:class:`~remsh.aio.slave.AsyncSlave` is one)."""

    name: str
    conn: Channel
    io_timeout: float

    async def run_conversation(self, meth: str, call: Any, body: Awaitable[Any]) -> Any: ...

    async def read_reply(self, meth: str) -> Box: ...

    def remote_error(self, meth: str, event: Failed) -> RemoteError: ...

    def protocol_error(self, meth: str, message: str) -> ProtocolError: ...


async def send(slave: TransferHost, src: Union[Path, BinaryIO], dest: Path, mode: Optional[int],
               progress: Optional[ProgressCallback]) -> None:
    """See :meth:`remsh.aio.slave.AsyncSlave.send`."""
    call = SendCall(dest, mode)
    with send_source(slave.name, src, progress is not None) as (f, total):
        counter = Progress(progress, total)
        conn = slave.conn

        async def body() -> Any:
            await conn.send(call.request(), slave.io_timeout)
            event = call.receive(await slave.read_reply("send"))
            if isinstance(event, Failed):
                raise slave.remote_error("send", event)
            digest = hashlib.sha256()
            local_error: Optional[BaseException] = None
            while True:
                try:
                    block = f.read(DATA_BLOCK)
                except OSError as e:
                    local_error = e
                    break
                if not block:
                    break
                if len(block) > DATA_BLOCK:
                    local_error = UsageError(f"{slave.name}: send: the source is not a file-like object: "
                                             f"{f!r} returned {len(block)} bytes when asked for at most "
                                             f"{DATA_BLOCK}")
                    break
                digest.update(block)
                await conn.send(call.data(block), slave.io_timeout)
                counter.add(len(block))
                # a write the kernel takes at once does not wait: let the
                # loop's other tasks run between blocks all the same
                await asyncio.sleep(0)
            if local_error is not None:
                await conn.send(call.abort("master could not read the source"), slave.io_timeout)
            else:
                await conn.send(call.finish(digest.hexdigest()), slave.io_timeout)
            return local_error, call.receive(await slave.read_reply("send"))

        local_error, event = await slave.run_conversation("send", call, body())
        # the slave's error for an aborted transfer only echoes the local cause
        if isinstance(local_error, UsageError):
            raise local_error
        if local_error is not None:
            raise LocalError(f"{slave.name}: send: reading local file failed: {local_error}") from local_error
        if isinstance(event, Failed):
            raise slave.remote_error("send", event)
        counter.finish()


async def fetch(slave: TransferHost, src: Path, dest: Union[Path, BinaryIO], max_bytes: Optional[int],
                progress: Optional[ProgressCallback]) -> None:
    """See :meth:`remsh.aio.slave.AsyncSlave.fetch`."""
    out, part = fetch_target(slave.name, dest)
    call = FetchCall(src, max_bytes)
    counter = Progress(progress, None)
    conn = slave.conn
    digest = hashlib.sha256()
    write_error: Optional[BaseException] = None

    def write(data: bytes) -> None:
        nonlocal write_error
        if write_error is not None:
            return
        try:
            out.write(data)
        except Exception as e:  # noqa: BLE001 - reported once the conversation is over
            write_error = e

    async def body() -> Any:
        await conn.send(call.request(), slave.io_timeout)
        while True:
            box = await conn.read_box(slave.io_timeout)
            if box is None:
                raise Disconnected("slave closed the connection during fetch")
            event = call.receive(box)
            if type(event) is Data:
                digest.update(event.data)
                write(event.data)
                counter.add(len(event.data))
            elif type(event) is Stop:
                await conn.send(event.send, slave.io_timeout)
            elif event is not None:
                return event

    try:
        event = await slave.run_conversation("fetch", call, body())
        if not isinstance(event, (Finished, Failed)):
            raise LimitExceeded(f"{slave.name}: fetch: {os.fsdecode(src)} passed max_bytes ({max_bytes}); "
                                f"the transfer was stopped and nothing was kept")
        if isinstance(event, Failed):
            raise slave.remote_error("fetch", event)
        if write_error is not None:
            if not isinstance(write_error, OSError):
                raise write_error
            raise LocalError(f"{slave.name}: fetch: writing local file failed: {write_error}") from write_error
        try:
            call.check_digest(digest.hexdigest())
        except ProtocolError as e:
            raise slave.protocol_error("fetch", str(e)) from None
        if part is not None:
            place_fetched(slave.name, part)
        counter.finish()
    finally:
        if part is not None:
            part.discard()
