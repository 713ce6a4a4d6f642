"""remsh.peercred: the uid at the other end of a real UNIX socket, read from the kernel."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

import pytest

from remsh.peercred import PEER_CREDENTIALS, PeerUnknown, peer_uid
from tests.util import NOBODY

pytestmark = pytest.mark.timeout(60)


def test_the_system_offers_a_way_and_it_reads_our_own_uid():
    """On this system some way to read the peer's uid exists, and a socketpair's peer is this process's uid."""
    assert PEER_CREDENTIALS, "no SO_PEERCRED / LOCAL_PEERCRED: every control connection would be refused"
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert peer_uid(a) == os.geteuid()
        assert peer_uid(b) == os.geteuid()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_the_uid_is_the_peers_not_ours():
    """A client that became uid nobody is seen as nobody: the uid is taken from the right field."""
    # a directory nobody may traverse (pytest's own are 0700 all the way up)
    where = tempfile.mkdtemp(prefix="remsh-peercred-")
    os.chmod(where, 0o711)
    path = os.path.join(where, "s.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        os.chmod(path, 0o666)
        server.listen(1)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                    c.connect(path)
                    c.recv(1)
                code = 0
            finally:
                os._exit(code)
        server.settimeout(10)
        conn, _ = server.accept()
        with conn:
            uid = peer_uid(conn)
            conn.sendall(b"x")
        _, status = os.waitpid(pid, 0)
    shutil.rmtree(where)
    assert os.waitstatus_to_exitcode(status) == 0
    assert uid == NOBODY


def test_no_way_to_tell_raises_instead_of_answering_anyone():
    """With no way to read the uid (a system without SO_PEERCRED or LOCAL_PEERCRED), peer_uid raises PeerUnknown."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        with pytest.raises(PeerUnknown, match="neither SO_PEERCRED nor LOCAL_PEERCRED"):
            peer_uid(a, ())
