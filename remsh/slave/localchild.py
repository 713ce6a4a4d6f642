"""Entry point of a local slave child (see :mod:`remsh.transports.local`)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from typing import List, Optional

from remsh.errors import RemshError
from remsh.handshake import slave_handshake
from remsh.secretfile import scrub_env_secret
from remsh.slave.server import SlaveServer
from remsh.slave.sigterm import sigterm_unwinds
from remsh.transports.base import SocketStream
from remsh.wire import Wire


def main(argv: Optional[List[str]] = None) -> int:
    """Serve the master over the inherited socket ``--fd``; returns the exit status."""
    # A local child needs no secret; one inherited from the master's
    # environment must not reach getenv() or the commands this child runs.
    scrub_env_secret()
    parser = argparse.ArgumentParser(prog="remsh-localchild")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--basedir", required=True)
    parser.add_argument("--name")
    args = parser.parse_args(argv)
    # keep the child's stdio clean: nothing printed may reach the protocol
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    logging.basicConfig(level=os.environ.get("REMSH_SLAVE_LOGLEVEL", "WARNING"),
                        format="remsh-slave[%(process)d] %(levelname)s %(name)s: %(message)s")
    with sigterm_unwinds():
        sock = socket.socket(fileno=args.fd)
        wire = Wire(SocketStream(sock, peer="master", send_timeout=None), label="master")
        name = args.name or f"local-{os.getpid()}"
        try:
            slave_handshake(wire, name, secret=None, basedir=args.basedir)
            SlaveServer(wire, args.basedir).serve()
        except RemshError as e:
            logging.getLogger("remsh.slave").warning("connection ended: %s", e)
            return 1
        finally:
            wire.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
