"""
The MQTT endpoint: one MQTT 5 connection shared by every API on it.
"""

from __future__ import annotations

import random
import string
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Set, Tuple

from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY, MQTT_ERR_NO_CONN, MQTT_ERR_SUCCESS, error_string
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from evgate.connectors._publish import publishEach
from evgate.connectors.mqtt._constants import BATCH, PROBLEM_RELOG
from evgate.connectors.mqtt._events import BrokerEvents
from evgate.connectors.mqtt._feeds import MqttSubscription, _Feed, _Publish
from evgate.connectors.mqtt._options import (
    _SUBSCRIPTION_ID_MAX,
    DEFAULT_API_OPTIONS,
    MqttApiOptions,
    Start,
    filterProblem,
    tlsContext,
)
from evgate.connectors.mqtt._paho import pahoClient, publishProperties
from evgate.errors import BadRequest, EndpointTimeout, EndpointUnavailable, PayloadTooLarge
from evgate.ini import ConfigError
from evgate.interfaces import IConnector, ISharedSubscriptions, IUpstreamSink
from evgate.message import Cursor, Draft
from evgate.threads import ReactorBatches, StartThread, deferToOwnThread, startDaemonThread


@implementer(IConnector, ISharedSubscriptions)
class MqttConnector(Service, BrokerEvents):
    """
    An endpoint of C{type = mqtt5}: one MQTT 5 connection (one paho client
    and its thread) shared by every API on the endpoint.

    @ivar connected: whether the broker accepted the connection and it has
        not been lost since (as last seen by the reactor thread).
    @ivar lastError: one line about the last connection problem, or L{None}.
    """

    kind = "mqtt5"
    log = Logger()

    def __init__(self, name: str, options: Mapping[str, Any], reactor: Any,
                 clientFactory: Callable[[str], Any] = pahoClient,
                 startThread: StartThread = startDaemonThread,
                 epoch: Optional[int] = None) -> None:
        self.name = name  # type: ignore[assignment]  # Service.name is Optional
        self.options = dict(options)
        self.reactor = reactor
        self.connected = False
        self.lastError: Optional[str] = None
        # Why the broker refuses the gateway (credentials, TLS), while it
        # does: subscriptions fail at once rather than wait for a
        # connection that a retry alone will not get.
        self.refusal: Optional[str] = None
        rng = random.SystemRandom()
        self._epoch = epoch if epoch is not None else rng.randrange(1, 2**31)
        suffix = "".join(rng.choice(string.ascii_lowercase + string.digits) for _ in range(10))
        # Stable for the life of this connector, so that a reconnect resumes
        # the broker's session; new per start, so two nodes never collide.
        self.clientId = self.options.get("client-id-prefix", "evgate-") + suffix
        self._clientFactory = clientFactory
        self._startThread = startThread
        self._client: Any = None
        # paho's callbacks hand their events over in order, one reactor hop
        # per burst, at most BATCH events per reactor turn.
        self._inbox: ReactorBatches[Tuple[Any, ...]] = ReactorBatches(reactor, self._handleEvents, perTurn=BATCH)
        self._apiOptions: Dict[str, MqttApiOptions] = {}
        self._apiOwners: Dict[str, str] = {}
        self._feeds: Dict[Tuple[Optional[str], str], _Feed] = {}
        self._feedsById: Dict[int, _Feed] = {}
        self._sequences: Dict[Tuple[Optional[str], str], int] = {}
        self._subscribing: Dict[int, _Feed] = {}
        self._stale: Set[str] = set()
        self._nextSubscriptionId = 0
        self._publishes: Dict[int, _Publish] = {}
        self._everConnected = False
        self._stopping = False
        self._idsAvailable = True
        self._maxPacket: Optional[int] = None
        self._failedAttempts = 0
        self._problemLogged: Tuple[Optional[str], float, int] = (None, 0.0, 0)

    # -- IConnector

    @property
    def notConnectedReason(self) -> Optional[str]:
        """
        One line on why the endpoint is not connected, for C{/ready}; L{None}
        while it is.
        """
        if self.connected:
            return None
        return self.lastError or f"connecting to {self.where}"

    def _logProblem(self, problem: str, level: str = "warn") -> None:
        # One line per problem: again only after PROBLEM_RELOG seconds (with
        # the count of repeats) or when the problem changes.
        logged, when, repeats = self._problemLogged
        now = self.reactor.seconds()
        if logged == problem and now - when < PROBLEM_RELOG:
            self._problemLogged = (logged, when, repeats + 1)
            return
        again = f" (again {repeats} times since)" if logged == problem and repeats else ""
        emit = self.log.error if level == "error" else self.log.warn
        emit("MQTT endpoint {name}: {where}: {problem}; retrying with back-off{again}",
             name=self.name, where=self.where, problem=problem, again=again)
        self._problemLogged = (problem, now, 0)

    def epoch(self) -> int:
        return self._epoch

    @property
    def where(self) -> str:
        """
        The broker address, for messages.
        """
        return f"{self.options.get('host', '127.0.0.1')}:{self.options.get('port', 1883)}"

    def setServiceParent(self, parent: Any) -> None:
        """
        Attach to the gateway and learn its APIs on this endpoint.

        C{IConnector.publish} and C{subscribe} carry no per-API options, so
        the connector keeps each API's C{qos}, C{retain} and
        C{publish-topic} by topic (see L{bindApi}).
        """
        config = getattr(parent, "config", None)
        if config is not None:
            for api in config.apis.values():
                if api.endpoint == self.name:
                    self.bindApi(api.name, api.topic, api.options.get("mqtt", DEFAULT_API_OPTIONS),
                                 config.path)
        super().setServiceParent(parent)

    def bindApi(self, api: str, topic: str, options: MqttApiOptions, path: str = "<config>") -> None:
        """
        Use C{options} for publishes to and subscriptions of C{topic}.

        @raise ConfigError: when another API on the same topic of this
            endpoint has other MQTT options.
        """
        known = self._apiOptions.get(topic)
        if known is not None and known != options:
            other = self._apiOwners[topic]
            raise ConfigError(
                path, f"api:{api}", "qos",
                f"APIs on the same topic of endpoint {self.name} must agree on qos, retain and "
                f"publish-topic, and [api:{other}] differs (topic {topic!r})")
        self._apiOptions[topic] = options
        self._apiOwners.setdefault(topic, api)

    def apiOptions(self, topic: str) -> MqttApiOptions:
        """
        The MQTT options of the API(s) on C{topic}.
        """
        return self._apiOptions.get(topic, DEFAULT_API_OPTIONS)

    # -- service

    def startService(self) -> None:
        """
        Start paho's thread, which connects (and reconnects) in the
        background: the reactor never waits for DNS, TCP or TLS.
        """
        super().startService()

        options = self.options
        client = self._client = self._clientFactory(self.clientId)
        client.suppress_exceptions = True
        client.on_connect = self._pahoConnect
        client.on_connect_fail = self._pahoConnectFail
        client.on_disconnect = self._pahoDisconnect
        client.on_subscribe = self._pahoSubscribe
        client.on_unsubscribe = self._pahoUnsubscribe
        client.on_publish = self._pahoPublish
        client.on_message = self._pahoMessage
        if options.get("username") is not None:
            client.username_pw_set(options["username"], options.get("password"))
        if options.get("tls"):
            client.tls_set_context(tlsContext(options))
            if not options.get("tls-verify", True):
                client.tls_insecure_set(True)
        client.connect_timeout = options.get("connect-timeout", 5.0)
        client.reconnect_delay_set(options.get("reconnect-min", 1.0), options.get("reconnect-max", 30.0))
        client.max_inflight_messages_set(options.get("max-inflight", 20))
        properties = Properties(PacketTypes.CONNECT)
        expiry = options.get("session-expiry", 120)
        if expiry:
            properties.SessionExpiryInterval = expiry
        # A clean session only on the first connect: later connects resume
        # the session, so QoS 1/2 messages the broker queued while the
        # connection was down are delivered (see docs/endpoints/mqtt5.md).
        client.connect_async(options.get("host", "127.0.0.1"), options.get("port", 1883),
                             keepalive=options.get("keepalive", 30), clean_start=MQTT_CLEAN_START_FIRST_ONLY,
                             properties=properties)
        client.loop_start()
        self.log.info("MQTT endpoint {name}: connecting to {where} as {clientId}",
                      name=self.name, where=self.where, clientId=self.clientId)

    def stopService(self) -> Deferred:
        """
        Disconnect (ending the broker session, so it stops queueing for us)
        and join paho's thread on a thread of its own.
        """
        super().stopService()
        self._stopping = True
        for mid in list(self._publishes):
            entry = self._publishes.pop(mid)
            entry.timer.cancel()
            entry.deferred.errback(EndpointUnavailable("the gateway is stopping"))
        client, self._client = self._client, None
        if client is None:
            return succeed(None)

        properties = Properties(PacketTypes.DISCONNECT)
        properties.SessionExpiryInterval = 0
        try:
            client.disconnect(properties=properties)
        except Exception:
            self.log.failure("MQTT endpoint {name}: disconnecting", name=self.name)
        reactor = self.reactor
        stopped = deferToOwnThread(reactor, client.loop_stop, f"evgate-mqtt-stop-{self.name}", self._startThread)
        # paho's thread may be in a blocking connect; do not hold shutdown
        # for longer than that can take.
        limit = self.options.get("connect-timeout", 5.0) + 2.0
        stopped.addTimeout(limit, reactor, onTimeoutCancel=lambda result, timeout: None)
        stopped.addErrback(lambda failure: self.log.failure("MQTT endpoint {name}: stopping paho's thread",
                                                            failure, name=self.name))
        stopped.addCallback(self._stopped)
        return stopped

    def _stopped(self, result: Any) -> None:
        self.connected = False
        self.log.info("MQTT endpoint {name}: disconnected", name=self.name)

    # -- publishing

    def publish(self, topic: str, draft: Draft, timeout: float) -> Deferred:
        """
        Publish C{draft} to the concrete topic for the API on C{topic}; the
        Deferred fires after PUBACK (QoS 1), PUBCOMP (QoS 2) or, for QoS 0,
        once the message was written to the connection.
        """
        settings = self.apiOptions(topic)
        try:
            target = settings.target(topic, draft.key)
            properties = publishProperties(draft)
        except BadRequest as e:
            return fail(e)
        client = self._client
        if client is None or not self.connected:
            detail = f"the MQTT broker at {self.where} is not connected"
            if self.lastError:
                detail += f" ({self.lastError})"
            return fail(EndpointUnavailable(detail + "; the message was not sent"))
        if self._maxPacket is not None and len(draft.content) + len(target.encode("utf-8")) + 64 > self._maxPacket:
            return fail(PayloadTooLarge(f"the MQTT broker accepts packets up to {self._maxPacket} bytes"))

        try:
            info = client.publish(target, draft.content, qos=settings.qos, retain=settings.retain,
                                  properties=properties)
        except ValueError as e:
            return fail(BadRequest(f"the MQTT client refused the message: {e}"))
        if info.rc == MQTT_ERR_NO_CONN and settings.qos > 0:
            # paho keeps QoS 1/2 messages and sends them once it reconnects:
            # wait for that acknowledgement like any other.
            pass
        elif info.rc != MQTT_ERR_SUCCESS:
            return fail(EndpointUnavailable(f"the MQTT client did not send the message: {error_string(info.rc)}"))
        mid = info.mid

        def cancel(d: Deferred) -> None:
            entry = self._publishes.pop(mid, None)
            if entry is not None and entry.timer is not None and entry.timer.active():
                entry.timer.cancel()

        d: Deferred = Deferred(cancel)
        timer = None
        if timeout and timeout > 0:
            timer = self.reactor.callLater(timeout, self._publishTimedOut, mid, timeout)
        self._publishes[mid] = _Publish(d, target, timer)
        return d

    def publishMany(self, topic: str, drafts: Sequence[Draft], timeout: float) -> Deferred:
        """
        One L{publish} per draft, all in flight at once: MQTT has no batch
        on the wire, and paho pipelines the packets anyway.
        """
        return publishEach(self, topic, drafts, timeout)

    def _publishTimedOut(self, mid: int, timeout: float) -> None:
        entry = self._publishes.pop(mid, None)
        if entry is not None:
            entry.deferred.errback(EndpointTimeout(
                f"the MQTT broker did not acknowledge within {timeout:g} s; "
                "the message may or may not have been delivered"))

    # -- subscribing

    def subscribe(self, topic: str, start: Start, sink: IUpstreamSink,
                  group: Optional[str] = None) -> MqttSubscription:
        """
        Read the topic filter C{topic} into C{sink}.

        Every start is the live head: C{"latest"} and C{"earliest"} alike (an
        MQTT broker keeps no history beyond retained messages, which a new
        MQTT subscription receives).  A L{Cursor} resumes without a gap only
        when it is exactly the head of this run's numbering; otherwise
        C{sink.gap} says that the messages after it cannot be replayed.

        @param group: a share group: the broker hands each message to one
            subscriber of the group, across every gateway node
            (C{$share/<group>/<topic>}).
        """
        problem = filterProblem(topic)
        if problem is not None:
            raise ValueError(f"topic {topic!r} {problem}")
        if group is not None and (not group or any(c in group for c in "/+#\x00")):
            raise ValueError(f"share group {group!r} must be non-empty, without / + # or NUL")
        if self.refusal is not None:
            # A feed of its own that the connector does not keep, failed on
            # the next turn: the caller gets its subscription first.
            refused = _Feed(self, group, topic, self.apiOptions(topic).qos, 0, 0)
            reader = MqttSubscription(refused, sink, start, 0)
            refused.readers.append(reader)
            self.reactor.callLater(0, refused.fail, Failure(self.refused("cannot read")))
            return reader
        feed = self._feeds.get((group, topic))
        if feed is None:
            feed = self._newFeed(group, topic)
        reader = MqttSubscription(feed, sink, start, self.options.get("paused-backlog", 10000))
        feed.readers.append(reader)
        if feed.state == "active":
            # Started on a later turn, like every connector: the caller gets
            # its subscription object before the first callback.
            self.reactor.callLater(0, reader.begin)
        return reader

    def startGap(self, start: Start, head: Cursor) -> Optional[str]:
        """
        Why a reader that asked for C{start} and starts at C{head} misses
        messages, or L{None} if it does not.
        """
        if not isinstance(start, Cursor):
            return None
        if start.epoch != self._epoch:
            return ("the cursor is from another run of the gateway, and MQTT brokers keep no log to "
                    "replay: reading resumes with the live messages")
        wanted = start.get(0)
        if wanted is not None and len(start.offsets) == 1 and wanted == head.get(0):
            return None
        return ("the messages after the cursor are no longer in the gateway's replay window, and MQTT "
                "brokers keep no log to replay: reading resumes with the live messages")

    def _newFeed(self, group: Optional[str], topic: str) -> _Feed:
        key = (group, topic)
        previous = self._sequences.pop(key, None)
        # A filter subscribed again skips an offset: see the module docstring.
        nextOffset = 0 if previous is None else previous + 1
        self._nextSubscriptionId = self._nextSubscriptionId % _SUBSCRIPTION_ID_MAX + 1
        feed = _Feed(self, group, topic, self.apiOptions(topic).qos, self._nextSubscriptionId, nextOffset)
        self._feeds[key] = feed
        self._feedsById[feed.subscriptionId] = feed
        if self.connected:
            self._sendSubscribe(feed)
        return feed

    def _sendSubscribe(self, feed: _Feed) -> None:

        properties = None
        if self._idsAvailable:
            properties = Properties(PacketTypes.SUBSCRIBE)
            properties.SubscriptionIdentifier = feed.subscriptionId
        # Retained messages only for a new subscription: a refreshed one
        # must not replay them again.
        options = SubscribeOptions(qos=feed.qos, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
        assert self._client is not None
        rc, mid = self._client.subscribe(feed.mqttFilter, options=options, properties=properties)
        if rc == MQTT_ERR_SUCCESS and mid is not None:
            self._subscribing[mid] = feed
        # Otherwise the connection is going down; the next connect
        # subscribes again.

    def feedIdle(self, feed: _Feed) -> None:
        """
        The last reader of C{feed} left: end its MQTT subscription.
        """
        if self._feeds.get(feed.key) is not feed:
            return
        del self._feeds[feed.key]
        self._feedsById.pop(feed.subscriptionId, None)
        self._sequences[feed.key] = feed.nextOffset
        if feed.state == "failed" or self._client is None:
            return
        if self.connected:
            self._client.unsubscribe(feed.mqttFilter)
        else:
            # A resumed session would still hold it.
            self._stale.add(feed.mqttFilter)
