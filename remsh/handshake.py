"""Connection set-up: greeting, ``hello`` / ``register`` / ``registered``.

State of one connection, in order (a violation raises at once)::

    greeting --(both greetings match)--> hello sent/read
             --(register read, identity proved)--> registered --> operations

1. Each side writes its 8-byte greeting (:data:`MASTER_GREETING`,
   :data:`SLAVE_GREETING`) and checks the other's.
2. Master: ``{hello: remsh, version: 1, nonce: N_m}``.
3. Slave: ``{register: NAME, version: 1, nonce: N_s, hostname, platform,
   python, basedir, remsh[, proof]}`` with
   ``proof = HMAC-SHA256(secret, b"remsh-v1-slave\\0" + N_m + N_s + NAME)``.
4. Master: ``{registered: NAME[, proof]}`` with
   ``proof = HMAC-SHA256(secret, b"remsh-v1-master\\0" + N_s + N_m + NAME)``,
   or the error box ``{errtag: auth-failed}`` for every kind of failure.

Every step is bounded by one deadline (:data:`HANDSHAKE_TIMEOUT` by default),
so a silent peer costs a connection for at most that long.  Nonces are fresh
from ``os.urandom``; proofs are compared with :func:`hmac.compare_digest`.
The proofs bind both nonces and the name, so neither can be replayed on
another connection or under another name.
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import os
import platform
import socket
import sys
import time
from typing import Callable, Dict, Optional, Tuple, Union

from remsh import __version__
from remsh.errors import AuthenticationError, Disconnected, ProtocolError, RemshError
from remsh.wire import Box, Wire

MASTER_GREETING = b"REMSH-M\n"
SLAVE_GREETING = b"REMSH-S\n"
GREETING_LENGTH = 8
PROTOCOL_VERSION = b"1"
NONCE_LENGTH = 32
HANDSHAKE_TIMEOUT = 10.0
MAX_NAME_LENGTH = 255
AUTH_FAILED = b"auth-failed"
#: Descriptive keys of the register box, reported as ``Slave.info``.
INFO_KEYS = ("hostname", "platform", "python", "basedir", "remsh")

_SLAVE_LABEL = b"remsh-v1-slave\0"
_MASTER_LABEL = b"remsh-v1-master\0"

Secret = Union[bytes, str]


def as_secret(secret: Optional[Secret]) -> Optional[bytes]:
    """Normalise a secret to bytes; an empty secret is refused."""
    if secret is None:
        return None
    b = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if not b:
        raise ValueError("an empty secret is no secret")
    return b


def slave_proof(secret: bytes, nonce_m: bytes, nonce_s: bytes, name: bytes) -> bytes:
    """The slave's proof of the secret, bound to both nonces and its name."""
    return hmac.new(secret, _SLAVE_LABEL + nonce_m + nonce_s + name, hashlib.sha256).digest()


def master_proof(secret: bytes, nonce_s: bytes, nonce_m: bytes, name: bytes) -> bytes:
    """The master's proof of the secret, bound to both nonces and the name."""
    return hmac.new(secret, _MASTER_LABEL + nonce_s + nonce_m + name, hashlib.sha256).digest()


def valid_name(name: bytes) -> bool:
    """A slave name: 1..255 bytes of UTF-8 with no control characters or spaces."""
    if not 0 < len(name) <= MAX_NAME_LENGTH:
        return False
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() and not c.isspace() for c in text) and text not in (".", "..")


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.seconds = seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())


def exchange_greeting(wire: Wire, mine: bytes, theirs: bytes, timeout: float) -> None:
    """Write our greeting, read and check the peer's.

    Raises :class:`ProtocolError` on a wrong greeting, ``Disconnected`` (or
    ``PeerTimeout``) when the peer closes or stays silent.
    """
    wire.send_bytes(mine)
    got = wire.read_exact(GREETING_LENGTH, timeout)
    if got != theirs:
        raise ProtocolError(f"{wire.label}: bad greeting {got!r} (expected {theirs!r})")


def _read(wire: Wire, deadline: _Deadline, what: str) -> Box:
    box = wire.read_box(deadline.left())
    if box is None:
        raise Disconnected(f"{wire.label}: connection closed while waiting for {what}")
    return box


# -- master side ---------------------------------------------------------------

#: ``authorize(name, wire) -> (allowed, secret)``: whether ``name`` may register
#: over this connection, and the secret its proof must be made with (``None``:
#: no proof required).
Authorizer = Callable[[str, Wire], Tuple[bool, Optional[bytes]]]


class Registration:
    """What the master learned from a successful handshake."""

    def __init__(self, name: str, info: Dict[str, str]) -> None:
        self.name = name
        self.info = info


