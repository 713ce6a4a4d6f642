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
from remsh.transports.tcp import (DEFAULT_KEEPALIVE, DEFAULT_MAX_PENDING, DEFAULT_MAX_PENDING_PER_ADDRESS,
                                  TcpServer)
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
    :param max_pending: most unfinished handshakes at once
    :param max_pending_per_address: most unfinished handshakes from one
        source address; a newcomer beyond either bound pushes out the oldest
        unfinished handshake that has not been heard from (see
        :mod:`remsh.transports.tcp`)
    :param keepalive: TCP keepalive ``(idle, interval, count)``, or ``None``
    :raises UsageError: with neither secret nor authenticator and
        ``allow_insecure`` false
    """

    def __init__(self, port: int = 0, host: Optional[str] = None, *, secret: Optional[Secret] = None,
                 authenticator: Optional[Authenticator] = None, allow_insecure: bool = False,
                 ssl_context: Optional[ssl.SSLContext] = None, slave_class: Optional[Type[Slave]] = None,
                 slave_collection: Any = None, max_pending: int = DEFAULT_MAX_PENDING,
                 max_pending_per_address: int = DEFAULT_MAX_PENDING_PER_ADDRESS,
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
                                 max_pending=max_pending, max_pending_per_address=max_pending_per_address,
                                 handshake_timeout=self.handshake_timeout,
                                 keepalive=keepalive)

    def authorize(self, name: str, wire: Wire) -> Tuple[bool, Optional[bytes]]:
        """Any valid name, with the proof of the shared secret or of the
        authenticator's secret for that name."""
        return self._rule(name)

    def _on_stream(self, stream: SocketStream) -> None:
        wire = Wire(stream, label=f"slave at {stream.peer}")
        self.accept_wire(wire, on_progress=lambda: self._server.mark_progress(stream.sock))
