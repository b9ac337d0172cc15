"""
What the MQTT broker tells the connector (L{MqttConnector}'s other half):
paho's callbacks, which run on paho's thread and only put plain values in
the inbox, and their handling on the reactor (connections, refusals,
subscription and publish acknowledgements, messages routed to feeds).
"""

from __future__ import annotations

import traceback
from typing import Any, Dict, List, Optional, Set, Tuple

from twisted.logger import Logger
from twisted.python.failure import Failure

from evgate.connectors.mqtt._constants import _AUTH_REFUSED
from evgate.connectors.mqtt._feeds import _Feed, _Publish
from evgate.connectors.mqtt._options import NO_OFFSET
from evgate.connectors.mqtt._paho import _Incoming, _incoming, _propertyValues, connectFailure
from evgate.errors import EndpointUnavailable
from evgate.message import Message, Position
from evgate.threads import ReactorBatches


class BrokerEvents:
    """
    The broker-facing half of L{evgate.connectors.mqtt.MqttConnector}, a
    mixin: what it needs of the connector is declared here, and the
    connector sets it up.
    """

    log: Logger
    name: Optional[str]  # Service declares it so; the connector sets it
    clientId: str
    connected: bool
    refusal: Optional[str]
    lastError: Optional[str]
    _client: Any
    _inbox: ReactorBatches[Tuple[Any, ...]]
    _feeds: Dict[Tuple[Optional[str], str], _Feed]
    _feedsById: Dict[int, _Feed]
    _sequences: Dict[Tuple[Optional[str], str], int]
    _subscribing: Dict[int, _Feed]
    _stale: Set[str]
    _publishes: Dict[int, _Publish]
    _everConnected: bool
    _stopping: bool
    _failedAttempts: int
    _problemLogged: Tuple[Optional[str], float, int]
    _idsAvailable: bool
    _maxPacket: Optional[int]

    @property
    def where(self) -> str:
        raise NotImplementedError

    def _logProblem(self, problem: str, level: str = "warn") -> None:
        raise NotImplementedError

    def _sendSubscribe(self, feed: _Feed) -> None:
        raise NotImplementedError

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
