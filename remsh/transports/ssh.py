"""SSH for both ends (paramiko): the master's embedded server and the slave's
two ways of dialling out.

With its key helpers (:mod:`remsh.transports.sshkeys`) this is the only
module in remsh that imports paramiko, so a slave that uses TCP or the
local transport runs without it.

**Embedded server** (:class:`SshServer`, used by
:class:`~remsh.master.slavelistener.ssh.SshSlaveListener`).  Connections are
accepted by :class:`~remsh.transports.tcp.TcpServer` (bounded number of
unfinished handshakes, one worker thread each); the worker runs the SSH
negotiation, public-key authentication and the opening of one ``session``
channel carrying the ``remsh`` subsystem, all within the listener's
handshake time limit, then hands the channel, as a stream, to the listener.
Slaves prove a key listed in an OpenSSH ``authorized_keys`` file; the key's
comment field is the one slave name it may register as (the stream's
``identity``).  Everything else an SSH client may ask for -- passwords,
shells, commands, terminals, port forwarding either way, agent or X11
forwarding, a second channel -- is refused: a bug here must not turn the
master into a shell server.

**Slave side**: :func:`connect_embedded` logs in to that server and opens the
subsystem; :func:`connect_via` logs in to a stock OpenSSH server and opens a
``direct-tcpip`` channel to the master's TCP listener (the normal TCP
handshake with its shared secret then runs through the tunnel).  Both pin
the server's host key against a ``known_hosts`` file (never adding to it),
use only the given identity file (no agent, no key search, no password) and
bound every step in time.

**Channel as a stream** (:class:`ChannelStream`).  paramiko's channel timeout
is shared by sends and receives, so receives never use it: they wait on the
channel's readiness pipe (``fileno()``, which paramiko sets when data or end
of stream arrives, and which is what the slave's execute loop and the
master's idle monitor select on), and the channel timeout stays fixed as the
bound on one blocked send.

paramiko runs one thread per SSH connection (its ``Transport``); that is the
price of the library, paid per connected slave.  Its log records go to the
``remsh.transports.ssh.paramiko`` logger.
"""

from __future__ import annotations

import base64
import binascii
import errno
import logging
import os
import select
import socket
import threading
import time
from typing import Any, Callable, List, Mapping, Optional, Set, Tuple, Union

import paramiko
import paramiko.common

from remsh.errors import AuthenticationError, Disconnected, UsageError
from remsh.transports.base import DEFAULT_SEND_TIMEOUT, Buffer, SocketStream, _format_addr, tune_socket
from remsh.transports.tcp import (DEFAULT_CONNECT_TIMEOUT, DEFAULT_KEEPALIVE, DEFAULT_MAX_PENDING,
                                  DEFAULT_MAX_PENDING_PER_ADDRESS, TcpServer)
# the key helpers live in remsh.transports.sshkeys; their public names are this module's too
from remsh.transports.sshkeys import AuthorizedKey as AuthorizedKey
from remsh.transports.sshkeys import AuthorizedKeys as AuthorizedKeys
from remsh.transports.sshkeys import KeyLike as KeyLike
from remsh.transports.sshkeys import authorized_keys_line as authorized_keys_line
from remsh.transports.sshkeys import host_key_fingerprint as host_key_fingerprint
from remsh.transports.sshkeys import known_hosts_line as known_hosts_line
from remsh.transports.sshkeys import known_hosts_name as known_hosts_name
from remsh.transports.sshkeys import load_private_key as load_private_key
from remsh.transports.sshkeys import parse_authorized_keys as parse_authorized_keys
from remsh.transports.sshkeys import as_key as _as_key

log = logging.getLogger(__name__)

