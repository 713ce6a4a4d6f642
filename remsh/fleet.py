"""Fleet jobs: run a command, put or get files on a chosen set of slaves.

The ``remsh`` program does the same three jobs in two places: inside a
long-running ``remsh master`` (for a client on the control socket, see
:mod:`remsh.control`) and inside ``remsh run --local/--listen`` itself.  Both
use the functions here.  A job reports what happens through a :class:`Sink`
as it happens (output chunks, transfer progress, each slave's end), and the
sink decides where that goes: straight to the terminal (:class:`Renderer`)
or over the control socket to a client that renders it the same way.

Choosing slaves (:func:`filter_slaves`; :func:`remsh.choice.choose` adds
groups and away slaves): ``-t PATTERN`` globs on names
(repeatable, a union), ``--where KEY=GLOB`` on registration facts (all must
hold; a slave without the fact never matches, and a key no slave has is an
error); a choice that matches nothing is an error, never a silent success.

Exit statuses (:func:`exit_status`), the same for every command: 0 all
succeeded; 1 a command exited non-zero (one slave: its own status 1-125);
2 usage or configuration error; 3 some slave failed to run it; 130
interrupted.
"""

from __future__ import annotations

import collections
import fnmatch
import json
import logging
import os
import posixpath
import stat
import sys
import threading
import time
from contextlib import contextmanager
from typing import (Any, Callable, Deque, Dict, Iterator, List, Optional, Protocol, Sequence, Set, TextIO,
                    Tuple)

from remsh.errors import (CommandTimeout, NotFoundError, OpenFailedError, RemoteError,
                          RemoteFileExistsError, RemshError, UsageError, error_tag)
from remsh.lineprinter import LinePrinter, printable
from remsh.outputs import Folder, OutputFiles, outcome_words, status_words, summary_lines
from remsh.pacing import AWAY_ERROR, ERRTAG_AWAY, ERRTAG_SKIPPED, SKIPPED_TAGS, Pacing
from remsh.replace import get_directory, get_replacing, make_parents, missing_directory, put_replacing
from remsh.progressbars import ProgressBars, human_bytes  # noqa: F401 - human_bytes is part of this module's API
from remsh.master.fanout import Cancellation, fan_out
from remsh.master.slave import Slave
from remsh.master.slavecollection.simple import SimpleSlaveCollection

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_SLAVE_FAILED = 3
EXIT_INTERRUPTED = 130

#: Most bytes of one stream of one slave kept for ``--json`` (the rest is
#: dropped and the object says ``"truncated": true``).
MAX_JSON_OUTPUT = 4 * 1024 * 1024
#: Most bytes of forwarded stdin waiting for one slave's command; reading
#: stdin waits while any command is that far behind (flow control).
MAX_STDIN_BACKLOG = 1024 * 1024
#: How often a blocked stdin reader looks whether its command has ended.
STDIN_POLL = 0.1
#: Default number of slaves driven at once.
DEFAULT_PARALLEL = 64
#: Default number of slaves transferring files at once.
DEFAULT_TRANSFER_PARALLEL = 8
#: Default bounds of what ``remsh get`` takes from each slave: bytes of file
#: data, and entries (files, directories, links) of a tree.
DEFAULT_GET_MAX_BYTES = 64 << 30
DEFAULT_GET_MAX_FILES = 1_000_000


# -- facts and selection ------------------------------------------------------


def transport_of(slave: Slave) -> str:
    """``tcp``, ``tls``, ``ssh``, ``local`` (or ``?``): how ``slave`` is connected."""
    listener = slave.listener
    kind = type(listener).__name__ if listener is not None else ""
    if kind.startswith("Ssh"):
        return "ssh"
    if kind.startswith("Local"):
        return "local"
    if kind.startswith("Tcp"):
        return "tls" if getattr(listener, "ssl_context", None) is not None else "tcp"
    return "?"


def slave_facts(slave: Slave) -> Dict[str, str]:
    """What ``--where`` matches: the slave's registration info plus
    ``name`` and ``transport``."""
    facts = dict(slave.info)
    facts["name"] = slave.name
    facts["transport"] = transport_of(slave)
    return facts


