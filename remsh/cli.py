"""``remsh``: the master program.

``remsh master [listener options]`` runs a long-lived master: it holds the
TCP/TLS/SSH listeners and the connected slaves, and serves a control socket
(:mod:`remsh.control`) through which the other commands reach them:

- ``remsh ls [-t PATTERN]... [--where KEY=GLOB]... [--json]``: the slaves
  (:mod:`remsh.clils`);
- ``remsh run [-t PATTERN]... [--where KEY=GLOB]... [--stdin] [--json] -- COMMAND [ARG ...]``:
  run a command on the chosen slaves, each output line prefixed with the
  slave's name;
- ``remsh put [-t ...] LOCAL DEST`` / ``remsh get [-t ...] REMOTE LOCALDIR``:
  copy files and trees, with a progress bar on a terminal;
- ``remsh jobs``, ``remsh job ID [--follow]``, ``remsh cancel ID``: every
  ``run``/``put``/``get`` given to a master is a *job*, recorded in the
  master's job store (``--state-dir``); ``--detach`` prints its id and
  leaves it running (:mod:`remsh.jobs`, :mod:`remsh.clijobs`).

The master is found by ``--master PATH`` (before the subcommand or after it), else
``$REMSH_MASTER``, else the default control path.  ``run``, ``put`` and
``get`` also work without a master, but only when asked: with ``--local N``
or ``--listen``/``--ssh-listen`` they set up their own slaves for the one
command.  With neither and no master reachable they stop (exit 2, "no remsh
master running at PATH"): never a silent fall-back to this machine, where a
``remsh run -- reboot`` typed while the master is down would reboot the
operator's own computer.

``remsh host-key --host-key FILE`` prints the fingerprint of an SSH host key
and the ``known_hosts`` line slaves need to trust the embedded SSH server.

Exit statuses (the same for every command):

- 0: it succeeded on every slave;
- 1: the command exited non-zero on some slave (with a single slave, its own
  status is passed through when it is 1-125);
- 2: usage or configuration error (one line on standard error, no
  traceback): bad options, an unreadable secret file, a port in use, a
  missing host key, no master, no slave matching the choice;
- 3: some slave failed to run it (unreachable, disconnected, timed out,
  could not start the command); takes precedence over 1;
- 130: interrupted (Ctrl-C): running commands are interrupted first.

``$REMSH_SECRET`` is taken out of the environment as soon as the program
starts, so local slaves and the commands they run never see it.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import signal
import ssl
import sys
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

import remsh
from remsh.argtypes import positive_count
from remsh.choice import choose
from remsh.clihelp import OneLineParser, describe
from remsh.clils import add_ls_parser, cmd_ls
from remsh.control import (ControlClient, ControlError, ControlServer, NoMaster, control_path,
                           make_private_directory)
from remsh.errors import RemshError, UsageError, WaitTimeout
from remsh.fleet import (DEFAULT_GET_MAX_BYTES, DEFAULT_GET_MAX_FILES, DEFAULT_PARALLEL, DEFAULT_TRANSFER_PARALLEL,
                         EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK,
                         EXIT_SLAVE_FAILED, EXIT_USAGE, FleetCollection, Renderer, SlaveResult, StdinTee,
                         describe_error, exit_status, get_job, parse_where, put_job, run_job)
from remsh.groups import Groups, GroupsError, serve_until_stopped
from remsh.masterlog import PrintableFormatter, add_log_options, announce
from remsh.masterlog import configure as configure_master_log
from remsh.pacing import Pacing, check_batch, check_max_fail
from remsh.handshake import as_secret
from remsh.clijobs import add_parsers as add_job_parsers
from remsh.clijobs import (add_output_options, check_output_options, cmd_cancel, cmd_jobs, cmd_web, render,
                          renderer_for, state_line)
from remsh.clijobs import cmd_job as cmd_show_job
from remsh.web.options import WEB_URL_FILE, add_http_options, add_web_parser, start_dashboard
from remsh.lineprinter import printable
from remsh.master.fanout import Cancellation
from remsh.master.slave import Slave
from remsh.master.slavecollection.simple import SimpleSlaveCollection
from remsh.master.slavelistener.base import SlaveListener
from remsh.secretfile import read_secret_file, take_env_secret
from remsh.store.base import DEFAULT_MAX_OUTPUT, StoreError, parse_duration, parse_size
from remsh.store.sqlite import SqliteJobStore
from remsh.masterstore import add_store_options, open_shared_store
from remsh.slaveregistry import share_slaves
from remsh.store.base import JobStore

log = logging.getLogger("remsh")

__all__ = ["main", "build_parser", "describe_error", "exit_status", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE",
           "EXIT_SLAVE_FAILED", "EXIT_INTERRUPTED"]

#: After Ctrl-C, how long ``run``/``put``/``get`` waits for the master to
#: say the job ended before it leaves anyway (the master goes on cancelling).
INTERRUPT_ANSWER = 0.8


class ConfigError(Exception):
    """A usage or configuration problem found while setting up: reported as
    one line, exit status 2."""


class SlavesUnavailable(Exception):
    """The slaves asked for did not turn up: one line, exit status 3."""


def parse_hostport(spec: str) -> Tuple[Optional[str], int]:
    """``[HOST:]PORT`` (IPv6 host in brackets) -> (host or None, port)."""
    host: Optional[str] = None
    port = spec
    if spec.startswith("["):
        h, _, rest = spec[1:].partition("]")
        host, port = h, rest.lstrip(":")
    elif ":" in spec:
        host, _, port = spec.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected [HOST:]PORT, got {spec!r}") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0 to 65535, got {number}")
    return host or None, number



def _listener_options(p: argparse.ArgumentParser, *, waiting: bool) -> None:
    """The options that set up slaves in this process (``remsh master``, and
    ``run``/``put``/``get`` without a master)."""
    g = p.add_argument_group("local slaves")
    g.add_argument("--local", type=positive_count, metavar="N",
                   help="start N local slaves (without a master, the only way to run on this machine)")
    g.add_argument("--basedir", default=".", help="base directory of local slaves (default: .)")
    g = p.add_argument_group("listening for slaves")
    g.add_argument("--listen", type=parse_hostport, metavar="[HOST:]PORT", help="accept slaves over TCP")
    g.add_argument("--secret-file", metavar="FILE", help="shared secret (alternative: $REMSH_SECRET)")
    g.add_argument("--insecure", action="store_true", help="accept TCP slaves without a secret")
    g.add_argument("--tls-cert", metavar="FILE", help="certificate chain (PEM) for TLS")
    g.add_argument("--tls-key", metavar="FILE", help="private key (PEM) for TLS")
    g.add_argument("--ssh-listen", type=parse_hostport, metavar="[HOST:]PORT",
                   help="accept slaves with the embedded SSH server")
    g.add_argument("--host-key", metavar="FILE", help="SSH host key (private key file)")
    g.add_argument("--authorized-keys", metavar="FILE",
                   help="slave keys; each key's comment is the name it may register as")
    if waiting:
        g = p.add_argument_group("waiting for slaves (without a master)")
        g.add_argument("--wait", type=positive_count, metavar="N", help="wait for N slaves before starting")
        g.add_argument("--slave", action="append", default=[], metavar="NAME",
                       help="wait for and use this slave (repeatable)")
        g.add_argument("--wait-timeout", type=float, default=60.0, metavar="SECONDS",
                       help="how long to wait for them (default: 60)")


def _choice_options(p: argparse.ArgumentParser, parallel: int) -> None:
    g = p.add_argument_group("choosing slaves")
    g.add_argument("-t", "--target", action="append", default=[], metavar="PATTERN",
                   help="slaves whose name matches this glob (repeatable: any of them; default: all)")
    g.add_argument("--where", action="append", default=[], metavar="KEY=GLOB",
                   help="slaves whose registration fact matches (platform=Linux*, python=3.1*; all must hold)")
    g.add_argument("--max-parallel", type=int, default=parallel, metavar="N",
                   help=f"slaves driven at once (default: {parallel})")
    g.add_argument("--batch", metavar="N|N%", help="at most N slaves (or N%% of them) at a time, rolling")
    g.add_argument("--max-fail", type=int, metavar="K", help="after K slaves failed, start no more (the rest: skipped)")
    p.add_argument("--detach", action="store_true",
                   help="with a master: print the job's id and leave it running (see remsh jobs, job, cancel)")


def _seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {text!r}")
    return value


def _duration_arg(text: str) -> float:
    try:
        return parse_duration(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def default_state_dir() -> str:
    """``$XDG_STATE_HOME/remsh``, else ``~/.local/state/remsh``."""
    state = os.environ.get("XDG_STATE_HOME")
    if state and os.path.isabs(state):
        return os.path.join(state, "remsh")
    return os.path.join(os.path.expanduser("~"), ".local", "state", "remsh")


def build_parser() -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = OneLineParser(prog="remsh", description="Run commands on many machines.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (repeatable)")
    p.add_argument("--version", action="version", version=f"remsh {remsh.__version__}")
    p.add_argument("--master", metavar="PATH",
                   help="control socket of the master (default: $REMSH_MASTER, else "
                        "$XDG_RUNTIME_DIR/remsh/master.sock or ~/.remsh/master.sock)")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("master", help="run a master: listeners, slaves and the control socket")
    _listener_options(m, waiting=False)
    m.add_argument("--control", metavar="PATH", help="control socket to serve (default: as --master)")
    m.add_argument("--resume-timeout", type=_seconds_arg, default=300.0, metavar="SECONDS",
                   help="how long the work of a TCP/TLS/SSH slave whose connection dropped waits for it to "
                        "come back (default 300; 0: not at all, its calls fail at once)")
    g = m.add_argument_group("jobs")
    g.add_argument("--state-dir", metavar="DIR",
                   help="where the job store lives, DIR/jobs.sqlite (default: $XDG_STATE_HOME/remsh, else "
                        "~/.local/state/remsh; made 0700)")
    g.add_argument("--keep-jobs", type=_duration_arg, default="7d", metavar="DURATION",
                   help="keep ended jobs this long (e.g. 90 or 90s, 12h, 7d; default 7d); pruned at start and hourly")
    g.add_argument("--max-job-output", type=_size_arg, default=DEFAULT_MAX_OUTPUT, metavar="SIZE",
                   help="output kept per slave per job (e.g. 1M, 64M; default 64M); past it the record says "
                        "truncated and the command goes on")
    add_store_options(g)
    add_http_options(m)
    m.add_argument("--groups", metavar="FILE", help="named groups of slaves for -t @NAME (TOML; reread on SIGHUP)")
    add_log_options(m)

    add_ls_parser(sub)

    run = sub.add_parser("run", help="run a command on slaves")
    _listener_options(run, waiting=True)
    _choice_options(run, DEFAULT_PARALLEL)
    g = run.add_argument_group("the command")
    g.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="bound the run by the wall clock, time a slave is away included: past it the command "
                        "is killed (now, or when its slave is back) and that slave fails (exit 3)")
    g.add_argument("--cwd", help="directory to run in, relative to each slave's base directory")
    g.add_argument("--stdin", action="store_true", help="forward this program's stdin to every command")
    add_output_options(run)
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG ...]",
                     help="the command and its arguments (no shell: sh -c '...' for one)")

    put = sub.add_parser("put", help="copy a local file or tree to slaves")
    _listener_options(put, waiting=True)
    _choice_options(put, DEFAULT_TRANSFER_PARALLEL)
    put.add_argument("--sync", action="store_true", help="send only what changed (trees)")
    put.add_argument("--delete", action="store_true", help="with --sync: delete what the source lacks")
    put.add_argument("--checksum", action="store_true", help="with --sync: compare contents, not size and time")
    put.add_argument("--force", action="store_true", help="replace an existing DEST (built beside it, then swapped)")
    put.add_argument("--parents", action="store_true", help="make the missing directories above DEST")
    put.add_argument("local_path", metavar="LOCAL", help="local file or directory")
    put.add_argument("dest", metavar="DEST", help="path on each slave (relative: to its base directory)")

    get = sub.add_parser("get", help="copy a file or tree from slaves into LOCALDIR/NAME/")
    _listener_options(get, waiting=True)
    _choice_options(get, DEFAULT_TRANSFER_PARALLEL)
    get.add_argument("--max-bytes", type=_size_arg, default=DEFAULT_GET_MAX_BYTES, metavar="SIZE",
                     help="most file data taken from each slave (default 64G)")
    get.add_argument("--max-files", type=int, default=DEFAULT_GET_MAX_FILES, metavar="N",
                     help="most files, directories and links in each slave's tree (default 1000000)")
    get.add_argument("--force", action="store_true", help="replace what an earlier get put in LOCALDIR/NAME/")
    get.add_argument("remote", metavar="REMOTE", help="file or directory on each slave")
    get.add_argument("localdir", metavar="LOCALDIR", help="local directory; each slave's copy in LOCALDIR/NAME/")

    add_job_parsers(sub)
    add_web_parser(sub)

    hk = sub.add_parser("host-key", help="print an SSH host key's fingerprint and known_hosts line")
    hk.add_argument("--host-key", required=True, metavar="FILE", help="the private key file of the host key")
    hk.add_argument("--host", default="127.0.0.1", help="host name slaves dial (for known_hosts; default: 127.0.0.1)")
    hk.add_argument("--port", type=int, default=22, help="port slaves dial (for known_hosts; default: 22)")
    describe(sub)
    for each in sub.choices.values():  # -v and --master after the subcommand too (-v counted with the one before)
        each.add_argument("-v", "--verbose", action="count", dest="verbose_after", default=0, help="more logging")
        each.add_argument("--master", metavar="PATH", default=argparse.SUPPRESS, help="as remsh --master PATH")
    return p


def _secret(args: argparse.Namespace, env_secret: Optional[bytes]) -> Optional[bytes]:
    """The secret from --secret-file, else what was in ``$REMSH_SECRET``."""
    if args.secret_file:
        try:
            return read_secret_file(args.secret_file)
        except RemshError as e:
            raise ConfigError(str(e)) from None
    return as_secret(env_secret) if env_secret else None


def _tls_context(args: argparse.Namespace) -> Optional[ssl.SSLContext]:
    if not args.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load TLS certificate {args.tls_cert}: {e}") from None
    return ctx


def _resume(args: argparse.Namespace) -> Dict[str, Any]:
    """The listeners' ``resume_timeout`` (``remsh master --resume-timeout``)."""
    seconds = getattr(args, "resume_timeout", None)
    return {} if seconds is None else {"resume_timeout": seconds}


