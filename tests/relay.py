"""A TCP relay on 127.0.0.1 that a test can cut, refuse, silence and restore.

The resume tests put it between a real ``remsh-slave`` process and the
master's listener, so that the link between them fails the ways real links
fail, at moments the test chooses:

- :meth:`Relay.cut` closes every connection abruptly (``SO_LINGER`` 0: both
  ends get a reset at once, whatever is in flight is lost);
- :meth:`Relay.refuse` closes the listening socket, so a new ``connect()``
  fails at once with ``ECONNREFUSED`` (a master host that is unreachable);
- :meth:`Relay.silence` stops forwarding in both directions without closing
  anything: a half-open link, where neither end learns anything from TCP.
  The connections it stalls stay stalled for good, even after
  :meth:`Relay.restore`: an end must notice by itself and dial again;
- :meth:`Relay.restore` accepts and forwards new connections again.

One selector thread does all the work (accepting, forwarding, the control
commands), so a control method returns only once its effect is in place:
after :meth:`Relay.cut` returns no byte of the old connections is forwarded
any more, after :meth:`Relay.refuse` returns a ``connect()`` is refused.
Every wait is bounded (:data:`CONTROL_TIMEOUT`), every buffer is bounded
(:data:`BUFFER_LIMIT` a direction a connection: a full buffer stops reading,
so backpressure reaches the sender), and the thread ends by itself after
``lifetime`` seconds even if nobody calls :meth:`Relay.close`.

Directions are named from the dialer's point of view: ``to_target`` is what
the client (the slave) sent towards the target (the master), ``to_client``
the other way.  :attr:`Relay.bytes_forwarded` counts what was delivered (written to
the other end's socket; a count may trail the peer's read by an instant), in total; :meth:`Relay.mark` and
:meth:`Relay.since_mark` count from a moment the test chooses, e.g. a cut.

The listening port is taken below the kernel's ephemeral range when
possible, so that :meth:`Relay.restore` can bind it again after
:meth:`Relay.refuse` without an outgoing connection having taken it as its
local port meanwhile.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import selectors
import socket
import struct
import threading
import time
from typing import Any, Callable, List, NamedTuple, Optional, Tuple

log = logging.getLogger(__name__)

#: Longest wait of a control method for the relay's thread to carry it out.
CONTROL_TIMEOUT = 5.0
#: Most bytes held a direction a connection before the relay stops reading.
BUFFER_LIMIT = 256 * 1024
#: Largest single read.
READ_SIZE = 64 * 1024
#: Bound on connecting to the target (loopback: refused or done at once).
CONNECT_TIMEOUT = 2.0
#: Bound on binding the port again in :meth:`Relay.restore`.
REBIND_TIMEOUT = 3.0
#: Default time after which the relay closes everything by itself.
DEFAULT_LIFETIME = 600.0


class RelayError(Exception):
    """The relay could not do what it was asked (closed, port lost, its
    thread not answering within :data:`CONTROL_TIMEOUT`)."""


class Forwarded(NamedTuple):
    """Bytes delivered in each direction."""

    to_target: int
    to_client: int


class Transcript(NamedTuple):
    """The first bytes of one connection in each direction (see ``record``),
    with the ``(time.monotonic(), bytes so far)`` of each delivery among them."""

    to_target: bytes
    to_client: bytes
    to_target_times: Tuple[Tuple[float, int], ...]
    to_client_times: Tuple[Tuple[float, int], ...]


def _ephemeral_range() -> Tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def _listening_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_free_port(host: str) -> socket.socket:
    """A listening socket on a free port, below the ephemeral range if we can."""
    low, _ = _ephemeral_range()
    if low > 11000:
        rng = random.Random(os.getpid() ^ time.monotonic_ns())
        for _ in range(50):
            try:
                return _listening_socket(host, rng.randrange(10000, low))
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
    return _listening_socket(host, 0)


def _abort(sock: Optional[socket.socket]) -> None:
    """Close ``sock`` with a reset (``SO_LINGER`` 0), never raising."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class _Pair:
    """One relayed connection: ``socks[0]`` is the client, ``socks[1]`` the
    target (``None`` for a connection accepted while silenced, which never
    reaches the target).  ``bufs[i]`` holds bytes read from ``socks[i]``
    and not yet written to the other one."""

    def __init__(self, client: socket.socket, target: Optional[socket.socket], stuck: bool,
                 record: int) -> None:
        self.socks: List[Optional[socket.socket]] = [client, target]
        self.bufs = [bytearray(), bytearray()]
        self.eof = [False, False]       # socks[i] sent its FIN
        self.shut = [False, False]      # socks[i]'s sending side was shut down by us
        self.masks = [0, 0]
        self.stuck = stuck
        self.record = record
        self.heads = [bytearray(), bytearray()]  # first bytes delivered, by source side
        self.times: List[List[Tuple[float, int]]] = [[], []]

    def note(self, side: int, data: "bytes | memoryview") -> None:
        head = self.heads[side]
        if len(head) < self.record:
            head += bytes(data[:self.record - len(head)])
            self.times[side].append((time.monotonic(), len(head)))


