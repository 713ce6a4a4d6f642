"""The control protocol's vocabulary: its channel, its operations, its events.

:mod:`remsh.control` serves and uses the control socket; this module says
what travels on it, in one place and both ways:

- :class:`Channel`: boxes (:mod:`remsh.wire` framing) over a connected UNIX
  socket;
- :data:`CONTROL_OPS`: every request the master answers, with the keys it
  takes and their kinds.  :func:`encode_request` and :func:`decode_request`
  are driven by the table, and the master dispatches on it (one handler per
  operation, ``ControlOp.handler``);
- :data:`EVENTS`: every event box the master sends, with its keys and their
  kinds; :func:`encode_event` and :func:`decode_event` are driven by that
  table;
- :data:`CONTROLS`: the keys of the control boxes a client sends while its
  job runs (stdin, its end, an interrupt): :func:`encode_control`,
  :func:`decode_control`.

A key's kind says how its value is written: ``text`` (UTF-8), ``path``
(the file system's encoding, any bytes), ``bytes`` (as they are), ``list``
(items NUL-joined, :func:`~remsh.wire.encode_list`), ``int``, ``float``
(finite), ``flag`` (``y`` when set, absent otherwise) and ``json``.  Keys a
side does not know are ignored (a newer client or master adds keys, never
changes one).

Rejected: JSON lines.  Output chunks are bytes of any kind; boxes carry them
as they are, with the limits and the decoder the slave connections already
use and test.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import select
import socket
import struct
import threading
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from remsh.errors import UsageError
from remsh.transports.base import cut_and_close
from remsh.wire import MAX_VALUE_LENGTH, Box, BoxDecoder, decode_int, decode_list, encode_box, encode_int, encode_list

#: Version of the control protocol.
VERSION = b"1"
#: Bound on one blocked send to a peer that does not read (a paused pager).
SEND_TIMEOUT = 600.0
#: Largest box either side accepts.
MAX_BOX = 256 * 1024

KINDS = ("text", "path", "bytes", "list", "int", "float", "flag", "json")


@dataclasses.dataclass(frozen=True)
class Key:
    """One key of a request or an event: its name, its kind, and whether it
    must be there."""

    name: str
    kind: str = "text"
    required: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown key kind {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class ControlOp:
    """One request of the control protocol: its keys, whether it starts a
    job (then control boxes may follow it), and the master's handler (a
    method name of the master's connection object)."""

    name: str
    keys: Tuple[Key, ...]
    summary: str
    job: bool = False

    @property
    def handler(self) -> str:
        return f"op_{self.name}"


_CHOICE = (Key("targets", "list"), Key("where", "list"), Key("parallel", "int"), Key("detach", "flag"),
           Key("batch"), Key("max_fail", "int"))

#: Every request the master answers.
CONTROL_OPS: Dict[str, ControlOp] = {op.name: op for op in (
    ControlOp("ls", (Key("targets", "list"), Key("where", "list")),
              "the slaves (those targets and where choose): a slave event each, then done"),
    ControlOp("run", (Key("args", "list", True), Key("cwd", "path"), Key("timeout", "float"),
                      Key("stdin", "flag")) + _CHOICE,
              "run a command on the chosen slaves as a job; job, then (unless detach) its events", job=True),
    ControlOp("put", (Key("src", "path", True), Key("dest", "path", True), Key("sync", "flag"),
                      Key("delete", "flag"), Key("checksum", "flag"), Key("force", "flag"),
                      Key("parents", "flag")) + _CHOICE,
              "copy a local file or tree to the chosen slaves as a job", job=True),
    ControlOp("get", (Key("src", "path", True), Key("dest", "path", True), Key("max_bytes", "int"),
                      Key("max_files", "int"), Key("force", "flag")) + _CHOICE,
              "copy a file or tree from the chosen slaves into DEST/NAME/ as a job", job=True),
    ControlOp("jobs", (Key("running", "flag"), Key("limit", "int"), Key("id", "text")),
              "the stored jobs, newest first (with id: that job alone): a jobrec and its jobslave events "
              "each, then done"),
    ControlOp("job", (Key("id", "text", True), Key("follow", "flag")),
              "a job's stored events (jobrec, begin, out, progress, state, end), live until it ends with follow"),
    ControlOp("cancel", (Key("id", "text", True),), "cancel a running job; done, or fail (exit 2)"),
    ControlOp("web", (), "the web dashboard's URL with its token: a web event, then done; fail (exit 2) when "
                         "the master serves none"),
)}

