"""
Unit tests of what the console and the portal are built on: the metrics
history (driven by a L{Clock}) and the admin routes added for the console,
through L{StubTreq}.
"""

from __future__ import annotations

from typing import Any, Dict, List

from twisted.trial.unittest import SynchronousTestCase

from evgate.admin.samples import MetricsHistory, _quantile, parseSince
from evgate.errors import BadRequest

from .helpers import GatewayIni
from .test_admin import AUTH, AdminHarness


def byLabels(document: Dict[str, Any], kind: str) -> Dict[tuple, List[List[float]]]:
    """
    The points of every series of C{kind} in a history answer, by their
    sorted label values.
    """
    return {tuple(sorted(s["labels"].items())): s["points"] for s in document["series"] if s["kind"] == kind}


class MetricsHistoryTests(SynchronousTestCase):
    """
    L{MetricsHistory} samples the node's counters into ring buffers.
    """

    def setUp(self) -> None:
        self.admin = AdminHarness()
        self.gateway = self.admin.gateway
        self.clock = self.admin.clock
        self.history = MetricsHistory(self.gateway.node, self.clock, interval=5.0, size=4)
        self.history.startService()
        self.addCleanup(self.history.stopService)

    def test_ratesPerInterval(self) -> None:
        """
        Messages in and out become per-second rates over each interval; the
        first sample only sets the baseline.
        """
        tally = self.gateway.metrics.tally("orders", "http-post")
        for _ in range(10):
            tally.published(5, 0.002)
        self.clock.advance(5)
        tally.messagesOut += 25
        self.clock.advance(5)
        answer = self.history.query(["messagesIn", "messagesOut"])
        inPoints = byLabels(answer, "messagesIn")[(("api", "orders"),)]
        outPoints = byLabels(answer, "messagesOut")[(("api", "orders"),)]
        self.assertEqual([v for _, v in inPoints], [2.0, 0.0])
        self.assertEqual([v for _, v in outPoints], [0.0, 5.0])
        self.assertEqual(byLabels(answer, "messagesIn")[(("api", "plain"),)][0][1], 0.0)

    def test_ringBufferKeepsTheLastPoints(self) -> None:
        """
        A series keeps C{size} points, the newest; C{since} returns only
        later ones.
        """
        for _ in range(7):
            self.clock.advance(5)
        points = byLabels(self.history.query(["messagesIn"]), "messagesIn")[(("api", "orders"),)]
        self.assertEqual(len(points), 4)
        self.assertEqual(points[-1][0], round(self.clock.seconds(), 3))
        later = self.history.query(["messagesIn"], since=points[1][0])
        self.assertEqual(len(byLabels(later, "messagesIn")[(("api", "orders"),)]), 2)

    def test_latency(self) -> None:
        """
        Publish latency is the mean and the p95 bucket bound of the
        messages published in the interval; no point without publishes.
        """
        tally = self.gateway.metrics.tally("orders", "http-post")
        self.clock.advance(5)
        answer = self.history.query(["publishLatency"])
        self.assertEqual(answer["series"], [])
        for _ in range(19):
            tally.published(1, 0.001)
        tally.published(1, 0.2)
        self.clock.advance(5)
        series = byLabels(self.history.query(["publishLatency"]), "publishLatency")
        mean = series[(("api", "orders"), ("stat", "mean"))][-1][1]
        self.assertAlmostEqual(mean, (19 * 0.001 + 0.2) / 20)
        self.assertEqual(series[(("api", "orders"), ("stat", "p95"))][-1][1], 0.001)

    def test_errorsAndSubscribers(self) -> None:
        """
        Errors are counted by type per second; subscribers per entrypoint
        as they are at the sample.
        """
        tally = self.gateway.metrics.tally("orders", "http-post")
        for code in (400, 401, 503, 202, 499):
            tally.answered(code)
        self.gateway.metrics.webhookCounts("orders").failedAttempts += 10
        self.clock.advance(5)
        errors = byLabels(self.history.query(["errors"], api="orders"), "errors")
        self.assertEqual(errors[(("api", "orders"), ("type", "4xx"))][-1][1], 0.4)
        self.assertEqual(errors[(("api", "orders"), ("type", "5xx"))][-1][1], 0.2)
        self.assertEqual(errors[(("api", "orders"), ("type", "webhook-failed"))][-1][1], 2.0)
        subscribers = byLabels(self.history.query(["subscribers"]), "subscribers")
        self.assertEqual(subscribers[(("api", "orders"), ("entrypoint", "webhook"))][-1][1], 0)

    def test_countersGoingBackwards(self) -> None:
        """
        A counter that restarts (an API removed and added again) is no
        traffic for that interval, not a negative rate.
        """
        tally = self.gateway.metrics.tally("orders", "http-post")
        tally.messagesIn = 100
        self.clock.advance(5)
        tally.messagesIn = 3
        self.clock.advance(5)
        points = byLabels(self.history.query(["messagesIn"]), "messagesIn")[(("api", "orders"),)]
        self.assertEqual(points[-1][1], 0.0)

    def test_goneSeriesAreForgotten(self) -> None:
        """
        A series with no point in the window (its API is gone) is dropped.
        """
        self.clock.advance(5)
        self.gateway.node.apis = [api for api in self.gateway.node.apis if api.name != "plain"]
        for _ in range(6):
            self.clock.advance(5)
        apis = {s["labels"]["api"] for s in self.history.query(["messagesIn"])["series"]}
        self.assertEqual(apis, {"orders"})

    def test_quantileAndSince(self) -> None:
        """
        The p95 of an empty or all-slow histogram is a bucket bound; since
        takes POSIX seconds or RFC 3339 with a zone.
        """
        self.assertEqual(_quantile([0] * 15, 0.95), 0.0005)
        self.assertEqual(_quantile([0] * 14 + [3], 0.95), 20.0)
        self.assertEqual(parseSince("1700000000.5"), 1700000000.5)
        self.assertEqual(parseSince("2023-11-14T22:13:20Z"), 1700000000.0)
        self.assertRaises(BadRequest, parseSince, "2023-11-14T22:13:20")
        self.assertRaises(BadRequest, parseSince, "yesterday")