def parse_where(spec: str) -> Tuple[str, str]:
    """``KEY=GLOB`` -> (key, glob).

    :raises UsageError: no ``=`` or an empty key
    """
    key, sep, glob = spec.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--where expects KEY=GLOB (e.g. platform=Linux*), got {spec!r}")
    return key.strip(), glob


def filter_slaves(slaves: Sequence[Slave], globs: Sequence[str], wheres: Sequence[Tuple[str, str]], *,
                  connected_only: bool) -> List[Slave]:
    """The slaves whose name matches any of ``globs`` (all when there is
    none) and whose facts match every ``(key, glob)`` of ``wheres``, in their
    order (with ``connected_only``, the connected ones only).

    :raises UsageError: no slave looked at has one of the keys of ``wheres``
    """
    chosen = []
    known: Set[str] = set()
    for slave in slaves:
        if connected_only and not slave.connected:
            continue
        facts = slave_facts(slave)
        known.update(facts)
        if globs and not any(fnmatch.fnmatchcase(slave.name, g) for g in globs):
            continue
        if any(k not in facts or not fnmatch.fnmatchcase(facts[k], g) for k, g in wheres):
            continue
        chosen.append(slave)
    unknown = [k for k, _ in wheres if k not in known]
    if unknown and known:
        raise UsageError(f"no connected slave has the fact {unknown[0]!r}; "
                         f"the facts are: {', '.join(sorted(known))}")
    return chosen


class FleetCollection(SimpleSlaveCollection):
    """The collection of a ``remsh master``: also when each slave connected
    and how many jobs hold it now (for ``remsh ls``)."""

    def __init__(self) -> None:
        super().__init__()
        self._since: Dict[int, float] = {}
        self._busy: Dict[int, List[str]] = {}
        self._facts_lock = threading.Lock()
        #: called as ``watcher(slave_name, state, detail)`` for each
        #: ``away``/``back``/``lost`` (the master's job registry records it)
        self.state_watchers: List[Callable[[str, str, str], Any]] = []
        #: the master's ``--groups`` (a :class:`remsh.groups.Groups`), or ``None``
        self.groups: Any = None

    def slave_state(self, slave: Slave, state: str, detail: str) -> None:
        """A listener's report that ``slave`` went away, is back or is lost
        (:meth:`SlaveListener.slave_state`): passed to the watchers."""
        for watcher in list(self.state_watchers):
            watcher(slave.name, state, detail)

    def add_slave(self, slave: Slave, listener: Any = None) -> None:
        """As :meth:`SimpleSlaveCollection.add_slave`, noting the time."""
        super().add_slave(slave, listener)
        with self._facts_lock:
            self._since[id(slave)] = time.time()
        slave.on_disconnect(self._forget_facts)

    def _forget_facts(self, slave: Slave) -> None:
        log.info("slave %s left", slave.name)
        with self._facts_lock:
            self._since.pop(id(slave), None)
            self._busy.pop(id(slave), None)

    @contextmanager
    def holding(self, slave: Slave, job: str = "") -> Iterator[None]:
        """Count ``slave`` as busy with ``job`` (its id) for the ``with`` block."""
        with self._facts_lock:
            self._busy.setdefault(id(slave), []).append(job)
        try:
            yield
        finally:
            with self._facts_lock:
                jobs = self._busy.get(id(slave), [])
                if job in jobs:
                    jobs.remove(job)
                if not jobs:
                    self._busy.pop(id(slave), None)

    def holders(self, slave: Slave) -> List[str]:
        """The ids of the jobs holding ``slave`` now, first come first
        (the first runs, the others wait for it; ``""``: a job without id)."""
        with self._facts_lock:
            return list(self._busy.get(id(slave), []))

    def describe(self, slave: Slave) -> Dict[str, Any]:
        """One row of ``remsh ls``: nothing secret, only what the slave
        announced and what the master saw."""
        with self._facts_lock:
            since = self._since.get(id(slave))
            busy = list(self._busy.get(id(slave), []))
        stream = getattr(slave.wire, "stream", None)
        return {
            "name": slave.name,
            "transport": transport_of(slave),
            "peer": show_peer(str(getattr(stream, "peer", "") or "")),
            "since": None if since is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)),
            "platform": slave.info.get("platform", ""),
            "python": slave.info.get("python", ""),
            "remsh": slave.info.get("remsh", ""),
            "state": ("resuming" if getattr(slave.wire, "resuming", False) else "away" if not slave.connected
                      else "busy" if busy else "idle"),
            "hostname": slave.info.get("hostname", ""),
            "basedir": slave.info.get("basedir", ""),
            "root": slave.info.get("policy_root") or None,
            "no_execute": slave.info.get("policy_execute") == "n",
            "allow_command": [c for c in slave.info.get("policy_allow_command", "").split("\0") if c],
            "job": busy[0] or None if busy else None,
        }


