"""``remsh-slave``: connect to a master and serve it, reconnecting as needed.

Exit status with ``--no-reconnect``: 0 after a clean close by the master,
2 for a usage or authentication failure, 3 for a protocol failure or a lost
connection, 4 when the master cannot be reached.  SIGTERM and SIGINT end the
program cleanly (a running command's process group is killed); Ctrl-C exits
130 with one line on standard error.

The secret is taken out of the environment as soon as the program starts
(:func:`remsh.secretfile.take_env_secret`), so that neither ``getenv`` nor
any command the slave runs can see it.

Logging goes to standard error: warnings and errors by default, ``-v`` adds
connections and registrations (INFO), ``-vv`` everything (DEBUG).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import random
import ssl
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import remsh
from remsh.errors import AuthenticationError, Disconnected, LocalError, ProtocolError, RemshError, UsageError
from remsh.handshake import (HANDSHAKE_TIMEOUT, MASTER_GREETING, SLAVE_GREETING, default_name,
                             exchange_greeting, slave_handshake, valid_name)
from remsh.argtypes import port_number, positive_count, positive_seconds
from remsh.secretfile import read_secret_file, take_env_secret
from remsh.tlshints import slave_hint
from remsh.slave import pgroups
from remsh.slave.policy import Policy
from remsh.sessionlimits import DEFAULT_HEARTBEAT, DEFAULT_SPOOL_LIMIT
from remsh.slave.failover import HopAction, Rotation, add_failover_option, hop_args, masters
from remsh.slave.keeper import SessionKeeper
from remsh.slave.server import SlaveServer
from remsh.slave.sigterm import sigterm_unwinds
from remsh.transports.base import StreamLike
from remsh.wire import Wire

log = logging.getLogger("remsh.slave")

EXIT_OK = 0
EXIT_AUTH = 2
EXIT_PROTOCOL = 3
EXIT_UNREACHABLE = 4

BACKOFF_INITIAL = 0.5
BACKOFF_CAP = 60.0


class _Refused(Exception):
    """An attempt that must end the program under --no-reconnect."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_userhost(spec: str) -> Tuple[str, str, Optional[int]]:
    """``USER@HOST[:PORT]`` -> (user, host, port); IPv6 hosts in brackets.

    ``port`` is ``None`` when not given: the OpenSSH client then takes it
    from its configuration (a host alias may set one), paramiko uses 22.
    """
    if "@" not in spec:
        raise argparse.ArgumentTypeError(f"expected USER@HOST[:PORT], got {spec!r}")
    user, _, rest = spec.rpartition("@")
    port: Optional[int] = None
    try:
        if rest.startswith("["):
            host, _, tail = rest[1:].partition("]")
            if tail.startswith(":"):
                port = int(tail[1:])
        elif rest.count(":") == 1:
            host, _, p = rest.partition(":")
            port = int(p)
        else:
            host = rest
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad port in {spec!r}") from None
    if not user or not host:
        raise argparse.ArgumentTypeError(f"expected USER@HOST[:PORT], got {spec!r}")
    return user, host, port


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="remsh-slave",
        description="Connect to a remsh master and perform the operations it asks for.")
    p.add_argument("host", nargs="?", metavar="HOST", help="master host (TCP listener)")
    p.add_argument("port", nargs="?", type=port_number, metavar="PORT", help="master port")
    p.add_argument("--name", help="slave name (default: host name)")
    p.add_argument("--basedir", default=".", help="base directory (default: current directory)")
    p.add_argument("--secret-file", metavar="FILE",
                   help="file holding the shared secret (alternative: $REMSH_SECRET)")
    p.add_argument("--insecure", action="store_true", help="connect with no secret")
    p.add_argument("--tls", action="store_true", help="wrap TCP in TLS")
    p.add_argument("--tls-ca", metavar="FILE", help="CA certificates to verify the master with (implies --tls)")
    p.add_argument("--ssh", metavar="USER@HOST[:PORT]", type=parse_userhost, action=HopAction,
                   help="dial the master's embedded SSH server (repeatable: masters to fail over to, in order)")
    p.add_argument("--via-ssh", metavar="USER@HOST[:PORT]", type=parse_userhost, action=HopAction,
                   help="reach HOST PORT through a tunnel opened on this OpenSSH server (repeatable: one "
                        "master behind each, tried in order with any --ssh)")
    p.add_argument("--identity", metavar="FILE",
                   help="SSH private key (the only one offered; openssh: default from the ssh configuration)")
    p.add_argument("--known-hosts", metavar="FILE",
                   help="SSH host keys to trust (the only ones; openssh: default ~/.ssh/known_hosts)")
    p.add_argument("--ssh-client", choices=("openssh", "paramiko"),
                   help="SSH client for --ssh/--via-ssh: the system's ssh program (default when it is on PATH) "
                        "or paramiko (needs --identity and --known-hosts)")
    p.add_argument("-F", dest="ssh_config", metavar="FILE",
                   help="OpenSSH client configuration file to use instead of ~/.ssh/config")
    p.add_argument("--no-reconnect", action="store_true", help="serve one connection and exit")
    p.add_argument("--connect-timeout", type=positive_seconds, default=10.0, metavar="SECONDS",
                   help="bound on reaching the master, each attempt (default %(default)g)")
    p.add_argument("--heartbeat", type=positive_seconds, default=DEFAULT_HEARTBEAT, metavar="SECONDS",
                   help="check the link when nothing was sent for this long; redial after "
                        "hearing nothing for three times as long (default %(default)g)")
    p.add_argument("--spool-limit", type=positive_count, default=DEFAULT_SPOOL_LIMIT, metavar="BYTES",
                   help="most output kept for the master while it is unreachable; past it "
                        "commands wait on their writes (default %(default)d)")
    p.add_argument("--max-backoff", type=positive_seconds, default=BACKOFF_CAP, metavar="SECONDS",
                   help="longest wait between reconnection attempts (default %(default)g)")
    add_failover_option(p)
    p.set_defaults(hops=[])
    g = p.add_argument_group("policy: what this slave agrees to do")
    g.add_argument("--root", metavar="DIR",
                   help="every path and working directory must resolve inside DIR (else: denied)")
    g.add_argument("--no-execute", action="store_true", help="refuse to run commands (denied)")
    g.add_argument("--allow-command", action="append", default=[], metavar="PATTERN",
                   help="run only programs (argv[0] after PATH search) matching this glob (repeatable)")
    g.add_argument("--allow-env", action="append", default=[], metavar="PATTERN",
                   help="with --allow-command: a command's request may set or unset only variables whose "
                        "name matches this glob (repeatable; default none)")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more logging: -v connections and registrations, -vv debugging")
    p.add_argument("--version", action="version", version=f"remsh-slave {remsh.__version__}")
    return p


