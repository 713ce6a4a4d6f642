"""The dashboard's HTTP server inside the master process.

uvicorn serves the Starlette application (:mod:`remsh.web.app`) on a
thread of its own, with its own event loop: the master's threads (slaves,
jobs, the control socket) are untouched, and the server shares nothing
with them but the collection and the job store, which are thread-safe.
The socket is bound here, before the thread starts, so that a port in
use is an error of ``remsh master`` at once, and ``--http HOST:0`` works.

Why Starlette and uvicorn: a small, typed, well-kept ASGI toolkit with
streaming responses (Server-Sent Events need nothing more) and static
files, on a widely deployed server with TLS; together a few pure-Python
packages, nothing compiled, no template engine or ORM the dashboard does
not need.  aiohttp would do too, at the cost of its C extensions and a
larger surface.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import threading
from typing import Optional

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from remsh.errors import LocalError
from remsh.web.app import Dashboard, Master
from remsh.web.config import HttpConfig

log = logging.getLogger(__name__)

#: Bound on the server's start and stop.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
#: Most connections open at once: beyond it a new one is closed at once.
MAX_CONNECTIONS = 128
#: Seconds a connection may take to send a whole request (its first, or the
#: next once a response is complete) before it is closed.
REQUEST_TIMEOUT = 10.0


class BoundedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 connection with two bounds it lacks: at most
    :data:`MAX_CONNECTIONS` at once, and :data:`REQUEST_TIMEOUT` seconds
    for a request's head to arrive.  Without them anyone who can reach the
    port (no token needed: nothing is read yet) holds connections open for
    ever, each a descriptor of the master's own process, until the master
    can accept no slave.  A long response (a live stream) is not limited:
    its request came in time."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        if len(self.connections) > MAX_CONNECTIONS:
            log.debug("web dashboard: %d connections open, closing a new one", len(self.connections) - 1)
            self.transport.close()
            return
        self._expect_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._expect_request()

    def _expect_request(self) -> None:
        last = self.cycle
        self.loop.call_later(REQUEST_TIMEOUT, self._request_late, last)

    def _request_late(self, last: object) -> None:
        cycle = self.cycle
        if cycle is last and (cycle is None or cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()  # no (whole) request since it was due (a pipelined one may be running)


class WebError(LocalError):
    """The dashboard cannot be served (the address is in use, the
    certificate cannot be loaded)."""


class WebServer:
    """The dashboard of one master: :meth:`start`, then :attr:`url`;
    :meth:`stop` (idempotent)."""

    def __init__(self, config: HttpConfig, master: Master, token: Optional[str] = None) -> None:
        self.config = config
        self.token = token or secrets.token_urlsafe(32)
        self.dashboard = Dashboard(master, self.token, secure=config.tls is not None)
        self.port = config.port
        self._server: Optional[uvicorn.Server] = None
        self._thread: Optional[threading.Thread] = None
        self._failure: Optional[BaseException] = None

    @property
    def url(self) -> str:
        """The URL to open, token included."""
        scheme = "https" if self.config.tls else "http"
        host = self.config.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.getfqdn()
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{self.port}/?token={self.token}"

    def start(self) -> None:
        """Bind, then serve on a thread of its own.

        :raises WebError: the address cannot be bound, or the server does
            not start (a bad certificate)
        """
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.config.host, self.config.port))
            sock.listen(128)
        except OSError as e:
            sock.close()
            raise WebError(f"cannot serve the dashboard on {self.config.host}:{self.config.port}: "
                           f"{e.strerror or e}") from None
        self.port = sock.getsockname()[1]
        tls = self.config.tls
        config = uvicorn.Config(self.dashboard.app(), lifespan="off", access_log=False, log_level="warning",
                                server_header=False, date_header=False, timeout_graceful_shutdown=2,
                                http=BoundedH11Protocol,
                                ssl_certfile=tls[0] if tls else None, ssl_keyfile=tls[1] if tls else None)
        server = self._server = uvicorn.Server(config)

        def serve() -> None:
            try:
                asyncio.run(server.serve(sockets=[sock]))
            except BaseException as e:  # noqa: BLE001 - reported to start() or logged
                self._failure = e
                if server.started:
                    log.error("the web dashboard stopped: %s", e)
            finally:
                sock.close()

        self._thread = threading.Thread(target=serve, name="remsh-web", daemon=True)
        self._thread.start()
        deadline = START_TIMEOUT
        step = 0.02
        while not server.started and self._thread.is_alive() and deadline > 0:
            self._thread.join(step)
            deadline -= step
        if not server.started:
            self.stop()
            why = self._failure or "it did not start in time"
            raise WebError(f"cannot serve the dashboard on {self.config.host}:{self.port}: {why}")
        log.info("web dashboard on %s:%d", self.config.host, self.port)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop serving: the live streams end, the thread is joined (bounded)."""
        self.dashboard.close(timeout)
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
