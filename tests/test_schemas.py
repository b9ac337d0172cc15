"""
Unit tests of the schema layer (L{evgate.schemas}): the Confluent wire
format, each codec and its JSON mapping, the pointers of encode errors, the
registry client and its caches (against a stub registry through
C{StubTreq}), the decoder and encoder, local schema files and the
configuration keys. The cross-checks against a real registry and
confluent-kafka's own serializers are in L{tests.test_schemas_integration}.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from typing import Any, Dict, List, Optional, Tuple

from hypothesis import given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from zope.interface.verify import verifyObject

from evgate.config import ConfigError, parseConfig
from evgate.interfaces import ISchemaCodec
from evgate.schemas import wire
from evgate.schemas.avro import AvroCodec
from evgate.schemas.codecs import makeCodec, readLocalSchema
from evgate.schemas.errors import DecodeError, EncodeError, RegistryError, SchemaError
from evgate.schemas.json_schema import JsonSchemaCodec
from evgate.schemas.protobuf import ProtobufCodec
from evgate.schemas.registry import RegistryClient
from evgate.schemas.serde import SchemaDecoder, SchemaEncoder

ORDER_AVRO = {
    "type": "record", "name": "Order", "namespace": "shop",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "count", "type": "int"},
        {"name": "total", "type": "long"},
        {"name": "ratio", "type": "double"},
        {"name": "paid", "type": "boolean"},
        {"name": "blob", "type": "bytes"},
        {"name": "state", "type": {"type": "enum", "name": "State", "symbols": ["NEW", "PAID", "SHIPPED"]}},
        {"name": "tags", "type": {"type": "map", "values": "string"}},
        {"name": "items", "type": {"type": "array", "items": {
            "type": "record", "name": "Item",
            "fields": [{"name": "sku", "type": "string"}, {"name": "price", "type": "double"}]}}},
        {"name": "note", "type": ["null", "string"], "default": None},
        {"name": "choice", "type": ["null", "int", "string", "Item"]},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "day", "type": {"type": "int", "logicalType": "date"}},
        {"name": "amount", "type": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}},
        {"name": "ref", "type": {"type": "string", "logicalType": "uuid"}},
    ],
}

ORDER_PROTO = """
syntax = "proto3";
package shop;
import "google/protobuf/timestamp.proto";

message Order {
  string id = 1;
  repeated Item items = 2;
  google.protobuf.Timestamp at = 3;
  int64 total = 4;
  map<string, string> tags = 5;
  State state = 6;
  bytes blob = 7;
  message Item {
    string sku = 1;
    double price = 2;
  }
}

enum State {
  NEW = 0;
  PAID = 1;
}

