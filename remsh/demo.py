"""A tour of remsh: ``python -m remsh.demo``.

Starts two slaves as local child processes, each rooted in its own
temporary directory, drives every operation of the protocol against them
and prints one line per step.  Exits with status 1 if any step failed.

Everything here uses the public API only, so the file doubles as an
example of how a master program is written.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import tempfile
import threading
import time
from typing import Callable, Dict, List, Optional, Set, TextIO, Tuple, Union

from remsh.ops import OPERATIONS
from remsh.errors import CommandTimeout, NotFoundError, RemshError
from remsh.lineprinter import LinePrinter
from remsh.master.slave import Slave
from remsh.master.slavelistener.local import LocalSlaveListener

SEND_SIZE = 4 * 1024 * 1024
STDIN_SIZE = 1024 * 1024
PINGS = 200


def _symbols() -> Tuple[str, str, str, str]:
    """Check mark, cross, bar and micro sign, or ASCII where stdout cannot encode them."""
    try:
        "✓✗│µ".encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "ok", "FAIL", "|", "u"
    return "✓", "✗", "│", "µ"


OK, FAIL, BAR, MICRO = _symbols()


class Report:
    """Runs steps and writes one line for each to ``out``: mark, name, result."""

    def __init__(self, out: Optional[TextIO] = None) -> None:
        self.out = out if out is not None else sys.stdout
        self.failures = 0
        #: prints commands' output lines (source "alpha out" and so on)
        #: between the report's own lines
        self.printer = LinePrinter([], label=lambda source: f"      {source} {BAR} ")
        #: the first word of every step that worked (an operation's name)
        self.shown: Set[str] = set()

    def line(self, text: str) -> None:
        self.printer.write_line(self.out, text)

    def step(self, name: str, action: Callable[[], str]) -> None:
        start = time.monotonic()
        try:
            result = action()
        except Exception as e:  # noqa: BLE001 - a demo reports every failure and goes on
            self.failures += 1
            self.line(f"  {FAIL} {name:<22} {type(e).__name__}: {e}")
            return
        elapsed = time.monotonic() - start
        self.shown.add(name.split()[0])
        self.line(f"  {OK} {name:<22} {result}  ({_duration(elapsed)})")


def _duration(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} {MICRO}s"
    if seconds < 1:
        return f"{seconds * 1e3:.0f} ms"
    return f"{seconds:.2f} s"


def _short(path: str, root: str) -> str:
    """``path`` relative to the demo's temporary root, for shorter lines."""
    rel = os.path.relpath(path, root)
    return path if rel.startswith("..") else os.path.join("$TMP", rel)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_demo(root: str, report: Report) -> None:
    local_dir = os.path.join(root, "master")
    os.mkdir(local_dir)
    names = ["alpha", "beta"]
    with LocalSlaveListener() as listener:
        slaves: List[Slave] = []

        # -- connect -------------------------------------------------------
        def start() -> str:
            for name in names:
                basedir = os.path.join(root, name)
                os.mkdir(basedir)
                slaves.append(listener.start_slave(basedir, name=name))
            count = len(listener.slave_collection.get_all_slaves())
            s = slaves[0]
            return (f"{count} slaves registered: {', '.join(x.name for x in slaves)} "
                    f"(Python {s.info.get('python', '?')}, remsh {s.info.get('remsh', '?')})")

        report.step("start_slave x2", start)
        if len(slaves) != len(names):
            return
        alpha, beta = slaves

        # -- environment and directories ----------------------------------
        def getenv() -> str:
            env = alpha.getenv()
            path_entries = len(env.get("PATH", "").split(os.pathsep))
            return f"{len(env)} variables; PATH has {path_entries} entries"

        report.step("getenv", getenv)

        def mkdir() -> str:
            alpha.mkdir("work/sub/dir")
            alpha.mkdir("work/sub/dir")  # like mkdir -p: an existing directory is fine
            return f"work/sub/dir made (twice: mkdir -p); stat says {alpha.stat('work/sub/dir')!r}"

        report.step("mkdir", mkdir)

        def set_cwd() -> str:
            inside = alpha.set_cwd("work")
            unchanged = alpha.set_cwd("")
            base = alpha.set_cwd()
            if inside != unchanged:
                raise AssertionError(f"set_cwd('') moved from {inside} to {unchanged}")
            return f"'work' -> {_short(inside, root)}, back to base {_short(base, root)}"

        report.step("set_cwd", set_cwd)

        # -- files ----------------------------------------------------------
        source = os.path.join(local_dir, "data.bin")
        with open(source, "wb") as f:
            f.write(os.urandom(SEND_SIZE))
        source_digest = _sha256_file(source)

        def send() -> str:
            t0 = time.monotonic()
            alpha.send(source, "work/data.bin")
            rate = SEND_SIZE / (1 << 20) / max(time.monotonic() - t0, 1e-9)
            return f"{SEND_SIZE >> 20} MiB -> alpha:work/data.bin, sha256-checked ({rate:.0f} MiB/s)"

        report.step("send", send)

        def stat() -> str:
            results = {p: alpha.stat(p) for p in ("work/data.bin", "work", "no-such-thing")}
            if results != {"work/data.bin": "f", "work": "d", "no-such-thing": None}:
                raise AssertionError(f"unexpected stat results {results}")
            return ", ".join(f"{p}: {r!r}" for p, r in results.items())

        report.step("stat", stat)

        def copy() -> str:
            alpha.copy("work/data.bin", "work/data-copy.bin")
            return f"work/data.bin -> work/data-copy.bin ({alpha.stat('work/data-copy.bin')!r})"

        report.step("copy", copy)

        def rename() -> str:
            alpha.rename("work/data-copy.bin", "work/sub/renamed.bin")
            gone = alpha.stat("work/data-copy.bin")
            return f"work/data-copy.bin -> work/sub/renamed.bin (old name now {gone!r})"

        report.step("rename", rename)

        def fetch() -> str:
            dest = os.path.join(local_dir, "fetched.bin")
            alpha.fetch("work/sub/renamed.bin", dest)
            got = _sha256_file(dest)
            if got != source_digest:
                raise AssertionError(f"digest mismatch: sent {source_digest}, fetched {got}")
            return f"alpha:work/sub/renamed.bin -> master, sha256 {got[:16]}... matches what was sent"

        report.step("fetch", fetch)

        # -- commands -------------------------------------------------------
        def execute_streamed() -> str:
            script = ('echo "hello from $REMSH_DEMO_NAME in $PWD"; '
                      'echo "2 + 3 = $((2 + 3))"; '
                      'echo "a line on stderr" >&2; '
                      'exit 3')
            results: Dict[str, Union[int, Exception]] = {}

            def run(slave: Slave) -> None:
                out, err = f"{slave.name:<5} out", f"{slave.name:<5} err"
                try:
                    results[slave.name] = slave.execute(
                        ["sh", "-c", script], stdout_cb=report.printer.sink(out, report.out),
                        stderr_cb=report.printer.sink(err, report.out),
                        env={"REMSH_DEMO_NAME": slave.name}, cwd=".")
                except Exception as e:  # noqa: BLE001 - reported below
                    results[slave.name] = e
                finally:
                    report.printer.flush(out, report.out)
                    report.printer.flush(err, report.out)

            threads = [threading.Thread(target=run, args=(s,)) for s in slaves]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for name, result in results.items():
                if isinstance(result, Exception):
                    raise result
                if result != 3:
                    raise AssertionError(f"{name}: exit status {result}, expected 3")
            return "both slaves in parallel, output prefixed above; exit status 3 on each"

        report.step("execute (streamed)", execute_streamed)

        def execute_stdin() -> str:
            data = os.urandom(STDIN_SIZE)
            out = bytearray()
            code = ("import hashlib, sys; "
                    "d = sys.stdin.buffer.read(); "
                    "print(len(d), hashlib.sha256(d).hexdigest())")
            status = beta.execute([sys.executable, "-c", code], stdout_cb=out.extend, stdin=data)
            length, digest = out.decode().split()
            if status != 0 or int(length) != len(data) or digest != hashlib.sha256(data).hexdigest():
                raise AssertionError(f"command saw {out.decode().strip()!r}, status {status}")
            return f"{STDIN_SIZE >> 20} MiB piped into a command on beta; it read {length} bytes, same sha256"

        report.step("execute (stdin)", execute_stdin)

        def execute_timeout() -> str:
            t0 = time.monotonic()
            try:
                beta.execute(["sleep", "30"], timeout=1.0)
            except CommandTimeout as e:
                return f"'sleep 30' with timeout=1 -> CommandTimeout after {time.monotonic() - t0:.1f} s [{e.errtag}]"
            raise AssertionError("the command was not stopped by its time limit")

        report.step("execute (timeout)", execute_timeout)

        def execute_interrupt() -> str:
            started = threading.Event()
            seen = bytearray()

            def on_output(data: bytes) -> None:
                seen.extend(data)
                if b"started" in seen:
                    started.set()

            def interrupter() -> None:
                if started.wait(10):
                    alpha.interrupt()

            helper = threading.Thread(target=interrupter)
            helper.start()
            t0 = time.monotonic()
            try:
                status = alpha.execute(["sh", "-c", "echo started; exec sleep 30"], stdout_cb=on_output)
            finally:
                started.set()
                helper.join()
            if status >= 0:
                raise AssertionError(f"command was not killed (status {status})")
            return f"interrupt() from another thread: status {status} after {time.monotonic() - t0:.2f} s"

        report.step("interrupt", execute_interrupt)

        def chmod() -> str:
            alpha.chmod("work/data.bin", 0o600)
            mode = os.stat(os.path.join(root, "alpha", "work", "data.bin")).st_mode & 0o777
            return f"work/data.bin set to {mode:04o}"

        report.step("chmod", chmod)

        # -- directory trees ------------------------------------------------
        tree = os.path.join(local_dir, "tree")

        def send_tree() -> str:
            for i in range(200):
                sub = os.path.join(tree, f"d{i % 10}")
                os.makedirs(sub, exist_ok=True)
                with open(os.path.join(sub, f"f{i}.txt"), "wb") as f:
                    f.write(b"line %d\n" % i * (i + 1))
            os.symlink("d0/f0.txt", os.path.join(tree, "link"))
            beta.send_tree(tree, "tree")
            return "200 files in 10 directories and a symbolic link, in one conversation, verified"

        report.step("send_tree", send_tree)

        def sync_tree() -> str:
            with open(os.path.join(tree, "d3", "f3.txt"), "ab") as f:
                f.write(b"changed\n")
            result = beta.sync_tree(tree, "tree")
            return (f"after changing one file: {result.sent_files} sent, {result.unchanged} unchanged, "
                    f"{result.deleted} deleted")

        report.step("sync_tree", sync_tree)

        def fetch_tree() -> str:
            back = os.path.join(local_dir, "tree-back")
            beta.fetch_tree("tree", back)
            count = sum(len(files) for _, _, files in os.walk(back))
            still_link = os.path.islink(os.path.join(back, "link"))
            return f"fetched back: {count} entries (the link stays a link: {still_link})"

        report.step("fetch_tree", fetch_tree)

        # -- clean-up -------------------------------------------------------
        def unlink() -> str:
            alpha.unlink("work/data.bin")
            try:
                alpha.unlink("work/data.bin")
            except NotFoundError as e:
                return f"work/data.bin removed; unlinking it again -> NotFoundError [{e.errtag}]"
            raise AssertionError("second unlink did not fail")

        report.step("unlink", unlink)

        def remove() -> str:
            alpha.remove("work")
            alpha.remove("work")  # like rm -rf: a missing path is fine
            return f"whole 'work' tree removed (stat now {alpha.stat('work')!r})"

        report.step("remove", remove)

        def ping() -> str:
            times = []
            for _ in range(PINGS):
                t0 = time.perf_counter()
                beta.ping()
                times.append(time.perf_counter() - t0)
            times.sort()
            return (f"{PINGS} round trips: median {_duration(times[len(times) // 2])}, "
                    f"best {_duration(times[0])}")

        report.step("ping", ping)

        def kill() -> str:
            listener.kill_slave(beta)
            try:
                beta.ping()
            except RemshError as e:
                left = [s.name for s in listener.slave_collection.get_all_slaves()]
                return f"beta killed; it raises {type(e).__name__}; collection now {left}"
            raise AssertionError("ping on a killed slave succeeded")

        report.step("kill_slave", kill)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m remsh.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--verbose", action="store_true", help="show remsh's log messages on stderr")
    args = parser.parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    else:
        logging.getLogger("remsh").addHandler(logging.NullHandler())
        logging.getLogger("remsh").propagate = False

    report = Report()
    with tempfile.TemporaryDirectory(prefix="remsh-demo-") as root:
        report.line(f"remsh demo: two local slaves, files under $TMP = {root}")
        t0 = time.monotonic()
        run_demo(root, report)
        total = time.monotonic() - t0
    missing = sorted(set(OPERATIONS) - report.shown)
    if missing:  # an operation added to the table and forgotten here
        report.failures += 1
        report.line(f"  {FAIL} operations the demo did not show: {', '.join(missing)}")
    if report.failures:
        report.line(f"{report.failures} step(s) failed ({total:.1f} s).")
        return 1
    report.line(f"Every operation worked ({total:.1f} s).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
