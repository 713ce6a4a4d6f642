"""remsh.aio with resumable sessions: work survives a cut connection, with real slave processes.

A real ``remsh-slave`` process dials a :class:`remsh.aio.TcpSlaveListener`
(``resume_timeout`` > 0; TCP or TLS) through the relay of
:mod:`tests.relay`, which the test cuts (both ends reset, what is in flight
lost).  The slave redials within a fraction of a second (short back-off
and link check) and the session carries on: a command's output arrives
exactly once with the right exit status, a file sent or fetched is
identical; a slave kept away past ``resume_timeout`` fails the call in
progress with ``Disconnected`` naming slave and operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import socket
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Coroutine, Dict, List, Optional, Tuple, TypeVar

import pytest

import remsh.aio as aio
from remsh.errors import Disconnected, ProtocolError, UsageError, WaitTimeout
from remsh.handshake import MASTER_GREETING, SLAVE_GREETING, exchange_greeting, refusal_box, slave_proof
from remsh.transports.base import SocketStream
from remsh.wire import Box, Wire
from tests.relay import Relay
from tests.slaveproc import HOST, SECRET, WAIT, SlaveProcess, SlaveProcesses, slave_procs  # noqa: F401 - a fixture
from tests.test_resume import NUMBERED, impostor_register, numbered, same_bytes, session_of
from tests.transports import Pki, make_pki, server_context

pytestmark = pytest.mark.timeout(180)

MiB = 1 << 20
#: The slave's link check interval (``--heartbeat``) and longest back-off.
HEARTBEAT = 0.3
MAX_BACKOFF = 0.2
#: A resume_timeout no test reaches by accident.
LONG_RESUME = 30.0

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, WAIT * 8))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("aio-resume-pki"))


class Rig:
    """An aio listener, a relay in front of it, one slave process dialing the relay."""

    def __init__(self, listener: Any, relay: Relay, proc: SlaveProcess, slave: aio.AsyncSlave) -> None:
        self.listener = listener
        self.relay = relay
        self.proc = proc
        self.slave = slave

    async def call(self, fn: Any, *args: Any) -> Any:
        """A blocking relay method, off the event loop."""
        return await asyncio.to_thread(fn, *args)


@contextlib.asynccontextmanager
async def rig(procs: SlaveProcesses, name: str, *, resume_timeout: float = LONG_RESUME,
              pki: Optional[Pki] = None, record: int = 0) -> AsyncIterator[Rig]:
    listener = aio.TcpSlaveListener(port=0, host=HOST, secret=SECRET, resume_timeout=resume_timeout,
                                    ssl_context=server_context(pki) if pki is not None else None)
    async with listener:
        relay = Relay(HOST, listener.port, lifetime=300, record=record)
        try:
            proc = procs.start(relay.port, name, max_backoff=MAX_BACKOFF, tls_ca=pki.ca if pki else None,
                               extra_args=["--heartbeat", repr(HEARTBEAT)])
            try:
                slave = await listener.slave_collection.get_slave(filter=lambda s: s.name == name, timeout=WAIT)
            except WaitTimeout:
                pytest.fail(f"slave {name} did not register\n{proc.log_text()}")
            assert slave.resumable
            await slave.ping()  # the slave has taken its session in (a cut before that is a new registration)
            yield Rig(listener, relay, proc, slave)
        finally:
            await asyncio.to_thread(relay.close)


def lines_script(tmp_path: Path, lines: int, pause: float, status: int) -> List[str]:
    """A command printing ``lines`` numbered lines, ``pause`` s apart, then exiting with ``status``."""
    path = tmp_path / "lines.py"
    path.write_text("import sys, time\n"
                    f"for i in range({lines}):\n"
                    "    sys.stdout.write('line %03d\\n' % i); sys.stdout.flush()\n"
                    f"    time.sleep({pause!r})\n"
                    f"sys.exit({status})\n")
    return [sys.executable, str(path)]


def expected_lines(lines: int) -> bytes:
    return b"".join(b"line %03d\n" % i for i in range(lines))


@pytest.mark.parametrize("kind", ["tcp", "tls"])
def test_execute_output_exactly_once_across_a_cut(slave_procs: SlaveProcesses, tmp_path: Path, pki: Pki,
                                                  kind: str) -> None:
    """A cut while a command prints 60 lines: every line arrives exactly once and in order, the exit status is the command's."""
    async def main() -> Tuple[bytes, int, int]:
        async with rig(slave_procs, f"lines-{kind}", pki=pki if kind == "tls" else None) as r:
            out = bytearray()
            cut = asyncio.Event()

            async def on_out(data: bytes) -> None:
                out.extend(data)
                if not cut.is_set() and out.count(b"\n") >= 20:
                    cut.set()
                    await r.call(r.relay.cut)
            status = await r.slave.execute(lines_script(tmp_path, 60, 0.02, 3), stdout_cb=on_out)
            assert cut.is_set(), "the command ended before the cut"
            return bytes(out), status, r.relay.accepted
    out, status, accepted = run(main())
    assert out == expected_lines(60)
    assert status == 3
    assert accepted >= 2, "the slave never redialed"


