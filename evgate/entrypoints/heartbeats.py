"""
One timer for the heartbeats of every stream on a reactor.

An idle stream writes a heartbeat every C{heartbeat} seconds (15 by
default), so every open stream has one heartbeat due at any time.  A
C{DelayedCall} each, with the closure that ran it, was about 800 bytes of
an idle stream's 11 KiB; here a stream's due time is a three-item list in
one heap, and one C{DelayedCall} waits for the earliest.

A stream that ends is not taken out of the heap (that would be a search):
its entry forgets the stream, so that an ended stream is freed at once and
only the small entry waits until its time.  When no stream is waiting the
heap is emptied and the timer cancelled, so that a reactor with no streams
has no call pending.
"""

from __future__ import annotations

import heapq
import itertools
import weakref
from typing import Any, List, Optional
from weakref import WeakKeyDictionary

# Due times within this much of now are due: a call scheduled for a time
# computed as now + delay may run a rounding error before it.
EPSILON = 1e-6


class HeartbeatTimer:
    """
    The heartbeats due on one reactor: L{schedule} a stream's next beat,
    L{cancel} it when the stream ends; a due stream's C{beat()} is called.
    """

    __slots__ = ("_reactor", "_heap", "_call", "_waiting", "_order", "__weakref__")

    def __init__(self, reactor: Any) -> None:
        # Weakly: the timers are kept in a dictionary weakly keyed by their
        # reactor, and a value that refers to its key would keep both.
        self._reactor = weakref.ref(reactor)
        # [due, order, stream or None]: lists, so that cancel can blank
        # the stream out; order makes equal times first-come first-served
        # and keeps the comparison away from the streams.
        self._heap: List[List[Any]] = []
        self._call: Any = None
        self._waiting = 0
        self._order = itertools.count()

    @property
    def reactor(self) -> Any:
        """
        The reactor these heartbeats are due on.
        """
        return self._reactor()

    def schedule(self, stream: Any, delay: float) -> None:
        """
        Call C{stream.beat()} in C{delay} seconds (instead of any beat it
        had due).  The stream keeps its entry in C{stream.beatEntry}.
        """
        self.cancel(stream)
        entry = [self.reactor.seconds() + delay, next(self._order), stream]
        stream.beatEntry = entry
        heapq.heappush(self._heap, entry)
        self._waiting += 1
        self._arm()

    def cancel(self, stream: Any) -> None:
        """
        Forget C{stream}'s next beat, if it has one.
        """
        entry: Optional[List[Any]] = stream.beatEntry
        if entry is None:
            return
        stream.beatEntry = None
        entry[2] = None
        self._waiting -= 1
        if not self._waiting:
            self._heap.clear()
            if self._call is not None and self._call.active():
                self._call.cancel()
            self._call = None

    def _arm(self) -> None:
        heap = self._heap
        if not heap:
            return
        due = heap[0][0]
        call = self._call
        if call is not None and call.active():
            if call.getTime() <= due:
                return
            call.cancel()
        self._call = self.reactor.callLater(max(0.0, due - self.reactor.seconds()), self._fire)

    def _fire(self) -> None:
        self._call = None
        heap = self._heap
        now = self.reactor.seconds() + EPSILON
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            stream = entry[2]
            if stream is not None:
                entry[2] = None
                stream.beatEntry = None
                self._waiting -= 1
                stream.beat()
        if not self._waiting:
            heap.clear()
        else:
            self._arm()


_timers: "WeakKeyDictionary[Any, HeartbeatTimer]" = WeakKeyDictionary()


def heartbeatTimer(reactor: Any) -> HeartbeatTimer:
    """
    The L{HeartbeatTimer} of C{reactor}.
    """
    timer = _timers.get(reactor)
    if timer is None:
        timer = _timers[reactor] = HeartbeatTimer(reactor)
    return timer
