"""Everything the scenarios measure, started once per benchmark run.

- remsh slaves over each transport: local (child process over a socket
  pair), TCP and TLS (a real ``remsh-slave`` process dialling the master's
  ``TcpSlaveListener``), SSH (``remsh-slave --ssh`` dialling the master's
  embedded ``SshSlaveListener`` with paramiko) and SSH via ssh (the same,
  through the system's OpenSSH client);
- the peers: an execnet gateway, an RPyC server, a paramiko client and a
  Fabric connection to the benchmark's own sshd.

A transport or peer that cannot be started is recorded with the reason, and
its rows read "n/a (reason)".
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import ssl
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from sshd import Sshd, keygen

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from remsh.master.slave import Slave  # noqa: E402
from remsh.master.slavecollection.simple import SimpleSlaveCollection  # noqa: E402

log = logging.getLogger("bench")

LOCAL, TCP, TLS, SSH = "local", "TCP", "TLS", "SSH"
#: the same embedded SSH server, the slave dialling with the system's
#: ``ssh`` program (``--ssh-client openssh``); ``SSH`` is the paramiko client
SSH_OPENSSH = "SSH via ssh"
#: a tunnel: the system's ``ssh -W`` through the bench's OpenSSH ``sshd`` to
#: the TCP listener (``--via-ssh --ssh-client openssh``): no paramiko at all
SSH_TUNNEL = "SSH via ssh -W"
TRANSPORTS = (LOCAL, TCP, TLS, SSH, SSH_OPENSSH, SSH_TUNNEL)
#: TCP to a listener that keeps no session (``resume_timeout=0``): nothing
#: survives a dropped connection, and nothing sent is kept for it (the
#: pinned transfer and stream rows, to show what a session costs)
TCP_PLAIN = "TCP, sessions off"
ALL_TRANSPORTS = TRANSPORTS + (TCP_PLAIN,)


def child_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".splitlines()[0]
    return text if len(text) <= 90 else text[:87] + "..."


def make_tls_files(directory: str) -> Dict[str, str]:
    """A self-signed certificate for 127.0.0.1 (it is its own CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "remsh bench master")])
    now = datetime.datetime.now(datetime.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path = os.path.join(directory, "tls-cert.pem")
    key_path = os.path.join(directory, "tls-key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    return {"cert": cert_path, "key": key_path}


class RemshSlaves:
    """One master (this process) with one slave per transport."""

    def __init__(self, work: str, python_args: Optional[List[str]] = None, sshd: Any = None) -> None:
        self.work = work
        #: the bench's OpenSSH server (bench/sshd.py), for the tunnel; None: not started
        self.sshd = sshd
        #: inserted between the interpreter and ``-m remsh.slave.main`` (e.g. to run under cProfile)
        self.python_args = list(python_args or [])
        self.dir = os.path.join(work, "remsh")
        os.makedirs(self.dir, exist_ok=True)
        self.collection = SimpleSlaveCollection()
        self.secret_file = os.path.join(self.dir, "secret")
        with open(os.open(self.secret_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(os.urandom(24).hex())
        with open(self.secret_file, "rb") as f:
            self.secret = f.read()
        self.slaves: Dict[str, Slave] = {}
        self.na: Dict[str, str] = {}
        self.ports: Dict[str, int] = {}
        self.listeners: List[Any] = []
        self.procs: List[subprocess.Popen] = []
        self.tls: Optional[Dict[str, str]] = None
        self.ssh_files: Dict[str, str] = {}

    def basedir(self, transport: str) -> str:
        d = os.path.join(self.dir, f"slave-{transport.lower().replace(',', '').replace(' ', '-')}")
        os.makedirs(d, exist_ok=True)
        return d

    # -- starting --------------------------------------------------------------

    def start(self, transports: Tuple[str, ...] = ALL_TRANSPORTS) -> None:
        for transport, starter in ((LOCAL, self._start_local), (TCP, self._start_tcp),
                                   (TCP_PLAIN, self._start_tcp_plain),
                                   (TLS, self._start_tls), (SSH, self._start_ssh),
                                   (SSH_OPENSSH, self._start_ssh_openssh),
                                   (SSH_TUNNEL, self._start_ssh_tunnel)):
            if transport not in transports:
                continue
            try:
                self.slaves[transport] = starter()
            except Exception as e:  # noqa: BLE001 - reported as n/a
                log.warning("remsh %s: cannot start: %s", transport, e)
                self.na[transport] = _short(e)

    def _start_local(self) -> Slave:
        from remsh.master.slavelistener.local import LocalSlaveListener

        listener = LocalSlaveListener(slave_collection=self.collection)
        self.listeners.append(listener)
        return listener.start_slave(self.basedir(LOCAL), name="bench-local")

    def _spawn_slave(self, name: str, args: List[str]) -> Slave:
        log_path = os.path.join(self.dir, f"{name}.log")
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen([sys.executable, *self.python_args, "-m", "remsh.slave.main", "--name", name,
                                     "--no-reconnect", *args], env=child_env(), cwd=REPO,
                                    stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
        self.procs.append(proc)
        deadline = time.monotonic() + 30
        while True:
            slave = self.collection.get_slave(True, lambda s: s.name == name, timeout=0.2)
            if slave is not None:
                return slave
            if proc.poll() is not None or time.monotonic() > deadline:
                with open(log_path, errors="replace") as f:
                    lines = f.read().strip().splitlines()
                raise RuntimeError(f"slave did not register: {lines[-1] if lines else 'no output'}")

    def _start_tcp(self, transport: str = TCP, name: str = "bench-tcp", **options: Any) -> Slave:
        from remsh.master.slavelistener.tcp import TcpSlaveListener

        listener = TcpSlaveListener(port=0, host="127.0.0.1", secret=self.secret,
                                    slave_collection=self.collection, **options)
        listener.start()
        self.listeners.append(listener)
        self.ports[transport] = listener.port
        return self._spawn_slave(name, ["--secret-file", self.secret_file,
                                        "--basedir", self.basedir(transport), "127.0.0.1", str(listener.port)])

    def _start_tcp_plain(self) -> Slave:
        return self._start_tcp(TCP_PLAIN, "bench-tcp0", resume_timeout=0)

    def _start_tls(self) -> Slave:
        from remsh.master.slavelistener.tcp import TcpSlaveListener

        self.tls = make_tls_files(self.dir)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.tls["cert"], self.tls["key"])
        listener = TcpSlaveListener(port=0, host="127.0.0.1", secret=self.secret, ssl_context=ctx,
                                    slave_collection=self.collection)
        listener.start()
        self.listeners.append(listener)
        self.ports[TLS] = listener.port
        return self._spawn_slave("bench-tls", ["--secret-file", self.secret_file, "--tls-ca", self.tls["cert"],
                                               "--basedir", self.basedir(TLS), "127.0.0.1", str(listener.port)])

    def _start_ssh(self) -> Slave:
        from remsh.master.slavelistener.ssh import SshSlaveListener  # may not exist yet

        d = os.path.join(self.dir, "ssh")
        os.makedirs(d, exist_ok=True)
        host_key = os.path.join(d, "host_ed25519")
        host_pub = keygen(host_key, "bench-master")
        lines = []
        for name in ("bench-ssh", "bench-dial", "bench-ossh"):
            key = os.path.join(d, f"{name}_ed25519")
            lines.append(keygen(key, name))
            self.ssh_files[name] = key
        auth = os.path.join(d, "authorized_keys")
        with open(auth, "w") as f:
            f.write("\n".join(lines) + "\n")
        listener = SshSlaveListener(port=0, host="127.0.0.1", host_key=host_key, authorized_keys=auth,
                                    slave_collection=self.collection)
        listener.start()
        self.listeners.append(listener)
        self.ports[SSH] = listener.port
        known = os.path.join(d, "known_hosts")
        with open(known, "w") as f:
            key_type, key_data = host_pub.split()[:2]
            f.write(f"[127.0.0.1]:{listener.port} {key_type} {key_data}\n")
        self.ssh_files["known_hosts"] = known
        return self._spawn_slave("bench-ssh", [
            "--ssh-client", "paramiko",
            "--ssh", f"bench-ssh@127.0.0.1:{listener.port}", "--identity", self.ssh_files["bench-ssh"],
            "--known-hosts", known, "--basedir", self.basedir(SSH)])

    def _start_ssh_openssh(self) -> Slave:
        """A slave through the system's ``ssh`` to the embedded server of :meth:`_start_ssh`."""
        if SSH not in self.ports:
            raise RuntimeError(f"needs the embedded SSH server ({self.na.get(SSH, 'not started')})")
        config = os.path.join(self.dir, "ssh", "ssh_config")  # nothing of ~/.ssh/config
        with open(os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w"):
            pass
        return self._spawn_slave("bench-ossh", [
            "--ssh-client", "openssh", "-F", config,
            "--ssh", f"bench-ossh@127.0.0.1:{self.ports[SSH]}", "--identity", self.ssh_files["bench-ossh"],
            "--known-hosts", self.ssh_files["known_hosts"], "--basedir", self.basedir(SSH_OPENSSH)])

    def _start_ssh_tunnel(self) -> Slave:
        """A slave through ``ssh -W`` and the bench's ``sshd`` to the TCP listener of :meth:`_start_tcp`."""
        if self.sshd is None:
            raise RuntimeError("needs the bench's sshd (not started)")
        if TCP not in self.ports:
            raise RuntimeError(f"needs the TCP listener ({self.na.get(TCP, 'not started')})")
        config = os.path.join(self.dir, "tunnel_ssh_config")  # nothing of ~/.ssh/config
        with open(os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w"):
            pass
        return self._spawn_slave("bench-tunnel", [
            "--ssh-client", "openssh", "-F", config,
            "--via-ssh", f"{self.sshd.user}@{self.sshd.host}:{self.sshd.port}", "--identity", self.sshd.client_key,
            "--known-hosts", self.sshd.known_hosts, "--secret-file", self.secret_file,
            "--basedir", self.basedir(SSH_TUNNEL), "127.0.0.1", str(self.ports[TCP])])

    def dial_args(self, transport: str) -> List[str]:
        """``slavefarm.py dial`` options that reach this master over ``transport``."""
        if transport == SSH:
            return ["--ssh", f"bench-dial@127.0.0.1:{self.ports[SSH]}", "--identity", self.ssh_files["bench-dial"],
                    "--known-hosts", self.ssh_files["known_hosts"], "--name", "bench-dial"]
        # a name of its own: the SSH listener binds "bench-dial" to its key, and
        # no other listener may register a name another one claims
        args = ["--port", str(self.ports[transport]), "--secret-file", self.secret_file,
                "--name", f"bench-dial-{transport.lower()}"]
        if transport == TLS:
            assert self.tls is not None
            args += ["--tls-ca", self.tls["cert"]]
        return args

    def stop(self) -> None:
        for listener in self.listeners:
            try:
                listener.stop()
            except Exception:  # noqa: BLE001 - best effort at the end
                log.exception("stopping %r", listener)
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Peers:
    """The other tools, each with an open connection (or the reason it has none)."""

    def __init__(self, work: str, sshd: Optional[Sshd], sshd_na: Optional[str]) -> None:
        self.work = work
        self.sshd = sshd
        self.na: Dict[str, str] = {}
        self.execnet_gw: Any = None
        self.execnet_ch: Any = None
        self.rpyc_proc: Optional[subprocess.Popen] = None
        self.rpyc_conn: Any = None
        self.ssh_client: Any = None
        self.sftp: Any = None  # on bulk_client
        self.bulk_client: Any = None
        self.fabric: Any = None
        if sshd is None:
            for peer in ("paramiko", "fabric", "openssh"):
                self.na[peer] = sshd_na or "no sshd"

    def start(self) -> None:
        try:
            import execnet

            self.execnet_gw = execnet.makegateway(f"popen//python={sys.executable}")
            self.execnet_ch = self.execnet_gw.remote_exec(
                "while True:\n    channel.receive()\n    channel.send(b'\\0\\0')\n")
        except Exception as e:  # noqa: BLE001
            self.na["execnet"] = _short(e)
        try:
            import rpyc
            from rpyc.core.stream import SocketStream

            here = os.path.dirname(os.path.abspath(__file__))
            self.rpyc_proc = subprocess.Popen([sys.executable, os.path.join(here, "rpycpeer.py")],
                                              stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
            assert self.rpyc_proc.stdout is not None
            port = int(self.rpyc_proc.stdout.readline())
            deadline = time.monotonic() + 10
            while True:  # the port is bound before the server listens
                try:
                    self.rpyc_conn = rpyc.connect_stream(SocketStream.connect("127.0.0.1", port, nodelay=True,
                                                                              attempts=1))
                    break
                except ConnectionRefusedError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        except Exception as e:  # noqa: BLE001
            self.na["rpyc"] = _short(e)
        if self.sshd is not None:
            try:
                self.ssh_client = self.sshd.paramiko_client()
                self.fresh_bulk_connection()
            except Exception as e:  # noqa: BLE001
                self.na["paramiko"] = _short(e)
            try:
                self.fabric = self.sshd.fabric_connection()
            except Exception as e:  # noqa: BLE001
                self.na["fabric"] = _short(e)

    # -- operations --------------------------------------------------------------

    def paramiko_exec(self, command: str = "true") -> None:
        chan = self.ssh_client.get_transport().open_session()
        try:
            chan.exec_command(command)
            status = chan.recv_exit_status()
        finally:
            chan.close()
        if status != 0:
            raise RuntimeError(f"paramiko exec {command!r}: status {status}")

    def fresh_bulk_connection(self) -> None:
        """Replace the connection the bulk operations use (untimed, before a
        run): paramiko rekeys every 512 MiB, and a channel closing during a
        rekey can stall its transport thread for 30 s (a paramiko bug), so
        each bulk run gets a connection of its own."""
        assert self.sshd is not None
        old, oldsftp = self.bulk_client, self.sftp
        self.bulk_client = self.sshd.paramiko_client()
        self.sftp = self.bulk_client.open_sftp()
        for closer in (oldsftp, old):
            if closer is not None:
                closer.close()

    def paramiko_cat(self, path: str, callback: Any) -> None:
        chan = self.bulk_client.get_transport().open_session()
        try:
            chan.exec_command(f"cat {path}")
            recv = chan.recv
            while True:
                data = recv(1 << 20)
                if not data:
                    break
                callback(data)
            status = chan.recv_exit_status()
        finally:
            chan.close()
        if status != 0:
            raise RuntimeError(f"paramiko cat: status {status}")

    def cipher(self) -> str:
        t = self.ssh_client.get_transport() if self.ssh_client else None
        return f"{t.remote_cipher} / {t.remote_mac}" if t else ""

    def stop(self) -> None:
        for closer in (lambda: self.fabric and self.fabric.close(),
                       lambda: self.sftp and self.sftp.close(),
                       lambda: self.bulk_client and self.bulk_client.close(),
                       lambda: self.ssh_client and self.ssh_client.close(),
                       lambda: self.rpyc_conn and self.rpyc_conn.close(),
                       lambda: self.execnet_gw and self.execnet_gw.exit()):
            try:
                closer()
            except Exception:  # noqa: BLE001 - best effort at the end
                pass
        if self.rpyc_proc is not None and self.rpyc_proc.poll() is None:
            self.rpyc_proc.kill()
            self.rpyc_proc.wait()
