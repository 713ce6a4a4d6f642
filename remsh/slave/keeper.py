"""The slave's side of work that survives a dropped connection.

A :class:`SessionKeeper` lives as long as the ``remsh-slave`` process.  When
the master gives a session at registration (``registered`` with
``session``), the keeper runs the operation server in a thread of its own
over a :class:`~remsh.session.SessionWire`; the main thread keeps the link:
it sends a link check when it has sent nothing for ``heartbeat`` seconds,
takes the link for dead when it has heard nothing for three of them (a
half-open connection never ends by itself), and then returns so that the
caller redials.  The next registration names the session (``resume``) and
the server goes on where it was: a running command keeps running, its
output is kept (up to ``spool_limit`` bytes, past which the command waits
on its writes) and delivered once.  If the connection does not come back
within the master's ``resume_timeout`` the session fails: the server ends
and the command's process group is killed.

The master may also be a new process on the same job store (the old one
was killed or stopped): it knows the session from its store and takes it
back, answering with the count of our boxes it has committed; we send
again everything from there (:mod:`remsh.jobadopt`).  A master that does
not know the session at all answers with a new one: the old session ends
and its command is killed (nobody would ever read its output).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Dict, Optional

from remsh.errors import Disconnected, RemshError
from remsh.handshake import Registered, resume_request, session_granted
from remsh.session import SessionFailed, SessionWire
from remsh.sessionlimits import DEFAULT_HEARTBEAT, DEFAULT_SPOOL_LIMIT
from remsh.slave.policy import PLAIN, Policy
from remsh.slave.server import SlaveServer
from remsh.wire import Wire

log = logging.getLogger(__name__)

#: The longest resume time limit a master may set (a week).
MAX_RESUME_TIMEOUT = 7 * 86400.0
#: How long to wait for the server thread of a session that failed.
_JOIN_TIMEOUT = 10.0


class SessionKeeper:
    """Keeps the slave's session across connections (see the module docstring)."""

    def __init__(self, basedir: str, policy: Optional[Policy] = None, *,
                 heartbeat: float = DEFAULT_HEARTBEAT, spool_limit: int = DEFAULT_SPOOL_LIMIT) -> None:
        self.basedir = basedir
        self.policy = policy or PLAIN
        self.heartbeat = heartbeat
        self.spool_limit = spool_limit
        self.session: Optional[SessionWire] = None
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def register_keys(self) -> Dict[str, str]:
        """The keys this slave adds to its register box: it can resume, and
        (while a session is alive) which one and how much of it it has.

        Taking the session off its old connection first makes the count
        final: nothing arrives on that connection any more.
        """
        session = self.session
        if session is not None and session.failed is None and not session.peer_ended:
            return resume_request(session.session_id, session.prepare_resume())
        return resume_request()

    def serve(self, wire: Wire, reg: Registered) -> None:
        """Serve the master over ``wire`` (registration done) until the
        connection is lost or the master ends the session.

        Returns when the master closed the session (or, without a session,
        the connection) cleanly.

        :raises Disconnected: the connection was lost (redial to resume)
        :raises RemshError: the server failed
        """
        grant = session_granted(reg.info, MAX_RESUME_TIMEOUT)
        if grant is None:
            self._end_session(SessionFailed("the master gave no session"))
            SlaveServer(wire, self.basedir, policy=self.policy).serve()
            return
        sid, resume_timeout, received = grant.session, grant.resume_timeout, grant.received
        session = self.session
        if session is not None and grant.resumed and sid == session.session_id:
            session.attach(wire, received)
        else:
            if session is not None:
                log.warning("the master does not know our session any more: its work is lost")
                self._end_session(SessionFailed("the master started a new session"))
            session = SessionWire(wire, sid, resume_timeout=resume_timeout,
                                  spool_limit=self.spool_limit, spool_dir=self._spool_dir())
            self.session = session
            self._error = None
            self._thread = threading.Thread(target=self._run_server, args=(session,),
                                            name="remsh-slave-server", daemon=True)
            self._thread.start()
        self._keep_link(session)

    def _spool_dir(self) -> Optional[str]:
        """Where a session keeps output past memory while the master is
        away: under the base directory (see remsh.session: a private
        directory made and removed around an unlinked file)."""
        return self.basedir

    def _run_server(self, session: SessionWire) -> None:
        try:
            SlaveServer(session, self.basedir, policy=self.policy).serve()
        except BaseException as e:  # noqa: BLE001 - reported by the keeping thread
            self._error = e
        finally:
            session.wake()

    def _keep_link(self, session: SessionWire) -> None:
        thread = self._thread
        assert thread is not None
        hb = self.heartbeat
        while True:
            if not thread.is_alive():
                self.session = None
                error = self._error
                if error is None or session.peer_ended:
                    return  # the master ended the session
                if isinstance(error, RemshError):
                    raise error
                raise Disconnected(f"the operation server failed: {error!r}")
            session.wait_change(min(hb, 1.0))
            if session.failed is not None or session.peer_ended:
                thread.join(_JOIN_TIMEOUT)
                continue
            if session.conn is None:
                raise Disconnected("connection to the master lost")
            now = time.monotonic()
            if now - session.last_sent >= hb:
                session.heartbeat()
            if now - session.last_received >= 3 * hb:
                session.connection_lost(why=f"heard nothing from the master for {3 * hb:g} s")

    def _end_session(self, error: RemshError) -> None:
        session, thread = self.session, self._thread
        self.session = None
        if session is not None:
            session.fail(error)
        if thread is not None and thread.is_alive():
            thread.join(_JOIN_TIMEOUT)

    def close(self, *_: Any) -> None:
        """End the session (the slave is stopping): the master is told, so
        it does not wait for a resume, and the command is killed."""
        session = self.session
        if session is not None:
            session.end()
        self._end_session(SessionFailed("the slave is stopping"))

