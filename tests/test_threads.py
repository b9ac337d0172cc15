"""
Tests for L{evgate.threads}: the crossing between library threads and the
reactor.

A fake reactor records C{callFromThread} calls until the test plays the
reactor's part; the tests with real threads wait on events with a deadline,
never on sleeps.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, List, Tuple

from twisted.internet.error import ReactorNotRunning
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from evgate.threads import OwnerThread, ReactorBatches, ThreadExit, callOnReactor, deferToOwnThread, startDaemonThread

DEADLINE = 10.0


class HopReactor(Clock):
    """
    A Clock whose C{callFromThread} queues calls (from any thread) until
    L{runHops}.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.hops: List[Tuple[Callable[..., Any], tuple, dict]] = []
        self.arrived = threading.Event()

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        with self.lock:
            self.hops.append((f, args, kwargs))
        self.arrived.set()

    def runHops(self) -> None:
        """
        Run the queued calls, as the reactor thread would.
        """
        while True:
            with self.lock:
                if not self.hops:
                    self.arrived.clear()
                    return
                f, args, kwargs = self.hops.pop(0)
            f(*args, **kwargs)


class StoppedReactor(Clock):
    """
    A reactor that has stopped: C{callFromThread} raises.
    """

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        raise ReactorNotRunning("the reactor has stopped")


class CallOnReactorTests(SynchronousTestCase):
    """
    L{callOnReactor}: a single hop.
    """

    def test_hops(self) -> None:
        """
        The call runs when the reactor runs its queued calls, with its
        arguments, not before.
        """
        reactor = HopReactor()
        seen: List[Any] = []
        callOnReactor(reactor, lambda *a, **k: seen.append((a, k)), 1, two=2)
        self.assertEqual(seen, [])
        reactor.runHops()
        self.assertEqual(seen, [((1,), {"two": 2})])

    def test_stoppedReactorDropsQuietly(self) -> None:
        """
        A call made after the reactor stopped is dropped: nothing raises into
        the calling (library) thread.
        """
        callOnReactor(StoppedReactor(), self.fail, "must not run")


class ReactorBatchesTests(SynchronousTestCase):
    """
    L{ReactorBatches}: many items, one hop per batch.
    """

    def setUp(self) -> None:
        self.reactor = HopReactor()
        self.batches: List[List[int]] = []

    def test_putCoalesces(self) -> None:
        """
        Items put before the reactor ran cost one C{callFromThread} and reach
        the handler as one batch, in order.
        """
        bridge: ReactorBatches[int] = ReactorBatches(self.reactor, self.batches.append)
        for item in range(5):
            bridge.put(item)
        self.assertEqual(len(self.reactor.hops), 1)
        self.reactor.runHops()
        self.assertEqual(self.batches, [[0, 1, 2, 3, 4]])
        bridge.put(5)
        self.assertEqual(len(self.reactor.hops), 1, "a new batch after the reactor drained")
        self.reactor.runHops()
        self.assertEqual(self.batches, [[0, 1, 2, 3, 4], [5]])

    def test_addWaitsForFlush(self) -> None:
        """
        C{add} does not wake the reactor; C{flush} does, once; a flush with
        nothing collected does nothing.
        """
        bridge: ReactorBatches[int] = ReactorBatches(self.reactor, self.batches.append)
        bridge.flush()
        self.assertEqual(self.reactor.hops, [])
        bridge.add(1)
        bridge.add(2)
        self.assertEqual(len(bridge), 2)
        self.assertEqual(self.reactor.hops, [])
        bridge.flush()
        bridge.flush()
        self.assertEqual(len(self.reactor.hops), 1)
        self.reactor.runHops()
        self.assertEqual(self.batches, [[1, 2]])

    def test_handOverAt(self) -> None:
        """
        With C{handOverAt} items collected, C{add} hands them over by itself.
        """
        bridge: ReactorBatches[int] = ReactorBatches(self.reactor, self.batches.append, handOverAt=3)
        bridge.add(1)
        bridge.add(2)
        self.assertEqual(self.reactor.hops, [])
        bridge.add(3)
        self.assertEqual(len(self.reactor.hops), 1)
        self.reactor.runHops()
        self.assertEqual(self.batches, [[1, 2, 3]])

    def test_perTurn(self) -> None:
        """
        A burst larger than C{perTurn} is handled over several reactor
        turns, in order.
        """
        bridge: ReactorBatches[int] = ReactorBatches(self.reactor, self.batches.append, perTurn=2)
        for item in range(5):
            bridge.put(item)
        self.reactor.runHops()
        self.assertEqual(self.batches, [[0, 1]])
        self.reactor.advance(0)
        self.reactor.advance(0)
        self.assertEqual(self.batches, [[0, 1], [2, 3], [4]])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_handlerFailureKeepsDraining(self) -> None:
        """
        A handler that raises does not strand the items behind its batch.
        """
        def handle(items: List[int]) -> None:
            self.batches.append(items)
            raise ValueError("boom")

        bridge: ReactorBatches[int] = ReactorBatches(self.reactor, handle, perTurn=1)
        bridge.put(1)
        bridge.put(2)
        self.assertRaises(ValueError, self.reactor.runHops)
        self.assertRaises(ValueError, self.reactor.advance, 0)
        self.assertEqual(self.batches, [[1], [2]])
        bridge.put(3)
        self.assertEqual(len(self.reactor.hops), 1, "the bridge hops again after draining")

    def test_stoppedReactor(self) -> None:
        """
        Once the reactor has stopped, puts and flushes are dropped quietly
        and nothing piles up.
        """
        bridge: ReactorBatches[int] = ReactorBatches(StoppedReactor(), self.batches.append)
        bridge.put(1)
        bridge.add(2)
        bridge.flush()
        bridge.put(3)
        self.assertEqual(len(bridge), 0)
        self.assertEqual(self.batches, [])

    def test_realThreads(self) -> None:
        """
        Items put from several real threads all reach the handler, each
        thread's in its own order, with no more hops than items.
        """
        bridge: ReactorBatches[Tuple[int, int]] = ReactorBatches(self.reactor, self.batches.append)  # type: ignore[arg-type]
        count = 200
        done = [threading.Event() for _ in range(3)]

        def produce(which: int) -> None:
            for index in range(count):
                bridge.put((which, index))
            done[which].set()

        for which in range(3):
            startDaemonThread(lambda which=which: produce(which), f"test-producer-{which}")
        for event in done:
            self.assertTrue(event.wait(DEADLINE), "a producer thread did not finish")
        hops = len(self.reactor.hops)
        self.reactor.runHops()
        items = [item for batch in self.batches for item in batch]
        self.assertLessEqual(hops, 3 * count)
        self.assertEqual(len(items), 3 * count)
        for which in range(3):
            self.assertEqual([i for w, i in items if w == which], list(range(count)))