class HistoryRouteTests(SynchronousTestCase):
    """
    C{GET /metrics/history}.
    """

    def setUp(self) -> None:
        self.admin = AdminHarness()
        history = self.admin.gateway.history
        history.startService()
        self.addCleanup(history.stopService)
        self.admin.gateway.metrics.tally("orders", "http-post").published(3, 0.001)
        self.admin.clock.advance(5)

    def test_history(self) -> None:
        """
        The route answers the series asked for, with their interval.
        """
        status, headers, document = self.admin.call("GET", "/metrics/history?series=messagesIn,errors&api=orders",
                                                    headers=AUTH)
        self.assertEqual(status, 200, document)
        self.assertEqual(document["interval"], 5.0)
        self.assertEqual(document["points"], 720)
        self.assertEqual({s["kind"] for s in document["series"]}, {"messagesIn", "errors"})
        self.assertEqual({s["labels"]["api"] for s in document["series"]}, {"orders"})
        rate = [s for s in document["series"] if s["kind"] == "messagesIn"][0]
        self.assertEqual(rate["unit"], "messages/s")
        self.assertEqual(rate["points"][-1][1], 0.2)

    def test_since(self) -> None:
        """
        C{since} leaves out the points taken until then.
        """
        now = round(self.admin.clock.seconds(), 3)
        status, _, document = self.admin.call("GET", f"/metrics/history?series=messagesIn&since={now}",
                                              headers=AUTH)
        self.assertEqual(status, 200)
        self.assertEqual([s["points"] for s in document["series"]], [[], []])

    def test_needsToken(self) -> None:
        """
        Without the token: 401.
        """
        status, _, document = self.admin.call("GET", "/metrics/history", headers={})
        self.assertEqual(status, 401)

    def test_badInput(self) -> None:
        """
        An unknown series, a bad since, an unknown parameter: 400 problems.
        """
        for query, words in (("series=bogus", "unknown series"), ("since=soon", "since"),
                             ("colour=red", "unknown query parameter"), ("since=1&since=2", "more than once")):
            status, headers, document = self.admin.call("GET", f"/metrics/history?{query}", headers=AUTH)
            self.assertEqual(status, 400, query)
            self.assertEqual(headers["content-type"], "application/problem+json")
            self.assertIn(words, document["detail"])