message Other {
  int32 x = 1;
}
"""

ORDER_JSON_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "items": {"type": "array", "items": {
            "type": "object", "properties": {"price": {"type": "number", "minimum": 0}}, "required": ["price"]}},
    },
    "required": ["id"],
}


def sampleOrder() -> Dict[str, Any]:
    """
    A JSON value of L{ORDER_AVRO}.
    """
    return {
        "id": "o-1", "count": 3, "total": 2**40, "ratio": 0.5, "paid": True,
        "blob": base64.b64encode(b"\x00\x01\xff").decode(), "state": "PAID", "tags": {"k": "v"},
        "items": [{"sku": "a", "price": 1.5}, {"sku": "b", "price": 2.0}],
        "note": None, "choice": {"shop.Item": {"sku": "c", "price": 3.25}},
        "at": "2024-05-01T13:45:00.250Z", "day": "2024-05-01", "amount": "12.50",
        "ref": "6c1d2f0e-3b9a-4a8c-9a0e-2d1f6f6b1c3e",
    }


# ---------------------------------------------------------------- wire format


class WireFormatTests(SynchronousTestCase):
    """
    The Confluent wire format: header, schema id, message-index arrays.
    """

    def test_packUnpack(self) -> None:
        """
        The header is the magic byte 0 and the big-endian id; unpack gives
        back the id and the payload.
        """
        data = wire.pack(258, b"payload")
        self.assertEqual(data, b"\x00\x00\x00\x01\x02payload")
        self.assertEqual(wire.unpack(data), (258, b"payload"))

    def test_firstMessageShortcut(self) -> None:
        """
        The index array [0] is the single byte 0, as Confluent writes it,
        and reads back as [0].
        """
        self.assertEqual(wire.encodeIndexes([0]), b"\x00")
        self.assertEqual(wire.decodeIndexes(b"\x00rest"), ([0], 1))

    def test_indexesAsConfluentWritesThem(self) -> None:
        """
        [0, 0] (a nested message) is count 2 then two zeros, all zigzag:
        the bytes confluent-kafka's ProtobufSerializer writes.
        """
        self.assertEqual(wire.encodeIndexes([0, 0]), b"\x04\x00\x00")
        self.assertEqual(wire.encodeIndexes([1]), b"\x02\x02")
        self.assertEqual(wire.decodeIndexes(b"\x04\x00\x00"), ([0, 0], 3))

    @given(st.lists(st.integers(min_value=0, max_value=2**31 - 1), min_size=1, max_size=20))
    def test_indexesRoundTrip(self, indexes: List[int]) -> None:
        """
        Any index array reads back as written.
        """
        encoded = wire.encodeIndexes(indexes)
        self.assertEqual(wire.decodeIndexes(encoded + b"tail"), (indexes, len(encoded)))

    def test_wrongMagic(self) -> None:
        """
        A first byte other than 0 is a DecodeError of reason wire-format.
        """
        error = self.assertRaises(DecodeError, wire.unpack, b"\x01\x00\x00\x00\x01x")
        self.assertEqual(error.reason, "wire-format")
        self.assertIn("magic byte", error.message)

    def test_tooShort(self) -> None:
        """
        Fewer than 5 bytes cannot hold a header.
        """
        error = self.assertRaises(DecodeError, wire.unpack, b"\x00\x00")
        self.assertEqual(error.reason, "wire-format")

    @given(st.binary(max_size=30))
    def test_indexesNeverRaiseOthers(self, data: bytes) -> None:
        """
        Arbitrary bytes as an index array give an array or a DecodeError.
        """
        try:
            wire.decodeIndexes(data)
        except DecodeError:
            pass


# ---------------------------------------------------------------- Avro


def _avroValues() -> st.SearchStrategy:
    item = st.fixed_dictionaries({"sku": st.text(max_size=10),
                                  "price": st.floats(allow_nan=False, allow_infinity=False)})
    return st.fixed_dictionaries({
        "id": st.text(max_size=20),
        "count": st.integers(min_value=-(2**31), max_value=2**31 - 1),
        "total": st.integers(min_value=-(2**63), max_value=2**63 - 1),
        "ratio": st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(["NaN", "Infinity", "-Infinity"]),
        "paid": st.booleans(),
        "blob": st.binary(max_size=20).map(lambda b: base64.b64encode(b).decode()),
        "state": st.sampled_from(["NEW", "PAID", "SHIPPED"]),
        "tags": st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
        "items": st.lists(item, max_size=3),
        "note": st.none() | st.text(max_size=10),
        "choice": st.none() | st.builds(lambda i: {"int": i}, st.integers(-(2**31), 2**31 - 1))
        | st.builds(lambda s: {"string": s}, st.text(max_size=5)) | item.map(lambda i: {"shop.Item": i}),
        "at": st.integers(min_value=0, max_value=2**41).map(
            lambda ms: __import__("datetime").datetime.fromtimestamp(ms / 1000, __import__("datetime").timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z")),
        "day": st.dates().map(lambda d: d.isoformat()),
        "amount": st.decimals(min_value=-9999999, max_value=9999999, places=2).map(lambda d: format(d, "f")),
        "ref": st.uuids().map(str),
    })


class AvroCodecTests(SynchronousTestCase):
    """
    The Avro codec and its JSON mapping.
    """

    def setUp(self) -> None:
        self.codec = AvroCodec(json.dumps(ORDER_AVRO))

    def test_interface(self) -> None:
        """
        The codec provides ISchemaCodec.
        """
        self.assertTrue(verifyObject(ISchemaCodec, self.codec))

    def test_roundTrip(self) -> None:
        """
        A JSON value encodes and decodes back to itself, in the documented
        mapping (base64 bytes, wrapped multi-branch unions, ISO dates).
        """
        value = sampleOrder()
        self.assertEqual(self.codec.decode(self.codec.encode(value)), value)

    @settings(max_examples=60, deadline=None)
    @given(_avroValues())
    def test_arbitraryRecordsRoundTrip(self, value: Dict[str, Any]) -> None:
        """
        Any record of the schema round-trips through the binary encoding.
        """
        decoded = self.codec.decode(self.codec.encode(value))
        self.assertEqual(json.dumps(decoded, sort_keys=True), json.dumps(value, sort_keys=True))

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=200))
    def test_decodeRaisesOnlyDecodeError(self, data: bytes) -> None:
        """
        Arbitrary bytes decode to a value or raise DecodeError, nothing else.
        """
        try:
            self.codec.decode(data)
        except DecodeError:
            pass

    def test_pointerIntoArray(self) -> None:
        """
        A wrong value deep in the record is named by its JSON Pointer.
        """
        value = sampleOrder()
        value["items"][1]["price"] = "free"
        error = self.assertRaises(EncodeError, self.codec.encode, value)
        self.assertEqual(error.pointer, "/items/1/price")
        self.assertIn("expected a number", error.detail)

    def test_unknownField(self) -> None:
        """
        A field the record does not have is refused by name.
        """
        value = dict(sampleOrder(), colour="red")
        self.assertEqual(self.assertRaises(EncodeError, self.codec.encode, value).pointer, "/colour")

    def test_missingField(self) -> None:
        """
        A required field without default is named when missing; a field
        with a default may be left out.
        """
        value = sampleOrder()
        del value["count"]
        self.assertEqual(self.assertRaises(EncodeError, self.codec.encode, value).pointer, "/count")
        value = sampleOrder()
        del value["note"]
        self.assertIsNone(self.codec.decode(self.codec.encode(value))["note"])

    def test_intRange(self) -> None:
        """
        An int beyond 32 bits is refused with its pointer.
        """
        error = self.assertRaises(EncodeError, self.codec.encode, dict(sampleOrder(), count=2**31))
        self.assertEqual(error.pointer, "/count")

    def test_unionBranch(self) -> None:
        """
        A multi-branch union takes {"branch": value}; an unknown branch is named.
        """
        error = self.assertRaises(EncodeError, self.codec.encode, dict(sampleOrder(), choice={"long": 1}))
        self.assertEqual(error.pointer, "/choice/long")
        error = self.assertRaises(EncodeError, self.codec.encode, dict(sampleOrder(), choice=5))
        self.assertEqual(error.pointer, "/choice")

    def test_enumAndDecimal(self) -> None:
        """
        An unknown enum symbol and a decimal with too many places are refused.
        """
        self.assertEqual(self.assertRaises(EncodeError, self.codec.encode,
                                           dict(sampleOrder(), state="LOST")).pointer, "/state")
        self.assertEqual(self.assertRaises(EncodeError, self.codec.encode,
                                           dict(sampleOrder(), amount="1.234")).pointer, "/amount")

    def test_badBase64(self) -> None:
        """
        Bytes are base64; anything else is refused.
        """
        self.assertEqual(self.assertRaises(EncodeError, self.codec.encode,
                                           dict(sampleOrder(), blob="not base64!")).pointer, "/blob")

    def test_trailingBytes(self) -> None:
        """
        Bytes left after the value mean it was not written with this schema.
        """
        data = self.codec.encode(sampleOrder()) + b"\x00"
        self.assertIn("after the value", self.assertRaises(DecodeError, self.codec.decode, data).message)

    def test_badSchema(self) -> None:
        """
        A schema fastavro cannot parse is a SchemaError.
        """
        self.assertRaises(SchemaError, AvroCodec, '{"type": "nope"}')
        self.assertRaises(SchemaError, AvroCodec, '{"type": ')


# ---------------------------------------------------------------- Protobuf


class ProtobufCodecTests(SynchronousTestCase):
    """
    The Protobuf codec: descriptors from .proto text, proto3 JSON mapping.
    """

    def setUp(self) -> None:
        self.codec = ProtobufCodec(ORDER_PROTO)

    def test_interface(self) -> None:
        """
        The codec provides ISchemaCodec and writes the first message.
        """
        self.assertTrue(verifyObject(ISchemaCodec, self.codec))
        self.assertEqual(self.codec.message.full_name, "shop.Order")
        self.assertEqual(self.codec.indexes, [0])

    def test_roundTrip(self) -> None:
        """
        JSON to payload and back, in the proto3 JSON mapping with field
        names as written and default values present.
        """
        value = {"id": "o-1", "items": [{"sku": "a", "price": 1.5}], "at": "2024-05-01T13:45:00.250Z",
                 "total": "1099511627776", "tags": {"k": "v"}, "state": "PAID", "blob": "AAH/"}
        self.assertEqual(self.codec.decode(self.codec.encode(value), [0]), value)
        self.assertEqual(self.codec.decode(self.codec.encode({}), [0]),
                         {"id": "", "items": [], "total": "0", "tags": {}, "state": "NEW", "blob": ""})

    def test_nestedMessage(self) -> None:
        """
        A nested message is found by its name and has the index array
        Confluent gives it.
        """
        item = ProtobufCodec(ORDER_PROTO, messageName="Order.Item")
        # nested_types of Order: TagsEntry (the map) first, then Item
        self.assertEqual(item.indexes, [0, 1])
        self.assertEqual(item.decode(item.encode({"sku": "x", "price": 2}), [0, 1]), {"sku": "x", "price": 2.0})

    def test_pointers(self) -> None:
        """
        Parse errors name the field by JSON Pointer, whether json_format's
        message names the path or not.
        """
        cases = [
            ({"items": [{"sku": "a"}, {"price": "free"}]}, "/items/1/price"),
            ({"colour": 1}, "/colour"),
            ({"tags": {"k": 1}}, "/tags/k"),
            ({"id": 5}, "/id"),
            ({"state": "LOST"}, "/state"),
        ]
        for value, pointer in cases:
            error = self.assertRaises(EncodeError, self.codec.encode, value)
            self.assertEqual(error.pointer, pointer, value)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=200), st.sampled_from([[0], [1], [0, 1], [5]]))
    def test_decodeRaisesOnlyDecodeError(self, data: bytes, indexes: List[int]) -> None:
        """
        Arbitrary bytes decode to a value or raise DecodeError, nothing else.
        """
        try:
            self.codec.decode(data, indexes)
        except DecodeError:
            pass

    def test_badProto(self) -> None:
        """
        protoc's diagnostics are in the SchemaError.
        """
        error = self.assertRaises(SchemaError, ProtobufCodec, 'syntax = "proto3"; message X { strin a = 1; }')
        self.assertIn('"strin" is not defined', error.message)

    def test_serializedDescriptor(self) -> None:
        """
        A schema given as a base64 FileDescriptorProto (as Confluent's
        serializers register it) is read without protoc.
        """
        from google.protobuf import descriptor_pb2

        proto = descriptor_pb2.FileDescriptorProto()
        self.codec.file.CopyToProto(proto)
        text = base64.b64encode(proto.SerializeToString()).decode()
        again = ProtobufCodec(text)
        value = {"id": "x", "at": "2024-01-01T00:00:00Z"}
        self.assertEqual(again.decode(self.codec.encode(value), [0])["at"], "2024-01-01T00:00:00Z")


# ---------------------------------------------------------------- JSON Schema


class JsonSchemaCodecTests(SynchronousTestCase):
    """
    The JSON Schema codec: JSON text, validated on encode.
    """

    def test_validates(self) -> None:
        """
        A valid value is written as compact JSON text; an invalid one is
        refused with the pointer of its error.
        """
        codec = JsonSchemaCodec(json.dumps(ORDER_JSON_SCHEMA))
        self.assertTrue(verifyObject(ISchemaCodec, codec))
        self.assertEqual(codec.encode({"id": "a", "items": []}), b'{"id":"a","items":[]}')
        error = self.assertRaises(EncodeError, codec.encode, {"id": "a", "items": [{"price": -1}]})
        self.assertEqual(error.pointer, "/items/0/price")

    def test_draft7ByDefault(self) -> None:
        """
        Without $schema the schema is Draft 7 (where "items" may be an
        array of schemas, a form Draft 2020-12 dropped).
        """
        codec = JsonSchemaCodec(json.dumps({"type": "array", "items": [{"type": "string"}, {"type": "integer"}]}))
        self.assertEqual(self.assertRaises(EncodeError, codec.encode, ["a", "b"]).pointer, "/1")

    def test_decode(self) -> None:
        """
        Payloads are JSON text; anything else is a DecodeError.
        """
        codec = JsonSchemaCodec("{}")
        self.assertEqual(codec.decode(b'{"a": [1]}'), {"a": [1]})
        self.assertRaises(DecodeError, codec.decode, b"\xff{")


# ---------------------------------------------------------------- registry client


class FakeRegistry(Resource):
    """
    Just enough of the Confluent REST API, counting requests.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.schemas: Dict[int, Dict[str, Any]] = {}
        self.subjects: Dict[str, List[int]] = {}
        self.requests: List[Tuple[bytes, bytes, Optional[bytes]]] = []
        self.down = False

    def add(self, subject: str, schemaId: int, text: str, schemaType: Optional[str] = None) -> None:
        """
        Register C{text} as C{schemaId}, the next version of C{subject}.
        """
        entry: Dict[str, Any] = {"schema": text}
        if schemaType:
            entry["schemaType"] = schemaType
        self.schemas[schemaId] = entry
        self.subjects.setdefault(subject, []).append(schemaId)

    def render(self, request: Any) -> bytes:  # noqa: D401 - twisted.web's name
        self.requests.append((request.method, request.path, request.getHeader(b"authorization")))
        request.setHeader(b"Content-Type", b"application/vnd.schemaregistry.v1+json")
        if self.down:
            request.setResponseCode(503)
            return b'{"error_code": 50301, "message": "down"}'
        parts = request.path.decode().removeprefix("/apis/ccompat/v7").split("/")
        if parts[1:3] == ["schemas", "ids"] and int(parts[3]) in self.schemas:
            return json.dumps(self.schemas[int(parts[3])]).encode()
        if parts[1] == "subjects" and parts[2] in self.subjects:
            ids = self.subjects[parts[2]]
            version = len(ids) if parts[4] == "latest" else int(parts[4])
            if 1 <= version <= len(ids):
                return json.dumps(dict(self.schemas[ids[version - 1]], subject=parts[2], version=version,
                                       id=ids[version - 1])).encode()
        request.setResponseCode(404)
        return b'{"error_code": 40403, "message": "Schema not found"}'


