"""The master's descriptor budget: ``RLIMIT_NOFILE`` and how many slaves fit.

Every connected slave holds descriptors in the master process for as long as
it stays connected, idle or not: its socket, and -- when its work survives a
dropped connection (a session, :mod:`remsh.session`, on a listener with
``resume_timeout`` > 0) -- the session's wake-up pipe (two more).  Linux
starts most processes with a soft limit of 1,024 open files and a hard
limit far above it, so a master left at the soft limit turns slaves away
(``EMFILE`` in the accept loop) long before the machine runs out of
anything.  A network listener therefore raises the soft limit to the hard
limit when it starts (:func:`prepare_descriptors`, called by
:meth:`NetworkSlaveListener.start
<remsh.master.slavelistener.base.NetworkSlaveListener.start>`), and fails at
once, saying how many slaves fit, when the hard limit cannot hold the
slaves it was told to expect -- rather than refusing slave number 6,582 an
hour later.

Only the superuser can raise a hard limit (``ulimit -Hn``, systemd's
``LimitNOFILE=``, ``/etc/security/limits.conf``), so this module never
tries.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass
from typing import Optional, Tuple

from remsh.errors import LocalError

log = logging.getLogger(__name__)

#: Descriptors kept for the master itself beyond its slaves: listening
#: sockets, the idle monitors' epoll and wake-up pipes, handshakes in
#: progress (a TCP listener allows 64), files opened by transfers in
#: progress, standard streams and logs.
RESERVE = 128
#: Descriptors one connected slave holds in the master: its socket.
FDS_PER_SLAVE = 1
#: ... and a slave with a session (``resume_timeout`` > 0): its socket too
#: (a session's wake-up pipe is made only by the slave's own execute).
FDS_PER_SESSION_SLAVE = 1
#: Used for the soft limit when the hard limit is unlimited and
#: ``/proc/sys/fs/nr_open`` cannot be read (Linux's default ``nr_open``).
FALLBACK_UNLIMITED = 1 << 20


@dataclass(frozen=True)
class Capacity:
    """The descriptor budget of this process, as a number of slaves."""

    #: the soft ``RLIMIT_NOFILE`` now in force
    soft: int
    #: the hard ``RLIMIT_NOFILE`` (``resource.RLIM_INFINITY`` if unlimited)
    hard: int
    #: descriptors each slave holds
    per_slave: int
    #: descriptors kept for the master itself
    reserve: int = RESERVE

    @property
    def slaves(self) -> int:
        """How many connected slaves fit under the soft limit."""
        return max(0, (self.soft - self.reserve) // self.per_slave)


def descriptors_per_slave(resume_timeout: float) -> int:
    """Descriptors a slave holds in the master on a listener with this
    ``resume_timeout`` (remsh-slave always asks for a session, so a
    listener that grants them pays for one with every slave)."""
    return FDS_PER_SESSION_SLAVE if resume_timeout > 0 else FDS_PER_SLAVE


def _unlimited_ceiling() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return FALLBACK_UNLIMITED


def raise_nofile_limit() -> Tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (or, when that is
    unlimited, to the most the kernel allows); return ``(soft, hard)`` as
    they are afterwards.  A refusal is logged and the soft limit kept.
    Raises nothing."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = _unlimited_ceiling() if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < ceiling:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, ceiling, e)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard


def _limit_text(n: int) -> str:
    return "unlimited" if n == resource.RLIM_INFINITY else f"{n:,}"


def prepare_descriptors(expected_slaves: Optional[int] = None, resume_timeout: float = 0.0, *,
                        label: str = "listener") -> Capacity:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit and check that the
    slaves fit: ``expected_slaves`` of them (when given), at least one
    otherwise.  Returns the budget (logged at INFO).

    :raises LocalError: the hard limit cannot hold them; the message says
        how many slaves fit and how to make room
    """
    soft, hard = raise_nofile_limit()
    per = descriptors_per_slave(resume_timeout)
    cap = Capacity(soft=soft, hard=hard, per_slave=per)
    wanted = 1 if expected_slaves is None else max(1, expected_slaves)
    if cap.slaves < wanted:
        each = "its socket"
        expected = (f"fewer than the {expected_slaves:,} expected" if expected_slaves is not None
                    else "not even one")
        hint = "raise the hard limit (ulimit -Hn, systemd LimitNOFILE=, /etc/security/limits.conf)"
        plain = max(0, (soft - cap.reserve) // FDS_PER_SLAVE)
        if per > FDS_PER_SLAVE and plain >= wanted:
            hint += f" or turn sessions off (resume_timeout=0: {FDS_PER_SLAVE} descriptor a slave, {plain:,} slaves)"
        raise LocalError(
            f"{label}: the open-file limit (soft {_limit_text(soft)}, hard {_limit_text(hard)}) holds "
            f"{cap.slaves:,} slaves at {per} descriptor{'s' if per != 1 else ''} each ({each}; "
            f"{cap.reserve} kept for the master itself), {expected}: {hint}")
    log.info("%s: open-file limit %s (hard %s): room for %d slaves at %d descriptor(s) each", label,
             _limit_text(soft), _limit_text(hard), cap.slaves, per)
    return cap
