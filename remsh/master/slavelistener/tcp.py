"""Slaves that dial in over TCP (optionally TLS) and prove a shared secret."""

from __future__ import annotations

import logging
import ssl
from typing import Any, Optional, Tuple, Type

from remsh.errors import UsageError
from remsh.handshake import Secret
from remsh.master.slave import Slave
from remsh.master.slavelistener.base import Authenticator, NetworkSlaveListener, secret_authorizer
from remsh.transports.base import SocketStream
from remsh.transports.tcp import DEFAULT_KEEPALIVE, DEFAULT_MAX_PENDING, TcpServer
from remsh.wire import Wire

log = logging.getLogger(__name__)


class TcpSlaveListener(NetworkSlaveListener):
    """Accepts slaves on a TCP port.

    :param port: port to listen on (0: any free port; after :meth:`start`
        the attribute holds the bound port)
    :param host: address to bind (default: all interfaces)
    :param secret: one shared secret for every slave (bytes or str)
    :param authenticator: ``callable(name) -> secret or None``, per-slave secrets
    :param allow_insecure: must be true to listen with neither secret nor
        authenticator (anyone who can connect can then register)
    :param ssl_context: an ``ssl.SSLContext`` (server side) to wrap
        connections in TLS
    :param max_pending: most unfinished handshakes at once; more
        connections are closed on arrival
    :param keepalive: TCP keepalive ``(idle, interval, count)``, or ``None``
    :raises UsageError: with neither secret nor authenticator and
        ``allow_insecure`` false
    """

    def __init__(self, port: int = 0, host: Optional[str] = None, *, secret: Optional[Secret] = None,
                 authenticator: Optional[Authenticator] = None, allow_insecure: bool = False,
                 ssl_context: Optional[ssl.SSLContext] = None, slave_class: Optional[Type[Slave]] = None,
                 slave_collection: Any = None, max_pending: int = DEFAULT_MAX_PENDING,
                 keepalive: Optional[Tuple[int, int, int]] = DEFAULT_KEEPALIVE, **kwargs: Any) -> None:
        super().__init__(slave_class=slave_class, slave_collection=slave_collection, **kwargs)
        if secret is None and authenticator is None and not allow_insecure:
            raise UsageError("TcpSlaveListener needs a secret or an authenticator "
                             "(or allow_insecure=True to accept anyone who can connect)")
        self.port = port
        self.host = host
        self.ssl_context = ssl_context
        self._rule = secret_authorizer(secret, authenticator)
        self._server = TcpServer(self._on_stream, host=host, port=port, ssl_context=ssl_context,
                                 max_pending=max_pending, handshake_timeout=self.handshake_timeout,
                                 keepalive=keepalive)

    def authorize(self, name: str, wire: Wire) -> Tuple[bool, Optional[bytes]]:
        return self._rule(name)

    def _on_stream(self, stream: SocketStream) -> None:
        wire = Wire(stream, label=f"slave at {stream.peer}")
        self.accept_wire(wire)
