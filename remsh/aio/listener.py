"""Listeners of the asyncio master: :class:`TcpSlaveListener` and :class:`LocalSlaveListener`.

Both are ``async with`` context managers.  Each connection is served by the
event loop alone (an asyncio protocol; no thread per slave, none at all): the
handshake is :class:`remsh.handshake.MasterHandshake`, driven by
:func:`remsh.aio.connection.master_handshake` within ``handshake_timeout``;
a registered slave becomes an :class:`~remsh.aio.slave.AsyncSlave` in
:attr:`slave_collection`.

Sessions: with ``resume_timeout`` > 0 a slave that can resume (every
``remsh-slave`` dialing over TCP or TLS) gets a session, as from the
threaded listeners (:mod:`remsh.session`): when its connection drops, the
:class:`~remsh.aio.slave.AsyncSlave` stays, an operation in progress
waits, and the slave redialing within ``resume_timeout`` seconds carries
on where it was, every box once (:mod:`remsh.aio.session`).  Not back in
time, the operation raises :class:`~remsh.errors.Disconnected` naming
slave and operation.  With ``resume_timeout=0`` (the default) a slave that
asks for a session gets none and works as usual.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import math
import subprocess
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple, Type

from remsh.aio.collection import AsyncSlaveCollection
from remsh.aio.connection import Channel, Connection, SessionKeys, master_handshake
from remsh.aio.session import SessionConnection
from remsh.aio.slave import AsyncSlave
from remsh.errors import AuthenticationError, RemshError, UsageError
from remsh.handshake import HANDSHAKE_TIMEOUT, NameRule, Secret, choose_session
from remsh.master.limits import prepare_descriptors
from remsh.master.slavelistener.base import Authenticator, secret_authorizer
from remsh.ops import DEFAULT_IO_TIMEOUT
from remsh.session import new_session_id
from remsh.transports.base import tune_socket
from remsh.transports.local import spawn_local_slave
from remsh.transports.tcp import DEFAULT_KEEPALIVE

log = logging.getLogger(__name__)

__all__ = ["TcpSlaveListener", "LocalSlaveListener", "MAX_PENDING"]

#: Most connections in their handshake at once; newcomers beyond it are
#: closed at once (each handshake is bounded by ``handshake_timeout``).
MAX_PENDING = 1024
#: How long a local child has to exit after SIGTERM before SIGKILL.
CHILD_GRACE = 2.0


class _Listener:
    """What both listeners share: registration, the slaves, the life cycle."""

    def __init__(self, *, slave_class: Optional[Type[AsyncSlave]] = None,
                 slave_collection: Optional[AsyncSlaveCollection] = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT, io_timeout: float = DEFAULT_IO_TIMEOUT,
                 resume_timeout: float = 0.0) -> None:
        if not (0 <= resume_timeout and math.isfinite(resume_timeout)):
            raise UsageError("resume_timeout must be a finite number of seconds, 0 or more")
        self.slave_class: Type[AsyncSlave] = slave_class or AsyncSlave
        self.slave_collection = slave_collection if slave_collection is not None else AsyncSlaveCollection()
        self.handshake_timeout = handshake_timeout
        self.io_timeout = io_timeout
        #: how long a slave's work waits for its dropped connection to come
        #: back (0: it does not; see :mod:`remsh.aio.session`)
        self.resume_timeout = float(resume_timeout)
        self._slaves: Dict[int, AsyncSlave] = {}
        #: the slaves holding a session, by session id
        self._sessions: Dict[str, AsyncSlave] = {}
        self._started = False
        #: how many slaves this listener is meant to hold (``None``: not
        #: said); :meth:`start` fails when the open-file limit cannot hold them
        self.expected_slaves: Optional[int] = None

    @property
    def slaves(self) -> List[AsyncSlave]:
        """The connected slaves this listener registered."""
        return list(self._slaves.values())

    async def _register(self, conn: Connection, rule: NameRule, timeout: float) -> AsyncSlave:
        """Handshake, slave object, ``setup()``, collection.  On failure the
        connection is closed and the error raised."""
        def checked(name: str) -> Tuple[bool, Optional[bytes]]:
            # a name another listener's connected slave holds is refused
            # like any other refusal (the proof is still computed)
            allowed, secret = rule(name)
            if allowed and not self.slave_collection.may_register(name, self):
                log.warning("slave name %r is held through another listener", name)
                return False, secret
            return allowed, secret

        resuming: List[Tuple[AsyncSlave, SessionConnection, int]] = []
        new_session: List[str] = []

        def owner(sid: str) -> Optional[str]:
            old = self._sessions.get(sid)
            return None if old is None else old.name

        def resume(sid: str) -> Optional[int]:
            """Our count of the slave's boxes, its session taken off its old connection."""
            channel = self._sessions[sid].conn
            if isinstance(channel, SessionConnection) and channel.failed is None:
                return channel.begin_resume()
            return None

        def session_keys(name: str, box: Dict[bytes, bytes]) -> Mapping[bytes, bytes]:
            """The answer's session keys (remsh.handshake.choose_session)."""
            choice = choose_session(box, name, label=conn.label, resume_timeout=self.resume_timeout,
                                    owner=owner, resume=resume, new_id=new_session_id)
            if choice.resumed is not None:
                old = self._sessions[choice.resumed]
                assert isinstance(old.conn, SessionConnection)
                resuming.append((old, old.conn, choice.peer_received))
            elif choice.new is not None:
                new_session.append(choice.new)
            return choice.keys

        keys: Optional[SessionKeys] = session_keys if self.resume_timeout > 0 else None
        try:
            reg = await master_handshake(conn, checked, timeout=timeout, session_keys=keys)
            if resuming:
                old, session, peer_received = resuming[0]
                session.attach(conn, peer_received)
                log.info("slave %s resumed from %s", old.name, conn.peer)
                self.slave_collection.changed()
                return old
            channel: Channel = conn
            if new_session:
                channel = SessionConnection(conn, new_session[0], resume_timeout=self.resume_timeout,
                                            label=reg.name)
            slave = self.slave_class(channel, reg.name, reg.info, self, io_timeout=self.io_timeout)
            await slave.setup()
        except BaseException:
            conn.close()
            raise
        try:
            self.slave_collection.add_slave(slave)
        except RemshError:
            slave.close()
            raise
        self._slaves[id(slave)] = slave
        if new_session:
            self._sessions[new_session[0]] = slave
        slave.on_disconnect(self._forget)
        log.info("slave %s registered from %s%s", slave.name, conn.peer, " (resumable)" if new_session else "")
        return slave

    def _forget(self, slave: AsyncSlave) -> None:
        self._slaves.pop(id(slave), None)
        sid = getattr(slave.conn, "session_id", None)
        if sid is not None and self._sessions.get(sid) is slave:
            del self._sessions[sid]

    async def start(self) -> None:
        """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (once; see
        :func:`remsh.master.limits.prepare_descriptors`) and start serving.

        :raises LocalError: the limit cannot hold :attr:`expected_slaves`
        """
        if not self._started:
            prepare_descriptors(self.expected_slaves, 0.0, label=type(self).__name__)
        self._started = True

    async def stop(self) -> None:
        """Close the slaves this listener registered (idempotent)."""
        self._started = False
        for slave in self.slaves:
            slave.close()

    async def __aenter__(self) -> Any:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class TcpSlaveListener(_Listener):
    """Accepts slaves (``remsh-slave HOST PORT``) on a TCP port, optionally with TLS.

    :param port: port to listen on (0: any free port; :attr:`port` holds
        the bound one once started)
    :param host: address to bind (default: all interfaces)
    :param secret: one shared secret for every slave (bytes or str)
    :param authenticator: ``callable(name) -> secret or None``, per-slave secrets
    :param allow_insecure: must be true to listen with neither
    :param ssl_context: a server-side ``ssl.SSLContext``: connections are TLS
    :param resume_timeout: how long a slave's work waits for its dropped
        connection to come back (seconds; 0, the default: it does not)
    :param max_pending: most handshakes at once (each bounded by ``handshake_timeout``)
    :param keepalive: TCP keepalive ``(idle, interval, count)``, or ``None``:
        an idle slave on a host that vanished is noticed and dropped
    :raises UsageError: no credentials without ``allow_insecure``, or
        ``resume_timeout`` negative or infinite
    """

    def __init__(self, port: int = 0, host: Optional[str] = None, *, secret: Optional[Secret] = None,
                 authenticator: Optional[Authenticator] = None, allow_insecure: bool = False,
                 ssl_context: Optional[ssl.SSLContext] = None, max_pending: int = MAX_PENDING,
                 keepalive: Optional[Tuple[int, int, int]] = DEFAULT_KEEPALIVE, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if secret is None and authenticator is None and not allow_insecure:
            raise UsageError("TcpSlaveListener needs a secret or an authenticator "
                             "(or allow_insecure=True to accept anyone who can connect)")
        self.port = port
        self.host = host
        self.ssl_context = ssl_context
        self.max_pending = max_pending
        self.keepalive = keepalive
        self._rule = secret_authorizer(secret, authenticator)
        self._server: Optional[asyncio.AbstractServer] = None
        self._pending: Set["asyncio.Task[Any]"] = set()

    def authorize(self, name: str) -> Tuple[bool, Optional[bytes]]:
        """Any valid name, with the proof of the shared secret or of the
        authenticator's secret for that name."""
        return self._rule(name)

    async def start(self) -> None:
        """Open the port and accept slaves (idempotent)."""
        if self._server is not None:
            return
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Connection(label="slave", on_made=self._on_connection), host=self.host, port=self.port,
            ssl=self.ssl_context,
            ssl_handshake_timeout=self.handshake_timeout if self.ssl_context is not None else None)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Close the port, unfinished handshakes and this listener's slaves (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._pending):
            task.cancel()
        await super().stop()

    def _on_connection(self, conn: Connection) -> None:
        """A connection was accepted (TLS done): run its handshake in a task."""
        conn.label = f"slave at {conn.peer}"
        sock = None if conn.transport is None else conn.transport.get_extra_info("socket")
        if sock is not None:
            try:
                tune_socket(sock, send_timeout=None, keepalive=self.keepalive)
            except OSError as e:
                log.warning("cannot set TCP options for %s: %s", conn.peer, e)
        if len(self._pending) >= self.max_pending or not self._started:
            log.warning("dropped connection from %s: %d handshakes pending", conn.peer, len(self._pending))
            conn.abort()
            return
        task = asyncio.get_running_loop().create_task(self._handshake(conn))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _handshake(self, conn: Connection) -> None:
        peer = conn.peer
        try:
            await self._register(conn, self.authorize, self.handshake_timeout)
        except AuthenticationError as e:
            log.warning("refused slave from %s: %s", peer, e)
        except RemshError as e:
            log.warning("dropped connection from %s during handshake: %s", peer, e)
        except asyncio.CancelledError:
            conn.close()
        except Exception:  # noqa: BLE001 - a bad connection must never stop the listener
            log.exception("unexpected failure handling connection from %s", peer)
            conn.close()


