"""A throwaway OpenSSH server on 127.0.0.1 for the SSH peers (scp, sftp,
``ssh``, paramiko, Fabric), and the keys and known_hosts to reach it.

Everything lives in one temporary directory: host key, client key,
authorized_keys, known_hosts, the config and the PID file.  Clients verify
the host key strictly against the known_hosts file written here.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from typing import List, Optional

SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: str, comment: str = "remsh-bench") -> str:
    """An Ed25519 key pair at ``path`` (no passphrase); returns the public key line."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path],
                   check=True, stdin=subprocess.DEVNULL)
    with open(path + ".pub") as f:
        return f.read().strip()


class Sshd:
    """``sshd -D -e -f CONFIG`` on a free port of 127.0.0.1."""

    def __init__(self, tmpdir: str) -> None:
        self.dir = os.path.join(tmpdir, "sshd")
        os.makedirs(self.dir, exist_ok=True)
        self.user = getpass.getuser()
        self.host = "127.0.0.1"
        self.port = 0
        self.proc: Optional[subprocess.Popen] = None
        self.client_key = os.path.join(self.dir, "client_ed25519")
        self.known_hosts = os.path.join(self.dir, "known_hosts")
        self.log = os.path.join(self.dir, "sshd.log")

    def start(self) -> None:
        if not os.path.exists(SSHD):
            raise RuntimeError(f"{SSHD} not installed")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        host_key = os.path.join(self.dir, "host_ed25519")
        host_pub = keygen(host_key, "bench-sshd-host")
        client_pub = keygen(self.client_key, "bench-client")
        auth = os.path.join(self.dir, "authorized_keys")
        with open(auth, "w") as f:
            f.write(client_pub + "\n")
        os.chmod(auth, 0o600)
        sftp_server = "/usr/lib/openssh/sftp-server"
        if not os.path.exists(sftp_server):
            sftp_server = "internal-sftp"
        self.port = free_port()
        config = os.path.join(self.dir, "sshd_config")
        with open(config, "w") as f:
            f.write(f"""\
ListenAddress {self.host}
Port {self.port}
HostKey {host_key}
AuthorizedKeysFile {auth}
PidFile {os.path.join(self.dir, 'sshd.pid')}
UsePAM no
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
PrintMotd no
PrintLastLog no
UseDNS no
MaxSessions 200
MaxStartups 200:30:400
LogLevel ERROR
Subsystem sftp {sftp_server}
# bash run by sshd sources ~/.bashrc even for "ssh host true"; SHLVL=1 turns
# that off, so the peers do not pay for whatever this machine's rc file does
SetEnv SHLVL=1
""")
        with open(self.known_hosts, "w") as f:
            key_type, key_data = host_pub.split()[:2]
            f.write(f"[{self.host}]:{self.port} {key_type} {key_data}\n")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", config], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                with open(self.log, errors="replace") as f:
                    tail = f.read()[-500:]
                self.stop()
                raise RuntimeError(f"sshd did not start: {tail.strip()}")
            time.sleep(0.05)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    # -- clients ---------------------------------------------------------------

    def ssh_options(self) -> List[str]:
        """Options for OpenSSH clients: this key only, this known_hosts only, strictly."""
        return ["-F", "/dev/null", "-i", self.client_key, "-o", "IdentitiesOnly=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
                "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]

    def ssh_argv(self, *command: str) -> List[str]:
        return ["ssh", *self.ssh_options(), "-p", str(self.port), f"{self.user}@{self.host}", *command]

    def scp_argv(self, src: str, dest: str) -> List[str]:
        """``scp`` (remote paths written ``:PATH``)."""
        def fix(p: str) -> str:
            return f"{self.user}@{self.host}{p}" if p.startswith(":") else p

        return ["scp", "-q", *self.ssh_options(), "-P", str(self.port), fix(src), fix(dest)]

    def sftp_argv(self, batch_file: str) -> List[str]:
        return ["sftp", "-q", *self.ssh_options(), "-P", str(self.port), "-b", batch_file,
                f"{self.user}@{self.host}"]

    def paramiko_client(self):  # -> paramiko.SSHClient
        """A connected, authenticated paramiko client (host key checked)."""
        import paramiko

        client = paramiko.SSHClient()
        client.load_host_keys(self.known_hosts)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect(self.host, self.port, username=self.user, key_filename=self.client_key,
                       allow_agent=False, look_for_keys=False, timeout=10)
        nodelay(client)
        return client

    def fabric_connection(self):  # -> fabric.Connection
        import fabric
        import paramiko

        config = fabric.Config(overrides={"load_ssh_configs": False, "run": {"hide": True, "in_stream": False}})
        conn = fabric.Connection(self.host, user=self.user, port=self.port, config=config,
                                 connect_kwargs={"key_filename": self.client_key, "allow_agent": False,
                                                 "look_for_keys": False})
        conn.client.load_host_keys(self.known_hosts)
        conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        conn.open()
        nodelay(conn.client)
        return conn


def nodelay(client) -> None:  # client: paramiko.SSHClient
    """TCP_NODELAY on a paramiko client's socket.  paramiko leaves Nagle on,
    which costs a small request ~40 ms of delayed ACK on loopback; a careful
    user turns it off, so the benchmark does."""
    client.get_transport().sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def have_openssh() -> Optional[str]:
    """None when sshd and the clients are installed, else what is missing."""
    missing = [p for p in (SSHD,) if not os.path.exists(p)]
    missing += [c for c in ("ssh", "scp", "sftp", "ssh-keygen") if shutil.which(c) is None]
    return ", ".join(missing) + " not installed" if missing else None
