"""
The fan-out hub: one upstream subscription per (endpoint, topic) on a node,
shared by every live subscriber of that topic.

Design
======

A L{SharedStream} reads its topic from the live head.  Every message it
receives becomes one L{Event}: the message plus the cursor that resumes right
after it.  The event is made once and handed to every subscriber, so any
per-message work an entrypoint caches on it (an encoded cursor, an SSE frame)
is done once per message, not once per subscriber.

The stream keeps its last C{window} events in a L{ReplayWindow}
(L{evgate.replay}, with L{Event}).  A
subscriber that arrives with a cursor inside the window is replayed from
memory and then joins the live stream; one with an older cursor (or
C{start = earliest}) gets a L{PrivateStream}, its own upstream subscription
that seeks to its cursor.  Private streams never hand over to the shared one:
the handover would race the live stream for the same offsets, and a client
that catches up reconnects into the window anyway.

A subscriber's ids are the stream's cursors, except while a subscriber that
resumed with a cursor is ahead of the stream on some partition (only possible
with several partitions); until the stream overtakes it there, its events
carry the per-partition maximum of both, so that an id never points before
what the client already saw.

Pausing: a subscriber whose transport pushes back calls
L{HubSubscription.pause}; it keeps receiving and queues up to its own bound
(and is cut when that overflows: see the entrypoints).  The upstream read is
paused only when every subscriber of the stream is paused, so one slow client
never slows the others.  A private stream pauses its upstream read with its
only subscriber.

Idle shared streams stay open for C{idleGrace} seconds after their last
subscriber left, so that long-polling clients find a warm window between
polls.

The streams and the subscription are in L{evgate.hubstreams}; this module
keeps the L{Hub}, which makes them and parks private streams between the
pages of a long poll, and re-exports their names.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Optional, Tuple

from twisted.logger import Logger

from evgate.hubstreams import HubSubscription, PrivateStream, SharedStream
from evgate.interfaces import IConnector, ISubscriber
from evgate.message import Cursor
from evgate.replay import Event, Filter, ReplayWindow, Start

__all__ = ["Event", "Filter", "ReplayWindow", "Start", "HubSubscription", "SharedStream", "PrivateStream", "Hub"]


class Hub:
    """
    The fan-out point of one gateway node.
    """

    log = Logger()

    def __init__(self, connectors: Dict[str, IConnector], reactor: Any, window: int = 10000,
                 idleGrace: float = 30.0, parkTime: float = 10.0, maxParked: int = 16) -> None:
        self.connectors = connectors
        self.reactor = reactor
        self.window = window
        self.idleGrace = idleGrace
        self.streams: Dict[Tuple[str, str], SharedStream] = {}
        # Private reads kept for the next page of a long poll, by where
        # that page starts; the oldest goes first when there are too many.
        self.parkTime = parkTime
        self.maxParked = maxParked
        self.parked: "OrderedDict[Tuple[int, str, Cursor], PrivateStream]" = OrderedDict()
        # The node's ledger of queued stream frames
        # (evgate.entrypoints.queues.QueueLedger), made by the first stream.
        self.streamQueues: Any = None

    def subscribe(self, endpoint: str, topic: str, start: Start, subscriber: ISubscriber,
                  filter: Optional[Filter] = None, view: Any = None) -> HubSubscription:
        """
        Attach C{subscriber} to C{topic} of C{endpoint} from C{start}
        (C{"latest"}, C{"earliest"} or a L{Cursor}).

        A cursor inside the window is replayed at once: C{subscriber} may
        be started, given events, and even be done with them, before this
        returns its subscription.  A subscriber that ended (or paused)
        meanwhile must close (or pause) the subscription once it has it,
        or the subscription stays on the stream for as long as it lives.

        @param view: the delivery pipeline of the subscriber's API
            (L{evgate.pipeline.Pipeline.hubView}), or L{None}: its events
            are transformed before the filter sees them.
        """
        connector = self.connectors[endpoint]
        stream = self.streams.get((endpoint, topic))
        if stream is None:
            stream = self.streams[(endpoint, topic)] = SharedStream(self, connector, topic, self.window)
        subscription = HubSubscription(stream, subscriber, filter, None, view)
        if start == "latest":
            stream.attach(subscription, start)
        elif isinstance(start, Cursor) and (stream.head is None or stream.canReplay(start)):
            # A stream that is still starting decides when it knows its head.
            stream.attach(subscription, start)
        else:
            if not stream.subscriptions and not stream.pending:
                # Nobody is on the shared stream yet; it warms the window for
                # the next reader, and closes if nobody comes.
                stream.scheduleIdle()
            parked = self.parked.pop((id(connector), topic, start), None) if isinstance(start, Cursor) else None
            if parked is not None:
                self._stopParkTimer(parked)
                # Adopted on the next turn: the subscriber holds its
                # subscription only once this call returned.
                self.reactor.callLater(0, self._adopt, parked, subscription)
            else:
                self.attachPrivate(subscription, start)
        return subscription

    def _adopt(self, stream: PrivateStream, subscription: HubSubscription) -> None:
        if subscription.closed:
            stream.parkedAt = None
            stream.upstream.close()
            return
        stream.adopt(subscription)

    def park(self, stream: PrivateStream, cursor: Cursor) -> bool:
        """
        Keep C{stream} for a subscriber starting at C{cursor}, for
        C{parkTime} seconds.

        @return: whether it is kept (not when parking is off).
        """
        if self.maxParked <= 0 or self.parkTime <= 0:
            return False
        key = (id(stream.connector), stream.topic, cursor)
        previous = self.parked.pop(key, None)
        if previous is not None:
            self._drop(previous)
        while len(self.parked) >= self.maxParked:
            _, oldest = self.parked.popitem(last=False)
            self._drop(oldest)
        self.parked[key] = stream
        stream.parkTimer = self.reactor.callLater(self.parkTime, self._expire, key, stream)
        return True

    def unpark(self, stream: PrivateStream) -> None:
        """
        Forget C{stream} if it is parked (it failed or jumped a gap).
        """
        for key, value in list(self.parked.items()):
            if value is stream:
                del self.parked[key]
        self._stopParkTimer(stream)
        stream.parkedAt = None

    def _expire(self, key: Tuple[int, str, Cursor], stream: PrivateStream) -> None:
        stream.parkTimer = None
        if self.parked.get(key) is stream:
            del self.parked[key]
            self._drop(stream)

    def _drop(self, stream: PrivateStream) -> None:
        self._stopParkTimer(stream)
        stream.parkedAt = None
        stream.upstream.close()

    def _stopParkTimer(self, stream: PrivateStream) -> None:
        if stream.parkTimer is not None and stream.parkTimer.active():
            stream.parkTimer.cancel()
        stream.parkTimer = None

    def attachPrivate(self, subscription: HubSubscription, start: Start) -> None:
        """
        Serve C{subscription} from an upstream read of its own.
        """
        shared = subscription.stream
        PrivateStream(self, shared.connector, shared.topic, subscription, start)

    def streamEnded(self, stream: SharedStream) -> None:
        """
        Forget a shared stream that closed or failed.
        """
        for key, value in list(self.streams.items()):
            if value is stream:
                del self.streams[key]

    def close(self) -> None:
        """
        Close every shared stream and parked read (at shutdown).
        """
        for stream in list(self.streams.values()):
            stream.close()
        parked = list(self.parked.values())
        self.parked.clear()
        for private in parked:
            self._drop(private)
