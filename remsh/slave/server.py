"""The slave's operation server: reads request boxes, performs them, answers.

One connection, one operation at a time: every request gets exactly one final
box (a reply or an error box) and the server then reads the next request.
Failures of the operation become error boxes; failures of the connection
(``Disconnected``, ``ProtocolError``) end :meth:`SlaveServer.serve`.

Between operations the master may still have execute-control boxes in flight
(a late ``interrupt`` or ``stdin`` data racing with the command's end); they
carry no ``meth`` and are discarded, so they can never be taken for a request.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, Union

from remsh.bulk import Sink, lender, reader_for, send_blocks, writer_for_fd
from remsh.errors import (Disconnected, FailedError, InvalidMethError, InvalidRequestError, ProtocolError,
                          RemoteError, RemoteFileExistsError, UnexpectedError)
from remsh.ops import (DEFAULT_IO_TIMEOUT, OP_VERSION_BYTES, OPERATIONS, MIN_PROGRESS_INTERVAL,
                       PROGRESS_KEY, Operation, check_version, error_box, os_message)
from remsh.session import SessionWire
from remsh.slave import fsops, tree
from remsh.slave.execute import run_execute
from remsh.slave.policy import PLAIN, Policy
from remsh.slave.request import Request
from remsh.slave.watch import InterruptWatch
from remsh.wire import (DEFAULT_MAX_BOX_BYTES, DEFAULT_MAX_KEYS, END_OF_BOX, MAX_KEY_LENGTH,
                        MAX_VALUE_LENGTH, Box, Wire)

log = logging.getLogger(__name__)

Handler = Callable[[Dict[str, Any]], Optional[Box]]


class SlaveServer:
    """Performs operations for one master over ``wire``, rooted at ``basedir``.

    The dispatch is built from :data:`remsh.ops.OPERATIONS`: every operation
    there has a handler ``op_<meth>`` here, taking the request's parsed
    arguments and returning the reply box (``None`` for the empty box);
    handlers of multi-box conversations send their own final box.  A handler
    fails by raising a :class:`~remsh.errors.RemoteError` subclass, which
    becomes the error box of that class's ``errtag``.  Every path goes
    through :mod:`remsh.slave.fsops` and the slave's ``policy``.
    """

    def __init__(self, wire: Union[Wire, SessionWire], basedir: str, *, io_timeout: float = DEFAULT_IO_TIMEOUT,
                 progress_interval: float = MIN_PROGRESS_INTERVAL, policy: Policy = PLAIN) -> None:
        self._devnull = -1
        self.wire = wire
        #: what this slave refuses to do (see :mod:`remsh.slave.policy`)
        self.policy = policy
        self.basedir = os.fsencode(os.path.abspath(basedir))
        self.cwd = self.basedir
        self.io_timeout = io_timeout
        self._heartbeat: Optional[_Heartbeat] = None
        self._ops: Dict[bytes, Tuple[Operation, Handler]] = {
            op.wire: (op, getattr(self, "op_" + op.meth)) for op in OPERATIONS.values()}

    def devnull(self) -> int:
        """A descriptor of ``/dev/null`` for commands' unwanted streams
        (opened once, not for every command)."""
        if self._devnull < 0:
            self._devnull = os.open(os.devnull, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        return self._devnull

    def close(self) -> None:
        """Release what the server holds (not the wire)."""
        if self._devnull >= 0:
            os.close(self._devnull)
            self._devnull = -1
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None

    # -- the loop ----------------------------------------------------------

    def serve(self) -> None:
        """Serve requests until the master closes the connection cleanly.

        Raises ``Disconnected`` or ``ProtocolError`` when the connection fails.
        """
        try:
            while True:
                box = self.wire.read_box(None)
                if box is None:
                    log.info("%s: master closed the connection", self.wire.label)
                    return
                self.handle(box)
        finally:
            self.close()

    def handle(self, box: Box) -> None:
        """Perform one request box and send its final box."""
        meth = box.get(b"meth")
        try:
            if meth is None:
                if b"interrupt" in box or b"stream" in box:
                    log.debug("discarding late execute-control box")
                    return
                raise InvalidRequestError("request has no 'meth' key")
            entry = self._ops.get(meth)
            if entry is None:
                raise InvalidMethError(f"no such operation: {meth[:64]!r}")
            op, handler = entry
            version = box.get(b"version")
            if version != OP_VERSION_BYTES:
                check_version(op.meth, version)
            args = op.parse(box)
            if op.long and args.get("progress"):
                with self._progress(max(MIN_PROGRESS_INTERVAL, args["progress"])):
                    reply = handler(args)
            else:
                reply = handler(args)
            if not op.conversation:
                self._reply(reply)
        except RemoteError as e:
            self.wire.send_box(error_box(e))
        except (Disconnected, ProtocolError):
            raise
        except Exception:  # noqa: BLE001 - reported to the master without internals
            log.exception("unexpected failure in %s", (meth or b"?").decode("ascii", "replace"))
            self.wire.send_box(error_box(UnexpectedError("unexpected error on the slave (details in its log)")))

    def _reply(self, box: Optional[Box] = None) -> None:
        if box:
            self.wire.send_box(box)
        else:
            self.wire.send_bytes(END_OF_BOX)  # the empty box

    @contextmanager
    def _progress(self, interval: float) -> Iterator[None]:
        """Send liveness boxes every ``interval`` seconds while the body runs
        (a long operation whose master asked for them), and none once it has
        returned."""
        if self._heartbeat is None:
            self._heartbeat = _Heartbeat(self.wire)
        self._heartbeat.arm(interval)
        try:
            yield
        finally:
            self._heartbeat.disarm()

    # -- helpers -----------------------------------------------------------

    def _resolve(self, path: bytes) -> bytes:
        return os.path.join(self.cwd, path)

    # -- operations --------------------------------------------------------

    def op_ping(self, args: Dict[str, Any]) -> Optional[Box]:
        return None

    def op_set_cwd(self, args: Dict[str, Any]) -> Optional[Box]:
        cwd = args["cwd"]
        if cwd == b"":
            new = self.cwd
        else:
            new = self.policy.check_cwd(self.basedir if cwd is None else os.path.join(self.cwd, cwd))
        self.cwd = new
        return {b"cwd": new}

    def op_getenv(self, args: Dict[str, Any]) -> Optional[Box]:
        self.policy.check_getenv()
        reply: Box = {}
        size = 2
        for name, value in os.environb.items():
            key = b"env_" + name
            if len(key) <= MAX_KEY_LENGTH and len(value) <= MAX_VALUE_LENGTH:
                reply[key] = value
                size += 4 + len(key) + len(value)
            else:
                log.warning("getenv: variable %r too long to report", name[:40])
        if len(reply) > DEFAULT_MAX_KEYS or size > DEFAULT_MAX_BOX_BYTES:
            # past the receiver's default limits the master would drop us
            raise FailedError(f"the environment ({len(reply)} variables, {size} bytes) is larger "
                              f"than one box may be")
        return reply

    def op_mkdir(self, args: Dict[str, Any]) -> Optional[Box]:
        fsops.make_dirs(self._resolve(args["dir"]), self.policy)
        return None

    def op_unlink(self, args: Dict[str, Any]) -> Optional[Box]:
        fsops.unlink_file(self._resolve(args["file"]), self.policy)
        return None

    def op_stat(self, args: Dict[str, Any]) -> Optional[Box]:
        return {b"result": fsops.stat_kind(self._resolve(args["path"]), self.policy)}

    def op_remove(self, args: Dict[str, Any]) -> Optional[Box]:
        fsops.remove_tree(self._resolve(args["path"]), self.policy)
        return None

    def op_rename(self, args: Dict[str, Any]) -> Optional[Box]:
        fsops.rename_noreplace(self._resolve(args["src"]), self._resolve(args["dest"]), self.policy)
        return None

    def op_chmod(self, args: Dict[str, Any]) -> Optional[Box]:
        fsops.chmod(self._resolve(args["path"]), args["mode"], self.policy)
        return None

    def op_copy(self, args: Dict[str, Any]) -> Optional[Box]:
        fsops.copy_file(self._resolve(args["src"]), self._resolve(args["dest"]), policy=self.policy)
        return None

    def op_send(self, args: Dict[str, Any]) -> Optional[Box]:
        dest = self._resolve(args["dest"])
        part = fsops.create_partial(dest, args["mode"], self.policy)
        # hashed and written in a helper thread while the next boxes arrive (remsh.bulk)
        sink = Sink(writer_for_fd(part.fd), stream=self.wire.stream)
        try:
            self._reply()  # go ahead
            read_box = self.wire.read_box
            add = sink.add
            while True:
                data_box = read_box(self.io_timeout)
                if data_box is None:
                    raise Disconnected(f"{self.wire.label}: connection closed during send")
                if b"stream" in data_box or b"interrupt" in data_box:
                    continue  # a late execute-control box: not file data
                data = data_box.get(b"data")
                if data is None:
                    end = data_box
                    break
                add(data)
            digest = sink.finish()
            if sink.error is not None:
                if isinstance(sink.error, OSError):
                    raise FailedError(os_message(sink.error))
                raise sink.error
            if b"abort" in end:
                reason = end[b"abort"].decode("utf-8", "replace")
                raise FailedError(f"master aborted the transfer: {reason}; file discarded")
            expected = end.get(b"sha256")
            if expected is not None and expected.lower() != digest.encode("ascii"):
                raise FailedError("data does not match the sha256 digest sent; file discarded")
            try:
                part.commit()
            except FileExistsError:
                raise RemoteFileExistsError(f"destination appeared meanwhile: {os.fsdecode(dest)}") from None
            except OSError as e:
                raise FailedError(os_message(e)) from None
        finally:
            sink.close()
            part.discard()
        self._reply()
        return None

    def op_fetch(self, args: Dict[str, Any]) -> Optional[Box]:
        f = fsops.open_regular(self._resolve(args["src"]), self.policy)
        with f:
            # read in place into pre-framed data boxes, hashed in a helper
            # thread while the next block is read and sent (remsh.bulk);
            # the master may stop it with {interrupt: y} (its max_bytes)
            fill, stop = reader_for(f), InterruptWatch(self.wire)
            digest, error = send_blocks(lambda block: 0 if stop() else fill(block), self.wire.send_bytes,
                                        stream=self.wire.stream, lend=lender(self.wire))
            if stop.seen:
                raise FailedError("stopped at the master's request")
            if error is not None:
                raise FailedError(os_message(error)) from None
            send_end = {b"sha256": digest.encode("ascii")}
        self._reply(send_end)
        return None

    def request(self) -> Request:
        """What a handler of a longer conversation gets of this server."""
        return Request(self.wire, self.cwd, self.policy, self.io_timeout, self.devnull)

    def op_execute(self, args: Dict[str, Any]) -> Optional[Box]:
        run_execute(self.request(), args)
        return None

    def op_send_tree(self, args: Dict[str, Any]) -> Optional[Box]:
        tree.receive_tree(self.request(), args)
        return None

    def op_fetch_tree(self, args: Dict[str, Any]) -> Optional[Box]:
        tree.send_tree_to_master(self.request(), args)
        return None

    def op_sync_tree(self, args: Dict[str, Any]) -> Optional[Box]:
        tree.sync_tree(self.request(), args)
        return None


class _Heartbeat:
    """Sends ``{progress: y}`` every ``interval`` seconds while armed, from a
    thread of its own (started on first use, one per connection)."""

    def __init__(self, wire: Union[Wire, SessionWire]) -> None:
        self.wire = wire
        self.interval = 1.0
        self._cond = threading.Condition()
        self._armed = False
        self._stopped = False
        self._generation = 0
        self._thread = threading.Thread(target=self._run, name="remsh-progress", daemon=True)
        self._thread.start()

    def arm(self, interval: float) -> None:
        with self._cond:
            self.interval = interval
            self._armed = True
            self._generation += 1
            self._cond.notify()

    def disarm(self) -> None:
        """Stop sending; once this returns, no liveness box goes out (a box
        being sent is finished first, under the same lock)."""
        with self._cond:
            self._armed = False
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._armed = False
            self._cond.notify()

    def _run(self) -> None:
        box = {PROGRESS_KEY: b"y"}
        with self._cond:
            while not self._stopped:
                if not self._armed:
                    self._cond.wait()
                    continue
                generation = self._generation
                self._cond.wait(self.interval)
                if self._armed and not self._stopped and generation == self._generation:
                    try:
                        self.wire.send_box(box)
                    except Exception:  # noqa: BLE001 - the operation's own I/O reports it
                        self._armed = False

