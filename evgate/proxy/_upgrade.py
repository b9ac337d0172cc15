"""
Protocol upgrades (WebSocket) through the proxy.

twisted.web's client does not hand over a connection after C{101
Switching Protocols}, so an upgrade request takes its own path: a plain
connection to the target (TLS for C{https}), the request head written by
hand with the same header rules as any request plus C{Connection:
upgrade} and the client's C{Upgrade}, and the response head read here.

On C{101} the head is written to the client and both connections are
spliced: bytes are relayed as they come, each transport registered as the
other's streaming producer, so a side that cannot keep up pauses the
reading of the other (the WebSocket frames are not parsed: extensions,
pings and close frames pass untouched).  Any other answer is given to the
client as an ordinary response and the upstream connection is closed;
its body is relayed whatever its framing: up to its Content-Length,
chunked (decoded here by L{ChunkedBody}, re-chunked by twisted.web), or
until the upstream closes the connection.
"""

from __future__ import annotations

from typing import Any, List, Optional

from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import TimeoutError
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from evgate.gateway import finishWithProblem
from evgate.proxy._forward import tlsFailure
from evgate.proxy._headers import endToEnd
from evgate.proxy.problems import NoUpstreamInService, UpstreamFailed, UpstreamTimeout
from evgate.twistedprivate import requestDisconnected, takeChannelBuffer, upgradeChannel

_MAX_HEAD = 65536


class ChunkedBody:
    """
    A decoder of a chunked body (RFC 9112 section 7.1) fed as it arrives:
    C{write} gets the data, C{ended} is true after the last chunk and its
    trailer section.  A malformed body raises L{ValueError}.
    """

    def __init__(self, write: Any) -> None:
        self.write = write
        self.ended = False
        self._buffer = b""
        self._left = -1  # data bytes left in this chunk; -1 reading a size line

    def feed(self, data: bytes) -> None:
        """
        The next bytes of the body.
        """
        self._buffer += data
        while not self.ended:
            if self._left > 0:
                piece, self._buffer = self._buffer[:self._left], self._buffer[self._left:]
                if not piece:
                    return
                self._left -= len(piece)
                self.write(piece)
                continue
            if self._left == 0:
                # The CRLF after a chunk's data.
                if len(self._buffer) < 2:
                    return
                if self._buffer[:2] != b"\r\n":
                    raise ValueError("no CRLF after a chunk")
                self._buffer = self._buffer[2:]
                self._left = -1
                continue
            if self._left == -2:
                # Trailer lines until an empty one.
                line, found, rest = self._buffer.partition(b"\r\n")
                if not found:
                    return
                self._buffer = rest
                if not line:
                    self.ended = True
                continue
            line, found, rest = self._buffer.partition(b"\r\n")
            if not found:
                if len(self._buffer) > 4096:
                    raise ValueError("a chunk size line longer than 4 KiB")
                return
            self._buffer = rest
            size = line.split(b";", 1)[0].strip()
            if not size or any(c not in b"0123456789abcdefABCDEF" for c in size) or len(size) > 16:
                raise ValueError(f"a bad chunk size {size[:20]!r}")
            self._left = int(size, 16) or -2


