"""TLS on the TCP transport, with a throwaway CA made by ``cryptography``.

The slave verifies the master's certificate against ``--tls-ca``: the right
CA works, another CA is refused, and a plain TCP slave cannot register with
a TLS listener, which keeps serving through all of it.
"""

from __future__ import annotations

import datetime
import ipaddress
import signal
import socket
import threading
import ssl
import time
from pathlib import Path
from typing import List, NamedTuple

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from remsh.errors import Disconnected
from tests.slaveproc import (HOST, WAIT, read_until_closed, slave_procs,  # noqa: F401
                             tcp_listener, wait_registered)

pytestmark = pytest.mark.timeout(120)

EXIT_AUTH = 2


class Pki(NamedTuple):
    ca: Path  # the CA that signed the server certificate
    other_ca: Path  # a CA that signed nothing here
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _make_ca(common_name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
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


def _make_server_cert(ca_key, ca_cert):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("remsh test master"))
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
    return key, cert


def _pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = _make_ca("remsh test CA")
    _, other_cert = _make_ca("some other CA")
    key, cert = _make_server_cert(ca_key, ca_cert)
    paths = Pki(d / "ca.pem", d / "other-ca.pem", d / "server.pem", d / "server.key")
    paths.ca.write_bytes(_pem(ca_cert))
    paths.other_ca.write_bytes(_pem(other_cert))
    paths.cert.write_bytes(_pem(cert))
    paths.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    paths.key.chmod(0o600)
    return paths


@pytest.fixture
def tls_listener(tcp_listener, pki):
    def make(**kwargs):
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(pki.cert), str(pki.key))
        return tcp_listener(ssl_context=ctx, **kwargs)

    return make


def test_slave_with_the_right_ca_registers_and_works(tls_listener, slave_procs, pki):
    """A slave given --tls-ca of the CA that signed the master's certificate registers over TLS and serves operations."""
    listener = tls_listener()
    proc = slave_procs.start(listener.port, "trusting", tls_ca=pki.ca)
    slave = wait_registered(listener, proc)
    assert slave.wire.stream.sock.version() in ("TLSv1.2", "TLSv1.3")
    slave.ping()
    out: List[bytes] = []
    assert slave.execute(["sh", "-c", "head -c 200000 /dev/zero; echo done"], stdout_cb=out.append) == 0
    assert b"".join(out) == bytes(200000) + b"done\n"
    assert slave.stat(".") == "d"


def test_slave_with_another_ca_refuses_the_master(tls_listener, slave_procs, pki):
    """A --no-reconnect slave that cannot verify the master's certificate exits 2 unregistered; the listener keeps serving."""
    listener = tls_listener()
    doubter = slave_procs.start(listener.port, "doubter", tls_ca=pki.other_ca, no_reconnect=True)
    assert doubter.wait() == EXIT_AUTH, doubter.log_text()
    assert "certificate verify failed" in doubter.log_text()
    assert listener.slave_collection.get_all_slaves() == []
    good = slave_procs.start(listener.port, "trusting", tls_ca=pki.ca)
    wait_registered(listener, good).ping()
    assert [s.name for s in listener.slave_collection.get_all_slaves()] == ["trusting"]


def test_plain_tcp_slave_cannot_register_with_a_tls_listener(tls_listener, slave_procs, pki):
    """A slave without TLS fails against a TLS listener (non-zero exit, nothing registered), and TLS slaves still register."""
    listener = tls_listener()
    plain = slave_procs.start(listener.port, "plain", no_reconnect=True)
    status = plain.wait()
    assert status != 0, plain.log_text()
    assert listener.slave_collection.get_all_slaves() == []
    good = slave_procs.start(listener.port, "trusting", tls_ca=pki.ca)
    wait_registered(listener, good).ping()


def test_tls_listener_drops_a_silent_connection_at_the_time_limit(tls_listener, slave_procs, pki):
    """A connection that never starts TLS is closed at the handshake time limit, and a TLS slave registers afterwards."""
    listener = tls_listener(handshake_timeout=1.0)
    with socket.create_connection((HOST, listener.port), timeout=WAIT) as sock:
        started = time.monotonic()
        assert read_until_closed(sock, 6.0) == b""
        assert time.monotonic() - started >= 0.9
    good = slave_procs.start(listener.port, "trusting", tls_ca=pki.ca)
    wait_registered(listener, good).ping()


def test_tls_listener_survives_garbage_instead_of_a_client_hello(tls_listener, slave_procs, pki):
    """Bytes that are not TLS cost one closed connection on a TLS listener, and a TLS slave registers afterwards."""
    listener = tls_listener(handshake_timeout=1.0)
    with socket.create_connection((HOST, listener.port), timeout=WAIT) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        started = time.monotonic()
        read_until_closed(sock, 6.0)
        assert time.monotonic() - started < 1.0
    good = slave_procs.start(listener.port, "trusting", tls_ca=pki.ca)
    wait_registered(listener, good).ping()


def test_tls_listener_drops_a_client_hello_sent_byte_by_byte_at_the_time_limit(tls_listener, slave_procs, pki):
    """A peer dribbling its ClientHello one byte at a time is dropped at the handshake time limit, not kept per byte."""
    listener = tls_listener(handshake_timeout=1.0)
    client = ssl.create_default_context(cafile=str(pki.ca))
    outgoing = ssl.MemoryBIO()
    tls = client.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=HOST)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    with socket.create_connection((HOST, listener.port), timeout=WAIT) as sock:
        started = time.monotonic()
        closed = False
        for byte in hello:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            sock.settimeout(0.2)
            try:
                closed = sock.recv(1) == b""
            except ConnectionResetError:
                closed = True
            except socket.timeout:
                pass
            if closed or time.monotonic() - started > 6.0:
                break
        elapsed = time.monotonic() - started
    assert closed, f"still open after {elapsed:.1f} s of dribbling"
    assert 0.9 <= elapsed < 4.0
    good = slave_procs.start(listener.port, "trusting", tls_ca=pki.ca)
    wait_registered(listener, good).ping()


def test_idle_tls_slave_killed_leaves_the_collection(tls_listener, slave_procs, pki):
    """An idle slave on TLS killed with SIGKILL is disconnected and leaves the collection within 10 s."""
    listener = tls_listener()
    proc = slave_procs.start(listener.port, "mayfly", tls_ca=pki.ca)
    slave = wait_registered(listener, proc)
    slave.ping()
    gone = threading.Event()
    slave.on_disconnect(lambda s: gone.set())
    proc.signal(signal.SIGKILL)
    proc.wait()
    assert gone.wait(10.0), "the killed TLS slave is still considered connected"
    assert listener.slave_collection.get_all_slaves() == []
    with pytest.raises(Disconnected):
        slave.ping()
