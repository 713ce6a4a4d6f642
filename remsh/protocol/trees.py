"""The tree conversations of the master (``send_tree``, ``fetch_tree``,
``sync_tree``), as objects that do no I/O.

They keep the rules of each conversation -- which box may come when, the
totals a slave announced, the caller's bounds, how much may still arrive
after an interrupt -- and leave the files to their drivers
(:mod:`remsh.master.tree` reads the local tree with
:class:`~remsh.treestream.Sender` and writes it with
:class:`~remsh.treewriter.Writer`).  The record format is
:mod:`remsh.treestream`'s.

``send_tree`` (:class:`SendTreeCall`)::

    idle --request()--> streaming --finish()--> finishing --final box--> done
                            |
                            \\--a box other than liveness: answered early
                                (finish() then ends with an abort; done)

The master streams its records while the slave says nothing but liveness
boxes; a slave that fails midway answers at once (an error box), and the
master ends its stream with ``{abort: ...}``.  The final box is empty (the
tree is in place) or an error box.

``fetch_tree`` (:class:`FetchTreeCall`)::

    idle --request()--> announced? --first box--> receiving --{end: y}--> done
                                                     |  \\--error box--> done
                                                     \\--stop()--> stopping --final--> done

The slave's first box announces its totals (``files``, ``size``); then come
the records and ``{end: y}``.  The master stops it with ``{interrupt: y}``
(a bound passed, or its own side failed) and drops what is still on its way,
up to ``drain_limit`` bytes.

``sync_tree`` (:class:`SyncTreeCall`) begins with the slave's manifest
(records up to ``{end: y}``, kept in a
:class:`~remsh.treemanifest.ManifestReader`), then goes on as ``send_tree``.
"""

from __future__ import annotations

import enum
import os
from typing import NamedTuple, Optional, Union

from remsh.conversation import Failed, PathArg
from remsh.errors import ProtocolError, TreeStreamError, UsageError, remote_error
from remsh.ops import FETCH_TREE, SEND_TREE, SYNC_TREE, is_progress
from remsh.treemanifest import ManifestReader
from remsh.treestream import ABORT, DIR, END, FILE, LINK, T
from remsh.wire import Box, encode_box

__all__ = ["SendTreeCall", "SyncTreeCall", "FetchTreeCall", "TreeState", "Alive", "Answered", "Completed",
           "Manifest", "Announced", "Record", "Stop", "Ended", "Stopped", "Failed", "INTERRUPT_BOX",
           "DRAIN_LIMIT"]

#: What stops a ``fetch_tree`` on the slave.
INTERRUPT_BOX = encode_box({b"interrupt": b"y"})
#: Bytes a slave may still send after it was told to stop before it is
#: judged broken: the data already on its way when the interrupt reached it.
DRAIN_LIMIT = 256 << 20


class TreeState(enum.Enum):
    IDLE = "idle"
    MANIFEST = "manifest"      # sync_tree: the slave's manifest comes
    STREAMING = "streaming"    # send_tree/sync_tree: the master's records go
    FINISHING = "finishing"    # the master's end box went; the final box comes
    ANNOUNCED = "announced"    # fetch_tree: the totals come first
    RECEIVING = "receiving"    # fetch_tree: records come
    STOPPING = "stopping"      # fetch_tree: interrupted; the rest is dropped
    DONE = "done"


class Alive(NamedTuple):
    """A liveness box: the slave is working; restart the reply deadline."""


class Answered(NamedTuple):
    """The slave answered while the master was still streaming (it failed
    midway): stop sending and :meth:`~SendTreeCall.finish`."""


class Completed(NamedTuple):
    """The slave put the tree in place (``send_tree``) or applied every
    change (``sync_tree``)."""


class Manifest(NamedTuple):
    """``sync_tree``: the slave's manifest is complete; stream the changes."""

    manifest: ManifestReader


class Announced(NamedTuple):
    """``fetch_tree``: the slave's totals (``None``: not announced).  When
    ``stop`` is not ``None`` they pass a bound: send it; nothing is written."""

    size: Optional[int]
    files: Optional[int]
    stop: Optional[bytes]


class Record(NamedTuple):
    """``fetch_tree``: one record of the tree, for the writer."""

    box: Box


class Stop(NamedTuple):
    """``fetch_tree``: the tree passed a bound: send ``send`` (the interrupt)
    now; what still comes is dropped."""

    send: bytes


class Ended(NamedTuple):
    """``fetch_tree``: the slave sent the whole tree."""


class Stopped(NamedTuple):
    """``fetch_tree`` ended after the master stopped it: ``limit`` names the
    bound passed, or is ``None`` when the master's own side failed (whatever
    the slave's final box said, the master's is the cause)."""

    limit: Optional[str]


def _failed(box: Box) -> Failed:
    return Failed(remote_error(box[b"errtag"].decode("ascii", "replace"),
                               box.get(b"error", b"").decode("utf-8", "replace")))


