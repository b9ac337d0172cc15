"""
The decoder and the encoder: Confluent wire-format bytes to JSON values on
delivery, JSON values to wire-format bytes on publish.

A decoder is made once per API and shared by all its subscribers; codecs
are made once per schema id and kept. After the first message of a schema,
L{SchemaDecoder.decode} answers synchronously (an already-fired Deferred),
and L{SchemaDecoder.decodeKnown} answers without a Deferred at all.
"""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Tuple, Union

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from evgate.schemas import wire
from evgate.schemas.codecs import LocalSchema, makeCodec
from evgate.schemas.errors import DecodeError, EncodeError, RegistryError, SchemaError
from evgate.schemas.registry import RegisteredSchema, RegistryClient

# Registry references can nest (imports of imports); a cycle or an absurd
# depth is a broken registry, not a schema.
MAX_REFERENCE_DEPTH = 16


class Decoded(NamedTuple):
    """
    A decoded payload (a named tuple: one is made per record read).

    @ivar value: the JSON value.
    @ivar schemaId: the id from the wire-format header (L{None} for a bare
        payload read with a local schema).
    @ivar schemaType: C{AVRO}, C{PROTOBUF} or C{JSON}.
    """

    value: Any
    schemaId: Optional[int]
    schemaType: str


def resolveReferences(registry: RegistryClient, schema: RegisteredSchema,
                      depth: int = 0) -> "Deferred[Dict[str, str]]":
    """
    The texts of every schema C{schema} refers to, directly or not, by
    reference name.
    """
    if not schema.references:
        return succeed({})
    if depth >= MAX_REFERENCE_DEPTH:
        return fail(RegistryError(f"schema references nest deeper than {MAX_REFERENCE_DEPTH}"))
    texts: Dict[str, str] = {}

    def one(index: int) -> Any:
        if index == len(schema.references):
            return texts
        ref = schema.references[index]

        def got(referenced: RegisteredSchema) -> Deferred:
            def inner(nested: Dict[str, str]) -> Any:
                texts.update(nested)
                texts[ref.name] = referenced.text
                return one(index + 1)
            return resolveReferences(registry, referenced, depth + 1).addCallback(inner)

        return registry.subjectVersion(ref.subject, ref.version).addCallback(got)

    d: Deferred = Deferred()
    d.callback(None)
    return d.addCallback(lambda _: one(0))


class _CodecCache:
    """
    Codecs by schema id, made once from the registry's schemas; concurrent
    asks for one id share the work.
    """

    log = Logger()

    def __init__(self, registry: Optional[RegistryClient], messageName: Optional[str] = None) -> None:
        self.registry = registry
        self.messageName = messageName
        self.codecs: Dict[int, Any] = {}
        self._pending: Dict[int, List[Deferred]] = {}

    def codecFor(self, schemaId: int) -> "Deferred[Any]":
        known = self.codecs.get(schemaId)
        if known is not None:
            return succeed(known)
        if self.registry is None:
            return fail(DecodeError(f"schema id {schemaId} is not the local schema's and there is no registry",
                                    reason="unknown-schema", schemaId=schemaId))
        waiters = self._pending.get(schemaId)
        mine: Deferred = Deferred()
        if waiters is not None:
            waiters.append(mine)
            return mine
        waiters = self._pending[schemaId] = [mine]
        registry = self.registry

        def build(schema: RegisteredSchema) -> Deferred:
            return resolveReferences(registry, schema).addCallback(
                lambda refs: makeCodec(schema.schemaType, schema.text, refs, self.messageName))

        def done(result: Any) -> None:
            del self._pending[schemaId]
            if not isinstance(result, Failure):
                self.codecs[schemaId] = result
            for waiter in waiters:
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)

        registry.schemaById(schemaId).addCallback(build).addBoth(done)
        return mine


def _asDecodeError(failure: Failure, schemaId: int) -> Failure:
    error = failure.value
    if isinstance(error, DecodeError):
        return failure
    if isinstance(error, RegistryError):
        if error.notFound:
            return Failure(DecodeError(f"schema id {schemaId} is not in the registry", reason="unknown-schema",
                                       schemaId=schemaId))
        return Failure(DecodeError(f"schema id {schemaId} is not known yet and the registry cannot tell: "
                                   f"{error.message}", reason="registry-unavailable", schemaId=schemaId))
    if isinstance(error, SchemaError):
        return Failure(DecodeError(f"schema id {schemaId}: {error.message}", reason="unsupported",
                                   schemaId=schemaId))
    return Failure(DecodeError(f"schema id {schemaId}: {failure.getErrorMessage()}", schemaId=schemaId))