class RegistryClientTests(SynchronousTestCase):
    """
    The registry client's requests and caches, through StubTreq.
    """

    def setUp(self) -> None:
        self.registry = FakeRegistry()
        self.registry.add("orders-value", 7, json.dumps(ORDER_AVRO))
        self.clock = Clock()
        self.stub = StubTreq(self.registry)
        self.client = RegistryClient("http://registry/apis/ccompat/v7", reactor=self.clock, http=self.stub,
                                     subjectTtl=30)

    def result(self, d: Any) -> Any:
        """
        The result of C{d} once the stub has answered.
        """
        self.stub.flush()
        return self.successResultOf(d)

    def test_byIdCachedForever(self) -> None:
        """
        A schema asked by id is fetched once, and still known when the
        registry is down.
        """
        schema = self.result(self.client.schemaById(7))
        self.assertEqual((schema.schemaId, schema.schemaType), (7, "AVRO"))
        self.registry.down = True
        self.clock.advance(3600)
        self.assertIs(self.result(self.client.schemaById(7)), schema)
        self.assertEqual(len(self.registry.requests), 1)

    def test_concurrentAsksShareARequest(self) -> None:
        """
        Two asks for one id before the answer make one request.
        """
        first, second = self.client.schemaById(7), self.client.schemaById(7)
        self.stub.flush()
        self.assertIs(self.successResultOf(first), self.successResultOf(second))
        self.assertEqual(len(self.registry.requests), 1)

    def test_latestHasATtl(self) -> None:
        """
        The latest version is cached for the TTL, then asked again (and a
        new version is seen).
        """
        self.assertEqual(self.result(self.client.subjectVersion("orders-value")).schemaId, 7)
        self.registry.add("orders-value", 8, json.dumps(ORDER_AVRO))
        self.assertEqual(self.result(self.client.subjectVersion("orders-value")).schemaId, 7)
        self.clock.advance(31)
        self.assertEqual(self.result(self.client.subjectVersion("orders-value")).version, 2)

    def test_staleLatestWhileDown(self) -> None:
        """
        Past its TTL, the latest version is still used while the registry
        cannot answer.
        """
        self.result(self.client.subjectVersion("orders-value"))
        self.registry.down = True
        self.clock.advance(31)
        self.assertEqual(self.result(self.client.subjectVersion("orders-value")).schemaId, 7)

    def test_notFound(self) -> None:
        """
        An unknown id is a RegistryError that says so, with the registry's code.
        """
        d = self.client.schemaById(99)
        self.stub.flush()
        error = self.failureResultOf(d, RegistryError).value
        self.assertTrue(error.notFound)
        self.assertEqual(error.code, 40403)

    def test_basicAuth(self) -> None:
        """
        A username and password go as HTTP basic auth.
        """
        client = RegistryClient("http://registry", username="u", password="p", reactor=self.clock, http=self.stub)
        self.result(client.schemaById(7))
        self.assertEqual(self.registry.requests[-1][2], b"Basic " + base64.b64encode(b"u:p"))

    def test_protobufTypeInferred(self) -> None:
        """
        A schema whose answer names no type is Protobuf when it is not JSON
        (Apicurio omits schemaType for descriptor-registered Protobuf).
        """
        self.registry.add("p", 9, base64.b64encode(b"\x0a\x01x").decode())
        self.assertEqual(self.result(self.client.schemaById(9)).schemaType, "PROTOBUF")

    def test_timeout(self) -> None:
        """
        A registry that never answers is a RegistryError after the timeout.
        """
        from twisted.internet.defer import Deferred

        class Silent:
            def request(self, *args: Any, **kwargs: Any) -> Deferred:
                return Deferred()

        client = RegistryClient("http://registry", reactor=self.clock, http=Silent(), timeout=5)
        d = client.schemaById(1)
        self.clock.advance(5)
        self.assertIn("no answer within 5 s", self.failureResultOf(d, RegistryError).value.message)


