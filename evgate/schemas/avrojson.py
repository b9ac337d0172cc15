"""
The Avro JSON mapping of L{evgate.schemas.avro}, compiled once per schema.

L{evgate.schemas.avro.AvroCodec.toJson} walks the schema beside every
value it converts: it resolves names, looks up the type and the logical
type and tests what kind of value it holds, field by field, for every
record read.  That walk cost more than fastavro's reading of the record.
The schema does not change from record to record, so L{compileToJson}
makes that walk once and answers a function of the value alone: a closure
per node that needs converting (floats, bytes, logical types, unions, and
the arrays, maps and records that hold them), and L{None} for a node whose
fastavro value already is its JSON value (null, boolean, int, long,
string, enum, and the containers of only those).  A schema made of such
nodes only converts nothing at all.

A record is fastavro's own dict, which holds exactly the schema's fields
in order, as the walk's new object does; the fields that need converting
are converted in it.  Where a union's record branch is taken for a plain
dict (read from another branch), the record becomes a new object of its
fields, converted exactly as the walk converts them.  The property tests of
tests/test_avrojson.py hold the two to the same output for arbitrary
schemas and the records fastavro reads with them.
"""

from __future__ import annotations

import base64
import datetime
import math
import uuid
from decimal import Decimal
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

__all__ = ["Converter", "NOT_LOGICAL", "PRIMITIVES", "branchName", "compileToJson", "floatToJson", "isOptional",
           "logicalToJson", "matches"]

PRIMITIVES = ("null", "boolean", "int", "long", "float", "double", "bytes", "string")
# What logicalToJson answers for a value that is not of a logical type.
NOT_LOGICAL = object()
_UTC = datetime.timezone.utc

Converter = Callable[[Any], Any]


def isOptional(union: Sequence[Any]) -> bool:
    """
    Whether C{union} is a null and one other type (shown unwrapped).
    """
    return len(union) == 2 and "null" in union


def branchName(branch: Any, named: Mapping[str, Any]) -> str:
    """
    The name of a union branch in the JSON mapping's C{{"branch": value}}.
    """
    if isinstance(branch, str):
        return branch
    if branch.get("type") in ("record", "enum", "fixed", "error"):
        return str(branch["name"])
    kind = branch["type"]
    return kind if isinstance(kind, str) else branchName(kind, named)


def floatToJson(value: float) -> Any:
    """
    A float as JSON: itself, or C{"NaN"}, C{"Infinity"}, C{"-Infinity"}.
    """
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def matches(schema: Any, value: Any) -> bool:
    """
    Whether the Python C{value} fastavro read can be of C{schema} (to tell
    union branches apart; named types come as (name, value) tuples).
    """
    kind = schema if isinstance(schema, str) else schema["type"]
    logical = schema.get("logicalType") if isinstance(schema, dict) else None
    if logical is not None:
        if logical == "date":
            if isinstance(value, datetime.date) and not isinstance(value, datetime.datetime):
                return True
        elif logical.startswith("time-"):
            if isinstance(value, datetime.time):
                return True
        elif "timestamp" in logical:
            if isinstance(value, datetime.datetime):
                return True
        elif logical == "decimal":
            if isinstance(value, Decimal):
                return True
        elif logical == "uuid":
            if isinstance(value, uuid.UUID):
                return True
    if kind == "null":
        return value is None
    if kind == "boolean":
        return isinstance(value, bool)
    if kind in ("int", "long"):
        return isinstance(value, int) and not isinstance(value, bool)
    if kind in ("float", "double"):
        return isinstance(value, float)
    if kind == "string":
        return isinstance(value, str)
    if kind in ("bytes", "fixed"):
        return isinstance(value, (bytes, bytearray))
    if kind == "enum":
        return isinstance(value, str)
    if kind == "array":
        return isinstance(value, list)
    if kind in ("map", "record"):
        return isinstance(value, dict)
    return False


