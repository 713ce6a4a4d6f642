"""Scripts against a running ``remsh master``: the command line's
operations as Python calls.

A program that drives slaves does not have to own a listener: it can use
the master that already holds them, through the master's control socket,
exactly as the ``remsh`` commands do::

    import remsh.client

    master = remsh.client.connect()          # --master / $REMSH_MASTER / default
    job = master.run(["uname", "-r"], targets=["web-*"])
    for name, result in job.results.items():
        print(name, result.state, result.exit_status, job.output(name)[0])

:func:`connect` returns a :class:`Client`; its calls are the command
line's (``ls``, ``run``, ``put``, ``get``, ``jobs``, ``job``, ``cancel``),
sent through the same control protocol (:mod:`remsh.controlproto`), and
jobs come back as :class:`Job` objects: the job's stored record (per slave
a :class:`Result`) and its output, byte for byte, stdout and stderr apart.

Threads: a :class:`Client` holds nothing but the socket's path, and every
call opens a connection of its own, so one client may serve any number of
threads at once; a :class:`Job` may be shared between threads too (its
state is swapped under a lock).  Errors are :class:`~remsh.errors.RemshError`
subclasses: :class:`~remsh.control.NoMaster` when no master runs at the
path, :class:`~remsh.control.ControlError` for a request the master
refused (``exit`` is the status ``remsh`` would exit with),
:class:`NoSuchJob` for an unknown id, :class:`JobAlreadyEnded` for a
cancel that came late, :class:`~remsh.errors.WaitTimeout` when
:meth:`Job.wait` runs out of time, and :class:`~remsh.errors.UsageError`
for arguments the call itself refuses.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import IO, Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from remsh.control import (CLIENT_SILENCE, ERRTAG_JOB_ENDED, ERRTAG_UNKNOWN_JOB, ControlClient, ControlError,
                           NoMaster, control_path)
from remsh.choice import ls_row
from remsh.controlproto import EVENTS, Event, decode_event
from remsh.errors import RemshError, UsageError, WaitTimeout
from remsh.pacing import check_batch, check_max_fail
from remsh.store.base import JOB_FINAL_STATES, JobRecord, SlaveRecord, check_job_id

log = logging.getLogger(__name__)

__all__ = ["connect", "Client", "Job", "Result", "Transcript", "NoSuchJob", "JobAlreadyEnded", "ControlError",
           "NoMaster", "WaitTimeout", "records_of", "fail_error"]

#: Exit status of a refusal without one (the command line's usage error).
_EXIT_USAGE = 2
#: Exit status when the master went away (the command line's slave failure).
_EXIT_LOST = 3
#: Size of the stdin chunks sent to the master.
STDIN_CHUNK = 65536
#: The fields of a slave as :meth:`Client.slaves` gives them (``remsh ls --json``).
SLAVE_FIELDS = tuple(key.name for key in EVENTS["slave"])

#: What :meth:`Client.run` forwards as the command's stdin.
Stdin = Union[bytes, bytearray, memoryview, IO[bytes]]


class NoSuchJob(ControlError):
    """The master's job store has no job with that id (never had, or it was
    pruned past ``--keep-jobs``)."""


class JobAlreadyEnded(ControlError):
    """The job asked to be cancelled has already ended."""


def fail_error(event: Event) -> ControlError:
    """The exception a ``fail`` event stands for: :class:`NoSuchJob`,
    :class:`JobAlreadyEnded` (by its ``errtag``), or :class:`ControlError`
    with the event's message and exit status."""
    message = event.get("message", "the master refused the request")
    code = int(event.get("exit", _EXIT_USAGE))
    tag = event.get("errtag")
    if tag == ERRTAG_UNKNOWN_JOB:
        return NoSuchJob(message, code)
    if tag == ERRTAG_JOB_ENDED:
        return JobAlreadyEnded(message, code)
    return ControlError(message, code)


