"""
Batches held while an API's delivery pipeline prepares (a decoder fetching
a schema): a subscriber that stops after the first of them (a long-poll
page that fills up, a stream that pauses, a webhook feed over its bound)
must not lose the others.
"""

from __future__ import annotations

import json
from typing import Any, List, Optional

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from evgate.config import parseConfig
from evgate.connectors.memory import MemoryConnector
from evgate.hub import Hub
from evgate.interfaces import IPreparingDeliveryStep, ISubscriber
from evgate.message import Cursor, Draft, Message
from evgate.pipeline import Pipeline
from evgate.service import GatewayService
from evgate.webhook.feeds import HubFeed, ShareGroupFeed

from .helpers import MEMORY_INI


@implementer(IPreparingDeliveryStep)
class Fetching:
    """
    A step that must fetch something before it can transform: every
    message waits for C{pending} until the test fires it.
    """

    text = "fetching"
    line = 1

    def __init__(self) -> None:
        self.pending: Optional[Deferred] = Deferred()

    def prepare(self, message: Message) -> Optional[Deferred]:
        return self.pending

    def onDeliver(self, message: Message) -> Message:
        return message._replace(key="decoded")

    def fetched(self) -> None:
        """
        The fetch is done: what waited goes on, and nothing waits again.
        """
        pending, self.pending = self.pending, None
        assert pending is not None
        pending.callback(None)


