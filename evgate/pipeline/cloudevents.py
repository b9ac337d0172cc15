"""
CloudEvents steps: a message as a CloudEvent in structured mode (the
content is an C{application/cloudevents+json} document) or in binary mode
(the content is the event's data; its attributes are headers), per the
CloudEvents 1.0 protocol bindings:

 - Kafka (and the in-memory endpoint): headers C{ce_<attribute>}, the data's
   type in C{content-type};
 - MQTT 5: user properties named as the attributes, the data's type in the
   MQTT content type (the connector maps C{content-type} to it);
 - HTTP: headers C{ce-<attribute>} (POST bodies, webhook deliveries).

Steps (docs/transforms.md)::

    cloudevents to-binary [kafka|mqtt|http]   (alias: from-structured)
    cloudevents to-structured                 (alias: from-binary)
    cloudevents make type=TYPE source=SOURCE  a plain message becomes one

Each reads an event in either mode and in any binding's header spelling,
so a step accepts what clients send either way; a message that already is
in the wanted mode goes through unchanged.  The binding defaults to the
API's endpoint's.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Tuple

from zope.interface import implementer

from evgate.interfaces import IDeliveryStep, IPublishStep
from evgate.pipeline import StepError, checkStepClass
from evgate.pipeline.steps import _Step, contentValue

STRUCTURED_TYPE = "application/cloudevents+json"
PREFIXES = {"kafka": "ce_", "http": "ce-", "mqtt": ""}
REQUIRED = ("id", "source", "specversion", "type")
# Attributes of the specification; with the MQTT binding (no prefix) only
# these and names that look like extensions are read as attributes.
_KNOWN = frozenset({"id", "source", "specversion", "type", "subject", "time", "dataschema"})
_ATTRIBUTE = re.compile(r"^[a-z0-9]{1,20}$")
_compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _isJSON(contentType: Optional[str]) -> bool:
    if contentType is None:
        return True
    media = contentType.split(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json") or media == "text/json"


def _contentType(headers: Tuple[Tuple[str, str], ...]) -> Optional[str]:
    for name, value in headers:
        if name.lower() == "content-type":
            return value
    return None


class ReadEvent:
    """
    A CloudEvent taken apart: its attributes (C{datacontenttype} apart),
    its data as bytes, and the headers that are not its attributes.
    """

    def __init__(self, attributes: Dict[str, str], data: bytes, contentType: Optional[str],
                 others: Tuple[Tuple[str, str], ...]) -> None:
        self.attributes = attributes
        self.data = data
        self.contentType = contentType
        self.others = others


def binaryAttributes(headers: Tuple[Tuple[str, str], ...], binding: str
                     ) -> Tuple[Dict[str, str], Tuple[Tuple[str, str], ...]]:
    """
    The CloudEvents attributes among C{headers} (either prefix, or bare
    names with the MQTT binding) and the other headers.
    """
    attributes: Dict[str, str] = {}
    others: List[Tuple[str, str]] = []
    for name, value in headers:
        lower = name.lower()
        if lower.startswith(("ce_", "ce-")) and _ATTRIBUTE.match(lower[3:]):
            attributes[lower[3:]] = value
        elif binding == "mqtt" and lower in _KNOWN:
            attributes[lower] = value
        else:
            others.append((name, value))
    return attributes, tuple(others)


def readEvent(record: Any, binding: str, maxBytes: int) -> ReadEvent:
    """
    The CloudEvent C{record} (a Draft or Message) holds, in either mode.

    @raise StepError: if it holds none, or one without a required
        attribute.
    """
    headers = record.headers
    contentType = _contentType(headers)
    if contentType is not None and contentType.split(";")[0].strip().lower() == STRUCTURED_TYPE:
        document = contentValue(record.content, maxBytes)
        if not isinstance(document, dict):
            raise StepError("a structured CloudEvent is a JSON object", "")
        attributes: Dict[str, str] = {}
        for name, value in document.items():
            if name in ("data", "data_base64", "datacontenttype"):
                continue
            if not isinstance(name, str) or not _ATTRIBUTE.match(name):
                raise StepError(f"{name!r} is not a CloudEvents attribute name", "/" + str(name))
            attributes[name] = value if isinstance(value, str) else _compact(value)
        eventType = document.get("datacontenttype")
        if eventType is not None and not isinstance(eventType, str):
            raise StepError("datacontenttype is not a string", "/datacontenttype")
        if "data_base64" in document:
            try:
                data = base64.b64decode(document["data_base64"], validate=True)
            except (ValueError, TypeError):
                raise StepError("data_base64 is not base64", "/data_base64") from None
        elif "data" not in document:
            data = b""
        elif isinstance(document["data"], str) and not _isJSON(eventType):
            data = document["data"].encode("utf-8")
        else:
            data = _compact(document["data"]).encode("utf-8")
        others = tuple(h for h in headers if h[0].lower() != "content-type")
    else:
        attributes, others = binaryAttributes(headers, binding)
        if not attributes:
            raise StepError("the message is not a CloudEvent (no ce_ headers, content-type is not "
                            f"{STRUCTURED_TYPE})")
        eventType = contentType
        data = record.content
        others = tuple(h for h in others if h[0].lower() != "content-type")
    for name in REQUIRED:
        if not attributes.get(name):
            raise StepError(f"the CloudEvent has no {name}", "/" + name)
    if attributes["specversion"] != "1.0":
        raise StepError(f"CloudEvents specversion {attributes['specversion']!r} is not supported (1.0 is)",
                        "/specversion")
    return ReadEvent(attributes, data, eventType, others)


def asBinary(record: Any, event: ReadEvent, binding: str) -> Any:
    """
    C{record} holding C{event} in binary mode for C{binding}.
    """
    prefix = PREFIXES[binding]
    headers = list(event.others)
    for name, value in event.attributes.items():
        headers.append((prefix + name, value))
    if event.contentType is not None:
        headers.append(("content-type", event.contentType))
    return record._replace(content=event.data, headers=tuple(headers))


def asStructured(record: Any, event: ReadEvent) -> Any:
    """
    C{record} holding C{event} in structured mode.
    """
    document: Dict[str, Any] = dict(event.attributes)
    if event.contentType is not None:
        document["datacontenttype"] = event.contentType
    if event.data:
        if _isJSON(event.contentType):
            try:
                document["data"] = json.loads(event.data)
            except ValueError:
                document["data_base64"] = base64.b64encode(event.data).decode("ascii")
        else:
            try:
                document["data"] = event.data.decode("utf-8")
            except UnicodeDecodeError:
                document["data_base64"] = base64.b64encode(event.data).decode("ascii")
    headers = event.others + (("content-type", STRUCTURED_TYPE),)
    return record._replace(content=_compact(document).encode("utf-8"), headers=headers)


def isBinary(record: Any, binding: str) -> bool:
    """
    Whether C{record} is a CloudEvent in binary mode of C{binding} already.
    """
    prefix = PREFIXES[binding]
    names = {name.lower() for name, _ in record.headers}
    return (prefix + "specversion") in names and (not prefix or not any(
        n.startswith(("ce_", "ce-")) and not n.startswith(prefix) for n in names))


@checkStepClass
@implementer(IPublishStep, IDeliveryStep)
class ToBinary(_Step):
    """
    C{cloudevents to-binary [BINDING]}: the message in binary mode.
    """

    # HTTP POST keeps these request headers whole (binary mode over HTTP).
    requestHeaders = (b"ce-",)

    def __init__(self, text: str, line: int, binding: str, maxBytes: int) -> None:
        super().__init__(text, line)
        self.binding = binding
        self.maxBytes = maxBytes

    def apply(self, record: Any, claims: Any) -> Any:
        if isBinary(record, self.binding):
            return record
        return asBinary(record, readEvent(record, self.binding, self.maxBytes), self.binding)


@checkStepClass
@implementer(IPublishStep, IDeliveryStep)
class ToStructured(_Step):
    """
    C{cloudevents to-structured}: the message in structured mode.
    """

    # HTTP POST keeps these request headers whole (binary mode over HTTP).
    requestHeaders = (b"ce-",)

    def __init__(self, text: str, line: int, binding: str, maxBytes: int) -> None:
        super().__init__(text, line)
        self.binding = binding
        self.maxBytes = maxBytes

    def apply(self, record: Any, claims: Any) -> Any:
        contentType = _contentType(record.headers)
        if contentType is not None and contentType.split(";")[0].strip().lower() == STRUCTURED_TYPE:
            # Checked, not rewritten.
            readEvent(record, self.binding, self.maxBytes)
            return record
        return asStructured(record, readEvent(record, self.binding, self.maxBytes))


@checkStepClass
@implementer(IPublishStep, IDeliveryStep)
class Make(_Step):
    """
    C{cloudevents make type=TYPE source=SOURCE [subject=...]}: a message
    that is not a CloudEvent becomes one in binary mode: a new id (on
    delivery, one made of topic, partition and offset, the same every time
    the message is read), the time now (on delivery, the record's time).
    A message that is a CloudEvent already goes through unchanged.
    """

    # HTTP POST keeps these request headers whole (binary mode over HTTP).
    requestHeaders = (b"ce-",)

    def __init__(self, text: str, line: int, binding: str, attributes: Dict[str, str]) -> None:
        super().__init__(text, line)
        self.binding = binding
        self.attributes = attributes

    def apply(self, record: Any, claims: Any) -> Any:
        contentType = _contentType(record.headers)
        if contentType is not None and contentType.split(";")[0].strip().lower() == STRUCTURED_TYPE:
            return record
        if binaryAttributes(record.headers, self.binding)[0].get("specversion"):
            return record
        prefix = PREFIXES[self.binding]
        if hasattr(record, "offset"):
            eventId = f"{record.topic}-{record.partition}-{record.offset}"
            when = datetime.fromtimestamp(record.timestamp / 1000.0, timezone.utc)
        else:
            eventId = str(uuid.uuid4())
            when = datetime.now(timezone.utc)
        added = [(prefix + "specversion", "1.0"), (prefix + "id", eventId)]
        added += [(prefix + name, value) for name, value in self.attributes.items()]
        added.append((prefix + "time", when.isoformat(timespec="milliseconds").replace("+00:00", "Z")))
        return record._replace(headers=tuple(record.headers) + tuple(added))


def parseStep(text: str, line: int, rest: str, side: str, maxBytes: int, binding: str) -> Any:
    """
    A C{cloudevents ...} step (see the module docstring).

    @raise ValueError: (L{evgate.pipeline.syntax.StepSyntaxError}) if it
        is not valid.
    """
    from evgate.pipeline.syntax import StepSyntaxError

    words = rest.split()
    if not words:
        raise StepSyntaxError("use: cloudevents to-binary|to-structured|make ...")
    verb, args = words[0], words[1:]
    if verb in ("to-binary", "from-structured"):
        if len(args) > 1 or (args and args[0] not in PREFIXES):
            raise StepSyntaxError(f"use: cloudevents {verb} [kafka|mqtt|http]")
        return ToBinary(text, line, args[0] if args else binding, maxBytes)
    if verb in ("to-structured", "from-binary"):
        if args:
            raise StepSyntaxError(f"use: cloudevents {verb}")
        return ToStructured(text, line, binding, maxBytes)
    if verb == "make":
        attributes: Dict[str, str] = {}
        for arg in args:
            name, eq, value = arg.partition("=")
            if not eq or not value or not _ATTRIBUTE.match(name) or name in ("id", "specversion", "time"):
                raise StepSyntaxError(f"{arg!r}: use NAME=VALUE with an attribute other than id, specversion "
                                      "and time")
            attributes[name] = value
        if "type" not in attributes or "source" not in attributes:
            raise StepSyntaxError("use: cloudevents make type=TYPE source=SOURCE [NAME=VALUE ...]")
        return Make(text, line, binding, attributes)
    raise StepSyntaxError(f"unknown cloudevents step {verb!r} (known: to-binary, to-structured, "
                          "from-binary, from-structured, make)")


def webhookCloudEvent(message: Any, mode: str, maxBytes: int = 64 * 1024 * 1024) -> Any:
    """
    C{message} as a webhook delivers it with C{webhook.cloudevents =}
    C{mode}: in binary mode with C{ce-} HTTP headers, or in structured
    mode.  Its attributes may be in any binding's spelling, or it may be
    structured already.

    @raise StepError: if it is not a CloudEvent.
    """
    event = readEvent(message, "mqtt", maxBytes)
    if mode == "binary":
        return asBinary(message, event, "http")
    return asStructured(message, event)
