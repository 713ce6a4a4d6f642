"""The table of operations: every operation of the protocol, declared once.

Each :class:`Operation` names its ``meth``, its version, the keys of its
request (with their types and which are optional), the keys of its reply, the
error classes it may raise beyond the ones every operation may raise, and two
facts the connection machinery needs: whether the operation is safe to repeat
(``idempotent``) and whether it may run long enough to need liveness boxes
(``long``).  In the spirit of AMP's ``Command`` classes, both ends use the
same declaration:

- the slave builds its dispatch from :data:`OPERATIONS` (a handler
  ``op_<meth>`` for every entry, nothing else reachable) and parses every
  request with :meth:`Operation.parse`, which answers ``invalid`` for a
  missing key or a value of the wrong type;
- the master encodes its requests with :meth:`Operation.encode`;
- the tests that walk "every operation" (malformed requests, calls on a
  disconnected slave, the protocol reference's summary table, the demo)
  iterate over :data:`OPERATIONS`, so an operation left out of one place
  fails a test.

The operations of more than one box (``conversation``: execute, send,
fetch and the three tree operations) are declared here like the others
(their request keys and errors); their conversations are objects of their
own on the master's side (:mod:`remsh.conversation`,
:mod:`remsh.protocol.transfer`, :mod:`remsh.protocol.trees`) and handlers of
the slave's.

This module does no I/O.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Type

from remsh.errors import (CommandTimeout, DeniedError, ExecFailedError, FailedError,
                          InvalidMethError, InvalidRequestError, NotFoundError, OpenFailedError,
                          RemoteError, RemoteFileExistsError, UnexpectedError,
                          VersionTooNewError, VersionUnsupportedError)
from remsh.wire import (MAX_VALUE_LENGTH, Box, decode_bool, decode_int, decode_list, encode_bool,
                        encode_box, encode_int, encode_list)

#: The operation version this implementation speaks (every operation).
OP_VERSION = 1
OP_VERSION_BYTES = b"1"

#: Default bound (seconds) on each wait for a box from the peer inside an
#: operation, on both ends (the output of a running command is bounded by the
#: command's own ``timeout`` instead).
DEFAULT_IO_TIMEOUT = 120.0

#: The shortest interval (seconds) between liveness boxes a slave accepts to
#: send, whatever a request asks for.
MIN_PROGRESS_INTERVAL = 0.05

#: The key of the liveness box (``{progress: y}``) a slave sends during a
#: long operation.
PROGRESS_KEY = b"progress"

#: Error classes every operation may raise.
COMMON_ERRORS: Tuple[Type[RemoteError], ...] = (
    InvalidMethError, VersionTooNewError, VersionUnsupportedError, InvalidRequestError,
    UnexpectedError, DeniedError,
)


# -- value types ---------------------------------------------------------------

def _path(name: str, value: bytes) -> bytes:
    if not value or b"\0" in value:
        raise InvalidRequestError(f"{name!r} must be a non-empty path without NUL")
    return value


def _optional_path(name: str, value: bytes) -> bytes:
    """A path where empty has a meaning (``set_cwd``'s ``cwd``)."""
    if b"\0" in value:
        raise InvalidRequestError(f"{name!r} contains a NUL byte")
    return value


def _int(name: str, value: bytes) -> int:
    try:
        return decode_int(value)
    except ValueError:
        raise InvalidRequestError(f"{name!r} must be a decimal integer") from None


def _mode(name: str, value: bytes) -> int:
    mode = _int(name, value)
    if not 0 <= mode <= 0o7777:
        raise InvalidRequestError(f"{name!r} out of range: {mode}")
    return mode


def _bool(name: str, value: bytes) -> bool:
    try:
        return decode_bool(value)
    except ValueError:
        raise InvalidRequestError(f"{name!r} must be y or n") from None


def _args(name: str, value: bytes) -> List[bytes]:
    if not value:
        raise InvalidRequestError(f"{name!r} is empty")
    return decode_list(value)


def _seconds(name: str, value: bytes) -> float:
    try:
        seconds = float(value.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequestError(f"{name!r} must be a number of seconds") from None
    if not 0 < seconds < math.inf:
        raise InvalidRequestError(f"{name!r} must be a positive, finite number of seconds")
    return seconds


def _bytes(name: str, value: bytes) -> bytes:
    return value


_DECODERS: Dict[str, Callable[[str, bytes], Any]] = {
    "path": _path, "cwd": _optional_path, "int": _int, "mode": _mode, "bool": _bool,
    "args": _args, "seconds": _seconds, "bytes": _bytes,
}


def _encode_value(kind: str, value: Any) -> bytes:
    if kind == "bool":
        return encode_bool(bool(value))
    if kind in ("int", "mode"):
        return encode_int(int(value))
    if kind == "args":
        return encode_list(os.fsencode(v) for v in value)
    if kind == "seconds":
        return repr(float(value)).encode("ascii")
    return os.fsencode(value)


@dataclass(frozen=True)
class Key:
    """One key of a request or reply box."""

    name: str
    #: ``path`` (non-empty, no NUL), ``cwd`` (may be empty, no NUL), ``int``,
    #: ``mode`` (0..0o7777), ``bool`` (``y``/``n``), ``args`` (NUL-joined,
    #: non-empty), ``seconds`` (positive finite decimal), ``bytes`` (any)
    kind: str = "path"
    optional: bool = False
    #: a family of keys sharing this prefix (``env_`` + variable name)
    prefix: bool = False
    doc: str = ""
    #: the only values the key may hold (empty: any value of its kind)
    choices: Tuple[bytes, ...] = ()

    @property
    def wire(self) -> bytes:
        return self.name.encode("ascii")


@dataclass(frozen=True)
class Operation:
    """One operation of the protocol (see the module docstring)."""

    meth: str
    request: Tuple[Key, ...] = ()
    reply: Tuple[Key, ...] = ()
    errors: Tuple[Type[RemoteError], ...] = ()
    version: int = OP_VERSION
    #: safe to send again after a lost connection (a second run changes
    #: nothing a first run did not)
    idempotent: bool = False
    #: may take long enough that the slave sends liveness boxes while it runs
    long: bool = False
    #: more than one box each way (a conversation object drives it)
    conversation: bool = False
    summary: str = field(default="", compare=False)

    @property
    def wire(self) -> bytes:
        return self.meth.encode("ascii")

    @property
    def all_errors(self) -> Tuple[Type[RemoteError], ...]:
        """Every error class this operation may raise."""
        return COMMON_ERRORS + self.errors

    @property
    def errtags(self) -> Tuple[str, ...]:
        """The tags of this operation's own errors."""
        return tuple(cls.errtag for cls in self.errors)

    def parse(self, box: Box) -> Dict[str, Any]:
        """The request's arguments by key name (prefix families as dicts of
        suffix -> value).

        :raises InvalidRequestError: a required key is missing or a value is
            malformed (unknown keys are ignored)
        """
        args: Dict[str, Any] = {}
        for key in self.request:
            decode = _DECODERS[key.kind]
            if key.prefix:
                wire = key.wire
                args[key.name] = {k[len(wire):]: decode(key.name, v) for k, v in box.items()
                                  if k.startswith(wire) and len(k) > len(wire)}
                continue
            value = box.get(key.wire)
            if value is None:
                if not key.optional:
                    raise InvalidRequestError(f"missing key {key.name!r}")
                args[key.name] = None
                continue
            args[key.name] = decode(key.name, value)
        return args

    def parse_reply(self, box: Box) -> Dict[str, Any]:
        """The final reply box's values by key name, decoded as :attr:`reply`
        declares them (prefix families as dicts of suffix -> value): the
        master reads replies only through this.

        :raises ValueError: a declared key is missing, malformed or not one
            of its ``choices`` (the caller reports it as a protocol error
            naming slave and operation)
        """
        values: Dict[str, Any] = {}
        for key in self.reply:
            decode = _DECODERS[key.kind]
            try:
                if key.prefix:
                    wire = key.wire
                    values[key.name] = {k[len(wire):]: decode(key.name, v) for k, v in box.items()
                                        if k.startswith(wire) and len(k) > len(wire)}
                    continue
                raw = box.get(key.wire)
                if raw is None:
                    if key.optional:
                        values[key.name] = None
                        continue
                    raise ValueError(f"reply has no {key.name!r}")
                if key.choices and raw not in key.choices:
                    raise ValueError(f"bad {key.name} {raw[:20]!r}")
                values[key.name] = decode(key.name, raw)
            except InvalidRequestError as e:
                raise ValueError(f"reply: {e.remote_message}") from None
        return values

    @functools.cached_property
    def bare_request(self) -> bytes:
        """The request without arguments, encoded once (a ping's, a
        ``getcwd``'s: sent as these bytes every time)."""
        return self.encode()

    def encode(self, **values: Any) -> bytes:
        """The request box, encoded; ``None`` values are left out, a prefix
        family is given as a mapping of suffix -> value.

        :raises TypeError: a required value is missing
        """
        box: Dict[bytes, bytes] = {b"meth": self.wire, b"version": encode_int(self.version)}
        for key in self.request:
            value = values.pop(key.name, None)
            if value is None:
                if not key.optional:
                    raise TypeError(f"{self.meth}: missing argument {key.name!r}")
                continue
            if key.prefix:
                for suffix, item in value.items():
                    box[key.wire + os.fsencode(suffix)] = _encode_value(key.kind, item)
            else:
                box[key.wire] = _encode_value(key.kind, value)
        if values:
            raise TypeError(f"{self.meth}: unknown arguments {sorted(values)}")
        return encode_box(box)


def _k(name: str, kind: str = "path", optional: bool = False, prefix: bool = False, doc: str = "",
       choices: Tuple[bytes, ...] = ()) -> Key:
    return Key(name, kind, optional, prefix, doc, choices)


#: the optional request key with which a master asks for liveness boxes: the
#: interval (seconds) at which it wants them (it picks a fraction of its own
#: reply deadline)
_PROGRESS = _k("progress", "seconds", optional=True, doc="send {progress: y} every this many seconds")

SET_CWD = Operation(
    "set_cwd", (_k("cwd", "cwd", optional=True),), (_k("cwd"),), (NotFoundError,),
    idempotent=True, summary="change the current directory")
GETENV = Operation(
    "getenv", (), (_k("env_", "bytes", prefix=True),), (FailedError,), idempotent=True,
    summary="the slave's environment")
MKDIR = Operation(
    "mkdir", (_k("dir"), _PROGRESS), (), (FailedError,), idempotent=True, long=True,
    summary="make a directory and its parents")
UNLINK = Operation(
    "unlink", (_k("file"),), (), (NotFoundError, FailedError), summary="remove one file")
EXECUTE = Operation(
    "execute",
    (_k("args", "args"), _k("want_stdout", "bool", optional=True),
     _k("want_stderr", "bool", optional=True), _k("want_stdin", "bool", optional=True),
     _k("cwd", optional=True), _k("timeout", "seconds", optional=True),
     _k("keep_processes", "bool", optional=True),
     _k("env_", "bytes", prefix=True), _k("unset_", "bytes", prefix=True)),
    (_k("result", "int"),), (ExecFailedError, CommandTimeout), conversation=True,
    summary="run a command, streaming its output")
SEND = Operation(
    "send", (_k("dest"), _k("mode", "mode", optional=True)), (),
    (RemoteFileExistsError, OpenFailedError, FailedError), conversation=True,
    summary="write a file from the master's data")
FETCH = Operation(
    "fetch", (_k("src"),), (), (NotFoundError, OpenFailedError, FailedError), conversation=True,
    summary="read a file to the master")
REMOVE = Operation(
    "remove", (_k("path"), _PROGRESS), (), (FailedError,), idempotent=True, long=True,
    summary="remove a file or tree (rm -rf)")
RENAME = Operation(
    "rename", (_k("src"), _k("dest")), (), (RemoteFileExistsError, NotFoundError, FailedError),
    summary="rename, never replacing")
COPY = Operation(
    "copy", (_k("src"), _k("dest"), _PROGRESS), (),
    (RemoteFileExistsError, NotFoundError, FailedError), long=True,
    summary="copy a file's data")
STAT = Operation(
    "stat", (_k("path"),), (_k("result", "bytes", choices=(b"", b"d", b"f"),
                                doc="d: a directory, f: anything else, empty: nothing there"),),
    (FailedError,), idempotent=True,
    summary="d, f or nothing")
PING = Operation("ping", idempotent=True, summary="liveness check")
CHMOD = Operation(
    "chmod", (_k("path"), _k("mode", "mode")), (), (NotFoundError, FailedError), idempotent=True,
    summary="set permission bits")
SEND_TREE = Operation(
    "send_tree", (_k("dest"),), (), (RemoteFileExistsError, NotFoundError, FailedError), conversation=True,
    summary="build a directory tree from the master's stream, atomically")
FETCH_TREE = Operation(
    "fetch_tree", (_k("src"), _PROGRESS), (), (NotFoundError, OpenFailedError, FailedError), long=True,
    conversation=True, summary="stream a directory tree to the master")
SYNC_TREE = Operation(
    "sync_tree", (_k("dest"), _k("checksum", "bool", optional=True), _PROGRESS), (), (NotFoundError, FailedError),
    long=True, conversation=True, summary="report a directory tree, then apply the master's changes")

#: Every operation, by ``meth``.
OPERATIONS: Dict[str, Operation] = {op.meth: op for op in (
    SET_CWD, GETENV, MKDIR, UNLINK, EXECUTE, SEND, FETCH, REMOVE, RENAME, COPY, STAT, PING, CHMOD,
    SEND_TREE, FETCH_TREE, SYNC_TREE)}


def error_box(error: RemoteError) -> Box:
    """The error box for ``error``: its class's ``errtag`` and its message
    (cut to fit one value)."""
    data = error.remote_message.encode("utf-8", "replace")[:MAX_VALUE_LENGTH]
    return {b"error": data, b"errtag": error.errtag.encode("ascii")}


def os_message(e: OSError) -> str:
    """An ``OSError`` as a message for an error box: cause and file name."""
    parts = [e.strerror or str(e)]
    if e.filename is not None:
        fn = e.filename
        parts.append(os.fsdecode(fn) if isinstance(fn, bytes) else str(fn))
    return ": ".join(parts)


def is_progress(box: Mapping[bytes, bytes]) -> bool:
    """Whether ``box`` is a slave's liveness box during a long operation."""
    return len(box) == 1 and box.get(PROGRESS_KEY) == b"y"


def check_version(meth: str, value: Optional[bytes]) -> None:
    """Refuse a request whose operation version is not this slave's.

    The version is a decimal integer; ``1`` and any other spelling of one
    (``01``) are accepted.

    :raises InvalidRequestError: no version, or not a decimal integer
    :raises VersionTooNewError: newer than this slave's
    :raises VersionUnsupportedError: older than this slave supports
    """
    if value == OP_VERSION_BYTES:
        return
    if value is None:
        raise InvalidRequestError("request has no valid 'version' key")
    try:
        version = decode_int(value)
    except ValueError:
        raise InvalidRequestError("request has no valid 'version' key") from None
    if version > OP_VERSION:
        raise VersionTooNewError(f"{meth} version {version} is newer than this slave's ({OP_VERSION})")
    if version < OP_VERSION:
        raise VersionUnsupportedError(f"version {version} is no longer supported")
