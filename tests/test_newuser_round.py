"""What a new user tripped over while trying the documented examples: a put file keeps its mode, a run
that loses its master says which job it was following, and a killed master not yet reaped frees its name."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest

from remsh.store.base import StoreError
from remsh.store.pglink import Link
from remsh.store.postgres import PostgresJobStore

from tests.pgserver import PgServer, pg_server, pg_uri  # noqa: F401 - fixtures
from tests.test_fleet import Master, _env, remsh, wait_names
from tests.util import WAIT, run_in_thread, wait_until


def _local_master(tmp_path: Path) -> Master:
    base = tmp_path / "base"
    base.mkdir()
    sock = tmp_path / "ctl" / "master.sock"
    master = Master(tmp_path, sock, extra=["--local", "1", "--basedir", str(base)]).wait_ready()
    wait_names(sock, ["local1"])
    return master


def test_put_of_a_file_keeps_its_permission_bits(tmp_path: Path) -> None:
    """remsh put of one file gives it the local file's mode (a script stays executable), with --force too."""
    master = _local_master(tmp_path)
    try:
        script = tmp_path / "deploy.sh"
        script.write_text("#!/bin/sh\necho deployed\n")
        script.chmod(0o750)
        r = remsh(master.sock, "put", str(script), "deploy.sh")
        assert r.returncode == 0, r.stderr.decode()
        r = remsh(master.sock, "run", "--no-summary", "--", "./deploy.sh")
        assert (r.returncode, r.stdout) == (0, b"local1 | deployed\n"), r.stderr.decode()
        script.chmod(0o700)
        r = remsh(master.sock, "put", "--force", str(script), "deploy.sh")
        assert r.returncode == 0, r.stderr.decode()
        [remote] = (tmp_path / "base").rglob("deploy.sh")
        assert stat.S_IMODE(os.stat(remote).st_mode) == 0o700
    finally:
        master.stop()


def test_put_onto_an_existing_file_or_tree_says_that_force_replaces_it(tmp_path: Path) -> None:
    """A put refused because DEST exists says '(put --force replaces it)', as get says of its own option."""
    master = _local_master(tmp_path)
    try:
        (tmp_path / "site").mkdir()
        (tmp_path / "site" / "index.html").write_text("hi\n")
        for src, dest in ((tmp_path / "site" / "index.html", "index.html"), (tmp_path / "site", "site")):
            assert remsh(master.sock, "put", str(src), dest).returncode == 0
            r = remsh(master.sock, "put", str(src), dest)
            assert r.returncode == 3 and b"(put --force replaces it)" in r.stderr, r.stderr.decode()
    finally:
        master.stop()


def test_a_run_that_loses_its_master_names_the_job_to_follow(tmp_path: Path) -> None:
    """remsh run following a job whose master dies exits 3 naming the job id and how to follow it."""
    master = _local_master(tmp_path)
    run = subprocess.Popen([sys.executable, "-m", "remsh", "--master", str(master.sock), "run", "--",
                            "sh", "-c", "echo started; sleep 30"], env=_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    try:
        running: List[dict] = []

        def started() -> bool:
            r = remsh(master.sock, "jobs", "--json", "--running")
            running[:] = json.loads(r.stdout) if r.returncode == 0 else []
            return bool(running) and running[0]["slaves"].get("local1", {}).get("stdout_bytes", 0) > 0

        wait_until(started, WAIT, "the command to print")
        job_id = running[0]["id"]
        master.stop(signal.SIGKILL)
        _, err = run.communicate(timeout=WAIT)
        assert run.returncode == 3, err.decode()
        assert f"remsh job {job_id} --follow".encode() in err, err.decode()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(WAIT)
        master.stop()


def _state(pid: int) -> bytes:
    """The state letter of process ``pid`` in /proc (b"" once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            line = f.read()
    except OSError:
        return b""
    return line[line.rfind(b")") + 2:][:1]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_a_killed_master_not_yet_reaped_frees_its_name_at_once(pg_uri: str) -> None:
    """A master SIGKILLed on this machine that is still a zombie (not reaped yet) gives its name back at once."""
    code = ("import sys\nfrom remsh.store.postgres import PostgresJobStore\n"
            "s = PostgresJobStore(sys.argv[1], 'crashy', lease=60.0)\n"
            "print(s.epoch, flush=True)\nsys.stdin.read()  # alive until killed or the test ends\n")
    proc = subprocess.Popen([sys.executable, "-c", code, pg_uri], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env=_env())
    again = None
    try:
        assert proc.stdout is not None
        epoch = int(proc.stdout.readline())
        os.kill(proc.pid, signal.SIGKILL)  # not proc.wait(): left a zombie, as a lazy parent leaves it
        wait_until(lambda: _state(proc.pid) == b"Z", WAIT, "the killed master to be a zombie")
        again = PostgresJobStore(pg_uri, "crashy", lease=60.0)  # well within the lease
        assert again.epoch == epoch + 1
    finally:
        if again is not None:
            again.close()
        proc.kill()
        proc.wait(WAIT)


def test_a_write_without_patience_fails_at_once_while_another_waits_out_an_outage(pg_server: PgServer,
                                                                                    pg_uri: str) -> None:
    """While one write waits for PostgreSQL to come back, a write that may not wait (a new job) fails at once."""
    link = Link(pg_uri, "test")
    link.run(lambda db: db.execute("SELECT 1"))
    pg_server.stop()
    try:
        waiting = run_in_thread(lambda: link.run(lambda db: db.execute("SELECT 1"), patience=15.0))
        wait_until(link.lock.locked, WAIT, "the patient write to hold the link")
        started = time.monotonic()
        with pytest.raises(StoreError, match="job store test"):
            link.run(lambda db: db.execute("SELECT 1"))  # before: waited behind it, up to its patience
        assert time.monotonic() - started < 5.0
    finally:
        pg_server.start()
    assert waiting.wait(WAIT).error is None, waiting.error  # the patient one goes through once the database is back
    assert not link.outage.is_set()
    link.close()
