"""SSH for the slave through the system's OpenSSH client (``ssh``).

The slave's two ways of dialling out over SSH, as in
:mod:`remsh.transports.ssh`, but carried by a child ``ssh`` process instead
of paramiko:

* :func:`connect_embedded` runs ``ssh -s -l USER [-p PORT] HOST remsh``: the
  master's embedded SSH server's ``remsh`` subsystem;
* :func:`connect_via` runs ``ssh -W DEST_HOST:DEST_PORT -l USER [-p PORT]
  HOST``: a tunnel through a stock OpenSSH server to the master's TCP
  listener (whose own handshake, with the shared secret, then runs through
  it).

Why the system client: OpenSSH frames and encrypts in C, in a process of its
own (so on another CPU than the slave's Python), and it honours everything a
user has set up for SSH already: ``~/.ssh/config`` host aliases,
``ProxyJump`` through a bastion, the agent, certificates, hardware keys.

**Never a prompt.**  ``ssh`` always runs with ``BatchMode=yes`` (no
passphrase, password or host-key question: it fails instead) and
``StrictHostKeyChecking=yes`` with ``UpdateHostKeys=no`` (a host key that is
not already trusted ends the attempt; nothing is ever added).  With a
``known_hosts`` file given, that file alone is trusted for the server
(``UserKnownHostsFile=FILE``, ``GlobalKnownHostsFile=/dev/null``); with an
identity file, that key alone is offered (``-i FILE``,
``IdentitiesOnly=yes``).  Without them the user's configuration decides
(``-F FILE`` passes another configuration file).  Whatever the
configuration says, remsh's connection forwards nothing
(``ClearAllForwardings``, no agent or X11 forwarding), asks for no terminal
(``-T``), has no escape character (``-e none``) and is not multiplexed over
a shared connection (``ControlPath=none``): its lifetime is the child's.
Nothing secret is ever on ``ssh``'s command line: the key file is named,
never its contents, and the remsh shared secret travels inside the stream.

**The stream** (:class:`OpenSshStream`) is one end of a Unix socket pair
whose other end is the child's standard input *and* output.  It is a
:class:`~remsh.transports.base.SocketStream` (one descriptor for
``fileno()``, kernel time limits on sends and receives, ``shutdown()``
wakes every waiter including a ``select`` on ``fileno()``) that also owns
the child: :meth:`~OpenSshStream.abort` kills it, :meth:`~OpenSshStream.close`
lets it end on its own for a moment and then kills and reaps it.  Rejected:
two pipes (the child's stdin and stdout).  The stream would then have two
descriptors, ``shutdown()`` could not make the read side readable for a
thread selecting on it (only the child's exit does), and closing a pipe
under a thread blocked on it risks that thread using a reused descriptor.
``ssh`` treats a socket on its standard input and output as it treats
pipes.

**Errors.**  ``ssh`` is not run with ``-q``: what it says on standard error
is collected (the last :data:`STDERR_LIMIT` bytes, by a thread the stream
owns) and a failed start becomes a remsh error that carries it:
:class:`~remsh.errors.AuthenticationError` for a host key that is unknown,
changed or revoked, a key refused, or a key that needs a passphrase (with
``BatchMode``, such a key works only from the agent); and
:class:`~remsh.errors.Disconnected` for a server that cannot be reached, a
tunnel the server would not open, or a refused subsystem.  The connect
functions return once the server has sent its first byte (a remsh master
speaks first, at once), so a failure to log in is reported by them, not as
an end of stream later.
"""

from __future__ import annotations

import base64
import binascii
import collections
import errno
import logging
import math
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from typing import Deque, List, Optional, Sequence, Tuple, Union

from remsh.errors import AuthenticationError, Disconnected, UsageError
from remsh.transports.base import DEFAULT_SEND_TIMEOUT, SocketStream, _format_addr

log = logging.getLogger(__name__)

