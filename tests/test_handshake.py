"""The handshake as a conversation without I/O, its synchronous loops, and the
one refusal every failure gets (from the objects and from a real listener)."""

from __future__ import annotations

import hashlib
import hmac
import socket
import threading
import time
from typing import Dict, List, Optional, Tuple

import pytest

import remsh.handshake as hs
from remsh.errors import AuthenticationError, PeerTimeout, ProtocolError, UsageError
from remsh.handshake import (AUTH_FAILED, MASTER_GREETING, MAX_POLICY_BYTES, MAX_POLICY_KEYS,
                             MAX_POLICY_VALUE_LENGTH, NONCE_LENGTH, REFUSAL_MESSAGE, SLAVE_GREETING,
                             MasterHandshake, Refused, Registered, SlaveHandshake, State,
                             master_handshake, refusal_box, slave_handshake)
from remsh.transports.base import SocketStream
from remsh.wire import Box, BoxDecoder, Wire, encode_box
from tests.slaveproc import HOST, SECRET, read_until_closed, tcp_listener  # noqa: F401
from tests.util import WAIT, run_in_thread

pytestmark = pytest.mark.timeout(60)

NONCE_M = bytes(range(32))
NONCE_S = bytes(range(32, 64))
INFO = {"hostname": "h", "platform": "p", "python": "3", "basedir": "/b", "remsh": "0"}
POLICY = {"policy_root": "/srv/jail", "policy_execute": "n", "policy_allow_command": "make\0/usr/bin/*"}


def rule_for(secrets: Dict[str, Optional[bytes]]):
    """A name rule: known names with their secret, unknown names refused."""
    def rule(name: str) -> Tuple[bool, Optional[bytes]]:
        if name in secrets:
            return True, secrets[name]
        return False, None
    return rule


def pair(name: str = "s1", *, slave_secret: Optional[bytes] = SECRET,
         rule=None, info=None) -> Tuple[MasterHandshake, SlaveHandshake]:
    """Both sides, greeted, with fixed nonces."""
    master = MasterHandshake(rule or rule_for({name: SECRET}), nonce=NONCE_M)
    slave = SlaveHandshake(name, secret=slave_secret, info=dict(INFO, **(info or {})), nonce=NONCE_S)
    master.receive_greeting(SLAVE_GREETING)
    slave.receive_greeting(MASTER_GREETING)
    return master, slave


def run_pair(master: MasterHandshake, slave: SlaveHandshake) -> Tuple[Box, hs.Step]:
    """Drive the two objects to the master's decision; returns the register box and the master's step."""
    (hello,) = master.start()
    step = slave.receive_box(hello)
    (register,) = step.send
    return register, master.receive_box(register)


def test_conversation_registers_and_both_proofs_check_out() -> None:
    """Master and slave objects fed each other's boxes end registered, with the proofs the spec defines."""
    master, slave = pair()
    register, step = run_pair(master, slave)
    assert register[b"proof"] == hmac.new(SECRET, b"remsh-v1-slave\0" + NONCE_M + NONCE_S + b"s1",
                                          hashlib.sha256).digest()
    assert isinstance(step.event, Registered) and step.event.name == "s1"
    assert step.event.info == INFO
    (reply,) = step.send
    assert reply == {b"registered": b"s1", b"proof": hmac.new(
        SECRET, b"remsh-v1-master\0" + NONCE_S + NONCE_M + b"s1", hashlib.sha256).digest()}
    final = slave.receive_box(reply)
    assert final.send == [] and isinstance(final.event, Registered)
    assert master.state is State.REGISTERED and slave.state is State.REGISTERED


def test_policy_keys_reach_the_registration_info() -> None:
    """policy_* keys of the register box are kept in the registration info, other extra keys are not."""
    master, slave = pair(info=dict(POLICY, color="blue"))
    _, step = run_pair(master, slave)
    assert isinstance(step.event, Registered)
    assert step.event.info == dict(INFO, **POLICY)


def _register_box(**changes: Optional[bytes]) -> Box:
    """A well-formed register box for 's1' (proof for NONCE_M), with keys changed or removed."""
    box: Box = {b"register": b"s1", b"version": b"1", b"nonce": NONCE_S,
                b"proof": hs.slave_proof(SECRET, NONCE_M, NONCE_S, b"s1")}
    for key, value in changes.items():
        if value is None:
            box.pop(key.encode(), None)
        else:
            box[key.encode()] = value
    return box


