"""
Tests for the Kafka connector's bridge between librdkafka's threads and the
reactor, with fake confluent-kafka clients: no broker, no threads, no sleeps.

The fake reactor is a L{Clock} whose C{callFromThread} queues the call;
L{FakeReactor.runFromThread} plays the reactor's part.  Owner threads are
never started: each test drives a reader's loop itself, one
C{runOnce()} at a time, with C{poll-timeout = 0} so that no wait blocks.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Optional, Tuple, cast

from confluent_kafka import KafkaError, KafkaException
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyClass, verifyObject

from evgate.config import ConfigError, SectionReader, parseConfig
from evgate.connectors.kafka import (
    AssignedReader,
    GroupBatch,
    KafkaConnector,
    consumerSettings,
    parseOptions,
    producerSettings,
    toMessage,
)
from evgate.connectors.kafka._groups import COMMIT_WAIT, FULL_POLL_INTERVAL
from evgate.errors import EndpointTimeout, EndpointUnavailable, PayloadTooLarge
from evgate.interfaces import (
    IConnector,
    IConsumerGroups,
    IHeadOffsets,
    IHoldableSubscription,
    IRetainedLog,
    ISharedSubscriptions,
    IUpstreamSubscription,
)
from evgate.message import Cursor, Draft, Message, Position, cursorTag

from .helpers import memoryGateway

TOPIC = "orders"


# ----------------------------------------------------------------- fakes


class FakeReactor(Clock):
    """
    A Clock whose C{callFromThread} queues calls until L{runFromThread}.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fromThread: List[Tuple[Callable[..., Any], tuple, dict]] = []

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.fromThread.append((f, args, kwargs))

    def runFromThread(self) -> None:
        """
        Run the queued calls, as the reactor thread would.
        """
        while self.fromThread:
            f, args, kwargs = self.fromThread.pop(0)
            f(*args, **kwargs)

    def pendingNames(self) -> List[str]:
        """
        The names of the queued calls.
        """
        return [getattr(f, "__name__", repr(f)) for f, _, _ in self.fromThread]


def kafkaError(code: int, reason: str = "") -> KafkaError:
    """
    A librdkafka error.
    """
    return KafkaError(code, reason or f"error {code}")


class FakeRecord:
    """
    A consumed record (or an error in its place), like C{confluent_kafka.Message}.
    """

    def __init__(self, partition: int, offset: int, value: Optional[bytes] = b"v", key: Optional[bytes] = None,
                 headers: Any = None, timestamp: Tuple[int, int] = (1, 1700000000000),
                 error: Optional[KafkaError] = None, topic: str = TOPIC) -> None:
        self._partition = partition
        self._offset = offset
        self._value = value
        self._key = key
        self._headers = headers
        self._timestamp = timestamp
        self._error = error
        self._topic = topic

    def error(self) -> Optional[KafkaError]:
        return self._error

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> Optional[bytes]:
        return self._key

    def value(self) -> Optional[bytes]:
        return self._value

    def headers(self) -> Any:
        return self._headers

    def timestamp(self) -> Tuple[int, int]:
        return self._timestamp


class TP:
    """
    A TopicPartition.
    """

    def __init__(self, topic: str, partition: int, offset: int = -1001) -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.error: Optional[KafkaError] = None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TP) and (self.topic, self.partition, self.offset) == (
            other.topic, other.partition, other.offset)

    def __repr__(self) -> str:
        return f"TP({self.topic!r}, {self.partition}, {self.offset})"


class FakeTopicMetadata:
    def __init__(self, partitions: Dict[int, Any], error: Optional[KafkaError] = None) -> None:
        self.partitions = partitions
        self.error = error


class FakeMetadata:
    def __init__(self, topics: Dict[str, FakeTopicMetadata]) -> None:
        self.topics = topics


class FakeProducer:
    """
    A producer: C{produce} records, C{poll} runs the reports that tests
    queued with L{deliver} / L{failDelivery}.
    """

    def __init__(self, config: Dict[str, Any]) -> None:
        self.config = config
        self.produced: List[Dict[str, Any]] = []
        self.reports: List[Tuple[Callable[..., Any], Any, Any]] = []
        self.raiseOnProduce: Optional[BaseException] = None
        self.polls = 0
        self.onPoll: Optional[Callable[[], None]] = None
        self.flushed: List[float] = []
        self.purged = False
        self.metadataError: Optional[BaseException] = None

    def produce(self, topic: str, value: Optional[bytes] = None, key: Any = None, partition: int = -1,
                callback: Any = None, on_delivery: Any = None, timestamp: int = 0, headers: Any = None) -> None:
        # confluent-kafka's signature, positional or by keyword.
        if self.raiseOnProduce is not None:
            raise self.raiseOnProduce
        self.produced.append(dict(topic=topic, value=value, key=key, headers=headers, partition=partition,
                                  timestamp=timestamp, on_delivery=callback or on_delivery))

    def deliver(self, index: int, partition: int, offset: int) -> None:
        """
        Queue the success report of the C{index}th message.
        """
        produced = self.produced[index]
        self.reports.append((produced["on_delivery"], None, FakeRecord(partition, offset, topic=produced["topic"])))

    def failDelivery(self, index: int, error: KafkaError) -> None:
        """
        Queue the failure report of the C{index}th message.
        """
        self.reports.append((self.produced[index]["on_delivery"], error, None))

    def poll(self, timeout: float) -> int:
        self.polls += 1
        reports, self.reports = self.reports, []
        for report, error, record in reports:
            report(error, record)
        if self.onPoll is not None:
            self.onPoll()
        return len(reports)

    def flush(self, timeout: float) -> int:
        self.flushed.append(timeout)
        self.poll(0)
        reported = {id(r[0]) for r in self.reports}
        return len([p for p in self.produced if id(p["on_delivery"]) not in reported]) if not self.purged else 0

    def purge(self) -> None:
        self.purged = True
        for produced in self.produced:
            self.reports.append((produced["on_delivery"], kafkaError(KafkaError._PURGE_QUEUE, "purged"), None))
        self.produced = []

    def list_topics(self, topic: Optional[str] = None, timeout: float = -1) -> FakeMetadata:
        if self.metadataError is not None:
            raise self.metadataError
        return FakeMetadata({})


class FakeConsumer:
    """
    A consumer over a scripted cluster: C{topics} maps a topic to its
    partitions' (low, high) watermarks; C{records} is what poll and consume
    return, in order.
    """

    def __init__(self, config: Dict[str, Any], topics: Dict[str, Dict[int, Tuple[int, int]]]) -> None:
        self.config = config
        self.topics = topics
        self.records: List[Any] = []
        self.calls: List[Tuple[str, Any]] = []
        self.brokerDown: Optional[KafkaError] = None
        self.pollError: Optional[BaseException] = None
        self.commitError: Optional[BaseException] = None
        # Asynchronous commits wait here until a poll answers them through
        # on_commit, with commitOutcome (None: success); unless
        # answerCommits is off (no coordinator answers).
        self.inFlight: List[List[TP]] = []
        self.answerCommits = True
        self.commitOutcome: Optional[KafkaError] = None
        # Called with each poll's timeout (a test's clock advances).
        self.elapse: Optional[Callable[[float], None]] = None
        self.positions: Dict[int, int] = {}
        self.subscription: Dict[str, Any] = {}
        self.closed = False

    def _check(self) -> None:
        if self.brokerDown is not None:
            raise KafkaException(self.brokerDown)

    def list_topics(self, topic: str, timeout: float) -> FakeMetadata:
        self._check()
        self.calls.append(("list_topics", topic))
        if topic not in self.topics:
            return FakeMetadata({topic: FakeTopicMetadata({}, kafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))})
        return FakeMetadata({topic: FakeTopicMetadata({p: object() for p in self.topics[topic]})})

    def get_watermark_offsets(self, tp: TP, timeout: float, cached: bool) -> Tuple[int, int]:
        self._check()
        return self.topics[tp.topic][tp.partition]

    def assign(self, tps: List[TP]) -> None:
        self.calls.append(("assign", tps))

    def incremental_assign(self, tps: List[TP]) -> None:
        self.calls.append(("incremental_assign", tps))

    def incremental_unassign(self, tps: List[TP]) -> None:
        self.calls.append(("incremental_unassign", tps))

    def pause(self, tps: List[TP]) -> None:
        self.calls.append(("pause", tps))

    def resume(self, tps: List[TP]) -> None:
        self.calls.append(("resume", tps))

    def poll(self, timeout: float) -> Any:
        if self.pollError is not None:
            raise self.pollError
        taken = self.consume(1, timeout)
        return taken[0] if taken else None

    def consume(self, num_messages: int, timeout: float) -> List[Any]:
        if self.elapse is not None and timeout > 0:
            self.elapse(timeout)
        if self.answerCommits and self.inFlight and "on_commit" in self.config:
            inFlight, self.inFlight = self.inFlight, []
            for offsets in inFlight:
                self.config["on_commit"](self.commitOutcome, offsets)
        # Like librdkafka, paused partitions return nothing.
        paused = {tp.partition for tps in self.named("pause") for tp in tps} - {
            tp.partition for tps in self.named("resume") for tp in tps}
        taken = [r for r in self.records if r.partition() not in paused][:num_messages]
        self.records = [r for r in self.records if r not in taken]
        return taken

    def subscribe(self, topics: List[str], on_assign: Any, on_revoke: Any, on_lost: Any) -> None:
        self.subscription = dict(topics=topics, on_assign=on_assign, on_revoke=on_revoke, on_lost=on_lost)

    def commit(self, offsets: List[TP], asynchronous: bool) -> None:
        self.calls.append(("commit", (offsets, asynchronous)))
        if self.commitError is not None:
            raise self.commitError
        if asynchronous:
            self.inFlight.append(offsets)

    def position(self, tps: List[TP]) -> List[TP]:
        return [TP(tp.topic, tp.partition, self.positions.get(tp.partition, -1001)) for tp in tps]

    def close(self) -> None:
        self.calls.append(("close", None))
        self.closed = True

    def named(self, name: str) -> List[Any]:
        """
        The arguments of every call of C{name}.
        """
        return [args for call, args in self.calls if call == name]


