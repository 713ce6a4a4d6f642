"""The process groups a slave's commands run in, watched and recorded so
that a slave killed outright (``SIGKILL``, a crash, the OOM killer) does not
leave them running.

A *guardian* process forked at start-up (:func:`start_guardian`) hears of
every group through a pipe and, once the pipe ends with the slave, kills
those still running: the commands die with the slave.  ``PR_SET_PDEATHSIG``
was the alternative: it reaches the command only (not its background
children), and setting it needs a ``preexec_fn`` that runs Python between
``fork`` and ``exec`` (no ``vfork``: starting ``true`` took 1.8 ms instead
of 0.45 ms here, and such code is unsafe in a threaded process).

For a guardian killed along with its slave there is the record.

Every command runs in a session and process group of its own
(:mod:`remsh.slave.execute`).  While it runs, its group is listed in a file
of this slave's own, in a private directory (0700; the files 0600) named
after the slave's base directory (a digest of its real path) in the user's
state directory: ``$XDG_STATE_HOME/remsh-slave/KEY/`` (else
``~/.local/state/remsh-slave/KEY/``), out of the base directory the master
works in.  A slave holds an
exclusive ``flock`` on its file for as long as it lives; the lock goes with
the process, however it ends.  A slave starting on the same base directory
looks at every file there whose lock it can take -- its writer is dead --
and kills (``SIGKILL``) each group listed that is still there, then removes
the file.  Slaves sharing a base directory do not touch each other's
commands: a live slave's file stays locked.

A group is killed only when it can be told apart from a stranger that was
given the same number later: when its leader is alive, the leader's start
time (``/proc/PID/stat``, clock ticks since boot) must be the one recorded;
when the leader is gone but members remain (background processes), they
must be in the session of that number and have started no earlier than the
recorded leader.  (The number of a group cannot be given out again while
the slave that recorded it lives: the leader is its child, a zombie at
least, until reaped.)  An entry is dropped when its command ends; with
``keep_processes`` what the command leaves behind is its own business.

A master that could write the record could make a restarted slave kill
what it likes.  A slave without a policy trusts its master with everything
its user can do anyway; a slave with one (``--no-execute``,
``--allow-command``, ``--root``) keeps a record only when it has a root and
the state directory lies outside it -- otherwise the master could write
there (the guardian still watches the commands).

Linux only (``/proc``); elsewhere nothing is recorded.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import secrets
import signal
import stat as stat_mod
import threading
import time
from typing import Dict, List, Optional, Tuple

from remsh.files import O_CLOEXEC, O_NOFOLLOW
from remsh.slave.policy import Policy

log = logging.getLogger(__name__)

#: Most bytes of a record file read back (a slave runs one command at a time:
#: a few entries at most).
MAX_RECORD_BYTES = 4096
#: Most entries of one record file acted upon.
MAX_ENTRIES = 64
#: Most record files of dead slaves handled at one start.
MAX_FILES = 256
PROC = "/proc"
#: Longest wait for the guardian to end after a clean exit (seconds).
GUARDIAN_EXIT_WAIT = 5.0


def proc_stat(pid: int) -> Optional[Tuple[int, int, int]]:
    """``(pgid, sid, starttime)`` of process ``pid`` from ``/proc``, or
    ``None`` when there is no such process (or no ``/proc``)."""
    try:
        with open(f"{PROC}/{pid}/stat", "rb") as f:
            data = f.read(4096)
    except OSError:
        return None
    # the command name (field 2) may hold anything: fields follow its last ')'
    rest = data[data.rfind(b")") + 2:].split()
    try:
        return int(rest[2]), int(rest[3]), int(rest[19])
    except (IndexError, ValueError):
        return None


def _members(pgid: int) -> List[Tuple[int, int, int]]:
    """``(pid, sid, starttime)`` of every process in group ``pgid``."""
    found = []
    try:
        names = os.listdir(PROC)
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        st = proc_stat(int(name))
        if st is not None and st[0] == pgid:
            found.append((int(name), st[1], st[2]))
    return found


def is_ours(pgid: int, start: int) -> bool:
    """True when group ``pgid`` still exists and is the one whose leader
    started at ``start`` (see the module docstring)."""
    leader = proc_stat(pgid)
    if leader is not None:
        return leader[0] == pgid and leader[2] == start
    return any(sid == pgid and began >= start for _, sid, began in _members(pgid))


def kill_leftovers(pairs: List[Tuple[int, int]]) -> int:
    """SIGKILL each group of ``(pgid, leader start time)`` that is still
    ours; the number of groups killed."""
    killed = 0
    for pgid, start in pairs[:MAX_ENTRIES]:
        if pgid <= 1 or not is_ours(pgid, start):
            continue
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue
        log.warning("killed process group %d, left running by a slave that ended abruptly", pgid)
        killed += 1
    return killed


def _parse(data: bytes) -> List[Tuple[int, int]]:
    pairs = []
    for line in data[:MAX_RECORD_BYTES].splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit():
            pairs.append((int(fields[0]), int(fields[1])))
    return pairs


def _inside(root: bytes, path: str) -> bool:
    real = os.path.realpath(os.fsencode(path))
    return real == root or real.startswith(root.rstrip(b"/") + b"/")


def state_dir() -> str:
    """Where slaves of this user keep their records: ``$XDG_STATE_HOME/remsh-slave``,
    else ``~/.local/state/remsh-slave``."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "remsh-slave")


