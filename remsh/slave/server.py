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
from typing import Callable, Dict, Optional

from remsh.errors import Disconnected, ProtocolError
from remsh.files import PartialFile
from remsh.wire import (DATA_BLOCK, END_OF_BOX, MAX_KEY_LENGTH, MAX_VALUE_LENGTH, Box, Wire, decode_int,
                        encode_data_boxes)

log = logging.getLogger(__name__)

OP_VERSION = 1
_OP_VERSION_B = b"1"
#: Bound on the wait for each box inside a multi-box operation (send data).
DEFAULT_IO_TIMEOUT = 120.0


class OpError(Exception):
    """An operation failure to be sent as an error box."""

    def __init__(self, errtag: str, message: str) -> None:
        super().__init__(message)
        self.errtag = errtag
        self.message = message


def _os_message(e: OSError) -> str:
    parts = [e.strerror or str(e)]
    if e.filename is not None:
        fn = e.filename
        parts.append(os.fsdecode(fn) if isinstance(fn, bytes) else str(fn))
    return ": ".join(parts)


def error_box(errtag: str, message: str) -> Box:
    """The error box for a tag and message (message cut to fit a value)."""
    data = message.encode("utf-8", "replace")[:MAX_VALUE_LENGTH]
    return {b"error": data, b"errtag": errtag.encode("ascii")}


