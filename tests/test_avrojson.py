"""
Property tests of the compiled Avro JSON mapping (L{evgate.schemas.avrojson}):
for arbitrary schemas (every primitive, every logical type, enums, fixed,
arrays, maps, nested and recursive records, named references, optional
and several-branch unions) and arbitrary records, what
L{AvroCodec.decode} gives is exactly what the generic walk
L{AvroCodec.toJson} gives for the value fastavro read.
"""

from __future__ import annotations

import datetime
import io
import json
from decimal import Decimal
from typing import Any, Dict, List

import fastavro
from hypothesis import given, reject, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from evgate.schemas.avro import AvroCodec
from evgate.schemas.avrojson import compileToJson

_UTC = datetime.timezone.utc
_LOGICAL = [
    ("int", "date"), ("int", "time-millis"), ("long", "time-micros"), ("long", "timestamp-millis"),
    ("long", "timestamp-micros"), ("long", "local-timestamp-millis"), ("long", "local-timestamp-micros"),
    ("bytes", "decimal"), ("string", "uuid"),
]
_PRIMITIVE = ["null", "boolean", "int", "long", "float", "double", "bytes", "string"]


class _Schemas:
    """
    Draws a schema, then values of it, from one Hypothesis C{data}.
    """

    def __init__(self, data: Any) -> None:
        self.data = data
        self.named: Dict[str, Any] = {}
        self.open: List[str] = []

    def draw(self, strategy: Any) -> Any:
        return self.data.draw(strategy)

    def name(self) -> str:
        return f"N{len(self.named)}"

    def schema(self, depth: int = 0, inUnion: bool = False) -> Any:
        choices = ["primitive", "logical", "enum", "fixed"]
        if depth < 3:
            choices += ["array", "map", "record"] + ([] if inUnion else ["union"])
        if self.named:
            choices.append("reference")
        kind = self.draw(st.sampled_from(choices))
        if kind == "primitive":
            return self.draw(st.sampled_from(_PRIMITIVE))
        if kind == "logical":
            base, logical = self.draw(st.sampled_from(_LOGICAL))
            if logical == "decimal":
                precision = self.draw(st.integers(1, 12))
                return {"type": base, "logicalType": logical, "precision": precision,
                        "scale": self.draw(st.integers(0, precision))}
            return {"type": base, "logicalType": logical}
        if kind == "enum":
            name = self.name()
            self.named[name] = schema = {"type": "enum", "name": name, "symbols": ["A", "B", "C"]}
            return schema
        if kind == "fixed":
            name = self.name()
            self.named[name] = schema = {"type": "fixed", "name": name, "size": self.draw(st.integers(1, 4))}
            return schema
        if kind == "reference":
            return self.draw(st.sampled_from(sorted(n for n in self.named if n not in self.open)) if any(
                n not in self.open for n in self.named) else st.just("string"))
        if kind == "array":
            return {"type": "array", "items": self.schema(depth + 1)}
        if kind == "map":
            return {"type": "map", "values": self.schema(depth + 1)}
        if kind == "union":
            return self.union(depth)
        return self.record(depth)

    def union(self, depth: int) -> List[Any]:
        branches: List[Any] = []
        seen = set()
        for _ in range(self.draw(st.integers(1, 4))):
            defined = list(self.named)
            branch = self.schema(depth + 1, inUnion=True)
            # A union holds one branch of each unnamed type.  fastavro's
            # writer takes the first branch a value fits, and its logical
            # writers parse strings: one kind of string value per union,
            # and none beside a date or time, so every value is writable.
            resolved = self.named.get(branch, branch) if isinstance(branch, str) else branch
            key = branch if isinstance(branch, str) else branch.get("name") or branch["type"]
            logical = resolved.get("logicalType") if isinstance(resolved, dict) else None
            kind = resolved if isinstance(resolved, str) else resolved["type"]
            texts = {"text"} if kind in ("string", "enum") or logical == "uuid" else set()
            if logical is not None and logical != "decimal" and logical != "uuid":
                texts = {"text", "temporal"}
            if key in seen or texts & seen:
                # Left out: so are the types it named.
                for name in list(self.named)[len(defined):]:
                    del self.named[name]
                continue
            seen.add(key)
            seen.update(texts)
            branches.append(branch)
        if "null" not in seen and self.draw(st.booleans()):
            branches.insert(self.draw(st.integers(0, len(branches))), "null")
        return branches

    def record(self, depth: int) -> Dict[str, Any]:
        name = self.name()
        schema: Dict[str, Any] = {"type": "record", "name": name, "fields": []}
        self.named[name] = schema
        self.open.append(name)
        for i in range(self.draw(st.integers(0, 4))):
            schema["fields"].append({"name": f"f{i}", "type": self.schema(depth + 1)})
        if self.draw(st.booleans()):
            # A record that holds itself.
            schema["fields"].append({"name": "next", "type": ["null", name]})
        self.open.remove(name)
        return schema

    def value(self, schema: Any, depth: int = 0) -> Any:
        if isinstance(schema, str) and schema in self.named:
            schema = self.named[schema]
        if isinstance(schema, list):
            usable = [b for b in schema if not (depth > 4 and b != "null" and "null" in schema)]
            return self.value(self.draw(st.sampled_from(usable)), depth + 1)
        kind = schema if isinstance(schema, str) else schema["type"]
        logical = schema.get("logicalType") if isinstance(schema, dict) else None
        if logical is not None:
            return self.logical(schema, logical)
        if kind == "null":
            return None
        if kind == "boolean":
            return self.draw(st.booleans())
        if kind == "int":
            return self.draw(st.integers(-(2**31), 2**31 - 1))
        if kind == "long":
            return self.draw(st.integers(-(2**63), 2**63 - 1))
        if kind == "float":
            return self.draw(st.floats(width=32))
        if kind == "double":
            return self.draw(st.floats())
        if kind == "bytes":
            return self.draw(st.binary(max_size=6))
        if kind == "string":
            return self.draw(st.text(max_size=6))
        if kind == "enum":
            return self.draw(st.sampled_from(schema["symbols"]))
        if kind == "fixed":
            return self.draw(st.binary(min_size=schema["size"], max_size=schema["size"]))
        if kind == "array":
            size = 0 if depth > 4 else self.draw(st.integers(0, 3))
            return [self.value(schema["items"], depth + 1) for _ in range(size)]
        if kind == "map":
            size = 0 if depth > 4 else self.draw(st.integers(0, 3))
            return {f"k{i}": self.value(schema["values"], depth + 1) for i in range(size)}
        return {f["name"]: (None if f["name"] == "next" and depth > 3 else self.value(f["type"], depth + 1))
                for f in schema["fields"]}

    def logical(self, schema: Dict[str, Any], logical: str) -> Any:
        if logical == "date":
            return self.draw(st.dates())
        if logical.startswith("time-"):
            return self.draw(st.times())
        if logical.startswith("timestamp-"):
            return self.draw(st.datetimes(min_value=datetime.datetime(1900, 1, 1),
                                          max_value=datetime.datetime(2200, 1, 1), timezones=st.just(_UTC)))
        if logical.startswith("local-timestamp-"):
            return self.draw(st.datetimes(min_value=datetime.datetime(1900, 1, 1),
                                          max_value=datetime.datetime(2200, 1, 1)))
        if logical == "decimal":
            digits = self.draw(st.integers(-(10 ** schema["precision"] - 1), 10 ** schema["precision"] - 1))
            return Decimal(digits).scaleb(-schema["scale"])
        return self.draw(st.uuids())


