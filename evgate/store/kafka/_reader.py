"""
The owner thread of the store's consumer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

from twisted.python.failure import Failure

from evgate.connectors.kafka import BatchReader, _confluent, codes, consumerSettings, kafkaError
from evgate.errors import EndpointUnavailable, Problem
from evgate.store.kafka._records import BATCHES_IN_FLIGHT, READ_BATCH

if TYPE_CHECKING:
    from evgate.store.kafka._store import KafkaStore

def _admin() -> Any:
    # Lazy, like evgate.connectors.kafka._confluent: a gateway without a
    # Kafka store should not pay for loading librdkafka.  And
    # confluent_kafka does not import its admin package itself.
    import confluent_kafka.admin

    return confluent_kafka.admin


class StoreReader(BatchReader):
    """
    The owner thread of the store's consumer: makes sure the topic exists
    (one partition, compacted), reads it from C{startOffset} and hands the
    messages to the store on the reactor, in batches, with the offset to
    read next (which a partition-EOF event moves past offsets that
    compaction emptied).

    Reactor-side calls of the store: C{readerResolved(start, end)} once
    the partition is assigned (C{end}: the end offset at that moment),
    C{readerBatch(reader, messages, nextOffset)} (which must give the
    batch's credit back with L{done}) and C{readerFailed(reason)}.
    """

    kind = "store"

    def __init__(self, store: "KafkaStore", startOffset: int) -> None:
        connector = store.connector
        config = consumerSettings(connector.options["librdkafka"])
        # EOF events say where the end is even when the last offsets hold
        # no message (compaction removed them).
        config["enable.partition.eof"] = "true"
        config["auto.offset.reset"] = "earliest"
        super().__init__(connector, store.topic, config, BATCHES_IN_FLIGHT)
        self.batchSize = READ_BATCH
        self.store = store
        self.startOffset = startOffset
        # A topic that disappears after this node read records from it is
        # not created again behind the node's back: that would lose them.
        self.mayCreate = startOffset == 0
        # owner-thread state
        self.admin: Any = None
        self.resolved = False
        self.nextOffset = startOffset

    # the reactor side

    def done(self) -> None:
        """
        The store applied a batch: its credit goes back to the thread.
        """
        self.credits.release()

    # the owner thread

    def crashed(self, failure: Failure) -> None:
        super().crashed(failure)
        self.callOnReactor(self.store.readerFailed, failure.getErrorMessage())

    def finish(self) -> None:
        self.admin = None
        super().finish()

    def step(self) -> None:
        if self.backingOff():
            return
        if not self.resolved:
            self.resolve()
        elif not self.sendWaiting():
            self.read()

    def makeAdmin(self) -> Any:
        """
        The AdminClient of the endpoint (made once, on this thread).
        """
        if self.admin is None:
            config: Dict[str, Any] = dict(self.connector.options["librdkafka"])
            config["logger"] = self.connector.librdkafkaLog
            config["error_cb"] = self.connector.onClientError
            make = getattr(self.connector.clients, "admin", None)
            if make is None:
                make = _admin().AdminClient
            self.admin = make(config)
        return self.admin

    def resolve(self) -> None:
        """
        Find the topic (create it when missing), check it, assign its
        partition at the start offset and tell the store where the end is.
        """
        try:
            partitions = self.partitionsOf()
            if partitions is None and not self.mayCreate:
                raise EndpointUnavailable(f"the store's topic {self.topic} is gone (deleted?); this node goes on "
                                          "with the records it has, read-only")
            if partitions is None:
                self.createTopic()
                return
            if partitions != [0]:
                raise EndpointUnavailable(
                    f"the store's topic {self.topic} has {len(partitions)} partitions; it needs exactly one, so "
                    "that every node applies the records in one order (use another topic)")
            self.checkCompacted()
            low, high = self.watermarks(0)
        except Problem:
            raise
        except Exception as e:
            error = kafkaError(e)
            if error is None:
                raise
            if error.code() in codes().NOT_AUTHORIZED:
                raise EndpointUnavailable(f"Kafka refuses to let the gateway use the store's topic {self.topic}: "
                                          f"{error.str()}") from None
            self.backOff(e)
            return
        self.brokerAnswered()
        if high < self.startOffset:
            raise EndpointUnavailable(f"the store's topic {self.topic} ends at offset {high}, before offset "
                                      f"{self.startOffset} that this node read: it was created again; restart "
                                      "the node to read it afresh")
        start = max(self.startOffset, low)
        self.consumer.assign([self.tp(0, start)])
        self.nextOffset = start
        self.resolved = True
        self.callOnReactor(self.store.readerResolved, start, high)

    def createTopic(self) -> None:
        """
        Create the topic: one partition, compacted, the broker's default
        replication.  Another node creating it at the same moment is
        fine.
        """
        admin = _admin()
        topic = admin.NewTopic(self.topic, num_partitions=1, replication_factor=-1,
                               config={"cleanup.policy": "compact"})
        future = self.makeAdmin().create_topics([topic], request_timeout=self.requestTimeout)[self.topic]
        try:
            future.result(self.requestTimeout + 1)
        except Exception as e:
            error = kafkaError(e)
            if error is None or error.code() != _confluent().KafkaError.TOPIC_ALREADY_EXISTS:
                raise
        else:
            self.callOnReactor(self.store.log.info, "store: created the compacted topic {topic}", topic=self.topic)
        # The broker's metadata may lag behind the creation for a moment.
        self.retryAt = self.now() + 0.2

    def checkCompacted(self) -> None:
        """
        Refuse a topic whose old records Kafka would delete by age.
        """
        admin = _admin()
        resource = admin.ConfigResource(admin.ResourceType.TOPIC, self.topic)
        futures = self.makeAdmin().describe_configs([resource], request_timeout=self.requestTimeout)
        entries = list(futures.values())[0].result(self.requestTimeout + 1)
        entry = entries.get("cleanup.policy")
        policy = str(getattr(entry, "value", "") or "")
        if "compact" not in policy.split(",") or "delete" in policy.split(","):
            raise EndpointUnavailable(
                f"the store's topic {self.topic} has cleanup.policy={policy}: Kafka would delete records by age; "
                "set cleanup.policy=compact on it (kafka-configs --alter) or use another topic")

    def take(self, record: Any) -> Tuple[int, Optional[bytes], Optional[bytes], Any]:
        """
        A record as C{(offset, key, value, headers)}; the offset to read
        next moves past it.
        """
        self.nextOffset = record.offset() + 1
        return (record.offset(), record.key(), record.value(), record.headers())

    def reachedEnd(self, record: Any) -> bool:
        """
        The end of the partition: the offset to read next moves there (past
        offsets that compaction emptied), and the store hears it even with
        no records, so that it knows it caught up.
        """
        if record.offset() > self.nextOffset:
            self.nextOffset = record.offset()
        return True

    def sendBatch(self) -> None:
        """
        Hand the waiting batch to the store (its credit is taken).
        """
        batch, self.batch = self.batch, None
        self.callOnReactor(self.store.readerBatch, self, batch, self.nextOffset)

    def refused(self, error: Any) -> Problem:
        return EndpointUnavailable(f"Kafka refuses to let the gateway read the store's topic {self.topic}: "
                                   f"{error.str()}")

    def ownRecordError(self, record: Any, error: Any, code: int) -> bool:
        """
        The topic being gone ends the reader: this node goes on with the
        records it has.
        """
        if code in codes().UNKNOWN_TOPIC:
            raise EndpointUnavailable(f"the store's topic {self.topic} is gone")
        return False

    def warnRecordError(self, error: Any) -> None:
        self.callOnReactor(self.log.warn, "store: reading {topic}: {error}", topic=self.topic, error=error.str())
