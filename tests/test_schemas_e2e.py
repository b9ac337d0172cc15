"""
Schemas end to end: a real C{twistd -n evgate} gateway in front of real
Kafka and the real registry of scripts/dev-services (Apicurio, Confluent
API at $EVGATE_SCHEMA_REGISTRY_URL), with confluent-kafka's own
serializers and deserializers as the independent clients on the Kafka
side.

 - records written by C{AvroSerializer} / C{ProtobufSerializer} read back
   as the same JSON values through GET (cursor and consumer group), SSE
   and WebSocket, and a webhook receives them decoded;
 - JSON posted through evgate (HTTP POST, NDJSON batch, WebSocket
   evgate.json frames) is read back by confluent-kafka's deserializers as
   the same values;
 - JSON that does not fit gets a 400 whose C{pointer} names the field, and
   nothing reaches Kafka;
 - records that do not decode (an unknown schema id, bytes that are not
   the wire format) reach readers with their raw bytes and the
   C{decode-failed} marker, and a webhook's dead-letter topic with the
   reason.

These tests fail (never skip) when Kafka or the registry is not there.
"""

from __future__ import annotations

import base64
import io
import json
import os
import uuid
from typing import Any, Dict, List, Optional, Tuple

import fastavro
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.protobuf import ProtobufDeserializer, ProtobufSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from google.protobuf import json_format, message_factory
from twisted.trial.unittest import TestCase

from evgate.schemas.protobuf import ProtobufCodec

from .fixtures import GatewayIni, WebhookReceiver
from .helpers import GatewayProcess, httpRequest, jsonOf, waitFor
from .test_kafka_integration import KAFKA, freshTopic, requireKafka
from .test_schemas_integration import ORDER_PROTO, REGISTRY
from .test_streaming_e2e import runAsync
from .test_transforms_e2e import openSse, readEvents

TOKEN = "schemas-e2e-" + uuid.uuid4().hex

ORDER_AVRO = json.dumps({
    "type": "record", "name": "Order", "namespace": "shop.e2e",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "total", "type": "long"},
        {"name": "items", "type": {"type": "array", "items": {
            "type": "record", "name": "Item",
            "fields": [{"name": "sku", "type": "string"}, {"name": "price", "type": "double"}]}}},
        {"name": "note", "type": ["null", "string"], "default": None},
    ],
})

# A header naming schema id 999999, which no registry of these tests has,
# then some bytes; and bytes that are not the wire format at all.
UNKNOWN_ID = b"\x00\x00\x0f\x42\x3f" + b"\x02\xff\xfe"
NOT_WIRE = b"plain text, no magic byte"


def produceRaw(topic: str, values: List[bytes]) -> None:
    """
    Produce C{values} to C{topic} as they are, in order, and wait for the
    broker's acknowledgements.
    """
    producer = Producer({"bootstrap.servers": KAFKA, "message.timeout.ms": "10000"})
    errors: list = []
    for value in values:
        producer.produce(topic, value, on_delivery=lambda err, msg: errors.append(err))
    producer.flush(15)
    assert errors == [None] * len(values), errors


def readRaw(topic: str, count: int) -> List[bytes]:
    """
    The values of the first C{count} records of C{topic} (partition 0),
    read with confluent-kafka's consumer: every record Kafka has, whatever
    evgate thinks of it.
    """
    consumer = Consumer({"bootstrap.servers": KAFKA, "group.id": "evgate-schemas-e2e-" + uuid.uuid4().hex[:6],
                         "enable.auto.commit": "false"})
    out: List[bytes] = []
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        for _ in range(60):
            record = consumer.poll(0.5)
            if record is not None and record.error() is None:
                out.append(bytes(record.value()))
                if len(out) >= count:
                    # Anything after them would be a record that should not be there.
                    extra = consumer.poll(2.0)
                    if extra is not None and extra.error() is None:
                        out.append(bytes(extra.value()))
                    return out
    finally:
        consumer.close()
    raise AssertionError(f"only {len(out)} of {count} records in {topic}")


