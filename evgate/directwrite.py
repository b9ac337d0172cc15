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

Large frames
============

A message's frame is one C{bytes} object shared by every subscriber
(L{evgate.hub.Event}); a transport copies what it buffers (its C{doWrite}
joins its buffers), so a megabyte frame handed to a thousand transports
would become a thousand copies.  L{writeChunksFrom} and L{writeFrom}
instead send a large frame from where a stream got to, as much as the
socket takes, from views of the shared bytes; the transport is given only
a copy of the rest of the one piece (at most L{PIECE_BYTES}) the socket
took in part, and the stream's producer is paused until that is written, when the
transport resumes it and the stream goes on from where it stopped.  What a
slow client holds in the gateway is then that piece, and its place in the
shared frame.
"""

from __future__ import annotations

import socket
from typing import Any, List, Union

from twisted.web.http import toChunk

from evgate.twistedprivate import TcpServer, chunkedBodyStarted, countBodyBytes, pauseUntilWritten, tcpIdle, tcpSocket

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

# A large frame goes out in pieces of this size (a chunk each on an HTTP
# response): the most of it a transport ever buffers, and copies.
PIECE_BYTES = 16 * 1024

# The most of a large frame offered to the socket at once: more than its
# send buffer (twice STREAM_SEND_BUFFER) takes.
SEND_AT_ONCE = 512 * 1024

# What a stream writes when it cannot write straight to its socket (TLS,
# or something buffered already): a slice, through the transport.
SLICE_BYTES = 64 * 1024

Bytes = Union[bytes, memoryview]


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


def _sliceThrough(write: Any, frame: bytes, start: int) -> int:
    end = min(len(frame), start + SLICE_BYTES)
    write(frame[start:end])
    return end


def _waitForRest(transport: Any, rest: List[Bytes]) -> None:
    # The transport takes bytes only: the rest of the piece is copied (at
    # most PIECE_BYTES), and the stream waits until it is written.
    transport.write(b"".join(rest))
    pauseUntilWritten(transport)


def writeChunksFrom(request: Any, frame: bytes, start: int) -> int:
    """
    Write C{frame} from offset C{start} to C{request}'s chunked response:
    as many chunks of at most L{PIECE_BYTES} as the socket takes at once,
    straight to it, and the rest of a chunk it took in part through the
    transport, which pauses the request's producer until that is written.
    When the socket cannot be written to directly, one slice of at most
    L{SLICE_BYTES} goes through C{request.write}.

    @return: the offset in C{frame} where the next write starts.
    """
    channel = request.channel
    transport: Any = channel.transport if channel is not None else None
    if not chunkedBodyStarted(request) or not _idle(transport):
        return _sliceThrough(request.write, frame, start)
    view = memoryview(frame)
    end = min(len(frame), start + SEND_AT_ONCE)
    chunks: List[List[Bytes]] = []
    parts: List[Bytes] = []
    for at in range(start, end, PIECE_BYTES):
        piece = view[at:min(end, at + PIECE_BYTES)]
        chunk: List[Bytes] = [b"%x\r\n" % (len(piece),), piece, _CRLF]
        chunks.append(chunk)
        parts.extend(chunk)
    try:
        sent = tcpSocket(transport).sendmsg(parts)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        # The connection failed: the transport finds out on its own write
        # and closes it the usual way.
        return _sliceThrough(request.write, frame, start)
    at = start
    for chunk in chunks:
        size = len(chunk[1])
        length = len(chunk[0]) + size + 2
        if sent < length:
            _waitForRest(transport, _rest(chunk, sent))
            at += size
            break
        sent -= length
        at += size
    countBodyBytes(request, at - start)
    return at


def _rest(parts: List[Bytes], sent: int) -> List[Bytes]:
    # What is left of parts once their first sent bytes went out.
    rest: List[Bytes] = []
    for part in parts:
        if sent >= len(part):
            sent -= len(part)
            continue
        rest.append(part[sent:] if sent else part)
        sent = 0
    return rest


def writeFrom(transport: Any, frame: bytes, start: int) -> int:
    """
    Write C{frame} (bytes already framed, as a WebSocket's) from offset
    C{start}: as much as the socket takes at once, straight to it, and the
    rest of the L{PIECE_BYTES} it stopped in through the transport, which
    pauses its producer until that is written.  When the socket cannot be
    written to directly, one slice of at most L{SLICE_BYTES} goes through
    the transport.

    @return: the offset in C{frame} where the next write starts.
    """
    if not _idle(transport):
        return _sliceThrough(transport.write, frame, start)
    view = memoryview(frame)
    end = min(len(frame), start + SEND_AT_ONCE)
    try:
        sent = tcpSocket(transport).send(view[start:end])
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        return _sliceThrough(transport.write, frame, start)
    at = start + sent
    if at < end:
        stop = min(end, at + PIECE_BYTES - sent % PIECE_BYTES)
        _waitForRest(transport, [view[at:stop]])
        at = stop
    return at
