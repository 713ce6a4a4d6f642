"""remsh benchmark: how fast work resumes after a dropped connection (issue 10).

    python bench/resume.py [--resumes 50] [--cut-every 2] [--min-cuts 5] ...

A real ``remsh-slave`` process dials a ``TcpSlaveListener`` on 127.0.0.1
through the test suite's relay (tests/relay.py), which cuts the connection
(a reset on both ends) when told.  Two measurements, printed as one table:

1. **Resume latency.**  A command streams stdout without pause; the relay
   cuts the connection ``--resumes`` times.  For each resume: from the
   moment the relay accepts the slave's new connection to the first replayed
   byte reaching the master's ``stdout_cb``, split into the handshake (new
   connection -> the master's ``registered`` box delivered to the slave) and
   the rest (``registered`` delivered -> first byte at the master).  Target:
   the handshake plus under 10 ms.
2. **Throughput under cuts.**  The same command streams a fixed amount of
   stdout twice through the relay: once uncut, once with a cut every
   ``--cut-every`` seconds.  The stream is sized (from the uncut rate) to
   last at least ``--min-cuts`` cuts.  Target: the cut stream runs at
   >= 0.8 of the uncut one.

The redial delay after a cut (the slave's back-off, ``--max-backoff``) is
part of the throughput figure and not of the latency figure, which starts
at the new connection.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from remsh.handshake import MASTER_GREETING  # noqa: E402
from remsh.master.slave import Slave  # noqa: E402
from remsh.master.slavecollection.simple import SimpleSlaveCollection  # noqa: E402
from remsh.master.slavelistener.tcp import TcpSlaveListener  # noqa: E402
from tests.relay import Relay, Transcript  # noqa: E402
from tests.util import box_length, box_pairs  # noqa: E402

MiB = 1 << 20
SECRET = os.urandom(24).hex().encode("ascii")
#: Bound on every wait of the benchmark that is not itself measured.
WAIT = 30.0

# streams 64 KiB blocks until killed (bounded: 30 minutes)
ENDLESS = """\
import sys, time
block = b"r" * 65536
w = sys.stdout.buffer.write
end = time.monotonic() + 1800
while time.monotonic() < end:
    w(block)
"""

# streams exactly N MiB
FIXED = """\
import sys
block = b"s" * 65536
w = sys.stdout.buffer.write
for _ in range(int(sys.argv[1]) * 16):
    w(block)
