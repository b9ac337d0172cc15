"""
Integration tests for limits shared through Redis: the real redis-server on
127.0.0.1:6379 (scripts/dev-services up redis), counters shared by two
nodes in this process and by two C{twistd evgate} processes, and the
fall-back to local counters when Redis is down.

These tests fail, never skip, when Redis is not running.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, List

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from evgate.security.limits import Decision, LocalCounters, Policy, RedisCounters

from .helpers import REDIS, GatewayProcess, demoIni, freePort, httpRequest


def runId() -> str:
    """
    A prefix of keys no other run uses.
    """
    return f"evgate-test:{uuid.uuid4().hex[:12]}:"


class SharedCounterTests(TestCase):
    """
    Two L{RedisCounters} (two nodes) against one Redis.
    """

    timeout = 30

    def counters(self, url: str = REDIS, prefix: str = "", timeout: float = 1.0) -> RedisCounters:
        """
        Started counters on C{url}, stopped at the end of the test.
        """
        counters = RedisCounters(url, reactor, LocalCounters(reactor), timeout=timeout,
                                 prefix=prefix or self.prefix)
        counters.startService()
        self.addCleanup(counters.stopService)
        return counters

    def setUp(self) -> None:
        self.prefix = runId()

    @inlineCallbacks
    def test_shared(self) -> Any:
        """
        Requests counted on either node count against one limit, all or
        nothing across policies.
        """
        one, two = self.counters(), self.counters()
        policies = (Policy("rate-limit", 3, 3600), Policy("quota", 100, 86400))
        outcomes: List[bool] = []
        for node in (one, two, one, two, one):
            decision = yield node.take("api|jwt|requests|alice", policies, 1)
            self.assertIsInstance(decision, Decision)
            outcomes.append(decision.allowed)
        self.assertEqual(outcomes, [True, True, True, False, False])
        self.assertEqual(one.fallbacks + two.fallbacks, 0)
        quota = [s for s in decision.states if s.policy.kind == "quota"][0]
        self.assertEqual(quota.used, 3)
        other = yield two.take("api|jwt|requests|bob", policies, 1)
        self.assertTrue(other.allowed)

    @inlineCallbacks
    def test_down(self) -> Any:
        """
        With Redis unreachable the node counts locally, says so once in the
        log, and answers without waiting on Redis again until the retry
        time.
        """
        events: List[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        counters = self.counters(f"redis://127.0.0.1:{freePort()}/0", timeout=0.3)
        policies = (Policy("rate-limit", 2, 3600),)
        started = time.monotonic()
        first = yield counters.take("k", policies, 1)
        self.assertTrue(first.allowed)
        self.assertLess(time.monotonic() - started, 2.0)
        second = counters.take("k", policies, 1)
        third = counters.take("k", policies, 1)
        # Known down: decided at once, on local counters.
        self.assertIsInstance(second, Decision)
        self.assertEqual((second.allowed, third.allowed), (True, False))
        self.assertEqual(counters.fallbacks, 3)
        warnings = [e for e in events if "unavailable" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)
        yield _later(0.05)

    @inlineCallbacks
    def test_noScript(self) -> Any:
        """
        The script is loaded on first use (EVALSHA falls back to EVAL).
        """
        counters = self.counters()
        yield counters.redis.execute_command("SCRIPT", "FLUSH")
        decision = yield counters.take("k", (Policy("rate-limit", 1, 60),), 1)
        self.assertTrue(decision.allowed)
        decision = yield counters.take("k", (Policy("rate-limit", 1, 60),), 1)
        self.assertFalse(decision.allowed)


def _later(seconds: float) -> Deferred:
    d: Deferred = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


class TwoProcessTests(TestCase):
    """
    Two C{twistd evgate} processes sharing limits through Redis.
    """

    timeout = 120

    def test_sharedAcrossProcesses(self) -> None:
        """
        A quota of 6 a day holds across both nodes: 8 requests spread over
        them get 6 answers 202 and 2 answers 429 with Retry-After.
        """
        prefix = runId()
        ini = demoIni(limits_store=REDIS, limits_prefix=prefix, api={"quota": "6/day"})
        nodes = [GatewayProcess(ini, name=f"node{i}") for i in range(2)]
        for node in nodes:
            self.addCleanup(node.stop)
            node.start()
        codes = []
        for i in range(8):
            status, headers, body = httpRequest("POST", nodes[i % 2].url("/demo"), body=b"m")
            codes.append(status)
            if status == 429:
                self.assertTrue(headers.get("retry-after"))
                self.assertEqual(headers.get("ratelimit-remaining"), "0")
        self.assertEqual(codes, [202] * 6 + [429] * 2, "\n".join(n.output() for n in nodes))
        for node in nodes:
            self.assertNotIn("unavailable", node.output())
