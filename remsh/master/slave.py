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
import logging
import os
import threading
import time
from contextlib import contextmanager
from typing import (Any, BinaryIO, Callable, Dict, Iterator, List, Optional, Protocol,
                    Sequence, Set, Tuple, Union)

from remsh.adoption import execute_requested
from remsh.conversation import EnvArg, ExecuteCall, Exited, Failed, Output, Started, State
from remsh.master.progress import ProgressCallback
from remsh.errors import (CommandTimeout, Disconnected, LocalError, PeerTimeout, ProtocolError, RemoteError,
                          RemshError, UsageError, WaitTimeout, remote_error)
from remsh.master import fetchfile as _fetchfile
from remsh.master import sendfile as _sendfile
from remsh.master import tree as _tree
from remsh.master.fairlock import FairLock
from remsh.master.operation import OperationFrame, progress_interval
from remsh.master.stdinfeeder import INTERRUPT_SEND_TIMEOUT, StdinFeeder
from remsh.session import SessionWire
from remsh.ops import (CHMOD, COPY, DEFAULT_IO_TIMEOUT, GETENV, MKDIR, PING, REMOVE, RENAME, SET_CWD, STAT, UNLINK,
                       Operation, is_progress)
from remsh.wire import Box, Wire

log = logging.getLogger(__name__)

Path = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]
OutputCallback = Callable[[bytes], Any]


#: How long a command interrupted at the master's ``timeout`` may take to end
#: before the master gives up on the conversation (and ends the session).
KILL_GRACE = 5.0

__all__ = ["Slave", "DEFAULT_IO_TIMEOUT", "IdleWatcher", "ProgressCallback"]


def _b(path: Path) -> bytes:
    """A path or argument as bytes, without losing undecodable bytes."""
    return os.fsencode(path)


class StateListener(Protocol):
    """Where a slave reports ``away``/``back``/``lost`` (its listener:
    :class:`~remsh.master.slavelistener.base.SlaveListener`)."""

    def slave_state(self, slave: "Slave", state: str, detail: str = "") -> None: ...


class IdleWatcher(Protocol):
    """What a slave tells the listener's idle monitor
    (:class:`remsh.master.monitor.IdleMonitor`)."""

    def busy(self, slave: "Slave") -> None: ...

    def idle(self, slave: "Slave") -> None: ...

    def needs_recheck(self, slave: "Slave") -> bool: ...

    def forget(self, slave: "Slave") -> None: ...