#: Name of the SSH subsystem that carries remsh on the embedded server.
SUBSYSTEM = "remsh"
#: Seconds without traffic from the server after which ``ssh`` asks it for
#: a sign of life (``ServerAliveInterval``) ...
SERVER_ALIVE_INTERVAL = 10
#: ... and how many unanswered ones end the connection (``ServerAliveCountMax``).
SERVER_ALIVE_COUNT = 3
#: How much of ``ssh``'s standard error is kept (the last bytes).
STDERR_LIMIT = 8 * 1024
#: Seconds :meth:`OpenSshStream.close` lets ``ssh`` end on its own (after
#: the end of its input) before it is killed.
CLOSE_GRACE = 2.0
#: Bound on reaping a killed ``ssh`` and on its standard error's last bytes.
REAP_TIMEOUT = 5.0
#: Socket buffers of the pair between the slave and ``ssh`` (bytes).
SOCKET_BUFFER = 1024 * 1024
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Ciphers put first for the embedded server (AES-GCM authenticates as it
#: encrypts: the cheapest for paramiko's Python packet loop).
EMBEDDED_CIPHERS = "aes128-gcm@openssh.com,aes256-gcm@openssh.com"

PathLike = Union[str, "os.PathLike[str]"]


def find_ssh() -> Optional[str]:
    """The path of the system's ``ssh`` program, or ``None`` when it is not on ``PATH``."""
    return shutil.which("ssh")


# -- the command line ---------------------------------------------------------------


def _config_path(path: PathLike) -> str:
    """``path`` as an ``ssh -o`` value: absolute, ``%`` escaped (ssh expands
    ``%`` tokens in these file names), quoted if it holds white space."""
    p = os.path.abspath(os.fspath(path))
    if '"' in p or "\n" in p:
        raise UsageError(f"file name {p!r} cannot be passed to ssh")
    p = p.replace("%", "%%")
    return f'"{p}"' if any(c.isspace() for c in p) else p


def _check_name(what: str, value: str) -> None:
    if not value or value.startswith("-") or any(c.isspace() or ord(c) < 32 for c in value):
        raise UsageError(f"invalid SSH {what} {value!r}")


def ssh_command(user: str, host: str, port: Optional[int] = None, *,
                identity: Optional[PathLike] = None, known_hosts: Optional[PathLike] = None,
                config: Optional[PathLike] = None, tunnel_to: Optional[Tuple[str, int]] = None,
                timeout: float = DEFAULT_CONNECT_TIMEOUT, program: str = "ssh") -> List[str]:
    """The ``ssh`` command line for one remsh connection.

    Without ``tunnel_to`` it opens the ``remsh`` subsystem on ``host``; with
    ``tunnel_to=(dest_host, dest_port)`` it forwards standard input and
    output to that address as seen from ``host`` (``-W``).  ``port=None``
    leaves the port to the configuration (default 22).

    :raises UsageError: a user, host or file name that cannot be passed safely
    """
    _check_name("user", user)
    _check_name("host", host)
    argv = [program, "-T", "-e", "none", "-x", "-a",
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "UpdateHostKeys=no",
            "-o", f"ConnectTimeout={max(1, math.ceil(timeout))}",
            "-o", f"ServerAliveInterval={SERVER_ALIVE_INTERVAL}",
            "-o", f"ServerAliveCountMax={SERVER_ALIVE_COUNT}",
            "-o", "ClearAllForwardings=yes",
            "-o", "ControlPath=none",
            "-o", "PermitLocalCommand=no"]
    if config is not None:
        argv[1:1] = ["-F", os.path.abspath(os.fspath(config))]
    if known_hosts is not None:
        argv += ["-o", f"UserKnownHostsFile={_config_path(known_hosts)}",
                 "-o", "GlobalKnownHostsFile=/dev/null"]
    if identity is not None:
        argv += ["-i", os.path.abspath(os.fspath(identity)).replace("%", "%%"), "-o", "IdentitiesOnly=yes"]
    if port is not None:
        argv += ["-p", str(int(port))]
    argv += ["-l", user]
    if tunnel_to is None:
        # the embedded server is paramiko, which has no chacha20-poly1305
        # (OpenSSH's first choice): without this it would get aes128-ctr
        # with a separate MAC, which costs it about a third of its speed
        argv += ["-o", f"Ciphers=^{EMBEDDED_CIPHERS}", "-s", host, SUBSYSTEM]
    else:
        dest_host, dest_port = tunnel_to
        _check_name("tunnel destination", dest_host)
        argv += ["-W", _format_addr((dest_host, int(dest_port))), host]
    return argv


# -- what ssh says ------------------------------------------------------------------


class _StderrTail:
    """Reads a child's standard error to its end in a thread of its own,
    keeping the last :data:`STDERR_LIMIT` bytes (a child that says more
    must never block on a full pipe)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._chunks: Deque[bytes] = collections.deque()
        self._size = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="remsh-ssh-stderr", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                try:
                    chunk = os.read(self._fd, 4096)
                except InterruptedError:
                    continue
                except OSError:
                    break
                if not chunk:
                    break
                with self._lock:
                    self._chunks.append(chunk)
                    self._size += len(chunk)
                    while self._size - len(self._chunks[0]) >= STDERR_LIMIT:
                        self._size -= len(self._chunks.popleft())
        finally:
            os.close(self._fd)

    def join(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) for the end of the child's standard error."""
        if self._thread.is_alive():
            self._thread.join(timeout)

    def text(self) -> str:
        """The last bytes seen, decoded."""
        with self._lock:
            data = b"".join(self._chunks)[-STDERR_LIMIT:]
        return data.decode("utf-8", "replace")


_BANNER = re.compile(r"^(@+|@ .* @|IT IS POSSIBLE.*|Someone could be.*|It is also possible.*|"
                     r"Please contact your system administrator\.|\s*remove with:|\s*ssh-keygen -f .*)$")


def _summary(text: str, lines: int = 3) -> str:
    """The last few meaningful lines of what ``ssh`` said, on one line."""
    kept = [ln.strip() for ln in text.splitlines() if ln.strip() and not _BANNER.match(ln)]
    return "; ".join(kept[-lines:]) or "no message"


def _fingerprints(text: str) -> List[str]:
    return re.findall(r"SHA256:[A-Za-z0-9+/]{43}", text)


def key_needs_passphrase(path: PathLike) -> bool:
    """True when the private key file ``path`` is encrypted (OpenSSH or PEM
    format); False when it is not, or cannot be read or understood."""
    try:
        with open(path, "rb") as f:
            head = f.read(64 * 1024)
    except OSError:
        return False
    if b"Proc-Type: 4,ENCRYPTED" in head or b"BEGIN ENCRYPTED PRIVATE KEY" in head:
        return True
    begin, end = b"-----BEGIN OPENSSH PRIVATE KEY-----", b"-----END OPENSSH PRIVATE KEY-----"
    if begin not in head or end not in head:
        return False
    body = head.split(begin, 1)[1].split(end, 1)[0]
    try:
        blob = base64.b64decode(b"".join(body.split()), validate=True)
    except binascii.Error:
        return False
    magic = b"openssh-key-v1\0"
    if not blob.startswith(magic) or len(blob) < len(magic) + 4:
        return False
    n = int.from_bytes(blob[len(magic):len(magic) + 4], "big")
    cipher = blob[len(magic) + 4:len(magic) + 4 + n]
    return cipher != b"none"


def _key_fingerprint(path: PathLike) -> Optional[str]:
    """The fingerprint of the key file as ``ssh-keygen -l`` prints it, or ``None``."""
    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        return None
    try:
        out = subprocess.run([keygen, "-l", "-E", "sha256", "-f", os.fspath(path)], stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, timeout=REAP_TIMEOUT)
    except (OSError, subprocess.SubprocessError):
        return None
    found = _fingerprints(out.stdout)
    return found[0] if out.returncode == 0 and found else None


class _Attempt:
    """What one connection attempt was for, to turn ``ssh``'s words into a remsh error."""

    def __init__(self, argv: Sequence[str], where: str, identity: Optional[PathLike],
                 known_hosts: Optional[PathLike], dest: Optional[str]) -> None:
        self.argv = list(argv)
        self.where = where
        self.identity = identity
        self.known_hosts = known_hosts
        self.dest = dest

    def _known_hosts_name(self) -> str:
        return os.fspath(self.known_hosts) if self.known_hosts is not None else "the known hosts files"

    def _offered_host_key(self, timeout: float) -> Optional[str]:
        """The host key fingerprint the server shows, from ``ssh -v`` run
        once more (it fails again at the host key, before any login)."""
        argv = self.argv[:1] + ["-v"] + self.argv[1:]
        try:
            out = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, timeout=timeout, start_new_session=True)
        except (OSError, subprocess.SubprocessError):
            return None
        text = out.stderr[-64 * 1024:].decode("utf-8", "replace")
        lines = [ln for ln in text.splitlines() if "Server host key:" in ln]
        found = _fingerprints(lines[-1]) if lines else []
        return found[0] if found else None

    def error(self, status: Optional[int], text: str, timeout: float) -> Exception:
        """The remsh error for an ``ssh`` that ended (``status``) having said ``text``."""
        summary = _summary(text)
        where = self.where
        if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text or "has changed and you have requested strict" in text:
            changed = re.search(r"Host key for (\S+) has changed", text)
            name = changed.group(1) if changed else where
            prints = _fingerprints(text)
            fp = f"shows {prints[0]}" if prints else "shows another key"
            return AuthenticationError(f"HOST KEY CHANGED for {name}: the server {fp}, which "
                                       f"{self._known_hosts_name()} does not hold for it; refusing to connect")
        unknown = re.search(r"No (\S+) host key is known for (\S+) and you have requested strict", text)
        if unknown:
            offered = self._offered_host_key(timeout)
            shown = f"{unknown.group(1)} {offered}" if offered else f"its {unknown.group(1)} key"
            return AuthenticationError(f"host key of {unknown.group(2)} is unknown: {shown} is not in "
                                       f"{self._known_hosts_name()} (nothing added)")
        if "Host key verification failed" in text or "REVOKED HOST KEY" in text:
            return AuthenticationError(f"ssh {where}: host key refused: {summary}")
        if "Permission denied" in text or "Too many authentication failures" in text:
            if self.identity is not None and key_needs_passphrase(self.identity):
                return AuthenticationError(
                    f"ssh {where}: identity {os.fspath(self.identity)} needs a passphrase, and remsh runs ssh "
                    "with BatchMode=yes, which never asks for one: load the key into ssh-agent (ssh-add) "
                    f"or use a key without passphrase ({summary})")
            if self.identity is not None:
                key_fp = _key_fingerprint(self.identity) or "(fingerprint unknown)"
                return AuthenticationError(f"ssh {where} refused key {key_fp} from {os.fspath(self.identity)}: "
                                           f"{summary}")
            return AuthenticationError(f"ssh {where}: no key was accepted: {summary}")
        if self.dest is not None and ("open failed" in text or "stdio forwarding failed" in text):
            failed = re.search(r"open failed: (.*)", text)
            why = failed.group(1).strip() if failed else summary
            return Disconnected(f"ssh {where} could not open a tunnel to {self.dest}: {why}")
        if "subsystem request failed" in text:
            return Disconnected(f"ssh {where} refused the {SUBSYSTEM} subsystem (not a remsh master's SSH "
                                f"port?): {summary}")
        how = f"status {status}" if status is not None else "still running"
        return Disconnected(f"ssh {where} ended ({how}) before the server spoke: {summary}")


