"""Slaves that dial in over SSH to a server embedded in the master.

Each slave logs in with its own key pair; the ``authorized_keys`` file maps
each key (by its comment field) to the one slave name it may register as, so
a stolen key can impersonate only its own slave.  The slave pins the
master's host key.  A shared secret (or per-slave secrets) can be required
on top, proved in the remsh handshake exactly as over TCP.

One time limit (``handshake_timeout``, from the TCP connection) covers the
SSH negotiation and the remsh handshake after it.  A name bound to a key is
claimed for this listener: another listener sharing the collection (a TCP
listener with the shared secret) never registers it.

The SSH work itself is in :mod:`remsh.transports.ssh` (the only module that
imports paramiko); this module ties it to the listener base.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional, Tuple, Type, Union

from remsh.handshake import Secret
from remsh.master.slave import Slave
from remsh.master.slavelistener.base import Authenticator, NetworkSlaveListener, secret_authorizer
from remsh.transports.ssh import KEEPALIVE_INTERVAL, ChannelStream, KeyLike, SshServer
from remsh.transports.tcp import DEFAULT_MAX_PENDING, DEFAULT_MAX_PENDING_PER_ADDRESS
from remsh.wire import Wire

log = logging.getLogger(__name__)


class SshSlaveListener(NetworkSlaveListener):
    """Accepts slaves on an embedded SSH server.

    :param port: port to listen on (0: any free port; after :meth:`start`
        the attribute holds the bound port)
    :param host: address to bind (default: all interfaces)
    :param host_key: the server's private host key: a file path or a
        paramiko key
    :param authorized_keys: path of an OpenSSH ``authorized_keys`` file; the
        comment field of each line is the slave name that key may register
        as.  It is read again at every login, so edits take effect at once.
    :param secret: optionally, a shared secret every slave must also prove
    :param authenticator: optionally, ``callable(name) -> secret or None``
        for per-slave secrets
    :param max_pending: most unfinished handshakes at once
    :param max_pending_per_address: most unfinished handshakes from one
        source address; a newcomer beyond either bound pushes out the oldest
        unfinished one not yet heard from (see :mod:`remsh.transports.tcp`)
    :param keepalive_interval: seconds of silence before an SSH keepalive
    :raises UsageError: the host key cannot be loaded
    """

    def __init__(self, port: int = 0, host: Optional[str] = None, *, host_key: KeyLike,
                 authorized_keys: Union[str, "os.PathLike[str]"], secret: Optional[Secret] = None,
                 authenticator: Optional[Authenticator] = None, slave_class: Optional[Type[Slave]] = None,
                 slave_collection: Any = None, max_pending: int = DEFAULT_MAX_PENDING,
                 max_pending_per_address: int = DEFAULT_MAX_PENDING_PER_ADDRESS,
                 keepalive_interval: int = KEEPALIVE_INTERVAL, **kwargs: Any) -> None:
        super().__init__(slave_class=slave_class, slave_collection=slave_collection, **kwargs)
        self.port = port
        self.host = host
        self._rule = secret_authorizer(secret, authenticator)
        self._server = SshServer(self._on_stream, host_key=host_key, authorized_keys=authorized_keys,
                                 host=host, port=port, max_pending=max_pending,
                                 max_pending_per_address=max_pending_per_address,
                                 handshake_timeout=self.handshake_timeout,
                                 keepalive_interval=keepalive_interval)

    def authorize(self, name: str, wire: Wire) -> Tuple[bool, Optional[bytes]]:
        """Only the name bound to the slave's SSH key, and only with the
        secret proof when a secret or authenticator is configured."""
        identity = getattr(wire.stream, "identity", None)
        if identity is None or name != identity:
            log.warning("slave at %s tried to register as %r with the key of %r", wire.stream.peer, name, identity)
            return False, None
        return self._rule(name)

    def claims_name(self, name: str) -> bool:
        """True when ``authorized_keys`` binds ``name`` to a key: no other
        listener sharing the collection may register that name (a secret
        alone never takes a key-bound name)."""
        return bool(self._server.authorized_keys.binds(name))

    def _on_stream(self, stream: ChannelStream) -> None:
        wire = Wire(stream, label=f"slave {stream.identity} at {stream.peer}")
        self.accept_wire(wire)
