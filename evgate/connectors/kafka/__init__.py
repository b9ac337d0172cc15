"""
The Kafka endpoint (C{type = kafka}), on confluent-kafka (librdkafka).

Threads
=======

librdkafka is a blocking library, and the reactor thread must never wait on
a broker.  So every client lives on a thread of its own, and the only thing
those threads do to Twisted is C{reactor.callFromThread}:

 - one L{confluent_kafka.Producer} per endpoint, shared by every API on it.
   C{produce()} only enqueues, so it is called on the reactor thread; a
   L{ProducerThread} calls C{poll()}, which runs the delivery reports, and
   each report hops to the reactor to fire its publisher's Deferred.  A full
   queue (C{BufferError}) is backpressure: a 503 at once, never a wait.

 - one L{confluent_kafka.Consumer} per upstream subscription, owned by an
   L{AssignedReader} thread that does everything with it: metadata, start
   offsets, C{assign}, polling, pausing and closing.  No consumer group:
   positions are the clients' cursors.  The reactor talks to the thread
   through a command queue only.

 - one consumer per (topic, group) for HTTP GET's group mode, owned by a
   L{GroupReader} thread; see L{KafkaConnector.groupPoll}.

Bounded hand-over
=================

A reader hands the reactor batches of up to C{batch-size} messages, and at
most C{batches-in-flight} of them at a time: it takes a credit (a
semaphore) per batch and the reactor gives the credit back once the batch
went to the sink.  A reactor that falls behind therefore stops the reader
instead of filling memory with batches queued for C{callFromThread}.  While
the hub has paused a subscription, batches that were already on their way
are held on the reactor side, still holding their credits, and the
consumer is paused (C{Consumer.pause}); so a paused subscription costs at
most C{batches-in-flight} batches plus librdkafka's own bounded prefetch.

Shutdown and the broker being down
==================================

Nothing on the reactor thread waits for a broker: readers retry metadata
with a growing delay and stay subscribed; a publish waits for its delivery
report, which librdkafka gives after at most C{message.timeout.ms}, then is
answered 503 when the broker is unreachable (504 when it is reachable but
did not acknowledge).  C{stopService} asks every thread to stop, flushes
the producer for at most C{shutdown-timeout} seconds on its own thread,
and stops waiting after that: the threads are daemons and a broker that is
gone cannot keep the gateway from stopping.

Modules
=======

The package's modules are private; this module is its public face.

 - C{_options}: the section's keys, librdkafka's defaults, the check of a
   section against librdkafka;
 - C{_client}: the client factory, error codes, records to messages,
   librdkafka's log lines;
 - C{_producer}: L{ProducerThread};
 - C{_consumer}: L{ConsumerThread}, the owner thread every reader builds on,
   with the record-error handling they share, and L{BatchReader}, the
   poll-and-hand-over loop under credits of the assigned and store readers;
 - C{_assigned}: L{AssignedReader}, an upstream subscription;
 - C{_groups}: L{GroupReader} and L{GroupBatch}, group mode;
 - C{_publishing}: the publishing half of L{KafkaConnector} (pending
   publishes, delivery reports, timeouts, the problems answered);
 - C{_connector}: L{KafkaConnector}.
"""

from evgate.connectors.kafka._assigned import AssignedReader
from evgate.connectors.kafka._client import ConfluentClients, LibrdkafkaLog, codes, kafkaError, toMessage
from evgate.connectors.kafka._connector import KafkaConnector
from evgate.connectors.kafka._consumer import BatchReader, ConsumerThread
from evgate.connectors.kafka._groups import GroupBatch, GroupReader, TakeRequest
from evgate.connectors.kafka._options import (
    CONSUMER_DEFAULTS,
    MANAGED_KEYS,
    OWN_DEFAULTS,
    PRODUCER_DEFAULTS,
    READER_GROUP,
    _confluent,
    checkWithLibrdkafka,
    consumerSettings,
    parseOptions,
    producerSettings,
)
from evgate.connectors.kafka._producer import REPORT_BATCH, ProducerThread

__all__ = [
    "AssignedReader", "BatchReader", "ConfluentClients", "ConsumerThread", "GroupBatch", "GroupReader",
    "KafkaConnector", "LibrdkafkaLog", "ProducerThread", "TakeRequest",
    "CONSUMER_DEFAULTS", "MANAGED_KEYS", "OWN_DEFAULTS", "PRODUCER_DEFAULTS", "READER_GROUP", "REPORT_BATCH",
    "_confluent", "checkWithLibrdkafka", "codes", "consumerSettings", "kafkaError", "parseOptions",
    "producerSettings", "toMessage",
]

# The classes keep the module name they had before the package was split:
# a class's Logger takes its namespace from it, and operators filter logs
# by namespace (evgate.connectors.kafka.LibrdkafkaLog and the others).
for _public in (AssignedReader, BatchReader, ConfluentClients, ConsumerThread, GroupBatch, GroupReader, KafkaConnector,
                LibrdkafkaLog, ProducerThread, TakeRequest):
    _public.__module__ = __name__
del _public
