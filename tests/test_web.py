"""The web dashboard over HTTP (httpx) against a real ``remsh master --http``
with real ``remsh-slave`` processes over TCP: the token (401 without it,
the cookie flow, the Bearer header), CSRF, cancel, the JSON API against
the command line's ``--json``, the live streams, the headers, the
``web-url`` file and ``remsh web``, and the refusal of a non-loopback
address without TLS; and the live watches' cost with no page open."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import ssl
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

if not os.environ.get("CI"):  # under CI the extra must be there: the imports below fail loudly
    pytest.importorskip("httpx", reason="the web tests need httpx (pip install 'remsh[web]' httpx)")
    pytest.importorskip("starlette", reason="the web dashboard needs Starlette (pip install 'remsh[web]')")
    pytest.importorskip("uvicorn", reason="the web dashboard needs uvicorn (pip install 'remsh[web]')")

import httpx  # noqa: E402

from remsh.web.app import cookie_name, csrf_token  # noqa: E402
from remsh.web.live import Subscriber, Watch  # noqa: E402
from tests.slaveproc import SECRET, WAIT, SlaveProcesses  # noqa: E402
from tests.test_fleet import Master, _env, ls, remsh, wait_names  # noqa: E402
from tests.transports import make_pki  # noqa: E402
from tests.util import wait_until  # noqa: E402

pytestmark = pytest.mark.timeout(180)

NAMES = ("web-1", "web-2", "db-1")


class WebFleet:
    """A master serving the dashboard, its slaves, its URL and token."""

    def __init__(self, workdir: Path, master: Master, slaves: SlaveProcesses) -> None:
        self.workdir = workdir
        self.master = master
        self.sock = master.sock
        self.slaves = slaves
        self.url = (master.state_dir / "web-url").read_text().strip()
        self.base, _, self.token = self.url.partition("/?token=")
        self.port = int(self.base.rpartition(":")[2])

    def bearer(self) -> "httpx.Client":
        """A script's client: the Bearer header."""
        return httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {self.token}"},
                            timeout=WAIT)

    def anonymous(self) -> "httpx.Client":
        return httpx.Client(base_url=self.base, timeout=WAIT)

    @contextlib.contextmanager
    def browser(self) -> Iterator["httpx.Client"]:
        """A browser's session: the cookie the token URL sets."""
        with self.anonymous() as client:
            r = client.get(self.url)
            assert r.status_code == 303
            yield client


@contextlib.contextmanager
def web_fleet(workdir: Path, names: Any = NAMES, extra: Any = ()) -> Iterator[WebFleet]:
    """A master with ``--http 127.0.0.1:0`` and a slave process per name."""
    slaves = SlaveProcesses(workdir / "slaves")
    master = Master(workdir, workdir / "ctl" / "master.sock", secret_file=slaves.secret_file(SECRET),
                    extra=["--http", "127.0.0.1:0", *extra])
    try:
        master.wait_ready()
        for name in names:
            slaves.start(master.port, name, max_backoff=0.5)
        wait_names(master.sock, names)
        yield WebFleet(workdir, master, slaves)
    finally:
        master.stop()
        slaves.close()


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebFleet]:
    """One dashboard master and three slaves for the module."""
    with web_fleet(tmp_path_factory.mktemp("web")) as f:
        yield f


def detach(web: WebFleet, *argv: str, target: str = "web-1") -> str:
    r = remsh(web.sock, "run", "--detach", "-t", target, "--", *argv)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout.decode().strip()


def jobs_json(web: WebFleet) -> List[Dict[str, Any]]:
    r = remsh(web.sock, "jobs", "--json")
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout)


def job_state(web: WebFleet, job_id: str) -> str:
    with web.bearer() as c:
        return c.get(f"/api/jobs/{job_id}").json()["state"]


