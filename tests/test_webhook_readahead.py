"""
Unit tests of a Kafka webhook subscription's feed with a real deliverer
and window: the next batch is read while the last one is still being
delivered (the window stays full across batch boundaries), the group's
committed offsets follow the settled prefix as it moves, never past an
unsettled message, and a partition taken away by a rebalance in the
middle is not committed from here.  A L{Clock} drives time; the receiver
and the group reader are fakes whose answers the tests give.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from evgate.webhook.delivery import Deliverer, DeliveryContext
from evgate.webhook.kafka import KafkaGroupFeed
from evgate.webhook.retry import RetryPolicy
from tests.test_webhook import FakeGroupConnector


class Answer:
    """
    A receiver's answer with no body.
    """

    length = 0

    def __init__(self, code: int) -> None:
        self.code = code
        self.headers = Headers()


class HeldReceiver:
    """
    A treq-like client whose requests wait until the test answers them.
    """

    def __init__(self) -> None:
        self.requests: List[Tuple[bytes, Deferred]] = []

    def request(self, method: str, url: str, data: bytes, **kwargs: Any) -> Deferred:
        d: Deferred = Deferred()
        self.requests.append((data, d))
        return d

    def inFlight(self) -> List[bytes]:
        """
        The bodies of the requests not answered yet, oldest first.
        """
        return [body for body, d in self.requests if not d.called]

    def answer(self, body: bytes, code: int = 200) -> None:
        """
        Answer the request for C{body}.
        """
        for sent, d in self.requests:
            if sent == body and not d.called:
                d.callback(Answer(code))
                return
        raise AssertionError(f"no request in flight for {body!r}")


class NullStore:
    """
    A store that takes every update.
    """

    def __init__(self) -> None:
        self.updates: List[Dict[str, Any]] = []

    def update(self, kind: str, id: str, changes: Dict[str, Any], increments: Dict[str, int]) -> Deferred:
        self.updates.append(dict(changes))
        return succeed(None)


class ReadAheadTests(SynchronousTestCase):
    """
    A window of 4 fed by batches of up to 4 messages.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.receiver = HeldReceiver()
        self.connector = FakeGroupConnector(self.clock)
        self.reader = self.connector.reader
        context = DeliveryContext(reactor=self.clock, http=self.receiver, store=NullStore(), api="orders",
                                  tag=b"t", epoch=0, timeout=5.0, maxInFlight=4, dlq=None)
        record = {"id": "sub_00000000000000000000", "callbackUrl": "http://127.0.0.1:1/in"}
        self.deliverer = Deliverer(record, b"k" * 32, RetryPolicy(1.0, 10.0, 5), None, context)
        self.feeds: List[KafkaGroupFeed] = []

        def makeFeed(deliverer: Deliverer) -> KafkaGroupFeed:
            feed = KafkaGroupFeed(deliverer, self.connector, "t", "orders", None, limit=4, window=4)
            self.feeds.append(feed)
            return feed

        self.deliverer.start(makeFeed)
        self.feed = self.feeds[0]

    def committed(self) -> List[Dict[int, int]]:
        """
        Every position commit so far, after the commit interval passed.
        """
        self.clock.advance(self.feed.commitInterval)
        return self.reader.positions

    def test_windowStaysFullAcrossBatches(self) -> None:
        """
        As soon as a place is free the next batch is taken, in the same
        poll turn, and its first message takes the place: the window never
        drains at a batch boundary, and no commit waits for the batch.
        """
        self.connector.answer([0, 1, 2, 3])
        self.assertEqual(self.receiver.inFlight(), [b"k0", b"k1", b"k2", b"k3"])
        self.assertEqual(self.connector.polls, [])
        self.receiver.answer(b"k0")
        self.assertEqual(len(self.connector.polls), 1)
        self.connector.answer([4, 5, 6, 7])
        self.assertEqual(self.receiver.inFlight(), [b"k1", b"k2", b"k3", b"k4"])
        for body in (b"k1", b"k2"):
            self.receiver.answer(body)
        self.assertEqual(self.receiver.inFlight(), [b"k3", b"k4", b"k5", b"k6"])
        # One turn all along: taken once, never given back.
        self.assertEqual(self.reader.takes, 1)
        self.assertEqual(self.reader.releases, 0)
        self.assertEqual(self.reader.commits, [])

    def test_readAheadIsBounded(self) -> None:
        """
        The feed reads while fewer than a batch (or a window) of messages
        is unsettled, and no further: a receiver that does not answer
        holds at most that much more.
        """
        self.connector.answer([0, 1, 2, 3])
        self.receiver.answer(b"k0")
        self.connector.answer([4, 5, 6, 7])
        self.assertEqual(self.deliverer.backlog(), 7)
        self.assertEqual(self.connector.polls, [])

    def test_commitFollowsSettledPrefix(self) -> None:
        """
        The group's offsets follow the settled prefix at most every commit
        interval, while later messages are still in flight, and never pass
        a message that is not settled.
        """
        self.connector.answer([0, 1, 2, 3])
        self.receiver.answer(b"k0")
        self.receiver.answer(b"k2")
        self.assertEqual(self.reader.positions, [])
        self.assertEqual(self.committed(), [{0: 1}])
        self.receiver.answer(b"k1")
        self.assertEqual(self.committed(), [{0: 1}, {0: 3}])
        self.assertEqual(self.receiver.inFlight()[0], b"k3")
        self.assertEqual(self.reader.commits, [])

    def test_failingMessageHoldsTheCommit(self) -> None:
        """
        A message waiting for a retry holds the committed offset of its
        partition back, whatever settles behind it.
        """
        self.connector.answer([0, 1, 2, 3])
        self.receiver.answer(b"k0", 500)
        for body in (b"k1", b"k2", b"k3"):
            self.receiver.answer(body)
        self.assertEqual(self.committed(), [])
        self.clock.advance(10.0)
        self.receiver.answer(b"k0")
        self.assertEqual(self.committed(), [{0: 4}])

    def test_revokedInTheMiddle(self) -> None:
        """
        A partition taken away by a rebalance while its messages are in
        flight: they are still delivered (the new owner may deliver them
        again), nothing of it is committed from here afterwards, and the
        partition this member kept goes on being committed as it settles.
        """
        self.connector.answer([10, 11], partition=0)
        self.assertEqual(len(self.connector.polls), 1)
        self.connector.answer([20, 21], partition=1)
        self.assertEqual(self.receiver.inFlight(), [b"k10", b"k11", b"k20", b"k21"])
        self.receiver.answer(b"k10")
        self.assertEqual(self.committed(), [{0: 11}])
        # The rebalance: partition 0 goes to another member.
        self.reader.assigned = {1}
        self.receiver.answer(b"k11")
        self.receiver.answer(b"k20")
        self.assertEqual(self.committed(), [{0: 11}, {1: 21}])
        self.assertEqual(self.deliverer.position.get(0), 12)
        # Stopping gives back what is not settled, of every partition (the
        # reader keeps those of partitions it still owns), once the take
        # under way came back.
        self.deliverer.stop()
        self.connector.answer([], partition=1)
        self.assertEqual(self.reader.sent[-1], ("putBack", [21]))
        self.assertEqual(self.reader.positions[-1], {1: 21})

    def test_stopGivesBackInStreamOrder(self) -> None:
        """
        Stopped with a take under way, the subscription gives back what it
        had not settled followed by what the take brought, so that a
        resumed subscription reads them again in the stream's order.
        """
        self.connector.answer([0, 1, 2, 3])
        self.receiver.answer(b"k1")
        self.assertEqual(len(self.connector.polls), 1)
        self.deliverer.stop()
        self.assertEqual(self.reader.sent, [])
        self.connector.answer([4, 5])
        self.assertEqual(self.reader.sent, [("putBack", [0, 1, 2, 3, 4, 5])])
        self.assertEqual(self.reader.releases, 1)

    def test_pauseHoldsTheTurn(self) -> None:
        """
        A paused subscription (no dead letters) keeps the group's poll
        turn and reads nothing more; stopping it gives the turn back.
        """
        self.connector.answer([0, 1, 2, 3])
        self.receiver.answer(b"k0", 400)
        self.assertTrue(self.deliverer.paused)
        self.assertEqual(self.connector.polls, [])
        self.assertEqual(self.reader.releases, 0)
        self.deliverer.stop()
        self.assertEqual(self.reader.sent, [("putBack", [0, 1, 2, 3])])
        self.assertEqual(self.reader.releases, 1)

