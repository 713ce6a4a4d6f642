"""The local transport: a slave in a child process, over a socket pair.

The child is ``python -m remsh.slave.localchild``; it inherits one end of the
socket pair as a numbered file descriptor and talks the ordinary protocol
over it.  Its own stdin and stdout point at ``/dev/null``, so nothing a
library prints in the child can corrupt the stream.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from typing import List, Optional, Tuple

import remsh
from remsh.transports.base import SocketStream


def spawn_local_slave(basedir: str, name: Optional[str] = None, *, python: Optional[str] = None,
                      extra_args: Optional[List[str]] = None) -> Tuple["subprocess.Popen[bytes]", SocketStream]:
    """Start a slave child process; return it and the master's stream to it."""
    master_sock, child_sock = socket.socketpair()
    for sock in (master_sock, child_sock):
        _grow_buffers(sock)
    fd = child_sock.fileno()
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(remsh.__file__)))
    env = dict(os.environ)
    env.pop("REMSH_SECRET", None)  # the child is trusted and needs no secret
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    argv = [python or sys.executable, "-m", "remsh.slave.localchild", "--fd", str(fd),
            "--basedir", os.path.abspath(basedir)]
    if name is not None:
        argv += ["--name", name]
    argv += extra_args or []
    try:
        proc = subprocess.Popen(argv, pass_fds=(fd,), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, env=env, start_new_session=True)
    except BaseException:
        master_sock.close()
        raise
    finally:
        child_sock.close()
    return proc, SocketStream(master_sock, peer=f"local child pid {proc.pid}", send_timeout=None)


#: Socket pair buffer size asked for: the default (~200 KiB) is smaller than
#: one bulk write (16 data boxes), which makes the two ends take turns
#: instead of overlapping.  The kernel caps it at net.core.wmem_max/rmem_max.
SOCKETPAIR_BUFFER = 4 << 20


def _grow_buffers(sock: socket.socket) -> None:
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKETPAIR_BUFFER)
        except OSError:
            pass


def stop_child(proc: "subprocess.Popen[bytes]", grace: float = 2.0) -> None:
    """End a slave child: SIGTERM (it kills its running command and exits),
    then SIGKILL after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            proc.kill()
        proc.wait()
    except ProcessLookupError:
        pass
