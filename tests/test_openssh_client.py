"""Slaves dialling out through the system's OpenSSH client (``ssh``).

Everything on 127.0.0.1: the master's embedded SSH server (paramiko) and
real OpenSSH ``sshd`` instances started by the tests (one the tunnel goes
through, one as a ``ProxyJump`` bastion), real ``remsh-slave`` processes
running the real ``ssh`` program.  Each slave is given an ``ssh``
configuration file of the test's own (``-F``), so that nothing of this
machine's ``~/.ssh`` takes part, and no agent (``SSH_AUTH_SOCK`` removed).

The stream itself is checked against the transport contract by the tests
of ``tests/test_stream_conformance.py``, imported below and run here over
this module's ``pair`` fixture (both forms, the ssh client's end).
"""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, List, Tuple

import paramiko
import pytest

from remsh.errors import AuthenticationError, Disconnected, UsageError
from remsh.master.slavecollection.simple import SimpleSlaveCollection
from remsh.master.slavelistener.ssh import SshSlaveListener
from remsh.master.slavelistener.tcp import TcpSlaveListener
from remsh.transports import openssh, ssh
from remsh.transports.base import SocketStream
from tests.sshd import HOST, WAIT, SlaveProcs, Sshd, make_key, require_sshd, wait_until, write_known_hosts
from tests.test_stream_conformance import (Pair, test_a_short_read_leaves_the_rest_announced_and_close_drops_it,
                                           test_abort_wakes_a_blocked_recv_and_the_peer_sees_the_end_at_once,
                                           test_attributes_and_protocol_members, test_close_wakes_a_blocked_recv,
                                           test_end_of_stream_after_the_data, test_fileno_readable_when_data_arrives,
                                           test_peer_vanishing_wakes_a_blocked_recv,
                                           test_recv_into_fills_the_buffer_start,
                                           test_recv_returns_at_most_size_as_soon_as_data_is_there,
                                           test_recv_time_limits, test_send_and_receive_in_order,
                                           test_sending_to_a_vanished_peer_raises_oserror,
                                           test_shutdown_wakes_a_blocked_recv)

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(openssh.find_ssh() is None and not os.environ.get("CI"),
                                 reason="the OpenSSH client (ssh) is not installed")]

SECRET = b"openssh client tests shared secret"
EXIT_AUTH = 2
EXIT_UNREACHABLE = 4

# the stream contract, over this module's pairs (see the module docstring)
CONTRACT = (test_attributes_and_protocol_members, test_send_and_receive_in_order,
            test_recv_returns_at_most_size_as_soon_as_data_is_there, test_recv_into_fills_the_buffer_start,
            test_recv_time_limits, test_fileno_readable_when_data_arrives, test_end_of_stream_after_the_data,
            test_shutdown_wakes_a_blocked_recv, test_abort_wakes_a_blocked_recv_and_the_peer_sees_the_end_at_once,
            test_close_wakes_a_blocked_recv, test_peer_vanishing_wakes_a_blocked_recv,
            test_sending_to_a_vanished_peer_raises_oserror,
            test_a_short_read_leaves_the_rest_announced_and_close_drops_it)


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ssh-agent for this test or the slaves it starts: keys come from files only."""
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The embedded server's host key, another host key, the slave's key and a stranger's."""
    d = tmp_path_factory.mktemp("keys")
    k = SimpleNamespace(dir=d)
    for name, kind in [("host", "ecdsa"), ("other_host", "ecdsa"), ("alpha", "ed25519"), ("stranger", "ecdsa")]:
        path = d / name
        setattr(k, name, make_key(kind, path))
        setattr(k, name + "_path", path)
    return k


def _sshd(keys: SimpleNamespace, directory: Path) -> Sshd:
    authorized = directory / "authorized_keys"
    directory.mkdir(parents=True, exist_ok=True)
    authorized.write_text(f"{keys.alpha.get_name()} {keys.alpha.get_base64()} alpha\n")
    return Sshd(directory / "server", authorized).start()


