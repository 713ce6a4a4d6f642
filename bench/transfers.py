"""Verified transfers and streamed output against their floors, pinned to one
CPU (CPU per byte), and the limits beside them: one core's SHA-256 and what
the connection alone carries.  Called from ``bench/run.py`` (the transfer and
stream scenarios); see bench/README.md, "Transfers near the machine's limit".

Pinned, every process of the benchmark runs on one CPU, so a row's MiB/s is
the inverse of the CPU both ends spend per byte: the ratio to the pinned
floor is a ratio of CPU costs, not of how well two CPUs overlap.  The rows
on two CPUs (the transfer scenario's own, placement ``-``) show the overlap:
remsh hashes in a helper thread on each end while the other thread does the
I/O, which the inline floor does not.
"""

from __future__ import annotations

import os
from typing import Any, Callable, List, Optional, Tuple

import floor
from fixtures import LOCAL, TCP, TCP_PLAIN
from harness import ANY, PINNED, UNPINNED, place

MiB = 1024 * 1024
FLOOR_TCP = "raw TCP socket (floor)"
FLOOR_UNIX = "raw socketpair (floor)"
SHA_ROW = "SHA-256, one core"
RAW_TCP_ROW = "raw TCP, no hash (1 MiB sends)"
RAW_UNIX_ROW = "raw socketpair, no hash (1 MiB sends)"
TRANSPORTS = (TCP, TCP_PLAIN, LOCAL)


def _floor_for(transport: str) -> str:
    return FLOOR_UNIX if transport == LOCAL else FLOOR_TCP


def limits_scenario(size: int) -> str:
    return f"limits {size // MiB} MiB"


def transfer_dest(bench: Any) -> Tuple[str, Callable[[], None], Callable[[], None]]:
    """Where a transfer row writes its copy, what removes it (before each
    run), and what checks it has the file's size and then removes it (after)."""
    size = bench.size
    dest_dir = os.path.join(bench.work, "dest")
    os.makedirs(dest_dir, exist_ok=True)
    dest = os.path.join(dest_dir, "copy.bin")

    def gone() -> None:
        if os.path.lexists(dest):
            os.unlink(dest)

    def check() -> None:
        if os.path.getsize(dest) != size:
            raise RuntimeError(f"{dest}: {os.path.getsize(dest)} bytes, expected {size}")
        gone()

    return dest, gone, check


def run_transfer(bench: Any, Entry: Any) -> None:
    """Pinned send and fetch rows (floors, remsh TCP and local), then the
    limits on two CPUs: SHA-256 of one core, raw TCP and socket pair."""
    size = bench.size
    runs = 3 if bench.quick else 5
    dest, gone, check = transfer_dest(bench)

    socks = {fam: bench.floors[fam].connect() for fam in (floor.TCP, floor.UNIX)}
    try:
        place(PINNED)
        for direction in ("send", "fetch"):
            sending = direction == "send"
            fl = floor.send_file if sending else floor.fetch_file
            entries: List[Any] = [
                Entry(FLOOR_TCP, lambda fl=fl: fl(socks[floor.TCP], bench.big, dest),
                      note="64 KiB chunks, SHA-256 on both ends"),
                Entry(FLOOR_UNIX, lambda fl=fl: fl(socks[floor.UNIX], bench.big, dest), baseline=FLOOR_TCP),
            ]
            for t in TRANSPORTS:
                slave = bench.remsh.slaves.get(t)
                op = (lambda s=slave: s.send(bench.big, dest)) if sending else \
                    (lambda s=slave: s.fetch(bench.big, dest))
                entries.append(Entry(f"remsh {t}", op, baseline=_floor_for(t), na=bench.remsh_na(t)))
            for e in entries:
                e.before, e.after = gone, check
            bench.group(f"{direction} {size // MiB} MiB", entries, runs=runs, nbytes=size, cpus=PINNED)
        place(UNPINNED)
        entries = [
            Entry(SHA_ROW, lambda: floor.sha256_rate(size), note="hashlib, 1 MiB updates from memory"),
            Entry(RAW_TCP_ROW, lambda: floor.raw_send(socks[floor.TCP], size), baseline=SHA_ROW,
                  note="reused buffers, nothing else"),
            Entry(RAW_UNIX_ROW, lambda: floor.raw_send(socks[floor.UNIX], size), baseline=SHA_ROW),
        ]
        bench.group(limits_scenario(size), entries, runs=runs, nbytes=size, cpus=UNPINNED)
    finally:
        place(UNPINNED)
        for sock in socks.values():
            sock.close()
        gone()


def run_stream(bench: Any, Entry: Any, cb: Callable[[bytes], object], before: Callable[[], object],
               after: Callable[[], object], cat_on: Callable[[Any], Callable[[], None]]) -> None:
    """Streamed stdout pinned to one CPU: floors, remsh TCP and local."""
    size = bench.size
    entries: List[Any] = [
        Entry(FLOOR_TCP, lambda: floor.stream_cat(bench.big, floor.TCP, cb), note="child cat writes into the socket"),
        Entry(FLOOR_UNIX, lambda: floor.stream_cat(bench.big, floor.UNIX, cb), baseline=FLOOR_TCP),
    ]
    for t in TRANSPORTS:
        entries.append(Entry(f"remsh {t}", cat_on(bench.remsh.slaves.get(t)), baseline=_floor_for(t),
                             na=bench.remsh_na(t)))
    for e in entries:
        e.before, e.after = before, after
    try:
        place(PINNED)
        bench.group(f"stream {size // MiB} MiB stdout", entries, runs=3 if bench.quick else 5, nbytes=size,
                    cpus=PINNED)
    finally:
        place(UNPINNED)


def evaluate(med: Callable[..., Optional[float]], target: Callable[[str, Optional[bool], str], None],
             size: int) -> None:
    """The targets of the transfer rows above (issue: verified transfers near the machine's limit)."""
    label = f"{size // MiB} MiB"
    for direction in ("send", "fetch"):
        scen = f"{direction} {label}"
        for t in TRANSPORTS:
            v, fl = med(scen, f"remsh {t}", PINNED), med(scen, _floor_for(t), PINNED)
            if v and fl:
                target(f"{direction} over {t} >= 80% of the verified-transfer floor, pinned (CPU per byte)",
                       v >= 0.8 * fl, f"{v:.0f} vs {fl:.0f} MiB/s = {v / fl:.0%}")
    limits = limits_scenario(size)
    sha, raw = med(limits, SHA_ROW, UNPINNED), med(limits, RAW_TCP_ROW, UNPINNED)
    beside = (f"; SHA-256 one core {sha:.0f} MiB/s" if sha else "") + (f", raw TCP {raw:.0f} MiB/s" if raw else "")
    for direction in ("send", "fetch"):
        scen = f"{direction} {label}"
        v, fl = med(scen, f"remsh {TCP}", ANY), med(scen, FLOOR_TCP, ANY)
        if v and fl:
            target(f"{direction} over TCP >= 1.5x the inline verified-transfer floor on 2 CPUs", v >= 1.5 * fl,
                   f"{v:.0f} vs floor {fl:.0f} MiB/s = {v / fl:.2f}x{beside}")
    scen = f"stream {label} stdout"
    for t in TRANSPORTS:
        v, fl = med(scen, f"remsh {t}", PINNED), med(scen, _floor_for(t), PINNED)
        if v and fl:
            target(f"streamed stdout over {t} >= 60% of the raw socket floor, pinned (CPU per byte)",
                   v >= 0.6 * fl, f"{v:.0f} vs {fl:.0f} MiB/s = {v / fl:.0%}")

