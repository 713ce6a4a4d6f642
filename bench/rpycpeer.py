"""The RPyC peer: a ``ThreadedServer`` exposing one trivial call.

Prints its TCP port, then serves until killed.  TCP_NODELAY is set on every
connection (the client sets it too), so RPyC is measured at its best.
"""

from __future__ import annotations

import socket
import sys

import rpyc
from rpyc.utils.server import ThreadedServer


class BenchService(rpyc.Service):
    def on_connect(self, conn):  # noqa: ANN001 - rpyc's signature
        sock = getattr(conn._channel.stream, "sock", None)
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def exposed_ping(self, data):  # noqa: ANN001
        return b"\0\0"


def main() -> int:
    server = ThreadedServer(BenchService, hostname="127.0.0.1", port=0,
                            protocol_config={"allow_public_attrs": False})
    print(server.port, flush=True)
    server.start()
    return 0


if __name__ == "__main__":
    sys.exit(main())
