"""
Tests of C{GET /apis/<api>/asyncapi}: the generated documents are valid
against the official AsyncAPI 3.0.0 JSON schema (vendored in tests/data,
see tests/data/README.md), checked with the C{jsonschema} package, and say
what the API definition says.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict

from twisted.trial.unittest import SynchronousTestCase

from evgate.admin.asyncapi import MEDIA_TYPE, asyncapiDocument, listenerAddresses

from .test_ops import AUTH, OpsHarness

SCHEMA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "asyncapi-3.0.0.json")
# schemas/3.0.0.json of the npm package @asyncapi/specs 6.11.1 (tests/data/README.md).
SCHEMA_SHA256 = "d4571a420e6ffb7fcc7066c95a6db1202f299a3c51daa103d0706bf30f95e626"

EXTRA = """
[api:secured]
path = /secured/orders
endpoint = local
topic = secured
entrypoints = http-post sse websocket webhook
plans = api-key jwt oauth2
api-key.header = X-Key
jwt.secret-file = {secret}
oauth2.introspection-url = https://auth.example/introspect
oauth2.client-id = evgate
oauth2.client-secret-file = {secret}
oauth2.scopes = orders.read

[api:subscribe-only]
path = /feed
endpoint = local
topic = feed
entrypoints = http-get websocket
websocket.publish = false

[api:avro]
path = /avro
endpoint = local
topic = avro
entrypoints = http-post http-get
value-format = registry
value-schema = file:{avsc}