# The admin harness's gateway with API keys on /orders; {token} and
# {gateway} are filled in by AdminHarness.
KEYS_INI = str(GatewayIni(store="memory").admin("{token}").lines("gateway", "{gateway}").memory()
               .api("orders", entrypoints="http-post webhook", plans="api-key"))


class KeyExpiryRouteTests(SynchronousTestCase):
    """
    C{PATCH /apis/<api>/keys/<id>}: set or clear a key's expiry.
    """

    def setUp(self) -> None:
        self.admin = AdminHarness(ini=KEYS_INI)
        status, _, self.key = self.admin.call("POST", "/apis/orders/keys", {"name": "billing"})
        assert status == 201, self.key

    def test_setAndClear(self) -> None:
        """
        The expiry is set, shown, applied by the registry, and cleared
        with null.
        """
        path = f"/apis/orders/keys/{self.key['id']}"
        status, _, document = self.admin.call("PATCH", path, {"expiresAt": "2099-01-01T00:00:00Z"})
        self.assertEqual(status, 200, document)
        self.assertEqual(document["expiresAt"], "2099-01-01T00:00:00Z")
        self.assertNotIn("key", document)
        registry = self.admin.gateway.apiKeys
        self.assertEqual(registry.records[self.key["id"]]["expiresAt"], 4070908800.0)
        status, _, document = self.admin.call("GET", path)
        self.assertEqual(document["expiresAt"], "2099-01-01T00:00:00Z")
        status, _, document = self.admin.call("PATCH", path, {"expiresAt": None})
        self.assertEqual((status, document["expiresAt"]), (200, None))

    def test_badInput(self) -> None:
        """
        A past time, a time without a zone, other fields, an unknown key:
        400s and 404, as problems; no token: 401.
        """
        path = f"/apis/orders/keys/{self.key['id']}"
        for body in ({"expiresAt": "2001-01-01T00:00:00Z"}, {"expiresAt": "2099-01-01T00:00:00"},
                     {"expiresAt": "2099-01-01T00:00:00Z", "name": "x"}, [], {"expiresAt": True}):
            status, headers, document = self.admin.call("PATCH", path, body)
            self.assertEqual(status, 400, body)
            self.assertEqual(headers["content-type"], "application/problem+json")
        status, _, _ = self.admin.call("PATCH", "/apis/orders/keys/nosuchkey000", {"expiresAt": None})
        self.assertEqual(status, 404)
        status, _, _ = self.admin.call("PATCH", path, {"expiresAt": None}, headers={})
        self.assertEqual(status, 401)


