"""
Unit tests of L{evgate.webhook.writes.CoalescedWrites}: a deliverer's
writes to the store, at most one in flight and at most one started every
L{WRITE_INTERVAL} seconds, and at once when someone waits for them.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from evgate.webhook.writes import WRITE_INTERVAL, CoalescedWrites


class PendingStore:
    """
    A store whose updates wait for the test to answer them.
    """

    def __init__(self) -> None:
        self.updates: List[Tuple[Dict[str, Any], Dict[str, int], Deferred]] = []

    def update(self, kind: str, id: str, changes: Any, increments: Any = None) -> Deferred:
        d: Deferred = Deferred()
        self.updates.append((dict(changes), dict(increments or {}), d))
        return d

    def answer(self, index: int = -1) -> None:
        """
        The store made update C{index}.
        """
        self.updates[index][2].callback({"id": "sub_1"})


class Context:
    """
    What L{CoalescedWrites} reads from its deliverer's context.
    """

    def __init__(self, store: PendingStore) -> None:
        self.store = store
        self.tag = b"t"


class Writer(CoalescedWrites):
    """
    The least host of L{CoalescedWrites}.
    """

    log = Logger()

    def __init__(self, clock: Clock, store: PendingStore) -> None:
        self.id = "sub_1"
        self.context = Context(store)
        self.reactor = clock
        self.stopped = False
        self._initWrites(None)

    def save(self, changes: Optional[Dict[str, Any]] = None, **increments: int) -> None:
        self._save(changes or {}, **increments)


class PacedWritesTests(SynchronousTestCase):
    """
    Writes are coalesced and paced.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.store = PendingStore()
        self.writer = Writer(self.clock, self.store)

    def test_firstWriteAtOnce(self) -> None:
        """
        A change after a quiet while is written at once.
        """
        self.writer.save({"state": "active"})
        self.assertEqual([u[0] for u in self.store.updates], [{"state": "active"}])

    def test_nextWriteWaitsForTheInterval(self) -> None:
        """
        Changes made while an update is out, or within L{WRITE_INTERVAL} of
        the start of the last, wait, and go together in one update once the
        interval is over; counters add up, fields take their last value.
        """
        self.writer.save({"lastDeliveredAt": "t0"}, delivered=1)
        self.writer.save({"lastDeliveredAt": "t1"}, delivered=1)
        self.store.answer()
        self.writer.save({"lastDeliveredAt": "t2"}, delivered=1)
        self.assertEqual(len(self.store.updates), 1)
        self.clock.advance(WRITE_INTERVAL * 0.9)
        self.assertEqual(len(self.store.updates), 1)
        self.clock.advance(WRITE_INTERVAL * 0.1)
        self.assertEqual(self.store.updates[1][:2], ({"lastDeliveredAt": "t2"}, {"delivered": 2}))

    def test_slowStoreWritesWhenDone(self) -> None:
        """
        When the last update took longer than the interval, the next starts
        as soon as it is done.
        """
        self.writer.save(delivered=1)
        self.clock.advance(WRITE_INTERVAL * 3)
        self.writer.save(delivered=1)
        self.assertEqual(len(self.store.updates), 1)
        self.store.answer()
        self.assertEqual(self.store.updates[1][1], {"delivered": 1})

    def test_flushedWritesAtOnce(self) -> None:
        """
        Waiting for the store (a deliverer that stops) starts the update
        held back at once, and fires once it is made.
        """
        self.writer.save(delivered=1)
        self.store.answer()
        self.writer.save(delivered=1)
        done = self.writer.flushed()
        self.assertEqual(len(self.store.updates), 2)
        self.assertNoResult(done)
        self.store.answer()
        self.successResultOf(done)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_flushedWhileAnUpdateIsOut(self) -> None:
        """
        Waiting while an update is out writes what came meanwhile as soon as
        it is done, without waiting for the interval.
        """
        self.writer.save(delivered=1)
        self.writer.save(delivered=1)
        done = self.writer.flushed()
        self.store.answer()
        self.assertEqual(len(self.store.updates), 2)
        self.store.answer()
        self.successResultOf(done)

    def test_lastDeliveredAtFormattedWhenWritten(self) -> None:
        """
        A time of last delivery saved as seconds is written as an RFC 3339
        time stamp: the last one saved before the write.
        """
        self.writer.save({"lastDeliveredAt": 1.5})
        self.store.answer()
        self.writer.save({"lastDeliveredAt": 2.0})
        self.writer.save({"lastDeliveredAt": 1796601600.25})
        self.clock.advance(WRITE_INTERVAL)
        self.assertEqual([u[0]["lastDeliveredAt"] for u in self.store.updates],
                         ["1970-01-01T00:00:01.500Z", "2026-12-07T00:00:00.250Z"])

    def test_nothingToWrite(self) -> None:
        """
        With nothing held back, L{CoalescedWrites.flushed} has fired already.
        """
        self.successResultOf(self.writer.flushed())
        self.assertEqual(self.store.updates, [])
