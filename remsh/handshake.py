"""Connection set-up: greeting, ``hello`` / ``register`` / ``registered``.

The conversation is written once, without I/O, in :class:`MasterHandshake`
and :class:`SlaveHandshake` (h11's shape: the caller feeds what it received
and sends what it is given); :func:`master_handshake` and
:func:`slave_handshake` are thin synchronous loops over them on a
:class:`~remsh.wire.Wire`, with one deadline for the whole exchange.

State of one connection, in order (a violation raises at once)::

    greeting --(both greetings match)--> greeted
             --(master: hello sent / slave: register sent)--> waiting
             --(register read and identity proved / registered read and
                the master's proof checked)--> registered --> operations
    any step --(bad input, refusal)--> failed

1. Each side writes its 8-byte greeting (:data:`MASTER_GREETING`,
   :data:`SLAVE_GREETING`) and checks the other's.
2. Master: ``{hello: remsh, version: 1, nonce: N_m}``.
3. Slave: ``{register: NAME, version: 1, nonce: N_s, hostname, platform,
   python, basedir, remsh[, policy_*...][, proof]}`` with
   ``proof = HMAC-SHA256(secret, b"remsh-v1-slave\\0" + N_m + N_s + NAME)``.
4. Master: ``{registered: NAME[, proof]}`` with
   ``proof = HMAC-SHA256(secret, b"remsh-v1-master\\0" + N_s + N_m + NAME)``,
   or the one refusal box ``{error: "registration refused", errtag:
   auth-failed}`` for every kind of failure (malformed box, wrong version,
   unknown name, name bound elsewhere, wrong proof), so a refusal tells the
   peer nothing about why.

Refusals cost the same: the master computes exactly one slave proof for
every well-formed register box -- with the name's secret, or with a random
key of its own when the name is unknown or has no secret -- and compares it
in constant time, so the time of a refusal does not tell a known name from
an unknown one.

Besides :data:`INFO_KEYS`, the master keeps the register box's keys starting
with :data:`POLICY_PREFIX` (the slave's own policy: ``policy_root``,
``policy_execute``, ``policy_allow_command``, ``policy_allow_env``) in
``Slave.info``, within
:data:`MAX_POLICY_KEYS`, :data:`MAX_POLICY_VALUE_LENGTH` and
:data:`MAX_POLICY_BYTES`; a register box beyond them is refused.

Every step is bounded by one deadline (:data:`HANDSHAKE_TIMEOUT` by default),
so a silent peer costs a connection for at most that long.  Nonces are fresh
from ``os.urandom``; proofs are compared with :func:`hmac.compare_digest`.
The proofs bind both nonces and the name, so neither can be replayed on
another connection or under another name.
"""

from __future__ import annotations

import enum
import getpass
import hashlib
import hmac
import os
import platform
import re
import socket
import sys
import time
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union, cast

from remsh import __version__
from remsh.errors import AuthenticationError, Disconnected, ProtocolError, RemshError, UsageError
from remsh.wire import Box, BoxLike, Wire

MASTER_GREETING = b"REMSH-M\n"
SLAVE_GREETING = b"REMSH-S\n"
GREETING_LENGTH = 8
PROTOCOL_VERSION = b"1"
NONCE_LENGTH = 32
HANDSHAKE_TIMEOUT = 10.0
MAX_NAME_LENGTH = 255
AUTH_FAILED = b"auth-failed"
#: The text of the one refusal box, whatever the reason.
REFUSAL_MESSAGE = b"registration refused"
#: Descriptive keys of the register box, reported as ``Slave.info``.
INFO_KEYS = ("hostname", "platform", "python", "basedir", "remsh")
#: Register-box keys with this prefix describe the slave's own policy and are
#: kept in ``Slave.info`` too.
POLICY_PREFIX = "policy_"
#: Most policy keys one register box may carry.
MAX_POLICY_KEYS = 16
#: Longest policy key name, prefix included.
MAX_POLICY_KEY_LENGTH = 64
#: Longest policy value (``policy_allow_command`` holds every pattern).
MAX_POLICY_VALUE_LENGTH = 16384
#: Most bytes (names and values) of all policy keys of one register box.
MAX_POLICY_BYTES = 32768

