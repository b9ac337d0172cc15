"""
The upstream subscription of a Kafka topic: C{assign} and explicit offsets,
no consumer group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Set, Tuple, Union

from twisted.python.failure import Failure
from zope.interface import implementer

from evgate.connectors.kafka._client import codes, kafkaError, toMessage
from evgate.connectors.kafka._consumer import BatchReader
from evgate.connectors.kafka._options import consumerSettings
from evgate.errors import EndpointUnavailable, Problem
from evgate.interfaces import IHoldableSubscription, IUpstreamSink
from evgate.message import Cursor, Message

if TYPE_CHECKING:
    from evgate.connectors.kafka._connector import KafkaConnector

Start = Union[str, Cursor]


@implementer(IHoldableSubscription)
class AssignedReader(BatchReader):
    """
    An upstream subscription: reads one topic with C{assign} and explicit
    offsets into an L{IUpstreamSink}.

    Start offsets: C{"latest"} is every partition's high watermark,
    C{"earliest"} its low watermark, a cursor its own offset per partition.
    A partition the cursor does not name (it did not exist when the cursor
    was made) and a partition created later start at the low watermark.  A
    cursor offset below the low watermark (retention deleted the records)
    or above the high watermark (the topic was recreated) is reported to the
    sink as a gap, and reading goes on from the watermark.
    """

    # Metadata is read again this often to find new partitions (or the
    # topic, while it does not exist).
    metadataInterval = 30.0
    missingTopicInterval = 1.0
    # librdkafka's cached watermarks are read at most this often (seconds).
    headsInterval = 1.0

    def __init__(self, connector: "KafkaConnector", topic: str, start: Start, sink: IUpstreamSink) -> None:
        super().__init__(connector, topic, consumerSettings(connector.options["librdkafka"]),
                         connector.options["batches-in-flight"])
        self.startAt = start
        # Any: mypy cannot call through a zope Interface annotation.
        self.sink: Any = sink
        # owner-thread state
        self.offsets: Dict[int, int] = {}
        self.resolved = False
        self.startedSent = False
        self.fetchPaused = False
        self.reposition: Set[int] = set()
        self.nextMetadata = 0.0
        self.nextHeads = 0.0
        # reactor-side state
        self.paused = False
        self.holding = False
        self.closed = False
        self.held: List[Tuple[Any, ...]] = []

    # IUpstreamSubscription, on the reactor

    def pause(self) -> None:
        if not self.paused and not self.closed:
            self.paused = True
            self.send("pause")

    def hold(self) -> None:
        """
        Stop handing batches to the sink without pausing the consumer:
        they wait here, the owner thread stops at its credit, and
        librdkafka keeps what it prefetched.  (Pausing a partition throws
        its prefetched records away, to be fetched again on resume.)
        L{resume} ends it.
        """
        if not self.paused and not self.closed:
            self.paused = True
            self.holding = True

    def drainHeld(self) -> List[Message]:
        """
        Take the batches held (see L{hold}) up to the first gap, in order,
        as one list; their credits go back to the owner thread.
        """
        messages: List[Message] = []
        while self.held and self.held[0][0] == "deliver":
            messages.extend(self.held.pop(0)[1])
            self.credits.release()
        return messages

    def resume(self) -> None:
        if not self.paused or self.closed:
            return
        self.paused = False
        holding, self.holding = self.holding, False
        # What arrived while paused goes first, in order; the sink may pause
        # again on the way.
        while self.held and not self.paused and not self.closed:
            self.dispatch(self.held.pop(0))
        if not self.paused and not self.closed and not holding:
            self.send("resume")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        held, self.held = self.held, []
        for event in held:
            if event[0] == "deliver":
                self.credits.release()
        self.stop()

    # events arriving on the reactor

    def onReactor(self, *event: Any) -> None:
        """
        An event from the owner thread: C{("started", cursor)},
        C{("gap", cursor, reason)}, C{("deliver", messages)},
        C{("failed", failure)}, or where the partitions end: C{("heads",
        heads)} from a broker's answer, C{("seen", heads)} from reading.
        """
        kind = event[0]
        if kind == "heads" or kind == "seen":
            # About the topic, not this subscription: noted even while
            # paused or closed.
            heads = self.connector.heads
            (heads.fetched if kind == "heads" else heads.seen)(self.topic, event[1])
            return
        if self.closed:
            if kind == "deliver":
                self.credits.release()
            return
        if kind == "started":
            self.sink.started(event[1])
        elif kind == "failed":
            self.closed = True
            self.held = []
            self.stop()
            self.sink.failed(event[1])
        elif self.paused or self.held:
            self.held.append(event)
        else:
            self.dispatch(event)

    def dispatch(self, event: Tuple[Any, ...]) -> None:
        """
        Hand a gap or a batch to the sink; a batch's credit goes back to the
        owner thread once the sink has it.
        """
        try:
            if event[0] == "deliver":
                self.sink.deliver(event[1])
            else:
                self.sink.gap(event[1], event[2])
        except Exception:
            self.log.failure("Kafka endpoint {endpoint}: the sink of {topic} failed",
                             endpoint=self.connector.name, topic=self.topic)
        finally:
            if event[0] == "deliver":
                self.credits.release()

    # the owner thread

    def crashed(self, failure: Failure) -> None:
        super().crashed(failure)
        self.callOnReactor(self.onReactor, "failed", failure)

    def do_pause(self) -> None:
        """
        Command: stop fetching.
        """
        self.fetchPaused = True
        if self.offsets:
            self.consumer.pause([self.tp(p) for p in self.offsets])

    def do_resume(self) -> None:
        """
        Command: fetch again, from the offsets already handed over.
        """
        self.fetchPaused = False
        if self.offsets:
            self.consumer.resume([self.tp(p) for p in self.offsets])

    def step(self) -> None:
        if self.backingOff():
            return
        if not self.resolved:
            self.resolve()
        elif self.sendWaiting():
            pass
        elif self.reposition:
            self.repositionPartitions()
        elif self.fetchPaused:
            self.wait(self.pollTimeout)
        else:
            if self.now() >= self.nextMetadata:
                self.findNewPartitions()
            self.read()

    def resolve(self) -> None:
        """
        Find the partitions and their start offsets, assign them, and tell
        the sink where the subscription starts.  A broker that cannot be
        asked is asked again, with a growing delay; a cursor start is
        reported to the sink at once then, so that clients get answers
        while the broker is away.
        """
        try:
            partitions = self.partitionsOf()
            marks = {p: self.watermarks(p) for p in partitions or ()}
        except Exception as e:
            error = kafkaError(e)
            if error is None:
                raise
            if error.code() in codes().NOT_AUTHORIZED:
                raise EndpointUnavailable(f"Kafka refuses to let the gateway read topic {self.topic}: "
                                          f"{error.str()}", retryAfter=self.connector.retryAfter) from None
            refusal = self.connector.refusal
            if refusal is not None and not self.startedSent:
                # Not a broker that is away and comes back: one that will
                # not let the gateway in.  The subscriber hears it now.
                raise EndpointUnavailable(f"Kafka endpoint {self.connector.name}: the broker refuses the gateway: "
                                          f"{refusal}; cannot read", retryAfter=self.connector.retryAfter) from None
            self.backOff(e)
            if isinstance(self.startAt, Cursor) and not self.startedSent:
                self.startedSent = True
                self.callOnReactor(self.onReactor, "started", self.startAt)
            return
        self.brokerAnswered()
        offsets, gaps = self.plan(marks, initial=True)
        if offsets:
            self.consumer.assign([self.tp(p, o) for p, o in sorted(offsets.items())])
            if self.fetchPaused:
                self.consumer.pause([self.tp(p) for p in offsets])
        self.offsets = offsets
        self.resolved = True
        self.nextMetadata = self.now() + (self.metadataInterval if partitions is not None
                                          else self.missingTopicInterval)
        cursor = Cursor.fromMapping(offsets)
        # Before "started": a non-blocking GET asks for the heads when it
        # learns where its read starts, and these are the ones to catch up to.
        self.callOnReactor(self.onReactor, "heads", {p: high for p, (_, high) in marks.items()})
        if not self.startedSent:
            self.startedSent = True
            self.callOnReactor(self.onReactor, "started", cursor)
        if gaps:
            self.callOnReactor(self.onReactor, "gap", cursor, "; ".join(gaps))

    def plan(self, marks: Mapping[int, Tuple[int, int]], initial: bool) -> Tuple[Dict[int, int], List[str]]:
        """
        The start offset of each partition in C{marks} (partition to low and
        high watermark), and the gaps to report.
        """
        start = self.startAt
        offsets: Dict[int, int] = {}
        gaps: List[str] = []
        foreign = isinstance(start, Cursor) and start.epoch != 0
        if foreign and initial:
            gaps.append("the cursor was not made by a Kafka endpoint; reading from the earliest retained message")
        for partition, (low, high) in sorted(marks.items()):
            if isinstance(start, Cursor) and not foreign:
                wanted = start.get(partition)
                if wanted is None:
                    offsets[partition] = low
                elif wanted < low:
                    offsets[partition] = low
                    gaps.append(f"partition {partition}: offsets {wanted} to {low - 1} were deleted by retention")
                elif wanted > high:
                    offsets[partition] = high
                    gaps.append(f"partition {partition}: the cursor ({wanted}) is past the end ({high}); "
                                "the topic was recreated or lost messages")
                else:
                    offsets[partition] = wanted
            elif initial and start == "latest":
                offsets[partition] = high
            else:
                offsets[partition] = low
        return offsets, gaps

    def findNewPartitions(self) -> None:
        """
        Assign partitions created since the last look, from their start.
        """
        try:
            partitions = self.partitionsOf()
            new = [p for p in partitions or () if p not in self.offsets]
            marks = {p: self.watermarks(p) for p in new}
        except Exception as e:
            if kafkaError(e) is None:
                raise
            self.backOff(e)
            return
        self.brokerAnswered()
        self.nextMetadata = self.now() + (self.metadataInterval if partitions else self.missingTopicInterval)
        if not marks:
            return
        self.callOnReactor(self.onReactor, "heads", {p: high for p, (_, high) in marks.items()})
        offsets, gaps = self.plan(marks, initial=False)
        self.consumer.incremental_assign([self.tp(p, o) for p, o in sorted(offsets.items())])
        if self.fetchPaused:
            self.consumer.pause([self.tp(p) for p in offsets])
        self.offsets.update(offsets)
        if gaps:
            self.callOnReactor(self.onReactor, "gap", Cursor.fromMapping(self.offsets), "; ".join(gaps))

    def take(self, record: Any) -> Optional[Message]:
        """
        A record as a message, unless it is from before a re-assignment or
        of a partition given up (handed over already, or not ours).
        """
        partition, offset = record.partition(), record.offset()
        expected = self.offsets.get(partition)
        if expected is None or offset < expected or partition in self.reposition:
            return None
        self.offsets[partition] = offset + 1
        return toMessage(record, self.topic)

    def handOver(self, batch: List[Message]) -> None:
        self.reportHeads(batch)
        super().handOver(batch)

    def reportHeads(self, batch: List[Message]) -> None:
        """
        Tell the connector how far the partitions of C{batch} reach: past
        its records at least, and as far as librdkafka's cached high
        watermarks (from the fetch responses, no request) say, at most
        every C{headsInterval} seconds.
        """
        heads: Dict[int, int] = {}
        for message in batch:
            if heads.get(message.partition, -1) <= message.offset:
                heads[message.partition] = message.offset + 1
        now = self.now()
        if now >= self.nextHeads:
            self.nextHeads = now + self.headsInterval
            for partition in self.offsets:
                try:
                    # cached: what the last fetch response said, no request.
                    marks = self.consumer.get_watermark_offsets(self.tp(partition), timeout=self.requestTimeout,
                                                                cached=True)
                except Exception as e:
                    if kafkaError(e) is None:
                        raise
                    continue
                # Unknown yet: None, or librdkafka's invalid offset (< 0).
                if marks is not None and marks[1] > heads.get(partition, -1):
                    heads[partition] = marks[1]
        self.callOnReactor(self.onReactor, "seen", heads)

    def sendBatch(self) -> None:
        """
        Hand the waiting batch to the reactor (its credit is taken).
        """
        batch, self.batch = self.batch, None
        self.callOnReactor(self.onReactor, "deliver", batch)

    def refused(self, error: Any) -> Problem:
        return EndpointUnavailable(f"Kafka refuses to let the gateway read topic {self.topic}: {error.str()}",
                                   retryAfter=self.connector.retryAfter)

    def ownRecordError(self, record: Any, error: Any, code: int) -> bool:
        """
        An offset the broker no longer has puts the partition on a
        watermark again (L{repositionPartitions}); a topic that is gone is
        looked for again soon.
        """
        known = codes()
        if code == known.AUTO_OFFSET_RESET:
            self.reposition.add(record.partition())
        elif code in known.UNKNOWN_TOPIC:
            self.nextMetadata = min(self.nextMetadata, self.now() + self.missingTopicInterval)
        else:
            return False
        return True

    def repositionPartitions(self) -> None:
        """
        Put partitions whose offset the broker no longer has back on the
        watermarks, with a gap for the sink.
        """
        try:
            marks = {p: self.watermarks(p) for p in sorted(self.reposition)}
        except Exception as e:
            if kafkaError(e) is None:
                raise
            self.backOff(e)
            return
        gaps = []
        for partition, (low, high) in marks.items():
            wanted = self.offsets[partition]
            if wanted < low:
                target = low
                gaps.append(f"partition {partition}: offsets {wanted} to {low - 1} were deleted by retention")
            elif wanted > high:
                target = high
                gaps.append(f"partition {partition}: offset {wanted} is past the end ({high}); "
                            "the topic was recreated or lost messages")
            else:
                target = wanted
            self.consumer.incremental_unassign([self.tp(partition)])
            self.consumer.incremental_assign([self.tp(partition, target)])
            if self.fetchPaused:
                self.consumer.pause([self.tp(partition)])
            self.offsets[partition] = target
        self.reposition.clear()
        if gaps:
            self.callOnReactor(self.onReactor, "gap", Cursor.fromMapping(self.offsets), "; ".join(gaps))
