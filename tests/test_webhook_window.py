"""
Unit tests of a webhook subscription's delivery window (C{max-in-flight}):
order per message key, positions over the settled prefix per partition,
retries and dead letters that hold back only their own key, and what a
crash in the middle leaves stored.  A L{Clock} drives time and treq's
L{StubTreq} stands in for the receiver.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Tuple

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from evgate.config import parseConfig
from evgate.errors import BadRequest
from evgate.hub import Event
from evgate.message import Cursor, Message
from evgate.service import GatewayService
from evgate.store import MemoryStore
from evgate.webhook import records
from evgate.webhook.window import PARKED, READY, SETTLED, DeliveryWindow, advancePosition, orderingKey
from tests.test_webhook import HANG, INI, Harness, Receiver, flushAll


def keyed(content: bytes) -> Tuple[str, bytes]:
    """
    The key and sequence of a body made by L{publishKeyed}: C{b"a:3"}.
    """
    key, _, seq = content.partition(b":")
    return key.decode(), seq


def publishKeyed(harness: Harness, plan: List[str]) -> None:
    """
    Publish one message per entry of C{plan} (its key), numbered per key.
    """
    counts: Dict[str, int] = {}
    for key in plan:
        n = counts.get(key, 0)
        counts[key] = n + 1
        harness.publish(b"%s:%d" % (key.encode(), n), key=key)


def perKey(bodies: List[bytes]) -> Dict[str, List[int]]:
    """
    The sequence numbers each key received, in order.
    """
    seen: Dict[str, List[int]] = {}
    for body in bodies:
        key, seq = keyed(body)
        seen.setdefault(key, []).append(int(seq))
    return seen


def storedOffset(harness: Harness, id: str, partition: int = 0) -> Optional[int]:
    """
    The offset of C{partition} in subscription C{id}'s stored position.
    """
    position = harness.record(id)["position"]
    return Cursor.decode(position, harness.gateway.api("orders").tag).get(partition)


class Attempt:
    """
    The least an attempt needs for L{DeliveryWindow}.
    """

    def __init__(self, event: Any) -> None:
        self.event = event
        self.state = ""


def event(partition: int, offset: int, key: Optional[str]) -> Event:
    """
    A hub event of a message at C{partition}/C{offset} with C{key}.
    """
    message = Message(content=b"", key=key, headers=(), topic="t", partition=partition, offset=offset,
                      timestamp=0)
    return Event(message, Cursor.fromMapping({partition: offset + 1}))


class DeliveryWindowTests(SynchronousTestCase):
    """
    The window's bookkeeping on its own.
    """

    def test_orderingKey(self) -> None:
        """
        The ordering key is the partition and the message key; a message
        without a key has none.
        """
        self.assertEqual(orderingKey(event(2, 0, "a").message), (2, "a"))
        self.assertIsNone(orderingKey(event(2, 0, None).message))

    def test_sameKeyParks(self) -> None:
        """
        Of two messages of one key only the first gets a place; the second
        is parked and inherits the place when the first settles, ahead of
        the queue.
        """
        window = DeliveryWindow(2, Attempt)
        window.queue.extend([event(0, 0, "a"), event(0, 1, "a"), event(0, 2, "b"), event(0, 3, "c")])
        first = window.take()
        self.assertEqual([a.event.message.offset for a in first], [0, 2])
        self.assertEqual(len(window.queue), 1)
        self.assertEqual(window.backlog(), 4)
        parked = [a for a in window.attempts() if a.state == PARKED]
        self.assertEqual([a.event.message.offset for a in parked], [1])
        self.assertEqual(window.settle(first[0]), (0, first[0].event.cursor))
        self.assertEqual([(a.event.message.offset, a.state) for a in window.take()], [(1, READY)])
        self.assertEqual(window.take(), [])
        self.assertEqual(window.backlog(), 3)

    def test_keylessIsFree(self) -> None:
        """
        Messages without a key wait for nobody but the window's size.
        """
        window = DeliveryWindow(3, Attempt)
        window.queue.extend([event(0, i, None) for i in range(4)])
        self.assertEqual([a.event.message.offset for a in window.take()], [0, 1, 2])

    def test_prefixPerPartition(self) -> None:
        """
        Settling moves a partition only over its settled prefix, and
        independently of the other partitions.
        """
        window = DeliveryWindow(8, Attempt)
        window.queue.extend([event(0, 0, "a"), event(1, 0, "b"), event(0, 1, "c"), event(1, 1, "d")])
        p0m0, p1m0, p0m1, p1m1 = window.take()
        self.assertIsNone(window.settle(p0m1))
        self.assertEqual(window.settle(p1m0), (1, p1m0.event.cursor))
        self.assertEqual(window.settle(p0m0), (0, p0m1.event.cursor))
        self.assertIsNone(window.settle(p0m0))
        self.assertEqual(window.settle(p1m1), (1, p1m1.event.cursor))
        self.assertTrue(window.empty())
        self.assertEqual(p0m0.state, SETTLED)

    def test_advancePosition(self) -> None:
        """
        A position moves per partition and never back.
        """
        start = Cursor.fromMapping({0: 5, 1: 7})
        self.assertEqual(advancePosition(start, 0, Cursor.fromMapping({0: 9})).asDict(), {0: 9, 1: 7})
        self.assertEqual(advancePosition(start, 1, Cursor.fromMapping({1: 3})).asDict(), {0: 5, 1: 7})
        self.assertEqual(advancePosition(None, 2, Cursor.fromMapping({2: 4, 0: 1})).asDict(), {2: 4})


class WindowDeliveryTests(SynchronousTestCase):
    """
    A subscription delivering with a window, end to end on the memory
    endpoint.
    """

    def outstanding(self, harness: Harness) -> List[Tuple[str, bytes]]:
        """
        The requests the receiver holds unanswered, as (key, seq).
        """
        return [keyed(r.content.getvalue()) for r in harness.receiver.hanging if not r.finished]

    def test_orderPerKey(self) -> None:
        """
        With maxInFlight = 4, messages of different keys are out together
        and two of one key never are; whatever order the answers come in,
        each key receives its messages in the stream's order.
        """
        harness = Harness()
        record = harness.create(maxInFlight=4)
        harness.receiver.script = [HANG] * 100
        plan = ["a", "a", "b", "c", "a", "d", "b", "e", "a", "c"]
        publishKeyed(harness, plan)
        self.assertEqual(self.outstanding(harness), [("a", b"0"), ("b", b"0"), ("c", b"0"), ("d", b"0")])
        # Answer the newest first, every time, until all is delivered.
        while any(not r.finished for r in harness.receiver.hanging):
            out = [r for r in harness.receiver.hanging if not r.finished]
            keys = [keyed(r.content.getvalue())[0] for r in out]
            self.assertEqual(len(keys), len(set(keys)), "two messages of one key were out together")
            self.assertLessEqual(len(out), 4)
            out[-1].finish()
            harness.pump()
        self.assertEqual(perKey(harness.receiver.bodies()), {"a": [0, 1, 2, 3], "b": [0, 1], "c": [0, 1],
                                                              "d": [0], "e": [0]})
        self.assertEqual(storedOffset(harness, record["id"]), len(plan))
        self.assertEqual(harness.record(record["id"])["delivered"], len(plan))

    def test_positionOverSettledPrefix(self) -> None:
        """
        The stored position does not pass a message still out, however many
        after it were delivered; it jumps once that one is.
        """
        harness = Harness()
        record = harness.create(maxInFlight=4)
        start = storedOffset(harness, record["id"])
        harness.receiver.script = [HANG] * 4
        publishKeyed(harness, ["a", "b", "c", "d"])
        for request in harness.receiver.hanging[1:]:
            request.finish()
        harness.pump()
        self.assertEqual(storedOffset(harness, record["id"]), start)
        self.assertEqual(harness.record(record["id"])["delivered"], 3)
        harness.receiver.hanging[0].finish()
        harness.pump()
        self.assertEqual(storedOffset(harness, record["id"]), 4)

    def test_retryHoldsOnlyItsKey(self) -> None:
        """
        A message answered 503 is retried after its backoff; meanwhile the
        other keys go on, and the later messages of its key wait for it.
        """
        harness = Harness()
        record = harness.create(maxInFlight=4)
        harness.receiver.script = [503]
        publishKeyed(harness, ["a", "b", "a", "b", "c", "b"])
        # a:0 failed and waits 1 s; b and c are all delivered, a:1 is not.
        self.assertEqual(perKey(harness.receiver.bodies()), {"a": [0], "b": [0, 1, 2], "c": [0]})
        self.assertEqual(records.status(harness.record(record["id"])), records.FAILING)
        self.assertEqual(storedOffset(harness, record["id"]), 0)
        harness.advance(1)
        self.assertEqual(perKey(harness.receiver.bodies()), {"a": [0, 0, 1], "b": [0, 1, 2], "c": [0]})
        self.assertEqual(storedOffset(harness, record["id"]), 6)
        self.assertEqual(records.status(harness.record(record["id"])), records.ACTIVE)

    def test_windowFullOfRetriesWaits(self) -> None:
        """
        When every place holds a message waiting for its retry, nothing more
        is sent until one of them settles.
        """
        harness = Harness()
        harness.create(maxInFlight=2)
        harness.receiver.script = [503, 503]
        publishKeyed(harness, ["a", "b", "c", "d"])
        self.assertEqual(perKey(harness.receiver.bodies()), {"a": [0], "b": [0]})
        harness.advance(1)
        self.assertEqual(sorted(harness.receiver.bodies()), [b"a:0", b"a:0", b"b:0", b"b:0", b"c:0", b"d:0"])

    def test_deadLetterFreesItsKey(self) -> None:
        """
        A rejected message goes to the dead letters and the next message of
        its key follows; the position passes both.
        """
        harness = Harness(api="dlq = local/orders.dlq")
        record = harness.create(maxInFlight=4)
        harness.receiver.script = [HANG, 400]
        publishKeyed(harness, ["a", "b", "b", "a"])
        self.assertEqual([m.content for m in harness.deadLetters()], [b"b:0"])
        self.assertEqual(perKey(harness.receiver.bodies()), {"a": [0], "b": [0, 1]})
        self.assertEqual(storedOffset(harness, record["id"]), 0)
        harness.receiver.hanging[0].finish()
        harness.pump()
        self.assertEqual(perKey(harness.receiver.bodies()), {"a": [0, 1], "b": [0, 1]})
        self.assertEqual(storedOffset(harness, record["id"]), 4)
        self.assertEqual(harness.record(record["id"])["deadLettered"], 1)

    def test_crashInTheMiddle(self) -> None:
        """
        A node that dies with messages out, some delivered after one that is
        not, stored a position at that one: a new node delivers it and
        everything after it again (at-least-once), nothing before it, and
        every key in order.
        """
        harness = Harness()
        record = harness.create(maxInFlight=3)
        harness.receiver.script = [HANG] * 3
        publishKeyed(harness, ["a", "b", "c", "a", "b"])
        # b:0 and c:0 are delivered, a:0 never answers; b:1 follows b:0.
        harness.receiver.hanging[1].finish()
        harness.receiver.hanging[2].finish()
        harness.pump()
        self.assertEqual(harness.receiver.bodies(), [b"a:0", b"b:0", b"c:0", b"b:1"])
        self.assertEqual(storedOffset(harness, record["id"]), 0)

        # The crash: the node is gone, with whatever it had stored.
        store = MemoryStore()
        store.put(records.KIND, record["id"], copy.deepcopy(harness.record(record["id"])))
        again = GatewayService(parseConfig(INI.format(api="", gateway=""), "test.ini"), harness.clock)
        again.connectors["local"] = harness.connector
        again.hub.connectors["local"] = harness.connector
        for api in again.apis:
            api.connector = harness.connector
        receiver = Receiver(harness.clock)
        stub = StubTreq(receiver)
        service = again.webhooks
        service.store = store
        service.http = stub
        service.resolve = harness.service.resolve
        service.startService()
        for _ in range(8):
            harness.clock.advance(0)
            stub.flush()
        self.assertEqual(perKey(receiver.bodies()), {"a": [0, 1], "b": [0, 1], "c": [0]})
        flushAll(service)
        stored = store.get(records.KIND, record["id"])
        position = self.successResultOf(stored)["position"]
        self.assertEqual(Cursor.decode(position, harness.gateway.api("orders").tag).get(0), 5)

    def test_defaultKeepsStreamOrder(self) -> None:
        """
        Without maxInFlight (and webhook.max-in-flight = 1) one message is
        out at a time, keyed or not.
        """
        harness = Harness()
        harness.create()
        harness.receiver.script = [HANG]
        publishKeyed(harness, ["a", "b"])
        self.assertEqual(harness.receiver.bodies(), [b"a:0"])
        harness.receiver.hanging[0].finish()
        harness.pump()
        self.assertEqual(harness.receiver.bodies(), [b"a:0", b"b:0"])

    def test_apiLevelWindow(self) -> None:
        """
        webhook.max-in-flight is the window of subscriptions that do not
        set their own, and the admin view shows the effective one.
        """
        harness = Harness(api="webhook.max-in-flight = 3")
        record = harness.create()
        own = harness.create(maxInFlight=1)
        api = harness.gateway.api("orders")
        self.assertEqual(harness.service.view(api, harness.record(record["id"]))["maxInFlight"], 3)
        self.assertEqual(harness.service.view(api, harness.record(own["id"]))["maxInFlight"], 1)
        self.assertEqual(harness.service.deliverers[record["id"]].window.limit, 3)
        self.assertEqual(harness.service.deliverers[own["id"]].window.limit, 1)

    def test_badMaxInFlight(self) -> None:
        """
        maxInFlight must be an integer from 1 to 1000.
        """
        harness = Harness()
        for value in (0, 1001, "4", True, 2.5):
            with self.assertRaises(BadRequest) as raised:
                harness.service.create("orders", {"callbackUrl": "https://hooks.example/in",
                                                  "maxInFlight": value})
            self.assertIn("maxInFlight", str(raised.exception))
