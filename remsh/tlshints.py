"""Hints for a TLS mismatch between a slave and its master, in the
command line's words, on both ends.

A slave started with ``--tls`` that dials a listener without TLS sends a
TLS ClientHello where the master expects ``REMSH-S``: the master logs a
bad greeting starting ``\\x16\\x03`` and the slave's TLS layer fails with
``WRONG_VERSION_NUMBER`` (the master's greeting is not a TLS record).  A
slave without ``--tls`` that dials a TLS listener sends its greeting where
the master expects a ClientHello: the master's TLS handshake fails with
``WRONG_VERSION_NUMBER`` and the slave sees its connection cut before it
registered.  Each end then adds a hint naming the option
(:func:`master_hint` for the master's log, :func:`slave_hint` for
``remsh-slave``'s).
"""

from __future__ import annotations

#: (what the master's line holds, the hint added to it)
MASTER_HINTS = (
    (("bad greeting b'\\x16\\x03",),
     "; a slave started with --tls dialling a listener without TLS? give the master --tls-cert and --tls-key, "
     "or start the slave without --tls"),
    (("TLS handshake", "WRONG_VERSION_NUMBER"),
     "; a slave without --tls dialling this TLS listener? start it with --tls --tls-ca FILE"),
)


def master_hint(message: str) -> str:
    """``message`` (a line of the master's log) with the hint it calls for, if any."""
    for needles, hint in MASTER_HINTS:
        if all(n in message for n in needles):
            return message + hint
    return message


def slave_hint(message: str, tls: bool) -> str:
    """``message`` (why a slave's attempt ended before it registered) with
    a hint when it looks like a TLS mismatch; ``tls``: the slave has ``--tls``."""
    if tls and "WRONG_VERSION_NUMBER" in message:
        return message + ("; the master's listener does not speak TLS? start this slave without --tls, or "
                          "give the master --tls-cert and --tls-key")
    if not tls and message.startswith("connection lost") and ("reset" in message or "closed" in message):
        return message + "; a TLS master? start this slave with --tls --tls-ca FILE"
    return message
