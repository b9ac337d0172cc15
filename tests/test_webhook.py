"""
Unit tests of webhook delivery: the deliverer, its feeds, retries and
dead letters, signatures, and the SSRF guard.  A L{Clock} drives time and
treq's L{StubTreq} stands in for the network: no sockets, no sleeps.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from typing import Any, Dict, List, Optional, Set, Tuple
from urllib.parse import unquote

from standardwebhooks.webhooks import Webhook
from treq.testing import HasHeaders, RequestSequence, StringStubbingResource, StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface.verify import verifyObject

from evgate.config import ConfigError, parseConfig
from evgate.connectors.kafka import GroupBatch
from evgate.errors import BadCursor, BadFilter, BadRequest, Conflict, EndpointUnavailable, NotFound
from evgate.interfaces import IEntrypoint, ISubscriber, IUpstreamSink
from evgate.message import Cursor, Draft, Message
from evgate.service import GatewayService
from evgate.webhook import records
from evgate.webhook.delivery import checkStaticHeaders, headerName, headerValue
from evgate.webhook.feeds import HubFeed, ShareGroupFeed
from evgate.webhook.kafka import KafkaGroupFeed, webhookGroup
from evgate.webhook.retry import (
    DELIVERED,
    REJECTED,
    RETRYABLE,
    RetryPolicy,
    classifyStatus,
    parsePolicy,
    parseRetryAfter,
)
from evgate.webhook.signing import BadSecret, newSecret, secretKey, signature
from evgate.webhook.ssrf import (
    AddressPolicy,
    BadCallback,
    ForbiddenAddress,
    GuardedEndpointFactory,
    addressClass,
    checkCallback,
    parseCallbackUrl,
)

INI = """
[gateway]
listen = tcp:0
store = memory
{gateway}

[endpoint:local]
type = memory
retention = 1000

[api:orders]
path = /orders
endpoint = local
topic = orders
entrypoints = http-post webhook
start = earliest
webhook.retry.initial-delay = 1
webhook.retry.max-delay = 60
webhook.retry.max-attempts = 4
{api}

