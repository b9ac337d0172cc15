"""
Forwarding one request to an upstream and its response back, both bodies
streamed with flow control.

Request bodies
==============

twisted.web's L{Request} reads the whole body into C{request.content}
before the resource renders; a proxy that waited for that would hold a
1 GB upload in a temporary file and only then start sending it.  So a
request to a proxy API that has a body is routed when its headers are
complete: L{evgate.gateway.GatewayRequest.gotLength} asks the gateway
resource whether the path belongs to an API that streams request bodies
and, if so, puts a L{RequestBodyPipe} where the body would go and starts
processing the request at once (plans, limits, then this module).  The
body's chunks reach the pipe through C{handleContentChunk}; the end of the
body is the channel's C{allContentReceived}, which the request passes on
to L{RequestBodyPipe.bodyEnded} instead of rendering a second time.

The pipe is the upstream request's L{IBodyProducer}.  The upstream
connection pauses it when its send buffer is full; the pipe then pauses
the client's transport, so the kernel's receive window, not our memory,
holds the client back.  The channel also resumes that transport on its own
(its response-side flow control, and request hand-off), so data may still
arrive while the pipe is paused: it is kept (one read's worth at most) and
the transport paused again.  Before the upstream connection exists, up to
L{PIPE_BUFFER} bytes are kept and then the client is paused the same way.

Response bodies
===============

The upstream response is delivered with C{deliverBody} to a
L{ResponseRelay}, a protocol whose transport is the upstream connection.
The relay registers itself as the client request's streaming producer:
when the client's transport pushes back, the relay pauses the upstream
transport, so a slow client slows the upstream read instead of filling
memory.  The body's framing is redone for the client (Content-Length
kept when the upstream gave one, else chunked).

Failures and timeouts
=====================

Before the response head, a failure is a problem document that names the
stage (see L{evgate.proxy.problems}); after it, the client's connection is
cut, because a response that has begun cannot turn into an error.
Connect failures are retried on the next target; failures and timeouts
of the response head too when the method is idempotent and no byte of the
request body has left the gateway (a streamed body cannot be replayed).
"""

from __future__ import annotations

from typing import Any, List, Optional, Set

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError, ConnectingCancelledError, TimeoutError
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone
from twisted.web.http import PotentialDataLoss as HttpPotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from evgate.gateway import finishWithProblem
from evgate.proxy._headers import HOP_BY_HOP, connectionTokens, endToEnd
from evgate.proxy._pool import Target
from evgate.proxy.problems import NoUpstreamInService, UpstreamFailed, UpstreamTimeout
from evgate.twistedprivate import requestDisconnected

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

# What a pipe keeps before its upstream connection is ready (or while it is
# paused) before it pauses the client.
PIPE_BUFFER = 65536