def _start_listeners(args: argparse.Namespace, collection: SimpleSlaveCollection,
                     env_secret: Optional[bytes], listeners: List[SlaveListener],
                     announce: Optional[Callable[[str], None]] = None) -> None:
    """Start what the options ask for, appending each listener to
    ``listeners`` as soon as it runs (so that the caller stops it even when
    a later one fails).  Raises :class:`ConfigError` for what the user can fix."""
    secret = _secret(args, env_secret)
    if args.ssh_listen and (not args.host_key or not args.authorized_keys):
        raise ConfigError("--ssh-listen needs --host-key and --authorized-keys")
    if args.listen:
        from remsh.master.slavelistener.tcp import TcpSlaveListener

        ctx = _tls_context(args)
        host, port = args.listen
        if secret is None and not args.insecure:
            raise ConfigError("--listen needs a secret: --secret-file FILE or $REMSH_SECRET "
                              "(or --insecure to accept anyone who can connect)")
        try:
            tcp = TcpSlaveListener(port=port, host=host, secret=secret, allow_insecure=args.insecure,
                                   ssl_context=ctx, slave_collection=collection, **_resume(args))
            tcp.start()
        except OSError as e:
            raise ConfigError(f"cannot listen on {_where(host, port)}: {e.strerror or e}") from None
        except RemshError as e:
            raise ConfigError(str(e)) from None
        log.info("waiting for TCP slaves on port %d", tcp.port)
        if announce is not None:
            announce(f"listening for TCP{'/TLS' if ctx else ''} slaves on {_where(host, tcp.port)}")
        listeners.append(tcp)
    if args.ssh_listen:
        try:
            from remsh.master.slavelistener.ssh import SshSlaveListener
        except ImportError as e:
            raise ConfigError(f"--ssh-listen needs paramiko (pip install 'remsh[ssh]'): {e}") from None
        host, port = args.ssh_listen
        try:
            sshl = SshSlaveListener(port=port, host=host, host_key=args.host_key,
                                    authorized_keys=args.authorized_keys, secret=secret,
                                    slave_collection=collection, **_resume(args))
            sshl.start()
        except OSError as e:
            raise ConfigError(f"cannot listen on {_where(host, port)}: {e.strerror or e}") from None
        except RemshError as e:
            raise ConfigError(str(e)) from None
        log.info("waiting for SSH slaves on port %d", sshl.port)
        if announce is not None:
            announce(f"listening for SSH slaves on {_where(host, sshl.port)}")
        listeners.append(sshl)
    local_count = args.local or 0
    if local_count:
        from remsh.master.slavelistener.local import LocalSlaveListener

        basedir = os.path.abspath(args.basedir)
        if not os.path.isdir(basedir):
            raise ConfigError(f"base directory does not exist: {basedir}")
        local = LocalSlaveListener(slave_collection=collection)
        listeners.append(local)
        width = len(str(local_count))
        for i in range(local_count):
            local.start_slave(basedir, name=f"local{i + 1:0{width}d}")


