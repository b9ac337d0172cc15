"""
Unit tests of L{evgate.connectors.mqtt}: the thread bridge, numbering,
cursors and gaps, publishing and configuration, with a fake paho client and
a L{Clock} (no broker, no sleeps).

The fake client calls the connector's paho callbacks the way paho's thread
does; while it does, the test reactor records any use of Twisted other than
C{callFromThread} (and any log event) as a violation.  C{callFromThread}
only queues the call (the hop); L{BridgeReactor.runHops} is the reactor
thread taking its turn.
"""

from __future__ import annotations

import ssl
import threading
from types import SimpleNamespace
from typing import Any, Callable, List, Optional, Tuple

from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY, ConnectFlags, DisconnectFlags, MQTTMessage
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyClass, verifyObject

from evgate.config import ConfigError, SectionReader, parseConfig
from evgate.connectors import mqtt
from evgate.connectors.mqtt import (
    MqttApiOptions,
    MqttConnector,
    MqttSubscription,
    TopicTemplate,
    filterProblem,
    parseOptions,
)
from evgate.connectors.mqtt._connector import PROBLEM_RELOG
from evgate.errors import BadRequest, EndpointTimeout, EndpointUnavailable, PayloadTooLarge
from evgate.interfaces import (
    IConnector,
    IConsumerGroups,
    IHoldableSubscription,
    IRetainedLog,
    ISharedSubscriptions,
    IUpstreamSink,
    IUpstreamSubscription,
)
from evgate.message import Cursor, Draft, Message, Position

EPOCH = 7


class BridgeReactor(Clock):
    """
    A L{Clock} whose C{callFromThread} queues calls until L{runHops}, and
    which records any other use while the fake library thread is running.
    """

    def __init__(self) -> None:
        super().__init__()
        self.hops: List[Tuple[Callable[..., Any], tuple, dict]] = []
        self.libraryThread = False
        self.violations: List[str] = []

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kw: Any) -> None:
        self.hops.append((f, args, kw))

    def callLater(self, *args: Any, **kw: Any) -> Any:
        if self.libraryThread:
            self.violations.append("callLater")
        return super().callLater(*args, **kw)

    def seconds(self) -> float:
        if self.libraryThread:
            self.violations.append("seconds")
        return super().seconds()

    def runHops(self) -> int:
        """
        Run queued hops (and what they queue), as the reactor would; return
        how many ran.
        """
        count = 0
        while self.hops:
            f, args, kw = self.hops.pop(0)
            f(*args, **kw)
            count += 1
        return count


class FakeClient:
    """
    The part of paho's client the connector uses.  Methods named after
    paho's are what the reactor thread calls; the others play paho's thread
    calling back.
    """

    def __init__(self, clientId: str, reactor: BridgeReactor) -> None:
        self.clientId = clientId
        self.reactor = reactor
        self.online = False
        self.looping = False
        self.lastConnectError: Any = None
        self.connectArgs: Any = None
        self.credentials: Any = None
        self.subscribes: List[Tuple[int, str, Any, Any]] = []
        self.unsubscribes: List[str] = []
        self.publishes: List[Tuple[int, str, bytes, int, bool, Any]] = []
        self.disconnects: List[Any] = []
        self.publishRc: Optional[int] = None
        self._mid = 0
        self.on_connect: Any = None
        self.on_connect_fail: Any = None
        self.on_disconnect: Any = None
        self.on_subscribe: Any = None
        self.on_unsubscribe: Any = None
        self.on_publish: Any = None
        self.on_message: Any = None
        self.suppress_exceptions = False
        self.connect_timeout = 5.0
        self.reconnectDelay: Any = None
        self.maxInflight: Any = None

    def _nextMid(self) -> int:
        self._mid += 1
        return self._mid

    # reactor thread

    def username_pw_set(self, username: str, password: Optional[str] = None) -> None:
        self.credentials = (username, password)

    def tls_set_context(self, context: Any) -> None:
        self.tls = context

    def tls_insecure_set(self, value: bool) -> None:
        self.insecure = value

    def reconnect_delay_set(self, minimum: float, maximum: float) -> None:
        self.reconnectDelay = (minimum, maximum)

    def max_inflight_messages_set(self, value: int) -> None:
        self.maxInflight = value

    def connect_async(self, host: str, port: int, keepalive: int, clean_start: Any, properties: Any) -> None:
        self.connectArgs = SimpleNamespace(host=host, port=port, keepalive=keepalive, cleanStart=clean_start,
                                           properties=properties)

    def loop_start(self) -> None:
        self.looping = True

    def loop_stop(self) -> None:
        self.looping = False

    def subscribe(self, topic: str, options: Any = None, properties: Any = None) -> Tuple[int, Optional[int]]:
        if not self.online:
            return (4, None)
        mid = self._nextMid()
        self.subscribes.append((mid, topic, options, properties))
        return (0, mid)

    def unsubscribe(self, topic: str, properties: Any = None) -> Tuple[int, Optional[int]]:
        self.unsubscribes.append(topic)
        return (0, self._nextMid())

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False,
                properties: Any = None) -> Any:
        mid = self._nextMid()
        self.publishes.append((mid, topic, payload, qos, retain, properties))
        rc = self.publishRc if self.publishRc is not None else (0 if self.online else 4)
        return SimpleNamespace(mid=mid, rc=rc)

    def disconnect(self, reasoncode: Any = None, properties: Any = None) -> int:
        self.disconnects.append(properties)
        self.online = False
        return 0

    # paho's thread

    def _library(self, callback: Callable[..., Any], *args: Any) -> None:
        self.reactor.libraryThread = True
        try:
            callback(self, None, *args)
        finally:
            self.reactor.libraryThread = False

    def connack(self, sessionPresent: bool = False, code: int = 0, **properties: Any) -> None:
        """
        The broker answered CONNECT.
        """
        self.online = code < 0x80
        props = Properties(PacketTypes.CONNACK)
        for name, value in properties.items():
            setattr(props, name, value)
        self._library(self.on_connect, ConnectFlags(session_present=sessionPresent),
                      ReasonCode(PacketTypes.CONNACK, identifier=code), props)

    def connectFail(self) -> None:
        """
        The TCP connection could not be made.
        """
        self.reactor.libraryThread = True
        try:
            self.on_connect_fail(self, None)
        finally:
            self.reactor.libraryThread = False

    def lose(self) -> None:
        """
        The connection broke.
        """
        self.online = False
        self._library(self.on_disconnect, DisconnectFlags(is_disconnect_packet_from_server=False),
                      ReasonCode(PacketTypes.DISCONNECT, identifier=0x80), Properties(PacketTypes.DISCONNECT))

    def suback(self, mid: int, code: int = 1) -> None:
        """
        The broker answered SUBSCRIBE C{mid}.
        """
        self._library(self.on_subscribe, mid, [ReasonCode(PacketTypes.SUBACK, identifier=code)],
                      Properties(PacketTypes.SUBACK))

    def puback(self, mid: int, code: int = 0) -> None:
        """
        The broker acknowledged PUBLISH C{mid}.
        """
        self._library(self.on_publish, mid, ReasonCode(PacketTypes.PUBACK, identifier=code),
                      Properties(PacketTypes.PUBACK))

    def message(self, topic: Any, payload: bytes, ids: Tuple[int, ...] = (), qos: int = 1, retain: bool = False,
                userProperties: Tuple[Tuple[str, str], ...] = (), **properties: Any) -> None:
        """
        The broker delivered a PUBLISH.
        """
        raw = topic if isinstance(topic, bytes) else topic.encode("utf-8")
        message = MQTTMessage(mid=1, topic=raw)
        message.payload = payload
        message.qos = qos
        message.retain = retain
        props = Properties(PacketTypes.PUBLISH)
        if userProperties:
            props.UserProperty = list(userProperties)
        if ids:
            props.SubscriptionIdentifier = list(ids)
        for name, value in properties.items():
            setattr(props, name, value)
        message.properties = props
        self._library(self.on_message, message)