_POLICY_KEY = re.compile(rb"policy_[a-z0-9_]{1,%d}\Z" % (MAX_POLICY_KEY_LENGTH - len(POLICY_PREFIX)))
#: Keys the handshake itself uses: descriptive keys may not take them.
_RESERVED_KEYS = frozenset({b"register", b"version", b"nonce", b"proof", b"hello", b"registered",
                            b"error", b"errtag"})

_SLAVE_LABEL = b"remsh-v1-slave\0"
_MASTER_LABEL = b"remsh-v1-master\0"

Secret = Union[bytes, str]


def as_secret(secret: Optional[Secret]) -> Optional[bytes]:
    """Normalise a secret to bytes; an empty secret is refused (``ValueError``)."""
    if secret is None:
        return None
    b = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if not b:
        raise ValueError("an empty secret is no secret")
    return b


def slave_proof(secret: bytes, nonce_m: bytes, nonce_s: bytes, name: bytes) -> bytes:
    """The slave's proof of the secret, bound to both nonces and its name."""
    return hmac.new(secret, _SLAVE_LABEL + nonce_m + nonce_s + name, hashlib.sha256).digest()


def master_proof(secret: bytes, nonce_s: bytes, nonce_m: bytes, name: bytes) -> bytes:
    """The master's proof of the secret, bound to both nonces and the name."""
    return hmac.new(secret, _MASTER_LABEL + nonce_s + nonce_m + name, hashlib.sha256).digest()


def valid_name(name: bytes) -> bool:
    """A slave name: 1..255 bytes of UTF-8 with no control characters or spaces."""
    if not 0 < len(name) <= MAX_NAME_LENGTH:
        return False
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() and not c.isspace() for c in text) and text not in (".", "..")


def refusal_box() -> Box:
    """The error box the master answers every failed registration with."""
    return {b"error": REFUSAL_MESSAGE, b"errtag": AUTH_FAILED}


# -- the conversation, without I/O ----------------------------------------------


class State(enum.Enum):
    """Where one side of the handshake stands."""

    GREETING = "greeting"
    """Our greeting is (to be) sent; the peer's is not checked yet."""
    GREETED = "greeted"
    """Both greetings checked."""
    WAITING = "waiting"
    """Master: hello sent, waiting for register.  Slave: register sent,
    waiting for the answer."""
    REGISTERED = "registered"
    """Done: the slave is registered (and, with a secret, the master proved)."""
    FAILED = "failed"
    """The exchange failed; the connection must be closed."""


# -- resumable sessions: the register box's and the answer's session keys -------------
#
# A slave that can resume says so in its register box (``resumable: y``)
# and, while it holds a session, names it with how many of its boxes it
# received (``resume``, ``received``).  The master's answer gives a session
# (``session``, ``resume_timeout``) and, when it carries the named one on,
# ``resumed: y`` and its own count (``received``).  See remsh.session.

#: The keys a slave's register box and a master's answer use for sessions.
SESSION_KEYS = (b"resumable", b"resume", b"received", b"session", b"resumed", b"resume_timeout")


class ResumeAsk(NamedTuple):
    """What a slave's register box asks of its session (master's side)."""

    #: the session it names (``None``: it holds none and takes a new one)
    session: Optional[str]
    #: how many of that session's boxes it received (0 without one)
    received: int


def resume_ask(box: Box, label: str = "peer") -> Optional[ResumeAsk]:
    """The session a register box asks for; ``None`` when the slave cannot
    resume.

    :raises ProtocolError: a named session without a valid ``received`` count
    """
    if box.get(b"resumable") != b"y":
        return None
    sid = box.get(b"resume")
    if sid is None:
        return ResumeAsk(None, 0)
    try:
        received = int(box.get(b"received", b""))
    except ValueError:
        received = -1
    if received < 0:
        raise ProtocolError(f"{label}: bad 'received' in register box")
    return ResumeAsk(sid.decode("ascii", "replace"), received)


