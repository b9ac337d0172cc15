"""
The gateway's durable records, behind L{evgate.interfaces.IStore}.

The C{[gateway]} key C{store} chooses the backend:

 - C{sqlite:PATH}: the embedded default, one SQLite file on local disk
   (L{evgate.store.sqlite.SqliteStore}).  A relative PATH is relative to
   the directory of the configuration file.  Several gateway processes on
   one host may share the file.
 - C{memory}: records in the process's memory, gone at exit; for tests and
   demos (L{MemoryStore}).
 - C{kafka:ENDPOINT/TOPIC}: a compacted topic on the C{[endpoint:ENDPOINT]}
   of C{type = kafka}, shared by every gateway node that names it
   (L{evgate.store.kafka.KafkaStore}).

No key means no store: features that need one (webhook subscriptions)
refuse to start without it, with a configuration error that says so.

Adding a backend: implement L{IStore} (records of JSON objects keyed by
C{(kind, id)}; see its docstring) as a Service, and teach L{parseStoreKey}
and L{buildStore} its spec.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from evgate.ini import SectionReader, gatewayKeys
from evgate.interfaces import IStore
from evgate.registry import Registry

Record = Dict[str, Any]


@dataclass(frozen=True)
class StoreSpec:
    """
    The parsed C{store} key.

    @ivar kind: C{"sqlite"}, C{"memory"} or C{"kafka"}.
    @ivar path: the absolute path of the SQLite file (C{sqlite} only).
    @ivar endpoint: the Kafka endpoint's name (C{kafka} only).
    @ivar topic: the Kafka topic (C{kafka} only).
    """

    kind: str
    path: Optional[str] = None
    endpoint: Optional[str] = None
    topic: Optional[str] = None

    def describe(self) -> str:
        """
        The spec as an operator would write it, with the path made absolute.
        """
        if self.kind == "kafka":
            return f"kafka:{self.endpoint}/{self.topic}"
        return f"{self.kind}:{self.path}" if self.path is not None else self.kind


def _copy(record: Any) -> Record:
    # A JSON round trip both copies and proves the record is JSON, which
    # every backend must be able to keep.
    return json.loads(json.dumps(record))  # type: ignore[no-any-return]


def applyUpdate(record: Record, changes: Mapping[str, Any],
                increments: Optional[Mapping[str, int]]) -> Record:
    """
    The record C{record} after L{IStore.update}'s C{changes} and
    C{increments}; shared by the backends so that they agree.
    """
    updated = dict(record)
    updated.update(changes)
    for name, amount in (increments or {}).items():
        current = updated.get(name)
        updated[name] = (current if isinstance(current, int) else 0) + amount
    return updated


@implementer(IStore)
class MemoryStore(Service):
    """
    An L{IStore} in memory: the reference implementation, used by unit
    tests and by C{store = memory}.  Records are copied on the way in and
    out, so callers never share them.
    """

    description = "memory"
    isOpen = True

    def __init__(self) -> None:
        self.records: Dict[Tuple[str, str], Record] = {}

    def get(self, kind: str, id: str) -> "Deferred[Optional[Record]]":
        record = self.records.get((kind, id))
        return succeed(None if record is None else _copy(record))

    def list(self, kind: str) -> "Deferred[List[Tuple[str, Record]]]":
        return succeed([(i, _copy(r)) for (k, i), r in sorted(self.records.items()) if k == kind])

    def create(self, kind: str, id: str, record: Record) -> "Deferred[bool]":
        if (kind, id) in self.records:
            return succeed(False)
        self.records[(kind, id)] = _copy(record)
        return succeed(True)

    def put(self, kind: str, id: str, record: Record) -> "Deferred[None]":
        self.records[(kind, id)] = _copy(record)
        return succeed(None)

    def update(self, kind: str, id: str, changes: Mapping[str, Any],
               increments: Optional[Mapping[str, int]] = None) -> "Deferred[Optional[Record]]":
        record = self.records.get((kind, id))
        if record is None:
            return succeed(None)
        updated = self.records[(kind, id)] = _copy(applyUpdate(record, changes, increments))
        return succeed(_copy(updated))

    def delete(self, kind: str, id: str) -> "Deferred[bool]":
        return succeed(self.records.pop((kind, id), None) is not None)


@gatewayKeys
def parseStoreKey(section: SectionReader) -> Mapping[str, Any]:
    """
    The C{store} key of C{[gateway]}: C{sqlite:PATH}, C{memory} or
    C{kafka:ENDPOINT/TOPIC}, as a L{StoreSpec} (or L{None} when unset)
    under C{options["store"]}.  That ENDPOINT is a Kafka endpoint is checked
    when the node is built (the endpoints are read after C{[gateway]}).
    """
    raw = section.get("store", None)
    if raw is None:
        return {"store": None}
    if raw == "memory":
        return {"store": StoreSpec("memory")}
    kind, sep, path = raw.partition(":")
    if kind == "kafka" and sep:
        match = re.fullmatch(r"([A-Za-z0-9._-]+)/([A-Za-z0-9._-]{1,249})", path.strip())
        if match is None or match.group(2) in (".", ".."):
            raise section.error("store", f"expected kafka:ENDPOINT/TOPIC (a Kafka topic name: letters, digits, "
                                         f"'.', '_', '-'), got {raw!r}")
        return {"store": StoreSpec("kafka", endpoint=match.group(1), topic=match.group(2))}
    if kind != "sqlite" or not sep or not path.strip():
        raise section.error("store", f"expected sqlite:PATH, kafka:ENDPOINT/TOPIC or memory, got {raw!r}")
    path = os.path.expanduser(path.strip())
    if not os.path.isabs(path):
        base = os.path.dirname(os.path.abspath(section.path)) if section.path[:1] != "<" else os.getcwd()
        path = os.path.join(base, path)
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise section.error("store", f"the directory {directory} does not exist")
    return {"store": StoreSpec("sqlite", os.path.normpath(path))}


def buildStore(spec: StoreSpec, reactor: Any, connectors: Optional[Mapping[str, Any]] = None,
               configPath: str = "<config>") -> IStore:
    """
    The store service of C{spec}, not started, made by the class registered
    for its kind in L{STORES}.  A Kafka store uses the connector of its
    endpoint among C{connectors} (the node's).

    @raise ConfigError: if a Kafka store's endpoint is not a Kafka endpoint.
    """
    return STORES.factory(spec.kind)(spec, reactor, connectors or {}, configPath)


def _kafkaStore(spec: StoreSpec, reactor: Any, connectors: Mapping[str, Any], configPath: str) -> IStore:
    assert spec.endpoint is not None and spec.topic is not None
    return buildKafkaStore(spec.endpoint, spec.topic, connectors, reactor, configPath)  # type: ignore[no-any-return]


def _sqliteStore(spec: StoreSpec, reactor: Any, connectors: Mapping[str, Any], configPath: str) -> IStore:
    assert spec.path is not None
    return SqliteStore(spec.path, reactor)  # type: ignore[no-any-return]


# The store kinds, by the name the store key starts with.  At the end of
# the module: the store modules take Record and applyUpdate from it.
from evgate.store.kafka import KafkaStore, buildKafkaStore  # noqa: E402
from evgate.store.sqlite import SqliteStore  # noqa: E402

STORES: Registry[IStore] = Registry(IStore, "store")
STORES.register("memory", MemoryStore, lambda spec, reactor, connectors, configPath: MemoryStore())
STORES.register("sqlite", SqliteStore, _sqliteStore)
STORES.register("kafka", KafkaStore, _kafkaStore)