@implementer(ISubscriber)
class Page:
    """
    A long-poll page at the hub: takes up to C{limit} events, then
    releases its subscription where it read up to (as
    L{evgate.entrypoints.http_get.PollSubscriber} does).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.events: List[Any] = []
        self.cursor: Optional[Cursor] = None
        self.subscription: Any = None
        self.done = False
        self.gaps: List[Any] = []

    def started(self, cursor: Cursor) -> None:
        self.cursor = cursor

    def deliver(self, events: List[Any]) -> None:
        if self.done:
            return
        taken = events[:self.limit - len(self.events)]
        self.events.extend(taken)
        if taken:
            self.cursor = taken[-1].cursor
        if len(self.events) >= self.limit:
            self.answer()

    def advanced(self, cursor: Cursor) -> None:
        if not self.done:
            self.cursor = cursor

    def gap(self, cursor: Cursor, reason: str) -> None:
        self.gaps.append(reason)
        self.cursor = cursor

    def failed(self, reason: Any) -> None:
        raise AssertionError(reason)

    def answer(self) -> None:
        """
        Answer the page (full, or its timeout): release at its cursor.
        """
        self.done = True
        if self.subscription is not None:
            self.subscription.release(self.cursor)

    def contents(self) -> List[str]:
        return [e.message.content.decode() for e in self.events]


class HubHeldTestCase(SynchronousTestCase):
    """
    A hub over a memory topic, read by an API whose pipeline prepares.
    """

    window = 5

    def setUp(self) -> None:
        self.clock = Clock()
        self.memory = MemoryConnector("local", 1000, self.clock, epoch=1)
        self.hub = Hub({"local": self.memory}, self.clock, window=self.window, idleGrace=30)
        self.step = Fetching()
        self.view = Pipeline((), [self.step]).hubView
        self.published = 0

    def publish(self, count: int) -> None:
        """
        Publish C{count} more numbered messages; the readers get them as
        one batch.
        """
        for _ in range(count):
            self.memory.publish("t", Draft(str(self.published).encode()))
            self.published += 1
        self.clock.advance(0)

    def open(self, start: Any, limit: int) -> Page:
        page = Page(limit)
        subscription = self.hub.subscribe("local", "t", start, page, None, self.view)
        if page.done:
            subscription.release(page.cursor)
        page.subscription = subscription
        self.clock.advance(0)
        return page

    def pageThrough(self, first: Page, limit: int) -> List[str]:
        """
        Follow each page's cursor until a page finds nothing; every
        content seen, in order.
        """
        seen = first.contents()
        cursor = first.cursor
        for _ in range(100):
            page = self.open(cursor, limit)
            if not page.done:
                page.answer()
            seen.extend(page.contents())
            if not page.events:
                return seen
            cursor = page.cursor
        raise AssertionError("paging did not end")


class PrivateReadTests(HubHeldTestCase):
    """
    A long poll from history (a private read, parked between pages).
    """

    def test_pageFilledByFirstHeldBatch(self) -> None:
        """
        Three batches arrive while the step prepares; the first fills the
        page.  The next pages, from each page's cursor, get every message
        once, in order: the held batches the page did not take are kept
        with the parked read.
        """
        self.publish(10)
        first = self.open("earliest", 4)
        self.publish(10)
        self.publish(10)
        self.assertEqual(first.events, [])
        self.step.fetched()
        self.assertEqual(first.contents(), ["0", "1", "2", "3"])
        self.assertEqual(self.pageThrough(first, 4), [str(i) for i in range(30)])

    def test_pageTimesOutWhilePreparing(self) -> None:
        """
        A page that answers empty while batches are held (its timeout)
        parks its read with all of them: the next page gets everything.
        """
        self.publish(10)
        first = self.open("earliest", 4)
        self.publish(10)
        first.answer()
        self.step.fetched()
        self.assertEqual(self.pageThrough(first, 8), [str(i) for i in range(20)])

    def test_heldGapNotParked(self) -> None:
        """
        A page released while a gap notice is held behind the batches does
        not park its read (no list of events carries the notice): the next
        page reads afresh from the cursor.
        """
        self.publish(10)
        first = self.open("earliest", 4)
        subscription = first.subscription
        subscription.stream.gap(Cursor(1, ((0, 10),)), "lost")
        self.step.fetched()
        self.assertEqual(first.contents(), ["0", "1", "2", "3"])
        self.assertEqual(self.hub.parked, {})
        self.assertEqual(self.pageThrough(first, 4), [str(i) for i in range(10)])


class SharedReadTests(HubHeldTestCase):
    """
    A long poll of the live stream, released in the middle of the held
    batches: its next page replays from the window.
    """

    window = 100

    def test_nextPageFromWindow(self) -> None:
        """
        The next page starts at the released cursor and gets the rest of
        the held batches from the replay window, then what follows.
        """
        first = self.open("latest", 4)
        self.publish(6)
        self.publish(6)
        self.step.fetched()
        self.assertEqual(first.contents(), ["0", "1", "2", "3"])
        self.publish(3)
        self.assertEqual(self.pageThrough(first, 5), [str(i) for i in range(15)])
        self.assertEqual(list(self.hub.streams), [("local", "t")])


@implementer(ISubscriber)
class Stream:
    """
    A streaming subscriber (SSE, WebSocket) whose transport pushes back
    after its first batch.
    """

    def __init__(self) -> None:
        self.events: List[Any] = []
        self.subscription: Any = None
        self.pauseAfterFirst = True

    def started(self, cursor: Cursor) -> None:
        pass

    def deliver(self, events: List[Any]) -> None:
        self.events.extend(events)
        if self.pauseAfterFirst:
            self.pauseAfterFirst = False
            self.subscription.pause()

    def advanced(self, cursor: Cursor) -> None:
        pass

    def gap(self, cursor: Cursor, reason: str) -> None:
        self.events.append(reason)

    def failed(self, reason: Any) -> None:
        raise AssertionError(reason)

    def contents(self) -> List[str]:
        return [e if isinstance(e, str) else e.message.content.decode() for e in self.events]


class PausedTests(HubHeldTestCase):
    """
    A subscriber that pauses in the middle of the held batches.
    """

    def subscribe(self, start: Any) -> Stream:
        stream = Stream()
        stream.subscription = self.hub.subscribe("local", "t", start, stream, None, self.view)
        self.clock.advance(0)
        return stream

    def test_privateWaitsForResume(self) -> None:
        """
        On a private read, the held batches after the one that paused the
        subscriber wait for it to resume, and then come in order.
        """
        self.publish(3)
        stream = self.subscribe("earliest")
        self.publish(3)
        self.publish(3)
        self.step.fetched()
        self.assertEqual(stream.contents(), ["0", "1", "2"])
        stream.subscription.resume()
        self.clock.advance(0)
        self.assertEqual(stream.contents(), [str(i) for i in range(9)])

    def test_sharedGoesOnWithTheStream(self) -> None:
        """
        On the shared stream, the held batches wait for resume only until
        the stream delivers more: a paused subscriber is still given what
        the stream delivers, so the held ones go first, in order.  (The
        stream goes on for another reader of the topic.)
        """
        other = Stream()
        other.pauseAfterFirst = False
        self.hub.subscribe("local", "t", "latest", other)
        stream = self.subscribe("latest")
        self.publish(2)
        self.publish(2)
        self.step.fetched()
        self.assertEqual(stream.contents(), ["0", "1"])
        self.publish(2)
        self.assertEqual(stream.contents(), [str(i) for i in range(6)])

    def test_gapWaitsInTurn(self) -> None:
        """
        A gap notice held behind the batches waits with them, in its turn.
        """
        self.publish(3)
        stream = self.subscribe("earliest")
        self.publish(3)
        stream.subscription.stream.gap(Cursor(1, ((0, 6),)), "lost")
        self.step.fetched()
        self.assertEqual(stream.contents(), ["0", "1", "2"])
        stream.subscription.resume()
        self.assertEqual(stream.contents(), ["0", "1", "2", "3", "4", "5", "lost"])

    def test_closedDrops(self) -> None:
        """
        A subscriber closed in the middle of the held batches is given
        nothing more.
        """
        self.publish(3)
        stream = self.subscribe("earliest")
        self.publish(3)
        stream.pauseAfterFirst = False
        stream.deliver = lambda events: (Stream.deliver(stream, events),  # type: ignore[method-assign]
                                         stream.subscription.close())
        self.step.fetched()
        self.clock.advance(0)
        self.assertEqual(stream.contents(), ["0", "1", "2"])


class GetPagesTests(SynchronousTestCase):
    """
    GET pages with cursors, through the gateway, on an API whose pipeline
    prepares while the first page's read delivers several batches.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        text = MEMORY_INI.format(retention=1000, entrypoints="http-post http-get", start="earliest")
        # No replay window: every page is served by a (parked) read of its own.
        config = parseConfig(text.replace("listen = tcp:0", "listen = tcp:0\nreplay-window = 0"), "test.ini")
        self.gateway = GatewayService(config, self.clock)
        self.treq = StubTreq(self.gateway.resource)
        self.connector = self.gateway.connectors["local"]
        self.step = Fetching()
        api = self.gateway.api("demo")
        assert api is not None
        api.pipeline = Pipeline((), [self.step])
        self.published = 0

    def publish(self, count: int) -> None:
        for _ in range(count):
            self.connector.publish("demo", Draft(str(self.published).encode()))
            self.published += 1
        self.clock.advance(0)
        self.treq.flush()

    def request(self, cursor: Optional[str], limit: int) -> Deferred:
        url = f"http://gateway/demo?limit={limit}&timeout=0" + (f"&cursor={cursor}" if cursor else "")
        d = self.treq.get(url)
        self.clock.advance(0)
        self.treq.flush()
        return d

    def answer(self, d: Deferred) -> dict:
        for _ in range(3):
            self.clock.advance(0)
            self.treq.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        return json.loads(self.successResultOf(response.content()))

    def test_everyRecordOnce(self) -> None:
        """
        The first page is filled by the first held batch; following
        C{nextCursor} then reads every record once, in order, with the
        step's transformation.
        """
        self.publish(10)
        first = self.request(None, 4)
        self.publish(10)
        self.publish(10)
        self.step.fetched()
        doc = self.answer(first)
        seen = []
        while doc["items"]:
            seen.extend(doc["items"])
            doc = self.answer(self.request(doc["pagination"]["nextCursor"], 4))
        self.assertEqual([i["content"] for i in seen], [str(i) for i in range(30)])
        self.assertEqual({i["key"] for i in seen}, {"decoded"})