class ReplayRouteTests(SynchronousTestCase):
    """
    C{POST /apis/<api>/subscriptions/<id>/replay}.
    """

    def setUp(self) -> None:
        self.admin = AdminHarness()
        self.connector = self.admin.gateway.connectors["local"]
        for index in range(3):
            self.publish(f"m{index}")
            self.admin.clock.advance(10)
        status, _, created = self.admin.call("POST", "/apis/orders/subscriptions",
                                             {"callbackUrl": "https://hooks.example/in"})
        assert status == 201, created
        self.id = created["id"]
        self.path = f"/apis/orders/subscriptions/{self.id}/replay"

    def publish(self, text: str) -> None:
        """
        Publish one message to the orders topic.
        """
        from evgate.message import Draft
        self.connector.publish("orders", Draft(text.encode()))

    def position(self) -> Dict[int, int]:
        """
        The subscription's stored position, decoded.
        """
        from evgate.message import Cursor
        status, _, document = self.admin.call("GET", f"/apis/orders/subscriptions/{self.id}")
        api = self.admin.gateway.api("orders")
        return Cursor.decode(document["position"], api.tag).asDict()

    def test_fromCursor(self) -> None:
        """
        From a cursor: the position becomes it, and the deliverer restarts
        from there.
        """
        from evgate.message import Cursor
        self.assertEqual(self.position(), {0: 3})
        api = self.admin.gateway.api("orders")
        cursor = Cursor.fromMapping({0: 1}, self.connector.epoch()).encode(api.tag)
        status, _, document = self.admin.call("POST", self.path, {"from": cursor})
        self.assertEqual(status, 200, document)
        self.assertEqual(document["id"], self.id)
        self.assertEqual(self.position(), {0: 1})
        # The receiver here answers 404 to everything: the restarted
        # deliverer tried message 1 again, and paused on it (no dlq).
        status, _, document = self.admin.call("GET", f"/apis/orders/subscriptions/{self.id}")
        self.assertIn("orders/0@1", document["pausedReason"])

    def test_atTime(self) -> None:
        """
        At a time: the first message published at or after it; after the
        last one, the head.
        """
        import datetime
        first = self.admin.clock.seconds() - 30
        at = datetime.datetime.fromtimestamp(first + 5, datetime.timezone.utc).isoformat()
        status, _, document = self.admin.call("POST", self.path, {"at": at})
        self.assertEqual(status, 200, document)
        self.assertEqual(self.position(), {0: 1})
        status, _, document = self.admin.call("POST", self.path, {"at": "2999-01-01T00:00:00Z"})
        self.assertEqual(self.position(), {0: 3})

    def test_pausedStaysPaused(self) -> None:
        """
        A paused subscription moves, and stays paused.
        """
        self.admin.call("POST", f"/apis/orders/subscriptions/{self.id}/pause")
        status, _, document = self.admin.call("POST", self.path, {"at": "2000-01-01T00:00:00Z"})
        self.assertEqual((status, document["status"]), (200, "paused"))
        self.assertNotIn(self.id, self.admin.gateway.webhooks.deliverers)
        self.assertEqual(self.position(), {0: 0})

    def test_badInput(self) -> None:
        """
        Bad bodies and cursors: 400 problems; unknown subscription: 404; no
        token: 401.
        """
        for body in ({}, {"from": "x", "at": "y"}, {"from": "not-a-cursor"}, {"at": "yesterday"},
                     {"at": "2020-01-01T00:00:00"}, {"from": 3}, {"until": "x"}):
            status, headers, document = self.admin.call("POST", self.path, body)
            self.assertEqual(status, 400, (body, document))
            self.assertEqual(headers["content-type"], "application/problem+json")
        status, _, _ = self.admin.call("POST", "/apis/orders/subscriptions/sub_00000000000000000000/replay",
                                       {"at": "2020-01-01T00:00:00Z"})
        self.assertEqual(status, 404)
        status, _, _ = self.admin.call("POST", self.path, {"at": "2020-01-01T00:00:00Z"}, headers={})
        self.assertEqual(status, 401)

    def test_refusedWithoutALog(self) -> None:
        """
        Endpoints that keep no log, or cannot find a time, refuse with a
        problem that says why (Kafka's consumer groups are moved instead:
        tests.test_replay_kafka_integration).
        """
        from zope.interface import directlyProvides

        from evgate.admin.replay import ReplayUnsupported, replayPosition
        from evgate.interfaces import IRetainedLog

        class Connector:
            kind = "kafka"

        class Api:
            connector = Connector()

            class config:
                endpoint = "events"

        directlyProvides(Api.connector, IRetainedLog)
        error = self.assertRaises(ReplayUnsupported, replayPosition, Api, {"at": "2020-01-01T00:00:00Z"})
        self.assertIn("cannot find a position by time", str(error))
        self.assertEqual(error.status, 409)
        directlyProvides(Api.connector)
        Connector.kind = "mqtt5"
        error = self.assertRaises(ReplayUnsupported, replayPosition, Api, {"from": "x"})
        self.assertIn("keeps no log", str(error))


