"""
The HTTP client side of webhook deliveries: which connection a delivery
goes on, which certificates a receiver may present, and how a request
that got no answer is described.

Connection reuse
================

Deliveries reuse connections (a persistent L{HTTPConnectionPool}): one
TLS handshake per receiver rather than one per message.  But a connection
is only worth reusing if the receiver keeps it, and a request written on a
connection the receiver has just closed fails with I{Connection was closed
cleanly}.  Twisted does not send such a request again by itself when it is
a C{POST} (its pool retries idempotent methods only), and a failed
delivery costs a backoff delay and a counted attempt.  So:

 - a receiver that answers C{HTTP/1.0} closes the connection after every
   answer (a C{Keep-Alive} it might have negotiated instead is not visible
   through C{twisted.web.client}'s public API, and C{HTTP/1.0} receivers
   that keep connections are rare): its deliveries go on new connections,
   each asking C{Connection: close};
 - an answer with C{Connection: close} is never reused (Twisted drops that
   connection itself);
 - a request on a connection taken from the pool that fails before any
   byte of the answer arrived fails with L{ReusedConnectionLost}.  The
   receiver closed that connection when it was idle (a C{Keep-Alive:
   timeout} shorter than our L{IDLE_REUSE}, or a receiver that closes
   after every answer without saying so); its later deliveries go on new
   connections, and the deliverer sends that request again at once (see
   L{evgate.webhook.delivery.Deliverer}).

What was learnt about a receiver is forgotten after L{NO_REUSE_MEMORY}
seconds, so a receiver that starts keeping connections gets them reused
again.

The request path
================

Deliveries go straight to the agent (L{DeliveryClient}), not through
treq's client: a delivery needs none of what treq adds per request (a
cookie jar, which would also hand one receiver's cookies back on every
subscription's requests to that host; gzip decoding of an answer that is
thrown away; URL parsing of a callback that does not change), and treq's
body producer for C{bytes} writes the body one reactor turn after the
head.  L{DeliveryClient.request} keeps treq's signature, so tests still
put a C{treq.testing.StubTreq} in its place.

TLS
===

Receivers' certificates are checked against the system's trust store, or
against the certificates of C{[gateway] webhook-ca-file} when it is set
(a private CA), with the callback's host name; see L{WebhookTrust}.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from hyperlink import EncodedURL
from OpenSSL.SSL import Error as TLSError
from twisted.internet.defer import CancelledError, Deferred, DeferredList, TimeoutError, succeed
from twisted.internet.error import ConnectError, ConnectionDone, ConnectionLost, DNSLookupError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HostnameCachingHTTPSPolicy,
    RequestNotSent,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IPolicyForHTTPS
from zope.interface import implementer

from evgate.ini import SectionReader, gatewayKeys
from evgate.twistedprivate import QuietConnectionPool
from evgate.webhook.ssrf import ForbiddenAddress

USER_AGENT = b"evgate-webhook/1"

# Response bodies are read (so that the connection can be reused) and
# thrown away; a receiver that sends more than this is cut off.
MAX_RESPONSE_BYTES = 65536

# Seconds an idle connection stays in the pool for the next delivery.
IDLE_REUSE = 60.0

# Idle connections kept per receiver (scheme, host, port).
MAX_PERSISTENT_PER_HOST = 4

# Seconds a receiver found not to keep connections gets new ones, before
# reuse is tried again.
NO_REUSE_MEMORY = 600.0

# Receivers remembered as not keeping connections, at most; the oldest is
# forgotten first.
MAX_REMEMBERED = 10000

# Callback URLs whose encoded form (and receiver) a client remembers, at
# most (a subscription's URL does not change between deliveries).
MAX_REMEMBERED_URLS = 4096

HostKey = Tuple[bytes, bytes, int]


class ReusedConnectionLost(Exception):
    """
    A request on a connection taken from the pool got no byte of an answer:
    the receiver had closed that connection.
    """

    def __str__(self) -> str:
        return "the receiver closed a kept-alive connection before answering"


def describeFailure(failure: Failure, timeout: float) -> str:
    """
    One line for C{lastError} about a request that got no answer.
    """
    if failure.check(CancelledError, TimeoutError):
        return f"no response within {timeout:g} s"
    if failure.check(ReusedConnectionLost):
        return str(failure.value)
    reasons = getattr(failure.value, "reasons", None)
    if reasons:
        if any(r.check(CancelledError, TimeoutError) for r in reasons):
            return f"no response within {timeout:g} s"
        tls = _tlsFailure(reasons)
        if tls is not None:
            return tls
        return f"the connection failed before a response: {reasons[0].getErrorMessage()}"
    if isinstance(failure.value, ForbiddenAddress):
        return f"refused to connect to {failure.value.args[0] if failure.value.args else 'a forbidden address'}"
    if failure.check(DNSLookupError):
        return "the callback host does not resolve"
    if failure.check(ConnectError):
        return f"cannot connect: {failure.getErrorMessage()}"
    return f"{type(failure.value).__name__}: {failure.getErrorMessage()}"[:300]


def _tlsFailure(reasons: List[Failure]) -> Optional[str]:
    for reason in reasons:
        if reason.check(TLSError):
            text = str(reason.value)
            if "certificate verify failed" in text:
                return ("TLS handshake failed: the receiver's certificate is not trusted "
                        "(certificate verify failed; see webhook-ca-file)")
            return f"TLS handshake failed: {text}"[:300]
    return None


class ResponseTooLarge(Exception):
    """
    A response body passed L{MAX_RESPONSE_BYTES}.
    """


class ResponseDrain:
    """
    Counts a response body, and stops it past L{MAX_RESPONSE_BYTES}.
    """

    def __init__(self) -> None:
        self.size = 0

    def __call__(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > MAX_RESPONSE_BYTES:
            raise ResponseTooLarge()


@implementer(IStreamClientEndpoint)
class _NoticedEndpoint:
    """
    An endpoint that notes that it was asked for a connection: how
    L{DeliveryPool} tells a new connection from one out of the pool.
    """

    def __init__(self, endpoint: Any) -> None:
        self.endpoint = endpoint
        self.connected = False

    def connect(self, protocolFactory: Any) -> Deferred:
        self.connected = True
        return self.endpoint.connect(protocolFactory)  # type: ignore[no-any-return]


class _ReusedConnection:
    """
    A connection the pool handed out again: a request on it that fails
    before any byte of the answer arrived fails with
    L{ReusedConnectionLost}.
    """

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol

    @property
    def state(self) -> str:
        """
        The wrapped connection's state.
        """
        return self.protocol.state  # type: ignore[no-any-return]

    def request(self, request: Any) -> Deferred:
        """
        Send C{request} on the connection.
        """
        d = self.protocol.request(request)
        d.addErrback(self._closedByPeer)
        return d  # type: ignore[no-any-return]

    def _closedByPeer(self, failure: Failure) -> Failure:
        # Only a close by the receiver counts: our own abort (a timeout
        # cancels the request) or a broken TLS session are real failures.
        if failure.check(RequestNotSent):
            raise ReusedConnectionLost()
        if isinstance(failure.value, ResponseNeverReceived) and all(
                reason.check(ConnectionDone, ConnectionLost) for reason in failure.value.reasons):
            raise ReusedConnectionLost()
        return failure


class DeliveryPool(QuietConnectionPool):
    """
    The persistent pool of deliveries: it tells connections it hands out
    again from new ones (L{_ReusedConnection}), and leaves retrying to the
    deliverer (its own automatic retry is for idempotent methods only,
    which deliveries never use).
    """

    retryAutomatically = False

    def getConnection(self, key: Any, endpoint: Any) -> Deferred:
        """
        A connection for C{key}: one from the pool, or a new one made with
        C{endpoint}.
        """
        noticed = _NoticedEndpoint(endpoint)
        d = super().getConnection(key, noticed)
        d.addCallback(lambda protocol: protocol if noticed.connected else _ReusedConnection(protocol))
        return d  # type: ignore[no-any-return]


def hostKey(uri: bytes) -> HostKey:
    """
    The receiver of a request to C{uri}: (scheme, host, port), as the pool
    groups connections.
    """
    parsed = URI.fromBytes(uri)
    return (parsed.scheme, parsed.host, parsed.port)


@implementer(IAgent)
class DeliveryAgent:
    """
    The agent of deliveries: a request goes on a pooled connection when
    the receiver keeps connections, and on a new one (C{Connection: close})
    when it was found not to (see the module's docstring).
    """

    log = Logger()

    def __init__(self, reactor: Any, endpointFactory: Any, idleReuse: float = IDLE_REUSE,
                 maxPersistentPerHost: int = MAX_PERSISTENT_PER_HOST,
                 noReuseMemory: float = NO_REUSE_MEMORY) -> None:
        self.reactor = reactor
        self.pool = DeliveryPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = maxPersistentPerHost
        self.pool.cachedConnectionTimeout = idleReuse  # type: ignore[assignment]
        self.freshPool = QuietConnectionPool(reactor, persistent=False)
        self.noReuseMemory = noReuseMemory
        self._reusing = Agent.usingEndpointFactory(reactor, endpointFactory, pool=self.pool)
        self._fresh = Agent.usingEndpointFactory(reactor, endpointFactory, pool=self.freshPool)
        # receiver -> until when it gets new connections
        self._noReuse: "OrderedDict[HostKey, float]" = OrderedDict()
        # callback URI -> its receiver (a subscription's URI does not change)
        self._keys: Dict[bytes, HostKey] = {}

    def keepAtLeast(self, count: int) -> None:
        """
        Keep at least C{count} idle connections per receiver: a subscription
        with C{count} messages in flight would otherwise close and open
        connections on every round of answers.
        """
        if count > self.pool.maxPersistentPerHost:
            self.pool.maxPersistentPerHost = count

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Deferred:
        """
        Send a request, on a pooled connection if the receiver keeps them.
        """
        key = self._keys.get(uri)
        if key is None:
            key = hostKey(uri)
            if len(self._keys) >= MAX_REMEMBERED_URLS:
                self._keys.clear()
            self._keys[uri] = key
        agent = self._reusing if self.reuses(key) else self._fresh
        d = agent.request(method, uri, headers, bodyProducer)
        d.addCallbacks(self._answered, self._failed, callbackArgs=(key,), errbackArgs=(key,))
        return d  # type: ignore[no-any-return]

    def reuses(self, key: HostKey) -> bool:
        """
        Whether requests to C{key} go on pooled connections.
        """
        until = self._noReuse.get(key)
        if until is None:
            return True
        if until <= self.reactor.seconds():
            del self._noReuse[key]
            return True
        return False

    def _answered(self, response: Any, key: HostKey) -> Any:
        if tuple(response.version[1:]) < (1, 1):
            self._stopReusing(key, "it answers HTTP/1.0")
        return response

    def _failed(self, failure: Failure, key: HostKey) -> Failure:
        if failure.check(ReusedConnectionLost):
            self._stopReusing(key, "it closed an idle connection")
        return failure

    def _stopReusing(self, key: HostKey, why: str) -> None:
        if key not in self._noReuse:
            scheme, host, port = key
            self.log.info("webhook receiver {scheme}://{host}:{port} does not keep connections ({why}): "
                          "its deliveries go on new connections for {seconds:g} s",
                          scheme=scheme.decode("ascii"), host=host.decode("ascii", "replace"), port=port,
                          why=why, seconds=self.noReuseMemory)
        self._noReuse.pop(key, None)
        self._noReuse[key] = self.reactor.seconds() + self.noReuseMemory
        while len(self._noReuse) > MAX_REMEMBERED:
            self._noReuse.popitem(last=False)

    def closeCachedConnections(self) -> Deferred:
        """
        Close every idle connection; fires when they are closed.
        """
        return DeferredList([self.pool.closeCachedConnections(), self.freshPool.closeCachedConnections()],
                            consumeErrors=True)


@implementer(IBodyProducer)
class BytesBody:
    """
    A request body that is all there at once: written to the connection
    in the same turn as the request's head, so that both leave in one
    segment.
    """

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred:
        """
        Write the whole body.
        """
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        """
        Nothing to pause: the body was written at once.
        """

    def resumeProducing(self) -> None:
        """
        Nothing to resume.
        """

    def stopProducing(self) -> None:
        """
        Nothing to stop.
        """


class DeliveryClient:
    """
    What deliveries send requests with: C{request} with the signature of
    treq's C{HTTPClient.request} (the keywords deliveries use), straight
    to an L{IAgent}; see the module's docstring for why not treq.

    @ivar agent: the agent (a L{DeliveryAgent}).
    """

    def __init__(self, agent: Any, reactor: Any) -> None:
        self.agent = agent
        self.reactor = reactor
        self._uris: Dict[str, bytes] = {}

    def uriOf(self, url: str) -> bytes:
        """
        C{url} as the agent takes it: encoded as treq encodes it (an IRI
        becomes a URI), remembered.
        """
        uri = self._uris.get(url)
        if uri is None:
            uri = EncodedURL.from_text(url).to_uri().to_text().encode("ascii")
            if len(self._uris) >= MAX_REMEMBERED_URLS:
                self._uris.clear()
            self._uris[url] = uri
        return uri

    def request(self, method: str, url: str, *, data: bytes = b"", headers: Optional[Headers] = None,
                timeout: Optional[float] = None, allow_redirects: bool = False, unbuffered: bool = True,
                reactor: Any = None) -> Deferred:
        """
        Send one request with body C{data}; the Deferred fires with the
        L{IResponse} once its head arrived (its body is not read), and is
        cancelled after C{timeout} seconds without one.  Redirects are not
        followed (C{allow_redirects} must be false) and the response is
        never buffered.
        """
        if allow_redirects or not unbuffered:
            raise ValueError("deliveries follow no redirects and buffer no responses")
        d = self.agent.request(method.encode("ascii"), self.uriOf(url),
                               headers if headers is not None else Headers(), BytesBody(data))
        if timeout:
            clock = reactor if reactor is not None else self.reactor
            call = clock.callLater(timeout, d.cancel)

            def answered(result: Any) -> Any:
                if call.active():
                    call.cancel()
                return result

            d.addBoth(answered)
        return d  # type: ignore[no-any-return]


# -- TLS trust

_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)


@dataclass(frozen=True)
class WebhookTrust:
    """
    Which certificates receivers may present: C{[gateway] webhook-ca-file}.

    @ivar caFile: the file the certificates came from, or L{None} for the
        system's trust store.
    @ivar certificates: the PEM certificates of C{caFile}.
    """

    caFile: Optional[str] = None
    certificates: Tuple[bytes, ...] = ()

    def tlsPolicy(self) -> IPolicyForHTTPS:
        """
        The policy that checks receivers' certificates and host names.
        """
        # The connection settings of a receiver are made once per host
        # name and port, not for every request the agent sends there.
        if not self.certificates:
            return HostnameCachingHTTPSPolicy(BrowserLikePolicyForHTTPS())

        root = trustRootFromCertificates([Certificate.loadPEM(pem) for pem in self.certificates])
        return HostnameCachingHTTPSPolicy(BrowserLikePolicyForHTTPS(trustRoot=root))


def readCertificates(data: bytes) -> Tuple[bytes, ...]:
    """
    The PEM certificates in C{data}, each checked.

    @raise ValueError: if there is none, or one is not a certificate.
    """

    found = tuple(_PEM_CERTIFICATE.findall(data))
    if not found:
        raise ValueError("holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    for index, pem in enumerate(found, 1):
        try:
            Certificate.loadPEM(pem)
        except Exception as e:  # pyOpenSSL raises its own error for any bad input
            raise ValueError(f"certificate {index} is not a valid certificate: {e}") from None
    return found


@gatewayKeys
def parseWebhookTrustKeys(section: SectionReader) -> Mapping[str, Any]:
    """
    C{webhook-ca-file}, as L{WebhookTrust} under
    C{options["webhook-trust"]}; a relative path is relative to the
    configuration file's directory.
    """
    raw = section.get("webhook-ca-file", None)
    if raw is None:
        return {"webhook-trust": WebhookTrust()}
    path = os.path.expanduser(raw)
    if not os.path.isabs(path) and section.path[:1] != "<":
        path = os.path.join(os.path.dirname(os.path.abspath(section.path)), path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise section.error("webhook-ca-file", f"cannot read {path}: {e.strerror or e}") from None
    try:
        certificates = readCertificates(data)
    except ValueError as e:
        raise section.error("webhook-ca-file", f"{path} {e}") from None
    return {"webhook-trust": WebhookTrust(path, certificates)}
