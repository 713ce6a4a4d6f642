"""remsh soak: random work under cuts, freezes, refusals and kills.

    python bench/soak.py [--minutes 30] [--threads 4] [--seed N]

(``make soak``; ``SOAK_MINUTES`` sets the length, ``QUICK=1`` makes it 3
minutes.)  This process is the master.  Eight real ``remsh-slave`` processes
dial it over TCP, TLS and SSH (the embedded paramiko server), each through a
relay of its own (tests/relay.py).  Worker threads run random operations
against random slaves while a chaos thread, at random, cuts a slave's
connection, freezes it (half-open: nothing forwarded, nothing closed),
refuses its redials for a while, or kills the slave process (SIGKILL) and
starts a new one under the same name.

The invariants, each checked and each failing the run (exit status 1):

- an operation succeeds with every byte verified (command output exactly
  once and in order, the digest of its stdin, SHA-256 of every file, every
  tree entry), or fails with ``Disconnected`` because its slave process was
  killed; any other failure is a finding.  A failed transfer leaves its
  destination absent or complete, never partial;
- every operation ends within its bound;
- lost bytes and duplicated bytes are 0;
- the master's RSS ends within ``--rss-slack`` MiB of where it started, and
  its threads and descriptors end no higher than they started (waited for,
  within a bound, once the last connection settled);
- nothing is left behind: no process started by a slave, no ``*.remsh-part``
  or spool file on either side (except the temporary file of a transfer whose
  slave was killed in the middle of it, which no one can remove: counted
  apart), every descriptor of the run closed.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import gc
import logging
import os
import random
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for p in (REPO, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

from fixtures import child_env, make_tls_files  # noqa: E402
from soakutil import (EMIT, SLEEPER, emit_expected, fd_count, fd_table, file_sha, make_tree,  # noqa: E402
                      rmtree, rss_bytes, sha, snapshot, tree_bytes)
from sshd import keygen  # noqa: E402

from remsh.errors import CommandTimeout, Disconnected, RemshError  # noqa: E402
from remsh.files import TEMP_SUFFIX  # noqa: E402
from remsh.master.slave import Slave  # noqa: E402
from remsh.master.slavecollection.simple import SimpleSlaveCollection  # noqa: E402
from remsh.master.slavelistener.ssh import SshSlaveListener  # noqa: E402
from remsh.master.slavelistener.tcp import TcpSlaveListener  # noqa: E402
from tests.relay import Relay  # noqa: E402

log = logging.getLogger("soak")
MiB = 1 << 20
#: How long a dropped connection is waited for.  A killed slave's restart
#: replaces its session within seconds; a freeze costs the slave three
#: silent link checks, then a redial that may meet the freeze still and
#: wait out its handshake time limit (10 s): under this bound.
RESUME_TIMEOUT = 20.0
#: Bound on each reply (a frozen link is noticed by the slave's link check long before).
IO_TIMEOUT = 30.0
#: The slaves' link check: a frozen link is redialed after three silent intervals.
HEARTBEAT = 1.0
#: Bound on every operation (the biggest moves 8 MiB; a resume takes seconds).
OP_BOUND = 120.0
#: Bound on a slave (re)registering, and on the end of the run settling.
WAIT = 60.0

# -- the slaves --------------------------------------------------------------------


class SlaveHost:
    """One named slave: its relay, its process (restarted after a kill) and
    which process registered each :class:`Slave` object."""

    def __init__(self, soak: "Soak", name: str, transport: str, listener_port: int) -> None:
        self.soak = soak
        self.name = name
        self.transport = transport
        self.basedir = os.path.join(soak.work, "slaves", name)
        os.makedirs(self.basedir)
        self.relay = Relay("127.0.0.1", listener_port, lifetime=soak.minutes * 60 + 600)
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.incarnation = 0
        #: incarnation -> when it was killed
        self.killed_at: Dict[int, float] = {}
        self.lock = threading.Lock()

    def argv(self) -> List[str]:
        s = self.soak
        args = [sys.executable, "-m", "remsh.slave.main", "--name", self.name, "--basedir", self.basedir,
                "--heartbeat", repr(HEARTBEAT), "--max-backoff", "0.3", "--connect-timeout", "3"]
        if self.transport == "SSH":
            return args + ["--ssh-client", "paramiko", "--ssh", f"{self.name}@127.0.0.1:{self.relay.port}",
                           "--identity", s.ssh_keys[self.name], "--known-hosts", s.known_hosts]
        args += ["--secret-file", s.secret_file]
        if self.transport == "TLS":
            args += ["--tls-ca", s.tls["cert"]]
        return args + ["127.0.0.1", str(self.relay.port)]

    def start(self) -> Slave:
        """Start a new process and wait for its registration."""
        old = self.soak.collection.get_slave(False, lambda x: x.name == self.name)
        with self.lock:
            self.incarnation += 1
            incarnation = self.incarnation
            logf = open(os.path.join(self.soak.work, f"{self.name}.log"), "ab")
            with logf:
                self.proc = subprocess.Popen(self.argv(), env=child_env(), cwd=self.basedir,
                                             stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
        deadline = time.monotonic() + WAIT
        while True:
            slave = self.soak.collection.get_slave(True, lambda x: x.name == self.name and x is not old,
                                                   timeout=0.5)
            if slave is not None:
                self.soak.incarnation_of[id(slave)] = (self.name, incarnation)
                self.soak.keep.append(slave)
                return slave
            if time.monotonic() > deadline:
                raise RuntimeError(f"slave {self.name} did not register within {WAIT:g} s")

    def kill(self) -> None:
        with self.lock:
            assert self.proc is not None
            self.killed_at[self.incarnation] = time.monotonic()
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(WAIT)

    def stop(self) -> None:
        self.relay.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# -- the run ---------------------------------------------------------------------


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ops: collections.Counter[str] = collections.Counter()
        self.ok: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.chaos: collections.Counter[str] = collections.Counter()
        self.bytes = 0
        self.lost = 0
        self.dup = 0
        self.excused_temps = 0
        self.findings: List[str] = []
        self.longest = 0.0

    def finding(self, text: str) -> None:
        with self.lock:
            self.findings.append(text)
        log.error("FINDING: %s", text)


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.minutes: float = args.minutes
        self.rng = random.Random(args.seed)
        self.work = tempfile.mkdtemp(prefix="remsh-soak-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        self.master_dir = os.path.join(self.work, "master").encode()
        os.mkdir(self.master_dir)
        self.stats = Stats()
        self.collection = SimpleSlaveCollection()
        self.incarnation_of: Dict[int, Tuple[str, int]] = {}
        self.keep: List[Slave] = []  # so that ids stay unique
        self.hosts: Dict[str, SlaveHost] = {}
        self.listeners: List[Any] = []
        self.stop_chaos = threading.Event()
        self.stop_work = threading.Event()
        self.inflight: Dict[int, Tuple[str, str, float]] = {}
        self.op_ids = iter(range(1, 1 << 62))
        self.id_lock = threading.Lock()
        self.samples: List[int] = []

    # -- set-up ----------------------------------------------------------------------

    def setup(self) -> None:
        d = os.path.join(self.work, "keys")
        os.mkdir(d)
        self.secret_file = os.path.join(d, "secret")
        with open(os.open(self.secret_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(os.urandom(24).hex())
        with open(self.secret_file, "rb") as f:
            secret = f.read().strip()
        self.tls = make_tls_files(d)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.tls["cert"], self.tls["key"])
        names = {"TCP": ["tcp-1", "tcp-2", "tcp-3"], "TLS": ["tls-1", "tls-2", "tls-3"],
                 "SSH": ["ssh-1", "ssh-2"]}
        host_key = os.path.join(d, "host_ed25519")
        host_pub = keygen(host_key, "soak-master")
        self.ssh_keys: Dict[str, str] = {}
        lines = []
        for name in names["SSH"]:
            self.ssh_keys[name] = os.path.join(d, f"{name}_ed25519")
            lines.append(keygen(self.ssh_keys[name], name))
        auth = os.path.join(d, "authorized_keys")
        with open(auth, "w") as f:
            f.write("\n".join(lines) + "\n")
        common: Dict[str, Any] = dict(slave_collection=self.collection, resume_timeout=RESUME_TIMEOUT,
                                      io_timeout=IO_TIMEOUT)
        tcp = TcpSlaveListener(port=0, host="127.0.0.1", secret=secret, **common)
        tls = TcpSlaveListener(port=0, host="127.0.0.1", secret=secret, ssl_context=ctx, **common)
        sshl = SshSlaveListener(port=0, host="127.0.0.1", host_key=host_key, authorized_keys=auth, **common)
        for listener in (tcp, tls, sshl):
            listener.start()
            self.listeners.append(listener)
        ports = {"TCP": tcp.port, "TLS": tls.port, "SSH": sshl.port}
        for transport, group in names.items():
            for name in group:
                self.hosts[name] = SlaveHost(self, name, transport, ports[transport])
        self.known_hosts = os.path.join(d, "known_hosts")
        key_type, key_data = host_pub.split()[:2]
        with open(self.known_hosts, "w") as f:
            for name in names["SSH"]:
                f.write(f"[127.0.0.1]:{self.hosts[name].relay.port} {key_type} {key_data}\n")
        for host in self.hosts.values():
            host.start()
        for script, text in (("emit.py", EMIT), ("sleeper.py", SLEEPER)):
            with open(os.path.join(self.work, script), "w") as f:
                f.write(text)

    def slave(self, name: str) -> Slave:
        slave = self.collection.get_slave(True, lambda x: x.name == name, timeout=WAIT)
        if slave is None:
            raise RuntimeError(f"slave {name} not registered within {WAIT:g} s")
        return slave

    # -- operations ----------------------------------------------------------------------

    def op_execute(self, rng: random.Random, slave: Slave, host: SlaveHost, tag: str, outcome: Dict[str, Any]
                   ) -> int:
        n = rng.choice((1, rng.randint(2, 200), rng.randint(200, 20000)))
        width = rng.randint(0, 200)
        stdin = rng.randbytes(rng.choice((0, rng.randint(1, 4096), rng.randint(1, 2 * MiB))))
        expected = emit_expected(n, width, tag.encode(), stdin)
        got = bytearray()
        outcome["check"] = lambda: self.check_stream(tag, bytes(got), expected, outcome)
        status = slave.execute([sys.executable, os.path.join(self.work, "emit.py"), str(n), str(width), tag],
                               stdout_cb=got.extend, stdin=stdin)
        if status != 0:
            raise AssertionError(f"exit status {status}")
        if bytes(got) != expected:
            raise AssertionError(f"output differs ({len(got)} bytes, {len(expected)} expected)")
        return len(expected) + len(stdin)

    def op_timeout(self, rng: random.Random, slave: Slave, host: SlaveHost, tag: str, outcome: Dict[str, Any]
                   ) -> int:
        """A command that outlives its ``timeout``: CommandTimeout, its
        process group killed (a process left behind is found at the end)."""
        got = bytearray()
        try:
            status = slave.execute([sys.executable, os.path.join(self.work, "sleeper.py"),
                                    str(self.minutes * 60 + 900), tag], stdout_cb=got.extend,
                                   timeout=rng.uniform(0.2, 1.5))
        except CommandTimeout:
            if bytes(got) not in (b"", b"up\n"):
                raise AssertionError(f"output {bytes(got)[:40]!r}") from None
            return len(got)
        raise AssertionError(f"the command ended with status {status} before its timeout")

    def check_stream(self, tag: str, got: bytes, expected: bytes, outcome: Dict[str, Any]) -> None:
        """Lost and duplicated bytes of a command's output (a failed call may end early)."""
        if got == expected or (not outcome.get("ok") and expected.startswith(got)):
            return
        seen: Set[bytes] = set()
        dup = 0
        for line in got.splitlines(keepends=True):
            if line in seen:
                dup += len(line)
            seen.add(line)
        lines = expected.splitlines(keepends=True)
        last = max((i for i, line in enumerate(lines) if line in seen), default=-1)
        if outcome.get("ok"):
            last = len(lines) - 1
        lost = sum(len(line) for line in lines[:last + 1] if line not in seen)
        with self.stats.lock:
            self.stats.dup += dup
            self.stats.lost += lost
        self.stats.finding(f"{tag}: output not exactly once ({len(got)} bytes, {len(expected)} expected, "
                           f"{dup} duplicated, {lost} lost)")

    def op_send(self, rng: random.Random, slave: Slave, host: SlaveHost, tag: str, outcome: Dict[str, Any]) -> int:
        data = rng.randbytes(rng.choice((0, rng.randint(1, 4096), rng.randint(1, 8 * MiB))))
        src = os.path.join(self.master_dir, tag.encode())
        dest = os.path.join(host.basedir.encode(), tag.encode())
        with open(src, "wb") as f:
            f.write(data)

        def check() -> None:
            got = file_sha(dest)
            if got is not None and got != sha(data):
                self.lost_bytes(len(data))
                self.stats.finding(f"{tag}: sent file differs on the slave")
            elif got is None and outcome.get("ok"):
                self.lost_bytes(len(data))
                self.stats.finding(f"{tag}: send succeeded, file missing on the slave")
            for path in (src, dest):
                rmtree(path)
        outcome["check"] = check
        slave.send(src, dest)
        return len(data)

    def op_fetch(self, rng: random.Random, slave: Slave, host: SlaveHost, tag: str, outcome: Dict[str, Any]
                 ) -> int:
        data = rng.randbytes(rng.choice((0, rng.randint(1, 4096), rng.randint(1, 8 * MiB))))
        src = os.path.join(host.basedir.encode(), tag.encode())
        dest = os.path.join(self.master_dir, tag.encode())
        with open(src, "wb") as f:
            f.write(data)

        def check() -> None:
            got = file_sha(dest)
            if got is not None and (got != sha(data) or not outcome.get("ok")):
                self.lost_bytes(len(data))
                self.stats.finding(f"{tag}: fetched file {'differs' if got != sha(data) else 'left after a failure'}")
            elif got is None and outcome.get("ok"):
                self.lost_bytes(len(data))
                self.stats.finding(f"{tag}: fetch succeeded, file missing")
            for path in (src, dest):
                rmtree(path)
        outcome["check"] = check
        slave.fetch(src, dest)
        return len(data)

    def tree_check(self, tag: str, want: Dict[bytes, Tuple[str, str]], dest: bytes, outcome: Dict[str, Any],
                   alt: Optional[Dict[bytes, Tuple[str, str]]] = None) -> None:
        """``dest`` holds ``want`` (success), or on failure nothing (``alt``
        None: the tree is placed whole or not at all) or each entry either
        old (``alt``) or new (``want``)."""
        if not os.path.lexists(dest):
            if outcome.get("ok"):
                self.stats.finding(f"{tag}: tree missing after success")
            return
        got = snapshot(dest)
        if outcome.get("ok") or alt is None:
            if got != want:
                bad = sorted(set(got.items()) ^ set(want.items()))[:4]
                self.stats.finding(f"{tag}: tree differs ({'after a failure' if not outcome.get('ok') else ''}"
                                   f"): {bad}")
                self.lost_bytes(1)
            return
        for rel, entry in got.items():
            if entry not in (want.get(rel), alt.get(rel)) and entry[0] != "d":
                self.stats.finding(f"{tag}: {rel!r} is neither the old nor the new version after a failure")
                self.lost_bytes(1)

    def _copy_tree(self, rng: random.Random, src: bytes, dest: bytes, copy: Callable[[bytes, bytes], object],
                   tag: str, outcome: Dict[str, Any]) -> int:
        """A random tree made at ``src``, ``copy(src, dest)``, checked and removed afterwards."""
        make_tree(rng, src)
        want = snapshot(src)

        def check() -> None:
            self.tree_check(tag, want, dest, outcome)
            rmtree(src)
            rmtree(dest)
        outcome["check"] = check
        copy(src, dest)
        return tree_bytes(src)

    def op_send_tree(self, rng: random.Random, slave: Slave, host: SlaveHost, tag: str,
                     outcome: Dict[str, Any]) -> int:
        return self._copy_tree(rng, os.path.join(self.master_dir, tag.encode()),
                               os.path.join(host.basedir.encode(), tag.encode()), slave.send_tree, tag, outcome)

    def op_fetch_tree(self, rng: random.Random, slave: Slave, host: SlaveHost, tag: str,
                      outcome: Dict[str, Any]) -> int:
        return self._copy_tree(rng, os.path.join(host.basedir.encode(), tag.encode()),
                               os.path.join(self.master_dir, tag.encode()), slave.fetch_tree, tag, outcome)

    def op_sync_tree(self, rng: random.Random, slave: Slave, host: SlaveHost, tag: str,
                     outcome: Dict[str, Any]) -> int:
        src = os.path.join(self.master_dir, tag.encode())
        dest = os.path.join(host.basedir.encode(), tag.encode())
        seed = rng.randrange(1 << 30)
        files = rng.randint(1, 25)
        make_tree(random.Random(seed), src, files)
        # the slave holds an older version: the same shape, some files changed, some extra
        make_tree(random.Random(seed), dest, files)
        for rel, entry in snapshot(dest).items():
            path = os.path.join(dest, rel)
            if entry[0] == "f" and rng.random() < 0.4:
                with open(path, "wb") as f:
                    f.write(rng.randbytes(rng.randint(0, 50000)))
        with open(os.path.join(dest, b"extra"), "wb") as f:
            f.write(b"to be deleted")
        old = snapshot(dest)
        want = snapshot(src)

        def check() -> None:
            self.tree_check(tag, want, dest, outcome, alt=old)
            rmtree(src)
            rmtree(dest)
        outcome["check"] = check
        result = slave.sync_tree(src, dest, delete=True)
        return int(result.sent_bytes)

    def lost_bytes(self, n: int) -> None:
        with self.stats.lock:
            self.stats.lost += n

    # -- workers ---------------------------------------------------------------------------

    def explained(self, slave: Slave, t1: float) -> bool:
        """Whether ``slave``'s process was killed before ``t1``."""
        name, incarnation = self.incarnation_of.get(id(slave), ("", 0))
        killed = self.hosts[name].killed_at.get(incarnation) if name else None
        return killed is not None and killed <= t1 + 1.0

    def worker(self, index: int) -> None:
        rng = random.Random(self.rng.randrange(1 << 62))
        ops: List[Tuple[str, Callable[..., int]]] = [
            ("execute", self.op_execute), ("timeout", self.op_timeout), ("send", self.op_send),
            ("fetch", self.op_fetch), ("send_tree", self.op_send_tree), ("fetch_tree", self.op_fetch_tree),
            ("sync_tree", self.op_sync_tree)]
        while not self.stop_work.is_set():
            kind, fn = rng.choice(ops)
            host = self.hosts[rng.choice(sorted(self.hosts))]
            with self.id_lock:
                tag = f"op{next(self.op_ids)}-{kind}"
            try:
                slave = self.slave(host.name)
            except RuntimeError as e:
                self.stats.finding(str(e))
                return
            outcome: Dict[str, Any] = {}
            t0 = time.monotonic()
            self.inflight[index] = (tag, host.name, t0)
            try:
                moved = fn(rng, slave, host, tag, outcome)
                outcome["ok"] = True
            except RemshError as e:
                t1 = time.monotonic()
                kind_name = type(e).__name__
                if isinstance(e, Disconnected) and self.explained(slave, t1):
                    outcome["killed"] = True
                    with self.stats.lock:
                        self.stats.errors[f"{kind_name} (slave killed)"] += 1
                else:
                    with self.stats.lock:
                        self.stats.errors[f"{kind_name} (UNEXPLAINED)"] += 1
                    self.stats.finding(f"{tag} on {host.name}: {kind_name}: {e}")
                moved = 0
            except Exception as e:  # noqa: BLE001 - a finding, reported with its trace
                self.stats.finding(f"{tag} on {host.name}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
                moved = 0
            t1 = time.monotonic()
            self.inflight.pop(index, None)
            if outcome.get("killed"):
                self.killed_ops.add(tag)
            check = outcome.get("check")
            if check is not None:
                try:
                    check()
                except Exception as e:  # noqa: BLE001
                    self.stats.finding(f"{tag}: check failed: {e!r}")
            with self.stats.lock:
                self.stats.ops[kind] += 1
                if outcome.get("ok"):
                    self.stats.ok[kind] += 1
                    self.stats.bytes += moved
                self.stats.longest = max(self.stats.longest, t1 - t0)
            if t1 - t0 > OP_BOUND:
                self.stats.finding(f"{tag} on {host.name} took {t1 - t0:.1f} s (bound {OP_BOUND:g} s)")

    # -- chaos -----------------------------------------------------------------------------------

    def chaos(self) -> None:
        rng = random.Random(self.rng.randrange(1 << 62))
        last_kill = time.monotonic()
        while not self.stop_chaos.wait(rng.uniform(0.3, 2.5)):
            # mostly a slave in the middle of an operation: that is where it hurts
            busy = sorted({name for _, name, _ in list(self.inflight.values())})
            host = self.hosts[rng.choice(busy if busy and rng.random() < 0.8 else sorted(self.hosts))]
            r = rng.random()
            try:
                if r < 0.15 and time.monotonic() - last_kill > 5:
                    host.kill()
                    self.stats.chaos["kills"] += 1
                    if self.stop_chaos.wait(rng.uniform(0.2, 2.0)):
                        pass
                    host.start()
                    last_kill = time.monotonic()
                elif r < 0.55:
                    host.relay.cut()
                    self.stats.chaos["cuts"] += 1
                elif r < 0.8:
                    host.relay.silence()
                    self.stats.chaos["freezes"] += 1
                    self.stop_chaos.wait(rng.uniform(0.5, 3.0))
                    host.relay.restore()
                else:
                    host.relay.refuse()
                    host.relay.cut()
                    self.stats.chaos["refusals"] += 1
                    self.stop_chaos.wait(rng.uniform(0.5, 3.0))
                    host.relay.restore()
            except Exception as e:  # noqa: BLE001 - the chaos must go on; reported
                self.stats.finding(f"chaos on {host.name}: {type(e).__name__}: {e}")

    def sampler(self) -> None:
        while not self.stop_work.wait(1.0):
            self.samples.append(rss_bytes())

    # -- the end -------------------------------------------------------------------------------

    def settle(self) -> Tuple[int, int]:
        """Every slave connected and answering; threads and descriptors, once settled."""
        for host in self.hosts.values():
            try:
                self.slave(host.name).ping()
            except (RemshError, RuntimeError) as e:
                # a ping may meet the last cut or a restart: once more
                try:
                    self.slave(host.name).ping()
                except (RemshError, RuntimeError):
                    self.stats.finding(f"{host.name} not answering at the end: {e}")
        gc.collect()
        return threading.active_count(), fd_count()

    def leftovers(self) -> None:
        """Temporary files and spool files on both sides."""
        roots = [self.master_dir] + [h.basedir.encode() for h in self.hosts.values()]
        for root in roots:
            for dirpath, dirnames, filenames in os.walk(root):
                for name in dirnames + filenames:
                    if not (name.endswith(TEMP_SUFFIX) or name.startswith(b".remsh-spool-")):
                        continue
                    # the operation's name: its destination, or the temporary name beside it
                    first = os.path.relpath(os.path.join(dirpath, name), root).split(b"/")[0]
                    tag = first.lstrip(b".").split(b".")[0].decode(errors="replace")
                    if tag in self.killed_ops and root != self.master_dir:
                        self.stats.excused_temps += 1
                    else:
                        self.stats.finding(f"left behind: {os.path.join(dirpath, name)!r}")
        # a slave's helpers end with it, its commands' groups are killed as
        # it goes: a moment for that, then whatever runs is left behind
        deadline = time.monotonic() + 10
        while self.strays() and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid, cmd in self.strays():
            killed = [t for t in self.killed_ops if t.encode() in cmd.split()]
            self.stats.finding(f"process left behind: {pid} {cmd!r}"
                               + (f" (its slave was killed during {killed[0]})" if killed else ""))
            try:
                os.kill(pid, signal.SIGKILL)  # started by this run: ours to end
            except OSError:
                pass

    def strays(self) -> List[Tuple[int, bytes]]:
        """Processes running a file of the run's directory (but this one)."""
        mine = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if self.work.encode() in cmd:
                mine.append((int(pid), cmd.replace(b"\0", b" ")[:120]))
        return mine

    def warm_up(self) -> None:
        """Each kind of operation once on every slave, before anything is
        measured (first-use allocations, caches, imports)."""
        rng = random.Random(0)
        for host in self.hosts.values():
            for fn in (self.op_execute, self.op_send, self.op_fetch, self.op_send_tree, self.op_fetch_tree,
                       self.op_sync_tree):
                outcome: Dict[str, Any] = {}
                fn(rng, self.slave(host.name), host, f"warm-{host.name}-{fn.__name__[3:]}", outcome)
                outcome["ok"] = True
                outcome["check"]()

    def run(self) -> int:
        try:
            return self._run()
        finally:
            # whatever happened (an exception, Ctrl-C): no slave, relay or
            # listener outlives the run, and its directory goes
            self.stop_chaos.set()
            self.stop_work.set()
            for listener in self.listeners:
                listener.stop()
            for host in self.hosts.values():
                host.stop()
            for pid, _ in self.strays():
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            shutil.rmtree(self.work, ignore_errors=True)

    def _run(self) -> int:
        base_threads, base_fds = threading.active_count(), fd_count()
        self.killed_ops: Set[str] = set()
        started = datetime.datetime.now(datetime.timezone.utc)
        self.setup()
        self.warm_up()
        gc.collect()
        threads0, fds0, table0 = threading.active_count(), fd_count(), fd_table()
        rss_setup = rss_bytes(trim=True)
        rss0: Optional[int] = None
        # RSS start: once the run reached its working size (every thread has
        # had its buffers, every kind of transfer its largest size)
        warm = max(20.0, self.minutes * 6)
        workers = [threading.Thread(target=self.worker, args=(i,), name=f"soak-worker-{i}", daemon=True)
                   for i in range(self.args.threads)]
        chaos = threading.Thread(target=self.chaos, name="soak-chaos", daemon=True)
        sampler = threading.Thread(target=self.sampler, name="soak-rss", daemon=True)
        t_start = time.monotonic()
        for t in workers + [chaos, sampler]:
            t.start()
        end = t_start + self.minutes * 60
        while time.monotonic() < end:
            time.sleep(min(5.0, max(0.0, end - time.monotonic())))
            if rss0 is None and time.monotonic() - t_start >= warm:
                rss0 = rss_bytes(trim=True)
            s = self.stats
            log.warning("%4.0f s: %d ops, %d findings, rss %.1f MiB, %d threads, %d fds",
                        time.monotonic() - t_start, sum(s.ops.values()), len(s.findings), rss_bytes() / MiB,
                        threading.active_count(), fd_count())
        self.stop_chaos.set()
        chaos.join(WAIT)
        for host in self.hosts.values():
            host.relay.restore()
            # the connections a freeze stalled are held by the relay (in
            # this process) until cut: cut them, and let the slaves resume
            host.relay.cut()
        self.stop_work.set()
        deadline = time.monotonic() + OP_BOUND + WAIT
        for t in workers:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in workers if t.is_alive()]
        if stuck:
            frames = sys._current_frames()
            for t in workers:
                if t.is_alive() and t.ident in frames:
                    log.error("%s stuck in %s:\n%s", t.name, self.inflight.get(int(t.name.rsplit("-", 1)[1])),
                              "".join(traceback.format_stack(frames[t.ident])))
            self.stats.finding(f"operations still running {OP_BOUND + WAIT:g} s after the end: {stuck}")
        sampler.join(WAIT)
        # settle: sessions' timers run out within RESUME_TIMEOUT of the last loss
        settle_end = time.monotonic() + RESUME_TIMEOUT + 15
        while True:
            threads1, fds1 = self.settle()
            if (threads1 <= threads0 and fds1 <= fds0) or time.monotonic() > settle_end:
                break
            time.sleep(1.0)
        rss1 = rss_bytes(trim=True)
        if rss0 is None:
            rss0 = rss_setup
        rss_max = max(self.samples + [rss0, rss1])
        if rss1 > rss0 + self.args.rss_slack * MiB:
            self.stats.finding(f"RSS grew from {rss0 / MiB:.1f} to {rss1 / MiB:.1f} MiB")
        if threads1 > threads0:
            self.stats.finding(f"threads grew from {threads0} to {threads1}: "
                               f"{sorted(t.name for t in threading.enumerate())}")
        if fds1 > fds0:
            table1 = fd_table()
            new = sorted(f"{fd}: {what}" for fd, what in table1.items() if table0.get(fd) != what)
            self.stats.finding(f"descriptors grew from {fds0} to {fds1}; new or changed: {new}")
        for listener in self.listeners:
            listener.stop()
        for host in self.hosts.values():
            host.stop()
        self.leftovers()
        # every thread and descriptor of the run gone (the relays' and listeners' too)
        wait_end = time.monotonic() + 15
        while (threading.active_count() > base_threads or fd_count() > base_fds) and time.monotonic() < wait_end:
            time.sleep(0.2)
        threads2, fds2 = threading.active_count(), fd_count()
        if fds2 > base_fds:
            self.stats.finding(f"descriptors left after the run: {fds2 - base_fds}: {self.fd_list()}")
        if threads2 > base_threads:
            self.stats.finding(f"threads left after the run: {sorted(t.name for t in threading.enumerate())}")
        elapsed = time.monotonic() - t_start
        self.report(started, elapsed, (rss0, rss1, rss_max), (threads0, threads1, threads2),
                    (fds0, fds1, fds2))
        return 1 if self.stats.findings or self.stats.lost or self.stats.dup else 0

    def fd_list(self) -> List[str]:
        out = []
        for fd in sorted(os.listdir("/proc/self/fd"), key=int):
            try:
                out.append(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
            except OSError:
                pass
        return out

    def report(self, started: datetime.datetime, elapsed: float, rss: Tuple[int, int, int],
               threads: Tuple[int, int, int], fds: Tuple[int, int, int]) -> None:
        s = self.stats
        print(f"remsh soak, {started:%Y-%m-%d %H:%M} UTC, {elapsed / 60:.1f} minutes: 8 slaves (3 TCP, 3 TLS, "
              f"2 SSH) behind relays, {self.args.threads} worker threads, seed {self.args.seed}")
        print()
        print("| operation | runs | succeeded | failed |")
        print("|---|---:|---:|---:|")
        for kind in ("execute", "timeout", "send", "fetch", "send_tree", "fetch_tree", "sync_tree"):
            print(f"| {kind} | {s.ops[kind]} | {s.ok[kind]} | {s.ops[kind] - s.ok[kind]} |")
        print(f"| all | {sum(s.ops.values())} | {sum(s.ok.values())} | {sum(s.ops.values()) - sum(s.ok.values())} |")
        print()
        print("| figure | value |")
        print("|---|---:|")
        rows = [
            ("bytes moved and verified", f"{s.bytes / MiB:.1f} MiB"),
            ("cuts", s.chaos["cuts"]), ("freezes (half-open)", s.chaos["freezes"]),
            ("refusals", s.chaos["refusals"]), ("kills (SIGKILL, restarted)", s.chaos["kills"]),
        ]
        for kind, n in sorted(s.errors.items()):
            rows.append((f"errors: {kind}", n))
        if not s.errors:
            rows.append(("errors", 0))
        rows += [
            ("lost bytes", s.lost), ("duplicated bytes", s.dup),
            ("temporary files left by killed slaves", s.excused_temps),
            ("longest operation", f"{s.longest:.1f} s"),
            ("RSS start / end / max", f"{rss[0] / MiB:.1f} / {rss[1] / MiB:.1f} / {rss[2] / MiB:.1f} MiB"),
            ("threads start / end / after stop", f"{threads[0]} / {threads[1]} / {threads[2]}"),
            ("descriptors start / end / after stop", f"{fds[0]} / {fds[1]} / {fds[2]}"),
            ("findings", len(s.findings)),
        ]
        for label, value in rows:
            print(f"| {label} | {value} |")
        if s.findings:
            print()
            print("FAILED:")
            for text in s.findings[:50]:
                print(f"  - {text}")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    default = 3.0 if os.environ.get("QUICK") else float(os.environ.get("SOAK_MINUTES") or 30)
    p.add_argument("--minutes", type=float, default=default,
                   help="length of the run (default: $SOAK_MINUTES, 30; 3 with $QUICK)")
    p.add_argument("--threads", type=int, default=4, help="worker threads (default 4)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    p.add_argument("--rss-slack", type=float, default=64.0, metavar="MIB",
                   help="how far the RSS may end above its start (default 64 MiB)")
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "big")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # the library's warnings about cut connections are the point of the run, not news
    logging.getLogger("remsh").setLevel(logging.ERROR)
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    logging.getLogger("remsh.transports.ssh.paramiko").setLevel(logging.CRITICAL)
    logging.getLogger("tests.relay").setLevel(logging.ERROR)
    return Soak(args).run()


if __name__ == "__main__":
    sys.exit(main())
