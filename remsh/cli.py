"""``remsh``: the master program.

``remsh [options] run -- COMMAND [ARG ...]`` runs a command on slaves in
parallel, printing each output line prefixed with the slave's name.  With no
listener option it runs on local slaves (``--local N``, default 1), so it
works with nothing set up.

``remsh host-key --host-key FILE`` prints the fingerprint of an SSH host key
and the ``known_hosts`` line slaves need to trust the embedded SSH server.

Exit statuses (the same for every command):

- 0: it succeeded on every slave;
- 1: the command exited non-zero on some slave (with a single slave, its own
  status is passed through when it is 1-125);
- 2: usage or configuration error (one line on standard error, no
  traceback): bad options, an unreadable secret file, a port in use, a
  missing host key, no slave to run on;
- 3: some slave failed to run it (unreachable, disconnected, timed out,
  could not start the command); takes precedence over 1;
- 130: interrupted (Ctrl-C): running commands are interrupted first.

``$REMSH_SECRET`` is taken out of the environment as soon as the program
starts, so local slaves and the commands they run never see it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import ssl
import sys
from typing import List, Optional, Sequence, Tuple

import remsh
from remsh.errors import CommandTimeout, RemoteError, RemshError, WaitTimeout
from remsh.handshake import as_secret
from remsh.lineprinter import LinePrinter
from remsh.master.fanout import Cancellation, Outcome, fan_out
from remsh.master.slave import Slave
from remsh.master.slavecollection.simple import SimpleSlaveCollection
from remsh.master.slavelistener.base import SlaveListener
from remsh.secretfile import read_secret_file, take_env_secret

log = logging.getLogger("remsh")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_SLAVE_FAILED = 3
EXIT_INTERRUPTED = 130


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
        return host or None, int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected [HOST:]PORT, got {spec!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="remsh", description="Run commands on many machines.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (repeatable)")
    p.add_argument("--version", action="version", version=f"remsh {remsh.__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a command on slaves")
    g = run.add_argument_group("local slaves")
    g.add_argument("--local", type=int, metavar="N", help="start N local slaves (default 1 when no listener)")
    g.add_argument("--basedir", default=".", help="base directory of local slaves (default: .)")
    g = run.add_argument_group("listening for slaves")
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
    g = run.add_argument_group("choosing slaves")
    g.add_argument("--wait", type=int, metavar="N", help="wait for N slaves before running")
    g.add_argument("--slave", action="append", default=[], metavar="NAME",
                   help="wait for and run on this slave (repeatable)")
    g.add_argument("--wait-timeout", type=float, default=60.0, metavar="SECONDS")
    g = run.add_argument_group("the command")
    g.add_argument("--timeout", type=float, metavar="SECONDS", help="kill the command after this long")
    g.add_argument("--cwd", help="directory to run in, relative to each slave's base directory")
    g.add_argument("--max-parallel", type=int, default=64, metavar="N", help="slaves driven at once")
    g.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG ...]")

    hk = sub.add_parser("host-key", help="print an SSH host key's fingerprint and known_hosts line")
    hk.add_argument("--host-key", required=True, metavar="FILE")
    hk.add_argument("--host", default="127.0.0.1", help="host name slaves dial (for known_hosts)")
    hk.add_argument("--port", type=int, default=22, help="port slaves dial (for known_hosts)")
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


def _start_listeners(args: argparse.Namespace, collection: SimpleSlaveCollection,
                     env_secret: Optional[bytes], listeners: List[SlaveListener]) -> None:
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
        try:
            tcp = TcpSlaveListener(port=port, host=host, secret=secret, allow_insecure=args.insecure,
                                   ssl_context=ctx, slave_collection=collection)
            tcp.start()
        except OSError as e:
            raise ConfigError(f"cannot listen on {host or '*'}:{port}: {e.strerror or e}") from None
        except RemshError as e:
            raise ConfigError(str(e)) from None
        log.info("waiting for TCP slaves on port %d", tcp.port)
        listeners.append(tcp)
    if args.ssh_listen:
        try:
            from remsh.master.slavelistener.ssh import SshSlaveListener
        except ImportError as e:
            raise ConfigError(f"--ssh-listen needs paramiko: {e}") from None
        host, port = args.ssh_listen
        try:
            sshl = SshSlaveListener(port=port, host=host, host_key=args.host_key,
                                    authorized_keys=args.authorized_keys, secret=secret,
                                    slave_collection=collection)
            sshl.start()
        except OSError as e:
            raise ConfigError(f"cannot listen on {host or '*'}:{port}: {e.strerror or e}") from None
        except RemshError as e:
            raise ConfigError(str(e)) from None
        log.info("waiting for SSH slaves on port %d", sshl.port)
        listeners.append(sshl)
    local_count = args.local if args.local is not None else (0 if listeners else 1)
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


def _choose_slaves(args: argparse.Namespace, collection: SimpleSlaveCollection) -> List[Slave]:
    try:
        if args.slave:
            return collection.wait_for_slaves(names=args.slave, timeout=args.wait_timeout)
        if args.wait:
            collection.wait_for_slaves(count=args.wait, timeout=args.wait_timeout)
    except WaitTimeout as e:
        raise SlavesUnavailable(str(e)) from None
    return sorted(collection.get_all_slaves(), key=lambda s: s.name)


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


def exit_status(outcomes: Sequence[Outcome[int]]) -> int:
    """The program's exit status for the outcomes of a run (not interrupted)."""
    if any(o.error is not None for o in outcomes):
        return EXIT_SLAVE_FAILED
    statuses = [o.value for o in outcomes if o.value != 0]
    if not statuses:
        return EXIT_OK
    if len(outcomes) == 1 and statuses[0] is not None and 1 <= statuses[0] <= 125:
        return statuses[0]
    return EXIT_FAILED