@implementer(IBodyProducer)
class RequestBodyPipe:
    """
    A request body on its way through: C{request.content} on one side (the
    channel writes chunks to it), the upstream request's L{IBodyProducer}
    on the other.  See the module docstring for the flow control.

    @ivar length: the body's length, or C{UNKNOWN_LENGTH} (chunked).
    @ivar sent: bytes handed to the upstream so far.
    """

    def __init__(self, request: Any, length: Optional[int]) -> None:
        self.request = request
        self.length: Any = length if length is not None else UNKNOWN_LENGTH
        self.received = 0
        self.sent = 0
        self.ended = False
        self.failure: Optional[Failure] = None
        self._buffer: List[bytes] = []
        self._buffered = 0
        self._consumer: Any = None
        self._paused = False
        self._clientPaused = False
        self._done: Optional[Deferred] = None
        self.onProgress: Any = None

    @property
    def started(self) -> bool:
        """
        Whether an upstream has begun to take the body (it cannot be
        given to another one then).
        """
        return self._consumer is not None

    # The file-like side that twisted.web's request writes the body to.

    def write(self, data: bytes) -> None:
        """
        A chunk of the body arrived from the client.
        """
        if self.failure is not None or self.ended:
            return
        self.received += len(data)
        if self._consumer is not None and not self._paused and not self._buffer:
            self.sent += len(data)
            self._consumer.write(data)
        else:
            self._buffer.append(data)
            self._buffered += len(data)
            if self._buffered >= PIPE_BUFFER or self._paused:
                self._pauseClient()
        if self.onProgress is not None:
            self.onProgress()

    @property
    def complete(self) -> bool:
        """
        Whether the whole body has been handed to the upstream.
        """
        return self.ended and not self._buffer and self._consumer is not None

    def seek(self, *args: Any) -> None:
        """
        Nothing to rewind: the body is not kept.
        """

    def tell(self) -> int:
        """
        The bytes received so far.
        """
        return self.received

    def read(self, *args: Any) -> bytes:
        """
        Nothing to read back: the body went upstream.
        """
        return b""

    def close(self) -> None:
        """
        Nothing to release.
        """

    def bodyEnded(self) -> None:
        """
        The client sent the whole body.
        """
        self.ended = True
        self._flush()
        if self.onProgress is not None:
            self.onProgress()

    def clientLost(self, reason: Failure) -> None:
        """
        The client went away before the body was complete: the upstream
        request fails rather than send a truncated body as if it were
        whole.
        """
        if self.ended or self.failure is not None:
            return
        self.failure = reason
        self._buffer = []
        done, self._done = self._done, None
        if done is not None:
            done.errback(reason)

    # IBodyProducer, for the upstream request.

    def startProducing(self, consumer: Any) -> Deferred:
        self._consumer = consumer
        self._done = Deferred()
        done = self._done
        if self.failure is not None:
            self._done = None
            done.errback(self.failure)
            return done
        self._flush()
        return done

    def pauseProducing(self) -> None:
        self._paused = True
        self._pauseClient()

    def resumeProducing(self) -> None:
        self._paused = False
        self._flush()

    def stopProducing(self) -> None:
        # The upstream request ended (failed, or answered early): the rest
        # of the body goes nowhere.
        self._consumer = None
        self._done = None
        self._buffer = []
        self.failure = self.failure or Failure(CancelledError("the upstream request ended"))
        self._resumeClient()

    def _flush(self) -> None:
        consumer = self._consumer
        if consumer is None or self._paused:
            return
        while self._buffer and not self._paused:
            data = self._buffer.pop(0)
            self._buffered -= len(data)
            self.sent += len(data)
            consumer.write(data)
        if self.onProgress is not None:
            self.onProgress()
        if self._paused:
            return
        self._resumeClient()
        if self.ended and not self._buffer:
            done, self._done = self._done, None
            if done is not None:
                done.callback(None)

    def _pauseClient(self) -> None:
        transport = getattr(self.request.channel, "transport", None)
        if transport is not None:
            # Paused again even when we think it is: the channel resumes
            # the same transport for its own reasons.
            transport.pauseProducing()
            self._clientPaused = True

    def _resumeClient(self) -> None:
        if not self._clientPaused:
            return
        self._clientPaused = False
        transport = getattr(self.request.channel, "transport", None)
        if transport is not None and not self.ended:
            transport.resumeProducing()


