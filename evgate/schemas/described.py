"""
The message schema of an API, for its AsyncAPI document
(L{evgate.admin.asyncapi}): what a reader of the document needs to know
about the content, in AsyncAPI's Multi Format Schema form
(C{{"schemaFormat": ..., "schema": ...}}).

A local schema file is known at once. A registry subject's latest (or
pinned) version is asked of the registry without waiting: the answer of
the registry client's cache if it has one now, else the last one this
module saw (the fetch goes on in the background, and the next request of
the document has it). An admin answer never waits for a registry.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional, Tuple
from weakref import WeakKeyDictionary

from twisted.logger import Logger
from twisted.python.failure import Failure

from evgate.schemas.config import FormatSettings
from evgate.schemas.registry import RegisteredSchema
from evgate.schemas.steps import registryFor

__all__ = ["SCHEMA_FORMATS", "messagePayload"]

log = Logger()

# AsyncAPI schemaFormat values by the registry's schema type.
SCHEMA_FORMATS = {
    "AVRO": "application/vnd.apache.avro+json;version=1.9.0",
    "PROTOBUF": "application/vnd.google.protobuf;version=3",
    "JSON": "application/schema+json;version=draft-07",
}

# The last schema seen per registry client and subject, so that a
# document asked for while a fetch is under way still shows it.
_seen: "WeakKeyDictionary[Any, Dict[Tuple[str, Any], RegisteredSchema]]" = WeakKeyDictionary()


def _payload(schemaType: str, text: str) -> Optional[Dict[str, Any]]:
    if schemaType == "PROTOBUF":
        return {"schemaFormat": SCHEMA_FORMATS[schemaType], "schema": text}
    try:
        schema = json.loads(text)
    except ValueError:
        return None
    if schemaType == "JSON" and isinstance(schema, dict):
        draft = str(schema.get("$schema", ""))
        for name in ("draft-04", "draft-06", "draft-07"):
            if name in draft:
                return {"schemaFormat": f"application/schema+json;version={name}", "schema": schema}
    return {"schemaFormat": SCHEMA_FORMATS[schemaType], "schema": schema}


def _fromRegistry(api: Any, settings: FormatSettings) -> Optional[Dict[str, Any]]:
    registry = registryFor(api)
    if registry is None or settings.subject is None:
        return None
    seen = _seen.setdefault(registry, {})
    key = (settings.subject, settings.version)
    answer: Dict[str, Any] = {}

    def got(schema: RegisteredSchema) -> None:
        seen[key] = schema
        answer["schema"] = schema

    def failed(failure: Failure) -> None:
        log.info("AsyncAPI of {api}: the schema of {subject} cannot be had now: {error}",
                 api=api.config.name, subject=settings.subject, error=failure.getErrorMessage())

    registry.subjectVersion(settings.subject, settings.version).addCallbacks(got, failed)
    # Fired at once when the registry client had it cached; else the last
    # one seen (or none, the first time).
    schema = answer.get("schema") or seen.get(key)
    if schema is None:
        return None
    return _payload(schema.schemaType, schema.text)


def messagePayload(api: Any) -> Optional[Dict[str, Any]]:
    """
    The AsyncAPI payload of the API runtime C{api}'s messages when their
    schema is known now, else L{None}.
    """
    schemas = api.config.options.get("schemas")
    if schemas is None or schemas.value.format != "registry":
        return None
    settings = schemas.value
    if settings.local is not None:
        return _payload(settings.local.schemaType, settings.local.text)
    return _fromRegistry(api, settings)
