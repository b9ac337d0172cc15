"""
Tests for the HTTP POST and HTTP GET entrypoints over the memory endpoint,
in memory: treq's StubTreq and a Clock, no sockets and no sleeps.
"""

import json
from typing import Any
from xml.etree import ElementTree

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from evgate.entrypoints.http_get import HttpGetEntrypoint, negotiate
from evgate.entrypoints.http_post import HttpPostEntrypoint
from evgate.interfaces import IEntrypoint
from evgate.message import Cursor, Draft, cursorTag

from .helpers import memoryGateway

URL = "http://gateway.test/demo"
TAG = cursorTag("demo", "demo")


class GatewayTestCase(SynchronousTestCase):
    """
    A memory gateway on a Clock, spoken to through StubTreq.
    """

    retention = 100
    start = "latest"

    def setUp(self) -> None:
        self.clock = Clock()
        self.gateway = memoryGateway(retention=self.retention, start=self.start, clock=self.clock)
        self.treq = StubTreq(self.gateway.resource)

    def call(self, method: str, url: str = URL, advance: float = 0, **kwargs: Any) -> Any:
        """
        Make a request, let the clock run C{advance} seconds, and return the
        response with its body read.
        """
        d = self.treq.request(method, url, **kwargs)
        self.clock.advance(0)
        self.treq.flush()
        if advance:
            self.clock.advance(advance)
            self.treq.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(response.content())
        response.body = body
        return response

    def post(self, content: bytes, **kwargs: Any) -> Any:
        """
        POST C{content} and return the response.
        """
        return self.call("POST", kwargs.pop("url", URL), data=content, **kwargs)

    def problem(self, response: Any, status: int) -> dict:
        """
        Assert C{response} is a problem document of C{status}; return it.
        """
        self.assertEqual(response.code, status, response.body)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/problem+json"])
        doc = json.loads(response.body)
        self.assertEqual(doc["status"], status)
        self.assertTrue(doc["type"].startswith("https://"))
        self.assertTrue(doc["title"] and doc["detail"])
        return doc


class InterfaceTests(SynchronousTestCase):
    """
    The entrypoints provide L{IEntrypoint}.
    """

    def test_verify(self) -> None:
        """
        Both HTTP entrypoints verify against the interface.
        """
        gateway = memoryGateway()
        for entrypoint in gateway.apis[0].entrypoints:
            self.assertTrue(verifyObject(IEntrypoint, entrypoint))
        kinds = {type(e) for e in gateway.apis[0].entrypoints}
        self.assertEqual(kinds, {HttpGetEntrypoint, HttpPostEntrypoint})


class PostTests(GatewayTestCase):
    """
    HTTP POST publishes one message per request.
    """

    def test_accepted(self) -> None:
        """
        A POST answers 202 with the position the endpoint stored.
        """
        response = self.post(b"hello")
        self.assertEqual(response.code, 202)
        self.assertEqual(json.loads(response.body), {"topic": "demo", "partition": 0, "offset": 0})
        self.assertEqual(json.loads(self.post(b"again").body)["offset"], 1)

    def test_keyAndHeaders(self) -> None:
        """
        The key comes from the query or the key header; prefixed headers and
        Content-Type become message headers; nothing else does.
        """
        # Credentials (Authorization, X-Api-Key) are refused on this keyless
        # API before anything is published: test_security_credentials
        # shows they are not message headers where a plan takes them.
        self.post(b"{}", url=URL + "?key=k1", headers={
            "X-Message-Header-Tenant": "acme", "Content-Type": "application/json", "Cookie": "a=b",
        })
        self.post(b"two", headers={"X-Message-Key": "k2"})
        stored = list(self.gateway.connectors["local"].topicLog("demo").messages)
        self.assertEqual(stored[0].key, "k1")
        self.assertEqual(dict(stored[0].headers), {"tenant": "acme", "content-type": "application/json"})
        self.assertEqual(stored[1].key, "k2")
        self.assertEqual(stored[1].content, b"two")

    def test_empty(self) -> None:
        """
        An empty body is a 400 and nothing is published.
        """
        self.problem(self.post(b""), 400)
        self.assertEqual(self.gateway.connectors["local"].topicLog("demo").nextOffset, 0)

    def test_unavailable(self) -> None:
        """
        An endpoint that refuses gives a 503 with Retry-After.
        """
        from twisted.internet.defer import fail

        from evgate.errors import EndpointUnavailable

        connector = self.gateway.connectors["local"]
        connector.publish = lambda *a: fail(EndpointUnavailable("broker said no", retryAfter=3))
        response = self.post(b"x")
        doc = self.problem(response, 503)
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["3"])
        self.assertIn("broker said no", doc["detail"])

    def test_timeout(self) -> None:
        """
        An endpoint that does not acknowledge gives a 504 after the publish
        timeout: the entrypoint hands C{publish-timeout} to the connector,
        which owns the timer (as IConnector.publish says), and maps its
        EndpointTimeout to the answer without a timer of its own.
        """
        from twisted.internet.defer import Deferred

        from evgate.errors import EndpointTimeout

        asked: list = []

        def publish(topic: str, draft: Any, timeout: float) -> Deferred:
            # A connector that never hears from its broker, keeping its
            # contract: it fails with EndpointTimeout after `timeout`.
            asked.append(timeout)
            d: Deferred = Deferred()
            self.clock.callLater(timeout, d.errback, EndpointTimeout("no acknowledgement"))
            return d

        self.gateway.connectors["local"].publish = publish
        d = self.treq.post(URL, data=b"x")
        self.treq.flush()
        self.assertNoResult(d)
        self.clock.advance(self.gateway.settings.publishTimeout)
        self.treq.flush()
        response = self.successResultOf(d)
        response.body = self.successResultOf(response.content())
        self.problem(response, 504)
        self.assertEqual(asked, [self.gateway.settings.publishTimeout])

    def test_notFound(self) -> None:
        """
        A path no API owns is a 404, including tricks around an API's path.
        """
        for path in ["/", "/nothing", "//demo", "/demo/", "/demo/../demo", "/demo%2F", "/demo.", "/DEMO"]:
            self.problem(self.call("POST", "http://gateway.test" + path, data=b"x"), 404)
        self.assertEqual(self.gateway.connectors["local"].topicLog("demo").nextOffset, 0)

    def test_methodNotAllowed(self) -> None:
        """
        A method no entrypoint serves is a 405 with Allow.
        """
        response = self.call("DELETE")
        self.problem(response, 405)
        self.assertEqual(response.headers.getRawHeaders("allow"), ["GET, POST"])


