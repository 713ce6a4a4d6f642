"""The body of :meth:`remsh.master.slave.Slave.fetch` (one file from the
slave to the master), kept apart so that the slave's module stays short.

The conversation is :class:`remsh.protocol.transfer.FetchCall`'s; this
module puts it on a thread, with the data hashed and written by a
:class:`remsh.bulk.Sink`."""

from __future__ import annotations

import os
from typing import BinaryIO, Optional, Union

from remsh.bulk import Sink, writer_for_fd
from remsh.errors import Disconnected, LimitExceeded, LocalError, ProtocolError
from remsh.master.operation import OperationHost, Path
from remsh.master.progress import Progress, ProgressCallback
from remsh.master.tree import DRAIN_LIMIT
from remsh.sendsource import fetch_target, place_fetched
from remsh.protocol.transfer import Data, Failed, FetchCall, Finished, Stop


def fetch(slave: OperationHost, src: Path, dest: Union[Path, BinaryIO], max_bytes: Optional[int],
          progress: Optional[ProgressCallback]) -> None:
    """See :meth:`remsh.master.slave.Slave.fetch`."""
    out, part = fetch_target(slave.name, dest)
    counter = Progress(progress, None)
    call = FetchCall(src, max_bytes, drain_limit=DRAIN_LIMIT)
    # hashed and written in a helper thread while the next boxes arrive
    # (remsh.bulk); a caller's file object is written from this thread
    sink: Optional[Sink] = None
    try:
        with slave.operation("fetch") as op:
            sink = Sink(writer_for_fd(part.fd), stream=op.stream) if part is not None else \
                Sink(lambda batch: [out.write(d) for d in batch], threaded=False)
            op.send_bytes(call.request())
            read_box = op.read_box
            receive = call.receive
            add = sink.add
            while True:
                box = read_box(op.io_timeout)
                if box is None:
                    raise Disconnected("slave closed the connection during fetch")
                event = receive(box)
                if type(event) is Data:
                    add(event.data)
                    counter.add(len(event.data))
                elif type(event) is Stop:
                    # stop the slave; what is already on its way is read and dropped
                    op.send_bytes(event.send)
                elif event is not None:
                    break
            digest = sink.finish()
        if not isinstance(event, (Finished, Failed)):  # stopped: whatever the final box said, ours is the cause
            raise LimitExceeded(f"{slave.name}: fetch: {os.fsdecode(src)} passed max_bytes ({max_bytes}); "
                                f"the transfer was stopped and nothing was kept")
        if isinstance(event, Failed):
            error = event.error
            raise type(error)(error.remote_message, slave=op.name, operation=op.meth, errtag=error.errtag)
        assert sink is not None
        local_error = sink.error
        if local_error is not None:
            if not isinstance(local_error, OSError):
                raise local_error
            raise LocalError(f"{slave.name}: fetch: writing local file failed: {local_error}") from local_error
        try:
            call.check_digest(digest)
        except ProtocolError as e:
            raise op.protocol_error(str(e)) from None
        if part is not None:
            place_fetched(slave.name, part)
        counter.finish()
    finally:
        if sink is not None:
            sink.close()
        if part is not None:
            part.discard()
