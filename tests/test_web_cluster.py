"""The dashboard's fleet page on masters sharing a PostgreSQL store: its
live feed (``/api/live/fleet``) and its page list every slave of the
cluster with the master holding it, and another master's slaves update
without a reload.  Two real ``remsh master --http`` processes on one real
PostgreSQL server (tests/pgserver.py), real slave processes on each;
httpx reads the SSE feed, headless Chromium the page (when there)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

if not os.environ.get("CI"):  # under CI the extra must be there: the imports below fail loudly
    pytest.importorskip("httpx", reason="the web tests need httpx")
    pytest.importorskip("starlette", reason="the web dashboard needs Starlette")

import httpx  # noqa: E402

from remsh.store.postgres import LEASE  # noqa: E402
from tests.pgserver import pg_server  # noqa: E402,F401 - fixture
from tests.slaveproc import SECRET, WAIT, SlaveProcesses  # noqa: E402
from tests.test_fleet import Master, stop_all  # noqa: E402
from tests.test_store_postgres_masters import store_uri  # noqa: E402,F401 - fixture
from tests.test_web import WebFleet  # noqa: E402

pytestmark = pytest.mark.timeout(180)

Rows = Dict[str, Dict[str, Any]]


class Cluster:
    """Masters ``a`` and ``b`` with dashboards on one store, slave ``s-a`` on a and ``s-b`` on b."""

    def __init__(self, a: WebFleet, b: WebFleet, slaves: SlaveProcesses) -> None:
        self.a, self.b, self.slaves = a, b, slaves


@pytest.fixture
def cluster(tmp_path: Path, store_uri: str) -> Iterator[Cluster]:  # noqa: F811 - fixture
    slaves = SlaveProcesses(tmp_path / "slaves")
    secret = slaves.secret_file(SECRET)
    masters: List[Master] = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            masters.append(Master(tmp_path / name, tmp_path / name / "m.sock", secret_file=secret,
                                  extra=["--store", store_uri, "--name", name, "--http", "127.0.0.1:0"]).wait_ready())
        for master, slave in zip(masters, ("s-a", "s-b")):
            slaves.start(master.port, slave, max_backoff=0.5)
        webs = [WebFleet(tmp_path / m, master, slaves) for m, master in zip("ab", masters)]
        yield Cluster(webs[0], webs[1], slaves)
    finally:
        stop_all(masters)
        slaves.close()


def sse_until(client: "httpx.Client", url: str, done: Callable[[List[Any]], bool],
              during: Optional[Callable[[List[Any]], None]] = None, within: float = WAIT) -> List[Any]:
    """The messages of the stream at ``url`` until ``done(messages)`` (bounded by
    ``within`` seconds); ``during`` is called after each message."""
    messages: List[Any] = []
    deadline = time.monotonic() + within
    with client.stream("GET", url, timeout=httpx.Timeout(WAIT)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():  # a keep-alive comment comes every 10 s at the latest
            assert time.monotonic() < deadline, f"stream {url}: not done in time: {messages}"
            if line.startswith("data: "):
                messages.append(json.loads(line[6:]))
                if during is not None:
                    during(messages)
                if done(messages):
                    return messages
    raise AssertionError(f"stream {url} ended first: {messages}")


def apply(messages: List[Any]) -> Rows:
    """The rows a page holds after ``messages`` (reset, set, del)."""
    rows: Rows = {}
    for m in messages:
        if "reset" in m:
            rows = {r["name"]: r for r in m["reset"]}
        for r in m.get("set", []):
            rows[r["name"]] = r
        for name in m.get("del", []):
            rows.pop(name, None)
    return rows


def held(rows: Rows) -> Dict[str, List[Optional[str]]]:
    """Slave name -> [master, state]."""
    return {name: [r.get("master"), r.get("state")] for name, r in rows.items()}


def test_the_fleet_feed_lists_the_other_masters_slaves_and_one_that_appears_there(cluster: Cluster) -> None:
    """m1's SSE fleet feed lists m2's slave with master b, and a slave that connects to m2 shows on it without a new request."""
    started = threading.Event()

    def start_new_one(messages: List[Any]) -> None:
        if not started.is_set() and held(apply(messages)) == {"s-a": ["a", "idle"], "s-b": ["b", "idle"]}:
            started.set()
            cluster.slaves.start(cluster.b.master.port, "s-c", max_backoff=0.5)

    with cluster.a.bearer() as c:
        messages = sse_until(c, "/api/live/fleet", lambda ms: held(apply(ms)).get("s-c") == ["b", "idle"],
                             during=start_new_one)
    assert started.is_set()
    assert held(apply(messages)) == {"s-a": ["a", "idle"], "s-b": ["b", "idle"], "s-c": ["b", "idle"]}
    assert "reset" in messages[0] and all("reset" not in m for m in messages[1:])  # one stream, updated in place
    row = apply(messages)["s-c"]
    assert row["transport"] == "tcp" and row["peer"].startswith("127.0.0.1:")  # the row ls --json gives
    with cluster.a.bearer() as c:
        assert {r["name"]: r["master"] for r in c.get("/api/slaves").json()} == {"s-a": "a", "s-b": "b", "s-c": "b"}


def test_another_masters_slave_going_away_shows_away_in_the_feed(cluster: Cluster) -> None:
    """m2's slave killed: m1's fleet feed turns it away, still held by b, and leaves m1's own slave alone."""
    def kill_once(messages: List[Any]) -> None:
        if held(apply(messages)).get("s-b") == ["b", "idle"]:
            proc = next(p for p in cluster.slaves.procs if p.name == "s-b")
            if proc.poll() is None:
                proc.signal(signal.SIGKILL)
                proc.wait()

    with cluster.a.bearer() as c:
        messages = sse_until(c, "/api/live/fleet", lambda ms: held(apply(ms)).get("s-b") == ["b", "away"],
                             during=kill_once)
    assert held(apply(messages))["s-a"] == ["a", "idle"]


