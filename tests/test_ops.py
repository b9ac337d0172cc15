"""
Unit tests of the operations routes of the admin API (readiness, metrics,
APIs and endpoints, the live tail) and of the counting behind them,
through treq's L{StubTreq} on a gateway driven by a L{Clock}: no sockets,
no sleeps.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from typing import Any, Dict, List, Optional, Tuple

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from evgate.config import loadConfig
from evgate.interfaces import IStore, ISubscriber
from evgate.logs import JsonLinesObserver, RequestLog
from evgate.message import Cursor
from evgate.metrics import CountingStore, Tally, headOffsets, lagOf
from evgate.service import GatewayService
from evgate.store import MemoryStore

from .helpers import GatewayIni

TOKEN = "ops-token-for-the-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

def writeIni(text: str, directory: Optional[str] = None) -> str:
    """
    Write C{text} to an evgate.ini in a new directory; its path.
    """
    directory = directory or tempfile.mkdtemp(prefix="evgate-ops-")
    path = os.path.join(directory, "evgate.ini")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def iniText(gateway: str = "listen = tcp:0\n", extra: str = "") -> str:
    """
    The text of a test configuration.
    """
    if "listen" not in gateway:
        gateway = "listen = tcp:0\n" + gateway
    return str(GatewayIni(listen=None).admin(TOKEN).lines("gateway", gateway).memory(retention=1000)
               .api("demo", entrypoints="http-post http-get sse").extra(extra))


class Stream:
    """
    A streaming response read through StubTreq: its status, and what came
    so far.
    """

    def __init__(self) -> None:
        self.response: Any = None
        self.chunks: List[bytes] = []
        self.done = False
        self.error: Any = None

    @property
    def body(self) -> bytes:
        """
        Everything received so far.
        """
        return b"".join(self.chunks)


class OpsHarness:
    """
    A gateway (from a file, so that it can reload) with its admin API and
    its data plane, both spoken to through StubTreq; the data plane goes
    through the gateway's own site, so that requests are counted and
    logged as in production.
    """

    def __init__(self, gateway: str = "listen = tcp:0\n", extra: str = "", start: bool = True) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.path = writeIni(iniText(gateway, extra))
        self.gateway = GatewayService(loadConfig(self.path), self.clock)
        if start:
            # The parts that run on a Clock (listeners need a real reactor).
            for service in (self.gateway.rates, self.gateway.webhooks):
                if service is not None:
                    service.startService()
        self.admin = StubTreq(self.gateway.admin.resource())
        self.data = StubTreq(self.gateway.resource)
        # Through the gateway's site, not the stub's own: see the class
        # docstring.
        self.data._agent._serverFactory = self.gateway.site

    def rewrite(self, gateway: str = "listen = tcp:0\n", extra: str = "", text: Optional[str] = None) -> None:
        """
        Write a new configuration file in place of the old one.
        """
        writeIni(text if text is not None else iniText(gateway, extra), os.path.dirname(self.path))

    def settle(self, stub: Optional[StubTreq] = None) -> None:
        """
        Let the clock's pending calls and both stubs' connections run.
        """
        for _ in range(8):
            self.clock.advance(0)
            self.admin.flush()
            self.data.flush()

    def call(self, method: str, path: str, body: Any = None, headers: Optional[Dict[str, str]] = None,
             data: bool = False) -> Tuple[int, Dict[str, str], bytes]:
        """
        One request to the admin API (or the data plane with C{data}):
        status, headers (lower-cased, first values) and the body.
        """
        stub = self.data if data else self.admin
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        d = stub.request(method, ("http://gateway" if data else "http://admin") + path, data=body,
                         headers=headers if headers is not None else ({} if data else AUTH))
        results: list = []
        d.addCallback(lambda response: stub.content(response).addCallback(
            lambda content: results.append((response, content))))
        self.settle()
        assert results, f"no answer to {method} {path}"
        response, content = results[0]
        answered = {k.decode().lower(): v[0].decode() for k, v in response.headers.getAllRawHeaders()}
        return response.code, answered, content

    def json(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Tuple[int, Any]:
        """
        One admin request whose answer is JSON: status and document.
        """
        status, _, content = self.call(method, path, body, **kwargs)
        return status, json.loads(content) if content else None

    def publish(self, path: str, content: bytes, key: Optional[str] = None) -> int:
        """
        Publish one message on the data plane; the status.
        """
        query = f"?key={key}" if key else ""
        return self.call("POST", path + query, content, headers={"Content-Type": "text/plain"}, data=True)[0]

    def stream(self, path: str, headers: Dict[str, str], admin: bool = False) -> Stream:
        """
        Open a streaming GET; what it receives collects in the L{Stream}.
        """
        stub = self.admin if admin else self.data
        stream = Stream()
        d = stub.get(("http://admin" if admin else "http://gateway") + path, headers=headers)

        def opened(response: Any) -> Any:
            stream.response = response
            done = response.collect(stream.chunks.append)
            done.addBoth(lambda _: setattr(stream, "done", True))
            return done

        d.addCallback(opened)
        # A client that leaves on purpose (the tests cut connections) ends
        # its response with an error: it is what the stream records.
        d.addErrback(lambda failure: setattr(stream, "error", failure))
        self.settle()
        return stream

    def metrics(self) -> Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]:
        """
        GET /metrics, parsed by prometheus_client's own parser: sample name
        and sorted labels to value.
        """
        status, headers, body = self.call("GET", "/metrics")
        assert status == 200, body
        assert headers["content-type"].startswith("text/plain"), headers
        samples = {}
        for family in text_string_to_metric_families(body.decode("utf-8")):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples


class ReadinessTests(SynchronousTestCase):
    """
    GET /health and GET /ready.
    """

    def setUp(self) -> None:
        self.ops = OpsHarness(extra="\n[endpoint:other]\ntype = memory\n")

    def test_health(self) -> None:
        """
        /health answers 200 without a token.
        """
        status, _, body = self.ops.call("GET", "/health", headers={})
        self.assertEqual((status, json.loads(body)), (200, {"status": "ok"}))

    def test_ready(self) -> None:
        """
        /ready answers 200 without a token while every endpoint is
        connected.
        """
        status, _, body = self.ops.call("GET", "/ready", headers={})
        self.assertEqual((status, json.loads(body)), (200, {"status": "ready", "endpoints": 2}))

    def test_notReady(self) -> None:
        """
        An endpoint that is not connected makes /ready a 503 problem that
        names it (and only it).
        """
        self.ops.gateway.connectors["other"].connected = False
        status, headers, body = self.ops.call("GET", "/ready", headers={})
        document = json.loads(body)
        self.assertEqual((status, headers["content-type"]), (503, "application/problem+json"))
        self.assertEqual(document["notConnected"], ["other"])
        self.assertIn("endpoint other is not connected", document["detail"])
        self.assertEqual(document["endpoints"], {"other": "not connected"})

    def test_notReadyReason(self) -> None:
        """
        /ready says why an endpoint is not connected when its connector
        knows (C{notConnectedReason}), in C{endpoints} and in the detail.
        """
        connector = self.ops.gateway.connectors["other"]
        connector.connected = False
        connector.notConnectedReason = "authentication failed: SASL ... (check sasl.password-file)"
        status, _, body = self.ops.call("GET", "/ready", headers={})
        document = json.loads(body)
        self.assertEqual(status, 503)
        self.assertEqual(document["endpoints"], {"other": connector.notConnectedReason})
        self.assertIn("other: authentication failed", document["detail"])

    def test_storeNotOpen(self) -> None:
        """
        A node whose shared store is still being read is not ready.
        """
        class Reading:
            isOpen = False
            description = "kafka:kafka/evgate-store"

        self.ops.gateway.node.store = Reading()
        status, _, body = self.ops.call("GET", "/ready", headers={})
        document = json.loads(body)
        self.assertEqual((status, document["storeOpen"]), (503, False))
        self.assertIn("kafka:kafka/evgate-store is still being read", document["detail"])

    def test_endpoints(self) -> None:
        """
        /endpoints lists every endpoint with its type, state and APIs, and
        needs the token.
        """
        self.ops.gateway.connectors["other"].connected = False
        status, document = self.ops.json("GET", "/endpoints")
        self.assertEqual(document["items"], [
            {"name": "local", "type": "memory", "connected": True, "apis": ["demo"]},
            {"name": "other", "type": "memory", "connected": False, "apis": []},
        ])
        self.assertEqual(self.ops.call("GET", "/endpoints", headers={})[0], 401)


class MetricsTests(SynchronousTestCase):
    """
    GET /metrics: what the data plane counted, read with Prometheus's
    parser.
    """

    def setUp(self) -> None:
        self.ops = OpsHarness(gateway="limits-store = redis://127.0.0.1:1/0\n")

    def test_needsToken(self) -> None:
        """
        /metrics needs the admin token.
        """
        self.assertEqual(self.ops.call("GET", "/metrics", headers={})[0], 401)

    def test_traffic(self) -> None:
        """
        Publishes, pages, streams and unknown paths are counted per API,
        entrypoint and status; messages and bytes in and out; the publish
        latency histogram; live subscribers.
        """
        ops = self.ops
        for i in range(3):
            self.assertEqual(ops.publish("/demo", b"hello %d" % i), 202)
        stream = ops.stream("/demo?cursor=" + self.firstCursor(), {"Accept": "text/event-stream"})
        self.assertIn(b"hello 2", stream.body)
        status, _, page = ops.call("GET", "/demo?limit=2&timeout=0&cursor=" + self.firstCursor(), data=True)
        self.assertEqual(status, 200)
        self.assertEqual(ops.call("GET", "/nowhere", data=True)[0], 404)
        samples = ops.metrics()

        def value(name: str, **labels: str) -> float:
            return samples[(name, tuple(sorted(labels.items())))]

        demo = {"api": "demo"}
        self.assertEqual(value("evgate_requests_total", entrypoint="http-post", code="202", **demo), 3)
        self.assertEqual(value("evgate_requests_total", entrypoint="http-get", code="200", **demo), 1)
        self.assertEqual(value("evgate_requests_total", api="-", entrypoint="-", code="404"), 1)
        self.assertEqual(value("evgate_messages_in_total", entrypoint="http-post", **demo), 3)
        self.assertEqual(value("evgate_message_bytes_in_total", entrypoint="http-post", **demo), 21)
        self.assertEqual(value("evgate_publish_latency_seconds_count", entrypoint="http-post", **demo), 3)
        self.assertEqual(value("evgate_publish_latency_seconds_bucket", entrypoint="http-post", le="0.0005", **demo),
                         3)
        self.assertEqual(value("evgate_messages_out_total", entrypoint="http-get", **demo), 2)
        self.assertEqual(value("evgate_bytes_out_total", entrypoint="http-get", **demo), len(page))
        self.assertEqual(value("evgate_messages_out_total", entrypoint="sse", **demo), 3)
        self.assertGreater(value("evgate_bytes_out_total", entrypoint="sse", **demo), 0)
        self.assertEqual(value("evgate_subscribers", entrypoint="sse", **demo), 1)
        self.assertEqual(value("evgate_subscribers", entrypoint="http-get", **demo), 0)
        self.assertEqual(value("evgate_subscriber_lag_messages", entrypoint="sse", **demo), 0)
        self.assertEqual(value("evgate_endpoint_connected", endpoint="local", type="memory"), 1)
        self.assertEqual(value("evgate_limits_store_fallbacks_total"), 0)
        self.assertEqual(value("evgate_config_reloads_total", result="applied"), 0)

    def firstCursor(self) -> str:
        """
        The cursor before the first message of the demo topic.
        """
        api = self.ops.gateway.api("demo")
        assert api is not None
        return Cursor.fromMapping({0: 0}, api.connector.epoch()).encode(api.tag)

    def test_clientLeft(self) -> None:
        """
        A stream whose client leaves is counted once, with the status it
        had; a long poll left before its answer counts as 499.
        """
        ops = self.ops
        stream = ops.stream("/demo", {"Accept": "text/event-stream"})
        poll = ops.stream("/demo?timeout=30000", {})
        self.assertIsNotNone(stream.response)
        self.assertIsNone(poll.response)
        for pump in list(ops.data._agent._pumps):
            pump.clientIO.loseConnection()
        ops.settle()
        samples = ops.metrics()
        self.assertEqual(samples[("evgate_requests_total", (("api", "demo"), ("code", "200"),
                                                            ("entrypoint", "sse")))], 1)
        self.assertEqual(samples[("evgate_requests_total", (("api", "demo"), ("code", "499"),
                                                            ("entrypoint", "http-get")))], 1)
        self.assertEqual(samples[("evgate_subscribers", (("api", "demo"), ("entrypoint", "sse")))], 0)

    def test_ownRegistry(self) -> None:
        """
        Each gateway has its own registry: two gateways count apart, and
        nothing lands in prometheus_client's global registry.
        """
        other = OpsHarness()
        self.ops.publish("/demo", b"x")
        self.assertEqual(self.ops.gateway.metrics.totals("demo")["messagesIn"], 1)
        self.assertEqual(other.gateway.metrics.totals("demo")["messagesIn"], 0)
        self.assertIsNot(self.ops.gateway.metrics.registry, other.gateway.metrics.registry)
        names = {metric.name for metric in REGISTRY.collect()}
        self.assertEqual([n for n in names if n.startswith("evgate")], [])

    def test_openMetrics(self) -> None:
        """
        A scraper asking for OpenMetrics gets it.
        """
        status, headers, body = self.ops.call(
            "GET", "/metrics", headers=dict(AUTH, Accept="application/openmetrics-text; version=1.0.0"))
        self.assertEqual(status, 200)
        self.assertTrue(headers["content-type"].startswith("application/openmetrics-text"))
        self.assertTrue(body.endswith(b"# EOF\n"))


class LagTests(SynchronousTestCase):
    """
    Consumer lag where the endpoint knows its head.
    """

    def test_lagOf(self) -> None:
        """
        The lag is the sum over partitions of head minus position; a
        reader that has not started lags nothing.
        """
        cursor = Cursor.fromMapping({0: 3, 1: 10})
        self.assertEqual(lagOf({0: 5, 1: 10}, cursor), 2)
        self.assertEqual(lagOf({0: 5, 2: 7}, cursor), 2)
        self.assertEqual(lagOf({0: 5}, None), 0)

    def test_headOffsets(self) -> None:
        """
        The memory endpoint knows its head; an endpoint without
        headOffsets does not.
        """
        ops = OpsHarness()
        ops.publish("/demo", b"a")
        ops.publish("/demo", b"b")
        self.assertEqual(headOffsets(ops.gateway.connectors["local"], "demo"), {0: 2})
        self.assertIsNone(headOffsets(object(), "demo"))

    def test_pausedStreamLags(self) -> None:
        """
        A stream whose transport pushes back lags behind the head by what
        it has not written.
        """
        ops = OpsHarness()
        ops.stream("/demo", {"Accept": "text/event-stream"})
        (subscriber,) = ops.gateway.api("demo").entrypoints[0].live
        subscriber.pauseProducing()
        for i in range(4):
            ops.publish("/demo", b"m%d" % i)
        samples = ops.metrics()
        self.assertEqual(samples[("evgate_subscriber_lag_messages", (("api", "demo"), ("entrypoint", "sse")))], 4)


class WebhookCountTests(SynchronousTestCase):
    """
    Webhook deliveries, failed attempts and dead letters, counted as the
    deliverers store them.
    """

    def test_countingStore(self) -> None:
        """
        Updates that add to the delivery counts of a subscription are
        counted under its API; other updates are not; the store answers as
        before.
        """
        ops = OpsHarness()
        store = CountingStore(MemoryStore(), ops.gateway.metrics)
        verifyObject(IStore, store)
        results: list = []
        store.create("webhook-subscription", "s1", {"api": "orders", "delivered": 0})
        store.update("webhook-subscription", "s1", {"position": "x"}, {"delivered": 2, "failedAttempts": 1})
        store.update("webhook-subscription", "s1", {"position": "y"}, {"deadLettered": 1})
        store.update("webhook-subscription", "s1", {"paused": True}).addCallback(results.append)
        store.update("webhook-subscription", "nope", {}, {"delivered": 1})
        ops.settle()
        counts = ops.gateway.metrics.webhooks["orders"]
        self.assertEqual((counts.delivered, counts.failedAttempts, counts.deadLettered), (2, 1, 1))
        self.assertEqual(results[0]["delivered"], 2)
        samples = ops.metrics()
        self.assertEqual(samples[("evgate_webhook_deliveries_total", (("api", "orders"),))], 2)
        self.assertEqual(samples[("evgate_webhook_dead_letters_total", (("api", "orders"),))], 1)

    def test_serviceUsesIt(self) -> None:
        """
        The node's webhook service stores through the counting store.
        """
        ops = OpsHarness(gateway="store = memory\n", extra=(
            "\n[api:hooks]\npath = /hooks\nendpoint = local\ntopic = hooks\nentrypoints = webhook\n"))
        self.assertIsInstance(ops.gateway.webhooks.store, CountingStore)


class ApiRouteTests(SynchronousTestCase):
    """
    GET /apis and GET /apis/<api>.
    """

    def setUp(self) -> None:
        secret = os.path.abspath(self.mktemp())
        with open(secret, "w") as f:
            f.write("very-secret-value")
        self.ops = OpsHarness(extra=(
            "cors-origins = https://app.example\n"
            "\n[api:secured]\npath = /secured\nendpoint = local\ntopic = secured\nentrypoints = sse\n"
            "plans = oauth2\noauth2.introspection-url = https://auth.example/introspect\n"
            f"oauth2.client-id = evgate\noauth2.client-secret-file = {secret}\n"))

    def test_list(self) -> None:
        """
        /apis lists every API with its shape and live figures.
        """
        self.ops.publish("/demo", b"one")
        status, document = self.ops.json("GET", "/apis")
        self.assertEqual(status, 200)
        demo, secured = document["items"]
        self.assertEqual((demo["name"], demo["path"], demo["endpoint"], demo["topic"]),
                         ("demo", "/demo", "local", "demo"))
        self.assertEqual(demo["entrypoints"], ["http-post", "http-get", "sse"])
        self.assertEqual(demo["plans"], ["keyless"])
        self.assertEqual((demo["endpointType"], demo["endpointConnected"]), ("memory", True))
        self.assertEqual(demo["live"]["messagesIn"], 1)
        self.assertEqual(demo["live"]["requests"], {"202": 1})
        self.assertEqual(demo["live"]["subscribers"], {"http-get": 0, "sse": 0})
        self.assertEqual(secured["plans"], ["oauth2"])

    def test_one(self) -> None:
        """
        /apis/<api> adds the definition as loaded, with secrets hidden; an
        unknown API is a 404 problem.
        """
        status, document = self.ops.json("GET", "/apis/secured")
        self.assertEqual(status, 200)
        definition = document["definition"]
        self.assertEqual(definition["oauth2.client-id"], "evgate")
        self.assertEqual(definition["oauth2.client-secret-file"], "(hidden)")
        self.assertEqual(definition["path"], "/secured")
        self.assertEqual(self.ops.json("GET", "/apis/nope")[0], 404)

    def test_rates(self) -> None:
        """
        Rates are messages per second since the oldest sample of the last
        minute.
        """
        ops = self.ops
        ops.clock.advance(5)
        for i in range(10):
            ops.publish("/demo", b"m%d" % i)
        ops.clock.advance(5)
        rates = ops.json("GET", "/apis/demo")[1]["live"]["rates"]
        self.assertEqual(rates, {"messagesInPerSecond": 1.0, "messagesOutPerSecond": 0.0, "seconds": 10.0})
        for _ in range(24):
            ops.clock.advance(5)
        rates = ops.json("GET", "/apis/demo")[1]["live"]["rates"]
        self.assertEqual(rates["messagesInPerSecond"], 0.0)


class TailTests(SynchronousTestCase):
    """
    GET /apis/<api>/tail: the console's live tail.
    """

    def setUp(self) -> None:
        self.ops = OpsHarness()

    def lines(self, stream: Any) -> List[Dict[str, Any]]:
        """
        The JSON lines the tail sent so far.
        """
        return [json.loads(line) for line in stream.body.split(b"\n") if line.strip()]

    def test_tail(self) -> None:
        """
        A tail receives the messages published after it opened, as JSON
        lines; binary content is base64; long content is cut.
        """
        ops = self.ops
        ops.publish("/demo", b"before")
        stream = ops.stream("/apis/demo/tail", AUTH, admin=True)
        self.assertEqual(stream.response.headers.getRawHeaders(b"content-type"), [b"application/x-ndjson"])
        ops.publish("/demo", b"first", key="k1")
        ops.publish("/demo", b"\xff\x00")
        ops.publish("/demo", b"x" * 5000)
        lines = self.lines(stream)
        self.assertEqual(lines[0]["subscribed"]["api"], "demo")
        messages = lines[1:]
        self.assertEqual([(m["content"], m["key"]) for m in messages[:1]], [("first", "k1")])
        self.assertEqual((messages[1]["content"], messages[1]["encoding"]), ("/wA=", "base64"))
        self.assertEqual((len(messages[2]["content"]), messages[2]["truncated"], messages[2]["size"]),
                         (4096, True, 5000))
        self.assertEqual([m["metadata"]["offset"] for m in messages], [1, 2, 3])

    def test_tailNeverSlowsTheApi(self) -> None:
        """
        While its transport pushes back, a tail skips messages (and says
        how many) instead of pausing the stream.
        """
        ops = self.ops
        stream = ops.stream("/apis/demo/tail", AUTH, admin=True)
        (tail,) = ops.gateway.tails.live
        verifyObject(ISubscriber, tail)
        tail.pauseProducing()
        ops.publish("/demo", b"a")
        ops.publish("/demo", b"b")
        self.assertFalse(tail.subscription.paused)
        tail.resumeProducing()
        ops.publish("/demo", b"c")
        lines = self.lines(stream)
        self.assertEqual(lines[1:], [{"skipped": 2}, lines[2]])
        self.assertEqual(lines[2]["content"], "c")

    def test_endsWithTheGateway(self) -> None:
        """
        A tail ends cleanly when the gateway stops, and leaves the hub when
        its client goes.
        """
        ops = self.ops
        stream = ops.stream("/apis/demo/tail", AUTH, admin=True)
        ops.gateway.tails.stopService()
        ops.settle()
        self.assertTrue(stream.done)
        self.assertEqual(self.lines(stream)[-1], {"end": "the gateway is stopping"})
        self.assertEqual(ops.gateway.tails.live, set())
        ops.stream("/apis/demo/tail", AUTH, admin=True)
        (tail,) = ops.gateway.tails.live
        for pump in list(ops.admin._agent._pumps):
            pump.clientIO.loseConnection()
        ops.settle()
        self.assertTrue(tail.subscription.closed)

    def test_unknownApi(self) -> None:
        """
        Tailing an unknown API is a 404; the token is required.
        """
        self.assertEqual(self.ops.call("GET", "/apis/nope/tail")[0], 404)
        self.assertEqual(self.ops.call("GET", "/apis/demo/tail", headers={})[0], 401)


class AccessLogTests(SynchronousTestCase):
    """
    The access log: evgate's one line per request and per ended stream.
    """

    def capture(self) -> List[Dict[str, Any]]:
        """
        The access events logged from now on.
        """
        events: List[Dict[str, Any]] = []

        def observe(event: Dict[str, Any]) -> None:
            if event.get("log_namespace") == "evgate.access":
                events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return events

    def test_text(self) -> None:
        """
        An access line reads as one line of text with every field, and the
        JSON observer writes the fields as keys and the text as the
        message, once.
        """
        events = self.capture()
        RequestLog(True).line(api="demo", entrypoint="http-post", method="POST", path="/demo", status=202,
                              duration=0.0125, bytesIn=3, bytesOut=46, messages=None, consumer="anonymous",
                              peer="127.0.0.1")
        [event] = events
        self.assertEqual(formatEvent(event), "127.0.0.1 POST /demo 202 api=demo entrypoint=http-post "
                                             "consumer=anonymous duration=0.013s in=3 out=46 messages=-")
        out = io.StringIO()
        JsonLinesObserver(out)(event)
        record = json.loads(out.getvalue())
        self.assertEqual(record["message"], formatEvent(event))
        self.assertEqual((record["status"], record["bytesOut"], record["consumer"]), (202, 46, "anonymous"))
        self.assertNotIn("_accessLine", record)

    def test_off(self) -> None:
        """
        Without access-log nothing is logged, but requests are counted.
        """
        ops = OpsHarness()
        events = self.capture()
        ops.publish("/demo", b"x")
        self.assertEqual(events, [])
        self.assertEqual(ops.gateway.metrics.tally("demo", "http-post").codes, {202: 1})

    def test_lines(self) -> None:
        """
        With access-log, a publish, a refused request and an event stream
        ended by its client each log one line with their fields; query
        strings (credentials) are not logged.
        """
        ops = OpsHarness(gateway="access-log = true\n")
        events = self.capture()
        ops.publish("/demo", b"hello", key="k")
        ops.call("GET", "/demo?access_token=secret", data=True, headers={"Accept": "image/png"})
        stream = ops.stream("/demo", {"Accept": "text/event-stream"})
        ops.publish("/demo", b"streamed")
        self.assertIn(b"streamed", stream.body)
        ops.clock.advance(2)
        for pump in list(ops.data._agent._pumps):
            pump.clientIO.loseConnection()
        ops.settle()
        publish, refused, published, sse = events
        self.assertEqual((publish["api"], publish["entrypoint"], publish["status"], publish["bytesIn"],
                          publish["consumer"], publish["method"], publish["path"]),
                         ("demo", "http-post", 202, 5, "anonymous", "POST", "/demo"))
        # A credential on a keyless API is refused (docs/security.md).
        self.assertEqual((refused["status"], refused["entrypoint"]), (401, "http-get"))
        self.assertEqual((sse["entrypoint"], sse["status"], sse["messages"], sse["duration"]),
                         ("sse", 200, 1, 2.0))
        self.assertGreater(sse["bytesOut"], len(b"streamed"))
        self.assertNotIn("secret", json.dumps([{k: str(v) for k, v in e.items()} for e in events]))


class TallyTests(SynchronousTestCase):
    """
    The per-entrypoint tallies.
    """

    def test_published(self) -> None:
        """
        A publish adds a message, its bytes, and its latency to the right
        bucket.
        """
        tally = Tally("a", "http-post")
        tally.published(10, 0.003)
        tally.published(5, 100.0)
        self.assertEqual((tally.messagesIn, tally.bytesIn, tally.latencyCount), (2, 15, 2))
        self.assertEqual(tally.latency[3], 1)
        self.assertEqual(tally.latency[-1], 1)

    def test_reloadKeepsTallies(self) -> None:
        """
        A node hands the same tally to every runtime of an API (across
        reloads) and forgets it with the API.
        """
        ops = OpsHarness()
        metrics = ops.gateway.metrics
        self.assertIs(metrics.tally("demo", "sse"), ops.gateway.api("demo").entrypoints[0].tally)
        metrics.forget("demo")
        self.assertNotIn(("demo", "sse"), metrics.tallies)


class JsonLinesTests(SynchronousTestCase):
    """
    The JSON lines of log-format = json.
    """

    def test_event(self) -> None:
        """
        An event is one JSON line: time, level, namespace, the text, and
        its fields as keys; values that are not JSON become text.
        """
        import io

        from twisted.logger import ILogObserver, Logger

        from evgate.logs import JsonLinesObserver, observerFor

        out = io.StringIO()
        observer = JsonLinesObserver(out)
        verifyObject(ILogObserver, observer)
        log = Logger(namespace="evgate.test", observer=observer)
        log.warn("{api} refused {count}", api="orders", count=3, where=("a", 1))
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            log.failure("oops {api}", api="orders")
        first, second = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual((first["level"], first["namespace"], first["message"], first["api"], first["count"]),
                         ("warn", "evgate.test", "orders refused 3", "orders", 3))
        self.assertEqual(first["where"], "('a', 1)")
        self.assertTrue(first["time"].endswith("Z"))
        self.assertEqual(second["level"], "critical")
        self.assertIn("ZeroDivisionError", second["traceback"])
        self.assertIsNone(observerFor({"logFormat": "text"}))
        self.assertIsInstance(observerFor({"logFormat": "json"}), JsonLinesObserver)

    def test_offeredToTwistd(self) -> None:
        """
        Added to twistd's application, a gateway with log-format = json
        offers it the JSON observer (twistd uses it unless --logger is
        given); with text it offers nothing.
        """
        from twisted.application.service import Application
        from twisted.logger import ILogObserver

        from evgate.logs import JsonLinesObserver

        application = Application("evgate")
        OpsHarness(gateway="log-format = json\n", start=False).gateway.setServiceParent(application)
        self.assertIsInstance(application.getComponent(ILogObserver), JsonLinesObserver)
        plain = Application("evgate")
        OpsHarness(start=False).gateway.setServiceParent(plain)
        self.assertIsNone(plain.getComponent(ILogObserver, None))