# -- the stream ----------------------------------------------------------------------


class OpenSshStream(SocketStream):
    """A :class:`~remsh.transports.base.StreamLike` over a child ``ssh``
    process: one end of a Unix socket pair whose other end is the child's
    standard input and output.

    ``fileno()`` is that socket; sends and receives are those of
    :class:`~remsh.transports.base.SocketStream`.  ``shutdown()`` ends both
    directions of the socket (``ssh`` then sends end of stream to the
    server and ends); ``abort()`` also kills ``ssh`` (the server sees the
    connection end at once); ``close()`` shuts down, gives ``ssh``
    :data:`CLOSE_GRACE` seconds to end, kills it if it has not, and reaps it.
    """

    def __init__(self, sock: socket.socket, proc: "subprocess.Popen[bytes]", stderr: _StderrTail, *,
                 peer: str, send_timeout: Optional[float] = DEFAULT_SEND_TIMEOUT) -> None:
        super().__init__(sock, peer=peer, send_timeout=send_timeout)
        self.proc = proc
        self._stderr = stderr
        self._killed = False
        self._closed = False
        self._lock = threading.Lock()

    @property
    def ssh_stderr(self) -> str:
        """The last bytes ``ssh`` wrote to its standard error."""
        return self._stderr.text()

    def _kill(self) -> None:
        with self._lock:
            if self.proc.poll() is not None:
                return
            self._killed = True
            try:
                self.proc.send_signal(signal.SIGKILL)
            except OSError:
                pass

    def abort(self) -> None:
        """Kill ``ssh`` now: the server sees the connection end at once, and
        what is still queued is thrown away."""
        self._kill()
        super().abort()

    def close(self) -> None:
        """Shut down, let ``ssh`` end (bounded), kill it if it did not,
        reap it and release the socket; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.shutdown()
        try:
            self.proc.wait(CLOSE_GRACE)
        except subprocess.TimeoutExpired:
            self._kill()
            try:
                self.proc.wait(REAP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.error("ssh (pid %d) for %s did not end after SIGKILL", self.proc.pid, self.peer)
        self.sock.close()
        self._stderr.join(1.0)
        # a failed start is reported by the exception that carries ssh's
        # words; later, the end of the stream already told the caller
        status = self.proc.returncode
        if status not in (0, None) and not self._killed:
            log.info("ssh for %s ended with status %s: %s", self.peer, status, _summary(self._stderr.text()))
        else:
            log.debug("ssh for %s ended (status %s)", self.peer, status)


def _await_first_byte(sock: socket.socket, deadline: float) -> bool:
    """Wait until the server's first byte (True) or the end of the stream
    (False) arrives; ``TimeoutError`` past ``deadline``."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(errno.ETIMEDOUT, "timed out")
        if poller.poll(left * 1000.0):
            try:
                return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
            except BlockingIOError:
                continue
            except OSError:
                return False