def cmd_run(args: argparse.Namespace, env_secret: Optional[bytes]) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        print("remsh run: no command given (remsh run -- COMMAND [ARG ...])", file=sys.stderr)
        return EXIT_USAGE
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
    try:
        _start_listeners(args, collection, env_secret, listeners)
        slaves = _choose_slaves(args, collection)
        if not slaves:
            print("remsh run: no slaves", file=sys.stderr)
            return EXIT_USAGE
        colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty()
                                             and os.environ.get("NO_COLOR") is None)
        printer = LinePrinter([s.name for s in slaves], colour)

        def run_one(slave: Slave) -> int:
            try:
                return slave.execute(argv, stdout_cb=printer.sink(slave.name, sys.stdout),
                                     stderr_cb=printer.sink(slave.name, sys.stderr),
                                     cwd=args.cwd, timeout=args.timeout)
            finally:
                printer.flush(slave.name, sys.stdout)
                printer.flush(slave.name, sys.stderr)

        fanning_out = True
        outcomes = fan_out(slaves, run_one, max_workers=args.max_parallel, cancellation=cancellation)
        fanning_out = False
    except ConfigError as e:
        print(f"remsh: {e}", file=sys.stderr)
        return EXIT_USAGE
    except SlavesUnavailable as e:
        print(f"remsh: {e}", file=sys.stderr)
        return EXIT_SLAVE_FAILED
    except KeyboardInterrupt:
        print("remsh: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RemshError as e:
        print(f"remsh: {e}", file=sys.stderr)
        return EXIT_SLAVE_FAILED
    finally:
        signal.signal(signal.SIGINT, previous)
        for listener in listeners:
            listener.stop()
    failed = 0
    for o in outcomes:
        if o.error is not None:
            failed += 1
            print(f"remsh: {o.slave.name}: {describe_error(o.error, o.slave.name)}", file=sys.stderr)
        elif o.value != 0:
            failed += 1
            print(f"remsh: {o.slave.name}: exit status {o.value}", file=sys.stderr)
    if cancellation.cancelled:
        print("remsh: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if failed:
        print(f"remsh: failed on {failed} of {len(outcomes)} slaves", file=sys.stderr)
    return exit_status(outcomes)


def cmd_host_key(args: argparse.Namespace) -> int:
    try:
        from remsh.transports import ssh

        key = ssh.load_private_key(args.host_key)
    except ImportError as e:
        print(f"remsh: host-key needs paramiko: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RemshError as e:
        print(f"remsh: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"fingerprint: {ssh.host_key_fingerprint(key)}")
    print(f"known_hosts: {ssh.known_hosts_line(args.host, args.port, key)}")
    return EXIT_OK


def main(argv: Optional[List[str]] = None) -> int:
    """Run the ``remsh`` program; returns the exit status."""
    # first of all: the secret leaves the environment, so that no local
    # slave and no command started from here inherits it
    env_secret = take_env_secret()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run" and args.tls_key and not args.tls_cert:
        parser.error("--tls-key needs --tls-cert")
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="remsh %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "run":
            return cmd_run(args, env_secret)
        return cmd_host_key(args)
    except KeyboardInterrupt:
        print("remsh: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
