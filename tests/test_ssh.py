"""The SSH transport: the embedded server, the slave's two ways of dialling
out, and what each side refuses.

Everything runs on 127.0.0.1 with real paramiko, real ``remsh-slave``
processes and, for the tunnel form, a real OpenSSH ``sshd`` started by the
test.  Keys are generated here: paramiko RSA and ECDSA, ``ssh-keygen``
Ed25519.
"""

from __future__ import annotations

import hashlib
import logging
import os
import select
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import paramiko
import pytest

from remsh.errors import AuthenticationError
from remsh.master.slavecollection.simple import SimpleSlaveCollection
from remsh.master.slavelistener.ssh import SshSlaveListener
from remsh.master.slavelistener.tcp import TcpSlaveListener
from remsh.transports import ssh
from tests.sshd import (HOST, WAIT, SlaveProcs, Sshd, make_key, require_sshd, wait_until, write_authorized_keys,
                        write_known_hosts)

pytestmark = pytest.mark.timeout(120)

SECRET = b"ssh tests shared secret"
EXIT_AUTH = 2
EXIT_UNREACHABLE = 4


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Host keys for the embedded server and slave keys of every type."""
    d = tmp_path_factory.mktemp("keys")
    k = SimpleNamespace(dir=d)
    for name, kind in [("host", "ecdsa"), ("other_host", "ecdsa"), ("alpha", "ed25519"),
                       ("beta", "rsa"), ("gamma", "ecdsa"), ("stranger", "ecdsa")]:
        path = d / name
        setattr(k, name, make_key(kind, path))
        setattr(k, name + "_path", path)
    return k


@pytest.fixture
def authorized_keys(keys: SimpleNamespace, tmp_path: Path) -> Path:
    """alpha (Ed25519), beta (RSA) and gamma (ECDSA) may log in, each as its own name."""
    return write_authorized_keys(tmp_path / "authorized_keys",
                                 [(keys.alpha, "alpha"), (keys.beta, "beta"), (keys.gamma, "gamma")])


@pytest.fixture
def collection() -> SimpleSlaveCollection:
    return SimpleSlaveCollection()


def _listener(keys: SimpleNamespace, authorized_keys: Path, collection: SimpleSlaveCollection,
              **kwargs: object) -> SshSlaveListener:
    lst = SshSlaveListener(host=HOST, host_key=keys.host_path, authorized_keys=authorized_keys,
                           slave_collection=collection, **kwargs)
    lst.start()
    return lst


@pytest.fixture
def ssh_listener(keys: SimpleNamespace, authorized_keys: Path,
                 collection: SimpleSlaveCollection) -> Iterator[SshSlaveListener]:
    """A started embedded SSH listener on 127.0.0.1 (no shared secret)."""
    lst = _listener(keys, authorized_keys, collection)
    try:
        yield lst
    finally:
        lst.stop()


@pytest.fixture
def known_hosts(keys: SimpleNamespace, ssh_listener: SshSlaveListener, tmp_path: Path) -> Path:
    """A known_hosts file trusting the embedded server's host key on its port."""
    return write_known_hosts(tmp_path / "known_hosts", [(HOST, ssh_listener.port, keys.host)])


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[SlaveProcs]:
    p = SlaveProcs(tmp_path / "slaves")
    try:
        yield p
    finally:
        p.close()


def secret_file(tmp_path: Path, secret: bytes) -> Path:
    path = tmp_path / f"secret-{hashlib.sha256(secret).hexdigest()[:8]}"
    path.write_bytes(secret)
    path.chmod(0o600)
    return path


def start_ssh_slave(procs: SlaveProcs, name: str, identity: Path, port: int, known_hosts: Path,
                    *extra: str) -> subprocess.Popen:
    return procs.start(["--ssh-client", "paramiko", "--ssh", f"remsh@{HOST}:{port}", "--identity", str(identity),
                        "--known-hosts", str(known_hosts), "--no-reconnect", *extra], name=name)


def named(name: str):
    return lambda s: s.name == name


