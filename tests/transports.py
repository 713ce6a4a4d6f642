"""Every transport behind one fixture, so that each operation test runs over
each of them.

A :class:`Transport` knows how to bring up the master's side of one way of
connecting (a listener, and whatever it needs: TLS certificates, SSH host
and client keys, an OpenSSH ``sshd``) and how to start one slave that
registers through it.  :data:`TRANSPORTS` lists them; a new transport is
covered by every conformance test once a class for it is added there.

The expensive parts are shared by the whole test session: each transport is
opened the first time a test asks for it (by :class:`TransportPool`) and
closed at the end.  Slaves are not shared: every test gets a fresh slave
process rooted at a fresh base directory, so no test can see what another
left behind (a slave starts in well under 0.2 s on every transport).

Fixtures (registered in ``tests/conftest.py``):

``any_transport``
    parametrised over :data:`TRANSPORTS` (one test item per transport); a
    :class:`TransportUnderTest` whose :meth:`~TransportUnderTest.start`
    starts slaves over it (``env`` sets or, with ``None``, removes variables
    in the slave's environment) and stops them all at teardown.
``any_slave``
    ``any_transport.start(basedir)``: a :class:`Connected` slave rooted at
    the test's ``basedir``.

Marking: a test decorated ``@pytest.mark.slow_over("ssh", ...)`` has those
transports' items marked ``slow`` (``-m "not slow"`` leaves them out), so a
quick run still covers every transport with the test's smaller relatives.
``slow_over()`` with no names marks every transport but ``local``.
"""

from __future__ import annotations

import datetime
import ipaddress
import itertools
import os
import shutil
import ssl
import threading
import time
from pathlib import Path
from typing import Callable, ClassVar, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Set, Type

import paramiko
import pytest

from remsh.master.slave import Slave
from remsh.master.slavecollection.simple import SimpleSlaveCollection
from remsh.master.slavelistener.base import SlaveListener
from remsh.master.slavelistener.local import LocalSlaveListener
from remsh.master.slavelistener.ssh import SshSlaveListener
from remsh.master.slavelistener.tcp import TcpSlaveListener
from remsh.transports import ssh
from tests.slaveproc import HOST, SECRET, WAIT, SlaveProcess, SlaveProcesses

from tests.sshd import Sshd, make_key, require_sshd, write_known_hosts
from tests.util import environment

#: The network listeners keep sessions (work survives a dropped connection),
#: so every operation test runs over them; a slave that dies is given up on
#: after this long.
RESUME_TIMEOUT = 2.0

# -- a throwaway PKI (TLS) ---------------------------------------------------------


class Pki(NamedTuple):
    """PEM files of a test PKI: the CA, an unrelated CA, and the master's certificate and key."""

    ca: Path  # the CA that signed the server certificate
    other_ca: Path  # a CA that signed nothing here
    cert: Path
    key: Path


def make_pki(directory: Path) -> Pki:
    """Write a CA, another CA and a server certificate for 127.0.0.1/localhost into ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    now = datetime.datetime.now(datetime.timezone.utc)

    def make_ca(common_name: str):  # type: ignore[no-untyped-def]
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(common_name))
            .issuer_name(name(common_name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return key, cert

    ca_key, ca_cert = make_ca("remsh test CA")
    _, other_cert = make_ca("some other CA")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("remsh test master"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address(HOST))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    paths = Pki(directory / "ca.pem", directory / "other-ca.pem", directory / "server.pem", directory / "server.key")
    paths.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.other_ca.write_bytes(other_cert.public_bytes(serialization.Encoding.PEM))
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    paths.key.chmod(0o600)
    return paths


def server_context(pki: Pki) -> ssl.SSLContext:
    """The master's TLS context for ``pki``."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(pki.cert), str(pki.key))
    return ctx


def client_context(pki: Pki) -> ssl.SSLContext:
    """A slave's TLS context trusting ``pki``'s CA."""
    return ssl.create_default_context(cafile=str(pki.ca))


