"""
The schema codec on the pipeline seam (L{evgate.schemas.steps}), through a
gateway service on the memory endpoint and a local .avsc file (no
registry, no network): JSON posted is written as bare Avro, read back as
JSON values by GET, SSE and WebSocket; misfits are refused with their
pointer; bytes that do not decode are delivered raw and marked.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from evgate.config import parseConfig
from evgate.interfaces import IPreparingDeliveryStep, IPublishStep
from evgate.message import Draft, Message, envelope
from evgate.pipeline import NO_PIPELINE, StepError
from evgate.schemas.avro import AvroCodec
from evgate.schemas.codecs import LocalSchema
from evgate.schemas.errors import DecodeError
from evgate.schemas.serde import SchemaEncoder
from evgate.schemas.steps import SchemaDecodeStep, SchemaEncodeStep
from evgate.service import GatewayService

from .test_websocket import WebSocketTestCase
from .wire import WireConnection

SCHEMA = json.dumps({"type": "record", "name": "Order", "fields": [
    {"name": "id", "type": "string"}, {"name": "total", "type": "long"}]})

INI = """
[gateway]
listen = tcp:0

[endpoint:local]
type = memory

[api:orders]
path = /orders
endpoint = local
topic = orders
entrypoints = http-post http-get sse websocket
heartbeat = 0
start = earliest
value-format = registry
value-schema = file:{path}