@pytest.fixture(scope="module")
def sshd(keys: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """An OpenSSH server on 127.0.0.1 that lets alpha's key in (the tunnel goes through it)."""
    require_sshd()
    server = _sshd(keys, tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def jump(keys: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """A second OpenSSH server on 127.0.0.1, used as the ProxyJump bastion."""
    require_sshd()
    server = _sshd(keys, tmp_path_factory.mktemp("jump"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def collection() -> SimpleSlaveCollection:
    return SimpleSlaveCollection()


@pytest.fixture
def ssh_listener(keys: SimpleNamespace, tmp_path: Path, collection: SimpleSlaveCollection
                 ) -> Iterator[SshSlaveListener]:
    """The master's embedded SSH server on 127.0.0.1; alpha's key registers as alpha."""
    authorized = tmp_path / "authorized_keys"
    authorized.write_text(ssh.authorized_keys_line(keys.alpha, "alpha") + "\n")
    lst = SshSlaveListener(host=HOST, host_key=keys.host_path, authorized_keys=authorized,
                           slave_collection=collection)
    lst.start()
    try:
        yield lst
    finally:
        lst.stop()


@pytest.fixture
def tcp_listener(collection: SimpleSlaveCollection) -> Iterator[TcpSlaveListener]:
    """The master's TCP listener on loopback, with the shared secret (the tunnel's end)."""
    lst = TcpSlaveListener(host=HOST, secret=SECRET, slave_collection=collection)
    lst.start()
    try:
        yield lst
    finally:
        lst.stop()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[SlaveProcs]:
    p = SlaveProcs(tmp_path / "slaves")
    try:
        yield p
    finally:
        p.close()


def private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.fixture
def ssh_config(tmp_path: Path) -> Path:
    """An empty ssh configuration file (instead of ~/.ssh/config)."""
    return private(tmp_path / "ssh_config", "")


def secret_file(tmp_path: Path, secret: bytes = SECRET) -> Path:
    path = tmp_path / "secret"
    path.write_bytes(secret)
    path.chmod(0o600)
    return path


def start_embedded(procs: SlaveProcs, port: object, identity: Path, known_hosts: Path, config: Path,
                   *extra: str, host: str = HOST, name: str = "alpha") -> "subprocess.Popen[bytes]":
    """remsh-slave --ssh through the system's ssh."""
    return procs.start(["--ssh-client", "openssh", "--ssh", f"remsh@{host}" + (f":{port}" if port else ""),
                        "-F", str(config), "--identity", str(identity), "--known-hosts", str(known_hosts),
                        "--no-reconnect", "-v", *extra], name=name)


def start_tunnel(procs: SlaveProcs, target: str, dest_port: int, tmp_path: Path, known_hosts: Path, config: Path,
                 identity: Path, *extra: str) -> "subprocess.Popen[bytes]":
    """remsh-slave --via-ssh through the system's ssh."""
    return procs.start(["--ssh-client", "openssh", "--via-ssh", target, "-F", str(config),
                        "--identity", str(identity), "--known-hosts", str(known_hosts),
                        "--secret-file", str(secret_file(tmp_path)), "--no-reconnect", "-v", *extra,
                        HOST, str(dest_port)], name="alpha")


def named(name: str) -> Callable[[Any], bool]:
    return lambda s: s.name == name


def registered(procs: SlaveProcs, p: "subprocess.Popen[bytes]", collection: SimpleSlaveCollection,
               *logs: Callable[[], str]) -> Any:
    slave = collection.get_slave(True, named("alpha"), timeout=WAIT)
    assert slave is not None, procs.log_text(p) + "".join(f() for f in logs)
    return slave


def ssh_children(pid: int) -> List[List[str]]:
    """The command lines of ``pid``'s child processes that run ssh."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[:-1]
            except OSError:
                continue
            if argv and os.path.basename(argv[0]) == b"ssh":
                found.append([a.decode() for a in argv])
    return found


def assert_refused(procs: SlaveProcs, p: "subprocess.Popen[bytes]", collection: SimpleSlaveCollection,
                   status: int, *in_log: str) -> str:
    """The slave exited with ``status``, said each of ``in_log``, and nothing registered."""
    rc = procs.wait(p)
    text = procs.log_text(p)
    assert rc == status, text
    for expected in in_log:
        assert expected in text, text
    assert collection.get_all_slaves() == []
    return text


# -- both forms through the system client ----------------------------------------------------


def test_slave_registers_through_ssh_s_remsh_on_the_embedded_server(ssh_listener, keys, procs, collection,
                                                                    tmp_path, ssh_config):
    """remsh-slave --ssh runs `ssh ... -s remsh` (BatchMode, strict host keys, no secret in argv), registers and answers."""
    kh = write_known_hosts(tmp_path / "kh", [(HOST, ssh_listener.port, keys.host)])
    p = start_embedded(procs, ssh_listener.port, keys.alpha_path, kh, ssh_config)
    slave = registered(procs, p, collection)
    # the master sees OpenSSH's client, not paramiko's
    assert "OpenSSH" in slave.wire.stream.transport.remote_version
    assert slave.wire.stream.identity == "alpha"
    slave.ping()
    out: List[bytes] = []
    assert slave.execute(["echo", "through openssh"], stdout_cb=out.append) == 0
    assert b"".join(out) == b"through openssh\n"
    (argv,) = ssh_children(p.pid)
    assert argv[-3:] == ["-s", HOST, "remsh"]
    for option in ("BatchMode=yes", "StrictHostKeyChecking=yes", f"UserKnownHostsFile={kh}", "IdentitiesOnly=yes"):
        assert option in argv
    assert argv[argv.index("-F") + 1] == str(ssh_config)
    # stop() closes the connection cleanly: the slave exits 0 and its ssh is reaped
    ssh_listener.stop()
    assert procs.wait(p) == 0, procs.log_text(p)


def test_slave_tunnels_through_sshd_with_ssh_w(sshd, tcp_listener, keys, procs, collection, tmp_path, ssh_config):
    """remsh-slave --via-ssh runs `ssh -W` through a real sshd to the TCP listener, registers with the secret and answers."""
    kh = write_known_hosts(tmp_path / "kh", [(HOST, sshd.port, sshd.host_key)])
    p = start_tunnel(procs, f"{sshd.user}@{HOST}:{sshd.port}", tcp_listener.port, tmp_path, kh, ssh_config,
                     keys.alpha_path)
    slave = registered(procs, p, collection, sshd.log_text)
    slave.ping()
    (argv,) = ssh_children(p.pid)
    assert argv[-3:] == ["-W", f"{HOST}:{tcp_listener.port}", HOST]
    assert SECRET.decode() not in " ".join(argv)
    wait_until(lambda: "via ssh" in procs.log_text(p) and "(openssh)" in procs.log_text(p),
               what="the slave to log its tunnel")


def test_tunnel_through_a_proxyjump_bastion(sshd, jump, tcp_listener, keys, procs, collection, tmp_path):
    """A host alias with ProxyJump in the -F file: the slave reaches the TCP listener through two sshds."""
    kh_jump = write_known_hosts(tmp_path / "kh_jump", [(HOST, jump.port, jump.host_key)])
    kh = write_known_hosts(tmp_path / "kh", [(HOST, sshd.port, sshd.host_key)])
    config = private(tmp_path / "ssh_config", "\n".join([
        "Host bastion",
        f"  HostName {HOST}",
        f"  Port {jump.port}",
        f"  User {jump.user}",
        f"  IdentityFile {keys.alpha_path}",
        "  IdentitiesOnly yes",
        f"  UserKnownHostsFile {kh_jump}",
        "  StrictHostKeyChecking yes",
        "  BatchMode yes",
        "Host inner",
        f"  HostName {HOST}",
        f"  Port {sshd.port}",
        "  ProxyJump bastion",
        "",
    ]))
    logins_before = jump.log_text().count("Accepted publickey")
    p = start_tunnel(procs, f"{sshd.user}@inner", tcp_listener.port, tmp_path, kh, config, keys.alpha_path)
    slave = registered(procs, p, collection, sshd.log_text, jump.log_text)
    slave.ping()
    # the bastion saw a login, and the inner sshd a connection from loopback
    assert jump.log_text().count("Accepted publickey") == logins_before + 1
    # no port on the command line: the alias's Port applies
    (argv,) = ssh_children(p.pid)
    assert "-p" not in argv and argv[-1] == "inner"


def test_embedded_server_through_a_proxyjump_bastion(jump, ssh_listener, keys, procs, collection, tmp_path):
    """ProxyJump also carries the subsystem form: the slave reaches the embedded server through an sshd."""
    kh_jump = write_known_hosts(tmp_path / "kh_jump", [(HOST, jump.port, jump.host_key)])
    kh = write_known_hosts(tmp_path / "kh", [(HOST, ssh_listener.port, keys.host)])
    config = private(tmp_path / "ssh_config", "\n".join([
        "Host bastion",
        f"  HostName {HOST}",
        f"  Port {jump.port}",
        f"  User {jump.user}",
        f"  IdentityFile {keys.alpha_path}",
        f"  UserKnownHostsFile {kh_jump}",
        "Host master",
        f"  HostName {HOST}",
        f"  Port {ssh_listener.port}",
        "  ProxyJump bastion",
        "",
    ]))
    p = start_embedded(procs, None, keys.alpha_path, kh, config, host="master")
    slave = registered(procs, p, collection, jump.log_text)
    slave.ping()
    assert "Accepted publickey" in jump.log_text()


# -- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["embedded", "tunnel"])
def test_changed_host_key_is_refused(form, sshd, ssh_listener, tcp_listener, keys, procs, collection, tmp_path,
                                     ssh_config):
    """A host key that differs from the pinned one ends the attempt (exit 2) with both fingerprints' story; nothing is added."""
    if form == "embedded":
        port, real = ssh_listener.port, keys.host
        kh = write_known_hosts(tmp_path / "kh", [(HOST, port, keys.other_host)])
        p = start_embedded(procs, port, keys.alpha_path, kh, ssh_config)
    else:
        port, real = sshd.port, sshd.host_key
        kh = write_known_hosts(tmp_path / "kh", [(HOST, port, keys.other_host)])
        p = start_tunnel(procs, f"{sshd.user}@{HOST}:{port}", tcp_listener.port, tmp_path, kh, ssh_config,
                         keys.alpha_path)
    before = kh.read_text()
    text = assert_refused(procs, p, collection, EXIT_AUTH, "HOST KEY CHANGED", ssh.host_key_fingerprint(real))
    assert str(kh) in text
    assert kh.read_text() == before


def test_unknown_host_key_is_refused_with_its_fingerprint(ssh_listener, keys, procs, collection, tmp_path,
                                                           ssh_config):
    """A server whose key is not pinned for [host]:port is refused (exit 2); the message gives its fingerprint; nothing added."""
    kh = write_known_hosts(tmp_path / "kh", [(HOST, ssh_listener.port + 1, keys.host)])
    before = kh.read_text()
    p = start_embedded(procs, ssh_listener.port, keys.alpha_path, kh, ssh_config)
    assert_refused(procs, p, collection, EXIT_AUTH, "is unknown", ssh.host_key_fingerprint(keys.host))
    assert kh.read_text() == before


def test_key_needing_a_passphrase_fails_at_once(ssh_listener, keys, procs, collection, tmp_path, ssh_config):
    """An encrypted identity (no agent) fails within seconds, never prompting, with a message that names the agent."""
    encrypted = tmp_path / "id_encrypted"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "a passphrase", "-C", "alpha", "-f", str(encrypted)],
                   check=True, stdin=subprocess.DEVNULL, timeout=WAIT)
    assert openssh.key_needs_passphrase(encrypted)
    # the server would accept the key: only the passphrase stands in the way
    public = encrypted.with_suffix(".pub").read_text().split()
    with open(tmp_path / "authorized_keys", "a") as f:  # the listener's file, read at every login
        f.write(f"{public[0]} {public[1]} alpha\n")
    kh = write_known_hosts(tmp_path / "kh", [(HOST, ssh_listener.port, keys.host)])
    start = time.monotonic()
    p = start_embedded(procs, ssh_listener.port, encrypted, kh, ssh_config)
    assert_refused(procs, p, collection, EXIT_AUTH, "needs a passphrase", "BatchMode=yes", "ssh-agent")
    assert time.monotonic() - start < 15


def test_refused_key_names_its_fingerprint(ssh_listener, keys, procs, collection, tmp_path, ssh_config):
    """A key the server does not list ends the attempt with exit 2, naming the key's fingerprint."""
    kh = write_known_hosts(tmp_path / "kh", [(HOST, ssh_listener.port, keys.host)])
    p = start_embedded(procs, ssh_listener.port, keys.stranger_path, kh, ssh_config)
    assert_refused(procs, p, collection, EXIT_AUTH, "refused key", ssh.host_key_fingerprint(keys.stranger))


def test_tunnel_to_a_closed_port_is_unreachable(sshd, keys, procs, collection, tmp_path, ssh_config):
    """When sshd cannot open the tunnel the slave says so and exits 4 (master unreachable)."""
    kh = write_known_hosts(tmp_path / "kh", [(HOST, sshd.port, sshd.host_key)])
    with socket.socket() as closed:
        closed.bind((HOST, 0))  # bound, not listening: connections are refused
        p = start_tunnel(procs, f"{sshd.user}@{HOST}:{sshd.port}", closed.getsockname()[1], tmp_path, kh,
                         ssh_config, keys.alpha_path)
        assert_refused(procs, p, collection, EXIT_UNREACHABLE, "could not open a tunnel", "Connection refused")


def test_sshd_port_is_not_a_remsh_subsystem(sshd, keys, procs, collection, tmp_path, ssh_config):
    """--ssh pointed at a stock sshd (no remsh subsystem) fails with a message saying so, exit 4."""
    kh = write_known_hosts(tmp_path / "kh", [(HOST, sshd.port, sshd.host_key)])
    p = procs.start(["--ssh-client", "openssh", "--ssh", f"{sshd.user}@{HOST}:{sshd.port}", "-F", str(ssh_config),
                     "--identity", str(keys.alpha_path), "--known-hosts", str(kh), "--no-reconnect"], name="alpha")
    assert_refused(procs, p, collection, EXIT_UNREACHABLE, "remsh subsystem")


def test_paramiko_client_remains_and_refuses_an_openssh_config(ssh_listener, keys, procs, collection, tmp_path,
                                                               ssh_config):
    """--ssh-client paramiko still registers (no ssh child); -F with paramiko is a usage error (exit 2)."""
    kh = write_known_hosts(tmp_path / "kh", [(HOST, ssh_listener.port, keys.host)])
    common = ["--ssh-client", "paramiko", "--ssh", f"remsh@{HOST}:{ssh_listener.port}", "--identity",
              str(keys.alpha_path), "--known-hosts", str(kh), "--no-reconnect"]
    p = procs.start([*common, "-F", str(ssh_config)], name="alpha")
    assert_refused(procs, p, collection, EXIT_AUTH, "-F applies to the OpenSSH client only")
    p = procs.start(common, name="alpha")
    slave = registered(procs, p, collection)
    assert "paramiko" in slave.wire.stream.transport.remote_version
    assert ssh_children(p.pid) == []


# -- the library calls -----------------------------------------------------------------------


def test_command_line_escapes_file_names_and_never_prompts(tmp_path):
    """ssh_command: BatchMode and strict host keys always; %-escaped, quoted file names; port and -F only when given."""
    odd = tmp_path / "dir with space" / "kh%d"
    argv = openssh.ssh_command("u", "h", None, known_hosts=odd, identity=tmp_path / "id%u", program="ssh")
    assert argv[0] == "ssh" and argv[-3:] == ["-s", "h", "remsh"] and argv[argv.index("-l") + 1] == "u"
    assert f"Ciphers=^{openssh.EMBEDDED_CIPHERS}" in argv
    assert "BatchMode=yes" in argv and "StrictHostKeyChecking=yes" in argv and "UpdateHostKeys=no" in argv
    assert f'UserKnownHostsFile="{str(odd).replace("%", "%%")}"' in argv
    assert argv[argv.index("-i") + 1] == str(tmp_path / "id%%u")
    assert "-p" not in argv and "-F" not in argv
    argv = openssh.ssh_command("u", "::1", 2222, config=tmp_path / "cfg", tunnel_to=("::1", 7), program="ssh")
    assert argv[argv.index("-p") + 1] == "2222" and argv[argv.index("-F") + 1] == str(tmp_path / "cfg")
    assert argv[-3:] == ["-W", "[::1]:7", "::1"] and "-i" not in argv and "IdentitiesOnly=yes" not in argv
    assert not any(a.startswith("Ciphers=") for a in argv)  # a stock sshd: OpenSSH's own choice
    for bad in ("-oProxyCommand=x", "a b", ""):
        with pytest.raises(UsageError, match="invalid SSH"):
            openssh.ssh_command("u", bad)


def test_key_needs_passphrase_reads_openssh_and_pem_keys(keys, tmp_path):
    """Encrypted OpenSSH-format and PEM keys are recognised; plain ones and non-keys are not."""
    assert not openssh.key_needs_passphrase(keys.alpha_path)  # OpenSSH format, ssh-keygen
    assert not openssh.key_needs_passphrase(keys.host_path)  # PEM, paramiko
    pem = tmp_path / "pem_encrypted"
    paramiko.ECDSAKey.generate().write_private_key_file(str(pem), password="pw")
    assert openssh.key_needs_passphrase(pem)
    new = tmp_path / "new_encrypted"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-N", "pw", "-f", str(new)], check=True,
                   stdin=subprocess.DEVNULL, timeout=WAIT)
    assert openssh.key_needs_passphrase(new)
    assert not openssh.key_needs_passphrase(tmp_path / "missing")
    assert not openssh.key_needs_passphrase(private(tmp_path / "junk", "-----BEGIN OPENSSH PRIVATE KEY-----\n!!\n"))


def test_connect_raises_remsh_errors(ssh_listener, keys, tmp_path, ssh_config):
    """connect_embedded raises AuthenticationError for a changed key or missing file, Disconnected for a closed port."""
    kh = write_known_hosts(tmp_path / "kh", [(HOST, ssh_listener.port, keys.other_host)])
    with pytest.raises(AuthenticationError, match="HOST KEY CHANGED"):
        openssh.connect_embedded("remsh", HOST, ssh_listener.port, identity=keys.alpha_path, known_hosts=kh,
                                 config=ssh_config, timeout=WAIT)
    with pytest.raises(AuthenticationError, match="cannot read known hosts file"):
        openssh.connect_embedded("remsh", HOST, ssh_listener.port, identity=keys.alpha_path,
                                 known_hosts=tmp_path / "missing", config=ssh_config, timeout=WAIT)
    with socket.socket() as closed:
        closed.bind((HOST, 0))
        with pytest.raises(Disconnected, match="Connection refused"):
            openssh.connect_embedded("remsh", HOST, closed.getsockname()[1], identity=keys.alpha_path,
                                     known_hosts=kh, config=ssh_config, timeout=WAIT)


def test_close_reaps_ssh_and_abort_kills_it(ssh_listener, keys, tmp_path, ssh_config):
    """close() leaves no ssh process behind (reaped); abort() kills ssh so the server sees the end at once."""
    kh = write_known_hosts(tmp_path / "kh", [(HOST, ssh_listener.port, keys.host)])
    stream = openssh.connect_embedded("remsh", HOST, ssh_listener.port, identity=keys.alpha_path, known_hosts=kh,
                                      config=ssh_config, timeout=WAIT)
    pid = stream.proc.pid
    stream.abort()
    assert stream.recv(100, WAIT) in (b"", b"REMSH-M\n")
    stream.close()
    stream.close()
    assert stream.proc.returncode is not None
    assert not os.path.exists(f"/proc/{pid}") or "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


# -- the stream contract, over both forms ----------------------------------------------------


class Servers:
    """An embedded SSH server handing over its channels, made on first use."""

    def __init__(self, keys: SimpleNamespace, workdir: Path) -> None:
        self.keys = keys
        self.workdir = workdir
        self.accepted: "queue.Queue[Any]" = queue.Queue()
        authorized = workdir / "authorized_keys"
        authorized.write_text(ssh.authorized_keys_line(keys.alpha, "alpha") + "\n")
        self.server = ssh.SshServer(self._hand_over, host_key=keys.host, authorized_keys=authorized, host=HOST)
        self.server.start()
        self.known_hosts = write_known_hosts(workdir / "kh", [(HOST, self.server.port, keys.host)])
        self.config = private(workdir / "ssh_config", "")

    def _hand_over(self, stream: Any) -> None:
        stream.send_all(b"!")  # the first byte the client waits for
        self.accepted.put(stream)

    def accepted_stream(self) -> Any:
        try:
            return self.accepted.get(timeout=WAIT)
        except queue.Empty:
            pytest.fail(f"no connection accepted within {WAIT:g} s")


def _first_byte(stream: Any) -> Any:
    assert stream.recv(1, WAIT) == b"!"
    return stream


def embedded_pair(servers: Servers, sshd: Sshd) -> Tuple[Any, Any]:
    near = openssh.connect_embedded("remsh", HOST, servers.server.port, identity=servers.keys.alpha_path,
                                    known_hosts=servers.known_hosts, config=servers.config, timeout=WAIT)
    return _first_byte(near), servers.accepted_stream()


def tunnel_pair(servers: Servers, sshd: Sshd) -> Tuple[Any, Any]:
    kh = write_known_hosts(servers.workdir / "kh_sshd", [(HOST, sshd.port, sshd.host_key)])
    accepted: "queue.Queue[socket.socket]" = queue.Queue()
    with socket.create_server((HOST, 0)) as listening:
        listening.settimeout(WAIT)

        def accept() -> None:
            sock, _ = listening.accept()
            sock.sendall(b"!")
            accepted.put(sock)

        t = threading.Thread(target=accept, daemon=True)
        t.start()
        near = openssh.connect_via(sshd.user, HOST, sshd.port, dest_host=HOST, dest_port=listening.getsockname()[1],
                                   identity=servers.keys.alpha_path, known_hosts=kh, config=servers.config,
                                   timeout=WAIT)
        t.join(WAIT)
    sock = accepted.get(timeout=WAIT)
    sock.settimeout(None)
    return _first_byte(near), SocketStream(sock, peer="tunnel end", send_timeout=None)


PAIRS = {"embedded": embedded_pair, "tunnel": tunnel_pair}


@pytest.fixture(scope="module")
def servers(keys: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    s = Servers(keys, tmp_path_factory.mktemp("contract"))
    try:
        yield s
    finally:
        s.server.stop()


@pytest.fixture(params=list(PAIRS), ids=[f"openssh-{name}" for name in PAIRS])
def pair(request: pytest.FixtureRequest, servers: Servers, sshd: Sshd) -> Iterator[Pair]:
    """A connected pair through the system's ssh; ``near`` (under test) is the ssh client's end.

    (The far ends, the embedded server's channel and a TCP socket, are
    checked by tests/test_stream_conformance.py.)"""
    near, far = PAIRS[request.param](servers, sshd)
    try:
        yield Pair(near, far)
    finally:
        near.close()
        far.close()


def test_contract_is_run_here() -> None:
    """Every test of the stream contract is collected in this module too (over the openssh pairs)."""
    here = globals()
    assert all(here.get(t.__name__) is t for t in CONTRACT)
    from tests import test_stream_conformance as conformance
    names = {n for n in dir(conformance) if n.startswith("test_")}
    assert names == {t.__name__ for t in CONTRACT}, "a new contract test: import it here"
