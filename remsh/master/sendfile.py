"""The body of :meth:`remsh.master.slave.Slave.send` (one file from the
master to the slave), kept apart so that the slave's module stays short.

The conversation is :class:`remsh.protocol.transfer.SendCall`'s; this module
puts it on a thread: the data boxes are framed and hashed by
:func:`remsh.bulk.send_blocks` (the same ``{data: ...}`` boxes
:meth:`SendCall.data <remsh.protocol.transfer.SendCall.data>` makes, read in
place into pre-framed buffers)."""

from __future__ import annotations

from typing import IO, BinaryIO, Optional, Union

from remsh.bulk import OverlongRead, reader_for, send_blocks
from remsh.errors import LocalError, UsageError
from remsh.master.operation import OperationFrame, OperationHost, Path
from remsh.master.progress import Progress, ProgressCallback
from remsh.protocol.transfer import Failed, SendCall
from remsh.sendsource import send_source

def send(slave: OperationHost, src: Union[Path, BinaryIO], dest: Path, mode: Optional[int],
         progress: Optional[ProgressCallback]) -> None:
    """See :meth:`remsh.master.slave.Slave.send`."""
    call = SendCall(dest, mode)
    with send_source(slave.name, src, progress is not None) as (f, total):
        with slave.operation("send") as op:
            op.send_bytes(call.request())
            event = call.receive(op.read())
            if isinstance(event, Failed):
                _raise(op, event)
            local_error = _send_data(op, call, f, Progress(progress, total))
            event = call.receive(op.read())
    # the slave's error for an aborted transfer only echoes the local cause
    if isinstance(local_error, OverlongRead):
        raise UsageError(f"{slave.name}: send: the source is not a file-like object: {local_error}")
    if local_error is not None:
        raise LocalError(f"{slave.name}: send: reading local file failed: {local_error}") from local_error
    if isinstance(event, Failed):
        _raise(op, event)


def _raise(op: OperationFrame, event: Failed) -> None:
    error = event.error
    raise type(error)(error.remote_message, slave=op.name, operation=op.meth, errtag=error.errtag)


def _send_data(op: OperationFrame, call: SendCall, f: IO[bytes], progress: Progress) -> Optional[OSError]:
    # file data read in place into pre-framed data boxes, hashed in a
    # helper thread while the next block is read and sent (remsh.bulk)
    digest, error = send_blocks(reader_for(f), op.send_bytes, progress.add, stream=op.stream, lend=op.lend)
    if error is not None:
        op.send_bytes(call.abort("master could not read the source"))
        return error
    op.send_bytes(call.finish(digest))
    progress.finish()
    return None
