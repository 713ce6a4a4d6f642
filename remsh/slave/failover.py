"""``remsh-slave --failover HOST:PORT``, and several ``--ssh`` /
``--via-ssh``: other masters to dial, in order, when the current one is
gone.

The masters are, in the order the command line gives them:

- each ``--ssh USER@HOST[:PORT]`` (a master's embedded SSH server) and each
  ``--via-ssh USER@HOST[:PORT]`` (a tunnel through that OpenSSH server to
  ``HOST PORT`` of the command line, as that server sees it), the two
  options mixed in any order; without either, ``HOST PORT`` itself;
- then each ``--failover HOST:PORT``, reached the way the first master is
  (the same secret, TLS and SSH options; after an ``--ssh`` first, the
  address is the other master's SSH server; after a ``--via-ssh`` first, the
  other master behind that same SSH hop).

One master at a time: the slave stays with the master it reached until that
connection ends; then it dials the list again from the top, so that it goes
back to the first master once that one is back.  A master that cannot be
reached is skipped at once for the next; after a whole round of
unreachable masters the slave waits (the usual back-off, up to
``--max-backoff``) and starts the round again.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

from remsh.transports.base import StreamLike

Connector = Callable[[], StreamLike]


def parse_master(spec: str) -> Tuple[str, int]:
    """``HOST:PORT`` (an IPv6 host in brackets) -> (host, port)."""
    host, sep, port = spec.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not sep or not host or not 0 < number <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {spec!r}")
    return host, number


#: ``USER@HOST[:PORT]`` parsed: (user, host, port or ``None``).
UserHost = Tuple[str, str, Optional[int]]


class HopAction(argparse.Action):
    """``--ssh`` / ``--via-ssh``, repeatable: each occurrence is a master,
    kept in command-line order across both options in ``hops`` (a list of
    ``(dest, USER@HOST[:PORT])``); the option's own ``dest`` holds the first
    of its kind (so one ``--ssh`` reads as before)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Union[str, Sequence[Any], None], option_string: Optional[str] = None) -> None:
        namespace.hops = list(getattr(namespace, "hops", None) or []) + [(self.dest, values)]
        if getattr(namespace, self.dest, None) is None:
            setattr(namespace, self.dest, values)


def hop_args(args: argparse.Namespace) -> List[argparse.Namespace]:
    """One set of options per master of the command line: a copy of
    ``args`` per ``--ssh`` / ``--via-ssh`` (that one alone set), in order;
    ``[args]`` when there is at most one."""
    hops = list(getattr(args, "hops", None) or [])
    if len(hops) <= 1:
        return [args]
    found = []
    for dest, userhost in hops:
        one = argparse.Namespace(**vars(args))
        one.ssh = userhost if dest == "ssh" else None
        one.via_ssh = userhost if dest == "via_ssh" else None
        one.hops = [(dest, userhost)]
        found.append(one)
    return found


def add_failover_option(p: Any) -> None:
    """``--failover HOST:PORT`` (repeatable) on ``remsh-slave``'s parser."""
    p.add_argument("--failover", action="append", default=[], type=parse_master, metavar="HOST:PORT",
                   help="another master to dial, reached the same way, when the current one is gone "
                        "(repeatable: tried in order after HOST PORT)")


def _label(args: argparse.Namespace) -> str:
    if args.ssh:
        user, host, port = args.ssh
        return f"{host}:{port or 22} (ssh)"
    if getattr(args, "via_ssh", None):
        user, host, port = args.via_ssh
        return f"{args.host}:{args.port} via {host}" + (f":{port}" if port else "")
    return f"{args.host}:{args.port}"


def masters(args: argparse.Namespace,
            make_connector: Callable[[argparse.Namespace], Connector]) -> List[Tuple[str, Connector]]:
    """The masters to dial, in order, as ``(label, connect)``: the command
    line's (one per ``--ssh`` / ``--via-ssh``), then each ``--failover``
    reached as the first of them is."""
    each = hop_args(args)
    found = [(_label(one), make_connector(one)) for one in each]
    args = each[0]
    for host, port in getattr(args, "failover", None) or ():
        other = argparse.Namespace(**vars(args))
        if args.ssh:
            other.ssh = (args.ssh[0], host, port)
        else:
            other.host, other.port = host, port
        found.append((_label(other), make_connector(other)))
    return found


class Rotation:
    """Which master to dial next, and whether to wait before dialling it."""

    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError("no master to dial")
        self.count = count
        #: the master to dial now (index in the list)
        self.index = 0
        self._unreached = 0

    def ended(self, registered: bool) -> bool:
        """The attempt on :attr:`index` ended, after registering there
        (``registered``: that master is gone) or not (unreachable,
        refused).  Moves :attr:`index` on; True when the caller should
        wait (back off) before the next dial: a round found no master, or
        the master it had is gone."""
        if registered:
            self.index = 0
            self._unreached = 0
            return True
        self._unreached += 1
        self.index = (self.index + 1) % self.count
        if self._unreached >= self.count:
            self._unreached = 0
            return True
        return False

    def label(self, names: List[Tuple[str, Connector]]) -> Optional[str]:
        """The label of the master to dial now, when there are several."""
        return names[self.index][0] if self.count > 1 else None


__all__ = ["add_failover_option", "hop_args", "HopAction", "masters", "parse_master", "Rotation", "UserHost"]
