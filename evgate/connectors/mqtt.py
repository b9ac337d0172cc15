"""
The MQTT 5 endpoint (C{type = mqtt5}) on paho-mqtt.

Threads
=======

paho's client runs its network loop on a thread of its own
(C{loop_start()}), which also does the blocking parts: DNS, the TCP connect,
the TLS handshake and the reconnect back-off.  Every paho callback does one
thing only: it turns what paho hands it into plain values and appends them
to an L{_Inbox}, which hops to the reactor with C{callFromThread} once per
batch.  The reactor thread then does everything else in the order the
events happened (connects, acknowledgements, messages): numbering, logging,
firing Deferreds.  The reactor thread calls paho only through its
thread-safe entry points (C{publish}, C{subscribe}, C{unsubscribe},
C{disconnect}), which queue a packet and wake the loop; nothing is ever
published from paho's thread.

Numbering: one MQTT subscription per topic filter
=================================================

MQTT keeps no log: a message exists for a subscriber only at the moment the
broker hands it over.  To give cursors a meaning, the connector numbers the
messages it receives.  It holds I{one} MQTT subscription per (share group,
topic filter) -- a L{_Feed} -- shared by every upstream subscription of that
filter (the hub's shared stream and any private stream), and numbers each
message once, on the reactor thread, as it arrives on that feed: partition
0, offsets 0, 1, 2 ...  Every reader of a filter therefore sees a message
under the same offset, so a cursor minted by the hub's shared stream means
the same thing to a private stream.  (One MQTT subscription per reader
with a shared counter could not do that: each reader would get its own copy
of a message at its own moment, and there is no way to tell which copies
are the same message.)

The numbers are only meaningful within one run of the connector, which is
why every cursor carries the connector's I{epoch}, random per start.  A
feed's counter survives the feed (the last reader leaving unsubscribes) and
jumps by one whenever continuity is broken -- a new MQTT subscription for a
filter that had one before, a reconnect whose session the broker did not
keep, a reconnect of a QoS 0 subscription -- so that a cursor taken before
the break can never look as if it missed nothing: the hub finds it outside
its window and the client is told about the gap.

A cursor from outside the hub's window (or from another epoch) cannot be
replayed: L{MqttConnector.subscribe} starts such a reader at the live head
and reports the gap with C{sink.gap}, never silently.

See docs/endpoints/mqtt5.md for what this promises to clients.
"""

from __future__ import annotations

import base64
import os
import random
import ssl
import string
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from evgate.config import ApiContext, ConfigError, SectionReader, apiOptionParser
from evgate.errors import BadRequest, EndpointTimeout, EndpointUnavailable, PayloadTooLarge
from evgate.interfaces import IConnector, ISharedSubscriptions, IUpstreamSink, IUpstreamSubscription
from evgate.message import Cursor, Draft, Message, Position

# Events handed to the reactor per turn: large enough to amortise a hop,
# small enough that a burst from the broker does not starve other work.
BATCH = 1000

# Offsets MQTT does not have: the acknowledgement of a publish says where the
# message went (its concrete topic) but a broker assigns no position.
NO_OFFSET = -1

_MQTT_MAX_TOPIC_BYTES = 65535
_PUBLISH_ENTRYPOINTS = ("http-post", "websocket")
_SUBSCRIPTION_ID_MAX = 268435455

Start = Union[str, Cursor]


# ---------------------------------------------------------------- topics


def hasWildcards(topic: str) -> bool:
    """
    Whether C{topic} is a filter with C{+} or C{#} rather than one concrete
    topic.
    """
    return "+" in topic or "#" in topic


def filterProblem(topic: str) -> Optional[str]:
    """
    What is wrong with the topic filter C{topic}, or L{None} when it is a
    valid MQTT 5 filter for a gateway API.
    """
    if not topic:
        return "must not be empty"
    if "\x00" in topic:
        return "must not contain NUL"
    if len(topic.encode("utf-8")) > _MQTT_MAX_TOPIC_BYTES:
        return f"is longer than {_MQTT_MAX_TOPIC_BYTES} bytes"
    if topic.startswith("$share/"):
        return "must not name a shared subscription ($share/...); the gateway adds share groups itself"
    levels = topic.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return "may use # only as the whole last level (a/#)"
        if "+" in level and level != "+":
            return "may use + only as a whole level (a/+/c)"
    return None


