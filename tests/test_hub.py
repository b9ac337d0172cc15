"""
Tests for L{evgate.hub} and the memory connector it reads from, on a Clock.
"""

from typing import Any, List

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from evgate.connectors.memory import MemoryConnector
from evgate.hub import Hub
from evgate.interfaces import IConnector, ISubscriber, IUpstreamSubscription
from evgate.message import Cursor, Draft, Message


@implementer(ISubscriber)
class Recorder:
    """
    A subscriber that records what the hub tells it.
    """

    def __init__(self) -> None:
        self.startedAt: Any = None
        self.events: List[Any] = []
        self.gaps: List[Any] = []
        self.advancedTo: Any = None
        self.failure: Any = None

    def started(self, cursor: Cursor) -> None:
        self.startedAt = cursor

    def deliver(self, events: List[Any]) -> None:
        self.events.extend(events)

    def gap(self, cursor: Cursor, reason: str) -> None:
        self.gaps.append((cursor, reason))

    def advanced(self, cursor: Cursor) -> None:
        self.advancedTo = cursor

    def failed(self, reason: Any) -> None:
        self.failure = reason

    def contents(self) -> List[bytes]:
        return [getattr(e, "message", e).content for e in self.events]


class HubTestCase(SynchronousTestCase):
    """
    A hub over one memory connector.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.memory = MemoryConnector("local", 100, self.clock, epoch=1)
        self.hub = Hub({"local": self.memory}, self.clock, window=5, idleGrace=30)
        self.upstreams = 0
        subscribe = self.memory.subscribe

        def counting(*args: Any) -> Any:
            self.upstreams += 1
            return subscribe(*args)

        self.memory.subscribe = counting  # type: ignore[method-assign]

    def publish(self, *contents: bytes) -> None:
        for content in contents:
            self.memory.publish("t", Draft(content))
        self.clock.advance(0)

    def subscribe(self, start: Any = "latest", filter: Any = None) -> Any:
        recorder = Recorder()
        subscription = self.hub.subscribe("local", "t", start, recorder, filter)
        self.clock.advance(0)
        return recorder, subscription


class MemoryConnectorTests(HubTestCase):
    """
    The memory connector keeps a bounded log and reports what it dropped.
    """

    def test_interfaces(self) -> None:
        """
        The connector and its subscriptions provide their interfaces.
        """
        self.assertTrue(verifyObject(IConnector, self.memory))
        recorder = Recorder()
        subscription = MemoryConnector("m", 10, self.clock).subscribe("t", "latest", recorder)
        self.assertTrue(verifyObject(IUpstreamSubscription, subscription))

    def test_retentionGap(self) -> None:
        """
        A reader whose position fell out of retention is told, then reads on
        from the oldest kept message.
        """
        small = MemoryConnector("m", 3, self.clock, epoch=9)
        recorder = Recorder()
        subscription = small.subscribe("t", "earliest", recorder)
        subscription.pause()
        self.clock.advance(0)
        for i in range(6):
            small.publish("t", Draft(str(i).encode()))
        subscription.resume()
        self.clock.advance(0)
        self.assertEqual([c for c, _ in recorder.gaps], [Cursor(9, ((0, 3),))])
        self.assertEqual(recorder.contents(), [b"3", b"4", b"5"])

    def test_pauseStopsDelivery(self) -> None:
        """
        A paused reader gets nothing until resumed, then everything.
        """
        recorder = Recorder()
        subscription = self.memory.subscribe("x", "latest", recorder)
        self.clock.advance(0)
        subscription.pause()
        self.memory.publish("x", Draft(b"a"))
        self.clock.advance(0)
        self.assertEqual(recorder.events, [])
        subscription.resume()
        self.clock.advance(0)
        self.assertEqual(recorder.contents(), [b"a"])


class SharedStreamTests(HubTestCase):
    """
    One upstream read serves every live subscriber of a topic.
    """

    def test_oneUpstream(self) -> None:
        """
        Many subscribers of one topic share one upstream subscription and
        one Event object per message.
        """
        recorders = [self.subscribe()[0] for _ in range(10)]
        self.publish(b"a", b"b")
        self.assertEqual(self.upstreams, 1)
        for recorder in recorders:
            self.assertEqual(recorder.contents(), [b"a", b"b"])
        self.assertIs(recorders[0].events[0], recorders[9].events[0])

    def test_replayFromWindow(self) -> None:
        """
        A cursor inside the window is served from memory: exactly the
        messages after it, without another upstream read.
        """
        first, _ = self.subscribe()
        self.publish(b"1", b"2", b"3")
        cursor = first.events[0].cursor
        second, _ = self.subscribe(cursor)
        self.assertEqual(second.contents(), [b"2", b"3"])
        self.assertEqual(self.upstreams, 1)
        self.publish(b"4")
        self.assertEqual(second.contents(), [b"2", b"3", b"4"])
        self.assertIs(second.events[-1], first.events[-1])

    def test_cursorAtHead(self) -> None:
        """
        A cursor at the head replays nothing and then gets the live stream.
        """
        first, _ = self.subscribe()
        self.publish(b"1")
        second, _ = self.subscribe(first.events[-1].cursor)
        self.assertEqual(second.events, [])
        self.publish(b"2")
        self.assertEqual(second.contents(), [b"2"])

    def test_oldCursorPrivate(self) -> None:
        """
        A cursor older than the window gets a private upstream read from
        that cursor.
        """
        self.publish(b"0")  # before any stream: only in the broker's log
        first, _ = self.subscribe()
        self.publish(*[str(i).encode() for i in range(1, 9)])
        old = Cursor(1, ((0, 1),))
        second, _ = self.subscribe(old)
        self.assertEqual(self.upstreams, 2)
        self.assertEqual(second.contents(), [str(i).encode() for i in range(1, 9)])

    def test_filterMovesCursor(self) -> None:
        """
        Messages a filter drops still move the subscriber's cursor.
        """
        recorder, _ = self.subscribe(filter=lambda e: e.message.content != b"drop")
        self.publish(b"keep", b"drop")
        self.assertEqual(recorder.contents(), [b"keep"])
        self.assertEqual(recorder.advancedTo, Cursor(1, ((0, 2),)))

    def test_pauseUpstreamOnlyWhenAllPaused(self) -> None:
        """
        The upstream read pauses only when every subscriber is paused.
        """
        _, a = self.subscribe()
        _, b = self.subscribe()
        stream = self.hub.streams[("local", "t")]
        a.pause()
        self.assertFalse(stream.upstreamPaused)
        b.pause()
        self.assertTrue(stream.upstreamPaused)
        a.resume()
        self.assertFalse(stream.upstreamPaused)

    def test_idleClose(self) -> None:
        """
        A stream without subscribers closes after the idle grace, and not
        before.
        """
        _, subscription = self.subscribe()
        subscription.close()
        self.clock.advance(29)
        self.assertIn(("local", "t"), self.hub.streams)
        self.clock.advance(2)
        self.assertNotIn(("local", "t"), self.hub.streams)


class TwoPartitionConnector(MemoryConnector):
    """
    A memory connector whose topic has two partitions, to test the floor.
    """

    def subscribe(self, topic: str, start: Any, sink: Any) -> Any:
        self.sink = sink
        self.reactor.callLater(0, sink.started, Cursor(0, ((0, 0), (1, 0))))
        return self.subscription()

    def subscription(self) -> Any:
        class Upstream:
            def pause(self) -> None: ...
            def resume(self) -> None: ...
            def close(self) -> None: ...

        return Upstream()


class FloorTests(SynchronousTestCase):
    """
    A subscriber ahead of the stream on one partition never gets ids that
    point before what it saw.
    """

    def test_floor(self) -> None:
        """
        Messages the cursor saw are skipped, and ids are the per-partition
        maximum until the stream overtakes the cursor.
        """
        clock = Clock()
        connector = TwoPartitionConnector("k", 10, clock)
        hub = Hub({"k": connector}, clock, window=100)
        first = Recorder()
        hub.subscribe("k", "t", "latest", first)
        clock.advance(0)

        def m(p: int, o: int) -> Message:
            return Message(f"{p}-{o}".encode(), None, (), "t", p, o, 0)

        connector.sink.deliver([m(0, 0), m(1, 0), m(1, 1)])
        # This client saw partition 1 up to offset 1 but partition 0 only
        # before offset 0.
        second = Recorder()
        hub.subscribe("k", "t", Cursor(0, ((0, 0), (1, 2))), second)
        self.assertEqual(second.contents(), [b"0-0"])
        self.assertEqual(second.events[0].cursor, Cursor(0, ((0, 1), (1, 2))))
        connector.sink.deliver([m(1, 2), m(0, 1)])
        self.assertEqual(second.contents(), [b"0-0", b"1-2", b"0-1"])
        self.assertIs(second.events[-1], first.events[-1])
