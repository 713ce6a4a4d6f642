"""The master's side of the directory-tree operations, behind
:meth:`Slave.send_tree <remsh.master.slave.Slave.send_tree>`,
:meth:`~remsh.master.slave.Slave.fetch_tree` and
:meth:`~remsh.master.slave.Slave.sync_tree`.

The conversations are described in :mod:`remsh.slave.tree` and the record
format in :mod:`remsh.treestream`.  The master never waits for the slave
between files: it streams, and looks now and then (without blocking) whether
the slave has already answered -- a slave that fails midway answers at once,
so the master stops sending instead of pushing the rest of a big tree to a
slave that drops it.

Failures on the master's own side (its source unreadable, its destination
unwritable) are :class:`~remsh.errors.LocalError` and are raised only once
the conversation has ended in step, so the slave stays connected.

Memory: ``send_tree`` and ``fetch_tree`` hold one directory listing per
level of the tree being walked and one block of data, whatever the size of
the tree.  ``sync_tree`` holds the slave's manifest (one small entry per
file, as rsync holds its file list).
"""

from __future__ import annotations

import os
import stat as stat_mod
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

from remsh.dirremove import remove_dir_at
from remsh.errors import (LimitExceeded, LocalError, ProtocolError, TreeDigestError, TreeSourceError, TreeStreamError,
                          TreeTargetError, UsageError)
from remsh.files import O_CLOEXEC, O_DIRECTORY
from remsh.master.operation import OperationFrame, OperationHost, Path
from remsh.master.progress import Progress, ProgressCallback
from remsh.protocol.trees import (Alive, Announced, Answered, Completed, Failed, FetchTreeCall, Manifest, Record,
                                  SendTreeCall, Stop, SyncTreeCall)
# the bound on what is still read after an interrupt, shared with fetch (remsh.master.fetchfile)
from remsh.protocol.trees import DRAIN_LIMIT as DRAIN_LIMIT
from remsh.treemanifest import ManifestReader, file_digest
from remsh.treestream import (ATTRS, DIR, FILE, LINK, MT, OTHER, REMOVE, UP, M, N, Sender, T, encode,
                              others_message, scan, walk)
from remsh.treewriter import Writer, make_temp_dir, place_dir


#: Least time between two looks for an early answer from the slave.
PEEK_EVERY = 0.05
#: The permission bits ``fetch_tree`` keeps of a slave's files and
#: directories, before the master's umask narrows them: all but the
#: set-user-ID, set-group-ID and sticky bits -- a slave must not be able to
#: leave a program on the master that runs as the master's user (root,
#: often), nor a directory more open than the master's own would be.
FETCHED_FILE_MODES = 0o777
#: Most levels of directories below the top that ``fetch_tree`` makes: each
#: level holds a descriptor open while the stream is inside it.
MAX_FETCH_DEPTH = 256


def current_umask() -> int:
    """This process's umask, read without changing it where the system
    tells (Linux's ``/proc/self/status``); else set and restored at once."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def fetched_modes() -> int:
    """The permission bits ``fetch_tree`` gives at most: the slave's, less
    the set-ID and sticky bits and the master's umask."""
    return FETCHED_FILE_MODES & ~current_umask()


@dataclass
class SyncResult:
    """What :meth:`Slave.sync_tree <remsh.master.slave.Slave.sync_tree>` did.

    ``sent_files``: regular files and symbolic links written on the slave;
    ``sent_bytes``: the data of those files; ``deleted``: entries removed
    from the slave (each file, link and directory counted, those inside a
    removed directory too); ``unchanged``: regular files and links left as
    they were (a file whose permission bits or time alone differed counts
    here: only those are set).
    """

    sent_files: int = 0
    sent_bytes: int = 0
    deleted: int = 0
    unchanged: int = 0


