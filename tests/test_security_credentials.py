"""
Credentials that are present are never ignored: a request whose
credentials are invalid, not taken by the API, or ambiguous (two
different ones) is a 401 on every path, keyless APIs included
(docs/security.md, "How a plan is chosen").
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from evgate.security.apikey import KeyRegistry

from .test_security_apikey import URL, keyGateway
from .test_security_helpers import AUDIENCE, ISSUER, NOW, PlanTestCase, publicPem, rsaKey, token


class KeylessCredentialTests(PlanTestCase):
    """
    A keyless API serves requests without credentials only.
    """

    def test_noCredentials(self) -> None:
        """
        A request without credentials is served as anonymous.
        """
        self.assertEqual(self.call().code, 202)

    def test_apiKeyHeader(self) -> None:
        """
        A key in X-Api-Key on a keyless API is a 401, not anonymous.
        """
        self.problem(self.call(headers={"X-Api-Key": "evg_garbage"}), 401)

    def test_bearer(self) -> None:
        """
        A bearer token on a keyless API is a 401.
        """
        self.problem(self.bearer("garbage"), 401)

    def test_otherScheme(self) -> None:
        """
        An Authorization header of any scheme is a credential too.
        """
        self.problem(self.call(headers={"Authorization": "Basic dXNlcjpwYXNz"}), 401)

    def test_queryParameters(self) -> None:
        """
        C{access_token} and C{api-key} in the query are credentials, on
        every path (GET as well as POST).
        """
        for query in ("access_token=x", "api-key=x"):
            self.problem(self.call(url=f"{URL}?{query}"), 401)
            self.problem(self.call("GET", url=f"{URL}?{query}&timeout=0"), 401)

    def test_nothingPublished(self) -> None:
        """
        A refused request publishes nothing.
        """
        self.call(headers={"X-Api-Key": "evg_garbage"})
        self.assertEqual(self.gateway.connectors["local"].topicLog("demo").nextOffset, 0)


class KeylessWithKeysTests(SynchronousTestCase):
    """
    An API with keyless and api-key: credentials that api-key refuses, or
    that neither plan takes, never fall back to keyless.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.gateway = keyGateway(self.clock, "keyless api-key")
        self.registry: KeyRegistry = self.gateway.apiKeys
        self.registry.startService()
        self.addCleanup(self.registry.stopService)
        self.treq = StubTreq(self.gateway.resource)

    def call(self, headers: Optional[Dict[str, str]] = None, url: str = URL) -> Any:
        """
        POST and return the response.
        """
        d = self.treq.post(url, data=b"x", headers=headers or {})
        for _ in range(3):
            self.clock.advance(0)
            self.treq.flush()
        return self.successResultOf(d)

    def key(self) -> str:
        """
        A key issued for the demo API.
        """
        return self.successResultOf(self.registry.issue("demo", "ci", None))[1]  # type: ignore[no-any-return]

    def test_anonymous(self) -> None:
        """
        No credentials: keyless serves.
        """
        self.assertEqual(self.call().code, 202)

    def test_badKey(self) -> None:
        """
        A key the gateway did not issue is a 401.
        """
        self.assertEqual(self.call({"X-Api-Key": "evg_garbage"}).code, 401)

    def test_foreignCredentials(self) -> None:
        """
        A bearer token, which neither plan takes, is a 401.
        """
        self.assertEqual(self.call({"Authorization": "Bearer abc"}).code, 401)

    def test_headerAndBadQuery(self) -> None:
        """
        A valid key in the header and another value in C{?api-key=} is
        ambiguous: a 401.
        """
        self.assertEqual(self.call({"X-Api-Key": self.key()}, url=URL + "?api-key=evg_other").code, 401)

    def test_notMessageHeaders(self) -> None:
        """
        The key a request authenticates with is not a message header.
        """
        self.assertEqual(self.call({"X-Api-Key": self.key(), "X-Message-Header-Tenant": "acme"}).code, 202)
        stored = list(self.gateway.connectors["local"].topicLog("demo").messages)
        self.assertEqual(dict(stored[0].headers), {"tenant": "acme"})

    def test_headerAndSameQuery(self) -> None:
        """
        The same key in the header and the query is one credential.
        """
        key = self.key()
        self.assertEqual(self.call({"X-Api-Key": key}, url=URL + "?api-key=" + key).code, 202)


class BearerAmbiguityTests(PlanTestCase):
    """
    Two different bearer tokens in one request are refused.
    """

    def apiLines(self) -> str:
        pem = self.file("issuer.pem", publicPem(rsaKey()))
        return f"plans = jwt\njwt.public-key-file = {pem}\njwt.issuer = {ISSUER}\njwt.audience = {AUDIENCE}\n"

    def test_headerAndQuery(self) -> None:
        """
        A valid token in the header and another in C{access_token} is a
        401; the same token in both is served.
        """
        good = token()
        self.problem(self.bearer(good, url=f"{URL}?access_token=other"), 401)
        self.assertEqual(self.bearer(good, url=f"{URL}?access_token={good}").code, 202)