def records_of(events: Iterable[Event]) -> List[JobRecord]:
    """The job records of ``jobrec``/``jobslave`` events (the answer to a
    ``jobs`` request), up to ``done``.

    :raises ControlError: the master refused (``fail``; see :func:`fail_error`)
    """
    records: List[JobRecord] = []
    for ev in events:
        v = ev.values
        if ev.kind == "jobrec":
            records.append(JobRecord(v["id"] or "", v["kind"] or "", dict(v["spec"] or {}), v["uid"] or 0,
                                     v["state"] or "", v["started"] or 0.0, v["finished"]))
        elif ev.kind == "jobslave" and records:
            records[-1].slaves[v["name"] or ""] = SlaveRecord(
                v["name"] or "", v["state"] or "", v["exit_status"], v["error"], v["errtag"], v["started"],
                v["finished"], v["stdout_bytes"] or 0, v["stderr_bytes"] or 0, bool(v["truncated"]))
        elif ev.kind == "fail":
            raise fail_error(ev)
        elif ev.kind == "done":
            break
    return records


@dataclasses.dataclass(frozen=True)
class Result:
    """What a job did on one slave, as the master's job store records it.

    ``state`` is one of ``queued``, ``running``, ``away``, ``ok``,
    ``failed``, ``lost``, ``cancelled``, ``skipped``; ``exit_status`` the
    command's (``None`` for a transfer that failed, or a command that never
    ended); ``error`` why it failed when it did not end by itself.
    ``stdout_bytes``/``stderr_bytes`` count every byte the command wrote,
    ``truncated`` says the store kept only the first ``--max-job-output``
    of them.  ``summary``: what a transfer moved, in words.
    """

    name: str
    state: str
    exit_status: Optional[int] = None
    error: Optional[str] = None
    errtag: Optional[str] = None
    started: Optional[float] = None
    finished: Optional[float] = None
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    truncated: bool = False
    summary: Optional[str] = None

    @property
    def ok(self) -> bool:
        """The slave's part ended well (a command: exit status 0)."""
        return self.state == "ok"

    @property
    def duration(self) -> Optional[float]:
        """Seconds from start to end; ``None`` until it has both."""
        if self.started is None or self.finished is None:
            return None
        return max(0.0, self.finished - self.started)

    @classmethod
    def of(cls, record: SlaveRecord, summary: Optional[str] = None) -> "Result":
        """The result a store's slave record stands for."""
        return cls(record.name, record.state, record.exit_status, record.error, record.errtag, record.started,
                   record.finished, record.stdout_bytes, record.stderr_bytes, record.truncated,
                   summary if summary else record.summary)


class Transcript:
    """The output and the ``end`` summaries of one job, as its events
    arrive; the job's state from its ``done``."""

    def __init__(self) -> None:
        self.out: Dict[str, Tuple[bytearray, bytearray]] = {}
        self.summaries: Dict[str, str] = {}
        self.state: Optional[str] = None

    def take(self, ev: Event) -> bool:
        """Take one event; True at the last one (``done``).

        :raises ControlError: a ``fail`` event (:func:`fail_error`)
        """
        if ev.kind == "out":
            out, err = self.out.setdefault(ev.get("slave", ""), (bytearray(), bytearray()))
            (err if ev.get("stream") == "stderr" else out).extend(ev.get("data", b""))
        elif ev.kind == "begin":
            for name in ev.get("names", []):
                self.out.setdefault(name, (bytearray(), bytearray()))
        elif ev.kind == "end" and ev.get("summary"):
            self.summaries[ev.get("slave", "")] = ev.get("summary")
        elif ev.kind == "fail":
            raise fail_error(ev)
        elif ev.kind == "done":
            self.state = ev.get("state")
            return True
        return False

    def outputs(self) -> Dict[str, Tuple[bytes, bytes]]:
        return {name: (bytes(out), bytes(err)) for name, (out, err) in self.out.items()}