def _matches(topicFilter: str, topic: str) -> bool:
    # MQTT 5 section 4.7: + matches one level, # the rest (and its parent);
    # filters starting with a wildcard do not match $-topics.
    if topic.startswith("$") and topicFilter[:1] in ("+", "#"):
        return False
    want = topicFilter.split("/")
    have = topic.split("/")
    for index, level in enumerate(want):
        if level == "#":
            return True
        if index >= len(have):
            return False
        if level != "+" and level != have[index]:
            return False
    return len(want) == len(have)


class TopicTemplate:
    """
    The C{publish-topic} of an API: a concrete topic, or one with a
    C{{key}} placeholder that the message key fills in (C{{{}} and C{}}}
    stand for literal braces).
    """

    def __init__(self, text: str) -> None:
        fields: List[str] = []
        try:
            for _, field, spec, conversion in string.Formatter().parse(text):
                if field is not None:
                    if field != "key" or spec or conversion:
                        raise ValueError(f"unknown placeholder {{{field}}}: only {{key}} is supported")
                    fields.append(field)
            literal = text.format(key="k")
        except ValueError as e:
            raise ValueError(str(e)) from None
        if hasWildcards(literal):
            raise ValueError("must be a concrete topic: + and # are filter wildcards")
        if "\x00" in literal or not literal:
            raise ValueError("must be a non-empty topic without NUL")
        self.text = text
        self.usesKey = bool(fields)
        self._static = literal

    def render(self, key: Optional[str]) -> str:
        """
        The concrete topic for a message with the key C{key}.

        @raise BadRequest: when the key is missing, not wanted, or would
            change the topic's levels.
        """
        if not self.usesKey:
            if key is not None:
                raise BadRequest(
                    f"MQTT messages carry no key, and this API's publish topic {self.text!r} does not "
                    "use {key}: send the message without a key")
            return self._static
        if key is None or key == "":
            raise BadRequest(f"this API publishes to {self.text!r}: the message key picks the topic, send one")
        for bad, what in (("/", "a topic level separator (/)"), ("+", "a wildcard (+)"),
                          ("#", "a wildcard (#)"), ("\x00", "NUL")):
            if bad in key:
                raise BadRequest(f"the message key fills one level of the topic {self.text!r} "
                                 f"and must not contain {what}")
        topic = self.text.format(key=key)
        if len(topic.encode("utf-8")) > _MQTT_MAX_TOPIC_BYTES:
            raise BadRequest(f"the topic for this key is longer than {_MQTT_MAX_TOPIC_BYTES} bytes")
        return topic

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TopicTemplate) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"TopicTemplate({self.text!r})"


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class MqttApiOptions:
    """
    The MQTT keys of one C{[api:NAME]} section, in C{ApiConfig.options["mqtt"]}.

    @ivar qos: the QoS of publishes and of the subscription (0, 1 or 2).
    @ivar retain: whether published messages are retained by the broker.
    @ivar publishTopic: where publishes go; L{None} means the API's topic.
    """

    qos: int = 1
    retain: bool = False
    publishTopic: Optional[TopicTemplate] = None

    def target(self, topic: str, key: Optional[str]) -> str:
        """
        The concrete topic a message with C{key} is published to on an API
        whose topic is C{topic}.

        @raise BadRequest: when no concrete topic follows.
        """
        if self.publishTopic is not None:
            return self.publishTopic.render(key)
        if hasWildcards(topic):
            raise BadRequest(f"this API's topic {topic!r} is a filter; publishing needs publish-topic "
                             "(a concrete topic or a template with {key})")
        if key is not None:
            raise BadRequest("MQTT messages carry no key: send the message without one, or give the API "
                             "a publish-topic template with {key}")
        return topic