@implementer(IUpstreamSink)
class RecordingSink:
    """
    An upstream sink that records every call.
    """

    def __init__(self) -> None:
        self.events: List[Tuple[str, Any]] = []

    def started(self, cursor: Cursor) -> None:
        self.events.append(("started", cursor))

    def deliver(self, messages: List[Message]) -> None:
        self.events.append(("deliver", list(messages)))

    def gap(self, cursor: Cursor, reason: str) -> None:
        self.events.append(("gap", (cursor, reason)))

    def failed(self, reason: Failure) -> None:
        self.events.append(("failed", reason))

    def kinds(self) -> List[str]:
        """
        The names of the calls, in order.
        """
        return [kind for kind, _ in self.events]

    def messages(self) -> List[Message]:
        """
        Every message delivered, in order.
        """
        return [m for kind, value in self.events if kind == "deliver" for m in value]

    def offsets(self) -> List[int]:
        """
        The offsets of every message delivered.
        """
        return [m.offset for m in self.messages()]


def endpointOptions(**values: str) -> Any:
    """
    Parsed endpoint options from INI key/values.
    """
    return parseOptions(SectionReader("test.ini", "endpoint:mqtt", values))


class ConnectorTestMixin:
    """
    A started connector on a fake client, and a watch on log events emitted
    from the fake library thread.
    """

    def setUp(self) -> None:
        self.reactor = BridgeReactor()
        self.clients: List[FakeClient] = []
        self.threads: List[Tuple[Callable[[], None], str]] = []
        self.logged: List[dict] = []
        self.libraryLogs: List[dict] = []

        def observe(event: dict) -> None:
            self.logged.append(event)
            if self.reactor.libraryThread:
                self.libraryLogs.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)  # type: ignore[attr-defined]
        self.connector = self.makeConnector()

    def makeConnector(self, **options: str) -> MqttConnector:
        """
        A started connector with the endpoint keys C{options}.
        """
        def factory(clientId: str) -> FakeClient:
            client = FakeClient(clientId, self.reactor)
            self.clients.append(client)
            return client

        connector = MqttConnector("mqtt", endpointOptions(**options), self.reactor, clientFactory=factory,
                                  startThread=lambda f, name: self.threads.append((f, name)), epoch=EPOCH)
        connector.startService()
        return connector

    @property
    def client(self) -> FakeClient:
        """
        The fake client of the connector.
        """
        return self.clients[-1]

    def connect(self, sessionPresent: bool = False, **properties: Any) -> None:
        """
        Let the broker accept the connection, and the reactor notice.
        """
        self.client.connack(sessionPresent, **properties)
        self.reactor.runHops()

    def subscribeActive(self, topic: str = "sensors/+/temperature", start: Any = "latest",
                        group: Optional[str] = None) -> Tuple[MqttSubscription, RecordingSink]:
        """
        A subscription the broker granted, started.
        """
        sink = RecordingSink()
        subscription = self.connector.subscribe(topic, start, sink, group=group)
        if subscription.feed.state != "active":
            mid = self.client.subscribes[-1][0]
            self.client.suback(mid, 1)
            self.reactor.runHops()
        self.reactor.advance(0)
        return subscription, sink

    def tearDown(self) -> None:
        self.assertEqual(self.reactor.violations, [], "Twisted was used from the library thread")
        self.assertEqual(self.libraryLogs, [], "something logged from the library thread")


class CapabilityTests(ConnectorTestMixin, SynchronousTestCase):
    """
    The interfaces the MQTT connector declares, and those it does not.
    """

    def test_connectorCapabilities(self) -> None:
        """
        The connector provides L{IConnector} and L{ISharedSubscriptions}
        (the share groups of webhook deliveries), class and instance alike.
        """
        for interface in (IConnector, ISharedSubscriptions):
            verifyClass(interface, MqttConnector)
            verifyObject(interface, self.connector)

    def test_notCapabilities(self) -> None:
        """
        An MQTT broker keeps no log and no consumer groups, and its
        subscriptions cannot hold: none of those is claimed.
        """
        self.assertFalse(IRetainedLog.providedBy(self.connector))
        self.assertFalse(IConsumerGroups.providedBy(self.connector))
        self.assertFalse(IHoldableSubscription.implementedBy(MqttSubscription))


