"""The ``execute`` conversation on both ends, as objects that do no I/O.

The master's side, :class:`ExecuteCall`, owns the state of one call::

    idle --request()--> requested --start reply--> running --final box--> done
                             \\--error box--------------------------------/

An :meth:`ExecuteCall.interrupt` made while the call is still idle (waiting
for its turn on the slave) is kept and sent right behind the request, so an
interrupt is never lost to a race with the start.  The object turns the
caller's arguments into the request bytes and each box from the slave into
one event (:class:`Started`, :class:`Output`, :class:`Exited`,
:class:`Failed`, or ``None`` for a liveness box); a box the state does not
allow raises :class:`~remsh.errors.ProtocolError` at once.

The slave's side, :class:`ExecuteControl`, classifies the boxes the master
sends while a command runs (stdin data, end of stdin, interrupt, anything
else) and makes the boxes the slave sends (output, exit status, time-out).

The synchronous drivers are :meth:`remsh.master.slave.Slave.execute` and
:mod:`remsh.slave.execute`; an asynchronous front end would drive the same
objects.
"""

from __future__ import annotations

import enum
import math
import os
from typing import Mapping, NamedTuple, Optional, Sequence, Tuple, Union

from remsh.errors import CommandTimeout, ProtocolError, RemoteError, UsageError, remote_error
from remsh.ops import EXECUTE, error_box, is_progress
from remsh.wire import (DEFAULT_MAX_BOX_BYTES, DEFAULT_MAX_KEYS, END_OF_BOX, MAX_KEY_LENGTH, MAX_VALUE_LENGTH,
                        Box, decode_int, encode_box, encode_list)

PathArg = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]
EnvArg = Mapping[Union[str, bytes], Optional[Union[str, bytes]]]

INTERRUPT_BOX = encode_box({b"interrupt": b"y"})
STDIN_EOF_BOX = encode_box({b"stream": b"stdin", b"eof": b"y"})


class State(enum.Enum):
    IDLE = "idle"
    REQUESTED = "requested"
    RUNNING = "running"
    DONE = "done"


class Started(NamedTuple):
    """The command has started on the slave."""


class Output(NamedTuple):
    """Bytes the command wrote to ``stream`` (``stdout`` or ``stderr``)."""

    stream: str
    data: bytes


class Exited(NamedTuple):
    """The command ended with ``code`` (``-N`` for signal N)."""

    code: int


class Failed(NamedTuple):
    """The slave answered an error box (could not start, timed out, ...)."""

    error: RemoteError


Event = Union[Started, Output, Exited, Failed, None]