def schemaIni(topic: str, dlq: str, **api: Any) -> GatewayIni:
    """
    /orders on C{topic}, values in the registry's formats, with every
    reader, a webhook with dead letters to C{dlq}, and an admin API.
    """
    return (GatewayIni(listen="tcp:0:interface=127.0.0.1", store="sqlite:evgate.sqlite")
            .admin(TOKEN).loopbackWebhooks().gateway(webhook_sync_interval=1)
            .kafka(settings={"schema-registry": REGISTRY, "linger.ms": 1}, quick=True)
            .api("orders", endpoint="kafka", topic=topic, start="earliest", dlq=f"kafka/{dlq}",
                 entrypoints="http-post http-get sse websocket webhook", heartbeat=0,
                 settings={"value-format": "registry", **api},
                 webhook={"retry.initial-delay": 0.2, "retry.max-attempts": 2, "timeout": 5}))


def adminCall(gateway: GatewayProcess, method: str, path: str, body: Any = None) -> Tuple[int, Any]:
    """
    One admin API request: its status and JSON document.
    """
    data = json.dumps(body).encode() if body is not None else None
    status, _, content = httpRequest(method, gateway.adminUrl(path), data,
                                     {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    return status, (jsonOf(content) if content else None)


def getItems(gateway: GatewayProcess, count: int, headers: Optional[Dict[str, str]] = None) -> List[Dict[str, Any]]:
    """
    The first C{count} items of /orders, read with GET from the start
    (with C{headers}: as a consumer group).
    """
    def page() -> Any:
        status, _, body = httpRequest("GET", gateway.url(f"/orders?limit={count}&timeout=1000"), None, headers)
        assert status == 200, body
        items = jsonOf(body)["items"]
        return items if len(items) >= count else None

    return waitFor(page, 30, 0.2, f"{count} items from GET")  # type: ignore[no-any-return]


def websocketMessages(gateway: GatewayProcess, count: int, publish: List[Any] = ()) -> Tuple[List[Any], List[Any]]:
    """
    Under evgate.json: publish C{publish} (JSON values, one frame each),
    then read until C{count} messages came; the acknowledgements and
    errors, and the messages.
    """
    url = f"ws://127.0.0.1:{gateway.port}/orders"
    seen: List[Any] = []

    async def scenario() -> Tuple[List[Any], List[Any]]:
        import websockets

        async with websockets.connect(url, subprotocols=["evgate.json"]) as js:
            answers: List[Any] = []
            messages: List[Any] = []
            for index, value in enumerate(publish):
                await js.send(json.dumps({"content": json.dumps(value), "ref": f"r{index}"}))
            while len(messages) < count or len(answers) < len(publish):
                document = json.loads(await js.recv())
                seen.append(document)
                if "id" in document:
                    messages.append(document)
                elif "ack" in document or "error" in document:
                    answers.append(document)
            return answers, messages

    try:
        return runAsync(scenario, 40)  # type: ignore[no-any-return]
    except TimeoutError:
        raise AssertionError(f"WebSocket: {count} messages did not come; came: {seen}") from None


class SchemaGatewayCase(TestCase):
    """
    A fresh topic and dead-letter topic per test, and the registry client
    of confluent-kafka.
    """

    timeout = 180

    def setUp(self) -> None:
        requireKafka()
        self.topic = freshTopic()
        self.dlq = freshTopic()
        self.context = SerializationContext(self.topic, MessageField.VALUE)
        self.confluent = SchemaRegistryClient({"url": REGISTRY})

    def startGateway(self, **api: Any) -> GatewayProcess:
        """
        The gateway of L{schemaIni} for this test's topics.
        """
        gateway = GatewayProcess(schemaIni(self.topic, self.dlq, **api), name="schemas")
        gateway.start()
        self.addCleanup(gateway.stop)
        return gateway

    def post(self, gateway: GatewayProcess, value: Any, path: str = "/orders") -> Tuple[int, Any]:
        """
        POST C{value} as JSON.
        """
        status, _, body = httpRequest("POST", gateway.url(path), json.dumps(value).encode(),
                                      {"Content-Type": "application/json"})
        return status, jsonOf(body)

    def checkUndecodable(self, items: List[Dict[str, Any]]) -> None:
        """
        The items of L{UNKNOWN_ID} and L{NOT_WIRE} carry their raw bytes and
        the decode-failed marker with the reason.
        """
        unknown, notWire = items
        self.assertEqual((unknown["content"], unknown["encoding"]),
                         (base64.b64encode(UNKNOWN_ID).decode(), "base64"))
        self.assertEqual(unknown["error"]["type"], "https://evgate.dev/problems/decode-failed")
        self.assertIn("(unknown-schema)", unknown["error"]["detail"])
        self.assertIn("999999", unknown["error"]["detail"])
        self.assertEqual((notWire["content"], notWire.get("encoding")), (NOT_WIRE.decode(), None))
        self.assertEqual(notWire["error"]["type"], "https://evgate.dev/problems/decode-failed")
        self.assertIn("(wire-format)", notWire["error"]["detail"])

    def checkWebhook(self, gateway: GatewayProcess, receiver: WebhookReceiver, expected: List[Any]) -> None:
        """
        The receiver got C{expected} as JSON bodies, and the two
        undecodable records went to the dead letters with the reason.
        """
        waitFor(lambda: len(receiver.delivered()) >= len(expected), 60, 0.2, "webhook deliveries")
        deliveries = [r for r in receiver.all() if 200 <= r.status < 300]
        self.assertEqual([json.loads(r.body) for r in deliveries], expected)
        self.assertEqual({r.headers["content-type"] for r in deliveries}, {"application/json"})
        dead = waitFor(lambda: self.deadLetters(2), 60, 0.5, "two dead letters")
        self.assertEqual([value for value, _ in dead], [UNKNOWN_ID, NOT_WIRE])
        self.assertEqual({headers["evgate-dlq-reason"] for _, headers in dead}, {"decode-failed"})
        self.assertIn("unknown-schema", dead[0][1]["evgate-dlq-error"])

    def deadLetters(self, count: int) -> Any:
        """
        The values and headers of the dead-letter topic, once there are
        C{count}.
        """
        consumer = Consumer({"bootstrap.servers": KAFKA, "group.id": "evgate-dlq-" + uuid.uuid4().hex[:6],
                             "enable.auto.commit": "false"})
        out = []
        try:
            consumer.assign([TopicPartition(self.dlq, 0, 0)])
            for _ in range(10):
                record = consumer.poll(0.5)
                if record is not None and record.error() is None:
                    headers = {k: (v or b"").decode() for k, v in record.headers() or ()}
                    out.append((bytes(record.value()), headers))
        finally:
            consumer.close()
        return out if len(out) >= count else None


class AvroEndToEndTests(SchemaGatewayCase):
    """
    An Avro API (the subject's latest version) through every reader and
    publisher.
    """

    def test_avroBothWays(self) -> None:
        """
        AvroSerializer's record and the two undecodable ones read back
        through GET (with a cursor and as a consumer group), SSE, WebSocket
        and a webhook; JSON posted (single, NDJSON batch, WebSocket) reads
        back through AvroDeserializer as the same values; a misfit is
        refused with its pointer and never reaches Kafka.
        """
        fromConfluent = {"id": "o-1", "total": 2**40, "items": [{"sku": "a", "price": 1.5}], "note": "hi"}
        serialize = AvroSerializer(self.confluent, ORDER_AVRO)
        produceRaw(self.topic, [serialize(fromConfluent, self.context), UNKNOWN_ID, NOT_WIRE])

        gateway = self.startGateway()
        receiver = WebhookReceiver()
        self.addCleanup(receiver.stop)
        sse = openSse(gateway.port, "/orders?format=json")
        self.addCleanup(sse.close)

        # Group mode first: the first read of the schema id waits for the
        # registry instead of marking the record.
        grouped = getItems(gateway, 3, {"X-Client-Id": "e2e-" + uuid.uuid4().hex[:6]})
        self.assertEqual(grouped[0]["content"], fromConfluent)
        self.checkUndecodable(grouped[1:])

        posted = {"id": "o-2", "total": 7, "items": [], "note": None}
        status, ack = self.post(gateway, posted)
        self.assertEqual(status, 202, ack)
        status, problem = self.post(gateway, {"id": "o-3", "total": 1, "items": [{"sku": "b", "price": "high"}],
                                              "note": None})
        self.assertEqual(status, 400, problem)
        self.assertEqual((problem["type"], problem["pointer"]),
                         ("https://evgate.dev/problems/does-not-match-schema", "/items/0/price"))
        status, problem = self.post(gateway, {"total": 1, "items": [], "note": None})
        self.assertEqual((status, problem["pointer"]), (400, "/id"), problem)
        batch = [{"id": "o-4", "total": 4, "items": [], "note": None},
                 {"id": "o-5", "total": 5, "items": [], "note": "five"}]
        status, _, body = httpRequest("POST", gateway.url("/orders"),
                                      "\n".join(json.dumps(v) for v in batch).encode(),
                                      {"Content-Type": "application/x-ndjson"})
        self.assertEqual(status, 202, body)
        viaWebsocket = {"id": "o-6", "total": 6, "items": [{"sku": "w", "price": 0.5}], "note": None}
        answers, wsMessages = websocketMessages(gateway, 7, [viaWebsocket, {"id": 6}])
        self.assertEqual(["ack" in a for a in answers], [True, False])
        self.assertEqual(answers[1]["error"]["pointer"], "/id")

        expected = [fromConfluent, posted] + batch + [viaWebsocket]
        items = getItems(gateway, 7)
        self.assertEqual([items[0]["content"]] + [i["content"] for i in items[3:]], expected)
        self.assertEqual(items[0]["headers"], {"content-type": "application/json"})
        self.checkUndecodable(items[1:3])
        self.assertEqual([m["content"] for m in wsMessages], [i["content"] for i in items])
        self.checkUndecodable(wsMessages[1:3])
        events = [json.loads(e["data"]) for e in readEvents(sse, 7)]
        self.assertEqual([e["content"] for e in events], [i["content"] for i in items])
        self.assertEqual(events[1]["error"]["type"], "https://evgate.dev/problems/decode-failed")

        # Kafka holds exactly what was accepted, in Confluent's wire format.
        records = readRaw(self.topic, 7)
        self.assertEqual(len(records), 7)
        deserialize = AvroDeserializer(self.confluent)
        decoded = [deserialize(r, self.context) for r in records[3:]]
        self.assertEqual(decoded, expected[1:])

        status, created = adminCall(gateway, "POST", "/apis/orders/subscriptions", {"callbackUrl": receiver.url})
        self.assertEqual(status, 201, created)
        self.checkWebhook(gateway, receiver, expected)

        # The AsyncAPI document carries the subject's latest schema (the
        # publishes above had the registry client fetch it).
        def payload() -> Any:
            status, document = adminCall(gateway, "GET", "/apis/orders/asyncapi")
            return document["components"]["messages"]["message"]["payload"].get("schema")
        self.assertEqual(waitFor(payload, 10, 0.2, "the schema in AsyncAPI"), json.loads(ORDER_AVRO))


class ProtobufEndToEndTests(SchemaGatewayCase):
    """
    A Protobuf API through GET, SSE, WebSocket and a webhook.
    """

    def test_protobufBothWays(self) -> None:
        """
        ProtobufSerializer's record reads back as proto3 JSON; JSON posted
        reads back through ProtobufDeserializer; a misfit is refused with
        its pointer and never reaches Kafka; undecodable records are
        marked and dead-lettered.
        """
        codec = ProtobufCodec(ORDER_PROTO)
        Order = message_factory.GetMessageClass(codec.message)
        order = Order(id="o-1", total=2**40)
        order.items.add(sku="a", price=2.5)
        order.at.FromJsonString("2024-05-01T13:45:00.250Z")
        serialize = ProtobufSerializer(Order, self.confluent, {"use.deprecated.format": False})
        produceRaw(self.topic, [serialize(order, self.context), UNKNOWN_ID, NOT_WIRE])

        gateway = self.startGateway()
        receiver = WebhookReceiver()
        self.addCleanup(receiver.stop)
        sse = openSse(gateway.port, "/orders?format=json")
        self.addCleanup(sse.close)

        fromConfluent = {"id": "o-1", "total": str(2**40), "at": "2024-05-01T13:45:00.250Z",
                         "items": [{"sku": "a", "price": 2.5}]}
        posted = {"id": "o-2", "total": "7", "at": "2024-01-02T03:04:05Z", "items": [{"sku": "z", "price": 0.25}]}
        status, ack = self.post(gateway, posted)
        self.assertEqual(status, 202, ack)
        status, problem = self.post(gateway, {"id": "o-3", "items": [{"sku": 5}]})
        self.assertEqual((status, problem.get("pointer")), (400, "/items/0/sku"), problem)

        items = getItems(gateway, 4)
        self.assertEqual([items[0]["content"], items[3]["content"]], [fromConfluent, posted])
        self.checkUndecodable(items[1:3])
        _, wsMessages = websocketMessages(gateway, 4)
        self.assertEqual([m["content"] for m in wsMessages], [i["content"] for i in items])
        events = [json.loads(e["data"]) for e in readEvents(sse, 4)]
        self.assertEqual([e["content"] for e in events], [i["content"] for i in items])

        records = readRaw(self.topic, 4)
        self.assertEqual(len(records), 4)
        deserialize = ProtobufDeserializer(Order, {"use.deprecated.format": False})
        message = deserialize(records[3], self.context)
        self.assertEqual(json_format.MessageToDict(message, preserving_proto_field_name=True), posted)

        status, created = adminCall(gateway, "POST", "/apis/orders/subscriptions", {"callbackUrl": receiver.url})
        self.assertEqual(status, 201, created)
        self.checkWebhook(gateway, receiver, [fromConfluent, posted])


class LocalSchemaEndToEndTests(SchemaGatewayCase):
    """
    A local .avsc file, no registry needed: bare Avro on the topic.
    """

    def test_localAvroFile(self) -> None:
        """
        With C{value-schema = file:...} and no schema id, JSON posted is
        written as bare Avro binary (what a producer with the same file
        writes) and read back as the same JSON.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(os.path.abspath(directory), "order.avsc")
        with open(path, "w") as f:
            f.write(ORDER_AVRO)
        gateway = self.startGateway(**{"value-schema": f"file:{path}"})
        posted = {"id": "o-1", "total": 3, "items": [{"sku": "a", "price": 1.0}], "note": None}
        self.assertEqual(self.post(gateway, posted)[0], 202)
        status, problem = self.post(gateway, {"id": "o-2"})
        self.assertEqual((status, problem["pointer"]), (400, "/total"), problem)
        self.assertEqual(getItems(gateway, 1)[0]["content"], posted)
        records = readRaw(self.topic, 1)
        self.assertEqual(len(records), 1)
        # The bare encoding: fastavro (what AvroDeserializer uses) reads it
        # with the same file and no header.
        schema = fastavro.parse_schema(json.loads(ORDER_AVRO))
        self.assertEqual(fastavro.schemaless_reader(io.BytesIO(records[0]), schema), posted)
