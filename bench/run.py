"""remsh benchmark: remsh over each transport against the tools users would
pick instead, side by side in one run.  See bench/README.md.

    python bench/run.py [--quick] [--only SCENARIO ...] [--size MiB] [--json PATH]

Prints one table and writes the same figures, with the machine, to
bench/results/latest.json.
"""
# Every closure made in a loop below is called (by Bench.row) before the loop
# moves on, so late binding of loop variables cannot bite:
# ruff: noqa: B023

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import floor  # noqa: E402
import slowlink  # noqa: E402
import transfers  # noqa: E402
import trees  # noqa: E402
from fixtures import (LOCAL, REPO, SSH, SSH_OPENSSH, SSH_TUNNEL, TCP, TLS, TRANSPORTS, Peers,  # noqa: E402
                      RemshSlaves, child_env)
from harness import (ANY, PINNED, UNPINNED, Results, Row, machine_info, machine_line, measure,  # noqa: E402
                     place)
from sshd import Sshd, have_openssh  # noqa: E402

from remsh.wire import encode_box  # noqa: E402

MiB = 1024 * 1024
SCENARIOS = ("roundtrip", "execute", "transfer", "stream", "connect", "tree", "slowlink", "farm")

FLOOR_TCP = "raw TCP socket (floor)"
FLOOR_UNIX = "raw socketpair (floor)"
#: the ping as little Python as can speak the protocol (bench/floor.py
#: BoxPingPong): boxes decoded, then also the least session bookkeeping
FLOOR_BOXES = "Python box ping-pong, TCP"
FLOOR_LEAST_SESSION = "Python box ping-pong + least session, TCP"


@dataclass
class Entry:
    """One contender of a :meth:`Bench.group`: the call to time and its row."""

    contender: str
    op: Optional[Callable[[], object]]
    baseline: Optional[str] = None
    na: Optional[str] = None
    note: str = ""
    batch: int = 1
    before: Optional[Callable[[], object]] = None
    after: Optional[Callable[[], object]] = None


def _failed(e: BaseException) -> str:
    text = str(e).splitlines()[0][:80] if str(e) else ""
    return f"failed: {type(e).__name__}: {text}"


def remsh_name(transport: str) -> str:
    return f"remsh {transport}"