def show_peer(peer: str) -> str:
    """A peer address as people write it: an IPv4 address the kernel gave
    as IPv4-mapped IPv6 (``[::ffff:127.0.0.1]:7711``) as plain
    ``127.0.0.1:7711``."""
    if peer.lower().startswith("[::ffff:") and "]" in peer:
        host, _, rest = peer[len("[::ffff:"):].partition("]")
        if host.count(".") == 3:
            return host + rest
    return peer


# -- what a job reports ----------------------------------------------------------


class SlaveResult:
    """How one slave's part of a job ended: ``status`` (the command's exit
    status; 0 for a transfer) or ``error`` (why it could not be done)."""

    __slots__ = ("name", "status", "error", "errtag", "duration_s", "summary", "truncated")

    def __init__(self, name: str, status: Optional[int] = None, error: Optional[str] = None,
                 errtag: Optional[str] = None, duration_s: float = 0.0, summary: str = "",
                 truncated: bool = False) -> None:
        self.name = name
        self.status = status
        self.error = error
        self.errtag = errtag
        self.duration_s = duration_s
        #: for a transfer: what was moved, in words
        self.summary = summary
        #: output past the master's job store limit was not kept
        self.truncated = truncated


class Sink(Protocol):
    """Where a job reports, from several threads at once."""

    def begin(self, names: List[str]) -> None:
        """The job starts on these slaves."""

    def start(self, name: str) -> None:
        """Slave ``name``'s part starts (a slave never started is not told)."""

    def output(self, name: str, stream: str, data: bytes) -> None:
        """A chunk of a command's ``stdout`` or ``stderr``."""

    def progress(self, name: str, done: int, total: Optional[int]) -> None:
        """Bytes moved so far for slave ``name`` (``total`` when known)."""

    def end(self, result: SlaveResult) -> None:
        """Slave ``result.name`` is done."""


def describe_error(error: BaseException, name: str) -> str:
    """What went wrong on slave ``name``, for a line that already starts
    with the name: the error's own text without the slave's name in front."""
    if isinstance(error, CommandTimeout):
        return "timed out"
    if isinstance(error, RemoteError) and error.slave == name:
        where = f"{error.operation}: " if error.operation else ""
        return f"{where}{error.remote_message} [{error.errtag}]"
    text = str(error) or type(error).__name__
    prefix = f"{name}: "
    while text.startswith(prefix):
        text = text[len(prefix):]
    return text


def exit_status(results: Sequence[SlaveResult], interrupted: bool = False) -> int:
    """The exit status for a job's results (see the module docstring).
    Slaves that ``--max-fail`` kept from starting do not count: the
    failures that stopped them do."""
    if interrupted:
        return EXIT_INTERRUPTED
    everyone = len(results)
    results = [r for r in results if r.errtag != ERRTAG_SKIPPED]
    if any(r.error is not None or r.truncated for r in results):  # incomplete output is no success
        return EXIT_SLAVE_FAILED
    statuses = [r.status for r in results if r.status != 0]
    if not statuses:
        return EXIT_OK
    if everyone == 1 and statuses[0] is not None and 1 <= statuses[0] <= 125:
        return statuses[0]
    return EXIT_FAILED