class BatchPostTests(GatewayTestCase):
    """
    A POST of NDJSON or of the evgate batch document publishes many
    messages, and its answer says per record how it went.
    """

    def stored(self) -> list:
        return list(self.gateway.connectors["local"].topicLog("demo").messages)

    def test_ndjson(self) -> None:
        """
        Each non-blank line of an NDJSON body is one message, as it is, with
        the request's key and prefixed headers and C{application/json} as
        its Content-Type; the 202 lists every position in order.
        """
        body = b'{"n": 1}\r\n{"n": 2}\n\n  \n{"n": 3}\n'
        response = self.post(body, url=URL + "?key=k", headers={
            "Content-Type": "application/x-ndjson; charset=utf-8", "X-Message-Header-Tenant": "acme"})
        self.assertEqual(response.code, 202, response.body)
        self.assertEqual(json.loads(response.body), {"published": 3, "positions": [
            {"topic": "demo", "partition": 0, "offset": offset} for offset in range(3)]})
        stored = self.stored()
        self.assertEqual([m.content for m in stored], [b'{"n": 1}', b'{"n": 2}', b'{"n": 3}'])
        self.assertEqual({m.key for m in stored}, {"k"})
        self.assertEqual({m.headers for m in stored}, {(("tenant", "acme"), ("content-type", "application/json"))})

    def test_jsonSeq(self) -> None:
        """
        An RFC 7464 JSON text sequence loses its record separators.
        """
        response = self.post(b'\x1e"a"\n\x1e"b"\n', headers={"Content-Type": "application/json-seq"})
        self.assertEqual(response.code, 202, response.body)
        self.assertEqual([m.content for m in self.stored()], [b'"a"', b'"b"'])

    def test_envelope(self) -> None:
        """
        The batch document gives each record its own value (published as
        compact JSON), key and headers.
        """
        document = {"records": [
            {"value": {"total": 12.5, "item": "th\u00e9"}, "key": "order-1", "headers": {"Tenant": "acme"}},
            {"value": "plain"},
            {"value": [1, 2]},
        ]}
        response = self.post(json.dumps(document).encode(),
                             headers={"Content-Type": "application/vnd.evgate.batch+json"})
        self.assertEqual(response.code, 202, response.body)
        self.assertEqual([p["offset"] for p in json.loads(response.body)["positions"]], [0, 1, 2])
        stored = self.stored()
        self.assertEqual([m.content for m in stored],
                         ['{"total":12.5,"item":"th\u00e9"}'.encode(), b'"plain"', b"[1,2]"])
        self.assertEqual([m.key for m in stored], ["order-1", None, None])
        self.assertEqual(stored[0].headers, (("tenant", "acme"), ("content-type", "application/json")))
        self.assertEqual(stored[1].headers, (("content-type", "application/json"),))

    def test_envelopeRepeatedHeaders(self) -> None:
        """
        In a batch document a header whose value is an array of strings is
        that name repeated, in order.
        """
        document = {"records": [{"value": 1, "headers": {"Dup": ["1", "2"], "one": "x"}}]}
        response = self.post(json.dumps(document).encode(),
                             headers={"Content-Type": "application/vnd.evgate.batch+json"})
        self.assertEqual(response.code, 202, response.body)
        (stored,) = self.stored()
        self.assertEqual(stored.headers, (("dup", "1"), ("dup", "2"), ("one", "x"),
                                          ("content-type", "application/json")))

    def test_ndjsonRepeatedHeaders(self) -> None:
        """
        An NDJSON batch gives every line the request's repeated
        message-header request headers, in order.
        """
        response = self.post(b'1\n2\n', headers={"Content-Type": "application/x-ndjson",
                                                  "X-Message-Header-Dup": ["1", "2"]})
        self.assertEqual(response.code, 202, response.body)
        for stored in self.stored():
            self.assertEqual(stored.headers, (("dup", "1"), ("dup", "2"), ("content-type", "application/json")))

    def test_invalidBatchPublishesNothing(self) -> None:
        """
        A batch with one bad record is a 400 naming it, and none of its
        records is published.
        """
        cases = [
            (b"{", "not valid JSON"),
            (b'{"items": []}', '"records" array'),
            (b'{"records": [{"value": 1}, {"key": "k"}]}', "records[1]"),
            (b'{"records": [{"value": 1, "key": 5}]}', "records[0].key"),
            (b'{"records": [{"value": 1, "headers": {"a": 1}}]}', "records[0].headers"),
            (b'{"records": [{"value": 1, "headers": {"a": ["1", null]}}]}', "records[0].headers"),
            (b'{"records": [{"value": 1, "partition": 2}]}', "unknown members: partition"),
            (b'{"records": []}', "no records"),
        ]
        for body, expected in cases:
            doc = self.problem(self.post(body, headers={"Content-Type": "application/vnd.evgate.batch+json"}), 400)
            self.assertIn(expected, doc["detail"])
        doc = self.problem(self.post(b"\n\n", headers={"Content-Type": "application/x-ndjson"}), 400)
        self.assertIn("no records", doc["detail"])
        self.assertEqual(self.stored(), [])

    def test_failedRecordsNamed(self) -> None:
        """
        When some records fail, the answer is the first failure's problem
        (with its Retry-After), listing the failed indexes and the positions
        of those that were published.
        """
        from twisted.internet.defer import succeed

        from evgate.errors import EndpointUnavailable
        from evgate.message import Position

        connector = self.gateway.connectors["local"]
        connector.publishMany = lambda topic, drafts, timeout: succeed(
            [Position(topic, 0, 7), EndpointUnavailable("queue full", retryAfter=3), Position(topic, 0, 8)])
        response = self.post(b"a\nb\nc\n", headers={"Content-Type": "application/x-ndjson"})
        doc = self.problem(response, 503)
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["3"])
        self.assertIn("1 of 3 records were not published", doc["detail"])
        self.assertIn("queue full", doc["detail"])
        self.assertEqual(doc["published"], 2)
        self.assertEqual(doc["failed"], [{"index": 1, "status": 503, "detail": "queue full"}])
        self.assertEqual([p and p["offset"] for p in doc["positions"]], [7, None, 8])