def session_grant(session: str, resume_timeout: float, received: Optional[int] = None) -> Dict[bytes, bytes]:
    """The master's answer keys: a new session, or (``received`` given) the
    named one carried on from the master's count of its boxes."""
    keys = {b"session": session.encode("ascii"), b"resume_timeout": repr(resume_timeout).encode("ascii")}
    if received is not None:
        keys[b"resumed"] = b"y"
        keys[b"received"] = str(received).encode("ascii")
    return keys


def resume_request(session: Optional[str] = None, received: int = 0) -> Dict[str, str]:
    """The keys a slave adds to its register box (slave's side): it can
    resume, and which session it holds with its count (``session`` given)."""
    keys = {"resumable": "y"}
    if session is not None:
        keys["resume"] = session
        keys["received"] = str(received)
    return keys


class SessionChoice(NamedTuple):
    """What a master answers a register box's session keys with
    (:func:`choose_session`)."""

    #: the keys to add to the registered box (empty: no session)
    keys: Dict[bytes, bytes]
    #: the session carried on (``None``: none), and how many of our boxes the slave has
    resumed: Optional[str]
    peer_received: int
    #: the id of a session started now (``None``: none)
    new: Optional[str]


def choose_session(box: Box, name: str, *, label: str, resume_timeout: float,
                   owner: Callable[[str], Optional[str]], resume: Callable[[str], Optional[int]],
                   new_id: Callable[[], str]) -> SessionChoice:
    """The master's answer to the session keys of ``name``'s register box
    (authenticated), without I/O: no session when it cannot resume or
    ``resume_timeout`` is 0; the session it names carried on when that
    session is ``name``'s and ``resume(session)`` gives our count of its
    boxes (``None``: it cannot be carried on); else a new one
    (``new_id()``).  ``owner(session)``: the name of the slave holding a
    session (``None``: unknown).

    :raises AuthenticationError: ``name`` named another slave's session
    :raises ProtocolError: malformed session keys
    """
    ask = resume_ask(box, label) if resume_timeout > 0 else None
    if ask is None:
        return SessionChoice({}, None, 0, None)
    if ask.session is not None:
        holder = owner(ask.session)
        if holder is not None and holder != name:
            raise AuthenticationError(f"{label}: slave {name!r} named another slave's session")
        received = resume(ask.session) if holder is not None else None
        if received is not None:
            return SessionChoice(session_grant(ask.session, resume_timeout, received), ask.session,
                                 ask.received, None)
    sid = new_id()
    return SessionChoice(session_grant(sid, resume_timeout), None, 0, sid)


class SessionGrant(NamedTuple):
    """The session a master's answer gives (slave's side)."""

    session: str
    resume_timeout: float
    #: the master carries on the session the slave named
    resumed: bool
    #: the master's count of the slave's boxes (0 for a new session)
    received: int


def session_granted(keys: Mapping[str, str], max_resume_timeout: float) -> Optional[SessionGrant]:
    """The session in a :class:`Registered` event's ``info`` on the slave;
    ``None`` when the master gave none.

    :raises ProtocolError: malformed keys, or a resume timeout outside
        0..``max_resume_timeout``
    """
    sid = keys.get("session")
    if sid is None:
        return None
    try:
        received = int(keys.get("received", "0"))
        resume_timeout = float(keys.get("resume_timeout", "0") or 0)
    except ValueError:
        raise ProtocolError("malformed session keys in the registered box") from None
    if received < 0:
        raise ProtocolError("malformed session keys in the registered box")
    if not 0 <= resume_timeout <= max_resume_timeout:
        raise ProtocolError(f"resume_timeout {resume_timeout!r} out of range")
    return SessionGrant(sid, resume_timeout, keys.get("resumed") == "y", received)


class Registered:
    """Event: the registration succeeded.

    ``name`` is the slave's name; on the master ``info`` holds the register
    box's descriptive keys (:data:`INFO_KEYS` and the policy keys), on the
    slave it is empty.
    """

    def __init__(self, name: str, info: Dict[str, str]) -> None:
        self.name = name
        self.info = info

    def __repr__(self) -> str:
        return f"Registered({self.name!r}, {self.info!r})"


#: The older name of :class:`Registered` (what :func:`master_handshake` returns).
Registration = Registered