#: Every event the master sends (key ``ev``).
EVENTS: Dict[str, Tuple[Key, ...]] = {
    "slave": tuple(Key(k) for k in ("name", "transport", "peer", "since", "platform", "python", "remsh",
                                     "state", "hostname", "basedir", "root")) + (
        Key("no_execute", "flag"), Key("allow_command", "list"), Key("job"), Key("master")),
    "job": (Key("id", required=True),),
    "begin": (Key("names", "list"),),
    "out": (Key("slave"), Key("stream"), Key("data", "bytes")),
    "progress": (Key("slave"), Key("done", "int"), Key("total", "int")),
    "end": (Key("slave"), Key("status", "int"), Key("error"), Key("errtag"), Key("duration_ms", "int"),
            Key("summary"), Key("truncated", "flag")),
    "state": (Key("slave"), Key("state"), Key("detail")),
    "alive": (),
    "web": (Key("url"),),
    "fail": (Key("message"), Key("exit", "int"), Key("errtag")),
    "done": (Key("interrupted", "flag"), Key("state")),
    "jobrec": (Key("id"), Key("kind"), Key("state"), Key("uid", "int"), Key("started", "float"),
               Key("finished", "float"), Key("spec", "json")),
    "jobslave": (Key("job"), Key("name"), Key("state"), Key("exit_status", "int"), Key("error"), Key("errtag"),
                 Key("started", "float"), Key("finished", "float"), Key("stdout_bytes", "int"),
                 Key("stderr_bytes", "int"), Key("truncated", "flag")),
}


#: The control boxes a client may send while its attached job runs.
CONTROLS: Tuple[Key, ...] = (Key("stdin", "bytes"), Key("stdin_eof", "flag"), Key("interrupt", "flag"))


# -- values ------------------------------------------------------------------------------


def _encode_value(key: Key, value: Any) -> Optional[bytes]:
    """``value`` as ``key``'s kind writes it; ``None`` leaves the key out."""
    if value is None or (key.kind == "flag" and not value):
        return None
    if key.kind == "flag":
        return b"y"
    if key.kind == "list":
        return encode_list(os.fsencode(v) for v in value)
    if key.kind == "int":
        return encode_int(int(value))
    if key.kind == "float":
        return repr(float(value)).encode()
    if key.kind == "json":
        data = json.dumps(value, sort_keys=True).encode()
        return data if len(data) <= MAX_VALUE_LENGTH else b'{"truncated": true}'
    if key.kind == "bytes":
        return bytes(value)
    if key.kind == "path":
        return os.fsencode(value)
    return str(value).encode("utf-8", "replace")[:MAX_VALUE_LENGTH]


def _decode_value(key: Key, data: bytes) -> Any:
    """``data`` read as ``key``'s kind.  :raises ValueError: it is not one"""
    if key.kind == "flag":
        return data == b"y"
    if key.kind == "list":
        return [os.fsdecode(v) for v in decode_list(data)]
    if key.kind == "int":
        return decode_int(data)
    if key.kind == "float":
        value = float(data.decode("ascii"))
        if not math.isfinite(value):
            raise ValueError(f"{key.name}: not a finite number")
        return value
    if key.kind == "json":
        return json.loads(data.decode("utf-8"))
    if key.kind == "bytes":
        return data
    if key.kind == "path":
        return os.fsdecode(data)
    return data.decode("utf-8", "replace")


def _empty(key: Key) -> Any:
    return False if key.kind == "flag" else [] if key.kind == "list" else None


# -- requests ----------------------------------------------------------------------------


def encode_request(op: str, values: Mapping[str, Any]) -> Dict[bytes, bytes]:
    """The request box of ``op`` with ``values`` (``None`` and false flags
    left out).

    :raises UsageError: a value too long for the protocol
    :raises ValueError: an unknown operation or key (a bug of the caller)
    """
    spec = CONTROL_OPS[op]
    keys = {k.name: k for k in spec.keys}
    box: Dict[bytes, bytes] = {b"op": op.encode(), b"version": VERSION}
    for name, value in values.items():
        if name not in keys:
            raise ValueError(f"control request {op} has no key {name!r}")
        encoded = _encode_value(keys[name], value)
        if encoded is None:
            continue
        if len(encoded) > MAX_VALUE_LENGTH:
            raise UsageError(f"{name} is too long for the control protocol")
        box[name.encode()] = encoded
    return box


def decode_request(box: Box) -> Tuple[ControlOp, Dict[str, Any]]:
    """The operation and its values (every declared key: absent ones
    ``None``, ``False`` or ``[]``).

    :raises UsageError: another protocol version, an unknown operation, a
        missing or malformed value (one line for the client)
    """
    if box.get(b"version", VERSION) != VERSION:
        raise UsageError("the master speaks another version of the control protocol; upgrade remsh")
    name = box.get(b"op", b"")
    spec = CONTROL_OPS.get(name.decode("ascii", "replace"))
    if spec is None:
        raise UsageError(f"unknown request {name[:40]!r}")
    values: Dict[str, Any] = {}
    for key in spec.keys:
        data = box.get(key.name.encode())
        if data is None:
            if key.required:
                raise UsageError(f"{spec.name}: {key.name} is missing")
            values[key.name] = _empty(key)
            continue
        try:
            values[key.name] = _decode_value(key, data)
        except ValueError as e:
            raise UsageError(f"{spec.name}: bad {key.name}: {e}") from None
    return spec, values


# -- events ------------------------------------------------------------------------------


