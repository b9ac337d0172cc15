"""
Every use evgate makes of Twisted's and autobahn's private attributes, in
one place.

Some speed and some behaviour are only reachable through attributes that
Twisted or autobahn do not document: a transport's write buffers, the
timers autobahn schedules.  Each such access is a small function here, with
what it reads and why no public API serves.  tests/test_twistedprivate.py
pins the Twisted and autobahn versions these were checked against and
checks that every attribute named here still exists on the real classes:
when a dependency moves, that test names this module as the one to re-check.

Sections are owned by the parts of the gateway that need them; add to the
one of your part, or start a new delimited section.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, List, Tuple

from twisted.internet import tcp
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http import HTTPChannel

# The versions whose private attributes the accessors below were checked
# against (tests/test_twistedprivate.py compares them to what is installed).
KNOWN_TWISTED = "26.10.0"
KNOWN_AUTOBAHN = "26.11.1"


# ---------------------------------------------------------------------------
# Streams: direct socket writes and autobahn's timers and framing
# (evgate/directwrite.py, evgate/entrypoints/websocket.py).
# ---------------------------------------------------------------------------

# The attributes of twisted.internet.tcp.Server (FileDescriptor and
# Connection) that L{tcpIdle} reads.  A transport buffers what it was given
# in `_tempDataBuffer` (new writes) and `dataBuffer` (being sent); no public
# API says whether anything is waiting to be written.
TCP_PRIVATE: Tuple[str, ...] = ("_tempDataBuffer", "dataBuffer", "_writeDisconnected", "socket",
                                "connected", "disconnecting", "producer", "streamingProducer", "producerPaused")

# The attributes of autobahn's WebSocketServerProtocol read by
# L{autobahnWritesPlainFrames}.
AUTOBAHN_PROTOCOL_PRIVATE: Tuple[str, ...] = ("_perMessageCompress", "send_queue", "trafficStats")

# The attribute of autobahn's WebSocketServerFactory that
# L{bindAutobahnTimers} replaces.
AUTOBAHN_FACTORY_PRIVATE: Tuple[str, ...] = ("_batched_timer",)

# The attributes of twisted.web.http.Request that L{chunkedBodyStarted}
# and L{countBodyBytes} use: whether the response is chunked and its
# headers are written, and the body length it counts for the access log.
REQUEST_PRIVATE: Tuple[str, ...] = ("chunked", "startedWriting", "sentLength")

TcpServer = tcp.Server


def chunkedBodyStarted(request: Any) -> bool:
    """
    Whether C{request}'s response is chunked, its headers are written, and
    its body is really sent (twisted.web silences the body of HEAD and of
    bodiless statuses by putting a C{write} on the instance).
    """
    return bool(request.chunked and request.startedWriting and "write" not in request.__dict__
                and request.method != b"HEAD")


def countBodyBytes(request: Any, size: int) -> None:
    """
    Count C{size} body bytes written around C{request.write}, as it would.
    """
    request.sentLength += size


def tcpIdle(transport: Any) -> bool:
    """
    Whether C{transport} is a plain TCP connection, open, with nothing
    waiting in its write buffers: only then may bytes go straight to its
    socket without overtaking buffered ones (evgate.directwrite).
    """
    return bool(type(transport) is TcpServer and not transport._tempDataBuffer and not transport.dataBuffer
                and transport.connected and not transport.disconnecting and not transport._writeDisconnected)


def pauseUntilWritten(transport: Any) -> bool:
    """
    Pause the streaming producer of the TCP transport C{transport} while it
    holds anything unwritten, as the transport itself does once it holds
    more than its C{bufferSize}: it resumes the producer when its buffers
    are written (C{FileDescriptor.doWrite}).  A large frame written
    straight to the socket leaves the transport only the rest of what the
    socket took in part, and waits for it to be written; no public API
    lowers the threshold (C{bufferSize} is also the size of every read).

    @return: whether the producer was paused.
    """
    if type(transport) is not TcpServer:
        return False
    producer: Any = transport.producer
    if (producer is None or not transport.streamingProducer or transport.producerPaused
            or not (transport._tempDataBuffer or transport.dataBuffer)):
        return False
    transport.producerPaused = True
    producer.pauseProducing()
    return True


def tcpSocket(transport: Any) -> Any:
    """
    The socket object of a TCP transport (C{tcp.Connection.socket}: an
    attribute, not part of ITransport).
    """
    return transport.socket


def autobahnWritesPlainFrames(protocol: Any) -> bool:
    """
    Whether prepared frames may be written to C{protocol}'s transport
    directly, as autobahn's C{sendData} would: no per-message compression
    negotiated (C{_perMessageCompress}), nothing in autobahn's own send
    queue (used in its synchronous mode) and no octet logging.
    """
    return (protocol._perMessageCompress is None and not protocol.send_queue
            and not getattr(protocol, "logOctets", False))


def countAutobahnOctets(protocol: Any, size: int) -> None:
    """
    Count C{size} bytes written around autobahn in its traffic statistics,
    as C{sendData} does.
    """
    protocol.trafficStats.outgoingOctetsWireLevel += size


class _Timer:
    """
    A timer of autobahn's on the gateway's reactor, which autobahn may
    cancel after it fired.
    """

    def __init__(self, call: Any) -> None:
        self.call = call

    def cancel(self) -> None:
        if self.call.active():
            self.call.cancel()


class _ReactorTimers:
    """
    autobahn's timer interface (C{call_later}) on a given reactor.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def call_later(self, delay: float, f: Any, *args: Any, **kwargs: Any) -> _Timer:
        return _Timer(self.reactor.callLater(delay, f, *args, **kwargs))


