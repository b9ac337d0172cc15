"""
Tests for rate limits and quotas with the node's own counters, on a Clock.
"""

from __future__ import annotations

import json
from typing import Any, List

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from evgate.config import ConfigError, parseConfig
from evgate.security.limits import Limits, LocalCounters, MessageMeter, Policy, consumerKey, meterFor, parseLimit

from .helpers import MEMORY_INI
from .test_security_helpers import NOW, PlanTestCase, token
from .test_websocket import WebSocketTestCase

# NOW is 1_800_000_000: 12000 s past midnight UTC.
SECONDS_TO_MIDNIGHT = 86400 - int(NOW) % 86400


class ParseTests(SynchronousTestCase):
    """
    C{COUNT/[MULTIPLE]UNIT}.
    """

    def test_units(self) -> None:
        """
        Every unit, with and without a multiple.
        """
        self.assertEqual(parseLimit("100/s"), Policy("rate-limit", 100, 1))
        self.assertEqual(parseLimit("6_000 / min"), Policy("rate-limit", 6000, 60))
        self.assertEqual(parseLimit("600/10min"), Policy("rate-limit", 600, 600))
        self.assertEqual(parseLimit("5/h", "quota"), Policy("quota", 5, 3600))
        self.assertEqual(parseLimit("100000/day", "quota"), Policy("quota", 100000, 86400))
        self.assertEqual(parseLimit("1/2days").window, 172800)

    def test_mistakes(self) -> None:
        """
        Anything else is a ValueError that says the format.
        """
        for text in ("100", "100/fortnight", "/s", "0/s", "-1/s", "1/0s", "a/s"):
            self.assertRaises(ValueError, parseLimit, text)

    def test_text(self) -> None:
        """
        A policy writes itself back in the configuration's terms.
        """
        self.assertEqual(parseLimit("600/10min").text(), "600/10min")
        self.assertEqual(parseLimit("7/day").text(), "7/day")
        self.assertEqual(parseLimit("100/s").text(), "100/s")


