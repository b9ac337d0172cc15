"""
The MQTT endpoint: one MQTT 5 connection shared by every API on it.
"""

from __future__ import annotations

import random
import string
import traceback
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

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
from evgate.connectors.mqtt._feeds import MqttSubscription, _Feed, _Publish
from evgate.connectors.mqtt._options import (
    _SUBSCRIPTION_ID_MAX,
    DEFAULT_API_OPTIONS,
    NO_OFFSET,
    MqttApiOptions,
    Start,
    filterProblem,
    tlsContext,
)
from evgate.connectors.mqtt._paho import (
    _Incoming,
    _incoming,
    _propertyValues,
    connectFailure,
    pahoClient,
    publishProperties,
)
from evgate.errors import BadRequest, EndpointTimeout, EndpointUnavailable, PayloadTooLarge
from evgate.ini import ConfigError
from evgate.interfaces import IConnector, ISharedSubscriptions, IUpstreamSink
from evgate.message import Cursor, Draft, Message, Position
from evgate.threads import ReactorBatches, StartThread, deferToOwnThread, startDaemonThread

# Events handed to the reactor per turn: large enough to amortise a hop,
# small enough that a burst from the broker does not starve other work.
BATCH = 1000

# Seconds before the same connection problem is logged again (with how
# often it happened meanwhile): paho retries with back-off, forever.
PROBLEM_RELOG = 600.0

# CONNACK reason codes that mean the credentials were refused.
_AUTH_REFUSED = {0x86: "Bad user name or password", 0x87: "Not authorized", 0x8C: "Bad authentication method"}