class Deliverer:
    """
    The side of a webhook deliverer a feed talks to: what it was offered,
    unsettled until the test settles it.
    """

    def __init__(self) -> None:
        self.offered: List[str] = []
        self.unsettled = 0
        self.tail: Optional[Cursor] = None
        self.gaps: List[str] = []

    def began(self, cursor: Cursor) -> None:
        if self.tail is None:
            self.tail = cursor

    def offer(self, events: Any) -> None:
        self.offered.extend(e.message.content.decode() for e in events)
        self.unsettled += len(events)
        self.tail = events[-1].cursor

    def skipped(self, cursor: Cursor) -> None:
        self.tail = cursor

    def gap(self, cursor: Cursor, reason: str) -> None:
        self.gaps.append(reason)
        self.tail = cursor

    def backlog(self) -> int:
        return self.unsettled

    def feedFailed(self, reason: Any) -> None:
        raise AssertionError(reason)


class HubFeedTests(HubHeldTestCase):
    """
    A webhook subscription's hub feed over its bound in the middle of the
    held batches.
    """

    def feed(self, high: int) -> Any:
        self.deliverer = Deliverer()
        feed = HubFeed(self.deliverer, self.hub, "local", "t", None, "earliest", high, self.view)
        feed.start(None)
        self.clock.advance(0)
        return feed

    def settle(self, feed: Any) -> None:
        self.deliverer.unsettled = 0
        feed.progress()
        self.clock.advance(0)

    def test_pausedWaits(self) -> None:
        """
        The batch that takes the backlog to the bound pauses the feed; the
        held batches after it wait until the deliverer settles, then come
        in order, and the feed never lets go of the hub.
        """
        self.publish(3)
        feed = self.feed(4)
        self.publish(3)
        self.publish(3)
        self.step.fetched()
        self.assertEqual(self.deliverer.offered, [str(i) for i in range(6)])
        self.assertFalse(feed.detached)
        self.settle(feed)
        self.assertEqual(self.deliverer.offered, [str(i) for i in range(9)])

    def test_detachedComesBackFromTail(self) -> None:
        """
        A feed that lets go of the hub in the middle of the held batches
        comes back from the deliverer's tail and gets the rest once, in
        order.
        """
        self.publish(3)
        feed = self.feed(1)
        self.publish(3)
        self.publish(3)
        self.step.fetched()
        self.assertTrue(feed.detached)
        self.assertEqual(self.deliverer.offered, ["0", "1", "2"])
        for _ in range(5):
            self.settle(feed)
        self.assertEqual(self.deliverer.offered, [str(i) for i in range(9)])


