"""
Unit tests of the HTTP proxy: configuration, routing, header rules, target
choice and health, and the flow control of both bodies (no sockets).
"""

from typing import Any, List

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from zope.interface.verify import verifyObject

from evgate.config import ConfigError, parseConfig
from evgate.gateway import GatewayResource
from evgate.interfaces import IConnector, IEntrypoint
from evgate.metrics import GatewayMetrics
from evgate.node import NodeContext
from evgate.proxy._forward import PIPE_BUFFER, RequestBodyPipe, ResponseRelay
from evgate.proxy._headers import endToEnd, upstreamHeaders, withoutQueryParameters
from evgate.proxy._pool import Target, TargetPool
from evgate.proxy.endpoint import HttpEndpoint
from evgate.proxy.entrypoint import HttpProxyEntrypoint, subtreePath

INI = """
[endpoint:billing]
type = http
targets = http://billing-1.internal:8080 http://billing-2.internal:8080/base
{extra}

[api:billing]
path = /billing
endpoint = billing
entrypoints = http-proxy
{api}
"""


def config(extra: str = "", api: str = "") -> Any:
    """
    The configuration of INI with C{extra} endpoint and C{api} API keys.
    """
    return parseConfig(INI.format(extra=extra, api=api))


class ConfigTests(SynchronousTestCase):
    """
    The keys of http endpoints and proxy APIs.
    """

    def test_defaults(self) -> None:
        """
        A minimal proxy API needs no topic; the defaults are documented ones.
        """
        parsed = config()
        options = parsed.endpoints["billing"].options
        self.assertEqual(options["balancing"], "round-robin")
        self.assertEqual((options["connectTimeout"], options["responseTimeout"], options["idleTimeout"]),
                         (5.0, 60.0, 60.0))
        self.assertEqual(options["retries"], 1)
        self.assertEqual(parsed.apis["billing"].options["proxy"],
                         {"stripPath": True, "rewrite": None, "forwardCredentials": False, "preserveHost": False})

    def test_weightsAndHealth(self) -> None:
        """
        Weights need weighted balancing; a health check is a path and an
        interval.
        """
        parsed = parseConfig(INI.replace("http://billing-1.internal:8080 ", "http://a:1=3 ").format(
            extra="load-balancing = weighted\nhealth-check = /health every 500ms", api=""))
        options = parsed.endpoints["billing"].options
        self.assertEqual(options["targets"][0], ("http://a:1", 3))
        self.assertEqual(options["healthCheck"], ("/health", 0.5))
        with self.assertRaises(ConfigError) as e:
            parseConfig(INI.replace("http://billing-1.internal:8080 ", "http://a:1=3 ").format(extra="", api=""))
        self.assertIn("weighted", str(e.exception))

    def test_mistakes(self) -> None:
        """
        Bad targets, rewrites and mixing entrypoints are refused with the
        key named.
        """
        with self.assertRaises(ConfigError) as e:
            parseConfig(INI.replace("http://billing-1.internal:8080", "ftp://x").format(extra="", api=""))
        self.assertEqual(e.exception.key, "targets")
        with self.assertRaises(ConfigError) as e:
            config(api="rewrite = ../up")
        self.assertEqual(e.exception.key, "rewrite")
        with self.assertRaises(ConfigError) as e:
            parseConfig(INI.format(extra="", api="").replace("entrypoints = http-proxy",
                                                              "entrypoints = http-proxy http-get"))
        self.assertEqual(e.exception.key, "entrypoints")


class FakeApi:
    """
    Just enough of an ApiRuntime for the entrypoint.
    """

    def __init__(self, parsed: Any) -> None:
        self.config = parsed.apis["billing"]
        self.name = "billing"
        self.connector = HttpEndpoint("billing", parsed.endpoints["billing"].options, Clock())
        self.node = NodeContext(Clock(), parsed)
        self.node.metrics = GatewayMetrics(self.node)
        self.entrypoints: List[Any] = []
        self.plans: List[Any] = []


