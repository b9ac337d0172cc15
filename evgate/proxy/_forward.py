"""
Forwarding one request to an upstream and its response back, both bodies
streamed with flow control.

Request bodies stream to the upstream through a
L{evgate.proxy._requestbody.RequestBodyPipe} (its module explains how).

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

from typing import Any, Optional, Set

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError, ConnectingCancelledError, TimeoutError
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone
from twisted.web.http import PotentialDataLoss as HttpPotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from zope.interface import implementer

from evgate.gateway import finishWithProblem
from evgate.proxy._headers import HOP_BY_HOP, connectionTokens, endToEnd
from evgate.proxy._pool import Target
from evgate.proxy._requestbody import PIPE_BUFFER, RequestBodyPipe
from evgate.proxy.problems import NoUpstreamInService, UpstreamFailed, UpstreamTimeout
from evgate.twistedprivate import requestDisconnected, responseConnectionHeader

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


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
        tls = None if self._timedOut else tlsFailure(failure)
        if tls is not None:
            stage, timedOut = "tls", False
        elif not self._connected:
            stage = "connect"
        else:
            stage = self._timedOut or "response-head"
        target.statsFor(self.apiName).failed(stage)
        self.endpoint.targets.failed(target, stage)
        self.log.warn("{api}: {method} to {target} failed at {stage} (attempt {attempt}): {why}",
                      api=self.apiName, method=self.method.decode("latin-1"), target=target.url, stage=stage,
                      attempt=self.attempts, why=self._timedOut and "timed out" or tls or failure.getErrorMessage())
        replayable = self.body is None or not self.body.started
        retry = self.attempts <= self.settings["retries"] and replayable and (
            stage in ("connect", "tls") or (stage == "response-head" and self.method in IDEMPOTENT))
        if retry and self.endpoint.targets.choose(self.tried) is not None:
            if self.body is not None:
                self.body.onProgress = None
            self._attempt()
            return
        detail = {
            "connect": f"cannot connect to the upstream of endpoint {self.endpoint.name}",
            "response-head": f"the upstream of endpoint {self.endpoint.name} gave no response head",
            "request-body": f"the upstream of endpoint {self.endpoint.name} stopped taking the request body",
            "tls": f"TLS with the upstream of endpoint {self.endpoint.name} failed ({tls})",
        }[stage]
        extra = {"stage": stage, "attempts": self.attempts}
        if timedOut:
            seconds = self.settings["connectTimeout"] if stage == "connect" else (
                self.settings["responseTimeout"] if stage == "response-head" else self.settings["idleTimeout"])
            self._problem(UpstreamTimeout(f"{detail} within {seconds:g}s", extra=extra))
        else:
            if stage != "tls" and failure.check(ConnectError, ConnectingCancelledError, CancelledError) is None:
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
        # The upstream's Connection header is not among response.headers
        # (the client keeps it for itself); the headers it names are.
        named = connectionTokens(Headers({b"connection": responseConnectionHeader(response)}))
        for name, values in endToEnd(response.headers, (b"content-length", b"date", b"server", *named)):
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


def tlsFailure(failure: Failure) -> Optional[str]:
    """
    What went wrong with TLS, when C{failure} (of an upstream request or
    connection) comes from the handshake or from verifying the target's
    certificate; L{None} for any other failure.

    The client wraps the reasons of a failed request
    (C{ResponseNeverReceived}, C{RequestTransmissionFailed} ...) in a list
    C{reasons}: they are looked into.
    """
    from OpenSSL import SSL

    pending = [failure]
    while pending:
        reason = pending.pop()
        value = reason.value
        if isinstance(value, SSL.Error):
            # pyOpenSSL's errors are lists of (library, function, reason).
            parts = [str(entry[-1]) for entry in (value.args[0] if value.args else [])
                     if isinstance(entry, tuple) and entry and entry[-1]]
            return ", ".join(parts) or "handshake failed"
        if type(value).__name__ in ("VerificationError", "CertificateError"):
            return f"the certificate does not match the target's name: {value}"
        pending.extend(r for r in getattr(value, "reasons", None) or () if isinstance(r, Failure))
    return None


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


__all__ = ["HOP_BY_HOP", "PIPE_BUFFER", "ProxyCall", "RequestBodyPipe", "ResponseRelay", "isUpgrade"]
