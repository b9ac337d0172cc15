"""
Schemas: payloads written with a schema registry's Avro, Protobuf and JSON
Schema schemas, as JSON values, and back.

Where it sits (docs/schemas.md): on publish, entrypoint -> transforms ->
L{SchemaEncoder} -> connector; on delivery, connector -> L{SchemaDecoder}
-> transforms -> hub -> framers, once per API. A payload that does not
decode is delivered raw with an error marker (L{DecodeError.reason}); a
value that does not encode is refused with a JSON Pointer
(L{EncodeError.pointer}).

 - L{evgate.schemas.wire}: the Confluent wire format;
 - L{evgate.schemas.registry}: the registry client (treq) and its caches;
 - L{evgate.schemas.avro}, L{evgate.schemas.protobuf},
   L{evgate.schemas.json_schema}: one codec per schema language, each an
   L{evgate.interfaces.ISchemaCodec};
 - L{evgate.schemas.codecs}: codecs by language, local schema files;
 - L{evgate.schemas.serde}: the decoder and the encoder;
 - L{evgate.schemas.config}: the configuration keys.
"""

from evgate.schemas.codecs import LocalSchema, makeCodec, readLocalSchema
from evgate.schemas.errors import DecodeError, EncodeError, RegistryError, SchemaError
from evgate.schemas.registry import RegisteredSchema, RegistryClient
from evgate.schemas.serde import Decoded, SchemaDecoder, SchemaEncoder

__all__ = [
    "Decoded", "DecodeError", "EncodeError", "LocalSchema", "RegisteredSchema", "RegistryClient",
    "RegistryError", "SchemaDecoder", "SchemaEncoder", "SchemaError", "makeCodec", "readLocalSchema",
]
