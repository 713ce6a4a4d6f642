"""The slave's side of the directory-tree operations: ``send_tree`` (receive a
tree), ``fetch_tree`` (send one) and ``sync_tree`` (report a tree, then bring
it in line with the master's).  The record format and the walk/writer they
share with the master are in :mod:`remsh.treestream`.

Each is one conversation with no round trip per file:

- ``send_tree``: the master sends the request and, without waiting, the whole
  record stream and an end box; the slave answers one final box.  The tree
  is built in a temporary directory beside ``dest`` and renamed into place
  (never replacing anything) only when complete and verified; on any failure
  the temporary directory is removed.  A failure is reported *at once* (the
  final box goes out before the master's end box), so the master can stop
  sending; the slave then reads and drops the rest up to the end box.
- ``fetch_tree``: the slave checks the whole tree first (anything that is
  not a file, directory or link fails the call before a byte of data goes
  out), sends a header box, the record stream and an end box.  A master
  that must give up sends ``{interrupt: y}``; the slave looks for it between
  files and blocks, and stops with an error box.
- ``sync_tree``: the slave sends a manifest of ``dest`` (sizes, times,
  digests when asked) and an end box; the master then sends only what
  differs, as records, and an end box; the slave answers one final box.

Every path goes through the slave's ``policy`` (the destination's parent is
resolved with :meth:`Policy.parent`, a source or existing destination with
:meth:`Policy.open`); below that everything is ``*at`` calls on descriptors
with ``O_NOFOLLOW``, with single-component names, so nothing in a stream can
lead outside the tree.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, Optional, Tuple

from remsh.errors import (Disconnected, FailedError, InvalidRequestError, NotFoundError, OpenFailedError, RemoteError,
                          RemoteFileExistsError, TreeDigestError, TreeSourceError, TreeStreamError, TreeTargetError,
                          UnexpectedError)
from remsh.files import O_DIRECTORY, O_NONBLOCK
from remsh.ops import error_box
from remsh.slave import fsops
from remsh.slave.policy import DIR_FLAGS, Policy
from remsh.slave.request import Request
from remsh.treemanifest import manifest_records
from remsh.treestream import ABORT, DIR_OPEN, END, M, Sender, others_message, received_boxes, scan
from remsh.treewriter import Writer, make_temp_dir, place_dir
from remsh.wire import END_OF_BOX, Box

log = logging.getLogger(__name__)

#: Least time between two looks for a master's interrupt during fetch_tree.
POLL_EVERY = 0.05


def remove_dir_at(parent_fd: int, name: bytes) -> None:
    fsops.remove_dir_at(parent_fd, name, None)


def open_parent(policy: Policy, path: bytes) -> Tuple[int, bytes]:
    """A descriptor of the directory holding ``path`` (inside the root, with
    one) and the last component's name; the caller closes the descriptor.

    Raises :class:`NotFoundError` (that directory does not exist),
    :class:`FailedError`, :class:`DeniedError`, :class:`InvalidRequestError`.
    """
    try:
        with policy.parent(path) as (dir_fd, name):
            if dir_fd is not None:
                return os.dup(dir_fd), name
        trimmed = path.rstrip(b"/")
        head, _, base = trimmed.rpartition(b"/")
        if not head and trimmed.startswith(b"/"):
            head = b"/"
        return os.open(head or b".", DIR_FLAGS), base
    except (FileNotFoundError, NotADirectoryError):
        raise NotFoundError(f"the directory of the destination does not exist: {os.fsdecode(path)}") from None
    except OSError as e:
        raise FailedError(f"{e.strerror}: {os.fsdecode(path)}") from None


def _policed(policy: Policy, box: Box) -> Box:
    """A record ``box`` as the policy lets it apply: its mode without the
    set-ID bits under a restricting policy (:meth:`Policy.file_mode`), for
    files and directories alike.  A mode that is not a number is left as
    it is, for the writer to refuse."""
    raw = box.get(M)
    if raw is None or not policy.restricted:
        return box
    try:
        mode = int(raw)
    except ValueError:
        return box
    kept = policy.file_mode(mode)
    if kept == mode:
        return box
    box = dict(box)
    box[M] = b"%d" % kept
    return box


def _as_remote(e: BaseException) -> RemoteError:
    """The error box class for a failure while a tree moves."""
    if isinstance(e, RemoteError):
        return e
    if isinstance(e, TreeStreamError):
        return InvalidRequestError(str(e))
    if isinstance(e, (TreeTargetError, TreeDigestError, TreeSourceError)):
        return FailedError(str(e))
    log.error("unexpected failure in a tree operation", exc_info=e)
    return UnexpectedError("unexpected error on the slave (details in its log)")


class _Receiver:
    """Reads the master's record stream up to its end box."""

    def __init__(self, request: Request) -> None:
        self.wire = request.wire
        self.timeout = request.io_timeout
        self.ended = False

    def next(self) -> Optional[Box]:
        """The next record box, or ``None`` once the end box came (kept in
        :attr:`end`)."""
        box = self.wire.read_box(self.timeout)
        if box is None:
            raise Disconnected(f"{self.wire.label}: connection closed during a tree transfer")
        if END in box or ABORT in box:
            self.ended = True
            self.end = box
            return None
        return box

    def drain(self) -> None:
        """Read and drop records up to the end box."""
        while not self.ended:
            self.next()

    def aborted(self) -> None:
        """Raise for an ``abort`` end box."""
        if ABORT in self.end:
            reason = self.end[ABORT].decode("utf-8", "replace")
            raise FailedError(f"master aborted the transfer: {reason}; nothing was kept")