def logicalToJson(logical: str, value: Any) -> Any:
    """
    The JSON of a logical type's Python value, or L{NOT_LOGICAL} when
    C{value} is not one (then the underlying type applies).
    """
    # millisecond types show milliseconds, whatever the value's microseconds
    timespec = "milliseconds" if logical.endswith("-millis") else "auto"
    if isinstance(value, datetime.datetime):
        if value.tzinfo is not None:
            return value.astimezone(_UTC).isoformat(timespec=timespec).replace("+00:00", "Z")
        return value.isoformat(timespec=timespec)
    if isinstance(value, datetime.time):
        return value.isoformat(timespec=timespec)
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, uuid.UUID):
        return str(value)
    return NOT_LOGICAL



def compileToJson(schema: Any, named: Mapping[str, Any]) -> Optional[Converter]:
    """
    A function that gives, for any value fastavro reads with the parsed
    C{schema}, what C{AvroCodec.toJson(schema, value)} gives; L{None} when
    that is the value itself.

    @param named: the parsed named types C{schema} may refer to by name.
    """
    return _Compiler(named).compile(schema)


def _float(value: Any) -> Any:
    # Finite floats are their JSON; v - v is NaN for NaN and the infinities.
    if value is None or value - value == 0.0:
        return value
    return floatToJson(value)


def _exactFloat(value: Any) -> Any:
    return None if value is None else floatToJson(value)


def _bytes(value: Any) -> Any:
    if value is None:
        return None
    return base64.b64encode(value).decode("ascii")


def _same(value: Any) -> Any:
    return value


class _RecordSlot:
    """
    A record's converter while and after it is compiled.
    """

    def __init__(self) -> None:
        self.converter: Optional[Converter] = None
        self.done = False
        self.recursive = False

    def call(self, value: Any) -> Any:
        converter = self.converter
        return value if converter is None else converter(value)


class _Compiler:
    """
    One compilation: named records are compiled once, and a record that
    holds itself (a linked list) refers to its own converter through a box
    filled when it is done.
    """

    def __init__(self, named: Mapping[str, Any], exact: bool = False) -> None:
        self.named = named
        # Exact: no shortcut that holds only for what fastavro reads with
        # the schema; every node is converted as the walk converts it.
        self.exact = exact
        self.records: Dict[int, _RecordSlot] = {}
        self._exact: Optional[_Compiler] = None

    def resolve(self, schema: Any) -> Any:
        if isinstance(schema, str) and schema not in PRIMITIVES:
            return self.named[schema]
        return schema

    def compile(self, schema: Any) -> Optional[Converter]:
        schema = self.resolve(schema)
        if isinstance(schema, list):
            return self.union(schema)
        kind = schema if isinstance(schema, str) else schema["type"]
        logical = schema.get("logicalType") if isinstance(schema, dict) else None
        plain = self.plain(schema, kind)
        if logical is None:
            return plain
        return _logical(logical, plain)

    def plain(self, schema: Any, kind: Any) -> Optional[Converter]:
        if kind in ("float", "double"):
            return _exactFloat if self.exact else _float
        if kind in ("bytes", "fixed"):
            return _bytes
        if kind == "array":
            return _array(self.compile(schema["items"]), self.exact)
        if kind == "map":
            return _map(self.compile(schema["values"]), self.exact)
        if kind == "record":
            return self.record(schema)
        if isinstance(kind, (dict, list)):
            return self.compile(kind)
        # null, boolean, int, long, string, enum and what the walk leaves
        # as it is.
        return None

    def record(self, schema: Dict[str, Any]) -> Optional[Converter]:
        slot = self.records.get(id(schema))
        if slot is not None:
            if slot.done:
                return slot.converter
            # A field of this record holds the record: refer to the
            # converter it will have.
            slot.recursive = True
            return slot.call
        slot = self.records[id(schema)] = _RecordSlot()
        fields = [(f["name"], self.compile(f["type"])) for f in schema["fields"]]
        if self.exact:
            slot.converter = _record(fields)
        elif slot.recursive or any(c is not None for _, c in fields):
            slot.converter = _recordInPlace(fields)
        slot.done = True
        return slot.converter

    def exactly(self, schema: Any) -> Optional[Converter]:
        """
        The converter of C{schema} that converts any value as the walk
        does, not only what fastavro reads with it.
        """
        if self.exact:
            return self.compile(schema)
        if self._exact is None:
            self._exact = _Compiler(self.named, exact=True)
        return self._exact.compile(schema)

    def union(self, union: List[Any]) -> Optional[Converter]:
        named = self.named
        resolved = [self.resolve(b) for b in union]
        converters = [self.compile(b) for b in union]
        optional = isOptional(union)
        if optional and not self.exact:
            other = next(i for i, b in enumerate(resolved) if b != "null")
            if converters[other] is None and not (isinstance(resolved[other], dict) and "name" in resolved[other]):
                # An optional unnamed type that needs no conversion: fastavro
                # reads its value or None, unwrapped, as the mapping shows it.
                return None
        byName: Dict[Any, int] = {}
        for i, branch in enumerate(resolved):
            if isinstance(branch, dict):
                byName.setdefault(branch.get("name"), i)
        # fastavro names the branch of a record it read (a (name, value)
        # tuple); a plain dict that a record branch matches came from
        # another branch (a map), and the walk makes of it, whatever it
        # holds, an object of the record's fields.
        matched = [self.exactly(b) if isinstance(b, dict) and b.get("type") == "record" else c
                   for b, c in zip(resolved, converters, strict=True)]

        def convert(value: Any) -> Any:
            if value is None:
                return None  # null is never wrapped
            index = None
            if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
                index = byName.get(value[0])
            if index is not None:
                branch = resolved[index]
                value = value[1]
                inner = converters[index]
            else:
                for i, candidate in enumerate(resolved):
                    if matches(candidate, value):
                        index = i
                        break
                else:
                    raise ValueError(f"no branch of the union {union!r} holds {value!r}")
                branch = union[index]
                inner = matched[index]
            json_ = value if inner is None else inner(value)
            if optional:
                return json_
            return {branchName(branch, named): json_}

        return convert


