"""
The outbound queues of the streaming entrypoints: what one queued frame is
(L{QueueEntry}) and the node-wide account of queued bytes (L{QueueLedger}).

A frame shared by many subscribers is one object in many queues, so the
ledger counts its bytes once, however many queues hold it.  Each stream
may queue C{subscriber-queue-bytes}; every stream of the node together
C{max-queued-bytes}, past which the ledger cuts the stream with the most
bytes queued.  The subscriber that fills and drains a queue is
L{evgate.entrypoints.streaming.StreamSubscriber}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Set

from evgate.ini import SectionReader, gatewayKeys
from evgate.message import Cursor

if TYPE_CHECKING:
    from evgate.entrypoints.streaming import StreamSubscriber

DEFAULT_QUEUE_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_QUEUED_BYTES = 256 * 1024 * 1024

# Queue entry kinds.
MESSAGE, ADVANCE, NOTICE = "message", "advance", "notice"


@gatewayKeys
def parseStreamQueueKeys(section: SectionReader) -> Mapping[str, Any]:
    """
    C{subscriber-queue-bytes} (bytes one stream may queue) and
    C{max-queued-bytes} (bytes every stream of the node may queue in all).
    """
    return {
        "subscriberQueueBytes": section.getInt("subscriber-queue-bytes", DEFAULT_QUEUE_BYTES, minimum=1024,
                                               maximum=2**40),
        "maxQueuedBytes": section.getInt("max-queued-bytes", DEFAULT_MAX_QUEUED_BYTES, minimum=1024,
                                         maximum=2**44),
    }


class QueueEntry:
    """
    One frame waiting for its transport.

    @ivar cursor: the position a client holds once the frame reached it, or
        L{None} for frames that do not move it.
    """

    __slots__ = ("frame", "cursor", "kind", "size")

    def __init__(self, frame: bytes, cursor: Optional[Cursor], kind: str, size: int) -> None:
        self.frame = frame
        self.cursor = cursor
        self.kind = kind
        self.size = size


class QueueLedger:
    """
    The bytes of frames queued by every stream of a node, each frame
    counted once however many queues hold it (they hold the same object),
    and the streams holding them, to shed the slowest when there are too
    many.

    @ivar limit: C{max-queued-bytes}.
    @ivar total: bytes of distinct frames queued now.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self.holders: Dict[int, List[int]] = {}
        self.members: Set["StreamSubscriber"] = set()
        self.shedding = False

    def hold(self, subscriber: "StreamSubscriber", entries: List[QueueEntry]) -> None:
        """
        C{subscriber} queued C{entries}.
        """
        holders = self.holders
        for entry in entries:
            key = id(entry.frame)
            held = holders.get(key)
            if held is None:
                holders[key] = [entry.size, 1]
                self.total += entry.size
            else:
                held[1] += 1
        self.members.add(subscriber)

    def release(self, entry: QueueEntry) -> None:
        """
        One queue let go of C{entry} (written or dropped).
        """
        key = id(entry.frame)
        held = self.holders.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] <= 0:
            del self.holders[key]
            self.total -= held[0]

    def leave(self, subscriber: "StreamSubscriber", entries: Any) -> None:
        """
        C{subscriber} dropped its queue, C{entries}.
        """
        for entry in entries:
            self.release(entry)
        self.members.discard(subscriber)

    def shedIfOver(self) -> None:
        """
        While the node holds more than L{limit}, cut the stream with the
        most bytes queued.
        """
        if self.shedding or self.total <= self.limit:
            return
        self.shedding = True
        try:
            while self.total > self.limit and self.members:
                slowest = max(self.members, key=lambda s: s.queuedBytes)
                if slowest.queuedBytes == 0:
                    break
                slowest.shed()
                self.members.discard(slowest)
        finally:
            self.shedding = False


def ledgerFor(api: Any) -> QueueLedger:
    """
    The node's L{QueueLedger} (kept on its hub), its limit as configured
    now.
    """
    hub = api.hub
    options = api.node.settings.options or {}
    limit = options.get("maxQueuedBytes", DEFAULT_MAX_QUEUED_BYTES)
    ledger: Optional[QueueLedger] = getattr(hub, "streamQueues", None)
    if ledger is None:
        ledger = hub.streamQueues = QueueLedger(limit)
    ledger.limit = limit
    return ledger