@implementer(IPushProducer)
class ResponseRelay(Protocol):
    """
    Relays an upstream response body to the client request, pausing the
    upstream transport while the client's pushes back, and cutting both
    when the upstream goes silent for C{idleTimeout} seconds.
    """

    log = Logger()

    def __init__(self, call: "ProxyCall") -> None:
        self.call = call
        self.request = call.request
        self.reactor = call.reactor
        self.paused = False
        self.finished = False
        self._idle: Any = None

    def connectionMade(self) -> None:
        self.request.registerProducer(self, True)
        self._armIdle()

    def dataReceived(self, data: bytes) -> None:
        if self.finished:
            return
        self._armIdle()
        self.request.write(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._disarmIdle()
        if self.finished:
            return
        self.finished = True
        self.call.bodyDone()
        request = self.request
        if request.finished or requestDisconnected(request):
            return
        request.unregisterProducer()
        if reason is None or reason.check(ResponseDone, PotentialDataLoss, HttpPotentialDataLoss):
            request.finish()
            return
        self.call.failedAfterHead("response-body", reason)

    # IPushProducer, for the client's transport.

    def pauseProducing(self) -> None:
        self.paused = True
        # A client that reads slowly is not an upstream that went idle.
        self._disarmIdle()
        if self.transport is not None:
            self._upstream().pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        self._armIdle()
        if self.transport is not None:
            self._upstream().resumeProducing()

    def stopProducing(self) -> None:
        # The client went away: the upstream connection is closed, not
        # read to the end.
        self._disarmIdle()
        self.finished = True
        self.call.bodyDone()
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()

    def _upstream(self) -> Any:
        # The upstream connection, as a push producer (deliverBody's
        # transport is one).
        return self.transport

    def _armIdle(self) -> None:
        timeout = self.call.settings["idleTimeout"]
        if self.paused or not timeout:
            return
        if self._idle is not None and self._idle.active():
            self._idle.reset(timeout)
        else:
            self._idle = self.reactor.callLater(timeout, self._idleExpired)

    def _disarmIdle(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None

    def _idleExpired(self) -> None:
        self._idle = None
        if self.finished:
            return
        self.finished = True
        self.call.bodyDone()
        if self.transport is not None:
            self._upstream().stopProducing()
        self.call.failedAfterHead("response-body", Failure(TimeoutError(
            f"no byte of the response body for {self.call.settings['idleTimeout']:g}s")))


class ProxyCall:
    """
    One client request forwarded: target choice, attempts and their
    timeouts, then the response relayed.
    """

    log = Logger()

    def __init__(self, endpoint: Any, request: Any, apiName: str, method: bytes, path: bytes,
                 headers: Any, body: Optional[RequestBodyPipe], settings: Any) -> None:
        self.endpoint = endpoint
        self.reactor = endpoint.reactor
        self.request = request
        self.apiName = apiName
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.settings = settings
        self.tried: Set[Target] = set()
        self.attempts = 0
        self.target: Optional[Target] = None
        self._pending: Optional[Deferred] = None
        self._headTimer: Any = None
        self._timedOut: Optional[str] = None
        self._connected = False
        self._sentAt = 0.0
        self._inFlight = False
        self._clientGone = False
        self.relay: Optional[ResponseRelay] = None
        # Host is per target unless the client's is kept.
        self.keepHost = settings.get("preserveHost", False)

    def start(self) -> None:
        """
        Send the request to a first target.
        """
        self.request.notifyFinish().addErrback(self._clientLost)
        self._attempt()

    def _attempt(self) -> None:
        target = self.endpoint.targets.choose(self.tried)
        if target is None:
            if not self.tried:
                self._problem(NoUpstreamInService(
                    f"no target of endpoint {self.endpoint.name} is in service",
                    extra={"stage": "select", "attempts": 0}))
            return
        self.target = target
        self.tried.add(target)
        self.attempts += 1
        target.inFlight += 1
        self._inFlight = True
        self._connected = False
        self._timedOut = None
        if not self.keepHost:
            self.headers.setRawHeaders(b"Host", [target.hostHeader])
        url = target.origin + target.basePath.encode("ascii") + self.path
        self.endpoint.pool.expectConnection(self._connectionReady)
        d = self.endpoint.agent.request(self.method, url, self.headers, self.body)
        self._pending = d
        self._sentAt = self.reactor.seconds()
        d.addCallbacks(self._gotHead, self._attemptFailed)

    def _connectionReady(self) -> None:
        self._connected = True
        if self.body is None:
            self._startHeadTimer()
        else:
            # The response-head clock runs from the end of the request
            # body (an upload that takes minutes is not a slow upstream);
            # meanwhile the body must keep moving.
            self.body.onProgress = self._bodyProgress
            self._bodyProgress()

    def _bodyProgress(self) -> None:
        body = self.body
        if self._pending is None or body is None:
            return
        if body.complete:
            body.onProgress = None
            self._startHeadTimer()
            return
        timeout = self.settings["idleTimeout"]
        if not timeout:
            return
        if self._headTimer is not None and self._headTimer.active():
            self._headTimer.reset(timeout)
        else:
            self._headTimer = self.reactor.callLater(timeout, self._expired, "request-body")

    def _startHeadTimer(self) -> None:
        if self._headTimer is not None and self._headTimer.active():
            self._headTimer.cancel()
        timeout = self.settings["responseTimeout"]
        if timeout:
            self._headTimer = self.reactor.callLater(timeout, self._expired, "response-head")

    def _expired(self, stage: str) -> None:
        self._headTimer = None
        self._timedOut = stage
        if self._pending is not None:
            self._pending.cancel()

    def _stopHeadTimer(self) -> None:
        if self._headTimer is not None and self._headTimer.active():
            self._headTimer.cancel()
        self._headTimer = None

    def _release(self) -> None:
        if self._inFlight and self.target is not None:
            self.target.inFlight -= 1
            self._inFlight = False

    def _attemptFailed(self, failure: Failure) -> None:
        self._pending = None
        self._stopHeadTimer()
        self._release()
        target = self.target
        assert target is not None
        if self._clientGone:
            return
        timedOut = self._timedOut is not None or failure.check(TimeoutError) is not None
        if not self._connected:
            stage = "connect"
        else:
            stage = self._timedOut or "response-head"
        target.statsFor(self.apiName).failed(stage)
        self.endpoint.targets.failed(target, stage)
        self.log.warn("{api}: {method} to {target} failed at {stage} (attempt {attempt}): {why}",
                      api=self.apiName, method=self.method.decode("latin-1"), target=target.url, stage=stage,
                      attempt=self.attempts, why=self._timedOut and "timed out" or failure.getErrorMessage())
        replayable = self.body is None or not self.body.started
        retry = self.attempts <= self.settings["retries"] and replayable and (
            stage == "connect" or (stage == "response-head" and self.method in IDEMPOTENT))
        if retry and self.endpoint.targets.choose(self.tried) is not None:
            if self.body is not None:
                self.body.onProgress = None
            self._attempt()
            return
        detail = {
            "connect": f"cannot connect to the upstream of endpoint {self.endpoint.name}",
            "response-head": f"the upstream of endpoint {self.endpoint.name} gave no response head",
            "request-body": f"the upstream of endpoint {self.endpoint.name} stopped taking the request body",
        }[stage]
        extra = {"stage": stage, "attempts": self.attempts}
        if timedOut:
            seconds = self.settings["connectTimeout"] if stage == "connect" else (
                self.settings["responseTimeout"] if stage == "response-head" else self.settings["idleTimeout"])
            self._problem(UpstreamTimeout(f"{detail} within {seconds:g}s", extra=extra))
        else:
            if failure.check(ConnectError, ConnectingCancelledError, CancelledError) is None:
                detail += f" ({failure.getErrorMessage()})"
            self._problem(UpstreamFailed(detail, extra=extra))

    def _gotHead(self, response: Any) -> None:
        self._pending = None
        self._stopHeadTimer()
        target = self.target
        assert target is not None
        self.endpoint.targets.succeeded(target)
        target.statsFor(self.apiName).answered(response.code, self.reactor.seconds() - self._sentAt)
        request = self.request
        if self._clientGone or request.finished:
            self._release()
            response.deliverBody(_Drop())
            return
        request.setResponseCode(response.code, response.phrase or None)
        for name, values in endToEnd(response.headers, (b"content-length", b"date", b"server")):
            request.responseHeaders.setRawHeaders(name, values)
        for name in (b"date", b"server"):
            values = response.headers.getRawHeaders(name)
            if values:
                request.responseHeaders.setRawHeaders(name, values)
            elif name == b"server":
                request.responseHeaders.removeHeader(name)
        if request.method == b"HEAD" or response.code == 304:
            # No body, but the length of the one a GET would have.
            length = response.headers.getRawHeaders(b"content-length")
            if length:
                request.responseHeaders.setRawHeaders(b"Content-Length", length)
        elif response.length is not UNKNOWN_LENGTH:
            request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % (response.length,)])
        self.relay = ResponseRelay(self)
        response.deliverBody(self.relay)

    def bodyDone(self) -> None:
        """
        The response body ended, one way or another.
        """
        self._release()

    def failedAfterHead(self, stage: str, reason: Failure) -> None:
        """
        The response failed after its head was sent: cut the client's
        connection so that it cannot take a truncated body for a whole one.
        """
        target = self.target
        if target is not None:
            target.statsFor(self.apiName).failed(stage)
        self.log.warn("{api}: response from {target} failed at {stage}: {why}", api=self.apiName,
                      target=target.url if target else "-", stage=stage, why=reason.getErrorMessage())
        # A close (not a reset) after what was relayed: the client sees the
        # body end short of its length or without its last chunk.
        transport = getattr(self.request.channel, "transport", None)
        if transport is not None:
            transport.loseConnection()

    def _problem(self, problem: Any) -> None:
        finishWithProblem(self.request, problem)

    def _clientLost(self, reason: Failure) -> None:
        self._clientGone = True
        if self.body is not None:
            self.body.clientLost(reason)
        if self._pending is not None:
            self._pending.cancel()


class _Drop(Protocol):
    # The body of a response nobody waits for any more.
    def connectionMade(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()


def isUpgrade(request: Any) -> bool:
    """
    Whether C{request} asks for a protocol upgrade (WebSocket).
    """
    return bool(request.requestHeaders.getRawHeaders(b"upgrade")) and \
        b"upgrade" in connectionTokens(request.requestHeaders)


__all__ = ["HOP_BY_HOP", "ProxyCall", "RequestBodyPipe", "ResponseRelay", "isUpgrade"]