DEFAULT_API_OPTIONS = MqttApiOptions()


def parseOptions(section: SectionReader) -> Mapping[str, Any]:
    """
    The options of an C{[endpoint:NAME]} section of C{type = mqtt5}.
    Every key is documented in docs/endpoints/mqtt5.md.
    """
    tls = section.getBool("tls", False)
    options: Dict[str, Any] = {
        "host": section.get("host", "127.0.0.1"),
        "port": section.getInt("port", 8883 if tls else 1883, minimum=1, maximum=65535),
        "username": section.get("username", None),
        "tls": tls,
        "client-id-prefix": section.get("client-id-prefix", "evgate-"),
        "keepalive": section.getInt("keepalive", 30, minimum=5, maximum=65535),
        "session-expiry": section.getInt("session-expiry", 120, minimum=0, maximum=4294967295),
        "connect-timeout": section.getFloat("connect-timeout", 5.0, minimum=0.1),
        "reconnect-min": section.getFloat("reconnect-min", 1.0, minimum=0.05),
        "reconnect-max": section.getFloat("reconnect-max", 30.0, minimum=0.05),
        "max-inflight": section.getInt("max-inflight", 20, minimum=1, maximum=65535),
        "paused-backlog": section.getInt("paused-backlog", 10000, minimum=1, maximum=10_000_000),
    }
    if not options["host"]:
        raise section.error("host", "must not be empty")
    if options["reconnect-max"] < options["reconnect-min"]:
        raise section.error("reconnect-max", "must be at least reconnect-min")
    prefix = options["client-id-prefix"]
    if len(prefix) > 40 or "/" in prefix or "+" in prefix or "#" in prefix:
        raise section.error("client-id-prefix", "use at most 40 characters, without / + #")
    password = section.get("password", None)
    passwordFile = section.get("password-file", None)
    if password is not None and passwordFile is not None:
        raise section.error("password-file", "set password or password-file, not both")
    if passwordFile is not None:
        try:
            with open(passwordFile, encoding="utf-8") as f:
                password = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise section.error("password-file", f"cannot read {passwordFile!r}: {e}") from None
    if password is not None and options["username"] is None:
        raise section.error("password", "a password needs a username")
    options["password"] = password
    for key in ("tls-ca", "tls-cert", "tls-key"):
        value = section.get(key, None)
        if value is not None and not tls:
            raise section.error(key, "needs tls = true")
        if value is not None and not os.path.isfile(value):
            raise section.error(key, f"{value!r} is not a readable file")
        options[key] = value
    verify = section.getBool("tls-verify", True)
    if section.has("tls-verify") and not tls:
        raise section.error("tls-verify", "needs tls = true")
    options["tls-verify"] = verify
    if options["tls-key"] is not None and options["tls-cert"] is None:
        raise section.error("tls-key", "a client key needs tls-cert")
    if tls:
        try:
            tlsContext(options)
        except (OSError, ssl.SSLError, ValueError) as e:
            raise section.error("tls", f"cannot set up TLS: {e}") from None
    return options


def tlsContext(options: Mapping[str, Any]) -> ssl.SSLContext:
    """
    The TLS client context of an endpoint's C{tls-*} options.
    """
    context = ssl.create_default_context(cafile=options.get("tls-ca"))
    if options.get("tls-cert"):
        context.load_cert_chain(options["tls-cert"], options.get("tls-key"))
    if not options.get("tls-verify", True):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