def _fan(slaves: Sequence[Slave], one: Callable[[Slave], SlaveResult], sink: Sink, max_parallel: int,
         cancellation: Cancellation, holder: Optional[FleetCollection],
         pacing: Optional[Pacing] = None) -> List[SlaveResult]:
    """Run ``one`` on every slave, reporting each end to ``sink`` as it comes;
    slaves the fan-out cancelled are reported too, and so are those the
    ``pacing`` (:mod:`remsh.pacing`) did not start: away, or past ``--max-fail``."""
    pacing = pacing or Pacing()
    names = {s.name for s in slaves}
    away = [SlaveResult(name, error=AWAY_ERROR, errtag=ERRTAG_AWAY) for name in pacing.away if name not in names]
    sink.begin([s.name for s in slaves] + [r.name for r in away])
    for result in away:
        sink.end(result)
    reported: Dict[str, SlaveResult] = {}
    lock = threading.Lock()
    job = str(getattr(sink, "job_id", "") or "")

    def op(slave: Slave) -> SlaveResult:
        why = pacing.skip_reason()
        if why is not None:
            result = SlaveResult(slave.name, error=why, errtag=ERRTAG_SKIPPED)
            with lock:
                reported[slave.name] = result
            sink.end(result)
            return result
        ahead = holder.holders(slave) if holder is not None else []
        note = getattr(sink, "slave_state", None)
        if ahead and note is not None:  # it waits its turn: said, not silent
            note(slave.name, "waiting", f"behind job {ahead[0]}" if ahead[0] else "behind another job")
        start = time.monotonic()
        sink.start(slave.name)
        try:
            if holder is not None:
                with holder.holding(slave, job):
                    result = one(slave)
            else:
                result = one(slave)
        except RemshError as e:
            result = SlaveResult(slave.name, error=describe_error(e, slave.name),
                                 errtag=error_tag(e))
        result.duration_s = time.monotonic() - start
        pacing.ended(result.error is not None or result.status != 0)
        with lock:
            reported[slave.name] = result
        sink.end(result)
        return result

    outcomes = fan_out(slaves, op, max_workers=pacing.parallel(max_parallel, len(slaves)),
                       cancellation=cancellation)
    results = list(away)
    for o in outcomes:
        with lock:
            got = reported.get(o.slave.name)
        if got is None:
            error = o.error if o.error is not None else RemshError("no result")
            got = SlaveResult(o.slave.name, error=describe_error(error, o.slave.name), errtag=error_tag(error),
                              duration_s=o.duration or 0.0)
            sink.end(got)
        results.append(got)
    return results


# -- run ----------------------------------------------------------------------------


class StdinTee:
    """One input stream copied to the stdin of many commands.

    Each command has a bounded backlog (:data:`MAX_STDIN_BACKLOG`);
    :meth:`feed` waits while any command still reading is that far behind,
    so the input is read no faster than the slowest command takes it.  A
    command that ends stops counting.
    """

    def __init__(self, names: Sequence[str], limit: int = MAX_STDIN_BACKLOG) -> None:
        """``names``: the slaves whose commands get the input (input fed
        before a command starts waits for it)."""
        self.limit = limit
        self._cond = threading.Condition()
        self._queues: Dict[str, Deque[bytes]] = {name: collections.deque() for name in names}
        self._sizes: Dict[str, int] = {name: 0 for name in names}
        self._eof = False

    def reader(self, slave: Slave) -> "TeeReader":
        """The stdin source for ``slave``'s command (one of the names given)."""
        return TeeReader(self, slave)

    def feed(self, data: bytes, timeout: Optional[float] = None) -> bool:
        """Queue ``data`` for every command still reading; False when
        ``timeout`` ran out first (nothing queued)."""
        if not data:
            return True
        with self._cond:
            if not self._cond.wait_for(
                    lambda: all(size < self.limit for size in self._sizes.values()), timeout):
                return False
            for name, queue in self._queues.items():
                queue.append(data)
                self._sizes[name] += len(data)
            self._cond.notify_all()
        return True

    def end(self) -> None:
        """The input has ended: every command gets end-of-file."""
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wake(self) -> None:
        """Wake waiting readers (one of them was cancelled)."""
        with self._cond:
            self._cond.notify_all()

    def done(self, name: str) -> None:
        """Slave ``name``'s command no longer reads."""
        with self._cond:
            self._queues.pop(name, None)
            self._sizes.pop(name, None)
            self._cond.notify_all()

    def read_for(self, name: str, n: int, finished: Callable[[], bool]) -> bytes:
        """Up to ``n`` bytes of slave ``name``'s input (waiting for some);
        ``b""`` at its end, once it is dropped, or once ``finished()``."""
        with self._cond:
            while True:
                queue = self._queues.get(name)
                if queue is None:
                    return b""
                if queue:
                    chunk = queue.popleft()
                    if len(chunk) > n:
                        queue.appendleft(chunk[n:])
                        chunk = chunk[:n]
                    self._sizes[name] -= len(chunk)
                    self._cond.notify_all()
                    return chunk
                if self._eof or finished():
                    return b""
                self._cond.wait(STDIN_POLL)


