"""The dashboard's Starlette application: its guard, its pages, its API.

Security (every rule is here, in :class:`Guard`, in front of every route):

- every request but the static files (``/static/...``: the front end's own
  code, the same for everyone) needs the token: ``?token=T`` on a page
  sets an ``HttpOnly; SameSite=Strict`` cookie and redirects to the same
  URL without it (so the token leaves the address bar, the history and any
  ``Referer``); scripts send ``Authorization: Bearer T``.  Otherwise: 401,
  an empty body, nothing else said.  Tokens are compared with
  :func:`hmac.compare_digest`;
- a request that changes something (``POST``) from a cookie session needs
  the ``X-CSRF-Token`` header with the page's CSRF token (an HMAC of the
  token, in the page's ``<meta name="csrf">``).  Another site can neither
  read that token nor send the header (no CORS: no ``Access-Control-*``
  header is ever sent, so the browser refuses the preflight); a request
  with the Bearer header proves itself and needs none;
- every response says ``Content-Security-Policy`` with scripts from this
  origin only (no inline script, no ``eval``), ``frame-ancestors 'none'``,
  ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: no-referrer``,
  ``Cache-Control: no-store``;
- the pages hold no slave or command text: their scripts fetch it as JSON
  and write it with ``textContent``, never as HTML.
"""

from __future__ import annotations

import asyncio
import codecs
import hashlib
import hmac
import html
import json
import os
from typing import Any, Awaitable, Callable, Dict, Iterator, MutableMapping, Optional, Protocol
from urllib.parse import parse_qsl, urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from remsh.errors import UsageError
from remsh.jobs import JobEnded, JobRegistry
from remsh.store.base import UnknownJob, check_job_id
from remsh.web.live import FLEET_INTERVAL, JOBS_INTERVAL, Followers, Subscriber, Watch
from remsh.fleet import FleetCollection
from remsh.web.records import fleet_rows, fleet_signature, job_rows, slave_rows

HERE = os.path.dirname(os.path.abspath(__file__))
STATIC = os.path.join(HERE, "static")
PAGES = os.path.join(HERE, "pages")

#: The cookie the token URL sets: this name, then ``_PORT`` (:func:`cookie_name`).
COOKIE = "remsh_token"
#: The header of the CSRF token.
CSRF_HEADER = "x-csrf-token"
#: Every response's security headers.
SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
     b"base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]
#: Most bytes of each stream of a slave's output one ``/api/jobs/ID/output/NAME`` returns
#: (the store keeps at most ``--max-job-output`` anyway).
MAX_OUTPUT_READ = 256 << 20
#: Stored chunks read at a time for that reply: it is streamed page by page,
#: so a request holds one page (at most this many chunks of 64 KiB) however
#: big the output, and many requests cannot exhaust the master's memory.
OUTPUT_PAGE = 16


def _stored(store: Any, job_id: str, name: str, stream: str) -> Iterator[bytes]:
    """The stored bytes of one of a slave's streams, a page at a time."""
    seq, total = -1, 0
    while total < MAX_OUTPUT_READ:
        chunks = store.read_output(job_id, name, after=seq, limit=OUTPUT_PAGE)
        if not chunks:
            return
        for _, chunk in chunks:
            seq = chunk.seq
            if chunk.stream == stream:
                total += len(chunk.data)
                yield chunk.data


def _stored_json(store: Any, job_id: str, name: str, head: Dict[str, Any]) -> Iterator[bytes]:
    """``head`` and both streams as one JSON object (UTF-8, bad bytes
    replaced), written as it is read."""
    yield json.dumps(head)[:-1].encode("ascii")
    for stream in ("stdout", "stderr"):
        yield f', "{stream}": "'.encode("ascii")
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        for piece in _stored(store, job_id, name, stream):
            yield json.dumps(decoder.decode(piece))[1:-1].encode("ascii")
        yield json.dumps(decoder.decode(b"", final=True))[1:-1].encode("ascii") + b'"'
    yield b"}"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Master(Protocol):
    """What the dashboard needs of the master: its fleet and its jobs."""

    @property
    def collection(self) -> FleetCollection: ...

    @property
    def jobs(self) -> Optional[JobRegistry]: ...


def csrf_token(token: str) -> str:
    """The CSRF token of a session on ``token``."""
    return hmac.new(token.encode(), b"remsh-web-csrf", hashlib.sha256).hexdigest()


def cookie_name(port: Optional[int]) -> str:
    """The name of the token's cookie for a dashboard on ``port``.

    A browser keeps cookies by host, not by port: under one name, the
    dashboards of two masters on one host would replace each other's token
    (opening one logs the other's pages out).  Every other web server on
    the host receives it either way: the token is only as private as the
    host's loopback interface (docs/web.rst)."""
    return COOKIE if port is None else f"{COOKIE}_{port}"


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode())


