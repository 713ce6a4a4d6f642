"""An asyncio front end: the master's API as coroutines, one event loop for
every slave, no thread per slave (see docs/aio.rst).

- :class:`TcpSlaveListener` (TCP, optionally TLS) and
  :class:`LocalSlaveListener` (child processes), ``async with``;
- :class:`AsyncSlaveCollection`: ``await get_slave(filter=None, cmp=None,
  timeout=None)``, ``get_all_slaves()``, ``await wait_for_slaves(...)``;
- :class:`AsyncSlave`: every operation of :class:`remsh.master.slave.Slave`
  as a coroutine; cancelling the awaiting task stops the operation on the
  slave;
- with ``resume_timeout`` > 0, sessions: a slave's work survives a dropped
  connection (:mod:`remsh.aio.session`).

It drives the same protocol objects as the threaded master: the codec of
:mod:`remsh.wire`, the machines of :mod:`remsh.handshake`,
:class:`~remsh.conversation.ExecuteCall` and the conversations of
:mod:`remsh.protocol`, and its session layer
(:class:`~remsh.protocol.session.SessionState`).
"""

from remsh.aio.collection import AsyncSlaveCollection
from remsh.aio.connection import Connection
from remsh.aio.listener import LocalSlaveListener, TcpSlaveListener
from remsh.aio.slave import AsyncSlave

__all__ = ["AsyncSlave", "AsyncSlaveCollection", "Connection", "LocalSlaveListener", "TcpSlaveListener"]