class BridgeTests(ConnectorTestMixin, SynchronousTestCase):
    """
    paho's callbacks only queue plain values and hop once per batch; the
    reactor thread does the rest, in order.
    """

    def test_interfaces(self) -> None:
        """
        The connector and its subscriptions provide their interfaces.
        """
        self.assertTrue(verifyObject(IConnector, self.connector))
        self.connect()
        subscription, _ = self.subscribeActive()
        self.assertTrue(verifyObject(IUpstreamSubscription, subscription))
        self.assertEqual(self.connector.kind, "mqtt5")

    def test_startConfiguresClient(self) -> None:
        """
        Starting configures paho and starts its thread with an asynchronous
        connect: a clean start only the first time, a session expiry, the
        reconnect back-off, and exceptions in callbacks suppressed.
        """
        connector = self.makeConnector(host="broker.example", port="1884", username="u", password="p",
                                       keepalive="40", **{"session-expiry": "90", "reconnect-min": "0.5",
                                                          "reconnect-max": "8"})
        client = self.client
        self.assertTrue(client.looping)
        self.assertTrue(client.suppress_exceptions)
        self.assertEqual((client.connectArgs.host, client.connectArgs.port, client.connectArgs.keepalive),
                         ("broker.example", 1884, 40))
        self.assertEqual(client.connectArgs.cleanStart, MQTT_CLEAN_START_FIRST_ONLY)
        self.assertEqual(client.connectArgs.properties.SessionExpiryInterval, 90)
        self.assertEqual(client.credentials, ("u", "p"))
        self.assertEqual(client.reconnectDelay, (0.5, 8.0))
        self.assertTrue(client.clientId.startswith("evgate-"))
        self.assertFalse(connector.connected)

    def test_connectedAfterHop(self) -> None:
        """
        C{connected} changes on the reactor thread, when the hop runs, not on
        paho's thread.
        """
        self.client.connack()
        self.assertFalse(self.connector.connected)
        self.assertEqual(len(self.reactor.hops), 1)
        self.reactor.runHops()
        self.assertTrue(self.connector.connected)
        self.client.lose()
        self.assertTrue(self.connector.connected)
        self.reactor.runHops()
        self.assertFalse(self.connector.connected)

    def test_oneHopPerBatch(self) -> None:
        """
        Many events from paho's thread cross in one hop, handled in the
        order they happened.
        """
        self.connect()
        subscription, sink = self.subscribeActive()
        feed = subscription.feed
        for n in range(5):
            self.client.message(f"sensors/{n}/temperature", b"%d" % n, ids=(feed.subscriptionId,))
        self.client.lose()
        self.assertEqual(len(self.reactor.hops), 1)
        self.reactor.runHops()
        self.assertEqual([m.content for m in sink.messages()], [b"0", b"1", b"2", b"3", b"4"])
        self.assertEqual(sink.kinds(), ["started", "deliver"])
        self.assertFalse(self.connector.connected)

    def test_largeBurstSpreadOverTurns(self) -> None:
        """
        A burst larger than one batch is handled over several reactor turns.
        """
        self.connect()
        subscription, sink = self.subscribeActive()
        for _ in range(mqtt.BATCH + 10):
            self.client.message("sensors/a/temperature", b"x", ids=(subscription.feed.subscriptionId,))
        self.reactor.runHops()
        self.assertEqual(len(sink.messages()), mqtt.BATCH)
        self.reactor.advance(0)
        self.assertEqual(len(sink.messages()), mqtt.BATCH + 10)
        self.assertEqual(sink.offsets(), list(range(mqtt.BATCH + 10)))

    def test_realThreadOnlyHops(self) -> None:
        """
        Callbacks from a real foreign thread reach the reactor only through
        C{callFromThread}: before the hop runs, nothing changed.
        """
        self.connect()
        subscription, sink = self.subscribeActive()
        reactor = self.reactor
        seen: List[str] = []
        original = reactor.callFromThread

        def recordingCallFromThread(f: Callable[..., Any], *args: Any, **kw: Any) -> None:
            seen.append(threading.current_thread().name)
            original(f, *args, **kw)

        reactor.callFromThread = recordingCallFromThread  # type: ignore[method-assign]

        def library() -> None:
            self.client.message("sensors/b/temperature", b"from a thread", ids=(subscription.feed.subscriptionId,))
            self.client.lose()

        thread = threading.Thread(target=library, name="fake-paho")
        thread.start()
        thread.join()
        self.assertEqual(seen, ["fake-paho"])
        self.assertEqual(sink.messages(), [])
        self.assertTrue(self.connector.connected)
        reactor.runHops()
        self.assertEqual([m.content for m in sink.messages()], [b"from a thread"])
        self.assertFalse(self.connector.connected)

    def test_badMessageDoesNotRaiseInLibrary(self) -> None:
        """
        A message paho cannot decode (a topic that is not UTF-8) is dropped
        without raising on paho's thread (which would end its loop), and
        logged from the reactor thread.
        """
        self.connect()
        subscription, sink = self.subscribeActive()
        self.client.message(b"sensors/\xff/temperature", b"x", ids=(subscription.feed.subscriptionId,))
        self.reactor.runHops()
        self.assertEqual(sink.messages(), [])
        self.assertTrue(any("dropped" in str(e.get("context", "")) for e in self.logged))

    def test_connectFailureLogged(self) -> None:
        """
        A failed connect attempt is logged on the reactor thread and leaves
        the connector disconnected, with the reason for publishers.
        """
        self.client.connectFail()
        self.reactor.runHops()
        self.assertFalse(self.connector.connected)
        self.assertIn("cannot reach", self.connector.lastError)
        self.assertTrue(any("cannot reach" in e.get("problem", "") for e in self.logged))

    def test_connectFailureReason(self) -> None:
        """
        The reason of a failed attempt comes from the exception paho's
        socket set-up raised: an untrusted broker certificate is a TLS
        refusal that names tls-ca, for /ready and the log.
        """
        error = ssl.SSLCertVerificationError(1, "certificate verify failed")
        error.verify_message = "unable to get local issuer certificate"
        self.client.lastConnectError = error
        self.client.connectFail()
        self.reactor.runHops()
        reason = self.connector.notConnectedReason
        assert reason is not None
        self.assertTrue(reason.startswith("TLS failed: the broker's certificate is not trusted"), reason)
        self.assertIn("tls-ca", reason)

    def test_refusalLoggedOnce(self) -> None:
        """
        A broker that refuses the credentials on every retry is logged once
        (naming the endpoint and the cause), again after PROBLEM_RELOG
        seconds with the count, and /ready has the reason.
        """
        for _ in range(5):
            self.client.connack(code=0x86)
            self.reactor.runHops()
        lines = [e for e in self.logged if "authentication failed" in e.get("problem", "")]
        self.assertEqual(len(lines), 1)
        self.assertEqual(lines[0]["name"], self.connector.name)
        self.assertIn("password-file", self.connector.notConnectedReason or "")
        self.reactor.advance(PROBLEM_RELOG)
        self.client.connack(code=0x86)
        self.reactor.runHops()
        lines = [e for e in self.logged if "authentication failed" in e.get("problem", "")]
        self.assertEqual(len(lines), 2)
        self.assertIn("again 4 times", lines[1]["again"])

    def test_refusedConnection(self) -> None:
        """
        A CONNACK with a failure reason leaves the connector disconnected
        with that reason.
        """
        self.client.connack(code=0x87)
        self.reactor.runHops()
        self.assertFalse(self.connector.connected)
        self.assertIn("Not authorized", self.connector.lastError)

    def test_stop(self) -> None:
        """
        Stopping ends the session (session expiry 0 on DISCONNECT), joins
        paho's thread on a thread of its own, and fails publishes still
        waiting.
        """
        self.connect()
        published = self.connector.publish("t", Draft(b"x"), 10)
        d = self.connector.stopService()
        self.assertEqual(self.client.disconnects[0].SessionExpiryInterval, 0)
        self.failureResultOf(published, EndpointUnavailable)
        self.assertNoResult(d)
        [(join, name)] = self.threads
        self.assertIn("mqtt", name)
        join()
        self.assertFalse(self.client.looping)
        self.reactor.runHops()
        self.successResultOf(d)
        self.assertFalse(self.connector.connected)

    def test_stopDoesNotWaitForever(self) -> None:
        """
        A paho thread that does not end in time (a blocking connect) does not
        hold shutdown beyond connect-timeout plus a margin.
        """
        d = self.connector.stopService()
        self.assertNoResult(d)
        self.reactor.advance(7.5)
        self.successResultOf(d)