def sse_until(client: "httpx.Client", url: str, done: Callable[[List[Any]], bool],
              during: Optional[Callable[[List[Any]], None]] = None) -> List[Any]:
    """Read the stream at ``url`` (bounded by WAIT) until ``done(messages)``;
    ``during`` is called after each message."""
    messages: List[Any] = []
    deadline = time.monotonic() + WAIT
    with client.stream("GET", url, timeout=httpx.Timeout(WAIT)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            assert time.monotonic() < deadline, f"stream {url}: not done in time: {messages}"
            if line.startswith("data: "):
                messages.append(json.loads(line[6:]))
                if during is not None:
                    during(messages)
                if done(messages):
                    return messages
    raise AssertionError(f"stream {url} ended first: {messages}")


# -- the token ----------------------------------------------------------------------------


URLS = ["/", "/jobs", "/jobs/01m94xhj9a-0", "/api/slaves", "/api/jobs", "/api/jobs/01m94xhj9a-0",
        "/api/jobs/01m94xhj9a-0/output/web-1", "/api/live/fleet", "/api/live/jobs", "/api/live/jobs/01m94xhj9a-0",
        "/nowhere"]


def test_every_url_without_the_token_answers_401_and_nothing_else(web: WebFleet) -> None:
    """No token, a wrong token (query, cookie, Bearer, another scheme): 401, empty body, for every URL and the POST."""
    wrong = web.token[:-1] + ("A" if web.token[-1] != "A" else "B")
    attempts: List[Dict[str, Any]] = [
        {}, {"headers": {"Authorization": f"Bearer {wrong}"}}, {"headers": {"Authorization": f"Basic {web.token}"}},
        {"headers": {"Authorization": "Bearer"}}, {"headers": {"Cookie": f"{cookie_name(web.port)}={wrong}"}},
        {"params": {"token": wrong}},
    ]
    with web.anonymous() as c:
        for url in URLS:
            for kw in attempts:
                r = c.get(url, **kw)
                assert r.status_code == 401, (url, kw, r.status_code)
                assert r.content == b"" and "set-cookie" not in r.headers
        r = c.post("/api/jobs/01m94xhj9a-0/cancel")
        assert r.status_code == 401 and r.content == b""
        r = c.get("/static/common.js")  # the front end's own code, the same for everyone: no token needed
        assert r.status_code == 200 and "textContent" in r.text and "javascript" in r.headers["content-type"]
        r = c.post("/api/jobs/01m94xhj9a-0/cancel", params={"token": web.token})
        assert r.status_code == 401


def test_the_token_url_sets_a_strict_httponly_cookie_and_redirects_to_the_clean_url(web: WebFleet) -> None:
    """GET /jobs?token=T&x=1: 303 to /jobs?x=1 with an HttpOnly SameSite=Strict cookie; the cookie then opens every page."""
    with web.anonymous() as c:
        r = c.get("/jobs", params={"token": web.token, "x": "1"})
        assert r.status_code == 303 and r.headers["location"] == "/jobs?x=1"
        cookie = r.headers["set-cookie"]
        assert cookie.startswith(f"{cookie_name(web.port)}={web.token};")
        attributes = {a.strip().lower() for a in cookie.split(";")[1:]}
        assert {"httponly", "samesite=strict", "path=/"} <= attributes
        assert web.token not in r.headers["location"]
        r = c.get(f"{web.base}//evil.example/x", params={"token": web.token})
        assert r.status_code == 303 and r.headers["location"] == "/evil.example/x"
        for url in ("/", "/jobs", "/api/slaves", "/api/jobs"):
            assert c.get(url).status_code == 200, url
        page = c.get("/").text
        assert web.token not in page  # the page carries the CSRF token only
        assert csrf_token(web.token) in page


def test_a_script_uses_the_bearer_header(web: WebFleet) -> None:
    """Authorization: Bearer TOKEN opens the API, no cookie involved."""
    with web.bearer() as c:
        r = c.get("/api/slaves")
        assert r.status_code == 200 and "set-cookie" not in r.headers
        assert sorted(row["name"] for row in r.json()) == sorted(NAMES)


def test_web_url_file_is_0600_and_matches_stderr_and_remsh_web(web: WebFleet) -> None:
    """STATE_DIR/web-url is mode 0600, holds the URL printed on stderr, and remsh web prints it again."""
    path = web.master.state_dir / "web-url"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/\?token=[A-Za-z0-9_-]{40,}", web.url)
    assert f"remsh master: web dashboard at {web.url}" in web.master.text()
    r = remsh(web.sock, "web")
    assert r.returncode == 0 and r.stdout.decode() == web.url + "\n", r


# -- the API ------------------------------------------------------------------------------


def test_api_records_are_the_command_line_json(web: WebFleet) -> None:
    """/api/slaves is ls --json; /api/jobs is jobs --json; /api/jobs/ID is that job's record."""
    job_id = detach(web, "echo", "same")
    wait_until(lambda: job_state(web, job_id) != "running", WAIT, "the job to end")
    with web.bearer() as c:
        assert c.get("/api/slaves").json() == ls(web.sock)
        assert c.get("/api/jobs").json() == jobs_json(web)
        record = next(j for j in jobs_json(web) if j["id"] == job_id)
        assert c.get(f"/api/jobs/{job_id}").json() == record
        assert record["state"] == "done" and record["argv"] == ["echo", "same"]
        assert c.get("/api/jobs", params={"n": "1"}).json() == jobs_json(web)[:1]
        assert c.get("/api/jobs/01m94xhj9a-0").status_code == 404
        assert c.get("/api/jobs/not-an-id!").status_code == 404


def test_api_output_keeps_stdout_and_stderr_apart_and_exact(web: WebFleet) -> None:
    """/api/jobs/ID/output/NAME: stdout and stderr as text, and each stream's exact bytes with ?stream."""
    job_id = detach(web, "sh", "-c", r"printf 'out\n\377'; printf 'err\n' >&2")
    wait_until(lambda: job_state(web, job_id) != "running", WAIT, "the job to end")
    with web.bearer() as c:
        body = c.get(f"/api/jobs/{job_id}/output/web-1").json()
        assert body["stdout"] == "out\n\ufffd" and body["stderr"] == "err\n"
        assert body["stdout_bytes"] == 5 and body["stderr_bytes"] == 4
        r = c.get(f"/api/jobs/{job_id}/output/web-1", params={"stream": "stdout"})
        assert r.content == b"out\n\xff" and r.headers["content-type"] == "application/octet-stream"
        assert c.get(f"/api/jobs/{job_id}/output/db-1").status_code == 404


def test_api_output_is_streamed_page_by_page(web: WebFleet) -> None:
    """A big output is sent as it is read from the store (chunked, no
    Content-Length: the master holds one page per request, not the whole
    output), byte for byte; in the JSON form two-byte characters come out
    whole wherever the stored chunks cut them."""
    from remsh.web.app import OUTPUT_PAGE

    size = (OUTPUT_PAGE + 8) * 65536 * 2  # more than two pages of full chunks
    job_id = detach(web, "python3", "-c",
                    f"import sys; sys.stdout.buffer.write(b'\\xc3\\xa9' * {size // 2}); sys.stderr.write('e')")
    wait_until(lambda: job_state(web, job_id) != "running", WAIT, "the job to end")
    with web.bearer() as c:
        r = c.get(f"/api/jobs/{job_id}/output/web-1", params={"stream": "stdout"})
        assert r.status_code == 200 and "content-length" not in r.headers
        assert r.content == b"\xc3\xa9" * (size // 2)
        r = c.get(f"/api/jobs/{job_id}/output/web-1")
        assert "content-length" not in r.headers
        body = r.json()
        assert body["stdout"] == "\u00e9" * (size // 2) and body["stderr"] == "e"
        assert body["stdout_bytes"] == size and body["job"] == job_id and body["name"] == "web-1"


def _sleeper(web: WebFleet) -> str:
    job_id = detach(web, "sleep", "60")
    with web.bearer() as c:
        wait_until(lambda: c.get(f"/api/jobs/{job_id}").json()["slaves"]["web-1"]["state"] == "running",
                   WAIT, "the sleep to start")
    return job_id


def test_a_cookie_session_cannot_post_without_the_csrf_token(web: WebFleet) -> None:
    """POST cancel from a cookie session: 403 without or with a wrong X-CSRF-Token (the job runs on); with it, cancelled."""
    job_id = _sleeper(web)
    with web.browser() as c:
        assert c.post(f"/api/jobs/{job_id}/cancel").status_code == 403
        right = csrf_token(web.token)
        wrong = right[:-1] + ("1" if right.endswith("0") else "0")
        r = c.post(f"/api/jobs/{job_id}/cancel", headers={"X-CSRF-Token": wrong})
        assert r.status_code == 403
        assert c.get(f"/api/jobs/{job_id}/cancel").status_code == 405
        assert job_state(web, job_id) == "running"
        r = c.post(f"/api/jobs/{job_id}/cancel", headers={"X-CSRF-Token": csrf_token(web.token)})
        assert r.status_code == 200 and r.json() == {"id": job_id, "cancelled": True}
    wait_until(lambda: job_state(web, job_id) == "cancelled", WAIT, "the job to be cancelled")


def test_a_script_cancels_with_the_bearer_header_alone(web: WebFleet) -> None:
    """POST /api/jobs/ID/cancel with Bearer: 200, the sleep is cancelled; again: 409; unknown: 404."""
    job_id = _sleeper(web)
    with web.bearer() as c:
        r = c.post(f"/api/jobs/{job_id}/cancel")
        assert r.status_code == 200
        wait_until(lambda: job_state(web, job_id) == "cancelled", WAIT, "the job to be cancelled")
        assert c.get(f"/api/jobs/{job_id}").json()["slaves"]["web-1"]["state"] == "cancelled"
        assert c.post(f"/api/jobs/{job_id}/cancel").status_code == 409
        assert c.post("/api/jobs/01m94xhj9a-0/cancel").status_code == 404


def test_every_response_has_the_security_headers_and_no_cors(web: WebFleet) -> None:
    """CSP without inline script, nosniff, no-referrer, no-store on pages, API and 401s; no Access-Control header, even asked."""
    with web.browser() as c:
        responses = [c.get("/"), c.get("/jobs"), c.get("/api/slaves"), web.anonymous().get("/api/slaves"),
                     c.options("/api/slaves", headers={"Origin": "https://evil.example",
                                                      "Access-Control-Request-Method": "POST"}),
                     c.get("/api/slaves", headers={"Origin": "https://evil.example"})]
        for r in responses:
            csp = r.headers["content-security-policy"]
            assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
            assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["referrer-policy"] == "no-referrer"
            assert not [h for h in r.headers if h.lower().startswith("access-control-")]
        for page in ("/", "/jobs", "/jobs/01m94xhj9a-0"):
            html = c.get(page).text
            scripts = re.findall(r"<script[^>]*>", html)
            assert scripts and all(re.search(r'src="/static/[a-z]+\.js"', s) for s in scripts), scripts
            assert re.search(r"\son[a-z]+\s*=", html) is None and "style=" not in html


# -- live ---------------------------------------------------------------------------------


def test_a_job_stream_sends_output_while_the_command_runs(web: WebFleet, tmp_path: Path) -> None:
    """/api/live/jobs/ID: the first line arrives while the command still waits; the rest and done follow."""
    gate = tmp_path / "gate"
    job_id = detach(web, "sh", "-c", f"echo first; echo oops >&2; while [ ! -e {gate} ]; do sleep 0.05; done; "
                                     "echo second")

    def text(messages: List[Any], stream: str) -> str:
        return "".join(e.get("text", "") for m in messages for e in m if e["ev"] == "out" and e["stream"] == stream)

    def open_gate(messages: List[Any]) -> None:
        if "first" in text(messages, "stdout") and not gate.exists():
            assert job_state(web, job_id) == "running"
            gate.touch()

    with web.browser() as c:
        messages = sse_until(c, f"/api/live/jobs/{job_id}",
                             lambda ms: any(e["ev"] == "done" for m in ms for e in m), open_gate)
    assert text(messages, "stdout") == "first\nsecond\n" and text(messages, "stderr") == "oops\n"
    events = [e["ev"] for m in messages for e in m]
    assert events[0] == "jobrec" and events[-1] == "done" and "end" in events


def test_the_fleet_stream_shows_a_slave_that_registers_and_goes(web: WebFleet) -> None:
    """/api/live/fleet: a reset with every slave, then a new slave in a 'set', then its name in 'del' when it stops."""
    seen: Dict[str, Any] = {}

    def step(messages: List[Any]) -> None:
        last = messages[-1]
        if "reset" in last:
            assert sorted(r["name"] for r in last["reset"]) == sorted(NAMES)
            seen["new"] = web.slaves.start(web.master.port, "late-1", max_backoff=0.5)
        if any(r["name"] == "late-1" for r in last.get("set", [])) and "stopped" not in seen:
            seen["stopped"] = True
            seen["new"].popen.terminate()

    with web.browser() as c:
        sse_until(c, "/api/live/fleet", lambda ms: "late-1" in ms[-1].get("del", []), step)


def test_non_loopback_http_needs_tls_or_insecure(tmp_path: Path) -> None:
    """--http 0.0.0.0:PORT without --http-tls or --http-insecure: exit 2, one line, nothing served; --http-insecure serves."""
    argv = [sys.executable, "-m", "remsh", "master", "--control", str(tmp_path / "m.sock"), "--listen",
            "127.0.0.1:0", "--insecure", "--state-dir", str(tmp_path / "state"), "--http", "0.0.0.0:0"]
    r = subprocess.run(argv, env=_env(), capture_output=True, timeout=WAIT)
    assert r.returncode == 2
    lines = r.stderr.decode().splitlines()
    assert lines[-1].startswith("remsh: --http 0.0.0.0:0: 0.0.0.0 is not a loopback address") and \
        "--http-tls CERT KEY" in lines[-1], lines
    assert not (tmp_path / "state" / "web-url").exists()
    r = subprocess.run(argv[:-2] + ["--http-tls", "x.pem", "x.key", "--http", "0.0.0.0:0"], env=_env(),
                       capture_output=True, timeout=WAIT)
    assert r.returncode == 2 and "--http-tls: cannot read x.pem" in r.stderr.decode()
    master = Master(tmp_path, tmp_path / "m2.sock", extra=["--http", "0.0.0.0:0", "--http-insecure"])
    try:
        master.wait_ready()
        url = (master.state_dir / "web-url").read_text().strip()
        port = int(url.split("/?token=")[0].rsplit(":", 1)[1])
        with httpx.Client(timeout=WAIT) as c:
            assert c.get(f"http://127.0.0.1:{port}/api/slaves").status_code == 401
        r2 = remsh(master.sock, "web")
        assert r2.stdout.decode().strip() == url
    finally:
        assert master.stop() == 0
    assert not (master.state_dir / "web-url").exists()


def test_remsh_web_without_a_dashboard_exits_2(tmp_path: Path) -> None:
    """remsh web against a master started without --http: exit 2, one line saying so."""
    master = Master(tmp_path, tmp_path / "m.sock")
    try:
        master.wait_ready()
        r = remsh(master.sock, "web")
        assert r.returncode == 2 and r.stdout == b""
        assert r.stderr.decode() == "remsh: this master serves no web dashboard (start it with --http " \
                                    "[HOST:]PORT)\n"
    finally:
        master.stop()


# -- cost with no page open ---------------------------------------------------------------


def test_a_watch_computes_nothing_without_a_page_and_stops_when_the_last_goes() -> None:
    """A Watch never calls its rows function with no subscriber; it does with one; its thread ends after the last leaves."""
    calls = []
    computed = threading.Event()

    def rows() -> Dict[str, Dict[str, Any]]:
        calls.append(1)
        computed.set()
        return {"a": {"name": "a"}}

    watch = Watch("test", rows, 0.01)
    assert not computed.wait(0.2) and not watch.running
    loop = asyncio.new_event_loop()
    try:
        subscriber = Subscriber(loop)
        watch.subscribe(subscriber)
        assert computed.wait(WAIT) and watch.running
        watch.unsubscribe(subscriber)
        wait_until(lambda: not watch.running, WAIT, "the watch's thread to end")
        first = loop.run_until_complete(asyncio.wait_for(subscriber.queue.get(), WAIT))
        assert first == '{"reset": [{"name": "a"}]}'
    finally:
        watch.stop()
        loop.close()


def test_a_watch_makes_its_rows_again_only_when_its_signature_changes() -> None:
    """With an unchanged signature the rows are made once in many rounds (within the refresh); a new signature makes them again."""
    signature = {"value": 1, "calls": 0}
    rounds = threading.Semaphore(0)

    def sign() -> object:
        signature["calls"] += 1
        rounds.release()
        return signature["value"]

    watch = Watch("test", lambda: {"a": {"name": "a", "v": signature["value"]}}, 0.001, signature=sign, refresh=60)
    loop = asyncio.new_event_loop()
    try:
        subscriber = Subscriber(loop)
        watch.subscribe(subscriber)
        for _ in range(20):
            assert rounds.acquire(timeout=WAIT)
        assert watch.computed == 1
        signature["value"] = 2
        wait_until(lambda: watch.computed == 2, WAIT, "the rows to be made again")
        messages = [loop.run_until_complete(asyncio.wait_for(subscriber.queue.get(), WAIT)) for _ in range(2)]
        assert messages == ['{"reset": [{"name": "a", "v": 1}]}', '{"set": [{"name": "a", "v": 2}], "del": []}']
    finally:
        watch.stop()
        loop.close()


def test_a_put_reports_its_progress_on_the_job_stream(web: WebFleet, tmp_path: Path) -> None:
    """A put's stream carries progress events per slave, ending with done == total == the file's size."""
    src = tmp_path / "blob"
    src.write_bytes(os.urandom(300_000))
    r = remsh(web.sock, "put", "--detach", "-t", "web-*", str(src), "blob")
    assert r.returncode == 0, r.stderr.decode()
    job_id = r.stdout.decode().strip()
    with web.browser() as c:
        messages = sse_until(c, f"/api/live/jobs/{job_id}", lambda ms: any(e["ev"] == "done" for m in ms for e in m))
    progress = [e for m in messages for e in m if e["ev"] == "progress"]
    for name in ("web-1", "web-2"):
        last = [e for e in progress if e["slave"] == name][-1]
        assert last["done"] == last["total"] == 300_000, progress


def test_the_master_stops_promptly_with_pages_open(tmp_path: Path) -> None:
    """SIGTERM with a fleet stream and a job stream open: the master exits 0 within the bound, the streams end."""
    with web_fleet(tmp_path, names=("s-1",)) as f:
        job_id = detach(f, "sleep", "60", target="s-1")
        connected: List[str] = []
        ended: List[str] = []

        def read(url: str) -> None:
            with f.browser() as c:
                with c.stream("GET", url, timeout=httpx.Timeout(WAIT)) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: ") and url not in connected:
                            connected.append(url)
            ended.append(url)

        readers = [threading.Thread(target=read, args=(u,), daemon=True)
                   for u in ("/api/live/fleet", f"/api/live/jobs/{job_id}")]
        for t in readers:
            t.start()
        wait_until(lambda: len(connected) == 2, WAIT, "both streams to send their first message")
        started = time.monotonic()
        assert f.master.stop() == 0
        assert time.monotonic() - started < WAIT
        for t in readers:
            t.join(WAIT)
        assert len(ended) == 2


def test_a_watch_makes_its_rows_again_after_the_refresh_whatever_the_signature() -> None:
    """An unchanged signature does not hide a change for longer than the refresh interval."""
    state = {"v": 1}
    watch = Watch("test", lambda: {"a": {"name": "a", "v": state["v"]}}, 0.001, signature=lambda: 0, refresh=0.05)
    loop = asyncio.new_event_loop()
    try:
        subscriber = Subscriber(loop)
        watch.subscribe(subscriber)
        assert loop.run_until_complete(asyncio.wait_for(subscriber.queue.get(), WAIT)) == \
            '{"reset": [{"name": "a", "v": 1}]}'
        state["v"] = 2
        assert loop.run_until_complete(asyncio.wait_for(subscriber.queue.get(), WAIT)) == \
            '{"set": [{"name": "a", "v": 2}], "del": []}'
    finally:
        watch.stop()
        loop.close()


def test_http_tls_serves_https_with_a_secure_cookie_and_refuses_a_bad_certificate(tmp_path: Path) -> None:
    """--http 0.0.0.0:0 --http-tls CERT KEY: HTTPS verified against the CA, the cookie Secure; a bad certificate: exit 2."""
    pki = make_pki(tmp_path / "pki")
    master = Master(tmp_path, tmp_path / "m.sock",
                    extra=["--http", "0.0.0.0:0", "--http-tls", str(pki.cert), str(pki.key)])
    try:
        master.wait_ready()
        url = (master.state_dir / "web-url").read_text().strip()
        assert url.startswith("https://")
        port = int(url.split("/?token=")[0].rsplit(":", 1)[1])
        token = url.split("/?token=")[1]
        base = f"https://127.0.0.1:{port}"
        with httpx.Client(verify=ssl.create_default_context(cafile=str(pki.ca)), timeout=WAIT) as c:
            r = c.get(f"{base}/", params={"token": token})
            assert r.status_code == 303
            assert {"secure", "httponly", "samesite=strict"} <= {a.strip().lower() for a in
                                                                 r.headers["set-cookie"].split(";")[1:]}
            assert c.get(f"{base}/api/slaves", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        with httpx.Client(timeout=WAIT) as plain:
            with pytest.raises(httpx.HTTPError):
                plain.get(f"http://127.0.0.1:{port}/api/slaves")
    finally:
        assert master.stop() == 0
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    r = subprocess.run([sys.executable, "-m", "remsh", "master", "--control", str(tmp_path / "m3.sock"), "--listen",
                        "127.0.0.1:0", "--insecure", "--state-dir", str(tmp_path / "state3"), "--http", "127.0.0.1:0",
                        "--http-tls", str(bad), str(pki.key)], env=_env(), capture_output=True, timeout=WAIT)
    assert r.returncode == 2
    assert r.stderr.decode().splitlines()[-1].startswith("remsh: cannot serve the dashboard on 127.0.0.1:")
