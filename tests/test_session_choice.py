"""The master's answer to a register box's session keys (remsh.handshake.choose_session), with no I/O."""

from __future__ import annotations

from typing import Dict, List, Optional

import pytest

from remsh.errors import AuthenticationError, ProtocolError
from remsh.handshake import choose_session, resume_request, session_granted
from remsh.wire import Box


def register(**keys: str) -> Box:
    return {k.encode(): v.encode() for k, v in keys.items()}


class Sessions:
    """A master's sessions: id -> (slave name, our count of its boxes or None if it cannot be carried on)."""

    def __init__(self, table: Dict[str, tuple]) -> None:
        self.table = table
        self.resumed: List[str] = []

    def owner(self, sid: str) -> Optional[str]:
        entry = self.table.get(sid)
        return None if entry is None else entry[0]

    def resume(self, sid: str) -> Optional[int]:
        self.resumed.append(sid)
        return self.table[sid][1]

    def choose(self, box: Box, name: str, resume_timeout: float = 30.0):  # type: ignore[no-untyped-def]
        return choose_session(box, name, label="peer", resume_timeout=resume_timeout, owner=self.owner,
                              resume=self.resume, new_id=lambda: "f" * 32)


def test_no_session_for_a_slave_that_cannot_resume_or_without_resume_timeout() -> None:
    """No resumable key, or resume_timeout 0: no keys, no session."""
    sessions = Sessions({})
    assert sessions.choose(register(), "a").keys == {}
    assert sessions.choose(register(**resume_request()), "a", resume_timeout=0).keys == {}


def test_a_new_session_for_a_slave_that_can_resume() -> None:
    """A resumable slave naming no session gets a new one; the slave reads it back as a new grant."""
    choice = Sessions({}).choose(register(**resume_request()), "a")
    assert choice.new == "f" * 32 and choice.resumed is None
    grant = session_granted({k.decode(): v.decode() for k, v in choice.keys.items()}, 3600)
    assert grant is not None and grant.session == "f" * 32 and not grant.resumed and grant.resume_timeout == 30.0


def test_its_own_session_is_carried_on() -> None:
    """A slave naming its own live session gets it back with our count; the slave's count is kept for attach."""
    sessions = Sessions({"s1": ("a", 17)})
    choice = sessions.choose(register(**resume_request("s1", 5)), "a")
    assert (choice.resumed, choice.peer_received, choice.new) == ("s1", 5, None)
    grant = session_granted({k.decode(): v.decode() for k, v in choice.keys.items()}, 3600)
    assert grant is not None and grant.resumed and grant.received == 17
    assert sessions.resumed == ["s1"]


def test_a_session_that_cannot_be_carried_on_or_is_unknown_gives_a_new_one() -> None:
    """A named session that is gone (unknown, or failed) starts a new one."""
    sessions = Sessions({"s1": ("a", None)})
    assert sessions.choose(register(**resume_request("s1", 5)), "a").new == "f" * 32
    assert sessions.choose(register(**resume_request("zz", 5)), "a").new == "f" * 32


def test_another_slaves_session_is_refused_untouched() -> None:
    """Naming another slave's session is an AuthenticationError, and that session is not taken off its connection."""
    sessions = Sessions({"s1": ("victim", 3)})
    with pytest.raises(AuthenticationError):
        sessions.choose(register(**resume_request("s1", 0)), "mallory")
    assert sessions.resumed == []


@pytest.mark.parametrize("received", ["-1", "x", ""])
def test_a_bad_count_is_a_protocol_error(received: str) -> None:
    """A named session with a missing, negative or non-numeric count is a protocol error."""
    with pytest.raises(ProtocolError):
        Sessions({}).choose(register(resumable="y", resume="s1", received=received), "a")
