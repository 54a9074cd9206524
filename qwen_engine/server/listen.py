"""The listening socket of `qwen serve`, taken before the model loads: a port that is in use fails in a second,
not after the load."""

from __future__ import annotations

import errno
import socket

from ..errors import QwenError

BACKLOG = 2048  # uvicorn's default


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port and listening (connections that come during the load wait in its backlog).

    Listening at once, not only binding, is what claims the port: with SO_REUSEADDR (set, as uvicorn sets it, so a
    restart is not refused while old connections linger) two sockets may bind one port until one of them listens.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP said outright: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on connections whose socket
    # says so, and with it on, a small response written in two parts waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise QwenError(f"cannot listen on {host}:{port}: another program is using that port; stop it or pick "
                            "another with --port") from None
        raise QwenError(f"cannot listen on {host}:{port} ({err.strerror or err}); check --host and --port") from None
    return sock