def _start(argv: List[str], attempt: _Attempt, peer: str, timeout: float) -> OpenSshStream:
    deadline = time.monotonic() + timeout
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (ours, theirs):
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                s.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            except OSError:
                pass
    try:
        # a session of its own: no terminal to open for a prompt, and the
        # slave's Ctrl-C reaches the slave, which then closes ssh itself
        proc = subprocess.Popen(argv, stdin=theirs.fileno(), stdout=theirs.fileno(), stderr=subprocess.PIPE,
                                close_fds=True, start_new_session=True)
    except OSError as e:
        ours.close()
        raise Disconnected(f"cannot run {argv[0]}: {e.strerror or e}") from e
    finally:
        theirs.close()
    assert proc.stderr is not None
    stderr = _StderrTail(os.dup(proc.stderr.fileno()))
    proc.stderr.close()
    stderr.start()
    stream = OpenSshStream(ours, proc, stderr, peer=peer)
    log.debug("started ssh (pid %d) for %s", proc.pid, peer)
    try:
        spoke = _await_first_byte(ours, deadline)
    except TimeoutError:
        stream.abort()
        stream.close()
        raise Disconnected(f"ssh {attempt.where}: timed out after {timeout:g} s "
                           f"({_summary(stderr.text())})") from None
    except BaseException:
        stream.abort()
        stream.close()
        raise
    if spoke:
        return stream
    # the end of the stream before any byte: ssh failed; say why
    try:
        status: Optional[int] = proc.wait(max(0.5, min(REAP_TIMEOUT, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        status = None
    stream.abort()
    stream.close()
    raise attempt.error(status, stderr.text(), max(1.0, min(timeout, REAP_TIMEOUT)))


def _check_file(what: str, path: Optional[PathLike]) -> None:
    if path is not None and not os.access(path, os.R_OK):
        raise AuthenticationError(f"cannot read {what} file {os.fspath(path)}: "
                                  f"{os.strerror(errno.ENOENT if not os.path.exists(path) else errno.EACCES)}")


def _prepare(user: str, host: str, port: Optional[int], identity: Optional[PathLike],
             known_hosts: Optional[PathLike], config: Optional[PathLike], program: Optional[str]) -> str:
    _check_file("known hosts", known_hosts)
    _check_file("identity", identity)
    if config is not None and not os.access(config, os.R_OK):
        raise UsageError(f"cannot read ssh configuration file {os.fspath(config)}")
    found = program or find_ssh()
    if not found:
        raise UsageError("the OpenSSH client (ssh) is not installed or not on PATH")
    return found


def _where(user: str, host: str, port: Optional[int]) -> str:
    return f"{user}@{_format_addr((host, port))}" if port is not None else f"{user}@{host}"


def connect_embedded(user: str, host: str, port: Optional[int] = None, *,
                     identity: Optional[PathLike] = None, known_hosts: Optional[PathLike] = None,
                     config: Optional[PathLike] = None, timeout: float = DEFAULT_CONNECT_TIMEOUT,
                     program: Optional[str] = None) -> OpenSshStream:
    """Run ``ssh`` to a master's embedded SSH server and open its ``remsh``
    subsystem.

    ``host`` may be an alias of the ``ssh`` configuration (``~/.ssh/config``,
    or ``config``), and ``port`` ``None`` to take the configuration's.
    ``identity`` and ``known_hosts``, when given, are the only key offered
    and the only host keys trusted.  ``timeout`` bounds the whole set-up,
    up to the master's first byte.  ``program`` is the ``ssh`` to run
    (default: ``ssh`` on ``PATH``).

    :raises AuthenticationError: the host key is unknown, changed or
        revoked; the key was refused or needs a passphrase; a given
        identity or known hosts file cannot be read
    :raises Disconnected: the server could not be reached, refused the
        subsystem, or did not speak within ``timeout``
    :raises UsageError: no ``ssh`` program, an unreadable ``config``, or
        names that cannot be passed to ``ssh``
    """
    found = _prepare(user, host, port, identity, known_hosts, config, program)
    argv = ssh_command(user, host, port, identity=identity, known_hosts=known_hosts, config=config,
                       timeout=timeout, program=found)
    where = _where(user, host, port)
    return _start(argv, _Attempt(argv, where, identity, known_hosts, None), f"openssh {where}", timeout)


def connect_via(user: str, host: str, port: Optional[int] = None, *, dest_host: str, dest_port: int,
                identity: Optional[PathLike] = None, known_hosts: Optional[PathLike] = None,
                config: Optional[PathLike] = None, timeout: float = DEFAULT_CONNECT_TIMEOUT,
                program: Optional[str] = None) -> OpenSshStream:
    """Run ``ssh -W`` through an OpenSSH server to ``dest_host:dest_port``
    (typically the master's TCP listener on that machine's loopback).
    Everything else as for :func:`connect_embedded`.

    :raises AuthenticationError: as for :func:`connect_embedded`
    :raises Disconnected: the server could not be reached, or could not
        (or would not) open the tunnel
    :raises UsageError: as for :func:`connect_embedded`
    """
    if not dest_host or not dest_port:
        raise UsageError("connect_via needs dest_host and dest_port")
    found = _prepare(user, host, port, identity, known_hosts, config, program)
    argv = ssh_command(user, host, port, identity=identity, known_hosts=known_hosts, config=config,
                       tunnel_to=(dest_host, dest_port), timeout=timeout, program=found)
    where = _where(user, host, port)
    dest = _format_addr((dest_host, dest_port))
    return _start(argv, _Attempt(argv, where, identity, known_hosts, dest), f"{dest} via ssh {where} (openssh)",
                  timeout)
