"""A job a master takes back is registered before its parts wait for their
slaves: a slave that resumes the very moment its part is expected (another
listener thread, while the take-back goes on) finds the job and its sink --
before, it found none (KeyError in the listener), its command was dropped
and the job ended lost or never ended.  Real SQLite store, no slave
processes; the moment is caught by wrapping the registry's public
``adoptions.expect``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

from remsh.jobs import JobRegistry
from remsh.store.base import SessionRecord
from remsh.store.sqlite import SqliteJobStore


def test_a_taken_back_job_is_found_the_moment_its_part_is_expected(tmp_path: Path) -> None:
    """When a part of a taken-back job starts waiting for its slave, the registry already runs that job."""
    store = SqliteJobStore(str(tmp_path / "jobs.sqlite"))
    job = store.create_job("run", {"argv": ["x"]}, 0, ["s"])
    store.update_slave(job.id, "s", state="running", started=1.0)
    store.open_session(SessionRecord("e" * 32, "s", job.id, "execute", 4, 2, 2))
    registry = JobRegistry(store)
    expect = registry.adoptions.expect
    seen: List[Optional[Any]] = []

    def expect_and_look(part: Any) -> None:
        expect(part)
        seen.append(registry.running(job.id))  # what a slave claiming the part now would look up

    registry.adoptions.expect = expect_and_look  # type: ignore[method-assign]
    try:
        registry.start()
        assert len(seen) == 1 and seen[0] is not None, seen
    finally:
        registry.stop()
        registry.close()
        store.close()


def test_taking_back_a_job_already_running_here_keeps_its_sessions(tmp_path: Path) -> None:
    """A take-back that finds a job already running here (its slave resumed before the adoption's take-back ran) leaves that job's recorded sessions alone: deleting them lost its commands at the next failover."""
    store = SqliteJobStore(str(tmp_path / "jobs.sqlite"))
    job = store.create_job("run", {"argv": ["x"]}, 0, ["s"])
    store.update_slave(job.id, "s", state="running", started=1.0)
    store.open_session(SessionRecord("f" * 32, "s", job.id, "execute", 4, 2, 2))
    registry = JobRegistry(store)
    try:
        registry.start()  # takes the job back: it runs here, waiting for its slave
        assert registry.running(job.id) is not None
        registry._take_back(only=[job.id])  # the take-back of an adoption, arriving after it
        assert [s.id for s in store.open_sessions()] == ["f" * 32]
    finally:
        registry.stop()
        registry.close()
        store.close()
