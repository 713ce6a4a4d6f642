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

Boxes (:mod:`remsh.wire` framing) both ways; the vocabulary (every
request with its keys, every event with its keys, and how each kind of
value is written) is one table, :mod:`remsh.controlproto`.  The client
sends one request box, then (for an attached ``run``) control boxes; the
master answers with event boxes and closes the connection after the last
one (``done`` or ``fail``).

Requests (``op`` and ``version: 1``, then the operation's keys; lists are
NUL-joined, :func:`~remsh.wire.encode_list`)::

    {op: ls}
    {op: run, args: LIST, targets: LIST, where: LIST, [cwd], [timeout],
     [stdin: y], [parallel], [detach: y]}
    {op: put, src: ABSOLUTE LOCAL PATH, dest, targets, where, [sync: y],
     [delete: y], [checksum: y], [parallel], [detach: y]}
    {op: get, src: REMOTE PATH, dest: ABSOLUTE LOCAL DIR, targets, where,
     [parallel], [detach: y]}
    {op: jobs, [running: y], [limit: N], [id]}
    {op: job, id, [follow: y]}
    {op: cancel, id}
    {op: web}                        (the dashboard's URL, token included)

``run``, ``put`` and ``get`` make a *job* (:mod:`remsh.jobs`), recorded in
the master's job store and run by the master's own threads; the first event
is ``{ev: job, id}``.  With ``detach`` the master then says ``done`` and the
job goes on; otherwise the client follows the job as ``job ID --follow``
would, and may send control boxes: ``{stdin: DATA}``, ``{stdin_eof: y}``,
``{interrupt: y}`` (cancels the job).  An attached client that closes its
end cancels the job too; a follower of ``job`` that closes does not.

Events from the master (``ev`` key)::

    {ev: slave, name, transport, peer, since, platform, python, remsh, state}
    {ev: job, id}                    (a job was made)
    {ev: jobrec, id, kind, state, uid, started, [finished], spec: JSON}
    {ev: jobslave, job, name, state, [exit_status], [error], [errtag],
     [started], [finished], stdout_bytes, stderr_bytes, [truncated: y]}
    {ev: begin, names: LIST}
    {ev: out, slave, stream: stdout|stderr, data}
    {ev: progress, slave, done, [total]}
    {ev: end, slave, [status], [error], [errtag], duration_ms, [summary],
     [truncated: y]}
    {ev: alive}                      (every few seconds while a job runs)
    {ev: fail, message, exit, [errtag]}  (the request was refused: one line,
                                      an exit status; errtag unknown-job or
                                      job-ended when that is why)
    {ev: done, [interrupted: y], [state]}  (the last box)

``jobs`` answers a ``jobrec`` and its ``jobslave`` events per job (with
``id``: that job's alone); ``job``
answers the job's ``jobrec``, ``begin``, then its stored output, progress
and ends in the order they were recorded (live until the job ends with
``follow``) and ``done`` with the job's state.

The local paths of ``put``/``get`` are read and written by the master
process itself (same user, same machine), so file data never crosses the
socket.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import stat
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from remsh.adoption import set_adopter
from remsh.controlproto import (MAX_BOX, SEND_TIMEOUT, VERSION, Channel, ControlOp, Event, decode_control,
                                decode_event, decode_request, encode_control, encode_event, encode_request, out_events)
from remsh.choice import choose_cluster, job_options, job_spec, ls_events
from remsh.errors import RemshError, UsageError
from remsh.files import O_CLOEXEC, O_NOFOLLOW
from remsh.fleet import (EXIT_SLAVE_FAILED, EXIT_USAGE, FleetCollection, SlaveResult, Sink, StdinTee, get_job,
                         parse_where, put_job, run_job)
from remsh.jobs import JobEnded, JobRegistry, RunningJob, TooManyJobs, follow, record_events
from remsh.master.fanout import Cancellation
from remsh.peercred import PEER_CREDENTIALS, PeerCredential, PeerUnknown, peer_uid
from remsh.store.base import JobStore, StoreError, UnknownJob, check_job_id
from remsh.transports.base import cut_and_close
from remsh.wire import Box, encode_box

log = logging.getLogger(__name__)

__all__ = ["ControlServer", "ControlClient", "ControlError", "NoMaster", "Channel", "EventIterator", "VERSION",
           "MAX_BOX", "SEND_TIMEOUT", "control_path", "default_control_path", "check_private_directory",
           "check_control_directory", "make_private_directory", "result_of", "ls_row"]

#: Environment variable naming the control socket.
MASTER_ENV = "REMSH_MASTER"
#: Bound on connecting to the control socket and on the request box.
CONNECT_TIMEOUT = 10.0
#: Seconds between ``alive`` boxes while a job runs.
HEARTBEAT = 5.0
#: A client hears nothing from its master for this long: the master is hung.
CLIENT_SILENCE = 60.0
#: Most concurrent client connections.
MAX_CLIENTS = 64
#: The ``errtag`` of a ``fail`` event: no job with that id.
ERRTAG_UNKNOWN_JOB = "unknown-job"
#: The ``errtag`` of a ``fail`` event: the job to cancel has ended already.
ERRTAG_JOB_ENDED = "job-ended"


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


def _text(value: Optional[bytes]) -> str:
    return "" if value is None else value.decode("utf-8", "replace")


# -- the master's side -----------------------------------------------------------------------


def check_private_directory(directory: str, what: str = "control directory") -> None:
    """Refuse a directory (the control directory, the state directory) that
    someone else could write to.

    :raises ControlError: ``directory`` is not a directory, belongs to
        another user, or is writable by group or others (one line, exit 2)
    """
    try:
        st = os.stat(directory)
    except OSError as e:
        raise ControlError(f"cannot use the {what} {directory}: {e.strerror or e}") from None
    euid = os.geteuid()
    if not stat.S_ISDIR(st.st_mode):
        raise ControlError(f"the {what} {directory} is not a directory")
    if st.st_uid != euid:
        raise ControlError(f"the {what} {directory} belongs to uid {st.st_uid}, not to this user "
                           f"(uid {euid}): not used")
    mode = stat.S_IMODE(st.st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ControlError(f"the {what} {directory} is writable by group or others "
                           f"(mode {mode:04o}): not used; make it 0700")


def check_control_directory(directory: str) -> None:
    """:func:`check_private_directory` of the control directory."""
    check_private_directory(directory, "control directory")


def make_private_directory(directory: str, what: str) -> None:
    """Make ``directory`` (and its parents) mode 0700 when missing, then
    :func:`check_private_directory` it.

    :raises ControlError: it cannot be made, or is not safe
    """
    try:
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o700)
            os.chmod(directory, 0o700)  # whatever the umask
    except OSError as e:
        raise ControlError(f"cannot make the {what} {directory}: {e.strerror or e}") from e
    check_private_directory(directory, what)


class ControlServer:
    """The control socket of a ``remsh master``: accepts clients of the
    master's own user and runs their requests on ``collection``.

    :meth:`start` takes the lock, opens the job store and binds the socket
    (raising :class:`ControlError` when another master holds it);
    :meth:`stop` closes it, removes the socket and cancels running jobs.
    Each client has a thread of its own; jobs run in threads of the job
    registry (:mod:`remsh.jobs`), not of the client that asked.
    """

    def __init__(self, path: str, collection: FleetCollection, *,
                 store: Optional[Callable[[], JobStore]] = None,
                 credentials: Sequence[PeerCredential] = PEER_CREDENTIALS) -> None:
        """``store``: opens the job store, called once the socket's lock is
        held (so that a second master is told about the socket first);
        without it, jobs go to a private store removed at :meth:`stop`.
        ``credentials``: how to read a client's uid (the system's ways by
        default; with none, every client is refused)."""
        self.path = os.path.abspath(path)
        self.collection = collection
        self.credentials = tuple(credentials)
        self._open_store = store
        self.jobs: Optional[JobRegistry] = None
        self._sock: Optional[socket.socket] = None
        self._lock_fd: Optional[int] = None
        self._ino: Optional[int] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self._clients_lock = threading.Lock()
        self._clients: Dict[int, "_Client"] = {}
        self.web_url: Optional[str] = None  # the dashboard's URL and token (remsh web)

    # -- life cycle -------------------------------------------------------------

    def start(self) -> None:
        """Lock, replace a stale socket, bind, listen, accept in the background.

        :raises ControlError: another master holds the socket, or it cannot
            be made (the directory, a non-socket in the way), or the
            directory or the lock file is not safe (another user's, writable
            by others, a symbolic link)
        :raises StoreError: the job store cannot be opened or used
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
            self.jobs = JobRegistry(self._open_store and self._open_store(), collection=self.collection)
            try:
                self.jobs.start()
                self._bind()
                # away/back/lost of a slave go into the records of the jobs it runs
                self.collection.state_watchers.append(self.jobs.slave_state)
                # a slave resuming a session an earlier master recorded is taken back
                set_adopter(self.collection, self.jobs.adoptions)
            except BaseException:
                self.jobs.stop()
                self.jobs.close()
                self.jobs = None
                raise
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
        deadline = time.monotonic() + timeout
        if self.jobs is not None:
            self.jobs.stop(timeout)
        with self._clients_lock:
            clients = list(self._clients.values())
        for client in clients:
            client.join(max(0.0, deadline - time.monotonic()))
            client.channel.close()
        if self.jobs is not None:
            self.jobs.close()
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
                client = _Client(self, Channel(conn), uid)
                self._clients[id(client)] = client
            client.start()

    def forget(self, client: "_Client") -> None:
        """Drop a client that has gone (called by the client itself)."""
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


class _Client:
    """One connection to the control socket: its request, dispatched on
    :data:`~remsh.controlproto.CONTROL_OPS` to the method ``op_NAME``."""

    def __init__(self, server: ControlServer, channel: Channel, uid: int) -> None:
        self.server = server
        self.channel = channel
        self.uid = uid
        self._thread = threading.Thread(target=self._serve, name="remsh-control-client", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    @property
    def jobs(self) -> JobRegistry:
        jobs = self.server.jobs
        if jobs is None:
            raise UsageError("the master is stopping")
        return jobs

    def _serve(self) -> None:
        try:
            self._handle()
        except Exception:  # noqa: BLE001 - one client must never take the master down
            log.exception("control client failed")
        finally:
            self.server.forget(self)
            self.channel.close()

    def _fail(self, message: str, code: int = EXIT_USAGE, errtag: Optional[str] = None) -> None:
        try:
            self.channel.send(encode_event("fail", message=message, exit=code, errtag=errtag))
        except OSError:
            pass

    def _send(self, boxes: List[Dict[bytes, bytes]]) -> None:
        self.channel.send_all(boxes)

    def _handle(self) -> None:
        try:
            request = self.channel.read(CONNECT_TIMEOUT)
        except (OSError, RemshError) as e:
            log.info("control client: no request: %s", e)
            return
        if request is None:
            return
        try:
            op, values = decode_request(request)
            handler: Callable[[ControlOp, Dict[str, Any]], None] = getattr(self, op.handler)
            handler(op, values)
        except (UsageError, ValueError) as e:
            self._fail(str(e))
        except UnknownJob as e:
            self._fail(str(e), errtag=ERRTAG_UNKNOWN_JOB)
        except JobEnded as e:
            self._fail(str(e), errtag=ERRTAG_JOB_ENDED)
        except (StoreError, TooManyJobs) as e:
            self._fail(str(e), EXIT_SLAVE_FAILED)
        except OSError as e:
            log.info("control client gone: %s", e)

    # -- the operations ---------------------------------------------------------

    def op_ls(self, op: ControlOp, values: Dict[str, Any]) -> None:
        collection = self.server.collection
        self._send(ls_events(collection, values))

    def op_web(self, op: ControlOp, values: Dict[str, Any]) -> None:
        if self.server.web_url is None:
            raise UsageError("this master serves no web dashboard (start it with --http [HOST:]PORT)")
        self._send([encode_event("web", url=self.server.web_url), encode_event("done")])

    def op_jobs(self, op: ControlOp, values: Dict[str, Any]) -> None:
        limit = values["limit"]
        if limit is not None and limit < 1:
            raise UsageError("-n must be at least 1")
        if values["id"]:
            records = [self.jobs.store.get_job(check_job_id(values["id"]))]
        else:
            records = self.jobs.store.list_jobs(running=values["running"], limit=limit)
        for record in records:
            self._send(record_events(record))
        self._send([encode_event("done")])

    def op_job(self, op: ControlOp, values: Dict[str, Any]) -> None:
        follow(self.jobs.store, values["id"], self._send, live=values["follow"], alive_every=HEARTBEAT,
               stopped=lambda: self.channel.closed)

    def op_cancel(self, op: ControlOp, values: Dict[str, Any]) -> None:
        self.jobs.cancel(values["id"])
        self._send([encode_event("done")])

    def op_run(self, op: ControlOp, values: Dict[str, Any]) -> None:
        self._job(op, values)

    def op_put(self, op: ControlOp, values: Dict[str, Any]) -> None:
        self._job(op, values)

    def op_get(self, op: ControlOp, values: Dict[str, Any]) -> None:
        self._job(op, values)

    # -- jobs -------------------------------------------------------------------------

    def _job(self, op: ControlOp, values: Dict[str, Any]) -> None:
        """Make the job, say its id, then follow it unless detached."""
        names, spec, work, tee = self._prepare(op.name, values)
        if tee is not None and values["detach"]:
            raise UsageError("--stdin cannot be detached")
        job = self.jobs.submit(op.name, spec, self.uid, names, work, tee)
        try:
            self._send([encode_event("job", id=job.id)])
        except OSError:
            # an attached client gone before it heard of its job: no reader
            # will see it close, so the job it would have cancelled is cancelled here
            if not values["detach"]:
                job.cancel("the client went away")
            if tee is not None:
                tee.end()
            raise
        if values["detach"]:
            self._send([encode_event("done")])
            return
        reader = threading.Thread(target=self._read_controls, args=(job,), name="remsh-control-read", daemon=True)
        reader.start()
        follow(self.jobs.store, job.id, self._send, live=True, alive_every=HEARTBEAT,
               stopped=lambda: self.channel.closed)

    def _prepare(self, kind: str, values: Dict[str, Any]
                 ) -> Tuple[List[str], Dict[str, object], Callable[[Sink, Cancellation], List[SlaveResult]],
                            Optional[StdinTee]]:
        """Check the request and choose the slaves: their names, the job's
        record of what was asked, its work and its stdin.

        :raises UsageError: a bad request, or no slave matches
        """
        patterns: List[str] = values["targets"]
        wheres = [parse_where(w) for w in values["where"]]
        collection = self.server.collection
        slaves, away, remote = choose_cluster(collection, patterns, wheres)  # remote: held by other masters
        names = [s.name for s in slaves] + away + list(remote)
        parallel = values["parallel"]
        if parallel is not None and parallel < 1:
            raise UsageError("--max-parallel must be at least 1")
        extra: Dict[str, Any] = {"holder": collection, **job_options(kind, values, away)}
        if parallel is not None:
            extra["max_parallel"] = parallel
        spec: Dict[str, object] = {"targets": patterns, "where": values["where"], "max_parallel": parallel,
                                   **job_spec(values)}
        cross = self.jobs.crossing(remote, kind, spec, values, extra["pacing"], len(names))  # their parts
        if kind == "run":
            args: List[str] = values["args"]
            if not args:
                raise UsageError("no command given")
            timeout, cwd = values["timeout"], values["cwd"]
            if timeout is not None and not timeout > 0:
                raise UsageError("--timeout must be positive")
            tee = StdinTee(names) if values["stdin"] else None
            spec.update(argv=args, cwd=cwd, timeout=timeout, stdin=tee is not None)
            return names, spec, cross.wrap(lambda sink, c: run_job(slaves, args, sink, cwd=cwd, timeout=timeout,
                                                                   stdin=tee, cancellation=c, **extra)), tee
        src: str = values["src"]
        dest: str = values["dest"]
        if not src or not dest:
            raise UsageError(f"{kind}: source and destination are needed")
        spec["paths"] = [src, dest]
        if kind == "put":
            if not os.path.isabs(src):
                raise UsageError("put: the local path must be absolute")
            sync, delete, checksum = values["sync"], values["delete"], values["checksum"]
            if not os.path.lexists(src):
                raise UsageError(f"no such local file or directory: {src}")
            if not os.path.isdir(src) and (sync or delete or checksum):
                raise UsageError("--sync, --delete and --checksum are for directory trees")
            spec.update(sync=sync, delete=delete, checksum=checksum)
            return names, spec, cross.wrap(lambda sink, c: put_job(slaves, src, dest, sink, sync=sync, delete=delete,
                                                                   checksum=checksum, cancellation=c, **extra)), None
        if not os.path.isabs(dest):
            raise UsageError("get: the local directory must be absolute")
        if os.path.exists(dest) and not os.path.isdir(dest):
            raise UsageError(f"not a directory: {dest}")
        for key in ("max_bytes", "max_files"):
            if values.get(key) is not None:
                if values[key] < 0:
                    raise UsageError(f"get: {key} must not be negative")
                extra[key] = values[key]
        return names, spec, cross.wrap(lambda sink, c: get_job(slaves, src, dest, sink, cancellation=c, **extra)), None

    def _read_controls(self, job: RunningJob) -> None:
        """stdin data and interrupts from an attached client, until the job
        ends or the client goes (which cancels the job)."""
        tee = job.tee
        while not job.finished.is_set():
            try:
                box = self.channel.read(0.5)
            except TimeoutError:
                continue
            except (OSError, RemshError):
                box = None
            if box is None:
                if not job.finished.is_set():
                    job.cancel("the client went away")
                if tee is not None:
                    tee.end()
                return
            controls = decode_control(box)
            if controls["interrupt"]:
                job.cancel("interrupted")
            if controls["stdin"] is not None and tee is not None:
                # waits while a command is far behind: flow control to the client
                while not tee.feed(controls["stdin"], 0.5):
                    if job.finished.is_set():
                        return
            if controls["stdin_eof"] and tee is not None:
                tee.end()


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
        """Send the request box of ``op`` (one of
        :data:`~remsh.controlproto.CONTROL_OPS`; ``None`` values and false
        flags are left out).

        :raises UsageError: a value too long for the protocol
        """
        self.channel.send(encode_request(op, values))

    def events(self) -> "EventIterator":
        """The master's event boxes, until the connection ends."""
        return EventIterator(self.channel)

    def decoded(self) -> "Iterator[Event]":
        """The master's events, decoded (:func:`~remsh.controlproto.decode_event`).

        :raises ControlError: the master went silent or away, or sent a
            malformed value
        """
        for box in self.events():
            try:
                yield decode_event(box)
            except ValueError as e:
                raise ControlError(f"the master sent a malformed event: {e}", EXIT_SLAVE_FAILED) from None

    def send_stdin(self, data: bytes) -> None:
        self.channel.send_all(encode_control(stdin=box[b"data"]) for box in out_events("", "stdin", data))

    def send_stdin_eof(self) -> None:
        self.channel.send(encode_control(stdin_eof=True))

    def interrupt(self) -> None:
        self.channel.send(encode_control(interrupt=True))

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


def result_of(event: Event) -> SlaveResult:
    """The :class:`SlaveResult` an ``end`` event carries."""
    return SlaveResult(event.get("slave", ""), status=event.values["status"], error=event.values["error"],
                       errtag=event.values["errtag"], duration_s=event.get("duration_ms", 0) / 1000.0,
                       summary=event.get("summary", ""), truncated=event.values["truncated"])


def ls_row(event: Event, fields: Sequence[str]) -> Dict[str, Optional[str]]:
    """A ``slave`` event as a dict of ``fields`` (empty ``since`` -> ``None``)."""
    row: Dict[str, Optional[str]] = {f: event.get(f, "") for f in fields}
    if not row.get("since"):
        row["since"] = None
    return row
