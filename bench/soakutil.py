"""What bench/soak.py runs and measures: the command scripts and the output
they must give, the master's own figures (RSS, descriptors), and random
trees with their snapshots."""

from __future__ import annotations

import gc
import hashlib
import os
import random
import shutil
from typing import Callable, Dict, Optional, Tuple

from remsh.files import TEMP_SUFFIX

# numbered lines on stdout, the digest of stdin in the middle, more lines
EMIT = """\
import hashlib, sys
n, width, tag = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].encode()
w = sys.stdout.buffer.write
pad = b"x" * width
for i in range(n // 2):
    w(b"%s %08d %s\\n" % (tag, i, pad))
sys.stdout.flush()
w(b"stdin %s\\n" % hashlib.sha256(sys.stdin.buffer.read()).hexdigest().encode())
for i in range(n // 2, n):
    w(b"%s %08d %s\\n" % (tag, i, pad))
"""


# says it is up, then sleeps (for longer than any run: an execute timeout ends it)
SLEEPER = """\
import sys, time
sys.stdout.write("up\\n")
sys.stdout.flush()
time.sleep(float(sys.argv[1]))
"""


def emit_expected(n: int, width: int, tag: bytes, stdin: bytes) -> bytes:
    pad = b"x" * width
    head = b"".join(b"%s %08d %s\n" % (tag, i, pad) for i in range(n // 2))
    tail = b"".join(b"%s %08d %s\n" % (tag, i, pad) for i in range(n // 2, n))
    return head + b"stdin %s\n" % hashlib.sha256(stdin).hexdigest().encode() + tail


def _malloc_trim() -> Callable[[], None]:
    try:
        import ctypes

        trim = ctypes.CDLL(None).malloc_trim
        return lambda: None if trim(0) is None else None
    except (OSError, AttributeError):  # not glibc
        return lambda: None


#: gives the allocator's free memory back to the system, so that RSS
#: measures what is alive rather than how the heap was last fragmented
malloc_trim = _malloc_trim()


def rss_bytes(trim: bool = False) -> int:
    if trim:
        gc.collect()
        malloc_trim()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def fd_table() -> Dict[str, str]:
    """fd -> what it is; sockets with their TCP addresses where known."""
    sockets: Dict[str, str] = {}
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/net/{table}") as f:
                next(f)
                for line in f:
                    parts = line.split()
                    local, remote, inode = parts[1], parts[2], parts[9]
                    sockets[inode] = f"tcp {int(local.split(':')[1], 16)}->{int(remote.split(':')[1], 16)}"
        except OSError:
            pass
    out: Dict[str, str] = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            target += " " + sockets.get(target[8:-1], "")
        out[fd] = target
    return out


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha(path: bytes) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            return sha(f.read())
    except FileNotFoundError:
        return None


# -- trees ---------------------------------------------------------------------


def make_tree(rng: random.Random, root: bytes, files: Optional[int] = None) -> int:
    """A random tree at ``root`` (created): files, empty directories, links,
    a name that is not UTF-8 now and then; returns the file bytes."""
    os.mkdir(root)
    dirs = [root]
    total = 0
    for i in range(files if files is not None else rng.randint(1, 25)):
        parent = rng.choice(dirs)
        kind = rng.random()
        name = b"n%d" % i + (b"\xff" if rng.random() < 0.05 else b"")
        path = os.path.join(parent, name)
        if kind < 0.2 and len(dirs) < 8:
            os.mkdir(path)
            dirs.append(path)
        elif kind < 0.27:
            os.symlink(b"../target-%d" % rng.randrange(100), path)
        else:
            size = rng.choice((0, rng.randint(1, 2000), rng.randint(1, 256 * 1024)))
            with open(path, "wb") as f:
                f.write(rng.randbytes(size))
            total += size
    return total


def snapshot(root: bytes) -> Dict[bytes, Tuple[str, str]]:
    """relative path -> ("d", "") / ("f", sha256) / ("l", target); temporary
    files are left out (the leftover scan counts them)."""
    out: Dict[bytes, Tuple[str, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if name.endswith(TEMP_SUFFIX):
                continue
            if os.path.islink(path):
                out[rel] = ("l", os.fsdecode(os.readlink(path)))
            elif os.path.isdir(path):
                out[rel] = ("d", "")
            else:
                out[rel] = ("f", file_sha(path) or "")
    return out


def tree_bytes(root: bytes) -> int:
    n = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                n += os.path.getsize(path)
    return n


def rmtree(path: bytes) -> None:
    if os.path.lexists(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