def _where(host: Optional[str], port: int) -> str:
    """``HOST:PORT`` as written on the command line (``[::1]:7711``, ``*:7711``)."""
    return f"[{host}]:{port}" if host and ":" in host else f"{host or '*'}:{port}"


def _choose_slaves(args: argparse.Namespace, collection: SimpleSlaveCollection) -> List[Slave]:
    try:
        if args.slave:
            return collection.wait_for_slaves(names=args.slave, timeout=args.wait_timeout)
        if args.wait:
            if not (args.listen or args.ssh_listen) and args.wait > len(collection.get_all_slaves()):
                # only local slaves, all started: no more can come
                raise UsageError(f"--wait {args.wait} with {args.local or 0} local slave(s) and no --listen: "
                                 f"no more slaves can come")
            collection.wait_for_slaves(count=args.wait, timeout=args.wait_timeout)
    except WaitTimeout as e:
        raise SlavesUnavailable(str(e)) from None
    return sorted(collection.get_all_slaves(), key=lambda s: s.name)


def _error(text: str) -> None:
    """One line ``remsh: TEXT`` on stderr, escaped with :func:`printable`:
    the text may quote a slave (its name, facts or error message)."""
    print(f"remsh: {printable(text)}", file=sys.stderr)


def _announce(text: str) -> None:
    announce(text)