def assert_refused(procs: SlaveProcs, p: subprocess.Popen, collection: SimpleSlaveCollection,
                   status: int, *in_log: str) -> str:
    """The slave exited with ``status``, said each of ``in_log``, and nothing registered."""
    rc = procs.wait(p)
    log_text = procs.log_text(p)
    assert rc == status, log_text
    for text in in_log:
        assert text in log_text, log_text
    assert collection.get_all_slaves() == []
    return log_text


# -- registration over the embedded server ------------------------------------------------
# (the operations themselves run over SSH in tests/test_operations.py)


def test_ed25519_slave_registers_as_its_key_name_and_stop_ends_it(ssh_listener, known_hosts, keys, procs,
                                                                  collection):
    """An Ed25519-keyed slave registers over SSH as its key's name; stop() closes it cleanly and it exits 0."""
    p = start_ssh_slave(procs, "alpha", keys.alpha_path, ssh_listener.port, known_hosts)
    slave = collection.get_slave(True, named("alpha"), timeout=WAIT)
    assert slave is not None, procs.log_text(p)
    assert slave.info["basedir"] == str(p.basedir)  # type: ignore[attr-defined]
    assert slave.wire.stream.identity == "alpha"
    slave.ping()
    # stop() closes the connection cleanly: a --no-reconnect slave exits 0
    ssh_listener.stop()
    assert procs.wait(p) == 0, procs.log_text(p)
    assert collection.get_all_slaves() == []


def test_rsa_and_ecdsa_slave_keys_register(ssh_listener, known_hosts, keys, procs, collection):
    """Slaves with RSA and ECDSA identity files register under their keys' names and answer."""
    ps = [start_ssh_slave(procs, "beta", keys.beta_path, ssh_listener.port, known_hosts),
          start_ssh_slave(procs, "gamma", keys.gamma_path, ssh_listener.port, known_hosts)]
    for name, p in zip(["beta", "gamma"], ps):
        slave = collection.get_slave(True, named(name), timeout=WAIT)
        assert slave is not None, procs.log_text(p)
        assert slave.wire.stream.identity == name
        slave.ping()


def test_shared_secret_is_required_on_top_of_the_key(keys, authorized_keys, collection, procs, tmp_path):
    """With a secret configured, an authorized key alone is refused; key plus secret registers."""
    lst = _listener(keys, authorized_keys, collection, secret=SECRET)
    try:
        kh = write_known_hosts(tmp_path / "kh", [(HOST, lst.port, keys.host)])
        p = start_ssh_slave(procs, "alpha", keys.alpha_path, lst.port, kh)
        assert_refused(procs, p, collection, EXIT_AUTH, "auth-failed")
        p = start_ssh_slave(procs, "alpha", keys.alpha_path, lst.port, kh,
                            "--secret-file", str(secret_file(tmp_path, SECRET)))
        slave = collection.get_slave(True, named("alpha"), timeout=WAIT)
        assert slave is not None, procs.log_text(p)
        slave.ping()
    finally:
        lst.stop()


# -- refusals ----------------------------------------------------------------------------------


def test_unknown_slave_key_is_refused(ssh_listener, known_hosts, keys, procs, collection, caplog):
    """A key missing from authorized_keys cannot log in: the slave exits 2, nothing registers."""
    caplog.set_level(logging.WARNING, logger="remsh")
    p = start_ssh_slave(procs, "alpha", keys.stranger_path, ssh_listener.port, known_hosts)
    assert_refused(procs, p, collection, EXIT_AUTH, "refused key", ssh.host_key_fingerprint(keys.stranger))
    assert ssh.host_key_fingerprint(keys.stranger) in caplog.text


def test_known_key_registering_under_another_name_is_refused(ssh_listener, known_hosts, keys, procs, collection):
    """alpha's key asking to register as beta gets auth-failed: the slave exits 2, nothing registers."""
    p = procs.start(["--ssh", f"remsh@{HOST}:{ssh_listener.port}", "--identity", str(keys.alpha_path),
                     "--known-hosts", str(known_hosts), "--no-reconnect"], name="beta")
    assert_refused(procs, p, collection, EXIT_AUTH, "auth-failed")