class EntrypointTests(SynchronousTestCase):
    """
    What the entrypoint forwards, and how the gateway routes to it.
    """

    def test_interfaces(self) -> None:
        """
        The entrypoint and endpoint provide their interfaces.
        """
        api = FakeApi(config())
        verifyObject(IEntrypoint, HttpProxyEntrypoint(api))
        verifyObject(IConnector, api.connector)

    def test_upstreamPath(self) -> None:
        """
        The prefix is stripped, kept or rewritten; credentials leave the
        query, other parameters stay byte for byte.
        """
        secret = self.mktemp()
        with open(secret, "w") as f:
            f.write("s" * 40)
        strip = HttpProxyEntrypoint(FakeApi(config(api=f"plans = jwt\njwt.secret-file = {secret}")))
        self.assertEqual(strip.upstreamPath(b"/billing/a?x=%20&access_token=t&y"), b"/a?x=%20&y")
        self.assertEqual(strip.upstreamPath(b"/billing"), b"/")
        kept = HttpProxyEntrypoint(FakeApi(config(api="strip-path = false")))
        self.assertEqual(kept.upstreamPath(b"/billing/a"), b"/billing/a")
        rewritten = HttpProxyEntrypoint(FakeApi(config(api="rewrite = /v2/")))
        self.assertEqual(rewritten.upstreamPath(b"/billing/a?q"), b"/v2/a?q")

    def test_dotSegments(self) -> None:
        """
        Raw and encoded dot segments, and encoded separators that make
        one, are refused; dots inside names are not.
        """
        for remainder in (b"/..", b"/a/../b", b"/%2e%2E", b"/a%2f..", b"/a%5c..%5cb", b"/.", b"/a%00"):
            self.assertIsNotNone(subtreePath(remainder), remainder)
        for remainder in (b"", b"/", b"/a.b", b"/...", b"/a..b/c", b"/%2efile"):
            self.assertIsNone(subtreePath(remainder), remainder)

    def test_routing(self) -> None:
        """
        Exact paths win; a proxy API owns whole segments under its path
        only; other APIs are never matched by prefix.
        """
        proxy = FakeApi(config())
        proxy.entrypoints = [HttpProxyEntrypoint(proxy)]

        class Event:
            config = type("C", (), {"path": "/billing/events"})()
            entrypoints: List[Any] = []

        class Other:
            config = type("C", (), {"path": "/orders"})()
            entrypoints: List[Any] = []

        resource = GatewayResource([proxy, Event(), Other()])  # type: ignore[list-item]
        self.assertIs(resource.route(b"/billing/x/y"), proxy)
        self.assertIs(resource.route(b"/billing"), proxy)
        self.assertIsInstance(resource.route(b"/billing/events"), Event)
        self.assertIsNone(resource.route(b"/billingx"))
        self.assertIsNone(resource.route(b"//billing/x"))
        self.assertIsNone(resource.route(b"/billing%2Fx"))
        self.assertIsNone(resource.route(b"/orders/x"))
        self.assertIsNotNone(resource.bodyPipeFor(b"/billing/upload"))
        self.assertIsNone(resource.bodyPipeFor(b"/orders"))


class HeaderTests(SynchronousTestCase):
    """
    The header rules of docs/proxy.md.
    """

    def test_hopByHop(self) -> None:
        """
        Hop-by-hop headers and those named in Connection are removed.
        """
        headers = Headers({b"Connection": [b"close, X-Hop"], b"X-Hop": [b"1"], b"TE": [b"trailers"],
                           b"Upgrade": [b"h2c"], b"X-Kept": [b"yes"]})
        self.assertEqual([name for name, _ in endToEnd(headers)], [b"X-Kept"])

    def test_forwarded(self) -> None:
        """
        Forwarded and X-Forwarded-For are appended to, the request id is
        set, credentials dropped, Host chosen.
        """
        incoming = Headers({b"Host": [b"api.example"], b"Forwarded": [b"for=10.0.0.1"],
                            b"Authorization": [b"Bearer t"], b"X-Api-Key": [b"k"]})
        out = upstreamHeaders(incoming, "::1", True, b"rid", dropNames=(b"authorization", b"x-api-key"),
                              hostValue=b"up:8080")
        self.assertEqual(out.getRawHeaders(b"forwarded"), [b'for=10.0.0.1, for="[::1]";proto=https;host=api.example'])
        self.assertEqual(out.getRawHeaders(b"x-forwarded-for"), [b"::1"])
        self.assertEqual(out.getRawHeaders(b"x-forwarded-proto"), [b"https"])
        self.assertEqual(out.getRawHeaders(b"host"), [b"up:8080"])
        self.assertEqual(out.getRawHeaders(b"x-request-id"), [b"rid"])
        self.assertIsNone(out.getRawHeaders(b"authorization"))
        self.assertIsNone(out.getRawHeaders(b"x-api-key"))

    def test_query(self) -> None:
        """
        Only the named parameters leave the query, encoded or not.
        """
        self.assertEqual(withoutQueryParameters(b"a=1&api-key=s&api%2Dkey=t&b", (b"api-key",)), b"a=1&b")


