"""An attacker's review of the web dashboard and of a restarted master's
adoption of running commands, against real ``remsh master`` processes,
real sockets and real ``remsh-slave`` processes: what was found, pinned.

- a dashboard's port could be held open for ever by anyone who can reach
  it (no token needed), each connection a descriptor of the master's own
  process;
- two masters' dashboards on one host shared one cookie name (browsers
  keep cookies by host, not port), so opening one logged the other out;
- a cancelled command taken back by a restarted master went on as long as
  its slave did not answer the interrupt (away, stopped, or ignoring it),
  where a command of the master's own is dropped after a grace;
- the dashboard's URL, token and all, was written to ``--log-file``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path
from typing import Iterator, List

import pytest

if not os.environ.get("CI"):  # under CI the extra must be there: the imports below fail loudly
    pytest.importorskip("httpx", reason="the web tests need httpx")
    pytest.importorskip("starlette", reason="the web dashboard needs Starlette")
    pytest.importorskip("uvicorn", reason="the web dashboard needs uvicorn")

import httpx  # noqa: E402

from remsh.master.fanout import DEFAULT_GRACE  # noqa: E402
from remsh.web.server import MAX_CONNECTIONS, REQUEST_TIMEOUT  # noqa: E402
from tests.slaveproc import WAIT, SlaveProcesses  # noqa: E402
from tests.test_fleet import Master, _free_port, ls, remsh, wait_names  # noqa: E402
from tests.test_restart import _record, _start  # noqa: E402
from tests.util import wait_until  # noqa: E402

pytestmark = pytest.mark.timeout(180)


@contextlib.contextmanager
def dashboard(workdir: Path) -> Iterator[Master]:
    """A master serving the dashboard on a free loopback port, no slaves."""
    workdir.mkdir(parents=True, exist_ok=True)
    master = Master(workdir, workdir / "ctl" / "m.sock", extra=["--http", "127.0.0.1:0"])
    try:
        master.wait_ready()
        yield master
    finally:
        master.stop()


def test_the_dashboard_token_stays_out_of_the_log_file(tmp_path: Path) -> None:
    """With --log-file the log says where the dashboard is without its token;
    the URL with the token is on stderr and in STATE_DIR/web-url only."""
    log_file = tmp_path / "master.log"
    master = Master(tmp_path, tmp_path / "ctl" / "m.sock", extra=["--http", "127.0.0.1:0", "--log-file",
                                                                  str(log_file)])
    try:
        wait_until(lambda: "ready" in (log_file.read_text() if log_file.exists() else "")
                   or master.proc.poll() is not None, WAIT, "the master to be ready")
        assert master.proc.poll() is None, master.text()
        url = web_url(master)
        token = url.partition("?token=")[2]
        assert len(token) >= 40
        logged = log_file.read_text()
        assert "web dashboard at" in logged and url.partition("?")[0] in logged, logged
        assert token not in logged
        assert f"web dashboard at {url}" in master.text()
    finally:
        master.stop()


def web_url(master: Master) -> str:
    return (master.state_dir / "web-url").read_text().strip()


def _closed(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (without blocking)."""
    sock.setblocking(False)
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


# -- the dashboard ------------------------------------------------------------------------


def test_dashboard_connections_are_capped_and_idle_ones_closed(tmp_path: Path) -> None:
    """Past MAX_CONNECTIONS a new connection is closed at once; one that sends no whole request is closed after REQUEST_TIMEOUT."""
    with dashboard(tmp_path / "m") as master:
        base, _, token = web_url(master).partition("/?token=")
        port = int(base.rpartition(":")[2])
        socks: List[socket.socket] = []
        try:
            for _ in range(MAX_CONNECTIONS - 1):
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=WAIT))
            slow = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
            slow.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # a request head that never ends
            socks.append(slow)
            extra = [socket.create_connection(("127.0.0.1", port), timeout=WAIT) for _ in range(10)]
            socks += extra
            wait_until(lambda: all(_closed(s) for s in extra), WAIT, "connections past the cap closed")
            began = time.monotonic()
            wait_until(lambda: all(_closed(s) for s in socks), REQUEST_TIMEOUT + WAIT,
                       "idle connections closed")
            assert time.monotonic() - began < REQUEST_TIMEOUT + WAIT
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=WAIT) as c:
                assert c.get("/api/slaves").status_code == 200  # the dashboard serves again
        finally:
            for s in socks:
                s.close()


