"""
End-to-end tests of the plans on a real C{twistd -n evgate} process: JWT
with a PEM key and with a JWKS server that rotates its key, OAuth2 against
an introspection server, API keys issued, used and revoked through the
admin API, streams closed at token expiry and at revocation, and path
tricks that must never reach an API without its plans.

The JWKS and introspection servers are the standard library's HTTP server
on a thread of this process (the test thread blocks on its clients).
"""

from __future__ import annotations

import http.client
import json
import time
from http.server import BaseHTTPRequestHandler
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import parse_qs

import jwt as pyjwt
from twisted.trial.unittest import TestCase

from .helpers import GatewayIni, GatewayProcess, LocalHttpServer, httpRequest, jsonOf, waitFor
from .test_security_helpers import publicPem, rsaKey

ISSUER = "https://issuer.e2e/"


class LocalServer(LocalHttpServer):
    """
    A JWKS and introspection server on 127.0.0.1, in a thread.
    """

    def __init__(self) -> None:
        self.jwks: Dict[str, Any] = {"keys": []}
        self.tokens: Dict[str, Dict[str, Any]] = {}
        self.requests: List[str] = []
        self.delay = 0.0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def answer(self, document: Any) -> None:
                body = json.dumps(document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                server.requests.append(self.path)
                self.answer(server.jwks)

            def do_POST(self) -> None:
                server.requests.append(self.path)
                length = int(self.headers.get("Content-Length", "0"))
                form = parse_qs(self.rfile.read(length).decode())
                if server.delay:
                    time.sleep(server.delay)
                self.answer(server.tokens.get(form.get("token", [""])[0], {"active": False}))

        # The gateway hangs up on a slow introspection on purpose; the late
        # answer's broken pipe is expected, and kept quiet.
        super().__init__(Handler)

    def publish(self, *named: Tuple[str, Any]) -> None:
        """
        Publish the public halves of C{(kid, private key)} pairs.
        """
        keys = []
        for kid, key in named:
            jwk = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            jwk.update(kid=kid, use="sig")
            keys.append(jwk)
        self.jwks = {"keys": keys}


def plansIni(pem: str, secret: str, server: LocalServer) -> GatewayIni:
    """
    /orders behind JWT with a PEM key, /rotating behind JWT with the JWKS
    of C{server}, /introspected behind OAuth2 introspection at C{server}.
    """
    return (GatewayIni().memory()
            .api("orders", entrypoints="http-post http-get sse", plans="jwt",
                 jwt={"public-key-file": pem, "issuer": ISSUER, "audience": "orders", "leeway": 0,
                      "claims.scope": "orders"})
            .api("rotating", plans="jwt",
                 jwt={"jwks-url": server.urlOf("/jwks.json"), "jwks-min-refresh": 0.2})
            .api("introspected", plans="oauth2",
                 oauth2={"introspection-url": server.urlOf("/introspect"), "client-id": "evgate",
                         "client-secret-file": secret, "scopes": "orders:read", "timeout": 1}))


def rawRequest(port: int, method: str, target: str, headers: Optional[Dict[str, str]] = None,
               body: bytes = b"") -> Tuple[int, bytes]:
    """
    A request whose target goes on the wire exactly as given (no client
    normalises it): status and body.
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", "127.0.0.1")
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


class SecurityEndToEndTests(TestCase):
    """
    One gateway process with a JWT, a JWKS and an OAuth2 API.
    """

    timeout = 120

    def setUp(self) -> None:
        self.server = LocalServer()
        self.addCleanup(self.server.stop)
        self.server.publish(("k1", rsaKey()))
        import os
        import tempfile

        directory = tempfile.mkdtemp(prefix="evgate-e2e-keys-")
        pem = os.path.join(directory, "issuer.pem")
        with open(pem, "wb") as f:
            f.write(publicPem(rsaKey()))
        secret = os.path.join(directory, "client.secret")
        with open(secret, "w") as f:
            f.write("e2e-secret\n")
        self.gateway = GatewayProcess(plansIni(pem, secret, self.server))
        self.addCleanup(self.gateway.stop)
        self.gateway.start()

    def token(self, key: Any = None, kid: Optional[str] = None, **overrides: Any) -> str:
        """
        A token for the orders API, valid for an hour unless overridden.
        """
        now = int(time.time())
        claims = {"sub": "alice", "iss": ISSUER, "aud": "orders", "exp": now + 3600, "scope": "orders"}
        claims.update(overrides)
        headers = {"kid": kid} if kid else None
        return pyjwt.encode(claims, key or rsaKey(), algorithm="RS256", headers=headers)

    def post(self, path: str, headers: Optional[Dict[str, str]] = None) -> Tuple[int, dict, bytes]:
        """
        POST a message to C{path}.
        """
        return httpRequest("POST", self.gateway.url(path), body=b"m", headers=headers)

    def test_jwt(self) -> None:
        """
        Valid, expired, wrong issuer, wrong audience, missing scope claim,
        tampered and unsigned tokens, over a real socket.
        """
        def bearer(value: str) -> int:
            return self.post("/orders", {"Authorization": "Bearer " + value})[0]

        self.assertEqual(bearer(self.token()), 202)
        self.assertEqual(bearer(self.token(exp=int(time.time()) - 5)), 401)
        self.assertEqual(bearer(self.token(iss="https://other/")), 401)
        self.assertEqual(bearer(self.token(aud="payments")), 401)
        self.assertEqual(bearer(self.token(scope="profile")), 403)
        head, payload, signature = self.token().split(".")
        self.assertEqual(bearer(f"{head}.{payload}x.{signature}"), 401)
        unsigned = pyjwt.encode({"sub": "x", "iss": ISSUER, "aud": "orders"}, None, algorithm="none")
        self.assertEqual(bearer(unsigned), 401)
        status, headers, body = self.post("/orders")
        self.assertEqual(status, 401)
        self.assertIn("Bearer", headers["www-authenticate"])
        self.assertEqual(jsonOf(body)["status"], 401)

    def test_pathTricks(self) -> None:
        """
        Paths that name the API in another spelling are unknown paths (404)
        and never reach it without its plan: dot segments, doubled or
        encoded slashes, a trailing dot or slash, another case, parameters.
        """
        port = self.gateway.port
        tricks = ["/orders/../orders", "/x/../orders", "//orders", "/orders/", "/orders%2F", "/%2Forders",
                  "/orders.", "/./orders", "/ORDERS", "/orders;x", "/orders%00", "/orders/.",
                  "/%6Frders", "/orders/../admin", "/apis/orders/keys", "/admin/apis/orders/keys"]
        for target in tricks:
            status, body = rawRequest(port, "POST", target, body=b"m")
            self.assertIn(status, (400, 404), f"{target}: {status} {body[:200]!r}")
        status, _ = rawRequest(port, "POST", "/orders", body=b"m")
        self.assertEqual(status, 401)

    def test_streamClosedAtExpiry(self) -> None:
        """
        An SSE stream opened with a token that expires in two seconds ends
        then with an error event.
        """
        value = self.token(exp=int(time.time()) + 2)
        connection = http.client.HTTPConnection("127.0.0.1", self.gateway.port, timeout=15)
        self.addCleanup(connection.close)
        connection.request("GET", "/orders?access_token=" + value, headers={"Accept": "text/event-stream"})
        response = connection.getresponse()
        self.assertEqual(response.status, 200)
        started = time.monotonic()
        received = b""
        while b"event: error" not in received:
            chunk = response.read1(4096)
            if not chunk:
                break
            received += chunk
        self.assertIn(b"event: error", received)
        self.assertIn(b"expired", received)
        self.assertLess(time.monotonic() - started, 10)

    def test_jwksRotation(self) -> None:
        """
        The issuer rotates from k1 to k2: tokens naming k2 work as soon as
        k2 is published, tokens of the removed k1 stop after a refresh.
        """
        def bearer(value: str) -> int:
            return self.post("/rotating", {"Authorization": "Bearer " + value})[0]

        self.assertEqual(bearer(self.token(kid="k1")), 202)
        self.assertEqual(bearer(self.token(rsaKey("rotated"), kid="k2")), 401)
        self.server.publish(("k2", rsaKey("rotated")))
        waitFor(lambda: bearer(self.token(rsaKey("rotated"), kid="k2")) == 202, 10, what="k2 to be accepted")
        stranger = self.token(rsaKey("stranger"), kid="k3")
        self.assertEqual(bearer(stranger), 401)

    def test_introspection(self) -> None:
        """
        Active, inactive, missing scope and slow introspection answers.
        """
        now = int(time.time())
        self.server.tokens = {
            "active": {"active": True, "sub": "alice", "scope": "orders:read", "exp": now + 600},
            "narrow": {"active": True, "sub": "bob", "scope": "profile", "exp": now + 600},
        }

        def bearer(value: str) -> Tuple[int, dict, bytes]:
            return self.post("/introspected", {"Authorization": "Bearer " + value})

        self.assertEqual(bearer("active")[0], 202)
        self.assertEqual(bearer("inactive")[0], 401)
        status, headers, _ = bearer("narrow")
        self.assertEqual(status, 403)
        self.assertIn("insufficient_scope", headers["www-authenticate"])
        self.server.delay = 2.0
        started = time.monotonic()
        status, headers, _ = bearer("slow-token")
        self.assertEqual(status, 503)
        self.assertTrue(headers.get("retry-after"))
        self.assertLess(time.monotonic() - started, 1.9)
        self.server.delay = 0.0
        # The active answer was cached: no second introspection needed.
        self.assertEqual(bearer("active")[0], 202)





ADMIN_TOKEN = "e2e-admin-token-0123456789"


class ApiKeyEndToEndTests(TestCase):
    """
    API keys issued, used and revoked through the admin API of a real
    gateway process with a SQLite store.
    """

    timeout = 120

    def setUp(self) -> None:
        import tempfile

        directory = tempfile.mkdtemp(prefix="evgate-e2e-store-")
        self.gateway = GatewayProcess(
            GatewayIni(store=f"sqlite:{directory}/evgate.sqlite").admin(ADMIN_TOKEN).memory()
            .api("orders", entrypoints="http-post sse", plans="api-key"))
        self.addCleanup(self.gateway.stop)
        self.gateway.start()

    def adminPort(self) -> int:
        """
        The admin listener's port, from the process's log.
        """
        import re

        def find() -> Optional[int]:
            for line in self.gateway.lines:
                match = re.search(r"evgate admin listening on port (\d+)", line)
                if match:
                    return int(match.group(1))
            return None

        return waitFor(find, 10, what="the admin listener")  # type: ignore[no-any-return]

    def admin(self, method: str, path: str, document: Any = None, token: Optional[str] = ADMIN_TOKEN
              ) -> Tuple[int, dict, bytes]:
        """
        A request to the admin API.
        """
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        body = None
        if document is not None:
            body = json.dumps(document).encode()
            headers["Content-Type"] = "application/json"
        return httpRequest(method, f"http://127.0.0.1:{self.adminPort()}{path}", body=body, headers=headers)

    def publish(self, key: Optional[str]) -> int:
        """
        POST a message with C{key}; the status.
        """
        headers = {"X-Api-Key": key} if key else {}
        return httpRequest("POST", self.gateway.url("/orders"), body=b"m", headers=headers)[0]

    def test_issueUseRevoke(self) -> None:
        """
        Issue through the admin API, publish with the key, watch a stream
        with it, revoke it: the stream ends within a second and the key is
        refused; the admin API wants its token except for /health.
        """
        self.assertEqual(self.admin("GET", "/health", token=None)[0], 200)
        self.assertEqual(self.admin("GET", "/apis/orders/keys", token=None)[0], 401)
        status, _, body = self.admin("POST", "/apis/orders/keys", {"name": "e2e"})
        self.assertEqual(status, 201, body)
        issued = jsonOf(body)
        key = issued["key"]
        self.assertEqual(self.publish(key), 202)
        self.assertEqual(self.publish(None), 401)
        self.assertEqual(self.publish(key[:-1] + ("A" if key[-1] != "A" else "B")), 401)
        status, _, body = self.admin("GET", "/apis/orders/keys")
        self.assertEqual([k["id"] for k in jsonOf(body)["keys"]], [issued["id"]])
        self.assertNotIn(key, body.decode())

        connection = http.client.HTTPConnection("127.0.0.1", self.gateway.port, timeout=15)
        self.addCleanup(connection.close)
        connection.request("GET", "/orders?api-key=" + key, headers={"Accept": "text/event-stream"})
        stream = connection.getresponse()
        self.assertEqual(stream.status, 200)
        self.assertIn(b"retry:", stream.read1(4096))
        status, _, _ = self.admin("DELETE", f"/apis/orders/keys/{issued['id']}")
        revoked = time.monotonic()
        self.assertEqual(status, 204)
        received = b""
        while b"event: error" not in received:
            chunk = stream.read1(4096)
            if not chunk:
                break
            received += chunk
        self.assertIn(b"event: error", received)
        self.assertLess(time.monotonic() - revoked, 1.0)
        self.assertEqual(self.publish(key), 401)

    def test_keysSurviveRestart(self) -> None:
        """
        Keys live in the store: a key issued before a restart works after
        it.
        """
        status, _, body = self.admin("POST", "/apis/orders/keys", {"name": "durable"})
        self.assertEqual(status, 201, body)
        key = jsonOf(body)["key"]
        # twistd ends through the signal it was stopped with.
        self.assertIn(self.gateway.stop(), (0, -15))
        self.assertNotIn("Traceback", self.gateway.output())
        self.gateway.start()
        self.assertEqual(self.publish(key), 202)