class ThreadExitTests(SynchronousTestCase):
    """
    L{ThreadExit}: the reactor side of a thread's end.
    """

    def test_waitersFire(self) -> None:
        """
        Waiters taken before the end fire at C{fire}; one taken after fires
        at once.
        """
        exits = ThreadExit()
        before = exits.when()
        self.assertNoResult(before)
        exits.fire()
        self.assertIsNone(self.successResultOf(before))
        self.assertIsNone(self.successResultOf(exits.when()))


class CountingThread(OwnerThread):
    """
    An owner thread that counts C{add} commands until asked to stop.
    """

    def __init__(self, reactor: Any, startThread: Any = startDaemonThread) -> None:
        super().__init__(reactor, startThread)
        self.total = 0
        self.reported: List[int] = []

    def run(self) -> None:
        try:
            while not self.stopRequested.is_set():
                self.runCommands(wait=DEADLINE)
        finally:
            self.callOnReactor(self.reported.append, self.total)
            self.ended()

    def do_add(self, amount: int) -> None:
        self.total += amount

    def do_stop(self) -> None:
        self.stopRequested.set()


class OwnerThreadTests(SynchronousTestCase):
    """
    L{OwnerThread}: commands in, one exit out.
    """

    def test_commandsInOrderThenExit(self) -> None:
        """
        Commands run on the thread in the order sent; the exit Deferred
        fires on the reactor after the thread's last hop, not before.
        """
        reactor = HopReactor()
        taken: List[Tuple[Callable[[], None], str]] = []
        thread = CountingThread(reactor, lambda target, name: taken.append((target, name)))
        thread.start()
        [(target, name)] = taken
        self.assertEqual(name, "evgate-CountingThread")
        exited = thread.whenExited()
        thread.send("add", 2)
        thread.send("add", 3)
        thread.send("stop")
        target()
        self.assertNoResult(exited)
        reactor.runHops()
        self.assertEqual(thread.reported, [5])
        self.successResultOf(exited)

    def test_realThread(self) -> None:
        """
        On a real thread, a command wakes the thread at once (it sleeps on
        its command queue) and the exit reaches the reactor.
        """
        reactor = HopReactor()
        thread = CountingThread(reactor)
        exited = thread.whenExited()
        thread.start()
        thread.send("add", 7)
        thread.send("stop")
        while not thread.exits.exited:
            self.assertTrue(reactor.arrived.wait(DEADLINE), "the thread did not reach the reactor")
            reactor.runHops()
        self.assertEqual(thread.reported, [7])
        self.successResultOf(exited)


class DeferToOwnThreadTests(SynchronousTestCase):
    """
    L{deferToOwnThread}: one blocking job, answered on the reactor.
    """

    def test_result(self) -> None:
        """
        The result arrives on the reactor, not on the thread.
        """
        reactor = HopReactor()
        taken: List[Tuple[Callable[[], None], str]] = []
        d = deferToOwnThread(reactor, lambda: 42, "job", lambda target, name: taken.append((target, name)))
        [(target, name)] = taken
        self.assertEqual(name, "job")
        target()
        self.assertNoResult(d)
        reactor.runHops()
        self.assertEqual(self.successResultOf(d), 42)

    def test_failure(self) -> None:
        """
        What the job raised fails the Deferred.
        """
        reactor = HopReactor()
        taken: List[Tuple[Callable[[], None], str]] = []

        def job() -> None:
            raise KeyError("gone")

        d = deferToOwnThread(reactor, job, "job", lambda target, name: taken.append((target, name)))
        taken[0][0]()
        reactor.runHops()
        self.failureResultOf(d, KeyError)

    def test_realThread(self) -> None:
        """
        On a real daemon thread, the answer reaches the reactor.
        """
        reactor = HopReactor()
        d = deferToOwnThread(reactor, lambda: threading.current_thread().name, "evgate-test-job")
        self.assertTrue(reactor.arrived.wait(DEADLINE))
        reactor.runHops()
        self.assertEqual(self.successResultOf(d), "evgate-test-job")