class FakeClients:
    """
    Makes fake clients over one scripted cluster.
    """

    def __init__(self) -> None:
        self.topics: Dict[str, Dict[int, Tuple[int, int]]] = {TOPIC: {0: (0, 0)}}
        self.producers: List[FakeProducer] = []
        self.consumers: List[FakeConsumer] = []

    def producer(self, config: Dict[str, Any]) -> FakeProducer:
        producer = FakeProducer(config)
        self.producers.append(producer)
        return producer

    def consumer(self, config: Dict[str, Any]) -> FakeConsumer:
        consumer = FakeConsumer(config, self.topics)
        self.consumers.append(consumer)
        return consumer

    def topicPartition(self, topic: str, partition: int, offset: Optional[int] = None) -> TP:
        return TP(topic, partition) if offset is None else TP(topic, partition, offset)


class RecordingSink:
    """
    An L{IUpstreamSink} that records what it is given.
    """

    def __init__(self) -> None:
        self.events: List[Tuple[str, Any]] = []
        self.onDeliver: Optional[Callable[[], None]] = None

    def started(self, cursor: Cursor) -> None:
        self.events.append(("started", cursor))

    def deliver(self, messages: List[Message]) -> None:
        self.events.append(("deliver", [(m.partition, m.offset) for m in messages]))
        if self.onDeliver is not None:
            self.onDeliver()

    def gap(self, cursor: Cursor, reason: str) -> None:
        self.events.append(("gap", (cursor, reason)))

    def failed(self, reason: Failure) -> None:
        self.events.append(("failed", reason))

    def kinds(self) -> List[str]:
        return [kind for kind, _ in self.events]


def section(values: Dict[str, str], name: str = "endpoint:events") -> SectionReader:
    """
    A C{[endpoint:...]} section of C{type = kafka} with C{values}.
    """
    return SectionReader("test.ini", name, dict({"type": "kafka"}, **values))


def parse(values: Dict[str, str]) -> Any:
    """
    The options of a kafka section, as the configuration reads them.
    """
    reader = section(values)
    reader.get("type")
    options = parseOptions(reader)
    reader.finish()
    return options


def options(**overrides: Any) -> Dict[str, Any]:
    """
    Connector options for tests: poll-timeout 0, so that no wait blocks.
    """
    opts = dict(parse({"bootstrap.servers": "kafka.test:9092"}))
    opts["poll-timeout"] = 0.0
    opts.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return opts


class ConnectorTestCase(SynchronousTestCase):
    """
    A started connector on fakes; threads are recorded, not started.
    """

    overrides: Dict[str, Any] = {}

    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.clients = FakeClients()
        self.threads: List[Tuple[Callable[[], None], str]] = []
        self.connector = KafkaConnector("events", options(**self.overrides), self.reactor, clients=self.clients,
                                        startThread=lambda target, name: self.threads.append((target, name)))
        self.connector.startService()

    @property
    def producer(self) -> FakeProducer:
        """
        The connector's (fake) producer.
        """
        return self.clients.producers[-1]

    @property
    def producerThread(self) -> Any:
        """
        The connector's producer thread.
        """
        thread = self.connector.producerThread
        assert thread is not None
        return thread

    def subscribe(self, start: Any = "latest", partitions: Optional[Dict[int, Tuple[int, int]]] = None) -> Any:
        """
        Subscribe a recording sink and open the reader's consumer (as its
        thread would).
        """
        if partitions is not None:
            self.clients.topics[TOPIC] = partitions
        self.sink = RecordingSink()
        reader = self.connector.subscribe(TOPIC, start, cast(Any, self.sink))
        reader.now = self.reactor.seconds
        reader.open()
        self.consumer = self.clients.consumers[-1]
        return reader

    def turn(self, reader: Any, times: int = 1) -> None:
        """
        Run C{times} turns of C{reader}'s thread, then the reactor's queue.
        """
        for _ in range(times):
            reader.runOnce()
        self.reactor.runFromThread()


# ----------------------------------------------------------------- options


class CapabilityTests(ConnectorTestCase):
    """
    The interfaces the Kafka connector and its readers declare, and those
    they do not.
    """

    def test_connectorCapabilities(self) -> None:
        """
        The connector provides L{IConnector}, L{IConsumerGroups},
        L{IHeadOffsets} (from what its readers saw) and L{IRetainedLog},
        class and instance alike.
        """
        for interface in (IConnector, IConsumerGroups, IHeadOffsets, IRetainedLog):
            verifyClass(interface, KafkaConnector)
            verifyObject(interface, self.connector)

    def test_notCapabilities(self) -> None:
        """
        Kafka has no share groups: the connector does not claim them.
        """
        self.assertFalse(ISharedSubscriptions.providedBy(self.connector))

    def test_holdableReader(self) -> None:
        """
        The connector's upstream subscription provides
        L{IHoldableSubscription} (and so L{IUpstreamSubscription}).
        """
        verifyClass(IHoldableSubscription, AssignedReader)
        reader = self.subscribe()
        verifyObject(IHoldableSubscription, reader)
        verifyObject(IUpstreamSubscription, reader)


class ParseOptionsTests(SynchronousTestCase):
    """
    L{parseOptions}: evgate's keys, librdkafka's keys, and refusals.
    """

    def test_minimal(self) -> None:
        """
        C{bootstrap.servers} alone is a valid section; evgate's keys take
        their defaults.
        """
        opts = parse({"bootstrap.servers": "b1:9092,b2:9092"})
        self.assertEqual(opts["librdkafka"], {"bootstrap.servers": "b1:9092,b2:9092"})
        self.assertEqual(opts["request-timeout"], 5.0)
        self.assertEqual(opts["batch-size"], 500)
        self.assertEqual(opts["batches-in-flight"], 2)
        self.assertEqual(opts["group-prefix"], "evgate")
        self.assertEqual(opts["source"], "test.ini [endpoint:events]")

    def test_bootstrapRequired(self) -> None:
        """
        A section without C{bootstrap.servers} is refused, naming the key.
        """
        e = self.assertRaises(ConfigError, parse, {"linger.ms": "5"})
        self.assertEqual(e.key, "bootstrap.servers")

    def test_passthrough(self) -> None:
        """
        Every other dotted key goes to librdkafka as it is.
        """
        opts = parse({"bootstrap.servers": "b:9092", "compression.type": "zstd", "security.protocol": "SASL_SSL",
                      "sasl.mechanisms": "SCRAM-SHA-512", "sasl.username": "u", "sasl.password": "p",
                      "linger.ms": "20", "batch-size": "50"})
        self.assertEqual(opts["librdkafka"]["compression.type"], "zstd")
        self.assertEqual(opts["librdkafka"]["sasl.mechanisms"], "SCRAM-SHA-512")
        self.assertEqual(opts["librdkafka"]["linger.ms"], "20")
        self.assertNotIn("batch-size", opts["librdkafka"])
        self.assertEqual(opts["batch-size"], 50)

    def test_managedKeys(self) -> None:
        """
        Keys that evgate manages are refused with the reason, naming the
        key.
        """
        for key in ("group.id", "enable.auto.commit", "auto.offset.reset", "enable.partition.eof",
                    "delivery.report.only.error"):
            e = self.assertRaises(ConfigError, parse, {"bootstrap.servers": "b:9092", key: "x"})
            self.assertEqual(e.key, key)
            self.assertIn("managed by evgate", str(e))
            self.assertIn("test.ini [endpoint:events]", str(e))

    def test_unknownProperty(self) -> None:
        """
        A property librdkafka does not know stops the configuration, naming
        it.
        """
        e = self.assertRaises(ConfigError, parse, {"bootstrap.servers": "b:9092", "linger.msec": "5"})
        self.assertEqual(e.key, "linger.msec")
        self.assertIn("No such configuration property", e.message)

    def test_badValueOfAlias(self) -> None:
        """
        A bad value of a property librdkafka knows under another name is
        reported on the key the file used.
        """
        e = self.assertRaises(ConfigError, parse, {"bootstrap.servers": "b:9092", "linger.ms": "soon"})
        self.assertEqual(e.key, "linger.ms")

    def test_conflictWithDefault(self) -> None:
        """
        A value that clashes with one of evgate's librdkafka defaults names
        the key and the default.
        """
        e = self.assertRaises(ConfigError, parse, {"bootstrap.servers": "b:9092", "linger.ms": "6000"})
        self.assertEqual(e.key, "linger.ms")
        self.assertIn("evgate sets message.timeout.ms = 5000", e.message)

    def test_ownKeys(self) -> None:
        """
        Hyphenated keys are evgate's; an unknown one is refused with the
        list of known ones; values are checked.
        """
        e = self.assertRaises(ConfigError, parse, {"bootstrap.servers": "b:9092", "poll-timout": "1"})
        self.assertEqual(e.key, "poll-timout")
        self.assertIn("request-timeout", e.message)
        e = self.assertRaises(ConfigError, parse, {"bootstrap.servers": "b:9092", "batch-size": "0"})
        self.assertEqual(e.key, "batch-size")
        e = self.assertRaises(ConfigError, parse, {"bootstrap.servers": "b:9092", "group-prefix": "a b"})
        self.assertEqual(e.key, "group-prefix")

    def test_callbacks(self) -> None:
        """
        confluent-kafka's callback keys cannot come from a file.
        """
        e = self.assertRaises(ConfigError, parse, {"bootstrap.servers": "b:9092", "error_cb": "x"})
        self.assertEqual(e.key, "error_cb")

    def test_parseConfig(self) -> None:
        """
        The whole configuration accepts a kafka endpoint, and a librdkafka
        refusal names the file, the section and the key.
        """
        text = ("[endpoint:events]\ntype = kafka\nbootstrap.servers = 127.0.0.1:9092\n{extra}\n"
                "[api:orders]\npath = /orders\nendpoint = events\ntopic = orders\n"
                "entrypoints = http-post http-get\n")
        config = parseConfig(text.format(extra="compression.type = lz4"), "gw.ini")
        self.assertEqual(config.endpoints["events"].type, "kafka")
        e = self.assertRaises(ConfigError, parseConfig, text.format(extra="compression.type = best"), "gw.ini")
        self.assertTrue(str(e).startswith("gw.ini [endpoint:events] compression.type: "), str(e))

    def test_settings(self) -> None:
        """
        evgate's librdkafka defaults give way to the section's keys and
        their aliases; readers get their managed keys.
        """
        producer = producerSettings({"bootstrap.servers": "b", "delivery.timeout.ms": "3000"})
        self.assertNotIn("message.timeout.ms", producer)
        self.assertEqual(producer["delivery.timeout.ms"], "3000")
        self.assertEqual(producerSettings({"bootstrap.servers": "b"})["message.timeout.ms"], "5000")
        self.assertEqual(producerSettings({"bootstrap.servers": "b"})["linger.ms"], "1")
        aliased = producerSettings({"bootstrap.servers": "b", "queue.buffering.max.ms": "20"})
        self.assertNotIn("linger.ms", aliased)
        self.assertEqual(aliased["queue.buffering.max.ms"], "20")
        reader = consumerSettings({"bootstrap.servers": "b"})
        self.assertEqual(reader["auto.offset.reset"], "error")
        self.assertEqual(reader["enable.auto.commit"], "false")
        group = consumerSettings({"bootstrap.servers": "b"}, "evgate.api.c1", "earliest")
        self.assertEqual((group["group.id"], group["auto.offset.reset"]), ("evgate.api.c1", "earliest"))