class Job:
    """One job of the master (a ``run``, ``put`` or ``get``): its record,
    and its output once read.

    ``id``, ``kind``, ``state`` (``running``, ``done``, ``failed``,
    ``cancelled``), ``spec`` (what was asked: ``argv`` or ``paths``, the
    targets...), ``started``/``finished`` and ``results`` are as the master
    last said; :meth:`refresh` asks again, :meth:`wait` follows the job to
    its end.  A job returned by :meth:`Client.run` without ``detach`` (or
    by :meth:`wait`) has ended and holds its whole output.
    """

    def __init__(self, client: "Client", record: JobRecord,
                 outputs: Optional[Dict[str, Tuple[bytes, bytes]]] = None,
                 summaries: Optional[Dict[str, str]] = None) -> None:
        self.client = client
        self.id = record.id
        self._lock = threading.Lock()
        self._record = record
        self._outputs = outputs
        self._summaries = dict(summaries or {})
        # output read while the job ran is read again once asked for after
        self._outputs_final = outputs is not None and record.finished_state

    def __repr__(self) -> str:
        return f"<remsh.client.Job {self.id} {self.kind} {self.state}>"

    @property
    def record(self) -> JobRecord:
        """The job's record as the store holds it (``remsh jobs --json``'s)."""
        with self._lock:
            return self._record

    @property
    def kind(self) -> str:
        return self.record.kind

    @property
    def state(self) -> str:
        """``running``, ``done``, ``failed`` or ``cancelled``, as last read."""
        return self.record.state

    @property
    def done(self) -> bool:
        """The job has ended (whichever way), as last read."""
        return self.record.state in JOB_FINAL_STATES

    @property
    def spec(self) -> Dict[str, object]:
        return dict(self.record.spec)

    @property
    def started(self) -> float:
        return self.record.started

    @property
    def finished(self) -> Optional[float]:
        return self.record.finished

    @property
    def results(self) -> Dict[str, Result]:
        """Per slave name, what the job did there, as last read."""
        with self._lock:
            return {name: Result.of(rec, self._summaries.get(name)) for name, rec in self._record.slaves.items()}

    def output(self, name: str) -> Tuple[bytes, bytes]:
        """``(stdout, stderr)`` of slave ``name``'s command, exactly as the
        store holds them (of a running job: what is stored so far, read
        again at each call until the job has ended).

        :raises KeyError: the job did not run on ``name``
        :raises ControlError: the master cannot be reached
        """
        with self._lock:
            outputs = self._outputs if self._outputs_final else None
        if outputs is None:
            transcript = self.client.transcript(self.id, follow=False)
            outputs = transcript.outputs()
            with self._lock:
                self._outputs = outputs
                self._summaries.update(transcript.summaries)
                self._outputs_final = transcript.state in JOB_FINAL_STATES
        if name not in outputs:
            raise KeyError(f"job {self.id} did not run on {name!r}")
        return outputs[name]

    def refresh(self) -> "Job":
        """Read the job's record again; returns the job."""
        record = self.client.record(self.id)
        with self._lock:
            self._record = record
        return self

    def wait(self, timeout: Optional[float] = None) -> "Job":
        """Follow the job until it ends (at most ``timeout`` seconds) and
        take its whole output and its final record; returns the job.  The
        job goes on if this call gives up.

        :raises WaitTimeout: still running after ``timeout`` seconds
        :raises ControlError: the master went away or refused
        """
        with self._lock:
            ended = self._record.finished_state and self._outputs_final
        if ended:
            return self
        transcript = self.client.transcript(self.id, follow=True, timeout=timeout)
        self._finish(transcript)
        return self

    def cancel(self) -> None:
        """:meth:`Client.cancel` of this job."""
        self.client.cancel(self.id)

    def _finish(self, transcript: Transcript) -> None:
        """Take the output of a job followed to its end, and its final record."""
        record = self.client.record(self.id)
        with self._lock:
            self._record = record
            self._outputs = transcript.outputs()
            self._summaries.update(transcript.summaries)
            self._outputs_final = record.finished_state


def connect(path: Union[str, "os.PathLike[str]", None] = None) -> "Client":
    """A client of the master whose control socket is ``path``; ``None``
    means what the command line uses: ``$REMSH_MASTER``, else the default
    path (:func:`~remsh.control.default_control_path`).

    :raises NoMaster: no master runs there
    :raises ControlError: the socket cannot be used (another user's master...)
    """
    client = Client(control_path(None if path is None else os.fspath(path))[0])
    client.ping()
    return client


