"""
Tests for the api-key plan and its registry, on a Clock, a memory store
and StubTreq.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from evgate.config import ConfigError, parseConfig
from evgate.interfaces import IPlan
from evgate.security.apikey import KIND, KeyRegistry, keyDigest, newKey, splitKey
from evgate.service import GatewayService
from evgate.store import MemoryStore

from .helpers import MEMORY_INI
from .test_security_helpers import NOW

URL = "http://gateway.test/demo"


def keyGateway(clock: Clock, plans: str = "api-key", extraApi: str = "", store: str = "memory") -> Any:
    """
    A memory gateway with a store, whose demo API has C{plans}, and a second
    API C{other} with API keys too.  A memory store is attached when the
    node did not build one itself.
    """
    text = MEMORY_INI.format(retention=100, entrypoints="http-post sse", start="latest")
    text = text.replace("listen = tcp:0\n", f"listen = tcp:0\nstore = {store}\n")
    text += f"plans = {plans}\n{extraApi}\n"
    text += "[api:other]\npath = /other\nendpoint = local\ntopic = other\nentrypoints = http-post\nplans = api-key\n"
    gateway = GatewayService(parseConfig(text, "test.ini"), clock)
    if getattr(gateway, "store", None) is None:
        gateway.store = MemoryStore()
    return gateway


class KeyFormatTests(SynchronousTestCase):
    """
    Keys: an id and 256 random bits, stored as a SHA-256.
    """

    def test_shape(self) -> None:
        """
        A new key carries its id, and splitKey finds it again; anything
        else has no id.
        """
        keyId, key = newKey()
        self.assertEqual(splitKey(key), keyId)
        self.assertEqual(len(keyId), 12)
        self.assertNotEqual(newKey()[1], key)
        for other in ("", "evg_", key + "x", key[:-1], "evg_ABCDEFGHIJKL_" + key[-43:], key.replace("_", "-", 1)):
            self.assertIsNone(splitKey(other))

    def test_digest(self) -> None:
        """
        The digest is the SHA-256 hex of the key.
        """
        self.assertEqual(keyDigest("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")


class ApiKeyPlanTests(SynchronousTestCase):
    """
    Keys issued through the registry, used through the gateway.
    """

    plans = "api-key"

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.gateway = keyGateway(self.clock, self.plans)
        self.store = self.gateway.store
        self.registry: KeyRegistry = self.gateway.apiKeys
        self.registry.startService()
        self.addCleanup(self.registry.stopService)
        self.treq = StubTreq(self.gateway.resource)

    def issue(self, api: str = "demo", name: str = "ci", expiresAt: Any = None) -> str:
        """
        Issue a key and return it.
        """
        keyId, key, record = self.successResultOf(self.registry.issue(api, name, expiresAt))
        return key  # type: ignore[no-any-return]

    def call(self, headers: Optional[Dict[str, str]] = None, url: str = URL) -> Any:
        """
        POST and return the response, body read.
        """
        d = self.treq.post(url, data=b"x", headers=headers or {})
        for _ in range(3):
            self.clock.advance(0)
            self.treq.flush()
        response = self.successResultOf(d)
        response.body = self.successResultOf(response.content())
        return response

    def test_interface(self) -> None:
        """
        The plan provides L{IPlan}.
        """
        plan = self.gateway.api("demo").plans[0]
        self.assertTrue(verifyObject(IPlan, plan))

    def test_header(self) -> None:
        """
        A key in X-Api-Key publishes.
        """
        self.assertEqual(self.call({"X-Api-Key": self.issue()}).code, 202)

    def test_query(self) -> None:
        """
        A key in the api-key query parameter publishes.
        """
        self.assertEqual(self.call(url=URL + "?api-key=" + self.issue()).code, 202)

    def test_storedHashed(self) -> None:
        """
        The store keeps the key's digest, never the key.
        """
        key = self.issue()
        [(keyId, record)] = self.store.records and [(i, r) for (k, i), r in self.store.records.items()
                                                     if k == KIND]
        self.assertEqual(record["digest"], keyDigest(key))
        self.assertNotIn(key, repr(record))
        self.assertIn(keyId, key)

    def test_missing(self) -> None:
        """
        No key: 401 with an ApiKey challenge naming the header.
        """
        response = self.call()
        self.assertEqual(response.code, 401)
        self.assertEqual(response.headers.getRawHeaders("www-authenticate"),
                         ['ApiKey realm="demo", header="X-Api-Key"'])

    def test_wrong(self) -> None:
        """
        A key with a known id and a wrong secret, an unknown key, garbage:
        401.
        """
        key = self.issue()
        forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
        for value in (forged, newKey()[1], "hello", "é".encode().decode("latin-1")):
            self.assertEqual(self.call({"X-Api-Key": value}).code, 401, value)

    def test_otherApi(self) -> None:
        """
        A key issued for another API is refused.
        """
        self.assertEqual(self.call({"X-Api-Key": self.issue("other")}).code, 401)
        self.assertEqual(self.call({"X-Api-Key": self.issue("other")}, "http://gateway.test/other").code, 202)

    def test_expired(self) -> None:
        """
        A key with expiresAt works until then, not after.
        """
        key = self.issue(expiresAt=NOW + 60)
        self.assertEqual(self.call({"X-Api-Key": key}).code, 202)
        self.clock.advance(60)
        response = self.call({"X-Api-Key": key})
        self.assertEqual(response.code, 401)
        self.assertIn(b"expired", response.body)

    def test_revokedAtOnce(self) -> None:
        """
        A revoked key is refused by the very next request.
        """
        key = self.issue()
        self.assertEqual(self.call({"X-Api-Key": key}).code, 202)
        self.assertTrue(self.successResultOf(self.registry.revoke("demo", splitKey(key))))
        self.assertEqual(self.call({"X-Api-Key": key}).code, 401)
        self.assertEqual(self.successResultOf(self.registry.listFor("demo")), [])

    def test_revokeUnknown(self) -> None:
        """
        Revoking a key that does not exist, or of another API, says so and
        changes nothing.
        """
        key = self.issue("other")
        self.assertFalse(self.successResultOf(self.registry.revoke("demo", splitKey(key))))
        self.assertFalse(self.successResultOf(self.registry.revoke("demo", "nosuchkey123")))
        self.assertEqual(self.call({"X-Api-Key": key}, "http://gateway.test/other").code, 202)

    def test_revokedElsewhere(self) -> None:
        """
        A key deleted from the store by another node stops working here
        within one refresh.
        """
        key = self.issue()
        self.successResultOf(self.store.delete(KIND, splitKey(key)))
        self.assertEqual(self.call({"X-Api-Key": key}).code, 202)
        self.clock.advance(5)
        self.assertEqual(self.call({"X-Api-Key": key}).code, 401)

    def test_issuedElsewhere(self) -> None:
        """
        A key another node issued works here after a refresh.
        """
        other = KeyRegistry(self.gateway)
        keyId, key, _ = self.successResultOf(other.issue("demo", "elsewhere", None))
        self.assertEqual(self.call({"X-Api-Key": key}).code, 401)
        self.clock.advance(5)
        self.assertEqual(self.call({"X-Api-Key": key}).code, 202)

    def test_beforeLoad(self) -> None:
        """
        Until the registry has loaded, a key is looked up in the store.
        """
        key = self.issue()
        fresh = KeyRegistry(self.gateway)
        record = self.successResultOf(fresh.find(splitKey(key)))
        self.assertEqual(record["digest"], keyDigest(key))

    def test_revokeClosesStreams(self) -> None:
        """
        Revoking a key ends its streams at once with an SSE error event;
        other consumers' streams go on.
        """
        key, otherKey = self.issue(), self.issue()
        streams = [self.treq.get(URL, headers={"Accept": "text/event-stream", "X-Api-Key": k})
                   for k in (key, otherKey)]
        for _ in range(3):
            self.clock.advance(0)
            self.treq.flush()
        responses = [self.successResultOf(d) for d in streams]
        self.assertEqual([r.code for r in responses], [200, 200])
        sse = [e for e in self.gateway.api("demo").entrypoints if e.name == "sse"][0]
        self.assertEqual(len(sse.live), 2)
        self.successResultOf(self.registry.revoke("demo", splitKey(key)))
        self.treq.flush()
        body = self.successResultOf(responses[0].content())
        self.assertIn(b"event: error", body)
        self.assertEqual([s.call.consumer.id for s in sse.live], [splitKey(otherKey)])

    def test_expiryClosesStreams(self) -> None:
        """
        A stream of a key that expires ends at the expiry.
        """
        key = self.issue(expiresAt=NOW + 30)
        d = self.treq.get(URL, headers={"Accept": "text/event-stream", "X-Api-Key": key})
        self.clock.advance(0)
        self.treq.flush()
        response = self.successResultOf(d)
        self.clock.advance(30)
        self.treq.flush()
        self.assertIn(b"event: error", self.successResultOf(response.content()))


class WithKeylessTests(ApiKeyPlanTests):
    """
    The same with keyless next to api-key: a present but wrong key is still
    a 401.
    """

    plans = "api-key keyless"

    def test_missing(self) -> None:
        """
        Without a key the keyless plan serves.
        """
        self.assertEqual(self.call().code, 202)


class ConfigTests(SynchronousTestCase):
    """
    The api-key keys.
    """

    def test_header(self) -> None:
        """
        Another header name and no query parameter.
        """
        gateway = keyGateway(Clock(), extraApi="api-key.header = X-Key\napi-key.query =\n")
        registry = gateway.apiKeys
        keyId, key, _ = registry.issue("demo", "n", None).result
        treq = StubTreq(gateway.resource)
        d = treq.post(URL, data=b"x", headers={"X-Key": key})
        treq.flush()
        self.assertEqual(self.successResultOf(d).code, 202)
        d = treq.post(URL + "?api-key=" + key, data=b"x")
        treq.flush()
        self.assertEqual(self.successResultOf(d).code, 401)

    def test_mistakes(self) -> None:
        """
        A header that cannot carry keys; api-key keys on an API without
        the plan; no store.
        """
        for kwargs, key in (({"extraApi": "api-key.header = Authorization\n"}, "api-key.header"),
                            ({"plans": "keyless", "extraApi": "api-key.header = X-Key\n"}, "api-key.header"),
                            ({"extraApi": "api-key.query = a b\n"}, "api-key.query")):
            e = self.assertRaises(ConfigError, keyGateway, Clock(), **kwargs)
            self.assertEqual(e.key, key, str(e))
        text = MEMORY_INI.format(retention=100, entrypoints="http-post", start="latest") + "plans = api-key\n"
        e = self.assertRaises(ConfigError, parseConfig, text, "test.ini")
        self.assertEqual(e.key, "plans")
        self.assertIn("store", str(e))





ADMIN_TOKEN = "admin-token-0123456789"


class AdminKeysTests(SynchronousTestCase):
    """
    The admin routes of API keys, through the admin app's resource.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        text = MEMORY_INI.format(retention=100, entrypoints="http-post", start="latest")
        text = text.replace("listen = tcp:0\n", f"listen = tcp:0\nstore = memory\nadmin = tcp:0\n"
                            f"admin-token = {ADMIN_TOKEN}\n")
        text += "plans = api-key\n[api:open]\npath = /open\nendpoint = local\ntopic = o\nentrypoints = http-post\n"
        self.gateway = GatewayService(parseConfig(text, "test.ini"), self.clock)
        self.gateway.apiKeys.startService()
        self.addCleanup(self.gateway.apiKeys.stopService)
        self.admin = StubTreq(self.gateway.admin.resource())
        self.data = StubTreq(self.gateway.resource)

    def request(self, method: str, path: str, body: Any = None, token: Optional[str] = ADMIN_TOKEN,
                client: Any = None) -> Any:
        """
        An admin request; the response with C{body} (bytes) and C{json}.
        """
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        kwargs: Dict[str, Any] = {"headers": headers}
        if body is not None:
            kwargs["data"] = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        client = client or self.admin
        d = client.request(method, "http://admin.test" + path, **kwargs)
        for _ in range(3):
            self.clock.advance(0)
            client.flush()
        response = self.successResultOf(d)
        response.body = self.successResultOf(response.content())
        response.json = json.loads(response.body) if response.body else None
        return response

    def test_issueUseRevoke(self) -> None:
        """
        POST issues a key shown once, GET lists it without the key, the key
        publishes, DELETE revokes it at once.
        """
        issued = self.request("POST", "/apis/demo/keys", {"name": "billing", "expiresAt": "2030-01-01T00:00:00Z"})
        self.assertEqual(issued.code, 201, issued.body)
        document = issued.json
        self.assertEqual(set(document), {"id", "key", "name", "api", "createdAt", "expiresAt"})
        self.assertEqual(document["expiresAt"], "2030-01-01T00:00:00Z")
        self.assertEqual(issued.headers.getRawHeaders("location"), [f"/apis/demo/keys/{document['id']}"])
        listed = self.request("GET", "/apis/demo/keys")
        self.assertEqual([k["id"] for k in listed.json["keys"]], [document["id"]])
        self.assertNotIn(document["key"], listed.body.decode())
        self.assertNotIn("digest", listed.body.decode())
        one = self.request("GET", f"/apis/demo/keys/{document['id']}")
        self.assertEqual(one.json["name"], "billing")
        use = self.data.post(URL, data=b"x", headers={"X-Api-Key": document["key"]})
        self.data.flush()
        self.assertEqual(self.successResultOf(use).code, 202)
        self.assertEqual(self.request("DELETE", f"/apis/demo/keys/{document['id']}").code, 204)
        use = self.data.post(URL, data=b"x", headers={"X-Api-Key": document["key"]})
        self.data.flush()
        self.assertEqual(self.successResultOf(use).code, 401)
        self.assertEqual(self.request("DELETE", f"/apis/demo/keys/{document['id']}").code, 404)
        self.assertEqual(self.request("GET", f"/apis/demo/keys/{document['id']}").code, 404)

    def test_tokenRequired(self) -> None:
        """
        Without the admin token nothing is issued or listed.
        """
        self.assertEqual(self.request("POST", "/apis/demo/keys", {"name": "x"}, token=None).code, 401)
        self.assertEqual(self.request("GET", "/apis/demo/keys", token="wrong-token-xxxxxxxx").code, 401)

    def test_badRequests(self) -> None:
        """
        Bad bodies are 400s, an unknown API 404, an API without the plan
        409.
        """
        for body in ({}, {"name": ""}, {"name": 5}, {"name": "x", "colour": 1}, [1],
                     {"name": "x", "expiresAt": "yesterday"}, {"name": "x", "expiresAt": NOW - 1},
                     {"name": "x", "expiresAt": "2030-01-01T00:00:00"}, {"name": "x", "expiresAt": True},
                     {"name": "x" * 201}):
            self.assertEqual(self.request("POST", "/apis/demo/keys", body).code, 400, body)
        self.assertEqual(self.request("POST", "/apis/nope/keys", {"name": "x"}).code, 404)
        self.assertEqual(self.request("POST", "/apis/open/keys", {"name": "x"}).code, 409)

    def test_numericExpiry(self) -> None:
        """
        expiresAt may be POSIX seconds.
        """
        issued = self.request("POST", "/apis/demo/keys", {"name": "n", "expiresAt": NOW + 60})
        self.assertEqual(issued.code, 201)
        self.assertEqual(issued.json["expiresAt"], "2027-01-15T08:01:00Z")

    def test_notOnGatewayPort(self) -> None:
        """
        The admin routes are not served by the gateway's port.
        """
        response = self.request("GET", "/apis/demo/keys", client=self.data)
        self.assertEqual(response.code, 404)
