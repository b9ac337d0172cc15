"""
Tests of the admin API: its configuration, the token check in front of
every route, and the webhook subscription routes, through treq's
L{StubTreq} on the admin resource.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any, Dict, Optional, Tuple

from treq.testing import StubTreq
from twisted.internet.defer import fail, succeed
from twisted.internet.error import DNSLookupError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from evgate.admin.app import AdminApp, AdminSettings, loopbackByDefault
from evgate.config import ConfigError, parseConfig
from evgate.message import Cursor
from evgate.service import GatewayService

TOKEN = "admin-token-for-tests-0123456789"

INI = """
[gateway]
listen = tcp:0
store = memory
admin = tcp:0
admin-token = {token}
{gateway}

[endpoint:local]
type = memory

[api:orders]
path = /orders
endpoint = local
topic = orders
entrypoints = http-post webhook

[api:plain]
path = /plain
endpoint = local
topic = plain
entrypoints = http-post
"""

AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = dict(AUTH, **{"Content-Type": "application/json"})


def resolve(host: str, port: int) -> Any:
    """
    A fake resolver: public names, one internal name.
    """
    answers = {"hooks.example": ["93.184.215.14"], "inside.example": ["192.168.0.10"]}
    if host in answers:
        return succeed(answers[host])
    return fail(DNSLookupError(host))


class AdminHarness:
    """
    A gateway with the admin API, spoken to through StubTreq.
    """

    def __init__(self, gateway: str = "", ini: str = INI) -> None:
        self.clock = Clock()
        self.clock.advance(time.time())
        self.gateway = GatewayService(parseConfig(ini.format(token=TOKEN, gateway=gateway), "test.ini"), self.clock)
        if self.gateway.webhooks is not None:
            self.gateway.webhooks.resolve = resolve
            self.gateway.webhooks.http = StubTreq(Resource())
            self.gateway.webhooks.startService()
        self.treq = StubTreq(self.gateway.admin.resource())

    def call(self, method: str, path: str, body: Any = None, headers: Optional[Dict[str, str]] = None,
             raw: Optional[bytes] = None) -> Tuple[int, Dict[str, str], Any]:
        """
        One request: status, headers (lower-cased, first values) and the JSON
        body (or the raw bytes when it is not JSON, None when empty).
        """
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        d = self.treq.request(method, "http://admin" + path, data=data,
                              headers=headers if headers is not None else JSON)
        results: list = []
        d.addCallback(lambda response: self.treq.content(response).addCallback(
            lambda content: results.append((response, content))))
        for _ in range(6):
            self.clock.advance(0)
            self.treq.flush()
        assert results, f"no answer to {method} {path}"
        response, content = results[0]
        answered = {k.decode().lower(): v[0].decode() for k, v in response.headers.getAllRawHeaders()}
        document: Any = None
        if content:
            try:
                document = json.loads(content)
            except ValueError:
                document = content
        return response.code, answered, document


class TokenTests(SynchronousTestCase):
    """
    The token check in front of the admin routes.
    """

    def setUp(self) -> None:
        self.admin = AdminHarness()

    def test_healthIsPublic(self) -> None:
        """
        GET /health answers without a token, and says only that it is up.
        """
        status, headers, body = self.admin.call("GET", "/health", headers={})
        self.assertEqual((status, body), (200, {"status": "ok"}))
        self.assertEqual(headers["cache-control"], "no-store")

    def test_everyOtherRouteNeedsTheToken(self) -> None:
        """
        Every registered route but the public ones answers 401 with a Bearer
        challenge to a request without the token, whatever its method.
        """
        checked = 0
        for rule in AdminApp.routes.url_map.iter_rules():
            path = re.sub(r"<[^>]+>", "x", rule.rule)
            if path in AdminApp.public or "<" in path:
                continue
            for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
                status, headers, body = self.admin.call(method, path, headers={})
                self.assertEqual(status, 401, (method, path))
                self.assertEqual(headers["www-authenticate"], 'Bearer realm="evgate admin"')
                self.assertEqual(body["type"], "https://evgate.dev/problems/unauthorized")
                checked += 1
        self.assertGreaterEqual(checked, 6)

    def test_wrongTokens(self) -> None:
        """
        A wrong token, another scheme, or the token as Basic credentials
        are refused.
        """
        for value in ("Bearer nope", f"Basic {TOKEN}", TOKEN, f"Bearer {TOKEN}x", "Bearer "):
            status, _, _ = self.admin.call("GET", "/apis/orders/subscriptions", headers={"Authorization": value})
            self.assertEqual(status, 401, value)
        status, _, _ = self.admin.call("GET", "/apis/orders/subscriptions",
                                       headers={"Authorization": f"bearer {TOKEN}"})
        self.assertEqual(status, 200)

    def test_unknownPathHidden(self) -> None:
        """
        An unknown path is 401 without the token (the API's shape is not
        shown) and a problem 404 with it; a wrong method is 405 with Allow.
        """
        self.assertEqual(self.admin.call("GET", "/secret/things", headers={})[0], 401)
        status, _, body = self.admin.call("GET", "/secret/things")
        self.assertEqual((status, body["type"]), (404, "https://evgate.dev/problems/not-found"))
        status, headers, body = self.admin.call("PUT", "/apis/orders/subscriptions")
        self.assertEqual(status, 405)
        self.assertIn("POST", headers["allow"])


class SubscriptionRouteTests(SynchronousTestCase):
    """
    The webhook subscription routes.
    """

    def setUp(self) -> None:
        self.admin = AdminHarness()

    def create(self, **document: Any) -> Tuple[int, Dict[str, str], Any]:
        """
        POST a subscription of API orders.
        """
        document.setdefault("callbackUrl", "https://hooks.example/in")
        return self.admin.call("POST", "/apis/orders/subscriptions", document)

    def test_lifecycle(self) -> None:
        """
        Create (201, Location, the secret once), get, list, pause, resume,
        delete; the secret and header values are never shown again.
        """
        status, headers, created = self.create(headers={"Authorization": "Bearer receiver"}, filter='key == "a"',
                                               retry={"maxAttempts": 3})
        self.assertEqual(status, 201, created)
        id = created["id"]
        self.assertEqual(headers["location"], f"/apis/orders/subscriptions/{id}")
        self.assertTrue(created["secret"].startswith("whsec_"))
        self.assertEqual(created["status"], "active")
        self.assertEqual(created["headers"], {"Authorization": "(hidden)"})
        self.assertEqual(created["retry"]["maxAttempts"], 3)
        self.assertEqual(created["counts"], {"delivered": 0, "failedAttempts": 0, "deadLettered": 0})
        self.assertIsNotNone(created["position"])
        status, _, got = self.admin.call("GET", f"/apis/orders/subscriptions/{id}")
        self.assertEqual(status, 200)
        self.assertNotIn("secret", got)
        self.assertNotIn("receiver", json.dumps(got))
        self.assertEqual(got["filter"], 'key == "a"')
        status, _, listed = self.admin.call("GET", "/apis/orders/subscriptions")
        self.assertEqual([s["id"] for s in listed["items"]], [id])
        status, _, paused = self.admin.call("POST", f"/apis/orders/subscriptions/{id}/pause")
        self.assertEqual((status, paused["status"], paused["pausedReason"]),
                         (200, "paused", "paused by an operator"))
        status, _, resumed = self.admin.call("POST", f"/apis/orders/subscriptions/{id}/resume")
        self.assertEqual((status, resumed["status"], resumed["pausedReason"]), (200, "active", None))
        status, _, body = self.admin.call("DELETE", f"/apis/orders/subscriptions/{id}")
        self.assertEqual((status, body), (204, None))
        self.assertEqual(self.admin.call("GET", f"/apis/orders/subscriptions/{id}")[0], 404)

    def test_apiProblems(self) -> None:
        """
        An unknown API is 404; an API without the webhook entrypoint 409.
        """
        status, headers, body = self.admin.call("POST", "/apis/nope/subscriptions", {"callbackUrl": "https://x/"})
        self.assertEqual((status, headers["content-type"]), (404, "application/problem+json"))
        status, _, body = self.admin.call("POST", "/apis/plain/subscriptions", {"callbackUrl": "https://x/"})
        self.assertEqual((status, body["type"]), (409, "https://evgate.dev/problems/conflict"))
        self.assertEqual(self.admin.call("GET", "/apis/plain/subscriptions")[0], 409)

    def test_badBodies(self) -> None:
        """
        Bodies that are not JSON objects, or not JSON at all, are refused.
        """
        self.assertEqual(self.admin.call("POST", "/apis/orders/subscriptions", raw=b"{nope")[0], 400)
        self.assertEqual(self.admin.call("POST", "/apis/orders/subscriptions", raw=b"")[0], 400)
        self.assertEqual(self.admin.call("POST", "/apis/orders/subscriptions", body=[1, 2])[0], 400)
        status, _, body = self.admin.call("POST", "/apis/orders/subscriptions", raw=b"{}",
                                          headers=dict(AUTH, **{"Content-Type": "text/plain"}))
        self.assertEqual((status, body["type"]), (415, "https://evgate.dev/problems/unsupported-media-type"))

    def test_badFields(self) -> None:
        """
        Each bad field is a 400 problem naming it: a bad or internal URL, a
        filter that does not compile (with its position), a foreign cursor.
        """
        status, _, body = self.create(callbackUrl="http://hooks.example/in")
        self.assertEqual((status, body["field"]), (400, "callbackUrl"))
        self.assertIn("https", body["detail"])
        status, _, body = self.create(callbackUrl="https://inside.example/in")
        self.assertEqual((status, body["field"]), (400, "callbackUrl"))
        self.assertIn("192.168.0.10 is a private address", body["detail"])
        status, _, body = self.create(filter="content.amount >")
        self.assertEqual((status, body["type"]), (400, "https://evgate.dev/problems/bad-filter"))
        self.assertEqual((body["line"], body["column"]), (1, 16))
        foreign = Cursor.fromMapping({0: 1}).encode(b"abcd")
        status, _, body = self.create(start=foreign)
        self.assertEqual((status, body["type"]), (400, "https://evgate.dev/problems/bad-cursor"))
        status, _, body = self.create(retry={"maxDelay": -1})
        self.assertEqual((status, body["field"]), (400, "retry"))

    def test_unknownSubscription(self) -> None:
        """
        Ids that do not exist, or have another shape, are 404 on every
        route.
        """
        for path in ("/apis/orders/subscriptions/sub_0123456789abcdef0123", "/apis/orders/subscriptions/../x",
                     "/apis/orders/subscriptions/nope"):
            self.assertEqual(self.admin.call("GET", path)[0], 404, path)
        self.assertEqual(self.admin.call("POST", "/apis/orders/subscriptions/nope/pause")[0], 404)
        self.assertEqual(self.admin.call("DELETE", "/apis/orders/subscriptions/sub_0123456789abcdef0123")[0], 404)

    def test_otherApisSubscription(self) -> None:
        """
        A subscription is only found under its own API.
        """
        ini = INI.replace("[api:plain]", "[api:more]\npath = /more\nendpoint = local\ntopic = more\n"
                          "entrypoints = webhook\n\n[api:plain]")
        admin = AdminHarness(ini=ini)
        created = admin.call("POST", "/apis/orders/subscriptions", {"callbackUrl": "https://hooks.example/"})[2]
        self.assertEqual(admin.call("GET", f"/apis/more/subscriptions/{created['id']}")[0], 404)
        self.assertEqual(admin.call("GET", "/apis/more/subscriptions")[2], {"items": []})


class AdminConfigTests(SynchronousTestCase):
    """
    The admin keys of [gateway].
    """

    BASE = INI.replace("admin = tcp:0\nadmin-token = {token}\n", "{admin}")

    def parse(self, admin: str) -> Any:
        """
        The admin settings of a configuration with C{admin} keys.
        """
        return parseConfig(self.BASE.format(admin=admin, gateway=""), "test.ini").gateway.options["admin"]

    def test_offByDefault(self) -> None:
        """
        Without the admin key (or with admin = none) there is no admin API,
        and token keys alone are mistakes.
        """
        self.assertIsNone(self.parse(""))
        self.assertIsNone(self.parse("admin = none\n"))
        error = self.assertRaises(ConfigError, self.parse, f"admin-token = {TOKEN}\n")
        self.assertEqual(error.key, "admin-token")

    def test_tokenRequired(self) -> None:
        """
        An admin listener without a token, with a short one, or with both
        token keys, refuses to start.
        """
        error = self.assertRaises(ConfigError, self.parse, "admin = tcp:8081\n")
        self.assertEqual(error.key, "admin")
        self.assertIn("token", str(error))
        self.assertRaises(ConfigError, self.parse, "admin = tcp:8081\nadmin-token = short\n")
        self.assertRaises(ConfigError, self.parse, f"admin = tcp:8081\nadmin-token = {TOKEN}\n"
                                                   "admin-token-file = x\n")

    def test_loopbackByDefault(self) -> None:
        """
        A TCP admin listener without an interface binds to loopback.
        """
        self.assertEqual(self.parse(f"admin = tcp:8081\nadmin-token = {TOKEN}\n"),
                         AdminSettings("tcp:8081:interface=127.0.0.1", TOKEN.encode()))
        self.assertEqual(loopbackByDefault("8081"), "tcp:8081:interface=127.0.0.1")
        self.assertEqual(loopbackByDefault("tcp6:8081"), "tcp6:8081:interface=\\:\\:1")
        self.assertEqual(loopbackByDefault("tcp:8081:interface=0.0.0.0"), "tcp:8081:interface=0.0.0.0")
        self.assertEqual(loopbackByDefault("unix:/run/evgate-admin.sock"), "unix:/run/evgate-admin.sock")

    def test_tokenFile(self) -> None:
        """
        admin-token-file is read relative to the configuration file, its
        whitespace stripped; a missing file is a mistake.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        with open(os.path.join(directory, "admin.token"), "w") as f:
            f.write(TOKEN + "\n")
        text = self.BASE.format(admin="admin = tcp:0\nadmin-token-file = admin.token\n", gateway="")
        settings = parseConfig(text, os.path.join(directory, "evgate.ini")).gateway.options["admin"]
        self.assertEqual(settings.token, TOKEN.encode())
        error = self.assertRaises(ConfigError, parseConfig, text, os.path.join(directory, "elsewhere", "x.ini"))
        self.assertEqual(error.key, "admin-token-file")

    def test_adminListenerRole(self) -> None:
        """
        The gateway adds the admin listener with role admin, apart from the
        gateway listeners.
        """
        gateway = AdminHarness().gateway
        self.assertEqual(gateway.adminListener.role, "admin")
        self.assertNotIn(gateway.adminListener, gateway.listeners)
