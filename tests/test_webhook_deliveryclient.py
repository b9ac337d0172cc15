"""
Unit tests of L{evgate.webhook.client.DeliveryClient}, what deliveries send
their requests with, and of L{evgate.webhook.client.BytesBody}: one
request per call, straight to the agent, its body written with its head,
cancelled after its timeout.  Requests over real sockets (TLS included)
are in L{tests.test_webhook_connections} and L{tests.test_webhook_tls}.
"""

from __future__ import annotations

from typing import Any, List, Tuple

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import Request
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface.verify import verifyObject

from evgate.webhook.client import MAX_REMEMBERED_URLS, BytesBody, DeliveryClient, WebhookTrust


class PendingAgent:
    """
    An agent that records its requests and leaves their Deferreds to the
    test.
    """

    def __init__(self) -> None:
        self.requests: List[Tuple[bytes, bytes, Headers, Any, Deferred]] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Deferred:
        d: Deferred = Deferred()
        self.requests.append((method, uri, headers, bodyProducer, d))
        return d


class Consumer:
    """
    An L{twisted.internet.interfaces.IConsumer} that keeps what it is given.
    """

    def __init__(self) -> None:
        self.written: List[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


class BytesBodyTests(SynchronousTestCase):
    """
    L{BytesBody} writes the whole body when asked, in the same call.
    """

    def test_interface(self) -> None:
        """
        It is an L{IBodyProducer} of known length.
        """
        body = BytesBody(b"hello")
        verifyObject(IBodyProducer, body)
        self.assertEqual(body.length, 5)

    def test_writtenAtOnce(self) -> None:
        """
        C{startProducing} writes the body and returns a fired Deferred.
        """
        consumer = Consumer()
        done = BytesBody(b'{"a":1}').startProducing(consumer)
        self.assertEqual(consumer.written, [b'{"a":1}'])
        self.assertIsNone(self.successResultOf(done))

    def test_headAndBodyInOneTurn(self) -> None:
        """
        Written by Twisted's HTTP/1.1 request, the head and the body reach
        the transport in the same call (nothing is left for a later reactor
        turn), with the body's length.
        """
        transport = StringTransport()
        request = Request(b"POST", b"/hook", Headers({b"host": [b"receiver.example"]}), BytesBody(b"0123456789"))
        finished = request.writeTo(transport)
        self.successResultOf(finished)
        sent = transport.value()
        self.assertIn(b"Content-Length: 10\r\n", sent)
        self.assertTrue(sent.endswith(b"\r\n\r\n0123456789"), sent)


class DeliveryClientTests(SynchronousTestCase):
    """
    L{DeliveryClient.request} hands one request to the agent, as given.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.agent = PendingAgent()
        self.client = DeliveryClient(self.agent, self.clock)

    def test_requestAsGiven(self) -> None:
        """
        The method, the URL, the headers (nothing added: no cookies, no
        C{Accept-Encoding}) and the body go to the agent; the agent's
        response is the result.
        """
        headers = Headers({b"webhook-id": [b"msg_1"]})
        d = self.client.request("POST", "https://hooks.example/in?x=1", data=b"body", headers=headers, timeout=5,
                                allow_redirects=False, unbuffered=True, reactor=self.clock)
        [(method, uri, sent, body, pending)] = self.agent.requests
        self.assertEqual((method, uri), (b"POST", b"https://hooks.example/in?x=1"))
        self.assertEqual(list(sent.getAllRawHeaders()), [(b"Webhook-Id", [b"msg_1"])])
        self.assertIsInstance(body, BytesBody)
        self.assertEqual(body.body, b"body")
        response = object()
        pending.callback(response)
        self.assertIs(self.successResultOf(d), response)

    def test_iriEncoded(self) -> None:
        """
        A callback URL with characters outside ASCII is sent as its URI,
        as treq would send it.
        """
        self.client.request("POST", "https://hooks.example/caf\u00e9?q=\u00fc", data=b"")
        self.assertEqual(self.agent.requests[0][1], b"https://hooks.example/caf%C3%A9?q=%C3%BC")

    def test_urlsRemembered(self) -> None:
        """
        A URL is encoded once; the memory of URLs is bounded.
        """
        first = self.client.uriOf("https://hooks.example/a")
        self.assertIs(self.client.uriOf("https://hooks.example/a"), first)
        for index in range(MAX_REMEMBERED_URLS + 1):
            self.client.uriOf(f"https://hooks.example/{index}")
        self.assertLessEqual(len(self.client._uris), MAX_REMEMBERED_URLS)

    def test_timeout(self) -> None:
        """
        A request without a response after C{timeout} seconds is cancelled.
        """
        d = self.client.request("POST", "https://hooks.example/in", data=b"", timeout=3, reactor=self.clock)
        self.clock.advance(2.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.failureResultOf(d, CancelledError)

    def test_answeredInTimeLeavesNoTimer(self) -> None:
        """
        A response in time cancels the timer: nothing is left scheduled.
        """
        d = self.client.request("POST", "https://hooks.example/in", data=b"", timeout=3)
        self.agent.requests[0][4].callback("response")
        self.assertEqual(self.successResultOf(d), "response")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_failureInTimeLeavesNoTimer(self) -> None:
        """
        A request that fails in time fails with its own reason and leaves no
        timer.
        """
        d = self.client.request("POST", "https://hooks.example/in", data=b"", timeout=3)
        self.agent.requests[0][4].errback(Failure(ValueError("refused")))
        self.failureResultOf(d, ValueError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_noRedirectsNoBuffering(self) -> None:
        """
        Deliveries follow no redirects and buffer no responses: asking for
        either is a mistake, not silently ignored.
        """
        self.assertRaises(ValueError, self.client.request, "POST", "https://h.example/", allow_redirects=True)
        self.assertRaises(ValueError, self.client.request, "POST", "https://h.example/", unbuffered=False)
        self.assertEqual(self.agent.requests, [])


class TrustPolicyTests(SynchronousTestCase):
    """
    The TLS policy of deliveries makes a receiver's connection settings
    once per host and port.
    """

    def test_creatorCached(self) -> None:
        """
        Two requests to one receiver share its TLS connection settings;
        another host gets its own.
        """
        policy = WebhookTrust().tlsPolicy()
        first = policy.creatorForNetloc(b"hooks.example", 443)
        self.assertIs(policy.creatorForNetloc(b"hooks.example", 443), first)
        self.assertIsNot(policy.creatorForNetloc(b"other.example", 443), first)