@apiOptionParser
def parseApiOptions(section: SectionReader, context: ApiContext) -> Mapping[str, Any]:
    """
    The MQTT keys of an API on an C{mqtt5} endpoint: C{qos}, C{retain},
    C{publish-topic}.  APIs on other endpoints do not read them, so they are
    refused there as unknown keys.
    """
    if context.endpoint.type != "mqtt5":
        return {}
    topic = section.get("topic")
    problem = filterProblem(topic)
    if problem is not None:
        raise section.error("topic", f"{topic!r} {problem}")
    qos = section.getInt("qos", 1, minimum=0, maximum=2)
    retain = section.getBool("retain", False)
    template = None
    raw = section.get("publish-topic", None)
    if raw is not None:
        try:
            template = TopicTemplate(raw)
        except ValueError as e:
            raise section.error("publish-topic", f"{raw!r}: {e}") from None
    publishers = [ep for ep in context.entrypoints if ep in _PUBLISH_ENTRYPOINTS]
    if template is None and hasWildcards(topic) and publishers:
        raise section.error(
            "publish-topic",
            f"the topic {topic!r} is a filter, so {' and '.join(publishers)} need a concrete "
            "publish-topic or a template such as a/{key}/b")
    return {"mqtt": MqttApiOptions(qos=qos, retain=retain, publishTopic=template)}


# ---------------------------------------------------------------- the thread bridge


class _Inbox:
    """
    Events from paho's thread to the reactor thread, in order.

    C{put} is the only method called from paho's thread: it appends under a
    lock and, for the first event of a batch, schedules one C{drain} with
    C{callFromThread}.  C{drain} runs on the reactor thread.
    """

    def __init__(self, reactor: Any, handle: Callable[[List[Tuple[Any, ...]]], None]) -> None:
        self._reactor = reactor
        self._handle = handle
        self._lock = threading.Lock()
        self._events: List[Tuple[Any, ...]] = []
        self._scheduled = False

    def put(self, event: Tuple[Any, ...]) -> None:
        """
        Queue C{event} (called on paho's thread).
        """
        with self._lock:
            self._events.append(event)
            if self._scheduled:
                return
            self._scheduled = True
        self._reactor.callFromThread(self.drain)

    def drain(self) -> None:
        """
        Handle up to L{BATCH} queued events (on the reactor thread); the rest
        wait for a later turn.
        """
        with self._lock:
            events = self._events[:BATCH]
            del self._events[:BATCH]
            more = bool(self._events)
            if not more:
                self._scheduled = False
        try:
            self._handle(events)
        finally:
            if more:
                self._reactor.callLater(0, self.drain)


@dataclass(frozen=True)
class _Incoming:
    """
    A PUBLISH received from the broker, as plain values (built on paho's
    thread).
    """

    topic: str
    payload: bytes
    qos: int
    retain: bool
    userProperties: Tuple[Tuple[str, str], ...]
    extra: Tuple[Tuple[str, Any], ...]
    subscriptionIds: Tuple[int, ...]
    timestamp: int


def _incoming(message: Any) -> _Incoming:
    # On paho's thread: plain Python only.
    props = message.properties
    user = tuple((str(k), str(v)) for k, v in (getattr(props, "UserProperty", None) or ()))
    extra: List[Tuple[str, Any]] = [("qos", int(message.qos)), ("retain", bool(message.retain))]
    contentType = getattr(props, "ContentType", None)
    if contentType is not None:
        extra.append(("contentType", contentType))
    expiry = getattr(props, "MessageExpiryInterval", None)
    if expiry is not None:
        extra.append(("messageExpiry", int(expiry)))
    responseTopic = getattr(props, "ResponseTopic", None)
    if responseTopic is not None:
        extra.append(("responseTopic", responseTopic))
    correlation = getattr(props, "CorrelationData", None)
    if correlation is not None:
        extra.append(("correlationData", base64.b64encode(bytes(correlation)).decode("ascii")))
    ids = getattr(props, "SubscriptionIdentifier", None) or ()
    return _Incoming(
        topic=message.topic,
        payload=bytes(message.payload),
        qos=int(message.qos),
        retain=bool(message.retain),
        userProperties=user,
        extra=tuple(extra),
        subscriptionIds=tuple(int(i) for i in ids),
        timestamp=int(time.time() * 1000),
    )


def _propertyValues(props: Any, names: Iterable[str]) -> Dict[str, Any]:
    return {name: getattr(props, name) for name in names if props is not None and hasattr(props, name)}


