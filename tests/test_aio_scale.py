"""remsh.aio drives 200 real slave processes from one event loop, with no thread at all."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import List

import pytest

import remsh.aio as aio
from tests.slaveproc import SECRET, WAIT, SlaveProcesses, slave_procs  # noqa: F401 - a fixture
from tests.test_aio import run

#: slaves in the test; the whole test stays under about 30 s on 2 CPUs
COUNT = 200
#: slaves started at once
BATCH = 20
#: remsh-slave processes dialling the TCP listener
TCP_COUNT = 50

pytestmark = pytest.mark.timeout(180)


def test_one_loop_drives_200_local_slaves(tmp_path: Path) -> None:
    """200 local slave processes: registered, pinged, a command each and a send/fetch each, all
    concurrently from one loop; no thread is started and every slave stays connected."""
    before = set(threading.enumerate())
    src = tmp_path / "src"
    src.write_bytes(os.urandom(100_000))

    async def main() -> None:
        async with aio.LocalSlaveListener() as listener:
            dirs = []
            for i in range(COUNT):
                d = tmp_path / f"s{i}"
                d.mkdir()
                dirs.append(d)
            t0 = time.monotonic()
            # spawning is synchronous (fork and exec): a batch at a time, so that the
            # loop answers the slaves already started within their handshake time limit
            slaves: List[aio.AsyncSlave] = []
            for first in range(0, COUNT, BATCH):
                slaves += await asyncio.gather(*(listener.start_slave(str(dirs[i]), f"s{i}")
                                                 for i in range(first, min(COUNT, first + BATCH))))
            assert len(listener.slave_collection.get_all_slaves()) == COUNT
            started = time.monotonic() - t0

            await asyncio.gather(*(s.ping() for s in slaves))
            outs: List[List[bytes]] = [[] for _ in slaves]
            codes = await asyncio.gather(*(s.execute(["sh", "-c", f"echo {i}"], stdout_cb=outs[i].append)
                                           for i, s in enumerate(slaves)))
            assert codes == [0] * COUNT
            assert [b"".join(o) for o in outs] == [b"%d\n" % i for i in range(COUNT)]
            await asyncio.gather(*(s.send(src, "f") for s in slaves))
            await asyncio.gather(*(s.fetch("f", tmp_path / f"back{i}") for i, s in enumerate(slaves)))
            for i in range(COUNT):
                assert (tmp_path / f"back{i}").read_bytes() == src.read_bytes()
            assert all(s.connected for s in slaves)
            assert set(threading.enumerate()) - before == set(), "remsh.aio started threads"
            assert started < WAIT * 3, f"starting {COUNT} slaves took {started:.1f} s"

    run(main())


def test_one_loop_drives_tcp_slaves(tmp_path: Path, slave_procs: SlaveProcesses) -> None:
    """50 remsh-slave processes dialling one aio TCP listener register and answer concurrently."""

    async def main() -> None:
        async with aio.TcpSlaveListener(port=0, host="127.0.0.1", secret=SECRET) as listener:
            for first in range(0, TCP_COUNT, BATCH):
                last = min(TCP_COUNT, first + BATCH)
                for i in range(first, last):
                    slave_procs.start(listener.port, f"t{i}", no_reconnect=True)
                await listener.slave_collection.wait_for_slaves(last, timeout=WAIT * 3)
            slaves = listener.slave_collection.get_all_slaves()
            assert len(slaves) == TCP_COUNT
            outs: List[List[bytes]] = [[] for _ in slaves]
            codes = await asyncio.gather(*(s.execute(["echo", s.name], stdout_cb=outs[i].append)
                                           for i, s in enumerate(slaves)))
            assert codes == [0] * TCP_COUNT
            assert [b"".join(o) for o in outs] == [s.name.encode() + b"\n" for s in slaves]
            await asyncio.gather(*(s.ping() for s in slaves))

    run(main())


async def _answering_peer(port: int, name: str, ready: "asyncio.Queue[str]") -> None:
    """A peer that registers like a slave (the real handshake machine) and answers ping and
    execute as a slave would: enough to hold a thousand connections in one test process."""
    from remsh.handshake import SlaveHandshake
    from remsh.wire import encode_box

    conn = await aio.Connection.open("127.0.0.1", port, label="master")
    hs = SlaveHandshake(name, secret=SECRET, info={"basedir": "/nonexistent"})
    await conn.send(hs.greeting)
    hs.receive_greeting(await conn.read_exact(8, WAIT))
    while True:
        box = await conn.read_box(WAIT)
        assert box is not None
        step = hs.receive_box(box)
        await conn.send_boxes(step.send)
        if step.event is not None:
            break
    await ready.put(name)
    while True:
        box = await conn.read_box(None)
        if box is None:
            return
        if box.get(b"meth") == b"ping":
            await conn.send(encode_box({}))
        elif box.get(b"meth") == b"execute":
            await conn.send(encode_box({}) + encode_box({b"stream": b"stdout", b"data": name.encode()})
                            + encode_box({b"result": b"0"}))


def test_one_loop_holds_a_thousand_slave_connections() -> None:
    """1,000 registered connections in one loop, all pinged and all running execute at once, with no thread:
    the peers are in-process stand-ins speaking the real handshake and reply boxes."""
    count = 1000
    before = set(threading.enumerate())

    async def main() -> None:
        async with aio.TcpSlaveListener(port=0, host="127.0.0.1", secret=SECRET) as listener:
            listener.expected_slaves = count
            ready: "asyncio.Queue[str]" = asyncio.Queue()
            peers = []
            for first in range(0, count, 100):
                peers += [asyncio.create_task(_answering_peer(listener.port, f"p{i}", ready))
                          for i in range(first, first + 100)]
                await listener.slave_collection.wait_for_slaves(first + 100, timeout=WAIT * 3)
            slaves = listener.slave_collection.get_all_slaves()
            assert len(slaves) == count
            t0 = time.monotonic()
            await asyncio.gather(*(s.ping() for s in slaves))
            outs: List[List[bytes]] = [[] for _ in slaves]
            codes = await asyncio.gather(*(s.execute(["x"], stdout_cb=outs[i].append) for i, s in enumerate(slaves)))
            assert codes == [0] * count
            assert [b"".join(o) for o in outs] == [s.name.encode() for s in slaves]
            assert time.monotonic() - t0 < WAIT * 3
            assert set(threading.enumerate()) - before == set()
            for p in peers:
                p.cancel()

    run(main())
