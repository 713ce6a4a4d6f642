"""The seams through which a master's job store follows the sessions that
carry its commands (the work itself is in :mod:`remsh.jobadopt`).

Two of them, kept here, apart from the jobs, so that the slave and listener
modules can use them without importing the job machinery:

- :func:`execute_requested`: :meth:`remsh.master.slave.Slave.execute` calls
  it just before it sends an ``execute`` request.  A job's part that runs
  in this thread (:func:`set_current`, set by the job's sink when the
  slave's part starts) then records the session that carries the command
  and switches the session to ack-after-commit (:mod:`remsh.sessionacks`).
  Outside a job nothing is set and nothing happens.
- :func:`set_adopter` / :func:`adopter_for`: the listeners of a collection
  find the :class:`Adopter` (the master's job registry) that may take back
  sessions an earlier master left, when a slave's resume names one they do
  not know.  On a store several masters share, that adopter also adopts on
  demand the sessions of a dead master (:mod:`remsh.jobadopt`), refuses
  (:class:`SessionElsewhere`) those a live master holds, and refuses every
  slave once this master is fenced off (:attr:`Adopter.refusal`; a
  listener that asks the adopter's ``watch_refusal`` drops its slaves then).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Optional, Protocol

from remsh.errors import RemshError

#: ``hook(slave, call)``: see :func:`execute_requested`.
RequestHook = Callable[[Any, Any], None]

_local = threading.local()
_adopters: "weakref.WeakKeyDictionary[Any, Adopter]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def set_current(hook: Optional[RequestHook]) -> None:
    """The hook of the job part this thread now runs (``None``: none)."""
    _local.hook = hook


def execute_requested(slave: Any, call: Any) -> None:
    """``slave`` is about to send ``call``'s request (holding the slave):
    tell the job part of this thread, if any.  Never raises for a job's
    bookkeeping: a failure is the hook's to log."""
    hook: Optional[RequestHook] = getattr(_local, "hook", None)
    if hook is not None:
        hook(slave, call)


class SessionElsewhere(RemshError):
    """A slave resumes a session that another, live, master holds (or that
    cannot be looked up now): it is refused here, and tries its next master
    (``remsh-slave --failover``) or again later, keeping its command."""


class Claim(Protocol):
    """A session an :class:`Adopter` agreed to give back (see :meth:`Adopter.claim`)."""

    @property
    def session_id(self) -> str:
        """The session's id."""

    @property
    def committed(self) -> int:
        """How many of the slave's boxes the store has: the slave resumes there."""


class Adopter(Protocol):
    """What a listener asks of the master's job registry (:mod:`remsh.jobadopt`)."""

    @property
    def handing_over(self) -> bool:
        """True while the master stops and keeps its commands for the next one."""

    @property
    def refusal(self) -> Optional[str]:
        """Why no slave may register any more (the master was fenced off), else ``None``."""

    def offer(self, resume_timeout: float) -> None:
        """A listener started: slaves may come back through it for this long."""

    def claim(self, session_id: str, name: str) -> Optional[Claim]:
        """The recorded session ``session_id`` of slave ``name``, reserved
        for this registration; ``None`` when there is none (compared in
        constant time).

        :raises SessionElsewhere: another live master holds it"""

    def release(self, claim: Claim) -> None:
        """The registration of a claim failed: wait for the slave again."""

    def attach(self, claim: Claim, slave: Any, peer_received: int) -> None:
        """The slave of a claim is registered: take its command back (the
        slave is held for it before this returns)."""

    def slave_restarted(self, name: str) -> None:
        """Slave ``name`` registered afresh: a command it ran is gone."""


def set_adopter(collection: Any, adopter: Optional[Adopter]) -> None:
    """Make ``adopter`` the one the listeners of ``collection`` ask."""
    with _lock:
        if adopter is None:
            _adopters.pop(collection, None)
        else:
            _adopters[collection] = adopter


def adopter_for(collection: Any) -> Optional[Adopter]:
    """The adopter of ``collection``, if any."""
    with _lock:
        return _adopters.get(collection)