@dataclasses.dataclass
class Event:
    """A decoded event: its kind and its values (every declared key)."""

    kind: str
    values: Dict[str, Any]

    def get(self, name: str, default: Any = None) -> Any:
        value = self.values.get(name)
        return default if value is None else value


def encode_event(kind: str, /, **values: Any) -> Dict[bytes, bytes]:
    """The box of event ``kind``; text longer than a value may hold is cut.

    :raises ValueError: an unknown event or key, or bytes too long (a bug)
    """
    box: Dict[bytes, bytes] = {b"ev": kind.encode()}
    box.update(_encode_keys(EVENTS[kind], values, f"event {kind} has no key"))
    return box


def slave_event(row: Mapping[str, Any]) -> Dict[bytes, bytes]:
    """The ``slave`` event of a row of :meth:`FleetCollection.describe
    <remsh.fleet.FleetCollection.describe>` (``None`` as empty): what
    ``remsh ls`` and the dashboard's ``/api/slaves`` show."""
    return encode_event("slave", **{k: v if isinstance(v, (bool, list)) else "" if v is None else str(v)
                                    for k, v in row.items()})


def out_events(name: str, stream: str, data: bytes) -> List[Dict[bytes, bytes]]:
    """``out`` events for a chunk of output of any size."""
    chunks = [data[i:i + MAX_VALUE_LENGTH] for i in range(0, len(data), MAX_VALUE_LENGTH)] or [b""]
    return [encode_event("out", slave=name, stream=stream, data=chunk) for chunk in chunks]


def decode_event(box: Box) -> Event:
    """The event a box carries (an unknown kind: no values).

    :raises ValueError: a malformed value
    """
    kind = box.get(b"ev", b"").decode("ascii", "replace")
    values: Dict[str, Any] = {}
    for key in EVENTS.get(kind, ()):
        data = box.get(key.name.encode())
        values[key.name] = _empty(key) if data is None else _decode_value(key, data)
    return Event(kind, values)


def encode_control(**values: Any) -> Dict[bytes, bytes]:
    """A control box (:data:`CONTROLS`).  :raises ValueError: an unknown key"""
    return _encode_keys(CONTROLS, values, "no control box key")


def _encode_keys(declared: Tuple[Key, ...], values: Dict[str, Any], unknown: str) -> Dict[bytes, bytes]:
    """``values`` encoded by the keys ``declared`` (a value of ``None``: left
    out); :class:`ValueError` ``"UNKNOWN 'name'"`` for a key not declared."""
    keys = {k.name: k for k in declared}
    box: Dict[bytes, bytes] = {}
    for name, value in values.items():
        if name not in keys:
            raise ValueError(f"{unknown} {name!r}")
        encoded = _encode_value(keys[name], value)
        if encoded is not None:
            box[name.encode()] = encoded
    return box


def decode_control(box: Box) -> Dict[str, Any]:
    """A control box's values (every key of :data:`CONTROLS`; absent flags
    false, absent data ``None``)."""
    values: Dict[str, Any] = {}
    for key in CONTROLS:
        data = box.get(key.name.encode())
        values[key.name] = _empty(key) if data is None else _decode_value(key, data)
    return values


# -- the channel -------------------------------------------------------------------------


class Channel:
    """Boxes over a connected UNIX socket: sends from any thread (one lock),
    reads from one."""

    def __init__(self, sock: socket.socket) -> None:
        # blocking, with the send bound in the kernel (SO_SNDTIMEO) and reads
        # bounded by select: a socket timeout would bind both at once, and
        # the reading thread's short waits would break a long send
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(SEND_TIMEOUT), 0))
        self.sock = sock
        self._decoder = BoxDecoder(max_box_bytes=MAX_BOX)
        self._pending: List[Box] = []
        self._send_lock = threading.Lock()
        self.closed = False

    def send(self, box: Dict[bytes, bytes]) -> None:
        """Send one box.  :raises OSError: the peer is gone or stopped reading"""
        self.send_all([box])

    def send_all(self, boxes: Iterable[Dict[bytes, bytes]]) -> None:
        """Send boxes in one write.  :raises OSError: as :meth:`send`"""
        data = b"".join(encode_box(box) for box in boxes)
        if not self._send_lock.acquire(timeout=SEND_TIMEOUT):
            raise TimeoutError("control socket: send lock not free")
        try:
            self.sock.sendall(data)
        finally:
            self._send_lock.release()

    def read(self, timeout: Optional[float]) -> Optional[Box]:
        """The next box, or ``None`` at the end of the stream.

        :raises TimeoutError: nothing complete arrived within ``timeout``
        :raises ProtocolError: the peer broke the framing
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._pending:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError("control socket: nothing received in time")
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                raise TimeoutError("control socket: nothing received in time")
            data = self.sock.recv(65536)
            if not data:
                if self._decoder.in_box:
                    raise ConnectionResetError("control socket closed in the middle of a box")
                return None
            self._pending.extend(self._decoder.feed(data))
        return self._pending.pop(0)

    def close(self) -> None:
        self.closed = True
        cut_and_close(self.sock)
