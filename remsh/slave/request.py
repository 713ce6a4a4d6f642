"""What one operation's handler on the slave gets: :class:`Request`.

The handlers of the longer conversations (:mod:`remsh.slave.tree`,
:mod:`remsh.slave.execute`) need the connection, the paths resolved against
the slave's working directory, the slave's policy and its I/O time limit --
not the whole :class:`~remsh.slave.server.SlaveServer`, which imports them:
the layers stay one-way.
"""

from __future__ import annotations

import os
from typing import Callable, Union

from remsh.session import SessionWire
from remsh.slave.policy import Policy
from remsh.wire import Wire

__all__ = ["Request"]


class Request:
    """One operation's view of its slave.

    :ivar wire: the connection to the master
    :ivar cwd: the slave's working directory (bytes) when the request came
    :ivar policy: what this slave refuses to do (:mod:`remsh.slave.policy`)
    :ivar io_timeout: the longest wait for the master's next box (seconds)
    """

    __slots__ = ("wire", "cwd", "policy", "io_timeout", "_devnull")

    def __init__(self, wire: Union[Wire, SessionWire], cwd: bytes, policy: Policy, io_timeout: float,
                 devnull: Callable[[], int]) -> None:
        self.wire = wire
        self.cwd = cwd
        self.policy = policy
        self.io_timeout = io_timeout
        self._devnull = devnull

    def path(self, name: bytes) -> bytes:
        """``name`` resolved against the working directory (an absolute
        ``name`` stays as it is); the policy still decides what it may reach."""
        return os.path.join(self.cwd, name)

    def devnull(self) -> int:
        """A descriptor of ``/dev/null`` for a command's unwanted streams
        (the server's, opened once)."""
        return self._devnull()
