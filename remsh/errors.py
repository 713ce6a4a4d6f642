"""Every exception remsh raises, rooted at :class:`RemshError`.

The tree is split by cause, so that a caller can tell "the command failed on
the slave" from "the connection broke" from "the peer spoke nonsense":

- :class:`UsageError` -- the caller misused the API.
- :class:`LocalError` -- a file or resource on the master's own side failed
  (the ``OSError`` is chained); nothing went wrong with the slave.
- :class:`LimitExceeded` -- a transfer passed a bound the caller set
  (``max_bytes``, ``max_entries``): it was stopped, nothing partial is
  kept, and the slave stays connected.
- :class:`WaitTimeout` -- a wait for something the caller asked for (slaves
  to register, the right to send) ran past its time limit; the connection is
  not known to be broken.
- :class:`ProtocolError` -- the peer broke the protocol; the connection is
  closed.
- :class:`Disconnected` -- the transport closed or broke (the ``OSError``, if
  any, is chained); :class:`PeerTimeout` when the peer went silent past a time
  limit.
- :class:`Cancelled` -- a fan-out was cancelled or ran out of time.
- :class:`AuthenticationError` -- the handshake failed to prove who is at the
  other end.
- :class:`RemoteError` -- the slave performed the operation and reported a
  failure; the subclass is chosen by the error box's ``errtag`` through
  :data:`ERRTAG_CLASSES`, the one table used in both directions.
- :class:`TreeError` -- inside a tree operation, a record stream or a file
  of the tree failed; each end turns it into one of the errors above before
  it reaches a caller.

Every class carries a short ``tag`` (a remote error's is its ``errtag``):
the word :func:`error_tag` gives the command line's ``--json``, the control
protocol and the job store for a failure, and :data:`TAG_CLASSES` turns back
into the class.
"""

from __future__ import annotations

from typing import Dict, Optional, Type


class RemshError(Exception):
    """Root of every exception raised by remsh."""

    #: the word for this kind of failure (see :func:`error_tag`)
    tag = "error"


class UsageError(RemshError):
    """The caller used the API wrongly (bad argument, wrong state)."""

    tag = "usage"


class LocalError(RemshError):
    """A file or resource on the master's side failed (cannot read the
    source of ``send``, cannot write the destination of ``fetch``, ...).

    The ``OSError`` is chained as ``__cause__``; the slave stays connected.
    """

    tag = "local"


class LimitExceeded(RemshError):
    """A transfer passed a bound the caller set (``fetch(max_bytes=)``,
    ``fetch_tree(max_bytes=, max_entries=)``): it was stopped in the
    protocol, nothing partial is left at the destination, and the slave
    stays connected for the next operation."""

    tag = "limit"


class WaitTimeout(RemshError):
    """A wait ran past its time limit (for slaves to register, for the right
    to send on a congested connection); the connection itself is not known to
    be broken."""

    tag = "wait-timeout"


class ProtocolError(RemshError):
    """The peer sent something the protocol does not allow."""

    tag = "protocol"


class Disconnected(RemshError):
    """The connection to the peer closed or broke."""

    tag = "disconnected"


class PeerTimeout(Disconnected):
    """The peer did not answer within a time limit; the connection was dropped."""


class Cancelled(RemshError):
    """The work was cancelled (or its overall time limit ran out) before it
    finished on this slave."""

    tag = "cancelled"


class AuthenticationError(RemshError):
    """The peer could not prove its identity, or refused ours."""

    tag = "auth"


class RemoteError(RemshError):
    """An operation failed on the slave.

    ``errtag`` is the short tag of the error box, ``remote_message`` the
    slave's human-readable text, ``slave`` the slave's name and ``operation``
    the method that failed.
    """

    errtag = "unexpected"
    tag = "unexpected"

    def __init__(
        self,
        message: str,
        *,
        slave: Optional[str] = None,
        operation: Optional[str] = None,
        errtag: Optional[str] = None,
    ) -> None:
        if errtag is not None:
            self.errtag = errtag
        self.tag = self.errtag
        self.remote_message = message
        self.slave = slave
        self.operation = operation
        where = ": ".join(p for p in (slave, operation) if p)
        text = f"{where}: {message}" if where else message
        super().__init__(f"{text} [{self.errtag}]")


