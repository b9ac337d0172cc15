"""
Tests for the jwt plan, with tokens made by PyJWT's C{encode} (or by hand
for what PyJWT refuses to make), on a Clock and StubTreq.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List

import jwt as pyjwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from treq.testing import StubTreq
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface.verify import verifyObject

from evgate.config import ConfigError, parseConfig
from evgate.gateway import Consumer
from evgate.interfaces import IPlan
from evgate.security.jwt import algorithmsForKey, claimHolds, parseJwks

from .helpers import MEMORY_INI
from .test_security_helpers import (
    AUDIENCE,
    ISSUER,
    NOW,
    URL,
    PlanTestCase,
    b64,
    claims,
    ecKey,
    handMade,
    publicPem,
    rsaKey,
    token,
)


class PublicKeyTests(PlanTestCase):
    """
    An API whose tokens are checked with an RSA public key file.
    """

    extraLines = ""

    def apiLines(self) -> str:
        pem = self.file("issuer.pem", publicPem(rsaKey()))
        return (f"plans = jwt\njwt.public-key-file = {pem}\njwt.issuer = {ISSUER}\n"
                f"jwt.audience = {AUDIENCE}\n" + self.extraLines)

    def test_interface(self) -> None:
        """
        The plan provides L{IPlan}.
        """
        self.assertTrue(verifyObject(IPlan, self.plan("jwt")))

    def test_valid(self) -> None:
        """
        A token signed by the issuer's key, for this audience, in its
        validity period, publishes.
        """
        self.assertEqual(self.bearer(token()).code, 202)

    def test_consumer(self) -> None:
        """
        The consumer is the token's subject, with its claims and its expiry
        (plus the leeway) for the streams to close at.
        """
        from twisted.web.test.requesthelper import DummyRequest

        request = DummyRequest([b""])
        request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer " + token().encode()])
        consumer = self.successResultOf(self.plan("jwt").authenticate(request))
        self.assertIsInstance(consumer, Consumer)
        self.assertEqual((consumer.id, consumer.plan), ("alice", "jwt"))
        self.assertEqual(consumer.claims["tenant"], "acme")
        self.assertEqual(consumer.expiresAt, NOW + 3600 + 30)

    def test_queryParameter(self) -> None:
        """
        C{access_token} in the query works too (EventSource and browser
        WebSockets cannot set headers).
        """
        response = self.call(url=URL + "?access_token=" + token())
        self.assertEqual(response.code, 202)

    def test_missing(self) -> None:
        """
        No credentials on an API without keyless: 401 with a Bearer
        challenge.
        """
        response = self.call()
        self.problem(response, 401)
        self.assertEqual(self.challenge(response), 'Bearer realm="demo"')

    def test_otherScheme(self) -> None:
        """
        An C{Authorization} header of another scheme is not a bearer token:
        still no credentials, 401.
        """
        response = self.call(headers={"Authorization": "Basic YWxpY2U6c2VjcmV0"})
        self.problem(response, 401)

    def test_expired(self) -> None:
        """
        A token past its exp (and the leeway) is a 401 invalid_token.
        """
        response = self.bearer(token(exp=int(NOW) - 31))
        document = self.problem(response, 401)
        self.assertIn("expired", document["detail"])
        self.assertIn('error="invalid_token"', self.challenge(response))

    def test_expiredWithinLeeway(self) -> None:
        """
        A token that expired less than the leeway ago still passes (clock
        skew between issuer and gateway).
        """
        self.assertEqual(self.bearer(token(exp=int(NOW) - 20)).code, 202)

    def test_notYetValid(self) -> None:
        """
        A token whose nbf is beyond the leeway is a 401.
        """
        document = self.problem(self.bearer(token(nbf=int(NOW) + 120)), 401)
        self.assertIn("not valid before", document["detail"])

    def test_noExpiry(self) -> None:
        """
        A token without exp is refused: it would never expire.
        """
        self.problem(self.bearer(token(exp=None)), 401)

    def test_wrongIssuer(self) -> None:
        """
        A token of another issuer is a 401.
        """
        document = self.problem(self.bearer(token(iss="https://evil.test/")), 401)
        self.assertIn("issuer", document["detail"])

    def test_wrongAudience(self) -> None:
        """
        A token for another audience is a 401.
        """
        document = self.problem(self.bearer(token(aud="another-api")), 401)
        self.assertIn("audience", document["detail"])

    def test_tampered(self) -> None:
        """
        Changing one claim of a signed token breaks its signature: 401.
        """
        header, payload, signature = token().split(".")
        forged = b64(json.dumps(claims(sub="mallory")).encode())
        response = self.bearer(f"{header}.{forged}.{signature}")
        self.problem(response, 401)

    def test_otherKey(self) -> None:
        """
        A token signed by another RSA key is a 401.
        """
        self.problem(self.bearer(token(rsaKey("stranger"))), 401)

    def test_algNone(self) -> None:
        """
        An unsigned token (C{alg: none}) is refused.
        """
        for alg in ("none", "None", "NONE"):
            response = self.bearer(handMade({"alg": alg, "typ": "JWT"}, claims()))
            self.problem(response, 401)

    def test_algorithmConfusion(self) -> None:
        """
        HS256 signed with the issuer's RSA public key (which is public) is
        refused: the key's type fixes the algorithms, not the token.
        """
        for alg in ("HS256", "HS384", "HS512"):
            forged = handMade({"alg": alg, "typ": "JWT"}, claims(), secret=publicPem(rsaKey()))
            document = self.problem(self.bearer(forged), 401)
            self.assertIn("not accepted", document["detail"])

    def test_garbage(self) -> None:
        """
        A bearer token that is not a JWT at all is a 401, never a 500.
        """
        for value in ("abc", "a.b.c", "eyJhbGciOiJSUzI1NiJ9.e30.", "x" * 15000):
            self.problem(self.bearer(value), 401)

    def test_psAlgorithm(self) -> None:
        """
        The RSA key verifies PS256 too.
        """
        self.assertEqual(self.bearer(token(algorithm="PS256")).code, 202)


class RequiredClaimsTests(PlanTestCase):
    """
    C{jwt.required-claims} and C{jwt.claims.<name>}: a valid token that
    lacks them is a 403.
    """

    def apiLines(self) -> str:
        pem = self.file("issuer.pem", publicPem(rsaKey()))
        return (f"plans = jwt\njwt.public-key-file = {pem}\njwt.issuer = {ISSUER}\n"
                f"jwt.audience = {AUDIENCE}\njwt.required-claims = tenant\n"
                "jwt.claims.scope = orders:write\njwt.claims.roles = publisher\n")

    def test_all(self) -> None:
        """
        A token with every required claim and value passes; scope and roles
        may hold more than the value.
        """
        response = self.bearer(token(scope="orders:read orders:write", roles=["reader", "publisher"]))
        self.assertEqual(response.code, 202)

    def test_missingClaim(self) -> None:
        """
        A token without a required claim is a 403 with insufficient_scope.
        """
        response = self.bearer(token(tenant=None, scope="orders:write", roles=["publisher"]))
        document = self.problem(response, 403)
        self.assertIn("tenant", document["detail"])
        self.assertIn('error="insufficient_scope"', self.challenge(response))

    def test_wrongValue(self) -> None:
        """
        A claim without the wanted value is a 403.
        """
        self.problem(self.bearer(token(scope="orders:read", roles=["publisher"])), 403)
        self.problem(self.bearer(token(scope="orders:write", roles="reader")), 403)

    def test_claimHolds(self) -> None:
        """
        L{claimHolds}: equal, a word of a string, a member of a list.
        """
        self.assertTrue(claimHolds("a b", "b"))
        self.assertTrue(claimHolds(["a", "b"], "a"))
        self.assertTrue(claimHolds(True, "true"))
        self.assertTrue(claimHolds(3, "3"))
        self.assertFalse(claimHolds(None, "a"))
        self.assertFalse(claimHolds({"a": 1}, "a"))
        self.assertFalse(claimHolds("ab", "a"))


class SecretTests(PlanTestCase):
    """
    An API whose tokens are HMAC-signed with a shared secret, next to
    keyless.
    """

    secret = b"s" * 32 + b"0123456789abcdef0123456789abcdef"

    def apiLines(self) -> str:
        path = self.file("secret", self.secret + b"\n")
        return f"plans = jwt keyless\njwt.secret-file = {path}\n"

    def test_hs256(self) -> None:
        """
        HS256, HS384 and HS512 with the secret pass.
        """
        for alg in ("HS256", "HS384", "HS512"):
            self.assertEqual(self.bearer(token(self.secret, alg)).code, 202)

    def test_shortSecretOnlyHs256(self) -> None:
        """
        A 32-byte secret verifies HS256 only: HS384 and HS512 need longer
        keys (RFC 7518, 3.2).
        """
        path = self.file("short", b"k" * 32)
        config = parseConfig(MEMORY_INI.format(retention=10, entrypoints="http-post", start="latest")
                             + f"plans = jwt\njwt.secret-file = {path}\n", "test.ini")
        self.assertEqual(config.apis["demo"].options["jwt"]["algorithms"], ("HS256",))

    def test_rsaRefused(self) -> None:
        """
        An RS256 token is refused by an API that has a secret.
        """
        self.problem(self.bearer(token()), 401)

    def test_invalidNeverFallsBack(self) -> None:
        """
        Credentials present but invalid are a 401, never keyless.
        """
        self.problem(self.bearer(token(b"x" * 40, "HS256")), 401)
        self.problem(self.bearer(token(self.secret, "HS256", exp=int(NOW) - 100)), 401)

    def test_noCredentialsIsKeyless(self) -> None:
        """
        Without credentials the keyless plan serves.
        """
        self.assertEqual(self.call().code, 202)


class EllipticCurveTests(PlanTestCase):
    """
    An API whose tokens are checked with a P-256 key.
    """

    def apiLines(self) -> str:
        pem = self.file("ec.pem", publicPem(ecKey()))
        return f"plans = jwt\njwt.public-key-file = {pem}\njwt.require-expiry = false\n"

    def test_es256(self) -> None:
        """
        ES256 passes; without jwt.audience an aud claim is not checked; with
        require-expiry off a token without exp passes.
        """
        self.assertEqual(self.bearer(token(ecKey(), "ES256")).code, 202)
        self.assertEqual(self.bearer(token(ecKey(), "ES256", exp=None)).code, 202)

    def test_otherCurveAlgorithm(self) -> None:
        """
        ES384 cannot be verified by a P-256 key: refused before any check.
        """
        self.problem(self.bearer(token(ec.generate_private_key(ec.SECP384R1()), "ES384")), 401)


class JwksServer(Resource):
    """
    A JWKS document that the test changes between requests, and can make
    fail or hang.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.keys: List[Dict[str, Any]] = []
        self.requests = 0
        self.status = 200
        self.hang = False

    def publish(self, *named: Any) -> None:
        """
        Publish the public halves of C{(kid, private key)} pairs.
        """
        self.keys = []
        for kid, key in named:
            algorithm = pyjwt.algorithms.ECAlgorithm if isinstance(key, ec.EllipticCurvePrivateKey) \
                else pyjwt.algorithms.RSAAlgorithm
            jwk = json.loads(algorithm.to_jwk(key.public_key()))
            jwk["kid"] = kid
            self.keys.append(jwk)

    def render_GET(self, request: Any) -> Any:
        self.requests += 1
        if self.hang:
            return NOT_DONE_YET
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"keys": self.keys}).encode()