class SlaveServer:
    """Performs operations for one master over ``wire``, rooted at ``basedir``."""

    def __init__(self, wire: Wire, basedir: str, *, io_timeout: float = DEFAULT_IO_TIMEOUT) -> None:
        self._devnull = -1
        self.wire = wire
        self.basedir = os.fsencode(os.path.abspath(basedir))
        self.cwd = self.basedir
        self.io_timeout = io_timeout
        self._ops: Dict[bytes, Callable[[Box], None]] = {
            b"set_cwd": self.op_set_cwd,
            b"getenv": self.op_getenv,
            b"mkdir": self.op_mkdir,
            b"unlink": self.op_unlink,
            b"execute": self.op_execute,
            b"send": self.op_send,
            b"fetch": self.op_fetch,
            b"remove": self.op_remove,
            b"rename": self.op_rename,
            b"copy": self.op_copy,
            b"stat": self.op_stat,
            b"ping": self.op_ping,
        }

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
        if meth is None:
            if b"interrupt" in box or b"stream" in box:
                log.debug("discarding late execute-control box")
                return
            self._send_error("invalid", "request has no 'meth' key")
            return
        op = self._ops.get(meth)
        if op is None:
            self._send_error("invalid-meth", f"no such operation: {meth[:64]!r}")
            return
        if box.get(b"version") != _OP_VERSION_B and not self._version_ok(meth, box):
            return
        try:
            op(box)
        except OpError as e:
            self._send_error(e.errtag, e.message)
        except (Disconnected, ProtocolError):
            raise
        except Exception:  # noqa: BLE001 - reported to the master without internals
            log.exception("unexpected failure in %s", meth.decode("ascii", "replace"))
            self._send_error("unexpected", "unexpected error on the slave (details in its log)")

    def _version_ok(self, meth: bytes, box: Box) -> bool:
        """Answer a request whose version is not this slave's; False if refused."""
        try:
            version = decode_int(box.get(b"version", b""))
        except ValueError:
            self._send_error("invalid", "request has no valid 'version' key")
            return False
        if version > OP_VERSION:
            self._send_error("version-too-new", f"{meth.decode('ascii', 'replace')} version {version}"
                             f" is newer than this slave's ({OP_VERSION})")
            return False
        if version < OP_VERSION:
            self._send_error("version-unsupported", f"version {version} is no longer supported")
            return False
        return True  # the same version, spelt differently (e.g. "01")

    def _send_error(self, errtag: str, message: str) -> None:
        self.wire.send_box(error_box(errtag, message))

    def _reply(self, box: Optional[Box] = None) -> None:
        if box:
            self.wire.send_box(box)
        else:
            self.wire.send_bytes(END_OF_BOX)  # the empty box

    # -- helpers -----------------------------------------------------------

    @staticmethod
    def _need(box: Box, key: bytes) -> bytes:
        try:
            return box[key]
        except KeyError:
            raise OpError("invalid", f"missing key {key.decode('ascii')!r}") from None

    def _path(self, box: Box, key: bytes) -> bytes:
        value = self._need(box, key)
        if not value or b"\0" in value:
            raise OpError("invalid", f"{key.decode('ascii')!r} must be a non-empty path without NUL")
        return os.path.join(self.cwd, value)

    # -- operations --------------------------------------------------------

    def op_ping(self, box: Box) -> None:
        self._reply()

    def op_set_cwd(self, box: Box) -> None:
        cwd = box.get(b"cwd")
        if cwd is None:
            new = self.basedir
        elif cwd == b"":
            new = self.cwd
        else:
            if b"\0" in cwd:
                raise OpError("invalid", "'cwd' contains a NUL byte")
            new = os.path.normpath(os.path.join(self.cwd, cwd))
        if not os.path.isdir(new):
            raise OpError("notfound", f"no such directory: {os.fsdecode(new)}")
        self.cwd = new
        self._reply({b"cwd": new})

    def op_getenv(self, box: Box) -> None:
        reply: Box = {}
        for name, value in os.environb.items():
            key = b"env_" + name
            if len(key) <= MAX_KEY_LENGTH and len(value) <= MAX_VALUE_LENGTH:
                reply[key] = value
            else:
                log.warning("getenv: variable %r too long to report", name[:40])
        self._reply(reply)

    def op_mkdir(self, box: Box) -> None:
        path = self._path(box, b"dir")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise OpError("failed", _os_message(e)) from None
        self._reply()

    def op_unlink(self, box: Box) -> None:
        path = self._path(box, b"file")
        try:
            os.unlink(path)
        except FileNotFoundError:
            raise OpError("notfound", f"no such file: {os.fsdecode(path)}") from None
        except OSError as e:
            raise OpError("failed", _os_message(e)) from None
        self._reply()

    def op_stat(self, box: Box) -> None:
        path = self._path(box, b"path")
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            result = b""
        except OSError as e:
            raise OpError("failed", _os_message(e)) from None
        else:
            result = b"d" if stat_mod.S_ISDIR(st.st_mode) else b"f"
        self._reply({b"result": result})

    def op_remove(self, box: Box) -> None:
        path = self._path(box, b"path")
        try:
            remove_tree(path)
        except OSError as e:
            raise OpError("failed", _os_message(e)) from None
        self._reply()

    def op_rename(self, box: Box) -> None:
        src = self._path(box, b"src")
        dest = self._path(box, b"dest")
        if not os.path.lexists(src):
            raise OpError("notfound", f"no such file or directory: {os.fsdecode(src)}")
        if os.path.lexists(dest):
            raise OpError("fileexists", f"destination exists: {os.fsdecode(dest)}")
        try:
            os.rename(src, dest)
        except OSError as e:
            raise OpError("failed", _os_message(e)) from None
        self._reply()

    def op_copy(self, box: Box) -> None:
        src = self._path(box, b"src")
        dest = self._path(box, b"dest")
        if not os.path.lexists(src):
            raise OpError("notfound", f"no such file: {os.fsdecode(src)}")
        if os.path.isdir(src):
            raise OpError("failed", f"source is a directory (copy is for files): {os.fsdecode(src)}")
        if os.path.lexists(dest):
            raise OpError("fileexists", f"destination exists: {os.fsdecode(dest)}")
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
            raise OpError("fileexists", f"destination exists: {os.fsdecode(dest)}") from None
        except OSError as e:
            raise OpError("failed", _os_message(e)) from None
        self._reply()

    def op_send(self, box: Box) -> None:
        dest = self._path(box, b"dest")
        mode = None
        if b"mode" in box:
            try:
                mode = decode_int(box[b"mode"])
            except ValueError:
                raise OpError("invalid", "'mode' must be a decimal integer") from None
            if not 0 <= mode <= 0o7777:
                raise OpError("invalid", f"'mode' out of range: {mode}")
        if os.path.lexists(dest):
            raise OpError("fileexists", f"destination exists: {os.fsdecode(dest)}")
        try:
            part = PartialFile(dest, mode)
        except OSError as e:
            raise OpError("openfailed", _os_message(e)) from None
        try:
            self._reply()  # go ahead
            digest = hashlib.sha256()
            failure: Optional[OpError] = None
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
                        failure = OpError("failed", _os_message(e))
                        part.discard()
            if failure is not None:
                raise failure
            if b"abort" in end:
                reason = end[b"abort"].decode("utf-8", "replace")
                raise OpError("failed", f"master aborted the transfer: {reason}; file discarded")
            expected = end.get(b"sha256")
            if expected is not None and expected.lower() != digest.hexdigest().encode("ascii"):
                raise OpError("failed", "data does not match the sha256 digest sent; file discarded")
            try:
                part.commit()
            except FileExistsError:
                raise OpError("fileexists", f"destination appeared meanwhile: {os.fsdecode(dest)}") from None
            except OSError as e:
                raise OpError("failed", _os_message(e)) from None
        finally:
            part.discard()
        self._reply()

    def op_fetch(self, box: Box) -> None:
        src = self._path(box, b"src")
        try:
            f = open(src, "rb", buffering=0)
        except FileNotFoundError:
            raise OpError("notfound", f"no such file: {os.fsdecode(src)}") from None
        except OSError as e:
            raise OpError("openfailed", _os_message(e)) from None
        with f:
            if stat_mod.S_ISDIR(os.fstat(f.fileno()).st_mode):
                raise OpError("openfailed", f"is a directory: {os.fsdecode(src)}")
            digest = hashlib.sha256()
            send = self.wire.send_bytes
            while True:
                try:
                    block = f.read(DATA_BLOCK)
                except OSError as e:
                    raise OpError("failed", _os_message(e)) from None
                if not block:
                    break
                digest.update(block)
                send(encode_data_boxes(b"data", block))
            send_end = {b"sha256": digest.hexdigest().encode("ascii")}
        self._reply(send_end)

    def op_execute(self, box: Box) -> None:
        from remsh.slave.execute import run_execute

        run_execute(self, box)


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