class TeeReader:
    """A binary file-like stdin source for one slave's command."""

    def __init__(self, tee: StdinTee, slave: Slave) -> None:
        self._tee = tee
        self._slave = slave
        self._cancelled = False

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes; ``b""`` at the end of the input or once the
        command has ended (:meth:`cancel`)."""
        return self._tee.read_for(self._slave.name, n if n > 0 else MAX_STDIN_BACKLOG,
                               lambda: self._cancelled or not self._slave.connected)

    def cancel(self) -> None:
        """The command has ended (called by ``Slave.execute``): a waiting
        :meth:`read` returns at once."""
        self._cancelled = True
        self._tee.wake()


def run_job(slaves: Sequence[Slave], argv: Sequence[str], sink: Sink, *, cwd: Optional[str] = None,
            timeout: Optional[float] = None, stdin: Optional[StdinTee] = None,
            max_parallel: int = DEFAULT_PARALLEL, cancellation: Optional[Cancellation] = None,
            holder: Optional[FleetCollection] = None, pacing: Optional[Pacing] = None) -> List[SlaveResult]:
    """Run ``argv`` on every slave at once (at most ``max_parallel``, and as
    ``pacing`` says), reporting output and ends to ``sink``; returns one
    result per slave.  ``cancellation`` interrupts the commands."""
    cancellation = cancellation or Cancellation()

    def one(slave: Slave) -> SlaveResult:
        name = slave.name
        try:
            code = slave.execute(list(argv), stdout_cb=lambda d: sink.output(name, "stdout", d),
                                 stderr_cb=lambda d: sink.output(name, "stderr", d), cwd=cwd, timeout=timeout,
                                 stdin=None if stdin is None else stdin.reader(slave),  # type: ignore[arg-type]
                                 interrupted=lambda: cancellation.cancelled)
        finally:
            if stdin is not None:
                stdin.done(name)
        return SlaveResult(name, status=code)

    try:
        return _fan(slaves, one, sink, max_parallel, cancellation, holder, pacing)
    finally:
        if stdin is not None:
            for slave in slaves:  # those never started too: feeding must not wait for them
                stdin.done(slave.name)


# -- put and get ----------------------------------------------------------------------


def _tree_method(slave: Slave, meth: str) -> Callable[..., Any]:
    fn = getattr(slave, meth, None)
    if fn is None:
        raise UsageError(f"directory trees need Slave.{meth}, which this remsh does not have")
    return fn  # type: ignore[no-any-return]


def _sizes(text: str, result: Any) -> str:
    """Words for a tree operation's result object."""
    parts = []
    for attr in ("sent_files", "sent_bytes", "unchanged", "deleted"):
        value = getattr(result, attr, None)
        if value is not None:
            parts.append(f"{attr.replace('_', ' ')} {value}")
    return f"{text}: {', '.join(parts)}" if parts else text


