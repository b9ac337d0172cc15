"""
The schema layer against the real registry of scripts/dev-services
(Apicurio Registry, Confluent API at $EVGATE_SCHEMA_REGISTRY_URL) and real
Kafka: records that confluent-kafka's own serializers write, carried
through a topic, decode through evgate's decoder to the expected JSON; and
bytes that evgate's encoder writes decode with confluent-kafka's
deserializers to the same values. Avro, Protobuf and JSON Schema.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any, Callable, Tuple

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.json_schema import JSONDeserializer, JSONSerializer
from confluent_kafka.schema_registry.protobuf import ProtobufDeserializer, ProtobufSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from google.protobuf import json_format, message_factory
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from evgate.schemas.protobuf import ProtobufCodec
from evgate.schemas.registry import RegistryClient
from evgate.schemas.serde import SchemaDecoder, SchemaEncoder

KAFKA = f"127.0.0.1:{os.environ.get('EVGATE_KAFKA_PORT', '9092')}"
REGISTRY = os.environ.get("EVGATE_SCHEMA_REGISTRY_URL",
                          f"http://127.0.0.1:{os.environ.get('EVGATE_REGISTRY_PORT', '8085')}/apis/ccompat/v7")

ORDER_AVRO = json.dumps({
    "type": "record", "name": "Order", "namespace": "shop",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "total", "type": "long"},
        {"name": "items", "type": {"type": "array", "items": {
            "type": "record", "name": "Item",
            "fields": [{"name": "sku", "type": "string"}, {"name": "price", "type": "double"}]}}},
        {"name": "note", "type": ["null", "string"], "default": None},
        {"name": "state", "type": {"type": "enum", "name": "State", "symbols": ["NEW", "PAID"]}},
        {"name": "blob", "type": "bytes"},
    ],
})

ORDER_PROTO = """
syntax = "proto3";
package shop.it;
import "google/protobuf/timestamp.proto";

