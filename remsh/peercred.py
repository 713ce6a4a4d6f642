"""Who is at the other end of a UNIX socket: the peer's uid, from the kernel.

The control socket of ``remsh master`` (:mod:`remsh.control`) is the power
to run anything on every slave; both ends check that the other is the same
user.  The kernel tells, but each system its own way:

- Linux: ``getsockopt(SOL_SOCKET, SO_PEERCRED)`` -> ``struct ucred``
  (pid, uid, gid);
- OpenBSD: the same option -> ``struct sockpeercred`` (uid, gid, pid);
- macOS, FreeBSD: ``getsockopt(SOL_LOCAL, LOCAL_PEERCRED)`` ->
  ``struct xucred`` (version, uid, groups).  Python has no ``getpeereid``;
  this is what the C library's ``getpeereid`` does there.

:data:`PEER_CREDENTIALS` lists the ways this system offers; :func:`peer_uid`
tries them and raises :class:`PeerUnknown` when none works.  Rejected: an
answer of "unknown" that callers may treat as "anyone" -- a system that
cannot tell refuses every connection instead.
"""

from __future__ import annotations

import socket
import struct
import sys
from typing import Callable, List, NamedTuple, Sequence, Tuple

from remsh.errors import RemshError


class PeerUnknown(RemshError):
    """The uid at the other end of a UNIX socket cannot be read: the
    connection must not be used."""


class PeerCredential(NamedTuple):
    """One way to read the peer's uid: ``getsockopt(level, option, size)``
    and a function that takes the uid out of the bytes it returns."""

    name: str
    level: int
    option: int
    size: int
    uid_of: Callable[[bytes], int]


def _uid_of_ucred(data: bytes) -> int:
    """Linux ``struct ucred``: pid, uid, gid."""
    return int(struct.unpack_from("iIi", data)[1])


def _uid_of_sockpeercred(data: bytes) -> int:
    """OpenBSD ``struct sockpeercred``: uid, gid, pid."""
    return int(struct.unpack_from("I", data)[0])


#: ``XUCRED_VERSION`` of ``struct xucred`` (macOS, FreeBSD).
XUCRED_VERSION = 0


def _uid_of_xucred(data: bytes) -> int:
    """macOS and FreeBSD ``struct xucred``: version, uid, groups..."""
    version, uid = struct.unpack_from("II", data)
    if version != XUCRED_VERSION:
        raise OSError(f"LOCAL_PEERCRED: struct xucred version {version}, expected {XUCRED_VERSION}")
    return int(uid)


def _peer_credentials() -> Tuple[PeerCredential, ...]:
    """The ways this system offers, best first (none: every connection is refused)."""
    ways: List[PeerCredential] = []
    so_peercred = getattr(socket, "SO_PEERCRED", None)
    if so_peercred is not None:
        parse = _uid_of_sockpeercred if sys.platform.startswith("openbsd") else _uid_of_ucred
        ways.append(PeerCredential("SO_PEERCRED", socket.SOL_SOCKET, so_peercred, 12, parse))
    local_peercred = getattr(socket, "LOCAL_PEERCRED", None)
    if local_peercred is None and sys.platform.startswith(("darwin", "freebsd")):
        local_peercred = 0x001  # <sys/un.h>; not every Python build exports it
    if local_peercred is not None:
        # level SOL_LOCAL (0); struct xucred is at most 4 + 4 + 4 + 16 * 4 + 8 bytes
        ways.append(PeerCredential("LOCAL_PEERCRED", getattr(socket, "SOL_LOCAL", 0), local_peercred, 128,
                                   _uid_of_xucred))
    return tuple(ways)


#: How this system tells the uid at the other end of a UNIX socket.
PEER_CREDENTIALS: Tuple[PeerCredential, ...] = _peer_credentials()


def peer_uid(sock: socket.socket, ways: Sequence[PeerCredential] = PEER_CREDENTIALS) -> int:
    """The uid of the process at the other end of the UNIX socket ``sock``,
    read from the kernel by the first of ``ways`` that works.

    :raises PeerUnknown: no way works (or the system offers none): the
        caller must not use the connection
    """
    failures = []
    for way in ways:
        try:
            return way.uid_of(sock.getsockopt(way.level, way.option, way.size))
        except (OSError, struct.error) as e:
            failures.append(f"{way.name}: {e}")
    why = "; ".join(failures) if failures else "this system offers neither SO_PEERCRED nor LOCAL_PEERCRED"
    raise PeerUnknown(f"cannot tell which user is at the other end of the socket ({why})")