def put_job(slaves: Sequence[Slave], local: str, dest: str, sink: Sink, *, sync: bool = False,
            delete: bool = False, checksum: bool = False, max_parallel: int = DEFAULT_TRANSFER_PARALLEL,
            cancellation: Optional[Cancellation] = None, holder: Optional[FleetCollection] = None,
            pacing: Optional[Pacing] = None, force: bool = False, parents: bool = False) -> List[SlaveResult]:
    """Copy the local file or tree ``local`` to ``dest`` on every slave.

    A file goes into ``dest`` when that is a directory on the slave, else
    to ``dest`` itself (which must not exist unless ``force``).  A tree is
    sent with ``Slave.send_tree`` (to a ``dest`` that must not exist unless
    ``force``), or synchronised with ``Slave.sync_tree`` when ``sync``.
    ``force`` replaces what is there (:func:`remsh.replace.put_replacing`);
    ``parents`` makes the missing directories above ``dest`` (a file put to
    ``DIR/``: ``DIR`` too); without it a put failing for want of them says so.

    :raises UsageError: ``local`` does not exist
    """
    if not os.path.lexists(local):
        raise UsageError(f"no such local file or directory: {local}")
    is_tree = os.path.isdir(local)
    if not is_tree and (sync or delete or checksum):
        raise UsageError("--sync, --delete and --checksum are for directory trees")
    file_mode = None if is_tree else _mode_of(local)  # kept, as send_tree keeps a tree's: a script stays executable
    into = not is_tree and dest.endswith("/")  # a file put to DIR/ goes into DIR (--parents makes DIR)

    def one(slave: Slave) -> SlaveResult:
        name = slave.name

        def progress(done: int, total: Optional[int]) -> None:
            sink.progress(name, done, total)

        if parents:
            make_parents(slave, dest, into=into)
        if is_tree:
            if sync:
                result = _tree_method(slave, "sync_tree")(local, dest, delete=delete, checksum=checksum,
                                                          progress=progress)
                return SlaveResult(name, status=0, summary=_sizes("synced", result))
            send_tree = _tree_method(slave, "send_tree")
            if force:
                replaced = put_replacing(slave, dest, lambda path: send_tree(local, path, progress=progress))
                return SlaveResult(name, status=0, summary="replaced tree" if replaced else "sent tree")
            result = send_tree(local, dest, progress=progress)
            return SlaveResult(name, status=0, summary=_sizes("sent tree", result))
        target = dest
        if slave.stat(dest) == "d":
            target = posixpath.join(dest, os.path.basename(local))
        if force:
            replaced = put_replacing(slave, target,
                                     lambda path: slave.send(local, path, mode=file_mode, progress=progress))
            return SlaveResult(name, status=0, summary=f"{'replaced' if replaced else 'sent to'} {target}")
        slave.send(local, target, mode=file_mode, progress=progress)
        return SlaveResult(name, status=0, summary=f"sent to {target}")

    def hinted(slave: Slave) -> SlaveResult:
        try:
            return one(slave)
        except RemoteFileExistsError as e:  # say the way out, as get does
            if force or sync:
                raise
            raise RemoteFileExistsError(f"{e.remote_message} (put --force replaces it)", slave=e.slave,
                                        operation=e.operation) from None
        except (NotFoundError, OpenFailedError) as e:  # a missing directory: say how to make it
            missing = None if parents else missing_directory(slave, dest, into=into)
            if missing is None:
                raise
            raise type(e)(f"{e.remote_message} (put --parents makes {missing})", slave=e.slave,
                          operation=e.operation) from None

    return _fan(slaves, hinted, sink, max_parallel, cancellation or Cancellation(), holder, pacing)


def _mode_of(local: str) -> Optional[int]:
    """The permission bits of the local file ``local`` (``None`` when it
    cannot be read: the transfer then says why)."""
    try:
        return stat.S_IMODE(os.stat(local).st_mode)
    except OSError:
        return None