#: Name of the SSH subsystem that carries remsh on the embedded server.
SUBSYSTEM = "remsh"
#: Receive window per channel: large, so that a 20 MiB transfer is not
#: throttled by window adjustments (paramiko's default is 2 MiB).
WINDOW_SIZE = 8 * 1024 * 1024
#: Largest data packet the slave's side accepts; 32 KiB is what OpenSSH
#: accepts on every channel (the tunnel form talks to a stock sshd).
MAX_PACKET_SIZE = 32 * 1024
#: Largest data packet the embedded server accepts from a slave.  Every
#: packet costs paramiko a round of Python calls (decrypt, parse, queue), so
#: fewer, larger packets carry more per CPU second: on loopback here,
#: slave-to-master transfers from the paramiko client went from about 230
#: to 335 MiB/s with 128 KiB (256 KiB was no better than 32 KiB).  The
#: server's own packets stay within what each client asks for.
SERVER_MAX_PACKET_SIZE = 128 * 1024
#: Bytes after which the embedded server's connection renews its keys.
#: paramiko's default, 512 MiB, stops a long transfer for a key exchange
#: every 512 MiB; 4 GiB is far below the limit of AES-GCM's 128-bit blocks
#: (2**32 blocks, 64 GiB, which OpenSSH uses) and any client may still ask
#: for a new key sooner.
REKEY_BYTES = 4 * 1024 ** 3
#: Seconds without traffic after which an SSH keepalive is sent, so that
#: (with TCP keepalive) a vanished peer is noticed.
KEEPALIVE_INTERVAL = 10
#: Logger that paramiko's own records go to.
PARAMIKO_LOGGER = __name__ + ".paramiko"