def bindAutobahnTimers(factory: Any, reactor: Any) -> None:
    """
    Make C{factory}'s protocols schedule their handshake, ping and close
    timeouts on C{reactor}.  autobahn schedules them through the factory's
    C{_batched_timer}, which txaio binds to the global reactor; the gateway
    runs on the reactor it was given, as everything else does (and as tests
    on a Clock need).  autobahn has no public option for it.
    """
    factory._batched_timer = _ReactorTimers(reactor)


# ---------------------------------------------------------------------------
# (end of the streams section)
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# HTTP channel (evgate.site): how a malformed request head is answered.
# Pinned by tests.test_site.TwistedPrivateTests.
# ---------------------------------------------------------------------------

# The method HTTPChannel calls for every malformed head (bad request line,
# header without a colon, invalid name or value, conflicting lengths, bad
# chunked framing).  Twisted writes a bare "400 Bad Request" without a
# body; no public hook exists.
BAD_REQUEST_HOOK = "_respondToBadRequestAndDisconnect"


def hasBadRequestHook() -> bool:
    """
    Whether this Twisted's L{HTTPChannel} still answers malformed heads
    through L{BAD_REQUEST_HOOK}.
    """
    return callable(getattr(HTTPChannel, BAD_REQUEST_HOOK, None))


def answerBadRequestsWith(channelClass: type, answer: Callable[[Any], None]) -> None:
    """
    Make C{channelClass} (an L{HTTPChannel} subclass) answer malformed
    request heads with C{answer(channel)} instead of Twisted's bare C{400}.

    @raise RuntimeError: if this Twisted no longer has the hook (at import,
        rather than silently answering bare C{400}s again).
    """
    if not hasBadRequestHook():
        raise RuntimeError(f"twisted.web.http.HTTPChannel has no {BAD_REQUEST_HOOK}: "
                           "update evgate.twistedprivate for this Twisted")
    setattr(channelClass, BAD_REQUEST_HOOK, answer)

# ---------------------------------------------------------------------------
# end of the HTTP channel section
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# HTTP channel (evgate.site): the request line of a request answered or
# handed on before it was given its method, path and version (a body refused
# for its size; a body streamed to a proxy upstream as it arrives).
# Pinned by tests.test_twistedprivate.ChannelTests.
# ---------------------------------------------------------------------------

# The attributes in which HTTPChannel keeps the request line while the
# headers and body arrive.  A Request learns them only in requestReceived,
# after the whole body; a body refused for its size (GatewayRequest) is
# answered before that, and the answer needs the version (keep-alive) and
# the path (the access log).
CHANNEL_REQUEST_LINE: Tuple[str, str, str] = ("_command", "_path", "_version")


def channelRequestLine(channel: Any) -> Tuple[bytes, bytes, bytes]:
    """
    The method, path and HTTP version of the request C{channel} is reading,
    with defaults for a channel that has none (a test's dummy channel).
    """
    command, path, version = CHANNEL_REQUEST_LINE
    return (getattr(channel, command, b"POST"), getattr(channel, path, b"/"),
            getattr(channel, version, b"HTTP/1.1"))

# ---------------------------------------------------------------------------
# end of the request line section
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Webhook client (evgate.webhook.client): quiet connection pools.
# Pinned by tests.test_twistedprivate.PoolTests.
# ---------------------------------------------------------------------------

# HTTPConnectionPool makes its connections' protocol factories from its
# class attribute `_factory` (named in the pool's docstring): no public
# way chooses it.  All it changes here is logging: one line per
# connection to a receiver says nothing useful.
POOL_FACTORY = "_factory"


class QuietClientFactory(_HTTP11ClientFactory):
    """
    The pool's protocol factory, without the start and stop log lines.
    """

    noisy = False


class QuietConnectionPool(HTTPConnectionPool):
    """
    An L{HTTPConnectionPool} whose connections do not log their starts and
    stops.
    """


setattr(QuietConnectionPool, POOL_FACTORY, QuietClientFactory)

# ---------------------------------------------------------------------------
# end of the webhook client section
# ---------------------------------------------------------------------------

# ---------------------------------------------------------------------------
# The HTTP proxy (evgate/proxy/endpoint.py, evgate/proxy/_forward.py).
# ---------------------------------------------------------------------------

