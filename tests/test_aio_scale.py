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