@pytest.mark.parametrize("case", ["changed", "absent", "no-file"])
def test_slave_refuses_an_unknown_or_changed_host_key(ssh_listener, keys, procs, collection, tmp_path, case):
    """A host key that is not pinned for [host]:port (or differs) ends the attempt with its fingerprint, exit 2."""
    port = ssh_listener.port
    kh = tmp_path / "known_hosts"
    if case == "changed":
        write_known_hosts(kh, [(HOST, port, keys.other_host)])
        expected = "HOST KEY CHANGED"
    elif case == "absent":  # the right key, but pinned for another port only
        write_known_hosts(kh, [(HOST, port + 1 if port < 65535 else port - 1, keys.host), (HOST, 22, keys.host)])
        expected = "is unknown"
    else:
        expected = "cannot read known hosts file"
    p = start_ssh_slave(procs, "alpha", keys.alpha_path, port, kh)
    log_text = assert_refused(procs, p, collection, EXIT_AUTH, expected)
    if case != "no-file":
        assert ssh.host_key_fingerprint(keys.host) in log_text
    assert kh.exists() == (case != "no-file")
    if kh.exists():  # nothing was ever added
        assert ssh.known_hosts_line(HOST, port, keys.host) not in kh.read_text()


def _client(port: int, key: paramiko.PKey) -> paramiko.Transport:
    """A paramiko client logged in to the embedded server with ``key``."""
    t = paramiko.Transport(socket.create_connection((HOST, port), timeout=WAIT))
    t.start_client(timeout=WAIT)
    t.auth_publickey("remsh", key)
    assert t.is_authenticated()
    return t


def test_shell_exec_pty_forwarding_and_passwords_are_refused(ssh_listener, keys, collection, caplog):
    """On the embedded server an authorized key gets no shell, command, pty, X11, agent or port forwarding."""
    caplog.set_level(logging.WARNING, logger="remsh")
    port = ssh_listener.port
    refusals = {
        "shell": lambda t: t.open_session().invoke_shell(),
        "exec": lambda t: t.open_session().exec_command("id"),
        "pty": lambda t: t.open_session().get_pty(),
        "x11": lambda t: t.open_session().request_x11(),
        "other subsystem": lambda t: t.open_session().invoke_subsystem("sftp"),
        "direct-tcpip": lambda t: t.open_channel("direct-tcpip", (HOST, port), (HOST, 0), timeout=WAIT),
        "remote forward": lambda t: t.request_port_forward(HOST, 0),
    }
    for what, attempt in refusals.items():
        t = _client(port, keys.gamma)
        try:
            with pytest.raises(paramiko.SSHException):
                attempt(t)
        finally:
            t.close()
    # agent forwarding asks for no reply: the server's log shows the refusal
    t = _client(port, keys.gamma)
    try:
        t.open_session().request_forward_agent(lambda chan: None)
        wait_until(lambda: "refused agent forwarding" in caplog.text, what="agent forwarding refusal")
        # a second session channel on the same connection is refused too
        with pytest.raises(paramiko.SSHException):
            t.open_session(timeout=WAIT)
    finally:
        t.close()
    # passwords are not a login method at all
    t = paramiko.Transport(socket.create_connection((HOST, port), timeout=WAIT))
    try:
        t.start_client(timeout=WAIT)
        with pytest.raises(paramiko.AuthenticationException):
            t.auth_password("remsh", "password")
        assert not t.is_authenticated()
    finally:
        t.close()
    assert collection.get_all_slaves() == []


def test_silent_and_stalled_connections_are_dropped_at_the_handshake_limit(keys, authorized_keys, collection,
                                                                           procs, tmp_path):
    """Junk, silence and a login that opens no channel each cost one connection; good slaves still register."""
    lst = _listener(keys, authorized_keys, collection, handshake_timeout=3.0)
    try:
        with socket.create_connection((HOST, lst.port), timeout=WAIT) as junk:
            junk.sendall(os.urandom(4096))
        silent = socket.create_connection((HOST, lst.port), timeout=WAIT)
        stalled = _client(lst.port, keys.gamma)
        start = time.monotonic()
        with silent:
            while silent.recv(4096):  # the server's banner, then end of stream
                pass
        wait_until(lambda: not stalled.is_active(), what="the stalled login to be dropped")
        assert time.monotonic() - start < 15
        stalled.close()
        kh = write_known_hosts(tmp_path / "kh", [(HOST, lst.port, keys.host)])
        p = start_ssh_slave(procs, "gamma", keys.gamma_path, lst.port, kh)
        assert collection.get_slave(True, named("gamma"), timeout=WAIT) is not None, procs.log_text(p)
    finally:
        lst.stop()