def pahoClient(clientId: str) -> Any:
    """
    A paho MQTT 5 client with the callback API of paho 2.
    """
    from paho.mqtt.client import CallbackAPIVersion, Client, MQTTv5

    return Client(CallbackAPIVersion.VERSION2, client_id=clientId, protocol=MQTTv5)


def startDaemonThread(function: Callable[[], None], name: str) -> None:
    """
    Run C{function} on a new daemon thread (used to join paho's thread
    without blocking the reactor).
    """
    threading.Thread(target=function, name=name, daemon=True).start()


# ---------------------------------------------------------------- subscriptions


class _Gap:
    """
    A gap waiting in a paused reader's backlog, in order with its messages.
    """

    __slots__ = ("cursor", "reason")

    def __init__(self, cursor: Cursor, reason: str) -> None:
        self.cursor = cursor
        self.reason = reason


@implementer(IUpstreamSubscription)
class MqttSubscription:
    """
    One reader of a L{_Feed}.

    MQTT cannot pause one reader's share of a subscription at the broker,
    so a paused reader keeps what arrives in a backlog bounded by the
    endpoint's C{paused-backlog}; when that overflows, the oldest messages go
    and the reader is told with a gap when it resumes.
    """

    def __init__(self, feed: "_Feed", sink: IUpstreamSink, start: Start, backlogLimit: int) -> None:
        self.feed = feed
        self.sink = sink
        self.start = start
        self.backlogLimit = backlogLimit
        self.started = False
        self.paused = False
        self.closed = False
        self._backlog: Deque[Union[Message, _Gap]] = deque()
        self._dropped = 0
        self._droppedReason: Optional[str] = None
        self._flushCall: Any = None

    def begin(self) -> None:
        """
        Tell the sink where it starts (the live head), and about the gap
        when it asked for more than that.
        """
        if self.closed or self.started:
            return
        head = self.feed.head()
        reason = self.feed.connector.startGap(self.start, head)
        self.started = True
        self.sink.started(head)
        if reason is not None and not self.closed:
            self.sink.gap(head, reason)

    def offer(self, messages: List[Message]) -> None:
        """
        New messages of the feed.
        """
        if not self.started or self.closed:
            return
        if self.paused or self._backlog or self._dropped:
            self._backlog.extend(messages)
            self._trim()
            return
        self.sink.deliver(messages)

    def gap(self, cursor: Cursor, reason: str) -> None:
        """
        Continuity of the feed broke; reading goes on at C{cursor}.
        """
        if not self.started or self.closed:
            return
        if self.paused or self._backlog or self._dropped:
            self._backlog.append(_Gap(cursor, reason))
            self._trim()
            return
        self.sink.gap(cursor, reason)

    def fail(self, reason: Failure) -> None:
        """
        The feed ended for good.
        """
        if self.closed:
            return
        self.closed = True
        self._cancelFlush()
        self.sink.failed(reason)

    def _trim(self) -> None:
        while len(self._backlog) > self.backlogLimit:
            item = self._backlog.popleft()
            if isinstance(item, _Gap):
                self._droppedReason = item.reason
            else:
                self._dropped += 1

    def pause(self) -> None:
        self.paused = True
        self._cancelFlush()

    def resume(self) -> None:
        if self.paused and not self.closed:
            self.paused = False
            if self._backlog or self._dropped:
                # Not from inside the caller's stack: the sink may be in the
                # middle of handling the resume.
                self._flushCall = self.feed.connector.reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flushCall = None
        if self.paused or self.closed:
            return
        if self._dropped:
            first = next((m for m in self._backlog if isinstance(m, Message)), None)
            offset = first.offset if first is not None else self.feed.nextOffset
            reason = f"{self._dropped} messages were dropped while this reader was paused"
            if self._droppedReason is not None:
                reason += f"; {self._droppedReason}"
            self._dropped = 0
            self._droppedReason = None
            self.sink.gap(Cursor(self.feed.connector.epoch(), ((0, offset),)), reason)
        batch: List[Message] = []
        while self._backlog and not self.paused and not self.closed:
            item = self._backlog.popleft()
            if isinstance(item, _Gap):
                if batch:
                    self.sink.deliver(batch)
                    batch = []
                if not self.paused and not self.closed:
                    self.sink.gap(item.cursor, item.reason)
            else:
                batch.append(item)
        if batch and not self.closed:
            self.sink.deliver(batch)

    def _cancelFlush(self) -> None:
        if self._flushCall is not None and self._flushCall.active():
            self._flushCall.cancel()
        self._flushCall = None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._cancelFlush()
        self._backlog.clear()
        self.feed.remove(self)