class JwksTests(PlanTestCase):
    """
    An API whose keys come from a JWKS URL (a twisted.web resource behind
    StubTreq), with key rotation.
    """

    def apiLines(self) -> str:
        return ("plans = jwt\njwt.jwks-url = http://idp.test/jwks.json\n"
                f"jwt.issuer = {ISSUER}\njwt.audience = {AUDIENCE}\njwt.jwks-min-refresh = 10\n")

    def setUp(self) -> None:
        super().setUp()
        self.jwks = JwksServer()
        self.jwks.publish(("k1", rsaKey()))
        stub = StubTreq(self.jwks)
        self.outbound.append(stub)
        self.plan("jwt").keys.http = stub

    def signed(self, kid: str, key: Any, algorithm: str = "RS256", **overrides: Any) -> str:
        """
        A token signed with C{key}, naming C{kid}.
        """
        return token(key, algorithm, headers={"kid": kid}, **overrides)

    def test_valid(self) -> None:
        """
        A token whose kid is in the set passes; the set is fetched once and
        cached.
        """
        self.assertEqual(self.bearer(self.signed("k1", rsaKey())).code, 202)
        self.assertEqual(self.bearer(self.signed("k1", rsaKey())).code, 202)
        self.assertEqual(self.jwks.requests, 1)

    def test_rotation(self) -> None:
        """
        When the issuer rotates to a new key, the first token naming it
        refreshes the set; the old key keeps working while it is published.
        """
        self.assertEqual(self.bearer(self.signed("k1", rsaKey())).code, 202)
        self.clock.advance(11)
        self.jwks.publish(("k1", rsaKey()), ("k2", rsaKey("rotated")))
        self.assertEqual(self.bearer(self.signed("k2", rsaKey("rotated"))).code, 202)
        self.assertEqual(self.bearer(self.signed("k1", rsaKey())).code, 202)
        self.assertEqual(self.jwks.requests, 2)

    def test_unknownKidRateLimited(self) -> None:
        """
        Unknown kids refresh the set at most once per jwt.jwks-min-refresh:
        a flood of made-up kids is a flood of 401s, not of fetches.
        """
        self.bearer(self.signed("k1", rsaKey()))
        self.clock.advance(11)
        for i in range(5):
            self.problem(self.bearer(self.signed(f"made-up-{i}", rsaKey("stranger"))), 401)
        self.assertEqual(self.jwks.requests, 2)
        self.clock.advance(11)
        self.problem(self.bearer(self.signed("made-up", rsaKey("stranger"))), 401)
        self.assertEqual(self.jwks.requests, 3)

    def test_keyOfAnotherKid(self) -> None:
        """
        A token naming k1 but signed by another key is a 401.
        """
        self.problem(self.bearer(self.signed("k1", rsaKey("stranger"))), 401)

    def test_ecKeyInSet(self) -> None:
        """
        EC keys in the set verify ES256 tokens; the kid's key type decides
        the algorithms (an RS256 token naming an EC kid is refused).
        """
        self.jwks.publish(("e1", ecKey()))
        self.assertEqual(self.bearer(self.signed("e1", ecKey(), "ES256")).code, 202)
        self.problem(self.bearer(self.signed("e1", rsaKey())), 401)

    def test_unreachable(self) -> None:
        """
        With no key fetched yet and a failing JWKS endpoint the answer is
        503 with Retry-After: the token may be fine.
        """
        self.jwks.status = 500
        response = self.bearer(self.signed("k1", rsaKey()))
        self.problem(response, 503)
        self.assertTrue(response.headers.getRawHeaders("retry-after"))
        self.flushLoggedErrors()

    def test_hangingTimesOut(self) -> None:
        """
        A JWKS endpoint that never answers gives a 503 after
        jwt.jwks-timeout, not a hung request.
        """
        self.jwks.hang = True
        response = self.bearer(self.signed("k1", rsaKey()), advance=5.1)
        self.problem(response, 503)

    def test_staleSetServesWhileRefreshing(self) -> None:
        """
        Past jwt.jwks-max-age a known key still serves at once while the
        set is fetched again behind the request; a failing refetch keeps
        the old keys.
        """
        self.assertEqual(self.bearer(self.signed("k1", rsaKey())).code, 202)
        self.clock.advance(301)
        self.jwks.status = 503
        self.assertEqual(self.bearer(self.signed("k1", rsaKey())).code, 202)
        self.assertEqual(self.jwks.requests, 2)
        self.assertEqual(self.bearer(self.signed("k1", rsaKey())).code, 202)

    def test_parseJwks(self) -> None:
        """
        Symmetric and encryption keys, and keys whose alg their type cannot
        do, are left out of a set.
        """
        rsaJwk = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(rsaKey().public_key()))
        keys = parseJwks({"keys": [
            {"kty": "oct", "k": b64(b"secret" * 8), "kid": "sym"},
            dict(rsaJwk, kid="enc", use="enc"),
            dict(rsaJwk, kid="confused", alg="HS256"),
            dict(rsaJwk, kid="ps", alg="PS256"),
            dict(rsaJwk, kid="any"),
        ]})
        self.assertEqual(sorted(k for k in keys if k), ["any", "ps"])
        self.assertEqual(keys["ps"][1], ("PS256",))
        self.assertIn("RS256", keys["any"][1])


