"""The master's handle on one connected slave: :class:`Slave`.

Every method performs one operation (SPEC section 5) and blocks until the
slave's final box.  Methods may be called from any thread; calls on one slave
run one at a time, in the order they were made (a FIFO lock).  The calling
thread does the I/O itself, so a round trip costs no thread hand-off.

After the connection breaks (or the peer breaks the protocol) the slave is
*disconnected*: the wire is closed, ``on_disconnect`` callbacks run once, and
every later call raises :class:`~remsh.errors.Disconnected` at once.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import math
import os
import threading
from typing import (IO, TYPE_CHECKING, Any, BinaryIO, Callable, Dict, Iterator, List, Mapping,
                    Optional, Sequence, Union)
from contextlib import contextmanager

from remsh.errors import (Disconnected, PeerTimeout, ProtocolError, RemoteError, RemshError,
                          UsageError, remote_error)
from remsh.files import PartialFile
from remsh.master.fairlock import FairLock
from remsh.wire import (DATA_BLOCK, MAX_KEY_LENGTH, MAX_VALUE_LENGTH, Box, Wire, decode_int,
                        encode_bool, encode_box, encode_data_boxes, encode_int, encode_list)

if TYPE_CHECKING:
    from remsh.master.slavelistener.base import SlaveListener

log = logging.getLogger(__name__)

Path = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]
OutputCallback = Callable[[bytes], Any]

OP_VERSION = b"1"
#: Default bound (seconds) on each wait for a box from the slave, except for
#: the output of a running command (bounded by its own ``timeout``).
DEFAULT_IO_TIMEOUT = 120.0
#: How long :meth:`Slave.interrupt` waits for the connection before giving up
#: on a polite interrupt and dropping the connection.
INTERRUPT_SEND_TIMEOUT = 5.0
CHUNK = MAX_VALUE_LENGTH
_INLINE_STDIN = 64 * 1024


def _b(path: Path) -> bytes:
    """A path or argument as bytes, without losing undecodable bytes."""
    return os.fsencode(path)


class Slave:
    """A connected slave.

    :ivar name: the name the slave registered with
    :ivar info: the descriptive keys of its ``register`` box (str -> str):
        ``hostname``, ``platform``, ``python``, ``basedir``, ``remsh``
    :ivar listener: the listener that connected it (or ``None``)
    """

    def __init__(self, wire: Wire, name: str, info: Optional[Dict[str, str]] = None,
                 listener: Optional["SlaveListener"] = None, *,
                 io_timeout: float = DEFAULT_IO_TIMEOUT) -> None:
        self.wire = wire
        self.name = name
        self.info: Dict[str, str] = dict(info or {})
        self.listener = listener
        self.io_timeout = io_timeout
        self._lock = FairLock()
        self._state_lock = threading.Lock()
        self._disconnected: Optional[RemshError] = None
        self._callbacks: List[Callable[["Slave"], Any]] = []
        # guards _executing, and the sending of an interrupt against the end
        # of the command it was meant for (so it can never hit the next one)
        self._exec_lock = threading.Lock()
        self._executing = False
        #: set by a listener that watches idle slaves (see remsh.master.monitor)
        self.idle_watcher: Any = None

    def __repr__(self) -> str:
        state = "disconnected" if self._disconnected else "connected"
        return f"<{type(self).__name__} {self.name!r} {state}>"

    # -- life cycle --------------------------------------------------------

    def setup(self) -> None:
        """Called once by the listener after registration, before the slave
        joins its collection.  Subclasses may run set-up operations here; an
        exception keeps the slave out of the collection."""

    @property
    def connected(self) -> bool:
        """False once the connection has closed or broken."""
        return self._disconnected is None

    def on_disconnect(self, callback: Callable[["Slave"], Any]) -> None:
        """Call ``callback(slave)`` once when the connection goes (at once if
        it already has)."""
        with self._state_lock:
            if self._disconnected is None:
                self._callbacks.append(callback)
                return
        callback(self)

    def close(self) -> None:
        """Drop the connection; a running operation raises ``Disconnected``."""
        self._mark_disconnected(Disconnected(f"{self.name}: connection closed by the master"))

    def _mark_disconnected(self, exc: RemshError) -> None:
        with self._state_lock:
            if self._disconnected is not None:
                return
            self._disconnected = exc
            callbacks, self._callbacks = self._callbacks, []
        log.info("slave %s disconnected: %s", self.name, exc)
        watcher = self.idle_watcher
        if watcher is not None:
            watcher.forget(self)
        self.wire.close()
        for cb in callbacks:
            try:
                cb(self)
            except Exception:  # noqa: BLE001 - one bad callback must not stop the rest
                log.exception("on_disconnect callback failed for slave %s", self.name)

    # -- the operation frame -----------------------------------------------

    def _begin(self, meth: str) -> None:
        """Take the slave for one operation (in call order)."""
        self._lock.acquire()
        if self._disconnected is not None:
            self._lock.release()
            raise Disconnected(f"{self.name}: {meth}: slave is disconnected ({self._disconnected})")
        watcher = self.idle_watcher
        if watcher is not None:
            watcher.busy(self)

    def _end(self) -> None:
        watcher = self.idle_watcher
        try:
            if watcher is not None and self._disconnected is None:
                watcher.idle(self)
        finally:
            self._lock.release()
        # the monitor may have seen this stream while we still held the slave
        # (after idle() armed it): look now, unless another operation has it
        if watcher is not None and watcher.needs_recheck(self) and self._lock.acquire(blocking=False):
            try:
                if self._disconnected is None:
                    watcher.idle(self)
            finally:
                self._lock.release()

    def _failure(self, meth: str, e: BaseException) -> BaseException:
        """What to raise for ``e`` escaping operation ``meth``; disconnects
        the slave unless the conversation is known to be in step."""
        if isinstance(e, RemoteError):
            return e  # raised only after the final box: in step
        if isinstance(e, (Disconnected, ProtocolError)):
            self._mark_disconnected(e)
            named = type(e)(f"{self.name}: {meth}: {e}")
            named.__cause__ = e
            return named
        # interrupted mid-conversation: where the peer stands is unknown
        self._mark_disconnected(Disconnected(f"{self.name}: {meth}: abandoned: {e!r}"))
        return e

    @contextmanager
    def _operation(self, meth: str) -> Iterator[None]:
        """Hold the slave for one operation; turn transport failures into a
        disconnect, and name slave and operation in every error."""
        self._begin(meth)
        try:
            yield
        except BaseException as e:  # noqa: BLE001 - re-raised as _failure decides
            raise self._failure(meth, e)  # noqa: B904 - cause set by _failure
        finally:
            self._end()

    def _read(self, meth: str) -> Box:
        box = self.wire.read_box(self.io_timeout)
        if box is None:
            raise Disconnected(f"slave closed the connection during {meth}")
        return box

    def _raise_if_error(self, meth: str, box: Box) -> Box:
        if b"errtag" in box:
            raise remote_error(box[b"errtag"].decode("ascii", "replace"),
                               box.get(b"error", b"").decode("utf-8", "replace"),
                               slave=self.name, operation=meth)
        return box

    def _call(self, meth: str, keys: Optional[Mapping[bytes, bytes]] = None) -> Box:
        """One request, one reply box (the hot path: no context manager)."""
        if keys:
            request = encode_box({b"meth": meth.encode("ascii"), b"version": OP_VERSION, **keys})
        else:
            request = _bare_request(meth)
        self._begin(meth)
        try:
            self.wire.send_bytes(request)
            reply = self.wire.read_box(self.io_timeout)
            if reply is None:
                raise Disconnected(f"slave closed the connection during {meth}")
        except BaseException as e:  # noqa: BLE001 - re-raised as _failure decides
            raise self._failure(meth, e)  # noqa: B904 - cause set by _failure
        finally:
            self._end()
        if b"errtag" in reply:
            self._raise_if_error(meth, reply)
        return reply

    # -- simple operations ---------------------------------------------------

    def ping(self) -> None:
        """Round trip to the slave; raises if it does not answer."""
        self._call("ping")

    def set_cwd(self, cwd: Optional[Path] = None) -> str:
        """Change the slave's current directory and return the new one.

        ``None`` goes back to the base directory; ``""`` changes nothing
        (returns the current one); a relative path is against the current one.
        Raises :class:`~remsh.errors.NotFoundError` if it is not a directory.
        """
        keys = {} if cwd is None else {b"cwd": _b(cwd)}
        reply = self._call("set_cwd", keys)
        return os.fsdecode(reply.get(b"cwd", b""))

    def getenv(self) -> Dict[str, str]:
        """The slave's environment (str -> str, undecodable bytes escaped)."""
        reply = self._call("getenv")
        return {os.fsdecode(k[4:]): os.fsdecode(v) for k, v in reply.items() if k.startswith(b"env_")}

    def mkdir(self, dir: Path) -> None:
        """Make a directory and its parents (``mkdir -p``); raises
        :class:`~remsh.errors.FailedError`."""
        self._call("mkdir", {b"dir": _b(dir)})

    def unlink(self, file: Path) -> None:
        """Remove one file; :class:`~remsh.errors.NotFoundError` if missing."""
        self._call("unlink", {b"file": _b(file)})

    def remove(self, path: Path) -> None:
        """Remove a file or a whole tree (``rm -rf``); missing is fine."""
        self._call("remove", {b"path": _b(path)})

    def rename(self, src: Path, dest: Path) -> None:
        """Rename ``src`` to ``dest``, which must not exist."""
        self._call("rename", {b"src": _b(src), b"dest": _b(dest)})

    def copy(self, src: Path, dest: Path) -> None:
        """Copy a file's data on the slave; ``dest`` must not exist."""
        self._call("copy", {b"src": _b(src), b"dest": _b(dest)})

    def stat(self, pathname: Path) -> Optional[str]:
        """``"d"`` for a directory, ``"f"`` for anything else, ``None`` if missing."""
        reply = self._call("stat", {b"path": _b(pathname)})
        result = reply.get(b"result", b"")
        if result not in (b"", b"d", b"f"):
            raise ProtocolError(f"{self.name}: stat: bad result {result[:20]!r}")
        return result.decode("ascii") or None

    # -- execute -----------------------------------------------------------

    def execute(self, args: Sequence[Path] = (), stdout_cb: Optional[OutputCallback] = None,
                stderr_cb: Optional[OutputCallback] = None,
                env: Optional[Mapping[Union[str, bytes], Optional[Union[str, bytes]]]] = None,
                cwd: Optional[Path] = None, timeout: Optional[float] = None,
                stdin: Union[bytes, BinaryIO, None] = None) -> int:
        """Run a command on the slave and return its exit code.

        Output is passed, as it arrives, to ``stdout_cb`` / ``stderr_cb``
        (bytes); a stream with no callback is discarded on the slave.  ``env``
        overrides variables (``None`` removes one); ``cwd`` is relative to the
        slave's current directory; ``timeout`` (seconds) kills the command's
        process group and raises :class:`~remsh.errors.CommandTimeout`;
        ``stdin`` is bytes or a binary file object fed to the command.

        A command killed by signal N returns ``-N`` (so an :meth:`interrupt`
        returns ``-9``).  Raises :class:`~remsh.errors.ExecFailedError` if the
        command cannot start.  An exception raised by a callback interrupts
        the command and is re-raised once the slave has finished.
        """
        argv = [_b(a) for a in args]
        if not argv:
            raise UsageError(f"{self.name}: execute: args is empty")
        box: Dict[bytes, bytes] = {
            b"meth": b"execute", b"version": OP_VERSION, b"args": encode_list(argv),
            b"want_stdout": encode_bool(stdout_cb is not None),
            b"want_stderr": encode_bool(stderr_cb is not None),
        }
        if cwd is not None:
            box[b"cwd"] = _b(cwd)
        if timeout is not None:
            if not 0 < timeout < math.inf:
                raise UsageError(f"{self.name}: execute: timeout must be a positive, finite number")
            box[b"timeout"] = repr(float(timeout)).encode("ascii")
        for k, v in (env or {}).items():
            kb = _b(k)
            if v is None:
                box[b"unset_" + kb] = b""
            else:
                box[b"env_" + kb] = _b(v)
        if stdin is not None:
            box[b"want_stdin"] = b"y"
        if len(box[b"args"]) > MAX_VALUE_LENGTH or any(len(k) > MAX_KEY_LENGTH for k in box):
            raise UsageError(f"{self.name}: execute: arguments or variable names too long for one box")
        with self._operation("execute"):
            self.wire.send_box(box)
            # from here an interrupt is delivered: the slave reads it after
            # the request (or discards it if the command never started)
            with self._exec_lock:
                self._executing = True
            try:
                started = self._read("execute")
                if b"errtag" in started:
                    self._raise_if_error("execute", started)
                if started:
                    raise ProtocolError(f"expected the start reply, got keys {sorted(started)[:8]}")
                box, deferred = self._run_command(stdout_cb, stderr_cb, timeout, stdin)
            finally:
                with self._exec_lock:
                    self._executing = False
            try:
                code = self._exit_code(box)
            except RemoteError:
                if deferred is None:
                    raise
        # the final box has been read: the conversation is in step, so a
        # callback's or the stdin reader's exception must not drop the slave
        if deferred is not None:
            raise deferred
        return code

    def _run_command(self, stdout_cb: Optional[OutputCallback], stderr_cb: Optional[OutputCallback],
                     timeout: Optional[float], stdin: Union[bytes, BinaryIO, None]
                     ) -> "tuple[Box, Optional[BaseException]]":
        """Stream the command's output until its final box; return that box
        and the exception (if any) to raise once the operation is over."""
        feeder: Optional[_StdinFeeder] = None
        callback_error: Optional[BaseException] = None
        try:
            if stdin is not None:
                feeder = _StdinFeeder(self, stdin)
                feeder.start()
            # the command may be silent for as long as it runs: only its own
            # time limit (plus slack for the kill) bounds the wait
            wait = None if timeout is None else timeout + self.io_timeout
            read_box = self.wire.read_box
            while True:
                box = read_box(wait)
                if box is None:
                    raise Disconnected("slave closed the connection during execute")
                stream = box.get(b"stream")
                if stream is not None:
                    cb = stdout_cb if stream == b"stdout" else stderr_cb if stream == b"stderr" else None
                    if cb is not None and callback_error is None:
                        try:
                            cb(box.get(b"data", b""))
                        except BaseException as e:  # noqa: BLE001 - re-raised below
                            callback_error = e
                            self._send_interrupt()
                    continue
                break
        finally:
            if feeder is not None:
                feeder.stop()
        if callback_error is not None:
            return box, callback_error
        if feeder is not None and feeder.error is not None:
            err = RemshError(f"{self.name}: execute: reading stdin failed: {feeder.error}")
            err.__cause__ = feeder.error
            return box, err
        return box, None

    def _exit_code(self, box: Box) -> int:
        """The exit code in execute's final box (or its error raised)."""
        self._raise_if_error("execute", box)
        if b"result" not in box:
            raise ProtocolError(f"expected the final execute box, got keys {sorted(box)[:8]}")
        try:
            return decode_int(box[b"result"])
        except ValueError:
            raise ProtocolError(f"bad exit code {box[b'result'][:20]!r}") from None

    def _send_interrupt(self) -> None:
        try:
            self.wire.send_box({b"interrupt": b"y"}, lock_timeout=INTERRUPT_SEND_TIMEOUT)
        except PeerTimeout:
            log.warning("slave %s: cannot deliver interrupt; dropping the connection", self.name)
            # reset, not shut down: a FIN would queue behind the unsent stdin
            getattr(self.wire.stream, "abort", self.wire.stream.shutdown)()
        except Disconnected:
            pass

    def interrupt(self) -> None:
        """Kill the command running in :meth:`execute`, from any thread.

        The slave kills the command's whole process group and ``execute``
        returns its status (``-9``).  Does nothing when no command runs.  If
        the connection is too congested to take the request within a few
        seconds, the connection is dropped instead (``execute`` then raises
        :class:`~remsh.errors.Disconnected`).
        """
        with self._exec_lock:
            if self._executing and self._disconnected is None:
                self._send_interrupt()

    # -- file transfer -------------------------------------------------------

    def send(self, src: Union[Path, BinaryIO], dest: Path, *, mode: Optional[int] = None) -> None:
        """Copy local ``src`` (a path or binary file object) to ``dest`` on the slave.

        The slave writes a temporary file beside ``dest`` and moves it into
        place only once every byte arrived and the SHA-256 digest matched, so
        ``dest`` is never seen partial.  ``dest`` must not exist
        (:class:`~remsh.errors.RemoteFileExistsError`).  ``mode`` sets the
        file's permission bits (default: the slave's umask).
        """
        box = {b"meth": b"send", b"version": OP_VERSION, b"dest": _b(dest)}
        if mode is not None:
            box[b"mode"] = encode_int(mode)
        if hasattr(src, "read"):
            f: IO[bytes] = src  # type: ignore[assignment]
            own = False
        else:
            try:
                f = open(src, "rb", buffering=0)  # type: ignore[arg-type]
            except OSError as e:
                raise UsageError(f"{self.name}: send: cannot open local file: {e}") from e
            own = True
        try:
            with self._operation("send"):
                self.wire.send_box(box)
                self._raise_if_error("send", self._read("send"))
                local_error = self._send_data(f)
                reply = self._read("send")
            # the slave's error for an aborted transfer only echoes the local cause
            if local_error is not None:
                raise RemshError(f"{self.name}: send: reading local file failed: {local_error}") from local_error
            self._raise_if_error("send", reply)
        finally:
            if own:
                f.close()

    def _send_data(self, f: IO[bytes]) -> Optional[OSError]:
        digest = hashlib.sha256()
        send = self.wire.send_bytes
        while True:
            try:
                block = f.read(DATA_BLOCK)
            except OSError as e:
                self.wire.send_box({b"sha256": b"-", b"abort": b"master could not read the source"})
                return e
            if not block:
                break
            digest.update(block)
            send(encode_data_boxes(b"data", block))
        self.wire.send_box({b"sha256": digest.hexdigest().encode("ascii")})
        return None

    def fetch(self, src: Path, dest: Union[Path, BinaryIO]) -> None:
        """Copy ``src`` on the slave to local ``dest`` (a path or binary file object).

        For a path, data goes to a temporary file beside it that is moved
        into place only when complete and verified; ``dest`` must not exist
        (:class:`~remsh.errors.UsageError`).
        """
        part: Optional[PartialFile] = None
        if hasattr(dest, "write"):
            out: Any = dest
        else:
            dest_b = _b(dest)  # type: ignore[arg-type]
            if os.path.lexists(dest_b):
                raise UsageError(f"{self.name}: fetch: local destination exists: {os.fsdecode(dest_b)}")
            try:
                part = PartialFile(dest_b)
            except OSError as e:
                raise UsageError(f"{self.name}: fetch: cannot create local file: {e}") from e
            out = part
        try:
            with self._operation("fetch"):
                self.wire.send_box({b"meth": b"fetch", b"version": OP_VERSION, b"src": _b(src)})
                digest = hashlib.sha256()
                local_error: Optional[OSError] = None
                read_box = self.wire.read_box
                while True:
                    box = read_box(self.io_timeout)
                    if box is None:
                        raise Disconnected("slave closed the connection during fetch")
                    data = box.get(b"data")
                    if data is None:
                        break
                    digest.update(data)
                    if local_error is None:
                        try:
                            out.write(data)
                        except OSError as e:
                            local_error = e
            self._raise_if_error("fetch", box)
            if local_error is not None:
                raise RemshError(f"{self.name}: fetch: writing local file failed: {local_error}") from local_error
            expected = box.get(b"sha256")
            if expected is not None and expected.lower() != digest.hexdigest().encode("ascii"):
                raise ProtocolError(f"{self.name}: fetch: data does not match the slave's sha256 digest")
            if part is not None:
                try:
                    part.commit()
                except FileExistsError:
                    raise UsageError(f"{self.name}: fetch: local destination appeared meanwhile") from None
                except OSError as e:
                    raise RemshError(f"{self.name}: fetch: cannot place local file: {e}") from e
        finally:
            if part is not None:
                part.discard()


