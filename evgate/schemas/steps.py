"""
The schema codec on the pipeline seam (L{evgate.pipeline.registerCodec}):
an API with C{value-format = registry} (or C{key-format = registry})
decodes every record it reads to JSON and encodes every message it
publishes with its schema.

On delivery, L{SchemaDecodeStep} runs first, once per message and API:

 - the content becomes the compact JSON text of the decoded value, with
   C{content-type: application/json} and L{evgate.message.Message.jsonContent}
   set, so that JSON readers show it as a value (C{"content": {...}}) and a
   webhook posts it as an C{application/json} body;
 - a key written with C{key-format = registry} becomes the decoded value
   as text (a string as it is, anything else as compact JSON);
 - a record that does not decode (unknown schema id, corrupt bytes, not the
   wire format) raises L{StepError} with C{slug="decode-failed"}: the
   pipeline delivers it as it was read, raw bytes and all, with the marker;
 - a schema id met for the first time is fetched before the batch is
   delivered (L{SchemaDecodeStep.prepare}): the API's readers wait for it,
   in order, instead of seeing the record marked.

On publish, L{SchemaEncodeStep} runs last: the content (JSON text, as every
publishing entrypoint makes it) is written with the subject's latest or
pinned schema, or the local schema; content that does not fit is refused
with a 400 whose C{pointer} names the field, and nothing is published.

An API without these keys gets no step at all (L{schemaCodecFor} answers
L{None}) and pays nothing per message.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Dict, Optional, Tuple
from weakref import WeakKeyDictionary

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from evgate import jsonlimits
from evgate.errors import BadRequest, EndpointUnavailable
from evgate.interfaces import IPreparingDeliveryStep, IPublishStep
from evgate.message import Draft, Message
from evgate.pipeline import Codec, StepError, checkStepClass, registerCodec
from evgate.schemas.config import FormatSettings, RegistrySettings, SchemaSettings
from evgate.schemas.errors import DecodeError, EncodeError, RegistryError, SchemaError
from evgate.schemas.registry import RegistryClient
from evgate.schemas.serde import SchemaDecoder, SchemaEncoder

__all__ = ["SchemaDecodeStep", "SchemaEncodeStep", "SchemaMismatch", "registryFor", "schemaCodecFor"]

log = Logger()

_compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
_JSON_TYPE = ("content-type", "application/json")
# The headers of a decoded record that had none: one tuple for all, so
# that readers which render headers can tell it is the same as before.
_JSON_HEADERS = (_JSON_TYPE,)
# Failures of schema fetches kept for the marker's detail: bounded, since
# corrupt headers can name any id.
MAX_REMEMBERED_FAILURES = 1024
# Seconds during which a schema id that could not be fetched is not asked
# for again: its records are marked meanwhile instead of holding the API's
# readers (an unknown id in a corrupt header must not stall a stream).
RETRY_FAILED_SCHEMA = 10.0
# JSON nesting accepted from a publisher before encoding.
MAX_DEPTH = 64


class SchemaMismatch(BadRequest):
    """
    A published message does not fit the API's schema: the document names
    the offending value with a JSON C{pointer} (C{""} for the whole
    content), and which part (C{value} or C{key}) it is.
    """

    slug = "does-not-match-schema"
    title = "Message does not match the schema"


# One registry client per node and endpoint settings: APIs of an endpoint
# share its caches (a schema fetched for one API is known to the others),
# and a reload keeps them.
_registries: "WeakKeyDictionary[Any, Dict[RegistrySettings, RegistryClient]]" = WeakKeyDictionary()


def registryFor(api: Any) -> Optional[RegistryClient]:
    """
    The registry client of the API runtime C{api}'s endpoint, or L{None}
    when the endpoint names no C{schema-registry}.
    """
    node = api.node
    endpoint = node.config.endpoints.get(api.config.endpoint)
    settings = endpoint.options.get("schema-registry") if endpoint is not None else None
    if settings is None:
        return None
    clients = _registries.setdefault(node, {})
    client = clients.get(settings)
    if client is None:
        client = clients[settings] = RegistryClient.fromSettings(settings, reactor=node.reactor)
    return client


def _decoderOf(settings: FormatSettings, registry: Optional[RegistryClient]) -> Optional[SchemaDecoder]:
    if settings.format != "registry":
        return None
    return SchemaDecoder(registry=registry, local=settings.local)


def _encoderOf(settings: FormatSettings, registry: Optional[RegistryClient]) -> Optional[SchemaEncoder]:
    if settings.format != "registry":
        return None
    if settings.local is not None:
        return SchemaEncoder(local=settings.local)
    return SchemaEncoder(registry=registry, subject=settings.subject, version=settings.version,
                         messageName=settings.messageName)


def _describe(settings: FormatSettings) -> str:
    if settings.local is not None:
        return f"file:{settings.schemaFile}"
    if settings.subject is not None:
        return f"{settings.subject}@{settings.version}"
    return "registry"


def _keyBytes(message: Message) -> Optional[bytes]:
    key = message.key
    if key is None:
        return None
    if message.extra.get("keyEncoding") == "base64":
        try:
            return base64.b64decode(key)
        except (binascii.Error, ValueError):
            return None
    return key.encode("utf-8")


def _asText(value: Any) -> str:
    # A key is text: a string as it is, anything else as compact JSON.
    return value if isinstance(value, str) else str(_compact(value))


@checkStepClass
@implementer(IPreparingDeliveryStep)
class SchemaDecodeStep:
    """
    Decodes the value (and the key) of every record an API reads.

    @ivar value: the value's L{SchemaDecoder}, or L{None}.
    @ivar key: the key's L{SchemaDecoder}, or L{None}.
    """

    line = 0

    def __init__(self, text: str, value: Optional[SchemaDecoder], key: Optional[SchemaDecoder],
                 clock: Any = None) -> None:
        self.text = text
        self.value = value
        self.key = key
        self.clock = clock
        # Why a schema id could not be had, and when: for the marker's
        # detail, and so that records of that id are marked (not held
        # again) until RETRY_FAILED_SCHEMA seconds have passed.
        self._failures: Dict[Tuple[str, int], Tuple[DecodeError, float]] = {}

    def _now(self) -> float:
        return self.clock.seconds() if self.clock is not None else 0.0  # type: ignore[no-any-return]

    def _remember(self, failure: Failure, which: str) -> None:
        error = failure.value
        if isinstance(error, DecodeError) and error.schemaId is not None:
            if len(self._failures) >= MAX_REMEMBERED_FAILURES:
                self._failures.clear()
            self._failures[(which, error.schemaId)] = (error, self._now())

    def _pending(self, decoder: SchemaDecoder, which: str, data: bytes) -> Optional[Deferred]:
        if self._failures and len(data) >= 5 and data[0] == 0:
            failed = self._failures.get((which, int.from_bytes(data[1:5], "big")))
            if failed is not None and self._now() - failed[1] < RETRY_FAILED_SCHEMA:
                # Tried a moment ago: mark it rather than hold the stream.
                return None
        d = decoder.pending(data)
        if d is None:
            return None
        return d.addErrback(self._remember, which)

    def prepare(self, message: Message) -> Optional[Deferred]:
        waits = []
        if self.value is not None and message.content:
            d = self._pending(self.value, "value", message.content)
            if d is not None:
                waits.append(d)
        if self.key is not None:
            raw = _keyBytes(message)
            if raw is not None:
                d = self._pending(self.key, "key", raw)
                if d is not None:
                    waits.append(d)
        if not waits:
            return None
        if len(waits) == 1:
            return waits[0]
        return gatherResults(waits, consumeErrors=True)

    def _decode(self, decoder: SchemaDecoder, which: str, data: bytes) -> Any:
        try:
            decoded = decoder.decodeKnown(data)
        except DecodeError as e:
            raise StepError(f"the {which} cannot be decoded ({e.reason}): {e.message}",
                            slug="decode-failed") from None
        if decoded is None:
            # prepare() fetched it and failed (or was not asked): say why.
            schemaId = int.from_bytes(data[1:5], "big")
            failed = self._failures.get((which, schemaId))
            if failed is not None:
                known = failed[0]
                raise StepError(f"the {which} cannot be decoded ({known.reason}): {known.message}",
                                slug="decode-failed")
            raise StepError(f"the {which} cannot be decoded (unknown-schema): schema id {schemaId} "
                            "is not known yet", slug="decode-failed")
        return decoded.value

    def onDeliver(self, message: Message) -> Message:
        content = message.content
        headers = message.headers
        extra = message.extra
        key = message.key
        changed = False
        if self.key is not None and key is not None:
            raw = _keyBytes(message)
            if raw is None:
                raise StepError("the key cannot be decoded (corrupt): its base64 text does not read",
                                slug="decode-failed")
            key = _asText(self._decode(self.key, "key", raw))
            if "keyEncoding" in extra:
                extra = {k: v for k, v in extra.items() if k != "keyEncoding"}
            changed = True
        jsonContent = message.jsonContent
        if self.value is not None and not (not content and extra.get("tombstone")):
            value = self._decode(self.value, "value", content)
            try:
                content = _compact(value).encode("utf-8")
            except ValueError as e:
                # A float NaN or infinity decoded from a payload: the
                # codecs spell those as strings; anything else is a bug.
                raise StepError(f"the value cannot be shown as JSON: {e}", slug="decode-failed") from None
            if headers:
                headers = tuple(h for h in headers if h[0].lower() != "content-type") + (_JSON_TYPE,)
            else:
                headers = _JSON_HEADERS
            jsonContent = True
            changed = True
        if not changed:
            return message
        return message._replace(content=content, key=key, headers=headers, extra=extra, jsonContent=jsonContent)


def _encodeFailed(failure: Failure, which: str, described: str) -> Failure:
    error = failure.value
    if isinstance(error, EncodeError):
        return Failure(SchemaMismatch(f"the {which} does not match the schema {described}: {error.message}",
                                      extra={"pointer": error.pointer, "part": which}))
    if isinstance(error, RegistryError):
        return Failure(EndpointUnavailable(f"the schema of the {which} ({described}) cannot be had from the "
                                           f"registry: {error.message}", retryAfter=5))
    if isinstance(error, SchemaError):
        return Failure(EndpointUnavailable(f"the schema of the {which} ({described}) cannot be used: "
                                           f"{error.message}", retryAfter=30))
    return failure


@checkStepClass
@implementer(IPublishStep)
class SchemaEncodeStep:
    """
    Encodes the JSON content (and the key) of every message an API
    publishes with its schema.
    """

    line = 0
    # Publishing is all it does; HTTP POST keeps no request header for it.
    requestHeaders: Tuple[bytes, ...] = ()

    def __init__(self, text: str, value: Optional[SchemaEncoder], key: Optional[SchemaEncoder],
                 valueSchema: str = "", keySchema: str = "", maxBytes: int = 64 * 1024 * 1024) -> None:
        self.text = text
        self.value = value
        self.key = key
        self.valueSchema = valueSchema
        self.keySchema = keySchema
        self.maxBytes = maxBytes

    def _content(self, draft: Draft) -> Any:
        whole = {"pointer": "", "part": "value"}
        try:
            return jsonlimits.loads(draft.content, maxDepth=MAX_DEPTH, maxBytes=self.maxBytes)
        except jsonlimits.JsonLimitError as e:
            raise SchemaMismatch(f"the content cannot be encoded: {e}", extra=whole) from None
        except (ValueError, UnicodeDecodeError) as e:
            raise SchemaMismatch(f"the content is not JSON, and this API writes it with the schema "
                                 f"{self.valueSchema}: {str(e)[:120]}", extra=whole) from None

    def _key(self, draft: Draft) -> Deferred:
        assert self.key is not None
        text = draft.key
        assert text is not None
        encoder = self.key
        try:
            parsed: Any = jsonlimits.loads(text, maxDepth=MAX_DEPTH)
        except ValueError:
            return encoder.encode(text)

        def asString(failure: Failure) -> Any:
            # A key "123" of a string schema: the text as it was sent.
            failure.trap(EncodeError)
            return encoder.encode(text).addErrback(lambda _: failure)

        if isinstance(parsed, str):
            return encoder.encode(parsed)
        return encoder.encode(parsed).addErrback(asString)

    def onPublish(self, draft: Draft, call: Any) -> Deferred:
        d: Deferred = succeed(draft)
        if self.value is not None:
            encoder = self.value
            value = self._content(draft)

            def withContent(payload: bytes, draft: Draft) -> Draft:
                # The content is no longer JSON: drop the type it came with.
                headers = tuple(h for h in draft.headers if h[0].lower() != "content-type")
                return draft._replace(content=payload, headers=headers)

            d = encoder.encode(value).addErrback(_encodeFailed, "value", self.valueSchema)
            d.addCallback(withContent, draft)
        if self.key is not None and draft.key is not None:
            def withKey(current: Draft) -> Deferred:
                keyed = self._key(current).addErrback(_encodeFailed, "key", self.keySchema)
                return keyed.addCallback(lambda raw: current._replace(key=raw))
            d.addCallback(withKey)
        return d


def schemaCodecFor(api: Any) -> Optional[Codec]:
    """
    The schema codec of the API runtime C{api}, or L{None} when neither
    its value nor its key is C{registry}-formatted.
    """
    settings: Optional[SchemaSettings] = api.config.options.get("schemas")
    if settings is None or (settings.value.format != "registry" and settings.key.format != "registry"):
        return None
    registry = registryFor(api)
    valueDecoder = _decoderOf(settings.value, registry)
    keyDecoder = _decoderOf(settings.key, registry)
    parts = []
    if valueDecoder is not None:
        parts.append(f"value-format = registry ({_describe(settings.value)})")
    if keyDecoder is not None:
        parts.append(f"key-format = registry ({_describe(settings.key)})")
    text = ", ".join(parts)
    decoder = SchemaDecodeStep(text, valueDecoder, keyDecoder, api.node.reactor)
    maxBytes = api.node.settings.maxMessageBytes
    encoder = SchemaEncodeStep(text, _encoderOf(settings.value, registry), _encoderOf(settings.key, registry),
                               _describe(settings.value), _describe(settings.key), maxBytes)
    return Codec(decoder, encoder)


registerCodec(schemaCodecFor)