class _UpstreamSide(Protocol):
    # The connection to the target: reads the response head, then relays.
    def __init__(self, relay: "UpgradeRelay") -> None:
        self.relay = relay
        self.head = b""
        self.spliced = False
        self.peer: Any = None

    def dataReceived(self, data: bytes) -> None:
        if self.spliced:
            self.peer.write(data)
            return
        self.relay.headData(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.relay.upstreamLost(reason)


class _ClientSide(Protocol):
    # The client's connection after the 101: relays to the target.
    def __init__(self, relay: "UpgradeRelay") -> None:
        self.relay = relay

    def dataReceived(self, data: bytes) -> None:
        upstream = self.relay.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.write(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.relay.clientLost(reason)


class UpgradeRelay:
    """
    One upgraded request: connect, exchange heads, splice (see the module
    docstring).
    """

    log = Logger()

    def __init__(self, endpoint: Any, request: Any, apiName: str, path: bytes, headers: Any,
                 settings: Any) -> None:
        self.endpoint = endpoint
        self.reactor = endpoint.reactor
        self.request = request
        self.apiName = apiName
        self.path = path
        self.headers = headers
        self.settings = settings
        self.upstream: Optional[_UpstreamSide] = None
        self.target: Any = None
        self._buffer = b""
        self._timer: Any = None
        self._answered = False
        self._spliced = False
        self._closed = False
        self._bodyLeft = 0
        self._chunked: Optional[ChunkedBody] = None
        self._untilClose = False
        self._released = False

    def start(self) -> None:
        """
        Connect to a target and send the upgrade request.
        """
        target = self.endpoint.targets.choose()
        if target is None:
            finishWithProblem(self.request, NoUpstreamInService(
                f"no target of endpoint {self.endpoint.name} is in service", extra={"stage": "select",
                                                                                    "attempts": 0}))
            return
        self.target = target
        target.inFlight += 1
        self.request.notifyFinish().addErrback(self._clientGone)
        endpoint: Any = HostnameEndpoint(self.reactor, target.host.encode("idna"), target.port,
                                         timeout=self.settings["connectTimeout"])
        if target.scheme == "https":
            endpoint = wrapClientTLS(self.endpoint.tlsPolicy.creatorForNetloc(
                target.host.encode("ascii"), target.port), endpoint)
        self.upstream = _UpstreamSide(self)
        d = connectProtocol(endpoint, self.upstream)
        d.addCallbacks(self._connected, self._connectFailed)

    def _connected(self, protocol: Any) -> None:
        if self._closed:
            protocol.transport.loseConnection()
            return
        headers = self.headers
        if not self.settings.get("preserveHost", False):
            headers.setRawHeaders(b"Host", [self.target.hostHeader])
        for name in (b"upgrade",):
            values = self.request.requestHeaders.getRawHeaders(name)
            if values:
                headers.setRawHeaders(b"Upgrade", values)
        headers.setRawHeaders(b"Connection", [b"Upgrade"])
        lines: List[bytes] = [b"%s %s HTTP/1.1" % (self.request.method,
                                                   self.target.basePath.encode("ascii") + self.path)]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                lines.append(name + b": " + value)
        protocol.transport.write(b"\r\n".join(lines) + b"\r\n\r\n")
        timeout = self.settings["responseTimeout"]
        if timeout:
            self._timer = self.reactor.callLater(timeout, self._headTimedOut)

    def _connectFailed(self, failure: Failure) -> None:
        self._release()
        self.target.statsFor(self.apiName).failed("connect")
        self.endpoint.targets.failed(self.target, "connect")
        extra = {"stage": "connect", "attempts": 1}
        if failure.check(TimeoutError) or "timeout" in failure.getErrorMessage().lower():
            problem: Any = UpstreamTimeout(f"cannot connect to the upstream of endpoint {self.endpoint.name} "
                                           f"within {self.settings['connectTimeout']:g}s", extra=extra)
        else:
            problem = UpstreamFailed(f"cannot connect to the upstream of endpoint {self.endpoint.name}",
                                     extra=extra)
        finishWithProblem(self.request, problem)

    def _headTimedOut(self) -> None:
        self._timer = None
        self.target.statsFor(self.apiName).failed("response-head")
        finishWithProblem(self.request, UpstreamTimeout(
            f"the upstream of endpoint {self.endpoint.name} gave no response head to the upgrade within "
            f"{self.settings['responseTimeout']:g}s", extra={"stage": "response-head", "attempts": 1}))
        self._closeUpstream()

    def headData(self, data: bytes) -> None:
        """
        Bytes from the target before the splice: the response head, then
        (for a refusal) its body.
        """
        if self._answered:
            self._relayBody(data)
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > _MAX_HEAD:
                self._badHead("a response head longer than 64 KiB")
            return
        head, rest = self._buffer[:end], self._buffer[end + 4:]
        self._buffer = b""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            self._badHead("a response line that is not HTTP")
            return
        code = int(parts[1])
        phrase = parts[2] if len(parts) > 2 else b""
        headers = Headers()
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.addRawHeader(name.strip(), value.strip())
        self._answered = True
        self.target.statsFor(self.apiName).answered(code, 0.0)
        self.endpoint.targets.succeeded(self.target)
        if code == 101:
            self._splice(head + b"\r\n\r\n", rest)
            return
        request = self.request
        request.setResponseCode(code, phrase or None)
        for name, values in endToEnd(headers):
            request.responseHeaders.setRawHeaders(name, values)
        chunked = b"chunked" in b",".join(headers.getRawHeaders(b"transfer-encoding", [])).lower()
        length = headers.getRawHeaders(b"content-length")
        if code in (204, 304) or request.method == b"HEAD":
            self._bodyLeft = 0
        elif chunked:
            self._chunked = ChunkedBody(request.write)
        elif length is not None:
            self._bodyLeft = int(length[0]) if length[0].strip().isdigit() else 0
        else:
            # Neither length nor chunks: the body ends when the upstream
            # closes the connection (upstreamLost finishes the response).
            self._untilClose = True
        self._relayBody(rest)

    def _relayBody(self, data: bytes) -> None:
        request = self.request
        if request.finished or requestDisconnected(request):
            return
        if self._untilClose:
            if data:
                request.write(data)
            return
        if self._chunked is not None:
            try:
                self._chunked.feed(data)
            except ValueError as e:
                self.log.warn("{api}: bad chunked body in the answer to an upgrade: {why}", api=self.apiName,
                              why=str(e))
                request.channel.transport.abortConnection()
                self._closeUpstream()
                return
            if self._chunked.ended:
                request.finish()
                self._closeUpstream()
            return
        chunk = data[:self._bodyLeft]
        self._bodyLeft -= len(chunk)
        if chunk:
            request.write(chunk)
        if self._bodyLeft <= 0:
            request.finish()
            self._closeUpstream()

    def _badHead(self, what: str) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.target.statsFor(self.apiName).failed("response-head")
        finishWithProblem(self.request, UpstreamFailed(
            f"the upstream of endpoint {self.endpoint.name} answered the upgrade with {what}",
            extra={"stage": "response-head", "attempts": 1}))
        self._closeUpstream()

    def _splice(self, head: bytes, rest: bytes) -> None:
        request = self.request
        channel = request.channel
        client = _ClientSide(self)
        upstream = self.upstream
        assert upstream is not None
        transport: Any = channel.transport
        upstreamTransport: Any = upstream.transport
        # The 101 goes out as the target wrote it (its Sec-WebSocket-Accept
        # and extensions are the client's business with the target).
        transport.write(head)
        request.code = 101
        request.startedWriting = 1
        self._spliced = True
        buffered = takeChannelBuffer(channel)
        # The channel stops parsing HTTP: its bytes go to the splice, and
        # its end is the splice's.
        upgradeChannel(channel, client)
        upstream.spliced = True
        upstream.peer = transport
        # Flow control both ways: the channel was the client transport's
        # producer; now each side's transport produces for the other.
        transport.unregisterProducer()
        transport.registerProducer(upstreamTransport, True)
        upstreamTransport.registerProducer(transport, True)
        if rest:
            transport.write(rest)
        if buffered:
            upstreamTransport.write(buffered)
        # The channel may have paused reading while the request was handled.
        transport.resumeProducing()

    def upstreamLost(self, reason: Failure) -> None:
        """
        The target's connection closed.
        """
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._release()
        if self._spliced:
            transport = self.request.channel.transport
            if transport is not None:
                transport.loseConnection()
            return
        if self._closed:
            return
        request = self.request
        if not self._answered:
            tls = tlsFailure(reason) if reason is not None else None
            stage = "response-head" if tls is None else "tls"
            self.target.statsFor(self.apiName).failed(stage)
            self.endpoint.targets.failed(self.target, stage)
            detail = (f"the upstream of endpoint {self.endpoint.name} closed the connection before answering "
                      "the upgrade") if tls is None else (
                f"TLS with the upstream of endpoint {self.endpoint.name} failed ({tls})")
            finishWithProblem(request, UpstreamFailed(detail, extra={"stage": stage, "attempts": 1}))
        elif request.finished or requestDisconnected(request):
            return
        elif self._untilClose:
            request.finish()
        else:
            request.channel.transport.abortConnection()

    def clientLost(self, reason: Failure) -> None:
        """
        The client's connection closed after the splice.
        """
        self._closed = True
        self.request.connectionLost(reason)
        self._closeUpstream()

    def _clientGone(self, reason: Failure) -> None:
        self._closed = True
        self._closeUpstream()

    def _closeUpstream(self) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.loseConnection()

    def _release(self) -> None:
        if self.target is not None and not self._released:
            self._released = True
            self.target.inFlight -= 1

