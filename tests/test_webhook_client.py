"""
Unit tests of the HTTP client side of webhook deliveries
(L{evgate.webhook.client}): which connection a delivery goes on, and the
deliverer's immediate resend after a pooled connection turned out closed.
The end-to-end proof with real receivers is in
L{tests.test_webhook_connections}.
"""

from __future__ import annotations

from typing import Any, List, Tuple

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import RequestNotSent, ResponseNeverReceived
from twisted.web.iweb import IAgent
from zope.interface.verify import verifyObject

from evgate.webhook.client import MAX_REMEMBERED_URLS, DeliveryAgent, ReusedConnectionLost, _ReusedConnection
from evgate.webhook.ssrf import AddressPolicy, GuardedEndpointFactory

from .test_webhook import Harness


class FakeResponse:
    """
    Just what L{DeliveryAgent} looks at in a response.
    """

    def __init__(self, version: Tuple[bytes, int, int]) -> None:
        self.version = version


class RecordingAgent:
    """
    An agent that records its requests and answers with C{outcome}.
    """

    def __init__(self) -> None:
        self.requests: List[bytes] = []
        self.outcome: Any = FakeResponse((b"HTTP", 1, 1))

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Deferred:
        self.requests.append(uri)
        if isinstance(self.outcome, BaseException):
            return fail(self.outcome)
        return succeed(self.outcome)


class DeliveryAgentTests(SynchronousTestCase):
    """
    L{DeliveryAgent} sends a receiver's requests on pooled connections
    until the receiver shows it does not keep them.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.agent = DeliveryAgent(self.clock, GuardedEndpointFactory(self.clock, AddressPolicy()),
                                   noReuseMemory=600.0)
        self.reusing = RecordingAgent()
        self.fresh = RecordingAgent()
        self.agent._reusing = self.reusing
        self.agent._fresh = self.fresh

    def send(self, uri: bytes = b"https://hooks.example/h") -> List[Any]:
        """
        One request; its outcome in a list.
        """
        results: List[Any] = []
        self.agent.request(b"POST", uri).addBoth(results.append)
        return results

    def test_interface(self) -> None:
        """
        It is an IAgent.
        """
        self.assertTrue(verifyObject(IAgent, self.agent))

    def test_keepAliveReceiverReused(self) -> None:
        """
        An HTTP/1.1 receiver's requests all go on pooled connections.
        """
        for _ in range(3):
            self.send()
        self.assertEqual((len(self.reusing.requests), len(self.fresh.requests)), (3, 0))

    def test_http10ReceiverGetsNewConnections(self) -> None:
        """
        After an HTTP/1.0 answer, that receiver's requests go on new
        connections (another receiver's do not), until the agent forgets
        and tries reuse again.
        """
        self.reusing.outcome = FakeResponse((b"HTTP", 1, 0))
        self.send()
        self.send()
        self.send(b"https://other.example/h")
        self.assertEqual(self.fresh.requests, [b"https://hooks.example/h"])
        self.assertEqual(self.reusing.requests, [b"https://hooks.example/h", b"https://other.example/h"])
        self.clock.advance(600)
        self.send()
        self.assertEqual(len(self.reusing.requests), 3)

    def test_receiverOfRememberedUris(self) -> None:
        """
        The receiver a URI goes to is remembered per URI (within a bound),
        and what is learnt about a receiver holds for all its URIs.
        """
        self.send(b"https://hooks.example/a")
        self.reusing.outcome = FakeResponse((b"HTTP", 1, 0))
        self.send(b"https://hooks.example/a")
        self.send(b"https://hooks.example/b")
        self.send(b"https://hooks.example:8443/a")
        self.assertEqual(self.fresh.requests, [b"https://hooks.example/b"])
        for index in range(MAX_REMEMBERED_URLS + 1):
            self.agent.request(b"POST", b"https://hooks.example/%d" % (index,))
        self.assertLessEqual(len(self.agent._keys), MAX_REMEMBERED_URLS)

    def test_closedPooledConnection(self) -> None:
        """
        A request that failed with L{ReusedConnectionLost} fails the same,
        and the receiver's next requests go on new connections.
        """
        self.reusing.outcome = ReusedConnectionLost()
        [failure] = self.send()
        self.assertTrue(failure.check(ReusedConnectionLost))
        self.send()
        self.assertEqual((len(self.reusing.requests), len(self.fresh.requests)), (1, 1))


class ReusedConnectionTests(SynchronousTestCase):
    """
    A pooled connection's failures before any answer become
    L{ReusedConnectionLost}; others stay as they are.
    """

    def outcome(self, error: BaseException) -> Failure:
        """
        The failure a request on a reused connection that failed with
        C{error} ends in.
        """
        class Protocol:
            state = "QUIESCENT"

            def request(self, request: Any) -> Deferred:
                return fail(error)

        results: List[Any] = []
        _ReusedConnection(Protocol()).request(object()).addBoth(results.append)
        return results[0]  # type: ignore[no-any-return]

    def test_closedByReceiver(self) -> None:
        """
        A clean close before any byte of the answer, or a connection that
        was already gone, is L{ReusedConnectionLost}.
        """
        self.assertTrue(self.outcome(ResponseNeverReceived([Failure(ConnectionDone())])).check(ReusedConnectionLost))
        self.assertTrue(self.outcome(RequestNotSent()).check(ReusedConnectionLost))

    def test_timeoutStays(self) -> None:
        """
        Our own cancel (a timeout) is not a closed connection: the receiver
        may be working on the request.
        """
        failure = self.outcome(ResponseNeverReceived([Failure(CancelledError())]))
        self.assertTrue(failure.check(ResponseNeverReceived))


class ResendTests(SynchronousTestCase):
    """
    The deliverer sends a request that met a closed pooled connection again
    at once, without counting an attempt; once per attempt.
    """

    def harness(self, failures: int) -> Tuple[Harness, str, List[int]]:
        """
        A harness whose client fails its first C{failures} requests with
        L{ReusedConnectionLost}, then answers through the stub receiver.
        """
        harness = Harness()
        record = harness.create()
        calls: List[int] = []
        stub = harness.stub

        class ClosingFirst:
            def request(self, *args: Any, **kwargs: Any) -> Deferred:
                calls.append(1)
                if len(calls) <= failures:
                    return fail(ReusedConnectionLost())
                return stub.request(*args, **kwargs)  # type: ignore[no-any-return]

        harness.service.deliverers[record["id"]].context.http = ClosingFirst()
        return harness, record["id"], calls

    def test_resentAtOnce(self) -> None:
        """
        Without any time passing, the message is sent again and delivered;
        no failed attempt is counted and nothing is reported.
        """
        harness, id, calls = self.harness(failures=1)
        harness.publish(b"m0")
        self.assertEqual(len(calls), 2)
        self.assertEqual(harness.receiver.bodies(), [b"m0"])
        stored = harness.record(id)
        self.assertEqual((stored["delivered"], stored["failedAttempts"], stored["lastError"]), (1, 0, None))

    def test_onlyOncePerAttempt(self) -> None:
        """
        A second closed connection in a row counts as a failed attempt with
        its reason, and the message is retried after the backoff.
        """
        harness, id, calls = self.harness(failures=2)
        harness.publish(b"m0")
        self.assertEqual(len(calls), 2)
        stored = harness.record(id)
        self.assertEqual(stored["failedAttempts"], 1)
        self.assertEqual(stored["lastError"]["message"],
                         "the receiver closed a kept-alive connection before answering")
        harness.advance(1.0)
        self.assertEqual(harness.receiver.bodies(), [b"m0"])
