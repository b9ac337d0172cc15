"""
JSON Schema: the payload is JSON text, validated on publish.

The draft is the one the schema's C{$schema} names (Draft 2020-12, 2019-09,
7, 6, 4); a schema without C{$schema} is read as Draft 7, which is what
Confluent's registry and serializers assume. Formats are not asserted
(C{"format": "email"} is an annotation, as the drafts say by default).
"""

from __future__ import annotations

import json
from typing import Any, List, Mapping, Sequence

import jsonschema
from jsonschema import exceptions as jsonschemaErrors
from jsonschema.validators import validator_for
from referencing import Registry, Resource
from referencing.jsonschema import specification_with
from zope.interface import implementer

from evgate import jsonlimits
from evgate.interfaces import ISchemaCodec
from evgate.schemas.errors import DecodeError, EncodeError, SchemaError, pointerFor

# Payloads are bounded in size by max-message-bytes before they get here;
# their depth and the schemas' are bounded by evgate.jsonlimits.
MAX_DEPTH = 128


@implementer(ISchemaCodec)
class JsonSchemaCodec:
    """
    One JSON Schema, checked once: payloads to JSON values, and JSON values
    to payloads when they validate.

    @param references: other schemas it refers to with C{$ref}, by the
        name (URI) it uses for them.
    """

    schemaType = "JSON"
    indexes: List[int] = []

    def __init__(self, text: str, references: Mapping[str, str] = {}) -> None:
        try:
            self.schema = jsonlimits.loads(text, maxDepth=MAX_DEPTH)
        except ValueError as e:
            raise SchemaError(f"JSON Schema is not JSON: {e}", reason="bad-schema") from None
        if not isinstance(self.schema, (dict, bool)):
            raise SchemaError("a JSON Schema is an object or a boolean", reason="bad-schema")
        cls = validator_for(self.schema, default=jsonschema.Draft7Validator)
        try:
            cls.check_schema(self.schema)
        except jsonschemaErrors.SchemaError as e:
            raise SchemaError(f"not a valid JSON Schema: {e.message} at {pointerFor(list(e.absolute_path)) or '/'}",
                              reason="bad-schema") from None
        registry = None
        if references:
            resources = []
            for uri, ref in references.items():
                try:
                    resources.append((uri, Resource.from_contents(jsonlimits.loads(ref, maxDepth=MAX_DEPTH),
                                                                  default_specification=_spec(cls))))
                except ValueError as e:
                    raise SchemaError(f"referenced schema {uri!r} is not JSON: {e}", reason="bad-schema") from None
            registry = Registry().with_resources(resources)
        self.validator = cls(self.schema, registry=registry) if registry is not None else cls(self.schema)

    def decode(self, payload: bytes, indexes: Sequence[int] = ()) -> Any:
        """
        The JSON value of C{payload} (not validated: what was written is shown).

        @raise DecodeError: if it is not JSON text.
        """
        try:
            return jsonlimits.loads(payload, maxDepth=MAX_DEPTH)
        except ValueError as e:
            raise DecodeError(f"payload is not JSON text: {e}") from None

    def encode(self, value: Any) -> bytes:
        """
        The JSON text of C{value}, if it validates.

        @raise EncodeError: with the pointer of the most relevant error.
        """
        error = jsonschemaErrors.best_match(self.validator.iter_errors(value))
        if error is not None:
            raise EncodeError(pointerFor(list(error.absolute_path)), error.message)
        try:
            return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as e:
            raise EncodeError("", f"cannot be written as JSON text: {e}") from None


def _spec(cls: Any) -> Any:
    """
    The referencing specification of a validator class's draft, for
    referenced schemas that do not name their own.
    """
    return specification_with(cls.META_SCHEMA.get("$schema", "http://json-schema.org/draft-07/schema#"))