[api:proto]
path = /proto
endpoint = local
topic = proto
entrypoints = http-post http-get
value-format = registry
value-schema = file:{proto}
"""

AVSC = '{"type": "record", "name": "Order", "fields": [{"name": "id", "type": "string"}]}'
PROTO = 'syntax = "proto3";\nmessage Order {\n  string id = 1;\n}\n'


def validator() -> Any:
    """
    A jsonschema validator of the AsyncAPI 3.0.0 schema.
    """
    import jsonschema

    with open(SCHEMA, encoding="utf-8") as f:
        schema = json.load(f)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


class AsyncApiTests(SynchronousTestCase):
    """
    The AsyncAPI documents of a gateway with keyless, secured and
    subscribe-only APIs.
    """

    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        secret = os.path.join(directory, "jwt.secret")
        with open(secret, "w") as f:
            f.write(os.urandom(48).hex())
        avsc = os.path.join(directory, "order.avsc")
        proto = os.path.join(directory, "order.proto")
        for path, text in ((avsc, AVSC), (proto, PROTO)):
            with open(path, "w") as f:
                f.write(text)
        self.ops = OpsHarness(extra=EXTRA.format(secret=secret, avsc=avsc, proto=proto), gateway="store = memory\n"
                              "listen = tcp:8080 tcp:8443:interface=192.0.2.10\n")
        self.validator = validator()

    def document(self, api: str) -> Dict[str, Any]:
        """
        The AsyncAPI document of C{api}, fetched through the admin API and
        validated against the schema.
        """
        status, headers, body = self.ops.call("GET", f"/apis/{api}/asyncapi")
        self.assertEqual(status, 200, body)
        self.assertEqual(headers["content-type"], MEDIA_TYPE)
        document = json.loads(body)
        errors = sorted(self.validator.iter_errors(document), key=lambda e: list(e.absolute_path))
        self.assertEqual([f"{list(e.absolute_path)}: {e.message}" for e in errors], [])
        return document

    def test_officialSchema(self) -> None:
        """
        The schema validated against is the official file, unchanged.
        """
        import hashlib

        with open(SCHEMA, "rb") as f:
            self.assertEqual(hashlib.sha256(f.read()).hexdigest(), SCHEMA_SHA256)

    def test_schemaCatchesMistakes(self) -> None:
        """
        The validator is strict enough to matter: a document without info,
        or with an operation of an unknown action, is refused.
        """
        document = asyncapiDocument(self.ops.gateway, self.ops.gateway.api("demo"))
        self.assertTrue(self.validator.is_valid(document))
        broken = dict(document)
        del broken["info"]
        self.assertFalse(self.validator.is_valid(broken))
        wrong = json.loads(json.dumps(document))
        next(iter(wrong["operations"].values()))["action"] = "publish"
        self.assertFalse(self.validator.is_valid(wrong))

    def test_keylessApi(self) -> None:
        """
        A keyless API: one channel at its path, an operation per
        entrypoint with the right action, no security, servers from the
        listeners.
        """
        document = self.document("demo")
        self.assertEqual(document["asyncapi"], "3.0.0")
        self.assertEqual(document["channels"]["demo"]["address"], "/demo")
        operations = document["operations"]
        self.assertEqual({name: op["action"] for name, op in operations.items()},
                         {"publish": "receive", "poll": "send", "stream": "send"})
        self.assertEqual(operations["publish"]["bindings"], {"http": {"method": "POST"}})
        self.assertNotIn("security", operations["publish"])
        self.assertNotIn("securitySchemes", document["components"])
        self.assertEqual({name: (s["host"], s["protocol"]) for name, s in document["servers"].items()},
                         {"http": ("localhost:8080", "http"), "http-1": ("192.0.2.10:8443", "http")})

    def test_securedApi(self) -> None:
        """
        An API with api-key, jwt and oauth2 plans: a security scheme per
        way of presenting credentials, required by every operation;
        WebSocket servers and both WebSocket operations; a webhook
        operation.
        """
        document = self.document("secured")
        schemes = document["components"]["securitySchemes"]
        self.assertEqual(schemes["apiKeyHeader"], {"type": "httpApiKey", "name": "X-Key", "in": "header",
                                                   "description": schemes["apiKeyHeader"]["description"]})
        self.assertEqual(schemes["apiKeyQuery"]["in"], "query")
        self.assertEqual((schemes["jwt"]["scheme"], schemes["jwt"]["bearerFormat"]), ("bearer", "JWT"))
        self.assertIn("orders.read", schemes["oauth2"]["description"])
        operations = document["operations"]
        self.assertEqual(set(operations), {"publish", "stream", "websocketSubscribe", "websocketPublish", "webhook"})
        for operation in operations.values():
            self.assertEqual([ref["$ref"].rsplit("/", 1)[1] for ref in operation["security"]],
                             ["apiKeyHeader", "apiKeyQuery", "jwt", "oauth2"])
        self.assertEqual({s["protocol"] for s in document["servers"].values()}, {"http", "ws"})
        self.assertNotIn("secret", json.dumps(document).replace("client-secret", ""))

    def test_subscribeOnly(self) -> None:
        """
        A WebSocket with websocket.publish = false has no publishing
        operation; a long poll documents its query parameters.
        """
        document = self.document("subscribe-only")
        operations = document["operations"]
        self.assertEqual(set(operations), {"poll", "websocketSubscribe"})
        self.assertIn("cursor", operations["poll"]["bindings"]["http"]["query"]["properties"])

    def test_unknownApi(self) -> None:
        """
        An unknown API is a 404 problem; the token is required.
        """
        status, headers, body = self.ops.call("GET", "/apis/nope/asyncapi")
        self.assertEqual((status, headers["content-type"]), (404, "application/problem+json"))
        self.assertEqual(self.ops.call("GET", "/apis/demo/asyncapi", headers={})[0], 401)
        self.assertTrue(AUTH)

    def test_boundPorts(self) -> None:
        """
        Once a listener listens, the document gives its bound port (tcp:0,
        systemd listeners), not the configured one.
        """

        class Bound:
            def getHost(self) -> Any:
                return type("Address", (), {"port": 43210})()

        self.ops.gateway.listeners[0].port = Bound()
        self.assertEqual(listenerAddresses(self.ops.gateway)[0], ("localhost", 43210, False))


class SchemaPayloadTests(SynchronousTestCase):
    """
    APIs with a message schema describe their payload with it.
    """

    setUp = AsyncApiTests.setUp
    document = AsyncApiTests.document

    def test_avroPayload(self) -> None:
        """
        A local .avsc is the payload schema, as Avro 1.9.0 JSON; the
        content type is JSON (what clients send and read).
        """
        message = self.document("avro")["components"]["messages"]["message"]
        self.assertEqual(message["payload"], {"schemaFormat": "application/vnd.apache.avro+json;version=1.9.0",
                                              "schema": json.loads(AVSC)})
        self.assertEqual(message["contentType"], "application/json")

    def test_protobufPayload(self) -> None:
        """
        A local .proto is the payload schema, as its text.
        """
        message = self.document("proto")["components"]["messages"]["message"]
        self.assertEqual(message["payload"], {"schemaFormat": "application/vnd.google.protobuf;version=3",
                                              "schema": PROTO})

    def test_noSchemaNoPayloadSchema(self) -> None:
        """
        An API without a schema keeps the free-form payload.
        """
        message = self.document("demo")["components"]["messages"]["message"]
        self.assertNotIn("schemaFormat", message["payload"])
