"""
The delivery window of one webhook subscription: which messages may be out
at once, and how far the stored position may move.

Design
======

A subscription with C{max-in-flight = N} has up to N messages I{holding a
place}: being sent, waiting for a retry, or being dead-lettered.  Messages
come from the feed in stream order and are taken in that order, with one
rule: two messages of the same I{ordering key} are never out together.  A
message whose key already has one out is I{parked} behind it (it holds no
place, so other keys go on), and when that one settles the first parked
message of the key inherits its place at once, ahead of the queue, since
it came earlier in the stream.  So:

 - per key, the receiver sees the stream's order, whatever the retries,
   backoffs and dead letters of other keys do: a key's next message is
   sent only after the one before it settled (2xx or dead letters);
 - a key that keeps failing holds one place; the others use the rest.
   When every place is held by a message waiting for a retry, the
   subscription waits (as with N = 1), which bounds what a receiver that
   is down makes the gateway hold.

The ordering key is the partition and the message key.  A message without
a key has no order to keep (Kafka spreads such messages over partitions as
it likes): it waits for nobody.  With N = 1 (the default) there is only
one place, so every message waits for the one before it: the stream's
order, keyed or not.

The position moves per partition: over the longest prefix of that
partition's messages (in the window) that are all settled.  Each partition
has a I{lane}, its messages in stream order; settling a message pops the
settled front of its lane.  A message that is settled behind one that is
not stays in its lane, so that after a crash it is delivered again
(at-least-once), never skipped.

Every operation is O(1) amortised per message: the deliverer calls
L{DeliveryWindow.settle} once per message, and the counts the feeds read
for backpressure are kept, not recounted.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Deque, Dict, Hashable, Iterable, List, Optional, Set, Tuple

from evgate.message import Cursor

# The state of a parked attempt: taken from the queue, behind an unsettled
# message of the same key.
PARKED = "parked"
# The state of a settled attempt (the deliverer's DONE).
SETTLED = "done"
# The state of an attempt that may be sent (the deliverer's IDLE).
READY = "idle"


def orderingKey(message: Any) -> Optional[Hashable]:
    """
    What orders C{message} against others in a window: its partition and
    key, or L{None} for a message without a key (it keeps no order).
    """
    key = message.key
    if key is None:
        return None
    return (message.partition, key)


class DeliveryWindow:
    """
    The messages of one subscription taken from its feed and not yet passed
    by its position.

    The window sets the C{state} of the attempts it hands out to
    L{PARKED}, L{READY} and L{SETTLED}; the deliverer owns the states in
    between.

    @ivar limit: how many attempts may hold a place (C{max-in-flight}).
    @ivar queue: events handed over by the feed, not taken yet.
    @ivar outstanding: the attempts holding a place.
    @ivar unsettled: attempts taken and not settled (parked ones included).
    """

    __slots__ = ("limit", "queue", "outstanding", "unsettled", "_keys", "_lanes", "_ready", "_make")

    def __init__(self, limit: int, make: Any) -> None:
        """
        @param make: makes an attempt of an event (the deliverer's
            C{Attempt}); it must have C{event} and C{state} attributes.
        """
        self.limit = max(1, limit)
        self.queue: Deque[Any] = deque()
        self.outstanding: Set[Any] = set()
        self.unsettled = 0
        # Ordering key -> its unsettled attempts in stream order; the first
        # holds a place, the rest are parked.
        self._keys: Dict[Hashable, Deque[Any]] = {}
        # Partition -> its attempts in stream order, until the position
        # passed them.
        self._lanes: Dict[int, Deque[Any]] = {}
        # Attempts that got a place and were not handed to the deliverer yet.
        self._ready: Deque[Any] = deque()
        self._make = make

    def __len__(self) -> int:
        return self.unsettled

    def backlog(self) -> int:
        """
        Events handed over and not settled: queued, parked or holding a
        place.
        """
        return len(self.queue) + self.unsettled

    def take(self) -> List[Any]:
        """
        The attempts that may be sent now, in the order to send them: the
        parked ones that got a place first, then new ones from the queue,
        as long as places are free.
        """
        ready = self._ready
        queue = self.queue
        outstanding = self.outstanding
        keys = self._keys
        while queue and len(outstanding) < self.limit:
            event = queue.popleft()
            attempt = self._make(event)
            message = event.message
            self.unsettled += 1
            lane = self._lanes.get(message.partition)
            if lane is None:
                lane = self._lanes[message.partition] = deque()
            lane.append(attempt)
            key = orderingKey(message)
            if key is not None:
                waiting = keys.get(key)
                if waiting:
                    waiting.append(attempt)
                    attempt.state = PARKED
                    continue
                keys[key] = deque((attempt,))
            attempt.state = READY
            outstanding.add(attempt)
            ready.append(attempt)
        if not ready:
            return []
        taken = list(ready)
        ready.clear()
        return taken

    def settle(self, attempt: Any) -> Optional[Tuple[int, Cursor]]:
        """
        C{attempt} is settled (delivered or dead-lettered): free its place,
        give it to the next message of its key, and move its partition's
        lane.

        @return: C{(partition, cursor)} when the settled prefix of the
            partition moved: the cursor of the last message in it; else
            L{None}.
        """
        if attempt.state == SETTLED:
            return None
        attempt.state = SETTLED
        self.unsettled -= 1
        self.outstanding.discard(attempt)
        message = attempt.event.message
        key = orderingKey(message)
        if key is not None:
            waiting = self._keys.get(key)
            if waiting:
                if waiting[0] is attempt:
                    waiting.popleft()
                else:  # pragma: no cover - only the first of a key is ever out
                    waiting.remove(attempt)
                if waiting:
                    following = waiting[0]
                    following.state = READY
                    self.outstanding.add(following)
                    self._ready.append(following)
                else:
                    del self._keys[key]
        lane = self._lanes.get(message.partition)
        last = None
        while lane and lane[0].state == SETTLED:
            last = lane.popleft()
        if lane is not None and not lane:
            del self._lanes[message.partition]
        if last is None:
            return None
        return message.partition, last.event.cursor

    def empty(self) -> bool:
        """
        Whether nothing is queued or unsettled.
        """
        return not self.queue and not self.unsettled

    def attempts(self) -> Iterable[Any]:
        """
        Every unsettled attempt, parked ones included (any order).
        """
        for lane in self._lanes.values():
            for attempt in lane:
                if attempt.state != SETTLED:
                    yield attempt


def advancePosition(position: Optional[Cursor], partition: int, cursor: Cursor) -> Cursor:
    """
    C{position} with C{partition} moved to where C{cursor} has it (never
    back).
    """
    offset = cursor.get(partition)
    if position is None:
        return Cursor.fromMapping({partition: offset} if offset is not None else {}, cursor.epoch)
    if offset is None:
        return position
    current = position.get(partition)
    if current is not None and current >= offset:
        return position
    return position.advance(partition, offset)