class SchemaDecoder:
    """
    Turns payloads written with a registry's schemas (or a local schema)
    into JSON values.

    With a L{LocalSchema} and no schema id, payloads are the bare encoding
    (no wire-format header). With a local schema that has a schema id,
    payloads carry the header; that id is read with the local schema and
    any other id is asked of the registry, if there is one.
    """

    def __init__(self, registry: Optional[RegistryClient] = None, local: Optional[LocalSchema] = None) -> None:
        if registry is None and local is None:
            raise ValueError("a decoder needs a registry or a local schema")
        self.registry = registry
        self.local = local
        self._cache = _CodecCache(registry)
        self._localCodec = local.codec() if local is not None else None
        if local is not None and local.schemaId is not None:
            self._cache.codecs[local.schemaId] = self._localCodec
        # The wire-format headers (magic byte and id) of the known schemas,
        # as bytes: every record of a topic starts with the same few, and
        # one dictionary lookup of them stands for unpacking the header.
        self._heads: Dict[bytes, Tuple[int, Any]] = {}

    def decodeKnown(self, data: bytes) -> Optional[Decoded]:
        """
        C{data} decoded now if its schema is known, else L{None} (then use
        L{decode}).

        @raise DecodeError: if C{data} is not readable.
        """
        if self._localCodec is not None and self.local is not None and self.local.schemaId is None:
            return Decoded(self._localCodec.decode(bytes(data)), None, self._localCodec.schemaType)
        known = self._heads.get(data[:wire.HEADER_SIZE])
        if known is not None:
            return self._decodeWith(known[1], known[0], bytes(data[wire.HEADER_SIZE:]))
        schemaId, body = wire.unpack(data)
        codec = self._cache.codecs.get(schemaId)
        if codec is None:
            return None
        self._heads[bytes(data[:wire.HEADER_SIZE])] = (schemaId, codec)
        return self._decodeWith(codec, schemaId, body)

    def pending(self, data: bytes) -> "Optional[Deferred[Any]]":
        """
        L{None} when L{decodeKnown} can answer for C{data} now (its schema
        is known, or its header is unreadable and it fails at once); else a
        Deferred that fires once the schema of its id was fetched, or fails
        with L{DecodeError} (why it could not be).
        """
        if self.local is not None and self.local.schemaId is None:
            return None
        if data[:wire.HEADER_SIZE] in self._heads:
            return None
        try:
            schemaId, _ = wire.unpack(data)
        except DecodeError:
            return None
        if schemaId in self._cache.codecs:
            return None
        d = self._cache.codecFor(schemaId)
        return d.addErrback(_asDecodeError, schemaId)

    def decode(self, data: bytes) -> "Deferred[Decoded]":
        """
        C{data} decoded; the Deferred fails with L{DecodeError} only.
        """
        try:
            known = self.decodeKnown(data)
        except DecodeError:
            return fail()
        if known is not None:
            return succeed(known)
        schemaId, body = wire.unpack(data)
        d = self._cache.codecFor(schemaId)
        d.addErrback(_asDecodeError, schemaId)
        return d.addCallback(lambda codec: self._decodeWith(codec, schemaId, body))

    @staticmethod
    def _decodeWith(codec: Any, schemaId: int, body: bytes) -> Decoded:
        schemaType = codec.schemaType
        try:
            if schemaType != "PROTOBUF":
                return Decoded(codec.decode(body), schemaId, schemaType)
            indexes, offset = wire.decodeIndexes(body)
            return Decoded(codec.decode(body[offset:], indexes), schemaId, schemaType)
        except DecodeError as e:
            e.schemaId = schemaId
            raise


class SchemaEncoder:
    """
    Turns JSON values into payloads with a subject's latest (or pinned)
    schema, or with a local schema.

    With a registry and a subject, payloads carry the wire-format header of
    the schema used. With a L{LocalSchema}, payloads are the bare encoding
    unless the local schema has a schema id, which is then written in the
    header.
    """

    def __init__(self, registry: Optional[RegistryClient] = None, subject: Optional[str] = None,
                 version: Union[int, str] = "latest", local: Optional[LocalSchema] = None,
                 messageName: Optional[str] = None) -> None:
        if local is None and (registry is None or subject is None):
            raise ValueError("an encoder needs a registry and a subject, or a local schema")
        self.registry = registry
        self.subject = subject
        self.version = version
        self.local = local
        self._localCodec = local.codec() if local is not None else None
        self._cache = _CodecCache(registry, messageName)

    def encode(self, value: Any) -> "Deferred[bytes]":
        """
        The payload of C{value}; fails with L{EncodeError} when C{value}
        does not fit, or L{RegistryError} when the schema cannot be had.
        """
        if self._localCodec is not None and self.local is not None:
            try:
                payload = self._localCodec.encode(value)
            except EncodeError:
                return fail()
            if self.local.schemaId is None:
                return succeed(payload)
            return succeed(wire.pack(self.local.schemaId, payload, self._localCodec.indexes))
        assert self.registry is not None and self.subject is not None

        def withSchema(schema: RegisteredSchema) -> Deferred:
            return self._cache.codecFor(schema.schemaId).addCallback(
                lambda codec: wire.pack(schema.schemaId, codec.encode(value), codec.indexes))

        return self.registry.subjectVersion(self.subject, self.version).addCallback(withSchema)

    def current(self) -> "Deferred[Tuple[int, Any]]":
        """
        The schema id and codec that L{encode} would use now.
        """
        assert self.registry is not None and self.subject is not None
        return self.registry.subjectVersion(self.subject, self.version).addCallback(
            lambda schema: self._cache.codecFor(schema.schemaId).addCallback(lambda c: (schema.schemaId, c)))
