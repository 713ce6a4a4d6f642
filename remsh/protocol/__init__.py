"""The protocol layer: conversations as objects that do no I/O.

Each module here turns a caller's arguments into request bytes and each box
from the peer into one typed event, refusing a box its state does not allow
(:class:`~remsh.errors.ProtocolError`); the session layer that carries a
conversation across connections is one too (:mod:`remsh.protocol.session`,
with its numbers in :mod:`remsh.protocol.sessionlimits`).  Drivers put them on a connection:
the threaded master (:mod:`remsh.master`) and the asyncio front end
(:mod:`remsh.aio`).  Nothing under this package imports ``socket``,
``threading``, ``select`` or ``time.sleep``.
"""