class PublishTests(ConnectorTestMixin, SynchronousTestCase):
    """
    Publishing: properties, acknowledgements, refusals, time-outs and topic
    templates.
    """

    def setUp(self) -> None:
        super().setUp()
        self.connector.bindApi("sensors", "sensors/+/temperature",
                               MqttApiOptions(qos=1, publishTopic=TopicTemplate("sensors/{key}/temperature")))
        self.connector.bindApi("plain", "plain", MqttApiOptions(qos=2, retain=True))

    def test_notConnected(self) -> None:
        """
        With no connection the publish fails at once with 503 and nothing is
        handed to paho (so nothing is sent later either).
        """
        f = self.failureResultOf(self.connector.publish("plain", Draft(b"x"), 10), EndpointUnavailable)
        self.assertEqual(f.value.status, 503)
        self.assertIn("not connected", f.value.detail)
        self.assertEqual(self.client.publishes, [])

    def test_publishMany(self) -> None:
        """
        A batch is one publish per draft, all in flight at once; each record
        gets its own answer, and a refused one does not fail the others.
        """
        self.connect()
        d = self.connector.publishMany("sensors/+/temperature", [Draft(b"1", key="a"), Draft(b"2", key="x/y"),
                                                   Draft(b"3", key="b")], 10)
        self.assertEqual([p[1] for p in self.client.publishes],
                         ["sensors/a/temperature", "sensors/b/temperature"])
        for mid, *_ in self.client.publishes:
            self.client.puback(mid)
        self.reactor.runHops()
        results = self.successResultOf(d)
        self.assertEqual([r.topic for r in (results[0], results[2])], ["sensors/a/temperature",
                                                                       "sensors/b/temperature"])
        self.assertEqual(results[1].status, 400)

    def test_headersMqttCannotCarry(self) -> None:
        """
        A header with a character Mosquitto refuses in a user property (a
        control character, a non-character) is a 400 and nothing is sent:
        the broker would close the endpoint's connection instead.
        """
        self.connect()
        for headers in ((("a", "x\x01y"),), (("a\x00", "x"),), (("a", "\ufffe"),), (("a", "\x85"),)):
            failure = self.failureResultOf(self.connector.publish("plain", Draft(b"x", headers=headers), 10))
            self.assertIsInstance(failure.value, BadRequest)
            self.assertIn("U+", failure.value.detail)
        self.assertEqual(self.client.publishes, [])

    def test_acknowledged(self) -> None:
        """
        The Deferred fires only after the broker's acknowledgement reached
        the reactor, with the concrete topic; headers become user properties
        and C{content-type} the MQTT content type.
        """
        self.connect()
        draft = Draft(b"21.5", key=None, headers=(("unit", "C"), ("content-type", "text/plain"), ("unit", "K")))
        d = self.connector.publish("plain", draft, 10)
        [(mid, topic, payload, qos, retain, props)] = self.client.publishes
        self.assertEqual((topic, payload, qos, retain), ("plain", b"21.5", 2, True))
        self.assertEqual(props.UserProperty, [("unit", "C"), ("unit", "K")])
        self.assertEqual(props.ContentType, "text/plain")
        self.assertNoResult(d)
        self.client.puback(mid)
        self.assertNoResult(d)
        self.reactor.runHops()
        self.assertEqual(self.successResultOf(d), Position("plain", 0, -1))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_template(self) -> None:
        """
        The key picks the concrete topic through publish-topic.
        """
        self.connect()
        d = self.connector.publish("sensors/+/temperature", Draft(b"1", key="kitchen"), 10)
        mid, topic = self.client.publishes[0][:2]
        self.assertEqual(topic, "sensors/kitchen/temperature")
        self.client.puback(mid)
        self.reactor.runHops()
        self.assertEqual(self.successResultOf(d).topic, "sensors/kitchen/temperature")

    def test_templateRefusals(self) -> None:
        """
        A missing key, a key that would add levels or wildcards, a key on an
        API that cannot use it, and a filter with no publish-topic are 400s,
        and nothing is published.
        """
        self.connect()
        cases = [
            ("sensors/+/temperature", None, "key picks the topic"),
            ("sensors/+/temperature", "a/b", "separator"),
            ("sensors/+/temperature", "+", "wildcard"),
            ("plain", "k", "carry no key"),
            ("other/#", None, "is a filter"),
        ]
        for topic, key, text in cases:
            f = self.failureResultOf(self.connector.publish(topic, Draft(b"x", key=key), 10), BadRequest)
            self.assertEqual(f.value.status, 400)
            self.assertIn(text, f.value.detail)
        self.assertEqual(self.client.publishes, [])

    def test_refusedByBroker(self) -> None:
        """
        A PUBACK with a failure reason is a 503 naming the reason.
        """
        self.connect()
        d = self.connector.publish("plain", Draft(b"x"), 10)
        self.client.puback(self.client.publishes[0][0], 0x87)
        self.reactor.runHops()
        f = self.failureResultOf(d, EndpointUnavailable)
        self.assertIn("Not authorized", f.value.detail)

    def test_timeout(self) -> None:
        """
        No acknowledgement within the timeout is a 504; a late one is
        ignored.
        """
        self.connect()
        d = self.connector.publish("plain", Draft(b"x"), 2)
        self.reactor.advance(1.9)
        self.assertNoResult(d)
        self.reactor.advance(0.2)
        f = self.failureResultOf(d, EndpointTimeout)
        self.assertEqual(f.value.status, 504)
        self.client.puback(self.client.publishes[0][0])
        self.reactor.runHops()

    def test_cancel(self) -> None:
        """
        Cancelling (the entrypoint's own timeout) forgets the publish and
        its timer.
        """
        self.connect()
        d = self.connector.publish("plain", Draft(b"x"), 5)
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.client.puback(self.client.publishes[0][0])
        self.reactor.runHops()

    def test_inFlightOverReconnect(self) -> None:
        """
        A QoS 1 publish in flight when the connection drops stays pending:
        paho sends it again after reconnecting, and its acknowledgement
        still answers the publisher.
        """
        self.connect()
        d = self.connector.publish("plain", Draft(b"x"), 10)
        self.client.lose()
        self.reactor.runHops()
        self.assertNoResult(d)
        self.client.connack(sessionPresent=True)
        self.client.puback(self.client.publishes[0][0])
        self.reactor.runHops()
        self.successResultOf(d)

    def test_noConnectionQos0(self) -> None:
        """
        A QoS 0 publish paho could not write (the connection just dropped)
        is a 503 at once: paho does not keep it.
        """
        self.connector.bindApi("q0", "q0", MqttApiOptions(qos=0))
        self.connect()
        self.client.publishRc = 4
        self.failureResultOf(self.connector.publish("q0", Draft(b"x"), 10), EndpointUnavailable)

    def test_maximumPacketSize(self) -> None:
        """
        A message larger than the broker's Maximum Packet Size is a 413
        instead of a connection the broker would close.
        """
        self.connect(MaximumPacketSize=1000)
        self.failureResultOf(self.connector.publish("plain", Draft(b"x" * 2000), 10), PayloadTooLarge)
        self.assertEqual(self.client.publishes, [])


