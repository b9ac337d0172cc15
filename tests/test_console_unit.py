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