[api:raw]
path = /raw
endpoint = local
topic = orders
entrypoints = http-get
start = earliest
"""


class LocalSchemaGatewayTests(WebSocketTestCase):
    """
    An API with C{value-schema = file:order.avsc} on the memory endpoint,
    next to an API without schemas on the same topic.
    """

    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "order.avsc")
        with open(path, "w") as f:
            f.write(SCHEMA)
        self.clock = Clock()
        self.gateway = GatewayService(parseConfig(INI.replace("{path}", path), "test.ini"), self.clock)
        self.connector = self.gateway.connectors["local"]
        self.codec = AvroCodec(SCHEMA)

    def post(self, body: bytes) -> Any:
        """
        POST C{body} to /orders; status and document.
        """
        connection = WireConnection(self.gateway)
        connection.send(b"POST /orders HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        self.turn()
        status, _, answer, _ = self.response(connection)
        return status, json.loads(answer)

    def page(self, path: str) -> Any:
        """
        The JSON page of GET C{path}.
        """
        connection = WireConnection(self.gateway)
        connection.get(path + "?timeout=0", {"Accept": "application/json"})
        self.turn()
        return json.loads(self.response(connection)[2])

    def test_steps(self) -> None:
        """
        The codec's steps provide the pipeline's interfaces; an API
        without schema keys has no pipeline at all.
        """
        pipeline = self.gateway.api("orders").pipeline  # type: ignore[union-attr]
        [decoder] = pipeline.deliverSteps
        [encoder] = pipeline.publishSteps
        verifyObject(IPreparingDeliveryStep, decoder)
        verifyObject(IPublishStep, encoder)
        self.assertIs(self.gateway.api("raw").pipeline, NO_PIPELINE)  # type: ignore[union-attr]

    def test_postAndRead(self) -> None:
        """
        JSON posted is stored as bare Avro; GET shows it as a JSON value
        with content-type application/json, the raw API as the bytes.
        """
        status, _ = self.post(b'{"id": "o-1", "total": 3}')
        self.assertEqual(status, 202)
        [stored] = self.connector.topicLog("orders").messages
        self.assertEqual(self.codec.decode(stored.content), {"id": "o-1", "total": 3})
        self.assertNotIn("content-type", dict(stored.headers))
        [item] = self.page("/orders")["items"]
        self.assertEqual((item["content"], item["headers"]), ({"id": "o-1", "total": 3},
                                                              {"content-type": "application/json"}))
        [raw] = self.page("/raw")["items"]
        self.assertIsInstance(raw["content"], str)

    def test_misfitRefused(self) -> None:
        """
        JSON that does not fit is a 400 naming the field; content that is
        not JSON a 400 too; nothing is published.
        """
        status, problem = self.post(b'{"id": 5, "total": 3}')
        self.assertEqual((status, problem["type"], problem["pointer"], problem["part"]),
                         (400, "https://evgate.dev/problems/does-not-match-schema", "/id", "value"))
        status, problem = self.post(b"not json")
        self.assertEqual((status, problem["pointer"]), (400, ""))
        self.assertEqual(list(self.connector.topicLog("orders").messages), [])

    def test_undecodableMarked(self) -> None:
        """
        Bytes that are not the schema's are delivered raw with the
        decode-failed marker, to GET, SSE and WebSocket alike.
        """
        socket = self.openSocket("/orders", json=True)
        stream = self.openStream("/orders?format=json")
        self.connector.publish("orders", Draft(b"\xff\xff\xff"))
        self.post(b'{"id": "o-2", "total": 1}')
        items = self.page("/orders")["items"]
        self.assertEqual(items[0]["error"]["type"], "https://evgate.dev/problems/decode-failed")
        self.assertEqual((items[0]["content"], items[0]["encoding"]), ("////", "base64"))
        self.assertEqual(items[1]["content"], {"id": "o-2", "total": 1})
        documents = [d for d in self.documents(socket) if "id" in d]
        self.assertEqual([d["content"] for d in documents], ["////", {"id": "o-2", "total": 1}])
        events = [json.loads(e["data"]) for e in self.events(stream) if "data" in e]
        self.assertEqual(events[0]["error"]["type"], "https://evgate.dev/problems/decode-failed")
        self.assertEqual(events[1]["content"], {"id": "o-2", "total": 1})


class _Decoder:
    """
    A decoder whose one schema id (7) must be fetched first.
    """

    def __init__(self) -> None:
        self.fetch: Deferred = Deferred()
        self.known = False

    def pending(self, data: bytes) -> Any:
        return None if self.known else self.fetch

    def decodeKnown(self, data: bytes) -> Any:
        if not self.known:
            return None

        class Decoded:
            value = {"n": 1}
        return Decoded()


def message(content: bytes, key: Any = None) -> Message:
    """
    A record on partition 0.
    """
    return Message(content, key, (), "t", 0, 0, 0)


class DecodeStepTests(SynchronousTestCase):
    """
    L{SchemaDecodeStep} on its own.
    """

    def test_prepareThenDecode(self) -> None:
        """
        A new schema id is prepared (fetched) first, then decoded.
        """
        decoder = _Decoder()
        step = SchemaDecodeStep("value-format = registry", decoder, None, Clock())  # type: ignore[arg-type]
        record = message(b"\x00\x00\x00\x00\x07x")
        wait = step.prepare(record)
        self.assertIs(wait, decoder.fetch)
        decoder.known = True
        decoder.fetch.callback(None)
        decoded = step.onDeliver(record)
        self.assertEqual((decoded.content, decoded.jsonContent), (b'{"n":1}', True))
        self.assertEqual(envelope(decoded)["content"], {"n": 1})

    def test_failedFetchMarksAndIsNotRetriedAtOnce(self) -> None:
        """
        A schema id that could not be fetched marks its records with the
        reason, and is not asked for again until the retry delay passed
        (a stream is never held twice for it).
        """
        clock = Clock()

        class Failing:
            asked = 0

            def pending(self, data: bytes) -> Any:
                self.asked += 1
                return fail(DecodeError("schema id 7 is not in the registry", reason="unknown-schema", schemaId=7))

            def decodeKnown(self, data: bytes) -> Any:
                return None

        decoder = Failing()
        step = SchemaDecodeStep("value-format = registry", decoder, None, clock)  # type: ignore[arg-type]
        record = message(b"\x00\x00\x00\x00\x07x")
        self.successResultOf(step.prepare(record))  # type: ignore[arg-type]
        self.assertIsNone(step.prepare(record))
        error = self.assertRaises(StepError, step.onDeliver, record)
        self.assertEqual(error.slug, "decode-failed")
        self.assertIn("(unknown-schema)", error.detail)
        clock.advance(11)
        self.assertIsNotNone(step.prepare(record))
        self.assertEqual(decoder.asked, 2)

    def test_keyDecoded(self) -> None:
        """
        A key written with a schema is shown as its value's text; a
        base64 key (not UTF-8) is decoded from its bytes.
        """
        class Keys:
            def pending(self, data: bytes) -> Any:
                return None

            def decodeKnown(self, data: bytes) -> Any:
                class Decoded:
                    value = data.hex()
                return Decoded()

        step = SchemaDecodeStep("key-format = registry", None, Keys(), Clock())  # type: ignore[arg-type]
        record = message(b"raw", "/w==")._replace(extra={"keyEncoding": "base64"})
        decoded = step.onDeliver(record)
        self.assertEqual((decoded.key, dict(decoded.extra), decoded.content), ("ff", {}, b"raw"))


class EncodeStepTests(SynchronousTestCase):
    """
    L{SchemaEncodeStep} on its own.
    """

    def test_keyAsJsonThenAsString(self) -> None:
        """
        A key is encoded as the JSON value it spells, or else as the
        string it is.
        """
        local = LocalSchema("/k.avsc", "AVRO", '"string"')
        step = SchemaEncodeStep("key-format = registry", None, SchemaEncoder(local=local), "", "file:/k.avsc")
        draft = self.successResultOf(step.onPublish(Draft(b"x", key="123"), None))
        self.assertEqual(draft.key, b"\x06123")
        draft = self.successResultOf(step.onPublish(Draft(b"x", key="abc"), None))
        self.assertEqual(draft.key, b"\x06abc")

