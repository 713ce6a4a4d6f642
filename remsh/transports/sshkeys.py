"""Keys for remsh's SSH transport: private key files, host key
fingerprints, and the OpenSSH ``authorized_keys`` / ``known_hosts`` lines
the embedded server and the slaves read (:mod:`remsh.transports.ssh` uses
them and re-exports the public names).

Imports paramiko, like everything SSH in remsh: a TCP-only slave never loads
this module.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import threading
from typing import List, NamedTuple, Optional, Set, Tuple, Union

import paramiko

from remsh.errors import UsageError
from remsh.handshake import valid_name

log = logging.getLogger(__name__)

KeyLike = Union[paramiko.PKey, str, "os.PathLike[str]"]

# -- keys ------------------------------------------------------------------


def load_private_key(path: Union[str, "os.PathLike[str]"]) -> paramiko.PKey:
    """Load an unencrypted RSA, ECDSA or Ed25519 private key file (PEM or
    OpenSSH format).

    :raises UsageError: the file cannot be read, is encrypted, or holds no
        key of a supported type
    """
    path = os.fspath(path)
    errors = []
    try:
        return paramiko.PKey.from_path(path)
    except paramiko.PasswordRequiredException:
        raise UsageError(f"private key {path} is encrypted; remsh needs a key without passphrase") from None
    except OSError as e:
        raise UsageError(f"cannot read private key {path}: {e.strerror or e}") from e
    except Exception as e:  # noqa: BLE001 - cryptography raises many kinds; try the classes below
        errors.append(str(e))
    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return cls.from_private_key_file(path)
        except paramiko.PasswordRequiredException:
            raise UsageError(f"private key {path} is encrypted; remsh needs a key without passphrase") from None
        except (paramiko.SSHException, ValueError, TypeError) as e:
            errors.append(str(e))
    raise UsageError(f"{path} is not an RSA, ECDSA or Ed25519 private key ({errors[0] if errors else 'unknown'})")


def as_key(key: KeyLike) -> paramiko.PKey:
    """A paramiko key, loading it first when given the path of a private key file."""
    return key if isinstance(key, paramiko.PKey) else load_private_key(key)


def host_key_fingerprint(key: KeyLike) -> str:
    """The key's fingerprint as OpenSSH prints it: ``SHA256:`` and the
    unpadded base64 of the SHA-256 of the public key blob.

    ``key`` is a paramiko key or the path of a private key file.
    """
    blob = as_key(key).asbytes()
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")


def known_hosts_name(host: str, port: int) -> str:
    """How OpenSSH names ``host:port`` in ``known_hosts`` (``[host]:port``
    unless the port is 22)."""
    return host if port == 22 else f"[{host}]:{port}"


def known_hosts_line(host: str, port: int, key: KeyLike) -> str:
    """The ``known_hosts`` line by which a slave trusts ``key`` as the host
    key of ``host:port`` (no trailing newline)."""
    k = as_key(key)
    return f"{known_hosts_name(host, port)} {k.get_name()} {k.get_base64()}"


def authorized_keys_line(key: KeyLike, name: str) -> str:
    """The ``authorized_keys`` line that lets ``key`` register as slave ``name``."""
    if not valid_name(name.encode("utf-8")):
        raise UsageError(f"invalid slave name {name!r}")
    k = as_key(key)
    return f"{k.get_name()} {k.get_base64()} {name}"


# -- authorized_keys -----------------------------------------------------------

#: Options that change nothing on the embedded server (it refuses terminals,
#: forwarding and commands anyway).  A key with any other option (``from=``,
#: ``command=``, ``expiry-time=``, ...) is ignored rather than half-honoured.
_HARMLESS_OPTIONS = frozenset({
    "restrict", "no-agent-forwarding", "no-port-forwarding", "no-pty", "no-user-rc",
    "no-x11-forwarding", "agent-forwarding", "port-forwarding", "pty", "user-rc", "x11-forwarding",
})


class AuthorizedKey(NamedTuple):
    """One usable ``authorized_keys`` entry."""

    keytype: str
    blob: bytes
    name: str


def _is_key_type(token: str) -> bool:
    return token.startswith(("ssh-", "ecdsa-sha2-", "sk-ssh-", "sk-ecdsa-"))


def _split_options(line: str) -> Tuple[str, str]:
    """Split a leading options field (which may hold quoted spaces) off ``line``."""
    quoted = False
    for i, c in enumerate(line):
        if c == '"':
            quoted = not quoted
        elif c in " \t" and not quoted:
            return line[:i], line[i:].lstrip()
    return line, ""


def _option_names(options: str) -> List[str]:
    names, current, quoted = [], "", False
    for c in options + ",":
        if c == '"':
            quoted = not quoted
        elif c == "," and not quoted:
            names.append(current.split("=", 1)[0].strip().lower())
            current = ""
            continue
        current += c
    return [n for n in names if n]


def parse_authorized_keys(text: str) -> Tuple[List[AuthorizedKey], List[str]]:
    """Parse an ``authorized_keys`` file.

    Returns the usable entries and one message per line that was skipped
    (malformed, no slave name in the comment field, or an option remsh does
    not honour).  Blank lines and ``#`` comments are ignored silently.
    """
    keys: List[AuthorizedKey] = []
    problems: List[str] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(None, 1)
        if not _is_key_type(fields[0]):
            options, line = _split_options(line)
            unknown = [o for o in _option_names(options) if o not in _HARMLESS_OPTIONS]
            if unknown:
                problems.append(f"line {lineno}: option {unknown[0]!r} is not supported; key ignored")
                continue
        fields = line.split()
        if len(fields) < 2 or not _is_key_type(fields[0]):
            problems.append(f"line {lineno}: not a public key line; ignored")
            continue
        keytype, b64, comment = fields[0], fields[1], fields[2:]
        try:
            blob = base64.b64decode(b64.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            problems.append(f"line {lineno}: bad base64 key data; ignored")
            continue
        if len(comment) != 1 or not valid_name(comment[0].encode("utf-8")):
            problems.append(f"line {lineno}: the comment field must be exactly one slave name; key ignored")
            continue
        keys.append(AuthorizedKey(keytype, blob, comment[0]))
    return keys, problems


class AuthorizedKeys:
    """An ``authorized_keys`` file, read again at every lookup so that edits
    take effect for the next login.  Each problem in the file is logged once."""

    def __init__(self, path: Union[str, "os.PathLike[str]"]) -> None:
        self.path = os.fspath(path)
        self._reported: Set[str] = set()
        self._lock = threading.Lock()

    def entries(self) -> List[AuthorizedKey]:
        """The usable entries of the file now (``[]`` if it cannot be read)."""
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as e:
            log.error("cannot read authorized keys file %s: %s", self.path, e)
            return []
        entries, problems = parse_authorized_keys(text)
        with self._lock:
            for p in problems:
                if p not in self._reported:
                    self._reported.add(p)
                    log.warning("%s %s", self.path, p)
        return entries

    def lookup(self, key: paramiko.PKey) -> Optional[str]:
        """The slave name ``key`` may register as, or ``None`` if it is not listed."""
        blob = key.asbytes()
        for entry in self.entries():
            if entry.blob == blob:
                return entry.name
        return None

    def binds(self, name: str) -> bool:
        """True when some key in the file is bound to slave ``name``."""
        return any(entry.name == name for entry in self.entries())


# -- the channel as a stream -------------------------------------------------------