def _announce_dashboard(args: argparse.Namespace, url: str, state_dir: str) -> None:
    """Where the dashboard is.  A log file outlives the run and may be read
    by others: with ``--log-file`` the token goes to stderr only (it stays
    in STATE_DIR/web-url for ``remsh web``)."""
    if not getattr(args, "log_file", None):
        _announce(f"web dashboard at {url}")
        return
    _announce(f"web dashboard at {url.partition('?')[0]} (the URL with its token: remsh web, "
              f"or {os.path.join(state_dir, WEB_URL_FILE)})")
    print(f"remsh master: web dashboard at {url}", file=sys.stderr, flush=True)


def _quietly(fn: Callable[[], Any]) -> Callable[[], None]:
    def call() -> None:
        try:
            fn()
        except (OSError, RemshError):
            pass
    return call


def _pump_stdin(send: Callable[[bytes], Any], end: Callable[[], Any]) -> threading.Thread:
    """Copy this process's stdin to ``send`` in a thread, then call ``end``."""
    def pump() -> None:
        # the file descriptor, not sys.stdin.buffer: a thread blocked inside
        # the buffered reader at exit makes the interpreter abort
        try:
            fd = sys.stdin.fileno()
            while True:
                data = os.read(fd, 65536)
                if not data:
                    break
                send(data)
        except (OSError, ValueError, RemshError):
            pass
        try:
            end()
        except (OSError, RemshError):
            pass
    thread = threading.Thread(target=pump, name="remsh-stdin", daemon=True)
    thread.start()
    return thread


