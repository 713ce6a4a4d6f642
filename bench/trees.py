"""The ``tree`` scenario of bench/run.py: whole directory trees.

``send_tree``/``fetch_tree`` over remsh's TCP transport against what a user
would type instead, over the benchmark's own sshd: ``tar c | ssh host tar
x`` (and the reverse), ``scp -r`` and ``rsync -a``; on two trees made here:
10,000 files of 1-8 KiB in 200 directories ("many files") and 20 files of
16 MiB (4 MiB with ``--quick``; "big files").  Then ``sync_tree`` against
``rsync -a`` on an unchanged copy and after touching 1 % of the files (new
modification times: both tools send those files again).

Every contender starts from the same state: the destination is removed
before each send or fetch run (outside the timing) and, for the sync rows,
each tool keeps its own copy, brought up to date once before the runs.  The
time of a run is the whole command, connection set-up included for the
OpenSSH tools (each is a new process, as when a user types it); remsh uses
the connection its slave opened at the start.
"""

from __future__ import annotations

import os
import random
import shlex
import shutil
import subprocess
from typing import TYPE_CHECKING, Any, Callable, List, Optional

if TYPE_CHECKING:
    from run import Bench

MiB = 1024 * 1024
TCP = "TCP"
TAR = "tar | ssh | tar"
SCP = "scp -r (OpenSSH)"
RSYNC = "rsync -a (OpenSSH)"
MANY = "10,000 files of 1-8 KiB"
#: the labels of the trees measured by the last run() (for evaluate())
_labels: List[str] = []


def make_many(top: str, files: int = 10_000, dirs: int = 200, seed: int = 11) -> int:
    """``files`` files of 1-8 KiB spread over ``dirs`` directories; returns the bytes."""
    rnd = random.Random(seed)
    total = 0
    os.makedirs(top)
    for d in range(dirs):
        os.mkdir(os.path.join(top, f"dir{d:03d}"))
    for i in range(files):
        size = rnd.randint(1024, 8192)
        with open(os.path.join(top, f"dir{i % dirs:03d}", f"file{i:05d}"), "wb") as f:
            f.write(os.urandom(size))
        total += size
    return total


def make_big(top: str, files: int, size: int) -> int:
    """``files`` files of ``size`` bytes; returns the bytes."""
    os.makedirs(top)
    for i in range(files):
        with open(os.path.join(top, f"big{i:02d}"), "wb") as f:
            f.write(os.urandom(size))
    return files * size


def _rm(path: str) -> None:
    if os.path.lexists(path):
        shutil.rmtree(path)


def _run(argv: List[str], shell: bool = False) -> None:
    subprocess.run(argv if not shell else " ".join(argv), shell=shell, check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL)


def _count(top: str) -> int:
    return sum(len(files) for _, _, files in os.walk(top))