[api:plain]
path = /plain
endpoint = local
topic = plain
entrypoints = http-post
"""

PUBLIC = "93.184.215.14"   # what the fake resolver answers for public names
CALLBACK = "https://hooks.example/in"

HANG = object()


class Received:
    """
    One request the fake receiver got.
    """

    def __init__(self, body: bytes, headers: Dict[str, List[str]], at: float) -> None:
        self.body = body
        self.headers = headers
        self.at = at

    def header(self, name: str) -> Optional[str]:
        """
        The single value of header C{name}, or L{None}.
        """
        values = self.headers.get(name)
        return values[0] if values else None

    def single(self) -> Dict[str, str]:
        """
        The headers with one value each, for standardwebhooks.
        """
        return {name: values[0] for name, values in self.headers.items()}


class Receiver(Resource):
    """
    A webhook receiver that answers from a script: a status, a (status,
    headers) pair, or L{HANG} (never answers).  Unscripted requests get 200.
    """

    isLeaf = True

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock
        self.requests: List[Received] = []
        self.script: List[Any] = []
        self.hanging: List[Any] = []

    def render_POST(self, request: Any) -> Any:
        headers: Dict[str, List[str]] = {}
        for name, values in request.requestHeaders.getAllRawHeaders():
            headers[name.decode("latin-1").lower()] = [v.decode("latin-1") for v in values]
        self.requests.append(Received(request.content.read(), headers, self.clock.seconds()))
        answer = self.script.pop(0) if self.script else 200
        if answer is HANG:
            self.hanging.append(request)
            return NOT_DONE_YET
        extra: Dict[str, str] = {}
        if isinstance(answer, tuple):
            answer, extra = answer
        request.setResponseCode(answer)
        for name, value in extra.items():
            request.setHeader(name.encode(), value.encode())
        return b"thanks"

    def bodies(self) -> List[bytes]:
        """
        The bodies received, in order.
        """
        return [r.body for r in self.requests]


class FixedRandom:
    """
    A random source whose C{uniform} answers a fixed fraction of the range:
    1.0 makes full jitter wait the whole backoff.
    """

    def __init__(self, fraction: float = 1.0) -> None:
        self.fraction = fraction
        self.calls: List[Tuple[float, float]] = []

    def uniform(self, low: float, high: float) -> float:
        self.calls.append((low, high))
        return low + (high - low) * self.fraction


class FlakyConnector:
    """
    Wraps a connector so that its publishes fail C{failures} times first.
    """

    def __init__(self, connector: Any, failures: int) -> None:
        self.connector = connector
        self.failures = failures

    def publish(self, topic: str, draft: Draft, timeout: float) -> Deferred:
        if self.failures > 0:
            self.failures -= 1
            return fail(EndpointUnavailable("the broker is away"))
        return self.connector.publish(topic, draft, timeout)


class Listener:
    """
    A hub subscriber that takes everything at once.
    """

    def __init__(self) -> None:
        self.events: List[Any] = []

    def started(self, cursor: Cursor) -> None:
        pass

    def deliver(self, events: List[Any]) -> None:
        self.events.extend(events)

    def gap(self, cursor: Cursor, reason: str) -> None:
        pass

    def advanced(self, cursor: Cursor) -> None:
        pass

    def failed(self, reason: Failure) -> None:
        pass


def fakeResolver(answers: Dict[str, List[str]]) -> Any:
    """
    A resolver of the names in C{answers}; others do not resolve.
    """
    def resolve(host: str, port: int) -> Deferred:
        if host in answers:
            return succeed(list(answers[host]))
        return fail(DNSLookupError(host))

    return resolve


def flushAll(service: Any) -> None:
    """
    Make the deliverers of C{service} write what they hold back now.
    """
    for deliverer in service.deliverers.values():
        deliverer.flushed()


class Harness:
    """
    A memory gateway with the webhook entrypoint, its webhook service on a
    Clock, a StubTreq receiver and a fake resolver.
    """

    def __init__(self, api: str = "", gateway: str = "", fraction: float = 1.0, store: Any = None) -> None:
        self.clock = Clock()
        # Real time, so that standardwebhooks accepts the timestamps.
        self.clock.advance(time.time())
        text = INI.format(api=api, gateway=gateway)
        self.gateway = GatewayService(parseConfig(text, "test.ini"), self.clock)
        self.service = self.gateway.webhooks
        if store is not None:
            self.service.store = store
        self.store = self.service.store
        self.receiver = Receiver(self.clock)
        self.stub = StubTreq(self.receiver)
        self.service.http = self.stub
        self.answers = {"hooks.example": [PUBLIC], "inside.example": ["10.1.2.3"]}
        self.service.resolve = fakeResolver(self.answers)
        self.random = FixedRandom(fraction)
        self.service.random = self.random
        self.connector = self.gateway.connectors["local"]
        self.service.startService()

    def pump(self, rounds: int = 8) -> None:
        """
        Let the reactor's turn-0 calls and the stub's in-memory requests run.
        """
        for _ in range(rounds):
            self.clock.advance(0)
            self.stub.flush()

    def advance(self, seconds: float) -> None:
        """
        Move time on, then pump.
        """
        self.clock.advance(seconds)
        self.pump()

    def result(self, d: Deferred) -> Any:
        """
        The result of C{d} once pumped; raises its failure.
        """
        self.pump()
        results: List[Any] = []
        d.addBoth(results.append)
        assert results, "the Deferred did not fire"
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]

    def create(self, **document: Any) -> Dict[str, Any]:
        """
        Create a subscription of API orders.
        """
        document.setdefault("callbackUrl", CALLBACK)
        return self.result(self.service.create("orders", document))  # type: ignore[no-any-return]

    def publish(self, content: bytes, key: Optional[str] = None, headers: Tuple[Tuple[str, str], ...] = (),
                topic: str = "orders") -> None:
        """
        Publish one message to the memory endpoint.
        """
        self.connector.publish(topic, Draft(content, key, headers))
        self.pump()

    def record(self, id: str) -> Dict[str, Any]:
        """
        The stored record of subscription C{id}, once its deliverer made the
        writes it holds back (L{evgate.webhook.writes.WRITE_INTERVAL}),
        without moving the clock.
        """
        flushAll(self.service)
        return self.result(self.store.get(records.KIND, id))  # type: ignore[no-any-return]

    def deadLetters(self, topic: str = "orders.dlq") -> List[Message]:
        """
        What the memory endpoint holds on the dead-letter topic.
        """
        return list(self.connector.topicLog(topic).messages)


class SigningTests(SynchronousTestCase):
    """
    Standard Webhooks secrets and signatures.
    """

    def test_secretShape(self) -> None:
        """
        A new secret is whsec_ and the base64 of 32 random bytes, and its key
        is those bytes; two secrets differ.
        """
        secret = newSecret()
        self.assertTrue(secret.startswith("whsec_"))
        self.assertEqual(len(secretKey(secret)), 32)
        self.assertNotEqual(secret, newSecret())

    def test_badSecrets(self) -> None:
        """
        Texts that are not whsec_ secrets of at least 24 bytes are refused.
        """
        for text in ("abc", "whsec_***", "whsec_" + "QUJD"):
            self.assertRaises(BadSecret, secretKey, text)

    def test_signatureVerifiesIndependently(self) -> None:
        """
        The standardwebhooks package accepts a signature made here.
        """
        secret = newSecret()
        now = int(time.time())
        body = b'{"amount": 42}'
        headers = {"webhook-id": "msg_1", "webhook-timestamp": str(now),
                   "webhook-signature": signature(secretKey(secret), "msg_1", now, body)}
        self.assertEqual(Webhook(secret).verify(body, headers), {"amount": 42})


class RetryTests(SynchronousTestCase):
    """
    Outcomes, backoff with full jitter, Retry-After, and the retry object of
    a subscription.
    """

    def test_classify(self) -> None:
        """
        2xx delivers; 408, 429 and 5xx are retried; other 4xx and 3xx are
        rejections.
        """
        self.assertEqual([classifyStatus(s) for s in (200, 204, 299)], [DELIVERED] * 3)
        self.assertEqual([classifyStatus(s) for s in (408, 429, 500, 502, 503, 599)], [RETRYABLE] * 6)
        self.assertEqual([classifyStatus(s) for s in (301, 302, 400, 401, 404, 410, 422)], [REJECTED] * 7)

    def test_fullJitter(self) -> None:
        """
        The delay after attempt n is drawn from [0, min(max, initial *
        2^(n-1))].
        """
        policy = RetryPolicy(1.0, 10.0, 10)
        random = FixedRandom(1.0)
        self.assertEqual([policy.delay(n, random=random) for n in range(1, 7)], [1, 2, 4, 8, 10, 10])
        self.assertEqual(random.calls[0], (0.0, 1.0))
        self.assertEqual(policy.delay(3, random=FixedRandom(0.0)), 0.0)

    def test_retryAfterCapped(self) -> None:
        """
        Retry-After replaces the backoff, up to the maximum delay.
        """
        policy = RetryPolicy(1.0, 30.0, 5)
        self.assertEqual(policy.delay(1, retryAfter=12.0), 12.0)
        self.assertEqual(policy.delay(1, retryAfter=3600.0), 30.0)

    def test_parseRetryAfter(self) -> None:
        """
        Retry-After is delta-seconds or an HTTP date; junk is ignored.
        """
        now = 1_700_000_000.0
        self.assertEqual(parseRetryAfter("7", now), 7.0)
        self.assertEqual(parseRetryAfter(formatdate(now + 20, usegmt=True), now), 20.0)
        self.assertEqual(parseRetryAfter(formatdate(now - 20, usegmt=True), now), 0.0)
        self.assertIsNone(parseRetryAfter("soon", now))
        self.assertIsNone(parseRetryAfter(None, now))

    def test_parsePolicy(self) -> None:
        """
        A subscription's retry object overrides the API's defaults field by
        field, and wrong values are refused with the field's name.
        """
        default = RetryPolicy(1.0, 60.0, 5)
        self.assertEqual(parsePolicy(None, default), default)
        self.assertEqual(parsePolicy({"maxAttempts": 2}, default), RetryPolicy(1.0, 60.0, 2))
        self.assertEqual(parsePolicy({"initialDelay": 90}, default), RetryPolicy(90.0, 90.0, 5))
        for bad in ({"maxAttempts": 0}, {"initialDelay": -1}, {"maxDelay": "x"}, {"initialDelay": 5, "maxDelay": 2},
                    {"tries": 3}, [1], {"maxAttempts": True}):
            self.assertRaises(ValueError, parsePolicy, bad, default)


class SsrfTests(SynchronousTestCase):
    """
    The classification of addresses, the URL check, and the guard at
    connect time.
    """

    def test_addressClasses(self) -> None:
        """
        Non-public addresses are named for what they are, IPv6 forms that
        embed an IPv4 address included; public ones pass.
        """
        cases = {
            "127.0.0.1": "loopback", "::1": "loopback", "10.1.2.3": "private", "172.16.0.9": "private",
            "192.168.1.1": "private", "fd12::1": "private", "169.254.10.10": "link-local",
            "fe80::1": "link-local", "224.0.0.251": "multicast", "ff02::1": "multicast",
            "0.0.0.0": "unspecified", "::": "unspecified", "100.64.1.1": "not globally routable",
            "169.254.169.254": "cloud metadata", "fd00:ec2::254": "cloud metadata",
            "::ffff:127.0.0.1": "loopback", "::ffff:169.254.169.254": "cloud metadata",
            "64:ff9b::a01:203": "private", "2002:a00:1::1": "private",
            "8.8.8.8": None, "2606:4700:4700::1111": None, "203.0.114.1": None,
        }
        for address, expected in cases.items():
            self.assertEqual((address, addressClass(address)), (address, expected))

    def test_policy(self) -> None:
        """
        webhook-allow-private allows private and loopback addresses but
        never cloud metadata services.
        """
        strict, lax = AddressPolicy(False), AddressPolicy(True)
        self.assertIn("loopback", strict.refusal("127.0.0.1") or "")
        self.assertIsNone(lax.refusal("127.0.0.1"))
        self.assertIsNone(lax.refusal("10.0.0.1"))
        self.assertIn("metadata", lax.refusal("169.254.169.254") or "")
        self.assertIn("metadata", lax.refusal("fd00:ec2::254") or "")
        self.assertIsNone(strict.refusal("8.8.4.4"))

    def test_urlSyntax(self) -> None:
        """
        Only https (and http where allowed) URLs with a host, without
        credentials or a fragment, are accepted.
        """
        self.assertEqual(parseCallbackUrl("https://hooks.example/in?a=1", False).port, 443)
        self.assertEqual(parseCallbackUrl("http://hooks.example:8080/", True).port, 8080)
        for text, allowHttp in (("http://hooks.example/", False), ("ftp://hooks.example/", True),
                                ("https://user:pw@hooks.example/", False), ("https:///nohost", False),
                                ("https://hooks.example/#frag", False), ("hooks.example/in", False),
                                ("https://hooks.example/a b", False), ("https://hooks.example:99999/", False),
                                (42, False), ("", False), ("https://x/" + "a" * 3000, False)):
            self.assertRaises(BadCallback, parseCallbackUrl, text, allowHttp)

    def test_checkCallbackResolves(self) -> None:
        """
        At creation every address of the host is checked: one private
        address refuses the URL, and a name that does not resolve is
        refused.
        """
        resolve = fakeResolver({"ok.example": ["8.8.8.8"], "mixed.example": ["8.8.8.8", "10.0.0.1"]})
        policy = AddressPolicy(False)
        self.assertEqual(self.successResultOf(checkCallback(parseCallbackUrl("https://ok.example/", False),
                                                            policy, resolve)), ["8.8.8.8"])
        failure = self.failureResultOf(checkCallback(parseCallbackUrl("https://mixed.example/", False),
                                                     policy, resolve), BadCallback)
        self.assertIn("10.0.0.1 is a private address", failure.getErrorMessage())
        self.failureResultOf(checkCallback(parseCallbackUrl("https://nowhere.example/", False), policy, resolve),
                             BadCallback)

    def test_guardRefusesAtConnect(self) -> None:
        """
        The agent's endpoints resolve again when they connect and refuse a
        name that now points inside (DNS rebinding), without connecting.
        """
        reactor = MemoryReactorClock()
        answers = {"hooks.example": ["10.9.8.7"]}
        factory = GuardedEndpointFactory(reactor, AddressPolicy(False), fakeResolver(answers))
        endpoint = factory.endpointForURI(URI.fromBytes(b"http://hooks.example:8080/in"))
        failure = self.failureResultOf(endpoint.connect(object()), ForbiddenAddress)
        self.assertIn("10.9.8.7 is a private address", str(failure.value))
        self.assertEqual(reactor.tcpClients, [])

    def test_guardConnectsToCheckedAddress(self) -> None:
        """
        An allowed name is connected by the address that was checked, never
        by resolving the name again; the next address is tried when one is
        refused.
        """
        reactor = MemoryReactorClock()
        answers = {"hooks.example": ["93.184.215.5", "2606:2800:21f::5"]}
        factory = GuardedEndpointFactory(reactor, AddressPolicy(True), fakeResolver(answers))
        endpoint = factory.endpointForURI(URI.fromBytes(b"http://hooks.example:8080/in"))
        from twisted.internet.protocol import Factory, Protocol

        d = endpoint.connect(Factory.forProtocol(Protocol))
        self.assertEqual(reactor.tcpClients[0][:2], ("93.184.215.5", 8080))
        connector = reactor.connectors[0]
        reactor.tcpClients[0][2].clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
        self.assertEqual(reactor.tcpClients[1][:2], ("2606:2800:21f::5", 8080))
        self.assertNoResult(d)


class HeaderTests(SynchronousTestCase):
    """
    How message headers and metadata become HTTP headers.
    """

    def test_encoding(self) -> None:
        """
        Names are lower-cased tokens and values printable ASCII; anything
        else is percent-encoded UTF-8 that unquote restores.
        """
        self.assertEqual(headerName("Trace-Id"), "trace-id")
        self.assertEqual(headerName("a b/ü"), "a%20b%2F%C3%BC")
        self.assertEqual(headerValue("plain-value"), "plain-value")
        self.assertEqual(headerValue("eu west"), "eu west")
        self.assertEqual(headerValue(" padded "), "%20padded%20")
        self.assertEqual(headerValue("a, b"), "a%2C b")
        for text in ("ünïcode ✓", "100%", "line\nbreak", " spaced ", "a\tb", "a,b"):
            encoded = headerValue(text)
            self.assertEqual(unquote(encoded), text)
            self.assertTrue(all(0x20 <= ord(c) < 0x7F for c in encoded))
            self.assertEqual(encoded, encoded.strip())

    def test_staticHeaders(self) -> None:
        """
        A subscription's own headers are checked: valid names, not the
        gateway's, string values without line breaks.
        """
        self.assertEqual(checkStaticHeaders({"Authorization": "Bearer x"}), {"Authorization": "Bearer x"})
        self.assertEqual(checkStaticHeaders(None), {})
        for bad in ([], {"Bad Name": "x"}, {"webhook-id": "x"}, {"Evgate-Key": "x"}, {"Content-Length": "1"},
                    {"X": 1}, {"X": "a\r\nInjected: yes"}, {"Host": "x"}):
            self.assertRaises(ValueError, checkStaticHeaders, bad)


class DeliveryTests(SynchronousTestCase):
    """
    Deliveries from the memory endpoint through the hub.
    """

    def test_entrypoint(self) -> None:
        """
        The webhook entrypoint is an IEntrypoint that takes no request on
        the API's path.
        """
        harness = Harness()
        api = harness.gateway.api("orders")
        entrypoint = [e for e in api.entrypoints if e.name == "webhook"][0]
        self.assertTrue(verifyObject(IEntrypoint, entrypoint))
        self.assertFalse(entrypoint.accepts(object()))

    def test_feedsProvideInterfaces(self) -> None:
        """
        The hub feed is an ISubscriber and the MQTT feed an IUpstreamSink.
        """
        self.assertTrue(verifyObject(ISubscriber, HubFeed(None, None, "e", "t", None, "latest", 10)))
        self.assertTrue(verifyObject(IUpstreamSink, ShareGroupFeed(None, None, "t", "g", None, 10)))

    def test_signedDelivery(self) -> None:
        """
        A message is POSTed with its content as body, its metadata, key and
        headers as headers, and a Standard Webhooks signature that the
        standardwebhooks package verifies.
        """
        harness = Harness()
        record = harness.create(headers={"Authorization": "Bearer receiver-token"})
        harness.publish(b'{"amount": 42}', key="order-1",
                        headers=(("content-type", "application/json; charset=utf-8"), ("Trace", "t-1"),
                                 ("Region", "eu west")))
        [received] = harness.receiver.requests
        self.assertEqual(Webhook(record["secret"]).verify(received.body, received.single()), {"amount": 42})
        self.assertEqual(received.header("webhook-id"), f"msg_{record['id']}_0_0_{harness.connector.epoch()}")
        self.assertEqual(received.header("content-type"), "application/json; charset=utf-8")
        self.assertEqual(received.header("authorization"), "Bearer receiver-token")
        self.assertEqual(received.header("evgate-key"), "order-1")
        self.assertEqual(received.header("evgate-topic"), "orders")
        self.assertEqual(received.header("evgate-partition"), "0")
        self.assertEqual(received.header("evgate-offset"), "0")
        self.assertEqual(received.header("evgate-subscription"), record["id"])
        self.assertEqual(received.header("evgate-header-trace"), "t-1")
        self.assertEqual(received.header("evgate-header-region"), "eu west")
        self.assertTrue(received.header("evgate-timestamp"))
        stored = harness.record(record["id"])
        self.assertEqual(stored["delivered"], 1)
        self.assertEqual(Cursor.decode(stored["position"], harness.gateway.api("orders").tag).get(0), 1)
        self.assertIsNotNone(stored["lastDeliveredAt"])

    def test_repeatedHeaders(self) -> None:
        """
        A message header name that repeats arrives as that many
        C{evgate-header-<name>} lines, in order; a value's commas are
        encoded, so that a receiver that folds the lines into one
        comma-separated value can still split it exactly.
        """
        harness = Harness()
        harness.create()
        harness.publish(b"x", headers=(("dup", "1"), ("one", "x"), ("dup", "a,b"), ("Dup", "3")))
        [received] = harness.receiver.requests
        self.assertEqual(received.headers.get("evgate-header-dup"), ["1", "a%2Cb", "3"])
        self.assertEqual(received.headers.get("evgate-header-one"), ["x"])
        folded = ", ".join(received.headers["evgate-header-dup"])
        self.assertEqual([unquote(v.strip()) for v in folded.split(",")], ["1", "a,b", "3"])

    def test_requestSequence(self) -> None:
        """
        The outbound request is exactly one POST to the callback URL with
        the content as body (checked with treq's RequestSequence).
        """
        harness = Harness()
        sequence = RequestSequence([
            ((b"post", CALLBACK, {}, HasHeaders({b"evgate-offset": [b"0"], b"evgate-topic": [b"orders"]}),
              b"first"), (204, {}, b"")),
        ], self.fail)
        harness.service.http = StubTreq(StringStubbingResource(sequence))
        harness.stub = harness.service.http
        harness.create()
        with sequence.consume(self.fail):
            harness.publish(b"first")
        self.assertEqual(harness.record(harness.service.deliverers.popitem()[0])["delivered"], 1)

    def test_orderWithOneInFlight(self) -> None:
        """
        With webhook.max-in-flight = 1 the next message is sent only after
        the previous one was acknowledged, and messages arrive in order.
        """
        harness = Harness()
        harness.create()
        harness.receiver.script = [HANG]
        harness.publish(b"m0")
        harness.publish(b"m1")
        harness.publish(b"m2")
        self.assertEqual(harness.receiver.bodies(), [b"m0"])
        harness.receiver.hanging[0].setResponseCode(200)
        harness.receiver.hanging[0].finish()
        harness.pump()
        self.assertEqual(harness.receiver.bodies(), [b"m0", b"m1", b"m2"])

    def test_retryWithBackoff(self) -> None:
        """
        A 500 is retried after the backoff (full jitter: here its whole
        range), with the same webhook-id and a new timestamp and signature;
        the next message waits.
        """
        harness = Harness()
        record = harness.create()
        harness.receiver.script = [500, 503, 200]
        harness.publish(b"m0")
        harness.publish(b"m1")
        self.assertEqual(harness.receiver.bodies(), [b"m0"])
        self.assertEqual(harness.record(record["id"])["state"], records.FAILING)
        harness.advance(0.9)
        self.assertEqual(len(harness.receiver.requests), 1)
        harness.advance(0.1)
        self.assertEqual(harness.receiver.bodies(), [b"m0", b"m0"])
        harness.advance(1.9)
        self.assertEqual(len(harness.receiver.requests), 2)
        harness.advance(0.1)
        self.assertEqual(harness.receiver.bodies(), [b"m0", b"m0", b"m0", b"m1"])
        first, _, third, _ = harness.receiver.requests
        self.assertEqual(first.header("webhook-id"), third.header("webhook-id"))
        self.assertNotEqual(first.header("webhook-timestamp"), third.header("webhook-timestamp"))
        self.assertEqual(Webhook(record["secret"]).verify(third.body, third.single(), json_parse=False), None)
        stored = harness.record(record["id"])
        self.assertEqual((stored["state"], stored["failedAttempts"], stored["delivered"]),
                         (records.ACTIVE, 2, 2))
        self.assertEqual(stored["lastError"]["message"], "HTTP 503 Service Unavailable")

    def test_jitterDrawsFromTheRange(self) -> None:
        """
        With a random source in the middle of the range, the wait is half
        the backoff cap.
        """
        harness = Harness(fraction=0.5)
        harness.create()
        harness.receiver.script = [500, 500]
        harness.publish(b"m0")
        harness.advance(0.5)
        harness.advance(0.99)
        self.assertEqual(len(harness.receiver.requests), 2)
        harness.advance(0.01)
        self.assertEqual(len(harness.receiver.requests), 3)
        self.assertEqual(harness.random.calls, [(0.0, 1.0), (0.0, 2.0)])

    def test_retryAfterSeconds(self) -> None:
        """
        A 429 with Retry-After waits that long rather than the backoff.
        """
        harness = Harness()
        harness.create()
        harness.receiver.script = [(429, {"Retry-After": "7"})]
        harness.publish(b"m0")
        harness.advance(6.9)
        self.assertEqual(len(harness.receiver.requests), 1)
        harness.advance(0.1)
        self.assertEqual(len(harness.receiver.requests), 2)

    def test_retryAfterDateCapped(self) -> None:
        """
        A 503 with Retry-After as an HTTP date is honoured up to the maximum
        delay (60 s here).
        """
        harness = Harness()
        harness.create()
        later = formatdate(harness.clock.seconds() + 3600, usegmt=True)
        harness.receiver.script = [(503, {"Retry-After": later})]
        harness.publish(b"m0")
        harness.advance(59.9)
        self.assertEqual(len(harness.receiver.requests), 1)
        harness.advance(0.2)
        self.assertEqual(len(harness.receiver.requests), 2)

    def test_timeoutIsRetried(self) -> None:
        """
        A receiver that does not answer within webhook.timeout counts as a
        failed attempt and is tried again.
        """
        harness = Harness(api="webhook.timeout = 5")
        record = harness.create()
        harness.receiver.script = [HANG]
        harness.publish(b"m0")
        harness.advance(5.0)
        self.assertEqual(harness.record(record["id"])["lastError"]["message"], "no response within 5 s")
        harness.advance(1.0)
        self.assertEqual(len(harness.receiver.requests), 2)
        self.assertEqual(harness.record(record["id"])["delivered"], 1)

    def test_connectionErrorIsRetried(self) -> None:
        """
        A request that fails without an answer (connection refused, DNS) is
        retried.
        """
        harness = Harness()
        record = harness.create()
        calls: List[str] = []

        class Failing:
            def request(self, *args: Any, **kwargs: Any) -> Deferred:
                calls.append(args[1])
                return fail(ConnectionRefusedError("nobody home"))

        harness.service.http = Failing()
        harness.service.deliverers[record["id"]].context.http = harness.service.http
        harness.publish(b"m0")
        harness.advance(1.0)
        self.assertEqual(len(calls), 2)
        self.assertIn("cannot connect", harness.record(record["id"])["lastError"]["message"])

    def test_rebindingRefusedAtConnect(self) -> None:
        """
        With the gateway's real HTTP client, a callback whose name resolves
        to an internal address after the subscription was made (DNS
        rebinding) is refused when connecting, reported, and retried; the
        gateway never connects.
        """
        harness = Harness()
        record = harness.create()
        reactor = MemoryReactorClock()
        reactor.advance(harness.clock.seconds())
        harness.service.reactor = reactor
        client = harness.service._makeHttp()
        harness.service.deliverers[record["id"]].context.http = client
        harness.answers["hooks.example"] = ["10.20.30.40"]
        harness.publish(b"m0")
        self.assertEqual(reactor.tcpClients, [])
        stored = harness.record(record["id"])
        self.assertEqual(stored["lastError"]["message"],
                         "refused to connect to hooks.example: 10.20.30.40 is a private address "
                         "(set webhook-allow-private = true in [gateway] to allow non-public receivers)")
        self.assertEqual(stored["state"], records.FAILING)

    def test_rejectionGoesToDeadLetters(self) -> None:
        """
        A 4xx other than 408 and 429 is not retried: the message goes to the
        dlq with headers saying why, and delivery goes on.
        """
        harness = Harness(api="dlq = local/orders.dlq")
        record = harness.create()
        harness.receiver.script = [422]
        harness.publish(b"bad", key="k", headers=(("trace", "t"),))
        harness.publish(b"good")
        self.assertEqual(harness.receiver.bodies(), [b"bad", b"good"])
        [dead] = harness.deadLetters()
        self.assertEqual((dead.content, dead.key), (b"bad", "k"))
        headers = dict(dead.headers)
        self.assertEqual(headers["trace"], "t")
        self.assertEqual(headers["evgate-dlq-reason"], "rejected")
        self.assertEqual(headers["evgate-dlq-status"], "422")
        self.assertEqual(headers["evgate-dlq-subscription"], record["id"])
        self.assertEqual((headers["evgate-dlq-topic"], headers["evgate-dlq-partition"],
                          headers["evgate-dlq-offset"]), ("orders", "0", "0"))
        self.assertEqual(headers["evgate-dlq-attempts"], "1")
        stored = harness.record(record["id"])
        self.assertEqual((stored["deadLettered"], stored["delivered"], stored["failedAttempts"]), (1, 1, 1))
        self.assertEqual(Cursor.decode(stored["position"], harness.gateway.api("orders").tag).get(0), 2)

    def test_exhaustedGoesToDeadLetters(self) -> None:
        """
        After webhook.retry.max-attempts failed attempts the message is
        dead-lettered with reason attempts-exhausted.
        """
        harness = Harness(api="dlq = local/orders.dlq")
        harness.create(retry={"maxAttempts": 3})
        harness.receiver.script = [500, 500, 502]
        harness.publish(b"m0")
        harness.advance(1.0)
        harness.advance(2.0)
        self.assertEqual(len(harness.receiver.requests), 3)
        [dead] = harness.deadLetters()
        self.assertEqual(dict(dead.headers)["evgate-dlq-reason"], "attempts-exhausted")
        self.assertEqual(dict(dead.headers)["evgate-dlq-status"], "502")
        self.assertEqual(dict(dead.headers)["evgate-dlq-attempts"], "3")

    def test_deadLetterPublishRetried(self) -> None:
        """
        A dead-letter publish that fails is tried again; the message is
        neither lost nor skipped meanwhile.
        """
        harness = Harness(api="dlq = local/orders.dlq")
        harness.create()
        harness.gateway.api("orders").entrypoints[-1].deadLetters.connector = FlakyConnector(harness.connector, 2)
        deliverer = list(harness.service.deliverers.values())[0]
        deliverer.context.dlq = harness.gateway.api("orders").entrypoints[-1].deadLetters
        harness.receiver.script = [400]
        harness.publish(b"m0")
        harness.publish(b"m1")
        self.assertEqual(harness.deadLetters(), [])
        self.assertEqual(harness.receiver.bodies(), [b"m0"])
        harness.advance(1.0)
        harness.advance(2.0)
        self.assertEqual([m.content for m in harness.deadLetters()], [b"m0"])
        self.assertEqual(harness.receiver.bodies(), [b"m0", b"m1"])

    def test_pauseWithoutDeadLetters(self) -> None:
        """
        Without a dlq a message that cannot be delivered pauses the
        subscription with the reason; resuming tries it again from its
        first attempt.
        """
        harness = Harness()
        record = harness.create(retry={"maxAttempts": 2})
        harness.receiver.script = [500, 500]
        harness.publish(b"m0")
        harness.publish(b"m1")
        harness.advance(1.0)
        stored = harness.record(record["id"])
        self.assertEqual(records.status(stored), records.PAUSED)
        self.assertIn("has no dlq", stored["pausedReason"])
        self.assertIn("orders/0@0", stored["pausedReason"])
        self.assertNotIn(record["id"], harness.service.deliverers)
        harness.advance(100)
        self.assertEqual(len(harness.receiver.requests), 2)
        harness.result(harness.service.resume("orders", record["id"]))
        self.assertEqual(harness.receiver.bodies(), [b"m0", b"m0", b"m0", b"m1"])
        self.assertEqual(records.status(harness.record(record["id"])), records.ACTIVE)

    def test_filterSkipsAndAdvances(self) -> None:
        """
        A subscription's filter keeps messages out, and the position moves
        past them.
        """
        harness = Harness()
        record = harness.create(filter='key == "eu"')
        harness.publish(b"a", key="us")
        harness.publish(b"b", key="eu")
        harness.publish(b"c", key="us")
        self.assertEqual(harness.receiver.bodies(), [b"b"])
        position = Cursor.decode(harness.record(record["id"])["position"], harness.gateway.api("orders").tag)
        self.assertEqual(position.get(0), 3)

    def test_concurrentKeepsPosition(self) -> None:
        """
        With webhook.max-in-flight = 3 three messages are out at once, and
        the position moves only over the settled prefix.
        """
        harness = Harness(api="webhook.max-in-flight = 3")
        record = harness.create()
        harness.receiver.script = [HANG, HANG, HANG]
        for i in range(4):
            harness.publish(b"m%d" % i)
        self.assertEqual(harness.receiver.bodies(), [b"m0", b"m1", b"m2"])
        tag = harness.gateway.api("orders").tag
        start = Cursor.decode(harness.record(record["id"])["position"], tag).get(0)
        for request in harness.receiver.hanging[1:]:
            request.finish()
        harness.pump()
        self.assertEqual(Cursor.decode(harness.record(record["id"])["position"], tag).get(0), start)
        harness.receiver.hanging[0].finish()
        harness.pump()
        self.assertEqual(Cursor.decode(harness.record(record["id"])["position"], tag).get(0), 4)
        self.assertEqual(harness.receiver.bodies(), [b"m0", b"m1", b"m2", b"m3"])

    def test_resumesFromStoredPosition(self) -> None:
        """
        A new node (service) on the same store and broker resumes after the
        last acknowledged message: nothing is delivered twice or skipped.
        """
        harness = Harness()
        record = harness.create()
        harness.publish(b"m0")
        harness.publish(b"m1")
        harness.result(harness.service.stopService())
        harness.publish(b"m2")
        again = GatewayService(parseConfig(INI.format(api="", gateway=""), "test.ini"), harness.clock)
        again.connectors["local"] = harness.connector
        again.hub.connectors["local"] = harness.connector
        for api in again.apis:
            api.connector = harness.connector
        service = again.webhooks
        service.store = harness.store
        service.http = harness.stub
        service.resolve = harness.service.resolve
        service.startService()
        harness.pump()
        self.assertEqual(harness.receiver.bodies(), [b"m0", b"m1", b"m2"])
        self.assertEqual(harness.record(record["id"])["delivered"], 3)

    def test_pauseAndDelete(self) -> None:
        """
        A paused subscription receives nothing until resumed, and a deleted
        one nothing at all.
        """
        harness = Harness()
        record = harness.create()
        stored = harness.result(harness.service.pause("orders", record["id"]))
        self.assertEqual(records.status(stored), records.PAUSED)
        self.assertEqual(stored["pausedReason"], "paused by an operator")
        harness.publish(b"m0")
        self.assertEqual(harness.receiver.bodies(), [])
        harness.result(harness.service.resume("orders", record["id"]))
        self.assertEqual(harness.receiver.bodies(), [b"m0"])
        harness.result(harness.service.delete("orders", record["id"]))
        harness.publish(b"m1")
        self.assertEqual(harness.receiver.bodies(), [b"m0"])
        self.assertIsNone(harness.record(record["id"]))

    def test_syncPicksUpOtherNodes(self) -> None:
        """
        Subscriptions written to the store by another node are delivered
        here after the sync interval, and stop when paused there.
        """
        harness = Harness(gateway="webhook-sync-interval = 2")
        record = harness.create()
        harness.result(harness.service._stopDeliverer(record["id"]))
        harness.publish(b"m0")
        self.assertEqual(harness.receiver.bodies(), [])
        harness.advance(2.0)
        self.assertEqual(harness.receiver.bodies(), [b"m0"])
        harness.result(harness.store.update(records.KIND, record["id"], {"paused": True}))
        harness.advance(2.0)
        self.assertNotIn(record["id"], harness.service.deliverers)

    def test_backlogPausesHub(self) -> None:
        """
        A receiver slower than the topic makes the feed pause its hub
        subscription (and so the upstream read, as it is the stream's only
        subscriber); nothing is lost when it catches up.
        """
        harness = Harness(gateway="subscriber-queue = 4")
        harness.create()
        harness.receiver.script = [HANG]
        for i in range(12):
            harness.publish(b"m%d" % i)
        deliverer = list(harness.service.deliverers.values())[0]
        self.assertTrue(deliverer.feed.subscription.paused)
        self.assertLess(deliverer.backlog(), 8)
        harness.receiver.hanging[0].finish()
        harness.pump(30)
        self.assertEqual(harness.receiver.bodies(), [b"m%d" % i for i in range(12)])

    def test_backlogLetsGoOfSharedStream(self) -> None:
        """
        On a shared stream that goes on for other subscribers, a feed whose
        backlog passes twice the bound lets go of the hub, and reads again
        from its tail once the backlog is worked off: nothing is lost.
        """
        harness = Harness(gateway="subscriber-queue = 4")
        other = Listener()
        harness.gateway.hub.subscribe("local", "orders", "latest", other)
        harness.pump()
        harness.create(start="latest")
        harness.receiver.script = [HANG]
        for i in range(12):
            harness.publish(b"m%d" % i)
        deliverer = list(harness.service.deliverers.values())[0]
        self.assertTrue(deliverer.feed.detached)
        harness.receiver.hanging[0].finish()
        for i in range(12, 15):
            harness.publish(b"m%d" % i)
        harness.pump(40)
        self.assertEqual(harness.receiver.bodies(), [b"m%d" % i for i in range(15)])
        self.assertEqual(len(other.events), 15)

    def test_memoryGapRecorded(self) -> None:
        """
        Messages lost to the memory endpoint's retention are reported as
        the subscription's lastError, and delivery goes on.
        """
        harness = Harness()
        record = harness.create()
        deliverer = harness.service.deliverers[record["id"]]
        deliverer.gap(Cursor.fromMapping({0: 5}, harness.connector.epoch()), "retention dropped them")
        harness.pump()
        self.assertIn("retention dropped them", harness.record(record["id"])["lastError"]["message"])


class CreateTests(SynchronousTestCase):
    """
    Creating a subscription: checks and resolution of its start.
    """

    def test_latestResolvedAtCreation(self) -> None:
        """
        start = latest is resolved when the subscription is created: a
        message published right after the answer is delivered, one before is
        not.
        """
        harness = Harness()
        harness.publish(b"before")
        record = harness.create(start="latest")
        self.assertEqual(Cursor.decode(record["position"], harness.gateway.api("orders").tag).get(0), 1)
        harness.publish(b"after")
        self.assertEqual(harness.receiver.bodies(), [b"after"])

    def test_earliestAndCursor(self) -> None:
        """
        earliest starts at the oldest message kept; a cursor where it says.
        """
        harness = Harness()
        harness.publish(b"m0")
        harness.publish(b"m1")
        harness.create(start="earliest")
        self.assertEqual(harness.receiver.bodies(), [b"m0", b"m1"])
        tag = harness.gateway.api("orders").tag
        harness.create(start=Cursor.fromMapping({0: 1}, harness.connector.epoch()).encode(tag))
        self.assertEqual(harness.receiver.bodies(), [b"m0", b"m1", b"m1"])

    def test_badInput(self) -> None:
        """
        Bad fields are refused with the problem that says which.
        """
        harness = Harness()
        cases = [
            ({"callbackUrl": "ftp://hooks.example/"}, BadRequest, "callbackUrl"),
            ({"callbackUrl": "https://inside.example/"}, BadRequest, "callbackUrl"),
            ({"callbackUrl": "https://nowhere.example/"}, BadRequest, "callbackUrl"),
            ({"filter": "key == "}, BadFilter, "filter"),
            ({"start": "AAAA"}, BadCursor, "start"),
            ({"retry": {"maxAttempts": 0}}, BadRequest, "retry"),
            ({"headers": {"webhook-id": "x"}}, BadRequest, "headers"),
            ({"colour": "blue"}, BadRequest, None),
        ]
        for extra, problem, fieldName in cases:
            document = dict({"callbackUrl": CALLBACK}, **extra)
            try:
                d = harness.service.create("orders", document)
            except problem as e:
                # Checked before anything asynchronous.
                self.assertEqual(e.extra.get("field"), fieldName, extra)
                continue
            harness.pump()
            failure = self.failureResultOf(d, problem)
            self.assertEqual(failure.value.extra.get("field"), fieldName, extra)

    def test_badFilterPosition(self) -> None:
        """
        A filter that does not compile is a bad-filter problem with its line
        and column.
        """
        harness = Harness()
        error = self.assertRaises(BadFilter, harness.service.create, "orders",
                                  {"callbackUrl": CALLBACK, "filter": "key ==\n  ]"})
        self.assertEqual((error.extra["line"], error.extra["column"]), (2, 3))

    def test_apiChecks(self) -> None:
        """
        An unknown API is 404; an API without the webhook entrypoint 409.
        """
        harness = Harness()
        self.assertRaises(NotFound, harness.service.create, "nope", {})
        self.assertRaises(Conflict, harness.service.create, "plain", {})

    def test_maxSubscriptions(self) -> None:
        """
        webhook.max-subscriptions bounds an API's subscriptions.
        """
        harness = Harness(api="webhook.max-subscriptions = 1")
        harness.create()
        self.failureResultOf(harness.service.create("orders", {"callbackUrl": CALLBACK}), Conflict)

    def test_privateAllowed(self) -> None:
        """
        With webhook-allow-private an internal receiver is accepted, but a
        metadata address never.
        """
        harness = Harness(gateway="webhook-allow-private = true")
        harness.create(callbackUrl="https://inside.example/in")
        harness.answers["meta.example"] = ["169.254.169.254"]
        failure = self.failureResultOf(harness.service.create("orders", {"callbackUrl": "https://meta.example/"}),
                                       BadRequest)
        self.assertIn("metadata", failure.value.detail)


class ConfigTests(SynchronousTestCase):
    """
    The webhook keys of the configuration.
    """

    def test_keysNeedTheEntrypoint(self) -> None:
        """
        Webhook keys on an API without the webhook entrypoint are refused.
        """
        text = INI.format(api="", gateway="").replace("entrypoints = http-post\n",
                                                      "entrypoints = http-post\ndlq = local/x\n")
        error = self.assertRaises(ConfigError, parseConfig, text, "t.ini")
        self.assertEqual((error.section, error.key), ("api:plain", "dlq"))

    def test_storeRequired(self) -> None:
        """
        The webhook entrypoint needs a store.
        """
        text = INI.format(api="", gateway="").replace("store = memory\n", "")
        error = self.assertRaises(ConfigError, parseConfig, text, "t.ini")
        self.assertIn("store", str(error))

    def test_dlqChecks(self) -> None:
        """
        A dlq must be <endpoint>/<topic> of a known endpoint, and not the
        API's own topic.
        """
        for value, where in (("nothing", "dlq"), ("local/orders", "dlq")):
            error = self.assertRaises(ConfigError, parseConfig, INI.format(api=f"dlq = {value}", gateway=""), "t")
            self.assertEqual(error.key, where)
        error = self.assertRaises(ConfigError, GatewayService,
                                  parseConfig(INI.format(api="dlq = nope/x", gateway=""), "t.ini"), Clock())
        self.assertIn("unknown endpoint 'nope'", str(error))

    def test_retryKeys(self) -> None:
        """
        The retry keys become the API's default policy; a max delay below
        the initial one is refused.
        """
        config = parseConfig(INI.format(api="", gateway=""), "t.ini")
        self.assertEqual(config.apis["orders"].options["webhook"].retry, RetryPolicy(1.0, 60.0, 4))
        text = INI.format(api="", gateway="").replace("webhook.retry.max-delay = 60", "webhook.retry.max-delay = 0.5")
        self.assertRaises(ConfigError, parseConfig, text, "t.ini")


class FakeReader:
    """
    The parts of a Kafka GroupReader that a GroupBatch and the feed use.
    It counts the poll turn: taken by the connector's groupPoll, kept by
    L{GroupBatch.takeNext}, given back by a commit, a put-back or a
    release.
    """

    def __init__(self, connector: "FakeGroupConnector") -> None:
        self.connector = connector
        self.commits: List[Dict[int, int]] = []
        self.positions: List[Dict[int, int]] = []
        self.sent: List[Tuple[str, Any]] = []
        self.releases = 0
        self.takes = 0
        self.stopped = False
        # Partitions this member owns; position commits skip the others.
        self.assigned: Optional[Set[int]] = None

    def commit(self, offsets: Dict[int, int]) -> Deferred:
        self.commits.append(dict(offsets))
        self.releases += 1
        return succeed(None)

    def commitPositions(self, offsets: Dict[int, int]) -> Deferred:
        owned = {p: o for p, o in offsets.items() if self.assigned is None or p in self.assigned}
        if owned:
            self.positions.append(owned)
        return succeed(None)

    def take(self, limit: int, timeout: float) -> Deferred:
        self.takes += 1
        d: Deferred = Deferred()
        self.connector.polls.append(("t", "take", d))
        return d

    def release(self) -> None:
        self.releases += 1

    def putBack(self, messages: List[Message]) -> None:
        self.sent.append(("putBack", [m.offset for m in messages]))
        self.releases += 1

    def send(self, command: str, *args: Any) -> None:
        self.sent.append((command, [m.offset for m in args[0]]))


class FakeGroupConnector:
    """
    A Kafka connector's group mode, answering polls (and the takes of a
    batch that keeps its turn) from a list.
    """

    name = "kafka"
    kind = "kafka"

    def __init__(self, clock: Clock) -> None:
        self.reactor = clock
        self.reader = FakeReader(self)
        self.polls: List[Tuple[str, str, Deferred]] = []
        self.left: List[Tuple[str, str]] = []
        self.options = {"group-prefix": "evgate"}

    def groupId(self, group: str) -> str:
        return f"evgate.{group}"

    def groupPoll(self, topic: str, group: str, limit: int, timeout: float, start: str = "latest") -> Deferred:
        d: Deferred = Deferred()
        self.polls.append((topic, group, d))
        return d

    def leaveGroup(self, topic: str, group: str) -> Deferred:
        self.left.append((topic, group))
        return succeed(None)

    def answer(self, offsets: List[int], partition: int = 0, keys: Optional[List[str]] = None) -> None:
        """
        Answer the oldest poll with messages at C{offsets} of C{partition}
        (with C{keys}, if given).
        """
        _, _, d = self.polls.pop(0)
        messages = [Message(b"k%d" % o, keys[i] if keys else None, (), "t", partition, o, 0)
                    for i, o in enumerate(offsets)]
        first = Cursor.fromMapping({partition: offsets[0]}) if offsets else Cursor()
        d.callback(GroupBatch(self.reader, messages, first,  # type: ignore[arg-type]
                              Cursor.fromMapping({partition: (offsets or [0])[-1] + 1})))


class FakeDeliverer:
    """
    What a feed sees of a deliverer.
    """

    id = "sub_00000000000000000000"

    def __init__(self) -> None:
        self.offered: List[Any] = []
        self.position: Optional[Cursor] = None
        self.pending = 0
        self.errors: List[str] = []

    def began(self, cursor: Cursor) -> None:
        pass

    def offer(self, events: List[Any]) -> None:
        self.offered.extend(events)
        self.pending += len(events)

    def skipped(self, cursor: Cursor) -> None:
        pass

    def backlog(self) -> int:
        return self.pending

    def readFailed(self, detail: str) -> None:
        self.errors.append(detail)

    def readRecovered(self) -> None:
        self.errors.append("recovered")


class KafkaFeedTests(SynchronousTestCase):
    """
    The consumer-group feed, against a fake connector.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.connector = FakeGroupConnector(self.clock)
        self.deliverer = FakeDeliverer()
        self.feed = KafkaGroupFeed(self.deliverer, self.connector, "t", "orders", None)

    def test_groupName(self) -> None:
        """
        The group is webhook.<api>.<subscription>, under the connector's
        prefix.
        """
        self.assertEqual(webhookGroup("orders", "sub_1"), "webhook.orders.sub_1")
        self.assertEqual(self.feed.groupId, "evgate.webhook.orders.sub_00000000000000000000")

    def test_readAheadWhileDelivering(self) -> None:
        """
        The next batch is taken, in the same poll turn, while fewer than a
        batch of messages is unsettled; no more once a batch is.
        """
        self.feed.limit = self.feed.ahead = 3
        self.feed.start(None)
        self.connector.answer([0, 1])
        self.assertEqual([e.message.offset for e in self.deliverer.offered], [0, 1])
        self.assertEqual(self.connector.reader.takes, 1)
        self.connector.answer([2, 3])
        self.assertEqual(self.connector.reader.takes, 1)
        self.assertEqual(self.connector.polls, [])
        self.deliverer.pending = 2
        self.feed.progress()
        self.assertEqual(self.connector.reader.takes, 2)
        self.assertEqual(self.connector.reader.releases, 0)

    def test_commitFollowsPosition(self) -> None:
        """
        The group's offsets follow the deliverer's position, at most every
        commit interval, and only where it moved.
        """
        self.feed.start(None)
        self.connector.answer([0, 1, 2])
        self.deliverer.position = Cursor.fromMapping({0: 1})
        self.feed.progress()
        self.deliverer.position = Cursor.fromMapping({0: 2})
        self.feed.progress()
        self.assertEqual(self.connector.reader.positions, [])
        self.clock.advance(self.feed.commitInterval)
        self.assertEqual(self.connector.reader.positions, [{0: 2}])
        self.feed.progress()
        self.clock.advance(self.feed.commitInterval)
        self.assertEqual(self.connector.reader.positions, [{0: 2}])
        self.assertEqual(self.connector.reader.commits, [])

    def test_filteredBatchCommitted(self) -> None:
        """
        A batch the filter drops entirely is committed without delivering.
        """
        self.feed.filter = lambda event: False
        self.feed.start(None)
        self.connector.answer([0, 1])
        self.deliverer.position = Cursor.fromMapping({0: 2})
        self.feed.progress()
        self.clock.advance(self.feed.commitInterval)
        self.assertEqual(self.connector.reader.positions, [{0: 2}])

    def test_closeCommitsSettledAndGivesBackTheRest(self) -> None:
        """
        Closing mid-batch commits the settled messages and gives the others
        back to the reader, releasing the poll turn once.
        """
        self.deliverer.pending = 100
        self.feed.start(None)
        self.connector.answer([5, 6, 7])
        self.deliverer.position = Cursor.fromMapping({0: 6})
        self.feed.close()
        self.assertEqual(self.connector.reader.sent, [("putBack", [6, 7])])
        self.assertEqual(self.connector.reader.positions, [{0: 6}])
        self.assertEqual(self.connector.reader.releases, 1)

    def test_closeDuringTake(self) -> None:
        """
        Closed while a take is under way, the feed gives back what it has
        not passed followed by what the take brings, in stream order, and
        the turn with them.
        """
        self.feed.start(None)
        self.connector.answer([5, 6, 7])
        self.deliverer.position = Cursor.fromMapping({0: 6})
        self.feed.close()
        self.assertEqual(self.connector.reader.sent, [])
        self.connector.answer([8, 9])
        self.assertEqual(self.connector.reader.sent, [("putBack", [6, 7, 8, 9])])
        self.assertEqual(self.connector.reader.releases, 1)

    def test_closeLeavesTheGroup(self) -> None:
        """
        A closed feed leaves its consumer group at once (after its commit),
        rather than when the reader has been idle long enough, so that a
        paused subscription's group has no members.
        """
        self.feed.start(None)
        self.feed.close()
        self.assertEqual(self.connector.left, [("t", self.feed.group)])

    def test_pollFailureRetried(self) -> None:
        """
        A poll that fails is reported and tried again later.
        """
        self.feed.start(None)
        _, _, d = self.connector.polls.pop(0)
        d.errback(EndpointUnavailable("broker down"))
        self.assertIn("broker down", self.deliverer.errors[0])
        self.clock.advance(1.0)
        self.assertEqual(len(self.connector.polls), 1)