def _renderer(args: argparse.Namespace) -> Renderer:
    return renderer_for(args.command, args)


def _check_job(args: argparse.Namespace) -> None:
    """What can be checked before any slave is involved.

    :raises UsageError: a bad option
    """
    args.wheres = [parse_where(w) for w in args.where]
    if args.max_parallel < 1:
        raise UsageError("--max-parallel must be at least 1")
    check_batch(args.batch)
    check_max_fail(args.max_fail)
    if getattr(args, "force", False) and getattr(args, "sync", False):
        raise UsageError("put: --force replaces, --sync updates in place: not both")
    if args.command == "run":
        args.argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not args.argv:
            raise UsageError("run: no command given (remsh run -- COMMAND [ARG ...])")
        if args.timeout is not None and not args.timeout > 0:
            raise UsageError("--timeout must be positive")
        check_output_options(args)
    elif args.command == "put":
        args.local_path = os.path.abspath(args.local_path)
        if not os.path.lexists(args.local_path):
            raise UsageError(f"no such local file or directory: {args.local_path}")
        if (args.delete or args.checksum) and not args.sync:
            raise UsageError("--delete and --checksum go with --sync")
    elif args.command == "get":
        args.localdir = os.path.abspath(args.localdir)
        if os.path.exists(args.localdir) and not os.path.isdir(args.localdir):
            raise UsageError(f"not a directory: {args.localdir}")


