"""Reading the shared secret, the one way every remsh program does it.

A secret comes from a file (``--secret-file``) or from the environment
variable ``REMSH_SECRET``; never from a command line, where ``ps`` shows it
to every user.

A secret file holds the secret as it is, plus at most one trailing line
break (``\\n`` or ``\\r\\n``), so that a file written by ``echo`` or an editor
works.  Nothing else is stripped: leading or trailing spaces, a second line
break, are part of the secret.  ``.strip()`` would silently turn two
different files into one secret, and a master and a slave that read the same
file differently would fail the handshake with nothing to explain why.

A file that group or others may read (or write) is still used, but a warning
names it, as OpenSSH does for private keys: the secret is the right to run
anything on every slave.

The environment variable is taken *out* of the environment once read
(``os.environ`` and ``os.environb`` both, and the C-level environment), so
that a slave never reports it through ``getenv`` and no command or child
process inherits it.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import List, Optional

from remsh.errors import LocalError

log = logging.getLogger(__name__)

#: The environment variable that may hold the secret.
SECRET_ENV = "REMSH_SECRET"

#: Largest secret file read; a secret is a few dozen bytes, and anything
#: bigger is the wrong file.
MAX_SECRET_FILE = 64 * 1024


def strip_line_break(data: bytes) -> bytes:
    """``data`` without one trailing ``\\r\\n`` or ``\\n`` (only one)."""
    if data.endswith(b"\r\n"):
        return data[:-2]
    if data.endswith(b"\n"):
        return data[:-1]
    return data


def read_secret_file(path: str) -> bytes:
    """The secret held in the file ``path``.

    One trailing line break is dropped and nothing else.  Logs a warning
    naming the file when its mode lets group or others read or write it.

    :raises LocalError: the file cannot be read (the ``OSError`` is chained),
        is not a regular file, is larger than :data:`MAX_SECRET_FILE`, or
        holds an empty secret.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise LocalError(f"cannot read secret file {path}: {e.strerror}") from e
    chunks: List[bytes] = []
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LocalError(f"secret file {path} is not a regular file")
        if st.st_mode & 0o077:
            log.warning("secret file %s is accessible by group or others (mode %04o); "
                        "make it readable by its owner only (chmod 600)", path, stat.S_IMODE(st.st_mode))
        size = 0
        while True:
            chunk = os.read(fd, MAX_SECRET_FILE + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_SECRET_FILE:
                raise LocalError(f"secret file {path} is larger than {MAX_SECRET_FILE} bytes")
    except OSError as e:
        raise LocalError(f"cannot read secret file {path}: {e.strerror}") from e
    finally:
        os.close(fd)
    secret = strip_line_break(b"".join(chunks))
    if not secret:
        raise LocalError(f"secret file {path} is empty")
    return secret


def take_env_secret(name: str = SECRET_ENV) -> Optional[bytes]:
    """The secret in the environment variable ``name``, removed from the
    environment; ``None`` when it is unset or empty.

    The value is used as it is (no stripping).  The variable is removed even
    when empty, and whether or not the caller goes on to use it.
    """
    value = os.environb.get(name.encode()) if os.supports_bytes_environ else None
    if value is None:
        text = os.environ.get(name)
        value = None if text is None else os.fsencode(text)
    scrub_env_secret(name)
    return value or None


def scrub_env_secret(name: str = SECRET_ENV) -> None:
    """Remove ``name`` from the environment: both of Python's views of it and
    the C-level environment that child processes inherit."""
    os.environ.pop(name, None)
    if os.supports_bytes_environ:
        os.environb.pop(name.encode(), None)
    try:
        os.unsetenv(name)  # even if the two views had fallen out of step
    except (OSError, ValueError):
        pass
