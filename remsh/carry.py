"""Bytes of a ``put`` or a ``get`` crossing masters through the PostgreSQL
job store (:mod:`remsh.crossmaster`): written as a blob of rows of
:data:`~remsh.store.pgdispatch.CHUNK` bytes (``remsh_blobs``) with its size
and SHA-256, read back and checked before anything is put in place.  A
file keeps its permission bits; a tree goes as a tar stream and is
unpacked with the ``data`` filter (nothing outside it, no devices).

Rejected: one row per file (a 256 MiB ``bytea`` is one allocation on both
sides and past the statement timeout); large objects (``lo_*``: their
permissions and clean-up are apart from the tables' and the job's
retention).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Set, Tuple, TypeVar, cast

from remsh.errors import LimitExceeded, LocalError, RemshError
from remsh.files import PartialFile
from remsh.replace import hidden_beside
from remsh.sendsource import place_fetched
from remsh.store import pgdispatch
from remsh.store.base import JobStore
from remsh.store.fencing import MasterRow

T = TypeVar("T")

#: The most bytes :func:`load_path` takes unless told (that of :data:`remsh.crossmaster.MAX_CARRIED`).
LIMIT = 256 << 20


class CarryFailed(RemshError):
    """The bytes of a put or a get could not cross between two masters
    through the store (a chunk missing, a digest that does not match)."""

    tag = "carry"


class DispatchingStore(Protocol):
    """What a store that carries work between masters offers
    (:class:`remsh.store.postgres.PostgresJobStore`)."""

    name: str
    epoch: int

    def dispatch_write(self, fn: Callable[..., T], *args: Any, repeatable: bool = True) -> T: ...

    def dispatch_read(self, fn: Callable[..., T], *args: Any) -> T: ...

    def masters(self) -> List[MasterRow]: ...


def dispatching(store: JobStore) -> Optional[DispatchingStore]:
    """``store`` if it carries work between masters, else ``None`` (SQLite)."""
    if hasattr(store, "dispatch_write") and hasattr(store, "masters"):
        return cast(DispatchingStore, store)
    return None


# -- bytes through the store -------------------------------------------------------------


class BlobWriter:
    """A write-only file object storing what is written as blob ``name`` of
    job ``job_id``, in :data:`~remsh.store.pgdispatch.CHUNK`-byte rows; at
    most ``limit`` bytes (:class:`LimitExceeded`, naming ``what``)."""

    def __init__(self, store: DispatchingStore, job_id: str, name: str, limit: int, what: str) -> None:
        self.store, self.job_id, self.name, self.limit, self.what = store, job_id, name, limit, what
        self.size = 0
        self.digest = hashlib.sha256()
        self._held = bytearray()
        self._seq = 0

    def write(self, data: bytes) -> int:
        if self.size + len(data) > self.limit:
            raise LimitExceeded(f"{self.what}: more than {self.limit} bytes; work crossing masters carries at most "
                                f"{self.limit} bytes through the job store")
        self.size += len(data)
        self.digest.update(data)
        self._held.extend(data)
        while len(self._held) >= pgdispatch.CHUNK:
            self._store(bytes(self._held[:pgdispatch.CHUNK]))
            del self._held[:pgdispatch.CHUNK]
        return len(data)

    def _store(self, data: bytes) -> None:
        self.store.dispatch_write(pgdispatch.put_chunk, self.job_id, self.name, self._seq, data)
        self._seq += 1

    def close(self) -> Dict[str, Any]:
        """Store the rest; what a reader needs: ``size``, ``sha256``."""
        if self._held or self._seq == 0:
            self._store(bytes(self._held))
            self._held.clear()
        return {"size": self.size, "sha256": self.digest.hexdigest()}


class BlobReader:
    """A read-only file object over blob ``name`` of job ``job_id``, as
    :meth:`BlobWriter.close` described it (``meta``); :meth:`check` after
    the last read raises :class:`CarryFailed` unless it was whole."""

    def __init__(self, store: DispatchingStore, job_id: str, name: str, meta: Mapping[str, Any], what: str) -> None:
        self.store, self.job_id, self.name, self.what = store, job_id, name, what
        self.size = int(meta["size"])
        self.sha256 = str(meta["sha256"])
        self.digest = hashlib.sha256()
        self.done = 0
        self._held = b""
        self._seq = 0

    def read(self, n: int = -1) -> bytes:
        out = bytearray()
        while n < 0 or len(out) < n:
            if not self._held:
                if self.done >= self.size:
                    break
                data = self.store.dispatch_read(pgdispatch.chunk, self.job_id, self.name, self._seq)
                if not data:
                    raise CarryFailed(f"{self.what}: chunk {self._seq} of {self.size} bytes is missing in the "
                                      f"job store")
                if self.done + len(data) > self.size:  # never more than was said: bounded
                    raise CarryFailed(f"{self.what}: the job store holds more than the {self.size} bytes stored")
                self._seq += 1
                self.done += len(data)
                self.digest.update(data)
                self._held = data
            take = len(self._held) if n < 0 else min(n - len(out), len(self._held))
            out += self._held[:take]
            self._held = self._held[take:]
        return bytes(out)

    def check(self) -> None:
        """:raises CarryFailed: the bytes read are not those stored"""
        while self.read(pgdispatch.CHUNK):
            pass
        if self.done != self.size or self.digest.hexdigest() != self.sha256:
            raise CarryFailed(f"{self.what}: the bytes read through the job store do not match what was "
                              f"stored ({self.done} of {self.size} bytes, SHA-256 differs)")


def _copy(src: Any, dst: Any) -> None:
    while True:
        data = src.read(pgdispatch.CHUNK)
        if not data:
            return
        dst.write(data)


def store_path(store: DispatchingStore, job_id: str, name: str, path: str, limit: int,
               what: str) -> Dict[str, Any]:
    """Store the local file or tree ``path`` as a blob (a tree as a tar
    stream); its description, ``tree`` and ``mode`` included.

    :raises LimitExceeded: it is larger than ``limit``
    :raises LocalError: it cannot be read
    """
    writer = BlobWriter(store, job_id, name, limit, what)
    try:
        if os.path.isdir(path):
            with tarfile.open(fileobj=writer, mode="w|") as tar:  # type: ignore[call-overload]
                tar.add(path, arcname=".")
            meta = writer.close()
            meta["tree"] = True
        else:
            with open(path, "rb") as f:
                _copy(f, writer)
            meta = writer.close()
            meta.update(tree=False, mode=os.stat(path).st_mode & 0o7777)
    except OSError as e:
        raise LocalError(f"{what}: cannot read {path}: {e.strerror or e}") from e
    return meta


def _parts(name: str, member: str, what: str) -> Tuple[str, ...]:
    """The components of a member's ``name`` (or link target), ``.`` and
    empty ones left out.

    :raises CarryFailed: a ``..`` among them
    """
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise CarryFailed(f"{what}: {member!r} in the tree carried through the job store names '..'")
    return parts


def _bounded(limit: int, max_entries: Optional[int], what: str) -> Callable[[tarfile.TarInfo, str], tarfile.TarInfo]:
    """The ``data`` filter, and at most ``max_entries`` members of at most
    ``limit`` bytes in all (a sparse member counts its full size): a tar
    stream is the other master's word, not the bound it was made under.

    Nothing is written at or through a link the stream made, nor hard-linked
    to one: the ``data`` filter's own check resolves links with
    ``os.path.realpath``, which gives up past PATH_MAX (CVE-2025-4517 on the
    Pythons without its fix); a tree ``tarfile.add`` made never needs it."""
    seen = [0, 0]
    links: Set[Tuple[str, ...]] = set()

    def through_link(parts: Tuple[str, ...]) -> bool:
        return any(parts[:i] in links for i in range(1, len(parts) + 1))

    def check(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
        parts = _parts(member.name, member.name, what)
        if through_link(parts) or (member.islnk() and through_link(_parts(member.linkname, member.name, what))):
            raise CarryFailed(f"{what}: {member.name!r} in the tree carried through the job store goes through "
                              f"a link of the same tree")
        if member.issym() or member.islnk():
            links.add(parts)
        seen[0] += 1
        seen[1] += max(0, member.size)
        if max_entries is not None and seen[0] > max_entries:
            raise LimitExceeded(f"{what}: more than {max_entries} entries in the tree carried through the job store")
        if seen[1] > limit:
            raise LimitExceeded(f"{what}: more than {limit} bytes in the tree carried through the job store")
        return tarfile.data_filter(member, dest)

    return check


def load_path(store: DispatchingStore, job_id: str, name: str, meta: Mapping[str, Any], path: str,
              what: str, *, limit: int = LIMIT, max_entries: Optional[int] = None, modes: int = 0o7777) -> None:
    """Write blob ``name`` to the local ``path`` (which must not exist): a
    file through a partial file renamed when whole and checked, a tree
    unpacked beside it (the ``data`` filter: nothing outside it, no device;
    at most ``max_entries`` members and ``limit`` bytes) and renamed when
    whole and checked.  A file keeps only the permission bits in ``modes``
    (a get: no set-ID bits, as :meth:`~remsh.master.slave.Slave.fetch`).
    Nothing is left at ``path`` on failure.

    :raises CarryFailed: a chunk missing or the digest wrong
    :raises LimitExceeded: the blob is said to be larger than ``limit``, or the tree has more
    :raises LocalError: it cannot be written
    """
    size = meta.get("size")
    if not isinstance(size, int) or size < 0:
        raise CarryFailed(f"{what}: the job store describes its bytes without a size")
    if size > limit:
        raise LimitExceeded(f"{what}: {size} bytes, more than the {limit} bytes work crossing masters carries")
    reader = BlobReader(store, job_id, name, meta, what)
    try:
        if meta.get("tree"):
            part = hidden_beside(path, "part", local=True)
            try:
                os.mkdir(part, 0o700)
                with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
                    tar.extractall(part, filter=_bounded(limit, max_entries, what))
                reader.check()
                os.rename(part, path)
            except BaseException:
                shutil.rmtree(part, ignore_errors=True)
                raise
            return
        mode = meta.get("mode")
        partial = PartialFile(os.fsencode(path), mode & modes if isinstance(mode, int) else None)
        try:
            _copy(reader, partial)
            reader.check()
        except BaseException:
            partial.discard()
            raise
        place_fetched(what, partial)
    except (OSError, tarfile.TarError) as e:
        raise LocalError(f"{what}: cannot write {path}: {e}") from e


__all__ = ["LIMIT", "CarryFailed", "DispatchingStore", "dispatching", "BlobWriter", "BlobReader", "store_path",
           "load_path"]