class SubscribeTests(ConnectorTestMixin, SynchronousTestCase):
    """
    One MQTT subscription per filter, numbered once for all its readers;
    starts, cursors and gaps.
    """

    def test_startsAfterSuback(self) -> None:
        """
        A reader starts when the broker granted the subscription, at offset
        0 of this run's epoch; the subscription asks for retained messages
        only when new and carries a subscription identifier.
        """
        self.connect()
        sink = RecordingSink()
        self.connector.subscribe("sensors/+/temperature", "latest", sink)
        [(mid, topic, options, props)] = self.client.subscribes
        self.assertEqual(topic, "sensors/+/temperature")
        self.assertEqual(options.QoS, 1)
        self.assertEqual(options.retainHandling, SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
        self.assertEqual(len(props.SubscriptionIdentifier), 1)
        self.reactor.advance(0)
        self.assertEqual(sink.events, [])
        self.client.suback(mid, 1)
        self.reactor.runHops()
        self.assertEqual(sink.events, [("started", Cursor(EPOCH, ((0, 0),)))])

    def test_waitsForConnection(self) -> None:
        """
        A subscription made while disconnected is sent once connected.
        """
        sink = RecordingSink()
        self.connector.subscribe("a", "latest", sink)
        self.assertEqual(self.client.subscribes, [])
        self.connect()
        self.assertEqual(len(self.client.subscribes), 1)
        self.client.suback(self.client.subscribes[0][0])
        self.reactor.runHops()
        self.assertEqual(sink.kinds(), ["started"])

    def test_repeatedUserPropertiesFromTheWire(self) -> None:
        """
        User properties as paho decodes them from a PUBLISH's bytes (one
        attribute set per property, which paho appends for the ones that
        may repeat) become headers with every repeated name, in order.
        """
        from evgate.connectors.mqtt._paho import _incoming

        sent = Properties(PacketTypes.PUBLISH)
        sent.UserProperty = [("dup", "1"), ("one", "x"), ("dup", "2"), ("dup", "1")]
        received = Properties(PacketTypes.PUBLISH)
        received.unpack(sent.pack())
        message = MQTTMessage(mid=1, topic=b"t")
        message.payload = b"p"
        message.properties = received
        self.assertEqual(_incoming(message).userProperties,
                         (("dup", "1"), ("one", "x"), ("dup", "2"), ("dup", "1")))

    def test_messages(self) -> None:
        """
        Messages keep their concrete topic; user properties become headers
        (with the content type restored as C{content-type}); QoS, retain,
        content type, expiry, response topic and correlation data go into
        the metadata; offsets count from 0.
        """
        self.connect()
        subscription, sink = self.subscribeActive()
        sid = subscription.feed.subscriptionId
        self.client.message("sensors/kitchen/temperature", b"21", ids=(sid,), qos=1, retain=True,
                            userProperties=(("unit", "C"), ("unit", "K")), ContentType="text/plain",
                            MessageExpiryInterval=60, ResponseTopic="replies/1", CorrelationData=b"\x01")
        self.client.message("sensors/hall/temperature", b"19", ids=(sid,), qos=0)
        self.reactor.runHops()
        first, second = sink.messages()
        self.assertEqual((first.topic, first.partition, first.offset, first.key), ("sensors/kitchen/temperature",
                                                                                  0, 0, None))
        self.assertEqual(first.headers, (("unit", "C"), ("unit", "K"), ("content-type", "text/plain")))
        self.assertEqual(first.extra, {"qos": 1, "retain": True, "contentType": "text/plain",
                                       "messageExpiry": 60, "responseTopic": "replies/1",
                                       "correlationData": "AQ=="})
        self.assertEqual((second.topic, second.offset, second.extra), ("sensors/hall/temperature", 1,
                                                                       {"qos": 0, "retain": False}))
        self.assertEqual(first.metadata()["qos"], 1)

    def test_sharedNumbering(self) -> None:
        """
        Readers of one filter share one MQTT subscription and one numbering:
        a later reader starts at the head and sees the same offsets.
        """
        self.connect()
        one, sinkOne = self.subscribeActive()
        sid = one.feed.subscriptionId
        self.client.message("sensors/a/temperature", b"1", ids=(sid,))
        self.reactor.runHops()
        two, sinkTwo = self.subscribeActive()
        self.assertIs(two.feed, one.feed)
        self.assertEqual(len(self.client.subscribes), 1)
        self.assertEqual(sinkTwo.events, [("started", Cursor(EPOCH, ((0, 1),)))])
        self.client.message("sensors/b/temperature", b"2", ids=(sid,))
        self.reactor.runHops()
        self.assertEqual(sinkOne.offsets(), [0, 1])
        self.assertEqual(sinkTwo.offsets(), [1])
        self.assertIs(sinkOne.messages()[1], sinkTwo.messages()[0])

    def test_brokenReader(self) -> None:
        """
        A reader whose sink raises is logged and does not cost the other
        readers of the filter their messages.
        """
        self.connect()
        broken, brokenSink = self.subscribeActive()

        def explode(messages: List[Message]) -> None:
            raise RuntimeError("broken sink")

        brokenSink.deliver = explode  # type: ignore[method-assign]
        _, sink = self.subscribeActive()
        self.client.message("sensors/a/temperature", b"1", ids=(broken.feed.subscriptionId,))
        self.reactor.runHops()
        self.assertEqual(sink.offsets(), [0])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_cursorAtHead(self) -> None:
        """
        A cursor of this run exactly at the head resumes without a gap.
        """
        self.connect()
        one, _ = self.subscribeActive()
        self.client.message("sensors/a/temperature", b"1", ids=(one.feed.subscriptionId,))
        self.reactor.runHops()
        _, sink = self.subscribeActive(start=Cursor(EPOCH, ((0, 1),)))
        self.assertEqual(sink.kinds(), ["started"])

    def test_cursorBehind(self) -> None:
        """
        A cursor behind the head (the hub's window did not cover it) starts
        at the live head with a gap: MQTT cannot replay.
        """
        self.connect()
        one, _ = self.subscribeActive()
        for _ in range(3):
            self.client.message("sensors/a/temperature", b"1", ids=(one.feed.subscriptionId,))
        self.reactor.runHops()
        _, sink = self.subscribeActive(start=Cursor(EPOCH, ((0, 1),)))
        head = Cursor(EPOCH, ((0, 3),))
        self.assertEqual(sink.kinds(), ["started", "gap"])
        self.assertEqual(sink.events[0][1], head)
        cursor, reason = sink.events[1][1]
        self.assertEqual(cursor, head)
        self.assertIn("replay window", reason)

    def test_cursorOtherEpoch(self) -> None:
        """
        A cursor from another run of the gateway starts at the head with a
        gap saying so.
        """
        self.connect()
        _, sink = self.subscribeActive(start=Cursor(EPOCH + 1, ((0, 0),)))
        self.assertEqual(sink.kinds(), ["started", "gap"])
        self.assertIn("another run", sink.events[1][1][1])

    def test_earliestIsLiveHead(self) -> None:
        """
        C{earliest} starts at the live head like C{latest}, without a gap.
        """
        self.connect()
        _, sink = self.subscribeActive(start="earliest")
        self.assertEqual(sink.kinds(), ["started"])

    def test_resubscribeSkipsAnOffset(self) -> None:
        """
        When the last reader leaves, the MQTT subscription ends; a later one
        gets a new subscription and numbering skips an offset, so a cursor
        from before is never taken for continuous.
        """
        self.connect()
        one, _ = self.subscribeActive()
        self.client.message("sensors/a/temperature", b"1", ids=(one.feed.subscriptionId,))
        self.reactor.runHops()
        one.close()
        one.close()
        self.assertEqual(self.client.unsubscribes, ["sensors/+/temperature"])
        # A message for the old subscription still on its way is dropped.
        self.client.message("sensors/a/temperature", b"late", ids=(one.feed.subscriptionId,))
        self.reactor.runHops()
        two, sink = self.subscribeActive(start=Cursor(EPOCH, ((0, 1),)))
        self.assertNotEqual(two.feed.subscriptionId, one.feed.subscriptionId)
        self.assertEqual(sink.events[0], ("started", Cursor(EPOCH, ((0, 2),))))
        self.assertEqual(sink.kinds(), ["started", "gap"])

    def test_overlappingFilters(self) -> None:
        """
        With overlapping filters the broker sends one copy per subscription;
        subscription identifiers route each copy to its own feed only.
        """
        self.connect()
        narrow, narrowSink = self.subscribeActive("a/+")
        wide, wideSink = self.subscribeActive("a/#")
        self.client.message("a/b", b"1", ids=(narrow.feed.subscriptionId,))
        self.client.message("a/b", b"1", ids=(wide.feed.subscriptionId,))
        self.client.message("a/b/c", b"2", ids=(wide.feed.subscriptionId,))
        self.reactor.runHops()
        self.assertEqual([m.content for m in narrowSink.messages()], [b"1"])
        self.assertEqual([m.content for m in wideSink.messages()], [b"1", b"2"])

    def test_noSubscriptionIdentifiers(self) -> None:
        """
        A broker without subscription identifiers gets none, and messages
        are routed by matching their topic.
        """
        self.connect(SubscriptionIdentifierAvailable=0)
        _, sink = self.subscribeActive()
        self.assertFalse(hasattr(self.client.subscribes[0][3] or Properties(PacketTypes.SUBSCRIBE),
                                 "SubscriptionIdentifier"))
        self.client.message("sensors/x/temperature", b"1")
        self.client.message("sensors/x/humidity", b"2")
        self.reactor.runHops()
        self.assertEqual([m.content for m in sink.messages()], [b"1"])

    def test_shareGroup(self) -> None:
        """
        A share group subscribes to C{$share/<group>/<filter>}, with a
        numbering of its own.
        """
        self.connect()
        plain, _ = self.subscribeActive("jobs/#")
        grouped, sink = self.subscribeActive("jobs/#", group="workers")
        self.assertIsNot(plain.feed, grouped.feed)
        self.assertEqual(self.client.subscribes[-1][1], "$share/workers/jobs/#")
        self.client.message("jobs/1", b"1", ids=(grouped.feed.subscriptionId,))
        self.reactor.runHops()
        self.assertEqual(sink.offsets(), [0])
        self.assertRaises(ValueError, self.connector.subscribe, "jobs/#", "latest", RecordingSink(), group="a/b")

    def test_refusedSubscription(self) -> None:
        """
        A SUBACK with a failure reason ends the readers with a 503 failure.
        """
        self.connect()
        sink = RecordingSink()
        self.connector.subscribe("secret/#", "latest", sink)
        self.client.suback(self.client.subscribes[0][0], 0x87)
        self.reactor.runHops()
        [(kind, reason)] = sink.events
        self.assertEqual(kind, "failed")
        self.assertIsInstance(reason.value, EndpointUnavailable)
        self.assertIn("Not authorized", reason.value.detail)
        # The next reader tries again.
        self.connector.subscribe("secret/#", "latest", RecordingSink())
        self.assertEqual(len(self.client.subscribes), 2)

    def test_refusedCredentialsFailNewSubscriptions(self) -> None:
        """
        While the broker refuses the gateway's credentials, a new
        subscription fails on the next turn with a 503 that says why,
        without sending a SUBSCRIBE; once the broker accepts the gateway,
        subscriptions are sent and start again.
        """
        self.client.connack(code=0x86)
        self.reactor.runHops()
        sink = RecordingSink()
        subscription = self.connector.subscribe("sensors/+/temperature", "latest", sink)
        self.assertEqual(sink.events, [])
        self.reactor.advance(0)
        [(kind, reason)] = sink.events
        self.assertEqual(kind, "failed")
        self.assertIsInstance(reason.value, EndpointUnavailable)
        self.assertIn("Bad user name or password", reason.value.detail)
        subscription.close()
        self.connect()
        self.assertEqual(self.client.subscribes, [])
        again = RecordingSink()
        self.connector.subscribe("sensors/+/temperature", "latest", again)
        self.client.suback(self.client.subscribes[0][0], 1)
        self.reactor.runHops()
        self.assertEqual(again.kinds(), ["started"])

    def test_refusalEndsWaitingReaders(self) -> None:
        """
        Readers that wait for a connection when the broker refuses the
        credentials end with a 503 instead of waiting for good; readers of
        a subscription that was granted before end too, and its filter is
        removed from a session the broker kept.
        """
        self.connect()
        _, active = self.subscribeActive("a")
        self.client.lose()
        self.reactor.runHops()
        waiting = RecordingSink()
        self.connector.subscribe("b", "latest", waiting)
        self.client.connack(code=0x87)
        self.reactor.runHops()
        self.assertEqual(waiting.kinds(), ["failed"])
        self.assertEqual(active.kinds(), ["started", "failed"])
        self.assertIsInstance(waiting.events[0][1].value, EndpointUnavailable)
        self.connect(sessionPresent=True)
        self.assertEqual(self.client.unsubscribes, ["a"])

    def test_closedWhileSubscribing(self) -> None:
        """
        A reader that leaves before the SUBACK does not start, and the
        granted subscription is removed.
        """
        self.connect()
        sink = RecordingSink()
        subscription = self.connector.subscribe("a", "latest", sink)
        subscription.close()
        self.assertEqual(self.client.unsubscribes, ["a"])
        self.client.suback(self.client.subscribes[0][0])
        self.reactor.runHops()
        self.assertEqual(sink.events, [])


class ReconnectTests(ConnectorTestMixin, SynchronousTestCase):
    """
    Readers stay attached through a lost connection; what they may have
    missed is reported as a gap.
    """

    def test_sessionLost(self) -> None:
        """
        A reconnect whose session the broker did not keep reports a gap
        (skipping an offset) and subscribes again.
        """
        self.connect()
        subscription, sink = self.subscribeActive()
        self.client.message("sensors/a/temperature", b"1", ids=(subscription.feed.subscriptionId,))
        self.reactor.runHops()
        self.client.lose()
        self.reactor.runHops()
        self.assertEqual(sink.kinds(), ["started", "deliver"])
        self.connect(sessionPresent=False)
        self.assertEqual(sink.kinds(), ["started", "deliver", "gap"])
        cursor, reason = sink.events[-1][1]
        self.assertEqual(cursor, Cursor(EPOCH, ((0, 2),)))
        self.assertIn("session", reason)
        self.assertEqual(len(self.client.subscribes), 2)
        self.client.suback(self.client.subscribes[-1][0])
        self.client.message("sensors/a/temperature", b"2", ids=(subscription.feed.subscriptionId,))
        self.reactor.runHops()
        self.assertEqual(sink.offsets(), [0, 2])

    def test_sessionResumed(self) -> None:
        """
        A resumed session keeps the QoS 1 subscription and what the broker
        queued: no gap, no new SUBSCRIBE.
        """
        self.connect()
        subscription, sink = self.subscribeActive()
        self.client.lose()
        self.reactor.runHops()
        self.connect(sessionPresent=True)
        self.assertEqual(len(self.client.subscribes), 1)
        self.client.message("sensors/a/temperature", b"queued", ids=(subscription.feed.subscriptionId,))
        self.reactor.runHops()
        self.assertEqual(sink.kinds(), ["started", "deliver"])
        self.assertEqual(sink.offsets(), [0])

    def test_sessionResumedQos0(self) -> None:
        """
        A QoS 0 subscription reports a gap even when the session was
        resumed: the broker does not queue QoS 0 messages.
        """
        self.connector.bindApi("q0", "q0/#", MqttApiOptions(qos=0))
        self.connect()
        mid = None
        sink = RecordingSink()
        self.connector.subscribe("q0/#", "latest", sink)
        mid = self.client.subscribes[-1][0]
        self.client.suback(mid, 0)
        self.reactor.runHops()
        self.client.lose()
        self.connect(sessionPresent=True)
        self.assertEqual(sink.kinds(), ["started", "gap"])
        self.assertIn("QoS 0", sink.events[-1][1][1])

    def test_readerDuringOutage(self) -> None:
        """
        A reader added to an active filter while disconnected starts at
        once, and is told about the gap of the lost session like the others.
        """
        self.connect()
        self.subscribeActive()
        self.client.lose()
        self.reactor.runHops()
        _, sink = self.subscribeActive()
        self.assertEqual(sink.kinds(), ["started"])
        self.connect(sessionPresent=False)
        self.assertEqual(sink.kinds(), ["started", "gap"])

    def test_staleSubscriptionRemovedOnResume(self) -> None:
        """
        A filter whose last reader left during an outage is unsubscribed
        when the session is resumed (the broker still holds it).
        """
        self.connect()
        subscription, _ = self.subscribeActive()
        self.client.lose()
        self.reactor.runHops()
        subscription.close()
        self.assertEqual(self.client.unsubscribes, [])
        self.connect(sessionPresent=True)
        self.assertEqual(self.client.unsubscribes, ["sensors/+/temperature"])


class PauseTests(ConnectorTestMixin, SynchronousTestCase):
    """
    A paused reader keeps a bounded backlog and never holds up the others.
    """

    def setUp(self) -> None:
        super().setUp()
        self.connector = self.makeConnector(**{"paused-backlog": "3"})
        self.connect()

    def send(self, subscription: MqttSubscription, count: int) -> None:
        """
        C{count} messages on the subscription's feed.
        """
        for n in range(count):
            self.client.message("sensors/a/temperature", b"%d" % n, ids=(subscription.feed.subscriptionId,))
        self.reactor.runHops()

    def test_pauseResume(self) -> None:
        """
        What arrives while paused is delivered on resume, on a later turn;
        another reader of the filter is not held up.
        """
        slow, slowSink = self.subscribeActive()
        _, fastSink = self.subscribeActive()
        slow.pause()
        self.send(slow, 2)
        self.assertEqual(slowSink.offsets(), [])
        self.assertEqual(fastSink.offsets(), [0, 1])
        slow.resume()
        self.assertEqual(slowSink.offsets(), [])
        self.send(slow, 1)
        self.reactor.advance(0)
        self.assertEqual(slowSink.offsets(), [0, 1, 2])

    def test_overflow(self) -> None:
        """
        Beyond the backlog the oldest messages go, and the reader is told
        with a gap at the first message it still gets.
        """
        slow, sink = self.subscribeActive()
        slow.pause()
        self.send(slow, 5)
        slow.resume()
        self.reactor.advance(0)
        self.assertEqual(sink.kinds(), ["started", "gap", "deliver"])
        cursor, reason = sink.events[1][1]
        self.assertEqual(cursor, Cursor(EPOCH, ((0, 2),)))
        self.assertIn("2 messages were dropped", reason)
        self.assertEqual(sink.offsets(), [2, 3, 4])

    def test_gapKeepsItsPlace(self) -> None:
        """
        A gap that happens while paused is delivered between the messages
        before and after it.
        """
        slow, sink = self.subscribeActive()
        slow.pause()
        self.send(slow, 1)
        self.client.lose()
        self.connect(sessionPresent=False)
        self.client.suback(self.client.subscribes[-1][0])
        self.send(slow, 1)
        slow.resume()
        self.reactor.advance(0)
        self.assertEqual(sink.kinds(), ["started", "deliver", "gap", "deliver"])

    def test_closeWhilePaused(self) -> None:
        """
        Closing a paused reader drops its backlog and any pending flush.
        """
        slow, sink = self.subscribeActive()
        slow.pause()
        self.send(slow, 1)
        slow.resume()
        slow.close()
        self.reactor.advance(0)
        self.assertEqual(sink.kinds(), ["started"])


class TopicTests(SynchronousTestCase):
    """
    Topic filters and publish templates.
    """

    def test_filters(self) -> None:
        """
        Wildcards must take whole levels, # only last; shared-subscription
        names are the gateway's business.
        """
        for good in ("a", "a/+/c", "a/#", "#", "+", "$SYS/#"):
            self.assertIsNone(filterProblem(good), good)
        for bad in ("", "a/b+", "a/#/c", "a#", "$share/g/a", "a\x00b"):
            self.assertIsNotNone(filterProblem(bad), bad)

    def test_matching(self) -> None:
        """
        Topic matching follows MQTT 5 (used without subscription
        identifiers).
        """
        m = mqtt._matches
        self.assertTrue(m("a/+/c", "a/b/c"))
        self.assertFalse(m("a/+/c", "a/b/d"))
        self.assertTrue(m("a/#", "a"))
        self.assertTrue(m("a/#", "a/b/c"))
        self.assertFalse(m("#", "$SYS/x"))
        self.assertFalse(m("a/+", "a/b/c"))

    def test_templates(self) -> None:
        """
        Only C{{key}} is a placeholder; the literal part may not hold
        wildcards.
        """
        self.assertEqual(TopicTemplate("s/{key}/t").render("k"), "s/k/t")
        self.assertEqual(TopicTemplate("s/{{x}}").render(None), "s/{x}")
        for bad in ("s/{name}", "s/{key!r}", "s/{key:>3}", "s/+/{key}", "s/{", "s/#"):
            self.assertRaises(ValueError, TopicTemplate, bad)


INI = """
[endpoint:mqtt]
type = mqtt5
host = 127.0.0.1
{endpoint}

[api:sensors]
path = /sensors
endpoint = mqtt
topic = sensors/+/temperature
entrypoints = {entrypoints}
{api}
"""


def config(endpoint: str = "", api: str = "", entrypoints: str = "http-get") -> Any:
    """
    A parsed configuration with one MQTT API.
    """
    return parseConfig(INI.format(endpoint=endpoint, api=api, entrypoints=entrypoints), "test.ini")


class ConfigTests(SynchronousTestCase):
    """
    The endpoint and API keys of MQTT.
    """

    def test_endpointDefaults(self) -> None:
        """
        Keys left out take their documented defaults.
        """
        options = config().endpoints["mqtt"].options
        self.assertEqual(
            {k: options[k] for k in ("host", "port", "tls", "keepalive", "session-expiry", "reconnect-min",
                                     "reconnect-max", "client-id-prefix", "max-inflight", "paused-backlog")},
            {"host": "127.0.0.1", "port": 1883, "tls": False, "keepalive": 30, "session-expiry": 120,
             "reconnect-min": 1.0, "reconnect-max": 30.0, "client-id-prefix": "evgate-", "max-inflight": 20,
             "paused-backlog": 10000})

    def test_tlsPort(self) -> None:
        """
        With TLS the default port is 8883.
        """
        self.assertEqual(config("tls = true").endpoints["mqtt"].options["port"], 8883)

    def test_endpointErrors(self) -> None:
        """
        Mistakes name the key.
        """
        cases = [
            ("port = 0", "port"),
            ("password = x", "password"),
            ("tls-ca = /nonexistent", "tls-ca"),
            ("tls = true\ntls-ca = /nonexistent", "tls-ca"),
            ("reconnect-min = 5\nreconnect-max = 1", "reconnect-max"),
            ("bogus = 1", "bogus"),
            ("username = u\npassword = a\npassword-file = /etc/hostname", "password-file"),
        ]
        for text, key in cases:
            e = self.assertRaises(ConfigError, config, text)
            self.assertEqual((e.section, e.key), ("endpoint:mqtt", key), text)

    def test_passwordFile(self) -> None:
        """
        C{password-file} reads the password from a file (kept out of the
        INI).
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("s3cret\n")
        options = config(f"username = u\npassword-file = {path}").endpoints["mqtt"].options
        self.assertEqual(options["password"], "s3cret")

    def test_apiOptions(self) -> None:
        """
        qos, retain and publish-topic reach C{options["mqtt"]}; defaults are
        QoS 1 and no retain.
        """
        api = config(api="qos = 2\nretain = true\npublish-topic = sensors/{key}/temperature",
                     entrypoints="http-post http-get").apis["sensors"]
        self.assertEqual(api.options["mqtt"], MqttApiOptions(2, True, TopicTemplate("sensors/{key}/temperature")))
        self.assertEqual(config().apis["sensors"].options["mqtt"], MqttApiOptions())

    def test_filterNeedsPublishTopic(self) -> None:
        """
        An API that publishes to a wildcard topic without publish-topic is
        refused at start; one that only reads is fine.
        """
        e = self.assertRaises(ConfigError, config, entrypoints="http-post http-get")
        self.assertEqual(e.key, "publish-topic")
        self.assertIn("http-post", str(e))
        config(entrypoints="http-get")

    def test_apiErrors(self) -> None:
        """
        Bad API keys name the key.
        """
        for text, key in [("qos = 3", "qos"), ("retain = maybe", "retain"),
                          ("publish-topic = s/{id}", "publish-topic"), ("publish-topic = s/+", "publish-topic")]:
            e = self.assertRaises(ConfigError, config, api=text)
            self.assertEqual((e.section, e.key), ("api:sensors", key), text)

    def test_badTopic(self) -> None:
        """
        A topic that is not a valid filter is refused.
        """
        text = INI.format(endpoint="", api="", entrypoints="http-get").replace("sensors/+/temperature", "a/#/b")
        e = self.assertRaises(ConfigError, parseConfig, text)
        self.assertEqual(e.key, "topic")

    def test_mqttKeysOnlyForMqtt(self) -> None:
        """
        qos is an unknown key on an API of another endpoint type.
        """
        text = ("[endpoint:m]\ntype = memory\n[api:a]\npath = /a\nendpoint = m\ntopic = t\n"
                "entrypoints = http-get\nqos = 1\n")
        e = self.assertRaises(ConfigError, parseConfig, text)
        self.assertEqual(e.key, "qos")

    def test_conflictingApis(self) -> None:
        """
        Two APIs on the same topic of one endpoint with different MQTT
        options are refused when the gateway is built (the connector serves
        a topic with one set of options).
        """
        from evgate.service import GatewayService

        text = INI.format(endpoint="", api="qos = 1", entrypoints="http-get") + (
            "[api:again]\npath = /again\nendpoint = mqtt\ntopic = sensors/+/temperature\n"
            "entrypoints = http-get\nqos = 0\n")
        e = self.assertRaises(ConfigError, GatewayService, parseConfig(text, "test.ini"), Clock())
        self.assertEqual(e.section, "api:again")
        text = text.replace("qos = 0", "qos = 1")
        service = GatewayService(parseConfig(text, "test.ini"), Clock())
        self.assertEqual(service.connectors["mqtt"].apiOptions("sensors/+/temperature").qos, 1)
