"""
L{RedisCounters} at its library boundary: the real txredisapi client
against a scripted Redis on 127.0.0.1 (this process's reactor) that refuses
AUTH until it is given the password it expects, as a Redis whose ACL
changed, or a gateway whose password file was wrong, does.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, List, Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from evgate.security.limits import Decision, LocalCounters, Policy, RedisCounters


class ScriptedRedis(Protocol):
    """
    Enough of RESP for txredisapi and the counters' script: AUTH checks
    the password, EVAL and EVALSHA answer "allowed, used once" for every
    key, anything else is C{+OK}.
    """

    def __init__(self, server: "ScriptedRedisServer") -> None:
        self.server = server
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            command = self._parse()
            if command is None:
                return
            self.transport.write(self.server.answer(command))

    def _parse(self) -> Optional[List[bytes]]:
        if not self.buffer.startswith(b"*") or b"\r\n" not in self.buffer:
            return None
        header, rest = self.buffer.split(b"\r\n", 1)
        parts: List[bytes] = []
        for _ in range(int(header[1:])):
            if b"\r\n" not in rest:
                return None
            size, body = rest.split(b"\r\n", 1)
            length = int(size[1:])
            if len(body) < length + 2:
                return None
            parts.append(body[:length])
            rest = body[length + 2:]
        self.buffer = rest
        return parts


class ScriptedRedisServer(Factory):
    """
    The listening side: C{password} is what AUTH must be given; C{auths}
    counts the AUTH commands (one per connection).
    """

    def __init__(self, password: str) -> None:
        self.password = password
        self.auths = 0
        self.evals = 0

    def buildProtocol(self, addr: Any) -> ScriptedRedis:
        return ScriptedRedis(self)

    def answer(self, command: List[bytes]) -> bytes:
        name = command[0].upper()
        if name == b"AUTH":
            self.auths += 1
            if command[-1].decode() == self.password:
                return b"+OK\r\n"
            return b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
        if name in (b"EVAL", b"EVALSHA"):
            self.evals += 1
            keys = int(command[2])
            return b"*%d\r\n:1\r\n" % (keys + 1) + b":1\r\n" * keys
        return b"+OK\r\n"


def _later(seconds: float) -> Deferred:
    d: Deferred = Deferred()
    reactor.callLater(seconds, d.callback, None)  # type: ignore[attr-defined]
    return d


class RefusedRedisTests(TestCase):
    """
    A Redis that refuses the gateway's password is tried again, with the
    password file read again each time.
    """

    timeout = 20

    def setUp(self) -> None:
        self.server = ScriptedRedisServer("right")
        self.port = reactor.listenTCP(0, self.server, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(self.port.stopListening)
        handle, self.passwordFile = tempfile.mkstemp(prefix="evgate-test-redis-")
        os.close(handle)
        self.addCleanup(os.remove, self.passwordFile)
        self.events: List[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def writePassword(self, password: str) -> None:
        with open(self.passwordFile, "w", encoding="utf-8") as f:
            f.write(password + "\n")

    def counters(self) -> RedisCounters:
        """
        Started counters on the scripted server, retrying a refusal every
        0.2 s.
        """
        counters = RedisCounters(f"redis://evgate@127.0.0.1:{self.port.getHost().port}/0", reactor,
                                 LocalCounters(reactor), timeout=1.0, prefix="t:",
                                 password="wrong", passwordFile=self.passwordFile)
        counters.refusedRetry = 0.2
        counters.startService()
        self.addCleanup(counters.stopService)
        return counters

    @inlineCallbacks
    def waitForRedis(self, counters: RedisCounters, seconds: float) -> Any:
        """
        Take until a decision came from Redis (no fall-back).
        """
        policies = (Policy("rate-limit", 100, 60),)
        for _ in range(int(seconds / 0.1)):
            before = counters.fallbacks
            decision = yield counters.take("k", policies, 1)
            self.assertIsInstance(decision, Decision)
            if counters.fallbacks == before:
                return decision
            yield _later(0.1)
        self.fail(f"Redis never answered: {counters.problem}")

    @inlineCallbacks
    def test_retriedUntilAccepted(self) -> Any:
        """
        After AUTH was refused the counters connect again every
        C{refusedRetry} seconds (txredisapi alone gives up), log the
        refusal once, count on the node meanwhile, and use Redis once the
        password file holds the right password, without a restart.
        """
        self.writePassword("wrong")
        counters = self.counters()
        yield _later(1.0)
        self.assertGreaterEqual(self.server.auths, 3)
        self.assertIn("authentication failed", counters.problem or "")
        decision = yield counters.take("k", (Policy("rate-limit", 100, 60),), 1)
        self.assertTrue(decision.allowed)
        self.assertGreater(counters.fallbacks, 0)
        self.assertEqual(self.server.evals, 0)
        refusals = [e for e in self.events if "authentication failed" in str(e.get("problem", ""))]
        self.assertEqual(len(refusals), 1)
        self.writePassword("right")
        yield self.waitForRedis(counters, 10)
        self.assertIsNone(counters.problem)
        self.assertGreater(self.server.evals, 0)
        auths = self.server.auths
        yield _later(0.6)
        # Accepted: no new connections.
        self.assertEqual(self.server.auths, auths)

    @inlineCallbacks
    def test_stopEndsRetries(self) -> Any:
        """
        Stopping the counters stops the attempts.
        """
        self.writePassword("wrong")
        counters = self.counters()
        yield _later(0.5)
        yield counters.stopService()
        auths = self.server.auths
        yield _later(0.6)
        self.assertEqual(self.server.auths, auths)
