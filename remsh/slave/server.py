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

import hashlib
import logging
import os
import shutil
import stat as stat_mod
import threading
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from remsh.errors import (Disconnected, FailedError, InvalidMethError, InvalidRequestError, NotFoundError,
                          OpenFailedError, ProtocolError, RemoteError, RemoteFileExistsError,
                          UnexpectedError)
from remsh.files import PartialFile
from remsh.ops import (DEFAULT_IO_TIMEOUT, OP_VERSION_BYTES, OPERATIONS, PROGRESS_INTERVAL,
                       PROGRESS_KEY, Operation, check_version, error_box, os_message)
from remsh.slave.execute import run_execute
from remsh.wire import DATA_BLOCK, END_OF_BOX, MAX_KEY_LENGTH, MAX_VALUE_LENGTH, Box, Wire, encode_data_boxes

log = logging.getLogger(__name__)

Handler = Callable[[Dict[str, Any]], Optional[Box]]


class SlaveServer:
    """Performs operations for one master over ``wire``, rooted at ``basedir``.

    The dispatch is built from :data:`remsh.ops.OPERATIONS`: every operation
    there has a handler ``op_<meth>`` here, taking the request's parsed
    arguments and returning the reply box (``None`` for the empty box);
    handlers of multi-box conversations send their own final box.  A handler
    fails by raising a :class:`~remsh.errors.RemoteError` subclass, which
    becomes the error box of that class's ``errtag``.
    """

    def __init__(self, wire: Wire, basedir: str, *, io_timeout: float = DEFAULT_IO_TIMEOUT,
                 progress_interval: float = PROGRESS_INTERVAL) -> None:
        self._devnull = -1
        self.wire = wire
        self.basedir = os.fsencode(os.path.abspath(basedir))
        self.cwd = self.basedir
        self.io_timeout = io_timeout
        self.progress_interval = progress_interval
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
                with self._progress():
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
    def _progress(self) -> Iterator[None]:
        """Send liveness boxes while the body runs (a long operation whose
        master asked for them), and none once it has returned."""
        if self._heartbeat is None:
            self._heartbeat = _Heartbeat(self.wire, self.progress_interval)
        self._heartbeat.arm()
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
        if cwd is None:
            new = self.basedir
        elif cwd == b"":
            new = self.cwd
        else:
            new = os.path.normpath(os.path.join(self.cwd, cwd))
        if not os.path.isdir(new):
            raise NotFoundError(f"no such directory: {os.fsdecode(new)}")
        self.cwd = new
        return {b"cwd": new}

    def op_getenv(self, args: Dict[str, Any]) -> Optional[Box]:
        reply: Box = {}
        for name, value in os.environb.items():
            key = b"env_" + name
            if len(key) <= MAX_KEY_LENGTH and len(value) <= MAX_VALUE_LENGTH:
                reply[key] = value
            else:
                log.warning("getenv: variable %r too long to report", name[:40])
        return reply

    def op_mkdir(self, args: Dict[str, Any]) -> Optional[Box]:
        try:
            os.makedirs(self._resolve(args["dir"]), exist_ok=True)
        except OSError as e:
            raise FailedError(os_message(e)) from None
        return None

    def op_unlink(self, args: Dict[str, Any]) -> Optional[Box]:
        path = self._resolve(args["file"])
        try:
            os.unlink(path)
        except FileNotFoundError:
            raise NotFoundError(f"no such file: {os.fsdecode(path)}") from None
        except OSError as e:
            raise FailedError(os_message(e)) from None
        return None

    def op_stat(self, args: Dict[str, Any]) -> Optional[Box]:
        try:
            st = os.stat(self._resolve(args["path"]))
        except (FileNotFoundError, NotADirectoryError):
            result = b""
        except OSError as e:
            raise FailedError(os_message(e)) from None
        else:
            result = b"d" if stat_mod.S_ISDIR(st.st_mode) else b"f"
        return {b"result": result}

    def op_remove(self, args: Dict[str, Any]) -> Optional[Box]:
        try:
            remove_tree(self._resolve(args["path"]))
        except OSError as e:
            raise FailedError(os_message(e)) from None
        return None

    def op_rename(self, args: Dict[str, Any]) -> Optional[Box]:
        src = self._resolve(args["src"])
        dest = self._resolve(args["dest"])
        if not os.path.lexists(src):
            raise NotFoundError(f"no such file or directory: {os.fsdecode(src)}")
        if os.path.lexists(dest):
            raise RemoteFileExistsError(f"destination exists: {os.fsdecode(dest)}")
        try:
            os.rename(src, dest)
        except OSError as e:
            raise FailedError(os_message(e)) from None
        return None

    def op_copy(self, args: Dict[str, Any]) -> Optional[Box]:
        src = self._resolve(args["src"])
        dest = self._resolve(args["dest"])
        if not os.path.lexists(src):
            raise NotFoundError(f"no such file: {os.fsdecode(src)}")
        if os.path.isdir(src):
            raise FailedError(f"source is a directory (copy is for files): {os.fsdecode(src)}")
        if os.path.lexists(dest):
            raise RemoteFileExistsError(f"destination exists: {os.fsdecode(dest)}")
        try:
            with open(src, "rb") as f:
                part = PartialFile(dest)
                try:
                    while True:
                        chunk = f.read(1 << 20)
                        if not chunk:
                            break
                        part.write(chunk)
                except BaseException:
                    part.discard()
                    raise
                part.commit()
        except FileExistsError:
            raise RemoteFileExistsError(f"destination exists: {os.fsdecode(dest)}") from None
        except OSError as e:
            raise FailedError(os_message(e)) from None
        return None

    def op_send(self, args: Dict[str, Any]) -> Optional[Box]:
        dest = self._resolve(args["dest"])
        if os.path.lexists(dest):
            raise RemoteFileExistsError(f"destination exists: {os.fsdecode(dest)}")
        try:
            part = PartialFile(dest, args["mode"])
        except OSError as e:
            raise OpenFailedError(os_message(e)) from None
        try:
            self._reply()  # go ahead
            digest = hashlib.sha256()
            failure: Optional[RemoteError] = None
            read_box = self.wire.read_box
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
                if failure is None:
                    digest.update(data)
                    try:
                        part.write(data)
                    except OSError as e:
                        failure = FailedError(os_message(e))
                        part.discard()
            if failure is not None:
                raise failure
            if b"abort" in end:
                reason = end[b"abort"].decode("utf-8", "replace")
                raise FailedError(f"master aborted the transfer: {reason}; file discarded")
            expected = end.get(b"sha256")
            if expected is not None and expected.lower() != digest.hexdigest().encode("ascii"):
                raise FailedError("data does not match the sha256 digest sent; file discarded")
            try:
                part.commit()
            except FileExistsError:
                raise RemoteFileExistsError(f"destination appeared meanwhile: {os.fsdecode(dest)}") from None
            except OSError as e:
                raise FailedError(os_message(e)) from None
        finally:
            part.discard()
        self._reply()
        return None

    def op_fetch(self, args: Dict[str, Any]) -> Optional[Box]:
        src = self._resolve(args["src"])
        try:
            f = open(src, "rb", buffering=0)
        except FileNotFoundError:
            raise NotFoundError(f"no such file: {os.fsdecode(src)}") from None
        except OSError as e:
            raise OpenFailedError(os_message(e)) from None
        with f:
            if stat_mod.S_ISDIR(os.fstat(f.fileno()).st_mode):
                raise OpenFailedError(f"is a directory: {os.fsdecode(src)}")
            digest = hashlib.sha256()
            send = self.wire.send_bytes
            while True:
                try:
                    block = f.read(DATA_BLOCK)
                except OSError as e:
                    raise FailedError(os_message(e)) from None
                if not block:
                    break
                digest.update(block)
                send(encode_data_boxes(b"data", block))
            send_end = {b"sha256": digest.hexdigest().encode("ascii")}
        self._reply(send_end)
        return None

    def op_execute(self, args: Dict[str, Any]) -> Optional[Box]:
        run_execute(self, args)
        return None