# -- the transports ------------------------------------------------------------------


def wait_registered(collection: SimpleSlaveCollection, name: str, proc: Optional[SlaveProcess],
                    timeout: float = WAIT, why: Callable[[], str] = str) -> Slave:
    """The slave registered as ``name``; fails with the slave's log if it does not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        slave = collection.get_slave(True, lambda s: s.name == name,
                                     timeout=min(0.5, max(0.0, deadline - time.monotonic())))
        if slave is not None:
            return slave
        if (proc is not None and proc.poll() is not None) or time.monotonic() >= deadline:
            log = proc.log_text() if proc is not None else ""
            pytest.fail(f"slave {name} did not register within {timeout:g} s\n{log}\n{why()}")


class Transport:
    """One way for a slave to reach the master, shared by the session.

    :meth:`open` brings up the master's side; :meth:`start` starts one
    slave through it and returns the master's object for it, registered;
    :meth:`close` ends it all.  ``collection`` holds every slave registered
    through this transport.
    """

    name: ClassVar[str]

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.collection = SimpleSlaveCollection()
        self.listener: Optional[SlaveListener] = None

    def open(self) -> None:
        raise NotImplementedError

    def start(self, procs: SlaveProcesses, basedir: Path, name: str,
              env: Mapping[str, Optional[str]]) -> Slave:
        raise NotImplementedError

    def close(self) -> None:
        if self.listener is not None:
            self.listener.stop()


class LocalTransport(Transport):
    """A child process of the master over a socket pair."""

    name = "local"

    def open(self) -> None:
        self.listener = LocalSlaveListener(slave_collection=self.collection)

    def start(self, procs: SlaveProcesses, basedir: Path, name: str,
              env: Mapping[str, Optional[str]]) -> Slave:
        assert isinstance(self.listener, LocalSlaveListener)
        # the child inherits the master's environment: change it around the spawn
        with environment({os.fsencode(k): None if v is None else os.fsencode(v) for k, v in env.items()}):
            return self.listener.start_slave(str(basedir), name)


class TcpTransport(Transport):
    """A ``remsh-slave`` process dialling a TCP listener with the shared secret."""

    name = "tcp"

    def _context(self) -> Optional[ssl.SSLContext]:
        return None

    def open(self) -> None:
        listener = TcpSlaveListener(port=0, host=HOST, secret=SECRET, ssl_context=self._context(),
                                    resume_timeout=RESUME_TIMEOUT,
                                    slave_collection=self.collection)
        listener.start()
        self.listener = listener

    def slave_args(self) -> Dict[str, object]:
        return {}

    def start(self, procs: SlaveProcesses, basedir: Path, name: str,
              env: Mapping[str, Optional[str]]) -> Slave:
        assert isinstance(self.listener, TcpSlaveListener)
        proc = procs.start(self.listener.port, name, basedir=basedir, no_reconnect=True, env=env,
                           **self.slave_args())  # type: ignore[arg-type]
        return wait_registered(self.collection, name, proc)


class TlsTransport(TcpTransport):
    """A ``remsh-slave --tls-ca`` process dialling a TLS listener."""

    name = "tls"

    def open(self) -> None:
        self.pki = make_pki(self.workdir / "pki")
        super().open()

    def _context(self) -> ssl.SSLContext:
        return server_context(self.pki)

    def slave_args(self) -> Dict[str, object]:
        return {"tls_ca": self.pki.ca}


class SshTransport(Transport):
    """A ``remsh-slave --ssh`` process logging in to the master's embedded SSH server.

    Each slave gets a key of its own, listed under its name in the
    ``authorized_keys`` file (which the server reads at every login).
    """

    name = "ssh"

    def open(self) -> None:
        self.host_key = paramiko.ECDSAKey.generate()
        self.authorized_keys = self.workdir / "authorized_keys"
        self.authorized_keys.write_text("")
        self.keys = self.workdir / "keys"
        self.keys.mkdir()
        listener = SshSlaveListener(host=HOST, host_key=self.host_key, authorized_keys=self.authorized_keys,
                                    resume_timeout=RESUME_TIMEOUT,
                                    slave_collection=self.collection)
        listener.start()
        self.listener = listener
        self.known_hosts = write_known_hosts(self.workdir / "known_hosts", [(HOST, listener.port, self.host_key)])

    def start(self, procs: SlaveProcesses, basedir: Path, name: str,
              env: Mapping[str, Optional[str]]) -> Slave:
        assert isinstance(self.listener, SshSlaveListener)
        key = paramiko.ECDSAKey.generate()
        key_path = self.keys / name
        key.write_private_key_file(str(key_path))
        with open(self.authorized_keys, "a") as f:
            f.write(ssh.authorized_keys_line(key, name) + "\n")
        proc = procs.start(None, name, basedir=basedir, secret=None, no_reconnect=True, env=env,
                           extra_args=[*self.client_args(),
                                       "--ssh", f"remsh@{HOST}:{self.listener.port}", "--identity", str(key_path),
                                       "--known-hosts", str(self.known_hosts)])
        return wait_registered(self.collection, name, proc)

    def client_args(self) -> List[str]:
        """How the slave dials the embedded server: with paramiko here."""
        return ["--ssh-client", "paramiko"]


class OpenSshClientTransport(SshTransport):
    """A ``remsh-slave --ssh --ssh-client openssh`` process: the system's
    ``ssh`` program logging in to the master's embedded SSH server (with an
    empty ``-F`` configuration, so nothing of this machine's ``~/.ssh``
    takes part)."""

    name = "openssh-client"

    def open(self) -> None:
        if shutil.which("ssh") is None:
            pytest.skip("the OpenSSH client (ssh) is not installed")
        super().open()
        self.ssh_config = self.workdir / "ssh_config"
        self.ssh_config.write_text("")
        self.ssh_config.chmod(0o600)

    def client_args(self) -> List[str]:
        return ["--ssh-client", "openssh", "-F", str(self.ssh_config)]


class OpenSshTransport(Transport):
    """A ``remsh-slave --via-ssh`` process reaching a TCP listener through a
    ``direct-tcpip`` tunnel opened by a real OpenSSH ``sshd``."""

    name = "openssh"

    def open(self) -> None:
        require_sshd()
        self.identity = self.workdir / "id_ed25519"
        key = make_key("ed25519", self.identity)
        authorized = self.workdir / "authorized_keys"
        authorized.write_text(f"{key.get_name()} {key.get_base64()} remsh-test\n")
        self.sshd = Sshd(self.workdir / "sshd", authorized).start()
        self.known_hosts = write_known_hosts(self.workdir / "known_hosts",
                                             [(HOST, self.sshd.port, self.sshd.host_key)])
        listener = TcpSlaveListener(port=0, host=HOST, secret=SECRET, slave_collection=self.collection,
                                    resume_timeout=RESUME_TIMEOUT)
        listener.start()
        self.listener = listener

    def start(self, procs: SlaveProcesses, basedir: Path, name: str,
              env: Mapping[str, Optional[str]]) -> Slave:
        assert isinstance(self.listener, TcpSlaveListener)
        proc = procs.start(self.listener.port, name, basedir=basedir, no_reconnect=True, env=env,
                           extra_args=["--ssh-client", "paramiko",
                                       "--via-ssh", f"{self.sshd.user}@{HOST}:{self.sshd.port}",
                                       "--identity", str(self.identity), "--known-hosts", str(self.known_hosts)])
        return wait_registered(self.collection, name, proc, why=self.sshd.log_text)

    def close(self) -> None:
        try:
            super().close()
        finally:
            sshd = getattr(self, "sshd", None)
            if sshd is not None:
                sshd.stop()


#: Every transport the operation tests run over, in the order they are listed.
TRANSPORTS: Sequence[Type[Transport]] = (LocalTransport, TcpTransport, TlsTransport, SshTransport,
                                         OpenSshClientTransport, OpenSshTransport)
TRANSPORT_NAMES: List[str] = [t.name for t in TRANSPORTS]


class TransportPool:
    """Opens each transport the first time it is asked for, and closes them all at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._open: Dict[str, Transport] = {}
        self._failed: Dict[str, BaseException] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Transport:
        with self._lock:
            if name in self._failed:  # skip or fail every later test the same way, without retrying
                raise self._failed[name]
            transport = self._open.get(name)
            if transport is None:
                cls = {t.name: t for t in TRANSPORTS}[name]
                transport = cls(self.workdir / name)
                try:
                    transport.open()
                except BaseException as e:
                    self._failed[name] = e
                    transport.close()
                    raise
                self._open[name] = transport
            return transport

    def close(self) -> None:
        for transport in self._open.values():
            transport.close()
        self._open.clear()


