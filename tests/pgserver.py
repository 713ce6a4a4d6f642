"""A real PostgreSQL server for the tests: Debian's ``postgresql`` binaries,
a cluster made by ``initdb`` in a temporary directory, listening on a Unix
socket there and on 127.0.0.1 at a free port, with ``fsync=off``.

``initdb`` refuses to run as root, so under root the cluster is made and
run as the ``postgres`` system user (else ``nobody``), its directory handed
to that user.  Without the binaries the tests that need the server skip,
unless ``$CI`` is set: there a missing PostgreSQL is a failure.

Fixtures (import them into a test module): ``pg_server`` (one per module
that imports it) and ``pg_uri``, a fresh database per test, dropped after.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from typing import Callable, Iterator, List, Optional

import pytest

#: Where Debian puts the server's binaries (``.ci/run`` installs them).
PG_BIN = os.environ.get("REMSH_TEST_PG_BIN", "/usr/lib/postgresql/15/bin")

_counter = itertools.count()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _drop_to(user: Optional[pwd.struct_passwd]) -> Optional[Callable[[], None]]:
    if user is None:
        return None

    def demote() -> None:
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)

    return demote


def _unprivileged_user() -> Optional[pwd.struct_passwd]:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a postgres nor a nobody user exists")


class PgServer:
    """One PostgreSQL cluster: :meth:`start`, :meth:`stop`, :meth:`restart`,
    :meth:`new_database`; connect through :meth:`uri`."""

    def __init__(self) -> None:
        self.user = _unprivileged_user()
        self.dir = tempfile.mkdtemp(prefix="remsh-pg-")
        os.chmod(self.dir, 0o700)
        if self.user is not None:
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(self.dir, "server.log")
        self.port = _free_port()
        self.superuser = "postgres"
        self.env = dict(os.environ, LC_ALL="C", HOME=self.dir)
        self.env.pop("PGPASSWORD", None)
        self.env.pop("PGPASSFILE", None)

    def _run(self, argv: List[str], timeout: float = 60.0) -> None:
        r = subprocess.run(argv, cwd=self.dir, env=self.env, preexec_fn=_drop_to(self.user),
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode:
            log = ""
            if os.path.exists(self.log):
                with open(self.log) as f:
                    log = f.read()[-2000:]
            raise RuntimeError(f"{argv[0]} failed ({r.returncode}): {r.stderr.strip()} {log}")

    def start(self) -> None:
        if not os.path.exists(self.data):
            self._run([os.path.join(PG_BIN, "initdb"), "-D", self.data, "-U", self.superuser, "--auth=trust",
                       "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"])
            # the superuser and the Unix socket need no password; other roles
            # over TCP do (scram-sha-256), for the tests of password files
            hba = os.path.join(self.data, "pg_hba.conf")
            with open(hba, "w") as f:
                f.write(f"local all all trust\nhost all {self.superuser} 127.0.0.1/32 trust\n"
                        f"host all all 127.0.0.1/32 scram-sha-256\n")
            if self.user is not None:
                os.chown(hba, self.user.pw_uid, self.user.pw_gid)
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off "
                f"-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run([os.path.join(PG_BIN, "pg_ctl"), "-D", self.data, "-l", self.log, "-o", opts, "-w", "-t", "60",
                   "start"])

    def stop(self, mode: str = "fast") -> None:
        self._run([os.path.join(PG_BIN, "pg_ctl"), "-D", self.data, "-m", mode, "-w", "-t", "60", "stop"])

    def restart(self) -> None:
        """``pg_ctl restart``: every connection is cut."""
        self.stop()
        self.start()

    def uri(self, dbname: str = "postgres", *, tcp: bool = False, user: Optional[str] = None) -> str:
        """A libpq URI for ``dbname``: over the Unix socket, or TCP."""
        user = user or self.superuser
        if tcp:
            return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"
        return f"postgresql://{user}@/{dbname}?host={self.dir}&port={self.port}"

    def sql(self, statement: str, dbname: str = "postgres") -> None:
        """Run ``statement`` as the superuser (autocommit)."""
        import psycopg

        with psycopg.connect(self.uri(dbname), autocommit=True) as conn:
            conn.execute(statement.encode())

    def new_database(self, owner: Optional[str] = None) -> str:
        name = f"t{os.getpid()}_{next(_counter)}"
        self.sql(f"CREATE DATABASE {name}" + (f" OWNER {owner}" if owner else ""))
        return name

    def new_role(self, password: str) -> str:
        """A login role with ``password`` (it must give it over TCP)."""
        name = f"r{os.getpid()}_{next(_counter)}"
        self.sql(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
        return name

    def drop_database(self, name: str) -> None:
        self.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def cleanup(self) -> None:
        try:
            if os.path.exists(os.path.join(self.data, "postmaster.pid")):
                self.stop("immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def postgres_available() -> Optional[str]:
    """``None`` when a server can be made here, else why not."""
    for tool in ("initdb", "pg_ctl", "postgres"):
        if not os.access(os.path.join(PG_BIN, tool), os.X_OK):
            return f"PostgreSQL server binaries not found in {PG_BIN} (Debian: apt-get install postgresql)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'remsh[postgres]')"
    return None


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PgServer]:
    """A running PostgreSQL server for the module's tests."""
    missing = postgres_available()
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {missing}")
        pytest.skip(missing)
    server = PgServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def pg_uri(pg_server: PgServer) -> Iterator[str]:
    """A URI of a fresh, empty database on the server (dropped after the test)."""
    name = pg_server.new_database()
    try:
        yield pg_server.uri(name)
    finally:
        pg_server.drop_database(name)
