"""Which job store a ``remsh master`` opens: ``--store`` and ``--name``.

Without ``--store`` the master keeps its jobs in ``STATE_DIR/jobs.sqlite``
(:mod:`remsh.store.sqlite`), a file one master holds at a time.  With
``--store postgresql://...`` (a libpq URI; the extra ``remsh[postgres]``)
it opens :mod:`remsh.store.postgres`, which several masters share, each
under its ``--name`` (by default ``HOST:PORT`` of its ``--listen``, else of
its ``--ssh-listen``, else the host name).

A password is never taken from the command line, where every user of the
machine reads it in ``ps``: a URI that carries one (``user:PASSWORD@`` or
``?password=``) is refused.  libpq takes it from a password file instead
(``$PGPASSFILE``, ``?passfile=FILE`` in the URI, or ``~/.pgpass``), or from
``$PGPASSWORD``.  The URI is logged without any password.
"""

from __future__ import annotations

import argparse
import os
import socket
from typing import Any, Dict, List, Optional, Protocol, Tuple
from urllib.parse import parse_qs, urlsplit

from remsh.store.base import JobStore, StoreError

#: The URI schemes libpq takes.
SCHEMES = ("postgresql", "postgres")

#: What to install when psycopg is missing.
EXTRA_HINT = "pip install 'remsh[postgres]'"


def store_uri(text: str) -> str:
    """``text`` if it is a PostgreSQL URI without a password; else an
    :class:`argparse.ArgumentTypeError` saying why (never echoing it)."""
    try:
        parts = urlsplit(text)
        password = parts.password
    except ValueError:
        raise argparse.ArgumentTypeError("not a postgresql:// URI") from None
    if parts.scheme not in SCHEMES:
        raise argparse.ArgumentTypeError("takes a libpq URI, postgresql://[USER@]HOST[:PORT]/DBNAME[?...] "
                                         "(without --store, jobs go to STATE_DIR/jobs.sqlite)")
    query = parse_qs(parts.query, keep_blank_values=True)
    if password is not None or "password" in query:
        raise argparse.ArgumentTypeError(
            "the URI carries a password, which any user of this machine can read in ps: put it in a "
            "password file instead ($PGPASSFILE, ?passfile=FILE in the URI, or ~/.pgpass; see "
            "docs/multimaster.rst)")
    return text


class ArgumentAdder(Protocol):
    """A parser or an argument group of one."""

    def add_argument(self, *args: Any, **kwargs: Any) -> Any: ...


#: The longest ``--name``.
MAX_NAME = 200


def master_name(text: str) -> str:
    """``text`` if it can name a master: 1 to :data:`MAX_NAME` printable
    characters, no spaces (it is shown in logs and records)."""
    if not 0 < len(text) <= MAX_NAME or not text.isprintable() or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"a master's name is 1 to {MAX_NAME} printable characters without "
                                         f"spaces, got {text!r}")
    return text


def add_store_options(group: ArgumentAdder) -> None:
    """``--store URI`` and ``--name NAME`` in ``remsh master``'s jobs group."""
    group.add_argument("--store", type=store_uri, metavar="URI",
                       help="keep jobs in PostgreSQL, shared with other masters: a libpq URI "
                            "postgresql://[USER@]HOST[:PORT]/DBNAME (the password from a password file: "
                            f"$PGPASSFILE or ?passfile=FILE; never in the URI; needs {EXTRA_HINT}); "
                            "default: STATE_DIR/jobs.sqlite, one master")
    group.add_argument("--name", type=master_name, metavar="NAME",
                       help="this master's name on a shared --store (default: HOST:PORT of --listen)")


def default_name(listen: Optional[Tuple[Optional[str], int]],
                 ssh_listen: Optional[Tuple[Optional[str], int]] = None) -> str:
    """``HOST:PORT`` of the first listener given (the machine's host name
    for a wildcard or missing host), else the host name alone."""
    hostname = socket.gethostname()
    for spec in (listen, ssh_listen):
        if spec is not None:
            host, port = spec
            if not host or host in ("0.0.0.0", "::", "*"):
                host = hostname
            return f"{host}:{port}"
    return hostname


def open_shared_store(args: argparse.Namespace) -> JobStore:
    """The shared store ``remsh master --store URI`` asks for, under
    ``--name`` (or :func:`default_name`).

    :raises StoreError: it cannot be opened (psycopg missing: one line
        naming ``pip install 'remsh[postgres]'``; a live master of the same
        name: :class:`~remsh.store.fencing.MasterNameInUse`)
    """
    uri: str = args.store
    try:
        from remsh.store.postgres import PostgresJobStore
    except ImportError as e:
        scheme = uri.split(":", 1)[0]
        raise StoreError(f"--store {scheme}://... needs psycopg 3.2 or later: {EXTRA_HINT} ({e})") from None
    name = getattr(args, "name", None) or default_name(getattr(args, "listen", None),
                                                       getattr(args, "ssh_listen", None))
    passfile = named_passfile(uri)
    if passfile is not None and not os.path.isfile(passfile):  # libpq would pass over it without a word
        raise StoreError(f"--store: the password file {passfile} does not exist (named by "
                         f"{'?passfile=' if 'passfile' in _query(uri) else '$PGPASSFILE'}; see docs/multimaster.rst)")
    try:
        return PostgresJobStore(uri, name, keep=args.keep_jobs, max_output=args.max_job_output)
    except StoreError as e:
        if "no password supplied" not in str(e):
            raise
        # the server wants a password and libpq found none: say where it goes
        raise StoreError(f"{e} (libpq found no password for it: a password file, mode 0600, with a line "
                         "HOST:PORT:DBNAME:USER:PASSWORD matching the URI, * for any field, named by "
                         "?passfile=FILE in the URI, $PGPASSFILE or ~/.pgpass; see docs/multimaster.rst)") from e


def _query(uri: str) -> Dict[str, List[str]]:
    try:
        return parse_qs(urlsplit(uri).query, keep_blank_values=True)
    except ValueError:
        return {}


def named_passfile(uri: str) -> Optional[str]:
    """The password file ``uri`` names (``?passfile=``), else ``$PGPASSFILE``;
    None when neither does (libpq then reads ``~/.pgpass`` if it is there)."""
    named = _query(uri).get("passfile")
    if named:
        return named[-1]
    return os.environ.get("PGPASSFILE") or None


__all__ = ["add_store_options", "open_shared_store", "store_uri", "master_name", "default_name", "named_passfile",
           "EXTRA_HINT"]