def test_a_live_stream_pipelined_behind_another_request_outlives_the_request_timeout(tmp_path: Path) -> None:
    """A live stream requested in the same write as another request stays open past REQUEST_TIMEOUT (only waiting for a request is bounded)."""
    with dashboard(tmp_path / "m") as master:
        base, _, token = web_url(master).partition("/?token=")
        port = int(base.rpartition(":")[2])
        head = f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
            sock.sendall(f"GET /api/slaves HTTP/1.1\r\n{head}\r\nGET /api/live/fleet HTTP/1.1\r\n{head}\r\n"
                         .encode())
            received = b""
            end = time.monotonic() + REQUEST_TIMEOUT + 3
            while time.monotonic() < end:
                sock.settimeout(max(0.01, end - time.monotonic()))
                try:
                    data = sock.recv(65536)
                except socket.timeout:
                    break
                assert data, f"the live stream was closed: {received[-300:]!r}"
                received += data
            assert b"text/event-stream" in received and b"data: " in received, received[-300:]


def test_two_dashboards_on_one_host_keep_their_own_token_cookies(tmp_path: Path) -> None:
    """One browser (one cookie jar) opens two masters' dashboards on 127.0.0.1: both stay logged in."""
    with dashboard(tmp_path / "a") as a, dashboard(tmp_path / "b") as b:
        with httpx.Client(timeout=WAIT) as browser:
            for master in (a, b):
                assert browser.get(web_url(master)).status_code == 303
            for master in (a, b):
                base = web_url(master).partition("/?token=")[0]
                assert browser.get(f"{base}/api/slaves").status_code == 200, base


# -- a restarted master's adoption ---------------------------------------------------------


def test_a_cancelled_command_taken_back_ends_when_its_slave_does_not_answer(tmp_path: Path) -> None:
    """Master killed mid-job, the next takes the command back, its slave stops answering (SIGSTOP): a cancel still ends the job, cancelled, within the grace."""
    port = _free_port()
    slaves = SlaveProcesses(tmp_path / "slaves")
    try:
        first = _start(tmp_path, port)
        slaves.start(port, "c-1", secret=None, insecure=True, max_backoff=0.3)
        wait_names(first.sock, ["c-1"])
        r = remsh(first.sock, "run", "--detach", "-t", "c-1", "--", "sh", "-c", "echo started; sleep 600")
        assert r.returncode == 0, r.stderr.decode()
        job_id = r.stdout.decode().strip()
        wait_until(lambda: _record(first, job_id)["slaves"]["c-1"]["stdout_bytes"] > 0, WAIT, "its output")
        first.stop(signal.SIGKILL)
        second = _start(tmp_path, port)
        slave = slaves.procs[0]
        try:
            wait_until(lambda: [(row["state"], row["job"]) for row in ls(second.sock)] == [("busy", job_id)],
                       WAIT, "the command taken back")
            slave.signal(signal.SIGSTOP)
            r = remsh(second.sock, "cancel", job_id)
            assert r.returncode == 0, r.stderr.decode()
            wait_until(lambda: _record(second, job_id)["state"] != "running", 2 * DEFAULT_GRACE + WAIT,
                       "the cancelled job to end")
            rec = _record(second, job_id)
            assert rec["state"] == "cancelled" and rec["slaves"]["c-1"]["state"] == "cancelled", rec
        finally:
            slave.signal(signal.SIGCONT)
            second.stop()
    finally:
        slaves.close()
