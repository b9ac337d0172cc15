"""
Where a subscription's messages come from, per endpoint type: the feeds of
a L{evgate.webhook.delivery.Deliverer}.

A feed has four methods: C{start(cursor)} (C{None}: the API's start),
C{progress()} (the deliverer settled messages: read more if reading was
held back), C{close()}; and it calls the deliverer's C{began},
C{offer}, C{skipped}, C{gap}, C{feedFailed} and C{readFailed}.

 - L{HubFeed} (the in-memory endpoint): a subscriber of the node's hub from
   the subscription's position, so the hub's window serves it like any
   other subscriber.
 - L{ShareGroupFeed} (MQTT 5): a shared subscription
   C{$share/evgate-<subscription>/<topic>}, so that of several gateway
   nodes the broker hands each message to one.
 - L{evgate.webhook.kafka.KafkaGroupFeed}: a consumer group per
   subscription.

Backpressure: a feed reads while the deliverer's backlog is under
C{high}; above it the hub subscription or upstream read is paused, and the
hub subscription is let go altogether past twice that (the shared stream
goes on for the others; this feed comes back from the deliverer's tail
once the backlog is down to half).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Deque, List, Optional, Sequence

from twisted.python.failure import Failure
from zope.interface import implementer

from evgate.hub import Event
from evgate.interfaces import ISubscriber, IUpstreamSink
from evgate.message import Cursor, Message


@implementer(ISubscriber)
class HubFeed:
    """
    A deliverer's subscription to the node's hub.
    """

    def __init__(self, deliverer: Any, hub: Any, endpoint: str, topic: str, filter: Any, start: str,
                 high: int, view: Any = None) -> None:
        self.deliverer = deliverer
        self.hub = hub
        self.endpoint = endpoint
        self.topic = topic
        self.filter = filter
        self.apiStart = start
        self.high = high
        self.view = view
        self.subscription: Any = None
        self.detached = False
        self.closed = False

    def start(self, cursor: Optional[Cursor]) -> None:
        """
        Subscribe from C{cursor}, or from the API's start.
        """
        self.detached = False
        subscription = self.hub.subscribe(self.endpoint, self.topic,
                                          cursor if cursor is not None else self.apiStart, self, self.filter,
                                          self.view)
        if self.closed or self.detached:
            # Closed, or over the bound, while the hub replayed a backlog
            # inside subscribe, before this feed held its subscription.
            subscription.close()
            return
        self.subscription = subscription

    def progress(self) -> None:
        """
        Read again once the backlog is down to half the bound.
        """
        if self.closed or self.deliverer.backlog() > self.high // 2:
            return
        if self.detached:
            self.start(self.deliverer.tail)
        elif self.subscription is not None and self.subscription.paused:
            self.subscription.resume()

    def close(self) -> None:
        """
        Leave the hub.
        """
        self.closed = True
        if self.subscription is not None:
            self.subscription.close()
            self.subscription = None

    # ISubscriber

    def started(self, cursor: Cursor) -> None:
        if not self.closed:
            self.deliverer.began(cursor)

    def deliver(self, events: Sequence[Event]) -> None:
        if self.closed or self.detached:
            return
        self.deliverer.offer(events)
        backlog = self.deliverer.backlog()
        subscription = self.subscription
        if subscription is None:
            # Still inside hub.subscribe (start): over the bound, it lets go.
            if backlog >= 2 * self.high:
                self.detached = True
            return
        if backlog >= 2 * self.high:
            # The shared stream does not stop for one paused subscriber; let
            # go of it and come back from the tail later.
            self.detached = True
            self.subscription = None
            subscription.close()
        elif backlog >= self.high and not subscription.paused:
            subscription.pause()

    def gap(self, cursor: Cursor, reason: str) -> None:
        if not self.closed:
            self.deliverer.gap(cursor, reason)

    def advanced(self, cursor: Cursor) -> None:
        if not self.closed and not self.detached:
            self.deliverer.skipped(cursor)

    def failed(self, reason: Failure) -> None:
        if not self.closed:
            self.closed = True
            self.subscription = None
            self.deliverer.feedFailed(reason)


def eventsOf(head: Cursor, messages: Sequence[Message]) -> List[Event]:
    """
    Hub events for C{messages} read after C{head}.
    """
    offsets = head.asDict()
    events = []
    for message in messages:
        offsets[message.partition] = message.offset + 1
        events.append(Event(message, Cursor.fromMapping(offsets, head.epoch)))
    return events


def offerFiltered(deliverer: Any, events: Sequence[Event], filter: Any, view: Any = None) -> None:
    """
    Offer the events that pass C{filter}, transformed by the API's delivery
    pipeline C{view} (if any) first, and tell the deliverer where the
    stream is when the last ones did not.
    """
    if not events:
        return
    if view is not None:
        events = view.events(events)
    passing = [e for e in events if filter(e)] if filter is not None else list(events)
    if passing:
        deliverer.offer(passing)
    if not passing or passing[-1] is not events[-1]:
        deliverer.skipped(events[-1].cursor)


@implementer(IUpstreamSink)
class ShareGroupFeed:
    """
    A deliverer's MQTT shared subscription: share group
    C{evgate-<subscription id>}.

    MQTT keeps no log: the subscription reads live messages only, and what
    the broker handed this node but was not delivered yet is lost with the
    node (see docs/entrypoints/webhook.md).
    """

    def __init__(self, deliverer: Any, connector: Any, topic: str, group: str, filter: Any,
                 high: int, view: Any = None) -> None:
        self.deliverer = deliverer
        self.connector = connector
        self.topic = topic
        self.group = group
        self.filter = filter
        self.high = high
        self.view = view
        # Batches (lists) and gap notices (tuples) waiting, in order, while
        # the API's pipeline prepares (evgate.pipeline), or while the feed
        # is paused in the middle of offering them again.
        self.held: Optional[Deque[Any]] = None
        self.preparing = False
        self.upstream: Any = None
        self.head: Optional[Cursor] = None
        self.paused = False
        self.closed = False

    def start(self, cursor: Optional[Cursor]) -> None:
        """
        Join the share group; every start is the live head.
        """
        self.upstream = self.connector.subscribe(self.topic, "latest", self, group=self.group)

    def progress(self) -> None:
        """
        Read again once the backlog is down to half the bound.
        """
        if self.paused and not self.closed and self.deliverer.backlog() <= self.high // 2:
            self.paused = False
            self.upstream.resume()
            if self.held and not self.preparing:
                self._replay()

    def close(self) -> None:
        """
        Leave the share group.
        """
        self.closed = True
        if self.upstream is not None:
            self.upstream.close()

    # IUpstreamSink

    def started(self, cursor: Cursor) -> None:
        if self.closed:
            return
        self.head = cursor
        self.deliverer.began(cursor)

    def deliver(self, messages: Sequence[Message]) -> None:
        if self.closed or self.head is None:
            return
        events = eventsOf(self.head, messages)
        if events:
            self.head = events[-1].cursor
        self._take(events)

    def _take(self, events: List[Event]) -> None:
        # In order: behind the batches held.
        if self.held is not None:
            self.held.append(events)
            return
        self._offer(events)

    def _offer(self, events: List[Event]) -> bool:
        # False when the batch must wait for the pipeline (it is held first).
        if self.view is not None and events:
            wait = self.view.ready(events)
            if wait is not None:
                # A decoder fetching a schema: this batch and those after it
                # wait for it, rather than being marked.
                if self.held is None:
                    self.held = deque()
                self.held.appendleft(events)
                self.preparing = True
                wait.addCallback(self._prepared)
                return False
        offerFiltered(self.deliverer, events, self.filter, self.view)
        if not self.paused and self.deliverer.backlog() >= self.high:
            self.paused = True
            self.upstream.pause()
        return True

    def _prepared(self, ignored: Any) -> None:
        self.preparing = False
        self._replay()

    def _replay(self) -> None:
        # One at a time, off the queue: a batch that takes the backlog over
        # the bound pauses the feed, and the rest wait for progress() like
        # the messages the paused upstream keeps.
        held = self.held
        while held and not self.closed and not self.preparing and not self.paused:
            item = held.popleft()
            if isinstance(item, tuple):
                self.deliverer.gap(*item)
            elif not self._offer(item):
                return
        if self.held is held and not held and not self.preparing:
            self.held = None

    def gap(self, cursor: Cursor, reason: str) -> None:
        if self.closed:
            return
        self.head = cursor if self.head is None else self.head.merged(cursor)
        self._gap(self.head, reason)

    def _gap(self, cursor: Cursor, reason: str) -> None:
        if self.held is not None:
            self.held.append((cursor, reason))
            return
        self.deliverer.gap(cursor, reason)

    def failed(self, reason: Failure) -> None:
        if not self.closed:
            self.closed = True
            self.deliverer.feedFailed(reason)
