"""The slave's ``execute``: run a command and stream its output.

One thread multiplexes everything with ``select``: the master's boxes (stdin
data, stdin end, interrupt), the command's stdout and stderr, writes to its
stdin, its exit, and the time limit.  Nothing can deadlock a command that
writes a lot while reading a lot: output is forwarded as soon as it is read,
and stdin is written only when the pipe can take it.  Pending stdin is
bounded by :data:`STDIN_BUFFER_LIMIT`; past it the server stops reading the
connection, which pushes back on the master through TCP flow control.

The command runs in a session of its own so that an interrupt, a time limit
or a lost master kills its whole process group.
"""

from __future__ import annotations

import array
import errno
import fcntl
import functools
import logging
import os
import select
import selectors
import signal
import subprocess
import termios
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from remsh.bulk import FramedBlock, give_back, lender, take_block
from remsh.conversation import ExecuteControl, Interrupt, Stdin
from remsh.errors import Disconnected, ExecFailedError, InvalidRequestError
from remsh.session import SessionWire
from remsh.slave import pgroups
from remsh.slave.request import Request
from remsh.wire import MAX_VALUE_LENGTH, Box, encode_box, encode_data_boxes


log = logging.getLogger(__name__)

STDIN_BUFFER_LIMIT = 4 << 20
#: Longest wait between hang-up checks while stdin is backed up.
HANGUP_CHECK = 1.0
_HANGUP_EVENTS = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR
#: After the command exits, how long to wait for its output pipes to close
#: (a background grandchild may hold them open).
OUTPUT_GRACE = 5.0
#: Longest the start box waits to go out with something else (seconds).
START_DELAY = 0.005
#: Least output read from a command at once (one box's worth) ...
READ_SIZE = 65535
#: ... and most: what the pipe holds (``FIONREAD``) up to this, sent as
#: consecutive output boxes in one write.  With a session (which must keep
#: a copy, so the kernel cannot move the bytes: see ``splice_heads``) one
#: box per read cost the slave twice the CPU per byte of 1 MiB reads, and
#: pinned to one CPU with the command and the master a wake-up of each per
#: 64 KiB: streamed stdout went from 0.26 to 0.40 of the raw socket floor.
MAX_READ = 1 << 20
#: The output pipes are made this big where the kernel allows, so a fast
#: writer blocks less often (Linux's default pipe holds 64 KiB).
PIPE_SIZE = 1 << 20
#: Longest single ``select`` (seconds); the loop re-checks its deadlines after
#: it, so a time limit longer than select(2) accepts still works.
MAX_SELECT_WAIT = 3600.0


def build_env(overrides: Dict[bytes, bytes], removals: Dict[bytes, bytes]) -> Optional[Dict[bytes, bytes]]:
    """The command's environment: the slave's, with the request's overrides
    (``env_`` + name) and removals (``unset_`` + name); ``None`` when there
    are none, so the command inherits the slave's as is."""
    if not overrides and not removals:
        return None
    env = dict(os.environb)
    for name, value in overrides.items():
        if b"=" in name or b"\0" in name or b"\0" in value:
            raise InvalidRequestError(f"bad environment variable {name[:40]!r}")
        env[name] = value
    for name in removals:
        env.pop(name, None)
    return env


class _ProgramCache:
    """Where each program name was last found on each ``PATH``.

    ``subprocess`` searches ``PATH`` in Python on every start (joining and
    encoding every directory), which costs more than the fork itself for a
    short command; a hit here is checked with one ``access`` call.
    """

    def __init__(self, size: int = 256) -> None:
        self._found: Dict[Tuple[bytes, bytes], bytes] = {}
        self._size = size

    def resolve(self, name: bytes, env: Optional[Dict[bytes, bytes]]) -> Optional[bytes]:
        """The program's path, or ``None`` to let ``subprocess`` search."""
        if b"/" in name:
            return None
        path = (env if env is not None else os.environb).get(b"PATH", os.defpath.encode())
        key = (path, name)
        found = self._found.get(key)
        if found is not None and os.access(found, os.X_OK):
            return found
        for directory in path.split(b":"):
            candidate = os.path.join(directory or b".", name)
            if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
                if len(self._found) >= self._size:
                    self._found.clear()
                if directory and directory.startswith(b"/"):
                    self._found[key] = candidate  # relative PATH entries depend on cwd
                return candidate
        return None