class Connected(NamedTuple):
    """A slave under test: the master's object, its base directory and how it is connected."""

    slave: Slave
    basedir: Path
    transport: str
    collection: SimpleSlaveCollection


_serial = itertools.count(1)


class TransportUnderTest:
    """One transport, for one test: starts slaves over it and stops them all at teardown."""

    def __init__(self, transport: Transport, workdir: Path) -> None:
        self.transport = transport
        self.name = transport.name
        self.collection = transport.collection
        self.procs = SlaveProcesses(workdir)
        self.workdir = workdir
        self.slaves: List[Slave] = []

    def start(self, basedir: Optional[Path] = None, env: Optional[Mapping[str, Optional[str]]] = None) -> Connected:
        """A fresh slave rooted at ``basedir`` (default: a new directory),
        its environment changed by ``env`` (``None`` values remove a variable)."""
        name = f"{self.name}-{next(_serial)}"
        if basedir is None:
            basedir = self.workdir / f"base-{name}"
            basedir.mkdir(parents=True)
        slave = self.transport.start(self.procs, basedir, name, env or {})
        self.slaves.append(slave)
        return Connected(slave, basedir, self.name, self.collection)

    def close(self) -> None:
        try:
            for slave in self.slaves:
                slave.close()
        finally:
            self.procs.close()