class Client:
    """The operations of a running ``remsh master``, each through a
    connection of its own to ``path`` (so any number of threads may share
    one client).  Made by :func:`connect`."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"<remsh.client.Client {self.path}>"

    # -- connections --------------------------------------------------------------------

    def _open(self) -> ControlClient:
        """A connection to the master.  :raises NoMaster, ControlError:"""
        return ControlClient(self.path)

    def _ask(self, op: str, **values: object) -> List[Event]:
        """The events answering one request, up to its last (``done`` or
        ``fail``), on a connection closed after."""
        conn = self._open()
        events: List[Event] = []
        try:
            conn.request(op, **values)
            for ev in conn.decoded():
                events.append(ev)
                if ev.kind in ("done", "fail"):
                    break
            return events
        except OSError as e:
            raise ControlError(f"lost the master: {e.strerror or e}", _EXIT_LOST) from None
        finally:
            conn.close()

    def ping(self) -> None:
        """Check that a master answers at :attr:`path`.

        :raises NoMaster: none does
        :raises ControlError: the socket cannot be used
        """
        self._open().close()

    # -- the operations -----------------------------------------------------------------

    def slaves(self) -> List[Dict[str, Any]]:
        """The connected slaves, sorted by name, as ``remsh ls --json``
        gives them: ``name``, ``transport``, ``peer``, ``since`` (``None``
        when unknown), ``platform``, ``python``, ``remsh``, ``state``,
        ``hostname``, ``basedir``, ``root``, ``no_execute``,
        ``allow_command``, ``job`` (:mod:`remsh.clils`)."""
        rows: List[Dict[str, Any]] = []
        for ev in self._ask("ls"):
            if ev.kind == "slave":
                rows.append(ls_row(ev.values, SLAVE_FIELDS))
            elif ev.kind == "fail":
                raise fail_error(ev)
        return rows

    def record(self, job_id: str) -> JobRecord:
        """The stored record of job ``job_id``.

        :raises NoSuchJob: no such job
        :raises UsageError: ``job_id`` is not shaped like a job id
        """
        records = records_of(self._ask("jobs", id=check_job_id(job_id)))
        if len(records) != 1:
            raise ControlError(f"the master answered {len(records)} records for job {job_id}", _EXIT_LOST)
        return records[0]

    def job(self, job_id: str) -> Job:
        """Job ``job_id`` (running or ended); its output is read when asked for.

        :raises NoSuchJob: no such job
        :raises UsageError: ``job_id`` is not shaped like a job id
        """
        return Job(self, self.record(job_id))

    def jobs(self, running: bool = False, limit: Optional[int] = None) -> List[Job]:
        """The master's jobs, newest first (``remsh jobs``): only those still
        running with ``running``, at most ``limit`` of them."""
        if limit is not None and limit < 1:
            raise UsageError("limit must be at least 1")
        return [Job(self, r) for r in records_of(self._ask("jobs", running=running, limit=limit))]

    def cancel(self, job_id: str) -> None:
        """Cancel a running job on every slave (``remsh cancel``): its
        commands' process groups killed, transfers abandoned.

        :raises NoSuchJob: no such job
        :raises JobAlreadyEnded: it has ended already
        """
        for ev in self._ask("cancel", id=check_job_id(job_id)):
            if ev.kind == "fail":
                raise fail_error(ev)
            if ev.kind == "done":
                return
        raise ControlError("lost the master before the end", _EXIT_LOST)

    def web_url(self) -> str:
        """The URL of the master's web dashboard with its access token
        (``remsh web``).

        :raises ControlError: the master serves no dashboard (exit 2)
        """
        url: Optional[str] = None
        for ev in self._ask("web"):
            if ev.kind == "web":
                url = ev.get("url", "")
            elif ev.kind == "fail":
                raise fail_error(ev)
            elif ev.kind == "done" and url is not None:
                return url
        raise ControlError("lost the master before the end", _EXIT_LOST)

    def transcript(self, job_id: str, *, follow: bool, timeout: Optional[float] = None) -> Transcript:
        """Job ``job_id``'s stored output (``remsh job ID``), with ``follow``
        until the job ends, within ``timeout`` seconds.

        :raises WaitTimeout: ``timeout`` ran out first
        :raises NoSuchJob: no such job
        """
        conn = self._open()
        try:
            conn.request("job", id=check_job_id(job_id), follow=follow)
            return _follow(conn, f"job {job_id}", timeout)
        finally:
            conn.close()

    def run(self, argv: Sequence[str], targets: Optional[Sequence[str]] = None,
            where: Optional[Sequence[str]] = None, stdin: Optional[Stdin] = None,
            timeout: Optional[float] = None, detach: bool = False, *, cwd: Optional[str] = None,
            parallel: Optional[int] = None, batch: Union[int, str, None] = None,
            max_fail: Optional[int] = None) -> Job:
        """Run ``argv`` on the chosen slaves as a job (``remsh run``).

        ``targets``: name globs (a union; all slaves when empty); ``where``:
        ``KEY=GLOB`` facts every chosen slave must have; ``stdin``: bytes or
        a binary file object, read here and given to every command (not with
        ``detach``); ``timeout``: seconds the whole run may take, time away
        included, past which the commands are interrupted; ``cwd``: the
        directory on the slaves; ``parallel``: at most this many slaves at
        once; ``batch`` (``N`` or ``"N%"``) and ``max_fail`` pace the job as
        ``--batch`` and ``--max-fail`` do (slaves never started end
        ``skipped``).  Without ``detach`` the job is followed to its end and returned
        ended, with its output; an exception (``KeyboardInterrupt`` too)
        while following closes the connection, which cancels the job.  With
        ``detach`` it is returned at once, running.

        :raises UsageError: ``argv`` is a string or empty, stdin with detach,
            a bad ``batch`` or ``max_fail``
        :raises ControlError: the master refused (no slave matches...)
        """
        if isinstance(argv, (str, bytes)):
            raise UsageError("run: argv is a list of arguments, not a string")
        if not argv:
            raise UsageError("run: no command given")
        if stdin is not None and detach:
            raise UsageError("run: stdin cannot be given to a detached job")
        return self._submit("run", {"args": list(argv), "cwd": cwd, "timeout": timeout, "stdin": stdin is not None},
                            targets, where, _Pace(parallel, batch, max_fail), detach, stdin)

    def put(self, src: str, dest: str, targets: Optional[Sequence[str]] = None,
            where: Optional[Sequence[str]] = None, *, sync: bool = False, delete: bool = False,
            checksum: bool = False, force: bool = False, parents: bool = False, parallel: Optional[int] = None,
            batch: Union[int, str, None] = None, max_fail: Optional[int] = None, detach: bool = False) -> Job:
        """Copy the local file or tree ``src`` (relative to this process's
        directory; the master reads it) to ``dest`` on the chosen slaves
        (``remsh put``); ``sync``, ``delete``, ``checksum`` as ``--sync``...;
        ``force`` replaces an existing file (``--force``), ``parents`` makes
        missing parent directories (``--parents``); ``parallel``, ``batch``,
        ``max_fail`` as for :meth:`run`.

        :raises UsageError: delete or checksum without sync, a bad ``batch``
        :raises ControlError: the master refused (no such file...)
        """
        if (delete or checksum) and not sync:
            raise UsageError("put: delete and checksum go with sync")
        return self._submit("put", {"src": os.path.abspath(src), "dest": dest, "sync": sync, "delete": delete,
                                    "checksum": checksum, "force": force, "parents": parents},
                            targets, where, _Pace(parallel, batch, max_fail), detach, None)

    def get(self, src: str, dest_dir: str, targets: Optional[Sequence[str]] = None,
            where: Optional[Sequence[str]] = None, *, max_bytes: Optional[int] = None,
            max_files: Optional[int] = None, force: bool = False, parallel: Optional[int] = None,
            batch: Union[int, str, None] = None, max_fail: Optional[int] = None, detach: bool = False) -> Job:
        """Copy ``src`` from every chosen slave into ``dest_dir/NAME/``
        (``remsh get``; ``dest_dir`` relative to this process's directory,
        written by the master); ``max_bytes``/``max_files`` bound what each
        slave may make the master write (``--max-bytes``, ``--max-files``;
        the master's defaults when ``None``); ``force`` replaces what is
        already at ``dest_dir/NAME/`` (``--force``); ``parallel``,
        ``batch``, ``max_fail`` as for :meth:`run`.

        :raises ControlError: the master refused
        """
        return self._submit("get", {"src": src, "dest": os.path.abspath(dest_dir), "max_bytes": max_bytes,
                                    "max_files": max_files, "force": force},
                            targets, where, _Pace(parallel, batch, max_fail), detach, None)

    def _submit(self, op: str, values: Dict[str, object], targets: Optional[Sequence[str]],
                where: Optional[Sequence[str]], pace: "_Pace", detach: bool,
                stdin: Optional[Stdin]) -> Job:
        """Give the master a job, feed its stdin, follow it unless detached."""
        for name, value in (("targets", targets), ("where", where)):
            if isinstance(value, (str, bytes)):
                raise UsageError(f"{op}: {name} is a list of strings, not a string")
        conn = self._open()
        try:
            conn.request(op, targets=list(targets or ()), where=list(where or ()), parallel=pace.parallel,
                         batch=pace.batch, max_fail=pace.max_fail, detach=detach, **values)
            events = conn.decoded()
            job_id = ""
            for ev in events:
                if ev.kind == "job":
                    job_id = ev.get("id", "")
                    break
                if ev.kind == "fail":
                    raise fail_error(ev)
            if not job_id:
                raise ControlError("lost the master before it made the job", _EXIT_LOST)
            if detach:
                return self.job(job_id)
            if stdin is not None:
                _feed(conn, stdin, job_id)
            transcript = _follow(conn, f"job {job_id}", None)
        except OSError as e:
            raise ControlError(f"lost the master: {e.strerror or e}", _EXIT_LOST) from None
        finally:
            conn.close()
        return Job(self, self.record(job_id), transcript.outputs(), transcript.summaries)


class _Pace:
    """A job's pacing as the client was given it, checked before the
    master is asked (the same checks as the command line's)."""

    def __init__(self, parallel: Optional[int], batch: Union[int, str, None], max_fail: Optional[int]) -> None:
        if parallel is not None and parallel < 1:
            raise UsageError(f"parallel must be at least 1, got {parallel}")
        self.parallel = parallel
        self.batch = check_batch(str(batch) if isinstance(batch, int) else batch)
        self.max_fail = check_max_fail(max_fail)


def _follow(conn: ControlClient, what: str, timeout: Optional[float]) -> Transcript:
    """Read a job's events from ``conn`` up to ``done``.

    :raises WaitTimeout: ``timeout`` ran out first
    :raises ControlError: the master went silent or away, or refused
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    transcript = Transcript()
    while True:
        wait = CLIENT_SILENCE
        if deadline is not None:
            wait = min(wait, deadline - time.monotonic())
            if wait <= 0:
                raise WaitTimeout(f"{what}: still running after {timeout:g} s")
        try:
            box = conn.channel.read(wait)
        except TimeoutError:
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"{what}: still running after {timeout:g} s") from None
            raise ControlError(f"the master said nothing about {what} for {CLIENT_SILENCE:g} s", _EXIT_LOST) from None
        except (OSError, RemshError) as e:
            raise ControlError(f"lost the master following {what}: {e}", _EXIT_LOST) from None
        if box is None:
            raise ControlError(f"lost the master before the end of {what}", _EXIT_LOST)
        try:
            ev = decode_event(box)
        except ValueError as e:
            raise ControlError(f"the master sent a malformed event: {e}", _EXIT_LOST) from None
        if transcript.take(ev):
            return transcript


def _feed(conn: ControlClient, stdin: Stdin, job_id: str) -> threading.Thread:
    """Send ``stdin`` to the job in a thread of its own (the master holds
    back a feeder that runs ahead of the commands), then its end."""
    def pump() -> None:
        try:
            if isinstance(stdin, (bytes, bytearray, memoryview)):
                data = bytes(stdin)
                for i in range(0, len(data), STDIN_CHUNK):
                    conn.send_stdin(data[i:i + STDIN_CHUNK])
            else:
                while True:
                    chunk = stdin.read(STDIN_CHUNK)
                    if not chunk:
                        break
                    conn.send_stdin(bytes(chunk))
        except (OSError, RemshError, ValueError) as e:
            log.info("job %s: stdin not sent to its end: %s", job_id, e)
        try:
            conn.send_stdin_eof()
        except (OSError, RemshError):
            pass
    thread = threading.Thread(target=pump, name=f"remsh-client-stdin-{job_id}", daemon=True)
    thread.start()
    return thread
