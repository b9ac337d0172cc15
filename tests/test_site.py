"""
Tests for evgate.site: what a hostile client gets from the HTTP/1.1
channel (oversized and malformed heads, slow heads and bodies, idle
keep-alive connections, too many connections, input that makes a render
fail), in memory over StringTransports driven by a Clock.
"""

from __future__ import annotations

import gc
import json
import weakref
from typing import Any, Dict, List, Tuple

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

from evgate import twistedprivate
from evgate.answers import onDeparture
from evgate.config import ConfigError, parseConfig
from evgate.gateway import GatewayRequest as ReExportedRequest
from evgate.gateway import GatewaySite as ReExportedSite
from evgate.site import ConnectionLimits, GatewayRequest, GatewaySite, connectionLimits

from .helpers import MEMORY_INI, memoryGateway

PEER = IPv4Address("TCP", "127.0.0.1", 40000)


def connect(site: GatewaySite) -> Tuple[Any, StringTransport]:
    """
    A client connection to C{site} over a StringTransport.
    """
    transport = StringTransport(peerAddress=PEER, hostAddress=IPv4Address("TCP", "127.0.0.1", 8080))
    protocol = site.buildProtocol(PEER)
    transport.protocol = protocol
    protocol.makeConnection(transport)
    return protocol, transport


def answer(transport: StringTransport) -> Tuple[int, Dict[str, str], bytes]:
    """
    The status, headers and body of the one response in C{transport}.
    """
    head, _, body = transport.value().partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


class SiteTestCase(SynchronousTestCase):
    """
    A memory gateway on a Clock whose site has small, known limits.
    """

    limits = ConnectionLimits(maxHeaderBytes=2048, headTimeout=10.0, bodyMinRate=100, bodyGrace=5.0,
                              keepAliveTimeout=60.0, maxConnections=3)

    def setUp(self) -> None:
        self.clock = Clock()
        self.gateway = memoryGateway(clock=self.clock)
        self.site = self.gateway.site
        self.site.limits = self.limits

    def problem(self, transport: StringTransport, status: int) -> Dict[str, Any]:
        """
        Assert C{transport} holds one problem answer of C{status} and that
        the connection is closing; return the document.
        """
        code, headers, body = answer(transport)
        self.assertEqual(code, status, transport.value())
        self.assertEqual(headers["content-type"], "application/problem+json")
        self.assertEqual(int(headers["content-length"]), len(body))
        document = json.loads(body)
        self.assertEqual(document["status"], status)
        self.assertTrue(document["type"].startswith("https://evgate.dev/problems/"))
        self.assertTrue(transport.disconnecting)
        return document

    def refused(self, reason: str) -> int:
        """
        The site's count of connections refused for C{reason}.
        """
        return self.site.connectionCounts.refused[reason]


class LocalAddressTests(SiteTestCase):
    """
    The channel asks its transport for the local address once per
    connection, not once per request (a C{getsockname()} each time).
    """

    def test_askedOnce(self) -> None:
        protocol, transport = connect(self.site)
        asked = []
        realGetHost = transport.getHost

        def getHost() -> Any:
            asked.append(1)
            return realGetHost()

        transport.getHost = getHost  # type: ignore[method-assign]
        request = b"POST /demo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
        for _ in range(3):
            protocol.dataReceived(request)
        self.assertEqual(transport.value().count(b"HTTP/1.1 202 Accepted"), 3)
        self.assertEqual(asked, [])
        self.assertEqual(protocol.getHost(), IPv4Address("TCP", "127.0.0.1", 8080))


class ChannelMemoryTests(SiteTestCase):
    """
    A connection's channel keeps its instance dictionary under the 30 names
    past which CPython stops sharing keys between instances (which cost
    every connection, an idle stream's above all, 1.3 KiB more): evgate's
    own state is in slots.
    """

    def test_fewNames(self) -> None:
        protocol, transport = connect(self.site)
        protocol.dataReceived(b"POST /demo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        protocol.dataReceived(b"GET /demo HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"HTTP/1.1 202 Accepted", transport.value())
        self.assertLess(len(vars(protocol)), 30, sorted(vars(protocol)))