def floor_for(transport: str) -> str:
    """The floor a remsh transport is compared with: same kind of socket."""
    return FLOOR_UNIX if transport == LOCAL else FLOOR_TCP


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.results = Results()
        self.work = tempfile.mkdtemp(prefix="remsh-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        self.size = (args.size or (32 if self.quick else 256)) * MiB
        self.sshd: Optional[Sshd] = None
        self.sshd_na = have_openssh()
        self.remsh: Optional[RemshSlaves] = None
        self.peers: Optional[Peers] = None
        self.floors: Dict[str, floor.FloorPeer] = {}
        self.big = os.path.join(self.work, "big.bin")
        self.targets: List[Dict[str, object]] = []

    # -- helpers ---------------------------------------------------------------

    def row(self, scenario: str, contender: str, fn: Optional[Callable[[], List[float]]], *, cpus: str = ANY,
            kind: str = "time", baseline: Optional[str] = None, na: Optional[str] = None,
            note: str = "") -> Row:
        """Measure one contender on its own (``fn`` returns the per-run values)."""
        row = Row(scenario, contender, cpus=cpus, kind=kind, baseline=baseline, note=note)
        if na is None and fn is not None:
            try:
                row.values = fn()
            except Exception as e:  # noqa: BLE001 - one failing contender must not end the run
                logging.getLogger("bench").exception("%s / %s failed", scenario, contender)
                na = _failed(e)
        row.na = na
        return self.results.add(row)

    def group(self, scenario: str, entries: List[Entry], *, runs: int, warmup: int = 1, cpus: str = ANY,
              nbytes: Optional[int] = None) -> None:
        """Measure several contenders of one scenario with their runs interleaved.

        After every contender's warm-up, run ``i`` of each contender is made
        in turn (the order rotating from one round to the next), so a burst
        of other activity on the machine lands on all of them alike.  With
        ``nbytes`` the rows are throughputs (MiB/s) of ``nbytes`` per call.
        """
        values: Dict[str, List[float]] = {e.contender: [] for e in entries}
        failed: Dict[str, str] = {}
        active = [e for e in entries if e.na is None and e.op is not None]

        def one(e: Entry, n_warm: int, n_runs: int) -> None:
            if e.contender in failed:
                return
            try:
                values[e.contender] += measure(e.op, runs=n_runs, warmup=n_warm, batch=e.batch,  # type: ignore[arg-type]
                                               before=e.before, after=e.after)
            except Exception as exc:  # noqa: BLE001 - one failing contender must not end the run
                logging.getLogger("bench").exception("%s / %s failed", scenario, e.contender)
                failed[e.contender] = _failed(exc)

        for e in active:
            one(e, warmup, 0)
        for i in range(runs):
            k = i % len(active) if active else 0
            for e in active[k:] + active[:k]:
                one(e, 0, 1)
        for e in entries:
            row = Row(scenario, e.contender, cpus=cpus, kind="time" if nbytes is None else "rate",
                      baseline=e.baseline, note=e.note)
            row.na = e.na or failed.get(e.contender) or (None if e.op is not None else "not measured")
            if row.na is None:
                row.values = values[e.contender] if nbytes is None else \
                    [nbytes / MiB / v for v in values[e.contender]]
            self.results.add(row)

    def remsh_na(self, transport: str) -> Optional[str]:
        assert self.remsh is not None
        return self.remsh.na.get(transport)

    def peer_na(self, peer: str) -> Optional[str]:
        assert self.peers is not None
        return self.peers.na.get(peer)

    def latency_plan(self, slow: bool) -> Dict[str, int]:
        """Runs and calls per run for fast (~10-300 us) and slow (~1-20 ms) operations."""
        if slow:
            return {"runs": 5, "batch": 10} if self.quick else {"runs": 9, "batch": 30}
        return {"runs": 5, "batch": 300} if self.quick else {"runs": 9, "batch": 2000}

    # -- set-up / tear-down -------------------------------------------------------

    def setup(self) -> None:
        print(f"working directory {self.work}", flush=True)
        # written by a child: big buffers freed here would change how this
        # process's malloc serves later allocations (see README, "what limits")
        with open(self.big, "wb") as f:
            subprocess.run(["head", "-c", str(self.size), "/dev/urandom"], stdout=f, check=True)
        if self.sshd_na is None:
            try:
                self.sshd = Sshd(self.work)
                self.sshd.start()
            except Exception as e:  # noqa: BLE001
                self.sshd_na = f"sshd: {e}"
                self.sshd = None
        self.remsh = RemshSlaves(self.work, sshd=self.sshd)
        self.remsh.start()
        self.peers = Peers(self.work, self.sshd, self.sshd_na)
        self.peers.start()
        for family in (floor.TCP, floor.UNIX):
            peer = floor.FloorPeer(family)
            peer.start()
            self.floors[family] = peer

    def teardown(self) -> None:
        place(UNPINNED)
        for closer in ([self.peers.stop] if self.peers else []) + ([self.remsh.stop] if self.remsh else []) + \
                [p.stop for p in self.floors.values()] + ([self.sshd.stop] if self.sshd else []):
            try:
                closer()
            except Exception:  # noqa: BLE001 - best effort
                logging.getLogger("bench").exception("tear-down")
        self.peers = self.remsh = self.sshd = None
        self.floors = {}
        shutil.rmtree(self.work, ignore_errors=True)

    # -- scenarios -----------------------------------------------------------------

    def scenario_roundtrip(self) -> None:
        """ping and stat on an open connection, pinned to one CPU and not."""
        assert self.remsh is not None and self.peers is not None
        statme = os.path.join(self.work, "statme")
        open(statme, "wb").close()
        sizes = {
            "ping": (len(encode_box({b"meth": b"ping", b"version": b"1"})), len(encode_box({}))),
            "stat": (len(encode_box({b"meth": b"stat", b"version": b"1", b"path": statme.encode()})),
                     len(encode_box({b"result": b"f"}))),
        }
        pingpongs = {(fam, op): floor.PingPong(self.floors[fam].connect(), *sizes[op])
                     for fam in (floor.TCP, floor.UNIX) for op in sizes}
        box_pingpongs = [floor.BoxPingPong(self.floors[floor.TCP].connect(), level) for level in (1, 2)]
        fast, slow = self.latency_plan(False), self.latency_plan(True)
        ex_payload = b"\1" * sizes["ping"][0]
        peers = self.peers
        ch, conn = peers.execnet_ch, peers.rpyc_conn

        def execnet_rt() -> None:
            ch.send(ex_payload)
            ch.receive()

        try:
            for mode in (PINNED, UNPINNED):
                place(mode)
                for op in ("ping", "stat"):
                    entries = [
                        Entry(FLOOR_TCP, pingpongs[(floor.TCP, op)], batch=fast["batch"],
                              note=f"{sizes[op][0]} B request, {sizes[op][1]} B reply"),
                        Entry(FLOOR_UNIX, pingpongs[(floor.UNIX, op)], baseline=FLOOR_TCP, batch=fast["batch"]),
                    ]
                    if op == "ping":
                        entries += [
                            Entry(FLOOR_BOXES, box_pingpongs[0], baseline=FLOOR_TCP, batch=fast["batch"],
                                  note="request encoded once, boxes decoded on both ends"),
                            Entry(FLOOR_LEAST_SESSION, box_pingpongs[1], baseline=FLOOR_TCP,
                                  batch=fast["batch"], note="+ a lock, counts, kept copy, clock per box"),
                        ]
                    for t in TRANSPORTS:
                        slave = self.remsh.slaves.get(t)
                        fn = (lambda s=slave: s.ping()) if op == "ping" else (lambda s=slave: s.stat(statme))
                        entries.append(Entry(remsh_name(t), fn, baseline=floor_for(t), na=self.remsh_na(t),
                                             batch=fast["batch"]))
                    if op == "ping":
                        entries += [
                            Entry("execnet channel", execnet_rt, baseline=FLOOR_TCP, na=self.peer_na("execnet"),
                                  batch=fast["batch"], note="popen gateway (pipes)"),
                            Entry("RPyC call", lambda: conn.root.ping(ex_payload), baseline=FLOOR_TCP,
                                  na=self.peer_na("rpyc"), batch=fast["batch"]),
                            Entry("paramiko exec 'true'", peers.paramiko_exec, baseline=FLOOR_TCP,
                                  na=self.peer_na("paramiko"), batch=slow["batch"]),
                        ]
                    self.group(f"{op} round trip", entries, runs=fast["runs"], cpus=mode)
        finally:
            place(UNPINNED)
            for pp in pingpongs.values():
                pp.close()
            for bp in box_pingpongs:
                bp.close()

    def scenario_execute(self) -> None:
        """execute(['true']) on an open connection."""
        assert self.remsh is not None and self.peers is not None
        plan = self.latency_plan(True)
        floor_name = "subprocess.run (floor)"
        fab = self.peers.fabric

        def run_on(slave: Any) -> Callable[[], None]:
            def run() -> None:
                if slave.execute(["true"]) != 0:
                    raise RuntimeError("true failed")
            return run

        try:
            for mode in (PINNED, UNPINNED):
                place(mode)
                entries = [Entry(floor_name, lambda: subprocess.run(["true"], check=True), batch=plan["batch"],
                                 note="in the master process")]
                for t in TRANSPORTS:
                    entries.append(Entry(remsh_name(t), run_on(self.remsh.slaves.get(t)), baseline=floor_name,
                                         na=self.remsh_na(t), batch=plan["batch"]))
                entries += [
                    Entry("paramiko exec", self.peers.paramiko_exec, baseline=floor_name,
                          na=self.peer_na("paramiko"), batch=plan["batch"]),
                    Entry("Fabric run", lambda: fab.run("true", hide=True, in_stream=False), baseline=floor_name,
                          na=self.peer_na("fabric"), batch=plan["batch"]),
                ]
                self.group("execute true", entries, runs=plan["runs"], cpus=mode)
        finally:
            place(UNPINNED)

    def scenario_transfer(self) -> None:
        """send and fetch of one big file, verified."""
        assert self.remsh is not None and self.peers is not None
        size = self.size
        runs = 3 if self.quick else 5
        dest, gone, check = transfers.transfer_dest(self)

        floor_socks = {fam: self.floors[fam].connect() for fam in (floor.TCP, floor.UNIX)}
        sftp_batch = os.path.join(self.work, "sftp-batch")
        sshd = self.sshd
        ssh_na = self.peer_na("openssh")

        def run_cmd(argv_fn: Callable[[], List[str]]) -> Callable[[], None]:
            return lambda: subprocess.run(argv_fn(), check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

        try:
            for direction in ("send", "fetch"):
                sending = direction == "send"
                fl = floor.send_file if sending else floor.fetch_file
                entries = [
                    Entry(FLOOR_TCP, lambda: fl(floor_socks[floor.TCP], self.big, dest),
                          note="64 KiB chunks, SHA-256 on both ends"),
                    Entry(FLOOR_UNIX, lambda: fl(floor_socks[floor.UNIX], self.big, dest), baseline=FLOOR_TCP),
                ]
                for t in TRANSPORTS:
                    slave = self.remsh.slaves.get(t)
                    op = (lambda s=slave: s.send(self.big, dest)) if sending else \
                        (lambda s=slave: s.fetch(self.big, dest))
                    entries.append(Entry(remsh_name(t), op, baseline=floor_for(t), na=self.remsh_na(t)))
                src, dst = (self.big, ":" + dest) if sending else (":" + self.big, dest)
                with open(sftp_batch + f"-{direction}", "w") as f:
                    f.write(f"put {self.big} {dest}\n" if sending else f"get {self.big} {dest}\n")
                entries += [
                    Entry("scp (OpenSSH)", run_cmd(lambda: sshd.scp_argv(src, dst)), baseline=FLOOR_TCP,
                          na=ssh_na, note="new connection each time"),
                    Entry("sftp (OpenSSH)", run_cmd(lambda: sshd.sftp_argv(sftp_batch + f"-{direction}")),
                          baseline=FLOOR_TCP, na=ssh_na, note="new connection each time"),
                    Entry("paramiko SFTP", (lambda: self.peers.sftp.put(self.big, dest)) if sending else
                          (lambda: self.peers.sftp.get(self.big, dest)), baseline=FLOOR_TCP,
                          na=self.peer_na("paramiko"), note=f"open connection, {self.peers.cipher()}"),
                ]
                for e in entries:
                    e.before, e.after = gone, check
                entries[-1].before = lambda: (gone(), self.peers.fresh_bulk_connection())
                self.group(f"{direction} {size // MiB} MiB", entries, runs=runs, nbytes=size)
        finally:
            for sock in floor_socks.values():
                sock.close()
            gone()
        transfers.run_transfer(self, Entry)  # pinned rows, and the limits beside them

    def scenario_stream(self) -> None:
        """execute(['cat', BIG]) with every chunk of stdout handed to a callback."""
        assert self.remsh is not None and self.peers is not None
        size = self.size
        got = [0]

        def cb(data: bytes) -> None:
            got[0] += len(data)

        def before() -> None:
            got[0] = 0

        def after() -> None:
            if got[0] != size:
                raise RuntimeError(f"received {got[0]} bytes, expected {size}")

        def cat_on(slave: Any) -> Callable[[], None]:
            def run() -> None:
                if slave.execute(["cat", self.big], stdout_cb=cb) != 0:
                    raise RuntimeError("cat failed")
            return run

        entries = [Entry(FLOOR_TCP, lambda: floor.stream_cat(self.big, floor.TCP, cb),
                         note="child cat writes into the socket"),
                   Entry(FLOOR_UNIX, lambda: floor.stream_cat(self.big, floor.UNIX, cb), baseline=FLOOR_TCP)]
        for t in TRANSPORTS:
            entries.append(Entry(remsh_name(t), cat_on(self.remsh.slaves.get(t)), baseline=floor_for(t),
                                 na=self.remsh_na(t)))
        sshd = self.sshd

        def ssh_cat() -> None:
            assert sshd is not None
            with subprocess.Popen(sshd.ssh_argv("cat", self.big), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE) as proc:
                assert proc.stdout is not None
                read = proc.stdout.read1
                while True:
                    data = read(1 << 20)
                    if not data:
                        break
                    cb(data)
            if proc.returncode != 0:
                raise RuntimeError(f"ssh cat: status {proc.returncode}")

        entries.append(Entry("ssh cat (OpenSSH)", ssh_cat, baseline=FLOOR_TCP, na=self.peer_na("openssh"),
                             note="new connection each time"))
        entries.append(Entry("paramiko channel", lambda: self.peers.paramiko_cat(self.big, cb),
                             baseline=FLOOR_TCP, na=self.peer_na("paramiko")))
        for e in entries:
            e.before, e.after = before, after
        entries[-1].before = lambda: (before(), self.peers.fresh_bulk_connection())
        self.group(f"stream {size // MiB} MiB stdout", entries, runs=3 if self.quick else 5, nbytes=size)
        transfers.run_stream(self, Entry, cb, before, after, cat_on)  # pinned rows

    def scenario_connect(self) -> None:
        """A fresh connection: dial, authenticate, register (or run ``true``)."""
        assert self.remsh is not None
        runs = 5 if self.quick else 10
        scen = "connect + auth"
        base = "ssh true (OpenSSH)"
        sshd = self.sshd
        self.row(scen, base, lambda: measure(lambda: subprocess.run(sshd.ssh_argv("true"), check=True,
                                                                    stdin=subprocess.DEVNULL), runs=runs),
                 na=self.peer_na("openssh"), note="new ssh process, key exchange, auth, exec true")

        def paramiko_connect() -> None:
            sshd.paramiko_client().close()

        self.row(scen, "paramiko connect", lambda: measure(paramiko_connect, runs=runs), baseline=base,
                 na=self.peer_na("paramiko"), note="in-process, key exchange and public-key auth")
        for t in (TCP, TLS, SSH):
            def dial(t: str = t) -> List[float]:
                argv = [sys.executable, os.path.join(HERE, "slavefarm.py"), "dial", "--times", str(runs + 1),
                        "--basedir", self.work, *self.remsh.dial_args(t)]
                p = subprocess.run(argv, env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
                if p.returncode != 0:
                    raise RuntimeError((p.stderr.strip().splitlines() or ["dialer failed"])[-1])
                return json.loads(p.stdout)[1:]  # the first is the warm-up

            self.row(scen, f"remsh {t} register", dial, baseline=base, na=self.remsh_na(t),
                     note="slave side: dial, handshake, registered")

    def scenario_tree(self) -> None:
        """send_tree, fetch_tree and sync_tree against tar|ssh, scp -r and rsync (bench/trees.py)."""
        trees.run(self, Entry)

    def scenario_slowlink(self) -> None:
        """A link with 20 ms each way (bench/slowlink.py): execute, 1 MiB send/fetch, a tree of 1,000 files."""
        slowlink.run(self, Entry)

    def _fleet(self, n: int, procs: int, runs: int, resume: float, hard: Optional[int] = None) -> Dict[str, Any]:
        """One run of bench/fleet.py (a master process of its own with ``n`` slaves)."""
        argv = [sys.executable, os.path.join(HERE, "fleet.py"), "--slaves", str(n), "--procs", str(procs),
                "--workers", "32", "--runs", str(runs), "--resume-timeout", repr(resume),
                "--work", os.path.join(self.work, f"fleet-{resume:g}")]
        if hard is not None:
            argv += ["--hard-limit", str(hard)]
        p = subprocess.run(argv, env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=1800)
        if p.returncode != 0:
            raise RuntimeError((p.stderr.strip().splitlines() or ["fleet failed"])[-1])
        out: Dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
        return out

    def scenario_farm(self) -> None:
        """Many slaves on one master (bench/fleet.py): registration, threads,
        descriptors and memory per idle slave, get_slave, fan-out execute(['true']);
        sessions off (resume_timeout=0) and on (the network listeners' default)."""
        n = 200 if self.quick else 10_000
        procs = 4 if self.quick else 20
        runs = 3 if self.quick else 5
        from remsh.master.limits import FDS_PER_SESSION_SLAVE, RESERVE
        from remsh.master.slavelistener.base import NetworkSlaveListener

        default_resume = NetworkSlaveListener.DEFAULT_RESUME_TIMEOUT
        fleets: Dict[str, Dict[str, Any]] = {}
        for key, resume in (("plain", 0.0), ("sessions", default_resume)):
            try:
                fleets[key] = self._fleet(n, procs, runs, resume)
            except Exception as e:  # noqa: BLE001
                fleets[key] = {"error": f"failed: {str(e)[:200]}", "failed": True}
        ses = fleets["sessions"]
        if "error" in ses and not ses.get("failed"):
            # the listener refused under this machine's hard limit (its message is kept): raise the
            # hard limit of that master process, as LimitNOFILE= would (needs CAP_SYS_RESOURCE) ...
            refusal = str(ses["error"])
            need = RESERVE + FDS_PER_SESSION_SLAVE * n
            hard = 1 << max(need - 1, 1).bit_length()
            try:
                again = self._fleet(n, procs, runs, default_resume, hard=hard)
                if "error" not in again:
                    again["hard_limit_raised_to"] = hard
                elif again.get("hard_limit_refused"):
                    # ... or else run as many session slaves as the hard limit holds
                    soft_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                    fit = (soft_hard - RESERVE) // FDS_PER_SESSION_SLAVE // 1000 * 1000
                    again = self._fleet(fit, procs, runs, default_resume)
                    again["hard_limit_not_raised"] = f"hard limit {soft_hard:,} (cannot be raised here)"
            except Exception as e:  # noqa: BLE001
                again = {"error": f"failed: {str(e)[:200]}", "failed": True}
            again["refused_under_machine_limit"] = refusal
            fleets["sessions"] = again
        self.results.extra["farm"] = {"slaves": n, **fleets}
        tag = {"plain": "", "sessions": ", sessions"}
        pool = "32 worker threads"
        for key, f in fleets.items():
            m = f.get("slaves", n)
            head = f"{m:,} slaves{tag[key]}"
            na = str(f["error"])[:160] if "error" in f else None

            def vals(k: str, f: Dict[str, Any] = f) -> Optional[Callable[[], List[float]]]:
                return (lambda: list(f[k]) if isinstance(f[k], list) else [f[k]]) if k in f else None

            fo, gs, rg = f"{head}: fan-out true", f"{head}: get_slave by name", f"{head}: register all"
            clean = "local pool, no slaves (floor)"
            self.row(fo, clean, vals("clean_pool_s"), na=na,
                     note=f"{pool}, subprocess.run(['true']) in a process with no slave sockets")
            self.row(fo, "local pool in the master", vals("local_pool_s"), baseline=clean, na=na,
                     note=f"{pool}, in the master with its {m:,} slave sockets open")
            self.row(fo, "remsh TCP fan_out", vals("fanout_s"), baseline=clean, na=na, note=pool)
            floor_gs = "dict scan, same filter (floor)"
            self.row(gs, floor_gs, vals("get_slave_floor_s"), na=na, note="a list comprehension over the dict")
            self.row(gs, "remsh get_slave", vals("get_slave_s"), na=na, baseline=floor_gs)
            self.row(gs, "dict scan (CPU time)", vals("get_slave_floor_cpu_s"), na=na,
                     note="thread CPU time per call")
            self.row(gs, "remsh get_slave (CPU time)", vals("get_slave_cpu_s"), na=na,
                     baseline="dict scan (CPU time)")
            self.row(rg, "remsh TCP", vals("register_all_s"), na=na,
                     note=f"{procs} processes, one loopback address each")
        for key, f in fleets.items():
            if "error" in f:
                print(f"  {f.get('slaves', n):,} slaves{tag[key]}: {f['error']}", flush=True)
                continue
            print(f"  {f['slaves']:,} slaves{tag[key]}: registered in {f['register_all_s']:.1f} s; master threads "
                  f"{f['master_threads_before']} before, {f['master_threads_peak_registering']} at most while "
                  f"registering, {f['master_threads_registered']} with all registered, "
                  f"{f.get('master_threads_after_fanout', '-')} after the fan-outs; {f['fds_per_slave']:.2f} "
                  f"descriptors and {f['rss_per_slave_kib']:.1f} KiB resident per slave "
                  f"({f.get('rss_marginal_kib', float('nan')):.1f} KiB for each after the first tenth); RLIMIT_NOFILE "
                  f"{f['rlimit_nofile_at_start']} -> {f['rlimit_nofile_after_start']}", flush=True)
            if "refused_under_machine_limit" in f:
                how = (f"hard limit raised to {f['hard_limit_raised_to']:,} for this run"
                       if "hard_limit_raised_to" in f else f.get("hard_limit_not_raised", ""))
                print(f"    (asked for {n:,}: {f['refused_under_machine_limit']}; {how})", flush=True)

    # -- targets -------------------------------------------------------------------

    def evaluate_targets(self) -> None:
        r = self.results

        def med(scen: str, who: str, cpus: str = ANY) -> Optional[float]:
            row = r.find(scen, who, cpus)
            return row.median if row is not None and not row.na else None

        def target(text: str, ok: Optional[bool], detail: str) -> None:
            self.targets.append({"target": text, "met": ok, "detail": detail})

        for mode in (PINNED, UNPINNED):
            scen = "ping round trip"
            tcp, fl = med(scen, remsh_name(TCP), mode), med(scen, FLOOR_TCP, mode)
            ex, rp = med(scen, "execnet channel", mode), med(scen, "RPyC call", mode)
            if tcp and fl:
                least = med(scen, FLOOR_LEAST_SESSION, mode)
                target(f"ping over TCP <= 2x raw socket ping-pong ({mode})", tcp <= 2 * fl,
                       f"{tcp * 1e6:.1f} us vs {fl * 1e6:.1f} us = {tcp / fl:.2f}x"
                       + (f" (the least Python session ping: {least / fl:.2f}x)" if least else ""))
            if tcp and ex and rp:
                target(f"ping over TCP faster than execnet and RPyC ({mode})", tcp < ex and tcp < rp,
                       f"{tcp * 1e6:.1f} us vs execnet {ex * 1e6:.1f} us, RPyC {rp * 1e6:.1f} us")
            scen = "execute true"
            tcp, fl = med(scen, remsh_name(TCP), mode), med(scen, "subprocess.run (floor)", mode)
            pm = med(scen, "paramiko exec", mode)
            if tcp and fl:
                target(f"execute true over TCP <= 1.5x subprocess.run ({mode})", tcp <= 1.5 * fl,
                       f"{tcp * 1e3:.2f} ms vs {fl * 1e3:.2f} ms = {tcp / fl:.2f}x")
            if tcp and pm:
                target(f"execute true over TCP >= 5x faster than paramiko exec ({mode})", pm >= 5 * tcp,
                       f"paramiko {pm * 1e3:.2f} ms / remsh {tcp * 1e3:.2f} ms = {pm / tcp:.1f}x")
        label = f"{self.size // MiB} MiB"
        for direction in ("send", "fetch"):
            scen = f"{direction} {label}"
            scp = med(scen, "scp (OpenSSH)")
            for t in (TCP, LOCAL):
                v, fl = med(scen, remsh_name(t)), med(scen, floor_for(t))
                if v and fl:
                    target(f"{direction} over {t} >= 80% of the verified-transfer floor", v >= 0.8 * fl,
                           f"{v:.0f} vs {fl:.0f} MiB/s = {v / fl:.0%}")
                if v and scp:
                    target(f"{direction} over {t} faster than scp", v > scp, f"{v:.0f} vs scp {scp:.0f} MiB/s")
            ssh, ps = med(scen, remsh_name(SSH)), med(scen, "paramiko SFTP")
            if ssh and ps:
                target(f"{direction} over SSH faster than paramiko SFTP", ssh > ps, f"{ssh:.0f} vs {ps:.0f} MiB/s")
            if ssh and scp:
                target(f"{direction} over SSH at least as fast as scp", ssh >= scp, f"{ssh:.0f} vs {scp:.0f} MiB/s")
            if r.find(scen, FLOOR_TCP) is not None and med(scen, remsh_name(SSH)) is None:
                target(f"{direction} over SSH vs paramiko SFTP and scp", None, "remsh SSH not measured")
            for t in (SSH_OPENSSH, SSH_TUNNEL):
                ossh = med(scen, remsh_name(t))
                if scp and r.find(scen, remsh_name(t)) is not None:
                    target(f"{direction} over {t} at least as fast as scp", None if ossh is None else ossh >= scp,
                           "not measured" if ossh is None else f"{ossh:.0f} vs {scp:.0f} MiB/s")
        scen = f"stream {label} stdout"
        pch = med(scen, "paramiko channel")
        for t in (SSH_OPENSSH, SSH_TUNNEL):
            ossh = med(scen, remsh_name(t))
            if ossh and pch:
                target(f"streamed stdout over {t} >= 2x the paramiko channel", ossh >= 2 * pch,
                       f"{ossh:.0f} vs {pch:.0f} MiB/s = {ossh / pch:.1f}x")
        for t in (TCP, LOCAL):
            v, fl = med(scen, remsh_name(t)), med(scen, floor_for(t))
            if v and fl:
                target(f"streamed stdout over {t} >= 50% of the raw socket floor", v >= 0.5 * fl,
                       f"{v:.0f} vs {fl:.0f} MiB/s = {v / fl:.0%}")
        farm = r.extra.get("farm")
        if isinstance(farm, dict):
            self._farm_targets(farm, med, target)
        trees.evaluate(med, target)
        transfers.evaluate(med, target, self.size)
        link = r.extra.get("slowlink")
        if isinstance(link, dict):
            slowlink.evaluate(med, target, link)

    def _farm_targets(self, farm: Dict[str, Any], med: Callable[..., Optional[float]],
                      target: Callable[[str, Optional[bool], str], None]) -> None:
        """Targets of the many-slaves scenario (issue: 10,000 slaves on one master)."""
        n = farm["slaves"]
        for key, tag in (("plain", "sessions off"), ("sessions", "sessions on")):
            f = farm.get(key)
            if not isinstance(f, dict):
                continue
            if "refused_under_machine_limit" in f:
                target(f"{n:,} slaves with sessions under this machine's hard limit: a clear refusal", True,
                       str(f["refused_under_machine_limit"]))
            if "error" in f:
                target(f"{n:,} slaves register ({tag})", False, str(f["error"]))
                continue
            m = f["slaves"]
            head = f"{m:,} slaves" + (", sessions" if key == "sessions" else "")
            how = (f" (hard limit raised to {f['hard_limit_raised_to']:,})" if "hard_limit_raised_to" in f
                   else f" ({f['hard_limit_not_raised']}: as many as fit)" if "hard_limit_not_raised" in f else "")
            target(f"{n:,} slaves register ({tag})", m >= n, f"{m:,} registered in {f['register_all_s']:.1f} s{how}")
            steady = f["master_threads_registered"] == f["master_threads_before"]
            after = f.get("master_threads_after_fanout")
            target(f"master threads constant with {m:,} slaves ({tag})",
                   steady and (after is None or after <= f["master_threads_before"] + 1),
                   f"{f['master_threads_before']} before the first slave, {f['master_threads_registered']} with "
                   f"all registered ({f['master_threads_peak_registering']} at most while handshakes ran), "
                   f"{after} after the fan-outs")
            grown = (f["master_rss_registered_kib"] - f["master_rss_before_kib"]) / 1024
            target(f"resident memory per idle slave <= 16 KiB ({tag})", f["rss_per_slave_kib"] <= 16,
                   f"{f['rss_per_slave_kib']:.1f} KiB ({grown:.1f} MiB for {m:,}; "
                   f"{f.get('rss_marginal_kib', float('nan')):.1f} KiB each after the first tenth); "
                   f"{f['fds_per_slave']:.2f} descriptors each")
            gsv = med(f"{head}: get_slave by name", "remsh get_slave")
            cpu = med(f"{head}: get_slave by name", "remsh get_slave (CPU time)")
            if gsv is not None:
                target(f"get_slave with a filter over {m:,} slaves < 1 ms ({tag})", gsv < 1e-3,
                       f"{gsv * 1e3:.2f} ms" + (f" ({cpu * 1e3:.2f} ms of CPU)" if cpu else ""))
            scen = f"{head}: fan-out true"
            fo = med(scen, "remsh TCP fan_out")
            lp, cl = med(scen, "local pool in the master"), med(scen, "local pool, no slaves (floor)")
            if fo and lp:
                target(f"fan-out true on {m:,} slaves <= 1.5x the local pool in the master ({tag})", fo <= 1.5 * lp,
                       f"{fo:.2f} s vs {lp:.2f} s = {fo / lp:.2f}x")
            if fo and cl:
                target(f"fan-out true on {m:,} slaves <= 1.5x a local pool with no slaves open ({tag})",
                       fo <= 1.5 * cl, f"{fo:.2f} s vs {cl:.2f} s = {fo / cl:.2f}x")
            soft0, hard0 = f["rlimit_nofile_at_start"]
            soft1, _ = f["rlimit_nofile_after_start"]
            target(f"soft RLIMIT_NOFILE raised to the hard limit at start ({tag})", soft1 == hard0,
                   f"soft {soft0} -> {soft1}, hard {hard0}")

    def print_targets(self) -> None:
        print("\nTargets:")
        for t in self.targets:
            mark = {True: "met   ", False: "MISSED", None: "n/a   "}[t["met"]]  # type: ignore[index]
            print(f"  [{mark}] {t['target']}: {t['detail']}")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer runs (under 3 minutes)")
    p.add_argument("--only", nargs="+", choices=SCENARIOS, help="run only these scenarios")
    p.add_argument("--size", type=int, help="MiB moved by each transfer and stream (default 256; 32 with --quick)")
    p.add_argument("--json", default=os.path.join(HERE, "results", "latest.json"), help="where to write the figures")
    args = p.parse_args(argv)
    # library warnings (e.g. a dialer closing its connection) go to a file, not the table
    log_path = os.path.join(HERE, "results", "last-run.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    logging.basicConfig(level=logging.WARNING, filename=log_path, filemode="w",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    scenarios = args.only or list(SCENARIOS)
    bench = Bench(args)
    machine = machine_info()
    print(f"remsh benchmark{' (quick)' if args.quick else ''} on {machine['hostname']}: {machine_line(machine)}",
          flush=True)
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load:.2f} on {os.cpu_count()} CPUs: other work is running and the "
              "figures will be noisy", flush=True)
    t0 = time.monotonic()
    try:
        bench.setup()
        for name in scenarios:
            if name == "farm":
                continue  # runs alone, below
            print(f"-- {name}", flush=True)
            getattr(bench, f"scenario_{name}")()
        if bench.peers is not None:
            machine["ssh_cipher_paramiko"] = bench.peers.cipher()
    finally:
        bench_work = bench.work
        bench.teardown()
    if "farm" in scenarios:
        print("-- farm", flush=True)
        bench.work = tempfile.mkdtemp(prefix="remsh-bench-farm-", dir=os.path.dirname(bench_work))
        try:
            bench.scenario_farm()
        finally:
            shutil.rmtree(bench.work, ignore_errors=True)
    bench.evaluate_targets()
    elapsed = time.monotonic() - t0
    print()
    print(bench.results.table())
    bench.print_targets()
    print(f"\n{elapsed:.0f} s; figures written to {args.json}; warnings logged to {log_path}")
    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    config = {"quick": args.quick, "scenarios": scenarios, "transfer_bytes": bench.size,
              "elapsed_s": round(elapsed, 1), "argv": sys.argv[1:]}
    bench.results.extra["targets"] = bench.targets
    bench.results.extra["markdown"] = bench.results.markdown()
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        f.write(bench.results.as_json(machine, config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