class _Feed:
    """
    One MQTT subscription of the connector -- a topic filter, possibly in a
    share group -- its readers and its message counter.

    States: C{waiting} for a connection or a SUBACK, C{active} once the
    broker granted it (readers start then), C{failed} when it refused.
    """

    def __init__(self, connector: "MqttConnector", group: Optional[str], topicFilter: str, qos: int,
                 subscriptionId: int, nextOffset: int) -> None:
        self.connector = connector
        self.group = group
        self.filter = topicFilter
        self.mqttFilter = topicFilter if group is None else f"$share/{group}/{topicFilter}"
        self.qos = qos
        self.grantedQos = qos
        self.subscriptionId = subscriptionId
        self.nextOffset = nextOffset
        self.state = "waiting"
        self.readers: List[MqttSubscription] = []

    @property
    def key(self) -> Tuple[Optional[str], str]:
        """
        What identifies the feed in its connector.
        """
        return (self.group, self.filter)

    def head(self) -> Cursor:
        """
        The cursor of the next message.
        """
        return Cursor(self.connector.epoch(), ((0, self.nextOffset),))

    def matches(self, topic: str) -> bool:
        """
        Whether a message on C{topic} is for this feed (for brokers without
        subscription identifiers).
        """
        return _matches(self.filter, topic)

    def number(self, incoming: _Incoming) -> Message:
        """
        The next message of this feed.
        """
        headers = incoming.userProperties
        extra = dict(incoming.extra)
        contentType = extra.get("contentType")
        if contentType is not None and not any(name.lower() == "content-type" for name, _ in headers):
            # The publish side maps the content-type header to MQTT's
            # content type; the way back restores it.
            headers = headers + (("content-type", contentType),)
        message = Message(
            content=incoming.payload,
            key=None,
            headers=headers,
            topic=incoming.topic,
            partition=0,
            offset=self.nextOffset,
            timestamp=incoming.timestamp,
            extra=extra,
        )
        self.nextOffset += 1
        return message

    def dispatch(self, messages: List[Message]) -> None:
        """
        Hand C{messages} to every reader.
        """
        for reader in list(self.readers):
            try:
                reader.offer(messages)
            except Exception:
                # A broken reader must not cost the others their batch.
                self.connector.log.failure("MQTT endpoint {name}: delivering from {filter}",
                                           name=self.connector.name, filter=self.mqttFilter)

    def breakContinuity(self, reason: str) -> None:
        """
        Messages may have been missed: skip an offset so that no earlier
        cursor looks continuous, and tell the readers.
        """
        self.nextOffset += 1
        head = self.head()
        for reader in list(self.readers):
            reader.gap(head, reason)

    def activate(self, grantedQos: int) -> None:
        """
        The broker granted the subscription: start the readers waiting.
        """
        self.state = "active"
        self.grantedQos = grantedQos
        for reader in list(self.readers):
            reader.begin()

    def fail(self, reason: Failure) -> None:
        """
        The broker refused the subscription: end every reader.
        """
        self.state = "failed"
        readers, self.readers = self.readers, []
        for reader in readers:
            reader.fail(reason)

    def remove(self, reader: MqttSubscription) -> None:
        """
        C{reader} closed; the last one leaving ends the MQTT subscription.
        """
        if reader in self.readers:
            self.readers.remove(reader)
        if not self.readers:
            self.connector.feedIdle(self)