class PoolTests(SynchronousTestCase):
    """
    Target choice and passive health.
    """

    def pool(self, balancing: str, weights: Any = (1, 1, 1)) -> Any:
        targets = [Target(f"http://t{i}:80", w) for i, w in enumerate(weights)]
        return TargetPool("e", targets, balancing, Clock(), maxFails=1, failTimeout=10), targets

    def test_roundRobin(self) -> None:
        """
        Each target in turn.
        """
        pool, targets = self.pool("round-robin")
        self.assertEqual([pool.choose() for _ in range(6)], targets * 2)

    def test_weighted(self) -> None:
        """
        Requests in proportion to the weights, interleaved.
        """
        pool, targets = self.pool("weighted", (5, 1, 1))
        chosen = [pool.choose() for _ in range(7)]
        self.assertEqual([chosen.count(t) for t in targets], [5, 1, 1])
        self.assertNotEqual(chosen[:5], [targets[0]] * 5)

    def test_leastConnections(self) -> None:
        """
        The target with the fewest requests in flight.
        """
        pool, targets = self.pool("least-connections")
        targets[0].inFlight = 3
        targets[1].inFlight = 1
        targets[2].inFlight = 2
        self.assertIs(pool.choose(), targets[1])

    def test_passiveHealth(self) -> None:
        """
        A failed target is out for fail-timeout seconds, then back; a
        request never gets a target it already tried.
        """
        pool, targets = self.pool("round-robin", (1, 1))
        pool.failed(targets[0], "connect")
        self.assertEqual({pool.choose() for _ in range(4)}, {targets[1]})
        self.assertIsNone(pool.choose({targets[1]}))
        pool.reactor.advance(10)
        self.assertEqual({pool.choose() for _ in range(4)}, set(targets))


class FakeTransport:
    """
    A push producer that records pauses (a client's or an upstream's
    transport).
    """

    def __init__(self) -> None:
        self.paused = False
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


class FakeRequest:
    """
    A client request: its channel's transport, and what it was given.
    """

    def __init__(self) -> None:
        self.channel = type("Channel", (), {})()
        self.channel.transport = FakeTransport()
        self.written: List[bytes] = []
        self.producer: Any = None
        self.finished = False
        self._disconnected = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def finish(self) -> None:
        self.finished = True


class Consumer:
    """
    An upstream connection's side of a body producer.
    """

    def __init__(self) -> None:
        self.data: List[bytes] = []

    def write(self, data: bytes) -> None:
        self.data.append(data)


class FlowControlTests(SynchronousTestCase):
    """
    Backpressure through both bodies.
    """

    def test_uploadPausesTheClient(self) -> None:
        """
        Before the upstream takes the body, the pipe keeps at most
        PIPE_BUFFER and then pauses the client; an upstream that pushes
        back pauses the client again; the body ends once all is sent.
        """
        request = FakeRequest()
        pipe = RequestBodyPipe(request, None)
        pipe.write(b"a" * PIPE_BUFFER)
        self.assertTrue(request.channel.transport.paused)
        consumer = Consumer()
        done = pipe.startProducing(consumer)
        self.assertEqual(b"".join(consumer.data), b"a" * PIPE_BUFFER)
        self.assertFalse(request.channel.transport.paused)
        pipe.pauseProducing()
        self.assertTrue(request.channel.transport.paused)
        # The channel resumed its transport for its own reasons: the data
        # that came is kept, and the transport paused again.
        request.channel.transport.paused = False
        pipe.write(b"b")
        self.assertTrue(request.channel.transport.paused)
        self.assertEqual(len(consumer.data), 1)
        pipe.bodyEnded()
        self.assertNoResult(done)
        pipe.resumeProducing()
        self.assertEqual(consumer.data[-1], b"b")
        self.successResultOf(done)

    def test_clientLeavesMidUpload(self) -> None:
        """
        A client gone before its body ended fails the upstream request
        instead of ending the body as if it were whole.
        """
        from twisted.python.failure import Failure

        pipe = RequestBodyPipe(FakeRequest(), 10)
        done = pipe.startProducing(Consumer())
        pipe.clientLost(Failure(ConnectionError("gone")))
        self.failureResultOf(done, ConnectionError)

    def test_slowClientPausesUpstream(self) -> None:
        """
        The relay is the client's streaming producer: its pause pauses the
        upstream transport, and the idle clock stops while paused.
        """
        clock = Clock()
        request = FakeRequest()
        call = type("Call", (), {"request": request, "reactor": clock, "settings": {"idleTimeout": 5},
                                 "bodyDone": lambda self: None})()
        relay = ResponseRelay(call)  # type: ignore[arg-type]
        upstream = FakeTransport()
        relay.makeConnection(upstream)
        self.assertIs(request.producer, relay)
        relay.dataReceived(b"x")
        relay.pauseProducing()
        self.assertTrue(upstream.paused)
        clock.advance(60)
        self.assertFalse(upstream.stopped)
        relay.resumeProducing()
        self.assertFalse(upstream.paused)
        from twisted.python.failure import Failure
        from twisted.web.client import ResponseDone

        relay.connectionLost(Failure(ResponseDone()))
        self.assertTrue(request.finished)
        self.assertEqual(request.written, [b"x"])


