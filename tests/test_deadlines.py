"""
Tests for L{evgate.deadlines}.
"""

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from evgate.deadlines import atDeadline


class AtDeadlineTests(SynchronousTestCase):
    """
    L{atDeadline} runs its clean-up only when the Deferred is late.
    """

    def test_late(self) -> None:
        """
        When the time is up first, the clean-up runs once and fires the
        Deferred.
        """
        clock = Clock()
        d: Deferred = Deferred()
        calls = []

        def late() -> None:
            calls.append(clock.seconds())
            d.errback(ValueError("late"))

        self.assertIs(atDeadline(clock, 5.0, d, late), d)
        clock.advance(4.9)
        self.assertEqual(calls, [])
        clock.advance(0.1)
        self.assertEqual(calls, [5.0])
        self.failureResultOf(d, ValueError)

    def test_firedFirst(self) -> None:
        """
        A Deferred that fires in time keeps its result, and the timer is
        gone from the reactor.
        """
        clock = Clock()
        d: Deferred = Deferred()
        atDeadline(clock, 5.0, d, lambda: self.fail("late ran"))
        d.callback("done")
        self.assertEqual(self.successResultOf(d), "done")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_firedButPaused(self) -> None:
        """
        A Deferred that fired but whose callbacks wait on another Deferred
        is not late: the clean-up does not run.
        """
        clock = Clock()
        d: Deferred = Deferred()
        inner: Deferred = Deferred()
        d.addCallback(lambda _: inner)
        atDeadline(clock, 1.0, d, lambda: self.fail("late ran"))
        d.callback(None)
        clock.advance(2.0)
        inner.callback("later")
        self.assertEqual(self.successResultOf(d), "later")