def _text(value: Any) -> str:
    # Exact: 1 and 1.0 and True differ, key order counts, NaN is NaN.
    return json.dumps(value, allow_nan=True)


class CompiledMappingTests(SynchronousTestCase):
    """
    The compiled mapping against the generic walk.
    """

    @settings(max_examples=300, deadline=None)
    @given(st.data())
    def test_sameAsWalk(self, data: Any) -> None:
        """
        For an arbitrary schema and record, decoding gives what the
        generic walk gives for the value fastavro read.
        """
        schemas = _Schemas(data)
        schema = schemas.schema()
        codec = AvroCodec(json.dumps(schema))
        datum = schemas.value(schema)
        buf = io.BytesIO()
        try:
            fastavro.schemaless_writer(buf, codec.schema, datum)
        except ValueError:
            # fastavro's logical writers parse strings, and its union
            # writer can try a string against a date deep in another
            # branch: such values say nothing of the mapping.
            reject()
        payload = buf.getvalue()
        read = fastavro.schemaless_reader(io.BytesIO(payload), codec.schema, None, return_named_type=True)
        expected = codec.toJson(codec.schema, read)
        self.assertEqual(_text(codec.decode(payload)), _text(expected))

    def test_plainSchemaConvertsNothing(self) -> None:
        """
        A schema of only null, boolean, int, long, string and enum values
        (in records, arrays, maps and optional unions) needs no
        conversion: fastavro's value is the JSON.
        """
        schema = fastavro.parse_schema({"type": "record", "name": "R", "fields": [
            {"name": "id", "type": "long"}, {"name": "name", "type": ["null", "string"]},
            {"name": "tags", "type": {"type": "array", "items": "string"}},
            {"name": "kind", "type": {"type": "enum", "name": "K", "symbols": ["A"]}},
            {"name": "counts", "type": {"type": "map", "values": "int"}}]})
        self.assertIsNone(compileToJson(schema, {}))

    def test_nonFiniteDoubles(self) -> None:
        """
        NaN and the infinities in a double field become their strings;
        finite doubles stay numbers.
        """
        codec = AvroCodec(json.dumps({"type": "record", "name": "R", "fields": [
            {"name": "a", "type": "double"}, {"name": "b", "type": "float"}, {"name": "c", "type": "double"}]}))
        for value, shown in ((float("nan"), "NaN"), (float("inf"), "Infinity"), (float("-inf"), "-Infinity"),
                             (2.5, 2.5)):
            buf = io.BytesIO()
            fastavro.schemaless_writer(buf, codec.schema, {"a": value, "b": value, "c": 1.0})
            self.assertEqual(codec.decode(buf.getvalue()), {"a": shown, "b": shown, "c": 1.0})

    def test_mapReadAsRecordBranch(self) -> None:
        """
        A map's value in a union whose record branch comes first is shown
        as that record, as the walk shows it (the first branch a plain
        dict matches): an object of the record's fields.
        """
        codec = AvroCodec(json.dumps([
            {"type": "record", "name": "R", "fields": [
                {"name": "f", "type": "string"},
                {"name": "g", "type": {"type": "record", "name": "S", "fields": [{"name": "h", "type": "long"}]}},
                {"name": "tags", "type": {"type": "array", "items": "string"}}]},
            {"type": "map", "values": "string"}]))
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, codec.schema, {"f": "x", "tags": "ab"})
        read = fastavro.schemaless_reader(io.BytesIO(buf.getvalue()), codec.schema, None, return_named_type=True)
        self.assertEqual(read, {"f": "x", "tags": "ab"})
        self.assertEqual(codec.decode(buf.getvalue()), codec.toJson(codec.schema, read))
        self.assertEqual(codec.decode(buf.getvalue()), {"R": {"f": "x", "g": None, "tags": ["a", "b"]}})