def test_a_killed_masters_slave_leaves_the_feed_once_its_lease_is_past(cluster: Cluster) -> None:
    """m2 SIGKILLed: its slave leaves m1's fleet feed once m2's heartbeat is past the lease (no write announces it)."""
    killed: List[float] = []

    def kill_once(messages: List[Any]) -> None:
        if not killed and held(apply(messages)).get("s-b") == ["b", "idle"]:
            cluster.b.master.stop(signal.SIGKILL)
            killed.append(time.monotonic())

    with cluster.a.bearer() as c:
        messages = sse_until(c, "/api/live/fleet", lambda ms: bool(killed) and "s-b" not in apply(ms),
                             during=kill_once, within=LEASE + WAIT)
    assert time.monotonic() - killed[0] >= LEASE - 4.0  # dropped for the lease, not for the kill being seen
    assert held(apply(messages)) == {"s-a": ["a", "idle"]}
    assert any("s-b" in m.get("del", []) for m in messages)  # deleted in place, not by a reset


def test_the_fleet_page_names_this_master_for_its_script(cluster: Cluster) -> None:
    """The fleet page carries this master's name (meta master) and a Master column; a single master's is empty."""
    with cluster.a.browser() as c:
        page = c.get("/").text
    assert '<meta name="master" content="a">' in page
    assert 'class="f-master"' in page


CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Chromium through the system's chromedriver (skipped without it, unless under CI)."""
    if not os.path.exists(CHROMIUM) and not os.environ.get("CI"):
        pytest.skip(f"no {CHROMIUM} and not under CI")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="remsh-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                f"--user-data-dir={profile}", "--window-size=1280,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_the_fleet_page_in_a_browser_shows_the_cluster_with_a_master_column(cluster: Cluster, browser: Any) -> None:
    """Chromium on m1's fleet page: m2's slave in the Master column marked remote; a new slave of m2 appears without reload."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def until(predicate: Any, what: str) -> None:
        WebDriverWait(browser, WAIT).until(predicate, f"timed out waiting for {what}")

    def masters(d: Any) -> Dict[str, str]:
        out = {}
        for row in d.find_elements(By.CSS_SELECTOR, "#slaves .row"):
            remote = "*" if "remote" in (row.get_attribute("class") or "").split() else ""
            out[row.find_element(By.CSS_SELECTOR, ".f-name").text] = row.find_element(By.CSS_SELECTOR,
                                                                                      ".f-master").text + remote
        return out

    browser.get(cluster.a.url)
    until(lambda d: d.current_url == cluster.a.base + "/", "the redirect to the clean URL")
    until(lambda d: masters(d) == {"s-a": "a", "s-b": "b*"}, "both masters' slaves, b's marked remote")
    assert browser.find_element(By.CSS_SELECTOR, ".row.head .f-master").is_displayed()
    browser.execute_script("window.__same_page = true")
    cluster.slaves.start(cluster.b.master.port, "s-c", max_backoff=0.5)
    until(lambda d: masters(d).get("s-c") == "b*", "the new slave of m2")
    assert browser.execute_script("return window.__same_page") is True
