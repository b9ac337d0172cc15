"""
What the streaming entrypoints (SSE and WebSocket) share: the subscriber
side of the hub's fan-out, with a bounded outbound queue, and the API keys
they read.

Backpressure
============

The hub hands every subscriber of a topic the same batches, on the reactor
thread, and never waits for anyone.  Each L{StreamSubscriber} is an
C{IPushProducer} registered with its own transport, so pushing back is
per connection:

 - while the transport accepts data, a batch is encoded (once per message,
   cached on the hub's L{Event}) and written with one C{write};
 - when the transport's buffer fills, it calls L{pauseProducing}: the
   subscriber tells the hub (L{HubSubscription.pause}) and from then on
   I{queues} what it is given.  The hub pauses the upstream read only when
   every subscriber of the stream is paused, so a slow client costs the
   others nothing;
 - L{resumeProducing} writes the queue out in slices of about
   L{FLUSH_BYTES}, stopping as soon as the transport pushes back again,
   and resumes the hub subscription once the queue is empty;
 - a subscriber whose queue holds more than C{subscriber-queue} messages
   is not slowing the stream down but falling behind it for good: it is
   cut with a reason that names its last delivered position (SSE
   C{event: error}, WebSocket close 1013), and the client resumes from
   there on a new connection.  Nothing is lost, because what was queued
   was never written: the position the client holds is the last one that
   reached its transport.

Fairness between subscribers is the hub's order of delivery; the queue only
bounds how far one subscriber may lag before it is cut.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Set, Tuple

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from evgate.config import ApiContext, SectionReader, apiOptionParser
from evgate.hub import Event, HubSubscription
from evgate.interfaces import ISubscriber
from evgate.message import Cursor
from evgate.security.limits import meterFor

# How much of a queue one write carries when it drains: a slice a transport
# takes in one go without holding a second copy of a long queue in memory.
FLUSH_BYTES = 256 * 1024

DEFAULT_HEARTBEAT = 15.0

# Seconds a stream over its message budget waits for the next window; a
# longer wait (a quota used up) ends the stream instead.
THROTTLE_MAX = 60.0
DEFAULT_SSE_RETRY = 3000

# Queue entry kinds.
MESSAGE, ADVANCE, NOTICE = "message", "advance", "notice"


class QueueEntry:
    """
    One frame waiting for its transport.

    @ivar cursor: the position a client holds once the frame reached it, or
        L{None} for frames that do not move it.
    """

    __slots__ = ("frame", "cursor", "kind", "size")

    def __init__(self, frame: Any, cursor: Optional[Cursor], kind: str, size: int) -> None:
        self.frame = frame
        self.cursor = cursor
        self.kind = kind
        self.size = size


@implementer(ISubscriber, IPushProducer)
class StreamSubscriber:
    """
    A long-lived subscriber on one connection.  Subclasses say how frames
    are encoded and written (L{encode}, L{writeFrames}) and how the stream
    ends (L{streamOpened}, L{closeTooSlow}, L{streamFailed}, L{shutdown}).

    @ivar written: the position of the last frame that reached the
        transport: where the client resumes if the stream ends now.
    """

    log = Logger()

    def __init__(self, call: Any, entrypoint: Any, heartbeat: float = 0.0) -> None:
        api = call.api
        self.call = call
        self.api = api
        self.entrypoint = entrypoint
        self.reactor = api.node.reactor
        self.tag: bytes = api.tag
        self.queueLimit: int = api.node.settings.subscriberQueue
        self.heartbeat = heartbeat
        self.queue: Deque[QueueEntry] = deque()
        self.queuedMessages = 0
        self.paused = False
        self.closed = False
        self.opened = False
        self.subscription: Optional[HubSubscription] = None
        self.written: Optional[Cursor] = None
        self.lastWrite = self.reactor.seconds()
        self.openedAt = self.lastWrite
        self._timers: Dict[str, Any] = {}
        # Counted per batch (evgate.metrics): messages handed to this
        # stream, and its entrypoint's tally.
        self.sent = 0
        self.tally = entrypoint.tally
        # The consumer's message budget (rate-limit / quota), if its plan
        # has one: a stream over it holds its messages back (throttled)
        # like a transport that pushes back, or ends when the wait is long.
        self.meter = meterFor(call)
        self.throttled = False

    # life cycle

    def subscribe(self, start: Any, filter: Any) -> None:
        """
        Attach to the hub from C{start} through C{filter}.
        """
        api = self.api
        self.entrypoint.live.add(self)
        expiresAt = self.call.consumer.expiresAt
        if expiresAt is not None:
            self.later("expiry", max(0.0, expiresAt - self.reactor.seconds()), self.credentialsExpired)
        self.subscription = api.hub.subscribe(api.config.endpoint, api.config.topic, start, self, filter)

    def later(self, name: str, delay: float, f: Callable[[], None]) -> None:
        """
        Run C{f} after C{delay} seconds unless the stream ends first; one
        timer per C{name}.
        """
        old = self._timers.pop(name, None)
        if old is not None and old.active():
            old.cancel()

        def fire() -> None:
            self._timers.pop(name, None)
            if not self.closed:
                f()

        self._timers[name] = self.reactor.callLater(delay, fire)

    def end(self) -> None:
        """
        Forget the stream: detach from the hub, drop the queue and the
        timers.  Idempotent; the subclass closes its transport itself.
        """
        if self.closed:
            return
        self.closed = True
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        self.queue.clear()
        self.queuedMessages = 0
        if self.subscription is not None:
            self.subscription.close()
        self.entrypoint.live.discard(self)

    # ISubscriber

    def started(self, cursor: Cursor) -> None:
        if self.closed:
            return
        self.opened = True
        self.written = cursor
        self.lastWrite = self.reactor.seconds()
        if self.heartbeat > 0:
            self.later("heartbeat", self.heartbeat, self._beat)
        self.streamOpened(cursor)

    def deliver(self, events: List[Event]) -> None:
        if self.closed:
            return
        self.sent += len(events)
        self.tally.messagesOut += len(events)
        entries = []
        for event in events:
            frame = self.encode(event)
            entries.append(QueueEntry(frame, event.cursor, MESSAGE, self.frameSize(frame)))
        self.push(entries)

    def advanced(self, cursor: Cursor) -> None:
        if self.closed:
            return
        frame = self.advanceFrame(cursor)
        if frame is None:
            return
        entry = QueueEntry(frame, cursor, ADVANCE, len(frame))
        if self.queue and self.queue[-1].kind == ADVANCE:
            # Only the latest position matters to a client that has not
            # seen the earlier ones yet.
            self.queue[-1] = entry
            return
        self.push([entry])

    def gap(self, cursor: Cursor, reason: str) -> None:
        if self.closed:
            return
        self.log.info("{api}: gap in {topic}, resuming at {cursor}: {reason}", api=self.api.name,
                      topic=self.api.config.topic, cursor=cursor.encode(self.tag), reason=reason)
        frame = self.gapFrame(cursor, reason)
        if frame is not None:
            self.push([QueueEntry(frame, cursor, NOTICE, self.frameSize(frame))])

    def failed(self, reason: Failure) -> None:
        if self.closed:
            return
        self.log.info("{api}: upstream of {topic} failed: {reason}", api=self.api.name,
                      topic=self.api.config.topic, reason=reason.getErrorMessage())
        self.streamFailed(reason)
        self.end()

    # the outbound queue

    def push(self, entries: List[QueueEntry]) -> None:
        """
        Write C{entries} now, or queue them behind what waits already.
        """
        if self.paused or self.throttled or self.queue:
            self.queue.extend(entries)
            self.queuedMessages += sum(1 for e in entries if e.kind == MESSAGE)
            if self.queuedMessages > self.queueLimit:
                self._tooSlow()
            return
        entries = self._metered(entries)
        if entries:
            self._write(entries)
        if self.queuedMessages > self.queueLimit:
            self._tooSlow()

    def _metered(self, entries: List[QueueEntry]) -> List[QueueEntry]:
        """
        The head of C{entries} the consumer's message budget lets out now;
        the rest goes (back) to the front of the queue and the stream is
        throttled until the budget allows more, or ends when that is more
        than L{THROTTLE_MAX} seconds away (a quota).
        """
        if self.meter is None:
            return entries
        count = sum(1 for e in entries if e.kind == MESSAGE)
        if count == 0:
            return entries
        granted, wait = self.meter.take(count)
        if granted == count:
            return entries
        cut, seen = len(entries), 0
        for index, entry in enumerate(entries):
            if entry.kind == MESSAGE:
                if seen == granted:
                    cut = index
                    break
                seen += 1
        head, rest = entries[:cut], entries[cut:]
        if wait > THROTTLE_MAX:
            if head:
                self._write(head)
            self.log.info("{api}: {consumer} used up its messages; ending its stream for {wait:.0f} s",
                          api=self.api.name, consumer=self.call.consumer.id, wait=wait)
            self.queue.clear()
            self.queuedMessages = 0
            self.limitReached(wait)
            self.end()
            return []
        # Behind whatever already waits when this came from the queue.
        self.queue.extendleft(reversed(rest))
        self.queuedMessages += sum(1 for e in rest if e.kind == MESSAGE)
        self.throttled = True
        if self.subscription is not None:
            self.subscription.pause()
        self.later("throttle", wait, self._unthrottle)
        return head

    def _unthrottle(self) -> None:
        self.throttled = False
        if not self.paused:
            self.resumeProducing()

    def _write(self, entries: List[QueueEntry]) -> None:
        for entry in reversed(entries):
            if entry.cursor is not None:
                self.written = entry.cursor
                break
        self.lastWrite = self.reactor.seconds()
        self.writeFrames([e.frame for e in entries])

    def _tooSlow(self) -> None:
        self.log.info("{api}: subscriber {consumer} fell {count} messages behind; closing it",
                      api=self.api.name, consumer=self.call.consumer.id, count=self.queuedMessages)
        self.tally.dropped += self.queuedMessages
        self.queue.clear()
        self.queuedMessages = 0
        self.closeTooSlow()
        self.end()

    def _beat(self) -> None:
        idle = self.reactor.seconds() - self.lastWrite
        if idle >= self.heartbeat - 1e-6:
            # A paused transport is full already; a heartbeat would only
            # queue behind the data that proves the stream is alive.
            if not self.paused and not self.queue:
                self.lastWrite = self.reactor.seconds()
                self.writeFrames([self.heartbeatFrame()])
            delay = self.heartbeat
        else:
            delay = self.heartbeat - idle
        self.later("heartbeat", delay, self._beat)

    # IPushProducer (the transport's side)

    def pauseProducing(self) -> None:
        if self.closed or self.paused:
            return
        self.paused = True
        if self.subscription is not None:
            self.subscription.pause()

    def resumeProducing(self) -> None:
        if self.closed:
            return
        self.paused = False
        while self.queue and not self.paused and not self.throttled and not self.closed:
            batch: List[QueueEntry] = []
            size = 0
            while self.queue and size < FLUSH_BYTES:
                entry = self.queue.popleft()
                if entry.kind == MESSAGE:
                    self.queuedMessages -= 1
                batch.append(entry)
                size += entry.size
            batch = self._metered(batch)
            if batch:
                self._write(batch)
        if not self.paused and not self.throttled and not self.closed and self.subscription is not None:
            self.subscription.resume()

    def stopProducing(self) -> None:
        self.end()

    # what subclasses provide

    def encode(self, event: Event) -> Any:
        """
        The frame of C{event}, computed once per message and format.
        """
        raise NotImplementedError

    def frameSize(self, frame: Any) -> int:
        """
        The size in bytes of C{frame}.
        """
        return len(frame)

    def writeFrames(self, frames: List[Any]) -> None:
        """
        Write C{frames} to the transport, in one write where possible.
        """
        raise NotImplementedError

    def advanceFrame(self, cursor: Cursor) -> Any:
        """
        A frame that moves the client's position to C{cursor} without a
        message, or L{None} when the protocol has none.
        """
        return None

    def gapFrame(self, cursor: Cursor, reason: str) -> Any:
        """
        A frame telling the client about a gap, or L{None}.
        """
        return None

    def heartbeatFrame(self) -> Any:
        """
        A frame that carries nothing but proves the stream alive.
        """
        raise NotImplementedError

    def streamOpened(self, cursor: Cursor) -> None:
        """
        The subscription starts at C{cursor}: answer the client.
        """

    def closeTooSlow(self) -> None:
        """
        Close the connection because the client fell too far behind.
        """
        raise NotImplementedError

    def streamFailed(self, reason: Failure) -> None:
        """
        Close the connection because the upstream failed.
        """
        raise NotImplementedError

    def credentialsExpired(self) -> None:
        """
        Close the connection because the caller's credentials expired.
        """
        raise NotImplementedError

    def shutdown(self) -> None:
        """
        Close the connection because the gateway is stopping.
        """
        raise NotImplementedError

    def limitReached(self, retryAfter: float) -> None:
        """
        Close the connection because the consumer used up its messages for
        the next C{retryAfter} seconds (a quota).
        """
        raise NotImplementedError


def stopAll(live: Set[StreamSubscriber]) -> None:
    """
    Close every stream in C{live} (at gateway shutdown).
    """
    for subscriber in list(live):
        subscriber.shutdown()


@apiOptionParser
def parseStreamingOptions(section: SectionReader, context: ApiContext) -> Mapping[str, Any]:
    """
    The keys of the streaming entrypoints: C{heartbeat} (seconds, both),
    C{sse.retry} (milliseconds), C{sse.max-duration} (seconds) and
    C{websocket.publish} (true or false).
    """
    sse = "sse" in context.entrypoints
    websocket = "websocket" in context.entrypoints
    owners: Tuple[Tuple[str, bool, str], ...] = (
        ("heartbeat", sse or websocket, "the sse and websocket entrypoints"),
        ("sse.retry", sse, "the sse entrypoint"),
        ("sse.max-duration", sse, "the sse entrypoint"),
        ("websocket.publish", websocket, "the websocket entrypoint"),
    )
    for key, used, by in owners:
        if section.has(key) and not used:
            raise section.error(key, f"is only used by {by}, which this API does not list")
    return {
        "heartbeat": section.getFloat("heartbeat", DEFAULT_HEARTBEAT, minimum=0.0),
        "sseRetry": section.getInt("sse.retry", DEFAULT_SSE_RETRY, minimum=0, maximum=3_600_000),
        "sseMaxDuration": section.getFloat("sse.max-duration", 0.0, minimum=0.0),
        "websocketPublish": section.getBool("websocket.publish", True),
    }