def _logical(logical: str, plain: Optional[Converter]) -> Converter:
    def convert(value: Any) -> Any:
        if value is None:
            return None
        converted = logicalToJson(logical, value)
        if converted is not NOT_LOGICAL:
            return converted
        return value if plain is None else plain(value)
    return convert


def _array(item: Optional[Converter], exact: bool) -> Optional[Converter]:
    if item is None:
        if not exact:
            return None
        item = _same

    def convert(value: Any) -> Any:
        if value is None:
            return None
        return [item(v) for v in value]
    return convert


def _map(values: Optional[Converter], exact: bool) -> Optional[Converter]:
    if values is None:
        if not exact:
            return None
        values = _same

    def convert(value: Any) -> Any:
        if value is None:
            return None
        return {k: values(v) for k, v in value.items()}
    return convert


def _recordInPlace(fields: List[Any]) -> Converter:
    # fastavro reads a record into a new dict of exactly its fields, in
    # order: the fields that need it are converted in that dict, and a
    # finite float (what a double field nearly always holds) is not even
    # passed to a function.
    floats = [name for name, converter in fields if converter is _float]
    others = [(name, converter) for name, converter in fields if converter is not None and converter is not _float]

    def convert(value: Any) -> Any:
        if value is None:
            return None
        for name in floats:
            number = value[name]
            if number is not None and number - number != 0.0:
                value[name] = floatToJson(number)
        for name, converter in others:
            value[name] = converter(value[name])
        return value
    return convert


def _record(fields: List[Any]) -> Converter:
    # The fields whose value is their JSON are copied, the others converted.
    steps = [(name, converter or _same) for name, converter in fields]

    def convert(value: Any) -> Any:
        if value is None:
            return None
        get = value.get
        return {name: converter(get(name)) for name, converter in steps}
    return convert