PROGRAMS = _ProgramCache()


class _ExitWatcher:
    """Something ``select`` can wait on that becomes readable when the child exits."""

    def __init__(self, proc: "subprocess.Popen[bytes]") -> None:
        self.proc = proc
        self._thread: Optional[threading.Thread] = None
        pidfd_open = getattr(os, "pidfd_open", None)
        self.fd = -1
        self._w = -1
        if pidfd_open is not None:
            try:
                self.fd = pidfd_open(proc.pid)
                return
            except OSError:
                pass
        self.fd, self._w = os.pipe()
        self._thread = threading.Thread(target=self._wait, name="remsh-exit-watch", daemon=True)
        self._thread.start()

    def _wait(self) -> None:
        self.proc.wait()
        os.write(self._w, b"x")

    def close(self) -> None:
        for fd in (self.fd, self._w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fd = self._w = -1


def _kill_group(proc: "subprocess.Popen[bytes]") -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass


def _pipe_bytes(fd: int) -> int:
    """How many bytes the pipe ``fd`` holds (0 also when that is unknown)."""
    count = array.array("i", [0])
    try:
        fcntl.ioctl(fd, termios.FIONREAD, count)
    except OSError:
        return 0
    return count[0]


def _grow_pipe(fd: int) -> None:
    """Make the pipe ``fd`` hold :data:`PIPE_SIZE` bytes if the kernel lets us."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if set_size is not None:
        try:
            fcntl.fcntl(fd, set_size, PIPE_SIZE)
        except OSError:
            pass  # over /proc/sys/fs/pipe-max-size: the default size works too


def read_output_boxes(fd: int, prefix: bytes, key: bytes) -> Optional[bytes]:
    """What the output pipe ``fd`` holds now, up to :data:`MAX_READ` bytes,
    as consecutive output boxes (``prefix``, then ``key`` and a chunk of at
    most 65535 bytes: :meth:`~remsh.conversation.ExecuteControl.output_head`)
    in one byte string; ``b""`` at the end of the output (or a read error),
    ``None`` when nothing is there yet."""
    try:
        data = os.read(fd, max(READ_SIZE, min(_pipe_bytes(fd), MAX_READ)))
    except BlockingIOError:
        return None
    except OSError:
        return b""
    return encode_data_boxes(key, data, prefix) if data else b""


def _kill_group_only(proc: "subprocess.Popen[bytes]") -> None:
    """SIGKILL the command's process group (the command itself has exited)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_execute(request: Request, args: Dict[str, Any]) -> None:
    """Perform one ``execute`` request (arguments parsed by the table of
    operations), from start reply to final box."""
    argv: List[bytes] = args["args"]
    want_stdout = args["want_stdout"] is not False
    want_stderr = args["want_stderr"] is not False
    want_stdin = bool(args["want_stdin"])
    timeout: Optional[float] = args["timeout"]
    cwd = request.cwd
    if args["cwd"]:
        cwd = request.path(args["cwd"])
    policy = request.policy
    program: Optional[bytes] = None
    if not policy.execute or policy.allow_commands:
        # before anything else: the environment can turn an allowed program
        # into any other (LD_PRELOAD, PYTHONPATH, ...)
        if policy.execute:
            policy.check_env(list(args["env_"]) + list(args["unset_"]))
    env = build_env(args["env_"], args["unset_"])
    if not policy.execute or policy.allow_commands:
        env_path = (env if env is not None else os.environb).get(b"PATH")
        program = policy.check_execute(argv, env_path, cwd=policy.check_cwd(cwd))
    devnull = request.devnull()
    with policy.exec_cwd(cwd) as start_dir:
        try:
            proc = subprocess.Popen(
                argv,
                executable=program or PROGRAMS.resolve(argv[0], env),
                cwd=start_dir,
                env=env,
                stdin=subprocess.PIPE if want_stdin else devnull,
                stdout=subprocess.PIPE if want_stdout else devnull,
                stderr=subprocess.PIPE if want_stderr else devnull,
                start_new_session=True,
                close_fds=True,
                bufsize=0,
            )
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            if isinstance(e, OSError) and e.filename is not None:
                fn = e.filename
                msg = f"{msg}: {os.fsdecode(fn) if isinstance(fn, bytes) else fn}"
            raise ExecFailedError(f"could not start {os.fsdecode(argv[0])}: {msg}") from None
    # recorded while it runs: a successor kills it if this slave dies outright
    pgroups.started(proc.pid)
    try:
        supervisor = _Supervisor(request, proc, timeout, bool(args["keep_processes"]))
        if want_stdin:
            supervisor.send_start()  # the master may wait for it before sending stdin
        supervisor.run()
    finally:
        if proc.returncode is None:
            _kill_group(proc)
            proc.wait()
        pgroups.ended(proc.pid)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass


class _Supervisor:
    def __init__(self, request: Request, proc: "subprocess.Popen[bytes]", timeout: Optional[float],
                 keep_processes: bool = False) -> None:
        self.keep_processes = keep_processes
        self.wire: Any = request.wire
        self.proc = proc
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.timeout = timeout
        self.timed_out = False
        self.stdin_buf: List[bytes] = []
        self.stdin_len = 0
        self.stdin_eof = False
        self.stdin_fd = proc.stdin.fileno() if proc.stdin else -1
        self.sel = selectors.DefaultSelector()
        self.outputs: Dict[int, bytes] = {}
        if proc.stdout is not None:
            self.outputs[proc.stdout.fileno()] = b"stdout"
            _grow_pipe(proc.stdout.fileno())
        if proc.stderr is not None:
            self.outputs[proc.stderr.fileno()] = b"stderr"
            _grow_pipe(proc.stderr.fileno())
        self.wire_watched = False
        #: per output pipe, what comes before its data in each output box,
        #: when the kernel may move the data into the connection (a plain
        #: socket, no session that must keep a copy): see _read_output
        self.splice_heads: Optional[Dict[int, Tuple[bytes, bytes]]] = None
        #: per output pipe, the same for the boxes made of what is read
        self.heads = {fd: ExecuteControl.output_head(name) for fd, name in self.outputs.items()}
        #: per output pipe that had much to read at once, its framed buffer
        self.blocks: Dict[int, FramedBlock] = {}
        if not isinstance(self.wire, SessionWire) and getattr(self.wire, "can_splice", False):
            self.splice_heads = self.heads
        #: the connection being watched: (generation, fd); a session
        #: (remsh.session) may replace its connection while the command runs
        self.watched: "tuple[int, int]" = (-1, -1)
        self.session = isinstance(self.wire, SessionWire)
        #: the start box ("the command is running") is not sent yet: it goes
        #: out before the first output, at the latest START_DELAY after the
        #: start, or in one write with the final box of a command that ended
        #: sooner (one message and one wake-up of the master fewer)
        self.start_pending = True
        self.started_at = time.monotonic()

    def send_start(self) -> None:
        """Send the start box now, unless it went already."""
        if self.start_pending:
            self.start_pending = False
            self.wire.send_box({})

    def run(self) -> None:
        proc, sel, wire = self.proc, self.sel, self.wire
        watcher = _ExitWatcher(proc)
        try:
            for fd in self.outputs:
                os.set_blocking(fd, False)
                sel.register(fd, selectors.EVENT_READ, "out")
            if self.stdin_fd >= 0:
                os.set_blocking(self.stdin_fd, False)
            sel.register(watcher.fd, selectors.EVENT_READ, "exit")
            if self.session:
                sel.register(wire.wake_fd(), selectors.EVENT_READ, "wake")
            self._watch_wire(True)
            exit_seen_at: Optional[float] = None
            while True:
                if proc.returncode is not None and not self.outputs:
                    break
                self._drain_wire()
                wait = self._next_wait(exit_seen_at)
                if self.start_pending:
                    left = max(0.0, self.started_at + START_DELAY - time.monotonic())
                    wait = left if wait is None else min(wait, left)
                if not self.wire_watched:
                    # stdin is backed up, so the connection is not read: look
                    # for the master hanging up at least once a second
                    if self._master_hung_up():
                        self._lost()
                    wait = HANGUP_CHECK if wait is None else min(wait, HANGUP_CHECK)
                events = sel.select(wait)
                if self.start_pending and (time.monotonic() >= self.started_at + START_DELAY
                                           or any(key.data != "exit" for key, _ in events)):
                    self.send_start()
                for key, _ in events:
                    what = key.data
                    if what == "out":
                        self._read_output(key.fd)
                    elif what == "wire":
                        wire.feed_available()
                        if wire.at_eof:
                            self._lost()
                    elif what == "wake":
                        wire.clear_wake()
                        if wire.at_eof:
                            self._lost()
                    elif what == "stdin":
                        self._write_stdin()
                    elif what == "exit":
                        sel.unregister(watcher.fd)
                        if not self.keep_processes:
                            # what the command left in its process group
                            # dies with it (before the leader is reaped, so
                            # its id cannot have been reused)
                            _kill_group_only(proc)
                        proc.wait()
                        exit_seen_at = time.monotonic()
                now = time.monotonic()
                if self.deadline is not None and not self.timed_out and now >= self.deadline:
                    self.timed_out = True
                    log.info("command timed out after %g s; killing its process group", self.timeout)
                    _kill_group(proc)
                if exit_seen_at is not None and self.outputs and now - exit_seen_at >= OUTPUT_GRACE:
                    log.warning("command exited but its output stays open; closing it")
                    for fd in list(self.outputs):
                        self._close_output(fd)
        except Disconnected:
            raise
        except BaseException:
            self.send_start()  # the error box that follows is then the final box, not a refusal
            raise
        finally:
            watcher.close()
            sel.close()
        if self.timed_out:
            final = ExecuteControl.timeout_box(self.timeout or 0.0)
        else:
            final = ExecuteControl.exit_box(proc.returncode)
        if self.start_pending:
            self.start_pending = False
            wire.send_bytes(encode_box({}) + encode_box(final))
        else:
            wire.send_box(final)

    def _next_wait(self, exit_seen_at: Optional[float]) -> Optional[float]:
        waits = []
        now = time.monotonic()
        if self.deadline is not None and not self.timed_out:
            waits.append(self.deadline - now)
        if exit_seen_at is not None:
            waits.append(exit_seen_at + OUTPUT_GRACE - now)
        if not waits:
            return None
        return max(0.0, min(min(waits), MAX_SELECT_WAIT))

    def _lost(self) -> None:
        """The master is gone: for a session, only this connection (it may
        come back: keep going); else, or once the session has ended, kill
        the command and give up."""
        wire = self.wire
        if self.session and not wire.at_eof:
            wire.connection_lost(why="master went away during execute")
            return
        _kill_group(self.proc)
        raise Disconnected(f"{wire.label}: master went away during execute")

    def _master_hung_up(self) -> bool:
        """True when the master has closed or reset the connection, even with
        unread data still queued (POLLRDHUP: the peer's FIN has arrived)."""
        fd = self.watched[1] if self.watched[1] >= 0 else self._wire_fd()
        if fd < 0:
            return False
        poller = select.poll()
        poller.register(fd, _HANGUP_EVENTS)
        return any(ev & _HANGUP_EVENTS for _, ev in poller.poll(0))

    def _wire_fd(self) -> int:
        if self.session and not self.wire.attached:
            return -1
        return int(self.wire.stream.fileno())

    def _watch_wire(self, on: bool) -> None:
        """Watch the current connection for input (``on``), or not."""
        want = (getattr(self.wire, "generation", 0), self._wire_fd() if on else -1)
        if want != self.watched:
            if self.watched[1] >= 0:
                try:
                    self.sel.unregister(self.watched[1])
                except (KeyError, ValueError, OSError):
                    pass
            if want[1] >= 0:
                self.sel.register(want[1], selectors.EVENT_READ, "wire")
            self.watched = want
        self.wire_watched = on

    def _drain_wire(self) -> None:
        """Handle every box already buffered (and TLS bytes select cannot see)."""
        wire = self.wire
        # (a session away from its connection reads nothing: what the old
        # connection still holds is not for it)
        while self.watched[1] >= 0 and (not self.session or wire.attached) and wire.stream.pending():
            wire.feed_available()
        while self.stdin_len < STDIN_BUFFER_LIMIT:
            box = wire.poll_box()
            if box is None:
                break
            self._control(box)
        self._watch_wire(self.stdin_len < STDIN_BUFFER_LIMIT)

    def _control(self, box: Optional[Box]) -> None:
        if box is None:
            return
        control = ExecuteControl.receive(box)
        if isinstance(control, Interrupt):
            log.info("interrupt from the master; killing the command's process group")
            _kill_group(self.proc)
        elif isinstance(control, Stdin):
            if self.stdin_fd < 0:
                return  # stdin not requested, or already closed: drop
            if control.data:
                self.stdin_buf.append(control.data)
                self.stdin_len += len(control.data)
                self._want_stdin_writable()
            if control.eof:
                self.stdin_eof = True
                self._want_stdin_writable()
        else:
            log.warning("ignoring %s", control.reason)

    def _want_stdin_writable(self) -> None:
        if self.stdin_fd < 0:
            return
        try:
            self.sel.get_key(self.stdin_fd)
        except KeyError:
            self.sel.register(self.stdin_fd, selectors.EVENT_WRITE, "stdin")

    def _write_stdin(self) -> None:
        fd = self.stdin_fd
        while self.stdin_buf:
            chunk = self.stdin_buf[0]
            try:
                n = os.write(fd, chunk)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno not in (errno.EPIPE, errno.EBADF):
                    log.warning("writing to the command's stdin failed: %s", e)
                self._close_stdin()
                return
            self.stdin_len -= n
            if n < len(chunk):
                self.stdin_buf[0] = chunk[n:]
                return
            self.stdin_buf.pop(0)
        if self.stdin_eof:
            self._close_stdin()
        else:
            self.sel.unregister(fd)

    def _close_stdin(self) -> None:
        fd = self.stdin_fd
        if fd < 0:
            return
        try:
            self.sel.unregister(fd)
        except KeyError:
            pass
        self.stdin_buf.clear()
        self.stdin_len = 0
        self.stdin_fd = -1
        try:
            self.proc.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass

    def _read_output(self, fd: int) -> None:
        if self.splice_heads is not None:
            ready = _pipe_bytes(fd)
            if ready > 0:
                # the bytes go from the pipe to the socket without a copy
                # through this process (read, encode and send: two copies)
                head, key = self.splice_heads[fd]
                self.wire.send_values_spliced(head, key, fd, ready)
                return
        ready = _pipe_bytes(fd)
        lend = lender(self.wire) if ready > READ_SIZE else None
        if lend is not None:
            # much at once, for a session: read in place into framed boxes
            # lent to the session, which keeps them until acknowledged
            # (no copy to frame them, none to keep them)
            prefix, key = self.heads[fd]
            lent = take_block(key, prefix, MAX_READ // MAX_VALUE_LENGTH)
            try:
                n = lent.fill_once(fd, ready)
            except BlockingIOError:
                give_back(lent)
                return
            except OSError:
                n = 0
            if not n:
                give_back(lent)
                self._close_output(fd)
                return
            lend(lent.encoded(), -(-n // MAX_VALUE_LENGTH), functools.partial(give_back, lent))
            return
        if ready > READ_SIZE:
            # much at once: read in place into framed boxes (no copy to frame them)
            block = self.blocks.get(fd)
            if block is None:
                prefix, key = self.heads[fd]
                block = self.blocks[fd] = FramedBlock(key, MAX_READ // MAX_VALUE_LENGTH, prefix)
            try:
                n = block.fill_once(fd, ready)
            except BlockingIOError:
                return
            except OSError:
                n = 0
            if not n:
                self._close_output(fd)
                return
            self.wire.send_bytes(block.encoded())
            return
        prefix, key = self.heads[fd]
        boxes = read_output_boxes(fd, prefix, key)
        if boxes is None:
            return
        if not boxes:
            self._close_output(fd)
            return
        self.wire.send_bytes(boxes)

    def _close_output(self, fd: int) -> None:
        self.sel.unregister(fd)
        del self.outputs[fd]