class BatchLimitTests(GatewayTestCase):
    """
    C{batch-max-records} bounds a batch, and C{0} turns batches off.
    """

    def test_tooMany(self) -> None:
        """
        A batch over the limit is a 400 that says the limit; nothing is
        published.
        """
        self.gateway = memoryGateway(clock=self.clock, extra="batch-max-records = 2\n")
        self.treq = StubTreq(self.gateway.resource)
        doc = self.problem(self.post(b"1\n2\n3\n", headers={"Content-Type": "application/x-ndjson"}), 400)
        self.assertEqual(doc["maxRecords"], 2)
        self.assertEqual(self.gateway.connectors["local"].topicLog("demo").nextOffset, 0)
        self.assertEqual(self.post(b"1\n2\n", headers={"Content-Type": "application/x-ndjson"}).code, 202)

    def test_off(self) -> None:
        """
        With batches off, an NDJSON body is one message like any other.
        """
        self.gateway = memoryGateway(clock=self.clock, extra="batch-max-records = 0\n")
        self.treq = StubTreq(self.gateway.resource)
        response = self.post(b"1\n2\n", headers={"Content-Type": "application/x-ndjson"})
        self.assertEqual(json.loads(response.body)["offset"], 0)
        self.assertEqual([m.content for m in self.gateway.connectors["local"].topicLog("demo").messages],
                         [b"1\n2\n"])

    def test_badValue(self) -> None:
        """
        A limit that is not a whole number is a configuration error naming
        the key.
        """
        from evgate.config import ConfigError

        with self.assertRaises(ConfigError) as caught:
            memoryGateway(clock=self.clock, extra="batch-max-records = many\n")
        self.assertIn("batch-max-records", str(caught.exception))


