"""What a new user tripped over while trying the documented examples: a put file keeps its mode, and a
run that loses its master says which job it was following."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import List

from tests.test_fleet import Master, _env, remsh, wait_names
from tests.util import WAIT, wait_until


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
