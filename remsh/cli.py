"""``remsh``: the master program.

``remsh [options] run -- COMMAND [ARG ...]`` runs a command on slaves in
parallel, printing each output line prefixed with the slave's name, and exits
0 only if the command succeeded everywhere.  With no listener option it runs
on local slaves (``--local N``, default 1), so it works with nothing set up.

``remsh host-key --host-key FILE`` prints the fingerprint of an SSH host key
and the ``known_hosts`` line slaves need to trust the embedded SSH server.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import ssl
import sys
import threading
from typing import IO, Dict, List, Optional, Tuple

from remsh.errors import CommandTimeout, RemshError
from remsh.handshake import as_secret
from remsh.master.fanout import Cancellation, fan_out
from remsh.master.slave import Slave
from remsh.master.slavecollection.simple import SimpleSlaveCollection

log = logging.getLogger("remsh")

COLOURS = [31, 32, 33, 34, 35, 36, 91, 92, 93, 94, 95, 96]


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


class LinePrinter:
    """Prefixes every output line with its slave's name; whole lines only,
    so that lines of different slaves never mix."""

    def __init__(self, names: List[str], colour: bool) -> None:
        self.lock = threading.Lock()
        width = max((len(n) for n in names), default=0)
        self.prefix: Dict[str, str] = {}
        for i, name in enumerate(sorted(names)):
            label = name.ljust(width)
            if colour:
                label = f"\033[{COLOURS[i % len(COLOURS)]}m{label}\033[0m"
            self.prefix[name] = label + " | "
        self.partial: Dict[Tuple[str, int], bytes] = {}

    def write(self, name: str, out: IO[str], data: bytes) -> None:
        key = (name, id(out))
        with self.lock:
            data = self.partial.pop(key, b"") + data
            *lines, rest = data.split(b"\n")
            for line in lines:
                self._emit(name, out, line)
            if rest:
                self.partial[key] = rest

    def flush(self, name: str, out: IO[str]) -> None:
        with self.lock:
            rest = self.partial.pop((name, id(out)), b"")
            if rest:
                self._emit(name, out, rest)

    def _emit(self, name: str, out: IO[str], line: bytes) -> None:
        out.write(self.prefix.get(name, name + " | ") + line.decode("utf-8", "replace") + "\n")
        out.flush()


def _secret(args: argparse.Namespace) -> Optional[bytes]:
    if args.secret_file:
        with open(args.secret_file, "rb") as f:
            return as_secret(f.read().rstrip(b"\r\n"))
    env = os.environ.get("REMSH_SECRET")
    return as_secret(env) if env else None


def _start_listeners(args: argparse.Namespace, collection: SimpleSlaveCollection) -> List[object]:
    listeners: List[object] = []
    secret = _secret(args)
    if args.listen:
        from remsh.master.slavelistener.tcp import TcpSlaveListener

        ctx = None
        if args.tls_cert:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(args.tls_cert, args.tls_key)
        host, port = args.listen
        tcp = TcpSlaveListener(port=port, host=host, secret=secret, allow_insecure=args.insecure,
                               ssl_context=ctx, slave_collection=collection)
        tcp.start()
        log.info("waiting for TCP slaves on port %d", tcp.port)
        listeners.append(tcp)
    if args.ssh_listen:
        if not args.host_key or not args.authorized_keys:
            raise RemshError("--ssh-listen needs --host-key and --authorized-keys")
        from remsh.master.slavelistener.ssh import SshSlaveListener

        host, port = args.ssh_listen
        sshl = SshSlaveListener(port=port, host=host, host_key=args.host_key,
                                authorized_keys=args.authorized_keys, secret=secret,
                                slave_collection=collection)
        sshl.start()
        log.info("waiting for SSH slaves on port %d", sshl.port)
        listeners.append(sshl)
    local_count = args.local if args.local is not None else (0 if listeners else 1)
    if local_count:
        from remsh.master.slavelistener.local import LocalSlaveListener

        local = LocalSlaveListener(slave_collection=collection)
        listeners.append(local)
        basedir = os.path.abspath(args.basedir)
        width = len(str(local_count))
        for i in range(local_count):
            local.start_slave(basedir, name=f"local{i + 1:0{width}d}")
    return listeners


def _choose_slaves(args: argparse.Namespace, collection: SimpleSlaveCollection) -> List[Slave]:
    if args.slave:
        return collection.wait_for_slaves(names=args.slave, timeout=args.wait_timeout)
    if args.wait:
        collection.wait_for_slaves(count=args.wait, timeout=args.wait_timeout)
    return sorted(collection.get_all_slaves(), key=lambda s: s.name)


def cmd_run(args: argparse.Namespace) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        print("remsh run: no command given (remsh run -- COMMAND [ARG ...])", file=sys.stderr)
        return 2
    collection = SimpleSlaveCollection()
    listeners: List[object] = []
    cancellation = Cancellation()
    previous = signal.signal(signal.SIGINT, lambda *_: cancellation.cancel("interrupted"))
    try:
        listeners = _start_listeners(args, collection)
        slaves = _choose_slaves(args, collection)
        if not slaves:
            print("remsh run: no slaves", file=sys.stderr)
            return 2
        colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty()
                                             and os.environ.get("NO_COLOR") is None)
        printer = LinePrinter([s.name for s in slaves], colour)

        def run_one(slave: Slave) -> int:
            try:
                return slave.execute(
                    argv,
                    stdout_cb=lambda d: printer.write(slave.name, sys.stdout, d),
                    stderr_cb=lambda d: printer.write(slave.name, sys.stderr, d),
                    cwd=args.cwd, timeout=args.timeout)
            finally:
                printer.flush(slave.name, sys.stdout)
                printer.flush(slave.name, sys.stderr)

        outcomes = fan_out(slaves, run_one, max_workers=args.max_parallel, cancellation=cancellation)
    except RemshError as e:
        print(f"remsh: {e}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGINT, previous)
        for listener in listeners:
            listener.stop()  # type: ignore[attr-defined]
    failed = 0
    for o in outcomes:
        if o.error is not None:
            failed += 1
            reason = "timed out" if isinstance(o.error, CommandTimeout) else str(o.error)
            print(f"remsh: {o.slave.name}: {reason}", file=sys.stderr)
        elif o.value != 0:
            failed += 1
            print(f"remsh: {o.slave.name}: exit status {o.value}", file=sys.stderr)
    if failed:
        print(f"remsh: failed on {failed} of {len(outcomes)} slaves", file=sys.stderr)
        return 1
    return 0


def cmd_host_key(args: argparse.Namespace) -> int:
    from remsh.transports import ssh

    key = ssh.load_private_key(args.host_key)
    print(f"fingerprint: {ssh.host_key_fingerprint(key)}")
    print(f"known_hosts: {ssh.known_hosts_line(args.host, args.port, key)}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Run the ``remsh`` program; returns the exit status."""
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="remsh %(levelname)s %(name)s: %(message)s")
    if args.command == "run":
        return cmd_run(args)
    return cmd_host_key(args)


if __name__ == "__main__":
    sys.exit(main())