class TooLargeTests(SynchronousTestCase):
    """
    A body over max-message-bytes is refused before it is read.
    """

    def connect(self) -> Any:
        gateway = memoryGateway(extra="")
        gateway.site.maxBodyBytes = 10
        protocol = gateway.site.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return gateway, protocol, transport

    def test_declaredLength(self) -> None:
        """
        A Content-Length over the limit is answered 413 at once, without
        waiting for the body, and the connection is closed.
        """
        gateway, protocol, transport = self.connect()
        protocol.dataReceived(b"POST /demo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        self.assertIn(b"HTTP/1.1 413", transport.value())
        self.assertIn(b"application/problem+json", transport.value())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(gateway.connectors["local"].topicLog("demo").nextOffset, 0)

    def test_chunked(self) -> None:
        """
        A chunked body is refused as soon as it passes the limit.
        """
        gateway, protocol, transport = self.connect()
        protocol.dataReceived(b"POST /demo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"8\r\n12345678\r\n8\r\n12345678\r\n")
        self.assertIn(b"HTTP/1.1 413", transport.value())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(gateway.connectors["local"].topicLog("demo").nextOffset, 0)

    def test_withinLimit(self) -> None:
        """
        A body at the limit is published.
        """
        gateway, protocol, transport = self.connect()
        protocol.dataReceived(b"POST /demo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789")
        self.assertIn(b"HTTP/1.1 202", transport.value())
        self.assertEqual(gateway.connectors["local"].topicLog("demo").nextOffset, 1)


class GetTests(GatewayTestCase):
    """
    HTTP GET reads with cursors and long polls.
    """

    def get(self, query: str = "", advance: float = 0, **kwargs: Any) -> Any:
        """
        GET with C{query}.
        """
        return self.call("GET", URL + query, advance=advance, **kwargs)

    def page(self, response: Any) -> dict:
        """
        The JSON page of a 200 response.
        """
        self.assertEqual(response.code, 200, response.body)
        return json.loads(response.body)

    def test_longPollTimesOut(self) -> None:
        """
        With nothing to read, GET answers after C{timeout} ms with no items
        and a nextCursor.
        """
        d = self.treq.get(URL + "?timeout=2000")
        self.clock.advance(0)
        self.treq.flush()
        self.clock.advance(1.9)
        self.treq.flush()
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.treq.flush()
        response = self.successResultOf(d)
        page = json.loads(self.successResultOf(response.content()))
        self.assertEqual(page["items"], [])
        self.assertEqual(page["pagination"]["limit"], 100)
        Cursor.decode(page["pagination"]["nextCursor"], TAG)

    def test_longPollAnswersOnMessage(self) -> None:
        """
        A waiting GET answers as soon as a message arrives, and nextCursor
        then gives exactly the following messages.
        """
        d = self.treq.get(URL + "?timeout=30000")
        self.clock.advance(0)
        self.treq.flush()
        self.assertNoResult(d)
        self.post(b"first", url=URL + "?key=a", headers={"X-Message-Header-H": "v", "Content-Type": "text/plain"})
        self.clock.advance(0)
        self.treq.flush()
        response = self.successResultOf(d)
        page = json.loads(self.successResultOf(response.content()))
        [item] = page["items"]
        self.assertEqual(item["content"], "first")
        self.assertEqual(item["key"], "a")
        self.assertEqual(item["headers"], {"h": "v", "content-type": "text/plain"})
        self.assertEqual(item["metadata"]["offset"], 0)
        self.assertEqual(item["metadata"]["topic"], "demo")
        self.assertEqual(item["id"], page["pagination"]["nextCursor"])
        self.post(b"second")
        self.post(b"third")
        page = self.page(self.get("?cursor=" + item["id"]))
        self.assertEqual([i["content"] for i in page["items"]], ["second", "third"])

    def test_noMissNoRepeat(self) -> None:
        """
        Polling with nextCursor and a small limit reads every message once,
        in order.
        """
        for i in range(25):
            self.post(str(i).encode())
        seen = []
        first = self.page(self.get("?timeout=0"))
        cursor = first["pagination"]["nextCursor"]
        for i in range(25, 40):
            self.post(str(i).encode())
        while True:
            page = self.page(self.get(f"?cursor={cursor}&limit=4&timeout=0"))
            seen.extend(int(i["content"]) for i in page["items"])
            cursor = page["pagination"]["nextCursor"]
            if not page["items"]:
                break
        self.assertEqual(seen, list(range(25, 40)))

    def test_pagesFromTheWindowLetGo(self) -> None:
        """
        A poll answered from the replay window, inside the hub's subscribe
        and before it holds its subscription, still leaves the shared
        stream: after many such polls the stream has no subscriber left,
        and no poll (with its request and page of events) stays alive.
        """
        import gc
        import weakref

        from evgate.entrypoints.http_get import PollSubscriber

        for i in range(5):
            self.post(str(i).encode())
        cursor = self.page(self.get("?timeout=0"))["pagination"]["nextCursor"]
        polls: "weakref.WeakSet[PollSubscriber]" = weakref.WeakSet()
        original = PollSubscriber.__init__

        def tracked(poll: PollSubscriber, *args: Any, **kwargs: Any) -> None:
            original(poll, *args, **kwargs)
            polls.add(poll)

        self.patch(PollSubscriber, "__init__", tracked)
        for i in range(30):
            self.post(b"m%d" % (i,))
            page = self.page(self.get(f"?cursor={cursor}&timeout=5"))
            self.assertEqual([item["content"] for item in page["items"]], ["m%d" % (i,)])
            cursor = page["pagination"]["nextCursor"]
        [stream] = self.gateway.hub.streams.values()
        self.assertEqual((stream.subscriptions, stream.pending), ([], []))
        gc.collect()
        self.assertEqual(len(polls), 0)

    def test_limitAndTimeoutValidated(self) -> None:
        """
        limit and timeout must be integers within the configured caps.
        """
        for query in ["?limit=x", "?limit=-1", "?limit=100000", "?timeout=soon", "?timeout=99999999"]:
            self.problem(self.get(query), 400)

    def test_badCursor(self) -> None:
        """
        A malformed or foreign cursor is a 400.
        """
        self.problem(self.get("?cursor=garbage!"), 400)
        foreign = Cursor(0, ((0, 1),)).encode(cursorTag("other", "demo"))
        doc = self.problem(self.get("?cursor=" + foreign), 400)
        self.assertEqual(doc["type"], "https://evgate.dev/problems/bad-cursor")

    def test_earlierEpoch(self) -> None:
        """
        A cursor from an earlier run of the memory broker resumes at the
        oldest message kept and says so in C{gap}.
        """
        self.post(b"kept")
        old = Cursor(1, ((0, 0),)).encode(TAG)
        page = self.page(self.get("?cursor=" + old))
        self.assertEqual([i["content"] for i in page["items"]], ["kept"])
        self.assertIn("earlier run", page["gap"])

    def test_notAcceptable(self) -> None:
        """
        An Accept header naming nothing we produce is a 406.
        """
        self.problem(self.get(headers={"Accept": "image/png"}), 406)

    def test_binaryContent(self) -> None:
        """
        Content that is not UTF-8 is base64 in JSON.
        """
        cursor = self.page(self.get("?timeout=0"))["pagination"]["nextCursor"]
        self.post(b"\xff\xfe\x00")
        [item] = self.page(self.get("?cursor=" + cursor))["items"]
        self.assertEqual((item["content"], item["encoding"]), ("//4A", "base64"))

    def test_textPlain(self) -> None:
        """
        text/plain gives a header block and the exact content per message.
        """
        cursor = self.page(self.get("?timeout=0"))["pagination"]["nextCursor"]
        self.post(b"line one\nline two", url=URL + "?key=k")
        response = self.get("?cursor=" + cursor, headers={"Accept": "text/plain"})
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/plain; charset=utf-8"])
        self.assertIn(b"count: 1\n", response.body)
        self.assertIn(b"key: k\n", response.body)
        self.assertIn(b"content-length: 17\n\nline one\nline two\n\n", response.body)

    def test_xml(self) -> None:
        """
        application/xml gives well-formed XML with the same information.
        """
        cursor = self.page(self.get("?timeout=0"))["pagination"]["nextCursor"]
        self.post(b"<b>&", url=URL + "?key=k")
        self.post(b"\x00\x01")
        response = self.get("?cursor=" + cursor, headers={"Accept": "application/xml"})
        root = ElementTree.fromstring(response.body)
        messages = root.findall("message")
        self.assertEqual(messages[0].get("key"), "k")
        self.assertEqual(messages[0].find("content").text, "<b>&")
        self.assertEqual(messages[1].find("content").get("encoding"), "base64")
        self.assertEqual(root.get("nextCursor"), messages[1].get("id"))

    def test_clientGoneReleases(self) -> None:
        """
        A long poll whose client disconnects detaches from the hub.
        """
        d = self.treq.get(URL + "?timeout=30000")
        self.clock.advance(0)
        self.treq.flush()
        stream = self.gateway.hub.streams[("local", "demo")]
        self.assertEqual(len(stream.subscriptions), 1)
        d.cancel()
        self.treq.flush()
        self.failureResultOf(d)
        self.assertEqual(len(stream.subscriptions), 0)


class EarliestTests(GatewayTestCase):
    """
    An API with C{start = earliest} reads from the oldest message kept.
    """

    start = "earliest"
    retention = 3

    def test_earliest(self) -> None:
        """
        Without a cursor, GET starts at the oldest retained message.
        """
        for i in range(5):
            self.post(str(i).encode())
        response = self.call("GET", URL)
        page = json.loads(response.body)
        self.assertEqual([i["content"] for i in page["items"]], ["2", "3", "4"])


class RepeatedHeaderTests(GatewayTestCase):
    """
    A message header name may repeat: every reader format keeps all its
    values, in order, and POST publishes repeated request headers as
    repeated message headers.
    """

    start = "earliest"

    def publishDup(self) -> None:
        connector = self.gateway.connectors["local"]
        connector.publish("demo", Draft(content=b"line\r\nnext", headers=(("dup", "1"), ("one", "x"),
                                                                         ("dup", "2"))))

    def test_json(self) -> None:
        """
        In a JSON page, a repeated name becomes an array of its values in
        order; a name that appears once stays a plain string.
        """
        self.publishDup()
        page = json.loads(self.call("GET", URL + "?timeout=0").body)
        self.assertEqual(page["items"][0]["headers"], {"dup": ["1", "2"], "one": "x"})

    def test_envelope(self) -> None:
        """
        The JSON envelope (SSE ?format=json, WebSocket evgate.json) carries
        the same representation.
        """
        from evgate.message import Message, envelope

        message = Message(b"c", None, (("dup", "1"), ("dup", "2")), "demo", 0, 0, 0)
        self.assertEqual(envelope(message)["headers"], {"dup": ["1", "2"]})

    def test_xml(self) -> None:
        """
        The XML page lists every header element, and keeps a CR of the
        content as a character reference (an XML parser would turn a bare
        CR LF into LF).
        """
        self.publishDup()
        body = self.call("GET", URL + "?timeout=0", headers={"Accept": ["application/xml"]}).body
        self.assertIn(b'<header name="dup">1</header>', body)
        self.assertIn(b'<header name="dup">2</header>', body)
        from xml.etree import ElementTree

        root = ElementTree.fromstring(body)
        self.assertEqual(root.find("message/content").text, "line\r\nnext")

    def test_postRepeated(self) -> None:
        """
        Repeated message-header request headers are published as repeated
        message headers, in order.
        """
        response = self.post(b"x", headers={"X-Message-Header-Dup": ["1", "2"]})
        self.assertEqual(response.code, 202, response.body)
        (message,) = self.gateway.connectors["local"].topicLog("demo").messages
        self.assertEqual([h for h in message.headers if h[0] == "dup"], [("dup", "1"), ("dup", "2")])


class NonBlockingReadTests(GatewayTestCase):
    """
    C{timeout=0} means "do not wait for new messages", not "do not read
    what is there".
    """

    start = "earliest"
    retention = 2000

    def test_readsTheBacklog(self) -> None:
        """
        A non-blocking read from the earliest message returns the matching
        records that exist, even when the endpoint hands the backlog over
        in several batches and the first ones hold no match.
        """
        connector = self.gateway.connectors["local"]
        for i in range(600):
            connector.publish("demo", Draft(content=str(i).encode(), key="late" if i >= 550 else "early"))
        response = self.call("GET", URL + "?timeout=0&filter=key%20%3D%3D%20%22late%22")
        page = json.loads(response.body)
        self.assertEqual([item["content"] for item in page["items"]], [str(i) for i in range(550, 600)])

    def test_fillsThePageUpToTheHead(self) -> None:
        """
        Without a filter, a non-blocking read from the earliest message
        returns everything up to the head it saw at the start (within its
        limit), not only the first batch the endpoint handed over.
        """
        connector = self.gateway.connectors["local"]
        for i in range(600):
            connector.publish("demo", Draft(content=str(i).encode()))
        page = json.loads(self.call("GET", URL + "?timeout=0&limit=1000").body)
        self.assertEqual([item["content"] for item in page["items"]], [str(i) for i in range(600)])
        page = json.loads(self.call("GET", URL + "?timeout=0&limit=250").body)
        self.assertEqual(len(page["items"]), 250)

    def test_atTheHeadAnswersAtOnce(self) -> None:
        """
        A non-blocking read that is already at the head answers at once,
        with no items.
        """
        response = self.call("GET", URL + "?timeout=0")
        self.assertEqual(json.loads(response.body)["items"], [])


class PagingTests(SynchronousTestCase):
    """
    Paging with cursors older than the replay window: the read of one page
    is kept for the next page, which starts exactly where it ended.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        # No replay window: every cursor is served by a read of its own.
        from evgate.service import GatewayService

        self.gateway = GatewayService(self.config(), self.clock)
        self.treq = StubTreq(self.gateway.resource)
        self.connector = self.gateway.connectors["local"]
        self.private: list = []
        subscribe = self.connector.subscribe

        def counted(topic: str, start: Any, sink: Any) -> Any:
            upstream = subscribe(topic, start, sink)
            if start != "latest":
                # Not the shared stream's live read: a private one.
                self.private.append(upstream)
            return upstream

        self.connector.subscribe = counted
        log = self.connector.topicLog("demo")
        for i in range(25):
            self.connector.publish("demo", Draft(str(i).encode()))
        self.log = log

    def config(self) -> Any:
        from evgate.config import parseConfig

        from .helpers import MEMORY_INI

        text = MEMORY_INI.format(retention=1000, entrypoints="http-post http-get", start="earliest")
        return parseConfig(text.replace("listen = tcp:0", "listen = tcp:0\nreplay-window = 0"), "test.ini")

    def page(self, cursor: Any = None, limit: int = 10, extra: str = "") -> dict:
        url = f"{URL}?limit={limit}&timeout=0" + (f"&cursor={cursor}" if cursor else "") + extra
        d = self.treq.get(url)
        for _ in range(3):
            self.clock.advance(0)
            self.treq.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        return json.loads(self.successResultOf(response.content()))

    def test_nextPageKeepsTheRead(self) -> None:
        """
        Following C{nextCursor} page after page reads every message once,
        in order, through one upstream read.
        """
        seen = []
        doc = self.page()
        while doc["items"]:
            seen.extend(i["content"] for i in doc["items"])
            doc = self.page(doc["pagination"]["nextCursor"])
        self.assertEqual(seen, [str(i) for i in range(25)])
        self.assertEqual(len(self.private), 1)

    def test_otherCursorReadsAfresh(self) -> None:
        """
        A cursor other than the one a read was kept for gets a read of its
        own; the kept one stays for its page.
        """
        first = self.page(limit=5)
        again = self.page(limit=5)
        self.assertEqual([i["content"] for i in again["items"]], ["0", "1", "2", "3", "4"])
        self.assertEqual(len(self.private), 2)
        self.page(first["pagination"]["nextCursor"], limit=5)
        self.assertEqual(len(self.private), 2)

    def test_filteredPages(self) -> None:
        """
        A filtered page's cursor moves past what the filter dropped, and
        the kept read gives the next page what follows.
        """
        from urllib.parse import quote

        flt = "&filter=" + quote("int(content) % 2 == 0")
        seen = []
        doc = self.page(limit=4, extra=flt)
        while doc["items"]:
            seen.extend(int(i["content"]) for i in doc["items"])
            doc = self.page(doc["pagination"]["nextCursor"], limit=4, extra=flt)
        self.assertEqual(seen, list(range(0, 25, 2)))
        self.assertEqual(len(self.private), 1)

    def test_keptForAWhile(self) -> None:
        """
        A kept read is closed when nobody asks for its page within the
        hub's C{parkTime}.
        """
        doc = self.page()
        self.assertFalse(self.private[0]._closed)
        self.clock.advance(self.gateway.hub.parkTime)
        self.assertTrue(self.private[0]._closed)
        self.assertEqual([i["content"] for i in self.page(doc["pagination"]["nextCursor"])["items"]],
                         [str(i) for i in range(10, 20)])
        self.assertEqual(len(self.private), 2)

    def test_atMostMaxParked(self) -> None:
        """
        No more reads are kept than the hub's C{maxParked}; the oldest goes
        first.
        """
        self.gateway.hub.maxParked = 2
        for limit in range(1, 5):
            self.page(limit=limit)
        self.assertEqual(len(self.gateway.hub.parked), 2)
        self.assertEqual([u._closed for u in self.private], [True, True, False, False])


class ItemTextTests(SynchronousTestCase):
    """
    The JSON page's items are written directly; they must be the text the
    generic encoder gives for the same members.
    """

    def test_sameAsEncoder(self) -> None:
        """
        Keys, headers (repeated names too), escapes, non-ASCII and astral
        characters, binary content and endpoint metadata come out exactly
        as C{json.dumps} writes them.
        """
        import base64

        from evgate.entrypoints.http_get import jsonItemText
        from evgate.hub import Event
        from evgate.message import Message

        text = 'h\u00e9llo "q" \\ \n\t\x01 \u2603 \U0001f600'
        cases = [
            (Message(b'{"a":1}', None, (), "t", 0, 5, 17),
             {"key": None, "headers": {}, "content": '{"a":1}'}),
            (Message(text.encode(), 'k\u00e9y"', (("h", "v"), ("h", "w"), ("x", "\u2603")), "t/\u00e9", 3, 9, 0,
                     {"qos": 1, "retain": False}),
             {"key": 'k\u00e9y"', "headers": {"h": ["v", "w"], "x": "\u2603"}, "content": text}),
            (Message(b"\xff\xfe", "k", (), "t", 0, 1, 2, {"keyEncoding": "base64", "headerEncoding": {"a": "base64"}}),
             {"key": "k", "headers": {}, "content": base64.b64encode(b"\xff\xfe").decode(), "encoding": "base64"}),
            (Message(b"", None, (), "t", 0, 1, 2, {"tombstone": True}),
             {"key": None, "headers": {}, "content": ""}),
        ]
        for message, members in cases:
            event = Event(message, Cursor(0, ((message.partition, message.offset + 1),)))
            expected = {"id": event.token(TAG), "key": members["key"], "headers": members["headers"],
                        "content": members["content"],
                        "metadata": dict({"topic": message.topic, "partition": message.partition,
                                          "offset": message.offset, "timestamp": message.timestamp},
                                         **message.extra)}
            if "encoding" in members:
                expected["encoding"] = members["encoding"]
            self.assertEqual(jsonItemText(event, TAG), json.dumps(expected, separators=(",", ":")))


class NegotiationTests(SynchronousTestCase):
    """
    L{negotiate} follows the Accept header's preferences.
    """

    def test_choices(self) -> None:
        """
        Absent, wildcard, exact and weighted Accept headers pick the right
        type, or none.
        """
        cases = {
            None: "application/json",
            b"*/*": "application/json",
            b"text/*": "text/plain",
            b"application/xml": "application/xml",
            b"application/xml;q=0.5, text/plain": "text/plain",
            b"text/html, application/*;q=0.1": "application/json",
            b"image/png": None,
            b"application/json;q=0": None,
        }
        for accept, expected in cases.items():
            self.assertEqual(negotiate(accept), expected, accept)


class GroupNameTests(SynchronousTestCase):
    """
    Group-mode consumer groups belong to the caller.
    """

    def test_anonymous(self) -> None:
        """
        Keyless callers name their group with the client id alone.
        """
        from evgate.entrypoints.http_get import groupName
        from evgate.gateway import Consumer

        self.assertEqual(groupName("orders", Consumer("anonymous", "keyless"), "billing"), "get.orders.billing")

    def test_ownedByCaller(self) -> None:
        """
        Two authenticated callers using the same client id get different
        groups, and one caller always gets the same one.
        """
        from evgate.entrypoints.http_get import groupName
        from evgate.gateway import Consumer

        alice = groupName("orders", Consumer("alice", "jwt"), "billing")
        bob = groupName("orders", Consumer("bob", "jwt"), "billing")
        self.assertNotEqual(alice, bob)
        self.assertEqual(alice, groupName("orders", Consumer("alice", "jwt"), "billing"))
        self.assertRegex(alice, r"^get\.orders\.[0-9a-f]{16}\.billing$")


class FormBodyTests(SynchronousTestCase):
    """
    A POST body is the message, never a form (through the gateway's own
    site, on an in-memory transport).
    """

    def post(self, contentType: bytes, body: bytes) -> Any:
        gateway = memoryGateway()
        protocol = gateway.site.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"POST /demo HTTP/1.1\r\nHost: x\r\nContent-Type: " + contentType
                              + b"\r\nContent-Length: %d\r\n\r\n" % (len(body),) + body)
        return gateway, transport.value()

    def test_formBodyIsContent(self) -> None:
        """
        A form-encoded body is published as is, and its fields do not act
        as query parameters (C{key=...} in the body sets no key).
        """
        gateway, response = self.post(b"application/x-www-form-urlencoded", b"key=sneaky&x=1")
        self.assertIn(b"HTTP/1.1 202", response)
        [stored] = list(gateway.connectors["local"].topicLog("demo").messages)
        self.assertEqual((stored.content, stored.key), (b"key=sneaky&x=1", None))

    def test_brokenMultipartIsContent(self) -> None:
        """
        A body labelled multipart/form-data that is not valid multipart is
        still just content: published, not refused by a form parser.
        """
        gateway, response = self.post(b"multipart/form-data; boundary=x", b"not multipart at all")
        self.assertIn(b"HTTP/1.1 202", response)
        [stored] = list(gateway.connectors["local"].topicLog("demo").messages)
        self.assertEqual(stored.content, b"not multipart at all")