def test_execute_cut_before_the_first_output(slave_procs: SlaveProcesses, tmp_path: Path) -> None:
    """A cut right after the request goes out (before the command's start reply): the command runs once and its output arrives once."""
    async def main() -> Tuple[bytes, int]:
        async with rig(slave_procs, "early") as r:
            out = bytearray()
            fired = r.relay.cut_when(to_client=r.relay.bytes_forwarded.to_client + 1)
            marker = tmp_path / "runs"
            script = lines_script(tmp_path, 5, 0.01, 0)
            status = await r.slave.execute(["sh", "-c", f"echo x >> {marker}; exec \"$0\" \"$@\""] + script,
                                           stdout_cb=out.extend)
            assert fired.is_set()
            return bytes(out), status
    out, status = run(main())
    assert out == expected_lines(5) and status == 0
    assert (tmp_path / "runs").read_text() == "x\n", "the command ran more than once"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_send_resumes_after_a_cut(slave_procs: SlaveProcesses, tmp_path: Path) -> None:
    """A cut halfway through sending 4 MiB: the send goes on over the slave's next connection and the slave's file has the same SHA-256."""
    size = 4 * MiB
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(size))

    async def main() -> Tuple[Path, bool, int]:
        async with rig(slave_procs, "receiver") as r:
            fired = r.relay.cut_when(to_client=r.relay.bytes_forwarded.to_client + size // 2)
            await r.slave.send(str(src), "dest.bin")
            await r.slave.ping()
            return r.proc.basedir / "dest.bin", fired.is_set(), r.relay.since_mark().to_client
    dest, fired, after = run(main())
    assert fired, "the transfer never reached the cut"
    assert sha256(dest) == sha256(src)
    # what was in flight at the reset is lost and sent again (how much depends
    # on how far the receiver had read: not bounded by the test)
    assert after > 0


def test_fetch_resumes_after_a_cut(slave_procs: SlaveProcesses, tmp_path: Path) -> None:
    """A cut halfway through fetching 4 MiB: the fetch goes on over the slave's next connection and the local file has the same SHA-256."""
    size = 4 * MiB
    dest = tmp_path / "fetched.bin"

    async def main() -> Tuple[Path, bool, int]:
        async with rig(slave_procs, "sender") as r:
            src = r.proc.basedir / "src.bin"
            src.write_bytes(os.urandom(size))
            fired = r.relay.cut_when(to_target=r.relay.bytes_forwarded.to_target + size // 2)
            await r.slave.fetch("src.bin", str(dest))
            return src, fired.is_set(), r.relay.since_mark().to_target
    src, fired, after = run(main())
    assert fired, "the transfer never reached the cut"
    assert sha256(dest) == sha256(src)
    # what was in flight at the reset is lost and sent again (how much depends
    # on how far the receiver had read: not bounded by the test)
    assert after > 0


def test_stdin_arrives_exactly_once_across_a_cut(slave_procs: SlaveProcesses, tmp_path: Path) -> None:
    """A cut while a command reads 3 MiB of stdin: the digest it prints is that of the data given."""
    data = os.urandom(3 * MiB)
    digest = ("import hashlib, sys\nh = hashlib.sha256(); n = 0\n"
              "for chunk in iter(lambda: sys.stdin.buffer.read(65536), b''):\n"
              "    h.update(chunk); n += len(chunk)\n"
              "print(n, h.hexdigest())\n")

    async def main() -> bytes:
        async with rig(slave_procs, "stdin") as r:
            out = bytearray()
            fired = r.relay.cut_when(to_client=r.relay.bytes_forwarded.to_client + len(data) // 2)
            status = await r.slave.execute([sys.executable, "-c", digest], stdout_cb=out.extend, stdin=data)
            assert status == 0 and fired.is_set()
            return bytes(out)
    out = run(main())
    assert out.split() == [str(len(data)).encode(), hashlib.sha256(data).hexdigest().encode()]


def test_not_back_within_resume_timeout(slave_procs: SlaveProcesses, tmp_path: Path) -> None:
    """A slave kept away past resume_timeout: the execute in progress raises Disconnected naming slave and operation, about resume_timeout after the cut, and the slave leaves the collection."""
    resume = 1.0

    async def main() -> Tuple[BaseException, float, int]:
        async with rig(slave_procs, "gone", resume_timeout=resume) as r:
            started = asyncio.Event()
            cut_at: List[float] = []

            async def on_out(data: bytes) -> None:
                if not started.is_set():
                    started.set()
                    await r.call(r.relay.refuse)
                    await r.call(r.relay.cut)
                    cut_at.append(time.monotonic())
            with pytest.raises(Disconnected) as info:
                await r.slave.execute(lines_script(tmp_path, 3000, 0.01, 0), stdout_cb=on_out)
            waited = time.monotonic() - cut_at[0]
            assert not r.slave.connected
            return info.value, waited, len(r.listener.slave_collection.get_all_slaves())
    error, waited, left = run(main())
    text = str(error)
    assert text.startswith("gone: execute:"), text
    assert "did not come back" in text, text
    assert resume * 0.9 <= waited < resume + WAIT, waited
    assert left == 0


def test_idle_slave_not_back_within_resume_timeout_is_dropped(slave_procs: SlaveProcesses) -> None:
    """An idle slave cut and kept away past resume_timeout leaves the collection; one back in time stays the same object."""
    async def main() -> None:
        async with rig(slave_procs, "idle", resume_timeout=1.0) as r:
            await r.call(r.relay.cut)
            assert await asyncio.to_thread(r.relay.wait_accepted, 2, WAIT), "the slave did not redial"
            await r.slave.ping()  # the same object, carried on
            assert r.slave.connected
            assert await r.listener.slave_collection.get_slave(timeout=1) is r.slave
            await r.call(r.relay.refuse)
            await r.call(r.relay.cut)
            end = time.monotonic() + WAIT
            while r.slave.connected and time.monotonic() < end:
                await asyncio.sleep(0.05)
            assert not r.slave.connected
            assert r.listener.slave_collection.get_all_slaves() == []
            with pytest.raises(Disconnected, match="idle: ping"):
                await r.slave.ping()
    run(main())


def test_resume_timeout_bounds() -> None:
    """resume_timeout must be a finite number of seconds, 0 or more (0: no sessions)."""
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(UsageError):
            aio.TcpSlaveListener(port=0, secret=SECRET, resume_timeout=bad)
    assert aio.TcpSlaveListener(port=0, secret=SECRET, resume_timeout=5).resume_timeout == 5.0


def test_impostor_with_the_secret_cannot_take_another_slaves_session(slave_procs: SlaveProcesses) -> None:
    """Another name presenting a slave's session id is refused, while the slave is connected and while it is away; the slave then resumes untouched."""
    async def main() -> None:
        async with rig(slave_procs, "victim", record=4096) as r:
            session = await asyncio.to_thread(session_of, r.relay)
            plain = await asyncio.to_thread(impostor_register, r.listener.port, b"bystander", {})
            assert plain is not None and plain.get(b"registered") == b"bystander", plain
            ask = {b"resumable": b"y", b"resume": session, b"received": b"0"}
            for moment in ("connected", "away"):
                if moment == "away":
                    await r.call(r.relay.refuse)
                    await r.call(r.relay.cut)
                answer = await asyncio.to_thread(impostor_register, r.listener.port, b"mallory", ask)
                assert answer is None or answer == refusal_box(), f"{moment}: impostor got {answer!r}"
                names = [s.name for s in r.listener.slave_collection.get_all_slaves()]
                assert "mallory" not in names, moment
            await r.call(r.relay.restore)
            await r.slave.ping()  # waits for the resume
            assert await r.listener.slave_collection.get_slave(lambda s: s.name == "victim", timeout=WAIT) is r.slave
    run(main())


def test_execute_stream_exactly_once_across_several_cuts(slave_procs: SlaveProcesses, tmp_path: Path) -> None:
    """Three cuts at random byte counts (inside boxes or between them) while a command streams 3 MiB: the callback gets exactly the stream, in order, then status 0."""
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    size, cuts = 3 * MiB, 3
    lines = size // 10
    budgets = [rng.randrange(1024, int(size * 0.8) // cuts) for _ in range(cuts)]
    script = tmp_path / "numbered.py"
    script.write_text(NUMBERED)

    async def main() -> Tuple[bytes, int, int]:
        async with rig(slave_procs, "streamer") as r:
            out = bytearray()
            made: List[int] = []

            async def chaos() -> None:
                for budget in budgets:
                    ok = await asyncio.to_thread(r.relay.wait_accepted, len(made) + 1, WAIT)
                    assert ok, "the slave did not redial"
                    fired = r.relay.cut_when(to_target=r.relay.bytes_forwarded.to_target + budget, mark=False)
                    while not await asyncio.to_thread(fired.wait, 0.05):
                        pass
                    made.append(len(out))
            cutter = asyncio.get_running_loop().create_task(chaos())
            status = await r.slave.execute([sys.executable, str(script), str(lines)], stdout_cb=out.extend)
            await asyncio.wait_for(cutter, WAIT)
            return bytes(out), status, len(made)
    out, status, made = run(main())
    context = f"seed {seed}, budgets {budgets}"
    assert status == 0, context
    problem = same_bytes(out, numbered(lines))
    assert problem is None, f"{problem}; {context}"
    assert made == cuts, context


def test_link_checks_are_answered(slave_procs: SlaveProcesses) -> None:
    """An idle slave checking its link every 0.3 s gets its answers: it keeps its one connection for 2 s (it would redial after 0.9 s of silence)."""
    async def main() -> int:
        async with rig(slave_procs, "quiet") as r:
            await asyncio.sleep(2.0)  # the property is that nothing happens meanwhile
            await r.slave.ping()
            return r.relay.accepted
    assert run(main()) == 1


def raw_register(port: int, name: bytes, extra: Dict[bytes, bytes]) -> Tuple[Wire, Box]:
    """A hand-driven slave: registered as ``name`` with the secret and ``extra`` keys; its wire and the master's answer."""
    sock = socket.create_connection((HOST, port), timeout=WAIT)
    wire = Wire(SocketStream(sock), label="raw")
    exchange_greeting(wire, SLAVE_GREETING, MASTER_GREETING, WAIT)
    hello = wire.read_box(WAIT)
    assert hello is not None
    nonce = os.urandom(32)
    box: Dict[bytes, bytes] = {b"register": name, b"version": b"1", b"nonce": nonce,
                               b"proof": slave_proof(SECRET, hello[b"nonce"], nonce, name)}
    box.update(extra)
    wire.send_box(box)
    answer = wire.read_box(WAIT)
    assert answer is not None and answer.get(b"registered") == name, answer
    return wire, answer


@pytest.mark.parametrize("bad", [{b"ack": b"5"}, {b"hb": b"what"}, {b"bogus": b"1"}],
                         ids=["ack-never-sent", "unknown-link-check", "unasked-box"])
def test_a_slave_breaking_the_session_protocol_is_dropped(bad: Dict[bytes, bytes]) -> None:
    """A slave holding a session that acknowledges boxes never sent, sends an unknown link check or a box nobody asked for is dropped at once."""
    async def main() -> None:
        async with aio.TcpSlaveListener(port=0, host=HOST, secret=SECRET, resume_timeout=LONG_RESUME) as listener:
            wire, answer = await asyncio.to_thread(raw_register, listener.port, b"rogue", {b"resumable": b"y"})
            try:
                assert b"session" in answer
                slave = await listener.slave_collection.get_slave(timeout=WAIT)
                assert slave.resumable
                await asyncio.to_thread(wire.send_box, bad)
                end = time.monotonic() + WAIT
                while slave.connected and time.monotonic() < end:
                    await asyncio.sleep(0.02)
                assert not slave.connected
                assert listener.slave_collection.get_all_slaves() == []
            finally:
                wire.close()
    run(main())


def test_a_slave_that_never_acknowledges_cannot_hold_a_send_forever(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A resumable slave that reads everything but acknowledges nothing makes the send fail with Disconnected within ACK_TIMEOUT plus resume_timeout, not hang with its window full."""
    import remsh.protocol.session as state_mod
    monkeypatch.setattr(state_mod, "ACK_TIMEOUT", 1.0)
    src = tmp_path / "big"
    src.write_bytes(os.urandom(3 * state_mod.WINDOW_BYTES))

    def swallow(wire: Wire) -> None:
        """Answer the request with the go-ahead, then read every box and acknowledge none."""
        try:
            request = wire.read_box(WAIT)
            assert request is not None and request.get(b"meth") == b"send", request
            wire.send_box({})
            while wire.read_box(WAIT) is not None:
                pass
        except (Disconnected, ProtocolError):
            return

    async def main() -> Tuple[BaseException, float]:
        async with aio.TcpSlaveListener(port=0, host=HOST, secret=SECRET, resume_timeout=1.0) as listener:
            wire, _ = await asyncio.to_thread(raw_register, listener.port, b"no-acks", {b"resumable": b"y"})
            try:
                slave = await listener.slave_collection.get_slave(timeout=WAIT)
                reader = asyncio.get_running_loop().run_in_executor(None, swallow, wire)
                started = time.monotonic()
                with pytest.raises(Disconnected) as info:
                    await slave.send(str(src), "dest")
                waited = time.monotonic() - started
                await asyncio.wait_for(reader, WAIT)
                return info.value, waited
            finally:
                wire.close()
    error, waited = run(main())
    assert str(error).startswith("no-acks: send:"), error
    assert waited < 10.0, waited


def test_a_slave_away_is_not_connected_and_a_waiter_gets_it_back(slave_procs: SlaveProcesses) -> None:
    """While its connection is away the slave is not connected (get_all_slaves leaves it out, as the threaded master does); get_slave waiting for it returns it once it resumes."""
    async def main() -> None:
        async with rig(slave_procs, "away-1") as r:
            collection = r.listener.slave_collection
            await r.call(r.relay.refuse)
            await r.call(r.relay.cut)
            deadline = time.monotonic() + WAIT
            while r.slave.connected:
                assert time.monotonic() < deadline, "the slave still counts as connected after the cut"
                await asyncio.sleep(0.01)
            assert collection.get_all_slaves() == []
            waiter = asyncio.ensure_future(collection.get_slave(filter=lambda s: s.name == "away-1", timeout=WAIT))
            await asyncio.sleep(0.2)  # the waiter is parked, nothing to find
            assert not waiter.done()
            await r.call(r.relay.restore)
            back = await waiter
            assert back is r.slave and back.connected
            assert await back.execute(["true"]) == 0

    run(main())