def _do_job(args: argparse.Namespace, slaves: List[Slave], renderer: Renderer, cancellation: Cancellation,
            tee: Optional[StdinTee], pacing: Pacing) -> List[SlaveResult]:
    if args.command == "run":
        return run_job(slaves, args.argv, renderer, cwd=args.cwd, timeout=args.timeout, stdin=tee,
                       max_parallel=args.max_parallel, cancellation=cancellation, pacing=pacing)
    if args.command == "put":
        return put_job(slaves, args.local_path, args.dest, renderer, sync=args.sync, delete=args.delete,
                       checksum=args.checksum, max_parallel=args.max_parallel, cancellation=cancellation,
                       pacing=pacing, force=args.force, parents=args.parents)
    return get_job(slaves, args.remote, args.localdir, renderer, max_parallel=args.max_parallel,
                   cancellation=cancellation, max_bytes=args.max_bytes, max_files=args.max_files, pacing=pacing,
                   force=args.force)


def cmd_job(args: argparse.Namespace, env_secret: Optional[bytes]) -> int:
    """``run``, ``put`` or ``get``: through the master, or on slaves of our own."""
    try:
        _check_job(args)
    except UsageError as e:
        _error(str(e))
        return EXIT_USAGE
    if args.local is not None or args.listen or args.ssh_listen:
        if args.detach:
            _error("--detach needs a master (remsh master); --local and --listen jobs end with the command")
            return EXIT_USAGE
        return _standalone_job(args, env_secret)
    path, _ = control_path(args.master)
    try:
        client = ControlClient(path)
    except NoMaster as e:
        # never a fall-back to local slaves: those run on this machine
        _error(f"{e} (start one with 'remsh master', or use --local N for local slaves)")
        return EXIT_USAGE
    except ControlError as e:
        _error(str(e))
        return e.exit
    if args.wait or args.slave:
        client.close()
        _error("--wait and --slave are for --listen; with a master use -t")
        return EXIT_USAGE
    return _through_master(args, client)


def _standalone_job(args: argparse.Namespace, env_secret: Optional[bytes]) -> int:
    collection = SimpleSlaveCollection()
    listeners: List[SlaveListener] = []
    cancellation = Cancellation()
    fanning_out = False

    def on_sigint(signum: int, frame: object) -> None:
        # while commands run, Ctrl-C interrupts them and the run winds down;
        # before that there is nothing to wind down
        if not fanning_out:
            raise KeyboardInterrupt
        cancellation.cancel("interrupted")

    previous = signal.signal(signal.SIGINT, on_sigint)
    renderer = _renderer(args)
    try:
        _start_listeners(args, collection, env_secret, listeners)
        for listener in listeners:  # a slave away, back or lost: said as with a master
            listener.on_state = lambda slave, state, detail: renderer.message(state_line(slave.name, state, detail))
        slaves, away = choose(_choose_slaves(args, collection), args.target, args.wheres)
        tee: Optional[StdinTee] = None
        if args.command == "run" and args.stdin:
            tee = StdinTee([s.name for s in slaves])
            _pump_stdin(tee.feed, tee.end)
        fanning_out = True
        _do_job(args, slaves, renderer, cancellation, tee, Pacing(args.batch, args.max_fail, away))
        fanning_out = False
    except (ConfigError, UsageError) as e:
        _error(str(e))
        return EXIT_USAGE
    except SlavesUnavailable as e:
        _error(str(e))
        return EXIT_SLAVE_FAILED
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
    except RemshError as e:
        _error(str(e))
        return EXIT_SLAVE_FAILED
    finally:
        signal.signal(signal.SIGINT, previous)
        for listener in listeners:
            listener.stop()
        renderer.close()
    return renderer.finish(cancellation.cancelled)


