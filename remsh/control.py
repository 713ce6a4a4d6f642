"""The control socket of a long-running ``remsh master``, both ends.

A ``remsh master`` holds the listeners and the collection of slaves; the
``remsh ls/run/put/get`` commands reach it through a UNIX socket, the
*control socket*.  That socket is the power to run anything on every slave,
so only the master's own user may use it:

- the socket is created mode 0600 in a directory the master creates mode
  0700; a directory that already exists must belong to the master's user
  and be writable by no one else, or the master refuses to start (whoever
  can write there can replace the socket, or plant a link where the lock
  file goes);
- the lock file is opened without following a symbolic link and must be a
  regular file of the master's user;
- every connection's peer uid is read from the kernel (``SO_PEERCRED`` on
  Linux and OpenBSD, ``LOCAL_PEERCRED`` on macOS and FreeBSD:
  :data:`PEER_CREDENTIALS`) and the connection is refused unless it is the
  master's uid, or when the uid cannot be read at all.  The client checks
  the master's uid the same way.  Rejected: trusting the mode bits alone
  where the system cannot tell the peer (a socket's mode is not honoured
  everywhere, and a wrong mode is one ``chmod`` away).

Nothing secret ever goes back to a client: slave facts, output and error
text only.

One master per socket: the master holds an exclusive ``flock`` on
``PATH.lock`` for its life.  A second master finds the lock taken (or a
live socket) and stops with exit status 2; a socket left by a master that
died is replaced.

Protocol
========

Boxes (:mod:`remsh.wire` framing) both ways.  The client sends one request
box, then (for ``run``/``put``/``get``) control boxes; the master answers
with event boxes and closes the connection after the last one.

Requests (``op`` and ``version: 1``, then the operation's keys; lists are
NUL-joined, :func:`~remsh.wire.encode_list`)::

    {op: ls}
    {op: run, args: LIST, targets: LIST, where: LIST, [cwd], [timeout],
     [stdin: y], [parallel]}
    {op: put, src: ABSOLUTE LOCAL PATH, dest, targets, where, [sync: y],
     [delete: y], [checksum: y], [parallel]}
    {op: get, src: REMOTE PATH, dest: ABSOLUTE LOCAL DIR, targets, where,
     [parallel]}

Control boxes from the client while a job runs: ``{stdin: DATA}``,
``{stdin_eof: y}``, ``{interrupt: y}``.  A client that closes its end
interrupts the job too.

Events from the master (``ev`` key)::

    {ev: slave, name, transport, peer, since, platform, python, remsh, state}
    {ev: begin, names: LIST}
    {ev: out, slave, stream: stdout|stderr, data}
    {ev: progress, slave, done, [total]}
    {ev: end, slave, [status], [error], [errtag], duration_ms, [summary]}
    {ev: alive}                      (every few seconds while a job runs)
    {ev: fail, message, exit}        (the request was refused: one line, an
                                      exit status)
    {ev: done, [interrupted: y]}     (the last box)

The local paths of ``put``/``get`` are read and written by the master
process itself (same user, same machine), so file data never crosses the
socket.

Rejected: JSON lines.  Output chunks are bytes of any kind; boxes carry them
as they are, with the limits and the decoder the slave connections already
use and test.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import socket
import stat
import struct
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from remsh.errors import RemshError, UsageError
from remsh.files import O_CLOEXEC, O_NOFOLLOW
from remsh.peercred import PEER_CREDENTIALS, PeerCredential, PeerUnknown, peer_uid
from remsh.fleet import (EXIT_SLAVE_FAILED, EXIT_USAGE, FleetCollection, SlaveResult, StdinTee, get_job,
                         parse_where, put_job, run_job, select_slaves)
from remsh.master.fanout import Cancellation
from remsh.transports.base import cut_and_close
from remsh.wire import (MAX_VALUE_LENGTH, Box, BoxDecoder, decode_int, decode_list, encode_box, encode_int,
                        encode_list)

log = logging.getLogger(__name__)

#: Environment variable naming the control socket.
MASTER_ENV = "REMSH_MASTER"
#: Version of the control protocol.
VERSION = b"1"
#: Bound on connecting to the control socket and on the request box.
CONNECT_TIMEOUT = 10.0
#: Seconds between ``alive`` boxes while a job runs.
HEARTBEAT = 5.0
#: A client hears nothing from its master for this long: the master is hung.
CLIENT_SILENCE = 60.0
#: Bound on one blocked send to a client that does not read (a paused pager).
SEND_TIMEOUT = 600.0
#: Largest box either side accepts.
MAX_BOX = 256 * 1024
#: Most concurrent client connections.
MAX_CLIENTS = 64


class ControlError(RemshError):
    """The control socket cannot be used: no master, a master already
    running, or a refused connection.  ``exit`` is the status to exit with."""

    def __init__(self, message: str, exit: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit = exit


class NoMaster(ControlError):
    """Nothing listens at the control path (no socket file there, or a
    stale one)."""




def default_control_path() -> str:
    """``$XDG_RUNTIME_DIR/remsh/master.sock``, else ``~/.remsh/master.sock``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        return os.path.join(runtime, "remsh", "master.sock")
    return os.path.join(os.path.expanduser("~"), ".remsh", "master.sock")