class UpstreamAnswerTests(SynchronousTestCase):
    """
    Reading what upstreams answer: their Connection header, chunked
    refusals of upgrades, and TLS failures told apart from others.
    """

    def test_responseConnectionHeader(self) -> None:
        """
        The endpoint's client protocol keeps the response's Connection
        header readable (twisted.web keeps it out of Response.headers),
        even for a response without a body, whose parser is dropped before
        the response is handed over.
        """
        from twisted.internet.testing import StringTransport
        from twisted.web._newclient import Request

        from evgate.twistedprivate import ConnectionHeaderClientProtocol, responseConnectionHeader

        for head in (b"HTTP/1.1 204 No Content\r\nConnection: X-Private, close\r\nX-Private: 1\r\n\r\n",
                     b"HTTP/1.1 200 OK\r\nConnection: X-Private\r\nX-Private: 1\r\nContent-Length: 5\r\n\r\n"):
            protocol = ConnectionHeaderClientProtocol(lambda p: None)
            protocol.makeConnection(StringTransport())
            d = protocol.request(Request(b"GET", b"/", Headers({b"host": [b"x"]}), None, persistent=True))
            protocol.dataReceived(head)
            response = self.successResultOf(d)
            self.assertNotIn(b"connection", dict(response.headers.getAllRawHeaders()))
            self.assertEqual(responseConnectionHeader(response)[0].split(b",")[0], b"X-Private")
            self.assertEqual(endToEnd(response.headers, [b"x-private"]), [])

    def test_responseConnectionHeaderFreed(self) -> None:
        """
        What the protocol remembers of a response's connection headers
        goes with the request: once nothing else holds the request and its
        response, they and the parser are freed (the parser itself, kept
        by request, kept the request alive and leaked all three per
        proxied request).
        """
        import gc
        import weakref

        from twisted.internet.testing import StringTransport
        from twisted.web._newclient import Request

        from evgate.twistedprivate import ConnectionHeaderClientProtocol, responseConnectionHeader

        protocol = ConnectionHeaderClientProtocol(lambda p: None)
        protocol.makeConnection(StringTransport())
        request = Request(b"GET", b"/", Headers({b"host": [b"x"]}), None, persistent=True)
        d = protocol.request(request)
        protocol.dataReceived(b"HTTP/1.1 204 No Content\r\nConnection: X-Private\r\n\r\n")
        response = self.successResultOf(d)
        self.assertEqual(responseConnectionHeader(response), [b"X-Private"])
        gone = weakref.ref(request)
        del request, response, d
        gc.collect()
        self.assertIsNone(gone())

    def test_chunkedRefusal(self) -> None:
        """
        A chunked body is decoded as it comes, in any split, extensions
        and trailers included; a bad size is an error.
        """
        from evgate.proxy._upgrade import ChunkedBody

        wire = b"9;ext=1\r\nrefused: \r\n10\r\nno upgrade here\n\r\n0\r\nX-Trailer: 1\r\n\r\n"
        for step in (1, 3, len(wire)):
            out: List[bytes] = []
            body = ChunkedBody(out.append)
            for i in range(0, len(wire), step):
                self.assertFalse(body.ended)
                body.feed(wire[i:i + step])
            self.assertTrue(body.ended)
            self.assertEqual(b"".join(out), b"refused: no upgrade here\n")
        self.assertRaises(ValueError, ChunkedBody(lambda d: None).feed, b"zz\r\n")

    def test_tlsFailure(self) -> None:
        """
        A handshake error, even wrapped in the client's failure lists, is
        a TLS failure with OpenSSL's reason; a refused connection is not.
        """
        from OpenSSL import SSL
        from twisted.internet.error import ConnectionRefusedError
        from twisted.python.failure import Failure
        from twisted.web._newclient import ResponseNeverReceived

        from evgate.proxy._forward import tlsFailure

        error = SSL.Error([("SSL routines", "", "certificate verify failed")])
        wrapped = Failure(ResponseNeverReceived([Failure(error)]))
        self.assertEqual(tlsFailure(wrapped), "certificate verify failed")
        self.assertIsNone(tlsFailure(Failure(ConnectionRefusedError())))