def log_level(verbose: int) -> int:
    """The logging level for ``verbose`` ``-v`` flags: WARNING, INFO, then DEBUG."""
    return (logging.WARNING, logging.INFO)[verbose] if verbose < 2 else logging.DEBUG


def read_secret(args: argparse.Namespace, env_secret: Optional[bytes] = None) -> Optional[bytes]:
    """The secret from --secret-file, else ``env_secret`` (what was in
    ``$REMSH_SECRET``, already taken out of the environment); never the
    command line.  Raises ``_Refused`` when the file cannot be used."""
    if args.secret_file:
        try:
            return read_secret_file(args.secret_file)
        except LocalError as e:
            raise _Refused(EXIT_AUTH, str(e)) from None
    return env_secret


def build_policy(args: argparse.Namespace) -> Optional[Policy]:
    """The :class:`~remsh.slave.policy.Policy` the options ask for, or
    ``None`` when none of ``--root``, ``--no-execute``, ``--allow-command``
    is given (``--allow-env`` goes with ``--allow-command``).

    Raises ``_Refused`` (a usage error, exit 2) for a root that is not a
    directory, a bad pattern, ``--allow-env`` without ``--allow-command``,
    and when this installation's server cannot
    enforce a policy: a policy silently not applied would be worse than no
    slave at all.
    """
    if args.root is None and not args.no_execute and not args.allow_command and not args.allow_env:
        return None
    try:
        policy = Policy(root=args.root, execute=not args.no_execute, allow_commands=tuple(args.allow_command),
                        allow_env=tuple(args.allow_env))
    except UsageError as e:
        raise _Refused(EXIT_AUTH, f"policy: {e}") from None
    if "policy" not in inspect.signature(SlaveServer).parameters:
        raise _Refused(EXIT_AUTH, "--root, --no-execute and --allow-command are not supported "
                                  "by this installation (SlaveServer takes no policy)")
    return policy