class DecoderEncoderTests(SynchronousTestCase):
    """
    The decoder and encoder on a stub registry.
    """

    def setUp(self) -> None:
        self.registry = FakeRegistry()
        self.registry.add("orders-value", 7, json.dumps(ORDER_AVRO))
        self.registry.add("proto-value", 8, ORDER_PROTO, "PROTOBUF")
        self.stub = StubTreq(self.registry)
        self.client = RegistryClient("http://registry", reactor=Clock(), http=self.stub)

    def test_encodeThenDecode(self) -> None:
        """
        The encoder writes the subject's schema id in the header; the
        decoder reads it back to the same JSON.
        """
        encoder = SchemaEncoder(self.client, "orders-value")
        decoder = SchemaDecoder(self.client)
        d = encoder.encode(sampleOrder())
        self.stub.flush()
        data = self.successResultOf(d)
        self.assertEqual(data[:5], b"\x00\x00\x00\x00\x07")
        d = decoder.decode(data)
        self.stub.flush()
        decoded = self.successResultOf(d)
        self.assertEqual((decoded.value, decoded.schemaId, decoded.schemaType), (sampleOrder(), 7, "AVRO"))
        self.assertEqual(decoder.decodeKnown(data), decoded)

    def test_protobufWithIndexes(self) -> None:
        """
        Protobuf payloads carry the index array after the id.
        """
        d = SchemaEncoder(self.client, "proto-value").encode({"id": "x"})
        self.stub.flush()
        data = self.successResultOf(d)
        self.assertEqual(data[:6], b"\x00\x00\x00\x00\x08\x00")
        d = SchemaDecoder(self.client).decode(data)
        self.stub.flush()
        self.assertEqual(self.successResultOf(d).value["id"], "x")

    def test_unknownSchemaId(self) -> None:
        """
        An id the registry does not know is a DecodeError unknown-schema.
        """
        d = SchemaDecoder(self.client).decode(wire.pack(42, b"\x00"))
        self.stub.flush()
        error = self.failureResultOf(d, DecodeError).value
        self.assertEqual((error.reason, error.schemaId), ("unknown-schema", 42))

    def test_registryDownKnownSchema(self) -> None:
        """
        Once a schema is known, its messages decode while the registry is
        down; an unknown one is registry-unavailable.
        """
        decoder = SchemaDecoder(self.client)
        data = wire.pack(7, AvroCodec(json.dumps(ORDER_AVRO)).encode(sampleOrder()))
        d = decoder.decode(data)
        self.stub.flush()
        self.successResultOf(d)
        self.registry.down = True
        self.assertEqual(self.successResultOf(decoder.decode(data)).value, sampleOrder())
        d = decoder.decode(wire.pack(8, b"\x00"))
        self.stub.flush()
        self.assertEqual(self.failureResultOf(d, DecodeError).value.reason, "registry-unavailable")

    def test_wrongMagicFailsTheDeferred(self) -> None:
        """
        Bytes that are not wire format fail the Deferred with DecodeError.
        """
        self.assertEqual(self.failureResultOf(SchemaDecoder(self.client).decode(b"plain json"),
                                              DecodeError).value.reason, "wire-format")

    def test_encodeErrorCarriesPointer(self) -> None:
        """
        A value that does not fit fails the Deferred with the pointer.
        """
        value = dict(sampleOrder(), count="three")
        d = SchemaEncoder(self.client, "orders-value").encode(value)
        self.stub.flush()
        self.assertEqual(self.failureResultOf(d, EncodeError).value.pointer, "/count")