@dataclass
class _Publish:
    """
    A publish waiting for the broker's acknowledgement.
    """

    deferred: Deferred
    topic: str
    timer: Any


# ---------------------------------------------------------------- the connector


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
                 startThread: Callable[[Callable[[], None], str], None] = startDaemonThread,
                 epoch: Optional[int] = None) -> None:
        self.name = name  # type: ignore[assignment]  # Service.name is Optional
        self.options = dict(options)
        self.reactor = reactor
        self.connected = False
        self.lastError: Optional[str] = None
        rng = random.SystemRandom()
        self._epoch = epoch if epoch is not None else rng.randrange(1, 2**31)
        suffix = "".join(rng.choice(string.ascii_lowercase + string.digits) for _ in range(10))
        # Stable for the life of this connector, so that a reconnect resumes
        # the broker's session; new per start, so two nodes never collide.
        self.clientId = self.options.get("client-id-prefix", "evgate-") + suffix
        self._clientFactory = clientFactory
        self._startThread = startThread
        self._client: Any = None
        self._inbox = _Inbox(reactor, self._handleEvents)
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

    # -- IConnector

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
        from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

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
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        properties = Properties(PacketTypes.DISCONNECT)
        properties.SessionExpiryInterval = 0
        try:
            client.disconnect(properties=properties)
        except Exception:
            self.log.failure("MQTT endpoint {name}: disconnecting", name=self.name)
        stopped: Deferred = Deferred()
        reactor = self.reactor

        def fire() -> None:
            if not stopped.called:
                stopped.callback(None)

        def join() -> None:
            try:
                client.loop_stop()
            finally:
                reactor.callFromThread(fire)

        self._startThread(join, f"evgate-mqtt-stop-{self.name}")
        # paho's thread may be in a blocking connect; do not hold shutdown
        # for longer than that can take.
        limit = self.options.get("connect-timeout", 5.0) + 2.0
        stopped.addTimeout(limit, reactor, onTimeoutCancel=lambda result, timeout: None)
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
            properties = self._publishProperties(draft)
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
        from paho.mqtt.client import MQTT_ERR_NO_CONN, MQTT_ERR_SUCCESS, error_string

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
        from evgate.connectors import publishEach

        return publishEach(self, topic, drafts, timeout)

    def _publishProperties(self, draft: Draft) -> Any:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        properties = Properties(PacketTypes.PUBLISH)
        user: List[Tuple[str, str]] = []
        for name, value in draft.headers:
            if name.lower() == "content-type":
                properties.ContentType = value
            else:
                user.append((name, value))
        if user:
            properties.UserProperty = user
        return properties

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
        from paho.mqtt.client import MQTT_ERR_SUCCESS
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties
        from paho.mqtt.subscribeoptions import SubscribeOptions

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
        self._inbox.put(("connectFail",))

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
            self.lastError = f"the broker refused the connection: {reason}"
            self.log.warn("MQTT endpoint {name}: {where} refused the connection: {reason}; retrying",
                          name=self.name, where=self.where, reason=reason)
            return
        if self._stopping:
            return
        resumed = self._everConnected
        self.connected = True
        self._everConnected = True
        self.lastError = None
        self._failedAttempts = 0
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

    def _on_connectFail(self) -> None:
        self._failedAttempts += 1
        self.connected = False
        self.lastError = f"cannot reach {self.where}"
        if self._stopping:
            return
        self.log.warn("MQTT endpoint {name}: cannot connect to {where} (attempt {attempt}); retrying "
                      "with back-off", name=self.name, where=self.where, attempt=self._failedAttempts)

    def _on_disconnect(self, code: int, reason: str, fromServer: bool) -> None:
        wasConnected = self.connected
        self.connected = False
        # SUBSCRIBEs on their way are lost with the connection; their feeds
        # are still waiting and the next connect sends them again.
        self._subscribing.clear()
        if self._stopping:
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