class _Call:
    meth = ""

    def __init__(self) -> None:
        self.state = TreeState.IDLE

    @property
    def done(self) -> bool:
        return self.state is TreeState.DONE

    def _refuse(self, what: str) -> ProtocolError:
        state = self.state
        self.state = TreeState.DONE
        return ProtocolError(f"{self.meth}: {what} in state {state.value}")

    def _expect(self, state: TreeState, what: str) -> None:
        if self.state is not state:
            raise UsageError(f"{self.meth}: {what} in state {self.state.value}")


class SendTreeCall(_Call):
    """The master's side of one ``send_tree`` (see the module docstring).

    :ivar answered: the box the slave answered with while the master was
        still streaming (``None``: it did not)
    """

    meth = "send_tree"

    def __init__(self, dest: PathArg) -> None:
        super().__init__()
        self._request = SEND_TREE.encode(dest=os.fsencode(dest))
        self.answered: Optional[Box] = None
        self.outcome: Union[Completed, Failed, None] = None

    def request(self) -> bytes:
        """The request bytes; the master's records follow at once."""
        self._expect(TreeState.IDLE, "request")
        self.state = TreeState.STREAMING
        return self._request

    def finish(self, local_error: Optional[str] = None) -> bytes:
        """The end box of the master's stream: ``{end: y}``, or an abort when
        its own tree failed (``local_error``) or the slave answered early.
        After an early answer the call is done: its event is :attr:`outcome`."""
        self._expect(TreeState.STREAMING, "finish")
        if local_error is not None:
            box = {ABORT: f"master could not read its tree: {local_error}".encode("utf-8", "replace")[:1000]}
        elif self.answered is not None:
            box = {ABORT: b"the slave answered before the end"}
        else:
            box = {END: b"y"}
        if self.answered is not None:
            self.state = TreeState.DONE
            self.outcome = self._final(self.answered, early=True)
        else:
            self.state = TreeState.FINISHING
        return encode_box(box)

    def _final(self, box: Box, early: bool = False) -> Union[Completed, Failed]:
        if b"errtag" in box:
            return _failed(box)
        if box or early:
            raise ProtocolError(f"{self.meth}: expected an empty or error box as the final answer, "
                                f"got keys {sorted(box)[:8]}")
        return Completed()

    def receive(self, box: Box) -> Union[Alive, Answered, Completed, Failed, Manifest, None]:
        """The event the slave's ``box`` means (``None``: a manifest record,
        kept; :class:`Manifest` only for ``sync_tree``).

        :raises ProtocolError: a box the state does not allow (state: done)
        """
        state = self.state
        if state not in (TreeState.STREAMING, TreeState.FINISHING, TreeState.MANIFEST):
            raise self._refuse("box from the slave")
        if is_progress(box):
            return Alive()
        if state is TreeState.MANIFEST:
            return self._manifest_box(box)
        if state is TreeState.STREAMING:
            if self.answered is not None:
                raise self._refuse("a second box after the early answer")
            self.answered = box
            return Answered()
        self.state = TreeState.DONE
        self.outcome = self._final(box)
        return self.outcome

    def _manifest_box(self, box: Box) -> Union[Failed, Manifest, None]:
        raise self._refuse("box from the slave")


class SyncTreeCall(SendTreeCall):
    """The master's side of one ``sync_tree``: the slave's manifest, then as
    :class:`SendTreeCall`.  :attr:`manifest` holds what the slave has."""

    meth = "sync_tree"

    def __init__(self, dest: PathArg, checksum: bool = False, progress: Optional[float] = None) -> None:
        _Call.__init__(self)
        self._request = SYNC_TREE.encode(dest=os.fsencode(dest), checksum=checksum, progress=progress)
        self.answered = None
        self.outcome = None
        self.manifest = ManifestReader()

    def request(self) -> bytes:
        """The request bytes; the slave's manifest comes next."""
        self._expect(TreeState.IDLE, "request")
        self.state = TreeState.MANIFEST
        return self._request

    def _manifest_box(self, box: Box) -> Union[Failed, Manifest, None]:
        if b"errtag" in box:
            self.state = TreeState.DONE
            self.outcome = _failed(box)
            return self.outcome
        if END in box:
            self.state = TreeState.STREAMING
            return Manifest(self.manifest)
        try:
            self.manifest.feed(box)
        except TreeStreamError as e:
            self.state = TreeState.DONE
            raise ProtocolError(f"{self.meth}: bad manifest: {e}") from None
        return None