# ---------------------------------------------------------------- local schema files


class LocalSchemaTests(SynchronousTestCase):
    """
    Schemas from files, without a registry.
    """

    def write(self, name: str, text: str) -> str:
        """
        A file C{name} holding C{text}, in a fresh directory.
        """
        directory = tempfile.mkdtemp()
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_bareEncoding(self) -> None:
        """
        Without a schema id, a local schema writes and reads the bare encoding.
        """
        local = readLocalSchema(self.write("orders.avsc", json.dumps(ORDER_AVRO)))
        data = self.successResultOf(SchemaEncoder(local=local).encode(sampleOrder()))
        self.assertEqual(data, AvroCodec(json.dumps(ORDER_AVRO)).encode(sampleOrder()))
        decoded = self.successResultOf(SchemaDecoder(local=local).decode(data))
        self.assertEqual((decoded.value, decoded.schemaId), (sampleOrder(), None))

    def test_withSchemaId(self) -> None:
        """
        With a schema id, the wire-format header (and for Protobuf the index
        array) is written and read.
        """
        local = readLocalSchema(self.write("orders.proto", ORDER_PROTO), schemaId=5, messageName="Other")
        data = self.successResultOf(SchemaEncoder(local=local).encode({"x": 3}))
        self.assertEqual(data[:6], b"\x00\x00\x00\x00\x05\x02")
        self.assertEqual(self.successResultOf(SchemaDecoder(local=local).decode(data)).value, {"x": 3})
        other = wire.pack(6, b"")
        self.assertEqual(self.failureResultOf(SchemaDecoder(local=local).decode(other), DecodeError).value.reason,
                         "unknown-schema")

    def test_kindFromName(self) -> None:
        """
        The kind comes from the file name; others are refused.
        """
        self.assertEqual(readLocalSchema(self.write("o.json", json.dumps(ORDER_JSON_SCHEMA))).schemaType, "JSON")
        self.assertRaises(SchemaError, readLocalSchema, self.write("o.txt", "{}"))
        self.assertRaises(SchemaError, makeCodec, "XML", "<x/>")


