"""
Upstream subscriptions of an MQTT endpoint: one MQTT subscription (a feed)
per (share group, topic filter), numbered once and shared by its readers.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Deque, List, Optional, Tuple, Union

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from evgate.connectors.mqtt._options import Start, _matches
from evgate.connectors.mqtt._paho import _Incoming
from evgate.interfaces import IUpstreamSink, IUpstreamSubscription
from evgate.message import Cursor, Message

if TYPE_CHECKING:
    from evgate.connectors.mqtt._connector import MqttConnector

class _Gap:
    """
    A gap waiting in a paused reader's backlog, in order with its messages.
    """

    __slots__ = ("cursor", "reason")

    def __init__(self, cursor: Cursor, reason: str) -> None:
        self.cursor = cursor
        self.reason = reason


@implementer(IUpstreamSubscription)
class MqttSubscription:
    """
    One reader of a L{_Feed}.

    MQTT cannot pause one reader's share of a subscription at the broker,
    so a paused reader keeps what arrives in a backlog bounded by the
    endpoint's C{paused-backlog}; when that overflows, the oldest messages go
    and the reader is told with a gap when it resumes.
    """

    def __init__(self, feed: "_Feed", sink: IUpstreamSink, start: Start, backlogLimit: int) -> None:
        self.feed = feed
        self.sink = sink
        self.start = start
        self.backlogLimit = backlogLimit
        self.started = False
        self.paused = False
        self.closed = False
        self._backlog: Deque[Union[Message, _Gap]] = deque()
        self._dropped = 0
        self._droppedReason: Optional[str] = None
        self._flushCall: Any = None

    def begin(self) -> None:
        """
        Tell the sink where it starts (the live head), and about the gap
        when it asked for more than that.
        """
        if self.closed or self.started:
            return
        head = self.feed.head()
        reason = self.feed.connector.startGap(self.start, head)
        self.started = True
        self.sink.started(head)
        if reason is not None and not self.closed:
            self.sink.gap(head, reason)

    def offer(self, messages: List[Message]) -> None:
        """
        New messages of the feed.
        """
        if not self.started or self.closed:
            return
        if self.paused or self._backlog or self._dropped:
            self._backlog.extend(messages)
            self._trim()
            return
        self.sink.deliver(messages)

    def gap(self, cursor: Cursor, reason: str) -> None:
        """
        Continuity of the feed broke; reading goes on at C{cursor}.
        """
        if not self.started or self.closed:
            return
        if self.paused or self._backlog or self._dropped:
            self._backlog.append(_Gap(cursor, reason))
            self._trim()
            return
        self.sink.gap(cursor, reason)

    def fail(self, reason: Failure) -> None:
        """
        The feed ended for good.
        """
        if self.closed:
            return
        self.closed = True
        self._cancelFlush()
        self.sink.failed(reason)

    def _trim(self) -> None:
        while len(self._backlog) > self.backlogLimit:
            item = self._backlog.popleft()
            if isinstance(item, _Gap):
                self._droppedReason = item.reason
            else:
                self._dropped += 1

    def pause(self) -> None:
        self.paused = True
        self._cancelFlush()

    def resume(self) -> None:
        if self.paused and not self.closed:
            self.paused = False
            if self._backlog or self._dropped:
                # Not from inside the caller's stack: the sink may be in the
                # middle of handling the resume.
                self._flushCall = self.feed.connector.reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flushCall = None
        if self.paused or self.closed:
            return
        if self._dropped:
            first = next((m for m in self._backlog if isinstance(m, Message)), None)
            offset = first.offset if first is not None else self.feed.nextOffset
            reason = f"{self._dropped} messages were dropped while this reader was paused"
            if self._droppedReason is not None:
                reason += f"; {self._droppedReason}"
            self._dropped = 0
            self._droppedReason = None
            self.sink.gap(Cursor(self.feed.connector.epoch(), ((0, offset),)), reason)
        batch: List[Message] = []
        while self._backlog and not self.paused and not self.closed:
            item = self._backlog.popleft()
            if isinstance(item, _Gap):
                if batch:
                    self.sink.deliver(batch)
                    batch = []
                if not self.paused and not self.closed:
                    self.sink.gap(item.cursor, item.reason)
            else:
                batch.append(item)
        if batch and not self.closed:
            self.sink.deliver(batch)

    def _cancelFlush(self) -> None:
        if self._flushCall is not None and self._flushCall.active():
            self._flushCall.cancel()
        self._flushCall = None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._cancelFlush()
        self._backlog.clear()
        self.feed.remove(self)


class _Feed:
    """
    One MQTT subscription of the connector -- a topic filter, possibly in a
    share group -- its readers and its message counter.

    States: C{waiting} for a connection or a SUBACK, C{active} once the
    broker granted it (readers start then), C{failed} when it refused.
    """

    def __init__(self, connector: "MqttConnector", group: Optional[str], topicFilter: str, qos: int,
                 subscriptionId: int, nextOffset: int) -> None:
        self.connector = connector
        self.group = group
        self.filter = topicFilter
        self.mqttFilter = topicFilter if group is None else f"$share/{group}/{topicFilter}"
        self.qos = qos
        self.grantedQos = qos
        self.subscriptionId = subscriptionId
        self.nextOffset = nextOffset
        self.state = "waiting"
        self.readers: List[MqttSubscription] = []

    @property
    def key(self) -> Tuple[Optional[str], str]:
        """
        What identifies the feed in its connector.
        """
        return (self.group, self.filter)

    def head(self) -> Cursor:
        """
        The cursor of the next message.
        """
        return Cursor(self.connector.epoch(), ((0, self.nextOffset),))

    def matches(self, topic: str) -> bool:
        """
        Whether a message on C{topic} is for this feed (for brokers without
        subscription identifiers).
        """
        return _matches(self.filter, topic)

    def number(self, incoming: _Incoming) -> Message:
        """
        The next message of this feed.
        """
        headers = incoming.userProperties
        extra = dict(incoming.extra)
        contentType = extra.get("contentType")
        if contentType is not None and not any(name.lower() == "content-type" for name, _ in headers):
            # The publish side maps the content-type header to MQTT's
            # content type; the way back restores it.
            headers = headers + (("content-type", contentType),)
        message = Message(
            content=incoming.payload,
            key=None,
            headers=headers,
            topic=incoming.topic,
            partition=0,
            offset=self.nextOffset,
            timestamp=incoming.timestamp,
            extra=extra,
        )
        self.nextOffset += 1
        return message

    def dispatch(self, messages: List[Message]) -> None:
        """
        Hand C{messages} to every reader.
        """
        for reader in list(self.readers):
            try:
                reader.offer(messages)
            except Exception:
                # A broken reader must not cost the others their batch.
                self.connector.log.failure("MQTT endpoint {name}: delivering from {filter}",
                                           name=self.connector.name, filter=self.mqttFilter)

    def breakContinuity(self, reason: str) -> None:
        """
        Messages may have been missed: skip an offset so that no earlier
        cursor looks continuous, and tell the readers.
        """
        self.nextOffset += 1
        head = self.head()
        for reader in list(self.readers):
            reader.gap(head, reason)

    def activate(self, grantedQos: int) -> None:
        """
        The broker granted the subscription: start the readers waiting.
        """
        self.state = "active"
        self.grantedQos = grantedQos
        for reader in list(self.readers):
            reader.begin()

    def fail(self, reason: Failure) -> None:
        """
        The broker refused the subscription: end every reader.
        """
        self.state = "failed"
        readers, self.readers = self.readers, []
        for reader in readers:
            reader.fail(reason)

    def remove(self, reader: MqttSubscription) -> None:
        """
        C{reader} closed; the last one leaving ends the MQTT subscription.
        """
        if reader in self.readers:
            self.readers.remove(reader)
        if not self.readers:
            self.connector.feedIdle(self)


@dataclass
class _Publish:
    """
    A publish waiting for the broker's acknowledgement.
    """

    deferred: Deferred
    topic: str
    timer: Any
