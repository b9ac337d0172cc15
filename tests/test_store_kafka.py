"""
Tests of the Kafka store (L{evgate.store.kafka}).

Unit tests run several nodes' stores over one fake Kafka cluster: no
broker, no threads, no sleeps.  Every node has its own connector and
store; the owner threads are never started, the tests turn their loops
(L{Cluster.pump}) and choose the order in which the nodes' messages reach
the topic, to make the races the store must settle.

Integration tests run the same behaviour suite as the other stores
(L{tests.test_store.StoreBehaviour}) and several nodes against the real
broker (127.0.0.1:${EVGATE_KAFKA_PORT:-9092}, from C{scripts/dev-services
up}), each on a fresh topic, with kcat as the independent reader.  They
fail, never skip, when the broker is not there.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

from confluent_kafka import KafkaError, KafkaException
from twisted.internet import reactor as realReactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from evgate.config import ConfigError, parseConfig
from evgate.connectors.kafka import KafkaConnector
from evgate.errors import EndpointUnavailable
from evgate.interfaces import IStore, IWatchableStore
from evgate.security.apikey import KIND as KEY_KIND
from evgate.security.apikey import KeyRegistry
from evgate.service import GatewayService
from evgate.store import StoreSpec, buildStore
from evgate.store.kafka import KafkaStore, StoreReader, recordKey

from .helpers import KAFKA, demoIni
from .test_kafka_bridge import TP, FakeMetadata, FakeReactor, FakeRecord, FakeTopicMetadata, kafkaError, options
from .test_kafka_integration import admin, kcat, requireKafka
from .test_store import StoreBehaviour

STORE_TOPIC = "evgate-store"

# ----------------------------------------------------------------- fakes


class FakeTopic:
    """
    One topic of the fake cluster: its records (with the gaps compaction
    leaves), its end offset, its configuration.
    """

    def __init__(self, partitions: int = 1, config: Optional[Dict[str, str]] = None) -> None:
        self.partitions = partitions
        self.config = dict(config or {"cleanup.policy": "compact"})
        self.records: List[FakeRecord] = []
        self.high = 0

    def append(self, key: Optional[bytes], value: Optional[bytes], headers: Any) -> FakeRecord:
        """
        Store one record at the end.
        """
        record = FakeRecord(0, self.high, value, key=key, headers=headers, topic=STORE_TOPIC)
        self.records.append(record)
        self.high += 1
        return record

    def compact(self, dropTombstones: bool = False) -> None:
        """
        What the log cleaner does: keep the last record of every key
        (without tombstones, once C{delete.retention.ms} passed).
        """
        last: Dict[Any, int] = {r.key(): r.offset() for r in self.records}
        self.records = [r for r in self.records if last[r.key()] == r.offset()
                        and not (dropTombstones and r.value() is None)]

    def latest(self) -> Dict[str, Optional[Any]]:
        """
        The last value of every key, decoded, as a node starting now would
        read it after compaction.
        """
        values: Dict[str, Optional[Any]] = {}
        for r in self.records:
            values[r.key().decode()] = None if r.value() is None else json.loads(r.value())
        return values

    def headersOf(self, offset: int) -> Dict[str, str]:
        """
        The headers of the record at C{offset}, decoded.
        """
        record = [r for r in self.records if r.offset() == offset][0]
        return {name: value.decode() for name, value in record.headers() or ()}


class FakeFuture:
    """
    A C{concurrent.futures.Future} that is already done.
    """

    def __init__(self, result: Any = None, error: Optional[BaseException] = None) -> None:
        self._result = result
        self._error = error

    def result(self, timeout: Optional[float] = None) -> Any:
        if self._error is not None:
            raise self._error
        return self._result


class FakeConfigEntry:
    """
    One entry of C{describe_configs}.
    """

    def __init__(self, value: str) -> None:
        self.value = value


class FakeAdmin:
    """
    The AdminClient over the fake cluster.
    """

    def __init__(self, cluster: "Cluster") -> None:
        self.cluster = cluster

    def create_topics(self, topics: List[Any], request_timeout: float) -> Dict[str, FakeFuture]:
        self.cluster.check()
        futures = {}
        for new in topics:
            if new.topic in self.cluster.topics:
                futures[new.topic] = FakeFuture(error=KafkaException(kafkaError(KafkaError.TOPIC_ALREADY_EXISTS)))
                continue
            self.cluster.created.append((new.topic, new.num_partitions, dict(new.config)))
            self.cluster.topics[new.topic] = FakeTopic(new.num_partitions, dict(new.config))
            futures[new.topic] = FakeFuture()
        return futures

    def describe_configs(self, resources: List[Any], request_timeout: float) -> Dict[Any, FakeFuture]:
        self.cluster.check()
        topic = self.cluster.topics[resources[0].name]
        return {resources[0]: FakeFuture({k: FakeConfigEntry(v) for k, v in topic.config.items()})}


class FakeProducer:
    """
    A producer whose messages reach the topic when its thread polls (so
    that a test decides which node's write lands first).
    """

    def __init__(self, cluster: "Cluster", config: Dict[str, Any]) -> None:
        self.cluster = cluster
        self.config = config
        self.queued: List[Tuple[str, Any, Any, Any, Callable[..., None]]] = []

    def produce(self, topic: str, value: Any, key: Any, headers: Any, on_delivery: Callable[..., None]) -> None:
        self.queued.append((topic, value, key, headers, on_delivery))

    def poll(self, timeout: float) -> int:
        queued, self.queued = self.queued, []
        if queued and self.cluster.down:
            # As librdkafka does before it times the messages out.
            self.config["error_cb"](kafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
        for topic, value, key, headers, report in queued:
            if self.cluster.down:
                report(kafkaError(KafkaError._MSG_TIMED_OUT, "timed out"), None)
                continue
            record = self.cluster.topics[topic].append(key, value, headers)
            report(None, record)
        return len(queued)

    def flush(self, timeout: float) -> int:
        self.poll(0)
        return 0

    def purge(self) -> None:
        pass

    def list_topics(self, topic: Optional[str] = None, timeout: float = -1) -> FakeMetadata:
        return FakeMetadata({})


class FakeConsumer:
    """
    An assign-mode consumer of the fake cluster with partition EOF events.
    """

    def __init__(self, cluster: "Cluster", config: Dict[str, Any]) -> None:
        self.cluster = cluster
        self.config = config
        self.position: Optional[int] = None
        self.topic: Optional[str] = None
        self.eofAt: Optional[int] = None
        self.closed = False

    def list_topics(self, topic: str, timeout: float) -> FakeMetadata:
        self.cluster.check()
        if topic not in self.cluster.topics:
            return FakeMetadata({topic: FakeTopicMetadata({}, kafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))})
        partitions = self.cluster.topics[topic].partitions
        return FakeMetadata({topic: FakeTopicMetadata({p: object() for p in range(partitions)})})

    def get_watermark_offsets(self, tp: TP, timeout: float, cached: bool) -> Tuple[int, int]:
        self.cluster.check()
        topic = self.cluster.topics[tp.topic]
        low = topic.records[0].offset() if topic.records else topic.high
        return low, topic.high

    def assign(self, tps: List[TP]) -> None:
        self.topic = tps[0].topic
        self.position = tps[0].offset

    def poll(self, timeout: float) -> Any:
        if self.topic is None or self.position is None or self.cluster.down:
            return None
        topic = self.cluster.topics[self.topic]
        if self.position < topic.high:
            following = [r for r in topic.records if r.offset() >= self.position]
            if following:
                self.position = following[0].offset() + 1
                return following[0]
            self.position = topic.high
        if self.eofAt != topic.high:
            self.eofAt = topic.high
            return FakeRecord(0, topic.high, error=kafkaError(KafkaError._PARTITION_EOF), topic=self.topic)
        return None

    def consume(self, num_messages: int, timeout: float) -> List[Any]:
        taken = []
        while len(taken) < num_messages:
            record = self.poll(0)
            if record is None:
                break
            taken.append(record)
        return taken

    def close(self) -> None:
        self.closed = True


class FakeClients:
    """
    The client factory of one node, over the shared fake cluster.
    """

    def __init__(self, cluster: "Cluster") -> None:
        self.cluster = cluster

    def producer(self, config: Dict[str, Any]) -> FakeProducer:
        return FakeProducer(self.cluster, config)

    def consumer(self, config: Dict[str, Any]) -> FakeConsumer:
        return FakeConsumer(self.cluster, config)

    def admin(self, config: Dict[str, Any]) -> FakeAdmin:
        return FakeAdmin(self.cluster)

    def topicPartition(self, topic: str, partition: int, offset: Optional[int] = None) -> TP:
        return TP(topic, partition) if offset is None else TP(topic, partition, offset)


class Node:
    """
    One gateway node of a unit test: a connector and a store on the fake
    cluster, started.
    """

    def __init__(self, cluster: "Cluster", name: str) -> None:
        self.cluster = cluster
        self.reactor = cluster.reactor
        self.threads: List[Tuple[Callable[[], None], str]] = []
        self.connector = KafkaConnector(name, options(), self.reactor, clients=FakeClients(cluster),
                                        startThread=lambda target, thread: self.threads.append((target, thread)))
        self.connector.startService()
        self.store = KafkaStore(self.connector, STORE_TOPIC, self.reactor, openWait=5.0, writeTimeout=3.0)
        self.store.startService()
        self.opened: List[Any] = []

    def turn(self) -> None:
        """
        One turn of the store's reader thread (opening its consumer first,
        as the thread would).
        """
        reader = self.store.reader
        if reader is None or reader.closing:
            return
        if reader.consumer is None:
            reader.now = self.reactor.seconds
            reader.open()
        reader.runOnce()

    def deliver(self) -> None:
        """
        One turn of the producer thread: this node's queued messages reach
        the topic.
        """
        thread = self.connector.producerThread
        if thread is not None:
            thread.runOnce()


class Cluster:
    """
    A fake Kafka cluster, its topics, and the nodes that use it.
    """

    def __init__(self, withTopic: bool = True) -> None:
        self.reactor = FakeReactor()
        self.topics: Dict[str, FakeTopic] = {STORE_TOPIC: FakeTopic()} if withTopic else {}
        self.created: List[Tuple[str, int, Dict[str, str]]] = []
        self.down = False
        self.nodes: List[Node] = []

    def check(self) -> None:
        """
        Raise as a client does while the broker is unreachable.
        """
        if self.down:
            raise KafkaException(kafkaError(KafkaError._TRANSPORT, "connection refused"))

    def node(self, name: str = "") -> Node:
        """
        A new started node.
        """
        node = Node(self, name or f"node{len(self.nodes) + 1}")
        self.nodes.append(node)
        return node

    @property
    def topic(self) -> FakeTopic:
        """
        The store's topic.
        """
        return self.topics[STORE_TOPIC]

    def read(self, *nodes: Node) -> None:
        """
        Let C{nodes} (default: all) read what there is, and the reactor run
        what they handed over.
        """
        for _ in range(4):
            for node in nodes or self.nodes:
                node.turn()
            self.reactor.runFromThread()

    def pump(self, rounds: int = 10) -> None:
        """
        Every node delivers its queued messages and reads, until nothing
        more happens.
        """
        for _ in range(rounds):
            for node in self.nodes:
                node.deliver()
            self.reactor.runFromThread()
            self.read()


def _headers(topic: FakeTopic) -> List[str]:
    return [topic.headersOf(r.offset()).get("evgate-op", "") for r in topic.records]


# ----------------------------------------------------------------- unit tests


class KafkaStoreUnitCase(SynchronousTestCase):
    """
    A fake cluster; nodes are made by the tests.
    """

    def setUp(self) -> None:
        self.cluster = Cluster()

    def runFailingReader(self, node: Node) -> None:
        """
        Run C{node}'s reader thread until it ends on the failure the test
        arranged, and the reactor learn of it.
        """
        reader = node.store.reader
        assert reader is not None
        reader.now = self.cluster.reactor.seconds
        reader.run()
        self.cluster.reactor.runFromThread()

    def openNode(self, name: str = "") -> Node:
        """
        A node whose store is open.
        """
        node = self.cluster.node(name)
        self.cluster.pump()
        self.assertTrue(node.store.isOpen)
        return node


class OpenTests(KafkaStoreUnitCase):
    """
    Starting: the topic, reading it to its end, waiting callers.
    """

    def test_interface(self) -> None:
        """
        The store provides L{IWatchableStore} (and so L{IStore}).
        """
        node = self.cluster.node()
        self.assertTrue(verifyObject(IWatchableStore, node.store))
        self.assertTrue(verifyObject(IStore, node.store))
        self.assertEqual(node.store.description, f"kafka:node1/{STORE_TOPIC}")

    def test_createsCompactedTopic(self) -> None:
        """
        A missing topic is created with one partition and
        C{cleanup.policy=compact}; the store opens empty.
        """
        self.cluster = Cluster(withTopic=False)
        node = self.cluster.node()
        self.cluster.read()
        self.assertEqual(self.cluster.created, [(STORE_TOPIC, 1, {"cleanup.policy": "compact"})])
        self.reactor = self.cluster.reactor
        self.reactor.advance(0.3)
        self.cluster.read()
        self.assertTrue(node.store.isOpen)
        self.assertEqual(self.successResultOf(node.store.list("thing")), [])

    def test_callsWaitForTheEnd(self) -> None:
        """
        Calls made before the store read up to the end offset it saw at
        start wait; the records are there when they fire.  An end made of
        offsets that compaction emptied (tombstones removed) is reached by
        the EOF event.
        """
        topic = self.cluster.topics[STORE_TOPIC] = FakeTopic()
        topic.append(b"thing/a", b'{"v":1}', None)
        topic.append(b"thing/b", b'{"v":2}', None)
        topic.append(b"thing/a", b'{"v":3}', None)
        topic.append(b"thing/c", b'{"v":4}', None)
        topic.append(b"thing/c", None, None)
        topic.compact(dropTombstones=True)
        node = self.cluster.node()
        got = node.store.get("thing", "a")
        listed = node.store.list("thing")
        self.assertNoResult(got)
        node.turn()  # resolve: assign, learn the end (5)
        self.cluster.reactor.runFromThread()
        self.assertFalse(node.store.isOpen)
        self.assertNoResult(got)
        self.cluster.read()
        self.assertTrue(node.store.isOpen)
        self.assertEqual(self.successResultOf(got), {"v": 3})
        self.assertEqual(self.successResultOf(listed), [("a", {"v": 3}), ("b", {"v": 2})])
        self.assertEqual(node.store.nextOffset, 5)

    def test_openWaitEnds(self) -> None:
        """
        With the broker unreachable a call waits C{openWait} seconds, then
        fails with a 503 that says why.
        """
        self.cluster.down = True
        node = self.cluster.node()
        got = node.store.get("thing", "a")
        self.cluster.read()
        self.cluster.reactor.advance(5.0)
        failure = self.failureResultOf(got, EndpointUnavailable)
        self.assertEqual(failure.value.status, 503)
        self.assertIn("not open after 5 s", failure.value.detail)

    def test_refusesSeveralPartitions(self) -> None:
        """
        A topic with two partitions is refused: calls fail with the reason,
        and the reader tries again later (the topic may be fixed).
        """
        self.cluster.topics[STORE_TOPIC] = FakeTopic(partitions=2)
        node = self.cluster.node()
        got = node.store.get("thing", "a")
        self.runFailingReader(node)
        self.assertIsNone(node.store.reader)
        self.cluster.topics[STORE_TOPIC] = FakeTopic()
        self.cluster.reactor.advance(5.0)
        failure = self.failureResultOf(got, EndpointUnavailable)
        self.assertIn("2 partitions", failure.value.detail)
        self.assertIsNotNone(node.store.reader)  # started again after its delay
        self.cluster.read()
        self.assertTrue(node.store.isOpen)

    def test_refusesDeletePolicy(self) -> None:
        """
        A topic whose records Kafka deletes by age is refused.
        """
        self.cluster.topics[STORE_TOPIC] = FakeTopic(config={"cleanup.policy": "delete"})
        node = self.cluster.node()
        got = node.store.get("thing", "a")
        self.runFailingReader(node)
        self.cluster.reactor.advance(5.0)
        self.assertIn("cleanup.policy=delete", self.failureResultOf(got, EndpointUnavailable).value.detail)


    def test_topicGoneOrRecreated(self) -> None:
        """
        A topic deleted after this node read records from it is not created
        again behind its back, and one created again (ending before what
        this node read) is refused; the node keeps answering reads from the
        records it has.
        """
        node = self.openNode()
        node.store.put("thing", "a", {"v": 1})
        self.cluster.pump()
        for topics, reason in (({}, "is gone"), ({STORE_TOPIC: FakeTopic()}, "it was created again")):
            self.cluster.topics = topics
            reader = StoreReader(node.store, node.store.nextOffset)
            reader.now = self.cluster.reactor.seconds
            reader.open()
            reader.run()
            self.cluster.reactor.runFromThread()
            self.assertIn(reason, node.store.problem)
            self.assertEqual(self.cluster.created, [])
            self.assertEqual(self.successResultOf(node.store.get("thing", "a")), {"v": 1})


class WriteTests(KafkaStoreUnitCase):
    """
    One node's writes.
    """

    def test_readYourWrites(self) -> None:
        """
        A write fires once this node's reader applied it, not at its
        delivery report: a C{get} right after sees it.
        """
        node = self.openNode()
        d = node.store.put("thing", "a", {"v": 1})
        node.deliver()
        self.cluster.reactor.runFromThread()
        self.assertNoResult(d)
        self.cluster.read()
        self.successResultOf(d)
        self.assertEqual(self.successResultOf(node.store.get("thing", "a")), {"v": 1})
        self.assertEqual(self.cluster.topic.latest(), {"thing/a": {"v": 1}})

    def test_operations(self) -> None:
        """
        create, update (fields and increments), delete: the messages, their
        key C{kind/id}, the tombstone of a delete, and the answers.
        """
        node = self.openNode()
        store = node.store
        created = store.create("thing", "a", {"n": 1, "keep": "x"})
        self.cluster.pump()
        self.assertTrue(self.successResultOf(created))
        again = store.create("thing", "a", {"n": 2})
        self.assertFalse(self.successResultOf(again))
        updated = store.update("thing", "a", {"state": "on"}, {"n": 2})
        self.cluster.pump()
        self.assertEqual(self.successResultOf(updated), {"n": 3, "keep": "x", "state": "on"})
        self.assertIsNone(self.successResultOf(store.update("thing", "nope", {"x": 1})))
        deleted = store.delete("thing", "a")
        self.cluster.pump()
        self.assertTrue(self.successResultOf(deleted))
        self.assertFalse(self.successResultOf(store.delete("thing", "a")))
        self.assertIsNone(self.successResultOf(store.get("thing", "a")))
        self.assertEqual(_headers(self.cluster.topic), ["create", "update", "delete"])
        self.assertEqual(self.cluster.topic.records[-1].key(), b"thing/a")
        self.assertIsNone(self.cluster.topic.records[-1].value())
        patch = json.loads(self.cluster.topic.headersOf(1)["evgate-patch"])
        self.assertEqual(patch, {"changes": {"state": "on"}, "increments": {"n": 2}})

    def test_oneRecordInOrder(self) -> None:
        """
        One node's writes of one record go one after the other: the second
        is produced only once the first was read back, so it starts from
        it.
        """
        node = self.openNode()
        node.store.put("thing", "a", {"n": 0})
        self.cluster.pump()
        first = node.store.update("thing", "a", {}, {"n": 1})
        second = node.store.update("thing", "a", {"last": True}, {"n": 1})
        self.assertEqual(len(node.connector.producerThread.producer.queued), 1)
        self.cluster.pump()
        self.assertEqual(self.successResultOf(first), {"n": 1})
        self.assertEqual(self.successResultOf(second), {"n": 2, "last": True})
        self.assertNotIn("sync", _headers(self.cluster.topic))

    def test_brokerDown(self) -> None:
        """
        While Kafka is down a write fails with a 503 and changes nothing;
        reads go on from memory.
        """
        node = self.openNode()
        node.store.put("thing", "a", {"v": 1})
        self.cluster.pump()
        self.cluster.down = True
        d = node.store.update("thing", "a", {"v": 2})
        self.cluster.pump()
        self.assertEqual(self.failureResultOf(d, EndpointUnavailable).value.status, 503)
        self.assertEqual(self.successResultOf(node.store.get("thing", "a")), {"v": 1})

    def test_notReadBack(self) -> None:
        """
        A write Kafka acknowledged but that this node cannot read back fails
        after C{writeTimeout}.
        """
        node = self.openNode()
        d = node.store.put("thing", "a", {"v": 1})
        node.deliver()
        self.cluster.reactor.runFromThread()
        self.cluster.reactor.advance(3.0)
        self.assertIn("has not read it back", self.failureResultOf(d, EndpointUnavailable).value.detail)

    def test_foreignMessagesSkipped(self) -> None:
        """
        Messages that are not evgate records (no C{kind/id} key, not a JSON
        object) are skipped by every node; a plain JSON value under a good
        key is taken as a put.
        """
        node = self.openNode()
        self.cluster.topic.append(b"nokind", b"{}", None)
        self.cluster.topic.append(b"thing/a", b"[1]", None)
        self.cluster.topic.append(b"thing/b", b"not json", None)
        self.cluster.topic.append(b"thing/c", b'{"v": 1}', None)
        self.cluster.read()
        self.assertEqual(self.successResultOf(node.store.list("thing")), [("c", {"v": 1})])
        self.assertEqual(node.store.nextOffset, 4)

    def test_stopWaitsForWrites(self) -> None:
        """
        Stopping lets the writes under way finish, then stops the reader.
        """
        node = self.openNode()
        d = node.store.put("thing", "a", {"v": 1})
        stopped = node.store.stopService()
        self.assertNoResult(stopped)
        self.cluster.pump()
        self.successResultOf(d)
        reader = node.store.reader
        self.assertIsNone(reader)
        self.cluster.reactor.advance(10)
        self.successResultOf(stopped)
        self.failureResultOf(node.store.get("thing", "a"), EndpointUnavailable)

    def test_badKind(self) -> None:
        """
        A kind with a C{/} cannot make a key.
        """
        node = self.openNode()
        self.failureResultOf(node.store.put("a/b", "c", {}), ValueError)
        self.assertEqual(recordKey("api-key", "x/y"), "api-key/x/y")


class SeveralNodesTests(KafkaStoreUnitCase):
    """
    Several nodes writing the same records at once (the order in which
    their messages reach the topic is the test's).
    """

    def test_followAndWatch(self) -> None:
        """
        A node sees the records other nodes write, and tells its watchers
        (only of the kind they watch, after it is open, not after they
        stopped watching).
        """
        one, two = self.openNode(), self.openNode()
        seen: List[Tuple[str, Any]] = []
        stop = two.store.watch("thing", lambda id, record: seen.append((id, record)))
        one.store.put("thing", "a", {"v": 1})
        one.store.put("other", "x", {"v": 1})
        self.cluster.pump()
        self.assertEqual(self.successResultOf(two.store.get("thing", "a")), {"v": 1})
        one.store.delete("thing", "a")
        self.cluster.pump()
        self.assertEqual(seen, [("a", {"v": 1}), ("a", None)])
        stop()
        one.store.put("thing", "b", {"v": 2})
        self.cluster.pump()
        self.assertEqual(len(seen), 2)

    def test_concurrentUpdatesMerge(self) -> None:
        """
        Two nodes update different fields and the same counter of one record
        at once (both produce before either read the other's): every node
        ends with both changes and both increments, and the topic's last
        message (a sync) holds that record, which a node starting after
        compaction reads.
        """
        one, two = self.openNode(), self.openNode()
        one.store.put("sub", "s", {"paused": False, "position": "p0", "delivered": 0})
        self.cluster.pump()
        paused = one.store.update("sub", "s", {"paused": True})
        moved = two.store.update("sub", "s", {"position": "p1"}, {"delivered": 1})
        one.deliver()
        two.deliver()
        self.cluster.pump()
        expected = {"paused": True, "position": "p1", "delivered": 1}
        self.assertEqual(self.successResultOf(paused), {"paused": True, "position": "p0", "delivered": 0})
        self.assertEqual(self.successResultOf(moved), expected)
        for node in (one, two):
            self.assertEqual(self.successResultOf(node.store.get("sub", "s")), expected)
        self.assertEqual(_headers(self.cluster.topic), ["put", "update", "update", "sync"])
        self.cluster.topic.compact()
        self.assertEqual(self.cluster.topic.latest(), {"sub/s": expected})
        late = self.openNode()
        self.assertEqual(self.successResultOf(late.store.get("sub", "s")), expected)

    def test_manyConcurrentIncrements(self) -> None:
        """
        Three nodes add to one counter at once, twice each: every increment
        counts on every node.
        """
        nodes = [self.openNode() for _ in range(3)]
        nodes[0].store.put("c", "x", {"n": 0})
        self.cluster.pump()
        for _ in range(2):
            for node in nodes:
                node.store.update("c", "x", {}, {"n": 1})
            for node in reversed(nodes):
                node.deliver()
            self.cluster.pump()
        for node in nodes:
            self.assertEqual(self.successResultOf(node.store.get("c", "x")), {"n": 6})
        self.cluster.topic.compact()
        self.assertEqual(self.cluster.topic.latest(), {"c/x": {"n": 6}})

    def test_createRace(self) -> None:
        """
        Two nodes create the same id at once: the first in the topic wins on
        every node, the other's create answers False, and the topic ends
        with the winner's record.
        """
        one, two = self.openNode(), self.openNode()
        first = two.store.create("thing", "a", {"by": "two"})
        second = one.store.create("thing", "a", {"by": "one"})
        two.deliver()
        one.deliver()
        self.cluster.pump()
        self.assertTrue(self.successResultOf(first))
        self.assertFalse(self.successResultOf(second))
        for node in (one, two):
            self.assertEqual(self.successResultOf(node.store.get("thing", "a")), {"by": "two"})
        self.cluster.topic.compact()
        self.assertEqual(self.cluster.topic.latest(), {"thing/a": {"by": "two"}})

    def test_deleteWinsOverLateUpdate(self) -> None:
        """
        An update that lands after another node deleted the record does not
        bring it back, on any node nor in the topic.
        """
        one, two = self.openNode(), self.openNode()
        one.store.put("thing", "a", {"v": 1})
        self.cluster.pump()
        deleted = one.store.delete("thing", "a")
        updated = two.store.update("thing", "a", {"v": 2})
        one.deliver()
        two.deliver()
        self.cluster.pump()
        self.assertTrue(self.successResultOf(deleted))
        self.assertIsNone(self.successResultOf(updated))
        for node in (one, two):
            self.assertIsNone(self.successResultOf(node.store.get("thing", "a")))
        self.cluster.topic.compact()
        self.assertEqual(self.cluster.topic.latest(), {"thing/a": None})

    def test_lateNodeHealsFromNextWrite(self) -> None:
        """
        A node that read a record from a message that was later merged
        (its writer died before its sync) gets the record every other node
        has with the next write of that record.
        """
        one, two = self.openNode(), self.openNode()
        one.store.put("sub", "s", {"a": 0, "b": 0})
        self.cluster.pump()
        one.store.update("sub", "s", {"a": 1})
        two.store.update("sub", "s", {"b": 1})
        one.deliver()
        two.deliver()
        # Node two dies before its sync: its update's value lacks a = 1.
        self.cluster.nodes.remove(two)
        self.cluster.pump()
        self.cluster.topic.compact()
        self.assertEqual(self.cluster.topic.latest(), {"sub/s": {"a": 0, "b": 1}})
        late = self.openNode()
        self.assertEqual(self.successResultOf(late.store.get("sub", "s")), {"a": 0, "b": 1})
        self.assertEqual(self.successResultOf(one.store.get("sub", "s")), {"a": 1, "b": 1})
        one.store.update("sub", "s", {"c": 1})
        self.cluster.pump()
        for node in (one, late):
            self.assertEqual(self.successResultOf(node.store.get("sub", "s")), {"a": 1, "b": 1, "c": 1})


class FakeGateway:
    """
    What a L{KeyRegistry} needs of a node.
    """

    def __init__(self, store: KafkaStore, reactor: Any) -> None:
        self.store = store
        self.reactor = reactor


class KeyRegistryTests(KafkaStoreUnitCase):
    """
    API keys follow the Kafka store's changes as they are read, without
    waiting for the registry's refresh.
    """

    def test_issuedAndRevokedElsewhere(self) -> None:
        """
        A key issued on one node is known to the other as soon as its store
        read it; revoked on the other, it is gone from the first at once,
        and its streams are closed there.
        """
        one, two = self.openNode(), self.openNode()
        registries = [KeyRegistry(FakeGateway(node.store, self.cluster.reactor), refresh=3600) for node in (one, two)]
        for registry in registries:
            registry.startService()
        self.cluster.pump()
        closed: List[str] = []
        registries[0].revokedListeners.append(lambda keyId, record: closed.append(keyId))
        issued = registries[0].issue("orders", "client", None)
        self.cluster.pump()
        keyId, key, record = self.successResultOf(issued)
        self.assertEqual(registries[1].records[keyId]["digest"], record["digest"])
        revoked = registries[1].revoke("orders", keyId)
        self.assertNotIn(keyId, registries[1].records)
        self.cluster.pump()
        self.assertTrue(self.successResultOf(revoked))
        self.assertNotIn(keyId, registries[0].records)
        self.assertEqual(closed, [keyId])
        self.assertIsNone(self.successResultOf(one.store.get(KEY_KIND, keyId)))
        for registry in registries:
            registry.stopService()
        self.assertEqual(one.store.watchers[KEY_KIND], [])


class ConfigTests(SynchronousTestCase):
    """
    C{store = kafka:ENDPOINT/TOPIC}.
    """

    @staticmethod
    def ini(store: str) -> str:
        """
        A configuration's text with C{store} as its store and a Kafka
        endpoint, C{events}, that is never reached.
        """
        return str(demoIni(store=store).kafka("events", bootstrap="127.0.0.1:1"))

    def test_parsed(self) -> None:
        """
        The key names the endpoint and the topic.
        """
        config = parseConfig(self.ini("kafka:events/evgate.store_1"), "test.ini")
        spec = config.gateway.options["store"]
        self.assertEqual(spec, StoreSpec("kafka", endpoint="events", topic="evgate.store_1"))
        self.assertEqual(spec.describe(), "kafka:events/evgate.store_1")

    def test_badSpecs(self) -> None:
        """
        A spec without a topic, or with a name Kafka refuses, is a
        configuration error naming the key.
        """
        for bad in ("kafka:events", "kafka:events/", "kafka:/topic", "kafka:events/a b", "kafka:events/..",
                    "kafka:events/" + "t" * 250):
            with self.assertRaises(ConfigError) as caught:
                parseConfig(self.ini(bad), "test.ini")
            self.assertIn("[gateway] store", str(caught.exception))

    def test_endpointMustBeKafka(self) -> None:
        """
        Reading the file checks that the endpoint exists and is a Kafka
        endpoint (so C{--check} and a reload see it too).
        """
        for store, reason in (("kafka:nope/t", "there is no [endpoint:nope]"),
                              ("kafka:local/t", "[endpoint:local] is of type memory")):
            with self.assertRaises(ConfigError) as caught:
                parseConfig(self.ini(store), "test.ini")
            self.assertIn(reason, str(caught.exception))
            self.assertIn("[gateway] store", str(caught.exception))

    def test_buildsOnTheEndpoint(self) -> None:
        """
        The node's store is a L{KafkaStore} on the endpoint's connector,
        which it shares with the APIs.
        """
        config = parseConfig(self.ini("kafka:events/st"), "test.ini")
        gateway = GatewayService(config, FakeReactor())
        self.assertIsInstance(gateway.store, KafkaStore)
        self.assertIs(gateway.store.connector, gateway.connectors["events"])
        self.assertEqual(gateway.store.topic, "st")
        self.assertIsInstance(buildStore(StoreSpec("memory"), FakeReactor()), object)


# ----------------------------------------------------------------- integration


def freshStoreTopic() -> str:
    """
    A topic name nobody used: the store creates it.
    """
    return f"evgate-store-it-{uuid.uuid4().hex[:10]}"


class RealKafkaCase(TestCase):
    """
    Connectors and stores against the real broker, stopped at cleanup.
    """

    timeout = 60

    def setUp(self) -> None:
        requireKafka()
        self.topic = freshStoreTopic()

    def connector(self) -> KafkaConnector:
        """
        A started connector of the test broker.
        """
        from .test_kafka_bridge import parse

        connector = KafkaConnector("kafka", parse({"bootstrap.servers": KAFKA, "linger.ms": "1",
                                                   "request-timeout": "3"}), realReactor)
        connector.startService()
        self.addCleanup(connector.stopService)
        return connector

    def openStore(self, connector: Optional[KafkaConnector] = None) -> Deferred:
        """
        A Deferred of a started store on this test's topic, once it is open.
        """
        store = KafkaStore(connector or self.connector(), self.topic, realReactor)
        store.startService()
        self.addCleanup(store.stopService)
        return store.whenOpen().addCallback(lambda _: store)


class KafkaStoreBehaviourTests(StoreBehaviour, RealKafkaCase):
    """
    The behaviour every store has, on the real broker.
    """

    @inlineCallbacks
    def setUp(self) -> Any:
        RealKafkaCase.setUp(self)
        self.store = yield self.openStore()


class KafkaStoreIntegrationTests(RealKafkaCase):
    """
    What only the Kafka store does, on the real broker.
    """

    @inlineCallbacks
    def test_topicAndMessages(self) -> Any:
        """
        The store creates its topic compacted with one partition; a record
        is a message keyed C{kind/id} with the JSON record as value, and a
        delete is a tombstone (read back with kcat).
        """
        store = yield self.openStore()
        yield store.put("thing", "a", {"v": 1})
        yield store.delete("thing", "a")
        description = admin().list_topics(self.topic, timeout=10).topics[self.topic]
        self.assertEqual(len(description.partitions), 1)
        from confluent_kafka.admin import ConfigResource, ResourceType

        resource = ConfigResource(ResourceType.TOPIC, self.topic)
        configs = admin().describe_configs([resource])[resource].result(10)
        self.assertEqual(configs["cleanup.policy"].value, "compact")
        out = kcat("-C", "-t", self.topic, "-o", "beginning", "-e", "-q", "-Z", "-f", "%k|%s|%h\n").decode()
        lines = [line for line in out.splitlines() if line]
        self.assertEqual(len(lines), 2, out)
        self.assertTrue(lines[0].startswith('thing/a|{"v":1}|evgate-op=put,'), lines[0])
        self.assertTrue(lines[1].startswith("thing/a|NULL|evgate-op=delete,"), lines[1])

    @inlineCallbacks
    def test_threeNodes(self) -> Any:
        """
        Three nodes (each with its own connector): what one writes, the
        others read within a second and tell their watchers; a node started
        later reads everything at start; concurrent increments from all of
        them count.
        """
        one = yield self.openStore()
        two = yield self.openStore()
        seen: List[Tuple[str, Any]] = []
        two.watch("thing", lambda id, record: seen.append((id, record)))
        self.assertTrue((yield one.create("thing", "a", {"n": 0})))
        yield _until(lambda: seen == [("a", {"n": 0})], 1.0, "node two to see the record")
        three = yield self.openStore()
        self.assertEqual((yield three.get("thing", "a")), {"n": 0})
        from twisted.internet.defer import gatherResults

        yield gatherResults([node.update("thing", "a", {}, {"n": 1}) for node in (one, two, three) for _ in range(5)])
        for node in (one, two, three):
            yield _until(lambda node=node: node._record("thing", "a") == {"n": 15}, 2.0, "the increments")

    @inlineCallbacks
    def test_brokerUnreachable(self) -> Any:
        """
        A store whose broker cannot be reached answers calls with a 503
        once C{openWait} passed, rather than hanging.
        """
        from .test_kafka_bridge import parse

        connector = KafkaConnector("kafka", parse({"bootstrap.servers": "127.0.0.1:1", "request-timeout": "1"}),
                                   realReactor)
        connector.startService()
        self.addCleanup(connector.stopService)
        store = KafkaStore(connector, self.topic, realReactor, openWait=1.0)
        store.startService()
        self.addCleanup(store.stopService)
        try:
            yield store.get("thing", "a")
        except EndpointUnavailable as e:
            self.assertIn("not open after 1 s", e.detail)
        else:
            self.fail("the store answered without a broker")


def _until(condition: Callable[[], bool], timeout: float, what: str) -> Deferred:
    """
    A Deferred that fires once C{condition()} holds (checked every 10 ms on
    the reactor), or fails after C{timeout} seconds.
    """
    d: Deferred = Deferred()
    deadline = realReactor.seconds() + timeout

    def check() -> None:
        if condition():
            d.callback(None)
        elif realReactor.seconds() > deadline:
            d.errback(AssertionError(f"timed out after {timeout}s waiting for {what}"))
        else:
            realReactor.callLater(0.01, check)

    check()
    return d