def _over_policy_limits(kind: str) -> Box:
    box = _register_box()
    if kind == "count":
        for i in range(MAX_POLICY_KEYS + 1):
            box[b"policy_k%d" % i] = b"y"
    elif kind == "value":
        box[b"policy_allow_command"] = b"x" * (MAX_POLICY_VALUE_LENGTH + 1)
    elif kind == "total":
        for i in range(MAX_POLICY_BYTES // MAX_POLICY_VALUE_LENGTH + 1):
            box[b"policy_k%d" % i] = b"x" * MAX_POLICY_VALUE_LENGTH
    else:
        box[b"policy_Root!"] = b"/"
    return box


#: name -> (register box, name rule): every way a registration can fail.
FAILURES = {
    "wrong-proof": (_register_box(proof=bytes(32)), None),
    "no-proof": (_register_box(proof=None), None),
    "unknown-name": (_register_box(register=b"stranger"), None),
    "rule-refuses": (_register_box(), lambda name: (False, SECRET)),
    "rule-raises": (_register_box(), lambda name: 1 / 0),
    "no-register-key": (_register_box(register=None), None),
    "wrong-version": (_register_box(version=b"01"), None),
    "short-nonce": (_register_box(nonce=b"short"), None),
    "invalid-name": (_register_box(register=b"has space"), None),
    "policy-count": (_over_policy_limits("count"), None),
    "policy-value": (_over_policy_limits("value"), None),
    "policy-total": (_over_policy_limits("total"), None),
    "policy-key": (_over_policy_limits("key"), None),
}


@pytest.mark.parametrize("kind", sorted(FAILURES))
def test_every_failure_gets_the_one_refusal_box(kind: str) -> None:
    """Every failed registration is answered with the same refusal box, byte for byte, and fails the master's side."""
    box, rule = FAILURES[kind]
    master = MasterHandshake(rule or rule_for({"s1": SECRET}), nonce=NONCE_M, greeted=True)
    master.start()
    step = master.receive_box(box)
    assert [encode_box(b) for b in step.send] == [encode_box({b"error": REFUSAL_MESSAGE, b"errtag": AUTH_FAILED})]
    assert step.send == [refusal_box()]
    assert isinstance(step.event, Refused)
    assert isinstance(step.event.error, (AuthenticationError, ProtocolError))
    assert master.state is State.FAILED
    with pytest.raises(UsageError):
        master.receive_box(_register_box())


def test_policy_keys_at_the_limits_are_accepted() -> None:
    """A register box with policy keys exactly at the count and total limits registers, all keys kept."""
    box = _register_box()
    per_key = MAX_POLICY_BYTES // MAX_POLICY_KEYS - len(b"policy_k00")
    assert per_key <= MAX_POLICY_VALUE_LENGTH
    for i in range(MAX_POLICY_KEYS):
        box[b"policy_k%02d" % i] = b"x" * per_key
    master = MasterHandshake(rule_for({"s1": SECRET}), nonce=NONCE_M, greeted=True)
    master.start()
    step = master.receive_box(box)
    assert isinstance(step.event, Registered)
    assert len([k for k in step.event.info if k.startswith("policy_")]) == MAX_POLICY_KEYS


@pytest.mark.parametrize("case", ["known-wrong-proof", "unknown-name", "known-right-proof", "no-secret"])
def test_every_well_formed_register_box_costs_one_hmac(case: str, monkeypatch) -> None:
    """Known and unknown names, right or wrong proofs, cost exactly one slave-proof HMAC and one constant-time comparison."""
    box = {"known-wrong-proof": _register_box(proof=bytes(32)),
           "unknown-name": _register_box(register=b"stranger"),
           "known-right-proof": _register_box(),
           "no-secret": _register_box()}[case]
    calls: List[str] = []
    real_proof, real_compare = hs.slave_proof, hs.hmac.compare_digest
    monkeypatch.setattr(hs, "slave_proof", lambda *a: calls.append("hmac") or real_proof(*a))

    class CountingHmac:
        new = staticmethod(hmac.new)

        @staticmethod
        def compare_digest(a: bytes, b: bytes) -> bool:
            calls.append("compare")
            return real_compare(a, b)

    monkeypatch.setattr(hs, "hmac", CountingHmac)
    secrets: Dict[str, Optional[bytes]] = {"s1": None if case == "no-secret" else SECRET}
    master = MasterHandshake(rule_for(secrets), nonce=NONCE_M, greeted=True)
    master.start()
    step = master.receive_box(box)
    assert calls == ["hmac", "compare"]
    assert isinstance(step.event, Refused if case in ("known-wrong-proof", "unknown-name") else Registered)


def test_state_violations_raise_at_once() -> None:
    """Calls out of order raise UsageError; a bad greeting raises ProtocolError and fails the side."""
    master = MasterHandshake(rule_for({}))
    with pytest.raises(UsageError):
        master.start()  # greetings first
    with pytest.raises(UsageError):
        master.receive_box(_register_box())
    with pytest.raises(ProtocolError):
        master.receive_greeting(b"REMSH-X\n")
    assert master.state is State.FAILED
    with pytest.raises(UsageError):
        master.receive_greeting(SLAVE_GREETING)
    slave = SlaveHandshake("s1", secret=None, info={})
    with pytest.raises(UsageError):
        slave.receive_box({b"hello": b"remsh"})
    slave.receive_greeting(MASTER_GREETING)
    with pytest.raises(UsageError):
        slave.receive_greeting(MASTER_GREETING)


@pytest.mark.parametrize("hello", [
    {b"hello": b"remsh", b"version": b"1", b"nonce": b"short"},
    {b"hello": b"other", b"version": b"1", b"nonce": NONCE_M},
    {b"hello": b"remsh", b"version": b"2", b"nonce": NONCE_M},
], ids=["short-nonce", "not-remsh", "version-2"])
def test_slave_fails_on_a_malformed_hello(hello: Box) -> None:
    """A malformed hello makes the slave side raise ProtocolError and fail."""
    slave = SlaveHandshake("s1", secret=SECRET, info={}, greeted=True)
    with pytest.raises(ProtocolError):
        slave.receive_box(hello)
    assert slave.state is State.FAILED


def test_slave_refuses_a_master_without_the_secret() -> None:
    """A registered box whose proof is wrong or missing, or a refusal, raises AuthenticationError on the slave side."""
    for answer in ({b"registered": b"s1", b"proof": bytes(32)}, {b"registered": b"s1"}, refusal_box()):
        master, slave = pair()
        run_pair(master, slave)
        with pytest.raises(AuthenticationError):
            slave.receive_box(answer)
        assert slave.state is State.FAILED
    master, slave = pair()
    run_pair(master, slave)
    with pytest.raises(ProtocolError):
        slave.receive_box({b"registered": b"other-name"})


@pytest.mark.parametrize("key", ["register", "proof", "nonce", "errtag", "k\u00e9y", "k" * 256])
def test_descriptive_keys_cannot_take_protocol_keys(key: str) -> None:
    """Extra register-box keys that are the handshake's own, not ASCII, or too long raise UsageError."""
    with pytest.raises(UsageError):
        SlaveHandshake("s1", secret=None, info={key: "x"})


# -- the synchronous loops over a real socket pair ---------------------------------


def _wires() -> Tuple[Wire, Wire]:
    a, b = socket.socketpair()
    return Wire(SocketStream(a), label="slave"), Wire(SocketStream(b), label="master")


def test_loops_register_over_a_socket_pair_with_extra_keys() -> None:
    """master_handshake and slave_handshake register over real sockets; extra_info policy keys reach the registration."""
    to_slave, to_master = _wires()
    try:
        slave_side = run_in_thread(lambda: slave_handshake(to_master, "s1", secret=SECRET, basedir="/b",
                                                           timeout=WAIT, extra_info=POLICY))
        reg = master_handshake(to_slave, lambda name, wire: (True, SECRET), timeout=WAIT)
        slave_side.wait()
        assert slave_side.error is None
        assert reg.name == "s1" and reg.info["basedir"] == "/b"
        assert {k: v for k, v in reg.info.items() if k.startswith("policy_")} == POLICY
    finally:
        to_slave.close()
        to_master.close()


def test_one_deadline_bounds_the_whole_slave_side() -> None:
    """A master that greets and then stays silent makes slave_handshake raise PeerTimeout once its one deadline passes."""
    to_slave, to_master = _wires()
    try:
        to_slave.send_bytes(MASTER_GREETING)
        started = time.monotonic()
        with pytest.raises(PeerTimeout):
            slave_handshake(to_master, "s1", secret=SECRET, basedir="/b", timeout=0.5)
        assert 0.45 <= time.monotonic() - started < 3.0
    finally:
        to_slave.close()
        to_master.close()


def test_refusal_is_raised_on_the_master_loop_after_the_box() -> None:
    """master_handshake sends the refusal box for a register box without ``register``, then raises."""
    to_slave, to_master = _wires()
    try:
        got: List[Box] = []

        def fake_slave() -> None:
            to_master.send_bytes(SLAVE_GREETING)
            to_master.read_exact(len(MASTER_GREETING), WAIT)
            to_master.read_box(WAIT)
            to_master.send_box({b"version": b"1"})
            box = to_master.read_box(WAIT)
            if box is not None:
                got.append(box)

        t = threading.Thread(target=fake_slave, daemon=True)
        t.start()
        with pytest.raises(ProtocolError):
            master_handshake(to_slave, lambda name, wire: (True, SECRET), timeout=WAIT)
        t.join(WAIT)
        assert got == [refusal_box()]
    finally:
        to_slave.close()
        to_master.close()


# -- the same refusal from a real listener ----------------------------------------------


def _answer_from_listener(port: int, register: Optional[Box]) -> bytes:
    """Greet, read the hello, send ``register`` (``None``: one for 's1' with a
    proof made from the wrong secret) and return everything after the hello."""
    with socket.create_connection((HOST, port), timeout=WAIT) as sock:
        sock.sendall(SLAVE_GREETING)
        data = b""
        boxes: List[Box] = []
        while not boxes:
            chunk = sock.recv(65536)
            assert chunk, "closed before the hello"
            data += chunk
            if len(data) > len(MASTER_GREETING):
                boxes = BoxDecoder().feed(data[len(MASTER_GREETING):])
        assert data.startswith(MASTER_GREETING)
        hello = boxes[0]
        if register is None:
            nonce_s = bytes(NONCE_LENGTH)
            proof = hs.slave_proof(b"wrong secret", hello[b"nonce"], nonce_s, b"s1")
            register = {b"register": b"s1", b"version": b"1", b"nonce": nonce_s, b"proof": proof}
        sock.sendall(encode_box(register))
        return read_until_closed(sock, WAIT)


@pytest.mark.parametrize("kind", ["wrong-secret", "no-register-key", "wrong-version", "short-nonce"])
def test_listener_answers_every_failure_with_the_same_bytes(kind: str, tcp_listener) -> None:  # noqa: F811
    """A real TCP listener answers a wrong secret and every malformed register box with the identical refusal bytes."""
    listener = tcp_listener(handshake_timeout=WAIT)
    box = {
        "wrong-secret": None,
        "no-register-key": {b"name": b"s1", b"version": b"1", b"nonce": bytes(32)},
        "wrong-version": {b"register": b"s1", b"version": b"2", b"nonce": bytes(32)},
        "short-nonce": {b"register": b"s1", b"version": b"1", b"nonce": b"x"},
    }[kind]
    assert _answer_from_listener(listener.port, box) == encode_box(refusal_box())
    assert listener.slave_collection.get_all_slaves() == []


def test_session_keys_are_the_handshakes():
    """The session keys of the register box and the answer are made and read
    by remsh.handshake on both ends: what one side writes the other reads
    back, and malformed values are refused."""
    from remsh.handshake import (ResumeAsk, SessionGrant, resume_ask, resume_request, session_grant,
                                 session_granted)

    def as_box(keys):
        return {k.encode(): v.encode() for k, v in keys.items()}

    assert resume_ask({}) is None
    assert resume_ask(as_box(resume_request())) == ResumeAsk(None, 0)
    assert resume_ask(as_box(resume_request("s1", 42))) == ResumeAsk("s1", 42)
    for bad in (b"", b"-1", b"x"):
        with pytest.raises(ProtocolError, match="received"):
            resume_ask({b"resumable": b"y", b"resume": b"s1", b"received": bad})
    grant = {k.decode(): v.decode() for k, v in session_grant("s1", 30.0, 7).items()}
    assert session_granted(grant, 3600) == SessionGrant("s1", 30.0, True, 7)
    fresh = {k.decode(): v.decode() for k, v in session_grant("s2", 5.0).items()}
    assert session_granted(fresh, 3600) == SessionGrant("s2", 5.0, False, 0)
    assert session_granted({}, 3600) is None
    with pytest.raises(ProtocolError, match="out of range"):
        session_granted(grant, 10)
    with pytest.raises(ProtocolError, match="malformed"):
        session_granted({"session": "s", "received": "x"}, 10)
