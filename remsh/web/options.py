"""The dashboard's command-line side: ``remsh master --http [HOST:]PORT
[--http-tls CERT KEY | --http-insecure]``, the ``STATE_DIR/web-url`` file
and ``remsh web``.

Standard library only, so that ``remsh master --help`` and ``remsh web``
work without the ``remsh[web]`` extra; the server itself
(:mod:`remsh.web.server`) is imported only when ``--http`` is given.

Listening beyond the loopback interface puts the token on the network, so
it needs TLS (``--http-tls``) or an explicit ``--http-insecure``.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from typing import Any, Callable, Optional, Tuple

from remsh.control import ControlError, make_private_directory
from remsh.errors import UsageError
from remsh.web.config import HttpConfig

log = logging.getLogger(__name__)

#: The host ``--http PORT`` listens on.
DEFAULT_HOST = "127.0.0.1"
#: The file in the state directory that holds the dashboard's URL and token.
WEB_URL_FILE = "web-url"


def add_http_options(p: argparse.ArgumentParser) -> None:
    """The master's dashboard options."""
    g = p.add_argument_group("web dashboard")
    g.add_argument("--http", metavar="[HOST:]PORT",
                   help="serve the live web dashboard on HOST:PORT (host default 127.0.0.1); its URL, with an "
                        "access token, goes to STATE_DIR/web-url and stderr (needs remsh[web])")
    g.add_argument("--http-tls", nargs=2, metavar=("CERT", "KEY"),
                   help="serve the dashboard over HTTPS with this certificate chain and key (PEM files)")
    g.add_argument("--http-insecure", action="store_true",
                   help="allow plain HTTP on an address other than the loopback interface")


def add_web_parser(sub: "argparse._SubParsersAction[Any]") -> None:
    """The ``remsh web`` subcommand."""
    sub.add_parser("web", help="print the master's web dashboard URL (with its access token)",
                   description="Print the URL of the running master's web dashboard, with its access token "
                               "(the master must run with --http).  Exit 2 when it serves none.")


def parse_http(spec: str) -> Tuple[str, int]:
    """``PORT``, ``HOST:PORT`` or ``[IPV6]:PORT`` as ``(host, port)``.

    :raises UsageError: not one of those, or a port outside 0-65535
    """
    host, sep, port_text = spec.rpartition(":")
    if not sep:
        host = DEFAULT_HOST
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif not host or ":" in host:
        raise UsageError(f"--http: not [HOST:]PORT: {spec!r} (an IPv6 address goes in brackets)")
    try:
        port = int(port_text)
    except ValueError:
        raise UsageError(f"--http: not a port number: {port_text!r}") from None
    if not 0 <= port <= 65535:
        raise UsageError(f"--http: port out of range: {port}")
    return host, port


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def http_config(args: argparse.Namespace) -> Optional[HttpConfig]:
    """The dashboard the options ask for, or ``None`` without ``--http``.

    :raises UsageError: a bad ``--http``; TLS options without it; a
        non-loopback address with neither ``--http-tls`` nor
        ``--http-insecure``; unreadable certificate files
    """
    spec = getattr(args, "http", None)
    tls = getattr(args, "http_tls", None)
    insecure = bool(getattr(args, "http_insecure", False))
    if spec is None:
        if tls or insecure:
            raise UsageError("--http-tls and --http-insecure go with --http")
        return None
    host, port = parse_http(spec)
    if tls:
        for path in tls:
            if not os.access(path, os.R_OK):
                raise UsageError(f"--http-tls: cannot read {path}")
    if not is_loopback(host) and not tls and not insecure:
        raise UsageError(f"--http {spec}: {host} is not a loopback address; serving the dashboard there needs "
                         "--http-tls CERT KEY (or --http-insecure for plain HTTP)")
    return HttpConfig(host, port, (tls[0], tls[1]) if tls else None, insecure)


def write_web_url(state_dir: str, url: str) -> str:
    """Write ``url`` to ``STATE_DIR/web-url``, mode 0600 from its first byte
    (a new file renamed over the old one: never a link followed, never a
    moment with wider permissions).  Returns the path.

    :raises OSError: it cannot be written
    """
    path = os.path.join(state_dir, WEB_URL_FILE)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (url + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def remove_web_url(state_dir: str, url: str) -> None:
    """Remove ``STATE_DIR/web-url`` if it still holds ``url`` (a stopped
    master's token is no use to anyone)."""
    path = os.path.join(state_dir, WEB_URL_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            if f.read().strip() != url:
                return
        os.unlink(path)
    except OSError:
        pass


def start_dashboard(args: argparse.Namespace, master: Any,
                    state_dir: str) -> Tuple[Optional[str], Callable[[], None]]:
    """Serve the dashboard ``args`` ask for (``--http``) on ``master`` (the
    control server: its collection and jobs), write ``STATE_DIR/web-url``,
    and tell the control server (for ``remsh web``).  Returns the URL with
    its token (``None`` without ``--http``: the caller says where it is) and
    what stops it all.

    :raises UsageError: bad options, a missing ``remsh[web]`` extra, an
        address that cannot be served, a web-url file that cannot be written
    """
    config = http_config(args)
    if config is None:
        return None, lambda: None
    try:
        from remsh.web.server import WebError, WebServer
    except ImportError as e:
        raise UsageError(f"--http needs Starlette and uvicorn (pip install 'remsh[web]'): {e}") from None
    server = WebServer(config, master)
    try:
        server.start()
    except WebError as e:
        raise UsageError(str(e)) from None
    url = server.url
    try:
        make_private_directory(state_dir, "state directory")  # a master on a shared store has no SQLite file there
        write_web_url(state_dir, url)
    except ControlError as e:
        server.stop()
        raise UsageError(str(e)) from None
    except OSError as e:
        server.stop()
        raise UsageError(f"cannot write {os.path.join(state_dir, WEB_URL_FILE)}: {e.strerror or e}") from None
    master.web_url = url

    def stop() -> None:
        master.web_url = None
        remove_web_url(state_dir, url)
        server.stop()

    return url, stop