@functools.lru_cache(maxsize=None)
def _bare_request(meth: str) -> bytes:
    """The encoded request of an operation without arguments."""
    return encode_box({b"meth": meth.encode("ascii"), b"version": OP_VERSION})


class _StdinFeeder:
    """Sends a command's stdin from its own thread, so that reading output
    and writing input can never wait on each other."""

    def __init__(self, slave: Slave, source: Union[bytes, BinaryIO]) -> None:
        self.slave = slave
        self.source: BinaryIO = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
        self.error: Optional[OSError] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"remsh-stdin-{self.slave.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        wire = self.slave.wire
        try:
            while True:
                try:
                    chunk = self.source.read(CHUNK)
                except OSError as e:
                    self.error = e
                    self.slave.interrupt()
                    chunk = b""
                # nothing may go out once the command has ended: a late box
                # would land in the middle of the next operation
                box = {b"stream": b"stdin", b"data": chunk} if chunk else {b"stream": b"stdin", b"eof": b"y"}
                if not wire.send_box_unless(box, self._stop):
                    return
                if not chunk:
                    return
        except RemshError:
            pass  # the reading side sees the broken connection

    def stop(self) -> None:
        """Stop sending; if the thread cannot be stopped in time (blocked
        reading the source), the conversation can no longer be trusted."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(INTERRUPT_SEND_TIMEOUT + 1.0)
            if self._thread.is_alive():
                self.slave._mark_disconnected(Disconnected(
                    f"{self.slave.name}: execute: the stdin source did not return; connection dropped"))
