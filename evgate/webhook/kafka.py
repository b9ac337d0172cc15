"""
Webhook deliveries from Kafka: one consumer group per subscription.

The group is C{<group-prefix>.webhook.<api>.<subscription id>} (with the
default prefix, C{evgate.webhook.orders.sub_...}), read through the Kafka
connector's group mode (L{evgate.connectors.kafka.KafkaConnector.groupPoll},
whose L{evgate.connectors.kafka.GroupReader} owns the consumer on a thread
of its own).  Every gateway node that knows the subscription joins the
group, so Kafka decides who delivers what: each partition is read by one
node at a time, and a node that dies hands its partitions to the others.

Where delivery resumes: Kafka's committed offsets of the group.  They are
committed after every batch whose messages are all settled (delivered or
dead-lettered), and the store's position is written after every message
(for the admin API).  When the group has no committed offsets (a new
subscription, or Kafka expired them after C{offsets.retention.minutes} of
the group being empty) the store's position I{seeds} the group: its
offsets are committed before the node joins.  So the truth is Kafka's for a
running subscription and the store's for one Kafka forgot.

After a crash, the messages of the batch under way are delivered again
(at-least-once): at most one batch (L{BATCH_LIMIT} messages) per partition
owner.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from evgate.connectors.kafka import GroupBatch, consumerSettings
from evgate.hub import Event
from evgate.message import Cursor
from evgate.threads import deferToOwnThread
from evgate.webhook.feeds import eventsOf, offerFiltered

# Messages taken from the group per poll: a crash delivers at most this many
# again; more would cut the per-batch cost of the poll and the commit.
BATCH_LIMIT = 100

# How long one group poll waits for a message.
POLL_TIMEOUT = 5.0


def webhookGroup(api: str, subscription: str) -> str:
    """
    The evgate group name of a subscription (the connector adds its
    C{group-prefix}).
    """
    return f"webhook.{api}.{subscription}"


def seedGroup(connector: Any, topic: str, groupId: str, offsets: Mapping[int, int]) -> Deferred:
    """
    Commit C{offsets} (partition to next offset) as the position of the
    consumer group C{groupId}, unless the group has a position already, on a
    thread of its own (a short-lived consumer that never joins the group).

    @return: a Deferred firing on the reactor with C{"seeded"} or C{"kept"}.
    """
    timeout = connector.options["request-timeout"]
    clients = connector.clients

    def work() -> str:
        config: Dict[str, Any] = consumerSettings(connector.options["librdkafka"], groupId, "earliest")
        # librdkafka's log lines and errors go where the connector's go,
        # never straight to standard error.
        config["logger"] = connector.librdkafkaLog
        config["error_cb"] = connector.onClientError
        consumer = clients.consumer(config)
        try:
            wanted = [clients.topicPartition(topic, p) for p in sorted(offsets)]
            committed = consumer.committed(wanted, timeout=timeout)
            if any(tp.offset >= 0 for tp in committed):
                return "kept"
            consumer.commit(offsets=[clients.topicPartition(topic, p, o) for p, o in sorted(offsets.items())],
                            asynchronous=False)
            return "seeded"
        finally:
            consumer.close()

    return deferToOwnThread(connector.reactor, work, f"evgate-kafka-seed-{groupId}", connector.startThread)


class KafkaGroupFeed:
    """
    A deliverer's consumer group: polls a batch, offers what passes the
    filter, commits once the deliverer settled the batch, polls again.
    """

    log = Logger()

    def __init__(self, deliverer: Any, connector: Any, topic: str, api: str, filter: Any,
                 limit: int = BATCH_LIMIT, pollTimeout: float = POLL_TIMEOUT, view: Any = None) -> None:
        self.deliverer = deliverer
        self.connector = connector
        self.reactor = connector.reactor
        self.topic = topic
        self.group = webhookGroup(api, deliverer.id)
        self.filter = filter
        # The API's delivery pipeline (evgate.pipeline), or None.
        self.view = view
        # A batch waits for the API's pipeline to prepare (evgate.pipeline).
        self.preparing = False
        self.limit = limit
        self.pollTimeout = pollTimeout
        self.head = Cursor()
        self.batch: Any = None
        self.polling = False
        self.closed = False
        self.failures = 0
        self._retryCall: Any = None

    @property
    def groupId(self) -> str:
        """
        The Kafka consumer group's id.
        """
        return str(self.connector.groupId(self.group))

    def start(self, cursor: Optional[Cursor]) -> None:
        """
        Seed the group from C{cursor} if it has no position, then poll.
        """
        if cursor is not None:
            self.head = cursor
            self.deliverer.began(cursor)
        if cursor is not None and cursor.offsets:
            self._seed(cursor.asDict())
        else:
            self._poll()

    def _seed(self, offsets: Dict[int, int]) -> None:
        d = seedGroup(self.connector, self.topic, self.groupId, offsets)

        def seeded(result: str) -> None:
            if result == "seeded":
                self.log.info("webhook: consumer group {group} starts at {offsets}", group=self.groupId,
                              offsets=offsets)
            if self.failures:
                self.failures = 0
                self.deliverer.readRecovered()
            self._poll()

        def notSeeded(failure: Failure) -> None:
            self._later(f"cannot set the start of consumer group {self.groupId}: {failure.getErrorMessage()}",
                        lambda: self._seed(offsets))

        d.addCallbacks(seeded, notSeeded)

    def _later(self, detail: str, again: Any) -> None:
        if self.closed:
            return
        self.failures += 1
        self.deliverer.readFailed(detail)
        delay = min(30.0, 0.5 * 2 ** min(self.failures, 6))
        self._retryCall = self.reactor.callLater(delay, again)

    def _poll(self) -> None:
        self._retryCall = None
        if self.closed or self.polling or self.batch is not None:
            return
        self.polling = True
        d = self.connector.groupPoll(self.topic, self.group, self.limit, self.pollTimeout, start="earliest")
        d.addCallbacks(self._got, self._pollFailed)
        d.addErrback(lambda f: self.log.failure("webhook: handling a poll of {group} failed", f,
                                                group=self.groupId))

    def _got(self, batch: Any) -> None:
        self.polling = False
        if self.closed:
            batch.putBack()
            return
        if self.failures:
            self.failures = 0
            self.deliverer.readRecovered()
        if not batch.messages:
            batch.commit()
            self._poll()
            return
        self.batch = batch
        events = eventsOf(self.head, batch.messages)
        self.head = events[-1].cursor
        self._offer(events)

    def _offer(self, events: List[Event]) -> None:
        if self.closed:
            return
        if self.view is not None:
            wait = self.view.ready(events)
            if wait is not None:
                # A decoder fetching a schema: the batch is offered once it
                # can be decoded, and is not committed before (progress()
                # waits while preparing).
                self.preparing = True
                wait.addCallback(self._prepared, events)
                return
        offerFiltered(self.deliverer, events, self.filter, self.view)
        self.progress()

    def _prepared(self, ignored: Any, events: List[Event]) -> None:
        self.preparing = False
        self._offer(events)

    def _pollFailed(self, failure: Failure) -> None:
        self.polling = False
        self._later(f"reading consumer group {self.groupId} failed: {failure.getErrorMessage()}", self._poll)

    def progress(self) -> None:
        """
        Commit the batch once the deliverer settled all of it, and poll the
        next.
        """
        batch = self.batch
        if batch is None or self.closed or self.preparing or self.deliverer.backlog() > 0:
            return
        self.batch = None
        d = batch.commit()
        # A failed commit is logged by the reader; the group reads those
        # messages again, which at-least-once allows.
        d.addErrback(lambda f: None)
        d.addBoth(lambda _: self._poll())

    def close(self) -> None:
        """
        Stop polling.  Of the batch under way, commit what was settled and
        give the rest back to the group's reader, so that a resumed
        subscription goes on where this one stopped.
        """
        if self.closed:
            return
        self.closed = True
        if self._retryCall is not None and self._retryCall.active():
            self._retryCall.cancel()
        self._retryCall = None
        batch, self.batch = self.batch, None
        if batch is not None:
            self._commitSettled(batch)
        # Leave the group now: a paused or deleted subscription is no
        # member, so Kafka gives its partitions to the nodes still
        # delivering it at once, and a replay finds the group empty
        # (evgate.webhook.groupreplay).
        self.connector.leaveGroup(self.topic, self.group).addErrback(
            lambda f: self.log.failure("webhook: leaving {group} failed", f, group=self.groupId))

    def _commitSettled(self, batch: Any) -> None:
        position = self.deliverer.position
        settled = [m for m in batch.messages
                   if position is not None and (position.get(m.partition) or 0) > m.offset]
        rest = [m for m in batch.messages if not any(m is s for s in settled)]
        if rest and batch.reader is not None:
            # Straight to the reader's thread, without releasing the poll
            # turn: the commit below releases it, once.
            batch.reader.send("putBack", rest)
        batch.ended = True
        d = GroupBatch(batch.reader, settled, batch.first, batch.cursor).commit()
        d.addErrback(lambda f: None)
