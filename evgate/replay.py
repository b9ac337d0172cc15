"""
What the hub hands to subscribers, and what it keeps for late ones: the
L{Event} of one message (with the encodings entrypoints share through it)
and the L{ReplayWindow} of a shared stream.  Split from L{evgate.hub}, which
re-exports both.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Deque, Dict, Optional, Sequence, Union

from evgate.message import Cursor, Message

# A filter judges an Event, not a bare Message, so that what it derives from
# a message (parsed content, its verdict) is cached on the event once for
# every subscriber (see evgate.filters).
Filter = Callable[["Event"], bool]
Start = Union[str, Cursor]


class Event:
    """
    One message as the hub hands it to subscribers: the message, the cursor
    that resumes right after it, and a cache of encodings that entrypoints
    compute once per message.
    """

    __slots__ = ("message", "cursor", "_tokens", "frames")

    def __init__(self, message: Message, cursor: Cursor) -> None:
        self.message = message
        self.cursor = cursor
        self._tokens: Optional[Dict[bytes, str]] = None
        self.frames: Dict[Any, Any] = {}

    def token(self, tag: bytes) -> str:
        """
        The encoded cursor of this event for the API whose tag is C{tag},
        computed once.
        """
        tokens = self._tokens
        if tokens is None:
            tokens = self._tokens = {}
        token = tokens.get(tag)
        if token is None:
            token = tokens[tag] = self.cursor.encode(tag)
        return token


class ReplayWindow:
    """
    The last C{size} events of a shared stream, and the cursor at which the
    oldest of them begins.
    """

    def __init__(self, size: int, start: Cursor) -> None:
        self.size = size
        self.events: Deque[Event] = deque()
        self.start = start

    def append(self, events: Sequence[Event]) -> None:
        """
        Keep C{events}, forgetting the oldest beyond C{size}.
        """
        if self.size == 0:
            if events:
                self.start = events[-1].cursor
            return
        self.events.extend(events)
        while len(self.events) > self.size:
            self.start = self.events.popleft().cursor

    def covers(self, cursor: Cursor, head: Cursor) -> bool:
        """
        Whether every message after C{cursor} up to C{head} is in the
        window.
        """
        if cursor.epoch != self.start.epoch:
            return False
        offsets = cursor.asDict()
        headOffsets = head.asDict()
        if set(offsets) - set(headOffsets):
            return False
        for partition, first in self.start.offsets:
            wanted = offsets.get(partition)
            if wanted is None or wanted < first or wanted > headOffsets.get(partition, first):
                return False
        return True