class ConsoleOpsRouteTests(SynchronousTestCase):
    """
    The test publish, the tail's filter and the reload plan.
    """

    def setUp(self) -> None:
        from .test_ops import OpsHarness
        self.ops = OpsHarness()

    def test_publish(self) -> None:
        """
        A test message reaches the topic (and a tail) and is counted.
        """
        from .test_ops import AUTH as OPS_AUTH
        ops = self.ops
        stream = ops.stream("/apis/demo/tail", OPS_AUTH, admin=True)
        status, document = ops.json("POST", "/apis/demo/messages",
                                    {"content": "hello", "key": "k", "headers": {"h": "v"}},
                                    headers=dict(OPS_AUTH, **{"Content-Type": "application/json"}))
        self.assertEqual(status, 202, document)
        self.assertEqual((document["topic"], document["offset"]), ("demo", 0))
        import json
        lines = [json.loads(line) for line in stream.body.split(b"\n") if line.strip()]
        self.assertEqual((lines[1]["content"], lines[1]["key"], lines[1]["headers"]), ("hello", "k", {"h": "v"}))
        self.assertEqual(ops.gateway.metrics.totals("demo")["messagesIn"], 1)

    def test_publishBadInput(self) -> None:
        """
        Bodies that are not a message: 400; no token: 401.
        """
        from .test_ops import AUTH as OPS_AUTH
        for body in ({}, {"content": 1}, {"content": "x", "key": ""}, {"content": "x", "headers": {"a": 1}},
                     {"content": "x", "extra": 1}):
            status, document = self.ops.json("POST", "/apis/demo/messages", body, headers=OPS_AUTH)
            self.assertEqual(status, 400, body)
        status, _ = self.ops.json("POST", "/apis/demo/messages", {"content": "x"}, headers={})
        self.assertEqual(status, 401)

    def test_tailFilter(self) -> None:
        """
        A tail with a filter shows only the messages that pass it; a bad
        filter is a 400 that says where.
        """
        from .test_ops import AUTH as OPS_AUTH
        ops = self.ops
        stream = ops.stream('/apis/demo/tail?filter=key%20%3D%3D%20%22b%22', OPS_AUTH, admin=True)
        ops.publish("/demo", b"one", key="a")
        ops.publish("/demo", b"two", key="b")
        import json
        lines = [json.loads(line) for line in stream.body.split(b"\n") if line.strip()]
        self.assertEqual([line["content"] for line in lines[1:]], ["two"])
        status, document = ops.json("GET", "/apis/demo/tail?filter=key%20%3D%3D", headers=OPS_AUTH)
        self.assertEqual(status, 400)
        self.assertIn("column", document)

    def test_reloadPlan(self) -> None:
        """
        The plan says what a reload would change, and changes nothing; a
        mistake is a 400 naming the key; no token: 401.
        """
        ops = self.ops
        status, document = ops.json("GET", "/reload/plan")
        self.assertEqual(status, 200, document)
        self.assertEqual((document["empty"], document["applied"]), (True, False))
        ops.rewrite(extra="\n[api:more]\npath = /more\nendpoint = local\ntopic = more\nentrypoints = sse\n")
        status, document = ops.json("GET", "/reload/plan")
        self.assertEqual(document["apis"]["added"], ["more"])
        self.assertEqual(document["apis"]["unchanged"], ["demo"])
        self.assertIsNone(ops.gateway.api("more"))
        ops.rewrite(extra="bogus = 1\n")
        status, document = ops.json("GET", "/reload/plan")
        self.assertEqual((status, document["key"]), (400, "bogus"))
        status, _ = ops.json("GET", "/reload/plan", headers={})
        self.assertEqual(status, 401)


