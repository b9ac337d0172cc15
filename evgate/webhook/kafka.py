"""
Webhook deliveries from Kafka: one consumer group per subscription.

The group is C{<group-prefix>.webhook.<api>.<subscription id>} (with the
default prefix, C{evgate.webhook.orders.sub_...}), read through the Kafka
connector's group mode (L{evgate.connectors.kafka.KafkaConnector.groupPoll},
whose L{evgate.connectors.kafka.GroupReader} owns the consumer on a thread
of its own).  Every gateway node that knows the subscription joins the
group, so Kafka decides who delivers what: each partition is read by one
node at a time, and a node that dies hands its partitions to the others.

Where delivery resumes: Kafka's committed offsets of the group.  They
follow the subscription's position, the settled prefix of each partition
(delivered or dead-lettered messages, see L{evgate.webhook.window}), at
most every L{COMMIT_INTERVAL} seconds, and the store's position is written
at most every L{evgate.webhook.writes.WRITE_INTERVAL} seconds (for the
admin API).  When the group has no committed offsets (a new
subscription, or Kafka expired them after C{offsets.retention.minutes} of
the group being empty) the store's position I{seeds} the group: its
offsets are committed before the node joins.  So the truth is Kafka's for a
running subscription and the store's for one Kafka forgot.

Reading ahead: the feed takes the next batch while the deliverer still
delivers the last one, as long as fewer than C{max(BATCH_LIMIT,
max-in-flight)} messages are unsettled, keeping the group's poll turn
between batches (L{evgate.connectors.kafka.GroupBatch.takeNext}).  Waiting
for a batch to settle and be committed before polling the next would
drain the delivery window at every batch boundary: with a receiver that
takes 10 ms and a window of 16, that bubble, a commit and a poll round
trip per batch, cost a third of the throughput.

After a crash, the messages that were unsettled or settled since the last
commit are delivered again (at-least-once): at most two batches, or a
batch and a window, per partition owner, plus L{COMMIT_INTERVAL} of
deliveries.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Deque, Dict, List, Mapping, Optional, Set

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from evgate.connectors.kafka import GroupBatch, consumerSettings
from evgate.hub import Event
from evgate.message import Cursor, Message
from evgate.threads import deferToOwnThread
from evgate.webhook.feeds import eventsOf, offerFiltered

# Messages taken from the group per poll: a crash delivers at most this many
# again; more would cut the per-batch cost of the poll and the commit.
BATCH_LIMIT = 100

# How long one group poll waits for a message.
POLL_TIMEOUT = 5.0

# How often, at most, the group's committed offsets follow the settled
# prefix (seconds): each commit is a broker round trip on the reader's
# thread, between its takes.
COMMIT_INTERVAL = 0.1


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
    A deliverer's consumer group: takes batches, offers what passes the
    filter, takes the next batch while the deliverer still delivers this
    one, and commits the group's offsets as the settled prefix moves.

    The feed keeps the group's poll turn from batch to batch (the group is
    this subscription's alone), so that the reader never leaves the group
    as idle while deliveries wait for a receiver; L{close} gives it back.
    """

    log = Logger()

    def __init__(self, deliverer: Any, connector: Any, topic: str, api: str, filter: Any,
                 limit: int = BATCH_LIMIT, pollTimeout: float = POLL_TIMEOUT, view: Any = None,
                 window: int = 1, commitInterval: float = COMMIT_INTERVAL) -> None:
        """
        @param window: the subscription's C{max-in-flight}: the feed reads
            ahead while fewer than C{max(limit, window)} messages are
            unsettled.
        """
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
        self.ahead = max(limit, window)
        self.pollTimeout = pollTimeout
        self.commitInterval = commitInterval
        self.head = Cursor()
        # The last batch taken: it holds the group's poll turn.
        self.turn: Optional[GroupBatch] = None
        # The group reader the messages under way came from; commits go to it.
        self.reader: Any = None
        # Batches handed to the deliverer that its position has not passed
        # yet, in stream order: what close gives back to the reader.
        self.held: Deque[List[Message]] = deque()
        self.partitions: Set[int] = set()
        self.committed: Dict[int, int] = {}
        self.committing = False
        # What close gives back once the take under way has come back.
        self.givingBack: List[Message] = []
        self.seeding = False
        self.polling = False
        self.closed = False
        self.failures = 0
        self._retryCall: Any = None
        self._commitCall: Any = None

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
        self._retryCall = None
        self.seeding = True
        d = seedGroup(self.connector, self.topic, self.groupId, offsets)

        def seeded(result: str) -> None:
            self.seeding = False
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
        if self.closed or self.polling:
            return
        self.polling = True
        turn, self.turn = self.turn, None
        if turn is not None and turn.reader is not None:
            d = turn.takeNext(self.limit, self.pollTimeout)
        else:
            d = self.connector.groupPoll(self.topic, self.group, self.limit, self.pollTimeout, start="earliest")
        d.addCallbacks(self._got, self._pollFailed)
        d.addErrback(lambda f: self.log.failure("webhook: handling a poll of {group} failed", f,
                                                group=self.groupId))

    def _got(self, batch: Any) -> None:
        self.polling = False
        if self.closed:
            self._giveBack(batch)
            return
        if self.failures:
            self.failures = 0
            self.deliverer.readRecovered()
        self.turn = batch
        if batch.reader is not None and batch.reader is not self.reader:
            # A new member of the group (the last one closed): what the
            # old one handed over is read again from the committed offsets
            # by whoever owns those partitions now.
            self.reader = batch.reader
            self.held.clear()
            self.committing = False
        if batch.messages:
            self.held.append(batch.messages)
            for message in batch.messages:
                self.partitions.add(message.partition)
            events = eventsOf(self.head, batch.messages)
            self.head = events[-1].cursor
            self._offer(events)
        self.progress()

    def _offer(self, events: List[Event]) -> None:
        if self.closed:
            return
        if self.view is not None:
            wait = self.view.ready(events)
            if wait is not None:
                # A decoder fetching a schema: the batch is offered once it
                # can be decoded, and nothing after it is taken before
                # (progress() waits while preparing), so order holds and no
                # commit passes it.
                self.preparing = True
                wait.addCallback(self._prepared, events)
                return
        offerFiltered(self.deliverer, events, self.filter, self.view)

    def _prepared(self, ignored: Any, events: List[Event]) -> None:
        self.preparing = False
        self._offer(events)
        self.progress()

    def _pollFailed(self, failure: Failure) -> None:
        # The turn is released with the failure.
        self.polling = False
        if self.closed:
            rest, self.givingBack = self.givingBack, []
            if rest and self.reader is not None and not self.reader.stopped:
                self.reader.send("putBack", rest)
            return
        self._later(f"reading consumer group {self.groupId} failed: {failure.getErrorMessage()}", self._poll)

    def progress(self) -> None:
        """
        The deliverer settled messages (or was handed some): commit how far
        its position moved (soon), and take the next batch while fewer than
        C{ahead} messages are unsettled.
        """
        if self.closed or self.seeding or self.preparing:
            return
        self._scheduleCommit()
        if not self.polling and self._retryCall is None and self.deliverer.backlog() < self.ahead:
            self._poll()

    # -- commits

    def _toCommit(self) -> Dict[int, int]:
        """
        The partitions whose position moved past what was committed.
        """
        position = self.deliverer.position
        if position is None:
            return {}
        offsets = {}
        for partition in self.partitions:
            offset = position.get(partition)
            if offset is not None and offset > self.committed.get(partition, -1):
                offsets[partition] = offset
        return offsets

    def _scheduleCommit(self) -> None:
        if self._commitCall is not None or self.committing or self.reader is None:
            return
        if self._toCommit():
            self._commitCall = self.reactor.callLater(self.commitInterval, self._commit)

    def _commit(self) -> None:
        self._commitCall = None
        reader = self.reader
        if self.closed or reader is None or reader.stopped:
            return
        self._prune()
        offsets = self._toCommit()
        if not offsets:
            return
        self.committing = True

        def done(_: Any) -> None:
            # A refused commit was logged by the reader; those messages are
            # delivered again after a crash, which at-least-once allows.
            self.committed.update(offsets)
            if reader is self.reader:
                self.committing = False
                if not self.closed:
                    self._scheduleCommit()

        reader.commitPositions(offsets).addCallback(done)

    def _passed(self, message: Message) -> bool:
        position = self.deliverer.position
        offset = position.get(message.partition) if position is not None else None
        return offset is not None and offset > message.offset

    def _prune(self) -> None:
        held = self.held
        while held and all(self._passed(m) for m in held[0]):
            held.popleft()

    # -- the end

    def close(self) -> None:
        """
        Stop reading.  Commit how far the position got, and give the
        messages it has not passed back to the group's reader (in stream
        order, with those of a take under way), so that a resumed
        subscription goes on where this one stopped; then give back the
        poll turn.
        """
        if self.closed:
            return
        self.closed = True
        for call in (self._retryCall, self._commitCall):
            if call is not None and call.active():
                call.cancel()
        self._retryCall = self._commitCall = None
        reader = self.reader
        rest = [m for batch in self.held for m in batch if not self._passed(m)]
        self.held.clear()
        if reader is not None and not reader.stopped:
            position = self.deliverer.position
            offsets = {p: o for p in self.partitions
                       if position is not None and (o := position.get(p)) is not None}
            if offsets:
                reader.commitPositions(offsets)
        if self.polling:
            self.givingBack = rest
        else:
            turn, self.turn = self.turn, None
            if turn is not None and turn.reader is not None:
                turn.reader.putBack(rest)
            elif rest and reader is not None and not reader.stopped:
                reader.send("putBack", rest)
        # Leave the group now (after the commit and the messages given back,
        # which the reader runs first): a paused or deleted subscription is
        # no member, so Kafka gives its partitions to the nodes still
        # delivering it at once, and a replay finds the group empty
        # (evgate.webhook.groupreplay).
        self.connector.leaveGroup(self.topic, self.group).addErrback(
            lambda f: self.log.failure("webhook: leaving {group} failed", f, group=self.groupId))

    def _giveBack(self, batch: Any) -> None:
        # A take came back after close: it and what close kept back go back
        # to the reader together, in stream order, with the turn.
        rest, self.givingBack = self.givingBack, []
        if batch.reader is None:
            if rest and self.reader is not None and not self.reader.stopped:
                self.reader.send("putBack", rest)
            return
        if batch.reader is not self.reader:
            rest = []
        batch.ended = True
        batch.reader.putBack(rest + batch.messages)