def _fail(request: Request, receiver: _Receiver, error: BaseException) -> None:
    """Send the final error box now, then read what the master still sends."""
    request.wire.send_box(error_box(_as_remote(error)))
    receiver.drain()


# -- send_tree -----------------------------------------------------------------------


def receive_tree(request: Request, args: Dict[str, Any]) -> None:
    """``send_tree``: build the master's tree at ``dest``, atomically."""
    dest = request.path(args["dest"])
    receiver = _Receiver(request)
    parent = top = -1
    tmp: Optional[bytes] = None
    writer: Optional[Writer] = None
    failure: Optional[BaseException] = None
    try:
        parent, name = open_parent(request.policy, dest)
        fsops.refuse_existing(parent, name, dest)
        try:
            tmp = make_temp_dir(parent, name)
            top = os.open(tmp, DIR_OPEN, dir_fd=parent)
        except OSError as e:
            raise FailedError(f"cannot make a temporary directory: {e.strerror}: {os.fsdecode(dest)}") from None
        writer = Writer(top)
        while True:
            box = receiver.next()
            if box is None:
                break
            writer.feed(_policed(request.policy, box))
        receiver.aborted()
        if not writer.done:
            raise InvalidRequestError("the tree stream ended before its top directory was left")
        writer.close()
        os.close(top)
        top = -1
        try:
            place_dir(parent, tmp, name)
        except FileExistsError:
            raise RemoteFileExistsError(f"destination appeared meanwhile: {os.fsdecode(dest)}") from None
        except OSError as e:
            raise FailedError(f"cannot put the tree in place: {e.strerror}: {os.fsdecode(dest)}") from None
        tmp = None
    except (Disconnected, InterruptedError):
        raise
    except Exception as e:  # noqa: BLE001 - every failure becomes the final error box
        failure = e
    finally:
        _cleanup(writer, top, parent, tmp)
    if failure is not None:
        _fail(request, receiver, failure)
    else:
        request.wire.send_bytes(END_OF_BOX)


def _cleanup(writer: Optional[Writer], top: int, parent: int, tmp: Optional[bytes]) -> None:
    if writer is not None:
        writer.close()
    if top >= 0:
        os.close(top)
    if tmp is not None and parent >= 0:
        try:
            remove_dir_at(parent, tmp)
        except OSError as e:
            log.warning("cannot remove temporary directory %r: %s", tmp, e)
    if parent >= 0:
        os.close(parent)


# -- fetch_tree ------------------------------------------------------------------------


class _InterruptWatch:
    """Looks, at most every :data:`POLL_EVERY` seconds, whether the master
    sent ``{interrupt: y}``."""

    def __init__(self, request: Request) -> None:
        self.wire = request.wire
        self.next = time.monotonic()  # the first look at once: an early interrupt stops the first file
        self.seen = False

    def __call__(self) -> bool:
        now = time.monotonic()
        if now < self.next:
            return self.seen
        self.next = now + POLL_EVERY
        for box in received_boxes(self.wire):
            if b"interrupt" in box:
                self.seen = True
        return self.seen