class CounterTests(SynchronousTestCase):
    """
    L{LocalCounters}: fixed windows on the reactor's clock, all or nothing.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.counters = LocalCounters(self.clock)
        self.policies = (Policy("rate-limit", 2, 1), Policy("quota", 3, 86400))

    def test_window(self) -> None:
        """
        Two per second: the third in the same second is refused, the next
        second allows again.
        """
        take = self.counters.take
        self.assertTrue(take("k", self.policies, 1).allowed)
        self.assertTrue(take("k", self.policies, 1).allowed)
        refused = take("k", self.policies, 1)
        self.assertFalse(refused.allowed)
        self.assertEqual(refused.closest().policy.kind, "rate-limit")
        self.assertEqual(refused.retryAfter, 1)
        self.clock.advance(1)
        self.assertTrue(take("k", self.policies, 1).allowed)

    def test_refusedNotCounted(self) -> None:
        """
        A request refused by the rate limit does not eat the quota.
        """
        for _ in range(5):
            self.counters.take("k", self.policies, 1)
        self.clock.advance(1)
        decision = self.counters.take("k", self.policies, 1)
        self.assertTrue(decision.allowed)
        quota = [s for s in decision.states if s.policy.kind == "quota"][0]
        self.assertEqual((quota.used, quota.remaining), (3, 0))
        self.clock.advance(1)
        refused = self.counters.take("k", self.policies, 1)
        self.assertFalse(refused.allowed)
        self.assertEqual(refused.retryAfter, SECONDS_TO_MIDNIGHT - 2)

    def test_keysApart(self) -> None:
        """
        Each key has its own counters.
        """
        self.counters.take("a", self.policies, 2)
        self.assertTrue(self.counters.take("b", self.policies, 2).allowed)
        self.assertFalse(self.counters.take("a", self.policies, 1).allowed)

    def test_need(self) -> None:
        """
        C{need} checks room without counting it.
        """
        self.assertTrue(self.counters.take("k", self.policies, 0, 2).allowed)
        self.assertFalse(self.counters.take("k", self.policies, 0, 3).allowed)
        self.assertEqual(self.counters.counts, {})

    def test_sweep(self) -> None:
        """
        Ended windows are forgotten.
        """
        self.counters.take("k", self.policies, 1)
        self.clock.advance(2)
        self.counters.sweep()
        self.assertEqual(list(self.counters.counts), ["k:quota:86400"])

    def test_headers(self) -> None:
        """
        The headers name the policy closest to running out, and every
        policy.
        """
        decision = self.counters.take("k", self.policies, 1)
        self.assertEqual(dict(decision.headers()), {
            "RateLimit-Limit": "2", "RateLimit-Remaining": "1", "RateLimit-Reset": "1",
            "RateLimit-Policy": "2;w=1, 3;w=86400"})


class MeterTests(SynchronousTestCase):
    """
    L{MessageMeter}: how many messages of a batch a stream may send.
    """

    def test_partial(self) -> None:
        """
        A batch larger than what is left is granted in part, with the time
        until the rest may go; the next window grants again.
        """
        clock = Clock()
        clock.advance(NOW)
        meter = MessageMeter(Limits(clock), "k", (Policy("rate-limit", 5, 1),))
        self.assertEqual(meter.take(3), (3, 0.0))
        self.assertEqual(meter.take(4), (2, 1.0))
        self.assertEqual(meter.take(1), (0, 1.0))
        self.assertEqual(meter.exhaustedFor(), 1.0)
        clock.advance(1)
        self.assertEqual(meter.exhaustedFor(), 0.0)
        self.assertEqual(meter.take(1), (1, 0.0))


class GatewayLimitTests(PlanTestCase):
    """
    A keyless API with rate-limit 3/s and quota 5/day, spoken to through
    the gateway.
    """

    entrypoints = "http-post http-get sse"

    def apiLines(self) -> str:
        return "rate-limit = 3/s\nquota = 5/day\n"

    def test_headers(self) -> None:
        """
        Every answer carries the RateLimit fields.
        """
        response = self.call()
        self.assertEqual(response.code, 202)
        headers = response.headers
        self.assertEqual(headers.getRawHeaders("ratelimit-limit"), ["3"])
        self.assertEqual(headers.getRawHeaders("ratelimit-remaining"), ["2"])
        self.assertEqual(headers.getRawHeaders("ratelimit-reset"), ["1"])
        self.assertEqual(headers.getRawHeaders("ratelimit-policy"), ["3;w=1, 5;w=86400"])

    def test_rateLimit(self) -> None:
        """
        The fourth request in a second is a 429 with Retry-After; the next
        second serves again.
        """
        for _ in range(3):
            self.assertEqual(self.call().code, 202)
        response = self.call()
        document = self.problem(response, 429)
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["1"])
        self.assertEqual(response.headers.getRawHeaders("ratelimit-remaining"), ["0"])
        self.assertEqual(document["retryAfter"], 1)
        self.assertIn("3/s", document["detail"])
        self.clock.advance(1)
        self.assertEqual(self.call().code, 202)

    def test_quota(self) -> None:
        """
        Past the quota, requests are refused until midnight UTC, whatever
        the rate.
        """
        for _ in range(5):
            self.assertEqual(self.call().code, 202)
            self.clock.advance(1)
        response = self.call()
        document = self.problem(response, 429)
        self.assertIn("quota", document["detail"])
        retry = int(response.headers.getRawHeaders("retry-after")[0])
        self.assertEqual(retry, SECONDS_TO_MIDNIGHT - 5)
        self.clock.advance(retry)
        self.assertEqual(self.call().code, 202)

    def test_batchCountsEachRecord(self) -> None:
        """
        A batch POST counts one request per record: a batch with more
        records than the rate leaves is refused whole, and one that fits
        uses the room up.
        """
        ndjson = {"Content-Type": "application/x-ndjson"}
        document = self.problem(self.call(data=b"1\n2\n3\n4\n", headers=ndjson), 429)
        self.assertIn("3/s", document["detail"])
        log = self.gateway.connectors["local"].topicLog("demo")
        self.assertEqual(log.nextOffset, 0, "nothing of a refused batch is published")
        self.clock.advance(1)
        response = self.call(data=b"1\n2\n3\n", headers=ndjson)
        self.assertEqual(response.code, 202, response.body)
        self.assertEqual(response.headers.getRawHeaders("ratelimit-remaining"), ["0"])
        self.assertEqual(log.nextOffset, 3)
        self.problem(self.call(), 429)

    def test_getCounts(self) -> None:
        """
        GET (long poll) counts as a request too.
        """
        for _ in range(3):
            self.assertEqual(self.call("GET").code, 200)
        self.problem(self.call("GET"), 429)

    def test_streamOpeningRefusedWhenExhausted(self) -> None:
        """
        A stream counts messages, not its opening; it cannot open while its
        consumer has no message left.
        """
        for _ in range(3):
            self.call()
        sse = {"Accept": "text/event-stream"}
        d = self.treq.get(self.apiUrl(), headers=sse)
        self.flush()
        self.assertEqual(self.successResultOf(d).code, 200)
        meter = meterFor(_Call(self.api, _anonymous()))
        self.assertEqual(meter.take(10), (3, 1.0))
        response = self.call("GET", headers=sse)
        self.problem(response, 429)

    def apiUrl(self) -> str:
        """
        The demo API's URL.
        """
        return "http://gateway.test/demo"


class _Call:
    def __init__(self, api: Any, consumer: Any) -> None:
        self.api = api
        self.consumer = consumer


def _anonymous() -> Any:
    from evgate.security.keyless import ANONYMOUS

    return ANONYMOUS


class PerPlanTests(PlanTestCase):
    """
    Limits per plan and per consumer.
    """

    secret = b"k" * 32

    def apiLines(self) -> str:
        path = self.file("secret", self.secret)
        return (f"plans = jwt keyless\njwt.secret-file = {path}\nrate-limit = 2/s\n"
                "keyless.rate-limit = 1/min\n")

    def test_consumersApart(self) -> None:
        """
        Each token subject has its own counters, and the plan's own limit
        applies to keyless callers.
        """
        alice = token(self.secret, "HS256", sub="alice")
        bob = token(self.secret, "HS256", sub="bob")
        for who in (alice, alice, bob, bob):
            self.assertEqual(self.bearer(who).code, 202)
        self.problem(self.bearer(alice), 429)
        self.assertEqual(self.call().code, 202)
        response = self.call()
        self.problem(response, 429)
        self.assertEqual(response.headers.getRawHeaders("ratelimit-policy"), ["1;w=60"])

    def test_unauthenticatedNotCounted(self) -> None:
        """
        Refused credentials are a 401 and count against nobody.
        """
        for _ in range(5):
            self.problem(self.bearer(token(b"x" * 32, "HS256")), 401)
        self.assertEqual(self.bearer(token(self.secret, "HS256")).code, 202)

    def test_key(self) -> None:
        """
        Counter keys hold API, plan, unit and consumer.
        """
        self.assertEqual(consumerKey(self.api, _anonymous(), "requests"), "demo|keyless|requests|anonymous")


class ConfigTests(SynchronousTestCase):
    """
    Mistakes in the limit keys stop start-up with file, section and key.
    """

    def parse(self, api: str = "", gateway: str = "") -> Any:
        """
        Parse the memory INI with lines added to [api:demo] and [gateway].
        """
        text = MEMORY_INI.format(retention=10, entrypoints="http-post", start="latest") + api
        text = text.replace("listen = tcp:0\n", "listen = tcp:0\n" + gateway)
        return parseConfig(text, "test.ini")

    def test_mistakes(self) -> None:
        """
        A bad limit, a plan's limit on an API without that plan, a bad
        limits store.
        """
        cases = [
            ({"api": "rate-limit = lots\n"}, "rate-limit"),
            ({"api": "quota = 5/fortnight\n"}, "quota"),
            ({"api": "jwt.rate-limit = 5/s\n"}, "jwt.rate-limit"),
            ({"gateway": "limits-store = memcached://x\n"}, "limits-store"),
            ({"gateway": "limits-store = redis://127.0.0.1:6379/zero\n"}, "limits-store"),
        ]
        for kwargs, key in cases:
            e = self.assertRaises(ConfigError, self.parse, **kwargs)
            self.assertEqual(e.key, key, str(e))

    def test_policies(self) -> None:
        """
        Each plan gets its own policies, else the API's.
        """
        config = self.parse(api="plans = keyless\nrate-limit = 5/s\nkeyless.quota = 9/day\n",
                            gateway="limits-store = redis://127.0.0.1:6379/2\n")
        self.assertEqual(config.apis["demo"].options["limits"],
                         {"keyless": (Policy("rate-limit", 5, 1), Policy("quota", 9, 86400))})
        self.assertEqual(config.gateway.options["limitsStore"], "redis://127.0.0.1:6379/2")

    def test_unlimited(self) -> None:
        """
        Without limit keys there is nothing to count.
        """
        self.assertEqual(self.parse().apis["demo"].options["limits"], {})
        self.assertEqual(json.dumps(self.parse().gateway.options["limitsStore"]), "null")


class StreamLimitTests(PlanTestCase):
    """
    Streams count messages: over the rate limit a stream is held back
    until the next window, and a used-up quota ends it with an error event.
    """

    entrypoints = "http-post sse"

    def apiLines(self) -> str:
        return "rate-limit = 2/s\nquota = 5/day\n"

    def openStream(self) -> Any:
        """
        Open an SSE stream; its received chunks and the Deferred of its end.
        """
        from treq import collect

        d = self.treq.get("http://gateway.test/demo", headers={"Accept": "text/event-stream"})
        self.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        chunks: List[bytes] = []
        return chunks, collect(response, chunks.append)

    def publish(self, count: int) -> None:
        """
        Publish C{count} messages straight to the endpoint (not counted as
        requests).
        """
        from evgate.message import Draft

        for i in range(count):
            self.api.connector.publish("demo", Draft(content=b"m%d" % i), 5)
        self.flush()

    def test_throttled(self) -> None:
        """
        Three messages at 2/s: two now, the third a second later; the
        stream stays open.
        """
        chunks, done = self.openStream()
        self.publish(3)
        self.assertEqual(b"".join(chunks).count(b"event: message"), 2)
        self.clock.advance(1)
        self.flush()
        self.assertEqual(b"".join(chunks).count(b"event: message"), 3)
        self.assertNoResult(done)

    def test_quotaEnds(self) -> None:
        """
        Past the quota of 5 the stream ends with an error event that says
        when to come back; reconnecting is refused with a 429 meanwhile.
        """
        chunks, done = self.openStream()
        self.publish(7)
        for _ in range(3):
            self.clock.advance(1)
            self.flush()
        self.successResultOf(done)
        body = b"".join(chunks)
        self.assertEqual(body.count(b"event: message"), 5)
        self.assertIn(b"event: error", body)
        self.assertIn(b"rate-limited", body)
        self.problem(self.call("GET", headers={"Accept": "text/event-stream"}), 429)


class WebSocketLimitTests(WebSocketTestCase):
    """
    A WebSocket over its message budget: held back by the rate limit,
    closed with 1013 when the quota is used up.
    """

    extra = "rate-limit = 2/s\nquota = 3/day\n"

    def test_throttledThenQuota(self) -> None:
        """
        Four messages at 2/s with a quota of 3: two now, the third a second
        later, then the socket closes with 1013 and a reason that says
        when to come back.
        """
        from .wire import OP_TEXT

        connection = self.openSocket()
        self.publish(b"1", b"2", b"3", b"4")
        texts = [p for op, p in self.frames(connection) if op == OP_TEXT]
        self.assertEqual(texts, [b"1", b"2"])
        self.clock.advance(1)
        self.turn()
        texts = [p for op, p in self.frames(connection) if op == OP_TEXT]
        self.assertEqual(texts, [b"1", b"2", b"3"])
        code, reason = self.closed(connection)
        self.assertEqual(code, 1013)
        self.assertIn("quota", reason)