# -- liveness and the stream -----------------------------------------------------------------


def test_idle_slave_killed_leaves_the_collection(ssh_listener, known_hosts, keys, procs, collection):
    """With resume_timeout=0, an idle SSH slave killed with SIGKILL is noticed by the idle monitor and leaves
    the collection."""
    ssh_listener.resume_timeout = 0  # read at registration: this slave's work does not wait for it
    p = start_ssh_slave(procs, "gamma", keys.gamma_path, ssh_listener.port, known_hosts)
    slave = collection.get_slave(True, named("gamma"), timeout=WAIT)
    assert slave is not None, procs.log_text(p)
    slave.ping()
    p.send_signal(signal.SIGKILL)
    p.wait(WAIT)
    wait_until(lambda: collection.get_all_slaves() == [], timeout=15, what="the killed slave to leave")
    assert not slave.connected


def test_channel_stream_timeouts_select_and_end_of_stream(ssh_listener, known_hosts, keys):
    """The client stream: select sees data, recv honours timeout 0 and >0, and returns b'' when the master goes."""
    stream = ssh.connect_embedded("remsh", HOST, ssh_listener.port, identity=keys.alpha_path,
                                  known_hosts=known_hosts, timeout=WAIT)
    try:
        assert stream.identity is None and str(ssh_listener.port) in stream.peer
        readable, _, _ = select.select([stream], [], [], WAIT)
        assert readable == [stream]
        assert stream.recv(8, WAIT) == b"REMSH-M\n"
        with pytest.raises(TimeoutError):
            stream.recv(100, 0)
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            stream.recv(100, 0.2)
        assert 0.15 < time.monotonic() - start < 5
        ssh_listener.stop()  # drops the unfinished handshake
        assert stream.recv(100, WAIT) == b""
    finally:
        stream.close()
        stream.close()


def test_connect_embedded_raises_authentication_error_for_an_unpinned_host(ssh_listener, keys, tmp_path):
    """The library call itself refuses an unpinned host key with AuthenticationError naming the fingerprint."""
    kh = write_known_hosts(tmp_path / "kh", [])
    with pytest.raises(AuthenticationError, match=ssh.host_key_fingerprint(keys.host).replace("+", r"\+")):
        ssh.connect_embedded("remsh", HOST, ssh_listener.port, identity=keys.alpha_path, known_hosts=kh,
                             timeout=WAIT)


# -- the tunnel through a stock OpenSSH server -------------------------------------------------


