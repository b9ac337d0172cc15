"""
What the streaming entrypoints (SSE and WebSocket) share: the subscriber
side of the hub's fan-out, with a bounded outbound queue, and the API keys
they read.

One subscriber class, L{StreamSubscriber}, owns queueing, backpressure,
filters, limits and cursors; what differs between protocols is a framer
(L{evgate.interfaces.IStreamFramer}: L{evgate.entrypoints.sse.SseFramer},
L{evgate.entrypoints.websocket.WebSocketFramer}) that says how events,
gaps, heartbeats and goodbyes become bytes on the connection.

Backpressure
============

The hub hands every subscriber of a topic the same batches, on the reactor
thread, and never waits for anyone.  Each L{StreamSubscriber} is an
C{IPushProducer} registered with its own transport, so pushing back is
per connection:

 - while the transport accepts data, a batch is encoded (once per message
   and wire format, cached on the hub's L{Event}: every subscriber holds
   the same bytes) and written with one C{write};
 - when the transport's buffer fills, it calls L{pauseProducing}: the
   subscriber tells the hub (L{HubSubscription.pause}) and from then on
   I{queues} what it is given: references to the shared frames, never
   copies.  The hub pauses the upstream read only when every subscriber of
   the stream is paused, so a slow client costs the others nothing;
 - L{resumeProducing} writes the queue out in slices of at most
   L{FLUSH_BYTES}, stopping as soon as the transport pushes back again,
   and resumes the hub subscription once the queue is empty.  A frame
   larger than a slice is written by the framer
   (L{IStreamFramer.writeFrom}) from views of the shared bytes, as much as
   the socket takes, with the stream paused until the transport wrote the
   rest of the one piece the socket took in part (L{evgate.directwrite}):
   the transport, which copies what it buffers, never holds more of it
   than that piece, so a large message delivered to many streams at once,
   or to streams that do not read, stays one shared copy in memory;
 - a subscriber whose queue holds more than C{subscriber-queue} messages
   or C{subscriber-queue-bytes} bytes is not slowing the stream down but
   falling behind it for good: it is cut with a reason that names its last
   delivered position (SSE C{event: error}, WebSocket close 1013), and the
   client resumes from there on a new connection.  Nothing is lost, because
   what was queued was never written: the position the client holds is
   the last one that reached its transport;
 - the node as a whole holds at most C{max-queued-bytes} of queued frames
   (L{evgate.entrypoints.queues.QueueLedger}, counting a frame shared by several queues once, as it
   is in memory).  Past that, the subscribers with the most bytes queued
   are cut first (counted as shed), the same way, until the node is back
   under the bound: those are the clients that pin the most memory and are
   the furthest from catching up.

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

from evgate.entrypoints.heartbeats import heartbeatTimer
from evgate.entrypoints.queues import ADVANCE, DEFAULT_QUEUE_BYTES, MESSAGE, NOTICE, QueueEntry, ledgerFor
from evgate.hub import Event, HubSubscription
from evgate.ini import ApiContext, SectionReader, apiOptionParser
from evgate.interfaces import IStreamFramer, ISubscriber
from evgate.message import Cursor
from evgate.security.limits import meterFor

# The most one write carries: a slice a transport takes in one go.  Twisted
# pauses its producer once it buffers more than 64 KiB, so a stream that
# stops reading holds at most about this much beyond that in its transport.
FLUSH_BYTES = 64 * 1024

DEFAULT_HEARTBEAT = 15.0

# Seconds a stream over its message budget waits for the next window; a
# longer wait (a quota used up) ends the stream instead.
THROTTLE_MAX = 60.0
DEFAULT_SSE_RETRY = 3000

# The queue of every stream that has nothing queued (most of them, most of
# the time): an empty deque holds a 600-byte block.  A stream gets a queue
# of its own on its first push and gives it up once drained.  Its maxlen of
# 0 would drop anything appended; only push appends, never to this one.
NO_QUEUE: Deque[QueueEntry] = deque(maxlen=0)

class Goodbye:
    """
    Why the gateway ends a stream, for its framer to tell the client.

    @ivar kind: one of the constants of this class.
    @ivar detail: for L{TOO_SLOW} and L{SHED}, how far behind the client
        is (e.g. C{"more than 1000 messages behind"}).
    @ivar failure: for L{FAILED}, the upstream's failure.
    @ivar retryAfter: for L{QUOTA}, seconds until the budget allows more.
    @ivar midFrame: a frame is half written; nothing may follow it.
    """

    TOO_SLOW = "too-slow"
    SHED = "shed"
    FAILED = "failed"
    EXPIRED = "expired"
    QUOTA = "quota"
    STOPPING = "stopping"
    MAX_DURATION = "max-duration"

    def __init__(self, kind: str, detail: str = "", failure: Optional[Failure] = None,
                 retryAfter: float = 0.0) -> None:
        self.kind = kind
        self.detail = detail
        self.failure = failure
        self.retryAfter = retryAfter
        self.midFrame = False


@implementer(ISubscriber, IPushProducer)
class StreamSubscriber:
    """
    A long-lived subscriber on one connection, written through its
    L{IStreamFramer}.

    @ivar written: the position of the last frame that reached the
        transport: where the client resumes if the stream ends now.
    @ivar queuedBytes: bytes of frames waiting (what the head frame has
        left to write, for one written in slices).
    """

    log = Logger()

    # Thousands of these live at once, most of them idle: no __dict__.
    __slots__ = ("call", "api", "entrypoint", "framer", "reactor", "tag", "queueLimit", "queueBytesLimit", "ledger",
                 "heartbeat", "maxDuration", "queue", "queuedMessages", "queuedBytes", "headSent", "paused",
                 "closed", "opened", "subscription", "written", "lastWrite", "openedAt", "_timers", "beatEntry",
                 "sent", "bytesOut", "received", "tally", "meter", "throttled")

    def __init__(self, call: Any, entrypoint: Any, framer: IStreamFramer, heartbeat: float = 0.0,
                 maxDuration: float = 0.0) -> None:
        api = call.api
        self.call = call
        self.api = api
        self.entrypoint = entrypoint
        self.framer = framer
        self.reactor = api.node.reactor
        self.tag: bytes = api.tag
        self.queueLimit: int = api.node.settings.subscriberQueue
        options = api.node.settings.options or {}
        self.queueBytesLimit: int = options.get("subscriberQueueBytes", DEFAULT_QUEUE_BYTES)
        self.ledger = ledgerFor(api)
        self.heartbeat = heartbeat
        self.maxDuration = maxDuration
        self.queue = NO_QUEUE
        self.queuedMessages = 0
        self.queuedBytes = 0
        # Bytes of the head entry already written (a large frame goes out
        # a piece at a time).
        self.headSent = 0
        self.paused = False
        self.closed = False
        self.opened = False
        self.subscription: Optional[HubSubscription] = None
        self.written: Optional[Cursor] = None
        self.lastWrite = self.reactor.seconds()
        self.openedAt = self.lastWrite
        # Named timers (expiry, max-duration, throttle), made on first use;
        # the heartbeat is on the reactor's HeartbeatTimer.
        self._timers: Optional[Dict[str, Any]] = None
        self.beatEntry: Optional[List[Any]] = None
        # Counted per batch (evgate.metrics): messages handed to this
        # stream, and its entrypoint's tally; bytes for the access log.
        self.sent = 0
        self.bytesOut = 0
        self.received = 0
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
        subscription = api.hub.subscribe(api.config.endpoint, api.config.topic, start, self, filter,
                                         api.pipeline.hubView)
        self.subscription = subscription
        # The hub may replay a backlog inside subscribe, before this stream
        # holds its subscription: what the stream did meanwhile (ended,
        # or was paused by its transport or its budget) reaches the hub now.
        if self.closed:
            subscription.close()
        elif self.paused or self.throttled:
            subscription.pause()

    def later(self, name: str, delay: float, f: Callable[[], None]) -> None:
        """
        Run C{f} after C{delay} seconds unless the stream ends first; one
        timer per C{name}.
        """
        timers = self._timers
        if timers is None:
            timers = self._timers = {}
        old = timers.pop(name, None)
        if old is not None and old.active():
            old.cancel()

        def fire() -> None:
            timers.pop(name, None)
            if not self.closed:
                f()

        timers[name] = self.reactor.callLater(delay, fire)

    def end(self) -> None:
        """
        Forget the stream: detach from the hub, drop the queue and the
        timers.  Idempotent; the framer closes the connection itself.
        """
        if self.closed:
            return
        self.closed = True
        if self._timers is not None:
            for timer in self._timers.values():
                if timer.active():
                    timer.cancel()
            self._timers = None
        if self.beatEntry is not None:
            heartbeatTimer(self.reactor).cancel(self)
        self._dropQueue()
        if self.subscription is not None:
            self.subscription.close()
        self.entrypoint.live.discard(self)

    def goodbye(self, reason: Goodbye) -> None:
        """
        End the stream and tell the client why, through the framer.
        """
        if self.closed:
            return
        if self.headSent and self.queue:
            if reason.kind in (Goodbye.TOO_SLOW, Goodbye.SHED):
                # The client is not reading: finishing the frame would only
                # buffer the rest of it.  It resumes from its last whole frame.
                reason.midFrame = True
            else:
                entry = self.queue[0]
                rest = entry.frame[self.headSent:]
                if entry.cursor is not None:
                    self.written = entry.cursor
                self.headSent = 0
                self._emit(rest)
        cursor = self.written
        self.end()
        self.framer.goodbye(reason, cursor)

    def shutdown(self) -> None:
        """
        Close the connection because the gateway is stopping.
        """
        self.goodbye(Goodbye(Goodbye.STOPPING))

    def credentialsExpired(self) -> None:
        """
        Close the connection because the caller's credentials expired or
        were revoked.
        """
        self.goodbye(Goodbye(Goodbye.EXPIRED))

    def shed(self) -> None:
        """
        Cut this stream because the node holds more than max-queued-bytes
        and this one has the most queued.
        """
        self.log.info("{api}: shedding subscriber {consumer} with {size} bytes queued (max-queued-bytes)",
                      api=self.api.name, consumer=self.call.consumer.id, size=self.queuedBytes)
        self.tally.shed += 1
        self._cut(Goodbye.SHED, f"among the furthest behind when the gateway held more than "
                  f"max-queued-bytes ({self.ledger.limit} bytes)")

    # ISubscriber

    def started(self, cursor: Cursor) -> None:
        if self.closed:
            return
        self.written = cursor
        self.lastWrite = self.reactor.seconds()
        if not self.framer.open(self, cursor):
            self.end()
            return
        self.opened = True
        if self.heartbeat > 0:
            heartbeatTimer(self.reactor).schedule(self, self.heartbeat)
        if self.maxDuration > 0:
            self.later("max-duration", self.maxDuration, lambda: self.goodbye(Goodbye(Goodbye.MAX_DURATION)))

    def deliver(self, events: List[Event]) -> None:
        if self.closed:
            return
        count = len(events)
        self.sent += count
        self.tally.messagesOut += count
        encode = self.framer.event
        frames = [encode(event) for event in events]
        if not (self.paused or self.throttled or self.queue or self.meter is not None):
            # The common case, without a queue entry per message.
            data = frames[0] if count == 1 else None
            size = len(data) if data is not None else sum(map(len, frames))
            if size <= FLUSH_BYTES:
                self.written = events[-1].cursor
                self._emit(data if data is not None else b"".join(frames))
                return
        self.push([QueueEntry(frame, event.cursor, MESSAGE, len(frame))
                   for frame, event in zip(frames, events, strict=True)])

    def advanced(self, cursor: Cursor) -> None:
        if self.closed:
            return
        frame = self.framer.advance(cursor)
        if frame is None:
            return
        entry = QueueEntry(frame, cursor, ADVANCE, len(frame))
        queue = self.queue
        if queue and queue[-1].kind == ADVANCE and (len(queue) > 1 or not self.headSent):
            # Only the latest position matters to a client that has not
            # seen the earlier ones yet.
            old = queue[-1]
            queue[-1] = entry
            self.queuedBytes += entry.size - old.size
            self.ledger.release(old)
            self.ledger.hold(self, [entry])
            return
        self.push([entry])

    def gap(self, cursor: Cursor, reason: str) -> None:
        if self.closed:
            return
        self.log.info("{api}: gap in {topic}, resuming at {cursor}: {reason}", api=self.api.name,
                      topic=self.api.config.topic, cursor=cursor.encode(self.tag), reason=reason)
        frame = self.framer.gap(cursor, reason)
        if frame is not None:
            self.push([QueueEntry(frame, cursor, NOTICE, len(frame))])

    def failed(self, reason: Failure) -> None:
        if self.closed:
            return
        self.log.info("{api}: upstream of {topic} failed: {reason}", api=self.api.name,
                      topic=self.api.config.topic, reason=reason.getErrorMessage())
        self.goodbye(Goodbye(Goodbye.FAILED, failure=reason))

    # the outbound queue

    def push(self, entries: List[QueueEntry]) -> None:
        """
        Queue C{entries} behind what waits already, and write what the
        transport takes now.
        """
        if self.queue is NO_QUEUE:
            self.queue = deque(entries)
        else:
            self.queue.extend(entries)
        size = 0
        for entry in entries:
            size += entry.size
            if entry.kind == MESSAGE:
                self.queuedMessages += 1
        self.queuedBytes += size
        self.ledger.hold(self, entries)
        if not (self.paused or self.throttled):
            self._drain()
        if self.closed:
            return
        if self.queuedMessages > self.queueLimit:
            self._cut(Goodbye.TOO_SLOW, f"more than {self.queueLimit} messages behind")
        elif self.queuedBytes > self.queueBytesLimit:
            self._cut(Goodbye.TOO_SLOW, f"more than {self.queueBytesLimit} bytes behind")
        else:
            self.ledger.shedIfOver()

    def _drain(self) -> None:
        # Write the queue while the transport takes it: whole frames up to
        # FLUSH_BYTES in one write, a larger frame as the framer can.
        queue = self.queue
        while queue and not (self.paused or self.throttled or self.closed):
            if self.headSent:
                self._writePart(queue[0])
                continue
            batch: List[QueueEntry] = []
            size = 0
            for entry in queue:
                if batch and size + entry.size > FLUSH_BYTES:
                    break
                batch.append(entry)
                size += entry.size
                if size >= FLUSH_BYTES:
                    break
            granted = self._metered(batch)
            if self.closed or granted == 0:
                return
            if granted < len(batch):
                batch = batch[:granted]
                size = sum(e.size for e in batch)
            if size > FLUSH_BYTES:
                # One frame larger than a slice: written from the shared
                # bytes, as much as the connection takes.
                self._writePart(batch[0])
                continue
            for _ in batch:
                self._popHead()
            self.queuedBytes -= size
            for entry in reversed(batch):
                if entry.cursor is not None:
                    self.written = entry.cursor
                    break
            self._emit(batch[0].frame if len(batch) == 1 else b"".join([e.frame for e in batch]))
        if not queue:
            self.ledger.members.discard(self)
            self.queue = NO_QUEUE
        if not (self.paused or self.throttled or self.closed) and self.subscription is not None:
            self.subscription.resume()

    def _writePart(self, entry: QueueEntry) -> None:
        # The head of the queue is a large frame: written on from where it
        # got to, from views of the shared bytes (evgate.directwrite).
        start = self.headSent
        end = self.framer.writeFrom(entry.frame, start)
        if self.closed:
            return
        self.queuedBytes -= end - start
        self._count(end - start)
        if end >= entry.size:
            self._popHead()
            if entry.cursor is not None:
                self.written = entry.cursor
        else:
            self.headSent = end

    def _popHead(self) -> None:
        entry = self.queue.popleft()
        self.headSent = 0
        if entry.kind == MESSAGE:
            self.queuedMessages -= 1
        self.ledger.release(entry)

    def _dropQueue(self) -> None:
        self.ledger.leave(self, self.queue)
        self.queue = NO_QUEUE
        self.queuedMessages = 0
        self.queuedBytes = 0
        self.headSent = 0

    def _emit(self, data: bytes) -> None:
        self._count(len(data))
        self.framer.write(data)

    def _count(self, size: int) -> None:
        self.bytesOut += size
        self.tally.bytesOut += size
        self.lastWrite = self.reactor.seconds()

    def _metered(self, batch: List[QueueEntry]) -> int:
        """
        How many entries at the head of C{batch} the consumer's message
        budget lets out now; when not all, the stream is throttled until
        the budget allows more, or ends when that is more than
        L{THROTTLE_MAX} seconds away (a quota).
        """
        if self.meter is None:
            return len(batch)
        count = sum(1 for e in batch if e.kind == MESSAGE)
        if count == 0:
            return len(batch)
        granted, wait = self.meter.take(count)
        if granted == count:
            return len(batch)
        cut, seen = len(batch), 0
        for index, entry in enumerate(batch):
            if entry.kind == MESSAGE:
                if seen == granted:
                    cut = index
                    break
                seen += 1
        if cut:
            # What the budget grants goes out now; the rest waits its turn.
            self._writeGranted(batch[:cut])
        if wait > THROTTLE_MAX:
            self.log.info("{api}: {consumer} used up its messages; ending its stream for {wait:.0f} s",
                          api=self.api.name, consumer=self.call.consumer.id, wait=wait)
            self.goodbye(Goodbye(Goodbye.QUOTA, retryAfter=wait))
            return 0
        self.throttled = True
        if self.subscription is not None:
            self.subscription.pause()
        self.later("throttle", wait, self._unthrottle)
        return 0

    def _writeGranted(self, head: List[QueueEntry]) -> None:
        for _ in head:
            self._popHead()
        self.queuedBytes -= sum(e.size for e in head)
        for entry in reversed(head):
            if entry.cursor is not None:
                self.written = entry.cursor
                break
        self._emit(head[0].frame if len(head) == 1 else b"".join([e.frame for e in head]))

    def _unthrottle(self) -> None:
        self.throttled = False
        if not self.paused:
            self.resumeProducing()

    def _cut(self, kind: str, detail: str) -> None:
        self.log.info("{api}: subscriber {consumer} fell {detail}; closing it",
                      api=self.api.name, consumer=self.call.consumer.id, detail=detail)
        self.tally.dropped += self.queuedMessages
        self.goodbye(Goodbye(kind, detail))

    def beat(self) -> None:
        """
        The heartbeat timer: write a heartbeat if nothing was written for
        C{heartbeat} seconds, and set the next.
        """
        if self.closed:
            return
        idle = self.reactor.seconds() - self.lastWrite
        if idle >= self.heartbeat - 1e-6:
            # A paused transport is full already; a heartbeat would only
            # queue behind the data that proves the stream is alive.
            if not self.paused and not self.queue:
                frame = self.framer.heartbeat()
                if frame is not None:
                    self.lastWrite = self.reactor.seconds()
                    self.framer.write(frame)
            delay = self.heartbeat
        else:
            delay = self.heartbeat - idle
        heartbeatTimer(self.reactor).schedule(self, delay)

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
        self._drain()

    def stopProducing(self) -> None:
        self.end()


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