# twisted.web's client keeps a response's connection-control headers
# (Connection, Keep-Alive, Transfer-Encoding ...) out of Response.headers,
# in its parser's `connHeaders`; a proxy needs the upstream's `Connection`
# to remove the headers it names (RFC 9110 section 7.6.1).  The protocol's
# parser is `_parser`, set by `request()` and dropped as soon as the
# response is complete (at once for a response without a body), so the
# protocol below remembers its `connHeaders` (made when the parser starts,
# filled as the head arrives) by request, and the proxy finds them from
# IResponse.request when the response head arrives.  The headers, not the
# parser: the parser refers to the request, and a value of a weak-keyed
# dictionary that refers to its key keeps both for ever (one parser,
# request and response per proxied request, until the process ran out of
# memory).
CLIENT_PROTOCOL_PRIVATE: Tuple[str, ...] = ("_parser",)
CLIENT_PARSER_PRIVATE: Tuple[str, ...] = ("connHeaders",)

_responseConnection: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


class ConnectionHeaderClientProtocol(HTTP11ClientProtocol):
    """
    An HTTP/1.1 client protocol that lets L{responseConnectionHeader}
    read the C{Connection} header of the responses it receives.
    """

    def request(self, request: Any) -> Any:
        d = super().request(request)
        parser = getattr(self, "_parser", None)
        if parser is not None:
            _responseConnection[request] = parser.connHeaders
        return d


class ConnectionHeaderClientFactory(_HTTP11ClientFactory):
    """
    The protocol factory of a pool of L{ConnectionHeaderClientProtocol}s,
    without the start and stop log lines.
    """

    noisy = False

    def buildProtocol(self, addr: Any) -> HTTP11ClientProtocol:
        return ConnectionHeaderClientProtocol(self._quiescentCallback)


def responseConnectionHeader(response: Any) -> List[bytes]:
    """
    The values of the C{Connection} header of C{response}, received on a
    L{ConnectionHeaderClientProtocol} (none for any other).
    """
    # IResponse.request is a proxyForInterface of the request, whose
    # wrapped object is `original`.
    request = getattr(response, "request", None)
    headers = _responseConnection.get(getattr(request, "original", request))
    if headers is None:
        return []
    return list(headers.getRawHeaders(b"connection", []))

# ---------------------------------------------------------------------------
# HTTP proxy (evgate.proxy): a client that left, and a WebSocket upgrade
# spliced through to the target.
# Pinned by tests.test_twistedprivate.ProxySpliceTests.
# ---------------------------------------------------------------------------

# Request sets `_disconnected` when its connection is lost; the public
# notifyFinish() says so only once, as a Deferred, which the proxy cannot
# ask again at the moment it decides whether to answer.
REQUEST_DISCONNECTED = "_disconnected"

# HTTPChannel keeps what it read past the current request (pipelined bytes,
# or the first frames of an upgraded connection) in `_dataBuffer`, and
# hands the connection to another protocol with
# `_protocolUpgradeForWebsockets` (what twisted.web's own WebSocket support
# uses).  No public API takes a connection away from the HTTP parser.
CHANNEL_BUFFER = "_dataBuffer"
CHANNEL_UPGRADE = "_protocolUpgradeForWebsockets"


def requestDisconnected(request: Any) -> bool:
    """
    Whether the connection of C{request} (a L{twisted.web.http.Request}) is
    gone.
    """
    return bool(getattr(request, REQUEST_DISCONNECTED, False))


def takeChannelBuffer(channel: Any) -> bytes:
    """
    What C{channel} (an L{HTTPChannel}) read and has not parsed yet,
    emptying its buffer.
    """
    buffered = b"".join(getattr(channel, CHANNEL_BUFFER, []))
    setattr(channel, CHANNEL_BUFFER, [])
    return buffered


def upgradeChannel(channel: Any, protocol: Any) -> None:
    """
    Make C{protocol} the receiver of C{channel}'s connection from now on:
    the channel stops parsing HTTP, and the connection's end is
    C{protocol}'s.
    """
    getattr(channel, CHANNEL_UPGRADE)(protocol)

# ---------------------------------------------------------------------------
# end of the HTTP proxy section
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Redis limits (evgate.security.counters): a connection lost before it was
# usable.
# Pinned by tests.test_twistedprivate.RedisTests.
# ---------------------------------------------------------------------------

# txredisapi's RedisProtocol sets `_ready` once AUTH and SELECT succeeded;
# it reports a connection lost before that (a TLS failure during AUTH,
# say) only as "could not auth", so the limits keep the real reason.
REDIS_READY = "_ready"


def redisProtocolReady(protocol: Any) -> bool:
    """
    Whether C{protocol} (a C{txredisapi.RedisProtocol}) finished its
    set-up (AUTH, SELECT) and was usable.
    """
    return bool(getattr(protocol, REDIS_READY, False))

# ---------------------------------------------------------------------------
# end of the Redis limits section
# ---------------------------------------------------------------------------
