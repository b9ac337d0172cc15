"""
The C{http} endpoint: a set of upstream HTTP servers behind one name.

It plays the part a connector plays for a broker (the node starts, stops
and reports it like one: C{connected} is "some target is in service"), but
it publishes and subscribes nothing: only the C{http-proxy} entrypoint
uses it, through L{HttpEndpoint.agent} and L{HttpEndpoint.targets}.

Connections are kept alive per target in one
L{twisted.web.client.HTTPConnectionPool}; L{_ObservedPool} tells a request
when its connection is ready, which is where the connect stage ends and
the response-head clock starts (see L{evgate.proxy._forward}).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Mapping, Optional

from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.client import Agent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from evgate.errors import EndpointUnavailable
from evgate.ini import SectionReader
from evgate.interfaces import IConnector, IMetricsSource
from evgate.proxy._pool import BALANCING, Target, TargetPool, parseTargets
from evgate.proxy.metrics import targetFamilies
from evgate.twistedprivate import ConnectionHeaderClientFactory, QuietConnectionPool

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$")
_HEALTH = re.compile(r"^\s*(/\S*)\s+every\s+(\S+)\s*$")


def parseDuration(section: SectionReader, key: str, default: float) -> float:
    """
    C{key} as seconds: C{5}, C{5s}, C{500ms} or C{2m}.
    """
    raw = section.get(key, None)
    if raw is None:
        return default
    match = _DURATION.match(raw)
    if match is None:
        raise section.error(key, f"expected a duration such as 5s or 500ms, got {raw!r}")
    value = float(match.group(1))
    unit = match.group(2) or "s"
    return value / 1000 if unit == "ms" else value * 60 if unit == "m" else value


def parseOptions(section: SectionReader) -> Mapping[str, Any]:
    """
    The keys of an C{[endpoint:NAME]} of C{type = http} (docs/proxy.md).
    """
    try:
        targets = parseTargets(section.getList("targets"))
    except ValueError as e:
        raise section.error("targets", str(e)) from None
    if not targets:
        raise section.error("targets", "needs at least one target URL")
    balancing = section.getChoice("load-balancing", BALANCING, "round-robin")
    if balancing != "weighted" and any(w != 1 for _, w in targets):
        raise section.error("targets", "weights (url=weight) need load-balancing = weighted")
    health = section.get("health-check", None)
    healthCheck = None
    if health:
        match = _HEALTH.match(health)
        if match is None:
            raise section.error("health-check", f"expected '/path every 5s', got {health!r}")
        interval = _DURATION.match(match.group(2))
        if interval is None:
            raise section.error("health-check", f"bad interval {match.group(2)!r}")
        seconds = float(interval.group(1)) * {"ms": 0.001, "m": 60.0}.get(interval.group(2) or "s", 1.0)
        if seconds < 0.1:
            raise section.error("health-check", "the interval must be at least 100ms")
        healthCheck = (match.group(1), seconds)
    verify = section.getBool("verify", True)
    caFile = section.get("ca-file", None)
    clientCert = section.get("client-cert", None)
    clientKey = section.get("client-key", None)
    if (clientCert is None) != (clientKey is None):
        raise section.error("client-cert" if clientCert is None else "client-key",
                            "client-cert and client-key go together")
    for key, path in (("ca-file", caFile), ("client-cert", clientCert), ("client-key", clientKey)):
        if path is not None:
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                raise section.error(key, f"cannot read {path}: {e.strerror}") from None
    return {
        "targets": tuple(targets),
        "balancing": balancing,
        "connectTimeout": parseDuration(section, "connect-timeout", 5.0),
        "responseTimeout": parseDuration(section, "response-timeout", 60.0),
        "idleTimeout": parseDuration(section, "idle-timeout", 60.0),
        "retries": section.getInt("retries", len(targets) - 1, minimum=0, maximum=10),
        "maxFails": section.getInt("max-fails", 1, minimum=1, maximum=100),
        "failTimeout": parseDuration(section, "fail-timeout", 10.0),
        "healthCheck": healthCheck,
        "maxIdleConnections": section.getInt("max-idle-connections", 32, minimum=0, maximum=10000),
        "verify": verify,
        "caFile": caFile,
        "clientCert": clientCert,
        "clientKey": clientKey,
    }


@implementer(IPolicyForHTTPS)
class UpstreamTlsPolicy:
    """
    How the endpoint speaks TLS to C{https} targets: the system's trust
    roots, or C{ca-file}'s; a client certificate when one is configured;
    no verification only with C{verify = false}.
    """

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.verify = options.get("verify", True)
        self.trustRoot: Any = None
        if options.get("caFile"):
            with open(options["caFile"], "rb") as f:
                self.trustRoot = ssl.Certificate.loadPEM(f.read())
        self.clientCertificate: Any = None
        if options.get("clientCert"):
            with open(options["clientCert"], "rb") as f:
                cert = f.read()
            with open(options["clientKey"], "rb") as f:
                key = f.read()
            self.clientCertificate = ssl.PrivateCertificate.loadPEM(cert + b"\n" + key)

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        """
        The TLS connection creator for one target.
        """
        name = hostname.decode("ascii")
        if not self.verify:
            extra = {}
            if self.clientCertificate is not None:
                extra = {"privateKey": self.clientCertificate.privateKey.original,
                         "certificate": self.clientCertificate.original}
            return _UnverifiedTls(name, ssl.CertificateOptions(verify=False, **extra).getContext())
        return ssl.optionsForClientTLS(name, trustRoot=self.trustRoot or ssl.platformTrust(),
                                       clientCertificate=self.clientCertificate)


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedTls:
    """
    TLS without certificate verification (C{verify = false}), still with
    the target's name sent for SNI.
    """

    def __init__(self, hostname: str, context: Any) -> None:
        self.hostname = hostname.encode("idna")
        self.context = context

    def clientConnectionForTLS(self, tlsProtocol: Any) -> Any:
        connection = SSL.Connection(self.context, None)
        connection.set_app_data(tlsProtocol)
        connection.set_tlsext_host_name(self.hostname)
        connection.set_connect_state()
        return connection


class _ObservedPool(QuietConnectionPool):
    """
    A connection pool that tells the request being started when its
    connection is ready (new or reused).

    L{Agent.request} asks the pool for a connection synchronously, so the
    observer set just before that call (L{expectConnection}) belongs to
    that request and no other.
    """

    _observer: Any = None
    # Its protocols let the proxy see the upstream's Connection header.
    _factory = ConnectionHeaderClientFactory

    def expectConnection(self, observer: Callable[[], None]) -> None:
        """
        Call C{observer} when the connection of the next request is ready.
        """
        self._observer = observer

    def getConnection(self, key: Any, endpoint: Any) -> Any:
        observer, self._observer = self._observer, None
        d = super().getConnection(key, endpoint)
        if observer is not None:
            def ready(protocol: Any) -> Any:
                observer()
                return protocol

            d.addCallback(ready)
        return d


@implementer(IConnector, IMetricsSource)
class HttpEndpoint(Service):
    """
    C{type = http}: upstream HTTP servers for C{http-proxy} APIs.
    """

    kind = "http"
    log = Logger()

    def __init__(self, name: str, options: Mapping[str, Any], reactor: Any) -> None:
        self.name: str = name  # type: ignore[assignment]
        self.options = options
        self.reactor = reactor
        self.targets = TargetPool(name, [Target(url, weight) for url, weight in options["targets"]],
                                  options["balancing"], reactor, options["maxFails"], options["failTimeout"])
        self.pool = _ObservedPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = options["maxIdleConnections"]
        # An idle kept-alive connection is closed before most servers
        # would close it themselves (nginx: 75s), so that a request rarely
        # meets a connection the server is closing.
        self.pool.cachedConnectionTimeout = 50
        self.pool.retryAutomatically = True
        self.tlsPolicy = UpstreamTlsPolicy(options)
        self.agent = Agent(reactor, contextFactory=self.tlsPolicy, connectTimeout=options["connectTimeout"],
                           pool=self.pool)
        self._checks: List[LoopingCall] = []

    @property
    def connected(self) -> bool:
        """
        Whether some target is in service.
        """
        return bool(self.targets.inService())

    @property
    def notConnectedReason(self) -> Optional[str]:
        """
        Why no target is in service, for C{/ready}; L{None} while one is.
        """
        if self.connected:
            return None
        return f"no target of endpoint {self.name} is in service"

    def epoch(self) -> int:
        """
        An C{http} endpoint makes no cursors.
        """
        return 0

    def publish(self, topic: str, draft: Any, timeout: float) -> Any:
        """
        Nothing is published to an C{http} endpoint.
        """
        raise EndpointUnavailable(f"endpoint {self.name} is an http endpoint: it serves http-proxy APIs only")

    publishMany = publish

    def subscribe(self, topic: str, start: Any, sink: Any) -> Any:
        """
        Nothing is read from an C{http} endpoint.
        """
        raise EndpointUnavailable(f"endpoint {self.name} is an http endpoint: it serves http-proxy APIs only")

    def startService(self) -> None:
        super().startService()
        check = self.options.get("healthCheck")
        if check is not None:
            path, interval = check
            for target in self.targets.targets:
                loop = LoopingCall(self._check, target, path, interval)
                loop.clock = self.reactor
                loop.start(interval, now=True)
                self._checks.append(loop)

    def stopService(self) -> Any:
        # In-flight requests keep their connections (a reload that removes
        # the endpoint lets them finish); only idle ones are closed.
        super().stopService()
        for loop in self._checks:
            if loop.running:
                loop.stop()
        self._checks = []
        return self.pool.closeCachedConnections()

    def _check(self, target: Target, path: str, interval: float) -> Any:
        url = target.origin + (target.basePath + path).encode("ascii")
        headers = Headers({b"Host": [target.hostHeader], b"User-Agent": [b"evgate-health-check"]})
        d = self.agent.request(b"GET", url, headers)
        timeout = self.reactor.callLater(interval, d.cancel)

        def answered(response: Any) -> None:
            response.deliverBody(_Discard())
            self._setHealth(target, 200 <= response.code < 400, f"status {response.code}")

        def failed(failure: Any) -> None:
            self._setHealth(target, False, failure.getErrorMessage())

        def done(result: Any) -> Any:
            if timeout.active():
                timeout.cancel()
            return result

        d.addBoth(done)
        d.addCallbacks(answered, failed)
        return None

    def _setHealth(self, target: Target, healthy: bool, why: str) -> None:
        if healthy != target.healthy:
            if healthy:
                self.log.info("endpoint {endpoint}: target {target} passes its health check again",
                              endpoint=self.name, target=target.url)
            else:
                self.log.warn("endpoint {endpoint}: target {target} fails its health check ({why})",
                              endpoint=self.name, target=target.url, why=why)
        target.healthy = healthy

    def metricFamilies(self) -> List[Any]:
        """
        The per-target metric families of this endpoint (read at scrape
        time by L{evgate.metrics.GatewayCollector}).
        """
        return targetFamilies(self)

    def describe(self) -> Dict[str, Any]:
        """
        The targets and their state, for the admin API.
        """
        now = self.reactor.seconds()
        return {"targets": [{"url": t.url, "inService": t.available(now), "inFlight": t.inFlight}
                            for t in self.targets.targets]}


class _Discard:
    # A body protocol that reads a health check's answer and forgets it.
    def makeConnection(self, transport: Any) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        pass
