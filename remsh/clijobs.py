"""The command line's side of jobs: ``remsh jobs``, ``remsh job ID`` and
``remsh cancel ID``, and the rendering of a job's events that ``run``,
``put`` and ``get`` through a master share with ``job``.

Everything here talks to a running ``remsh master`` over its control
socket (:mod:`remsh.control`); what it prints about a slave (names, errors,
the command line of a job) is escaped with
:func:`~remsh.lineprinter.printable`, command output excepted.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from typing import Callable, Iterable, List, Optional

from remsh.client import Client
from remsh.control import ControlClient, ControlError, control_path, result_of
from remsh.controlproto import Event
from remsh.errors import UsageError
from remsh.fleet import EXIT_OK, EXIT_SLAVE_FAILED, EXIT_USAGE, Renderer
from remsh.lineprinter import printable
from remsh.outputs import prepare_dir
from remsh.store.base import JOB_CANCELLED, JOB_RUNNING, SLAVE_FAILED, SLAVE_LOST, SLAVE_OK, JobRecord, check_job_id


def error(text: str) -> None:
    """One line ``remsh: TEXT`` on stderr, escaped with :func:`printable`:
    the text may quote a slave (its name, facts or error message)."""
    print(f"remsh: {printable(text)}", file=sys.stderr)


def add_output_options(p: argparse.ArgumentParser) -> None:
    """The options of how ``run`` and ``job`` show a command's output."""
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="one JSON object per slave as it ends")
    g.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="colour the slave names (default: auto, on a terminal unless NO_COLOR is set)")
    g.add_argument("--no-prefix", action="store_true",
                   help="print the output as it comes, without the slave names (the exact bytes)")
    g.add_argument("-o", "--outdir", metavar="DIR",
                   help="each slave's stdout into DIR/NAME (exact bytes; DIR made if missing) instead of the "
                        "terminal")
    g.add_argument("-e", "--errdir", metavar="DIR",
                   help="each slave's stderr into DIR/NAME (exact bytes; DIR made if missing) instead of the "
                        "terminal")
    g.add_argument("--fold", action="store_true",
                   help="print the output when every slave has ended, slaves with the same stdout, stderr and "
                        "status once under one header naming them (web-[1-2], db-1)")
    g.add_argument("--summary", action=argparse.BooleanOptionalAction, default=None,
                   help="end with one line per slave (ok, failed, error, away, skipped; its duration) and the "
                        "totals (default: when stderr is a terminal)")


def check_output_options(args: argparse.Namespace) -> None:
    """Refuse options that do not go together; make the ``-o``/``-e``
    directories.

    :raises UsageError: a bad combination, or a directory that cannot be made
    """
    if args.json and (args.no_prefix or args.fold):
        raise UsageError("--json prints its own objects: no --no-prefix or --fold with it")
    if args.fold and args.no_prefix:
        raise UsageError("--fold and --no-prefix do not go together")
    if args.outdir:
        args.outdir = prepare_dir(args.outdir, "--outdir")
    if args.errdir:
        args.errdir = prepare_dir(args.errdir, "--errdir")


def renderer_for(kind: str, args: argparse.Namespace) -> Renderer:
    """How a job of ``kind`` is shown: lines (``run``), progress
    (``put``/``get``), or one JSON object per slave with ``--json``; the
    output options of ``run`` and ``job`` (:func:`add_output_options`)."""
    colour = getattr(args, "color", "never") == "always" or (
        getattr(args, "color", "never") == "auto" and sys.stdout.isatty() and os.environ.get("NO_COLOR") is None)
    summary = getattr(args, "summary", False)
    if summary is None:
        summary = kind == "run" and not getattr(args, "json", False) and sys.stderr.isatty()
    if getattr(args, "json", False):
        return Renderer("json", out=sys.stdout, err=sys.stderr, summary=summary)
    if kind == "run":
        return Renderer("lines", out=sys.stdout, err=sys.stderr, colour=colour,
                        prefix=not getattr(args, "no_prefix", False), outdir=getattr(args, "outdir", None),
                        errdir=getattr(args, "errdir", None), fold=getattr(args, "fold", False), summary=summary)
    return Renderer("transfer", out=sys.stdout, err=sys.stderr, progress_tty=sys.stderr.isatty())


