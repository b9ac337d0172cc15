"""
The streams of the hub (L{evgate.hub}): a L{SharedStream} per (endpoint,
topic) that reads from the live head and keeps the replay window, a
L{PrivateStream} for a subscriber whose cursor is older than the window,
and the L{HubSubscription} that attaches one subscriber to either.  The
design is described in L{evgate.hub}, whose L{Hub} makes these streams and
parks private ones between the pages of a long poll.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Deque, List, NamedTuple, Optional, Sequence, Tuple

from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from evgate.interfaces import IConnector, IHoldableSubscription, ISubscriber, IUpstreamSink
from evgate.message import Cursor, Message
from evgate.replay import Event, Filter, ReplayWindow, Start

if TYPE_CHECKING:
    from evgate.hub import Hub

__all__ = ["HubSubscription", "SharedStream", "PrivateStream"]


class _HeldGap(NamedTuple):
    """
    A gap notice waiting behind held batches (L{HubSubscription.gap}).
    """

    cursor: Cursor
    reason: str


class HubSubscription:
    """
    One subscriber's attachment to a stream.  The entrypoint holds it to
    pause, resume and close.

    Held batches: while the API's delivery pipeline prepares (a decoder
    fetching a schema), the batches the stream delivers, and its gap
    notices, wait in C{held}, in order, and are offered one by one once
    it is ready.  The subscriber may stop after any of them, and what it
    was not offered yet is never dropped unseen:

     - released (a long-poll page answered, L{release}): a private read
       is kept for the next page only with every event past the released
       cursor, what was left of the batch being offered and then every
       held batch, in order; when that cannot be (a gap notice is held),
       the read ends and the next page reads afresh from its cursor.  A
       shared stream's next page replays from the window (or reads
       privately from its cursor when the window moved on);
     - paused: the held batches wait for L{resume}, unless the stream
       delivers more meanwhile (a paused subscriber is still given what
       the stream delivers, queued to its own bound, so the held ones go
       first);
     - closed: they are dropped; the client resumes from its own cursor.
    """

    # One per subscriber, thousands at once: no __dict__.
    __slots__ = ("stream", "subscriber", "filter", "floor", "view", "held", "preparing", "offered", "paused",
                 "closed", "cursor")

    def __init__(self, stream: "_Stream", subscriber: ISubscriber, filter: Optional[Filter],
                 floor: Optional[Cursor], view: Any = None) -> None:
        self.stream = stream
        self.subscriber = subscriber
        self.filter = filter
        self.floor = floor
        # The API's delivery pipeline (evgate.pipeline.Pipeline), or None:
        # what turns the stream's shared events into the API's own.
        self.view = view
        # Batches and gap notices waiting, in order, while the pipeline
        # prepares or the subscriber is paused in the middle of them.
        self.held: Optional[Deque[Any]] = None
        # Whether the pipeline prepares for the first held batch.
        self.preparing = False
        # The last batch handed to the subscriber, as the stream made it:
        # what a release leaves of it is kept for the next page.
        self.offered: Sequence[Event] = ()
        self.paused = False
        self.closed = False
        self.cursor: Optional[Cursor] = None

    def pause(self) -> None:
        """
        The subscriber cannot write for now.
        """
        if not self.paused and not self.closed:
            self.paused = True
            self.stream.subscriberPaused(self)

    def resume(self) -> None:
        """
        The subscriber can write again: held batches that waited for it
        are offered.
        """
        if self.paused and not self.closed:
            self.paused = False
            self.stream.subscriberResumed(self)
            if self.held and not self.preparing:
                self._replay()

    def close(self) -> None:
        """
        Detach from the stream, dropping what is held.  Idempotent.
        """
        if not self.closed:
            self.closed = True
            self.held = None
            self.stream.detach(self)

    def release(self, cursor: Optional[Cursor]) -> None:
        """
        Detach like L{close}, saying that the subscriber read up to
        C{cursor}: a private read may then be kept a while for the next
        subscriber that starts there (the next page of a long poll), with
        every event past C{cursor} it was not offered.
        """
        if self.closed:
            return
        self.closed = True
        stream = self.stream
        if cursor is not None and isinstance(stream, PrivateStream):
            stream.park(cursor)
        else:
            stream.detach(self)
        self.held = None

    def unread(self, cursor: Cursor) -> Optional[List[Event]]:
        """
        The events past C{cursor} of the batch last offered and of every
        held batch, in order: what the next subscriber starting at
        C{cursor} must get first.  L{None} when a gap notice is held: no
        list of events can carry it.
        """
        kept: List[Event] = []
        for batch in (self.offered, *(self.held or ())):
            if isinstance(batch, _HeldGap):
                return None
            for event in batch:
                wanted = cursor.get(event.message.partition)
                if wanted is None or event.message.offset >= wanted:
                    kept.append(event)
        return kept

    def offer(self, events: Sequence[Event]) -> None:
        """
        Hand C{events} to the subscriber, through the pipeline, the floor
        and the filter; or hold them behind batches already held.
        """
        if self.closed or not events:
            return
        view = self.view
        if view is not None:
            # Transformed once per message and API (cached on the shared
            # event); the API's subscribers share the result.
            held = self.held
            if held is not None:
                held.append(events)
                if self.paused and not self.preparing:
                    # Only the pause held them: it does not hold what the
                    # stream delivers, so they go first.
                    self._replay(force=True)
                return
            wait = view.ready(events)
            if wait is not None:
                self.held = deque((events,))
                self._prepare(wait)
                return
        self._hand(events)

    def _hand(self, shared: Sequence[Event]) -> None:
        self.offered = shared
        events = self.view.events(shared) if self.view is not None else shared
        if self.floor is not None:
            events = self._applyFloor(events)
            if not events:
                return
        last = events[-1].cursor
        if self.filter is not None:
            check = self.filter
            passing = [e for e in events if check(e)]
        else:
            # Every unfiltered subscriber gets the same batch object: no copy
            # per subscriber.  Subscribers read batches, never change them.
            passing = events  # type: ignore[assignment]
        self.cursor = last
        if passing:
            self.subscriber.deliver(passing)
        if not self.closed and (not passing or passing[-1].cursor is not last):
            self.subscriber.advanced(last)

    def gap(self, cursor: Cursor, reason: str) -> None:
        """
        Tell the subscriber that part of the stream is gone, in its turn:
        behind the batches held.
        """
        if self.closed:
            return
        if self.held is not None:
            self.held.append(_HeldGap(cursor, reason))
            return
        self.subscriber.gap(cursor, reason)

    def _prepare(self, wait: Any) -> None:
        self.preparing = True
        wait.addBoth(self._prepared)

    def _prepared(self, ignored: Any) -> None:
        self.preparing = False
        self._replay()

    def _replay(self, force: bool = False) -> None:
        # One held item at a time, taken off the queue before it is offered:
        # a subscriber that stops inside the offer (released, closed,
        # paused) finds the rest still held (see the class docstring).
        held = self.held
        view = self.view
        while held and not self.closed and not self.preparing and (force or not self.paused):
            item = held.popleft()
            if isinstance(item, _HeldGap):
                self.subscriber.gap(item.cursor, item.reason)
                continue
            wait = view.ready(item)
            if wait is not None:
                # It must wait once more, and what came after it with it.
                held.appendleft(item)
                self._prepare(wait)
                return
            self._hand(item)
        if self.held is held and not held and not self.preparing:
            self.held = None

    def _applyFloor(self, events: Sequence[Event]) -> List[Event]:
        # Drop what the subscriber saw already and give the rest ids that
        # never point before its floor, until the stream overtakes it.
        floor = self.floor
        assert floor is not None
        out: List[Event] = []
        for index, event in enumerate(events):
            message = event.message
            wanted = floor.get(message.partition)
            if wanted is not None and message.offset < wanted:
                continue
            if event.cursor.dominates(floor):
                self.floor = None
                out.append(event)
                out.extend(events[index + 1:])
                return out
            out.append(Event(message, event.cursor.merged(floor)))
        return out


class _Stream:
    """
    What shared and private streams have in common: turning upstream
    batches into events.
    """

    log = Logger()

    def __init__(self, hub: "Hub", connector: IConnector, topic: str) -> None:
        self.hub = hub
        self.connector = connector
        self.topic = topic
        self.head: Optional[Cursor] = None
        self.upstream: Any = None
        self.error: Optional[Failure] = None

    def makeEvents(self, messages: Sequence[Message]) -> List[Event]:
        """
        Events for C{messages}, advancing C{head}.
        """
        assert self.head is not None
        offsets = self.head.asDict()
        epoch = self.head.epoch
        events: List[Event] = []
        append = events.append
        for message in messages:
            partition = message.partition
            if len(offsets) <= 1 and (not offsets or partition in offsets):
                # One partition (the common case): no dict to sort.
                offsets = {partition: message.offset + 1}
                append(Event(message, Cursor(epoch, ((partition, message.offset + 1),))))
                continue
            offsets[partition] = message.offset + 1
            append(Event(message, Cursor(epoch, tuple(sorted(offsets.items())))))
        if events:
            self.head = events[-1].cursor
        return events

    def subscriberPaused(self, subscription: HubSubscription) -> None:
        raise NotImplementedError

    def subscriberResumed(self, subscription: HubSubscription) -> None:
        raise NotImplementedError

    def detach(self, subscription: HubSubscription) -> None:
        raise NotImplementedError


@implementer(IUpstreamSink)
class SharedStream(_Stream):
    """
    The live read of one (endpoint, topic), fanned out to its subscribers.
    """

    def __init__(self, hub: "Hub", connector: IConnector, topic: str, windowSize: int) -> None:
        super().__init__(hub, connector, topic)
        self.windowSize = windowSize
        self.window: Optional[ReplayWindow] = None
        self.subscriptions: List[HubSubscription] = []
        self.pending: List[Tuple[HubSubscription, Start]] = []
        self.upstreamPaused = False
        self._idleCall: Any = None
        self.upstream = connector.subscribe(topic, "latest", self)

    # IUpstreamSink

    def started(self, cursor: Cursor) -> None:
        self.head = cursor
        self.window = ReplayWindow(self.windowSize, cursor)
        pending, self.pending = self.pending, []
        for subscription, start in pending:
            if not subscription.closed:
                self._attach(subscription, start)

    def deliver(self, messages: Sequence[Message]) -> None:
        events = self.makeEvents(messages)
        assert self.window is not None
        self.window.append(events)
        for subscription in list(self.subscriptions):
            subscription.offer(events)

    def gap(self, cursor: Cursor, reason: str) -> None:
        self.head = cursor if self.head is None else self.head.merged(cursor)
        if self.window is not None:
            self.window = ReplayWindow(self.windowSize, self.head)
        for subscription in list(self.subscriptions):
            subscription.gap(self.head, reason)

    def failed(self, reason: Failure) -> None:
        self.error = reason
        self.hub.streamEnded(self)
        for subscription, _ in self.pending:
            subscription.closed = True
            subscription.subscriber.failed(reason)
        self.pending = []
        for subscription in list(self.subscriptions):
            subscription.closed = True
            subscription.subscriber.failed(reason)
        self.subscriptions = []

    # attaching

    def attach(self, subscription: HubSubscription, start: Start) -> None:
        """
        Add a subscriber that starts at the live head (C{"latest"}) or at a
        cursor the window covers.
        """
        self._cancelIdle()
        if self.head is None:
            self.pending.append((subscription, start))
        else:
            self._attach(subscription, start)

    def canReplay(self, cursor: Cursor) -> bool:
        """
        Whether a subscriber starting at C{cursor} can be served from the
        window.
        """
        return (self.window is not None and self.head is not None
                and self.window.covers(cursor, self.head))

    def _attach(self, subscription: HubSubscription, start: Start) -> None:
        assert self.head is not None and self.window is not None
        if isinstance(start, Cursor) and not self.window.covers(start, self.head):
            # The window moved on while this subscriber waited for the
            # stream to start: hand it to a private stream after all.
            self.hub.attachPrivate(subscription, start)
            return
        self.subscriptions.append(subscription)
        if isinstance(start, Cursor):
            subscription.subscriber.started(start)
            # Walk back from the head to the last event the cursor has seen;
            # a cursor near the head (the usual case) costs what it replays.
            backlog: List[Event] = []
            for event in reversed(self.window.events):
                if start.dominates(event.cursor):
                    break
                backlog.append(event)
            backlog.reverse()
            # The floor drops what the cursor saw on some partitions but not
            # on others, and keeps ids from pointing before the cursor.
            subscription.floor = start
            if backlog and not subscription.closed:
                subscription.offer(backlog)
        else:
            subscription.subscriber.started(self.head)
        if self.upstreamPaused and not subscription.paused:
            self.upstreamPaused = False
            self.upstream.resume()

    def subscriberPaused(self, subscription: HubSubscription) -> None:
        if all(s.paused for s in self.subscriptions) and not self.upstreamPaused:
            self.upstreamPaused = True
            self.upstream.pause()

    def subscriberResumed(self, subscription: HubSubscription) -> None:
        if self.upstreamPaused:
            self.upstreamPaused = False
            self.upstream.resume()

    def detach(self, subscription: HubSubscription) -> None:
        if subscription in self.subscriptions:
            self.subscriptions.remove(subscription)
        self.pending = [(s, start) for s, start in self.pending if s is not subscription]
        if not self.subscriptions and not self.pending:
            self.scheduleIdle()
        elif self.upstreamPaused and not all(s.paused for s in self.subscriptions):
            self.upstreamPaused = False
            self.upstream.resume()

    def scheduleIdle(self) -> None:
        """
        Close the stream after the idle grace unless a subscriber comes.
        """
        self._cancelIdle()
        self._idleCall = self.hub.reactor.callLater(self.hub.idleGrace, self._closeIfIdle)

    def _cancelIdle(self) -> None:
        if self._idleCall is not None and self._idleCall.active():
            self._idleCall.cancel()
        self._idleCall = None

    def _closeIfIdle(self) -> None:
        self._idleCall = None
        if not self.subscriptions and not self.pending:
            self.close()

    def close(self) -> None:
        """
        End the upstream read and forget the stream.
        """
        self._cancelIdle()
        self.upstream.close()
        self.hub.streamEnded(self)


@implementer(IUpstreamSink)
class PrivateStream(_Stream):
    """
    An upstream read of its own for one subscriber whose cursor is older
    than the shared window.
    """

    def __init__(self, hub: "Hub", connector: IConnector, topic: str,
                 subscription: HubSubscription, start: Start) -> None:
        super().__init__(hub, connector, topic)
        self.subscription = subscription
        subscription.stream = self
        # While parked: what the next subscriber gets first.
        self.kept: List[Event] = []
        self.parkedAt: Optional[Cursor] = None
        self.parkTimer: Any = None
        self.upstream = connector.subscribe(topic, start, self)
        if subscription.paused:
            self.upstream.pause()

    def started(self, cursor: Cursor) -> None:
        self.head = cursor
        if not self.subscription.closed:
            self.subscription.subscriber.started(cursor)

    def deliver(self, messages: Sequence[Message]) -> None:
        events = self.makeEvents(messages)
        if self.parkedAt is not None:
            # An upstream that cannot hold delivers while parked: kept.
            self.kept = self.kept + events
            return
        self.subscription.offer(events)

    def gap(self, cursor: Cursor, reason: str) -> None:
        self.head = cursor if self.head is None else self.head.merged(cursor)
        if self.parkedAt is not None:
            self.hub.unpark(self)
            self.upstream.close()
            return
        if not self.subscription.closed:
            self.subscription.gap(self.head, reason)

    def failed(self, reason: Failure) -> None:
        self.error = reason
        if self.parkedAt is not None:
            self.hub.unpark(self)
            return
        if not self.subscription.closed:
            self.subscription.closed = True
            self.subscription.subscriber.failed(reason)

    def subscriberPaused(self, subscription: HubSubscription) -> None:
        self.upstream.pause()

    def subscriberResumed(self, subscription: HubSubscription) -> None:
        self.upstream.resume()

    def detach(self, subscription: HubSubscription) -> None:
        self.upstream.close()

    # parking: a long poll's next page

    def park(self, cursor: Cursor) -> None:
        """
        The subscriber read up to C{cursor} and left: keep reading for the
        next subscriber that starts exactly there, for a while.  Every
        event past C{cursor} that the subscriber was not given (the rest of
        the batch it was offered, and the batches held behind it while the
        pipeline prepared) is kept for it; the upstream is held (a Kafka
        reader keeps what it prefetched, where pausing would throw it
        away).
        """
        kept = self.subscription.unread(cursor)
        # The kept events and the upstream must carry on exactly from the
        # cursor, or the next page would skip or repeat records.
        end = (kept[-1].cursor if kept else cursor) if kept is not None else None
        if (kept is None or self.error is not None or self.head is None or end != self.head
                or not self.hub.park(self, cursor)):
            self.upstream.close()
            return
        self.kept = kept
        self.parkedAt = cursor
        if IHoldableSubscription.providedBy(self.upstream):
            self.upstream.hold()
        else:
            self.upstream.pause()

    def adopt(self, subscription: HubSubscription) -> None:
        """
        Serve C{subscription}, which starts where this stream was parked:
        it is told so, gets the kept events, and the upstream goes on.
        """
        cursor = self.parkedAt
        assert cursor is not None
        self.parkedAt = None
        self.subscription = subscription
        subscription.stream = self
        subscription.subscriber.started(cursor)
        kept, self.kept = self.kept, []
        if IHoldableSubscription.providedBy(self.upstream):
            # What the upstream read while parked joins the kept events:
            # one fuller page rather than a page per batch.
            more = self.upstream.drainHeld()
            if more:
                kept = kept + self.makeEvents(more)
        if kept and not subscription.closed:
            subscription.offer(kept)
        if not subscription.closed and not subscription.paused:
            self.upstream.resume()