def ssh_client(args: argparse.Namespace) -> str:
    """The SSH client the options ask for: ``--ssh-client``, else
    ``openssh`` when the ``ssh`` program is on ``PATH``, else ``paramiko``."""
    if args.ssh_client:
        return str(args.ssh_client)
    from remsh.transports import openssh

    return "openssh" if openssh.find_ssh() else "paramiko"


def make_connector(args: argparse.Namespace) -> Callable[[], StreamLike]:
    """A function that opens one transport stream to the master.

    Raises ``_Refused`` (exit 2) for SSH options that cannot work together.
    """
    if args.ssh or args.via_ssh:
        user, host, port = args.ssh or args.via_ssh
        if ssh_client(args) == "openssh":
            return _openssh_connector(args, user, host, port)
        if args.ssh_config:
            raise _Refused(EXIT_AUTH, "-F applies to the OpenSSH client only (--ssh-client openssh)")
        if not args.identity or not args.known_hosts:
            raise _Refused(EXIT_AUTH, "--ssh/--via-ssh with paramiko need --identity and --known-hosts")
        try:
            from remsh.transports import ssh  # paramiko only where SSH is used
        except ImportError as e:
            raise _Refused(EXIT_AUTH, f"--ssh/--via-ssh with the paramiko client need paramiko "
                                      f"(pip install 'remsh[ssh]'): {e}") from None

        port = 22 if port is None else port
        if args.ssh:
            return lambda: ssh.connect_embedded(user, host, port, identity=args.identity,
                                                known_hosts=args.known_hosts,
                                                timeout=args.connect_timeout)
        return lambda: ssh.connect_via(user, host, port, identity=args.identity,
                                       known_hosts=args.known_hosts, dest_host=args.host,
                                       dest_port=args.port, timeout=args.connect_timeout)
    from remsh.transports import tcp

    ctx = None
    if args.tls or args.tls_ca:
        ctx = ssl.create_default_context(cafile=args.tls_ca)
    return lambda: tcp.connect(args.host, args.port, timeout=args.connect_timeout, ssl_context=ctx)


def _openssh_connector(args: argparse.Namespace, user: str, host: str,
                       port: Optional[int]) -> Callable[[], StreamLike]:
    """``--ssh``/``--via-ssh`` through the system's ``ssh`` program."""
    from remsh.transports import openssh

    program = openssh.find_ssh()
    if program is None:
        raise _Refused(EXIT_AUTH, "--ssh-client openssh: the ssh program is not on PATH")
    if args.ssh_config and not os.access(args.ssh_config, os.R_OK):
        raise _Refused(EXIT_AUTH, f"cannot read ssh configuration file {args.ssh_config}")
    options: Dict[str, Any] = dict(identity=args.identity, known_hosts=args.known_hosts, config=args.ssh_config,
                                   timeout=args.connect_timeout, program=program)
    if args.ssh:
        return lambda: openssh.connect_embedded(user, host, port, **options)
    return lambda: openssh.connect_via(user, host, port, dest_host=args.host, dest_port=args.port, **options)


