"""
Tests for the oauth2 plan against a local RFC 7662 introspection endpoint
(a twisted.web resource behind StubTreq), on a Clock.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Dict, List

from treq.testing import StubTreq
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface.verify import verifyObject

from evgate.interfaces import IPlan
from evgate.security.oauth2 import IntrospectionCache

from .test_security_helpers import NOW, URL, PlanTestCase


class IntrospectionServer(Resource):
    """
    An introspection endpoint with a table of tokens; it records what it
    was asked and can hang or fail.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.tokens: Dict[str, Dict[str, Any]] = {
            "good": {"active": True, "sub": "alice", "client_id": "app", "scope": "orders:read orders:write",
                     "exp": int(NOW) + 3600, "tenant": "acme"},
            "short": {"active": True, "sub": "bob", "scope": "orders:read", "exp": int(NOW) + 5},
            "narrow": {"active": True, "sub": "carol", "scope": "profile", "exp": int(NOW) + 3600},
            "client": {"active": True, "client_id": "machine", "scope": "orders:read"},
        }
        self.asked: List[Dict[str, Any]] = []
        self.hang = False
        self.status = 200
        self.hung: List[Any] = []

    def render_POST(self, request: Any) -> Any:
        form = {k.decode(): v[0].decode() for k, v in request.args.items()}
        auth = request.getHeader(b"authorization") or b""
        self.asked.append({"form": form, "auth": auth})
        if self.hang:
            self.hung.append(request)
            return NOT_DONE_YET
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", b"application/json")
        if self.status != 200:
            return b'{"error": "server_error"}'
        return json.dumps(self.tokens.get(form.get("token", ""), {"active": False})).encode()


