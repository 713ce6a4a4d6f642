"""The ``slowlink`` scenario of bench/run.py: a slow link, simulated.

Loopback hides round trips.  :class:`DelayRelay` is a TCP relay on
127.0.0.1 that behaves like a link with a one-way delay (default 20 ms each
way: a 40 ms round trip) and a rate (default 1 Gbit/s): every chunk it reads
leaves the link once the chunks before it have been clocked out at the rate,
and arrives ``delay`` later.  It reads as fast as the sender writes (up to
:data:`QUEUE_LIMIT` bytes in flight a direction, then it stops reading), so
TCP's own windows between the relay and either end never see the delay: a
link with a large enough window, where only the protocol's own round trips
and the bytes count.

remsh: a ``remsh-slave`` process dials the master's TCP listener through one
relay.  OpenSSH: ``ssh``, ``scp``, ``rsync -e ssh`` and ``tar | ssh | tar``
reach the benchmark's sshd through another relay with the same delay and
rate -- they dial the relay's port (a ``known_hosts`` entry for it holds the
sshd's key), which is what ``ProxyCommand nc relay port`` would do without
the extra process (``nc`` is not installed here, and a Python
``ProxyCommand`` would charge every OpenSSH run a Python start).  Each
OpenSSH command is a new connection, as when a user types it, and again over
a ``ControlMaster`` connection opened before the runs (OpenSSH at its best:
no key exchange per command).

Rows: the raw round trip through the relay (a 1-byte echo: the floor),
``execute(['true'])``, a 1 MiB ``send`` and ``fetch``, and ``send_tree`` of
1,000 files of 1-8 KiB.  Targets (from the issue): execute within one round
trip plus the process start (``subprocess.run(['true'])`` in the master); a
1 MiB transfer within two round trips plus its bytes at the link's rate; a
tree with no round trip per file -- within two round trips plus its bytes at
the rate plus what the same ``send_tree`` costs over plain loopback.
"""

from __future__ import annotations

import collections
import os
import shlex
import shutil
import socket
import subprocess
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, List, Optional, Tuple

import trees

if TYPE_CHECKING:
    from run import Bench

MiB = 1024 * 1024
#: one-way delay of the simulated link (seconds)
DELAY = 0.020
#: its rate (bytes per second): 1 Gbit/s
RATE = 125_000_000
#: most bytes in flight a direction before the relay stops reading
QUEUE_LIMIT = 32 * MiB
READ_SIZE = 64 * 1024
#: bound on every wait of the relay's threads for the other side
WAIT = 5.0
TREE_FILES = 1000
SCEN = "slow link"