class ChannelStream:
    """A :class:`~remsh.transports.base.StreamLike` over one paramiko channel.

    ``close()`` and ``shutdown()`` end the whole SSH connection (one channel
    per connection), which wakes every thread blocked on the channel.
    """

    def __init__(self, channel: paramiko.Channel, *, peer: str, identity: Optional[str] = None,
                 send_timeout: float = DEFAULT_SEND_TIMEOUT) -> None:
        self.channel = channel
        self.transport: paramiko.Transport = channel.get_transport()
        self.peer = peer
        self.identity = identity
        #: on the server: when (``time.monotonic()``) the whole set-up, SSH
        #: and remsh handshake together, must be over
        self.handshake_deadline: Optional[float] = None
        # only sends use the channel timeout: receives wait on the pipe below
        channel.settimeout(send_timeout)
        # Open the window again after half of it was read, not a tenth: each
        # adjustment is a message of its own, and the sender keeps at least
        # half a window to go on with.
        channel.in_window_threshold = max(channel.in_window_threshold, channel.in_window_size // 2)
        self._fd: int = channel.fileno()
        self._poller = select.poll()
        self._poller.register(self._fd, select.POLLIN)
        self._closed = False
        self._close_lock = threading.Lock()
        #: what the last read from the channel held beyond what was asked
        self._rest: Optional[memoryview] = None

    def send_all(self, data: Buffer) -> None:
        """Send every byte; ``TimeoutError`` if the peer stops reading for the
        send time limit, ``OSError`` once the connection is gone."""
        try:
            self.channel.sendall(data if isinstance(data, bytes) else bytes(data))
        except socket.timeout as e:
            raise TimeoutError(errno.ETIMEDOUT, "send timed out") from e
        except (paramiko.SSHException, EOFError) as e:
            raise ConnectionResetError(errno.ECONNRESET, f"SSH connection failed: {e}") from e

    def _ready(self) -> bool:
        ch = self.channel
        return bool(ch.recv_ready() or ch.closed or ch.eof_received)

    def _take(self, size: int, timeout: Optional[float]) -> Buffer:
        """Up to ``size`` bytes, what an earlier read left first."""
        if self._closed:
            raise OSError(errno.EBADF, "stream closed")
        rest = self._rest
        if rest is not None:
            if len(rest) > size:
                self._rest = rest[size:]
                return rest[:size]
            self._rest = None
            return rest
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while not self._ready():
            if self._closed:
                raise OSError(errno.EBADF, "stream closed")
            if self.channel.recv_stderr_ready():
                # extended data is no part of the protocol: drop it
                self.channel.recv_stderr(65536)
                continue
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(errno.ETIMEDOUT, "receive timed out")
            events = self._poller.poll(None if left is None else left * 1000.0)
            if any(ev & select.POLLNVAL for _, ev in events):
                raise OSError(errno.EBADF, "stream closed")
        # All the channel holds: paramiko's pipe moves what a partial read
        # leaves to its front, a copy of up to a whole window per read.
        data = self.channel.recv(max(size, len(self.channel.in_buffer)))
        if len(data) > size:
            view = memoryview(data)
            self._rest = view[size:]
            return view[:size]
        return data

    def recv(self, size: int, timeout: Optional[float]) -> bytes:
        """Up to ``size`` bytes, ``b""`` at end of stream; ``TimeoutError``
        if nothing arrives within ``timeout`` seconds (``0``: do not wait)."""
        return bytes(self._take(size, timeout))

    def recv_into(self, buffer: memoryview, timeout: Optional[float]) -> int:
        """Like :meth:`recv`, into the start of ``buffer``; the byte count
        (0 at end of stream)."""
        data = self._take(len(buffer), timeout)
        n = len(data)
        buffer[:n] = data
        return n

    def abort(self) -> None:
        """End the connection now; what paramiko still queues is dropped with it."""
        self.shutdown()

    def fileno(self) -> int:
        """A descriptor that select() reports readable when :meth:`recv`
        would not block."""
        return self._fd

    def pending(self) -> int:
        """Bytes held here beyond the channel: the channel's readiness pipe
        stays set while the channel itself buffers anything, but not for
        these."""
        rest = self._rest
        return 0 if rest is None or self._closed else len(rest)

    def shutdown(self) -> None:
        """End the connection now, waking any thread blocked on the channel."""
        self.transport.close()

    def close(self) -> None:
        """End the connection and release the channel; idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._rest = None
        try:
            self.shutdown()  # first: it wakes threads polling the pipe
        finally:
            self.channel.close()  # then: closes the pipe


# -- server side ---------------------------------------------------------------------


# paramiko's answers (re-exported by the package; its stubs name them in
# paramiko.common)
_AUTH_FAILED: int = paramiko.common.AUTH_FAILED
_AUTH_SUCCESSFUL: int = paramiko.common.AUTH_SUCCESSFUL
_OPEN_SUCCEEDED: int = paramiko.common.OPEN_SUCCEEDED
_OPEN_PROHIBITED: int = paramiko.common.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED


class _ServerPolicy(paramiko.ServerInterface):
    """What one incoming SSH connection may do: prove a listed key, open one
    session channel and start the ``remsh`` subsystem on it.  Nothing else."""

    def __init__(self, authorized: AuthorizedKeys, peer: str) -> None:
        self.authorized = authorized
        self.peer = peer
        self.identity: Optional[str] = None  # fixed when the channel opens
        self.session_id: Optional[int] = None
        self.subsystem_started = threading.Event()
        self._candidate: Optional[str] = None

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_none(self, username: str) -> int:
        return _AUTH_FAILED

    def check_auth_password(self, username: str, password: str) -> int:
        log.warning("ssh %s: password login refused (public keys only)", self.peer)
        return _AUTH_FAILED

    def check_auth_interactive(self, username: str, submethods: str) -> int:
        return _AUTH_FAILED

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        # paramiko calls this before verifying the signature, and again for
        # the signed request; authentication succeeds only on a signed call,
        # which is then the last call made, so _candidate names the signer.
        name = self.authorized.lookup(key)
        if name is None:
            log.warning("ssh %s: key %s %s is not in %s", self.peer, key.get_name(),
                        host_key_fingerprint(key), self.authorized.path)
            return _AUTH_FAILED
        self._candidate = name
        return _AUTH_SUCCESSFUL

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind != "session" or self.session_id is not None or self._candidate is None:
            log.warning("ssh %s: refused to open a %r channel", self.peer, kind)
            return _OPEN_PROHIBITED
        self.session_id = chanid
        self.identity = self._candidate
        return _OPEN_SUCCEEDED

    def check_channel_subsystem_request(self, channel: paramiko.Channel, name: str) -> bool:
        if name != SUBSYSTEM or channel.get_id() != self.session_id or self.subsystem_started.is_set():
            log.warning("ssh %s: refused subsystem %r", self.peer, name)
            return False
        self.subsystem_started.set()
        return True

    def _refuse(self, what: str) -> bool:
        log.warning("ssh %s: refused %s request", self.peer, what)
        return False

    def check_channel_shell_request(self, channel: paramiko.Channel) -> bool:
        return self._refuse("shell")

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        return self._refuse("exec")

    def check_channel_pty_request(self, *args: Any) -> bool:
        return self._refuse("pty")

    def check_channel_x11_request(self, *args: Any) -> bool:
        return self._refuse("X11 forwarding")

    def check_channel_forward_agent_request(self, channel: paramiko.Channel) -> bool:
        return self._refuse("agent forwarding")

    def check_channel_env_request(self, channel: paramiko.Channel, name: bytes, value: bytes) -> bool:
        return False

    def check_port_forward_request(self, address: str, port: int) -> bool:
        self._refuse("remote port forwarding")
        return False

    def check_channel_direct_tcpip_request(self, chanid: int, origin: Any, destination: Any) -> int:
        log.warning("ssh %s: refused direct-tcpip (port forwarding) to %s", self.peer, destination)
        return _OPEN_PROHIBITED

    def check_global_request(self, kind: str, msg: Any) -> bool:
        return False


def _wait(transport: paramiko.Transport, event: threading.Event, deadline: float) -> bool:
    """Wait for ``event`` until the deadline; give up early if the connection dies."""
    while not event.wait(min(0.25, max(0.0, deadline - time.monotonic()))):
        if not transport.is_active() or time.monotonic() >= deadline:
            return False
    return True


#: Ciphers asked for first: AES-GCM authenticates as it encrypts, where
#: paramiko's default (aes128-ctr + hmac-sha2-256) computes a separate HMAC in
#: Python-driven calls per packet, its largest cost in bulk transfers.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


def _new_transport(sock: socket.socket, timeout: float, server: bool = False) -> paramiko.Transport:
    t = paramiko.Transport(sock, default_window_size=WINDOW_SIZE,
                           default_max_packet_size=SERVER_MAX_PACKET_SIZE if server else MAX_PACKET_SIZE)
    if server:
        # per connection: the class attributes are paramiko's defaults
        t.packetizer.REKEY_BYTES = REKEY_BYTES
    t.set_log_channel(PARAMIKO_LOGGER)
    t.banner_timeout = t.handshake_timeout = t.auth_timeout = timeout
    opts = t.get_security_options()
    available = list(opts.ciphers)
    first = [c for c in PREFERRED_CIPHERS if c in available]
    if first:
        opts.ciphers = first + [c for c in available if c not in first]
    return t


class SshServer:
    """The embedded SSH server: accepts connections and hands each
    authenticated ``remsh`` subsystem channel, as a :class:`ChannelStream`
    whose ``identity`` is the slave name of the key used, to ``handler``.

    ``handler(stream)`` runs in the connection's worker thread and must
    return once the connection is registered or refused.  One time limit,
    ``handshake_timeout`` from the TCP connection, covers the SSH
    negotiation, authentication and channel set-up *and* the remsh
    handshake that follows (the stream's ``handshake_deadline``).  Unfinished
    connections are bounded as by :class:`~remsh.transports.tcp.TcpServer`
    (``max_pending`` in all, ``max_pending_per_address`` from one address,
    the oldest quiet one dropped to make room); a client that has sent its
    SSH identification line counts as heard from.

    :raises UsageError: the host key cannot be loaded
    """

    def __init__(self, handler: Callable[[ChannelStream], None], *, host_key: KeyLike,
                 authorized_keys: Union[str, "os.PathLike[str]"], host: Optional[str] = None, port: int = 0,
                 max_pending: int = DEFAULT_MAX_PENDING,
                 max_pending_per_address: int = DEFAULT_MAX_PENDING_PER_ADDRESS,
                 handshake_timeout: float = 10.0,
                 keepalive_interval: int = KEEPALIVE_INTERVAL,
                 tcp_keepalive: Optional[Tuple[int, int, int]] = DEFAULT_KEEPALIVE) -> None:
        self.handler = handler
        self.host_key = _as_key(host_key)
        if not self.host_key.can_sign():
            raise UsageError("the SSH host key must be a private key")
        self.authorized_keys = AuthorizedKeys(authorized_keys)
        self.handshake_timeout = handshake_timeout
        self.keepalive_interval = keepalive_interval
        self._tcp = TcpServer(self._on_connection, host=host, port=port, max_pending=max_pending,
                              max_pending_per_address=max_pending_per_address,
                              handshake_timeout=handshake_timeout, keepalive=tcp_keepalive)
        self.port = port

    def start(self) -> None:
        """Bind, listen and accept in the background; ``port`` then holds the bound port."""
        if not os.access(self.authorized_keys.path, os.R_OK):
            log.warning("authorized keys file %s is not readable: every slave will be refused",
                        self.authorized_keys.path)
        self._tcp.start()
        self.port = self._tcp.port
        log.info("SSH host key %s %s", self.host_key.get_name(), host_key_fingerprint(self.host_key))

    def stop(self) -> None:
        """Stop accepting and drop unfinished handshakes (idempotent)."""
        self._tcp.stop()

    @property
    def pending_count(self) -> int:
        """How many connections are unfinished now."""
        return self._tcp.pending_count

    def _on_connection(self, sock_stream: SocketStream) -> None:
        deadline = sock_stream.handshake_deadline
        if deadline is None:
            deadline = time.monotonic() + self.handshake_timeout
        sock, peer = sock_stream.sock, sock_stream.peer
        # An SSH client sends its identification line at once (RFC 4253,
        # 4.2): wait for its first byte before paying for a paramiko
        # transport, and from then on count the connection as heard from.
        if not _readable(sock, deadline):
            log.warning("ssh connection from %s dropped: nothing received within %g s", peer,
                        self.handshake_timeout)
            sock.close()
            return
        try:
            ended = not sock.recv(1, socket.MSG_PEEK)
        except OSError:
            ended = True
        if ended:  # closed, or cut to make room: no SSH transport for it
            sock.close()
            return
        self._tcp.mark_progress(sock)
        stream = self.negotiate(sock, peer, deadline=deadline)
        if stream is not None:
            self.handler(stream)

    def negotiate(self, sock: socket.socket, peer: str, *,
                  deadline: Optional[float] = None) -> Optional[ChannelStream]:
        """Run the server side of SSH on ``sock`` up to an open ``remsh``
        subsystem channel; ``None`` (connection closed, reason logged) on
        failure or when the deadline (``time.monotonic()`` value; default
        ``handshake_timeout`` from now) passes.  The stream returned carries
        that deadline as its ``handshake_deadline``, for the remsh handshake."""
        if deadline is None:
            deadline = time.monotonic() + self.handshake_timeout
        t = _new_transport(sock, max(0.001, deadline - time.monotonic()), server=True)
        policy = _ServerPolicy(self.authorized_keys, peer)
        try:
            t.add_server_key(self.host_key)
            negotiated = threading.Event()
            t.start_server(event=negotiated, server=policy)
            if not _wait(t, negotiated, deadline) or not t.is_active():
                raise Disconnected("SSH negotiation failed or timed out")
            if not _wait(t, policy.subsystem_started, deadline):
                raise Disconnected("no remsh subsystem channel opened in time")
            chan = t.accept(max(0.0, deadline - time.monotonic()))
            if chan is None or chan.get_id() != policy.session_id:
                raise Disconnected("channel vanished")
            t.set_keepalive(self.keepalive_interval)
            stream = ChannelStream(chan, peer=f"{peer} (ssh)", identity=policy.identity)
            stream.handshake_deadline = deadline
            return stream
        except Exception as e:  # noqa: BLE001 - one connection must never stop the listener
            log.warning("ssh connection from %s dropped: %s", peer, str(e) or type(e).__name__)
            t.close()
            return None


def _readable(sock: socket.socket, deadline: float) -> bool:
    """Wait until ``sock`` has input (or end of stream) or the deadline passes."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            if poller.poll(left * 1000.0):
                return True
        except InterruptedError:
            continue


# -- slave side ----------------------------------------------------------------------


class _Watchdog:
    """Closes a transport if set-up is not over after ``seconds``: some
    paramiko waits (subsystem requests) have no time limit of their own."""

    def __init__(self, transport: paramiko.Transport, seconds: float) -> None:
        self.fired = False
        self._transport = transport
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        self._transport.close()

    def __enter__(self) -> "_Watchdog":
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


def _load_identity(path: Union[str, "os.PathLike[str]"]) -> paramiko.PKey:
    try:
        return load_private_key(path)
    except UsageError as e:
        raise AuthenticationError(f"identity: {e}") from None


def _load_known_hosts(path: Union[str, "os.PathLike[str]"]) -> Tuple[paramiko.HostKeys, Set[bytes]]:
    """The trusted host keys and the blobs of ``@revoked`` keys."""
    path = os.fspath(path)
    hostkeys = paramiko.HostKeys()
    revoked: Set[bytes] = set()
    try:
        hostkeys.load(path)
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 4 and fields[0] == "@revoked":
                    try:
                        revoked.add(base64.b64decode(fields[3]))
                    except binascii.Error:
                        pass
    except OSError as e:
        raise AuthenticationError(f"cannot read known hosts file {path}: {e.strerror or e}") from None
    return hostkeys, revoked


def _prefer_known_key_types(t: paramiko.Transport, known: Optional[Mapping[str, paramiko.PKey]]) -> None:
    """Ask first for the host key types we hold for this server, so that a
    server with several host keys shows the one we can check."""
    if not known:
        return
    prefer: List[str] = []
    for ktype in known:
        prefer += ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"] if ktype == "ssh-rsa" else [ktype]
    opts = t.get_security_options()
    available = list(opts.key_types)
    first = [k for k in prefer if k in available]
    if first:
        opts.key_types = first + [k for k in available if k not in first]


def _check_host_key(key: paramiko.PKey, known: Optional[Mapping[str, paramiko.PKey]], revoked: Set[bytes],
                    name: str, path: str) -> None:
    fp = f"{key.get_name()} {host_key_fingerprint(key)}"
    if key.asbytes() in revoked:
        raise AuthenticationError(f"host key of {name} ({fp}) is marked @revoked in {path}")
    if not known:
        raise AuthenticationError(f"host key of {name} is unknown: {fp} is not in {path} (nothing added)")
    trusted = known.get(key.get_name())
    if trusted is None:
        raise AuthenticationError(f"host key of {name} is unknown: {fp} is not in {path}, which holds only "
                                  f"{', '.join(sorted(known))} keys for it (nothing added)")
    if trusted.asbytes() != key.asbytes():
        raise AuthenticationError(f"HOST KEY CHANGED for {name}: the server shows {fp}, but {path} holds "
                                  f"{host_key_fingerprint(trusted)}; refusing to connect")


def _login(user: str, host: str, port: int, identity: Union[str, "os.PathLike[str]"],
           known_hosts: Union[str, "os.PathLike[str]"], timeout: float) -> paramiko.Transport:
    """Connect, pin the host key and authenticate with the identity key."""
    pkey = _load_identity(identity)
    hostkeys, revoked = _load_known_hosts(known_hosts)
    name = known_hosts_name(host, port)
    known = hostkeys.lookup(name)
    where = f"{user}@{_format_addr((host, port))}"
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        tune_socket(sock, send_timeout=None, keepalive=DEFAULT_KEEPALIVE)
        t = _new_transport(sock, timeout)
    except BaseException:
        sock.close()
        raise
    try:
        with _Watchdog(t, timeout) as dog:
            try:
                _prefer_known_key_types(t, known)
                t.start_client(timeout=timeout)
                _check_host_key(t.get_remote_server_key(), known, revoked, name, os.fspath(known_hosts))
                t.auth_publickey(user, pkey)
            except paramiko.AuthenticationException as e:
                raise AuthenticationError(f"ssh {where} refused key {host_key_fingerprint(pkey)} "
                                          f"from {os.fspath(identity)}: {e}") from None
            except (paramiko.SSHException, EOFError) as e:
                why = f"timed out after {timeout:g} s" if dog.fired else str(e) or type(e).__name__
                raise Disconnected(f"ssh {where}: {why}") from e
        if not t.is_authenticated():
            raise AuthenticationError(f"ssh {where}: authentication did not complete")
        return t
    except BaseException:
        t.close()
        raise


def _open(t: paramiko.Transport, where: str, timeout: float, opener: Callable[[], paramiko.Channel]
          ) -> paramiko.Channel:
    try:
        with _Watchdog(t, timeout) as dog:
            try:
                chan = opener()
            except (paramiko.SSHException, EOFError) as e:
                why = f"timed out after {timeout:g} s" if dog.fired else str(e) or type(e).__name__
                raise Disconnected(f"ssh {where}: {why}") from e
        t.set_keepalive(KEEPALIVE_INTERVAL)
        return chan
    except BaseException:
        t.close()
        raise


def connect_embedded(user: str, host: str, port: int = 22, *, identity: Union[str, "os.PathLike[str]"],
                     known_hosts: Union[str, "os.PathLike[str]"],
                     timeout: float = DEFAULT_CONNECT_TIMEOUT) -> ChannelStream:
    """Dial a master's embedded SSH server and open the ``remsh`` subsystem.

    The server's host key must be in ``known_hosts`` under ``host`` (or
    ``[host]:port``); ``identity`` is the slave's private key.  ``timeout``
    bounds the TCP connect and the whole SSH set-up.

    :raises AuthenticationError: unknown, changed or revoked host key, an
        unusable identity or known-hosts file, or the key was refused
    :raises Disconnected: SSH failed or timed out, or the subsystem was refused
    :raises OSError: the TCP connection could not be made
    """
    t = _login(user, host, port, identity, known_hosts, timeout)
    where = f"{user}@{_format_addr((host, port))}"

    def opener() -> paramiko.Channel:
        chan = t.open_session(window_size=WINDOW_SIZE, max_packet_size=MAX_PACKET_SIZE, timeout=timeout)
        chan.invoke_subsystem(SUBSYSTEM)
        return chan

    chan = _open(t, where, timeout, opener)
    return ChannelStream(chan, peer=f"ssh {where}")


def connect_via(user: str, host: str, port: int = 22, *, identity: Union[str, "os.PathLike[str]"],
                known_hosts: Union[str, "os.PathLike[str]"], dest_host: str, dest_port: int,
                timeout: float = DEFAULT_CONNECT_TIMEOUT) -> ChannelStream:
    """Log in to an OpenSSH server and open a tunnel (``direct-tcpip``) from
    it to ``dest_host:dest_port`` (typically the master's TCP listener on
    that machine's loopback).  Host key and identity as for
    :func:`connect_embedded`.

    :raises AuthenticationError: as for :func:`connect_embedded`
    :raises Disconnected: SSH failed or timed out, or the server could not
        (or would not) open the tunnel
    :raises OSError: the TCP connection could not be made
    """
    if not dest_host or not dest_port:
        raise UsageError("connect_via needs dest_host and dest_port")
    t = _login(user, host, port, identity, known_hosts, timeout)
    where = f"{user}@{_format_addr((host, port))}"
    dest = _format_addr((dest_host, dest_port))

    def opener() -> paramiko.Channel:
        try:
            return t.open_channel("direct-tcpip", dest_addr=(dest_host, dest_port), src_addr=("127.0.0.1", 0),
                                  window_size=WINDOW_SIZE, max_packet_size=MAX_PACKET_SIZE, timeout=timeout)
        except paramiko.ChannelException as e:
            raise Disconnected(f"ssh {where} could not open a tunnel to {dest}: {e.text} (code {e.code})") from e

    chan = _open(t, where, timeout, opener)
    return ChannelStream(chan, peer=f"{dest} via ssh {where}")
