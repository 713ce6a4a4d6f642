"""What a new user tripped over trying the documented multi-master set-up by hand: ``--master`` after the
subcommand, ``put --parents FILE DIR/``, a put into a missing directory, a password file that is not there
or not given, and a slave's refusal that did not say where to look."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import List

from remsh.master.slavelistener.tcp import TcpSlaveListener

from tests.pgserver import PgServer, pg_server  # noqa: F401 - fixtures
from tests.test_fleet import Master, _env, remsh, wait_names
from tests.util import WAIT

ROOT = Path(__file__).resolve().parents[1]


def _local_master(tmp_path: Path) -> Master:
    base = tmp_path / "base"
    base.mkdir()
    sock = tmp_path / "ctl" / "master.sock"
    master = Master(tmp_path, sock, extra=["--local", "1", "--basedir", str(base)]).wait_ready()
    wait_names(sock, ["local1"])
    return master


def _remsh(*args: str, cwd: Path) -> "subprocess.CompletedProcess[bytes]":
    return subprocess.run([sys.executable, "-m", "remsh", *args], env=_env(), capture_output=True,
                          timeout=60, cwd=cwd, stdin=subprocess.DEVNULL)


def test_master_option_after_the_subcommand(tmp_path: Path) -> None:
    """remsh ls --master PATH (the option after the subcommand) reaches that master, as remsh --master PATH ls."""
    master = _local_master(tmp_path)
    try:
        r = _remsh("ls", "--master", str(master.sock), cwd=tmp_path)
        assert r.returncode == 0, r.stderr.decode()
        assert b"local1" in r.stdout
        r = _remsh("jobs", "--master", str(tmp_path / "nobody.sock"), cwd=tmp_path)
        assert r.returncode == 2 and b"nobody.sock" in r.stderr, r.stderr.decode()
    finally:
        master.stop()


def test_put_parents_of_a_file_to_a_directory_with_a_trailing_slash(tmp_path: Path) -> None:
    """put --parents FILE srv/ makes srv and puts FILE into it (it failed: 'No such file or directory: srv/')."""
    master = _local_master(tmp_path)
    try:
        (tmp_path / "app.tar").write_bytes(b"app\n")
        r = remsh(master.sock, "put", "--parents", str(tmp_path / "app.tar"), "srv/")
        assert r.returncode == 0, r.stderr.decode()
        [copy] = (tmp_path / "base").rglob("app.tar")
        assert copy.parent.name == "srv" and copy.read_bytes() == b"app\n"
    finally:
        master.stop()


def test_a_put_into_a_missing_directory_says_that_parents_makes_it(tmp_path: Path) -> None:
    """A put of a file or a tree whose directory is missing names --parents and the directory it would make."""
    master = _local_master(tmp_path)
    try:
        (tmp_path / "app.tar").write_bytes(b"app\n")
        (tmp_path / "tree").mkdir()
        (tmp_path / "tree" / "f").write_text("x\n")
        cases = [(str(tmp_path / "app.tar"), "srv/", "srv"),
                 (str(tmp_path / "app.tar"), "srv/x/app.tar", "srv/x"),
                 (str(tmp_path / "tree"), "srv/tree", "srv")]
        for local, dest, missing in cases:
            r = remsh(master.sock, "put", local, dest)
            assert r.returncode == 3, (dest, r.stderr.decode())
            assert f"(put --parents makes {missing})" in r.stderr.decode(), (dest, r.stderr.decode())
        # a failure that is not a missing directory gets no such hint
        (tmp_path / "base").chmod(0o700)
        r = remsh(master.sock, "put", str(tmp_path / "app.tar"), "app.tar")
        assert r.returncode == 0, r.stderr.decode()
        r = remsh(master.sock, "put", str(tmp_path / "app.tar"), "app.tar/")
        assert r.returncode == 3 and b"--parents" not in r.stderr, r.stderr.decode()
    finally:
        master.stop()


def _master_with_store(tmp_path: Path, uri: str, **env: str) -> "subprocess.CompletedProcess[bytes]":
    argv = [sys.executable, "-m", "remsh", "master", "--listen", "127.0.0.1:0", "--insecure",
            "--control", str(tmp_path / "ctl.sock"), "--state-dir", str(tmp_path / "state"),
            "--store", uri, "--name", "m1"]
    return subprocess.run(argv, env=_env(**env), capture_output=True, timeout=60, stdin=subprocess.DEVNULL)


def test_a_password_file_that_is_not_there_is_named(tmp_path: Path, pg_server: PgServer) -> None:  # noqa: F811
    """A --store whose ?passfile= (or $PGPASSFILE) does not exist stops the master naming the file (libpq ignores it)."""
    role = pg_server.new_role("s3cret-pw")
    db = pg_server.new_database(owner=role)
    try:
        missing = tmp_path / "no-such-pgpass"
        r = _master_with_store(tmp_path, pg_server.uri(db, tcp=True, user=role) + f"?passfile={missing}")
        assert r.returncode == 2, r.stderr.decode()
        assert f"the password file {missing} does not exist (named by ?passfile=" in r.stderr.decode()
        r = _master_with_store(tmp_path, pg_server.uri(db, tcp=True, user=role), PGPASSFILE=str(missing))
        assert r.returncode == 2, r.stderr.decode()
        assert f"the password file {missing} does not exist (named by $PGPASSFILE" in r.stderr.decode()
    finally:
        pg_server.drop_database(db)


def test_no_password_says_where_to_put_it(tmp_path: Path, pg_server: PgServer) -> None:  # noqa: F811
    """A role that needs a password, with none found, stops the master saying where the password goes."""
    role = pg_server.new_role("s3cret-pw")
    db = pg_server.new_database(owner=role)
    try:
        r = _master_with_store(tmp_path, pg_server.uri(db, tcp=True, user=role), HOME=str(tmp_path))
        err = r.stderr.decode()
        assert r.returncode == 2, err
        assert "no password supplied" in err and "?passfile=FILE in the URI, $PGPASSFILE or ~/.pgpass" in err, err
        assert "s3cret-pw" not in err
        # a password file whose line does not match the URI (another database): the hint says what must match
        other = tmp_path / "other-pgpass"
        other.write_text(f"127.0.0.1:{pg_server.port}:another_db:{role}:s3cret-pw\n")
        other.chmod(0o600)
        r = _master_with_store(tmp_path, pg_server.uri(db, tcp=True, user=role) + f"?passfile={other}")
        assert r.returncode == 2 and "HOST:PORT:DBNAME:USER:PASSWORD matching the URI" in r.stderr.decode(), r.stderr
        # the way it says works
        passfile = tmp_path / "pgpass"
        passfile.write_text(f"127.0.0.1:{pg_server.port}:{db}:{role}:s3cret-pw\n")
        passfile.chmod(0o600)
        proc = subprocess.Popen([sys.executable, "-m", "remsh", "master", "--listen", "127.0.0.1:0", "--insecure",
                                 "--control", str(tmp_path / "ctl.sock"), "--state-dir", str(tmp_path / "state"),
                                 "--store", pg_server.uri(db, tcp=True, user=role) + f"?passfile={passfile}",
                                 "--name", "m1"], env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            lines: List[bytes] = []
            assert proc.stderr is not None
            for line in proc.stderr:  # bounded: the master exits or says ready
                lines.append(line)
                if b"ready" in line:
                    break
            assert any(b"remsh master: ready" in x for x in lines), b"".join(lines).decode()
        finally:
            proc.terminate()
            proc.wait(WAIT)
    finally:
        pg_server.drop_database(db)


def test_a_refused_slave_says_where_to_look(tmp_path: Path) -> None:
    """A slave the master refuses says the master's log has the reason (its own message cannot: auth-failed)."""
    wrong = tmp_path / "wrong"
    wrong.write_text("another")
    wrong.chmod(0o600)
    with TcpSlaveListener(host="127.0.0.1", port=0, secret=b"the right one") as listener:
        r = subprocess.run([sys.executable, "-m", "remsh.slave", "--no-reconnect", "--name", "s1",
                            "--basedir", str(tmp_path), "--secret-file", str(wrong),
                            "127.0.0.1", str(listener.port)],
                           env=_env(), capture_output=True, timeout=WAIT * 3, stdin=subprocess.DEVNULL)
    err = r.stderr.decode()
    assert r.returncode == 2, err  # as docs/running-a-slave.rst's table says
    assert "registration refused [auth-failed] (the master's log says why" in err, err


def test_host_port_given_with_ssh_alone_is_a_usage_error(tmp_path: Path) -> None:
    """remsh-slave --ssh USER@HOST HOST PORT exits 2 saying the port goes in --ssh (it ignored them: port 22)."""
    r = subprocess.run([sys.executable, "-m", "remsh.slave", "--no-reconnect", "--basedir", str(tmp_path),
                        "--ssh", "remsh@127.0.0.1", "127.0.0.1", "2222"],
                       env=_env(), capture_output=True, timeout=WAIT * 3, stdin=subprocess.DEVNULL)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert "HOST PORT are not used with --ssh: give the master's SSH port in --ssh USER@HOST[:PORT]" in err, err