class ShareGroupFeedTests(SynchronousTestCase):
    """
    An MQTT shared-subscription feed over its bound in the middle of the
    held batches.
    """

    def test_pausedWaits(self) -> None:
        """
        The held batches after the one that paused the feed wait (with a
        gap notice in its turn) until the deliverer settles, then come in
        order.
        """
        class Upstream:
            paused = False

            def pause(self) -> None:
                self.paused = True

            def resume(self) -> None:
                self.paused = False

            def close(self) -> None:
                pass

        class Connector:
            def subscribe(self, topic: str, start: Any, sink: Any, group: str) -> Any:
                self.upstream = Upstream()
                return self.upstream

        step = Fetching()
        deliverer = Deliverer()
        connector = Connector()
        feed = ShareGroupFeed(deliverer, connector, "t", "g", None, 4, Pipeline((), [step]).hubView)
        feed.start(None)
        feed.started(Cursor(1, ((0, 0),)))
        offset = 0
        for size in (3, 3, 3):
            feed.deliver([Message(str(offset + i).encode(), None, (), "t", 0, offset + i, 0) for i in range(size)])
            offset += size
        feed.gap(Cursor(1, ((0, 20),)), "lost")
        step.fetched()
        self.assertEqual(deliverer.offered, [str(i) for i in range(6)])
        self.assertTrue(connector.upstream.paused)
        self.assertEqual(deliverer.gaps, [])
        deliverer.unsettled = 0
        feed.progress()
        self.assertEqual(deliverer.offered, [str(i) for i in range(9)])
        self.assertEqual(deliverer.gaps, ["lost"])
