"""The dashboard's live updates: what changed, computed only while someone
looks, sent as Server-Sent Events.

Two kinds of source feed the open pages:

- a :class:`Watch` (the fleet, the list of jobs) keeps the rows it last
  sent, keyed (a slave's name, a job's id), and every
  :attr:`Watch.interval` seconds computes them again and sends what
  differs: ``{"set": [rows]}`` and ``{"del": [keys]}``.  A page that
  subscribes gets ``{"reset": [rows]}`` first.  One thread per watch,
  shared by every page that shows it, and only while at least one does:
  with no page open the master does nothing at all for the dashboard.  A
  page that cannot keep up is not waited for: what it has not read is
  dropped and it gets a fresh ``reset`` (the thread never blocks on a slow
  browser);
- a job's page follows the job from the store with
  :func:`remsh.jobfollow.follow` (the same events, in the same order, as
  ``remsh job ID --follow``), in a thread of its own that waits for the
  page to read (a slow browser slows its own follower, nobody else).

Each page reads a :class:`Subscriber`: a queue from those threads to the
server's event loop.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import threading
import time
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Tuple

from remsh.controlproto import decode_event
from remsh.jobs import follow
from remsh.store.base import JobStore

log = logging.getLogger(__name__)

#: Messages a page may have unread before it is reset (watches) or its
#: follower waits (a job's page).
QUEUE_LIMIT = 256
#: Seconds between two comparisons of the fleet while a page shows it: a
#: slave that comes or goes shows within a second.
FLEET_INTERVAL = 0.3
#: Bound on one wait for a change of the job store (the jobs' page).
JOBS_INTERVAL = 1.0
#: Seconds of silence after which a stream sends a comment (and notices a
#: page that has gone).
KEEPALIVE = 10.0
#: Most job followers at once (each has a thread).
MAX_FOLLOWERS = 32

#: A row of a watch, as JSON-able values.
Row = Dict[str, Any]


class Closed(OSError):
    """The page went away (raised in a follower's thread to end it)."""


class Subscriber:
    """What one open page has yet to read: messages queued by threads for
    the event loop ``loop``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int = QUEUE_LIMIT) -> None:
        self.loop = loop
        self.limit = limit
        self.queue: "asyncio.Queue[Optional[str]]" = asyncio.Queue()
        self.closed = False
        #: a watch's rows must all be sent again (new, or it fell behind)
        self.fresh = True
        self._room = threading.Semaphore(limit)

    def offer(self, message: str) -> None:
        """Queue ``message`` unless the page is ``limit`` behind; then drop
        what it has not read and mark it :attr:`fresh` (for watches: never
        blocks)."""
        if self.closed:
            return
        try:
            if not self._room.acquire(blocking=False):
                self.fresh = True
                self.loop.call_soon_threadsafe(self._drop)
                return
            self.loop.call_soon_threadsafe(self.queue.put_nowait, message)
        except RuntimeError:  # the loop is closed: the server stopped
            self.closed = True

    def put(self, message: Optional[str], timeout: float = KEEPALIVE) -> None:
        """Queue ``message``, waiting while the page is ``limit`` behind (a
        job's follower).  ``None`` ends the stream.

        :raises Closed: the page has gone
        """
        while not self._room.acquire(timeout=min(timeout, 1.0)):
            if self.closed:
                raise Closed("the page went away")
        if self.closed:
            raise Closed("the page went away")
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, message)
        except RuntimeError:  # the loop is closed: the server stopped
            raise Closed("the server stopped") from None

    def end(self) -> None:
        """End the page's stream (from any thread): what is queued is sent,
        then the stream ends; a follower stops at its next message."""
        self.closed = True
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, None)
        except RuntimeError:  # the loop is closed already
            pass

    def _drop(self) -> None:
        while not self.queue.empty():
            self.queue.get_nowait()
            self._room.release()

    async def messages(self) -> AsyncIterator[str]:
        """The queued messages as SSE text, a keep-alive comment after
        :data:`KEEPALIVE` seconds of silence, until ``None`` comes."""
        try:
            while True:
                try:
                    message = await asyncio.wait_for(self.queue.get(), KEEPALIVE)
                except asyncio.TimeoutError:
                    yield ": alive\n\n"
                    continue
                self._room.release()
                if message is None:
                    return
                yield f"data: {message}\n\n"
        finally:
            self.closed = True


class Watch:
    """Rows computed again and again while someone subscribes; each
    subscriber gets what changed.

    ``rows()`` makes the rows by key; ``signature()`` (optional) is a cheap
    value that changes when the rows may have: while it stays the same the
    rows are made again only every ``refresh`` seconds (for what the
    signature cannot see, such as a slave released a moment after its
    part of a job was recorded).  The thread waits ``interval`` seconds
    between two rounds, or twice as long as the last computation took,
    whichever is longer (a big fleet never takes more than a third of a
    CPU), or with ``wait(seconds)`` (the jobs' watch waits for the store to
    change)."""

    def __init__(self, name: str, rows: Callable[[], Dict[str, Row]], interval: float, *,
                 signature: Optional[Callable[[], object]] = None, refresh: float = 2.0,
                 wait: Optional[Callable[[float], None]] = None) -> None:
        self.name = name
        self.rows = rows
        self.signature = signature
        self.refresh = refresh
        self.interval = interval
        self._wait = wait
        self._lock = threading.Lock()
        self._subscribers: List[Subscriber] = []
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self._kick = threading.Event()
        #: rounds that made the rows (for tests and logs)
        self.computed = 0

    @property
    def running(self) -> bool:
        """Whether the watch's thread runs (only while someone subscribes)."""
        with self._lock:
            return self._thread is not None

    def subscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            if self._stopping.is_set():
                subscriber.loop.call_soon_threadsafe(subscriber.queue.put_nowait, None)
                return
            self._subscribers.append(subscriber)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"remsh-web-{self.name}", daemon=True)
                self._thread.start()
        self._kick.set()

    def unsubscribe(self, subscriber: Subscriber) -> None:
        subscriber.closed = True
        with self._lock:
            self._subscribers = [s for s in self._subscribers if s is not subscriber]

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread and every subscriber's stream (idempotent)."""
        self._stopping.set()
        self._kick.set()
        with self._lock:
            thread, subscribers = self._thread, list(self._subscribers)
        for s in subscribers:
            s.end()
        if thread is not None:
            thread.join(timeout)

    def _loop(self) -> None:
        last: Dict[str, Row] = {}
        encoded: Dict[str, str] = {}
        full: Optional[str] = None
        seen: object = _NOTHING
        made = 0.0
        while not self._stopping.is_set():
            with self._lock:
                subscribers = [s for s in self._subscribers if not s.closed]
                if not subscribers:
                    self._thread = None  # nobody looks: no more work until someone does
                    return
            began = time.monotonic()
            diff: Optional[str] = None
            try:
                signature = self.signature() if self.signature is not None else _NOTHING
                if signature is _NOTHING or signature != seen or began - made >= self.refresh:
                    seen, made = signature, began
                    rows = self.rows()
                    self.computed += 1
                    changed = [k for k, row in rows.items() if last.get(k) != row]
                    gone = [k for k in last if k not in rows]
                    for key in gone:
                        del encoded[key]
                    for key in changed:
                        encoded[key] = _encode(rows[key])
                    last = rows
                    if changed or gone:
                        full = None
                        diff = '{"set": [' + ",".join(encoded[k] for k in changed) + '], "del": ' + \
                            json.dumps(gone) + "}"
            except Exception:  # noqa: BLE001 - a failed computation is logged, the pages keep the last rows
                log.exception("dashboard: cannot compute the %s", self.name)
                seen = _NOTHING
            for s in subscribers:
                if s.fresh:
                    s.fresh = False
                    if full is None:
                        full = '{"reset": [' + ",".join(encoded.values()) + "]}"
                    s.offer(full)
                elif diff is not None:
                    s.offer(diff)
            self._kick.clear()
            pause = max(self.interval, 2 * (time.monotonic() - began))
            if self._wait is not None:
                self._wait(pause)
            else:
                self._kick.wait(pause)


#: No signature yet.
_NOTHING = object()
#: One row as JSON (one encoder for all: ``json.dumps`` with options makes one per call).
_encode = json.JSONEncoder(sort_keys=True).encode


def job_messages(store: JobStore, job_id: str, subscriber: Subscriber, alive_every: float = 1.0) -> None:
    """Follow job ``job_id`` for one page (in a thread of its own): each
    event of :func:`remsh.jobfollow.follow` as a JSON message, output as text
    (UTF-8, bad bytes replaced; a character cut between two chunks is
    kept whole), then the end of the stream.  Ends when the job has ended
    or the page has gone."""
    decoders: Dict[Tuple[str, str], "codecs.IncrementalDecoder"] = {}

    def send(boxes: List[Dict[bytes, bytes]]) -> None:
        out: List[Dict[str, Any]] = []
        for box in boxes:
            ev = decode_event(box)
            if ev.kind == "alive":
                continue
            values = {k: v for k, v in ev.values.items() if v is not None and k != "data"}
            if ev.kind == "out":
                key = (ev.get("slave", ""), ev.get("stream", "stdout"))
                decoder = decoders.get(key)
                if decoder is None:
                    decoder = decoders[key] = codecs.getincrementaldecoder("utf-8")("replace")
                values["text"] = decoder.decode(ev.get("data", b""))
                if out and out[-1]["ev"] == "out" and out[-1]["slave"] == key[0] and out[-1]["stream"] == key[1]:
                    out[-1]["text"] += values["text"]
                    continue
            out.append({"ev": ev.kind, **values})
        subscriber.put(json.dumps(out) if out else json.dumps([{"ev": "alive"}]))

    try:
        follow(store, job_id, send, live=True, alive_every=alive_every, stopped=lambda: subscriber.closed)
        subscriber.put(None)
    except Closed:
        pass
    except Exception as e:  # noqa: BLE001 - the page is told, the master goes on
        log.warning("dashboard: following job %s failed: %s", job_id, e)
        try:
            subscriber.put(json.dumps([{"ev": "fail", "message": str(e)}]))
            subscriber.put(None)
        except Closed:
            pass


class Followers:
    """The job followers running for open pages, at most
    :data:`MAX_FOLLOWERS` at once."""

    def __init__(self, limit: int = MAX_FOLLOWERS) -> None:
        self._slots = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self._subscribers: List[Subscriber] = []
        self._stopping = False

    def stop(self) -> None:
        """End every follower's page stream (the followers then stop)."""
        with self._lock:
            self._stopping = True
            subscribers, self._subscribers = self._subscribers, []
        for s in subscribers:
            s.end()

    def start(self, store: JobStore, job_id: str, subscriber: Subscriber) -> bool:
        """Start following ``job_id`` for ``subscriber``; false when too
        many pages follow jobs already."""
        with self._lock:
            if self._stopping or not self._slots.acquire(blocking=False):
                return False
            self._subscribers.append(subscriber)

        def run() -> None:
            try:
                job_messages(store, job_id, subscriber)
            finally:
                with self._lock:
                    self._subscribers = [s for s in self._subscribers if s is not subscriber]
                self._slots.release()

        threading.Thread(target=run, name=f"remsh-web-job-{job_id}", daemon=True).start()
        return True