class Refused:
    """Event (master side): the registration is refused.

    The refusal box is in the step's ``send``; ``error`` (an
    :class:`~remsh.errors.AuthenticationError` or
    :class:`~remsh.errors.ProtocolError`) says why, for the master's log and
    for the caller to raise after sending.
    """

    def __init__(self, error: RemshError) -> None:
        self.error = error

    def __repr__(self) -> str:
        return f"Refused({self.error!r})"


Event = Union[Registered, Refused]


class Step(NamedTuple):
    """What one input produced: boxes to send now, in order, and the event
    that ended the exchange (``None`` while it goes on)."""

    send: List[Box]
    event: Optional[Event]


#: ``rule(name) -> (allowed, secret)``: whether ``name`` may register, and the
#: secret its proof must be made with (``None``: no proof required).
NameRule = Callable[[str], Tuple[bool, Optional[bytes]]]


class _Side:
    """What both sides share: the state, the greeting check, state guards."""

    greeting: bytes = b""
    _expected: bytes = b""

    def __init__(self, label: str, greeted: bool) -> None:
        self.label = label
        self.state = State.GREETED if greeted else State.GREETING

    def _expect(self, *states: State) -> None:
        if self.state not in states:
            raise UsageError(f"{self.label}: handshake is {self.state.value}, not "
                             f"{' or '.join(s.value for s in states)}")

    def _fail(self, error: RemshError) -> RemshError:
        self.state = State.FAILED
        return error

    def receive_greeting(self, data: bytes) -> None:
        """Check the peer's 8-byte greeting.

        :raises ProtocolError: it is not the greeting expected (state: failed)
        :raises UsageError: the greeting was already checked
        """
        self._expect(State.GREETING)
        if bytes(data) != self._expected:
            raise self._fail(ProtocolError(f"{self.label}: bad greeting {bytes(data)!r} "
                                           f"(expected {self._expected!r})"))
        self.state = State.GREETED


class MasterHandshake(_Side):
    """The master's side of the handshake, without I/O.

    Send :attr:`greeting` and feed the slave's to :meth:`receive_greeting`
    (unless ``greeted``), send what :meth:`start` returns (the hello box), then
    feed the slave's next box to :meth:`receive_box` and send the step's
    boxes; its event is :class:`Registered` or :class:`Refused`.

    :param rule: ``rule(name) -> (allowed, secret)``
    :param label: names the peer in error messages
    :param greeted: the greetings were already exchanged
    :param nonce: the master's nonce (default: fresh random bytes; fixed
        only for test vectors)
    """

    greeting = MASTER_GREETING
    _expected = SLAVE_GREETING

    def __init__(self, rule: NameRule, *, label: str = "peer", greeted: bool = False,
                 nonce: Optional[bytes] = None,
                 session_keys: Optional[Callable[[str, Box], Mapping[bytes, bytes]]] = None) -> None:
        super().__init__(label, greeted)
        self._rule = rule
        self._session_keys = session_keys
        self.nonce = os.urandom(NONCE_LENGTH) if nonce is None else nonce
        if len(self.nonce) != NONCE_LENGTH:
            raise UsageError(f"a nonce is {NONCE_LENGTH} bytes")
        # stands in for the secret of a name without one, so that every
        # well-formed register box costs one HMAC
        self._decoy = os.urandom(32)

    def start(self) -> List[Box]:
        """The boxes that open the exchange (the hello box).

        :raises UsageError: greetings not exchanged yet, or already started
        """
        self._expect(State.GREETED)
        self.state = State.WAITING
        return [{b"hello": b"remsh", b"version": PROTOCOL_VERSION, b"nonce": self.nonce}]

    def receive_box(self, box: Box) -> Step:
        """Take the slave's register box.

        Returns the step: ``send`` holds the registered box or the refusal
        box, ``event`` is :class:`Registered` or :class:`Refused` (then the
        state is failed and the connection must close after the send).

        :raises UsageError: not waiting for a register box
        """
        self._expect(State.WAITING)
        try:
            name_b, nonce_s = self._check_register(box)
            info = _descriptive_keys(box)
        except ProtocolError as e:
            return self._refuse(e)
        name = name_b.decode("utf-8")
        try:
            allowed, secret = self._rule(name)
        except Exception as e:  # noqa: BLE001 - a failing rule refuses
            return self._refuse(AuthenticationError(f"{self.label}: checking slave {name!r} failed: {e}"))
        # one HMAC and one comparison whatever the rule said
        expected = slave_proof(secret if allowed and secret is not None else self._decoy,
                               self.nonce, nonce_s, name_b)
        proved = hmac.compare_digest(expected, box.get(b"proof", b""))
        if not allowed or (secret is not None and not proved):
            return self._refuse(AuthenticationError(f"{self.label}: slave {name!r} failed authentication"))
        reply: Box = {b"registered": name_b}
        if secret is not None:
            reply[b"proof"] = master_proof(secret, nonce_s, self.nonce, name_b)
        if self._session_keys is not None:
            # resumable sessions (remsh.session): decided once the slave is
            # authenticated; a refusal here is the same refusal as any other
            try:
                reply.update(self._session_keys(name, box))
            except RemshError as e:
                return self._refuse(e)
        self.state = State.REGISTERED
        return Step([reply], Registered(name, info))

    def _check_register(self, box: Box) -> Tuple[bytes, bytes]:
        name_b = box.get(b"register")
        if name_b is None:
            raise ProtocolError(f"{self.label}: expected a register box, got keys {sorted(box)[:8]}")
        if box.get(b"version") != PROTOCOL_VERSION:
            raise ProtocolError(f"{self.label}: unsupported protocol version {box.get(b'version')!r}")
        nonce_s = box.get(b"nonce", b"")
        if len(nonce_s) != NONCE_LENGTH or not valid_name(name_b):
            raise ProtocolError(f"{self.label}: malformed register box")
        return name_b, nonce_s

    def _refuse(self, error: RemshError) -> Step:
        self.state = State.FAILED
        return Step([refusal_box()], Refused(error))