def _through_master(args: argparse.Namespace, client: ControlClient) -> int:
    """The job given to the master, then followed (``--detach``: its id
    printed, and left running)."""
    interrupted = threading.Event()

    def on_sigint(signum: int, frame: object) -> None:
        if interrupted.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C: leave now (the master cancels on the close)
        interrupted.set()
        threading.Thread(target=_quietly(client.interrupt), name="remsh-interrupt", daemon=True).start()
        # the master's wind-down normally ends within the second; if not, we
        # leave then (the master goes on cancelling: the close cancels too)
        signal.signal(signal.SIGALRM, on_sigint)
        signal.setitimer(signal.ITIMER_REAL, INTERRUPT_ANSWER)

    def on_job(job_id: str) -> None:
        if args.detach:
            print(job_id, flush=True)

    previous = signal.signal(signal.SIGINT, on_sigint)
    common: Dict[str, Any] = {"targets": args.target, "where": args.where, "parallel": args.max_parallel,
                              "detach": args.detach, "batch": args.batch, "max_fail": args.max_fail}
    try:
        if args.command == "run":
            client.request("run", args=args.argv, cwd=args.cwd, timeout=args.timeout, stdin=args.stdin, **common)
            if args.stdin:
                _pump_stdin(client.send_stdin, client.send_stdin_eof)
        elif args.command == "put":
            client.request("put", src=args.local_path, dest=args.dest, sync=args.sync, delete=args.delete,
                           checksum=args.checksum, force=args.force, parents=args.parents, **common)
        else:
            client.request("get", src=args.remote, dest=args.localdir, max_bytes=args.max_bytes,
                           max_files=args.max_files, force=args.force, **common)
        if args.detach:
            for ev in client.decoded():
                if ev.kind == "job":
                    on_job(ev.get("id", ""))
                elif ev.kind == "fail":
                    _error(ev.get("message", ""))
                    return int(ev.get("exit", EXIT_USAGE))
                elif ev.kind == "done":
                    return EXIT_OK
            _error("lost the master before the end")
            return EXIT_SLAVE_FAILED
        return render(client.decoded(), lambda kind: _renderer(args), kind=args.command,
                      interrupted=interrupted.is_set)
    except ControlError as e:
        _error(str(e))
        return e.exit
    except (UsageError, ValueError) as e:
        _error(str(e))
        return EXIT_USAGE
    except OSError as e:
        _error(f"lost the master: {e.strerror or e}")
        return EXIT_SLAVE_FAILED
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGINT, previous)
        client.close()