class BothBearerPlansTests(PlanTestCase):
    """
    An API with jwt and oauth2: JWT-shaped tokens go to jwt, others to
    oauth2, whatever the order.
    """

    def apiLines(self) -> str:
        pem = self.file("issuer.pem", publicPem(rsaKey()))
        secret = self.file("client.secret", b"s3cret")
        return (f"plans = oauth2 jwt\njwt.public-key-file = {pem}\n"
                "oauth2.introspection-url = http://idp.test/introspect\noauth2.client-id = evgate\n"
                f"oauth2.client-secret-file = {secret}\n")

    def test_choice(self) -> None:
        """
        present() splits bearer tokens between the two plans by shape.
        """
        from twisted.web.test.requesthelper import DummyRequest

        jwtPlan, oauthPlan = self.plan("jwt"), self.plan("oauth2")
        for value, owner in ((token(), jwtPlan), ("opaque-token-123", oauthPlan)):
            request = DummyRequest([b""])
            request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer " + value.encode()])
            self.assertEqual([p.present(request) for p in (jwtPlan, oauthPlan)],
                             [owner is jwtPlan, owner is oauthPlan])


class ConfigTests(PlanTestCase):
    """
    Mistakes in the jwt keys stop start-up with file, section and key.
    """

    def parse(self, lines: str) -> Any:
        """
        Parse the memory INI with C{lines} added to [api:demo].
        """
        text = MEMORY_INI.format(retention=10, entrypoints="http-post", start="latest") + lines
        return parseConfig(text, "test.ini")

    def assertMistake(self, lines: str, key: str, words: str) -> None:
        """
        Parsing C{lines} fails at C{key} with C{words} in the message.
        """
        e = self.assertRaises(ConfigError, self.parse, lines)
        self.assertEqual(e.key, key, str(e))
        self.assertIn(words, str(e))

    def test_mistakes(self) -> None:
        """
        No key source, two key sources, a short secret, a private key, an
        algorithm the key cannot do, jwt keys without the plan.
        """
        pem = self.file("issuer.pem", publicPem(rsaKey()))
        short = self.file("short", b"tooshort")
        from cryptography.hazmat.primitives import serialization

        private = self.file("private.pem", rsaKey().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        self.assertMistake("plans = jwt\n", "plans", "exactly one")
        self.assertMistake(f"plans = jwt\njwt.public-key-file = {pem}\njwt.secret-file = {short}\n",
                           "plans", "exactly one")
        self.assertMistake(f"plans = jwt\njwt.secret-file = {short}\n", "jwt.secret-file", "at least 32")
        self.assertMistake(f"plans = jwt\njwt.public-key-file = {private}\n", "jwt.public-key-file",
                           "private key")
        self.assertMistake(f"plans = jwt\njwt.public-key-file = {pem}\njwt.algorithms = RS256 HS256\n",
                           "jwt.algorithms", "HS256")
        self.assertMistake(f"plans = keyless\njwt.public-key-file = {pem}\n", "jwt.public-key-file",
                           "jwt plan")
        self.assertMistake("plans = jwt\njwt.jwks-url = ftp://x/\n", "jwt.jwks-url", "URL")
        self.assertMistake(f"plans = jwt\njwt.public-key-file = {pem}\njwt.colour = red\n", "jwt.colour",
                           "unknown key")

    def test_algorithmsForKey(self) -> None:
        """
        RSA keys do RS and PS, EC keys the ES of their curve; small RSA
        keys are refused.
        """
        self.assertIn("PS512", algorithmsForKey(rsaKey().public_key()))
        self.assertEqual(algorithmsForKey(ecKey().public_key()), ("ES256",))
        weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        self.assertRaises(ValueError, algorithmsForKey, weak.public_key())



class AccessLogTests(PlanTestCase):
    """
    Tokens and keys in query strings never reach the access log.
    """

    def test_redacted(self) -> None:
        """
        The gateway site's access log line shows C{REDACTED} for credential
        parameters and keeps the others.
        """
        from twisted.web.test.requesthelper import DummyRequest

        from evgate.security import redactedLogFormatter

        self.assertIs(self.gateway.site._logFormatter, redactedLogFormatter)
        request = DummyRequest([b"demo"])
        request.uri = b"/demo?access_token=eyJ.secret.sig&cursor=abc&api-key=evg_x_y"
        request.method = b"GET"
        request.clientproto = b"HTTP/1.1"
        request.code = 200
        request.sentLength = 10
        line = redactedLogFormatter("[ts]", request)
        self.assertIn("access_token=REDACTED&cursor=abc&api-key=REDACTED", line)
        self.assertNotIn("secret", line)