@implementer(IConnector, ISharedSubscriptions)
class MqttConnector(Service):
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

    # -- paho's thread: plain values into the inbox, nothing else

    def _pahoConnect(self, client: Any, userdata: Any, flags: Any, reasonCode: Any, properties: Any) -> None:
        try:
            props = _propertyValues(properties, ("SubscriptionIdentifierAvailable", "MaximumPacketSize",
                                                 "ReceiveMaximum", "SharedSubscriptionAvailable"))
            self._inbox.put(("connect", bool(flags.session_present), int(reasonCode.value), str(reasonCode),
                             props))
        except Exception:
            self._inbox.put(("error", "handling CONNACK", traceback.format_exc()))

    def _pahoConnectFail(self, client: Any, userdata: Any) -> None:
        # On paho's thread, right after the attempt failed: read why now.
        self._inbox.put(("connectFail",) + connectFailure(getattr(client, "lastConnectError", None)))

    def _pahoDisconnect(self, client: Any, userdata: Any, flags: Any, reasonCode: Any, properties: Any) -> None:
        try:
            self._inbox.put(("disconnect", int(reasonCode.value), str(reasonCode),
                             bool(getattr(flags, "is_disconnect_packet_from_server", False))))
        except Exception:
            self._inbox.put(("error", "handling a disconnect", traceback.format_exc()))

    def _pahoSubscribe(self, client: Any, userdata: Any, mid: int, reasonCodes: Any, properties: Any) -> None:
        try:
            self._inbox.put(("subscribed", mid, [(int(rc.value), str(rc)) for rc in reasonCodes]))
        except Exception:
            self._inbox.put(("error", "handling SUBACK", traceback.format_exc()))

    def _pahoUnsubscribe(self, client: Any, userdata: Any, mid: int, reasonCodes: Any, properties: Any) -> None:
        pass

    def _pahoPublish(self, client: Any, userdata: Any, mid: int, reasonCode: Any, properties: Any) -> None:
        try:
            self._inbox.put(("published", mid, int(reasonCode.value), str(reasonCode)))
        except Exception:
            self._inbox.put(("error", "handling PUBACK", traceback.format_exc()))

    def _pahoMessage(self, client: Any, userdata: Any, message: Any) -> None:
        try:
            self._inbox.put(("message", _incoming(message)))
        except Exception:
            self._inbox.put(("error", "reading a message (dropped)", traceback.format_exc()))

    # -- the reactor thread

    def _handleEvents(self, events: List[Tuple[Any, ...]]) -> None:
        # Messages are numbered and handed over in batches per feed; any
        # other event first flushes what came before it, to keep the order.
        batches: Dict[_Feed, List[Message]] = {}
        for event in events:
            kind = event[0]
            if kind == "message":
                self._route(event[1], batches)
                continue
            self._flush(batches)
            try:
                getattr(self, "_on_" + kind)(*event[1:])
            except Exception:
                self.log.failure("MQTT endpoint {name}: handling {kind}", name=self.name, kind=kind)
        self._flush(batches)

    def _flush(self, batches: Dict[_Feed, List[Message]]) -> None:
        for feed, messages in batches.items():
            feed.dispatch(messages)
        batches.clear()

    def _route(self, incoming: _Incoming, batches: Dict[_Feed, List[Message]]) -> None:
        if incoming.subscriptionIds:
            feeds = [self._feedsById[i] for i in incoming.subscriptionIds if i in self._feedsById]
        else:
            feeds = [f for f in self._feeds.values() if f.matches(incoming.topic)]
        for feed in feeds:
            batches.setdefault(feed, []).append(feed.number(incoming))

    def _on_connect(self, sessionPresent: bool, code: int, reason: str, props: Dict[str, Any]) -> None:
        if code >= 0x80:
            self.connected = False
            if code in _AUTH_REFUSED:
                self.lastError = (f"authentication failed: the broker refused the connection: {reason} "
                                  "(check username and password-file)")
                self._logProblem(self.lastError, "error")
                self._refusedBy(self.lastError)
            else:
                self.lastError = f"the broker refused the connection: {reason}"
                self._logProblem(self.lastError)
            return
        if self._stopping:
            return
        resumed = self._everConnected
        self.connected = True
        self._everConnected = True
        self.lastError = None
        self.refusal = None
        self._failedAttempts = 0
        self._problemLogged = (None, 0.0, 0)
        self._idsAvailable = props.get("SubscriptionIdentifierAvailable", 1) == 1
        self._maxPacket = props.get("MaximumPacketSize")
        self.log.info("MQTT endpoint {name}: connected to {where} as {clientId} (session resumed: {resumed})",
                      name=self.name, where=self.where, clientId=self.clientId, resumed=sessionPresent)
        if not self._idsAvailable:
            self.log.warn("MQTT endpoint {name}: the broker has no subscription identifiers; overlapping "
                          "topic filters may see duplicates", name=self.name)
        assert self._client is not None
        if sessionPresent:
            for mqttFilter in sorted(self._stale):
                self._client.unsubscribe(mqttFilter)
        self._stale.clear()
        for feed in list(self._feeds.values()):
            if feed.state == "active" and resumed:
                if not sessionPresent:
                    feed.breakContinuity(
                        "the connection to the MQTT broker was lost and the broker did not keep the "
                        "session: messages published meanwhile may be missing")
                elif feed.grantedQos == 0:
                    feed.breakContinuity(
                        "the connection to the MQTT broker was lost, and QoS 0 messages published "
                        "meanwhile are not kept by the broker")
                if sessionPresent:
                    # The broker kept the subscription, and delivers what it
                    # queued for it.
                    continue
                feed.state = "waiting"
            if feed.state == "waiting":
                self._sendSubscribe(feed)

    def _on_connectFail(self, why: str = "the connection failed", refused: bool = False) -> None:
        self._failedAttempts += 1
        self.connected = False
        self.lastError = why if refused else f"cannot reach {self.where}: {why}"
        if self._stopping:
            return
        self._logProblem(self.lastError, "error" if refused else "warn")
        if refused:
            self._refusedBy(self.lastError)

    def refused(self, what: str) -> EndpointUnavailable:
        """
        The 503 of a call while the broker refuses the gateway.
        """
        return EndpointUnavailable(f"MQTT endpoint {self.name}: the broker at {self.where} refuses the gateway: "
                                   f"{self.refusal}; {what}")

    def _refusedBy(self, reason: str) -> None:
        # The broker refuses the gateway (credentials, TLS): paho retries,
        # but only a change on one side lets it in.  Until then every
        # subscription fails with a 503, as publishes do: readers attached
        # now end (their clients retry and are answered 503 at once)
        # rather than wait on a stream that cannot start.
        self.refusal = reason
        feeds = list(self._feeds.values())
        self._feeds.clear()
        self._feedsById.clear()
        self._subscribing.clear()
        problem = Failure(self.refused("cannot read"))
        for feed in feeds:
            self._sequences[feed.key] = feed.nextOffset
            if feed.state == "active":
                # A session the broker kept would still hold it.
                self._stale.add(feed.mqttFilter)
            feed.fail(problem)

    def _on_disconnect(self, code: int, reason: str, fromServer: bool) -> None:
        wasConnected = self.connected
        self.connected = False
        # SUBSCRIBEs on their way are lost with the connection; their feeds
        # are still waiting and the next connect sends them again.
        self._subscribing.clear()
        if self._stopping:
            return
        if not wasConnected and self.lastError is not None:
            # The broker closes the connection after refusing it (a bad
            # password): the refusal is the reason, not the close.
            return
        self.lastError = f"connection lost: {reason}"
        if wasConnected:
            self.log.warn("MQTT endpoint {name}: lost the connection to {where} ({reason}); reconnecting",
                          name=self.name, where=self.where, reason=reason)

    def _on_subscribed(self, mid: int, codes: List[Tuple[int, str]]) -> None:
        feed = self._subscribing.pop(mid, None)
        if feed is None:
            return
        code, reason = codes[0] if codes else (0x80, "no reason code")
        if self._feeds.get(feed.key) is not feed:
            # Its last reader left while the SUBSCRIBE was on its way.
            if code < 0x80 and self.connected and self._client is not None:
                self._client.unsubscribe(feed.mqttFilter)
            return
        if code >= 0x80:
            del self._feeds[feed.key]
            self._feedsById.pop(feed.subscriptionId, None)
            self._sequences[feed.key] = feed.nextOffset
            self.log.warn("MQTT endpoint {name}: the broker refused the subscription to {filter}: {reason}",
                          name=self.name, filter=feed.mqttFilter, reason=reason)
            feed.fail(Failure(EndpointUnavailable(
                f"the MQTT broker refused the subscription to {feed.mqttFilter!r}: {reason}")))
            return
        if feed.state == "waiting":
            feed.activate(code)
        else:
            feed.grantedQos = code

    def _on_published(self, mid: int, code: int, reason: str) -> None:
        entry = self._publishes.pop(mid, None)
        if entry is None:
            return
        if entry.timer is not None and entry.timer.active():
            entry.timer.cancel()
        if code >= 0x80:
            entry.deferred.errback(EndpointUnavailable(
                f"the MQTT broker refused the message to {entry.topic!r}: {reason}"))
        else:
            entry.deferred.callback(Position(entry.topic, 0, NO_OFFSET))

    def _on_error(self, context: str, text: str) -> None:
        self.log.error("MQTT endpoint {name}: error {context} on paho's thread:\n{traceback}",
                       name=self.name, context=context, traceback=text)