class Guard:
    """The ASGI middleware in front of everything (see the module
    docstring): authentication, CSRF, security headers."""

    def __init__(self, app: ASGIApp, token: str, secure: bool) -> None:
        self.app = app
        self.token = token
        self.csrf = csrf_token(token)
        self.secure = secure

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        path: str = scope["path"]
        if path.startswith("/static/"):
            await self.app(scope, receive, send_with_headers)
            return
        request = Request(scope)
        cookie_key = cookie_name((scope.get("server") or (None, None))[1])
        method = scope["method"]
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        given = [v for k, v in query if k == "token"]
        if given:
            if method != "GET" or len(given) != 1 or not _same(given[0], self.token):
                await _unauthorized(send_with_headers)
                return
            rest = urlencode([(k, v) for k, v in query if k != "token"])
            clean = "/" + path.lstrip("/")  # never //host: a redirect stays on this server
            response = RedirectResponse(clean + ("?" + rest if rest else ""), status_code=303)
            response.set_cookie(cookie_key, self.token, httponly=True, samesite="strict", secure=self.secure, path="/")
            await response(scope, receive, send_with_headers)
            return
        authorization = request.headers.get("authorization")
        if authorization is not None:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() != "bearer" or not _same(value.strip(), self.token):
                await _unauthorized(send_with_headers)
                return
            by_script = True
        else:
            cookie = request.cookies.get(cookie_key)
            if cookie is None or not _same(cookie, self.token):
                await _unauthorized(send_with_headers)
                return
            by_script = False
        if method not in ("GET", "HEAD") and not by_script:
            if not _same(request.headers.get(CSRF_HEADER, ""), self.csrf):
                await Response(b"", status_code=403)(scope, receive, send_with_headers)
                return
        await self.app(scope, receive, send_with_headers)


async def _unauthorized(send: Send) -> None:
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-length", b"0"), (b"www-authenticate", b"Bearer")]})
    await send({"type": "http.response.body", "body": b""})