def _descriptive_keys(box: Box) -> Dict[str, str]:
    """``Slave.info`` from a register box: the info keys and the policy keys
    (bounded; :class:`ProtocolError` beyond the bounds)."""
    info: Dict[str, str] = {}
    for key in INFO_KEYS:
        value = box.get(key.encode("ascii"))
        if value is not None:
            info[key] = value.decode("utf-8", "replace")
    count = total = 0
    for key_b, value in box.items():
        if not key_b.startswith(b"policy_"):
            continue
        count += 1
        total += len(key_b) + len(value)
        if not _POLICY_KEY.match(key_b):
            raise ProtocolError(f"malformed policy key {key_b[:80]!r} in register box")
        if count > MAX_POLICY_KEYS or len(value) > MAX_POLICY_VALUE_LENGTH or total > MAX_POLICY_BYTES:
            raise ProtocolError(f"policy keys of the register box over the limits ({MAX_POLICY_KEYS} keys, "
                                f"{MAX_POLICY_VALUE_LENGTH} bytes a value, {MAX_POLICY_BYTES} bytes in all)")
        info[key_b.decode("ascii")] = value.decode("utf-8", "replace")
    return info


class SlaveHandshake(_Side):
    """The slave's side of the handshake, without I/O.

    Send :attr:`greeting` and feed the master's to :meth:`receive_greeting`
    (unless ``greeted``); then feed each box from the master to
    :meth:`receive_box` and send the step's boxes, until its event is
    :class:`Registered`.

    :param name: the slave's name
    :param secret: the shared secret (``None``: no proofs either way)
    :param info: descriptive keys for the register box (str -> str)
    :param label: names the peer in error messages
    :param greeted: the greetings were already exchanged
    :param nonce: the slave's nonce (default: fresh random bytes)
    :raises ValueError: invalid name
    :raises UsageError: a descriptive key that is not ASCII, too long, or one
        of the handshake's own keys
    """

    greeting = SLAVE_GREETING
    _expected = MASTER_GREETING

    def __init__(self, name: str, *, secret: Optional[bytes], info: Mapping[str, str],
                 label: str = "peer", greeted: bool = False, nonce: Optional[bytes] = None) -> None:
        super().__init__(label, greeted)
        self.name = name
        self._name_b = name.encode("utf-8")
        if not valid_name(self._name_b):
            raise ValueError(f"invalid slave name {name!r}")
        self._secret = secret
        self._info: Dict[bytes, bytes] = {}
        for k, v in info.items():
            try:
                kb = k.encode("ascii")
            except UnicodeEncodeError:
                raise UsageError(f"register box key {k!r} is not ASCII") from None
            if not 0 < len(kb) <= MAX_NAME_LENGTH or kb in _RESERVED_KEYS:
                raise UsageError(f"{k!r} cannot be a key of the register box")
            self._info[kb] = v.encode("utf-8", "surrogateescape")
        self.nonce = os.urandom(NONCE_LENGTH) if nonce is None else nonce
        if len(self.nonce) != NONCE_LENGTH:
            raise UsageError(f"a nonce is {NONCE_LENGTH} bytes")
        self._nonce_m = b""

    def receive_box(self, box: Box) -> Step:
        """Take the master's hello (the step sends the register box) or its
        answer (the step's event is :class:`Registered`).

        :raises ProtocolError: a malformed hello or answer (state: failed)
        :raises AuthenticationError: the master refused us, or did not prove
            the secret (state: failed)
        :raises UsageError: greetings not exchanged, or already registered
        """
        self._expect(State.GREETED, State.WAITING)
        if self.state is State.GREETED:
            return self._hello(box)
        return self._answer(box)

    def _hello(self, hello: Box) -> Step:
        nonce_m = hello.get(b"nonce", b"")
        if hello.get(b"hello") != b"remsh" or len(nonce_m) != NONCE_LENGTH:
            raise self._fail(ProtocolError(f"{self.label}: malformed hello box"))
        if hello.get(b"version") != PROTOCOL_VERSION:
            raise self._fail(ProtocolError(
                f"{self.label}: master speaks protocol version {hello.get(b'version')!r}"))
        self._nonce_m = nonce_m
        box: Box = {b"register": self._name_b, b"version": PROTOCOL_VERSION, b"nonce": self.nonce}
        box.update(self._info)
        if self._secret is not None:
            box[b"proof"] = slave_proof(self._secret, nonce_m, self.nonce, self._name_b)
        self.state = State.WAITING
        return Step([box], None)

    def _answer(self, answer: Box) -> Step:
        if b"errtag" in answer:
            raise self._fail(AuthenticationError(
                f"{self.label}: master refused registration of {self.name!r}: "
                f"{answer.get(b'error', b'').decode('utf-8', 'replace')} "
                f"[{answer[b'errtag'].decode('ascii', 'replace')}] (the master's log says why: the secret or key, "
                f"the name, or a session another master holds)"))
        if answer.get(b"registered") != self._name_b:
            raise self._fail(ProtocolError(f"{self.label}: malformed registered box"))
        if self._secret is not None:
            proof = answer.get(b"proof", b"")
            if not hmac.compare_digest(master_proof(self._secret, self.nonce, self._nonce_m, self._name_b),
                                       proof):
                raise self._fail(AuthenticationError(
                    f"{self.label}: master did not prove it holds the secret"))
        self.state = State.REGISTERED
        session = {k.decode("ascii"): v.decode("ascii", "replace") for k, v in answer.items()
                   if k in SESSION_KEYS}
        return Step([], Registered(self.name, session))


