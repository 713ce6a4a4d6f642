"""The listener base every transport ends in.

A transport delivers a :class:`~remsh.wire.Wire` whose greeting has been
exchanged; :meth:`SlaveListener.handle_new_connection` runs the rest of the
handshake (SPEC section 4, steps 2-5), builds the slave object, calls its
``setup()`` and adds it to the collection.  Subclasses decide who may
register by overriding :meth:`SlaveListener.authorize`.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional, Tuple, Type, Union

from remsh.errors import AuthenticationError, RemshError
from remsh.handshake import (HANDSHAKE_TIMEOUT, MASTER_GREETING, SLAVE_GREETING, Secret,
                             as_secret, exchange_greeting, master_handshake)
from remsh.master.monitor import IdleMonitor
from remsh.master.slave import DEFAULT_IO_TIMEOUT, Slave
from remsh.master.slavecollection.simple import SimpleSlaveCollection
from remsh.wire import Wire

log = logging.getLogger(__name__)

#: ``authenticator(name) -> secret``: that slave's secret, or ``None`` if unknown.
Authenticator = Callable[[str], Optional[Secret]]


class SlaveListener:
    """Abstract base of the slave listeners.

    :param slave_class: class instantiated for each new slave
        (default :class:`~remsh.master.slave.Slave`)
    :param slave_collection: where new slaves are added (default: a new
        :class:`~remsh.master.slavecollection.simple.SimpleSlaveCollection`)
    :param handshake_timeout: bound on the whole handshake, in seconds
    :param io_timeout: passed to each slave (bound on each wait for a reply)
    """

    def __init__(self, slave_class: Optional[Type[Slave]] = None, slave_collection: Any = None, *,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 io_timeout: float = DEFAULT_IO_TIMEOUT) -> None:
        self.slave_class: Type[Slave] = slave_class or Slave
        self.slave_collection = slave_collection if slave_collection is not None else SimpleSlaveCollection()
        self.handshake_timeout = handshake_timeout
        self.io_timeout = io_timeout
        #: one thread that notices idle slaves going away (started on first use)
        self.monitor = IdleMonitor()

    def authorize(self, name: str, wire: Wire) -> Tuple[bool, Optional[bytes]]:
        """Whether ``name`` may register over ``wire``, and the secret its
        proof must be made with (``None``: no proof).  The base trusts all."""
        return True, None

    def handle_new_connection(self, wire: Wire, timeout: Optional[float] = None) -> Slave:
        """Authenticate and register the slave at the other end of ``wire``.

        The greeting must already have been exchanged.  Returns the slave,
        now in the collection.  On failure the wire is closed and the error
        (``AuthenticationError``, ``ProtocolError``, ``Disconnected``) raised;
        nothing reaches the collection.  ``timeout`` bounds the exchange
        (default: ``handshake_timeout``).
        """
        try:
            reg = master_handshake(wire, self.authorize, greet=False,
                                   timeout=self.handshake_timeout if timeout is None else timeout)
            slave = self.slave_class(wire, reg.name, reg.info, self, io_timeout=self.io_timeout)
            slave.setup()
        except AuthenticationError as e:
            log.warning("refused slave from %s: %s", wire.stream.peer, e)
            wire.close()
            raise
        except BaseException:
            wire.close()
            raise
        self.monitor.add(slave)
        self.slave_collection.add_slave(slave, self)
        log.info("slave %s registered from %s", slave.name, wire.stream.peer)
        return slave

    def accept_wire(self, wire: Wire) -> Optional[Slave]:
        """Greeting plus :meth:`handle_new_connection`, with failures logged
        rather than raised (for accept loops).  Returns the slave or ``None``."""
        deadline = getattr(wire.stream, "handshake_deadline", None)
        if deadline is None:
            deadline = time.monotonic() + self.handshake_timeout
        try:
            # one time limit for greeting and handshake together (and for
            # whatever the transport's own set-up, e.g. TLS, already used)
            exchange_greeting(wire, MASTER_GREETING, SLAVE_GREETING, max(0.0, deadline - time.monotonic()))
            return self.handle_new_connection(wire, timeout=max(0.0, deadline - time.monotonic()))
        except AuthenticationError:
            return None  # logged by handle_new_connection
        except RemshError as e:
            log.warning("dropped connection from %s during handshake: %s", wire.stream.peer, e)
        except Exception:  # noqa: BLE001 - a bad connection must never stop the listener
            log.exception("unexpected failure handling connection from %s", wire.stream.peer)
        wire.close()
        return None


class NetworkSlaveListener(SlaveListener):
    """A listener with a server that accepts connections on a port.

    Subclasses set ``self._server`` (an object with ``start()``, ``stop()``
    and ``port``) in their constructor.
    """

    port: int
    _server: Any
    _started = False

    def start(self) -> None:
        """Open the port and accept slaves in the background (the port is
        not opened before)."""
        self._server.start()
        self.port = self._server.port
        self.monitor.start()
        self._started = True

    def stop(self) -> None:
        """Close the port and disconnect the slaves this listener connected."""
        self._server.stop()
        for slave in self.slave_collection.get_all_slaves():
            if slave.listener is self:
                slave.close()
        self.monitor.stop()
        self._started = False

    def __enter__(self) -> "NetworkSlaveListener":
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def secret_authorizer(secret: Optional[Secret], authenticator: Optional[Authenticator]
                      ) -> Callable[[str], Tuple[bool, Optional[bytes]]]:
    """The name -> (allowed, secret) rule for a shared secret or an authenticator."""
    shared = as_secret(secret)

    def rule(name: str) -> Tuple[bool, Optional[bytes]]:
        if authenticator is not None:
            try:
                found = authenticator(name)
            except Exception:  # noqa: BLE001 - a failing authenticator refuses
                log.exception("authenticator failed for slave name %r", name)
                return False, None
            if found is not None:
                return True, as_secret(found)
            if shared is None:
                return False, None
        if shared is not None:
            return True, shared
        return True, None

    return rule


SecretLike = Union[bytes, str, None]