class ExecuteCall:
    """The master's side of one ``execute`` (see the module docstring).

    :raises UsageError: from the constructor, for arguments that cannot make
        a valid request (empty ``args``, a bad ``timeout``, names too long)
    """

    def __init__(self, args: Sequence[PathArg], *, want_stdout: bool, want_stderr: bool,
                 want_stdin: bool = False, cwd: Optional[PathArg] = None,
                 timeout: Optional[float] = None, env: Optional[EnvArg] = None,
                 keep_processes: bool = False) -> None:
        argv = [os.fsencode(a) for a in args]
        if not argv:
            raise UsageError("args is empty")
        if timeout is not None and not 0 < timeout < math.inf:
            raise UsageError("timeout must be a positive, finite number")
        sets = {os.fsencode(k): os.fsencode(v) for k, v in (env or {}).items() if v is not None}
        unsets = {os.fsencode(k): b"" for k, v in (env or {}).items() if v is None}
        if (len(encode_list(argv)) > MAX_VALUE_LENGTH
                or any(len(k) + 4 > MAX_KEY_LENGTH or len(v) > MAX_VALUE_LENGTH for k, v in sets.items())
                or any(len(k) + 6 > MAX_KEY_LENGTH for k in unsets)):
            raise UsageError("arguments or variable names too long for one box")
        self._request = EXECUTE.encode(
            args=argv, want_stdout=want_stdout, want_stderr=want_stderr,
            want_stdin=True if want_stdin else None,
            cwd=None if cwd is None else os.fsencode(cwd), timeout=timeout,
            keep_processes=True if keep_processes else None, env_=sets, unset_=unsets)
        if (len(self._request) > DEFAULT_MAX_BOX_BYTES
                or 2 + len(sets) + len(unsets) + 7 > DEFAULT_MAX_KEYS):
            raise UsageError("the request is larger than one box may be (too many or too long "
                             "arguments or variables)")
        self.state = State.IDLE
        self.interrupt_wanted = False
        self._interrupt_sent = False
        #: the command reads stdin from the master
        self.want_stdin = want_stdin

    @classmethod
    def resumed(cls, state: State) -> "ExecuteCall":
        """The master's side of a call whose request an earlier master made
        (:mod:`remsh.jobadopt`): in ``state`` (``REQUESTED`` while its start
        reply is still to come, else ``RUNNING``), with no request to make
        and no stdin to send."""
        if state not in (State.REQUESTED, State.RUNNING):
            raise UsageError(f"execute: cannot resume a call in state {state.value}")
        call = cls(["-"], want_stdout=True, want_stderr=True)
        call.state = state
        return call

    def request(self) -> bytes:
        """The request (followed by the interrupt, if one is already wanted)."""
        if self.state is not State.IDLE:
            raise UsageError("execute: request already made")
        self.state = State.REQUESTED
        if self.interrupt_wanted:
            self._interrupt_sent = True
            return self._request + INTERRUPT_BOX
        return self._request

    def interrupt(self) -> Optional[bytes]:
        """Ask for the command to be killed; returns the bytes to send now,
        or ``None`` (nothing to send: already sent, not requested yet -- then
        :meth:`request` carries it -- or the conversation is over)."""
        if self.state is State.DONE:
            return None
        self.interrupt_wanted = True
        if self.state is State.IDLE or self._interrupt_sent:
            return None
        self._interrupt_sent = True
        return INTERRUPT_BOX

    def stdin_box(self, data: bytes) -> bytes:
        """A box of stdin data (empty ``data``: the end of stdin)."""
        if not data:
            return STDIN_EOF_BOX
        return encode_box({b"stream": b"stdin", b"data": data})

    def receive(self, box: Box) -> Event:
        """The event ``box`` from the slave means (``None``: a liveness box).

        :raises ProtocolError: the box is not allowed in this state
        """
        if self.state is State.REQUESTED:
            if b"errtag" in box:
                self.state = State.DONE
                return Failed(_error(box))
            if box:
                self.state = State.DONE
                raise ProtocolError(f"expected the start reply, got keys {sorted(box)[:8]}")
            self.state = State.RUNNING
            return Started()
        if self.state is State.RUNNING:
            stream = box.get(b"stream")
            if stream is not None:
                if stream not in (b"stdout", b"stderr"):
                    self.state = State.DONE
                    raise ProtocolError(f"output on unknown stream {stream[:20]!r}")
                return Output(stream.decode("ascii"), box.get(b"data", b""))
            if is_progress(box):
                return None
            self.state = State.DONE
            if b"errtag" in box:
                return Failed(_error(box))
            if b"result" not in box:
                raise ProtocolError(f"expected the final execute box, got keys {sorted(box)[:8]}")
            try:
                return Exited(decode_int(box[b"result"]))
            except ValueError:
                raise ProtocolError(f"bad exit code {box[b'result'][:20]!r}") from None
        raise ProtocolError(f"execute: box from the slave in state {self.state.value}")


def _error(box: Box) -> RemoteError:
    return remote_error(box[b"errtag"].decode("ascii", "replace"),
                        box.get(b"error", b"").decode("utf-8", "replace"))


# -- the slave's side ---------------------------------------------------------------


class Interrupt(NamedTuple):
    """Kill the command's process group."""


class Stdin(NamedTuple):
    """Bytes for the command's stdin, and whether stdin ends after them."""

    data: bytes
    eof: bool


class Ignored(NamedTuple):
    """A box with no meaning during ``execute`` (logged, otherwise ignored)."""

    reason: str


Control = Union[Interrupt, Stdin, Ignored]


class ExecuteControl:
    """The slave's side of a running ``execute`` (see the module docstring)."""

    @staticmethod
    def receive(box: Box) -> Control:
        """What a box from the master asks for while the command runs.

        A stdin box may carry both ``data`` and ``eof: y``: the data is
        written, then stdin is closed."""
        if box.get(b"interrupt") == b"y":
            return Interrupt()
        if box.get(b"stream") == b"stdin":
            return Stdin(box.get(b"data", b""), box.get(b"eof") == b"y")
        return Ignored(f"unexpected box during execute: keys {sorted(box)[:8]}")

    @staticmethod
    def output_box(stream: bytes, data: bytes) -> Box:
        return {b"stream": stream, b"data": data}

    @staticmethod
    def output_head(stream: bytes) -> Tuple[bytes, bytes]:
        """The encoded keys that come before the data in every output box of
        ``stream``, and the data's key: :meth:`output_box` in two parts, for
        a sender that lets the kernel move the data (``Wire.send_values_spliced``)."""
        return encode_box({b"stream": stream})[:-len(END_OF_BOX)], b"data"

    @staticmethod
    def exit_box(code: int) -> Box:
        return {b"result": str(code).encode("ascii")}

    @staticmethod
    def timeout_box(seconds: float) -> Box:
        return error_box(CommandTimeout(f"command timed out after {seconds:g} s and was killed"))