# -- the synchronous loops --------------------------------------------------------


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.seconds = seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())


def exchange_greeting(wire: Wire, mine: bytes, theirs: bytes, timeout: float) -> None:
    """Write our greeting, read and check the peer's.

    :raises ProtocolError: a wrong greeting
    :raises Disconnected: the peer closed (:class:`~remsh.errors.PeerTimeout`
        when it stayed silent past ``timeout``)
    """
    wire.send_bytes(mine)
    got = wire.read_exact(GREETING_LENGTH, timeout)
    if got != theirs:
        raise ProtocolError(f"{wire.label}: bad greeting {got!r} (expected {theirs!r})")


def _read(wire: Wire, deadline: _Deadline, what: str) -> Box:
    box = wire.read_box(deadline.left())
    if box is None:
        raise Disconnected(f"{wire.label}: connection closed while waiting for {what}")
    return box


def _send(wire: Wire, boxes: List[Box]) -> None:
    """Send a step's boxes in one write."""
    if boxes:
        wire.send_boxes(cast(List[BoxLike], boxes))


def _greet(wire: Wire, side: _Side, deadline: _Deadline) -> None:
    wire.send_bytes(side.greeting)
    side.receive_greeting(wire.read_exact(GREETING_LENGTH, deadline.left()))


# -- master side ---------------------------------------------------------------