def state_line(name: str, state: str, detail: str) -> str:
    """The line ``run`` prints when a slave goes away, is back or is lost:
    ``web-2: away (connection lost); waiting up to 300 s``."""
    if state == "away":
        why, _, wait = detail.partition("; ")
        return f"{name}: away ({why or 'connection lost'})" + (f"; {wait}" if wait else "")
    return f"{name}: {state}" + (f" ({detail})" if detail and state != "back" else "")


def render(events: Iterable[Event], make: Callable[[str], Renderer], *, kind: Optional[str] = None,
           on_job: Optional[Callable[[str], None]] = None, interrupted: Callable[[], bool] = lambda: False,
           live: bool = True) -> int:
    """Show a job's events as ``run`` always did and return its exit
    status; ``kind`` is known already (``run``/``put``/``get``) or comes in
    the ``jobrec`` event (``job``).  ``on_job`` gets the job's id.  Every
    line received is written, whatever way this returns or raises."""
    made: List[Renderer] = []

    def making(what: str) -> Renderer:
        made.append(make(what))
        return made[-1]

    try:
        return _render(events, making, kind, on_job, interrupted, live)
    finally:
        for renderer in made:
            renderer.close()


def _render(events: Iterable[Event], make: Callable[[str], Renderer], kind: Optional[str],
            on_job: Optional[Callable[[str], None]], interrupted: Callable[[], bool], live: bool) -> int:
    renderer = make(kind) if kind is not None else None
    job_id = ""
    for ev in events:
        if ev.kind == "job":
            job_id = ev.get("id", "")
            if on_job is not None:
                on_job(job_id)
        elif ev.kind == "jobrec":
            job_id = ev.get("id", "")
            renderer = make(ev.get("kind", "run"))
        elif ev.kind == "fail":
            error(ev.get("message", ""))
            return int(ev.get("exit", EXIT_USAGE))
        elif renderer is None:
            continue
        elif ev.kind == "out":
            renderer.output(ev.get("slave", ""), ev.get("stream", "stdout"), ev.get("data", b""))
        elif ev.kind == "progress":
            renderer.progress(ev.get("slave", ""), ev.get("done", 0), ev.values["total"])
        elif ev.kind == "end":
            renderer.end(result_of(ev))
        elif ev.kind == "begin":
            renderer.begin(ev.get("names", []))
        elif ev.kind == "state":
            renderer.message(state_line(ev.get("slave", ""), ev.get("state", ""), ev.get("detail", "")))
        elif ev.kind == "done":
            state = ev.get("state", "")
            cancelled = bool(ev.values["interrupted"]) or interrupted()
            if state == JOB_CANCELLED and job_id:
                renderer.message(f"remsh: job {job_id} cancelled")
            status = renderer.finish(cancelled)
            if state == JOB_RUNNING and not live:
                renderer.message(f"remsh: job {job_id} is still running (remsh job {job_id} --follow)")
            return status
    if job_id:  # the job may well go on (a master restarted takes it back): say which it is
        error(f"lost the master before the end of job {job_id}; once a master is back: "
              f"remsh job {job_id} --follow")
    else:
        error("lost the master before the end")
    return EXIT_SLAVE_FAILED


def _client(args: argparse.Namespace) -> ControlClient:
    return ControlClient(control_path(args.master)[0])


def _master(args: argparse.Namespace) -> Client:
    """The client of the master ``--master`` (or the default) names."""
    return Client(control_path(args.master)[0])


def what_of(record: JobRecord) -> str:
    """The command line or the paths of a job, in one line."""
    spec = record.spec
    argv = spec.get("argv")
    if isinstance(argv, list):
        return shlex.join(str(a) for a in argv)
    paths = spec.get("paths")
    if isinstance(paths, list) and len(paths) == 2:
        return f"{paths[0]} -> {paths[1]}"
    return ""


