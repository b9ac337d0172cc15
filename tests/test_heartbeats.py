"""
Unit tests of the heartbeat timer that the streams of one reactor share:
beats come when due, in the order they were set, an ended stream is let go
at once, and nothing stays scheduled once no stream waits.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any, List, Optional

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from evgate.entrypoints.heartbeats import HeartbeatTimer, heartbeatTimer


class Stream:
    """
    What the timer needs of a stream: C{beatEntry} and C{beat()}.
    """

    def __init__(self, name: str, beats: List[str]) -> None:
        self.name = name
        self.beats = beats
        self.beatEntry: Optional[List[Any]] = None

    def beat(self) -> None:
        self.beats.append(self.name)


class HeartbeatTimerTests(SynchronousTestCase):
    """
    L{HeartbeatTimer} on a L{Clock}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.timer = HeartbeatTimer(self.clock)
        self.beats: List[str] = []

    def test_dueInOrder(self) -> None:
        """
        Each stream's beat comes at its time, not before; streams due at
        the same time beat in the order they were set; one reactor call
        waits for them all.
        """
        a, b, c = (Stream(n, self.beats) for n in "abc")
        self.timer.schedule(a, 15.0)
        self.timer.schedule(b, 15.0)
        self.timer.schedule(c, 5.0)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(5.0)
        self.assertEqual(self.beats, ["c"])
        self.clock.advance(9.9)
        self.assertEqual(self.beats, ["c"])
        self.clock.advance(0.1)
        self.assertEqual(self.beats, ["c", "a", "b"])

    def test_rescheduleReplaces(self) -> None:
        """
        Setting a stream's beat again replaces the one it had.
        """
        a = Stream("a", self.beats)
        self.timer.schedule(a, 15.0)
        self.timer.schedule(a, 3.0)
        self.clock.advance(15.0)
        self.assertEqual(self.beats, ["a"])

    def test_cancelLetsGo(self) -> None:
        """
        A cancelled stream is not called and not kept; once no stream
        waits, no call stays pending on the reactor.
        """
        a, b = Stream("a", self.beats), Stream("b", self.beats)
        self.timer.schedule(a, 15.0)
        self.timer.schedule(b, 20.0)
        gone = weakref.ref(a)
        self.timer.cancel(a)
        del a
        gc.collect()
        self.assertIsNone(gone())
        self.clock.advance(15.0)
        self.assertEqual(self.beats, [])
        self.timer.cancel(b)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_beatMaySetTheNext(self) -> None:
        """
        A stream may set its next beat from inside its beat.
        """
        a = Stream("a", self.beats)
        a.beat = lambda: (self.beats.append("a"), self.timer.schedule(a, 15.0))  # type: ignore[method-assign]
        self.timer.schedule(a, 15.0)
        self.clock.advance(15.0)
        self.clock.advance(15.0)
        self.assertEqual(self.beats, ["a", "a"])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_onePerReactor(self) -> None:
        """
        Every stream of a reactor shares its timer.
        """
        self.assertIs(heartbeatTimer(self.clock), heartbeatTimer(self.clock))
        self.assertIsNot(heartbeatTimer(self.clock), heartbeatTimer(Clock()))


class TimerLifetimeTests(SynchronousTestCase):
    """
    A reactor's timer does not keep its reactor alive: the timers are kept
    weakly keyed by reactor, and a timer that held its reactor would keep
    both for ever (one per test's Clock).
    """

    def test_reactorFreed(self) -> None:
        clock = Clock()
        timer = heartbeatTimer(clock)
        beats: List[str] = []
        timer.schedule(Stream("a", beats), 1.0)
        clock.advance(1.0)
        self.assertEqual(beats, ["a"])
        gone = weakref.ref(clock)
        del clock, timer
        gc.collect()
        self.assertIsNone(gone())
