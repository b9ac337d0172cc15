"""
A store shared by several gateway nodes: a compacted Kafka topic
(C{store = kafka:<endpoint>/<topic>}), the way Kafka Connect and Schema
Registry keep their configuration.

    [gateway]
    store = kafka:events/evgate-store

    [endpoint:events]
    type = kafka
    bootstrap.servers = kafka-1:9092,kafka-2:9092

The topic
=========

One partition, C{cleanup.policy = compact}; the node that finds it
missing creates it (with the AdminClient, on the reader's thread) with
the broker's default replication factor.  A message is one record: key
C{kind/id}, value the record as JSON, and a tombstone (a null value) for a
deleted record.  Compaction keeps the last message of every key, which is
all a node starting later needs.  A topic with more than one partition, or
that is not compacted, is refused (nothing is read; every call fails with
a 503 that says why): its order, or its records, would be lost.

Reading
=======

Every node reads the whole topic into memory at start, up to the end
offset the broker gave when reading began; only then is the store open,
and calls made before wait for that (at most L{OPEN_WAIT} seconds, then
503).  Afterwards the node follows the topic and applies every record as
it comes, from whichever node wrote it, and tells the callers of
L{KafkaStore.watch} (API keys use it: a key revoked on one node is refused
everywhere within the time it takes to read one message back, milliseconds
rather than a polling interval).  Reads (C{get}, C{list}) are answered
from memory: they go on while Kafka is down.

The reader is an L{evgate.connectors.kafka.ConsumerThread} of the store's
endpoint (the same owner-thread machinery as the endpoint's own readers),
and writes go through the endpoint's shared producer.

Writing
=======

A write is produced to the topic and answered once its delivery report
came I{and} this node's reader has applied it: after C{update} answered,
C{get} on the same node sees the change (read your writes).  While Kafka
is down a write fails with a 503 (after the endpoint's
C{message.timeout.ms}).  The writes of one node to one record are made
one after the other, in the order they were asked for.

Several writers
===============

Every node applies the same messages in the same order, so every node
computes the same records, whatever the writers did concurrently, as long
as the rule that turns a message into a record is deterministic.  It is:

 - C{put} replaces the record; C{delete} removes it.
 - C{create} stores the record unless the id is taken at the point where
   the message lands: of two nodes creating the same id at once, the first
   in the topic wins (and the other's C{create} answers C{False}).  Ids
   are random (62 bits or more), so in practice this is a safety net.
 - C{update} carries the fields it changes and the increments, besides
   the whole record as the writer computed it, and the offset of the
   version of the record it started from (its I{base}).  When the base is
   still the record's last version, the record becomes the writer's.
   When another write landed in between (an operator pausing a
   subscription on one node while another node moves its position), the
   changes and increments are applied to the record as it now is: writers
   of different fields keep each other's changes, and concurrent
   increments all count.  A record deleted in between stays deleted.

Compaction keeps only the last message of a key, so that message's value
must be the record every node computed, or a node starting later would
see something else.  When a write was merged rather than taken as it was
(another write landed in between), its writer follows it with a C{sync}
message holding the merged record, which every node with the history
ignores and a node without it takes as it is.  A writer that dies between
its write and its sync leaves a value that the next write of that record
corrects; until then a node that starts meanwhile may see that record
without the concurrent change.  That is the one window where the last
writer wins, at record granularity.

What the store does not do: transactions across records, or a read that
waits for other nodes' writes (a C{get} right after another node wrote
may still see the old record for the milliseconds the message takes to
arrive).

Modules
=======

The package's modules are private; this module is its public face:
C{_records} (the topic's settings, headers and keys), C{_reader}
(L{StoreReader}) and C{_store} (L{KafkaStore}).
"""

from __future__ import annotations

from typing import Any, Mapping

from evgate.connectors.kafka import KafkaConnector
from evgate.ini import ConfigError
from evgate.store.kafka._reader import StoreReader
from evgate.store.kafka._records import (
    BASE_HEADER,
    BATCHES_IN_FLIGHT,
    MAX_RESTART_DELAY,
    MAX_SYNCS,
    OP_HEADER,
    OPEN_WAIT,
    PATCH_HEADER,
    READ_BATCH,
    RESTART_DELAY,
    WRITE_TIMEOUT,
    WRITER_HEADER,
    Applied,
    recordKey,
)
from evgate.store.kafka._store import KafkaStore

__all__ = [
    "Applied", "KafkaStore", "StoreReader", "buildKafkaStore", "recordKey",
    "BASE_HEADER", "BATCHES_IN_FLIGHT", "MAX_RESTART_DELAY", "MAX_SYNCS", "OP_HEADER", "OPEN_WAIT", "PATCH_HEADER",
    "READ_BATCH", "RESTART_DELAY", "WRITE_TIMEOUT", "WRITER_HEADER",
]

# The classes keep the module name they had before the package was split:
# a class's Logger takes its namespace from it, and operators filter logs
# by namespace.
for _public in (Applied, KafkaStore, StoreReader):
    _public.__module__ = __name__
del _public


def buildKafkaStore(endpoint: str, topic: str, connectors: Mapping[str, Any], reactor: Any,
                    configPath: str) -> KafkaStore:
    """
    The store of C{store = kafka:<endpoint>/<topic>}.

    @raise ConfigError: if there is no Kafka endpoint of that name.
    """
    connector = connectors.get(endpoint)
    # The store drives librdkafka clients of its own made from the
    # connector's settings: it needs the Kafka connector itself, not a
    # capability another connector could provide.
    if not isinstance(connector, KafkaConnector):
        kafka = ", ".join(sorted(n for n, c in connectors.items() if isinstance(c, KafkaConnector))) or "none"
        what = (f"there is no [endpoint:{endpoint}]" if connector is None
                else f"[endpoint:{endpoint}] is of type {getattr(connector, 'kind', type(connector).__name__)}")
        raise ConfigError(configPath, "gateway", "store",
                          f"kafka:{endpoint}/{topic}: {what}; the store needs an endpoint of type kafka "
                          f"(Kafka endpoints: {kafka})")
    return KafkaStore(connector, topic, reactor)