def get_job(slaves: Sequence[Slave], remote: str, localdir: str, sink: Sink, *,
            max_parallel: int = DEFAULT_TRANSFER_PARALLEL, cancellation: Optional[Cancellation] = None,
            holder: Optional[FleetCollection] = None, max_bytes: int = DEFAULT_GET_MAX_BYTES,
            max_files: int = DEFAULT_GET_MAX_FILES, pacing: Optional[Pacing] = None,
            force: bool = False) -> List[SlaveResult]:
    """Copy ``remote`` (a file or tree) from every slave to
    ``localdir/NAME/BASENAME``, each at most ``max_bytes`` of file data and
    ``max_files`` entries (a slave past either fails with ``LimitExceeded``).
    An earlier copy there is an error, or replaced with ``force``
    (:func:`remsh.replace.get_replacing`).  A slave that fails leaves no
    ``localdir/NAME/`` that this call made.

    :raises UsageError: ``localdir`` exists and is not a directory
    """
    if os.path.exists(localdir) and not os.path.isdir(localdir):
        raise UsageError(f"not a directory: {localdir}")
    base = posixpath.basename(remote.rstrip("/")) or "root"

    def one(slave: Slave) -> SlaveResult:
        name = slave.name
        mine, made, target = get_directory(name, localdir, base)

        def progress(done: int, total: Optional[int]) -> None:
            sink.progress(name, done, total)

        try:
            if slave.stat(remote) == "d":
                fetch_tree = _tree_method(slave, "fetch_tree")
                get_replacing(target, lambda path: fetch_tree(remote, path, progress=progress, max_bytes=max_bytes,
                                                              max_entries=max_files), force)
                return SlaveResult(name, status=0, summary=f"tree into {target}")
            get_replacing(target, lambda path: slave.fetch(remote, path, progress=progress, max_bytes=max_bytes),
                          force)
            return SlaveResult(name, status=0, summary=f"into {target}")
        except BaseException:
            if made:  # what this call made for a copy that did not come: not left behind
                try:
                    os.rmdir(mine)
                except OSError:
                    pass
            raise

    return _fan(slaves, one, sink, max_parallel, cancellation or Cancellation(), holder, pacing)


# -- the terminal side -------------------------------------------------------------------