def control_path(option: Optional[str]) -> Tuple[str, bool]:
    """The control path to use and whether the user named it (``--master``
    or ``$REMSH_MASTER``) rather than it being the default."""
    if option:
        return option, True
    env = os.environ.get(MASTER_ENV)
    if env:
        return env, True
    return default_control_path(), False


# -- the wire of the control socket ------------------------------------------------------


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
        data = encode_box(box)
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


def _text(value: Optional[bytes]) -> str:
    return "" if value is None else value.decode("utf-8", "replace")


def _chunks(data: bytes) -> List[bytes]:
    return [data[i:i + MAX_VALUE_LENGTH] for i in range(0, len(data), MAX_VALUE_LENGTH)] or [b""]


# -- the master's side -----------------------------------------------------------------------


def check_control_directory(directory: str) -> None:
    """Refuse a control directory that someone else could write to.

    :raises ControlError: ``directory`` is not a directory, belongs to
        another user, or is writable by group or others (one line, exit 2)
    """
    try:
        st = os.stat(directory)
    except OSError as e:
        raise ControlError(f"cannot use the control directory {directory}: {e.strerror or e}") from None
    euid = os.geteuid()
    if not stat.S_ISDIR(st.st_mode):
        raise ControlError(f"the control directory {directory} is not a directory")
    if st.st_uid != euid:
        raise ControlError(f"the control directory {directory} belongs to uid {st.st_uid}, not to this user "
                           f"(uid {euid}): not used")
    mode = stat.S_IMODE(st.st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ControlError(f"the control directory {directory} is writable by group or others "
                           f"(mode {mode:04o}): not used; make it 0700")


class ControlServer:
    """The control socket of a ``remsh master``: accepts clients of the
    master's own user and runs their requests on ``collection``.

    :meth:`start` takes the lock and binds the socket (raising
    :class:`ControlError` when another master holds it); :meth:`stop`
    closes it, removes the socket and ends running jobs.  Each client has a
    thread of its own.
    """

    def __init__(self, path: str, collection: FleetCollection, *,
                 credentials: Sequence[PeerCredential] = PEER_CREDENTIALS) -> None:
        """``credentials``: how to read a client's uid (the system's ways by
        default; with none, every client is refused)."""
        self.path = os.path.abspath(path)
        self.collection = collection
        self.credentials = tuple(credentials)
        self._sock: Optional[socket.socket] = None
        self._lock_fd: Optional[int] = None
        self._ino: Optional[int] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self._clients_lock = threading.Lock()
        self._clients: Dict[int, "_Client"] = {}

    # -- life cycle -------------------------------------------------------------

    def start(self) -> None:
        """Lock, replace a stale socket, bind, listen, accept in the background.

        :raises ControlError: another master holds the socket, or it cannot
            be made (the directory, a non-socket in the way), or the
            directory or the lock file is not safe (another user's, writable
            by others, a symbolic link)
        """
        directory = os.path.dirname(self.path)
        try:
            if not os.path.isdir(directory):
                os.makedirs(directory, mode=0o700)
                os.chmod(directory, 0o700)  # whatever the umask
            elif os.path.basename(directory) == "remsh" and self.path == default_control_path():
                st = os.stat(directory)
                if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != 0o700:
                    os.chmod(directory, 0o700)
        except OSError as e:
            raise ControlError(f"cannot make the control directory {directory}: {e.strerror or e}") from e
        check_control_directory(directory)
        fd = _open_lock(self.path + ".lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ControlError(f"a remsh master is already running on {self.path}") from None
            raise ControlError(f"cannot lock {self.path}.lock: {e.strerror or e}") from e
        self._lock_fd = fd
        try:
            self._bind()
        except BaseException:
            self._release_lock()
            raise
        self._thread = threading.Thread(target=self._accept_loop, name="remsh-control", daemon=True)
        self._thread.start()
        log.info("control socket at %s", self.path)

    def _bind(self) -> None:
        if os.path.lexists(self.path):
            st = os.lstat(self.path)
            if not stat.S_ISSOCK(st.st_mode):
                raise ControlError(f"{self.path} exists and is not a socket")
            if _answers(self.path):
                raise ControlError(f"a remsh master is already running on {self.path}")
            log.info("replacing the stale control socket %s", self.path)
            try:
                os.unlink(self.path)
            except OSError as e:
                raise ControlError(f"cannot replace the stale control socket {self.path}: {e.strerror}") from e
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is born 0600: no window with wider bits
        try:
            sock.bind(self.path)
        except OSError as e:
            sock.close()
            raise ControlError(f"cannot bind the control socket {self.path}: {e.strerror or e}") from e
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self._ino = os.lstat(self.path).st_ino
        sock.listen(16)
        self._sock = sock

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock; the file stays (no unlink race)
            self._lock_fd = None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, interrupt running jobs, remove the socket; idempotent."""
        self._stopping.set()
        sock, self._sock = self._sock, None
        if sock is not None:
            cut_and_close(sock)
            try:
                if self._ino is not None and os.lstat(self.path).st_ino == self._ino:
                    os.unlink(self.path)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout)
        with self._clients_lock:
            clients = list(self._clients.values())
        for client in clients:
            client.cancellation.cancel("the master is stopping")
        deadline = time.monotonic() + timeout
        for client in clients:
            client.join(max(0.0, deadline - time.monotonic()))
            client.channel.close()
        self._release_lock()

    # -- clients ------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            sock = self._sock
            if sock is None:
                return
            try:
                conn, _ = sock.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)  # out of descriptors: do not spin
                continue
            try:
                uid = peer_uid(conn, self.credentials)
            except PeerUnknown as e:
                log.warning("control socket: refused a connection: %s", e)
                _refuse(conn, "permission denied: the master cannot tell which user connected")
                continue
            if uid != os.geteuid():
                log.warning("control socket: refused a connection from uid %s", uid)
                _refuse(conn, "permission denied: the control socket is for the master's user only")
                continue
            with self._clients_lock:
                if len(self._clients) >= MAX_CLIENTS:
                    _refuse(conn, f"the master is serving {MAX_CLIENTS} clients; try again")
                    continue
                client = _Client(self, Channel(conn))
                self._clients[id(client)] = client
            client.start()

    def _forget(self, client: "_Client") -> None:
        with self._clients_lock:
            self._clients.pop(id(client), None)


def _open_lock(path: str) -> int:
    """Open (create) the lock file: never through a symbolic link, and only
    a regular file of this user.

    :raises ControlError: it cannot be opened, or is not such a file
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | O_CLOEXEC | O_NOFOLLOW | getattr(os, "O_NOCTTY", 0), 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP or os.path.islink(path):
            raise ControlError(f"cannot open {path}: it is a symbolic link; not followed") from None
        raise ControlError(f"cannot open {path}: {e.strerror or e}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise ControlError(f"cannot use {path}: not a regular file of this user")
    return fd


def _answers(path: str) -> bool:
    """Whether something accepts connections on the UNIX socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(path)
        except OSError:
            return False
        return True


#: Bound on a refusal: sending the ``fail`` box and waiting for the client to close.
REFUSE_TIMEOUT = 1.0


def _refuse(conn: socket.socket, message: str) -> None:
    """Send a ``fail`` box and close.  What the client already sent is read
    and dropped first (bounded): closing with unread data would reset the
    connection, and the client could lose the box that says why."""
    deadline = time.monotonic() + REFUSE_TIMEOUT
    try:
        conn.settimeout(REFUSE_TIMEOUT)
        conn.sendall(encode_box({b"ev": b"fail", b"message": message.encode(), b"exit": b"2"}))
        conn.shutdown(socket.SHUT_WR)
        drained = 0
        while drained < MAX_BOX:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            conn.settimeout(left)
            data = conn.recv(65536)
            if not data:
                break
            drained += len(data)
    except OSError:
        pass
    finally:
        conn.close()


class _ChannelSink:
    """A job's :class:`~remsh.fleet.Sink` that sends events to the client.
    A client that cannot be written to cancels the job."""

    def __init__(self, channel: Channel, cancellation: Cancellation) -> None:
        self.channel = channel
        self.cancellation = cancellation

    def _send(self, box: Dict[bytes, bytes]) -> None:
        if self.channel.closed:
            return
        try:
            self.channel.send(box)
        except OSError:
            self.cancellation.cancel("the client went away")

    def begin(self, names: List[str]) -> None:
        self._send({b"ev": b"begin", b"names": encode_list(n.encode() for n in names)})

    def output(self, name: str, stream: str, data: bytes) -> None:
        for chunk in _chunks(data):
            self._send({b"ev": b"out", b"slave": name.encode(), b"stream": stream.encode(), b"data": chunk})

    def progress(self, name: str, done: int, total: Optional[int]) -> None:
        box = {b"ev": b"progress", b"slave": name.encode(), b"done": encode_int(done)}
        if total is not None:
            box[b"total"] = encode_int(total)
        self._send(box)

    def end(self, result: SlaveResult) -> None:
        box = {b"ev": b"end", b"slave": result.name.encode(),
               b"duration_ms": encode_int(int(result.duration_s * 1000))}
        if result.status is not None:
            box[b"status"] = encode_int(result.status)
        if result.error is not None:
            box[b"error"] = result.error.encode("utf-8", "replace")[:MAX_VALUE_LENGTH]
        if result.errtag:
            box[b"errtag"] = result.errtag.encode()
        if result.summary:
            box[b"summary"] = result.summary.encode("utf-8", "replace")[:MAX_VALUE_LENGTH]
        self._send(box)


class _Client:
    """One connection to the control socket: its request, its job."""

    def __init__(self, server: ControlServer, channel: Channel) -> None:
        self.server = server
        self.channel = channel
        self.cancellation = Cancellation()
        self.tee: Optional[StdinTee] = None
        self._thread = threading.Thread(target=self._serve, name="remsh-control-client", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _serve(self) -> None:
        try:
            self._handle()
        except Exception:  # noqa: BLE001 - one client must never take the master down
            log.exception("control client failed")
        finally:
            self.server._forget(self)
            self.channel.close()

    def _fail(self, message: str, code: int = EXIT_USAGE) -> None:
        try:
            self.channel.send({b"ev": b"fail", b"message": message.encode("utf-8", "replace")[:MAX_VALUE_LENGTH],
                               b"exit": encode_int(code)})
        except OSError:
            pass

    def _handle(self) -> None:
        try:
            request = self.channel.read(CONNECT_TIMEOUT)
        except (OSError, RemshError) as e:
            log.info("control client: no request: %s", e)
            return
        if request is None:
            return
        if request.get(b"version", VERSION) != VERSION:
            self._fail("the master speaks another version of the control protocol; upgrade remsh")
            return
        op = request.get(b"op", b"")
        collection = self.server.collection
        if op == b"ls":
            for slave in sorted(collection.get_all_slaves(), key=lambda s: s.name):
                row = collection.describe(slave)
                self.channel.send({b"ev": b"slave",
                                   **{k.encode(): ("" if v is None else str(v)).encode() for k, v in row.items()}})
            self.channel.send({b"ev": b"done"})
            return
        if op not in (b"run", b"put", b"get"):
            self._fail(f"unknown request {op[:40]!r}")
            return
        try:
            job = self._prepare(op, request)
        except (UsageError, ValueError) as e:
            self._fail(str(e))
            return
        self._run(job)

    def _prepare(self, op: bytes, request: Box) -> Callable[[], List[SlaveResult]]:
        """Check the request and choose the slaves; the job, ready to go.

        :raises UsageError: a bad request, or no slave matches
        """
        patterns = [p.decode("utf-8", "replace") for p in decode_list(request.get(b"targets", b""))]
        wheres = [parse_where(w.decode("utf-8", "replace")) for w in decode_list(request.get(b"where", b""))]
        collection = self.server.collection
        slaves = select_slaves(collection.get_all_slaves(), patterns, wheres)
        parallel = decode_int(request[b"parallel"]) if b"parallel" in request else None
        if parallel is not None and parallel < 1:
            raise UsageError("--max-parallel must be at least 1")
        sink = _ChannelSink(self.channel, self.cancellation)
        extra: Dict[str, Any] = {"cancellation": self.cancellation, "holder": collection}
        if parallel is not None:
            extra["max_parallel"] = parallel
        if op == b"run":
            args = [os.fsdecode(a) for a in decode_list(request.get(b"args", b""))]
            if not args:
                raise UsageError("no command given")
            timeout = float(request[b"timeout"]) if b"timeout" in request else None
            cwd = os.fsdecode(request[b"cwd"]) if b"cwd" in request else None
            if request.get(b"stdin") == b"y":
                self.tee = StdinTee([s.name for s in slaves])
            tee = self.tee
            return lambda: run_job(slaves, args, sink, cwd=cwd, timeout=timeout, stdin=tee, **extra)
        src = os.fsdecode(request.get(b"src", b""))
        dest = os.fsdecode(request.get(b"dest", b""))
        if not src or not dest:
            raise UsageError(f"{op.decode()}: source and destination are needed")
        if op == b"put":
            if not os.path.isabs(src):
                raise UsageError("put: the local path must be absolute")
            sync, delete, checksum = (request.get(k) == b"y" for k in (b"sync", b"delete", b"checksum"))
            if not os.path.lexists(src):
                raise UsageError(f"no such local file or directory: {src}")
            return lambda: put_job(slaves, src, dest, sink, sync=sync, delete=delete, checksum=checksum, **extra)
        if not os.path.isabs(dest):
            raise UsageError("get: the local directory must be absolute")
        if os.path.exists(dest) and not os.path.isdir(dest):
            raise UsageError(f"not a directory: {dest}")
        return lambda: get_job(slaves, src, dest, sink, **extra)

    def _run(self, job: Callable[[], List[SlaveResult]]) -> None:
        """Run the job in a thread; meanwhile read the client's control boxes
        and keep the client told that the master lives."""
        finished = threading.Event()
        failure: List[BaseException] = []

        def work() -> None:
            try:
                job()
            except BaseException as e:  # noqa: BLE001 - reported to the client below
                failure.append(e)
            finally:
                finished.set()

        reader = threading.Thread(target=self._read_controls, args=(finished,), name="remsh-control-read",
                                  daemon=True)
        worker = threading.Thread(target=work, name="remsh-control-job", daemon=True)
        worker.start()
        reader.start()
        while not finished.wait(HEARTBEAT):
            try:
                self.channel.send({b"ev": b"alive"})
            except OSError:
                self.cancellation.cancel("the client went away")
        worker.join()
        if self.tee is not None:
            self.tee.end()
        if failure:
            e = failure[0]
            if isinstance(e, UsageError):
                self._fail(str(e))
            else:
                log.error("job failed: %r", e)
                self._fail(f"the master failed: {e}", EXIT_SLAVE_FAILED)
            return
        done = {b"ev": b"done"}
        if self.cancellation.cancelled:
            done[b"interrupted"] = b"y"
        try:
            self.channel.send(done)
        except OSError:
            pass

    def _read_controls(self, finished: threading.Event) -> None:
        """stdin data and interrupts from the client, until the job ends or
        the client goes (which interrupts the job)."""
        while not finished.is_set():
            try:
                box = self.channel.read(0.5)
            except TimeoutError:
                continue
            except (OSError, RemshError):
                box = None
            if box is None:
                if not finished.is_set():
                    self.cancellation.cancel("the client went away")
                if self.tee is not None:
                    self.tee.end()
                return
            if b"interrupt" in box:
                self.cancellation.cancel("interrupted")
            if b"stdin" in box and self.tee is not None:
                # waits while a command is far behind: flow control to the client
                while not self.tee.feed(box[b"stdin"], 0.5):
                    if finished.is_set():
                        return
            if b"stdin_eof" in box and self.tee is not None:
                self.tee.end()


# -- the client's side ------------------------------------------------------------------------


class ControlClient:
    """A connection to a running ``remsh master``."""

    def __init__(self, path: str, timeout: float = CONNECT_TIMEOUT, *,
                 credentials: Sequence[PeerCredential] = PEER_CREDENTIALS) -> None:
        """``credentials``: how to read the master's uid (the system's ways
        by default; with none, no master is trusted).

        :raises NoMaster: nothing listens at ``path``
        :raises ControlError: the connection is refused (another user's
            master, or one whose uid cannot be read)"""
        self.path = path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            what = "no remsh master running" if isinstance(e, FileNotFoundError) else \
                "no remsh master running (stale control socket)"
            raise NoMaster(f"{what} at {path}") from None
        except PermissionError:
            sock.close()
            raise ControlError(f"permission denied on the control socket {path}") from None
        except OSError as e:
            sock.close()
            raise ControlError(f"cannot connect to the control socket {path}: {e.strerror or e}") from None
        # the master must be our own user too: a socket another user made
        # first at a shared path would otherwise get our commands and stdin
        try:
            uid = peer_uid(sock, credentials)
        except PeerUnknown as e:
            sock.close()
            raise ControlError(f"the control socket {path}: {e}; not used") from None
        if uid != os.geteuid():
            sock.close()
            raise ControlError(f"the control socket {path} belongs to another user (uid {uid}): not used")
        self.channel = Channel(sock)

    def request(self, op: str, **values: Any) -> None:
        """Send the request box (``None`` values are left out; lists of str
        are NUL-joined)."""
        box: Dict[bytes, bytes] = {b"op": op.encode(), b"version": VERSION}
        for key, value in values.items():
            if value is None or value is False:
                continue
            if value is True:
                encoded = b"y"
            elif isinstance(value, (list, tuple)):
                encoded = encode_list(os.fsencode(v) for v in value)
            elif isinstance(value, (int, float)):
                encoded = repr(value).encode()
            else:
                encoded = os.fsencode(value)
            if len(encoded) > MAX_VALUE_LENGTH:
                raise UsageError(f"{key} is too long for the control protocol")
            box[key.encode()] = encoded
        self.channel.send(box)

    def events(self) -> "EventIterator":
        """The master's event boxes, until the connection ends."""
        return EventIterator(self.channel)

    def send_stdin(self, data: bytes) -> None:
        for chunk in _chunks(data):
            self.channel.send({b"stdin": chunk})

    def send_stdin_eof(self) -> None:
        self.channel.send({b"stdin_eof": b"y"})

    def interrupt(self) -> None:
        self.channel.send({b"interrupt": b"y"})

    def close(self) -> None:
        self.channel.close()


class EventIterator:
    """Iterates over event boxes; a master silent for :data:`CLIENT_SILENCE`
    seconds ends it with :class:`ControlError`."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def __iter__(self) -> "EventIterator":
        return self

    def __next__(self) -> Box:
        try:
            box = self.channel.read(CLIENT_SILENCE)
        except TimeoutError:
            raise ControlError(f"the master said nothing for {CLIENT_SILENCE:g} s",
                               EXIT_SLAVE_FAILED) from None
        except (OSError, RemshError) as e:
            raise ControlError(f"lost the master: {e}", EXIT_SLAVE_FAILED) from None
        if box is None:
            raise StopIteration
        return box


def result_of(box: Box) -> SlaveResult:
    """The :class:`SlaveResult` an ``end`` event carries."""
    return SlaveResult(_text(box.get(b"slave")),
                       status=decode_int(box[b"status"]) if b"status" in box else None,
                       error=_text(box[b"error"]) if b"error" in box else None,
                       errtag=_text(box[b"errtag"]) if b"errtag" in box else None,
                       duration_s=decode_int(box.get(b"duration_ms", b"0")) / 1000.0,
                       summary=_text(box.get(b"summary")))


def ls_row(box: Box, fields: Sequence[str]) -> Dict[str, Optional[str]]:
    """A ``slave`` event as a dict of ``fields`` (empty ``since`` -> ``None``)."""
    row: Dict[str, Optional[str]] = {f: _text(box.get(f.encode())) for f in fields}
    if not row.get("since"):
        row["since"] = None
    return row
