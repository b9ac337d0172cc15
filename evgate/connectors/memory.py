"""
The embedded in-memory broker: a bounded log per topic, on the reactor
thread, so that evgate runs with nothing else installed.

It keeps the last C{retention} messages of every topic, in one partition,
for the life of the process.  Each process starts a new I{epoch}: a cursor
from an earlier run is recognised and resumes at the oldest message kept,
with a gap reported to the client, never silently.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any, Deque, Dict, List, Mapping, Optional, Sequence, Union

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from evgate.interfaces import IConnector, IHeadOffsets, IRetainedLog, IUpstreamSink, IUpstreamSubscription
from evgate.message import Cursor, Draft, Message, Position

# Messages handed to a sink per reactor turn: big enough to amortise the
# per-batch cost, small enough that a long backlog does not starve the
# reactor of other work.
BATCH = 512


class TopicLog:
    """
    The retained messages of one topic, in offset order.
    """

    def __init__(self, topic: str, retention: int) -> None:
        self.topic = topic
        self.messages: Deque[Message] = deque(maxlen=retention)
        self.nextOffset = 0
        self.subscriptions: List["MemorySubscription"] = []

    @property
    def firstOffset(self) -> int:
        """
        The offset of the oldest message kept.
        """
        return self.nextOffset - len(self.messages)

    def read(self, offset: int, limit: int) -> List[Message]:
        """
        Up to C{limit} messages from C{offset} on (which must be retained).
        """
        start = offset - self.firstOffset
        end = min(len(self.messages), start + limit)
        if start >= end:
            return []
        if start == 0 and end == len(self.messages):
            return list(self.messages)
        # deque slicing is not supported; indexing from the nearer end is.
        return [self.messages[i] for i in range(start, end)]


@implementer(IUpstreamSubscription)
class MemorySubscription:
    """
    A reader of one L{TopicLog}, delivering in batches on later reactor
    turns.
    """

    def __init__(self, connector: "MemoryConnector", log: TopicLog, offset: int,
                 sink: IUpstreamSink) -> None:
        self._connector = connector
        self._log = log
        self.offset = offset
        self._sink = sink
        self._paused = False
        self._closed = False
        self._scheduled: Any = None

    def wake(self) -> None:
        """
        New messages may be there: deliver them on a later turn.
        """
        if self._scheduled is None and not self._paused and not self._closed:
            self._scheduled = self._connector.reactor.callLater(0, self._drain)

    def _drain(self) -> None:
        self._scheduled = None
        if self._paused or self._closed:
            return
        log = self._log
        if self.offset < log.firstOffset:
            self.offset = log.firstOffset
            self._sink.gap(
                Cursor.fromMapping({0: self.offset}, self._connector.epoch()),
                "messages were dropped by the in-memory broker's retention before they were read",
            )
            if self._paused or self._closed:
                return
        batch = log.read(self.offset, BATCH)
        if not batch:
            return
        self.offset = batch[-1].offset + 1
        self._sink.deliver(batch)
        if self.offset < log.nextOffset:
            self.wake()

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            self.wake()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None
        if self in self._log.subscriptions:
            self._log.subscriptions.remove(self)


@implementer(IConnector, IHeadOffsets, IRetainedLog)
class MemoryConnector(Service):
    """
    An endpoint of C{type = memory}.
    """

    kind = "memory"
    connected = True
    # Never down: the broker is this process.
    notConnectedReason = None
    log = Logger()

    def __init__(self, name: str, retention: int, reactor: IReactorTime,
                 epoch: Optional[int] = None) -> None:
        self.name = name  # type: ignore[assignment]  # Service.name is Optional
        self.retention = retention
        self.reactor = reactor
        self._epoch = epoch if epoch is not None else random.SystemRandom().randrange(1, 2**31)
        self._topics: Dict[str, TopicLog] = {}

    def epoch(self) -> int:
        return self._epoch

    def topicLog(self, topic: str) -> TopicLog:
        """
        The log of C{topic}, created on first use.
        """
        log = self._topics.get(topic)
        if log is None:
            log = self._topics[topic] = TopicLog(topic, self.retention)
        return log

    def headOffsets(self, topic: str) -> Mapping[int, int]:
        """
        The next offset of C{topic}'s one partition.
        """
        return {0: self.topicLog(topic).nextOffset}

    def publish(self, topic: str, draft: Draft, timeout: float = 0) -> "Deferred[Position]":
        log = self.topicLog(topic)
        offset = log.nextOffset
        log.messages.append(Message(
            content=draft.content,
            key=draft.key,
            headers=draft.headers,
            topic=topic,
            partition=0,
            offset=offset,
            timestamp=int(self.reactor.seconds() * 1000),
        ))
        log.nextOffset = offset + 1
        for subscription in log.subscriptions:
            subscription.wake()
        return succeed(Position(topic, 0, offset))

    def publishMany(self, topic: str, drafts: Sequence[Draft], timeout: float = 0) -> "Deferred[List[Any]]":
        log = self.topicLog(topic)
        timestamp = int(self.reactor.seconds() * 1000)
        positions: List[Any] = []
        append = log.messages.append
        offset = log.nextOffset
        for draft in drafts:
            append(Message(content=draft.content, key=draft.key, headers=draft.headers, topic=topic,
                           partition=0, offset=offset, timestamp=timestamp))
            positions.append(Position(topic, 0, offset))
            offset += 1
        log.nextOffset = offset
        # One wake-up for the whole batch.
        for subscription in log.subscriptions:
            subscription.wake()
        return succeed(positions)

    def subscribe(self, topic: str, start: Union[str, Cursor], sink: IUpstreamSink) -> MemorySubscription:
        log = self.topicLog(topic)
        gapReason: Optional[str] = None
        if start == "earliest":
            offset = log.firstOffset
        elif start == "latest":
            offset = log.nextOffset
        else:
            assert isinstance(start, Cursor)
            wanted = start.get(0)
            if start.epoch != self._epoch:
                offset = log.firstOffset
                gapReason = "the cursor is from an earlier run of the in-memory broker"
            elif wanted is None or wanted < log.firstOffset:
                offset = log.firstOffset
                gapReason = "messages after the cursor were dropped by the in-memory broker's retention"
            else:
                offset = min(wanted, log.nextOffset)
        subscription = MemorySubscription(self, log, offset, sink)
        log.subscriptions.append(subscription)

        def begin() -> None:
            if subscription._closed:
                return
            cursor = Cursor.fromMapping({0: offset}, self._epoch)
            sink.started(cursor)
            if gapReason is not None:
                sink.gap(cursor, gapReason)
            # Hand over the backlog in this same turn, so that a reader with
            # a zero timeout sees what is already there.
            if not subscription._closed and not subscription._paused:
                subscription._drain()

        self.reactor.callLater(0, begin)
        return subscription