def master_handshake(wire: Wire, authorize: Authorizer, *,
                     timeout: float = HANDSHAKE_TIMEOUT, greet: bool = True) -> Registration:
    """Run steps 1-5 on the master's side and return the registration.

    Raises :class:`AuthenticationError` after answering ``auth-failed``,
    :class:`ProtocolError` on a malformed exchange, ``Disconnected`` or
    ``PeerTimeout`` when the peer goes away or stays silent.
    """
    deadline = _Deadline(timeout)
    if greet:
        exchange_greeting(wire, MASTER_GREETING, SLAVE_GREETING, deadline.left())
    nonce_m = os.urandom(NONCE_LENGTH)
    wire.send_box({b"hello": b"remsh", b"version": PROTOCOL_VERSION, b"nonce": nonce_m})
    box = _read(wire, deadline, "register")
    name_b = box.get(b"register")
    nonce_s = box.get(b"nonce", b"")
    if name_b is None:
        raise ProtocolError(f"{wire.label}: expected a register box, got keys {sorted(box)[:8]}")
    if box.get(b"version") != PROTOCOL_VERSION:
        _refuse(wire, "unsupported protocol version")
        raise ProtocolError(f"{wire.label}: unsupported protocol version {box.get(b'version')!r}")
    if len(nonce_s) != NONCE_LENGTH or not valid_name(name_b):
        _refuse(wire, "malformed register box")
        raise ProtocolError(f"{wire.label}: malformed register box")
    name = name_b.decode("utf-8")
    allowed, secret = authorize(name, wire)
    if allowed and secret is not None:
        proof = box.get(b"proof", b"")
        allowed = hmac.compare_digest(slave_proof(secret, nonce_m, nonce_s, name_b), proof)
    if not allowed:
        _refuse(wire, "authentication failed")
        raise AuthenticationError(f"{wire.label}: slave {name!r} failed authentication")
    reply: Dict[bytes, bytes] = {b"registered": name_b}
    if secret is not None:
        reply[b"proof"] = master_proof(secret, nonce_s, nonce_m, name_b)
    wire.send_box(reply)
    info = {}
    for key in INFO_KEYS:
        value = box.get(key.encode("ascii"))
        if value is not None:
            info[key] = value.decode("utf-8", "replace")
    return Registration(name, info)


def _refuse(wire: Wire, why: str) -> None:
    try:
        wire.send_box({b"error": why, b"errtag": AUTH_FAILED})
    except RemshError:
        pass


# -- slave side ----------------------------------------------------------------


def default_name() -> str:
    """The slave name used when none is given: the host name."""
    return socket.gethostname() or "slave"


def slave_info(basedir: str) -> Dict[str, str]:
    """The descriptive keys a slave sends with ``register``."""
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "basedir": basedir,
        "remsh": __version__,
    }


def slave_handshake(wire: Wire, name: str, *, secret: Optional[bytes], basedir: str,
                    timeout: float = HANDSHAKE_TIMEOUT, greet: bool = True,
                    extra_info: Optional[Dict[str, str]] = None) -> None:
    """Run the slave's side of set-up; return once the master is verified.

    With a ``secret`` the master must prove it too: a master that cannot is
    refused (:class:`AuthenticationError`) before any operation is served.
    """
    name_b = name.encode("utf-8")
    if not valid_name(name_b):
        raise ValueError(f"invalid slave name {name!r}")
    deadline = _Deadline(timeout)
    if greet:
        exchange_greeting(wire, SLAVE_GREETING, MASTER_GREETING, deadline.left())
    hello = _read(wire, deadline, "hello")
    nonce_m = hello.get(b"nonce", b"")
    if hello.get(b"hello") != b"remsh" or len(nonce_m) != NONCE_LENGTH:
        raise ProtocolError(f"{wire.label}: malformed hello box")
    if hello.get(b"version") != PROTOCOL_VERSION:
        raise ProtocolError(f"{wire.label}: master speaks protocol version {hello.get(b'version')!r}")
    nonce_s = os.urandom(NONCE_LENGTH)
    box: Dict[bytes, bytes] = {b"register": name_b, b"version": PROTOCOL_VERSION, b"nonce": nonce_s}
    info = slave_info(basedir)
    if extra_info:
        info.update(extra_info)
    for k, v in info.items():
        box[k.encode("ascii")] = v.encode("utf-8", "surrogateescape")
    if secret is not None:
        box[b"proof"] = slave_proof(secret, nonce_m, nonce_s, name_b)
    wire.send_box(box)
    answer = _read(wire, deadline, "registered")
    if b"errtag" in answer:
        raise AuthenticationError(
            f"{wire.label}: master refused registration of {name!r}: "
            f"{answer.get(b'error', b'').decode('utf-8', 'replace')} "
            f"[{answer[b'errtag'].decode('ascii', 'replace')}]")
    if answer.get(b"registered") != name_b:
        raise ProtocolError(f"{wire.label}: malformed registered box")
    if secret is not None:
        proof = answer.get(b"proof", b"")
        if not hmac.compare_digest(master_proof(secret, nonce_s, nonce_m, name_b), proof):
            raise AuthenticationError(f"{wire.label}: master did not prove it holds the secret")


def current_user() -> str:
    """Best-effort local user name (for default SSH logins)."""
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - getpass raises various things without a user
        return "remsh"
