"""
The HTTP/1.1 side of a gateway node: the site, its requests and its
channel, and how they stand up to hostile clients.

A client controls how much it sends and how slowly.  Twisted's channel
bounds the head's size but answers an oversized or malformed head with a
bare C{400} (or nothing at all for a line longer than its line limit), and
its only timer is an idle timeout that every byte resets, so a client that
sends one header line every few seconds holds a connection for ever.
L{GatewayChannel} adds, per connection:

 - C{max-header-bytes}: the request line and headers together; over it the
   client gets C{431} as C{application/problem+json}, and a malformed head
   gets C{400} the same way (L{evgate.errors.HeaderFieldsTooLarge},
   L{evgate.errors.MalformedRequest});
 - C{request-head-timeout}: from a request's first bytes to the end of its
   headers, however steadily they trickle in;
 - C{request-body-min-rate}: after a grace period, a body must keep coming
   at this many bytes per second on average;
 - C{keep-alive-timeout}: Twisted's idle timeout, which only runs between
   requests (it is off while a request, stream or long poll is answered);

and L{GatewaySite} caps the connections open at once (C{max-connections});
a connection over the cap is answered C{503} and closed.  Every refusal is
counted in L{ConnectionCounts} (C{evgate_connections_refused_total}).

What it costs a request: the head deadline and the body check are only
armed when a head or body does not arrive in one read, so a request whose
head and body come in one packet pays a few attribute tests and no timer.

The admin listener uses the same site class with the same limits.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Optional

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from evgate import twistedprivate
from evgate.answers import clientLeft, writeProblem
from evgate.connections import ConnectionCounts, ConnectionLimits, connectionLimits, parseConnectionKeys
from evgate.errors import (
    HeaderFieldsTooLarge,
    MalformedRequest,
    PayloadTooLarge,
    Problem,
    RequestTimeout,
    ServiceOverloaded,
)
from evgate.interfaces import IBodyPipes
from evgate.logs import RequestLog
from evgate.security import redactedLogFormatter

log = Logger()


def problemResponse(problem: Problem) -> bytes:
    """
    A complete HTTP/1.1 response carrying C{problem}, that closes the
    connection: for answers given before there is a request to answer
    through.
    """
    body = problem.body()
    reason = RESPONSES.get(problem.status, b"Error")
    head = [b"HTTP/1.1 %d %s" % (problem.status, reason),
            b"Content-Type: application/problem+json",
            b"Cache-Control: no-store",
            b"Connection: close",
            b"Content-Length: %d" % (len(body),)]
    for name, value in problem.headers:
        head.append(name.encode("ascii") + b": " + value.encode("latin-1"))
    return b"\r\n".join(head) + b"\r\n\r\n" + body


DEFAULT_LIMITS = ConnectionLimits()


class GatewayChannel(HTTPChannel):
    """
    An HTTP/1.1 channel with the limits of L{ConnectionLimits} (see the
    module docstring); the site sets C{limits} when it builds it.
    """

    # The channel's own state lives in slots, not in the instance's
    # dictionary: Twisted's HTTPChannel already keeps about 24 attributes
    # there, and past 30 names CPython stops sharing a class's dictionary
    # keys between its instances, which cost every connection (an idle
    # stream's, above all) 1.3 KiB more.
    __slots__ = ("limits", "site", "_headBytes", "_headCount", "_inHead", "_inBody", "_bodyBytes", "_bodyStarted",
                 "_headCall", "_bodyCall", "_closeCall", "_answered", "_discarding", "_host")

    def __init__(self) -> None:
        self.limits = DEFAULT_LIMITS
        self.site: Any = None
        self._headBytes = self._headCount = self._bodyBytes = 0
        self._inHead = self._inBody = self._answered = self._discarding = False
        self._bodyStarted = 0.0
        self._headCall: Optional[IDelayedCall] = None
        self._bodyCall: Optional[IDelayedCall] = None
        self._closeCall: Optional[IDelayedCall] = None
        self._host: Any = None
        super().__init__()

    def connectionMade(self) -> None:
        self.MAX_LENGTH = self.totalHeadersSize = self.limits.maxHeaderBytes
        # The local address does not change while the connection lasts;
        # asked for every request, it cost a getsockname() each time.
        self._host = self.transport.getHost() if self.transport is not None else None
        super().connectionMade()
        if self.site is not None:
            self.site.connectionOpened(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self.line_mode and not self._inHead:
            self._inHead = True
            self._headBytes = self._headCount = 0
        super().dataReceived(data)
        # Armed only when the head (or body) did not come in one read:
        # the usual request pays no timer.
        if self._inHead and self._headCall is None and not self._answered:
            self._headCall = self.callLater(self.limits.headTimeout, self._headTimedOut)
        elif self._inBody and self._bodyCall is None and self.limits.bodyMinRate and not self._answered:
            self._bodyStarted = self._now()
            self._bodyCall = self.callLater(self.limits.bodyGrace, self._checkBodyRate)

    def lineReceived(self, line: bytes) -> None:
        # Counted before Twisted does (it would answer a bare 400), with the
        # line ends, so that the limit is the bytes a client sends.
        self._headBytes += len(line) + 2
        if self._headBytes > self.limits.maxHeaderBytes:
            self.refuse(HeaderFieldsTooLarge(
                f"the request line and headers are larger than max-header-bytes "
                f"({self.limits.maxHeaderBytes} bytes)"), "header-too-large")
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        # One line (no line end yet) over the limit: Twisted would close
        # without a word.
        self.refuse(HeaderFieldsTooLarge(
            f"a request line or header is larger than max-header-bytes ({self.limits.maxHeaderBytes} bytes)"),
            "header-too-large")

    def headerReceived(self, line: bytes) -> bool:
        self._headCount += 1
        if self._headCount > self.maxHeaders:
            self.refuse(HeaderFieldsTooLarge(f"the request has more than {self.maxHeaders} headers"),
                        "header-too-large")
            return False
        return bool(super().headerReceived(line))

    def allHeadersReceived(self) -> None:
        self._inHead = False
        if self._headCall is not None:
            self._cancel("_headCall")
        self._inBody = self.length != 0
        self._bodyBytes = 0
        super().allHeadersReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if self._discarding:
            return
        if self._inBody:
            self._bodyBytes += len(data)
        super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        self._inBody = False
        if self._bodyCall is not None:
            self._cancel("_bodyCall")
        super().allContentReceived()

    def getHost(self) -> Any:
        return self._host if self._host is not None else super().getHost()

    def timeoutConnection(self) -> None:
        # Twisted's idle timeout: it only runs between requests here (the
        # head and body have their own deadlines).
        self._count("keep-alive-timeout")
        super().timeoutConnection()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel("_headCall")
        self._cancel("_bodyCall")
        self._cancel("_closeCall")
        if self.site is not None:
            self.site.connectionClosed(self.transport)
        super().connectionLost(reason)

    def discardInput(self) -> None:
        """
        Ignore whatever the client sends from now on, once the channel is
        in raw mode (the rest of a refused head, or of a body that nobody
        reads any more).
        """
        self._discarding = True

    def respondToBadRequest(self) -> None:
        """
        Answer a malformed request head (Twisted's parser calls this, see
        L{evgate.twistedprivate.answerBadRequestsWith}) with a problem
        document and close.
        """
        self.refuse(MalformedRequest("the request line or headers are malformed (RFC 9112)"), "bad-request")

    def refuse(self, problem: Problem, reason: str) -> None:
        """
        Answer C{problem} as the last response of this connection, count
        C{reason}, and close.  Anything the client sends afterwards is
        ignored.
        """
        if self._answered:
            return
        self._answered = True
        self._inHead = self._inBody = False
        self._cancel("_headCall")
        self._cancel("_bodyCall")
        self._count(reason)
        # Nothing more is parsed: the rest of the head or body is unread.
        self.setRawMode()
        self.discardInput()
        if self.transport is not None:
            # A request being answered still owns the response stream; the
            # problem can only go out before any response has started.
            if not self.requests or not getattr(self.requests[0], "startedWriting", False):
                self.transport.write(problemResponse(problem))
            self.loseConnection()
            # A client that does not read its answer does not keep the
            # connection either (as Twisted's idle timeout does).
            if self.abortTimeout is not None:
                self._closeCall = self.callLater(self.abortTimeout, self._abort)

    def _abort(self) -> None:
        self._closeCall = None
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()

    def _headTimedOut(self) -> None:
        self._headCall = None
        self.refuse(RequestTimeout(f"the request's head did not arrive within request-head-timeout "
                                   f"({self.limits.headTimeout:g} s)"), "head-timeout")

    def _checkBodyRate(self) -> None:
        self._bodyCall = None
        if not self._inBody:
            return
        elapsed = self._now() - self._bodyStarted
        rate = self.limits.bodyMinRate
        if self._bodyBytes < rate * elapsed:
            self.refuse(RequestTimeout(f"the request body arrived slower than request-body-min-rate "
                                       f"({rate} bytes/s)"), "body-too-slow")
            return
        # Next look when the bytes so far stop being enough (at least 1 s).
        wait = max(1.0, self._bodyBytes / rate - elapsed)
        self._bodyCall = self.callLater(wait, self._checkBodyRate)

    def _now(self) -> float:
        site = self.site
        return float(site.reactor.seconds()) if site is not None else 0.0

    def _cancel(self, name: str) -> None:
        call = getattr(self, name)
        if call is not None:
            setattr(self, name, None)
            if call.active():
                call.cancel()

    def _count(self, reason: str) -> None:
        if self.site is not None:
            self.site.connectionCounts.refused[reason] += 1


# Twisted answers malformed heads only through a private method: see
# evgate.twistedprivate (pinned by tests.test_site).
twistedprivate.answerBadRequestsWith(GatewayChannel, GatewayChannel.respondToBadRequest)


class _RefusedConnection(Protocol):
    """
    A connection over C{max-connections}: answered C{503} at once and
    closed, without reading a byte.
    """

    response = problemResponse(ServiceOverloaded(
        "this node has as many connections open as max-connections allows; retry later or elsewhere",
        retryAfter=1))

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.response)
        self.transport.loseConnection()


class GatewayRequest(Request):
    """
    A request that refuses a body bigger than the site's limit as soon as it
    knows, without reading or buffering the rest of it, and that answers an
    unexpected error as a problem document, never Twisted's HTML page.
    """

    # evgate's state lives in slots, not in the instance's dictionary:
    # twisted.web's Request keeps about 29 attributes there on a stream,
    # and past 30 names CPython stops sharing a class's dictionary keys
    # between its instances, which cost every request (an idle stream's,
    # above all) 1.3 KiB more.
    __slots__ = ("_received", "_refused", "evgateStarted", "evgateTally", "evgateConsumer", "evgateStream",
                 "evgateMessages", "_streamedBody", "_streamStarted", "evgateLeft", "evgateOnLeft", "_maxBody")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._received = 0
        self._refused = False
        # What the access log and the request counts read (evgate.logs):
        # set by the gateway resource and the entrypoints as the request
        # goes.
        self.evgateStarted: Optional[float] = None
        self.evgateTally: Any = None
        self.evgateConsumer: Optional[str] = None
        self.evgateStream: Any = None
        self.evgateMessages: Optional[int] = None
        # The body of a request processed while it arrives (_streamBody).
        self._streamedBody: Any = None
        self._streamStarted = False
        # Set in connectionLost: evgate.answers.clientLeft reads it, and
        # watchDeparture needs no notifyFinish Deferred for this class;
        # nor does onDeparture, whose callback connectionLost calls.
        self.evgateLeft = False
        self.evgateOnLeft: Optional[Callable[[Failure], None]] = None
        # The site's body limit, read once per request in gotLength
        # (Twisted calls it before any chunk of the body).
        self._maxBody = 1 << 62
        super().__init__(*args, **kwargs)

    def gotLength(self, length: Optional[int]) -> None:
        site = getattr(self.channel, "site", None)
        if isinstance(site, GatewaySite):
            self._maxBody = site.maxBodyBytes
            pipes = site.bodyPipes
            if length != 0 and pipes is not None and pipes.streamsBodies and self._streamBody(pipes, length):
                return
        if length is not None and length > self._maxBody:
            self.content = _Discard()  # type: ignore[assignment]
            self._refuse()
            return
        super().gotLength(length)

    def _streamBody(self, pipes: Any, length: Optional[int]) -> bool:
        # An API that takes request bodies as they arrive (the HTTP proxy,
        # whose module evgate.proxy._forward explains the design) gets the
        # request now, with a pipe for its body instead of a file; the end
        # of the body comes to requestReceived.  Its size is the
        # upstream's business, not max-message-bytes.
        command, path, version = twistedprivate.channelRequestLine(self.channel)
        openPipe = pipes.bodyPipeFor(path.split(b"?", 1)[0])
        if openPipe is None:
            return False
        self.content = self._streamedBody = openPipe(self, length)
        self.requestReceived(command, path, version)
        if self.finished:
            # Refused before the body (credentials, limits): no
            # "100 Continue" invites it.
            self.requestHeaders.removeHeader(b"expect")
        return True

    def handleContentChunk(self, data: bytes) -> None:
        if self._streamedBody is not None:
            self._streamedBody.write(data)
            return
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._maxBody:
            self._refuse()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        if self._streamedBody is not None:
            if self._streamStarted:
                # The channel's end of the body, for a request processed
                # since its headers.
                self._streamedBody.bodyEnded()
                return
            self._streamStarted = True
        # For the access log's duration; one clock read per request.
        site = getattr(self.channel, "site", None)
        if site is not None:
            self.evgateStarted = site.reactor.seconds()
        super().requestReceived(command, path, version)

    def connectionLost(self, reason: Any) -> None:
        # A request whose client left before it was finished (a stream the
        # client closed, a long poll given up) is never finished: this is
        # where it ends for the access log and the request counts.
        site = getattr(self, "site", None)
        self.evgateLeft = True
        super().connectionLost(reason)
        if self.finished:
            return
        callback, self.evgateOnLeft = self.evgateOnLeft, None
        if callback is not None:
            try:
                callback(reason if isinstance(reason, Failure) else Failure(reason))
            except Exception:
                log.failure("a request's departure callback failed", Failure())
        if site is not None and getattr(site, "requestLog", None) is not None:
            site.requestLog.requestEnded(self, lost=True)

    def write(self, data: bytes) -> None:
        body = self._streamedBody
        if body is not None and not self.startedWriting and not body.ended and self.channel is not None:
            # Answered before the whole body came: the connection ends with
            # this response, as the rest of the body may never be read.
            self.setHeader(b"Connection", b"close")
            self.channel.persistent = False
        super().write(data)

    def finish(self) -> None:
        body = self._streamedBody
        if body is not None and not body.ended and self.channel is not None:
            # What is left of the body in this read is not a next request.
            channel: Any = self.channel  # the site's GatewayChannel
            channel.discardInput()
        super().finish()

    def processingFailed(self, reason: Failure) -> Failure:
        """
        An exception escaped a render (a L{RecursionError} from input no
        check caught, a bug): log it with its traceback and answer C{500}
        as a problem document.  Twisted's own answer is an HTML page that
        may show the traceback.
        """
        log.failure("unexpected error rendering {method} {path}", reason,
                    method=self.method, path=self.path)
        if clientLeft(self):
            return reason
        if self.startedWriting:
            # The status line is out: all that is left is to cut it short.
            if self.channel is not None:
                self.channel.loseConnection()
            return reason
        problem = Problem("an internal error occurred; it has been logged")
        body = problem.body()
        self.responseHeaders = type(self.responseHeaders)()
        self.setResponseCode(problem.status)
        self.setHeader(b"Content-Type", b"application/problem+json")
        self.setHeader(b"Cache-Control", b"no-store")
        self.setHeader(b"Content-Length", b"%d" % (len(body),))
        self.write(body)
        self.finish()
        return reason

    def _refuse(self) -> None:
        self._refused = True
        # The request line and headers are known at this point; answering
        # needs them for the HTTP version and keep-alive decision.
        self.method, self.uri, self.clientproto = twistedprivate.channelRequestLine(self.channel)
        self.path = self.uri.split(b"?", 1)[0]
        problem = PayloadTooLarge(f"the message is larger than max-message-bytes ({self._maxBody} bytes)")
        self.setHeader(b"Connection", b"close")
        body = writeProblem(self, problem)
        self.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
        channel = self.channel
        self.write(body)
        self.finish()
        # The rest of the body is still on its way: close rather than read it.
        if channel is not None:
            channel.loseConnection()


class _Discard:
    """
    A body sink for a refused request.
    """

    def write(self, data: bytes) -> None:
        pass

    def seek(self, *args: Any) -> None:
        pass

    def read(self, *args: Any) -> bytes:
        return b""

    def close(self) -> None:
        pass


def _socketOf(transport: Any) -> Any:
    # A TLS connection's transport wraps the TCP one, which knows whether
    # it is still connected.
    while isinstance(transport, ProtocolWrapper):
        transport = transport.transport
    return transport


class GatewaySite(Site):
    """
    The gateway's site: L{GatewayRequest}s over L{GatewayChannel}s, counted
    and logged by its L{evgate.logs.RequestLog} (the data plane's; the
    admin site has none), with at most C{limits.maxConnections} open.

    Open connections are known by their transports: a WebSocket takes its
    transport over from the HTTP channel (the channel never hears of its
    end), so a connection counts until its socket is closed, found when
    the cap is reached.  The set holds its transports weakly: a closed
    transport that nothing else holds (the reactor lets go of it when it
    closes) leaves at once, rather than staying until the cap is reached,
    with whatever it had not sent.
    """

    requestFactory = GatewayRequest
    protocol = GatewayChannel  # type: ignore[assignment]

    def __init__(self, resource: Resource, maxBodyBytes: int, accessLog: bool = False,
                 requestLog: Any = None, metrics: Any = None, limits: Optional[ConnectionLimits] = None,
                 **kwargs: Any) -> None:
        # Credentials in query strings stay out of twisted.web's own
        # formatter, should anything use it.
        self.limits = limits if limits is not None else ConnectionLimits()
        kwargs.setdefault("logFormatter", redactedLogFormatter)
        # A message body is the message, never a form: not parsing it saves
        # a MIME header parse per POST (a quarter of the publish path) and
        # keeps a form-encoded body's fields out of the query parameters
        # (a body "key=x" must not set the message key).
        kwargs.setdefault("parsePOSTFormSubmission", False)
        kwargs.setdefault("timeout", self.limits.keepAliveTimeout)
        super().__init__(resource, **kwargs)
        self.maxBodyBytes = maxBodyBytes
        # Where paths that take their bodies as they arrive are found (the
        # gateway's resource; the admin's has none).
        self.bodyPipes: Optional[IBodyPipes] = IBodyPipes(resource, None)
        if requestLog is None and accessLog:
            requestLog = RequestLog(True)
        self.requestLog = requestLog
        self.metrics = metrics
        self.connectionCounts = ConnectionCounts()
        self.openTransports: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self._prunedAt = -1.0

    @property
    def openConnections(self) -> int:
        """
        How many connections this site holds open (WebSocket connections
        whose sockets closed since the last count may still be included).
        """
        return len(self.openTransports)

    def buildProtocol(self, addr: Any) -> Any:
        if len(self.openTransports) >= self.limits.maxConnections and not self._pruned():
            self.connectionCounts.refused["max-connections"] += 1
            refused = _RefusedConnection()
            return refused
        channel = super().buildProtocol(addr)
        channel.limits = self.limits
        return channel

    def _pruned(self) -> bool:
        # At most once a second: a node at its cap refuses in O(1).
        now = self.reactor.seconds()
        if now - self._prunedAt < 1.0:
            return False
        self._prunedAt = now
        self.openTransports = weakref.WeakSet(
            t for t in list(self.openTransports) if not getattr(_socketOf(t), "disconnected", 0))
        return len(self.openTransports) < self.limits.maxConnections

    def connectionOpened(self, transport: Any) -> None:
        """
        A channel of this site was connected over C{transport}.
        """
        self.openTransports.add(transport)

    def connectionClosed(self, transport: Any) -> None:
        """
        The connection over C{transport} closed.
        """
        self.openTransports.discard(transport)

    def log(self, request: Any) -> None:
        # evgate's own line (evgate.logs), not twisted.web's combined log:
        # it names the API and consumer, and costs little when off.
        if self.requestLog is not None:
            self.requestLog.requestEnded(request)


__all__ = ["ConnectionLimits", "ConnectionCounts", "GatewayChannel", "GatewayRequest", "GatewaySite",
           "connectionLimits", "parseConnectionKeys", "problemResponse"]
