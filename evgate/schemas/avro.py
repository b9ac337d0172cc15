"""
Avro values as JSON, and JSON as Avro values (fastavro).

The JSON mapping follows the Avro JSON encoding where that is unambiguous
and readable, and departs from it where an HTTP client would suffer:

 - null, boolean, int, long, string: JSON's own (a long beyond 2**53 is
   still a JSON number, exact in evgate; some JavaScript clients round it);
 - float, double: numbers; NaN and the infinities, which JSON lacks, are the
   strings C{"NaN"}, C{"Infinity"}, C{"-Infinity"} (as in Protobuf's JSON);
 - bytes, fixed: base64 strings (standard alphabet, padded), as Protobuf's
   JSON does, so an API's JSON has one shape whatever its schema language
   (the Avro JSON encoding's string of code points 0-255 is not used);
 - enum: the symbol; array: a JSON array; map: a JSON object; record: an
   object of its fields, no more (an unknown field is refused on publish);
 - a union of null and one other type (the optional field): the value
   itself, or null; any other union: the Avro JSON encoding's one-key
   object C{{"branch": value}}, the branch named by its full name (named
   types) or its type name (C{"int"}, C{"string"}, ...);
 - logical types: date C{"2024-05-01"}; time-millis/micros
   C{"13:45:00.250"}; timestamp-millis/micros RFC 3339 in UTC
   C{"2024-05-01T13:45:00.250Z"}; local-timestamp-* the same without
   offset; decimal a string C{"12.50"} (exact); uuid the string. On
   publish the underlying number is accepted too (days, epoch ms, ...).

Errors on publish carry a JSON Pointer to the value that does not fit.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import io
import json
import math
import uuid
from decimal import Decimal, InvalidOperation
from typing import Any, Dict, List, Mapping, Optional, Sequence

import fastavro
from zope.interface import implementer

from evgate import jsonlimits
from evgate.interfaces import ISchemaCodec
from evgate.schemas.avrojson import (
    NOT_LOGICAL,
    PRIMITIVES,
    branchName,
    compileToJson,
    floatToJson,
    isOptional,
    logicalToJson,
    matches,
)
from evgate.schemas.errors import DecodeError, EncodeError, SchemaError, pointerFor

_INT = (-(2**31), 2**31 - 1)
_LONG = (-(2**63), 2**63 - 1)


# Schema texts come from the registry or a file: bounded like any outside
# JSON, with room for deeply nested records.
SCHEMA_DEPTH = 128

@implementer(ISchemaCodec)
class AvroCodec:
    """
    One Avro schema, parsed once: binary payloads to JSON values and back.

    @param text: the schema's JSON text.
    @param references: the texts of the schemas it refers to by name
        (registry references), parsed first so their names resolve.
    """

    schemaType = "AVRO"
    indexes: List[int] = []

    def __init__(self, text: str, references: Sequence[str] = ()) -> None:
        self.named: Dict[str, Any] = {}
        try:
            for ref in references:
                fastavro.parse_schema(jsonlimits.loads(ref, maxDepth=SCHEMA_DEPTH), named_schemas=self.named)
            self.schema = fastavro.parse_schema(jsonlimits.loads(text, maxDepth=SCHEMA_DEPTH),
                                                named_schemas=self.named)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise SchemaError(f"not a valid Avro schema: {e}", reason="bad-schema") from None
        except Exception as e:  # fastavro raises its own SchemaParseException and others
            raise SchemaError(f"not a valid Avro schema: {e}", reason="bad-schema") from None
        # The JSON mapping of this schema's values, walked once here rather
        # than with every record (None: fastavro's value is the JSON).
        self._toJson = compileToJson(self.schema, self.named)

    # ------------------------------------------------------------ decoding

    def decode(self, payload: bytes, indexes: Sequence[int] = ()) -> Any:
        """
        The JSON value of the Avro binary C{payload} (C{indexes} is for
        Protobuf only).

        @raise DecodeError: if C{payload} does not read as this schema.
        """
        buf = io.BytesIO(payload)
        try:
            value = fastavro.schemaless_reader(buf, self.schema, None, return_named_type=True)
        except Exception as e:  # corrupt input makes fastavro raise almost anything
            raise DecodeError(f"Avro payload does not match the schema: {type(e).__name__}: {e}") from None
        left = len(payload) - buf.tell()
        if left:
            raise DecodeError(f"Avro payload has {left} bytes after the value: not written with this schema")
        toJson = self._toJson
        if toJson is None:
            return value
        try:
            return toJson(value)
        except Exception as e:
            raise DecodeError(f"Avro value cannot be shown as JSON: {e}") from None

    def _resolve(self, schema: Any) -> Any:
        if isinstance(schema, str) and schema not in PRIMITIVES:
            return self.named[schema]
        return schema

    def toJson(self, schema: Any, value: Any) -> Any:
        """
        C{value}, as fastavro read it with C{schema}, in the JSON mapping:
        the definition, walked with the value.  L{decode} uses the same
        mapping compiled for the schema (L{compileToJson}).
        """
        schema = self._resolve(schema)
        if isinstance(schema, list):
            if value is None:
                return None  # null is never wrapped, in the Avro JSON encoding too
            branch, inner = self._branchOf(schema, value)
            json_ = self.toJson(branch, inner)
            if isOptional(schema):
                return json_
            return {branchName(branch, self.named): json_}
        kind = schema if isinstance(schema, str) else schema["type"]
        logical = schema.get("logicalType") if isinstance(schema, dict) else None
        if value is None:
            return None
        if logical is not None:
            converted = logicalToJson(logical, value)
            if converted is not NOT_LOGICAL:
                return converted
        if kind in ("float", "double"):
            return floatToJson(value)
        if kind in ("bytes", "fixed"):
            return base64.b64encode(value).decode("ascii")
        if kind == "array":
            return [self.toJson(schema["items"], item) for item in value]
        if kind == "map":
            return {k: self.toJson(schema["values"], v) for k, v in value.items()}
        if kind == "record":
            return {f["name"]: self.toJson(f["type"], value.get(f["name"])) for f in schema["fields"]}
        if isinstance(kind, (dict, list)):
            return self.toJson(kind, value)
        return value

    def _branchOf(self, union: List[Any], value: Any) -> Any:
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
            for branch in union:
                resolved = self._resolve(branch)
                if isinstance(resolved, dict) and resolved.get("name") == value[0]:
                    return resolved, value[1]
        for branch in union:
            if matches(self._resolve(branch), value):
                return branch, value
        raise ValueError(f"no branch of the union {union!r} holds {value!r}")

    # ------------------------------------------------------------ encoding

    def encode(self, value: Any) -> bytes:
        """
        The Avro binary of the JSON C{value}.

        @raise EncodeError: with the pointer of the first value that does
            not fit the schema.
        """
        datum = self.fromJson(self.schema, value, [])
        buf = io.BytesIO()
        try:
            fastavro.schemaless_writer(buf, self.schema, datum)
        except Exception as e:  # fromJson checked every value; this is a last line
            raise EncodeError("", f"does not fit the Avro schema: {e}") from None
        return buf.getvalue()

    def fromJson(self, schema: Any, value: Any, path: List[Any]) -> Any:
        """
        The JSON C{value} (at C{path}) as the Python value fastavro writes
        with C{schema}; union values become fastavro's C{(branch, value)}.
        """
        schema = self._resolve(schema)
        if isinstance(schema, list):
            return self._unionFromJson(schema, value, path)
        kind = schema if isinstance(schema, str) else schema["type"]
        if isinstance(kind, (dict, list)):
            return self.fromJson(kind, value, path)
        logical = schema.get("logicalType") if isinstance(schema, dict) else None
        if logical is not None and value is not None:
            converted = _logicalFromJson(schema, logical, value, path)
            if converted is not NOT_LOGICAL:
                return converted
        return self._plainFromJson(schema, kind, value, path)

    def _plainFromJson(self, schema: Any, kind: str, value: Any, path: List[Any]) -> Any:
        def refuse(message: str) -> EncodeError:
            return EncodeError(pointerFor(path), message)

        if kind == "null":
            if value is not None:
                raise refuse(f"expected null, got {_jsonType(value)}")
            return None
        if kind == "boolean":
            if not isinstance(value, bool):
                raise refuse(f"expected true or false, got {_jsonType(value)}")
            return value
        if kind in ("int", "long"):
            low, high = _INT if kind == "int" else _LONG
            number = _integral(value)
            if number is None:
                raise refuse(f"expected an integer ({kind}), got {_jsonType(value)}")
            if not low <= number <= high:
                raise refuse(f"{number} is out of the range of an Avro {kind}")
            return number
        if kind in ("float", "double"):
            if isinstance(value, str) and value in _SPECIAL_FLOATS:
                return _SPECIAL_FLOATS[value]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise refuse(f"expected a number ({kind}), got {_jsonType(value)}")
            return float(value)
        if kind == "string":
            if not isinstance(value, str):
                raise refuse(f"expected a string, got {_jsonType(value)}")
            return value
        if kind in ("bytes", "fixed"):
            data = _base64(value, path)
            if kind == "fixed" and len(data) != schema["size"]:
                raise refuse(f"expected {schema['size']} bytes (fixed {schema['name']}), got {len(data)}")
            return data
        if kind == "enum":
            if not isinstance(value, str) or value not in schema["symbols"]:
                raise refuse(f"expected one of {', '.join(schema['symbols'])} (enum {schema['name']}), "
                             f"got {json.dumps(value)[:60]}")
            return value
        if kind == "array":
            if not isinstance(value, list):
                raise refuse(f"expected an array, got {_jsonType(value)}")
            return [self.fromJson(schema["items"], item, path + [i]) for i, item in enumerate(value)]
        if kind == "map":
            if not isinstance(value, dict):
                raise refuse(f"expected an object (map), got {_jsonType(value)}")
            return {k: self.fromJson(schema["values"], v, path + [k]) for k, v in value.items()}
        if kind == "record":
            if not isinstance(value, dict):
                raise refuse(f"expected an object (record {schema['name']}), got {_jsonType(value)}")
            known = {f["name"] for f in schema["fields"]}
            for key in value:
                if key not in known:
                    raise EncodeError(pointerFor(path + [key]), f"is not a field of record {schema['name']}")
            record = {}
            for f in schema["fields"]:
                name = f["name"]
                if name in value:
                    record[name] = self.fromJson(f["type"], value[name], path + [name])
                elif "default" not in f:
                    raise EncodeError(pointerFor(path + [name]),
                                      f"required field of record {schema['name']} is missing (it has no default)")
            return record
        raise refuse(f"unsupported Avro type {kind!r}")

    def _unionFromJson(self, union: List[Any], value: Any, path: List[Any]) -> Any:
        branches = [self._resolve(b) for b in union]
        if value is None:
            if "null" in branches:
                return None
            raise EncodeError(pointerFor(path), f"null is not allowed here (union of {_names(branches, self.named)})")
        if isOptional(union):
            branch = next(b for b in branches if b != "null")
            converted = self.fromJson(branch, value, path)
            return (branchName(branch, self.named), converted)
        if not isinstance(value, dict) or len(value) != 1:
            raise EncodeError(pointerFor(path), "a union of several types takes a one-key object naming the "
                              f"branch, e.g. {{\"{branchName(branches[1], self.named)}\": ...}} "
                              f"(branches: {_names(branches, self.named)})")
        name, inner = next(iter(value.items()))
        for branch in branches:
            full = branchName(branch, self.named)
            if name == full or (isinstance(branch, dict) and name == full.rsplit(".", 1)[-1]):
                return (full, self.fromJson(branch, inner, path + [name]))
        raise EncodeError(pointerFor(path + [name]),
                          f"is not a branch of this union (branches: {_names(branches, self.named)})")


# ---------------------------------------------------------------- helpers

_SPECIAL_FLOATS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _names(branches: Sequence[Any], named: Mapping[str, Any]) -> str:
    return ", ".join(branchName(b, named) for b in branches)


def _jsonType(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _integral(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _base64(value: Any, path: List[Any]) -> bytes:
    if not isinstance(value, str):
        raise EncodeError(pointerFor(path), f"expected a base64 string, got {_jsonType(value)}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise EncodeError(pointerFor(path), "is not valid base64") from None


def _logicalFromJson(schema: Mapping[str, Any], logical: str, value: Any, path: List[Any]) -> Any:
    """
    A JSON string of a logical type as the Python value fastavro writes;
    numbers (and anything for an unknown logical type) go through as the
    underlying type.
    """
    if logical == "decimal":
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise EncodeError(pointerFor(path), f"expected a decimal string, got {_jsonType(value)}")
        try:
            number = Decimal(str(value))
        except InvalidOperation:
            raise EncodeError(pointerFor(path), f"{value!r} is not a decimal number") from None
        if not number.is_finite():
            raise EncodeError(pointerFor(path), "a decimal must be finite")
        scale = int(schema.get("scale", 0))
        precision = int(schema.get("precision", 0))
        exponent = number.as_tuple().exponent
        if isinstance(exponent, int) and -exponent > scale:
            raise EncodeError(pointerFor(path), f"{value} has more than {scale} decimal places")
        if precision and len(number.quantize(Decimal(1).scaleb(-scale)).as_tuple().digits) > precision:
            raise EncodeError(pointerFor(path), f"{value} has more than {precision} digits")
        return number
    if not isinstance(value, str):
        return NOT_LOGICAL
    try:
        if logical == "uuid":
            return str(uuid.UUID(value))
        if logical == "date":
            return datetime.date.fromisoformat(value)
        if logical.startswith("time-"):
            return datetime.time.fromisoformat(value)
        if logical.startswith("timestamp-"):
            moment = datetime.datetime.fromisoformat(value)
            if moment.tzinfo is None:
                raise ValueError("a timestamp needs an offset (Z or +hh:mm)")
            return moment
        if logical.startswith("local-timestamp-"):
            return datetime.datetime.fromisoformat(value).replace(tzinfo=None)
    except ValueError as e:
        raise EncodeError(pointerFor(path), f"{value!r} is not a valid {logical}: {e}") from None
    return NOT_LOGICAL