PORTAL_INI = """
[gateway]
listen = tcp:0
store = memory
portal = /portal

[endpoint:local]
type = memory

[api:orders]
path = /orders
endpoint = local
topic = orders
entrypoints = http-post sse websocket
plans = api-key
portal = true

[api:internal]
path = /internal
endpoint = local
topic = internal
entrypoints = http-post
"""


class PortalTests(SynchronousTestCase):
    """
    The portal's configuration and what it serves, through StubTreq on the
    gateway's own resource.
    """

    def setUp(self) -> None:
        from treq.testing import StubTreq
        from twisted.internet.task import Clock

        from evgate.config import parseConfig
        from evgate.service import GatewayService
        self.gateway = GatewayService(parseConfig(PORTAL_INI, "portal.ini"), Clock())
        self.treq = StubTreq(self.gateway.resource)

    def get(self, path: str, method: str = "GET") -> Any:
        """
        Status, headers and body of one request to the data plane.
        """
        results: list = []
        d = self.treq.request(method, "http://gateway" + path)
        d.addCallback(lambda response: self.treq.content(response).addCallback(
            lambda body: results.append((response.code, response.headers, body))))
        self.treq.flush()
        return results[0]

    def test_listsOnlyOptedIn(self) -> None:
        """
        The list has the APIs with portal = true only, without credentials.
        """
        import json
        status, headers, body = self.get("/portal/apis.json")
        self.assertEqual(status, 200)
        self.assertEqual([api["name"] for api in json.loads(body)["apis"]], ["orders"])
        status, _, _ = self.get("/portal/apis/internal.json")
        self.assertEqual(status, 404)
        status, _, _ = self.get("/portal/apis/internal")
        self.assertEqual(status, 404)

    def test_apiDocument(self) -> None:
        """
        An API's document: its AsyncAPI document and where credentials go,
        by name only.
        """
        import json
        status, _, body = self.get("/portal/apis/orders.json")
        self.assertEqual(status, 200)
        document = json.loads(body)
        self.assertEqual(document["auth"]["plans"],
                         [{"plan": "api-key", "header": "X-Api-Key", "query": "api-key",
                           "description": "An API key, issued by the API's operators."}])
        self.assertEqual(document["asyncapi"]["asyncapi"], "3.0.0")
        self.assertTrue(document["websocketPublish"])

    def test_pages(self) -> None:
        """
        The pages carry the strict CSP and name their files by the
        portal's path; other methods are refused; APIs are still served.
        """
        for path in ("/portal", "/portal/", "/portal/apis/orders"):
            status, headers, body = self.get(path)
            self.assertEqual(status, 200, path)
            self.assertIn(b'src="/portal/portal.js"', body)
            self.assertIn(b"script-src 'self'", headers.getRawHeaders(b"content-security-policy")[0])
        status, headers, body = self.get("/portal/portal.js")
        self.assertEqual((status, headers.getRawHeaders(b"content-type")[0]),
                         (200, b"text/javascript; charset=utf-8"))
        self.assertEqual(self.get("/portal/nothing")[0], 404)
        self.assertEqual(self.get("/portal", "POST")[0], 405)
        self.assertEqual(self.get("/nothing")[0], 404)
        self.assertEqual(self.get("/orders", "POST")[0], 401)

    def test_configErrors(self) -> None:
        """
        A portal path colliding with an API's, a bad portal path, or an API
        opting in without a portal: errors naming section and key.
        """
        from evgate.config import ConfigError, parseConfig
        for old, new, section, key in (
                ("portal = /portal", "portal = /orders", "api:orders", "path"),
                ("portal = /portal", "portal = /orders/docs", "api:orders", "path"),
                ("portal = /portal", "portal = /", "gateway", "portal"),
                ("portal = /portal", "", "api:orders", "portal")):
            error = self.assertRaises(ConfigError, parseConfig, PORTAL_INI.replace(old, new, 1), "portal.ini")
            self.assertEqual((error.section, error.key), (section, key), str(error))
            self.assertIn("portal.ini", str(error))