@pytest.fixture(scope="module")
def sshd(keys: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """A real OpenSSH server on 127.0.0.1 that lets alpha's key log in."""
    require_sshd()
    d = tmp_path_factory.mktemp("sshd")
    ak = d / "authorized_keys"
    ak.write_text(f"{keys.alpha.get_name()} {keys.alpha.get_base64()} alpha\n")
    server = Sshd(d, ak).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def tcp_listener(collection: SimpleSlaveCollection) -> Iterator[TcpSlaveListener]:
    """A TCP listener bound to loopback only, with the shared secret."""
    lst = TcpSlaveListener(host=HOST, secret=SECRET, slave_collection=collection)
    lst.start()
    try:
        yield lst
    finally:
        lst.stop()


def start_tunnel_slave(procs: SlaveProcs, sshd: Sshd, keys: SimpleNamespace, tmp_path: Path, secret: bytes,
                       dest_port: int, name: str = "alpha") -> subprocess.Popen:
    kh = write_known_hosts(tmp_path / "kh-sshd", [(HOST, sshd.port, sshd.host_key)])
    return procs.start(["--ssh-client", "paramiko", "--via-ssh", f"{sshd.user}@{HOST}:{sshd.port}",
                        "--identity", str(keys.alpha_path),
                        "--known-hosts", str(kh), "--secret-file", str(secret_file(tmp_path, secret)),
                        "--no-reconnect", "-v", HOST, str(dest_port)], name=name)


def test_tunnel_through_openssh_registers(sshd, tcp_listener, keys, procs, collection, tmp_path):
    """Through a real sshd's direct-tcpip tunnel the slave registers with the TCP listener and answers."""
    p = start_tunnel_slave(procs, sshd, keys, tmp_path, SECRET, tcp_listener.port)
    slave = collection.get_slave(True, named("alpha"), timeout=WAIT)
    assert slave is not None, procs.log_text(p) + sshd.log_text()
    slave.ping()
    # the slave logs its registration after the master has made it
    wait_until(lambda: "via ssh" in procs.log_text(p), what="the slave to log its tunnel")


def test_tunnel_with_a_wrong_secret_is_refused(sshd, tcp_listener, keys, procs, collection, tmp_path):
    """The sshd lets the slave in, but the TCP listener still refuses a wrong shared secret: exit 2."""
    p = start_tunnel_slave(procs, sshd, keys, tmp_path, b"not the secret", tcp_listener.port)
    assert_refused(procs, p, collection, EXIT_AUTH, "auth-failed")


def test_tunnel_to_a_closed_port_is_unreachable(sshd, keys, procs, collection, tmp_path):
    """When sshd cannot open the tunnel the slave reports the master unreachable (exit 4)."""
    closed = socket.socket()
    closed.bind((HOST, 0))  # bound, not listening: connections are refused
    try:
        p = start_tunnel_slave(procs, sshd, keys, tmp_path, SECRET, closed.getsockname()[1])
        assert_refused(procs, p, collection, EXIT_UNREACHABLE, "could not open a tunnel")
    finally:
        closed.close()


# -- keys and files ------------------------------------------------------------------------------


def test_fingerprint_and_known_hosts_line_match_openssh(keys):
    """host_key_fingerprint matches ssh-keygen -l; known_hosts_line uses [host]:port except on port 22."""
    for name in ("alpha", "beta", "gamma"):
        path = getattr(keys, name + "_path")
        printed = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(path)], capture_output=True,
                                 text=True, check=True, timeout=WAIT).stdout.split()[1]
        assert ssh.host_key_fingerprint(getattr(keys, name)) == printed
        assert ssh.host_key_fingerprint(path) == printed
    key = keys.host
    assert ssh.known_hosts_line("h.example", 22, key) == f"h.example {key.get_name()} {key.get_base64()}"
    assert ssh.known_hosts_line("h.example", 2222, key).startswith("[h.example]:2222 ecdsa-sha2-nistp256 AAAA")


def test_authorized_keys_parsing_and_reloading(keys, tmp_path):
    """Comment = slave name; harmless options pass, others and nameless keys are skipped; edits apply at once."""
    a, b, g = (f"{k.get_name()} {k.get_base64()}" for k in (keys.alpha, keys.beta, keys.gamma))
    text = "\n".join([
        "# comment",
        "",
        f"{a} alpha",
        f'restrict,no-pty {b} beta',
        f'from="10.0.0.1,10.0.0.2",no-pty {g} gamma',
        f"{g}",
        f"{g} two words",
        "ssh-ed25519 !!!notbase64 delta",
        "garbage",
    ])
    entries, problems = ssh.parse_authorized_keys(text)
    assert [(e.keytype, e.name) for e in entries] == [("ssh-ed25519", "alpha"), ("ssh-rsa", "beta")]
    assert len(problems) == 5 and "'from'" in problems[0]

    path = tmp_path / "ak"
    path.write_text(f"{a} alpha\n")
    ak = ssh.AuthorizedKeys(path)
    assert ak.lookup(keys.alpha) == "alpha" and ak.lookup(keys.gamma) is None
    path.write_text(f"{g} gamma\n")
    assert ak.lookup(keys.alpha) is None and ak.lookup(keys.gamma) == "gamma"
    path.unlink()
    assert ak.lookup(keys.gamma) is None