class _Direction:
    """One direction of one relayed connection: a reader thread stamps each
    chunk with its arrival time at the far end; a writer thread delivers it
    then."""

    def __init__(self, src: socket.socket, dst: socket.socket, relay: "DelayRelay") -> None:
        self.src, self.dst, self.relay = src, dst, relay
        self.cond = threading.Condition()
        self.queue: Deque[Tuple[float, bytes]] = collections.deque()
        self.queued = 0
        self.link_free = 0.0
        self.done = False
        self.threads = [threading.Thread(target=self._read, daemon=True, name="slowlink-read"),
                        threading.Thread(target=self._write, daemon=True, name="slowlink-write")]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _read(self) -> None:
        try:
            while not self.relay.closed:
                data = self.src.recv(READ_SIZE)
                now = time.monotonic()
                with self.cond:
                    while self.queued >= QUEUE_LIMIT and not self.relay.closed:
                        self.cond.wait(WAIT)
                    if data:
                        self.link_free = max(now, self.link_free) + len(data) / self.relay.rate
                        self.queue.append((self.link_free + self.relay.delay, data))
                        self.queued += len(data)
                    else:
                        self.queue.append((max(now, self.link_free) + self.relay.delay, b""))
                    self.cond.notify_all()
                if not data:
                    return
        except OSError:
            with self.cond:
                self.queue.append((0.0, b""))
                self.cond.notify_all()

    def _write(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.queue and not self.relay.closed:
                        self.cond.wait(WAIT)
                    if self.relay.closed:
                        return
                    due, data = self.queue[0]
                    left = due - time.monotonic()
                    if left > 0:
                        self.cond.wait(left)  # woken early by a new chunk: check again
                        continue
                    self.queue.popleft()
                    self.queued -= len(data)
                    self.cond.notify_all()
                if not data:
                    try:
                        self.dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                self.dst.sendall(data)
        except OSError:
            pass
        finally:
            self.done = True


class DelayRelay:
    """A TCP relay on 127.0.0.1 to ``target`` that adds ``delay`` seconds
    each way and clocks bytes out at ``rate`` bytes/s (see the module
    docstring).  ``close()`` stops it and every connection."""

    def __init__(self, target: Tuple[str, int], delay: float = DELAY, rate: float = RATE) -> None:
        self.target, self.delay, self.rate = target, delay, rate
        self.closed = False
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port: int = self.sock.getsockname()[1]
        self._conns: List[Tuple[socket.socket, socket.socket, List[_Direction]]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True, name="slowlink-accept")
        self._thread.start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                a, _ = self.sock.accept()
            except OSError:
                return
            try:
                b = socket.create_connection(self.target, timeout=WAIT)
                b.settimeout(None)
            except OSError:
                a.close()
                continue
            for s in (a, b):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            dirs = [_Direction(a, b, self), _Direction(b, a, self)]
            with self._lock:
                self._conns = [c for c in self._conns if not all(d.done for d in c[2])]
                for c in [c for c in self._conns if all(d.done for d in c[2])]:
                    c[0].close()
                    c[1].close()
                self._conns.append((a, b, dirs))
            for d in dirs:
                d.start()

    def close(self) -> None:
        self.closed = True
        self.sock.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for a, b, dirs in conns:
            for d in dirs:
                with d.cond:
                    d.cond.notify_all()
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


class Echo:
    """A 1-byte echo server on 127.0.0.1 (the round-trip floor's far end)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port: int = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True, name="slowlink-echo").start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._one, args=(c,), daemon=True).start()

    @staticmethod
    def _one(c: socket.socket) -> None:
        with c:
            while True:
                data = c.recv(64)
                if not data:
                    return
                c.sendall(data)

    def close(self) -> None:
        self.sock.close()


def _count(top: str) -> int:
    return sum(len(fs) for _, _, fs in os.walk(top))


def run(bench: "Bench", Entry: Any) -> None:
    """Measure the slow-link rows into ``bench.results`` (``Entry``: run.py's class)."""
    from fixtures import TCP

    assert bench.remsh is not None
    remsh = bench.remsh
    work = os.path.join(bench.work, "slowlink")
    os.makedirs(work, exist_ok=True)
    runs = 3 if bench.quick else 5
    rtt = 2 * DELAY
    label = f"{SCEN} ({DELAY * 1e3:.0f} ms each way, {RATE * 8 / 1e9:g} Gbit/s)"
    relays: List[Any] = []
    info: Dict[str, Any] = {"delay_s": DELAY, "rate_bytes_s": RATE, "rtt_s": rtt}
    bench.results.extra["slowlink"] = info
    try:
        # -- the link, and what crosses it -------------------------------------------
        echo = Echo()
        relays.append(echo)
        echo_relay = DelayRelay(("127.0.0.1", echo.port))
        relays.append(echo_relay)
        slave: Any = None
        remsh_na: Optional[str] = remsh.na.get(TCP)
        if remsh_na is None:
            try:
                relay = DelayRelay(("127.0.0.1", remsh.ports[TCP]))
                relays.append(relay)
                slave = remsh._spawn_slave("bench-slowlink", [
                    "--secret-file", remsh.secret_file, "--basedir", remsh.basedir("slowlink"),
                    "127.0.0.1", str(relay.port)])
            except Exception as e:  # noqa: BLE001 - reported as n/a
                remsh_na = f"failed: {e}"[:90]
        direct = remsh.slaves.get(TCP)
        sshd = bench.sshd
        ssh_na = bench.peer_na("openssh") if bench.peers is not None else "no OpenSSH"
        rsync_na = ssh_na or (None if shutil.which("rsync") else "rsync is not installed")
        opts: List[str] = []
        ctl_opts: List[str] = []
        master_proc: Optional[subprocess.Popen] = None
        if ssh_na is None and sshd is not None:
            ssh_relay = DelayRelay((sshd.host, sshd.port))
            relays.append(ssh_relay)
            known = os.path.join(work, "known_hosts")
            with open(sshd.known_hosts) as f, open(known, "w") as g:
                g.write(f.read().replace(f"]:{sshd.port} ", f"]:{ssh_relay.port} "))
            base = sshd.ssh_options()
            base[base.index(f"UserKnownHostsFile={sshd.known_hosts}")] = f"UserKnownHostsFile={known}"
            opts = [*base, "-o", f"Port={ssh_relay.port}"]
            ctl = os.path.join(work, "ctl")
            ctl_opts = [*opts, "-o", f"ControlPath={ctl}", "-o", "ControlMaster=no"]
            master_proc = subprocess.Popen(["ssh", *opts, "-o", f"ControlPath={ctl}", "-o", "ControlMaster=yes",
                                            "-N", f"{sshd.user}@{sshd.host}"], stdin=subprocess.DEVNULL)
            relays.append(_Stopper(master_proc))
            deadline = time.monotonic() + 30
            while not os.path.exists(ctl):
                if master_proc.poll() is not None or time.monotonic() > deadline:
                    ssh_na = rsync_na = "ssh ControlMaster did not start"
                    break
                time.sleep(0.05)  # waiting for ssh to create its control socket
        remote = f"{sshd.user}@{sshd.host}" if sshd is not None else ""

        def ssh_e(o: List[str]) -> str:
            return " ".join(shlex.quote(a) for a in ["ssh", *o])

        def run_cmd(argv: List[str], shell: bool = False) -> None:
            subprocess.run(" ".join(argv) if shell else argv, shell=shell, check=True,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

        # -- round trip and execute ---------------------------------------------------
        es = socket.create_connection(("127.0.0.1", echo_relay.port))
        es.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        relays.append(es)

        def ping() -> None:
            es.sendall(b"x")
            if es.recv(8) != b"x":
                raise RuntimeError("echo failed")

        def ex(s: Any) -> Callable[[], None]:
            def op() -> None:
                if s.execute(["true"]) != 0:
                    raise RuntimeError("true failed")
            return op

        floor_rt = "raw round trip through the relay (floor)"
        start = "subprocess.run (process start)"
        bench.group(f"{label}: round trip", [
            Entry(floor_rt, ping, batch=10, note="1-byte echo"),
        ], runs=runs)
        bench.group(f"{label}: execute true", [
            Entry(start, lambda: subprocess.run(["true"], check=True), batch=10, note="in the master, no link"),
            Entry("remsh TCP, loopback (no relay)", ex(direct) if direct else None, baseline=start, batch=10,
                  na=remsh.na.get(TCP)),
            Entry("remsh TCP", ex(slave) if slave else None, baseline=start, batch=5, na=remsh_na),
            Entry("ssh true (new connection)", lambda: run_cmd(["ssh", *opts, remote, "true"]), baseline=start,
                  na=ssh_na),
            Entry("ssh true (ControlMaster)", lambda: run_cmd(["ssh", *ctl_opts, remote, "true"]), baseline=start,
                  na=ssh_na, batch=5),
        ], runs=runs)

        # -- 1 MiB send and fetch ------------------------------------------------------------
        src = os.path.join(work, "one.bin")
        with open(src, "wb") as f:
            f.write(os.urandom(MiB))
        dest = os.path.join(work, "one-copy.bin")

        def gone() -> None:
            if os.path.lexists(dest):
                os.unlink(dest)

        def check() -> None:
            if os.path.getsize(dest) != MiB:
                raise RuntimeError(f"{dest}: {os.path.getsize(dest)} bytes")
            gone()

        for direction in ("send", "fetch"):
            sending = direction == "send"
            a, b = (src, f"{remote}:{dest}") if sending else (f"{remote}:{src}", dest)

            def remsh_op(s: Any = slave, sending: bool = sending) -> None:
                if sending:
                    s.send(src, dest)
                else:
                    s.fetch(src, dest)

            entries = [
                Entry("remsh TCP, loopback (no relay)",
                      (lambda s=direct, sending=sending: remsh_op(s, sending)) if direct else None,
                      na=remsh.na.get(TCP)),
                Entry("remsh TCP", remsh_op if slave else None, na=remsh_na, baseline="remsh TCP, loopback (no relay)"),
                Entry("scp (new connection)", lambda a=a, b=b: run_cmd(["scp", "-q", *opts, a, b]), na=ssh_na,
                      baseline="remsh TCP"),
                Entry("scp (ControlMaster)", lambda a=a, b=b: run_cmd(["scp", "-q", *ctl_opts, a, b]), na=ssh_na,
                      baseline="remsh TCP"),
                Entry("rsync (ControlMaster)", lambda a=a, b=b: run_cmd(["rsync", "-a", "-e", ssh_e(ctl_opts), a, b]),
                      na=rsync_na, baseline="remsh TCP"),
            ]
            for e in entries:
                e.before, e.after = gone, check
            bench.group(f"{label}: {direction} 1 MiB", entries, runs=runs)

        # -- a tree of 1,000 small files -----------------------------------------------------
        tree = os.path.join(work, "tree")
        info["tree_bytes"] = trees.make_many(tree, files=TREE_FILES, dirs=20, seed=7)
        tdest = os.path.join(work, "tree-copy")
        q = shlex.quote

        def tgone() -> None:
            if os.path.lexists(tdest):
                shutil.rmtree(tdest)

        def tcheck() -> None:
            n = _count(tdest)
            if n != TREE_FILES:
                raise RuntimeError(f"{tdest}: {n} files, expected {TREE_FILES}")
            tgone()

        def tar(o: List[str]) -> Callable[[], None]:
            cmd = f"tar cf - -C {q(tree)} . | {ssh_e(o)} {q(remote)} {q(f'mkdir {q(tdest)} && tar xf - -C {q(tdest)}')}"
            return lambda: subprocess.run(cmd, shell=True, check=True, stdin=subprocess.DEVNULL)

        entries = [
            Entry("remsh TCP, loopback (no relay)", (lambda: direct.send_tree(tree, tdest)) if direct else None,
                  na=remsh.na.get(TCP)),
            Entry("remsh TCP send_tree", (lambda: slave.send_tree(tree, tdest)) if slave else None, na=remsh_na,
                  baseline="remsh TCP, loopback (no relay)"),
            Entry("tar | ssh | tar (new connection)", tar(opts), na=ssh_na, baseline="remsh TCP send_tree"),
            Entry("rsync -a (ControlMaster)",
                  lambda: run_cmd(["rsync", "-a", "-e", ssh_e(ctl_opts), tree + "/", f"{remote}:{tdest}/"]),
                  na=rsync_na, baseline="remsh TCP send_tree"),
        ]
        for e in entries:
            e.before, e.after = tgone, tcheck
        scen = f"{label}: send tree of {TREE_FILES:,} files"
        bench.group(scen, entries, runs=runs)
        # scp -r (SFTP) waits for a reply to every file's open, write and close: minutes on this
        # link, so one run without a warm-up (its connection set-up is a small part of it)
        scp = Entry("scp -r (new connection)", lambda: run_cmd(["scp", "-q", "-r", *opts, tree, f"{remote}:{tdest}"]),
                    na=ssh_na, baseline="remsh TCP send_tree", note="one run: round trips per file")
        scp.before, scp.after = tgone, tcheck
        bench.group(scen, [scp], runs=1, warmup=0)
        tgone()
    finally:
        for r in reversed(relays):
            try:
                r.close()
            except Exception:  # noqa: BLE001 - best effort at the end
                pass
        shutil.rmtree(work, ignore_errors=True)


class _Stopper:
    """Closes a helper process (the ssh ControlMaster) with the relays."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def evaluate(med: Callable[[str, str], Optional[float]], target: Callable[[str, Optional[bool], str], None],
             info: Dict[str, Any]) -> None:
    """The slow-link targets: measured against round trips and the link's rate."""
    rtt, rate = info["rtt_s"], info["rate_bytes_s"]
    label = f"{SCEN} ({info['delay_s'] * 1e3:.0f} ms each way, {rate * 8 / 1e9:g} Gbit/s)"
    measured_rtt = med(f"{label}: round trip", "raw round trip through the relay (floor)")
    if measured_rtt:
        # the relay's own hops add a little to the nominal delay: a round trip is what the floor measured
        rtt = max(rtt, measured_rtt)
    rt = f"round trip {rtt * 1e3:.1f} ms"
    scen = f"{label}: execute true"
    ex, start = med(scen, "remsh TCP"), med(scen, "subprocess.run (process start)")
    if ex and start:
        goal = rtt + start
        target("execute true over a slow link within 1 round trip + the process start", ex <= goal,
               f"{ex * 1e3:.1f} ms vs target {goal * 1e3:.1f} ms ({rt} + {start * 1e3:.2f} ms)")
    for direction in ("send", "fetch"):
        v = med(f"{label}: {direction} 1 MiB", "remsh TCP")
        if v:
            goal = 2 * rtt + MiB / rate
            target(f"{direction} 1 MiB over a slow link within 2 round trips + its bytes at link speed",
                   v <= goal, f"{v * 1e3:.1f} ms vs target {goal * 1e3:.1f} ms (2 x {rtt * 1e3:.1f} ms + "
                   f"{MiB / rate * 1e3:.1f} ms)")
    scen = f"{label}: send tree of {TREE_FILES:,} files"
    v, local = med(scen, "remsh TCP send_tree"), med(scen, "remsh TCP, loopback (no relay)")
    if v and local:
        goal = local + 2 * rtt + info.get("tree_bytes", 0) / rate
        target(f"send_tree of {TREE_FILES:,} files over a slow link: no per-file round trips", v <= goal,
               f"{v * 1e3:.0f} ms vs target {goal * 1e3:.0f} ms (loopback {local * 1e3:.0f} ms + 2 round trips + "
               f"bytes); {TREE_FILES:,} round trips would be {TREE_FILES * rtt:.0f} s")