sys.stdout.flush()
"""


class Bench:
    """Listener, relay and one slave process, set up once."""

    def __init__(self, workdir: str, max_backoff: float, heartbeat: Optional[float]) -> None:
        self.workdir = workdir
        self.collection = SimpleSlaveCollection()
        self.listener = TcpSlaveListener(port=0, host="127.0.0.1", secret=SECRET,
                                         slave_collection=self.collection, resume_timeout=60.0)
        self.listener.start()
        self.relay = Relay("127.0.0.1", self.listener.port, record=4096, lifetime=3600)
        secret_path = os.path.join(workdir, "secret")
        fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(SECRET + b"\n")
        basedir = os.path.join(workdir, "base")
        os.mkdir(basedir)
        argv = [sys.executable, "-m", "remsh.slave.main", "--name", "bench", "--basedir", basedir,
                "--secret-file", secret_path, "--max-backoff", repr(max_backoff)]
        if heartbeat is not None:
            argv += ["--heartbeat", repr(heartbeat)]
        argv += ["127.0.0.1", str(self.relay.port)]
        env = {k: v for k, v in os.environ.items() if k not in ("REMSH_SECRET", "PYTHONPATH")}
        env["PYTHONPATH"] = REPO
        self.log_path = os.path.join(workdir, "slave.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=basedir)
        slave = self.collection.get_slave(True, lambda s: s.name == "bench", timeout=WAIT)
        if slave is None:
            raise RuntimeError(f"the slave did not register within {WAIT} s:\n{self.slave_log()}")
        self.slave: Slave = slave

    def slave_log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-3000:]
        except OSError:
            return ""

    def script(self, name: str, text: str) -> List[str]:
        path = os.path.join(self.workdir, f"{name}.py")
        with open(path, "w") as f:
            f.write(text)
        return [sys.executable, path]

    def close(self) -> None:
        self.relay.close()
        self.listener.stop()
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            pass


class FirstByte:
    """An output callback noting the time of the first data after each ``arm()``."""

    def __init__(self) -> None:
        self.received = 0
        self.cond = threading.Condition()
        self._armed_at: Optional[float] = None
        self.first: Optional[float] = None
        self.ended: List[object] = []  # the call's result or exception, once it ended

    def end(self, outcome: object) -> None:
        """The call is over (every wait fails from now on)."""
        with self.cond:
            self.ended.append(outcome)
            self.cond.notify_all()

    def _check(self) -> None:
        if self.ended:
            raise RuntimeError(f"the streaming call ended: {self.ended[0]!r}")

    def __call__(self, data: bytes) -> None:
        now = time.monotonic()
        with self.cond:
            self.received += len(data)
            if self._armed_at is not None and self.first is None and now > self._armed_at:
                self.first = now
            self.cond.notify_all()

    def arm(self, after: float) -> None:
        """Note the first data arriving later than ``after``."""
        with self.cond:
            self._armed_at = after
            self.first = None

    def wait_first(self, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.first is None:
                self._check()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"no output within {timeout} s of the new connection")
                self.cond.wait(left)
            return self.first

    def wait_received(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.received < count:
                self._check()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"output stalled at {self.received} bytes")
                self.cond.wait(left)


def registered_at(transcript: Transcript) -> Optional[float]:
    """When the master's ``registered`` box had been delivered to the slave
    (``None``: not in the recorded bytes)."""
    data = transcript.to_client
    if not data.startswith(MASTER_GREETING):
        return None
    pos = len(MASTER_GREETING)
    while True:
        n = box_length(data[pos:])
        if n is None:
            return None
        keys = {k for k, _ in box_pairs(data[pos:pos + n])}
        pos += n
        if b"registered" in keys:
            break
    for when, count in transcript.to_client_times:
        if count >= pos:
            return when
    return None


def run_in_thread(fn: Callable[[], object], sink: Optional[FirstByte] = None
                  ) -> Tuple[threading.Thread, List[object]]:
    """Start ``fn`` in a daemon thread; the list gets its result or exception
    (and ``sink`` is told it ended)."""
    out: List[object] = []

    def target() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            out.append(e)
        if sink is not None:
            sink.end(out[0])
    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, out


def measure_latency(b: Bench, resumes: int) -> Tuple[List[float], List[float], List[float]]:
    """Per resume: (new connection -> first byte, handshake, registered -> first byte), in seconds."""
    sink = FirstByte()
    thread, result = run_in_thread(lambda: b.slave.execute(b.script("endless", ENDLESS), stdout_cb=sink), sink)
    total: List[float] = []
    handshake: List[float] = []
    rest: List[float] = []
    try:
        sink.wait_received(MiB, WAIT)
        for _ in range(resumes):
            before = b.relay.accepted
            b.relay.cut()
            if not b.relay.wait_accepted(before + 1, WAIT):
                raise RuntimeError(f"the slave did not redial within {WAIT} s:\n{b.slave_log()}")
            accepted = b.relay.accept_times[before]
            sink.arm(accepted)
            try:
                first = sink.wait_first(WAIT)
            except RuntimeError as e:
                raise RuntimeError(f"resume {len(total) + 1}: {e} (received {sink.received} bytes, relay "
                                   f"{b.relay.bytes_forwarded}, {b.relay.active} connections, slave "
                                   f"{'connected' if b.slave.connected else 'away'})\n{b.slave_log()}") from None
            total.append(first - accepted)
            reg = registered_at(b.relay.transcripts()[before])
            if reg is not None:
                handshake.append(reg - accepted)
                rest.append(first - reg)
            # let the stream run on the new connection before the next cut
            sink.wait_received(sink.received + 256 * 1024, WAIT)
    finally:
        b.slave.interrupt()
        thread.join(WAIT)
    if result and isinstance(result[0], BaseException):
        raise RuntimeError(f"the streaming command failed: {result[0]!r}")
    return total, handshake, rest


def stream(b: Bench, mib: int, cut_every: Optional[float]) -> Tuple[float, int]:
    """Stream ``mib`` MiB of stdout; with ``cut_every``, cut the connection
    every so many seconds.  Returns (MiB/s, cuts made)."""
    sink = FirstByte()
    done = threading.Event()
    cuts = [0]

    def chaos() -> None:
        assert cut_every is not None
        while not done.wait(cut_every):
            b.relay.cut()
            cuts[0] += 1
    start = time.monotonic()
    chaos_thread = None
    if cut_every is not None:
        chaos_thread = threading.Thread(target=chaos, daemon=True)
        chaos_thread.start()
    try:
        status = b.slave.execute(b.script("fixed", FIXED) + [str(mib)], stdout_cb=sink)
    finally:
        done.set()
        if chaos_thread is not None:
            chaos_thread.join(WAIT)
    elapsed = time.monotonic() - start
    if status != 0 or sink.received != mib * MiB:
        raise RuntimeError(f"stream ended with status {status} after {sink.received} of {mib * MiB} bytes")
    return mib / elapsed, cuts[0]


def ms(values: List[float]) -> str:
    if not values:
        return "n/a"
    return f"{statistics.median(values) * 1000:8.2f} {max(values) * 1000:8.2f}"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--resumes", type=int, default=50, help="resumes to time (default 50)")
    p.add_argument("--cut-every", type=float, default=2.0, metavar="SECONDS",
                   help="interval between cuts of the throughput run (default 2)")
    p.add_argument("--min-cuts", type=int, default=5,
                   help="size the throughput stream to last at least this many cuts (default 5)")
    p.add_argument("--stream-mib", type=int, default=64,
                   help="least size of the throughput stream in MiB (default 64)")
    p.add_argument("--max-stream-mib", type=int, default=4096, help="largest stream in MiB (default 4096)")
    p.add_argument("--max-backoff", type=float, default=0.2, metavar="SECONDS",
                   help="the slave's longest redial delay (default 0.2)")
    p.add_argument("--heartbeat", type=float, default=None, metavar="SECONDS",
                   help="the slave's link check interval (default: the slave's own)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    workdir = tempfile.mkdtemp(prefix="remsh-bench-resume-")
    try:
        b = Bench(workdir, args.max_backoff, args.heartbeat)
        try:
            total, handshake, rest = measure_latency(b, args.resumes)
            # size the stream from a first uncut run, so the cut run lasts min_cuts cuts
            rate, _ = stream(b, args.stream_mib, None)
            mib = int(min(args.max_stream_mib,
                          max(args.stream_mib, rate * args.cut_every * (args.min_cuts + 1))))
            uncut, _ = stream(b, mib, None)
            cut, cuts = stream(b, mib, args.cut_every)
        finally:
            b.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ratio = cut / uncut
    rest_ok = bool(rest) and statistics.median(rest) < 0.010
    print(f"remsh resume benchmark (TCP on 127.0.0.1 through a relay; slave --max-backoff {args.max_backoff})")
    print()
    print(f"{'resume latency, ' + str(len(total)) + ' resumes':52} {'median ms':>8} {'max ms':>8}")
    print(f"{'  new connection -> first replayed byte at master':52} {ms(total)}")
    print(f"{'    handshake (-> registered delivered to slave)':52} {ms(handshake)}")
    print(f"{'    registered -> first replayed byte':52} {ms(rest)}"
          f"   target < 10 ms: {'ok' if rest_ok else 'MISSED'}")
    print()
    print(f"{'streamed stdout, ' + str(mib) + ' MiB':52} {'MiB/s':>8}")
    print(f"{'  uncut':52} {uncut:8.1f}")
    print(f"{'  a cut every ' + format(args.cut_every, 'g') + ' s (' + str(cuts) + ' cuts)':52} {cut:8.1f}")
    print(f"{'  ratio cut / uncut':52} {ratio:8.2f}   target >= 0.8: {'ok' if ratio >= 0.8 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