def record_dir(basedir: str, policy: Optional[Policy]) -> Optional[str]:
    """The directory of the record for ``basedir`` (see the module docstring),
    or ``None`` when none may be kept: no absolute state directory, or a
    restricting policy under which the master could write a record (no
    ``--root``, or a root the state directory lies in)."""
    key = hashlib.sha256(os.fsencode(os.path.realpath(basedir))).hexdigest()[:32]
    directory = os.path.join(state_dir(), key)
    if not os.path.isabs(directory):
        return None
    if policy is not None and policy.restricted:
        # a confined master may write files wherever the policy lets it: only
        # a root that leaves the state directory out keeps the record its own
        if policy.root is None or _inside(policy.root, directory):
            return None
    return directory


def _private_dirs(path: str) -> None:
    """Make ``path`` and its parent (and missing ancestors) and check that
    both are directories of this user that nobody else may use (else
    ``OSError``)."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    for directory in (os.path.dirname(path), path):
        st = os.lstat(directory)
        if not stat_mod.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise OSError(errno.EPERM, "not a directory of this user", directory)
        if st.st_mode & 0o077:
            mode = stat_mod.S_IMODE(st.st_mode)
            raise OSError(errno.EPERM, f"mode {mode:04o} lets others in (make it private: chmod 700)", directory)


class GroupRecord:
    """This slave's record file (see the module docstring); thread-safe.

    :meth:`open` makes the file and locks it, :meth:`started` and
    :meth:`ended` keep it current.
    """

    def __init__(self, directory: Optional[str]) -> None:
        self.directory = directory
        self.fd = -1
        self.path = ""
        self._groups: Dict[int, int] = {}
        self._lock = threading.Lock()
        #: the guardian (see :func:`start_guardian`): its pid and pipe
        self.guardian_pid = -1
        self._guardian_fd = -1

    def attach_guardian(self, pid: int, write_fd: int) -> None:
        """Tell the guardian ``pid`` (through ``write_fd``, now owned here)
        about every group from now on."""
        self.guardian_pid, self._guardian_fd = pid, write_fd

    def _tell(self, line: bytes) -> None:
        if self._guardian_fd < 0:
            return
        try:
            os.write(self._guardian_fd, line)
        except OSError as e:
            log.warning("the guardian of running commands is gone (%s): a slave killed outright "
                        "leaves them to its successor", e)
            os.close(self._guardian_fd)
            self._guardian_fd = -1

    def open(self) -> None:
        """Make the directory and this slave's locked file in it.

        :raises OSError: the directory is not private or cannot be made
        """
        assert self.directory is not None
        _private_dirs(self.directory)
        name = f"slave-{os.getpid()}-{secrets.token_hex(4)}"
        path = os.path.join(self.directory, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.path = fd, path

    def reap_predecessors(self) -> int:
        """Kill what dead slaves on this directory left running and remove
        their files; the number of groups killed."""
        killed = 0
        if self.directory is None:
            return 0
        try:
            names = sorted(os.listdir(self.directory))[:MAX_FILES]
        except OSError as e:
            log.warning("cannot read the record of process groups %s: %s", self.directory, e)
            return 0
        for name in names:
            path = os.path.join(self.directory, name)
            if path == self.path or not name.startswith("slave-"):
                continue
            try:
                fd = os.open(path, os.O_RDWR | O_NOFOLLOW | O_CLOEXEC)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # its slave is alive
                st = os.fstat(fd)
                if not stat_mod.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                    continue
                killed += kill_leftovers(_parse(os.pread(fd, MAX_RECORD_BYTES, 0)))
                os.unlink(path)
            except OSError as e:
                log.warning("cannot handle the record %s: %s", path, e)
            finally:
                os.close(fd)
        return killed

    def _write(self) -> None:
        if self.fd < 0:
            return
        data = b"".join(b"%d %d\n" % item for item in self._groups.items())
        try:
            os.ftruncate(self.fd, 0)
            if data:
                os.pwrite(self.fd, data, 0)
        except OSError as e:
            log.warning("cannot update the record of process groups %s: %s", self.path, e)

    def started(self, pgid: int) -> None:
        """Record the group of a command that just started (its leader ``pgid``)."""
        st = proc_stat(pgid)
        if st is None:
            return
        with self._lock:
            self._groups[pgid] = st[2]
            self._tell(b"+%d %d\n" % (pgid, st[2]))
            self._write()

    def ended(self, pgid: int) -> None:
        """Forget the group of a command that has ended."""
        with self._lock:
            if self._groups.pop(pgid, None) is not None:
                self._tell(b"-%d\n" % pgid)
                self._write()

    def close(self) -> None:
        """Remove the file and end the guardian (a clean end: whatever is
        still listed is the guardian's to kill)."""
        if self.fd >= 0:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = -1
            assert self.directory is not None
            for directory in (self.directory, os.path.dirname(self.directory)):
                try:
                    os.rmdir(directory)  # only when empty: no other slave's file there
                except OSError:
                    break
        if self._guardian_fd >= 0:
            os.close(self._guardian_fd)
            self._guardian_fd = -1
        if self.guardian_pid > 0:
            # it ends as soon as it has seen the pipe end (and killed what
            # was still listed); waited for, within a bound
            deadline = time.monotonic() + GUARDIAN_EXIT_WAIT
            try:
                while os.waitpid(self.guardian_pid, os.WNOHANG) == (0, 0):
                    if time.monotonic() >= deadline:
                        log.warning("the guardian process %d has not ended; leaving it", self.guardian_pid)
                        break
                    time.sleep(0.01)
            except ChildProcessError:
                pass
            self.guardian_pid = -1


# -- the guardian ---------------------------------------------------------------------


def _guard(read_fd: int) -> None:
    """The guardian's life: follow the slave's ``+PGID START`` and ``-PGID``
    lines until the pipe ends -- the slave is gone, however it ended -- then
    kill every group still listed that is still the one recorded."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # it ends when the slave does, not before
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd != read_fd:
            try:
                os.close(fd)
            except OSError:
                pass
    groups: Dict[int, int] = {}
    pending = b""
    while True:
        try:
            data = os.read(read_fd, 4096)
        except InterruptedError:
            continue
        except OSError:
            break
        if not data:
            break
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            fields = line[1:].split()
            if line[:1] == b"+" and len(fields) == 2 and len(groups) < MAX_ENTRIES:
                groups[int(fields[0])] = int(fields[1])
            elif line[:1] == b"-" and len(fields) == 1:
                groups.pop(int(fields[0]), None)
    kill_leftovers(list(groups.items()))


def start_guardian() -> Tuple[int, int]:
    """Fork the guardian: a small process that outlives this one only to
    kill the process groups of commands still running when it ends (any
    way at all: ``SIGKILL`` too, since the kernel closes the pipe).
    ``(pid, write end of its pipe)``.

    Call it while this process has no other thread (at start-up): the child
    of a fork has only the forking thread.  The pipe is close-on-exec, so no
    command holds it open.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child process
        status = 0
        try:
            os.close(write_fd)
            _guard(read_fd)
        except BaseException:  # noqa: BLE001 - nothing to report to
            status = 1
        finally:
            os._exit(status)
    os.close(read_fd)
    return pid, write_fd


#: The record of this process, once :func:`install` has made it.
_current: Optional[GroupRecord] = None


def install(basedir: str, policy: Optional[Policy] = None) -> Optional[GroupRecord]:
    """Open this slave's record for ``basedir``, kill what dead slaves on
    the same base directory left running, and make :func:`started` and
    :func:`ended` use it.  ``None`` (and a logged warning) when no record
    can be kept."""
    global _current
    if not os.path.isdir(PROC):
        return None
    record = GroupRecord(record_dir(basedir, policy))
    try:
        record.attach_guardian(*start_guardian())
    except OSError as e:
        log.warning("cannot start the guardian of running commands: %s", e)
    if record.directory is None:
        log.warning("the record of running commands cannot be kept outside the root (%s): the commands of "
                    "a slave killed outright are left to its guardian process alone", state_dir())
    else:
        try:
            record.open()
        except OSError as e:
            log.warning("cannot keep a record of running commands in %s: %s", record.directory, e)
        else:
            record.reap_predecessors()
    _current = record
    return record


def uninstall() -> None:
    """Close and remove this process's record (a clean end)."""
    global _current
    if _current is not None:
        _current.close()
        _current = None


def started(pgid: int) -> None:
    """Record a command's process group, when this process keeps a record."""
    if _current is not None:
        _current.started(pgid)


def ended(pgid: int) -> None:
    """Forget a command's process group."""
    if _current is not None:
        _current.ended(pgid)