def transport_params(definition: pytest.Function) -> List[object]:
    """``pytest.param`` for each transport, marked ``slow`` where the test's ``slow_over`` says so."""
    marker = definition.get_closest_marker("slow_over")
    slow: Set[str] = set()
    if marker is not None:
        slow = set(marker.args) if marker.args else set(TRANSPORT_NAMES) - {"local"}
        unknown = slow - set(TRANSPORT_NAMES)
        if unknown:
            raise ValueError(f"{definition.name}: slow_over names unknown transports {sorted(unknown)}")
    return [pytest.param(name, id=name, marks=[pytest.mark.slow] if name in slow else [])
            for name in TRANSPORT_NAMES]


@pytest.fixture(scope="session")
def transport_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TransportPool]:
    """The session's transports, each opened on first use."""
    pool = TransportPool(tmp_path_factory.mktemp("transports"))
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def any_transport(request: pytest.FixtureRequest, transport_pool: TransportPool,
                  tmp_path: Path) -> Iterator[TransportUnderTest]:
    """One transport per test item (parametrised by conftest's pytest_generate_tests)."""
    under_test = TransportUnderTest(transport_pool.get(request.param), tmp_path / "slaves")
    try:
        yield under_test
    finally:
        under_test.close()


@pytest.fixture
def any_slave(any_transport: TransportUnderTest, basedir: Path) -> Connected:
    """A fresh slave over the item's transport, rooted at ``basedir``."""
    return any_transport.start(basedir)