class FetchTreeCall(_Call):
    """The master's side of one ``fetch_tree`` (see the module docstring).

    :ivar entries: files, directories and links received
    :ivar data: file data bytes counted (:meth:`file_data`)
    :ivar limit: the bound that stopped the transfer, in words (``None``:
        none did)
    """

    meth = "fetch_tree"

    def __init__(self, src: PathArg, progress: Optional[float] = None, *, max_bytes: Optional[int] = None,
                 max_entries: Optional[int] = None, drain_limit: int = DRAIN_LIMIT) -> None:
        super().__init__()
        for name, value in (("max_bytes", max_bytes), ("max_entries", max_entries)):
            if value is not None and value < 0:
                raise UsageError(f"{name} must be 0 or more")
        self._request = FETCH_TREE.encode(src=os.fsencode(src), progress=progress)
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.drain_limit = drain_limit
        self.size: Optional[int] = None
        self.files_announced: Optional[int] = None
        self.entries = self.files = self.data = self.drained = 0
        self.limit: Optional[str] = None
        #: the master told the slave to stop
        self.stopped = False

    def request(self) -> bytes:
        """The request bytes."""
        self._expect(TreeState.IDLE, "request")
        self.state = TreeState.ANNOUNCED
        return self._request

    def stop(self) -> Optional[bytes]:
        """The interrupt to send when the master's side fails or its caller
        gives up (once, while records may still come), else ``None``."""
        if self.state is not TreeState.RECEIVING:
            return None
        self.state = TreeState.STOPPING
        self.stopped = True
        return INTERRUPT_BOX

    def _limit_passed(self, what: str) -> bytes:
        self.limit = what
        self.state = TreeState.STOPPING
        self.stopped = True
        return INTERRUPT_BOX

    def file_data(self, n: int) -> bool:
        """Count ``n`` bytes of file data written; ``False`` once they pass
        ``max_bytes`` (then :meth:`stop_for_limit` gives the interrupt).

        :raises ProtocolError: more data than the slave announced
        """
        self.data += n
        if self.size is not None and self.data > self.size:
            self.state = TreeState.DONE
            raise ProtocolError(f"{self.meth}: more file data than the {self.size} bytes announced")
        return self.max_bytes is None or self.data <= self.max_bytes

    def stop_for_limit(self) -> bytes:
        """The interrupt after :meth:`file_data` said ``False``."""
        if self.state is not TreeState.RECEIVING:
            raise UsageError(f"{self.meth}: stop_for_limit in state {self.state.value}")
        return self._limit_passed(f"max_bytes ({self.max_bytes})")

    @staticmethod
    def _announced(box: Box, key: bytes) -> Optional[int]:
        try:
            value = int(box[key])
        except (KeyError, ValueError):
            return None
        return value if value >= 0 else None

    def receive(self, box: Box) -> Union[Alive, Announced, Record, Stop, Ended, Stopped, Failed, None]:
        """The event the slave's ``box`` means (``None``: dropped after a stop).

        :raises ProtocolError: a box the state does not allow, more entries
            than announced, or more than ``drain_limit`` bytes after a stop
            (state: done)
        """
        state = self.state
        if state is TreeState.DONE or state is TreeState.IDLE:
            raise self._refuse("box from the slave")
        if is_progress(box):
            return Alive()
        if state is TreeState.ANNOUNCED:
            if b"errtag" in box:
                self.state = TreeState.DONE
                return _failed(box)
            self.size, self.files_announced = self._announced(box, b"size"), self._announced(box, b"files")
            self.state = TreeState.RECEIVING
            stop: Optional[bytes] = None
            if self.max_bytes is not None and self.size is not None and self.size > self.max_bytes:
                stop = self._limit_passed(f"max_bytes ({self.max_bytes}; {self.size} bytes announced)")
            elif (self.max_entries is not None and self.files_announced is not None
                  and self.files_announced > self.max_entries):
                stop = self._limit_passed(f"max_entries ({self.max_entries}; {self.files_announced} files "
                                          f"announced)")
            return Announced(self.size, self.files_announced, stop)
        final = b"errtag" in box or END in box
        if state is TreeState.STOPPING:
            if final:
                self.state = TreeState.DONE
                return Stopped(self.limit)
            self.drained += sum(len(v) for v in box.values())
            if self.drained > self.drain_limit:
                self.state = TreeState.DONE
                raise ProtocolError(f"{self.meth}: still sending {self.drain_limit} bytes after the interrupt")
            return None
        # RECEIVING
        if b"errtag" in box:
            self.state = TreeState.DONE
            return _failed(box)
        if END in box:
            self.state = TreeState.DONE
            return Ended()
        t = box.get(T)
        if t in (DIR, FILE, LINK):
            self.entries += 1
            if t == FILE:
                self.files += 1
                if self.files_announced is not None and self.files > self.files_announced:
                    self.state = TreeState.DONE
                    raise ProtocolError(f"{self.meth}: more files than the {self.files_announced} announced")
            if self.max_entries is not None and self.entries > self.max_entries:
                return Stop(self._limit_passed(f"max_entries ({self.max_entries})"))
        return Record(box)