class LocalSlaveListener(_Listener):
    """Spawns slaves as child processes of the master (trusted: no secret).

    ``async with`` ends every child it started.
    """

    def __init__(self, *, python: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.python = python
        self._procs: Dict[int, "subprocess.Popen[bytes]"] = {}

    async def start_slave(self, basedir: str, name: Optional[str] = None) -> AsyncSlave:
        """Start a slave rooted at ``basedir`` and return it, registered.

        :raises UsageError: ``basedir`` is not a directory
        :raises RemshError: the child fails its handshake
        """
        if not os.path.isdir(basedir):
            raise UsageError(f"base directory does not exist: {basedir}")
        if not self._started:
            await self.start()
        proc, stream = spawn_local_slave(basedir, name, python=self.python)
        sock = stream.sock
        sock.setblocking(False)
        try:
            _, conn = await asyncio.get_running_loop().create_connection(
                lambda: Connection(label=f"local slave (pid {proc.pid})"), sock=sock)
            slave = await self._register(conn, lambda _name: (True, None), self.handshake_timeout)
        except BaseException:
            sock.close()
            await _end_children([proc])
            raise
        self._procs[id(slave)] = proc
        slave.on_disconnect(self._reap)
        return slave

    def _reap(self, slave: AsyncSlave) -> None:
        proc = self._procs.pop(id(slave), None)
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)  # it kills its running command and exits
            except ProcessLookupError:
                pass
            asyncio.get_running_loop().create_task(_end_children([proc]))

    async def kill_slave(self, slave: AsyncSlave) -> None:
        """Kill the slave's process (a running operation raises ``Disconnected``)."""
        proc = self._procs.get(id(slave))
        if proc is None:
            if not slave.connected:
                return
            raise UsageError(f"{slave.name} was not started by this listener")
        slave.close()
        await _end_children([proc])

    async def stop(self) -> None:
        """Kill every slave this listener started (idempotent)."""
        procs = list(self._procs.values())
        await super().stop()
        await _end_children(procs + list(self._procs.values()))
        self._procs.clear()


async def _end_children(procs: List["subprocess.Popen[bytes]"], grace: float = CHILD_GRACE) -> None:
    """SIGTERM, then SIGKILL the process group after ``grace`` seconds; reap."""
    living = [p for p in procs if p.poll() is None]
    for p in living:
        try:
            p.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
    loop = asyncio.get_running_loop()
    end = loop.time() + grace
    while living and loop.time() < end:
        await asyncio.sleep(0.02)
        living = [p for p in living if p.poll() is None]
    for p in living:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            p.kill()
        p.wait()
