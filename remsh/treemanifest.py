"""Manifests, for ``sync_tree``: what the slave reports of its destination
(the records of :mod:`remsh.treestream` without data), written by
:func:`manifest_records` and read back, checked, by :class:`ManifestReader`."""

from __future__ import annotations

import hashlib
import os
import stat as stat_mod
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

from remsh.errors import TreeStreamError
from remsh.treestream import (DIR, FILE, FILE_OPEN, LINK, MAX_TREE_PATH, MT, OTHER, READ_BLOCK, UP, H, L, M, N, S, T,
                              check_name, encode, mode_of, mtime_of, walk)
from remsh.wire import Box


class Known(NamedTuple):
    """One entry of a manifest."""

    kind: bytes
    mode: int
    mtime: int
    size: int
    digest: Optional[bytes]
    target: Optional[bytes]
    entries: int  # entries in its subtree, itself included (for counting deletions)


def file_digest(dir_fd: int, name: bytes) -> Optional[bytes]:
    """The SHA-256 (hex) of regular file ``name``, or ``None`` when it
    cannot be read."""
    try:
        fd = os.open(name, FILE_OPEN, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        if not stat_mod.S_ISREG(os.fstat(fd).st_mode):
            return None
        os.set_blocking(fd, True)
        digest = hashlib.sha256()
        while True:
            block = os.read(fd, READ_BLOCK)
            if not block:
                return digest.hexdigest().encode("ascii")
            digest.update(block)
    except OSError:
        return None
    finally:
        os.close(fd)


def manifest_records(top_fd: int, checksum: bool, tick: Callable[[], None] = lambda: None) -> Iterator[bytes]:
    """The encoded manifest records of the tree under ``top_fd``."""
    for e in walk(top_fd):
        st = e.st
        if e.kind == UP:
            yield encode(T, UP)
            continue
        assert st is not None
        mode = b"%d" % stat_mod.S_IMODE(st.st_mode)
        mtime = b"%d" % st.st_mtime_ns
        if e.kind == DIR:
            yield encode(T, DIR, N, e.name, M, mode, MT, mtime) if e.name else encode(T, DIR, M, mode, MT, mtime)
        elif e.kind == FILE:
            pairs = [T, FILE, N, e.name, M, mode, MT, mtime, S, b"%d" % st.st_size]
            if checksum:
                digest = file_digest(e.dir_fd, e.name)
                tick()
                if digest is not None:
                    pairs += [H, digest]
            yield encode(*pairs)
        elif e.kind == LINK:
            try:
                target = os.readlink(e.name, dir_fd=e.dir_fd)
            except OSError:
                target = b""
            yield encode(T, LINK, N, e.name, L, target, MT, mtime)
        else:
            yield encode(T, OTHER, N, e.name)


class ManifestReader:
    """Builds ``{relative path: Known}`` from manifest boxes fed in order."""

    def __init__(self) -> None:
        self.entries: Dict[bytes, Known] = {}
        self.children: Dict[bytes, List[bytes]] = {}
        self._stack: List[Tuple[bytes, int]] = []  # (rel, entries seen when entered)
        self._seen = 0
        self.done = False

    def feed(self, box: Box) -> None:
        t = box.get(T)
        if self.done:
            raise TreeStreamError("a manifest record after the end of the tree")
        if t == UP:
            if not self._stack:
                raise TreeStreamError("'u' with no directory open")
            rel, before = self._stack.pop()
            k = self.entries[rel]
            self.entries[rel] = k._replace(entries=self._seen - before)
            self.done = not self._stack
            return
        if not self._stack:
            if t != DIR or N in box:
                raise TreeStreamError("a manifest must start with its top directory")
            name = b""
            rel = b""
        else:
            name = check_name(box.get(N))
            base = self._stack[-1][0]
            rel = base + b"/" + name if base else name
            if t == DIR and len(rel) > MAX_TREE_PATH:
                raise TreeStreamError(f"directories nested past {MAX_TREE_PATH} bytes of path")
            self.children[base].append(name)
        self._seen += 1
        if t == DIR:
            self.entries[rel] = Known(DIR, mode_of(box), mtime_of(box), 0, None, None, 1)
            self.children[rel] = []
            self._stack.append((rel, self._seen - 1))
        elif t == FILE:
            try:
                size = int(box[S])
            except (KeyError, ValueError):
                raise TreeStreamError("a manifest file without valid 's'") from None
            self.entries[rel] = Known(FILE, mode_of(box), mtime_of(box), size, box.get(H), None, 1)
        elif t == LINK:
            self.entries[rel] = Known(LINK, 0, 0, 0, None, box.get(L, b""), 1)
        elif t == OTHER:
            self.entries[rel] = Known(OTHER, 0, 0, 0, None, None, 1)
        else:
            raise TreeStreamError(f"unknown manifest record {t!r:.20}")
