"""
Tests for L{evgate.heap}: the collector settings of a gateway process.
"""

from __future__ import annotations

import gc
from typing import Any, Callable, List

from twisted.trial.unittest import SynchronousTestCase

from evgate import heap


class StartingReactor:
    """
    Just enough of a reactor for start-up: what C{callWhenRunning} was
    given, run by L{run}.
    """

    def __init__(self) -> None:
        self.whenRunning: List[Callable[[], Any]] = []

    def callWhenRunning(self, f: Callable[..., Any], *args: Any) -> None:
        self.whenRunning.append(lambda: f(*args))

    def run(self) -> None:
        for f in self.whenRunning:
            f()


class TuneCollectorTests(SynchronousTestCase):
    """
    L{heap.tuneCollector} raises the young generation's threshold at once
    and freezes the start-up heap once the reactor runs.
    """

    def setUp(self) -> None:
        threshold = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *threshold)
        self.addCleanup(gc.unfreeze)

    def test_threshold(self) -> None:
        """
        The young generation waits for L{heap.YOUNG_THRESHOLD}
        allocations; the older generations keep their settings.
        """
        gc.set_threshold(700, 11, 12)
        heap.tuneCollector(StartingReactor())
        self.assertEqual(gc.get_threshold(), (heap.YOUNG_THRESHOLD, 11, 12))

    def test_freezeWhenRunning(self) -> None:
        """
        Nothing is frozen until the reactor runs; then what start-up made
        is frozen, and what is made later is still collected.
        """
        gc.unfreeze()
        reactor = StartingReactor()
        heap.tuneCollector(reactor)
        self.assertEqual(gc.get_freeze_count(), 0)
        startup: List[Any] = []
        startup.append(startup)
        reactor.run()
        self.assertGreater(gc.get_freeze_count(), 0)
        later: List[Any] = []
        later.append(later)
        # gc.get_objects() lists what the collector walks.
        self.assertFalse(any(o is startup for o in gc.get_objects()))
        self.assertTrue(any(o is later for o in gc.get_objects()))

    def test_garbageCollectedFirst(self) -> None:
        """
        Cyclic garbage left by start-up is collected before the freeze,
        not frozen with the rest.
        """
        gc.unfreeze()
        reactor = StartingReactor()
        heap.tuneCollector(reactor)
        collected: List[int] = []

        def note(phase: str, info: Any) -> None:
            if phase == "stop" and info["generation"] == 2:
                collected.append(info["collected"])

        gc.callbacks.append(note)
        self.addCleanup(gc.callbacks.remove, note)
        cycle: List[Any] = []
        cycle.append(cycle)
        del cycle
        reactor.run()
        self.assertTrue(collected and collected[0] >= 1)