class Slave:
    """A connected slave.

    :ivar name: the name the slave registered with
    :ivar info: the descriptive keys of its ``register`` box (str -> str):
        ``hostname``, ``platform``, ``python``, ``basedir``, ``remsh``, and
        the ``policy_*`` keys of a slave that narrows what it will do
    :ivar listener: the listener that connected it (or ``None``)

    Every operation raises :class:`~remsh.errors.Disconnected` (naming the
    slave and the operation) when the connection is gone or goes during the
    call, :class:`~remsh.errors.PeerTimeout` (a ``Disconnected``) when the
    slave stops answering for ``io_timeout`` seconds, and
    :class:`~remsh.errors.ProtocolError` when the slave breaks the protocol;
    after any of these the slave is disconnected.  Failures the slave reports
    raise :class:`~remsh.errors.RemoteError` subclasses chosen by the error
    box's tag (the slave stays connected).
    """

    def __init__(self, wire: Union[Wire, SessionWire], name: str, info: Optional[Dict[str, str]] = None,
                 listener: Optional[StateListener] = None, *,
                 io_timeout: float = DEFAULT_IO_TIMEOUT) -> None:
        self.wire: Union[Wire, SessionWire] = wire
        self.name = name
        self.info: Dict[str, str] = dict(info or {})
        self.listener = listener
        self.io_timeout = io_timeout
        self._lock = FairLock()
        self._state_lock = threading.Lock()
        self._disconnected: Optional[RemshError] = None
        self._callbacks: List[Callable[["Slave"], Any]] = []
        # the execute calls in progress (queued or running); guards their
        # interrupt state, and the sending of an interrupt against the end of
        # the command it was meant for (so it can never hit the next one)
        self._exec_lock = threading.Lock()
        self._executions: Set[ExecuteCall] = set()
        #: an execute past its timeout is still being read (see _settle_later)
        self._settling = False
        #: set by a listener that watches idle slaves (see remsh.master.monitor)
        self.idle_watcher: Optional[IdleWatcher] = None
        self._session = isinstance(wire, SessionWire)
        #: the session when this slave's work survives a dropped connection
        self.session_wire: Optional[SessionWire] = wire if isinstance(wire, SessionWire) else None
        self._away = False  # the connection dropped and has not come back (as reported)
        self._report_lock = threading.Lock()  # away/back/lost reported one at a time, in order
        if isinstance(wire, SessionWire):
            wire.on_lost = self._connection_lost
            wire.on_failed = self._session_failed

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
        """False once the connection has closed or broken -- and, for a slave
        whose work survives a dropped connection (``resume_timeout``), while
        it is away."""
        if self._disconnected is not None:
            return False
        session = self.session_wire
        return session is None or bool(session.attached)

    @property
    def resumable(self) -> bool:
        """True when this slave's work survives a dropped connection."""
        return isinstance(self.wire, SessionWire)

    def _connection_lost(self) -> None:
        """The connection of a resumable slave dropped: it is away until it
        comes back (or its resume time limit runs out)."""
        watcher = self.idle_watcher
        if watcher is not None:
            watcher.forget(self)
        session = self.session_wire
        assert session is not None  # only a session reports a lost connection
        with self._report_lock:
            if session.failed is not None or self._away:
                return
            self._tell("away", f"connection lost; waiting up to {session.resume_timeout:g} s")
            if session.attached:
                self._tell("back", "")  # a resume overtook this report
            else:
                self._away = True

    def _session_failed(self, error: RemshError) -> None:
        session = self.session_wire
        with self._report_lock:
            if self._away and session is not None and session.expired:
                self._tell("lost", str(error))
        self.drop(Disconnected(f"{self.name}: {error}"))

    def attached(self) -> None:
        """The resumable slave is back (called by its listener)."""
        with self._report_lock:
            if self._away:
                self._away = False
                self._tell("back", "")

    def _tell(self, state: str, detail: str) -> None:
        """Report ``away``/``back``/``lost`` to the listener (it logs and
        calls its ``on_state`` hook), or log it without one."""
        if self.listener is not None:
            self.listener.slave_state(self, state, detail)
        else:
            log.warning("slave %s: %s%s", self.name, state, f" ({detail})" if detail else "")

    def on_disconnect(self, callback: Callable[["Slave"], Any]) -> None:
        """Call ``callback(slave)`` once when the connection goes (at once if
        it already has)."""
        with self._state_lock:
            if self._disconnected is None:
                self._callbacks.append(callback)
                return
        callback(self)

    def close(self) -> None:
        """Drop the connection; a running operation raises ``Disconnected``.
        A resumable slave is told its session is over (it will not resume)."""
        if isinstance(self.wire, SessionWire):
            self.wire.end()
        self.drop(Disconnected(f"{self.name}: connection closed by the master"))

    def drop(self, exc: RemshError) -> None:
        """Disconnect with ``exc`` as the cause (idempotent): close the wire,
        stop being watched and run the ``on_disconnect`` callbacks."""
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

    def try_hold(self) -> bool:
        """Take the slave for a look at its idle connection, if no operation
        holds it (for the idle monitor); give it back with :meth:`release`."""
        return self._lock.acquire(blocking=False)

    def release(self) -> None:
        """Give back what :meth:`try_hold` took."""
        self._lock.release()

    # -- the operation frame -----------------------------------------------

    def _begin(self, meth: str, deadline: Optional[float] = None) -> None:
        """Take the slave for one operation (in call order); past
        ``deadline`` (``time.monotonic()``), raise :class:`_Overdue`."""
        if not self._lock.acquire(timeout=None if deadline is None else max(0.0, deadline - time.monotonic())):
            raise _Overdue()
        session = self.session_wire
        if session is not None and self._disconnected is None and not session.attached:
            try:  # while away: wait, within its resume time limit
                session.wait_attached(None if deadline is None else max(0.0, deadline - time.monotonic()))
            except PeerTimeout:
                self._lock.release()
                raise _Overdue() from None
            except RemshError:
                pass  # failed: _disconnected is set by then
        if self._disconnected is not None:
            self._lock.release()
            raise Disconnected(f"{self.name}: {meth}: slave is disconnected ({self._disconnected})")
        watcher = self.idle_watcher
        if watcher is not None:
            watcher.busy(self)

    def _end(self) -> None:
        if self._settling:
            return  # the slave is handed to _settle_later, which ends the operation
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

    def _named(self, meth: str, e: RemshError) -> RemshError:
        """``e`` again, its message naming slave and operation once."""
        text = str(e)
        prefix = f"{self.name}: "
        if text.startswith(prefix):
            text = text[len(prefix):]
        if text.startswith(f"{meth}: "):  # a conversation object's own naming
            text = text[len(meth) + 2:]
        named = type(e)(f"{self.name}: {meth}: {text}")
        named.__cause__ = e
        return named

    def _failure(self, meth: str, e: BaseException) -> BaseException:
        """What to raise for ``e`` escaping operation ``meth``; disconnects
        the slave unless the conversation is known to be in step."""
        if isinstance(e, RemoteError):
            return e  # raised only after the final box: in step
        if isinstance(e, (Disconnected, ProtocolError)):
            self.drop(e)
            return self._named(meth, e)
        if isinstance(e, _Overdue) and self._settling:
            return e  # the rest of the conversation is read by _settle_later
        # interrupted mid-conversation: where the peer stands is unknown
        self.drop(Disconnected(f"{self.name}: {meth}: abandoned: {e!r}"))
        return e

    def _protocol_error(self, meth: str, message: str) -> ProtocolError:
        """The slave broke the protocol after its final box: drop it."""
        error = ProtocolError(f"{self.name}: {meth}: {message}")
        self.drop(error)
        return error

    @contextmanager
    def operation(self, meth: str, deadline: Optional[float] = None) -> Iterator[OperationFrame]:
        """Hold the slave for one operation ``meth`` (in call order) and
        yield its :class:`~remsh.master.operation.OperationFrame`; turn
        transport failures into a disconnect, and name slave and operation
        in every error.  For the bodies of the longer operations
        (:mod:`remsh.master.tree` and the file transfers)."""
        self._begin(meth, deadline)
        try:
            yield OperationFrame(self.wire, self.name, meth, self.io_timeout, self.drop)
        except BaseException as e:  # noqa: BLE001 - re-raised as _failure decides
            raise self._failure(meth, e)  # noqa: B904 - cause set by _failure
        finally:
            self._end()

    def _raise_if_error(self, meth: str, box: Box) -> Box:
        if b"errtag" in box:
            raise remote_error(box[b"errtag"].decode("ascii", "replace"),
                               box.get(b"error", b"").decode("utf-8", "replace"),
                               slave=self.name, operation=meth)
        return box

    def _call(self, op: Operation, **values: Any) -> Box:
        """One request of a simple operation, one reply box (the hot path:
        no context manager).  Liveness boxes of a long operation are skipped,
        each one restarting the reply deadline."""
        meth = op.meth
        request = op.encode(**values) if values else op.bare_request
        self._begin(meth)
        try:
            if self.session_wire is not None:
                self.session_wire.send_bytes(request, boxes=1)  # one box: no counting
            else:
                self.wire.send_bytes(request)
            reply: Optional[Box] = self.wire.read_box(self.io_timeout)
            while reply is not None and op.long and is_progress(reply):
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

    def _reply_values(self, op: Operation, **values: Any) -> Dict[str, Any]:
        """One call of a simple operation whose reply carries values, decoded
        as the table declares them."""
        reply = self._call(op, **values)
        try:
            return op.parse_reply(reply)
        except ValueError as e:
            raise self._protocol_error(op.meth, str(e)) from None

    def _progress_interval(self) -> float:
        """How often a long operation should show it is alive."""
        return progress_interval(self.io_timeout)

    # -- simple operations ---------------------------------------------------

    def ping(self) -> None:
        """Round trip to the slave; raises if it does not answer."""
        self._call(PING)

    def set_cwd(self, cwd: Optional[Path] = None) -> str:
        """Change the slave's current directory and return the new one.

        ``None`` goes back to the base directory; ``""`` changes nothing
        (returns the current one); a relative path is against the current one.

        :raises NotFoundError: it is not a directory
        """
        reply = self._reply_values(SET_CWD, cwd=None if cwd is None else _b(cwd))
        return os.fsdecode(reply["cwd"])

    def getenv(self) -> Dict[str, str]:
        """The slave's environment (str -> str, undecodable bytes escaped)."""
        reply = self._reply_values(GETENV)
        return {os.fsdecode(k): os.fsdecode(v) for k, v in reply["env_"].items()}

    def mkdir(self, dir: Path) -> None:
        """Make a directory and its parents (``mkdir -p``).

        :raises FailedError: it cannot be made
        """
        self._call(MKDIR, dir=_b(dir), progress=self._progress_interval())

    def unlink(self, file: Path) -> None:
        """Remove one file.

        :raises NotFoundError: it does not exist
        :raises FailedError: it cannot be removed
        """
        self._call(UNLINK, file=_b(file))

    def remove(self, path: Path) -> None:
        """Remove a file or a whole tree (``rm -rf``); a missing path is fine.

        :raises FailedError: something in it cannot be removed
        """
        self._call(REMOVE, path=_b(path), progress=self._progress_interval())

    def rename(self, src: Path, dest: Path) -> None:
        """Rename ``src`` to ``dest``, never replacing an existing ``dest``.

        :raises NotFoundError: ``src`` does not exist
        :raises RemoteFileExistsError: ``dest`` exists
        :raises FailedError: the rename failed
        """
        self._call(RENAME, src=_b(src), dest=_b(dest))

    def chmod(self, path: Path, mode: int) -> None:
        """Set the permission bits of ``path`` on the slave (``0o7777`` at
        most); a symbolic link is refused, never followed.

        :raises NotFoundError: ``path`` does not exist
        :raises FailedError: it is a symbolic link, or the change failed
        """
        self._call(CHMOD, path=_b(path), mode=mode)

    def copy(self, src: Path, dest: Path) -> None:
        """Copy a file's data on the slave; ``dest`` must not exist.

        :raises NotFoundError: ``src`` does not exist
        :raises RemoteFileExistsError: ``dest`` exists
        :raises FailedError: ``src`` is not a regular file or cannot be read,
            or the copy failed (nothing is left at ``dest``)
        """
        self._call(COPY, src=_b(src), dest=_b(dest), progress=self._progress_interval())

    def stat(self, pathname: Path) -> Optional[str]:
        """``"d"`` for a directory, ``"f"`` for anything else, ``None`` if missing.

        :raises FailedError: it cannot be looked at (e.g. permission denied)
        """
        result: bytes = self._reply_values(STAT, path=_b(pathname))["result"]
        return result.decode("ascii") or None

    # -- execute -----------------------------------------------------------

    def execute(self, args: Sequence[Path] = (), stdout_cb: Optional[OutputCallback] = None,
                stderr_cb: Optional[OutputCallback] = None,
                env: Optional[EnvArg] = None,
                cwd: Optional[Path] = None, timeout: Optional[float] = None,
                stdin: Union[bytes, BinaryIO, None] = None, *, keep_processes: bool = False,
                interrupted: Optional[Callable[[], bool]] = None) -> int:
        """Run a command on the slave and return its exit code.

        Output is passed, as it arrives, to ``stdout_cb`` / ``stderr_cb``
        (bytes); a stream with no callback is discarded on the slave.  ``env``
        overrides variables (``None`` removes one); ``cwd`` is relative to the
        slave's current directory; ``timeout`` (seconds) bounds the whole
        call by the wall clock, waiting for its turn and time away included:
        the slave kills the command's process group when it runs that long,
        and the master interrupts it when the slave has not said so in time
        (a slave that is away gets the interrupt when it comes back; the
        slave stays, and its next operation waits until the killed command's
        end has been read); ``stdin`` is bytes or a binary file object fed to the
        command (if it has a ``cancel()`` method, that is called when the
        command ends, so that a ``read()`` waiting for more input returns).

        A command killed by signal N returns ``-N`` (so an :meth:`interrupt`
        returns ``-9``).  An exception raised by a callback interrupts the
        command and is re-raised once the slave has finished.

        When the command exits, whatever it left running in its process group
        (background jobs, daemons it started without a session of their own)
        is killed, so no stray process outlives the call; ``keep_processes``
        leaves them running.

        ``interrupted`` is asked once the call is registered: when it says
        true, the call is interrupted before its command starts (so that a
        canceller who saw no call in progress in :meth:`interrupt` loses
        nothing; :func:`remsh.master.fanout.fan_out` cancels with it).

        :raises UsageError: ``args`` empty, ``timeout`` not positive and
            finite, arguments too long for one box
        :raises ExecFailedError: the command cannot start
        :raises CommandTimeout: ``timeout`` ran out: the command was killed
            (or, while the slave is away, will be when it is back); raised
            within about ``timeout`` seconds whatever the connection does
        :raises LocalError: reading ``stdin`` failed (the command was interrupted)
        """
        try:
            call = ExecuteCall(args, want_stdout=stdout_cb is not None, want_stderr=stderr_cb is not None,
                               want_stdin=stdin is not None, cwd=cwd, timeout=timeout, env=env,
                               keep_processes=keep_processes)
        except UsageError as e:
            raise UsageError(f"{self.name}: execute: {e}") from None
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._exec_lock:
            self._executions.add(call)
        if interrupted is not None and interrupted():
            self._interrupt_call(call)  # idle: kept, and sent right behind the request
        try:
            with self.operation("execute", deadline):
                # under the lock: an interrupt must not overtake its request
                with self._exec_lock:
                    request = call.request()
                    # a job's store records the session first (remsh.adoption)
                    execute_requested(self, call)
                    self.wire.send_bytes(request)
                try:
                    final, deferred = self._run_command(call, stdout_cb, stderr_cb, timeout, stdin, deadline)
                except _Overdue:
                    if call.state is not State.IDLE and self._disconnected is None:
                        self._settle_later(call)
                    raise
        except _Overdue:
            raise CommandTimeout(f"command timed out after {timeout:g} s (the slave did not end it in "
                                 f"time: away or unresponsive)", slave=self.name, operation="execute") from None
        finally:
            with self._exec_lock:
                self._executions.discard(call)
        # the final box has been read: the conversation is in step, so a
        # callback's or the stdin reader's exception must not drop the slave
        if deferred is not None:
            raise deferred
        if isinstance(final, Failed):
            error = final.error
            raise type(error)(error.remote_message, slave=self.name, operation="execute", errtag=error.errtag)
        return final.code

    def _run_command(self, call: ExecuteCall, stdout_cb: Optional[OutputCallback],
                     stderr_cb: Optional[OutputCallback], timeout: Optional[float],
                     stdin: Union[bytes, BinaryIO, None], deadline: Optional[float]
                     ) -> Tuple[Union[Exited, Failed], Optional[BaseException]]:
        """Drive ``call`` until its final box; return the final event and the
        exception (if any) to raise once the operation is over.  At
        ``deadline`` the command is interrupted and given
        :data:`KILL_GRACE` seconds to end (:class:`_Overdue` past that, or
        at once while the slave is away)."""
        feeder: Optional[StdinFeeder] = None
        callback_error: Optional[BaseException] = None
        wire = self.wire
        overdue = False
        try:
            # until the start reply: the usual reply deadline
            wait: Optional[float] = self.io_timeout
            while True:
                limit = wait
                if deadline is not None:
                    left = max(0.0, deadline - time.monotonic())
                    limit = left if wait is None else min(wait, left)
                try:
                    box = wire.read_box(limit)
                except PeerTimeout:
                    if deadline is None or time.monotonic() < deadline:
                        raise
                    if overdue or not self.connected:  # away or unresponsive: the caller goes now
                        self._interrupt_call(call)  # kept by the session while away
                        raise _Overdue() from None
                    overdue = True  # the master's bound: interrupt, and wait a little for the end
                    self._interrupt_call(call)
                    deadline = time.monotonic() + min(self.io_timeout, KILL_GRACE)
                    continue
                if box is None:
                    raise Disconnected("slave closed the connection during execute" if not wire.at_eof
                                       else "the slave ended its session during execute (it is stopping)")
                with self._exec_lock:
                    event = call.receive(box)
                if isinstance(event, Output):
                    cb = stdout_cb if event.stream == "stdout" else stderr_cb
                    if cb is not None and callback_error is None:
                        try:
                            cb(event.data)
                        except BaseException as e:  # noqa: BLE001 - re-raised below
                            callback_error = e
                            self._interrupt_call(call)
                elif isinstance(event, Started):
                    if stdin is not None:
                        feeder = StdinFeeder(self.wire, self.name, call, stdin,
                                             interrupt=functools.partial(self._interrupt_call, call),
                                             drop=self.drop)
                        feeder.start()
                    # the command may be silent for as long as it runs: only
                    # its own time limit (plus slack for the kill) bounds the wait
                    wait = None if timeout is None else timeout + self.io_timeout
                elif isinstance(event, (Exited, Failed)):
                    final = event
                    if overdue and isinstance(event, Exited) and event.code < 0:  # killed by our interrupt
                        final = Failed(CommandTimeout(f"command timed out after {timeout:g} s and was killed"))
                    break
        finally:
            if feeder is not None:
                feeder.stop()
        if callback_error is not None:
            return final, callback_error
        if feeder is not None and feeder.error is not None:
            err = LocalError(f"{self.name}: execute: reading stdin failed: {feeder.error}")
            err.__cause__ = feeder.error
            return final, err
        return final, None

    def _settle_later(self, call: ExecuteCall) -> None:
        """Keep holding the slave after ``call`` ran past its timeout (its
        caller has gone with :class:`CommandTimeout`): a thread of its own
        reads the rest of the conversation -- the slave, back or answering at
        last, sends the final box of the command the interrupt killed -- so
        that the slave is in step again for the next operation, which waits
        its turn meanwhile.  Bounded by the resume time limit and the reply
        time limit; past them the slave is dropped."""
        limit = getattr(self.wire, "resume_timeout", 0.0) + min(self.io_timeout, KILL_GRACE) + self.io_timeout
        self._settling = True

        def settle() -> None:
            deadline = time.monotonic() + limit
            try:
                while call.state is not State.DONE:
                    box = self.wire.read_box(max(0.0, deadline - time.monotonic()))
                    if box is None:
                        raise Disconnected("slave closed the connection")
                    with self._exec_lock:
                        call.receive(box)  # what the command wrote past its timeout is not wanted
            except Exception as e:  # noqa: BLE001 - out of step whatever it was: drop
                self.drop(Disconnected(f"{self.name}: execute: the command past its timeout did not end: {e}"))
            finally:
                self._settling = False
                self._end()

        threading.Thread(target=settle, name=f"remsh-settle-{self.name}", daemon=True).start()

    def _interrupt_call(self, call: ExecuteCall) -> None:
        """Ask for ``call``'s command to be killed (now, or with its request)."""
        with self._exec_lock:
            data = call.interrupt()
            if data is None or self._disconnected is not None:
                return
            try:
                self.wire.send_bytes(data, lock_timeout=INTERRUPT_SEND_TIMEOUT)
            except WaitTimeout:
                log.warning("slave %s: cannot deliver interrupt; dropping the connection", self.name)
                # reset, not shut down: a FIN would queue behind the unsent stdin
                getattr(self.wire.stream, "abort", self.wire.stream.shutdown)()
                if isinstance(self.wire, SessionWire):
                    self.wire.end()  # no resume: the slave kills the command when it learns
            except (Disconnected, ProtocolError):
                pass

    def interrupt(self) -> None:
        """Kill the command of every :meth:`execute` call in progress on this
        slave, from any thread.

        The slave kills the command's whole process group and ``execute``
        returns its status (``-9``).  A call still waiting for its turn, or
        whose command has not started yet, is interrupted as soon as its
        request goes out.  Does nothing when no ``execute`` call is in
        progress.  If the connection is too congested to take the request
        within a few seconds, the connection is dropped instead (``execute``
        then raises :class:`~remsh.errors.Disconnected`).  Never raises.
        """
        with self._exec_lock:
            calls = list(self._executions)
        for call in calls:
            self._interrupt_call(call)

    # -- file transfer -------------------------------------------------------

    def send(self, src: Union[Path, BinaryIO], dest: Path, *, mode: Optional[int] = None,
             progress: Optional[ProgressCallback] = None) -> None:
        """Copy local ``src`` (a path or binary file object) to ``dest`` on the slave.

        The slave writes a temporary file beside ``dest`` (created with
        ``mode`` from the start) and moves it into place only once every byte
        arrived and the SHA-256 digest matched, so ``dest`` is never seen
        partial.  ``mode`` sets the file's permission bits (default: the
        slave's umask).  ``progress(done_bytes, total_bytes)`` is called as
        data goes out, at most ten times a second, and once at the end.

        :raises RemoteFileExistsError: ``dest`` exists
        :raises OpenFailedError: the slave cannot create the file
        :raises FailedError: writing failed on the slave (nothing is left)
        :raises LocalError: the local source cannot be opened or read
            (nothing is left on the slave)
        :raises UsageError: ``src.read(n)`` returned more than ``n`` bytes
            (nothing is left on the slave; it stays usable)
        """
        _sendfile.send(self, src, dest, mode, progress)

    def fetch(self, src: Path, dest: Union[Path, BinaryIO], *, max_bytes: Optional[int] = None,
              progress: Optional[ProgressCallback] = None) -> None:
        """Copy ``src`` on the slave to local ``dest`` (a path or binary file object).

        For a path, data goes to a temporary file beside it that is moved
        into place only when complete and verified.  ``max_bytes`` bounds
        what the slave may make the master write: past it the master stops
        the transfer (``{interrupt: y}``; what is already on its way is read
        and dropped), nothing is left at a path ``dest`` (a file object has
        what came before the bound) and the slave stays usable.
        ``progress(done_bytes, None)`` is called as data
        arrives, at most ten times a second, and once at the end with the
        total.

        :raises NotFoundError: ``src`` does not exist
        :raises OpenFailedError: ``src`` is not a regular file or cannot be opened
        :raises FailedError: reading failed on the slave
        :raises LocalError: ``dest`` exists, or cannot be created, written or
            put in place (nothing is left)
        :raises LimitExceeded: the file passed ``max_bytes``
        :raises ProtocolError: the data does not match the slave's digest, or
            the slave went on sending :data:`DRAIN_LIMIT` bytes after it was
            stopped (the slave is dropped)
        """
        _fetchfile.fetch(self, src, dest, max_bytes, progress)

    # -- directory trees ---------------------------------------------------------

    def send_tree(self, src_dir: Path, dest: Path, *, progress: Optional[ProgressCallback] = None) -> None:
        """Copy the local directory ``src_dir`` to ``dest`` on the slave.

        Regular files (data, permission bits, modification time), directories
        (permission bits, time; empty ones too) and symbolic links (as links,
        never followed) are copied; names are bytes and survive as they are.
        The tree is built in a temporary directory beside ``dest`` and renamed
        into place last, never replacing anything: it appears complete or not
        at all.  Every file is verified with SHA-256.  One conversation, no
        round trip per file.  ``progress(done_bytes, total_bytes)`` is called
        as data goes out, at most ten times a second, and once at the end.

        :raises LocalError: ``src_dir`` is missing or not a directory, holds
            something that is not a file, directory or link (every such path
            is named; nothing was sent), or a file cannot be read or changes
            size while it is sent (nothing is kept on the slave)
        :raises RemoteFileExistsError: ``dest`` exists
        :raises NotFoundError: the directory that should hold ``dest`` does not exist
        :raises FailedError: writing failed on the slave (disk full, permission
            denied; nothing is kept)
        """
        _tree.send_tree(self, src_dir, dest, progress)

    def fetch_tree(self, src: Path, dest_dir: Path, *, progress: Optional[ProgressCallback] = None,
                   max_bytes: Optional[int] = None, max_entries: Optional[int] = None) -> None:
        """Copy the directory ``src`` on the slave to the new local directory
        ``dest_dir`` (which must not exist), with the guarantees of
        :meth:`send_tree` on the master's side: built beside ``dest_dir``,
        renamed into place last, nothing left on failure.  Files and
        directories get the slave's permission bits less the set-ID and
        sticky bits and the master's umask; directories may nest at most
        :data:`~remsh.master.tree.MAX_FETCH_DEPTH` levels.  ``max_bytes``
        (file data) and ``max_entries`` (files, directories and links)
        bound what the slave may make the master write: past either (or
        when the slave's announced totals pass them) the master stops the
        transfer, nothing is left and the slave stays usable.

        :raises NotFoundError: ``src`` does not exist
        :raises OpenFailedError: ``src`` is not a directory or cannot be opened
        :raises FailedError: ``src`` holds something that is not a file,
            directory or link (each named; nothing was sent), or a file cannot
            be read or changes size on the slave
        :raises LocalError: ``dest_dir`` exists, its directory does not, or
            writing the local tree failed
        :raises UsageError: ``dest_dir`` does not end in a name
        :raises LimitExceeded: the tree passed ``max_bytes`` or ``max_entries``
        :raises ProtocolError: the data does not match its digest, the slave
            sent more than it announced or nested too deep (the slave is
            dropped)
        """
        _tree.fetch_tree(self, src, dest_dir, progress, max_bytes, max_entries)

    def sync_tree(self, src_dir: Path, dest: Path, *, delete: bool = False, checksum: bool = False,
                  progress: Optional[ProgressCallback] = None) -> "_tree.SyncResult":
        """Make ``dest`` on the slave (created if missing) match the local
        directory ``src_dir``, sending only the files whose size or
        modification time differ -- or, with ``checksum``, whose content
        differs (both ends read every file of equal size).  Each file is
        replaced atomically; the tree as a whole is not.  ``delete`` removes
        what is on the slave and not in ``src_dir``.  Two turns in all: the
        slave's manifest, then the changes.

        Returns a :class:`~remsh.master.tree.SyncResult` (``sent_files``,
        ``sent_bytes``, ``deleted``, ``unchanged``).

        :raises LocalError: as for :meth:`send_tree` (nothing was changed
            when it is a special file; a file unreadable midway leaves what
            was already replaced)
        :raises NotFoundError: the directory that should hold ``dest`` does not exist
        :raises FailedError: ``dest`` is not a directory, or writing failed
        """
        return _tree.sync_tree(self, src_dir, dest, delete, checksum, progress)


class _Overdue(Exception):
    """An ``execute`` with a ``timeout`` passed it (raised inside the call)."""
