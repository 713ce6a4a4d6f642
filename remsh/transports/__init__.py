"""Transports: byte streams between master and slave.

Only this package opens sockets, speaks TLS or SSH, or spawns the child
process that carries the protocol.  Everything above it sees a
:class:`~remsh.transports.base.StreamLike`.
"""