def run(bench: "Bench", Entry: Any) -> None:
    """Measure the tree rows into ``bench.results`` (``Entry``: run.py's class)."""
    assert bench.remsh is not None
    slave = bench.remsh.slaves.get(TCP)
    remsh_na = bench.remsh_na(TCP) or (None if slave is not None else "no TCP slave")
    sshd = bench.sshd
    ssh_na = bench.peer_na("openssh") if bench.peers is not None else "no OpenSSH"
    if ssh_na is None and shutil.which("rsync") is None:
        rsync_na: Optional[str] = "rsync is not installed"
    else:
        rsync_na = ssh_na
    runs = 3 if bench.quick else 5
    work = os.path.join(bench.work, "trees")
    os.makedirs(work, exist_ok=True)
    big_size = (4 if bench.quick else 16) * MiB
    big = f"20 files of {big_size // MiB} MiB"
    trees = {MANY: os.path.join(work, "many"), big: os.path.join(work, "big")}
    _labels[:] = list(trees)
    make_many(trees[MANY])
    make_big(trees[big], 20, big_size)

    def ssh_cmd() -> str:
        assert sshd is not None
        return " ".join(shlex.quote(a) for a in ["ssh", *sshd.ssh_options(), "-p", str(sshd.port)])

    def remote() -> str:
        assert sshd is not None
        return f"{sshd.user}@{sshd.host}"

    def rows(label: str, src: str, direction: str) -> None:
        """The send or fetch rows of one tree (fetch reads the same files through the other end)."""
        expected = _count(src)
        sending = direction == "send"
        dest = os.path.join(work, f"dest-{direction}")
        q = shlex.quote

        def gone() -> None:
            _rm(dest)

        def check() -> None:
            n = _count(dest)
            if n != expected:
                raise RuntimeError(f"{dest}: {n} files, expected {expected}")
            _rm(dest)

        def tar_op() -> None:
            if sending:
                cmd = (f"tar cf - -C {q(src)} . | {ssh_cmd()} {q(remote())} "
                       f"{q(f'mkdir {q(dest)} && tar xf - -C {q(dest)}')}")
            else:
                cmd = (f"mkdir {q(dest)} && {ssh_cmd()} {q(remote())} {q(f'tar cf - -C {q(src)} .')} "
                       f"| tar xf - -C {q(dest)}")
            subprocess.run(cmd, shell=True, check=True, stdin=subprocess.DEVNULL)

        def scp_op() -> None:
            assert sshd is not None
            argv = sshd.scp_argv(src, ":" + dest) if sending else sshd.scp_argv(":" + src, dest)
            argv.insert(2, "-r")
            _run(argv)

        def rsync_op() -> None:
            pair = [src + "/", f"{remote()}:{dest}/"] if sending else [f"{remote()}:{src}/", dest + "/"]
            _run(["rsync", "-a", "-e", ssh_cmd(), *pair])

        def remsh_op() -> None:
            assert slave is not None
            if sending:
                slave.send_tree(src, dest)
            else:
                slave.fetch_tree(src, dest)

        entries = [
            Entry(TAR, tar_op, na=ssh_na, note="new connection each time"),
            Entry(f"remsh {TCP} {direction}_tree", remsh_op, baseline=TAR, na=remsh_na),
            Entry(SCP, scp_op, baseline=TAR, na=ssh_na, note="new connection each time"),
            Entry(RSYNC, rsync_op, baseline=TAR, na=rsync_na, note="new connection each time"),
        ]
        for e in entries:
            e.before, e.after = gone, check
        bench.group(f"{direction} tree: {label}", entries, runs=runs)
        gone()

    for label, src in trees.items():
        for direction in ("send", "fetch"):
            rows(label, src, direction)

    # sync: each tool keeps its own copy of the many-files tree
    src = trees[MANY]
    mine, theirs = os.path.join(work, "sync-remsh"), os.path.join(work, "sync-rsync")

    def remsh_sync() -> None:
        assert slave is not None
        slave.sync_tree(src, mine)

    def rsync_sync() -> None:
        _run(["rsync", "-a", "-e", ssh_cmd(), src + "/", f"{remote()}:{theirs}/"])

    try:
        if slave is not None:
            remsh_sync()
        if rsync_na is None:
            rsync_sync()
    except Exception:  # noqa: BLE001 - the rows below report the failure
        pass
    names = sorted(os.path.join(d, f) for d, _, fs in os.walk(src) for f in fs)
    touched = names[::100]
    stamp = [1_700_000_000]

    def touch() -> None:
        stamp[0] += 1
        for p in touched:
            os.utime(p, (stamp[0], stamp[0]))

    for label, before in (("unchanged", None), ("1 % touched", touch)):
        entries = [
            Entry(RSYNC, rsync_sync, na=rsync_na, note="new connection each time"),
            Entry(f"remsh {TCP} sync_tree", remsh_sync if slave is not None else None, baseline=RSYNC,
                  na=remsh_na),
        ]
        for e in entries:
            e.before = before
        bench.group(f"sync tree: 10,000 files, {label}", entries, runs=runs)
    _rm(mine)
    _rm(theirs)
    shutil.rmtree(work, ignore_errors=True)


def evaluate(med: Callable[[str, str], Optional[float]], target: Callable[[str, Optional[bool], str], None]) -> None:
    """The targets of the tree rows: send_tree/fetch_tree faster than every
    peer on both trees, a no-change sync_tree faster than rsync's."""
    for direction in ("send", "fetch"):
        for label in _labels:
            scen = f"{direction} tree: {label}"
            mine = med(scen, f"remsh {TCP} {direction}_tree")
            peers = {p: med(scen, p) for p in (TAR, SCP, RSYNC)}
            if mine and all(peers.values()):
                best = min(peers, key=lambda p: peers[p] or 0.0)
                target(f"{direction}_tree over TCP faster than every peer ({label})", mine < (peers[best] or 0.0),
                       f"{mine * 1e3:.0f} ms vs {best} {(peers[best] or 0.0) * 1e3:.0f} ms")
    scen = "sync tree: 10,000 files, unchanged"
    mine, theirs = med(scen, f"remsh {TCP} sync_tree"), med(scen, RSYNC)
    if mine and theirs:
        target("no-change sync_tree faster than rsync's no-change run", mine < theirs,
               f"{mine * 1e3:.0f} ms vs {theirs * 1e3:.0f} ms")
