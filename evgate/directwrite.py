"""
Writing a chunk of a streamed response straight to its socket.

Twisted's transports never write at once: C{transport.write} buffers the
data, registers the socket for writing (an C{epoll_ctl}), and the reactor
writes it on its next turn, after another C{epoll_wait}, then unregisters
it (another C{epoll_ctl}).  For a fan-out that writes one small frame to
thousands of idle sockets per message, that bookkeeping cost as much as
the C{send} itself (docs/benchmarks.md).

L{writeChunk} sends a chunk of a chunked HTTP response with one
C{sendmsg} when the transport is a plain TCP connection with nothing
buffered, and L{writeNow} the same for bytes already framed (WebSocket);
whatever the socket does not take, and every other case (TLS,
data already waiting, a closing connection), goes through the transport as
usual, so ordering, flow control and error handling stay Twisted's.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.web.http import toChunk

from evgate.twistedprivate import TcpServer, chunkedBodyStarted, countBodyBytes, tcpIdle, tcpSocket

_CRLF = b"\r\n"
# Off where sockets lack sendmsg (the transport then does all the work).
ENABLED = hasattr(socket.socket, "sendmsg")


# The kernel's send buffer of a stream's socket.  Writing straight to the
# socket hands a slow client's backlog to the kernel, whose buffer grows to
# tcp_wmem's maximum (4 MiB by default) before a send comes back short: the
# bound keeps what a client that stops reading can hold there small, so
# that the gateway notices it (Twisted's buffer fills, the stream pauses,
# its queue overflows, it is cut) as it did before.  Linux doubles it.
STREAM_SEND_BUFFER = 128 * 1024


def boundSendBuffer(transport: Any) -> None:
    """
    Fix the kernel send buffer of C{transport}'s socket at
    L{STREAM_SEND_BUFFER}, for a stream written with L{writeChunk} or
    L{writeNow} (nothing for other transports).
    """
    if ENABLED and type(transport) is TcpServer:
        try:
            tcpSocket(transport).setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SEND_BUFFER)
        except OSError:
            pass


def _idle(transport: Any) -> bool:
    # A plain TCP connection, open, with nothing waiting to be written.
    return ENABLED and tcpIdle(transport)


def writeNow(transport: Any, data: bytes) -> None:
    """
    C{transport.write(data)}, sent at once when the socket can take it (a
    WebSocket's prepared frames).
    """
    if not data or not _idle(transport):
        transport.write(data)
        return
    try:
        sent = tcpSocket(transport).send(data)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        transport.write(data)
        return
    if sent < len(data):
        transport.write(data[sent:])


def writeChunk(request: Any, data: bytes) -> None:
    """
    Write C{data} as one chunk of C{request}'s chunked response, whose
    headers are already written; like C{request.write(data)}, but sent at
    once when the socket can take it.
    """
    channel = request.channel
    transport: Any = getattr(channel, "transport", None) if channel is not None else None
    if not data or not chunkedBodyStarted(request) or not _idle(transport):
        request.write(data)
        return
    countBodyBytes(request, len(data))
    head = b"%x\r\n" % (len(data),)
    try:
        sent = tcpSocket(transport).sendmsg((head, data, _CRLF))
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        # The connection failed: the transport finds out on its own write
        # and closes it the usual way.
        transport.writeSequence(toChunk(data))
        return
    total = len(head) + len(data) + 2
    if sent == total:
        return
    frame = head + data + _CRLF
    transport.write(frame[sent:])