class Renderer:
    """The :class:`Sink` that shows a job on this process's terminal, and
    works out the exit status.

    ``mode`` is ``"lines"`` (output lines prefixed with the slave's name, as
    ``remsh run`` always printed), ``"json"`` (one JSON object per slave as
    it ends) or ``"transfer"`` (progress bars on a terminal, a plain line per
    slave otherwise).  For ``"lines"``: ``prefix`` false writes the output
    as it comes (``--no-prefix``), ``outdir``/``errdir`` take stdout/stderr
    into ``DIR/NAME`` instead of the terminal (``-o``/``-e``), ``fold``
    prints the output at the end, once per group of identical slaves
    (``--fold``).  ``summary``: one line per slave and the totals at the
    end, instead of a line per failure.
    """

    def __init__(self, mode: str = "lines", *, out: TextIO = sys.stdout, err: TextIO = sys.stderr,
                 colour: bool = False, progress_tty: bool = False, prefix: bool = True,
                 outdir: Optional[str] = None, errdir: Optional[str] = None, fold: bool = False,
                 summary: bool = False) -> None:
        self.mode = mode
        self.out = out
        self.err = err
        self.colour = colour
        self.prefix = prefix
        self.summary = summary
        self.files = {"stdout": OutputFiles(outdir, "--outdir") if outdir else None,
                      "stderr": OutputFiles(errdir, "--errdir") if errdir else None}
        self.folder = Folder() if fold else None
        self.results: List[SlaveResult] = []
        self.printer = LinePrinter([], colour)
        self.bars = ProgressBars(err, progress_tty)
        self._lock = threading.Lock()
        self._buffers: Dict[Tuple[str, str], bytearray] = {}
        self._truncated: Dict[str, bool] = {}

    def _stream(self, stream: str) -> TextIO:
        return self.err if stream == "stderr" else self.out

    def begin(self, names: List[str]) -> None:
        self.printer = LinePrinter(names, self.colour)
        self.bars.begin(names)

    def start(self, name: str) -> None:
        """Nothing to show."""

    def output(self, name: str, stream: str, data: bytes) -> None:
        if self.mode == "json":
            with self._lock:
                buf = self._buffers.setdefault((name, stream), bytearray())
                room = MAX_JSON_OUTPUT - len(buf)
                if len(data) > room:
                    self._truncated[name] = True
                buf += data[:max(0, room)]
            return
        files = self.files.get(stream)
        if files is not None:
            files.write(name, data)
        elif self.folder is not None:
            self.folder.output(name, stream, data)
        elif self.prefix:
            self.printer.write(name, self._stream(stream), data)
        else:
            self.printer.write_raw(self._stream(stream), data)

    def progress(self, name: str, done: int, total: Optional[int]) -> None:
        self.bars.update(name, done, total)

    def end(self, result: SlaveResult) -> None:
        name = result.name
        for files in self.files.values():
            why = None if files is None else files.end(name, result.status is not None)
            if why is not None and result.error is None:
                result.error, result.errtag = why, "local"
        with self._lock:
            self.results.append(result)
        if self.mode == "json":
            with self._lock:
                out = bytes(self._buffers.pop((name, "stdout"), b""))
                err = bytes(self._buffers.pop((name, "stderr"), b""))
            obj: Dict[str, Any] = {"name": name, "status": result.status,
                                   "stdout": out.decode("utf-8", "replace"),
                                   "stderr": err.decode("utf-8", "replace"),
                                   "duration_s": round(result.duration_s, 3), "error": result.error}
            if self._truncated.get(name) or result.truncated:
                obj["truncated"] = True
            self.printer.write_line(self.out, json.dumps(obj))
            return
        self.printer.flush(name, self.out)
        self.printer.flush(name, self.err)
        if self.mode == "transfer":
            self.bars.ended(name)
            if not self.bars.tty and result.error is None:  # a failure is told once, at the end
                text = f"{name}: {result.summary or 'done'} ({result.duration_s:.1f} s)"
                self.printer.write_line(self.out, printable(text))

    def message(self, text: str) -> None:
        """One line of the program's own on stderr (escaped: it may quote a slave)."""
        self.bars.clear()
        self.printer.write_line(self.err, printable(text))

    def close(self) -> None:
        """Write every line still held (on any way out; see LinePrinter.close)."""
        self.printer.close()

    def finish(self, interrupted: bool = False) -> int:
        """Print the summary lines and return the exit status."""
        self.printer.flush_all()
        self.bars.finish()
        if self.folder is not None:
            outcomes = {r.name: outcome_words(r.status, r.error, r.errtag) for r in self.results}
            self.folder.print_groups(self.printer, self.out, self.err, outcomes)
        failed = skipped = 0
        for r in sorted(self.results, key=lambda r: r.name):
            if r.errtag in SKIPPED_TAGS:  # never started: said, never silently left out
                skipped += 1
                if not self.summary:
                    self.printer.write_line(self.err, printable(f"remsh: {r.name}: skipped: {r.error}"))
            elif r.error is not None or r.status != 0:
                failed += 1
                if not self.summary:
                    what = r.error if r.error is not None else status_words(r.status, interrupted)
                    self.printer.write_line(self.err, printable(f"remsh: {r.name}: {what}"))
            if r.truncated and self.mode != "json":
                self.printer.write_line(self.err, printable(f"remsh: {r.name}: incomplete: output past the "
                                                            f"master's --max-job-output was not kept"))
        if self.summary:
            for line in summary_lines([(r.name, r.status, r.error, r.errtag, r.duration_s) for r in self.results]):
                self.printer.write_line(self.err, line)
        if interrupted:
            self.printer.write_line(self.err, "remsh: interrupted")
        elif (failed or skipped) and not self.summary:
            n = len(self.results)
            of = f"of {n} slave{'' if n == 1 else 's'}"
            text = f"failed on {failed} {of}" + (f", {skipped} skipped" if skipped else "") if failed \
                else f"{skipped} {of} skipped"
            self.printer.write_line(self.err, f"remsh: {text}")
        return exit_status(self.results, interrupted)