def cmd_master(args: argparse.Namespace, env_secret: Optional[bytes]) -> int:
    """Serve until SIGTERM or SIGINT."""
    path = args.control or control_path(args.master)[0]
    state_dir = os.path.abspath(args.state_dir or default_state_dir())
    collection = FleetCollection()
    problem = configure_master_log(args)
    try:
        if problem is not None:
            raise ConfigError(problem)
        collection.groups = Groups(args.groups)
    except (ConfigError, GroupsError) as e:
        _error(str(e))
        return EXIT_USAGE

    def open_store() -> JobStore:
        if args.store is not None:  # its slaves shared with the other masters
            return share_slaves(collection, open_shared_store(args))
        make_private_directory(state_dir, "state directory")
        return SqliteJobStore(os.path.join(state_dir, "jobs.sqlite"), keep=args.keep_jobs,
                              max_output=args.max_job_output)

    server = ControlServer(path, collection, store=open_store)
    try:
        server.start()
    except ControlError as e:
        _error(str(e))
        return e.exit
    except StoreError as e:
        _error(str(e))
        return EXIT_USAGE
    listeners: List[SlaveListener] = []
    # the signal handlers only write to a pipe; the main thread waits on it
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)

    def on_signal(signum: int, frame: object) -> None:
        try:
            os.write(wake_w, b"h" if signum == signal.SIGHUP else b"x")
        except OSError:
            pass

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    stop_web: Optional[Callable[[], None]] = None
    try:
        _start_listeners(args, collection, env_secret, listeners, announce=_announce)
        if not listeners:
            raise ConfigError("remsh master needs --listen, --ssh-listen or --local N")
        web_url, stop_web = start_dashboard(args, server, state_dir)
        if web_url is not None:
            _announce_dashboard(args, web_url, state_dir)
        _announce(f"control socket {server.path}")
        _announce("ready")
        serve_until_stopped(wake_r, collection.groups)  # SIGHUP rereads the groups
        _announce("stopping")
    except (ConfigError, UsageError) as e:
        _error(str(e))
        return EXIT_USAGE
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if stop_web is not None:
            stop_web()
        server.stop()
        for listener in listeners:
            listener.stop()
        os.close(wake_r)
        os.close(wake_w)
    return EXIT_OK

def cmd_host_key(args: argparse.Namespace) -> int:
    try:
        from remsh.transports import sshkeys as ssh

        key = ssh.load_private_key(args.host_key)
    except ImportError as e:
        _error(f"host-key needs paramiko: {e}")
        return EXIT_USAGE
    except RemshError as e:
        _error(str(e))
        return EXIT_USAGE
    print(f"fingerprint: {ssh.host_key_fingerprint(key)}")
    print(f"known_hosts: {ssh.known_hosts_line(args.host, args.port, key)}")
    return EXIT_OK


def _job_command(args: argparse.Namespace) -> int:
    """``jobs``, ``job`` or ``cancel``: one line and an exit status for a
    master that is not there or goes away."""
    try:
        commands: Dict[str, Callable[[argparse.Namespace], int]] = {"jobs": cmd_jobs, "job": cmd_show_job,
                                                                     "cancel": cmd_cancel}
        return commands[args.command](args)
    except ControlError as e:
        _error(str(e))
        return e.exit
    except (UsageError, ValueError) as e:
        _error(str(e))
        return EXIT_USAGE
    except OSError as e:
        if isinstance(e, BrokenPipeError):
            raise
        _error(f"lost the master: {e.strerror or e}")
        return EXIT_SLAVE_FAILED


def _exact_output() -> None:
    """Let command output that is not UTF-8 reach stdout and stderr as the
    bytes it was (:class:`~remsh.lineprinter.LinePrinter` decodes it with
    ``surrogateescape`` for such a stream)."""
    for stream in (sys.stdout, sys.stderr):
        encoding = str(getattr(stream, "encoding", "")).lower().replace("-", "")
        if isinstance(stream, io.TextIOWrapper) and encoding == "utf8":
            stream.reconfigure(errors="surrogateescape")


def main(argv: Optional[List[str]] = None) -> int:
    """Run the ``remsh`` program; returns the exit status."""
    # first of all: the secret leaves the environment, so that no local
    # slave and no command started from here inherits it
    env_secret = take_env_secret()
    _exact_output()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.verbose += getattr(args, "verbose_after", 0)
    if getattr(args, "tls_key", None) and not args.tls_cert:
        parser.error("--tls-key needs --tls-cert")
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler()
    handler.setFormatter(PrintableFormatter("remsh %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    try:
        if args.command in ("run", "put", "get"):
            return cmd_job(args, env_secret)
        if args.command == "master":
            return cmd_master(args, env_secret)
        if args.command == "ls":
            return cmd_ls(args)
        if args.command in ("jobs", "job", "cancel"):
            return _job_command(args)
        if args.command == "web":
            return cmd_web(args)
        return cmd_host_key(args)
    except KeyboardInterrupt:
        if args.command == "job" and getattr(args, "follow", False):
            _error(f"stopped following; job {args.id} goes on")
        else:
            _error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # our own output was closed (``remsh ls | head``): stop quietly, and
        # keep Python from complaining again when it flushes at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