class Relay:
    """A TCP relay from ``127.0.0.1:port`` to ``(target_host, target_port)``.

    :param target_host: where connections are forwarded to
    :param target_port: its port
    :param host: the address to listen on (loopback only)
    :param record: keep the first ``record`` bytes of each connection in each
        direction (see :meth:`transcripts`); 0 keeps none
    :param lifetime: seconds after which the relay closes everything by itself
    """

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1",
                 record: int = 0, lifetime: float = DEFAULT_LIFETIME) -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.record = record
        self._listener: Optional[socket.socket] = _bind_free_port(host)
        self.port: int = self._listener.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._sel.register(self._listener, selectors.EVENT_READ, ("listen", None))
        self._pairs: List[_Pair] = []
        self._silenced = False
        self._refusing = False
        self._cond = threading.Condition()
        self._commands: List[Tuple[Callable[[], Any], "_Reply"]] = []
        self._totals = [0, 0]           # delivered, by source side
        self._marks = [0, 0]
        self._accepted = 0
        self._accept_times: List[float] = []
        self._transcripts: List[_Pair] = []
        self._triggers: List[Tuple[int, int, bool, threading.Event]] = []
        self._closed = threading.Event()
        self._closing = False
        self._deadline = time.monotonic() + lifetime
        self._thread = threading.Thread(target=self._run, name=f"relay:{self.port}", daemon=True)
        self._thread.start()

    # -- context manager ----------------------------------------------------

    def __enter__(self) -> "Relay":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Relay 127.0.0.1:{self.port} -> {self.target[0]}:{self.target[1]}>"

    # -- control ------------------------------------------------------------

    def cut(self, *, mark: bool = False) -> int:
        """Close every current connection with a reset on both sides (the
        stalled ones too); returns how many there were.  With ``mark``, the
        counters are marked at the same instant (see :meth:`mark`)."""
        def do() -> int:
            n = self._cut_all()
            if mark:
                self._set_mark()
            return n
        result: int = self._control(do)
        return result

    def refuse(self) -> None:
        """Close the listening socket: a new connection is refused at once.
        Current connections go on as they are."""
        self._control(self._refuse)

    def silence(self) -> None:
        """Stop forwarding on every current connection for good, closing
        nothing; until :meth:`restore`, new connections are accepted and
        stalled the same way (they never reach the target)."""
        self._control(self._silence)

    def restore(self) -> None:
        """Accept and forward new connections again (after :meth:`refuse`
        or :meth:`silence`).  Connections stalled by :meth:`silence` stay
        stalled.

        :raises RelayError: the port could not be bound again
        """
        self._control(self._restore)

    def mark(self) -> None:
        """Start counting :meth:`since_mark` from now."""
        self._control(self._set_mark)

    def cut_when(self, *, to_target: Optional[int] = None, to_client: Optional[int] = None,
                 mark: bool = True) -> threading.Event:
        """Arm a cut for the moment the total of one direction reaches a
        number of bytes (checked as each write is counted); the returned
        event is set when it happened.  With ``mark`` the counters are
        marked at the cut."""
        if (to_target is None) == (to_client is None):
            raise ValueError("give exactly one of to_target and to_client")
        side, limit = (0, to_target) if to_target is not None else (1, to_client)
        assert limit is not None
        fired = threading.Event()

        def do() -> None:
            self._triggers.append((side, limit, mark, fired))
            self._check_triggers()
        self._control(do)
        return fired

    def disarm(self) -> None:
        """Forget every cut armed by :meth:`cut_when` that has not happened
        (their events are left unset)."""
        def do() -> None:
            self._triggers = []
        self._control(do)

    def close(self) -> None:
        """Close every connection (with a reset) and the listening socket,
        and stop the thread; idempotent."""
        if not self._closed.is_set():
            try:
                self._control(self._request_close)
            except RelayError:
                pass  # closed meanwhile, or the thread is gone: nothing left to ask
        self._thread.join(CONTROL_TIMEOUT)

    # -- observation --------------------------------------------------------

    @property
    def bytes_forwarded(self) -> Forwarded:
        """Bytes delivered since the relay started."""
        with self._cond:
            return Forwarded(self._totals[0], self._totals[1])

    def since_mark(self) -> Forwarded:
        """Bytes delivered since the last :meth:`mark` (or cut with ``mark``)."""
        with self._cond:
            return Forwarded(self._totals[0] - self._marks[0], self._totals[1] - self._marks[1])

    @property
    def accepted(self) -> int:
        """How many connections were accepted so far."""
        with self._cond:
            return self._accepted

    @property
    def accept_times(self) -> List[float]:
        """``time.monotonic()`` of each accepted connection, in order."""
        with self._cond:
            return list(self._accept_times)

    @property
    def active(self) -> int:
        """Connections open now that forward (not stalled)."""
        with self._cond:
            return sum(1 for p in self._pairs if not p.stuck)

    @property
    def stalled(self) -> int:
        """Connections held open now that forward nothing."""
        with self._cond:
            return sum(1 for p in self._pairs if p.stuck)

    def wait_accepted(self, count: int, timeout: float) -> bool:
        """True once ``count`` connections in all have been accepted;
        false when ``timeout`` ran out first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._accepted < count:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed.is_set():
                    return False
                self._cond.wait(left)
            return True

    def transcripts(self) -> List[Transcript]:
        """The recorded first bytes of every connection so far, in accept order."""
        with self._cond:
            return [Transcript(bytes(p.heads[0]), bytes(p.heads[1]), tuple(p.times[0]), tuple(p.times[1]))
                    for p in self._transcripts]

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    # -- the thread's side ----------------------------------------------------

    def _control(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the relay's thread and return its result."""
        if self._closed.is_set():
            raise RelayError(f"{self!r} is closed")
        reply = _Reply()
        with self._cond:
            self._commands.append((fn, reply))
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # the wake-up pipe is full (a wake-up is pending) or closed
        if not reply.done.wait(CONTROL_TIMEOUT):
            raise RelayError(f"{self!r}: no answer from the relay thread within {CONTROL_TIMEOUT} s")
        if reply.error is not None:
            raise reply.error
        return reply.result

    def _run(self) -> None:
        try:
            while not self._closing:
                left = self._deadline - time.monotonic()
                if left <= 0:
                    log.warning("%r: lifetime over, closing", self)
                    break
                for key, events in self._sel.select(min(left, 1.0)):
                    kind, obj = key.data
                    if kind == "wake":
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except (BlockingIOError, OSError):
                            pass
                    elif kind == "listen":
                        self._accept()
                    else:
                        pair, side = obj
                        if pair in self._pairs:
                            self._service(pair, side, events)
                self._run_commands()
        except Exception:  # noqa: BLE001 - a relay bug must not hang the test
            log.exception("%r: relay thread failed", self)
        finally:
            self._shutdown()

    def _run_commands(self) -> None:
        with self._cond:
            commands, self._commands = self._commands, []
        for fn, reply in commands:
            try:
                reply.result = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                reply.error = e if isinstance(e, RelayError) else RelayError(f"{self!r}: {e!r}")
            reply.done.set()

    def _request_close(self) -> None:
        self._closing = True

    def _shutdown(self) -> None:
        self._closed.set()
        self._cut_all()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._cond:
            commands, self._commands = self._commands, []
            self._cond.notify_all()
        for _, reply in commands:
            reply.error = RelayError(f"{self!r} is closed")
            reply.done.set()
        for _, _, _, fired in self._triggers:
            fired.set()  # nobody waits for a cut that can no longer happen
        self._triggers = []
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _accept(self) -> None:
        while self._listener is not None:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("%r: accept failed: %s", self, e)
                return
            with self._cond:
                self._accepted += 1
                self._accept_times.append(time.monotonic())
                self._cond.notify_all()
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._silenced:
                client.setblocking(False)
                self._add_pair(_Pair(client, None, True, self.record))
                continue
            try:
                target = socket.create_connection(self.target, timeout=CONNECT_TIMEOUT)
            except OSError as e:
                log.info("%r: target refused: %s", self, e)
                _abort(client)
                continue
            target.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.setblocking(False)
            target.setblocking(False)
            pair = _Pair(client, target, False, self.record)
            self._add_pair(pair)
            self._update(pair)

    def _add_pair(self, pair: _Pair) -> None:
        with self._cond:
            self._pairs.append(pair)
            if self.record:
                self._transcripts.append(pair)

    def _set_mask(self, pair: _Pair, side: int, mask: int) -> None:
        sock = pair.socks[side]
        if sock is None or pair.masks[side] == mask:
            return
        if pair.masks[side] == 0:
            self._sel.register(sock, mask, ("pair", (pair, side)))
        elif mask == 0:
            self._sel.unregister(sock)
        else:
            self._sel.modify(sock, mask, ("pair", (pair, side)))
        pair.masks[side] = mask

    def _update(self, pair: _Pair) -> None:
        """Register each socket for what it can do now; close a finished pair."""
        if pair.stuck:
            self._set_mask(pair, 0, 0)
            self._set_mask(pair, 1, 0)
            return
        for side in (0, 1):
            other = 1 - side
            mask = 0
            if not pair.eof[side] and len(pair.bufs[side]) < BUFFER_LIMIT:
                mask |= selectors.EVENT_READ
            if pair.bufs[other]:
                mask |= selectors.EVENT_WRITE
            self._set_mask(pair, side, mask)
        for side in (0, 1):
            # the FIN of one side goes on once its bytes have
            if pair.eof[side] and not pair.bufs[side] and not pair.shut[1 - side]:
                pair.shut[1 - side] = True
                sock = pair.socks[1 - side]
                try:
                    if sock is not None:
                        sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
        if pair.shut[0] and pair.shut[1]:
            self._close_pair(pair, reset=False)

    def _service(self, pair: _Pair, side: int, events: int) -> None:
        sock = pair.socks[side]
        assert sock is not None
        other = 1 - side
        try:
            if events & selectors.EVENT_READ:
                data = sock.recv(READ_SIZE)
                if data:
                    pair.bufs[side] += data
                else:
                    pair.eof[side] = True
            if events & selectors.EVENT_WRITE and pair.bufs[other]:
                n = sock.send(pair.bufs[other])
                if n:
                    with self._cond:
                        pair.note(other, memoryview(pair.bufs[other])[:n])
                        self._totals[other] += n
                    del pair.bufs[other][:n]
                    self._check_triggers()
            # write what just came in at once, if the other end takes it
            dest = pair.socks[other]
            if pair.bufs[side] and dest is not None and pair in self._pairs and not pair.stuck:
                try:
                    n = dest.send(pair.bufs[side])
                except BlockingIOError:
                    n = 0
                if n:
                    with self._cond:
                        pair.note(side, memoryview(pair.bufs[side])[:n])
                        self._totals[side] += n
                    del pair.bufs[side][:n]
                    self._check_triggers()
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            # a reset on one side is passed on to the other
            log.debug("%r: connection failed: %s", self, e)
            self._close_pair(pair, reset=True)
            return
        if pair in self._pairs:
            self._update(pair)

    def _check_triggers(self) -> None:
        if not self._triggers:
            return
        keep = []
        for side, limit, mark, fired in self._triggers:
            if self._totals[side] >= limit:
                self._cut_all()
                if mark:
                    self._set_mark()
                fired.set()
            else:
                keep.append((side, limit, mark, fired))
        self._triggers = keep

    def _set_mark(self) -> None:
        with self._cond:
            self._marks = list(self._totals)

    def _close_pair(self, pair: _Pair, *, reset: bool) -> None:
        for side in (0, 1):
            sock = pair.socks[side]
            if sock is None:
                continue
            if pair.masks[side]:
                try:
                    self._sel.unregister(sock)
                except (KeyError, ValueError):
                    pass
                pair.masks[side] = 0
            if reset:
                _abort(sock)
            else:
                sock.close()
            pair.socks[side] = None
        with self._cond:
            if pair in self._pairs:
                self._pairs.remove(pair)

    def _cut_all(self) -> int:
        pairs = list(self._pairs)
        for pair in pairs:
            self._close_pair(pair, reset=True)
        return len(pairs)

    def _refuse(self) -> None:
        self._refusing = True
        if self._listener is not None:
            self._sel.unregister(self._listener)
            self._listener.close()
            self._listener = None

    def _silence(self) -> None:
        self._silenced = True
        for pair in list(self._pairs):
            pair.stuck = True
            self._update(pair)

    def _restore(self) -> None:
        self._silenced = False
        self._refusing = False
        if self._listener is None:
            deadline = time.monotonic() + REBIND_TIMEOUT
            while True:
                try:
                    self._listener = _listening_socket(self.host, self.port)
                    break
                except OSError as e:
                    if e.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                        raise RelayError(f"{self!r}: cannot listen on port {self.port} again: {e}") from e
                    time.sleep(0.05)
            self._sel.register(self._listener, selectors.EVENT_READ, ("listen", None))


class _Reply:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Any = None
        self.error: Optional[BaseException] = None