#: ``authorize(name, wire) -> (allowed, secret)``: whether ``name`` may register
#: over this connection, and the secret its proof must be made with (``None``:
#: no proof required).
Authorizer = Callable[[str, Wire], Tuple[bool, Optional[bytes]]]


def master_handshake(wire: Wire, authorize: Authorizer, *,
                     timeout: float = HANDSHAKE_TIMEOUT, greet: bool = True,
                     session_keys: Optional[Callable[[str, Box], Mapping[bytes, bytes]]] = None
                     ) -> Registered:
    """Run the master's side of set-up over ``wire`` and return the registration.

    One deadline (``timeout`` seconds) bounds the whole exchange; with
    ``greet`` false the greetings must already have been exchanged.
    ``session_keys(name, register_box)``, called once the slave is
    authenticated, gives keys to add to the ``registered`` box (a
    resumable session, :mod:`remsh.session`) or raises to refuse.

    :raises AuthenticationError: after answering with the refusal box
    :raises ProtocolError: a malformed exchange (refused the same way when
        the register box was the problem)
    :raises Disconnected: the peer went away (:class:`~remsh.errors.PeerTimeout`:
        it stayed silent past the deadline)
    """
    deadline = _Deadline(timeout)
    hs = MasterHandshake(lambda name: authorize(name, wire), label=wire.label, greeted=not greet,
                         session_keys=session_keys)
    if greet:
        _greet(wire, hs, deadline)
    _send(wire, hs.start())
    step = hs.receive_box(_read(wire, deadline, "register"))
    if isinstance(step.event, Refused):
        try:
            _send(wire, step.send)
        except RemshError:
            pass  # the refusal is a courtesy: the error below is what counts
        raise step.event.error
    _send(wire, step.send)
    assert isinstance(step.event, Registered)
    return step.event


# -- slave side ----------------------------------------------------------------


def default_name() -> str:
    """The slave name used when none is given: the host name."""
    return socket.gethostname() or "slave"


def slave_info(basedir: str) -> Dict[str, str]:
    """The descriptive keys a slave sends with ``register``."""
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "basedir": basedir,
        "remsh": __version__,
    }


def slave_handshake(wire: Wire, name: str, *, secret: Optional[bytes], basedir: str,
                    timeout: float = HANDSHAKE_TIMEOUT, greet: bool = True,
                    extra_info: Optional[Mapping[str, str]] = None) -> Registered:
    """Run the slave's side of set-up over ``wire``; return once registered
    (and, with a ``secret``, once the master proved it holds it too).

    The registration's ``info`` holds the session keys of the master's
    answer (``session``, ``resumed``, ``received``, ``resume_timeout``), if any.

    ``extra_info`` adds descriptive keys to the register box (e.g. the
    slave's ``policy_*`` keys); they override the defaults of
    :func:`slave_info`.  One deadline (``timeout``) bounds the exchange.

    :raises ValueError: invalid ``name``
    :raises UsageError: an ``extra_info`` key the register box cannot carry
    :raises AuthenticationError: the master refused us, or failed to prove
        the secret; no operation must be served then
    :raises ProtocolError: the master broke the protocol
    :raises Disconnected: the master went away or stayed silent
        (:class:`~remsh.errors.PeerTimeout`)
    """
    info = slave_info(basedir)
    if extra_info:
        info.update(extra_info)
    hs = SlaveHandshake(name, secret=secret, info=info, label=wire.label, greeted=not greet)
    deadline = _Deadline(timeout)
    if greet:
        _greet(wire, hs, deadline)
    while True:
        step = hs.receive_box(_read(wire, deadline, "hello" if hs.state is State.GREETED else "registered"))
        _send(wire, step.send)
        if isinstance(step.event, Registered):
            return step.event


def current_user() -> str:
    """Best-effort local user name (for default SSH logins)."""
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - getpass raises various things without a user
        return "remsh"