def _duration(record: JobRecord) -> str:
    end = record.finished if record.finished is not None else time.time()
    seconds = max(0.0, end - record.started)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


def cmd_jobs(args: argparse.Namespace) -> int:
    """``remsh jobs [--json] [--running] [-n N]``: newest first."""
    if args.n is not None and args.n < 1:
        error("-n must be at least 1")
        return EXIT_USAGE
    records = [job.record for job in _master(args).jobs(running=args.running, limit=args.n)]
    if args.json:
        print(json.dumps([r.to_json() for r in records], indent=1))
        return EXIT_OK
    header = ["ID", "KIND", "STATE", "STARTED", "DURATION", "OK", "FAILED", "WHAT"]
    rows = [header]
    for r in records:
        states = [s.state for s in r.slaves.values()]
        rows.append([r.id, r.kind, r.state, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.started)),
                     _duration(r), str(states.count(SLAVE_OK)),
                     str(states.count(SLAVE_FAILED) + states.count(SLAVE_LOST)), printable(what_of(r))])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    for row in rows:
        print("  ".join([cell.ljust(w) for cell, w in zip(row, widths)] + [row[-1]]).rstrip())
    return EXIT_OK


def cmd_job(args: argparse.Namespace) -> int:
    """``remsh job ID [--follow] [--json]``: the job's output as ``run``
    printed it, and its exit status."""
    try:
        job_id = check_job_id(args.id)
        check_output_options(args)
    except UsageError as e:
        error(str(e))
        return EXIT_USAGE
    client = _client(args)
    try:
        client.request("job", id=job_id, follow=args.follow)
        return render(client.decoded(), lambda kind: renderer_for(kind, args), live=args.follow)
    finally:
        client.close()


def cmd_cancel(args: argparse.Namespace) -> int:
    """``remsh cancel ID``: exit 0, or 2 for an unknown or ended job."""
    try:
        job_id = check_job_id(args.id)
    except UsageError as e:
        error(str(e))
        return EXIT_USAGE
    try:
        _master(args).cancel(job_id)
    except ControlError as e:  # unknown or ended: one line, exit 2
        error(str(e))
        return e.exit
    return EXIT_OK


def cmd_web(args: argparse.Namespace) -> int:
    """``remsh web``: the URL the master gives through its control socket,
    on stdout; exit 2 with one line when there is none."""
    try:
        url = _master(args).web_url()
    except ControlError as e:
        error(str(e))
        return e.exit
    print(url)
    return EXIT_OK


def add_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """The ``jobs``, ``job`` and ``cancel`` subcommands."""
    jobs = sub.add_parser("jobs", help="list the master's jobs, newest first",
                          description="The jobs of the master (run, put, get), newest first: id, kind, state, "
                                      "start (UTC), duration, slaves ok and failed, what it does.")
    jobs.add_argument("--json", action="store_true",
                      help="a JSON array of records (id, kind, state, argv or paths, started, finished, slaves)")
    jobs.add_argument("--running", action="store_true", help="only the jobs still running")
    jobs.add_argument("-n", type=int, metavar="N", help="at most the N newest")
    job = sub.add_parser("job", help="print a job's output as run did, and exit with its status",
                         description="Print a job's stored output as run would have (prefixed lines, or "
                                     "--json), then with --follow go on live until it ends.  Exit status: "
                                     "the one run would have had; 2 for an unknown id.")
    job.add_argument("id", metavar="ID", help="the job's id (remsh jobs lists them)")
    job.add_argument("--follow", "-f", action="store_true", help="go on until the job ends")
    add_output_options(job)
    cancel = sub.add_parser("cancel", help="cancel a running job on every slave",
                            description="Interrupt a running job on every slave (commands' process groups "
                                        "killed, transfers abandoned); its state becomes cancelled.  Exit 0, "
                                        "or 2 for an unknown or already ended job.")
    cancel.add_argument("id", metavar="ID", help="the job's id (remsh jobs lists them)")