class InvalidMethError(RemoteError):
    """The slave does not know the requested operation."""

    errtag = "invalid-meth"


class VersionTooNewError(RemoteError):
    """The slave is older than the operation version requested."""

    errtag = "version-too-new"


class VersionUnsupportedError(RemoteError):
    """The slave no longer supports the operation version requested."""

    errtag = "version-unsupported"


class InvalidRequestError(RemoteError):
    """The slave found the request malformed."""

    errtag = "invalid"


class UnexpectedError(RemoteError):
    """Something went wrong on the slave that it did not expect."""

    errtag = "unexpected"


class NotFoundError(RemoteError):
    """A path or directory named in the request does not exist."""

    errtag = "notfound"


class RemoteFileExistsError(RemoteError):
    """The destination of the operation already exists."""

    errtag = "fileexists"


class OpenFailedError(RemoteError):
    """A file could not be opened."""

    errtag = "openfailed"


class FailedError(RemoteError):
    """The operation was attempted and failed (permissions, disk full, ...)."""

    errtag = "failed"


class ExecFailedError(RemoteError):
    """The command could not be started."""

    errtag = "execfailed"


class CommandTimeout(RemoteError):
    """The command ran past its time limit and was killed."""

    errtag = "timeout"


class DeniedError(RemoteError):
    """The slave's own policy refuses the operation (a path outside its
    ``--root``, ``execute`` with ``--no-execute``, a command not allowed)."""

    errtag = "denied"


ERRTAG_CLASSES: Dict[str, Type[RemoteError]] = {
    cls.errtag: cls
    for cls in (
        InvalidMethError,
        VersionTooNewError,
        VersionUnsupportedError,
        InvalidRequestError,
        UnexpectedError,
        NotFoundError,
        RemoteFileExistsError,
        OpenFailedError,
        FailedError,
        ExecFailedError,
        CommandTimeout,
        DeniedError,
    )
}
"""errtag -> exception class; unknown tags map to :class:`UnexpectedError`."""


def remote_error(
    errtag: str, message: str, *, slave: Optional[str] = None, operation: Optional[str] = None
) -> RemoteError:
    """Build the exception for an error box; unknown tags become ``unexpected``."""
    cls = ERRTAG_CLASSES.get(errtag, UnexpectedError)
    return cls(message, slave=slave, operation=operation, errtag=cls.errtag)


class TreeError(RemshError):
    """A tree operation's stream or one of its files failed; the end that
    sees it turns it into a :class:`LocalError`, :class:`FailedError` or
    :class:`ProtocolError` naming slave and operation."""

    tag = "tree"


class TreeSourceError(TreeError):
    """The sending side cannot read its tree (a file unreadable, changed
    midway, a special file); the message names the path."""


class TreeTargetError(TreeError):
    """The receiving side cannot write the tree; the message names the path."""


class TreeStreamError(TreeError):
    """The records received break the tree stream's format."""


class TreeDigestError(TreeError):
    """A file's data does not match the digest its sender sent."""


#: tag -> class for the failures that happen on the master's side (a remote
#: error's tag is its ``errtag``: see :data:`ERRTAG_CLASSES`)
TAG_CLASSES: Dict[str, Type[RemshError]] = {
    cls.tag: cls
    for cls in (RemshError, UsageError, LocalError, LimitExceeded, WaitTimeout, ProtocolError,
                Disconnected, Cancelled, AuthenticationError, TreeError)
}


def error_tag(error: BaseException) -> str:
    """The short word for ``error``: a remote error's ``errtag``, a remsh
    error's class ``tag``, ``error`` for anything else."""
    if isinstance(error, RemoteError):
        return error.errtag
    if isinstance(error, RemshError):
        return error.tag
    return "error"


def error_class(tag: str) -> Type[RemshError]:
    """The class a tag names (either table); :class:`RemshError` for a tag
    neither knows."""
    return ERRTAG_CLASSES.get(tag) or TAG_CLASSES.get(tag, RemshError)