# ----------------------------------------------------------------- publish


class PublishTests(ConnectorTestCase):
    """
    Publishing: C{produce()} on the reactor, the delivery report on the
    producer thread, the Deferred fired on the reactor.
    """

    def pollProducer(self) -> None:
        """
        What one turn of the producer thread does: serve the delivery
        reports that are ready, then hand them to the reactor in one call.
        """
        self.producer.poll(0)
        self.connector.handOverReports()

    def test_interface(self) -> None:
        """
        The connector provides L{IConnector}.
        """
        verifyObject(IConnector, self.connector)
        self.assertEqual((self.connector.kind, self.connector.epoch()), ("kafka", 0))

    def test_producerThread(self) -> None:
        """
        Starting the service makes one producer and starts its poll thread.
        """
        self.assertEqual(len(self.clients.producers), 1)
        self.assertEqual([name for _, name in self.threads],
                         ["evgate-kafka-producer-events", "evgate-kafka-probe-events"])
        self.assertEqual(self.producer.config["message.timeout.ms"], "5000")

    def test_draftBecomesRecord(self) -> None:
        """
        The draft's content, key and headers become the record's value, key
        and headers (as bytes).
        """
        self.connector.publish(TOPIC, Draft(b"{}", key="k\u00e9", headers=(("tenant", "acme"), ("a", "1"))), 10)
        produced = self.producer.produced[0]
        self.assertEqual((produced["topic"], produced["value"], produced["key"]),
                         (TOPIC, b"{}", "k\u00e9".encode("utf-8")))
        self.assertEqual(produced["headers"], [("tenant", b"acme"), ("a", b"1")])
        self.connector.publish(TOPIC, Draft(b"x"), 10)
        self.assertEqual((self.producer.produced[1]["key"], self.producer.produced[1]["headers"]), (None, None))

    def test_repeatedHeadersProduced(self) -> None:
        """
        A header name that repeats in a draft is produced as repeated
        record headers, in the draft's order, one publish or a batch.
        """
        headers = (("dup", "1"), ("one", "x"), ("dup", "2"), ("dup", "1"))
        expected = [("dup", b"1"), ("one", b"x"), ("dup", b"2"), ("dup", b"1")]
        self.connector.publish(TOPIC, Draft(b"x", headers=headers), 10)
        self.connector.publishMany(TOPIC, [Draft(b"a", headers=headers), Draft(b"b", headers=headers)], 10)
        self.assertEqual([p["headers"] for p in self.producer.produced], [expected] * 3)

    def test_firesOnReactorAfterReport(self) -> None:
        """
        The Deferred fires with the position only when the reactor runs the
        call the delivery report queued, not on the producer thread.
        """
        d = self.connector.publish(TOPIC, Draft(b"x"), 10)
        self.producer.deliver(0, partition=2, offset=41)
        self.pollProducer()
        self.assertNoResult(d)
        self.reactor.runFromThread()
        self.assertEqual(self.successResultOf(d), Position(TOPIC, 2, 41))
        self.assertTrue(self.connector.connected)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_reportsHandedOverTogether(self) -> None:
        """
        The reports one poll serves reach the reactor in one call, and each
        publisher still gets its own position.
        """
        ds = [self.connector.publish(TOPIC, Draft(b"x"), 10) for _ in range(3)]
        for index in range(3):
            self.producer.deliver(index, partition=0, offset=10 + index)
        self.pollProducer()
        self.assertEqual(len(self.reactor.fromThread), 1)
        self.reactor.runFromThread()
        self.assertEqual([self.successResultOf(d).offset for d in ds], [10, 11, 12])

    def test_publishMany(self) -> None:
        """
        A batch is produced in order under one timer; its Deferred fires
        once every record has its report, with a position or a problem per
        record.
        """
        d = self.connector.publishMany(TOPIC, [Draft(b"a", key="k"), Draft(b"b"), Draft(b"c")], 10)
        self.assertEqual([p["value"] for p in self.producer.produced], [b"a", b"b", b"c"])
        self.assertEqual(self.producer.produced[0]["key"], b"k")
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        self.producer.deliver(2, partition=1, offset=9)
        self.producer.failDelivery(1, kafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART, "Broker: Unknown topic"))
        self.pollProducer()
        self.reactor.runFromThread()
        self.assertNoResult(d)
        self.producer.deliver(0, partition=1, offset=8)
        self.pollProducer()
        self.reactor.runFromThread()
        results = self.successResultOf(d)
        self.assertEqual([results[0], results[2]], [Position(TOPIC, 1, 8), Position(TOPIC, 1, 9)])
        self.assertIsInstance(results[1], EndpointUnavailable)
        self.assertIn("Unknown topic", results[1].detail)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_publishManyOneHandOver(self) -> None:
        """
        The reports of a batch stay on the producer thread until the last
        is in, then reach the reactor in one call, even when they come over
        several polls.
        """
        d = self.connector.publishMany(TOPIC, [Draft(b"a"), Draft(b"b"), Draft(b"c")], 10)
        self.producer.deliver(1, partition=0, offset=4)
        self.pollProducer()
        self.producer.deliver(0, partition=0, offset=3)
        self.pollProducer()
        self.assertEqual(self.reactor.fromThread, [])
        self.producer.deliver(2, partition=0, offset=5)
        self.pollProducer()
        self.assertEqual(len(self.reactor.fromThread), 1)
        self.reactor.runFromThread()
        self.assertEqual(self.successResultOf(d), [Position(TOPIC, 0, 3), Position(TOPIC, 0, 4), Position(TOPIC, 0, 5)])
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.connector._pending, {})

    def test_publishManyReportedWhileProducing(self) -> None:
        """
        Records reported while the batch is still being produced (the
        producer thread runs meanwhile) are kept; when the queue then
        fills up, the batch is answered at once, as every record taken
        already has its report.
        """
        produce = self.producer.produce

        def reportsThenFills(*args: Any, **kwargs: Any) -> None:
            if len(self.producer.produced) == 2:
                # The producer thread serves the reports of the first two
                # before the third is tried.
                self.producer.deliver(0, partition=0, offset=7)
                self.producer.deliver(1, partition=0, offset=8)
                self.pollProducer()
                raise BufferError("Local: Queue full")
            produce(*args, **kwargs)

        self.producer.produce = reportsThenFills
        d = self.connector.publishMany(TOPIC, [Draft(b"a"), Draft(b"b"), Draft(b"c")], 10)
        results = self.successResultOf(d)
        self.assertEqual(results[:2], [Position(TOPIC, 0, 7), Position(TOPIC, 0, 8)])
        self.assertEqual(results[2].status, 503)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        # The hand-over already on its way finds the batch answered.
        self.reactor.runFromThread()
        self.assertEqual(self.connector._pending, {})

    def test_publishManyLateReport(self) -> None:
        """
        A report that comes after the batch timed out changes nothing.
        """
        d = self.connector.publishMany(TOPIC, [Draft(b"a"), Draft(b"b")], 10)
        self.producer.deliver(0, partition=0, offset=1)
        self.pollProducer()
        self.reactor.advance(10)
        results = self.successResultOf(d)
        self.producer.deliver(1, partition=0, offset=2)
        self.pollProducer()
        self.reactor.runFromThread()
        self.assertEqual(results[0], Position(TOPIC, 0, 1))
        self.assertEqual(results[1].status, 503)

    def test_publishManyPositional(self) -> None:
        """
        A batch's records are produced with librdkafka's partitioner
        choosing the partition and the time they are produced as their
        timestamp.
        """
        self.connector.publishMany(TOPIC, [Draft(b"a", key="k", headers=(("h", "v"),))], 10)
        produced = self.producer.produced[0]
        self.assertEqual((produced["partition"], produced["timestamp"], produced["key"], produced["headers"]),
                         (-1, 0, b"k", [("h", b"v")]))

    def test_publishManyTimesOut(self) -> None:
        """
        Records without a report when the timeout passes get the timeout's
        problem; those reported keep their positions.
        """
        self.connector.connected = True
        d = self.connector.publishMany(TOPIC, [Draft(b"a"), Draft(b"b")], 10)
        self.producer.deliver(0, partition=0, offset=1)
        self.pollProducer()
        self.reactor.runFromThread()
        self.reactor.advance(10)
        results = self.successResultOf(d)
        self.assertEqual(results[0], Position(TOPIC, 0, 1))
        self.assertIsInstance(results[1], EndpointTimeout)

    def test_publishManyQueueFull(self) -> None:
        """
        When librdkafka's queue fills up partway, the records it took are
        still waited for and the rest get a 503 without being sent.
        """
        produce = self.producer.produce
        calls = []

        def fillsUp(*args: Any, **kwargs: Any) -> None:
            calls.append(1)
            if len(calls) > 1:
                raise BufferError("Local: Queue full")
            produce(*args, **kwargs)

        self.producer.produce = fillsUp
        d = self.connector.publishMany(TOPIC, [Draft(b"a"), Draft(b"b"), Draft(b"c")], 10)
        self.assertEqual(len(calls), 2, "nothing is tried after the queue filled up")
        self.producer.deliver(0, partition=0, offset=5)
        self.pollProducer()
        self.reactor.runFromThread()
        results = self.successResultOf(d)
        self.assertEqual(results[0], Position(TOPIC, 0, 5))
        self.assertEqual([r.status for r in results[1:]], [503, 503])

    def test_bufferError(self) -> None:
        """
        A full producer queue is a 503 with Retry-After at once.
        """
        self.producer.raiseOnProduce = BufferError("Local: Queue full")
        problem = self.failureResultOf(self.connector.publish(TOPIC, Draft(b"x"), 10), EndpointUnavailable).value
        self.assertEqual(problem.status, 503)
        self.assertIn(("Retry-After", "1"), problem.headers)
        self.assertIn("queue.buffering.max.messages", problem.detail)

    def test_tooLargeAtOnce(self) -> None:
        """
        librdkafka refusing the message size is a 413.
        """
        self.producer.raiseOnProduce = KafkaException(kafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "too large"))
        self.failureResultOf(self.connector.publish(TOPIC, Draft(b"x"), 10), PayloadTooLarge)

    def test_deliveryError(self) -> None:
        """
        A delivery error is a 503 carrying the broker's reason.
        """
        d = self.connector.publish(TOPIC, Draft(b"x"), 10)
        self.producer.failDelivery(0, kafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART,
                                                 "Broker: Unknown topic or partition"))
        self.pollProducer()
        self.reactor.runFromThread()
        problem = self.failureResultOf(d, EndpointUnavailable).value
        self.assertIn("Broker: Unknown topic or partition", problem.detail)
        self.assertEqual(problem.asJSON()["brokerError"], "UNKNOWN_TOPIC_OR_PART")
        self.assertIn(("Retry-After", "1"), problem.headers)

    def test_messageTimedOutWhileUnreachable(self) -> None:
        """
        librdkafka's message timeout while every broker is down is a 503
        naming why the broker is unreachable.
        """
        self.connector.onClientError(kafkaError(KafkaError._TRANSPORT, "Connect to 127.0.0.1:9092 failed"))
        self.connector.onClientError(kafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
        self.reactor.runFromThread()
        self.assertFalse(self.connector.connected)
        d = self.connector.publish(TOPIC, Draft(b"x"), 10)
        self.producer.failDelivery(0, kafkaError(KafkaError._MSG_TIMED_OUT, "Local: Message timed out"))
        self.pollProducer()
        self.reactor.runFromThread()
        problem = self.failureResultOf(d, EndpointUnavailable).value
        self.assertIn("cannot reach the broker (Connect to 127.0.0.1:9092 failed)", problem.detail)

    def test_messageTimedOutWhileReachable(self) -> None:
        """
        The same timeout with the broker reachable is a 504.
        """
        self.connector._setConnected(True)
        d = self.connector.publish(TOPIC, Draft(b"x"), 10)
        self.producer.failDelivery(0, kafkaError(KafkaError._MSG_TIMED_OUT))
        self.pollProducer()
        self.reactor.runFromThread()
        self.failureResultOf(d, EndpointTimeout)

    def test_ownTimeout(self) -> None:
        """
        Without a report within the publish timeout the connector answers
        itself: 504 when the broker is reachable, 503 when not; a late
        report is ignored.
        """
        self.connector._setConnected(True)
        d = self.connector.publish(TOPIC, Draft(b"x"), 2.5)
        self.reactor.advance(2.5)
        self.failureResultOf(d, EndpointTimeout)
        self.connector._setConnected(False)
        d = self.connector.publish(TOPIC, Draft(b"y"), 2.5)
        self.reactor.advance(2.5)
        self.failureResultOf(d, EndpointUnavailable)
        self.producer.deliver(0, 0, 1)
        self.pollProducer()
        self.reactor.runFromThread()
        self.assertEqual(self.connector._pending, {})

    def test_cancel(self) -> None:
        """
        A publisher that cancels (the entrypoint's own timeout) leaves no
        timer, and the late report is dropped.
        """
        d = self.connector.publish(TOPIC, Draft(b"x"), 10)
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.producer.deliver(0, 0, 1)
        self.pollProducer()
        self.reactor.runFromThread()

    def test_connectedState(self) -> None:
        """
        Every broker down makes C{connected} false; statistics showing a
        broker up make it true again; repeats do not flood the reactor.
        """
        self.connector._setConnected(True)
        for _ in range(50):
            self.connector.onClientError(kafkaError(KafkaError._ALL_BROKERS_DOWN, "down"))
        self.assertEqual(len(self.reactor.fromThread), 1)
        self.reactor.runFromThread()
        self.assertFalse(self.connector.connected)
        self.connector.onStatistics(json.dumps({"brokers": {"b:9092/1": {"state": "DOWN"}}}))
        self.reactor.runFromThread()
        self.assertFalse(self.connector.connected)
        self.connector.onStatistics(json.dumps({"brokers": {"b:9092/1": {"state": "UP"}}}))
        self.reactor.runFromThread()
        self.assertTrue(self.connector.connected)

    def test_probe(self) -> None:
        """
        The producer thread asks for metadata once at start: its answer sets
        C{connected}.
        """
        self.producer.metadataError = KafkaException(kafkaError(KafkaError._TRANSPORT, "refused"))
        self.producerThread.probe()
        self.reactor.runFromThread()
        self.assertFalse(self.connector.connected)
        self.producer.metadataError = None
        self.producerThread.probe()
        self.reactor.runFromThread()
        self.assertTrue(self.connector.connected)

    def test_librdkafkaLog(self) -> None:
        """
        librdkafka's log lines, given on a client thread, are logged on the
        reactor thread; the same line from another client within a minute
        is logged once.
        """
        from twisted.logger import globalLogPublisher

        events: List[dict] = []
        observer = cast(Any, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        log = self.connector.librdkafkaLog
        log.log(30, "%s [%s] %s", "CONFWARN", "rdkafka#consumer-1", "linger.ms is a producer property")
        log.log(30, "%s [%s] %s", "CONFWARN", "rdkafka#consumer-2", "linger.ms is a producer property")
        self.assertEqual(events, [])
        self.reactor.runFromThread()
        lines = [e["line"] for e in events if e.get("log_namespace") == "evgate.connectors.kafka.LibrdkafkaLog"]
        self.assertEqual(lines, ["CONFWARN linger.ms is a producer property"])

    def test_runUntilStopped(self) -> None:
        """
        The producer thread polls until asked to stop, then flushes for at
        most shutdown-timeout and tells the reactor it ended.
        """
        thread = self.producerThread
        self.producer.onPoll = lambda: thread.stopRequested.set() if self.producer.polls >= 3 else None
        producer = self.producer
        thread.run()
        self.assertEqual(producer.polls, 3 + 1)
        self.assertEqual(producer.flushed, [5.0])
        self.assertIsNone(thread.producer)
        self.assertEqual(self.reactor.pendingNames()[-1], "fire")

    def test_stopFailsUndelivered(self) -> None:
        """
        Stopping flushes; what the flush could not deliver is purged and its
        publishers get a 503; the stop completes once the thread ended.
        """
        d = self.connector.publish(TOPIC, Draft(b"x"), 10)
        stopped = self.connector.stopService()
        self.assertTrue(self.producerThread.stopRequested.is_set())
        self.failureResultOf(self.connector.publish(TOPIC, Draft(b"late"), 10), EndpointUnavailable)
        self.producerThread.finish()
        self.assertNoResult(stopped)
        self.reactor.runFromThread()
        self.assertIn("stopping", self.failureResultOf(d, EndpointUnavailable).value.detail)
        self.successResultOf(stopped)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_stopWithBrokerGone(self) -> None:
        """
        A producer thread that never ends (stuck on a broker that is gone)
        does not keep the stop from completing after shutdown-timeout.
        """
        d = self.connector.publish(TOPIC, Draft(b"x"), 30)
        stopped = self.connector.stopService()
        self.reactor.advance(5.0)
        self.assertNoResult(stopped)
        self.reactor.advance(1.0)
        self.successResultOf(stopped)
        self.failureResultOf(d, EndpointUnavailable)


# ----------------------------------------------------------------- messages


class ToMessageTests(SynchronousTestCase):
    """
    L{toMessage}: Kafka records as evgate messages.
    """

    def test_text(self) -> None:
        """
        UTF-8 keys and header values become text; the timestamp is kept.
        """
        m = toMessage(FakeRecord(1, 7, b"body", b"k", [("h", b"v")], (1, 1234)))
        self.assertEqual((m.content, m.key, m.headers, m.topic, m.partition, m.offset, m.timestamp),
                         (b"body", "k", (("h", "v"),), TOPIC, 1, 7, 1234))
        self.assertEqual(dict(m.extra), {})

    def test_binary(self) -> None:
        """
        A key or header value that is not UTF-8 is given as base64, and the
        metadata says which.
        """
        m = toMessage(FakeRecord(0, 0, b"\xff", b"\xff\xfe", [("bin", b"\x80"), ("nul", None)], (0, -1)))
        self.assertEqual(m.key, "//4=")
        self.assertEqual(m.headers, (("bin", "gA=="), ("nul", "")))
        self.assertEqual(m.metadata()["keyEncoding"], "base64")
        self.assertEqual(m.metadata()["headerEncoding"], {"bin": "base64"})
        self.assertEqual(m.timestamp, 0)

    def test_repeatedHeaders(self) -> None:
        """
        Record headers are a list in which names repeat (C{kcat -H dup=1
        -H dup=2}): every value is kept, in the record's order.
        """
        m = toMessage(FakeRecord(0, 0, headers=[("dup", b"1"), ("one", b"x"), ("dup", b"2"), ("dup", b"1")]))
        self.assertEqual(m.headers, (("dup", "1"), ("one", "x"), ("dup", "2"), ("dup", "1")))
        self.assertEqual(dict(m.extra), {})

    def test_repeatedBinaryHeader(self) -> None:
        """
        When one value of a repeated name is not UTF-8, every value of that
        name is base64 (C{headerEncoding} is per name), and the other names
        stay text.
        """
        m = toMessage(FakeRecord(0, 0, headers=[("dup", b"1"), ("one", b"x"), ("dup", b"\xff"), ("dup", None)]))
        self.assertEqual(m.headers, (("dup", "MQ=="), ("one", "x"), ("dup", "/w=="), ("dup", "")))
        self.assertEqual(m.metadata()["headerEncoding"], {"dup": "base64"})

    def test_tombstone(self) -> None:
        """
        A null value is empty content marked as a tombstone.
        """
        m = toMessage(FakeRecord(0, 0, None))
        self.assertEqual((m.content, m.metadata()["tombstone"]), (b"", True))


# ----------------------------------------------------------------- reading


class ReaderStartTests(ConnectorTestCase):
    """
    Where an assign-mode reader starts.
    """

    def test_interface(self) -> None:
        """
        A subscription provides L{IUpstreamSubscription}, and runs on a
        thread of its own.
        """
        reader = self.subscribe()
        verifyObject(IUpstreamSubscription, reader)
        self.assertEqual(self.threads[-1][1], f"evgate-kafka-reader-events-{TOPIC}")
        self.assertEqual(self.consumer.config["group.id"], "evgate.reader")
        self.assertEqual(self.consumer.config["auto.offset.reset"], "error")

    def test_latest(self) -> None:
        """
        C{latest} starts every partition at its high watermark, and the sink
        learns the cursor of all partitions.
        """
        reader = self.subscribe("latest", {0: (3, 10), 1: (0, 4)})
        self.turn(reader)
        self.assertEqual(self.consumer.named("assign"), [[TP(TOPIC, 0, 10), TP(TOPIC, 1, 4)]])
        self.assertEqual(self.sink.events, [("started", Cursor.fromMapping({0: 10, 1: 4}))])

    def test_earliest(self) -> None:
        """
        C{earliest} starts at the low watermarks.
        """
        reader = self.subscribe("earliest", {0: (3, 10), 1: (0, 4)})
        self.turn(reader)
        self.assertEqual(self.sink.events, [("started", Cursor.fromMapping({0: 3, 1: 0}))])

    def test_cursor(self) -> None:
        """
        A cursor starts each partition at its offset; a partition it lacks
        starts at its low watermark; an offset deleted by retention is a gap
        and starts at the low watermark.
        """
        reader = self.subscribe(Cursor.fromMapping({0: 1, 1: 2}), {0: (5, 10), 1: (0, 4), 2: (7, 9)})
        self.turn(reader)
        expected = Cursor.fromMapping({0: 5, 1: 2, 2: 7})
        self.assertEqual(self.consumer.named("assign"), [[TP(TOPIC, 0, 5), TP(TOPIC, 1, 2), TP(TOPIC, 2, 7)]])
        self.assertEqual(self.sink.kinds(), ["started", "gap"])
        self.assertEqual(self.sink.events[0][1], expected)
        cursor, reason = self.sink.events[1][1]
        self.assertEqual(cursor, expected)
        self.assertIn("partition 0: offsets 1 to 4 were deleted by retention", reason)

    def test_cursorPastTheEnd(self) -> None:
        """
        A cursor past a partition's end (the topic was recreated) is a gap
        and reads on from the end.
        """
        reader = self.subscribe(Cursor.fromMapping({0: 50}), {0: (0, 10)})
        self.turn(reader)
        self.assertEqual(self.sink.events[1][1], (Cursor.fromMapping({0: 10}),
                                                  self.sink.events[1][1][1]))
        self.assertIn("past the end", self.sink.events[1][1][1])

    def test_foreignCursor(self) -> None:
        """
        A cursor with an epoch (made by the memory endpoint) is a gap, from
        the earliest message.
        """
        reader = self.subscribe(Cursor.fromMapping({0: 5}, epoch=77), {0: (2, 10)})
        self.turn(reader)
        self.assertEqual(self.sink.kinds(), ["started", "gap"])
        self.assertEqual(self.sink.events[1][1][0], Cursor.fromMapping({0: 2}))

    def test_missingTopic(self) -> None:
        """
        A topic that does not exist yet starts empty; its partitions are
        read from their start once they appear.
        """
        del self.clients.topics[TOPIC]
        reader = self.subscribe("latest")
        self.turn(reader)
        self.assertEqual(self.sink.events, [("started", Cursor())])
        self.assertEqual(self.consumer.named("assign"), [])
        self.clients.topics[TOPIC] = {0: (0, 3)}
        self.reactor.advance(1.0)
        self.turn(reader)
        self.assertEqual(self.consumer.named("incremental_assign"), [[TP(TOPIC, 0, 0)]])

    def test_brokerDownAtStart(self) -> None:
        """
        A broker that cannot be reached at start does not fail the
        subscription: a cursor start is reported at once (so polls answer),
        metadata is asked again, and reading starts once it answers.
        """
        start = Cursor.fromMapping({0: 4})
        reader = self.subscribe(start, {0: (0, 9)})
        self.consumer.brokerDown = kafkaError(KafkaError._TRANSPORT, "Connection refused")
        self.turn(reader, 3)
        self.assertEqual(self.sink.events, [("started", start)])
        self.assertFalse(self.connector.connected)
        self.consumer.brokerDown = None
        self.turn(reader)
        self.assertEqual(self.consumer.named("assign"), [], "retried before its back-off")
        self.reactor.advance(5)
        self.turn(reader)
        self.assertEqual(self.sink.events, [("started", start)])
        self.assertEqual(self.consumer.named("assign"), [[TP(TOPIC, 0, 4)]])
        self.assertTrue(self.connector.connected)

    def test_latestWaitsForBroker(self) -> None:
        """
        C{latest} cannot be resolved without the broker: the sink hears
        nothing until it answers.
        """
        reader = self.subscribe("latest", {0: (0, 9)})
        self.consumer.brokerDown = kafkaError(KafkaError._ALL_BROKERS_DOWN, "down")
        self.turn(reader, 2)
        self.assertEqual(self.sink.events, [])
        self.consumer.brokerDown = None
        self.reactor.advance(5)
        self.turn(reader)
        self.assertEqual(self.sink.events, [("started", Cursor.fromMapping({0: 9}))])

    def test_notAuthorized(self) -> None:
        """
        A topic the gateway may not read fails the subscription with a 503.
        """
        reader = self.subscribe("latest", {0: (0, 9)})
        self.consumer.brokerDown = kafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "Broker: not authorized")
        reader.run()
        self.reactor.runFromThread()
        self.assertEqual(self.sink.kinds(), ["failed"])
        self.assertIn("not authorized", self.sink.events[0][1].value.detail)
        self.assertTrue(self.consumer.closed)


class HeadOffsetsTests(ConnectorTestCase):
    """
    L{KafkaConnector.headOffsets}: where a topic ends, from what the
    readers' threads reported, answered on the reactor without a request.
    """

    overrides = {"batch_size": 10}

    def test_noneBeforeAReader(self) -> None:
        """
        Before any reader resolved the topic the connector knows nothing:
        L{None}, so that callers fall back (metrics skip the lag).
        """
        self.assertIsNone(self.connector.headOffsets(TOPIC))
        self.subscribe("earliest", {0: (0, 480)})
        self.assertIsNone(self.connector.headOffsets(TOPIC))

    def test_knownWhenStarted(self) -> None:
        """
        The high watermarks a reader fetched to resolve its start are known
        by the time its sink learns where it starts: a non-blocking read
        from there can tell how much history to take.
        """
        seen: List[Any] = []
        reader = self.subscribe("earliest", {0: (0, 480), 1: (5, 7)})
        self.sink.onDeliver = None
        started = self.sink.started
        self.sink.started = lambda cursor: (seen.append(self.connector.headOffsets(TOPIC)), started(cursor))
        self.turn(reader)
        self.assertEqual(seen, [{0: 480, 1: 7}])
        self.assertEqual(self.sink.events, [("started", Cursor.fromMapping({0: 0, 1: 5}))])

    def test_movesWithReading(self) -> None:
        """
        While reading, the heads move past the records handed over and to
        librdkafka's cached high watermarks (asked with C{cached=True}, no
        request), never back.
        """
        reader = self.subscribe("earliest", {0: (0, 2)})
        self.turn(reader)
        self.consumer.records = [FakeRecord(0, 0), FakeRecord(0, 1), FakeRecord(0, 2)]
        self.clients.topics[TOPIC] = {0: (0, 9)}
        self.turn(reader)
        self.assertEqual(self.connector.headOffsets(TOPIC), {0: 9})
        self.clients.topics[TOPIC] = {0: (0, 4)}
        self.consumer.records = [FakeRecord(0, 3)]
        self.reactor.advance(2)
        self.turn(reader)
        self.assertEqual(self.connector.headOffsets(TOPIC), {0: 9})

    def test_cachedWatermarksAtMostOnceASecond(self) -> None:
        """
        The cached watermarks are read at most once a second; in between a
        batch moves the heads past its own records only.
        """
        reader = self.subscribe("earliest", {0: (0, 100)})
        self.turn(reader)
        calls: List[Any] = []
        original = self.consumer.get_watermark_offsets

        def counting(tp: TP, timeout: float, cached: bool) -> Tuple[int, int]:
            calls.append(cached)
            return original(tp, timeout, cached)

        self.consumer.get_watermark_offsets = counting  # type: ignore[method-assign]
        for offset in range(3):
            self.consumer.records = [FakeRecord(0, offset)]
            self.turn(reader)
        self.assertEqual(calls, [True])
        self.reactor.advance(1)
        self.consumer.records = [FakeRecord(0, 3)]
        self.turn(reader)
        self.assertEqual(calls, [True, True])

    def test_forgottenWithTheLastReader(self) -> None:
        """
        When the last reader of a topic has ended, nothing keeps its heads
        fresh: the connector knows none again.
        """
        reader = self.subscribe("earliest", {0: (0, 3)})
        self.turn(reader)
        self.assertEqual(self.connector.headOffsets(TOPIC), {0: 3})
        self.connector.forget(reader)
        self.assertIsNone(self.connector.headOffsets(TOPIC))


class ReaderFlowTests(ConnectorTestCase):
    """
    How batches travel from a reader's thread to its sink.
    """

    overrides = {"batch_size": 2, "batches_in_flight": 1}

    def setUp(self) -> None:
        super().setUp()
        self.reader = self.subscribe("earliest", {0: (0, 100), 1: (0, 100)})
        self.turn(self.reader)
        self.sink.events.clear()

    def test_batches(self) -> None:
        """
        Records become messages, in batches of at most batch-size, in the
        broker's order.
        """
        self.consumer.records = [FakeRecord(0, 0), FakeRecord(1, 0), FakeRecord(0, 1)]
        self.turn(self.reader)
        self.assertEqual(self.sink.events, [("deliver", [(0, 0), (1, 0)])])
        self.turn(self.reader)
        self.assertEqual(self.sink.events[1], ("deliver", [(0, 1)]))

    def test_credits(self) -> None:
        """
        With one batch in flight, the thread hands over the next batch only
        after the reactor took the first: a slow reactor stops the reader.
        """
        self.consumer.records = [FakeRecord(0, i) for i in range(6)]
        # Reports of where the partitions end are not batches: no credit.
        def batches() -> List[str]:
            return [args[0] for _, args, _ in self.reactor.fromThread if args[0] != "seen"]

        self.reader.runOnce()
        self.reader.runOnce()
        self.reader.runOnce()
        self.assertEqual(batches(), ["deliver"])
        self.assertEqual(len(self.consumer.records), 2)
        self.reactor.runFromThread()
        self.reader.runOnce()
        self.assertEqual(batches(), ["deliver"])
        self.reactor.runFromThread()
        self.assertEqual(self.sink.events, [("deliver", [(0, 0), (0, 1)]), ("deliver", [(0, 2), (0, 3)])])

    def test_staleRecords(self) -> None:
        """
        Records before the offset already handed over are dropped.
        """
        self.consumer.records = [FakeRecord(0, 0), FakeRecord(0, 0), FakeRecord(0, 1)]
        self.turn(self.reader)
        self.turn(self.reader)
        self.assertEqual(self.sink.events, [("deliver", [(0, 0)]), ("deliver", [(0, 1)])])

    def test_pause(self) -> None:
        """
        Pausing pauses the consumer on its thread; a batch already on its
        way is held on the reactor side; resuming delivers it first, then
        resumes the consumer.
        """
        self.consumer.records = [FakeRecord(0, 0)]
        self.reader.runOnce()
        self.reader.pause()
        self.reactor.runFromThread()
        self.assertEqual(self.sink.events, [])
        self.reader.runOnce()
        self.assertEqual(self.consumer.named("pause"), [[TP(TOPIC, 0), TP(TOPIC, 1)]])
        self.consumer.records = [FakeRecord(0, 1)]
        self.turn(self.reader, 3)
        self.assertEqual(self.sink.events, [])
        self.assertEqual(len(self.consumer.records), 1)
        self.reader.resume()
        self.assertEqual(self.sink.events, [("deliver", [(0, 0)])])
        self.reader.runOnce()
        self.assertEqual(self.consumer.named("resume"), [[TP(TOPIC, 0), TP(TOPIC, 1)]])
        self.turn(self.reader)
        self.assertEqual(self.sink.events[1], ("deliver", [(0, 1)]))

    def test_hold(self) -> None:
        """
        Holding keeps batches on the reactor side without pausing the
        consumer (which would throw its prefetched records away); the
        thread stops at its credit, and resuming hands the held batches
        over without a resume command.
        """
        self.consumer.records = [FakeRecord(0, i) for i in range(6)]
        self.reader.hold()
        self.reader.runOnce()
        self.reactor.runFromThread()
        self.reader.runOnce()
        self.reader.runOnce()
        self.assertEqual(self.sink.events, [])
        self.assertEqual(len(self.consumer.records), 2, "the thread stopped at its credit")
        self.reader.resume()
        self.assertEqual(self.sink.events, [("deliver", [(0, 0), (0, 1)])])
        for _ in range(3):
            self.turn(self.reader, 2)
        self.assertEqual(self.consumer.named("pause") + self.consumer.named("resume"), [])
        self.assertEqual([e[1] for e in self.sink.events], [[(0, 0), (0, 1)], [(0, 2), (0, 3)], [(0, 4), (0, 5)]])

    def test_drainHeld(self) -> None:
        """
        The batches held come out together, in order, and their credits go
        back to the thread; a gap stops the draining.
        """
        self.consumer.records = [FakeRecord(0, i) for i in range(4)]
        self.reader.hold()
        self.turn(self.reader, 2)
        self.reader.onReactor("deliver", [])
        self.reader.onReactor("gap", Cursor.fromMapping({0: 9}), "gone")
        self.reader.onReactor("deliver", [])
        self.assertEqual([(m.partition, m.offset) for m in self.reader.drainHeld()], [(0, 0), (0, 1)])
        self.assertEqual(self.reader.drainHeld(), [])
        self.assertEqual([e[0] for e in self.reader.held], ["gap", "deliver"])
        self.reader.runOnce()
        self.assertEqual(self.reactor.pendingNames(), ["onReactor"], "the credit came back")

    def test_pauseDuringResume(self) -> None:
        """
        A sink that pauses again while held batches are handed to it keeps
        the rest held and the consumer paused.
        """
        self.reader.pause()
        self.reader.runOnce()
        self.reader.onReactor("deliver", [])
        self.reader.onReactor("gap", Cursor.fromMapping({0: 5}), "gone")
        self.sink.onDeliver = self.reader.pause
        self.reader.resume()
        self.assertEqual(self.sink.kinds(), ["deliver"])
        self.reader.runOnce()
        self.assertEqual(self.consumer.named("resume"), [])

    def test_offsetOutOfRange(self) -> None:
        """
        An offset the broker no longer has (retention ran while reading) is
        a gap: the partition reads on from the low watermark.
        """
        self.clients.topics[TOPIC][0] = (40, 100)
        self.consumer.records = [FakeRecord(0, -1, error=kafkaError(KafkaError._AUTO_OFFSET_RESET, "range")),
                                 FakeRecord(1, 0)]
        self.turn(self.reader, 2)
        self.assertEqual(self.sink.kinds(), ["deliver", "gap"])
        cursor, reason = self.sink.events[1][1]
        self.assertEqual(cursor, Cursor.fromMapping({0: 40, 1: 1}))
        self.assertIn("offsets 0 to 39 were deleted", reason)
        self.assertEqual(self.consumer.named("incremental_unassign"), [[TP(TOPIC, 0)]])
        self.assertEqual(self.consumer.named("incremental_assign"), [[TP(TOPIC, 0, 40)]])

    def test_brokerErrorsKeepReading(self) -> None:
        """
        The broker going away while reading is no failure.
        """
        self.consumer.records = [FakeRecord(0, -1, error=kafkaError(KafkaError._ALL_BROKERS_DOWN, "down")),
                                 FakeRecord(0, 0)]
        self.turn(self.reader)
        self.assertEqual(self.sink.events, [("deliver", [(0, 0)])])

    def test_close(self) -> None:
        """
        Closing ends the thread's loop; the consumer is closed on the
        thread; the reactor learns it ended.  Batches still on their way are
        dropped.
        """
        self.consumer.records = [FakeRecord(0, 0)]
        self.reader.runOnce()
        exited = self.reader.whenExited()
        self.reader.close()
        self.reader.close()
        self.assertFalse(self.reader.runOnce())
        self.reader.finish()
        self.assertNoResult(exited)
        self.reactor.runFromThread()
        self.successResultOf(exited)
        self.assertEqual(self.sink.events, [])
        self.assertTrue(self.consumer.closed)
        self.assertNotIn(self.reader, self.connector.readers)

    def test_closeWithBrokerGone(self) -> None:
        """
        A reader whose broker is gone still closes at once: the whole run
        ends after the close command.
        """
        self.consumer.brokerDown = kafkaError(KafkaError._ALL_BROKERS_DOWN, "down")
        self.reader.resolved = False
        self.reader.runOnce()
        self.reader.close()
        self.reader.run()
        self.reactor.runFromThread()
        self.successResultOf(self.reader.whenExited())

    def test_crash(self) -> None:
        """
        An unexpected error fails the subscription, logged with its
        traceback, and the consumer is still closed.
        """
        self.consumer.pollError = RuntimeError("bug")
        self.reader.run()
        self.reactor.runFromThread()
        self.assertEqual(self.sink.kinds(), ["failed"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(self.consumer.closed)

    def test_stopService(self) -> None:
        """
        Stopping the connector closes its readers and waits for them, but no
        longer than shutdown-timeout (plus a second) for a stuck one.
        """
        stopped = self.connector.stopService()
        self.assertTrue(self.reader.closed)
        self.assertFalse(self.reader.runOnce())
        self.reactor.advance(6)
        self.successResultOf(stopped)


# ----------------------------------------------------------------- groups


class GroupTests(ConnectorTestCase):
    """
    Group mode: one reader per (topic, group), polls taking turns, commits
    after the caller says so.
    """

    overrides = {"batch_size": 3}

    def poll(self, limit: int = 10, timeout: float = 5.0, group: str = "api.alice") -> Any:
        d = self.connector.groupPoll(TOPIC, group, limit, timeout, "earliest")
        self.group = self.connector.groups[(TOPIC, "evgate." + group)]
        if self.group.consumer is None:
            self.group.now = self.reactor.seconds
            self.group.open()
            self.consumer = self.clients.consumers[-1]
            self.consumer.subscription["on_assign"](self.consumer, [TP(TOPIC, 0), TP(TOPIC, 1)])
        return d

    def test_reader(self) -> None:
        """
        The first poll of a group starts its reader, a member of
        C{<group-prefix>.<group>} that starts where the API says.
        """
        self.poll()
        self.assertEqual(self.threads[-1][1], f"evgate-kafka-group-events-{TOPIC}")
        self.assertEqual(self.consumer.config["group.id"], "evgate.api.alice")
        self.assertEqual(self.consumer.config["auto.offset.reset"], "earliest")
        self.assertEqual(self.consumer.subscription["topics"], [TOPIC])

    def test_takeAndCommit(self) -> None:
        """
        A poll returns the records, with the cursors before and after them;
        committing commits each partition past its last message (sent
        asynchronously, confirmed on the thread) and lets the next poll in,
        whose take reaches the thread behind the commit.
        """
        d = self.poll(limit=2)
        self.consumer.records = [FakeRecord(0, 5), FakeRecord(1, 9), FakeRecord(0, 6)]
        self.group.runOnce()
        self.reactor.runFromThread()
        batch = self.successResultOf(d)
        self.assertEqual([(m.partition, m.offset) for m in batch.messages], [(0, 5), (1, 9)])
        self.assertEqual(batch.first, Cursor.fromMapping({0: 5, 1: 9}))
        self.assertEqual(batch.cursor, Cursor.fromMapping({0: 6}))
        second = self.poll()
        self.assertNoResult(second)
        committed = batch.commit()
        self.group.runOnce()
        self.assertEqual(self.consumer.named("commit"), [([TP(TOPIC, 0, 6), TP(TOPIC, 1, 10)], True)])
        self.reactor.runFromThread()
        self.successResultOf(committed)
        self.group.runOnce()
        self.reactor.runFromThread()
        self.assertEqual([m.offset for m in self.successResultOf(second).messages], [6])

    def test_nextPollDoesNotWaitForTheCoordinator(self) -> None:
        """
        The group's next poll does not wait for the coordinator to confirm
        the previous commit: its take, queued behind the commit, is
        answered first.  Then, with nothing else to do, the thread polls
        for the confirmation up to COMMIT_WAIT and reports the commit
        failed; the late answer is taken without a second report.
        """
        d = self.poll(limit=1)
        self.consumer.records = [FakeRecord(0, 1), FakeRecord(0, 2)]
        self.group.runOnce()
        self.reactor.runFromThread()
        self.consumer.answerCommits = False
        waited: List[float] = []
        answeredBeforeWaiting: List[List[str]] = []

        def elapse(seconds: float) -> None:
            if not waited:
                answeredBeforeWaiting.append(self.reactor.pendingNames())
            waited.append(seconds)
            self.reactor.advance(seconds)

        self.consumer.elapse = elapse
        committed = self.successResultOf(d).commit()
        second = self.poll(limit=1)
        self.group.runOnce()
        self.assertEqual(answeredBeforeWaiting, [["taken"]])
        self.assertLessEqual(sum(waited), COMMIT_WAIT + 0.05)
        self.reactor.runFromThread()
        self.assertEqual([m.offset for m in self.successResultOf(second).messages], [2])
        self.successResultOf(committed)
        self.consumer.answerCommits = True
        self.consumer.elapse = None
        self.group.runOnce()
        self.assertEqual(self.group.commitsInFlight, [])
        self.assertEqual(self.reactor.fromThread, [])

    def test_confirmedWithTheNextTake(self) -> None:
        """
        A commit confirmed while the next take is served is answered then.
        """
        d = self.poll(limit=1)
        self.consumer.records = [FakeRecord(0, 1), FakeRecord(0, 2)]
        self.group.runOnce()
        self.reactor.runFromThread()
        committed = self.successResultOf(d).commit()
        second = self.poll(limit=1)
        self.group.runOnce()
        self.reactor.runFromThread()
        self.successResultOf(committed)
        self.assertEqual([m.offset for m in self.successResultOf(second).messages], [2])
        self.assertEqual(self.group.commitsInFlight, [])

    def test_idleSleepsOnCommands(self) -> None:
        """
        With no take pending, a turn takes what the consumer has without
        blocking on it, then sleeps on the command queue for up to
        C{poll-timeout}: a take or a commit wakes it at once, where a
        blocking poll would hold it for the whole timeout.
        """
        d = self.poll(timeout=0)
        self.group.runOnce()
        self.reactor.runFromThread()
        self.successResultOf(d).commit()
        polls: List[float] = []
        waits: List[float] = []
        consume = self.consumer.consume
        self.consumer.consume = lambda n, timeout: (polls.append(timeout), consume(n, timeout))[1]
        self.group.pollTimeout = 0.2
        self.group.runCommands = lambda wait=0.0: waits.append(wait)  # type: ignore[method-assign]
        self.consumer.records = [FakeRecord(0, 1)]
        self.group.step()
        self.assertEqual(polls, [0.0, 0.0])
        self.assertEqual(waits, [0.2])
        self.assertEqual([m.offset for m in self.group.buffer], [1])

    def test_putBack(self) -> None:
        """
        Messages put back (the response was not written) come first in the
        next poll, followed by what the consumer has, up to the limit.
        """
        d = self.poll(limit=5)
        self.consumer.records = [FakeRecord(0, 1), FakeRecord(0, 2)]
        self.group.runOnce()
        self.group.runOnce()
        self.reactor.runFromThread()
        self.successResultOf(d).putBack()
        d = self.poll(limit=5)
        self.consumer.records = [FakeRecord(0, 3)]
        self.group.runOnce()
        self.reactor.runFromThread()
        self.assertEqual([m.offset for m in self.successResultOf(d).messages], [1, 2, 3])

    def test_emptyAfterTimeout(self) -> None:
        """
        With nothing to read, a poll answers with no messages after its
        timeout (the thread's own deadline).
        """
        d = self.poll(timeout=0)
        self.group.runOnce()
        self.reactor.runFromThread()
        batch = self.successResultOf(d)
        self.assertEqual(batch.messages, [])
        batch.commit()
        self.assertFalse(self.group.lock.locked)

    def test_turns(self) -> None:
        """
        A second poll of the same group while the first holds its turn gets
        an empty batch at its timeout; another group is independent.
        """
        first = self.poll()
        self.group.runOnce()
        self.consumer.records = [FakeRecord(0, 1)]
        self.group.runOnce()
        self.reactor.runFromThread()
        self.successResultOf(first)
        waiting = self.connector.groupPoll(TOPIC, "api.alice", 10, 2.0, "earliest")
        other = self.connector.groupPoll(TOPIC, "api.bob", 10, 2.0, "earliest")
        self.assertEqual(len(self.connector.groups), 2)
        self.reactor.advance(2.0)
        self.assertEqual(self.successResultOf(waiting).messages, [])
        self.assertNoResult(other)

    def test_rebalanceDropsBuffered(self) -> None:
        """
        Records buffered for partitions taken away by a rebalance are
        dropped; the new owner reads them from the committed position.
        """
        self.poll(timeout=0)
        self.group.runOnce()
        self.reactor.runFromThread()
        self.consumer.records = [FakeRecord(0, 1), FakeRecord(1, 1)]
        self.group.runOnce()
        self.group.runOnce()
        self.assertEqual(len(self.group.buffer), 2)
        self.consumer.subscription["on_revoke"](self.consumer, [TP(TOPIC, 0)])
        self.assertEqual([(m.partition, m.offset) for m in self.group.buffer], [(1, 1)])

    def test_bufferBound(self) -> None:
        """
        Between polls the reader buffers about batch-size records, then
        takes one record per FULL_POLL_INTERVAL at most (polling for the
        group's sake) and never pauses its partitions, which would drop
        what librdkafka prefetched.
        """
        first = self.poll(timeout=0)
        self.group.runOnce()
        self.reactor.runFromThread()
        self.successResultOf(first).commit()
        self.consumer.records = [FakeRecord(0, i) for i in range(8)]
        self.group.runOnce()
        self.assertEqual(len(self.group.buffer), 3)
        self.group.runOnce()
        self.group.runOnce()
        self.assertEqual(len(self.group.buffer), 3)
        self.reactor.advance(FULL_POLL_INTERVAL)
        self.group.runOnce()
        self.assertEqual(len(self.group.buffer), 4)
        self.assertEqual(self.consumer.named("pause"), [])
        d = self.poll(limit=4)
        self.group.runOnce()
        self.reactor.runFromThread()
        self.assertEqual([m.offset for m in self.successResultOf(d).messages], [0, 1, 2, 3])
        self.assertEqual(self.consumer.named("pause") + self.consumer.named("resume"), [])

    def test_abandoned(self) -> None:
        """
        A reader thread stuck on the broker fails the poll with a 503 after
        the timeout and request-timeout; what it reads later is kept.
        """
        d = self.poll(timeout=1.0)
        self.reactor.advance(1.0 + 5.0 + 1.0)
        self.failureResultOf(d, EndpointUnavailable)
        self.assertFalse(self.group.lock.locked)
        self.consumer.records = [FakeRecord(0, 1)]
        self.group.runOnce()
        self.assertEqual([m.offset for m in self.group.buffer], [1])

    def test_commitFails(self) -> None:
        """
        A refused commit is logged and the group's turn is freed.
        """
        d = self.poll()
        self.consumer.records = [FakeRecord(0, 1)]
        self.group.runOnce()
        self.reactor.runFromThread()
        batch = self.successResultOf(d)
        self.consumer.commitError = KafkaException(kafkaError(KafkaError._WAIT_COORD, "no coordinator"))
        committed = batch.commit()
        self.group.runOnce()
        self.reactor.runFromThread()
        self.successResultOf(committed)
        self.assertFalse(self.group.lock.locked)

    def test_takeNextKeepsTheTurn(self) -> None:
        """
        A batch can take the next messages in its own poll turn (its
        messages are still the caller's); position commits do not end the
        turn and skip partitions a rebalance took away.
        """
        d = self.poll(limit=2)
        self.consumer.records = [FakeRecord(0, 5), FakeRecord(1, 9), FakeRecord(0, 6)]
        self.group.runOnce()
        self.reactor.runFromThread()
        batch = self.successResultOf(d)
        other = self.poll()
        following = batch.takeNext(2, 5.0)
        self.group.runOnce()
        self.reactor.runFromThread()
        self.assertEqual([m.offset for m in self.successResultOf(following).messages], [6])
        self.assertNoResult(other)
        self.assertTrue(self.group.lock.locked)
        self.consumer.subscription["on_revoke"](self.consumer, [TP(TOPIC, 1)])
        committed = self.group.commitPositions({0: 6, 1: 10})
        self.group.runOnce()
        self.reactor.runFromThread()
        self.successResultOf(committed)
        self.assertEqual(self.consumer.named("commit"), [([TP(TOPIC, 0, 6)], True)])
        self.assertTrue(self.group.lock.locked)
        self.assertNoResult(other)

    def test_takeNextFailureReleases(self) -> None:
        """
        A take in a kept turn that fails gives the turn back, so that the
        next poll gets one.
        """
        d = self.poll(limit=2, timeout=1.0)
        self.consumer.records = [FakeRecord(0, 5)]
        self.group.runOnce()
        self.reactor.runFromThread()
        following = self.successResultOf(d).takeNext(2, 1.0)
        self.reactor.advance(1.0 + 5.0 + 1.0)
        self.failureResultOf(following, EndpointUnavailable)
        self.assertFalse(self.group.lock.locked)

    def test_commitRefusedByCoordinator(self) -> None:
        """
        A commit the coordinator answers with an error fails the batch's
        commit with that reason (logged; the group may read the messages
        again) and frees the group's turn.
        """
        d = self.poll()
        self.consumer.records = [FakeRecord(0, 1)]
        self.group.runOnce()
        self.reactor.runFromThread()
        batch = self.successResultOf(d)
        self.consumer.commitOutcome = kafkaError(KafkaError.NOT_COORDINATOR, "Not coordinator")
        committed = batch.commit()
        self.group.runOnce()
        self.reactor.runFromThread()
        self.successResultOf(committed)
        self.assertFalse(self.group.lock.locked)
        self.assertEqual(self.group.commitsInFlight, [])

    def test_commitWithoutCoordinatorDoesNotHoldTheReader(self) -> None:
        """
        While the group has no coordinator (a broker restarting), a commit
        is not confirmed: the reader waits for it only COMMIT_WAIT seconds
        (polling meanwhile), reports it failed, and serves the next poll,
        where a synchronous commit would hold the reader for librdkafka's
        whole session timeout.  The late answer is not reported again.
        """
        d = self.poll()
        self.consumer.records = [FakeRecord(0, 1)]
        self.group.runOnce()
        self.reactor.runFromThread()
        batch = self.successResultOf(d)
        self.consumer.answerCommits = False
        waited: List[float] = []
        self.consumer.elapse = lambda seconds: (waited.append(seconds), self.reactor.advance(seconds))
        committed = batch.commit()
        self.group.runOnce()
        self.assertEqual(self.consumer.named("commit")[-1][1], True)
        self.assertLessEqual(sum(waited), COMMIT_WAIT + 0.05)
        self.reactor.runFromThread()
        self.successResultOf(committed)
        self.assertFalse(self.group.lock.locked)
        self.consumer.elapse = None
        second = self.poll()
        self.consumer.records = [FakeRecord(0, 2)]
        self.group.runOnce()
        self.reactor.runFromThread()
        self.assertEqual([m.offset for m in self.successResultOf(second).messages], [2])
        # The coordinator is back: the late answer is taken, not reported.
        self.consumer.answerCommits = True
        self.group.runOnce()
        self.assertEqual(self.group.commitsInFlight, [])

    def test_fullBufferPollsSeldom(self) -> None:
        """
        While nobody takes (a webhook receiver that is down), a reader
        whose buffer is full polls only every FULL_POLL_INTERVAL seconds,
        so its buffer grows by one record per interval at most, not by one
        per turn.
        """
        d = self.poll(timeout=0)
        self.group.runOnce()
        self.reactor.runFromThread()
        self.successResultOf(d).commit()
        self.group.runCommands = lambda wait=0.0: None  # type: ignore[method-assign]
        self.consumer.records = [FakeRecord(0, offset) for offset in range(100)]
        self.group.runOnce()
        self.assertEqual(len(self.group.buffer), 3)
        for _ in range(50):
            self.reactor.advance(0.2)
            self.group.runOnce()
        self.assertLessEqual(len(self.group.buffer), 3 + 10 / FULL_POLL_INTERVAL + 1)

    def test_idleClose(self) -> None:
        """
        A group nobody polls for group-idle-timeout leaves the group.
        """
        d = self.poll(timeout=0)
        self.group.runOnce()
        self.reactor.runFromThread()
        self.successResultOf(d).commit()
        self.reactor.advance(60.0)
        self.assertEqual(self.connector.groups, {})
        self.assertFalse(self.group.runOnce())
        self.group.finish()
        self.reactor.runFromThread()
        self.assertTrue(self.consumer.closed)
        self.assertNotIn(self.group, self.connector.readers)


# ----------------------------------------------------------------- HTTP GET


class FakeGroupReader:
    """
    What a L{GroupBatch} ends with.
    """

    def __init__(self) -> None:
        self.commits: List[Dict[int, int]] = []
        self.putBacks: List[List[Message]] = []

    def commit(self, offsets: Dict[int, int]) -> Any:
        self.commits.append(dict(offsets))

    def putBack(self, messages: List[Message]) -> None:
        self.putBacks.append(messages)


@implementer(IConsumerGroups)
class FakeGroupConnector:
    """
    A connector with group mode that answers from a script.
    """

    def __init__(self) -> None:
        self.polls: List[Tuple[str, str, int, float, str]] = []
        self.reader = FakeGroupReader()
        self.result: Any = None

    def groupPoll(self, topic: str, group: str, limit: int, timeout: float, start: str) -> Any:
        from twisted.internet.defer import fail, succeed

        self.polls.append((topic, group, limit, timeout, start))
        if isinstance(self.result, Exception):
            return fail(self.result)
        return succeed(self.result)


class HttpGroupModeTests(SynchronousTestCase):
    """
    HTTP GET with a client id: the group-mode branch of the entrypoint.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.gateway = memoryGateway(clock=self.clock)
        # Any: StubTreq's methods are made at run time; the API's connector
        # is swapped for a fake.
        self.treq: Any = StubTreq(self.gateway.resource)
        api = self.gateway.api("demo")
        assert api is not None
        self.api: Any = api
        self.connector = FakeGroupConnector()
        messages = [Message(b"m%d" % i, "k", (("h", "v"),), "demo", 0, i, 1000) for i in (7, 8)]
        self.connector.result = GroupBatch(self.connector.reader, messages, Cursor.fromMapping({0: 7}),  # type: ignore
                                           Cursor.fromMapping({0: 9}))

    def get(self, url: str, **kwargs: Any) -> Tuple[Any, bytes]:
        d = self.treq.request("GET", url, **kwargs)
        self.treq.flush()
        response = self.successResultOf(d)
        return response, self.successResultOf(response.content())

    def test_groupPage(self) -> None:
        """
        A client id reads as the group C{get.<api>.<client-id>}; the page has
        the cursor-mode shape; the position is committed after the response
        was written.
        """
        self.api.connector = self.connector
        response, body = self.get("http://gateway.test/demo?limit=5&timeout=2000",
                                  headers={"X-Client-Id": "alice-1"})
        self.assertEqual(response.code, 200, body)
        doc = json.loads(body)
        tag = cursorTag("demo", "demo")
        self.assertEqual([item["content"] for item in doc["items"]], ["m7", "m8"])
        self.assertEqual(Cursor.decode(doc["items"][0]["id"], tag), Cursor.fromMapping({0: 8}))
        self.assertEqual(Cursor.decode(doc["pagination"]["nextCursor"], tag), Cursor.fromMapping({0: 9}))
        self.assertEqual(self.connector.polls, [("demo", "get.demo.alice-1", 5, 2.0, "latest")])
        self.assertEqual(self.connector.reader.commits, [{0: 9}])

    def test_queryParameter(self) -> None:
        """
        The client id may come as the C{client-id} query parameter.
        """
        self.api.connector = self.connector
        response, _ = self.get("http://gateway.test/demo?client-id=bob")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.connector.polls[0][1], "get.demo.bob")

    def test_badClientId(self) -> None:
        """
        A client id outside [A-Za-z0-9._-]{1,100} is a 400.
        """
        self.api.connector = self.connector
        for bad in ("a b", "x" * 101, "caf\u00e9", ""):
            response, body = self.get("http://gateway.test/demo", headers={"X-Client-Id": bad.encode("utf-8")})
            self.assertEqual(response.code, 400, (bad, body))
        self.assertEqual(self.connector.polls, [])

    def test_cursorAndClientId(self) -> None:
        """
        A cursor and a client id together are a 400.
        """
        self.api.connector = self.connector
        token = Cursor.fromMapping({0: 1}).encode(cursorTag("demo", "demo"))
        response, body = self.get(f"http://gateway.test/demo?cursor={token}&client-id=bob")
        self.assertEqual(response.code, 400)
        self.assertIn(b"not both", body)

    def test_noGroups(self) -> None:
        """
        A client id on an endpoint without consumer groups (memory) is a
        400.
        """
        response, body = self.get("http://gateway.test/demo", headers={"X-Client-Id": "alice"})
        self.assertEqual(response.code, 400)
        self.assertIn(b"without consumer groups", body)

    def test_brokerDown(self) -> None:
        """
        A group poll that fails with a problem answers with it.
        """
        self.api.connector = self.connector
        self.connector.result = EndpointUnavailable("broker gone", retryAfter=3)
        response, body = self.get("http://gateway.test/demo", headers={"X-Client-Id": "alice"})
        self.assertEqual(response.code, 503)
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["3"])