# ---------------------------------------------------------------- configuration


KAFKA_INI = """
[endpoint:kafka]
type = kafka
bootstrap.servers = 127.0.0.1:9092
{endpoint}

[api:orders]
path = /orders
endpoint = kafka
topic = orders
entrypoints = http-post
{api}
"""


class ConfigTests(SynchronousTestCase):
    """
    The schema keys of endpoints and APIs, and their errors.
    """

    def parse(self, endpoint: str = "", api: str = "", path: str = "test.ini") -> Any:
        """
        The configuration with extra endpoint and API keys.
        """
        return parseConfig(KAFKA_INI.format(endpoint=endpoint, api=api), path)

    def error(self, endpoint: str = "", api: str = "") -> ConfigError:
        """
        The ConfigError of such a configuration.
        """
        return self.assertRaises(ConfigError, self.parse, endpoint, api)

    def test_registryFormat(self) -> None:
        """
        value-format = registry takes TOPIC-value as the subject by default.
        """
        config = self.parse("schema-registry = http://127.0.0.1:8085/apis/ccompat/v7",
                            "value-format = registry\nkey-format = json")
        settings = config.apis["orders"].options["schemas"]
        self.assertEqual((settings.value.format, settings.value.subject, settings.value.version),
                         ("registry", "orders-value", "latest"))
        self.assertEqual(settings.key.format, "json")
        self.assertEqual(config.endpoints["kafka"].options["schema-registry"].url,
                         "http://127.0.0.1:8085/apis/ccompat/v7")

    def test_defaultRaw(self) -> None:
        """
        Without keys, values and keys are raw and no registry is set.
        """
        config = self.parse()
        self.assertEqual(config.apis["orders"].options["schemas"].value.format, "raw")
        self.assertIsNone(config.endpoints["kafka"].options["schema-registry"])

    def test_errors(self) -> None:
        """
        Mistakes name file, section and key.
        """
        e = self.error(api="value-format = registry")
        self.assertEqual((e.section, e.key), ("api:orders", "value-format"))
        self.assertIn("schema-registry", e.message)
        e = self.error(api="value-format = avro")
        self.assertEqual(e.key, "value-format")
        e = self.error(api="value-subject = x")
        self.assertEqual(e.key, "value-subject")
        e = self.error("schema-registry = ftp://x")
        self.assertEqual((e.section, e.key), ("endpoint:kafka", "schema-registry"))
        e = self.error("schema-registry = http://x\nschema-registry-password-file = /nonexistent")
        self.assertEqual(e.key, "schema-registry-password-file")
        e = self.error("schema-registry = http://x\nschema-registry-ca-file = ca.pem")
        self.assertEqual(e.key, "schema-registry-ca-file")
        e = self.error("schema-registry = http://x", "value-format = registry\nvalue-subject-version = zero")
        self.assertEqual(e.key, "value-subject-version")
        self.assertIn("test.ini [api:orders] value-subject-version", str(e))

    def test_passwordFile(self) -> None:
        """
        The password comes from its file, relative to the configuration.
        """
        directory = tempfile.mkdtemp()
        with open(os.path.join(directory, "registry.pw"), "w") as f:
            f.write("s3cret\n")
        config = self.parse("schema-registry = http://x\nschema-registry-username = u\n"
                            "schema-registry-password-file = registry.pw", path=os.path.join(directory, "e.ini"))
        registry = config.endpoints["kafka"].options["schema-registry"]
        self.assertEqual((registry.username, registry.password), ("u", "s3cret"))

    def test_localSchema(self) -> None:
        """
        value-schema = file:... reads and checks the file at parse time.
        """
        directory = tempfile.mkdtemp()
        with open(os.path.join(directory, "orders.avsc"), "w") as f:
            f.write(json.dumps(ORDER_AVRO))
        config = self.parse(api="value-format = registry\nvalue-schema = file:orders.avsc\nvalue-schema-id = 3",
                            path=os.path.join(directory, "e.ini"))
        value = config.apis["orders"].options["schemas"].value
        self.assertEqual((value.local.schemaType, value.schemaId), ("AVRO", 3))
        with open(os.path.join(directory, "bad.avsc"), "w") as f:
            f.write("{")
        e = self.assertRaises(ConfigError, self.parse, "", "value-format = registry\nvalue-schema = file:bad.avsc",
                              os.path.join(directory, "e.ini"))
        self.assertEqual(e.key, "value-schema")
