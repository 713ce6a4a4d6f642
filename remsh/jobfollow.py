"""Following a job from the store: the events a follower (``remsh run``
and the other commands, the dashboard) gets, in the order they were
recorded -- the same whether the job runs on this master or ended long ago.
"""

from __future__ import annotations

import functools
import time
from typing import Callable, Dict, List, Optional, Set, Tuple, TypeVar

from remsh.controlproto import encode_event, out_events
from remsh.store.base import (JOB_CANCELLED, SLAVE_AWAY, SLAVE_FINAL_STATES, SLAVE_LOST, SLAVE_OK, SLAVE_RUNNING,
                              JobRecord, JobStore, SlaveRecord, through_outage)

T = TypeVar("T")

#: Output chunks a follower reads from the store at a time.
READ_BATCH = 256

#: Sends events to a follower (raises OSError when it is gone).
Send = Callable[[List[Dict[bytes, bytes]]], None]


def record_events(record: JobRecord) -> List[Dict[bytes, bytes]]:
    """A ``jobrec`` event and one ``jobslave`` event per slave."""
    boxes = [encode_event("jobrec", id=record.id, kind=record.kind, state=record.state, uid=record.uid,
                          started=record.started, finished=record.finished, spec=record.spec)]
    for name, rec in record.slaves.items():
        boxes.append(encode_event("jobslave", job=record.id, name=name, state=rec.state,
                                  exit_status=rec.exit_status, error=rec.error, errtag=rec.errtag,
                                  started=rec.started, finished=rec.finished, stdout_bytes=rec.stdout_bytes,
                                  stderr_bytes=rec.stderr_bytes, truncated=rec.truncated))
    return boxes


def end_event(rec: SlaveRecord) -> Dict[bytes, bytes]:
    """The ``end`` event of a slave whose record is final."""
    duration = 0.0
    if rec.started is not None and rec.finished is not None:
        duration = max(0.0, rec.finished - rec.started)
    status = rec.exit_status
    error = rec.error
    if error is None and status is None and rec.state != SLAVE_OK:
        error = rec.state
    return encode_event("end", slave=rec.name, status=status, error=error, errtag=rec.errtag,
                        duration_ms=int(duration * 1000), summary=rec.summary, truncated=rec.truncated)


def _state_events(name: str, rec: SlaveRecord, before: Optional[str]) -> List[Dict[bytes, bytes]]:
    """A ``state`` event when slave ``name`` went away, came back or was
    lost since the record a follower saw before (state ``before``)."""
    if rec.state == before:
        return []
    if rec.state == SLAVE_AWAY:
        return [encode_event("state", slave=name, state="away", detail=rec.summary)]
    if rec.state == SLAVE_RUNNING and before == SLAVE_AWAY:
        return [encode_event("state", slave=name, state="back")]
    if rec.state == SLAVE_LOST:
        return [encode_event("state", slave=name, state="lost", detail=rec.error)]
    return []


def follow(store: JobStore, job_id: str, send: Send, *, live: bool, alive_every: float,
           stopped: Callable[[], bool] = lambda: False) -> JobRecord:
    """Send a job's events to a follower, from the store: ``jobrec``,
    ``begin``, then output, progress, ``state`` (a slave away, back or
    lost) and ends in the order they were recorded, then ``done`` -- once
    the job has ended when ``live``, at once otherwise.  An ``alive`` event goes out every ``alive_every``
    seconds of silence.  Returns the last record read.

    :raises UnknownJob: no such job
    :raises OSError: the follower is gone
    """
    last_alive = [time.monotonic()]

    def still_alive() -> None:  # while the store is away: the follower hears from us all the same
        if time.monotonic() - last_alive[0] >= alive_every:
            last_alive[0] = time.monotonic()
            send([encode_event("alive")])

    def read(fn: Callable[[], T]) -> T:
        """A read of the store, riding out an outage (as the job itself does)."""
        return through_outage(fn, store, f"job {job_id}: following it", still_alive)

    record = read(lambda: store.get_job(job_id))
    send(record_events(record)[:1] + [encode_event("begin", names=list(record.slaves))])
    seq = -1
    ended: Set[str] = set()
    shown: Dict[str, Tuple[Optional[int], Optional[int]]] = {}
    states: Dict[str, str] = {}
    waiting: Set[str] = set()
    while True:
        version = read(store.version)
        # the record first, then every chunk stored so far: a slave's end
        # is recorded after its last output, so it is sent after it too
        record = read(lambda: store.get_job(job_id))
        while True:
            chunks = read(functools.partial(store.read_output, job_id, after=seq, limit=READ_BATCH))
            if not chunks:
                break
            boxes: List[Dict[bytes, bytes]] = []
            for name, chunk in chunks:
                boxes.extend(out_events(name, chunk.stream, chunk.data))
                seq = chunk.seq
            send(boxes)
        boxes = []
        for name, rec in record.slaves.items():
            if name in ended:
                continue
            progress = (rec.progress_done, rec.progress_total)
            if rec.progress_done is not None and shown.get(name) != progress:
                shown[name] = progress
                boxes.append(encode_event("progress", slave=name, done=rec.progress_done,
                                          total=rec.progress_total))
            boxes.extend(_state_events(name, rec, states.get(name)))
            states[name] = rec.state
            if (rec.summary or "").startswith("behind ") and name not in waiting:  # queued behind another job
                waiting.add(name)
                boxes.append(encode_event("state", slave=name, state="waiting", detail=rec.summary))
            if rec.state in SLAVE_FINAL_STATES:
                ended.add(name)
                boxes.append(end_event(rec))
        if boxes:
            send(boxes)
        if record.finished_state or not live:
            send([encode_event("done", interrupted=record.state == JOB_CANCELLED, state=record.state)])
            return record
        if stopped():
            return record
        if store.wait_change(version, alive_every) == version:
            send([encode_event("alive")])


__all__ = ["follow", "record_events", "end_event", "Send", "READ_BATCH"]