def serve_once(connect: Callable[[], StreamLike], name: str, secret: Optional[bytes],
               basedir: str, on_registered: Callable[[], None], policy: Optional[Policy] = None,
               keeper: Optional[SessionKeeper] = None) -> None:
    """One connection: dial, handshake, serve until the master closes.

    ``policy`` (a :class:`remsh.slave.policy.Policy`, or ``None`` for none)
    is announced at registration and enforced by the server.  ``keeper``
    keeps the session across connections (work survives a dropped
    connection; :mod:`remsh.slave.keeper`).  Raises ``_Refused`` with the
    status --no-reconnect would exit with.
    """
    if keeper is None:
        keeper = SessionKeeper(basedir, policy)
    try:
        stream = connect()
    except (AuthenticationError, UsageError) as e:
        raise _Refused(EXIT_AUTH, str(e)) from None
    except ssl.SSLCertVerificationError as e:
        # the master was reached but failed to prove who it is
        raise _Refused(EXIT_AUTH, f"master's TLS certificate refused: {e}") from None
    except (OSError, RemshError) as e:
        raise _Refused(EXIT_UNREACHABLE, f"cannot reach the master: {e}") from None
    wire = Wire(stream, label=f"master at {stream.peer}")
    try:
        exchange_greeting(wire, SLAVE_GREETING, MASTER_GREETING, HANDSHAKE_TIMEOUT)
        extra: Dict[str, str] = {} if policy is None else dict(policy.info())
        extra.update(keeper.register_keys())
        reg = slave_handshake(wire, name, secret=secret, basedir=basedir, greet=False, extra_info=extra)
        log.info("registered with the master at %s as %s%s", stream.peer, name,
                 " (resumed)" if reg.info.get("resumed") == "y" else "")
        on_registered()
        try:
            keeper.serve(wire, reg)
        except (SystemExit, KeyboardInterrupt):
            keeper.close()  # tell the master while the connection is still open
            raise
    except AuthenticationError as e:
        raise _Refused(EXIT_AUTH, str(e)) from None
    except ProtocolError as e:
        raise _Refused(EXIT_PROTOCOL, f"protocol error: {e}") from None
    except Disconnected as e:
        raise _Refused(EXIT_PROTOCOL, f"connection lost: {e}") from None
    finally:
        wire.close()


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``remsh-slave``; returns the exit status."""
    # first of all, before anything can start a process or report the
    # environment: the secret leaves the environment
    env_secret = take_env_secret()
    try:
        with sigterm_unwinds():
            return _main(argv, env_secret)
    except KeyboardInterrupt:
        sys.stderr.write("remsh-slave: interrupted\n")
        return 130


def _main(argv: Optional[List[str]], env_secret: Optional[bytes]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=log_level(args.verbose),
                        format="%(asctime)s remsh-slave %(levelname)s: %(message)s")
    if (not args.ssh or args.via_ssh) and (args.host is None or args.port is None):
        parser.error("HOST and PORT are required (unless --ssh is given)")
    if args.ssh and not args.via_ssh and (args.host is not None or args.port is not None):
        # they would be ignored: --ssh remsh@m1 m1 2222 would dial m1's port 22
        parser.error("HOST PORT are not used with --ssh: give the master's SSH port in --ssh USER@HOST[:PORT]")
    if (args.ssh_client or args.ssh_config) and not (args.ssh or args.via_ssh):
        parser.error("--ssh-client and -F apply to --ssh and --via-ssh only")
    name = args.name or default_name()
    if not valid_name(name.encode("utf-8")):
        parser.error(f"invalid slave name {name!r}")
    basedir = os.path.abspath(args.basedir)
    if not os.path.isdir(basedir):
        parser.error(f"base directory does not exist: {basedir}")
    try:
        secret = read_secret(args, env_secret)
        if secret is None and not args.insecure and not all(one.ssh for one in hop_args(args)):
            raise _Refused(EXIT_AUTH, "no secret: give --secret-file or set REMSH_SECRET "
                                      "(or --insecure for a master that allows it)")
        policy = build_policy(args)
        connect = masters(args, make_connector)
    except _Refused as e:
        log.error("%s", e)
        return e.status
    # what a predecessor on this base directory left running dies now; this
    # slave's own commands are recorded for its successor
    pgroups.install(basedir, policy)
    try:
        return _serve(args, connect, name, secret, basedir, policy)
    finally:
        pgroups.uninstall()


def _serve(args: argparse.Namespace, connect: List[Tuple[str, Callable[[], StreamLike]]], name: str,
           secret: Optional[bytes], basedir: str, policy: Optional[Policy]) -> int:
    """Serve masters (the first of ``connect`` reachable, see
    :mod:`remsh.slave.failover`), reconnecting as the options say; the exit status."""
    attempt = 0
    rotation = Rotation(len(connect))
    reached = False
    keeper = SessionKeeper(basedir, policy, heartbeat=args.heartbeat, spool_limit=args.spool_limit)

    def registered() -> None:
        nonlocal attempt, reached
        attempt = 0
        reached = True

    while True:
        reached = False
        try:
            serve_once(connect[rotation.index][1], name, secret, basedir, registered, policy, keeper)
            status, message = EXIT_OK, "master closed the connection"
        except _Refused as e:
            status, message = e.status, str(e) if reached else slave_hint(str(e), bool(args.tls))
        except BaseException:
            keeper.close()
            raise
        if args.no_reconnect:
            keeper.close()
            if status:
                log.error("%s", message)
            else:
                log.info("%s", message)
            return status
        if not rotation.ended(reached):
            log.warning("%s; trying the next master, %s", message, rotation.label(connect))
            continue
        delay = min(args.max_backoff, BACKOFF_INITIAL * (2 ** min(attempt, 20)))
        delay *= random.uniform(0.5, 1.0)
        attempt += 1
        log.warning("%s; reconnecting in %.1f s", message, delay)
        time.sleep(delay)


if __name__ == "__main__":
    sys.exit(main())
