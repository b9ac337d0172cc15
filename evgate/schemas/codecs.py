"""
Codecs by schema language, and the reading of local schema files.

Every codec class is registered by the registry's name for its language;
registration runs C{verifyClass} so a codec that does not provide
L{ISchemaCodec} fails at import, not at the first message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional

from zope.interface.verify import verifyClass

from evgate.interfaces import ISchemaCodec
from evgate.schemas.avro import AvroCodec
from evgate.schemas.errors import SchemaError
from evgate.schemas.json_schema import JsonSchemaCodec
from evgate.schemas.protobuf import ProtobufCodec

CodecFactory = Callable[[str, Mapping[str, str], Optional[str]], Any]
_codecs: Dict[str, CodecFactory] = {}


def registerCodec(schemaType: str, cls: Any, factory: CodecFactory) -> None:
    """
    Make C{factory(text, references, messageName)} the maker of codecs for
    C{schemaType}; C{cls} must implement L{ISchemaCodec}.
    """
    verifyClass(ISchemaCodec, cls)
    _codecs[schemaType] = factory


def _avro(text: str, references: Mapping[str, str], messageName: Optional[str]) -> Any:
    return AvroCodec(text, list(references.values()))


def _protobuf(text: str, references: Mapping[str, str], messageName: Optional[str]) -> Any:
    return ProtobufCodec(text, references, messageName)


def _json(text: str, references: Mapping[str, str], messageName: Optional[str]) -> Any:
    return JsonSchemaCodec(text, references)


def _registerBuiltins() -> None:
    registerCodec("AVRO", AvroCodec, _avro)
    registerCodec("PROTOBUF", ProtobufCodec, _protobuf)
    registerCodec("JSON", JsonSchemaCodec, _json)


def makeCodec(schemaType: str, text: str, references: Mapping[str, str] = {},
              messageName: Optional[str] = None) -> Any:
    """
    A codec (an L{ISchemaCodec}) for C{text} in C{schemaType}.

    @param references: the texts of referenced schemas, by reference name.
    @raise SchemaError: if the schema does not parse, or the type is unknown.
    """
    if not _codecs:
        _registerBuiltins()
    factory = _codecs.get(schemaType)
    if factory is None:
        raise SchemaError(f"schema type {schemaType!r} is not supported (known: {', '.join(sorted(_codecs))})",
                          reason="unsupported")
    return factory(text, references, messageName)


# File name endings of local schema files and the language they hold.
LOCAL_SUFFIXES = {".avsc": "AVRO", ".proto": "PROTOBUF", ".json": "JSON"}


@dataclass(frozen=True)
class LocalSchema:
    """
    A schema read from a file (C{value-schema = file:orders.avsc}).

    @ivar path: the file, absolute.
    @ivar schemaType: from its name: C{.avsc} Avro, C{.proto} Protobuf,
        C{.json} JSON Schema.
    @ivar schemaId: the registry id to write in the wire-format header, or
        L{None} to write the bare encoding (no header).
    @ivar messageName: for Protobuf, the message to write.
    """

    path: str
    schemaType: str
    text: str
    schemaId: Optional[int] = None
    messageName: Optional[str] = None

    def codec(self) -> Any:
        """
        A codec for this schema (parsed anew; callers keep it).
        """
        return makeCodec(self.schemaType, self.text, {}, self.messageName)


def readLocalSchema(path: str, schemaId: Optional[int] = None, messageName: Optional[str] = None) -> LocalSchema:
    """
    Read and check the schema file at C{path}.

    @raise SchemaError: if it cannot be read, its kind is not known from its
        name, or it does not parse.
    """
    suffix = os.path.splitext(path)[1].lower()
    schemaType = LOCAL_SUFFIXES.get(suffix)
    if schemaType is None:
        raise SchemaError(f"{path}: name a .avsc (Avro), .proto (Protobuf) or .json (JSON Schema) file",
                          reason="bad-schema")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SchemaError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}", reason="bad-schema") from None
    local = LocalSchema(os.path.abspath(path), schemaType, text, schemaId, messageName)
    local.codec()  # parse now, so a broken file stops the configuration
    return local