message Order {
  string id = 1;
  repeated Item items = 2;
  google.protobuf.Timestamp at = 3;
  int64 total = 4;
  message Item {
    string sku = 1;
    double price = 2;
  }
}
"""

ORDER_JSON_SCHEMA = json.dumps({
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "Order", "type": "object",
    "properties": {"id": {"type": "string"}, "total": {"type": "integer"},
                   "items": {"type": "array", "items": {"type": "object",
                                                        "properties": {"price": {"type": "number"}}}}},
    "required": ["id"],
})


def roundTripThroughKafka(topic: str, value: bytes) -> bytes:
    """
    Produce C{value} to C{topic} and read it back from its offset (in a
    thread: confluent-kafka's calls block).
    """
    producer = Producer({"bootstrap.servers": KAFKA, "message.timeout.ms": "10000"})
    delivered: list = []
    producer.produce(topic, value, on_delivery=lambda err, msg: delivered.append((err, msg)))
    producer.flush(15)
    err, msg = delivered[0]
    assert err is None, err
    consumer = Consumer({"bootstrap.servers": KAFKA, "group.id": "evgate-schemas-it",
                         "enable.auto.commit": "false"})
    try:
        consumer.assign([TopicPartition(topic, msg.partition(), msg.offset())])
        for _ in range(30):
            got = consumer.poll(1.0)
            if got is not None and got.error() is None:
                return bytes(got.value())
        raise AssertionError(f"nothing read back from {topic}")
    finally:
        consumer.close()


class SchemaIntegrationTests(TestCase):
    """
    evgate's codecs and confluent-kafka's serializers agree, through the
    real registry and Kafka.
    """

    timeout = 120

    def setUp(self) -> None:
        self.topic = "evgate-schemas-" + uuid.uuid4().hex[:10]
        self.subject = self.topic + "-value"
        self.context = SerializationContext(self.topic, MessageField.VALUE)
        self.confluent = SchemaRegistryClient({"url": REGISTRY})
        self.registry = RegistryClient(REGISTRY, reactor=reactor)
        self.addCleanup(self.registry.close)

    def inThread(self, f: Callable[..., Any], *args: Any) -> Deferred:
        """
        C{f(*args)} off the reactor thread (confluent-kafka's clients block).
        """
        return deferToThread(f, *args)

    @inlineCallbacks
    def test_avroFromConfluent(self) -> Any:
        """
        AvroSerializer's bytes, through Kafka, decode to the JSON mapping.
        """
        record = {"id": "o-1", "total": 2**40, "items": [{"sku": "a", "price": 1.5}], "note": "hi",
                  "state": "PAID", "blob": b"\x00\xff"}
        serializer = AvroSerializer(self.confluent, ORDER_AVRO)
        data = yield self.inThread(lambda: roundTripThroughKafka(self.topic, serializer(record, self.context)))
        decoded = yield SchemaDecoder(self.registry).decode(data)
        self.assertEqual(decoded.schemaType, "AVRO")
        self.assertEqual(decoded.schemaId, int.from_bytes(data[1:5], "big"))
        self.assertEqual(decoded.value, dict(record, blob="AP8="))

    @inlineCallbacks
    def test_avroToConfluent(self) -> Any:
        """
        evgate's encoder writes bytes that AvroDeserializer reads as the
        same values, with the subject's registered id.
        """
        schemaId = yield self.registry.register(self.subject, ORDER_AVRO)
        value = {"id": "o-2", "total": -5, "items": [], "note": None, "state": "NEW", "blob": "AAE="}
        data = yield SchemaEncoder(self.registry, self.subject).encode(value)
        self.assertEqual(int.from_bytes(data[1:5], "big"), schemaId)
        data = yield self.inThread(roundTripThroughKafka, self.topic, data)
        deserializer = AvroDeserializer(self.confluent)
        record = yield self.inThread(deserializer, data, self.context)
        self.assertEqual(record, dict(value, blob=b"\x00\x01"))

    def protobufClasses(self) -> Tuple[Any, Any]:
        """
        Message classes of L{ORDER_PROTO} built at run time (what a
        producer's generated code would be).
        """
        codec = ProtobufCodec(ORDER_PROTO)
        return (message_factory.GetMessageClass(codec.message),
                message_factory.GetMessageClass(codec.messageAt([0, 0])))

    @inlineCallbacks
    def test_protobufFromConfluent(self) -> Any:
        """
        ProtobufSerializer's bytes (top-level and nested messages, with
        their index arrays), through Kafka, decode to the proto3 JSON mapping.
        """
        Order, Item = self.protobufClasses()
        order = Order(id="o-3", total=2**40)
        order.items.add(sku="a", price=2.5)
        order.at.FromJsonString("2024-05-01T13:45:00.250Z")
        config = {"use.deprecated.format": False}
        serialize = ProtobufSerializer(Order, self.confluent, config)
        data = yield self.inThread(lambda: roundTripThroughKafka(self.topic, serialize(order, self.context)))
        decoded = yield SchemaDecoder(self.registry).decode(data)
        self.assertEqual(decoded.schemaType, "PROTOBUF")
        self.assertEqual(decoded.value, {"id": "o-3", "total": str(2**40), "at": "2024-05-01T13:45:00.250Z",
                                         "items": [{"sku": "a", "price": 2.5}]})

        itemContext = SerializationContext(self.topic + "-item", MessageField.VALUE)
        serializeItem = ProtobufSerializer(Item, self.confluent, config)
        data = yield self.inThread(lambda: serializeItem(Item(sku="b", price=1.0), itemContext))
        self.assertEqual(data[5:8], b"\x04\x00\x00")  # index array [0, 0]
        decoded = yield SchemaDecoder(self.registry).decode(data)
        self.assertEqual(decoded.value, {"sku": "b", "price": 1.0})

    @inlineCallbacks
    def test_protobufToConfluent(self) -> Any:
        """
        evgate's encoder, with a .proto registered as text, writes bytes
        that ProtobufDeserializer reads as the same message.
        """
        yield self.registry.register(self.subject, ORDER_PROTO, "PROTOBUF")
        value = {"id": "o-4", "total": "7", "items": [{"sku": "z", "price": 0.25}], "at": "2024-01-02T03:04:05Z"}
        data = yield SchemaEncoder(self.registry, self.subject).encode(value)
        self.assertEqual(data[5:6], b"\x00")  # index array [0], Confluent's shortcut
        data = yield self.inThread(roundTripThroughKafka, self.topic, data)
        Order, _ = self.protobufClasses()
        deserializer = ProtobufDeserializer(Order, {"use.deprecated.format": False})
        message = yield self.inThread(deserializer, data, self.context)
        self.assertEqual(json_format.MessageToDict(message, preserving_proto_field_name=True), value)

    @inlineCallbacks
    def test_jsonSchemaBothWays(self) -> Any:
        """
        JSONSerializer's bytes decode through evgate; evgate's bytes decode
        through JSONDeserializer; evgate refuses what the schema refuses.
        """
        from evgate.schemas.errors import EncodeError

        value = {"id": "o-5", "total": 3, "items": [{"price": 1.5}]}
        serializer = JSONSerializer(ORDER_JSON_SCHEMA, self.confluent)
        data = yield self.inThread(lambda: roundTripThroughKafka(self.topic, serializer(value, self.context)))
        decoded = yield SchemaDecoder(self.registry).decode(data)
        self.assertEqual((decoded.schemaType, decoded.value), ("JSON", value))

        data = yield SchemaEncoder(self.registry, self.subject).encode(value)
        record = yield self.inThread(JSONDeserializer(ORDER_JSON_SCHEMA), data, self.context)
        self.assertEqual(record, value)
        error = yield self.assertFailure(SchemaEncoder(self.registry, self.subject).encode(
            {"id": "o-6", "items": [{"price": "free"}]}), EncodeError)
        self.assertEqual(error.pointer, "/items/0/price")