class IntrospectionTests(PlanTestCase):
    """
    An API with the oauth2 plan requiring the scope orders:read.
    """

    def apiLines(self) -> str:
        secret = self.file("client.secret", b"s3cret:with/odd chars\n")
        return ("plans = oauth2\noauth2.introspection-url = http://idp.test/introspect\n"
                f"oauth2.client-id = evgate\noauth2.client-secret-file = {secret}\n"
                "oauth2.scopes = orders:read\noauth2.timeout = 2\noauth2.cache-ttl = 60\n")

    def setUp(self) -> None:
        super().setUp()
        self.server = IntrospectionServer()
        stub = StubTreq(self.server)
        self.outbound.append(stub)
        self.plan("oauth2").http = stub

    def test_interface(self) -> None:
        """
        The plan provides L{IPlan}.
        """
        self.assertTrue(verifyObject(IPlan, self.plan("oauth2")))

    def test_active(self) -> None:
        """
        An active token with the scope publishes; the gateway asked with
        its client credentials in basic auth and the token in the form.
        """
        self.assertEqual(self.bearer("good").code, 202)
        [asked] = self.server.asked
        self.assertEqual(asked["form"], {"token": "good", "token_type_hint": "access_token"})
        scheme, _, encoded = asked["auth"].partition(b" ")
        self.assertEqual(scheme, b"Basic")
        self.assertEqual(base64.b64decode(encoded), b"evgate:s3cret%3Awith%2Fodd%20chars")

    def test_consumer(self) -> None:
        """
        The consumer is the token's sub (else its client_id), with the
        introspection answer as claims and exp as expiry.
        """
        from twisted.web.test.requesthelper import DummyRequest

        plan = self.plan("oauth2")
        for value, who in (("good", "alice"), ("client", "machine")):
            request = DummyRequest([b""])
            request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer " + value.encode()])
            d = plan.authenticate(request)
            self.flush()
            consumer = self.successResultOf(d)
            self.assertEqual((consumer.id, consumer.plan), (who, "oauth2"))
        self.assertEqual(consumer.expiresAt, None)
        request = DummyRequest([b""])
        request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer good"])
        consumer = self.successResultOf(plan.authenticate(request))
        self.assertEqual(consumer.claims["tenant"], "acme")
        self.assertEqual(consumer.expiresAt, NOW + 3600)

    def test_inactive(self) -> None:
        """
        An inactive (unknown, revoked, expired) token is a 401
        invalid_token.
        """
        response = self.bearer("revoked")
        self.problem(response, 401)
        self.assertIn('error="invalid_token"', self.challenge(response))

    def test_missingScope(self) -> None:
        """
        An active token without the scope is a 403 insufficient_scope that
        names the scope needed.
        """
        response = self.bearer("narrow")
        document = self.problem(response, 403)
        self.assertIn("orders:read", document["detail"])
        challenge = self.challenge(response)
        self.assertIn('error="insufficient_scope"', challenge)
        self.assertIn('scope="orders:read"', challenge)

    def test_missing(self) -> None:
        """
        No token: 401 with a Bearer challenge, and no introspection.
        """
        response = self.call()
        self.problem(response, 401)
        self.assertIn("Bearer", self.challenge(response))
        self.assertEqual(self.server.asked, [])

    def test_queryParameter(self) -> None:
        """
        C{access_token} in the query works too.
        """
        self.assertEqual(self.call(url=URL + "?access_token=good").code, 202)

    def test_slow(self) -> None:
        """
        An endpoint that does not answer within oauth2.timeout gives a 503
        with Retry-After, not a 401 and not a hung request.
        """
        self.server.hang = True
        response = self.bearer("good", advance=2.1)
        self.problem(response, 503)
        self.assertTrue(response.headers.getRawHeaders("retry-after"))

    def test_failing(self) -> None:
        """
        An endpoint answering 500 or garbage gives a 503.
        """
        self.server.status = 500
        self.problem(self.bearer("good"), 503)
        self.server.status = 200
        self.server.tokens["weird"] = ["not", "an", "object"]  # type: ignore[assignment]
        self.problem(self.bearer("weird"), 503)

    def test_cachedUntilExpiry(self) -> None:
        """
        Answers are cached: a token is introspected once until its exp
        (here 5 s away), then again.
        """
        for _ in range(3):
            self.assertEqual(self.bearer("short").code, 202)
        self.assertEqual(len(self.server.asked), 1)
        self.clock.advance(6)
        self.problem(self.bearer("short"), 401)
        self.assertEqual(len(self.server.asked), 2)

    def test_cachedAtMostTtl(self) -> None:
        """
        An active answer is trusted at most oauth2.cache-ttl seconds, so a
        token revoked at the server stops working within that time.
        """
        self.assertEqual(self.bearer("good").code, 202)
        self.server.tokens["good"] = {"active": False}
        self.clock.advance(59)
        self.assertEqual(self.bearer("good").code, 202)
        self.clock.advance(2)
        self.problem(self.bearer("good"), 401)
        self.assertEqual(len(self.server.asked), 2)

    def test_inactiveCachedBriefly(self) -> None:
        """
        An inactive answer is kept a few seconds: a client retrying a dead
        token in a loop does not hammer the server.
        """
        for _ in range(3):
            self.problem(self.bearer("dead"), 401)
        self.assertEqual(len(self.server.asked), 1)
        self.clock.advance(11)
        self.problem(self.bearer("dead"), 401)
        self.assertEqual(len(self.server.asked), 2)

    def test_concurrentShareOneCall(self) -> None:
        """
        Requests with the same token while its introspection is under way
        share that one call.
        """
        self.server.hang = True
        pending = [self.treq.post(URL, data=b"x", headers={"Authorization": "Bearer good"}) for _ in range(3)]
        self.flush()
        self.assertEqual(len(self.server.asked), 1)
        request = self.server.hung[0]
        request.setHeader(b"content-type", b"application/json")
        request.write(json.dumps(self.server.tokens["good"]).encode())
        request.finish()
        self.flush()
        for d in pending:
            self.assertEqual(self.successResultOf(d).code, 202)

    def test_failureNotCached(self) -> None:
        """
        A failed introspection is not remembered: the next request asks
        again.
        """
        self.server.status = 500
        self.problem(self.bearer("good"), 503)
        self.server.status = 200
        self.assertEqual(self.bearer("good").code, 202)


class CacheTests(PlanTestCase):
    """
    L{IntrospectionCache} is bounded in size and time.
    """

    def test_bounded(self) -> None:
        """
        Past its size the least recently used entry goes; entries end at
        their deadline.
        """
        cache = IntrospectionCache(2)
        cache.put(b"a", {"n": 1}, 10)
        cache.put(b"b", {"n": 2}, 10)
        self.assertEqual(cache.get(b"a", 0), {"n": 1})
        cache.put(b"c", {"n": 3}, 10)
        self.assertIsNone(cache.get(b"b", 0))
        self.assertEqual(len(cache), 2)
        self.assertIsNone(cache.get(b"a", 10))
        self.assertEqual(len(cache), 1)
