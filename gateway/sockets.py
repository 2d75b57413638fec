"""The socket option of the gateway's clients' connections and of its streaming calls to providers
(the lean client's small exchanges are bounded by their own deadlines)."""

from __future__ import annotations

import contextlib
import socket
from typing import Any

import aiohttp

_TCP_USER_TIMEOUT: int | None = getattr(socket, "TCP_USER_TIMEOUT", None)  # Linux only
_MAX_MILLISECONDS = 2**31 - 1  # the option is a C int: a longer timeout (24.8 days) is no timeout


def give_up_when_stalled(sock: Any, seconds: float) -> None:
    """Have the kernel drop the connection once what it sends has gone untaken for ``seconds``:
    unacknowledged (the peer is gone), or held back by a peer that reads no more (a zero window:
    a client gone to sleep mid-download, a provider that stopped reading an upload).

    Nothing else notices those: a write waits on them for ever, and sendfile() has no pause between
    writes to time. With this, the waiting write fails with ETIMEDOUT (tcp(7), TCP_USER_TIMEOUT),
    as nginx's send_timeout would end it. On systems without the option, nothing changes.
    """
    if _TCP_USER_TIMEOUT is None or sock is None:
        return
    milliseconds = min(max(1, round(seconds * 1000)), _MAX_MILLISECONDS)
    with contextlib.suppress(OSError):  # not TCP (a Unix socket), or the connection already went
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, milliseconds)


def stall_limited_socket(seconds: float) -> aiohttp.SocketFactoryType:
    """A socket factory for aiohttp's connector (``socket_factory``): sockets that give up when
    stalled for ``seconds``."""

    def make(addr_info: tuple[Any, ...]) -> socket.socket:
        family, kind, proto = addr_info[:3]
        sock = socket.socket(family, kind, proto)
        give_up_when_stalled(sock, seconds)
        return sock

    return make