class Dashboard:
    """The routes over one master; :meth:`app` is the ASGI application."""

    def __init__(self, master: Master, token: str, *, secure: bool = False) -> None:
        self.master = master
        self.token = token
        self.secure = secure
        self.followers = Followers()
        self.fleet_watch: Optional[Watch] = None
        self.jobs_watch: Optional[Watch] = None
        self._pages: Dict[str, str] = {}
        for name in ("fleet", "jobs", "job"):
            with open(os.path.join(PAGES, f"{name}.html"), encoding="utf-8") as f:
                self._pages[name] = f.read().replace("{{csrf}}", csrf_token(token))

    @property
    def registry(self) -> JobRegistry:
        jobs = self.master.jobs
        if jobs is None:
            raise UsageError("the master is stopping")
        return jobs

    def close(self, timeout: float = 5.0) -> None:
        """End every live stream (the server is stopping): the watches'
        threads and the job followers stop, the pages' streams end."""
        self.followers.stop()
        for watch in (self.fleet_watch, self.jobs_watch):
            if watch is not None:
                watch.stop(timeout)

    def _fleet_watch(self) -> Watch:
        if self.fleet_watch is None:
            fleet, store = self.master.collection, self.registry.store
            self.fleet_watch = Watch("fleet", lambda: fleet_rows(fleet), FLEET_INTERVAL,
                                     signature=lambda: fleet_signature(fleet, store))
        return self.fleet_watch

    def _jobs_watch(self) -> Watch:
        if self.jobs_watch is None:
            store = self.registry.store
            state = {"version": store.version()}

            def wait(timeout: float) -> None:
                state["version"] = store.wait_change(state["version"], timeout)

            self.jobs_watch = Watch("jobs", lambda: job_rows(store), JOBS_INTERVAL, wait=wait)
        return self.jobs_watch

    def app(self) -> ASGIApp:
        routes = [
            Route("/", self.page_fleet),
            Route("/jobs", self.page_jobs),
            Route("/jobs/{id}", self.page_job),
            Route("/api/slaves", self.api_slaves),
            Route("/api/jobs", self.api_jobs),
            Route("/api/jobs/{id}", self.api_job),
            Route("/api/jobs/{id}/output/{name}", self.api_output),
            Route("/api/jobs/{id}/cancel", self.api_cancel, methods=["POST"]),
            Route("/api/live/fleet", self.live_fleet),
            Route("/api/live/jobs", self.live_jobs),
            Route("/api/live/jobs/{id}", self.live_job),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]
        return Guard(Starlette(routes=routes), self.token, self.secure)

    # -- pages ---------------------------------------------------------------------

    def _page(self, name: str) -> Response:
        page = self._pages[name]
        if "{{master}}" in page:  # the fleet page tells this master's slaves from the others'
            page = page.replace("{{master}}", html.escape(self._master_name()))
        return Response(page, media_type="text/html; charset=utf-8")

    def _master_name(self) -> str:
        """This master's name on a shared store (empty with one master)."""
        jobs = self.master.jobs
        return str(getattr(jobs.store, "name", "") or "") if jobs is not None else ""

    async def page_fleet(self, request: Request) -> Response:
        return self._page("fleet")

    async def page_jobs(self, request: Request) -> Response:
        return self._page("jobs")

    async def page_job(self, request: Request) -> Response:
        if _job_id(request) is None:
            return _error(404, "not a job id")
        return self._page("job")

    # -- the JSON API --------------------------------------------------------------

    def api_slaves(self, request: Request) -> Response:
        return JSONResponse(slave_rows(self.master.collection))

    def api_jobs(self, request: Request) -> Response:
        limit: Optional[int] = None
        if "n" in request.query_params:
            try:
                limit = int(request.query_params["n"])
            except ValueError:
                limit = 0
            if limit < 1:
                return _error(400, "n must be a positive integer")
        running = request.query_params.get("running") in ("1", "true", "yes")
        records = self.registry.store.list_jobs(running=running, limit=limit)
        return JSONResponse([r.to_json() for r in records])

    def api_job(self, request: Request) -> Response:
        job_id = _job_id(request)
        if job_id is None:
            return _error(404, "not a job id")
        try:
            return JSONResponse(self.registry.store.get_job(job_id).to_json())
        except UnknownJob as e:
            return _error(404, str(e))

    def api_output(self, request: Request) -> Response:
        """A slave's stored output: ``{"stdout": TEXT, "stderr": TEXT}``
        (UTF-8, bad bytes replaced) with the byte counts, or with
        ``?stream=stdout|stderr`` that stream's exact bytes."""
        job_id = _job_id(request)
        name = request.path_params["name"]
        if job_id is None:
            return _error(404, "not a job id")
        stream = request.query_params.get("stream")
        if stream not in (None, "stdout", "stderr"):
            return _error(400, "stream must be stdout or stderr")
        store = self.registry.store
        try:
            record = store.get_job(job_id)
        except UnknownJob as e:
            return _error(404, str(e))
        rec = record.slaves.get(name)
        if rec is None:
            return _error(404, f"job {job_id} did not run on {name!r}")
        if stream is not None:
            return StreamingResponse(_stored(store, job_id, name, stream), media_type="application/octet-stream",
                                     headers={"content-disposition": "attachment"})
        head = {"job": job_id, "name": name, "stdout_bytes": rec.stdout_bytes,
                "stderr_bytes": rec.stderr_bytes, "truncated": rec.truncated}
        return StreamingResponse(_stored_json(store, job_id, name, head), media_type="application/json")

    def api_cancel(self, request: Request) -> Response:
        job_id = _job_id(request)
        if job_id is None:
            return _error(404, "not a job id")
        try:
            self.registry.cancel(job_id, "cancelled from the web dashboard")
        except UnknownJob as e:
            return _error(404, str(e))
        except JobEnded as e:
            return _error(409, str(e))
        return JSONResponse({"id": job_id, "cancelled": True})

    # -- live updates --------------------------------------------------------------

    async def _watch_stream(self, watch: Watch) -> Response:
        subscriber = Subscriber(asyncio.get_running_loop())
        watch.subscribe(subscriber)

        async def stream() -> Any:
            try:
                async for text in subscriber.messages():
                    yield text
            finally:
                watch.unsubscribe(subscriber)

        return _sse(stream())

    async def live_fleet(self, request: Request) -> Response:
        return await self._watch_stream(self._fleet_watch())

    async def live_jobs(self, request: Request) -> Response:
        return await self._watch_stream(self._jobs_watch())

    async def live_job(self, request: Request) -> Response:
        job_id = _job_id(request)
        if job_id is None:
            return _error(404, "not a job id")
        subscriber = Subscriber(asyncio.get_running_loop())
        if not self.followers.start(self.registry.store, job_id, subscriber):
            return _error(503, "too many job pages are open; try again")

        async def stream() -> Any:
            try:
                async for text in subscriber.messages():
                    yield text
            finally:
                subscriber.closed = True

        return _sse(stream())


def _sse(stream: Any) -> Response:
    return StreamingResponse(stream, media_type="text/event-stream",
                             headers={"x-accel-buffering": "no"})


def _job_id(request: Request) -> Optional[str]:
    try:
        return check_job_id(request.path_params["id"])
    except UsageError:
        return None


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)