def open_local_dir(name: str, meth: str, path: Path) -> int:
    """A descriptor of the local directory ``path`` that tree operation
    ``meth`` of slave ``name`` sends (both drivers).

    :raises LocalError: it is not a directory or cannot be opened
    """
    p = os.fsencode(path)
    try:
        return os.open(p, os.O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    except NotADirectoryError:
        raise LocalError(f"{name}: {meth}: not a directory: {os.fsdecode(p)}") from None
    except OSError as e:
        raise LocalError(f"{name}: {meth}: cannot open local directory: {e}") from e


class _Peek:
    """Whether the slave has answered already (a failure while the master is
    still sending); looks at most every :data:`PEEK_EVERY` seconds and never
    blocks.  What it finds goes to the conversation."""

    def __init__(self, op: OperationFrame, call: SendTreeCall) -> None:
        self.op = op
        self.call = call
        self._next = time.monotonic() + PEEK_EVERY

    def __call__(self) -> bool:
        if self.call.answered is not None:
            return True
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + PEEK_EVERY
        for box in self.op.received():
            if isinstance(self.call.receive(box), Answered):
                return True
        return False


def _finish_stream(op: OperationFrame, call: SendTreeCall, sender: Sender,
                   local_error: Optional[Exception]) -> Union[Completed, Failed, None]:
    """Send the end of the master's stream and return the slave's final
    answer (``None`` when the master's own tree failed: the slave's answer
    only echoes that)."""
    if call.answered is None and (local_error is not None or not sender.stopped):
        sender.flush()
    op.send_bytes(call.finish(None if local_error is None else str(local_error)))
    while not call.done:
        call.receive(op.read())
    return call.outcome


def _check(op: OperationFrame, outcome: object) -> None:
    """Raise the slave's error when the conversation ended with one."""
    if isinstance(outcome, Failed):
        raise op.named(outcome.error)


# -- send_tree -----------------------------------------------------------------------------


def send_tree(slave: OperationHost, src_dir: Path, dest: Path, progress: Optional[ProgressCallback]) -> None:
    """See :meth:`remsh.master.slave.Slave.send_tree`."""
    meth = "send_tree"
    top = open_local_dir(slave.name, meth, src_dir)
    try:
        try:
            found = scan(top)
        except TreeSourceError as e:
            raise LocalError(f"{slave.name}: {meth}: {e}") from None
        if found.others:
            raise LocalError(f"{slave.name}: {meth}: {others_message(found.others, top)}")
        counter = Progress(progress, found.size)
        call = SendTreeCall(dest)
        local_error: Optional[Exception] = None
        with slave.operation(meth) as op:
            op.send_bytes(call.request())
            sender = Sender(op.send_bytes, counter.add, _Peek(op, call))
            try:
                sender.tree(top)
            except TreeSourceError as e:
                local_error = e
            outcome = _finish_stream(op, call, sender, local_error)
        if local_error is not None:
            raise LocalError(f"{slave.name}: {meth}: {local_error}; nothing was kept on the slave")
        _check(op, outcome)
        counter.finish()
    finally:
        os.close(top)


# -- fetch_tree ----------------------------------------------------------------------------


def local_parent(name: str, meth: str, path: Path) -> Tuple[int, bytes]:
    """A descriptor of the local directory that will hold ``path`` and its
    last component, for ``fetch_tree`` ``meth`` of slave ``name`` (both
    drivers); ``path`` must not exist.

    :raises UsageError: ``path`` does not end in a name
    :raises LocalError: ``path`` exists, or its directory cannot be opened
    """
    p = os.fsencode(path).rstrip(b"/")
    head, _, last = p.rpartition(b"/")
    if last in (b"", b".", b".."):
        raise UsageError(f"{name}: {meth}: the destination must end in a name: {os.fsdecode(path)}")
    if not head and p.startswith(b"/"):
        head = b"/"
    if os.path.lexists(p):
        raise LocalError(f"{name}: {meth}: local destination exists: {os.fsdecode(p)}")
    try:
        return os.open(head or b".", os.O_RDONLY | O_DIRECTORY | O_CLOEXEC), last
    except OSError as e:
        raise LocalError(f"{name}: {meth}: cannot open the local destination's directory: {e}") from e


class _Bound(Exception):
    """The file data passed ``max_bytes`` (raised out of the writer)."""


def fetch_tree(slave: OperationHost, src: Path, dest_dir: Path, progress: Optional[ProgressCallback],
               max_bytes: Optional[int] = None, max_entries: Optional[int] = None) -> None:
    """See :meth:`remsh.master.slave.Slave.fetch_tree`."""
    meth = "fetch_tree"
    parent, name = local_parent(slave.name, meth, dest_dir)
    tmp: Optional[bytes] = None
    top = -1
    writer: Optional[Writer] = None
    local_error: Optional[Exception] = None
    counter = Progress(progress, None)
    try:
        with slave.operation(meth) as op:
            call = FetchTreeCall(src, op.progress_interval, max_bytes=max_bytes, max_entries=max_entries)

            def on_data(n: int) -> None:
                counter.add(n)
                if not call.file_data(n):
                    raise _Bound()

            op.send_bytes(call.request())
            while True:
                event = call.receive(op.read())
                if event is None or isinstance(event, Alive):
                    continue
                if isinstance(event, Record):
                    assert writer is not None
                    try:
                        writer.feed(event.box)
                    except _Bound:
                        op.send_bytes(call.stop_for_limit())
                    except TreeTargetError as e:
                        local_error = e
                        op.send_bytes(call.stop() or b"")
                    except (TreeStreamError, TreeDigestError) as e:
                        raise ProtocolError(str(e)) from None
                elif isinstance(event, Announced):
                    if event.stop is not None:
                        op.send_bytes(event.stop)
                        continue
                    counter = Progress(progress, event.size)
                    try:
                        tmp = make_temp_dir(parent, name)
                        top = os.open(tmp, os.O_RDONLY | O_DIRECTORY | O_CLOEXEC, dir_fd=parent)
                        modes = fetched_modes()
                        writer = Writer(top, on_data=on_data, file_mode_mask=modes, dir_mode_mask=modes,
                                        max_depth=MAX_FETCH_DEPTH)
                    except OSError as e:
                        local_error = e
                        op.send_bytes(call.stop() or b"")
                elif isinstance(event, Stop):
                    op.send_bytes(event.send)
                else:  # Ended, Stopped, Failed: the last box
                    break
        if call.limit is not None:  # whatever the final box says: ours is the cause
            raise LimitExceeded(f"{slave.name}: {meth}: {os.fsdecode(src)} passed {call.limit}; the transfer "
                                f"was stopped and nothing was kept")
        if local_error is not None:
            raise LocalError(f"{slave.name}: {meth}: writing the local tree failed: {local_error}; "
                             f"nothing was kept") from local_error
        _check(op, event)
        assert writer is not None and tmp is not None
        if not writer.done:
            raise op.protocol_error("the tree stream ended before its top directory was left")
        writer.close()
        os.close(top)
        top = -1
        try:
            place_dir(parent, tmp, name)
        except FileExistsError:
            raise LocalError(f"{slave.name}: {meth}: local destination appeared meanwhile: "
                             f"{os.fsdecode(dest_dir)}") from None
        except OSError as e:
            raise LocalError(f"{slave.name}: {meth}: cannot put the local tree in place: {e}") from e
        tmp = None
        counter.finish()
    finally:
        if writer is not None:
            writer.close()
        if top >= 0:
            os.close(top)
        if tmp is not None:
            try:
                remove_dir_at(parent, tmp, None)
            except OSError:
                pass
        os.close(parent)


# -- sync_tree -------------------------------------------------------------------------------

_SEND, _ATTRS = 1, 2


def plan_changes(top: int, manifest: ManifestReader, checksum: bool) -> Tuple[Dict[bytes, int], int, List[bytes]]:
    """Compare the local tree with the slave's manifest: ``{path: _SEND or
    _ATTRS}`` for the files and links that need something (absent: the same
    already), the bytes to send, and the paths that cannot be copied (both
    masters: this one and :mod:`remsh.aio.trees`)."""
    plan: Dict[bytes, int] = {}
    total = 0
    others: List[bytes] = []
    known = manifest.entries
    for e in walk(top):
        if e.kind == FILE:
            st = e.st
            assert st is not None
            k = known.get(e.rel)
            same = False
            if k is not None and k.kind == FILE and k.size == st.st_size:
                if checksum:
                    same = k.digest is not None and k.digest == file_digest(e.dir_fd, e.name)
                else:
                    same = k.mtime == st.st_mtime_ns
            if not same:
                plan[e.rel] = _SEND
                total += st.st_size
            elif k is not None and (k.mode != stat_mod.S_IMODE(st.st_mode) or k.mtime != st.st_mtime_ns):
                plan[e.rel] = _ATTRS
        elif e.kind == LINK:
            k = known.get(e.rel)
            try:
                target = os.readlink(e.name, dir_fd=e.dir_fd)
            except OSError:
                target = None
            if k is None or k.kind != LINK or k.target != target:
                plan[e.rel] = _SEND
        elif e.kind == OTHER:
            others.append(e.rel)
    return plan, total, others


def sync_tree(slave: OperationHost, src_dir: Path, dest: Path, delete: bool, checksum: bool,
              progress: Optional[ProgressCallback]) -> SyncResult:
    """See :meth:`remsh.master.slave.Slave.sync_tree`."""
    meth = "sync_tree"
    top = open_local_dir(slave.name, meth, src_dir)
    result = SyncResult()
    local_error: Optional[Exception] = None
    counter: Optional[Progress] = None
    try:
        with slave.operation(meth) as op:
            call = SyncTreeCall(dest, checksum, op.progress_interval)
            op.send_bytes(call.request())
            event = None
            while not call.done and not isinstance(event, Manifest):
                event = call.receive(op.read())
            if isinstance(event, Manifest):
                manifest = event.manifest
                try:
                    plan, total, others = plan_changes(top, manifest, checksum)
                    if others:
                        local_error = TreeSourceError(others_message(others, top))
                    counter = Progress(progress, total)
                except TreeSourceError as e:
                    local_error = e
                sender = Sender(op.send_bytes, counter.add if counter else (lambda n: None), _Peek(op, call))
                if local_error is None:
                    try:
                        send_changes(sender, top, manifest, plan, delete, result)
                    except TreeSourceError as e:
                        local_error = e
                _finish_stream(op, call, sender, local_error)
        if local_error is not None:
            raise LocalError(f"{slave.name}: {meth}: {local_error}")
        _check(op, call.outcome)
        if counter is not None:
            counter.finish()
        return result
    finally:
        os.close(top)


def send_changes(sender: Sender, top: int, manifest: ManifestReader, plan: Dict[bytes, int], delete: bool,
                 result: SyncResult) -> None:
    """Phase two of ``sync_tree``: stream what differs (both masters:
    this one and :mod:`remsh.aio.trees`)."""
    known = manifest.entries
    for e in walk(top):
        if e.kind == UP:
            sender.up()
            continue
        st = e.st
        assert st is not None
        k = known.get(e.rel)
        if e.kind == DIR:
            sender.dir(e)
            if k is not None and k.kind == DIR:
                here = set(e.names)
                for name in manifest.children.get(e.rel, ()):
                    if name not in here:
                        if delete:
                            sender.add(encode(T, REMOVE, N, name))
                            result.deleted += known[e.rel + b"/" + name if e.rel else name].entries
            continue
        if k is not None and k.kind == DIR:
            result.deleted += k.entries - 1  # replaced: what was inside goes
        action = plan.get(e.rel, _SEND if k is None else 0)
        if e.kind == FILE:
            if action == _SEND:
                result.sent_bytes += sender.file(e)
                result.sent_files += 1
                if sender.stopped:
                    return
            else:
                if action == _ATTRS:
                    sender.add(encode(T, ATTRS, N, e.name, M, b"%d" % stat_mod.S_IMODE(st.st_mode),
                                      MT, b"%d" % st.st_mtime_ns))
                result.unchanged += 1
        elif e.kind == LINK:
            if action == _SEND:
                sender.link(e)
                result.sent_files += 1
            else:
                result.unchanged += 1
        else:
            raise TreeSourceError(f"appeared while being sent and cannot be copied: {e.rel!r}")
        if sender.stopped or sender.poll():
            sender.stopped = True
            return