class _Heartbeat:
    """Sends ``{progress: y}`` every ``interval`` seconds while armed, from a
    thread of its own (started on first use, one per connection)."""

    def __init__(self, wire: Wire, interval: float) -> None:
        self.wire = wire
        self.interval = interval
        self._cond = threading.Condition()
        self._armed = False
        self._stopped = False
        self._generation = 0
        self._thread = threading.Thread(target=self._run, name="remsh-progress", daemon=True)
        self._thread.start()

    def arm(self) -> None:
        with self._cond:
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


def remove_tree(path: bytes) -> None:
    """``rm -rf``: remove a file or tree, making directories writable where
    needed; a missing path is fine."""
    if not os.path.lexists(path):
        return
    if os.path.isdir(path) and not os.path.islink(path):

        def fix(func: Callable, p: bytes, exc_info: object) -> None:
            parent = os.path.dirname(p)
            try:
                os.chmod(parent, stat_mod.S_IRWXU)
                if os.path.isdir(p) and not os.path.islink(p):
                    os.chmod(p, stat_mod.S_IRWXU)
                    shutil.rmtree(p, onerror=fix)
                else:
                    func(p)
            except FileNotFoundError:
                pass

        try:
            os.chmod(path, stat_mod.S_IRWXU | (os.stat(path).st_mode & 0o777))
        except OSError:
            pass
        shutil.rmtree(path, onerror=fix)
    else:
        try:
            os.unlink(path)
        except PermissionError:
            os.chmod(os.path.dirname(path) or b".", stat_mod.S_IRWXU)
            os.unlink(path)