def send_tree_to_master(request: Request, args: Dict[str, Any]) -> None:
    """``fetch_tree``: send the tree at ``src``."""
    src = request.path(args["src"])
    wire = request.wire
    try:
        fd = request.policy.open(src, os.O_RDONLY | O_DIRECTORY | O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError) as e:
        if isinstance(e, NotADirectoryError) and fsops.stat_kind(src, request.policy):
            raise OpenFailedError(f"not a directory: {os.fsdecode(src)}") from None
        raise NotFoundError(f"no such directory: {os.fsdecode(src)}") from None
    except OSError as e:
        raise OpenFailedError(f"{e.strerror}: {os.fsdecode(src)}") from None
    try:
        try:
            found = scan(fd)
        except TreeSourceError as e:
            raise FailedError(str(e)) from None
        if found.others:
            raise FailedError(others_message(found.others, fd))
        wire.send_box({b"files": b"%d" % found.files, b"size": b"%d" % found.size})
        watch = _InterruptWatch(request)
        sender = Sender(wire.send_bytes, poll=watch)
        try:
            complete = sender.tree(fd)
        except TreeSourceError as e:
            raise FailedError(str(e)) from None
        if not complete:
            raise FailedError("stopped at the master's request")
        sender.flush()
    finally:
        os.close(fd)
    wire.send_box({END: b"y"})


# -- sync_tree -------------------------------------------------------------------------------


def sync_tree(request: Request, args: Dict[str, Any]) -> None:
    """``sync_tree``: report ``dest``, then apply the master's changes."""
    dest = request.path(args["dest"])
    wire = request.wire
    parent, name = open_parent(request.policy, dest)
    top = -1
    try:
        try:
            top = request.policy.open(dest, os.O_RDONLY | O_DIRECTORY | O_NONBLOCK)
        except FileNotFoundError:
            pass
        except NotADirectoryError:
            raise FailedError(f"the destination exists and is not a directory: {os.fsdecode(dest)}") from None
        except OSError as e:
            raise FailedError(f"{e.strerror}: {os.fsdecode(dest)}") from None
        if top >= 0:
            sender = Sender(wire.send_bytes)
            try:
                for record in manifest_records(top, bool(args.get("checksum"))):
                    sender.add(record)
            except TreeSourceError as e:
                raise FailedError(str(e)) from None
            sender.flush()
        wire.send_box({END: b"y"})
        _apply(request, parent, name, top, dest)
    finally:
        if top >= 0:
            os.close(top)
        os.close(parent)


def _apply(request: Request, parent: int, name: bytes, top: int, dest: bytes) -> None:
    """Phase two of ``sync_tree``: apply the master's records to ``dest``."""
    receiver = _Receiver(request)
    writer: Optional[Writer] = None
    made = -1
    failure: Optional[BaseException] = None
    try:
        box = receiver.next()
        if box is not None and top < 0:
            try:
                os.mkdir(name, 0o700, dir_fd=parent)
            except FileExistsError:
                pass
            except OSError as e:
                raise FailedError(f"cannot make the destination: {e.strerror}: {os.fsdecode(dest)}") from None
            try:
                made = top = os.open(name, DIR_OPEN, dir_fd=parent)
            except OSError as e:
                raise FailedError(f"cannot open the destination: {e.strerror}: {os.fsdecode(dest)}") from None
        writer = Writer(top, sync=True, remove_dir=remove_dir_at)
        while box is not None:
            writer.feed(_policed(request.policy, box))
            box = receiver.next()
        receiver.aborted()
        if not writer.done:
            raise InvalidRequestError("the tree stream ended before its top directory was left")
    except (Disconnected, InterruptedError):
        raise
    except Exception as e:  # noqa: BLE001 - every failure becomes the final error box
        failure = e
    finally:
        if writer is not None:
            writer.close()
        if made >= 0:
            os.close(made)
    if failure is not None:
        _fail(request, receiver, failure)
    else:
        request.wire.send_bytes(END_OF_BOX)