class DepartureTests(SiteTestCase):
    """
    L{onDeparture} tells of a client that left before its response was
    finished, once, without a Deferred on the gateway's requests.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.gateway = memoryGateway(clock=self.clock, entrypoints="sse http-get")
        self.site = self.gateway.site
        self.site.limits = self.limits

    def turn(self) -> None:
        for _ in range(5):
            self.clock.advance(0)

    def test_streamClosedByClient(self) -> None:
        """
        An SSE stream whose client closes the connection ends its
        subscription: the hub forgets it and the stream ends in the counts.
        """
        protocol, transport = connect(self.site)
        protocol.dataReceived(b"GET /demo HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        self.turn()
        self.assertIn(b"text/event-stream", transport.value())
        [request] = protocol.requests
        self.assertIsNotNone(request.evgateOnLeft)
        self.assertEqual(request.notifications, [])
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(request.evgateOnLeft)
        self.assertTrue(request.evgateStream.closed)
        self.assertEqual(self.gateway.metrics.tally("demo", "sse").codes, {200: 1})

    def test_finishedNotCalled(self) -> None:
        """
        A request finished before its connection is lost does not call the
        callback; a request of another class gets a notifyFinish errback.
        """
        called: List[Any] = []
        protocol, transport = connect(self.site)
        protocol.dataReceived(b"GET /demo?timeout=0 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.turn()
        self.assertIn(b"HTTP/1.1 200", transport.value())
        [request] = protocol.requests or [None]
        self.assertIsNone(request)
        other = Request(DummyChannel())
        onDeparture(other, called.append)
        self.assertEqual(len(other.notifications), 1)
        other.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(called), 1)
        self.assertTrue(called[0].check(ConnectionDone))


class ReExportTests(SynchronousTestCase):
    """
    The classes moved out of evgate.gateway are still importable from it.
    """

    def test_same(self) -> None:
        """
        evgate.gateway's GatewaySite and GatewayRequest are evgate.site's.
        """
        self.assertIs(ReExportedSite, GatewaySite)
        self.assertIs(ReExportedRequest, GatewayRequest)


class HeadTests(SiteTestCase):
    """
    Oversized and malformed heads are answered with problem documents.
    """

    def test_oneLongHeader(self) -> None:
        """
        One header line longer than max-header-bytes (a big token) is
        answered 431 as a problem document, not by closing in silence.
        """
        protocol, transport = connect(self.site)
        protocol.dataReceived(b"GET /demo HTTP/1.1\r\nAuthorization: Bearer " + b"x" * 5000)
        document = self.problem(transport, 431)
        self.assertIn("max-header-bytes (2048 bytes)", document["detail"])
        self.assertEqual(self.refused("header-too-large"), 1)

    def test_manyHeaders(self) -> None:
        """
        Headers that are each small but together over the limit are 431.
        """
        protocol, transport = connect(self.site)
        protocol.dataReceived(b"GET /demo HTTP/1.1\r\n" + b"X-Filler: 0123456789012345678901234567\r\n" * 60)
        self.problem(transport, 431)

    def test_raisedLimit(self) -> None:
        """
        Under a raised max-header-bytes, the same big header is served.
        """
        self.site.limits = ConnectionLimits(maxHeaderBytes=65536)
        protocol, transport = connect(self.site)
        protocol.dataReceived(b"GET /demo?timeout=0 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"x" * 20000 + b"\r\n\r\n")
        self.clock.advance(0)
        self.assertEqual(answer(transport)[0], 200)

    def test_malformed(self) -> None:
        """
        A header without a colon is answered 400 as a problem document
        (Twisted answers a bare 400 without a body).
        """
        protocol, transport = connect(self.site)
        protocol.dataReceived(b"GET /demo HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")
        document = self.problem(transport, 400)
        self.assertEqual(document["type"], "https://evgate.dev/problems/malformed-request")
        self.assertEqual(self.refused("bad-request"), 1)

    def test_badRequestLine(self) -> None:
        """
        A request line that is not one is 400 as a problem document.
        """
        protocol, transport = connect(self.site)
        protocol.dataReceived(b"HELLO\r\n\r\n")
        self.problem(transport, 400)

    def test_adminSiteToo(self) -> None:
        """
        The admin listener's site answers oversized heads the same way.
        """
        from evgate.admin.app import AdminApp, adminSite

        site = adminSite(AdminApp(self.gateway, "t"), self.clock)
        self.assertIsInstance(site, GatewaySite)
        protocol, transport = connect(site)
        protocol.dataReceived(b"GET /health HTTP/1.1\r\nX: " + b"x" * 20000)
        self.problem(transport, 431)


class TwistedPrivateTests(SynchronousTestCase):
    """
    Pins what evgate.twistedprivate relies on in this Twisted.
    """

    def test_badRequestHook(self) -> None:
        """
        HTTPChannel still answers malformed heads through the private
        method evgate replaces, and evgate's channel replaces it.
        """
        from evgate.site import GatewayChannel

        self.assertTrue(twistedprivate.hasBadRequestHook())
        self.assertTrue(callable(getattr(HTTPChannel, twistedprivate.BAD_REQUEST_HOOK)))
        self.assertIs(getattr(GatewayChannel, twistedprivate.BAD_REQUEST_HOOK), GatewayChannel.respondToBadRequest)


class SlowClientTests(SiteTestCase):
    """
    Slowloris: heads and bodies that trickle, and idle connections.
    """

    def test_headDeadline(self) -> None:
        """
        A head that keeps trickling (one header line every few seconds,
        each resetting Twisted's idle timer) is cut off at
        request-head-timeout with a 408 problem.
        """
        protocol, transport = connect(self.site)
        protocol.dataReceived(b"GET /demo HTTP/1.1\r\n")
        for second in range(9):
            self.clock.advance(1)
            protocol.dataReceived(b"X-Slow-%d: 1\r\n" % (second,))
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1.01)
        document = self.problem(transport, 408)
        self.assertIn("request-head-timeout", document["detail"])
        self.assertEqual(self.refused("head-timeout"), 1)

    def test_partialRequestLine(self) -> None:
        """
        The deadline runs from the first byte, before any line is whole.
        """
        protocol, transport = connect(self.site)
        protocol.dataReceived(b"GE")
        self.clock.advance(10.01)
        self.problem(transport, 408)

    def test_promptHeadNoTimer(self) -> None:
        """
        A request whose head comes in one read arms no head timer, and
        leaves none behind.
        """
        protocol, transport = connect(self.site)
        protocol.dataReceived(b"GET /demo?timeout=0 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.clock.advance(0)
        self.assertEqual(answer(transport)[0], 200)
        self.assertIsNone(protocol._headCall)
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.func == protocol._headTimedOut], [])

    def test_slowBody(self) -> None:
        """
        A body slower than request-body-min-rate after the grace period is
        refused with 408, and nothing is published.
        """
        protocol, transport = connect(self.site)
        protocol.dataReceived(b"POST /demo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        for _ in range(6):
            protocol.dataReceived(b"x" * 10)
            self.clock.advance(1)
        document = self.problem(transport, 408)
        self.assertIn("request-body-min-rate", document["detail"])
        self.assertEqual(self.refused("body-too-slow"), 1)
        self.assertEqual(self.gateway.connectors["local"].topicLog("demo").nextOffset, 0)

    def test_steadyBody(self) -> None:
        """
        A large body that keeps above the minimum rate is read to the end
        and published.
        """
        protocol, transport = connect(self.site)
        protocol.dataReceived(b"POST /demo HTTP/1.1\r\nHost: x\r\nContent-Length: 3000\r\n\r\n")
        for _ in range(20):
            protocol.dataReceived(b"x" * 150)
            self.clock.advance(1)
        self.assertEqual(answer(transport)[0], 202, transport.value())
        self.assertEqual(self.refused("body-too-slow"), 0)

    def test_keepAliveIdle(self) -> None:
        """
        A keep-alive connection with no request for keep-alive-timeout
        seconds is closed; one that is still in use is not.
        """
        protocol, transport = connect(self.site)
        protocol.dataReceived(b"GET /demo?timeout=0 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.clock.advance(0)
        self.clock.advance(59)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1.01)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.refused("keep-alive-timeout"), 1)

    def test_longPollNotIdle(self) -> None:
        """
        A long poll that waits longer than keep-alive-timeout is not cut:
        the idle timer only runs between requests.
        """
        self.site.limits = ConnectionLimits(keepAliveTimeout=5.0)
        protocol, transport = connect(self.site)
        protocol.dataReceived(b"GET /demo?timeout=20000 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.clock.advance(10)
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)


class BodyPipeTests(SiteTestCase):
    """
    The body pipe lookup (for APIs that take bodies as they arrive) is
    made only when the site serves such an API.
    """

    def test_noStreamingApi(self) -> None:
        """
        A site whose APIs all take their bodies once arrived never asks for
        a body pipe, and its resource says so.
        """
        self.assertIs(self.site.bodyPipes, self.gateway.resource)
        self.assertFalse(self.gateway.resource.streamsBodies)
        self.patch(self.gateway.resource, "bodyPipeFor", lambda path: self.fail("bodyPipeFor was asked"))
        protocol, transport = connect(self.site)
        protocol.dataReceived(b'POST /demo HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n\r\n{"n":1}')
        self.assertEqual(answer(transport)[0], 202)

    def test_streamingApi(self) -> None:
        """
        Once the site serves an API with a subtree entrypoint, every request
        with a body asks for a pipe: the resource knows it from its APIs.
        """
        resource = self.gateway.resource
        asked = []

        def bodyPipeFor(path: bytes) -> None:
            asked.append(path)
            return None

        self.patch(resource, "streamsBodies", True)
        self.patch(resource, "bodyPipeFor", bodyPipeFor)
        protocol, transport = connect(self.site)
        protocol.dataReceived(b'POST /demo?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n\r\n{"n":1}')
        self.assertEqual(asked, [b"/demo"])
        self.assertEqual(answer(transport)[0], 202)

    def test_adminSite(self) -> None:
        """
        A site whose resource has no body pipes (the admin's) never looks.
        """
        site = GatewaySite(Resource(), 1024)
        self.assertIsNone(site.bodyPipes)


class ConnectionCapTests(SiteTestCase):
    """
    max-connections: connections over the cap are answered 503 and closed.
    """

    def test_overCap(self) -> None:
        """
        The fourth connection of a site capped at three is answered 503
        (problem, Retry-After) and closed; after one closes, a new one is
        served.
        """
        held = [connect(self.site) for _ in range(3)]
        self.assertEqual(self.site.openConnections, 3)
        protocol, transport = connect(self.site)
        self.problem(transport, 503)
        self.assertEqual(answer(transport)[1]["retry-after"], "1")
        self.assertEqual(self.refused("max-connections"), 1)
        first, firstTransport = held[0]
        firstTransport.loseConnection()
        first.connectionLost(None)
        self.assertEqual(self.site.openConnections, 2)
        protocol, transport = connect(self.site)
        protocol.dataReceived(b"GET /demo?timeout=0 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.clock.advance(0)
        self.assertEqual(answer(transport)[0], 200)

    def test_takenOverSockets(self) -> None:
        """
        A connection whose transport was taken over (a WebSocket: the HTTP
        channel never hears it close) stops counting once its socket is
        closed, when the cap is reached.
        """
        for _ in range(3):
            protocol, transport = connect(self.site)
            transport.disconnected = True  # what a closed tcp.Server says
        self.clock.advance(2)
        protocol, transport = connect(self.site)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.site.openConnections, 1)


    def test_closedTakenOverTransportNotKept(self) -> None:
        """
        A taken-over transport (a WebSocket's) that closed and that nothing
        else holds is not kept by the site until the cap is reached: it is
        gone at once, and the connection no longer counts.
        """
        protocol, transport = connect(self.site)
        # What autobahn's WebSocketResource does: the channel lets go of
        # the transport, which now belongs to the WebSocket protocol.
        protocol.transport = None
        transport.protocol = object()
        transport.disconnected = True
        protocol.setTimeout(None)
        gone = weakref.ref(transport)
        del protocol, transport
        gc.collect()
        self.assertIsNone(gone())
        self.assertEqual(self.site.openConnections, 0)


class InternalErrorTests(SynchronousTestCase):
    """
    An exception that escapes a render is a 500 problem document.
    """

    def test_recursionError(self) -> None:
        """
        A RecursionError escaping a render is answered 500 as
        application/problem+json, never Twisted's HTML traceback page.
        """
        class Deep(Resource):
            isLeaf = True

            def render(self, request: Any) -> bytes:
                raise RecursionError("maximum recursion depth exceeded")

        site = GatewaySite(Deep(), 1000, reactor=Clock())
        site.displayTracebacks = True
        protocol, transport = connect(site)
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        code, headers, body = answer(transport)
        self.assertEqual(code, 500)
        self.assertEqual(headers["content-type"], "application/problem+json")
        self.assertNotIn(b"Traceback", body)
        self.assertEqual(json.loads(body)["status"], 500)
        self.assertEqual(len(self.flushLoggedErrors(RecursionError)), 1)


class DeepJsonTests(SiteTestCase):
    """
    Deeply nested JSON from clients is a 400 problem, not a 500.
    """

    def test_deepBatch(self) -> None:
        """
        A batch document nested 100,000 arrays deep (200 KB, under the body
        limit) is answered 400 naming the depth limit; nothing is published.
        """
        body = b'{"records":[{"value":' + b"[" * 100000 + b"]" * 100000 + b"}]}"
        protocol, transport = connect(self.site)
        protocol.dataReceived(b"POST /demo HTTP/1.1\r\nHost: x\r\n"
                              b"Content-Type: application/vnd.evgate.batch+json\r\n"
                              b"Content-Length: %d\r\n\r\n" % (len(body),) + body)
        code, headers, raw = answer(transport)
        self.assertEqual(code, 400, raw[:300])
        self.assertEqual(headers["content-type"], "application/problem+json")
        self.assertIn("64 levels", json.loads(raw)["detail"])
        self.assertEqual(self.gateway.connectors["local"].topicLog("demo").nextOffset, 0)

    def test_deepAdminBody(self) -> None:
        """
        A deeply nested admin body is a 400 naming the limit.
        """
        from evgate.admin.app import readJson
        from evgate.errors import BadRequest

        class Body:
            def __init__(self, data: bytes) -> None:
                self.data = data

            def read(self, n: int) -> bytes:
                return self.data[:n]

        class FakeRequest:
            content = Body(b"[" * 30000 + b"]" * 30000)

            def getHeader(self, name: bytes) -> bytes:
                return b"application/json"

        error = self.assertRaises(BadRequest, readJson, FakeRequest())
        self.assertIn("64 levels", error.detail)


class ConfigTests(SynchronousTestCase):
    """
    The [gateway] keys of the connection limits.
    """

    def test_defaults(self) -> None:
        """
        Without the keys, the documented defaults apply.
        """
        config = parseConfig(MEMORY_INI.format(retention=10, entrypoints="http-post", start="latest"), "t.ini")
        self.assertEqual(connectionLimits(config.gateway.options), ConnectionLimits(
            maxHeaderBytes=16384, headTimeout=10.0, bodyMinRate=1024, bodyGrace=10.0, keepAliveTimeout=60.0,
            maxConnections=10000))

    def test_set(self) -> None:
        """
        Every key is read, and reaches the site a gateway builds.
        """
        text = MEMORY_INI.format(retention=10, entrypoints="http-post", start="latest").replace(
            "listen = tcp:0", "listen = tcp:0\nmax-header-bytes = 65536\nrequest-head-timeout = 2.5\n"
            "request-body-min-rate = 0\nrequest-body-grace = 3\nkeep-alive-timeout = 30\nmax-connections = 50")
        config = parseConfig(text, "t.ini")
        limits = ConnectionLimits(65536, 2.5, 0, 3.0, 30.0, 50)
        self.assertEqual(connectionLimits(config.gateway.options), limits)
        from evgate.service import GatewayService

        gateway = GatewayService(config, Clock())
        self.assertEqual(gateway.site.limits, limits)
        self.assertEqual(gateway.site.timeOut, 30.0)

    def test_bad(self) -> None:
        """
        A value out of range is a ConfigError naming the key.
        """
        text = MEMORY_INI.format(retention=10, entrypoints="http-post", start="latest").replace(
            "listen = tcp:0", "listen = tcp:0\nmax-header-bytes = 10")
        error = self.assertRaises(ConfigError, parseConfig, text, "t.ini")
        self.assertIn("max-header-bytes", str(error))
