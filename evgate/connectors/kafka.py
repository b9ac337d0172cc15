"""
The Kafka endpoint (C{type = kafka}), on confluent-kafka (librdkafka).

Threads
=======

librdkafka is a blocking library, and the reactor thread must never wait on
a broker.  So every client lives on a thread of its own, and the only thing
those threads do to Twisted is C{reactor.callFromThread}:

 - one L{confluent_kafka.Producer} per endpoint, shared by every API on it.
   C{produce()} only enqueues, so it is called on the reactor thread; a
   L{ProducerThread} calls C{poll()}, which runs the delivery reports, and
   each report hops to the reactor to fire its publisher's Deferred.  A full
   queue (C{BufferError}) is backpressure: a 503 at once, never a wait.

 - one L{confluent_kafka.Consumer} per upstream subscription, owned by an
   L{AssignedReader} thread that does everything with it: metadata, start
   offsets, C{assign}, polling, pausing and closing.  No consumer group:
   positions are the clients' cursors.  The reactor talks to the thread
   through a command queue only.

 - one consumer per (topic, group) for HTTP GET's group mode, owned by a
   L{GroupReader} thread; see L{KafkaConnector.groupPoll}.

Bounded hand-over
=================

A reader hands the reactor batches of up to C{batch-size} messages, and at
most C{batches-in-flight} of them at a time: it takes a credit (a
semaphore) per batch and the reactor gives the credit back once the batch
went to the sink.  A reactor that falls behind therefore stops the reader
instead of filling memory with batches queued for C{callFromThread}.  While
the hub has paused a subscription, batches that were already on their way
are held on the reactor side, still holding their credits, and the
consumer is paused (C{Consumer.pause}); so a paused subscription costs at
most C{batches-in-flight} batches plus librdkafka's own bounded prefetch.

Shutdown and the broker being down
==================================

Nothing on the reactor thread waits for a broker: readers retry metadata
with a growing delay and stay subscribed; a publish waits for its delivery
report, which librdkafka gives after at most C{message.timeout.ms}, then is
answered 503 when the broker is unreachable (504 when it is reachable but
did not acknowledge).  C{stopService} asks every thread to stop, flushes
the producer for at most C{shutdown-timeout} seconds on its own thread,
and stops waiting after that: the threads are daemons and a broker that is
gone cannot keep the gateway from stopping.
"""

from __future__ import annotations

import base64
import functools
import itertools
import json
import queue
import re
import threading
import time
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredLock, TimeoutError, fail, succeed
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from evgate.config import SectionReader
from evgate.errors import EndpointTimeout, EndpointUnavailable, PayloadTooLarge, Problem
from evgate.interfaces import IConnector, IConsumerGroups, IHoldableSubscription, IRetainedLog, IUpstreamSink
from evgate.message import NO_EXTRA, Cursor, Draft, Message, Position

Start = Union[str, Cursor]

# ----------------------------------------------------------------- options

# evgate's own keys: hyphenated, which no librdkafka property is, so they
# can never shadow one.  Name -> (default, description for errors).
OWN_DEFAULTS: Dict[str, Any] = {
    "request-timeout": 5.0,
    "poll-timeout": 0.2,
    "batch-size": 500,
    "batches-in-flight": 2,
    "shutdown-timeout": 5.0,
    "group-prefix": "evgate",
    "group-idle-timeout": 60.0,
    "retry-after": 1,
}

_GROUP_PREFIX = re.compile(r"[A-Za-z0-9._-]{1,100}")

# librdkafka properties evgate decides itself; setting them would break a
# guarantee, so the configuration refuses them by name.
MANAGED_KEYS: Dict[str, str] = {
    "group.id": "evgate names its consumer groups itself (see group-prefix)",
    "group.instance.id": "every group-mode reader is its own member; a static id would be shared by all of them",
    "enable.auto.commit": "evgate commits group positions itself, after each response is written",
    "auto.commit.enable": "evgate commits group positions itself, after each response is written",
    "enable.auto.offset.store": "evgate stores group positions itself",
    "auto.offset.reset": "the API's start key and the clients' cursors decide where reading starts",
    "enable.partition.eof": "evgate's readers rely on it being off",
    "delivery.report.only.error": "evgate needs every delivery report to answer publishers",
    "transactional.id": "evgate does not publish in transactions",
    "log.queue": "evgate routes librdkafka's log lines itself",
}

# Python callbacks of confluent-kafka; an INI can only give them strings.
_CALLBACK_KEY = re.compile(r"(_cb|^on_delivery|^on_commit|^logger)$")

# evgate's defaults for librdkafka properties, applied unless the section
# sets the property or one of its aliases.
PRODUCER_DEFAULTS: Dict[str, str] = {
    # A publish waits at most this long for its delivery report: this is the
    # bound on a 503 when the broker is down.  Keep it below [gateway]
    # publish-timeout so that librdkafka answers before the gateway gives up.
    "message.timeout.ms": "5000",
    # Fail a publish to a topic that does not exist (and that the broker will
    # not create) after 1 s, as a 503, rather than as a timeout.
    "topic.metadata.propagation.max.ms": "1000",
    # librdkafka's default buffers up to 1 GB of unsent messages; a gateway
    # answers 503 (queue full) long before that.
    "queue.buffering.max.kbytes": "65536",
    # Brokers coming back are noticed within 2 s rather than 10 s.
    "reconnect.backoff.max.ms": "2000",
    # Statistics tell whether any broker is up (the connected attribute).
    "statistics.interval.ms": "5000",
}

CONSUMER_DEFAULTS: Dict[str, str] = {
    # Prefetch per consumer: one reader per subscription, so keep it modest.
    "queued.max.messages.kbytes": "16384",
    "reconnect.backoff.max.ms": "2000",
}

_ALIASES: Dict[str, Tuple[str, ...]] = {
    "message.timeout.ms": ("delivery.timeout.ms",),
    "queue.buffering.max.kbytes": (),
    "topic.metadata.propagation.max.ms": (),
    "reconnect.backoff.max.ms": (),
    "statistics.interval.ms": (),
    "queued.max.messages.kbytes": (),
}

# The placeholder group of assign-mode readers: librdkafka wants a group.id
# on every consumer, but a reader that only assigns never joins it.
READER_GROUP = "evgate.reader"


def _withDefaults(defaults: Mapping[str, str], settings: Mapping[str, str]) -> Dict[str, str]:
    config: Dict[str, str] = {}
    for key, value in defaults.items():
        if key in settings or any(alias in settings for alias in _ALIASES.get(key, ())):
            continue
        config[key] = value
    config.update(settings)
    return config


def producerSettings(librdkafka: Mapping[str, str]) -> Dict[str, str]:
    """
    The librdkafka configuration of an endpoint's producer: evgate's
    defaults overridden by the section's keys.
    """
    return _withDefaults(PRODUCER_DEFAULTS, librdkafka)


def consumerSettings(librdkafka: Mapping[str, str], group: Optional[str] = None,
                     start: str = "latest") -> Dict[str, str]:
    """
    The librdkafka configuration of a reader: an assign-mode reader when
    C{group} is L{None}, else a member of C{group} that starts at C{start}
    when the group has no position yet.
    """
    config = _withDefaults(CONSUMER_DEFAULTS, librdkafka)
    config.update({
        "group.id": group if group is not None else READER_GROUP,
        "enable.auto.commit": "false",
        "enable.auto.offset.store": "false",
        "enable.partition.eof": "false",
        # Assign mode seeks itself and wants to hear about offsets that are
        # gone (to report a gap) rather than have librdkafka jump silently.
        "auto.offset.reset": start if group is not None else "error",
    })
    if "statistics.interval.ms" not in librdkafka:
        config["statistics.interval.ms"] = "0"
    return config


def _confluent(section: Optional[SectionReader] = None) -> Any:
    try:
        import confluent_kafka
    except ImportError:  # pragma: no cover - a dependency of evgate
        if section is None:
            raise
        raise section.error("type", "type = kafka needs the confluent-kafka package") from None
    return confluent_kafka


class _DiscardLog:
    """
    A librdkafka logger that drops everything (for configuration checks).
    """

    def log(self, level: int, fmt: str, *args: Any) -> None:
        pass


def parseOptions(section: SectionReader) -> Mapping[str, Any]:
    """
    The options of a C{[endpoint:NAME]} section of C{type = kafka}.

    C{bootstrap.servers} is required; evgate's own keys are hyphenated
    (see L{OWN_DEFAULTS}); every other key goes to librdkafka as it is, and
    librdkafka checks them here, so that a misspelt property stops the
    gateway at start-up (and C{--check}) with the file, section and key.

    @raise ConfigError: on any mistake.
    """
    for key in MANAGED_KEYS:
        if section.has(key):
            raise section.error(key, f"is managed by evgate and cannot be set: {MANAGED_KEYS[key]}")
    options: Dict[str, Any] = {
        "request-timeout": section.getFloat("request-timeout", OWN_DEFAULTS["request-timeout"], minimum=0.1),
        "poll-timeout": section.getFloat("poll-timeout", OWN_DEFAULTS["poll-timeout"], minimum=0.01),
        "batch-size": section.getInt("batch-size", OWN_DEFAULTS["batch-size"], minimum=1, maximum=100000),
        "batches-in-flight": section.getInt("batches-in-flight", OWN_DEFAULTS["batches-in-flight"],
                                            minimum=1, maximum=100),
        "shutdown-timeout": section.getFloat("shutdown-timeout", OWN_DEFAULTS["shutdown-timeout"], minimum=0.0),
        "group-prefix": section.get("group-prefix", OWN_DEFAULTS["group-prefix"]),
        "group-idle-timeout": section.getFloat("group-idle-timeout", OWN_DEFAULTS["group-idle-timeout"],
                                               minimum=1.0),
        "retry-after": section.getInt("retry-after", OWN_DEFAULTS["retry-after"], minimum=0, maximum=3600),
    }
    if options["poll-timeout"] > 5:
        raise section.error("poll-timeout", "must be at most 5 seconds: it bounds how fast readers react")
    if not _GROUP_PREFIX.fullmatch(options["group-prefix"]):
        raise section.error("group-prefix", "use 1 to 100 letters, digits, '.', '_' or '-'")
    servers = section.get("bootstrap.servers")
    librdkafka = section.rest()
    for key in librdkafka:
        if _CALLBACK_KEY.search(key):
            raise section.error(key, "is a confluent-kafka callback, which a configuration file cannot set")
        if "-" in key:
            raise section.error(key, "unknown key (evgate's own keys are: "
                                     + ", ".join(sorted(OWN_DEFAULTS)) + ")")
    librdkafka["bootstrap.servers"] = servers
    checkWithLibrdkafka(section, librdkafka)
    options["librdkafka"] = MappingProxyType(librdkafka)
    options["source"] = f"{section.path} [{section.name}]"
    return MappingProxyType(options)


_PROPERTY_NAME = re.compile(r"[\"`]([a-z0-9_.]+)[\"`]")


def checkWithLibrdkafka(section: SectionReader, librdkafka: Mapping[str, str]) -> None:
    """
    Build (and at once destroy) a producer and a consumer with C{librdkafka}
    but no bootstrap servers, so that librdkafka refuses unknown properties
    and bad values without connecting anywhere.

    @raise ConfigError: naming the key librdkafka refused.
    """
    ck = _confluent(section)
    settings = {k: v for k, v in librdkafka.items() if k != "bootstrap.servers"}
    checks: List[Tuple[str, Callable[[Dict[str, Any]], Any], Dict[str, Any]]] = [
        ("producer", ck.Producer, producerSettings(settings)),
        ("consumer", ck.Consumer, consumerSettings(settings)),
    ]
    for role, make, config in checks:
        config.pop("bootstrap.servers", None)
        config["logger"] = _DiscardLog()
        try:
            client = make(config)
        except (ck.KafkaException, ValueError, TypeError) as e:
            message = _kafkaReason(e)
            raise section.error(_culprit(make, message, settings, role),
                                f"librdkafka refuses the {role} configuration: {message}"
                                + _defaultsHint(message, role)) from None
        if role == "consumer":
            client.close()
        del client


def _kafkaReason(exception: BaseException) -> str:
    if exception.args and hasattr(exception.args[0], "str"):
        text = exception.args[0].str()
    else:
        text = str(exception)
    for prefix in ("Failed to create producer: ", "Failed to create consumer: "):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return text


def _culprit(make: Callable[[Dict[str, Any]], Any], message: str, settings: Mapping[str, str],
             role: str) -> Optional[str]:
    # The key the section wrote, which may be an alias of the property
    # librdkafka names (linger.ms is queue.buffering.max.ms to it).
    for name in _PROPERTY_NAME.findall(message):
        if name in settings:
            return name
    for key, value in settings.items():
        alone: Dict[str, Any] = {key: value, "logger": _DiscardLog()}
        if role == "consumer":
            alone["group.id"] = READER_GROUP
        try:
            client = make(alone)
        except Exception:
            return key
        if role == "consumer":
            client.close()
        del client
    return None


def _defaultsHint(message: str, role: str) -> str:
    defaults = PRODUCER_DEFAULTS if role == "producer" else CONSUMER_DEFAULTS
    named = [name for name in _PROPERTY_NAME.findall(message) if name in defaults]
    if not named:
        return ""
    return " (evgate sets " + ", ".join(f"{n} = {defaults[n]}" for n in named) + " unless the section sets it)"


# ----------------------------------------------------------------- clients


class ConfluentClients:
    """
    Makes the real confluent-kafka clients (tests give a fake instead).
    """

    def producer(self, config: Mapping[str, Any]) -> Any:
        """
        A new C{confluent_kafka.Producer}.
        """
        return _confluent().Producer(dict(config))

    def consumer(self, config: Mapping[str, Any]) -> Any:
        """
        A new C{confluent_kafka.Consumer}.
        """
        return _confluent().Consumer(dict(config))

    def topicPartition(self, topic: str, partition: int, offset: Optional[int] = None) -> Any:
        """
        A C{confluent_kafka.TopicPartition}.
        """
        ck = _confluent()
        if offset is None:
            return ck.TopicPartition(topic, partition)
        return ck.TopicPartition(topic, partition, offset)


def startDaemonThread(target: Callable[[], None], name: str) -> None:
    """
    Run C{target} on a new daemon thread: a thread stuck on a broker that is
    gone must not keep the process from exiting.
    """
    threading.Thread(target=target, name=name, daemon=True).start()


class _Codes:
    """
    librdkafka error codes, looked up once confluent-kafka is imported.
    """

    def __init__(self) -> None:
        error = _confluent().KafkaError
        self.ALL_BROKERS_DOWN = error._ALL_BROKERS_DOWN
        self.TRANSPORT = error._TRANSPORT
        self.AUTHENTICATION = error._AUTHENTICATION
        self.MSG_TIMED_OUT = error._MSG_TIMED_OUT
        self.MSG_SIZE_TOO_LARGE = (error.MSG_SIZE_TOO_LARGE,)
        self.AUTO_OFFSET_RESET = error._AUTO_OFFSET_RESET
        self.PARTITION_EOF = error._PARTITION_EOF
        self.UNKNOWN_TOPIC = (error.UNKNOWN_TOPIC_OR_PART, error._UNKNOWN_TOPIC, error._UNKNOWN_PARTITION)
        self.NOT_AUTHORIZED = (error.TOPIC_AUTHORIZATION_FAILED, error.GROUP_AUTHORIZATION_FAILED)
        self.PURGED = (error._PURGE_QUEUE, error._PURGE_INFLIGHT)


_codes: Optional[_Codes] = None


def codes() -> _Codes:
    """
    The librdkafka error codes evgate reacts to.
    """
    global _codes
    if _codes is None:
        _codes = _Codes()
    return _codes


def kafkaError(exception: BaseException) -> Any:
    """
    The C{KafkaError} a C{KafkaException} carries, or L{None}.
    """
    if exception.args and hasattr(exception.args[0], "code"):
        return exception.args[0]
    return None


# ----------------------------------------------------------------- messages



def toMessage(record: Any) -> Message:
    """
    The L{Message} of a record consumed from Kafka.

    Kafka keys and header values are bytes.  Those that are UTF-8 become
    text; the others are given as base64, and the metadata says so:
    C{keyEncoding: "base64"}, and C{headerEncoding: {name: "base64"}}.  A
    null header value becomes C{""}; a null value (a tombstone) becomes empty
    content with C{tombstone: true}.
    """
    extra: Optional[Dict[str, Any]] = None
    rawKey = record.key()
    key: Optional[str] = None
    if rawKey is not None:
        try:
            key = rawKey.decode("utf-8")
        except UnicodeDecodeError:
            key = base64.b64encode(rawKey).decode("ascii")
            extra = {"keyEncoding": "base64"}
    headers: List[Tuple[str, str]] = []
    for name, raw in record.headers() or ():
        if raw is None:
            headers.append((name, ""))
            continue
        try:
            headers.append((name, raw.decode("utf-8")))
        except UnicodeDecodeError:
            headers.append((name, base64.b64encode(raw).decode("ascii")))
            if extra is None:
                extra = {}
            extra.setdefault("headerEncoding", {})[name] = "base64"
    content = record.value()
    if content is None:
        content = b""
        if extra is None:
            extra = {}
        extra["tombstone"] = True
    kind, stamp = record.timestamp()
    # Positional: a named tuple is built faster so, once per record read.
    return Message(content, key, tuple(headers), record.topic(), record.partition(), record.offset(),
                   stamp if kind and stamp >= 0 else 0, extra if extra is not None else NO_EXTRA)


# ----------------------------------------------------------------- threads


class LibrdkafkaLog:
    """
    librdkafka's log lines, re-emitted on the reactor thread by the Twisted
    logger, with repeats of the same line dropped for a minute (librdkafka
    repeats itself a lot while a broker is down, and warns once per client
    about properties of the other client type).
    """

    # Not "log": confluent-kafka calls this object's log() method.
    twistedLog = Logger()

    def __init__(self, connector: "KafkaConnector") -> None:
        self.connector = connector
        self.seen: Dict[str, float] = {}

    def log_(self, level: int, text: str) -> None:
        # The instance name ("[rdkafka#consumer-7]") differs between
        # clients; without it, repeats from all of them look alike.
        key = re.sub(r"\[rdkafka#[a-z]+-\d+\]\s*", "", text)
        now = time.monotonic()
        last = self.seen.get(key)
        if last is not None and now - last < 60:
            return
        if len(self.seen) > 1000:
            self.seen.clear()
        self.seen[key] = now
        if level >= 40:
            twisted = LogLevel.error
        elif level >= 30:
            twisted = LogLevel.warn
        elif level >= 20:
            twisted = LogLevel.info
        else:
            twisted = LogLevel.debug
        self.connector.fromThread(self.twistedLog.emit, twisted, "Kafka endpoint {endpoint}: {line}",
                                  endpoint=self.connector.name, line=key)

    def log(self, level: int, fmt: str, *args: Any) -> None:
        # confluent-kafka's logger protocol (logging.Logger.log); called by
        # the client's own thread, inside poll().
        try:
            self.log_(level, fmt % args if args else fmt)
        except Exception:  # a log line must never break a client thread
            pass


class _Exits:
    """
    The reactor-side record of a thread's end: Deferreds that fire when it
    has exited.
    """

    def __init__(self) -> None:
        self.exited = False
        self.waiters: List[Deferred] = []

    def when(self) -> Deferred:
        d: Deferred = Deferred()
        if self.exited:
            d.callback(None)
        else:
            self.waiters.append(d)
        return d

    def fire(self) -> None:
        self.exited = True
        waiters, self.waiters = self.waiters, []
        for d in waiters:
            d.callback(None)


# Delivery reports handed to the reactor in one call at most.
REPORT_BATCH = 512


class ProducerThread:
    """
    The endpoint's producer and the thread that serves its delivery
    reports.  L{produce} is called on the reactor thread (it only
    enqueues); L{run} runs on the thread.
    """

    def __init__(self, connector: "KafkaConnector") -> None:
        self.connector = connector
        self.pollTimeout = connector.options["poll-timeout"]
        self.stopRequested = threading.Event()
        self.exits = _Exits()
        config: Dict[str, Any] = dict(producerSettings(connector.options["librdkafka"]))
        self.messageTimeout = float(config.get("message.timeout.ms", config.get("delivery.timeout.ms", 300000)))
        config["error_cb"] = connector.onClientError
        config["stats_cb"] = connector.onStatistics
        config["logger"] = connector.librdkafkaLog
        self.producer: Any = connector.clients.producer(config)

    def produce(self, topic: str, draft: Draft, report: Callable[[Any, Any], None]) -> None:
        """
        Enqueue C{draft}; C{report} runs on this thread when it is
        delivered or failed.

        @raise BufferError: when librdkafka's queue is full.
        @raise KafkaException: when librdkafka refuses the message at once.
        """
        producer = self.producer
        if producer is None:
            # The thread ended (it failed): nothing would serve the report.
            raise BufferError("the producer thread has ended")
        key = draft.key.encode("utf-8") if draft.key is not None else None
        headers = [(name, value.encode("utf-8")) for name, value in draft.headers] or None
        producer.produce(topic, value=draft.content, key=key, headers=headers, on_delivery=report)

    def produceMany(self, topic: str, drafts: Sequence[Draft], start: int,
                    report: Callable[[int, Any, Any], None]) -> Tuple[int, Optional[Exception]]:
        """
        Enqueue C{drafts[start:]} in order until librdkafka refuses one;
        C{report(index, error, record)} runs on this thread for each.  Keys
        and headers shared by consecutive drafts (a batch's usually are)
        are encoded once.

        @return: the index of the draft refused (C{len(drafts)} when none
            was) and the exception it was refused with.
        """
        producer = self.producer
        if producer is None:
            return start, BufferError("the producer thread has ended")
        produce = producer.produce
        partial = functools.partial
        lastKey: Any = producer
        lastHeaders: Any = producer
        key = headers = None
        index = start
        try:
            for index in range(start, len(drafts)):
                draft = drafts[index]
                if draft.key is not lastKey:
                    lastKey = draft.key
                    key = lastKey.encode("utf-8") if lastKey is not None else None
                if draft.headers is not lastHeaders:
                    lastHeaders = draft.headers
                    headers = [(name, value.encode("utf-8")) for name, value in lastHeaders] or None
                produce(topic, value=draft.content, key=key, headers=headers, on_delivery=partial(report, index))
        except Exception as e:
            return index, e
        return len(drafts), None

    # the thread

    def run(self) -> None:
        """
        The thread: serve delivery reports until asked to stop, then flush
        and exit.
        """
        try:
            while not self.stopRequested.is_set():
                self.runOnce()
        except Exception:
            self.connector.fromThread(self.connector.log.failure,
                                      "Kafka endpoint {endpoint}: the producer thread failed",
                                      Failure(), endpoint=self.connector.name)
        finally:
            self.finish()

    def probe(self) -> None:
        """
        Ask for the cluster's metadata once, so that C{connected} and the log
        say at start-up whether the broker is there.  It runs on a thread of
        its own: on the poll thread it would hold up delivery reports for up
        to C{request-timeout}.
        """
        producer = self.producer
        if producer is None:
            return
        try:
            producer.list_topics(timeout=self.connector.options["request-timeout"])
        except Exception as e:
            self.connector.observeBroker(False, _kafkaReason(e))
        else:
            self.connector.observeBroker(True)

    def runOnce(self) -> None:
        """
        Serve the delivery reports (and errors, statistics, log lines) that
        are ready, waiting at most C{poll-timeout}.
        """
        self.producer.poll(self.pollTimeout)
        self.connector.handOverReports()

    def finish(self) -> None:
        """
        Deliver what can be delivered within C{shutdown-timeout}, fail the
        rest (their reports say so), and destroy the producer here rather
        than on the reactor thread.
        """
        producer, self.producer = self.producer, None
        try:
            if producer is not None:
                left = producer.flush(self.connector.options["shutdown-timeout"])
                if left:
                    producer.purge()
                    producer.poll(0)
                    producer.flush(0)
                self.connector.handOverReports()
        except Exception:
            self.connector.fromThread(self.connector.log.failure,
                                      "Kafka endpoint {endpoint}: flushing the producer failed",
                                      Failure(), endpoint=self.connector.name)
        finally:
            del producer
            self.connector.fromThread(self.exits.fire)


class ConsumerThread:
    """
    A C{confluent_kafka.Consumer} and the one thread that owns it.

    The reactor side calls L{start}, L{send} and L{stop}; the thread runs
    L{run}: it builds the consumer (L{open}), then runs queued commands and
    the subclass's L{step} until stopped, and closes the consumer
    (L{finish}).  A command C{("name", args)} runs C{self.do_name(*args)} on
    the thread.  Subclasses choose the mode: L{AssignedReader} (assign and
    seek, no group) or L{GroupReader} (a member of a consumer group).
    """

    log = Logger()
    kind = "reader"

    def __init__(self, connector: "KafkaConnector", topic: str, config: Mapping[str, Any]) -> None:
        self.connector = connector
        self.topic = topic
        options = connector.options
        self.pollTimeout: float = options["poll-timeout"]
        self.requestTimeout: float = options["request-timeout"]
        self.batchSize: int = options["batch-size"]
        self.config = dict(config)
        self.commands: "queue.SimpleQueue[Tuple[str, tuple]]" = queue.SimpleQueue()
        self.stopRequested = threading.Event()
        self.exits = _Exits()
        self.consumer: Any = None
        self.closing = False
        self.stopped = False
        # Back-off while the broker cannot be asked: a time to retry at, not
        # a sleep, so that commands are still served meanwhile.
        self.now: Callable[[], float] = time.monotonic
        self.retryAt = 0.0
        self.retryDelay = 0.25

    # the reactor side

    def start(self) -> None:
        """
        Start the owner thread.
        """
        self.connector.startThread(self.run, f"evgate-kafka-{self.kind}-{self.connector.name}-{self.topic}")

    def send(self, command: str, *args: Any) -> None:
        """
        Queue C{command} for the owner thread.
        """
        self.commands.put((command, args))

    def stop(self) -> None:
        """
        Ask the owner thread to close the consumer and end.  Idempotent.
        """
        if not self.stopped:
            self.stopped = True
            self.stopRequested.set()
            self.send("close")

    def whenExited(self) -> Deferred:
        """
        A Deferred that fires on the reactor thread once the owner thread has
        closed its consumer and ended.
        """
        return self.exits.when()

    # the owner thread

    def run(self) -> None:
        """
        The owner thread's whole life.
        """
        try:
            if self.consumer is None:
                self.open()
            while self.runOnce():
                pass
        except Exception:
            self.crashed(Failure())
        finally:
            self.finish()

    def open(self) -> None:
        """
        Build the consumer.
        """
        config = dict(self.config)
        config["error_cb"] = self.connector.onClientError
        config["stats_cb"] = self.connector.onStatistics
        config["logger"] = self.connector.librdkafkaLog
        self.consumer = self.connector.clients.consumer(config)

    def runOnce(self) -> bool:
        """
        One turn: the commands that are waiting, then one L{step}.

        @return: whether to go on.
        """
        self.runCommands()
        if self.closing:
            return False
        self.step()
        return not self.closing

    def runCommands(self, wait: float = 0.0) -> None:
        """
        Run the queued commands, waiting up to C{wait} seconds for the first
        one: how the owner thread sleeps, so that a command (close above
        all) wakes it at once.
        """
        try:
            if wait > 0:
                command, args = self.commands.get(timeout=wait)
            else:
                command, args = self.commands.get_nowait()
        except queue.Empty:
            return
        while True:
            getattr(self, "do_" + command)(*args)
            try:
                command, args = self.commands.get_nowait()
            except queue.Empty:
                return

    def step(self) -> None:
        """
        The mode's work for one turn; must return within about
        C{poll-timeout} (or C{request-timeout} for a broker request).
        """
        raise NotImplementedError

    def do_close(self) -> None:
        """
        Command: end the thread.
        """
        self.closing = True

    def finish(self) -> None:
        """
        Close and destroy the consumer on this thread, then tell the
        reactor.
        """
        consumer, self.consumer = self.consumer, None
        try:
            if consumer is not None:
                consumer.close()
        except Exception:
            self.fromThread(self.log.failure, "Kafka endpoint {endpoint}: closing a consumer of {topic} failed",
                            Failure(), endpoint=self.connector.name, topic=self.topic)
        finally:
            del consumer
            self.fromThread(self.exited)

    def exited(self) -> None:
        """
        On the reactor: the owner thread has ended.
        """
        self.connector.forget(self)
        self.exits.fire()

    def crashed(self, failure: Failure) -> None:
        """
        On the owner thread: an exception ended the loop.  A L{Problem} is
        an expected end (the broker refused us) and is logged without a
        traceback.
        """
        if failure.check(Problem):
            self.fromThread(self.log.warn, "Kafka endpoint {endpoint}: reading {topic} ended: {reason}",
                            endpoint=self.connector.name, topic=self.topic, reason=failure.getErrorMessage())
            return
        self.fromThread(self.log.failure, "Kafka endpoint {endpoint}: a consumer of {topic} failed",
                        failure, endpoint=self.connector.name, topic=self.topic)

    def fromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """
        Run C{f} on the reactor thread.
        """
        self.connector.fromThread(f, *args, **kwargs)

    def wait(self, seconds: float) -> None:
        """
        Sleep up to C{seconds}, or less if a command comes.
        """
        self.runCommands(wait=seconds)

    def backOff(self, exception: BaseException) -> None:
        """
        The broker could not be asked: note it, and ask again later (after
        0.25 s, doubling up to 5 s).
        """
        self.connector.observeBroker(False, _kafkaReason(exception))
        self.retryAt = self.now() + self.retryDelay
        self.retryDelay = min(self.retryDelay * 2, 5.0)

    def backingOff(self) -> bool:
        """
        Whether it is too early to ask the broker again; if so, wait a
        little (at most C{poll-timeout}).
        """
        left = self.retryAt - self.now()
        if left <= 0:
            return False
        self.wait(min(self.pollTimeout, left))
        return True

    def brokerAnswered(self) -> None:
        """
        The broker answered a request: no more back-off.
        """
        self.retryDelay = 0.25
        self.connector.observeBroker(True)

    def takeCredit(self, semaphore: threading.Semaphore, wait: float) -> bool:
        """
        Take one credit of C{semaphore}, waiting at most C{wait} seconds.
        """
        if wait > 0:
            return semaphore.acquire(timeout=wait)
        return semaphore.acquire(blocking=False)

    def tp(self, partition: int, offset: Optional[int] = None) -> Any:
        """
        A TopicPartition of this thread's topic.
        """
        return self.connector.clients.topicPartition(self.topic, partition, offset)

    def partitionsOf(self) -> Optional[List[int]]:
        """
        The partitions of the topic from fresh metadata, or L{None} when the
        topic does not exist.

        @raise KafkaException: when the broker cannot be asked.
        """
        metadata = self.consumer.list_topics(self.topic, timeout=self.requestTimeout)
        topic = metadata.topics.get(self.topic)
        if topic is None:
            return None
        if topic.error is not None:
            if topic.error.code() in codes().UNKNOWN_TOPIC:
                return None
            raise _confluent().KafkaException(topic.error)
        return sorted(topic.partitions)

    def watermarks(self, partition: int) -> Tuple[int, int]:
        """
        The low and high watermarks of C{partition}, asked of the broker.

        @raise KafkaException: when the broker cannot be asked.
        """
        low, high = self.consumer.get_watermark_offsets(self.tp(partition), timeout=self.requestTimeout,
                                                        cached=False)
        return low, high


@implementer(IHoldableSubscription)
class AssignedReader(ConsumerThread):
    """
    An upstream subscription: reads one topic with C{assign} and explicit
    offsets into an L{IUpstreamSink}.

    Start offsets: C{"latest"} is every partition's high watermark,
    C{"earliest"} its low watermark, a cursor its own offset per partition.
    A partition the cursor does not name (it did not exist when the cursor
    was made) and a partition created later start at the low watermark.  A
    cursor offset below the low watermark (retention deleted the records)
    or above the high watermark (the topic was recreated) is reported to the
    sink as a gap, and reading goes on from the watermark.
    """

    # Metadata is read again this often to find new partitions (or the
    # topic, while it does not exist).
    metadataInterval = 30.0
    missingTopicInterval = 1.0

    def __init__(self, connector: "KafkaConnector", topic: str, start: Start, sink: IUpstreamSink) -> None:
        super().__init__(connector, topic, consumerSettings(connector.options["librdkafka"]))
        self.startAt = start
        # Any: mypy cannot call through a zope Interface annotation.
        self.sink: Any = sink
        self.credits = threading.Semaphore(connector.options["batches-in-flight"])
        # owner-thread state
        self.offsets: Dict[int, int] = {}
        self.resolved = False
        self.startedSent = False
        self.fetchPaused = False
        self.batch: Optional[List[Message]] = None
        self.reposition: Set[int] = set()
        self.nextMetadata = 0.0
        # reactor-side state
        self.paused = False
        self.holding = False
        self.closed = False
        self.held: List[Tuple[Any, ...]] = []

    # IUpstreamSubscription, on the reactor

    def pause(self) -> None:
        if not self.paused and not self.closed:
            self.paused = True
            self.send("pause")

    def hold(self) -> None:
        """
        Stop handing batches to the sink without pausing the consumer:
        they wait here, the owner thread stops at its credit, and
        librdkafka keeps what it prefetched.  (Pausing a partition throws
        its prefetched records away, to be fetched again on resume.)
        L{resume} ends it.
        """
        if not self.paused and not self.closed:
            self.paused = True
            self.holding = True

    def drainHeld(self) -> List[Message]:
        """
        Take the batches held (see L{hold}) up to the first gap, in order,
        as one list; their credits go back to the owner thread.
        """
        messages: List[Message] = []
        while self.held and self.held[0][0] == "deliver":
            messages.extend(self.held.pop(0)[1])
            self.credits.release()
        return messages

    def resume(self) -> None:
        if not self.paused or self.closed:
            return
        self.paused = False
        holding, self.holding = self.holding, False
        # What arrived while paused goes first, in order; the sink may pause
        # again on the way.
        while self.held and not self.paused and not self.closed:
            self.dispatch(self.held.pop(0))
        if not self.paused and not self.closed and not holding:
            self.send("resume")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        held, self.held = self.held, []
        for event in held:
            if event[0] == "deliver":
                self.credits.release()
        self.stop()

    # events arriving on the reactor

    def onReactor(self, *event: Any) -> None:
        """
        An event from the owner thread: C{("started", cursor)},
        C{("gap", cursor, reason)}, C{("deliver", messages)} or
        C{("failed", failure)}.
        """
        kind = event[0]
        if self.closed:
            if kind == "deliver":
                self.credits.release()
            return
        if kind == "started":
            self.sink.started(event[1])
        elif kind == "failed":
            self.closed = True
            self.held = []
            self.stop()
            self.sink.failed(event[1])
        elif self.paused or self.held:
            self.held.append(event)
        else:
            self.dispatch(event)

    def dispatch(self, event: Tuple[Any, ...]) -> None:
        """
        Hand a gap or a batch to the sink; a batch's credit goes back to the
        owner thread once the sink has it.
        """
        try:
            if event[0] == "deliver":
                self.sink.deliver(event[1])
            else:
                self.sink.gap(event[1], event[2])
        except Exception:
            self.log.failure("Kafka endpoint {endpoint}: the sink of {topic} failed",
                             endpoint=self.connector.name, topic=self.topic)
        finally:
            if event[0] == "deliver":
                self.credits.release()

    # the owner thread

    def crashed(self, failure: Failure) -> None:
        super().crashed(failure)
        self.fromThread(self.onReactor, "failed", failure)

    def do_pause(self) -> None:
        """
        Command: stop fetching.
        """
        self.fetchPaused = True
        if self.offsets:
            self.consumer.pause([self.tp(p) for p in self.offsets])

    def do_resume(self) -> None:
        """
        Command: fetch again, from the offsets already handed over.
        """
        self.fetchPaused = False
        if self.offsets:
            self.consumer.resume([self.tp(p) for p in self.offsets])

    def step(self) -> None:
        if self.backingOff():
            return
        if not self.resolved:
            self.resolve()
        elif self.batch is not None:
            # A batch is waiting for the reactor to give a credit back.
            if self.takeCredit(self.credits, self.pollTimeout):
                self.sendBatch()
        elif self.reposition:
            self.repositionPartitions()
        elif self.fetchPaused:
            self.wait(self.pollTimeout)
        else:
            if self.now() >= self.nextMetadata:
                self.findNewPartitions()
            self.read()

    def resolve(self) -> None:
        """
        Find the partitions and their start offsets, assign them, and tell
        the sink where the subscription starts.  A broker that cannot be
        asked is asked again, with a growing delay; a cursor start is
        reported to the sink at once then, so that clients get answers
        while the broker is away.
        """
        try:
            partitions = self.partitionsOf()
            marks = {p: self.watermarks(p) for p in partitions or ()}
        except Exception as e:
            error = kafkaError(e)
            if error is None:
                raise
            if error.code() in codes().NOT_AUTHORIZED:
                raise EndpointUnavailable(f"Kafka refuses to let the gateway read topic {self.topic}: "
                                          f"{error.str()}", retryAfter=self.connector.retryAfter) from None
            self.backOff(e)
            if isinstance(self.startAt, Cursor) and not self.startedSent:
                self.startedSent = True
                self.fromThread(self.onReactor, "started", self.startAt)
            return
        self.brokerAnswered()
        offsets, gaps = self.plan(marks, initial=True)
        if offsets:
            self.consumer.assign([self.tp(p, o) for p, o in sorted(offsets.items())])
            if self.fetchPaused:
                self.consumer.pause([self.tp(p) for p in offsets])
        self.offsets = offsets
        self.resolved = True
        self.nextMetadata = self.now() + (self.metadataInterval if partitions is not None
                                          else self.missingTopicInterval)
        cursor = Cursor.fromMapping(offsets)
        if not self.startedSent:
            self.startedSent = True
            self.fromThread(self.onReactor, "started", cursor)
        if gaps:
            self.fromThread(self.onReactor, "gap", cursor, "; ".join(gaps))

    def plan(self, marks: Mapping[int, Tuple[int, int]], initial: bool) -> Tuple[Dict[int, int], List[str]]:
        """
        The start offset of each partition in C{marks} (partition to low and
        high watermark), and the gaps to report.
        """
        start = self.startAt
        offsets: Dict[int, int] = {}
        gaps: List[str] = []
        foreign = isinstance(start, Cursor) and start.epoch != 0
        if foreign and initial:
            gaps.append("the cursor was not made by a Kafka endpoint; reading from the earliest retained message")
        for partition, (low, high) in sorted(marks.items()):
            if isinstance(start, Cursor) and not foreign:
                wanted = start.get(partition)
                if wanted is None:
                    offsets[partition] = low
                elif wanted < low:
                    offsets[partition] = low
                    gaps.append(f"partition {partition}: offsets {wanted} to {low - 1} were deleted by retention")
                elif wanted > high:
                    offsets[partition] = high
                    gaps.append(f"partition {partition}: the cursor ({wanted}) is past the end ({high}); "
                                "the topic was recreated or lost messages")
                else:
                    offsets[partition] = wanted
            elif initial and start == "latest":
                offsets[partition] = high
            else:
                offsets[partition] = low
        return offsets, gaps

    def findNewPartitions(self) -> None:
        """
        Assign partitions created since the last look, from their start.
        """
        try:
            partitions = self.partitionsOf()
            new = [p for p in partitions or () if p not in self.offsets]
            marks = {p: self.watermarks(p) for p in new}
        except Exception as e:
            if kafkaError(e) is None:
                raise
            self.backOff(e)
            return
        self.brokerAnswered()
        self.nextMetadata = self.now() + (self.metadataInterval if partitions else self.missingTopicInterval)
        if not marks:
            return
        offsets, gaps = self.plan(marks, initial=False)
        self.consumer.incremental_assign([self.tp(p, o) for p, o in sorted(offsets.items())])
        if self.fetchPaused:
            self.consumer.pause([self.tp(p) for p in offsets])
        self.offsets.update(offsets)
        if gaps:
            self.fromThread(self.onReactor, "gap", Cursor.fromMapping(self.offsets), "; ".join(gaps))

    def read(self) -> None:
        """
        Poll one batch (waiting at most C{poll-timeout} for its first
        message) and hand it over.
        """
        first = self.consumer.poll(self.pollTimeout)
        if first is None:
            return
        records = [first]
        if self.batchSize > 1:
            records.extend(self.consumer.consume(self.batchSize - 1, 0))
        batch: List[Message] = []
        for record in records:
            error = record.error()
            if error is not None:
                self.recordError(record, error)
                continue
            partition, offset = record.partition(), record.offset()
            expected = self.offsets.get(partition)
            # Records from before a re-assignment, or a partition given up,
            # were handed over already or are not ours.
            if expected is None or offset < expected or partition in self.reposition:
                continue
            self.offsets[partition] = offset + 1
            batch.append(toMessage(record))
        if batch:
            self.connector.observeBroker(True)
            self.batch = batch
            if self.takeCredit(self.credits, 0):
                self.sendBatch()

    def sendBatch(self) -> None:
        """
        Hand the waiting batch to the reactor (its credit is taken).
        """
        batch, self.batch = self.batch, None
        self.fromThread(self.onReactor, "deliver", batch)

    def recordError(self, record: Any, error: Any) -> None:
        """
        React to an error the consumer returned in place of a record.
        """
        code = error.code()
        known = codes()
        if code == known.AUTO_OFFSET_RESET:
            self.reposition.add(record.partition())
        elif code == known.PARTITION_EOF:
            pass
        elif code in known.NOT_AUTHORIZED:
            raise EndpointUnavailable(f"Kafka refuses to let the gateway read topic {self.topic}: {error.str()}",
                                      retryAfter=self.connector.retryAfter)
        elif code in known.UNKNOWN_TOPIC:
            self.nextMetadata = min(self.nextMetadata, self.now() + self.missingTopicInterval)
        elif code in (known.ALL_BROKERS_DOWN, known.TRANSPORT):
            self.connector.observeBroker(False, error.str())
        else:
            self.fromThread(self.log.warn, "Kafka endpoint {endpoint}: reading {topic}: {error}",
                            endpoint=self.connector.name, topic=self.topic, error=error.str())

    def repositionPartitions(self) -> None:
        """
        Put partitions whose offset the broker no longer has back on the
        watermarks, with a gap for the sink.
        """
        try:
            marks = {p: self.watermarks(p) for p in sorted(self.reposition)}
        except Exception as e:
            if kafkaError(e) is None:
                raise
            self.backOff(e)
            return
        gaps = []
        for partition, (low, high) in marks.items():
            wanted = self.offsets[partition]
            if wanted < low:
                target = low
                gaps.append(f"partition {partition}: offsets {wanted} to {low - 1} were deleted by retention")
            elif wanted > high:
                target = high
                gaps.append(f"partition {partition}: offset {wanted} is past the end ({high}); "
                            "the topic was recreated or lost messages")
            else:
                target = wanted
            self.consumer.incremental_unassign([self.tp(partition)])
            self.consumer.incremental_assign([self.tp(partition, target)])
            if self.fetchPaused:
                self.consumer.pause([self.tp(partition)])
            self.offsets[partition] = target
        self.reposition.clear()
        if gaps:
            self.fromThread(self.onReactor, "gap", Cursor.fromMapping(self.offsets), "; ".join(gaps))


class TakeRequest:
    """
    One group-mode poll, shared by the reactor and the owner thread: the
    reactor may abandon it (its own deadline passed), and the thread then
    keeps what it read.
    """

    _ids = itertools.count(1)

    def __init__(self, limit: int, timeout: float) -> None:
        self.id = next(self._ids)
        self.limit = limit
        self.timeout = timeout
        self.abandoned = False


class GroupBatch:
    """
    What a group-mode poll read: C{messages}, the cursor C{first} that
    resumes at the first of them and the cursor C{cursor} that resumes
    after them (both over the partitions this reader owns).

    The caller must end it with L{commit} (the messages reached the client:
    the group's position moves past them) or L{putBack} (they did not: the
    next poll of the group returns them again).  Until then the group's
    other polls wait.
    """

    def __init__(self, reader: Optional["GroupReader"], messages: List[Message], first: Cursor,
                 cursor: Cursor) -> None:
        self.reader = reader
        self.messages = messages
        self.first = first
        self.cursor = cursor
        self.ended = False

    def commit(self) -> Deferred:
        """
        Commit the group's position past C{messages} (on the reader's
        thread, synchronously there).  The Deferred fires once the commit
        has ended; a refusal is logged, and the group reads those messages
        again, as at-least-once allows.
        """
        if self.ended or self.reader is None:
            self.ended = True
            d: Deferred = Deferred()
            d.callback(None)
            return d
        self.ended = True
        offsets: Dict[int, int] = {}
        for message in self.messages:
            offsets[message.partition] = max(offsets.get(message.partition, 0), message.offset + 1)
        return self.reader.commit(offsets)

    def putBack(self) -> None:
        """
        Give the messages back: the group's next poll returns them first.
        """
        if self.ended or self.reader is None:
            self.ended = True
            return
        self.ended = True
        self.reader.putBack(self.messages)


class GroupReader(ConsumerThread):
    """
    A member of one consumer group reading one topic, for HTTP GET's group
    mode (the webhook entrypoint can reuse it: same thread model, group
    membership and commits).

    Between polls the thread keeps polling (so that the group's rebalances
    go on) into a buffer of about C{batch-size} records; when the buffer is
    full it takes one record per turn at most.  A poll takes from the
    buffer first.
    A rebalance that takes partitions away drops their buffered records:
    their new owner reads them from the committed position.
    """

    kind = "group"

    def __init__(self, connector: "KafkaConnector", topic: str, group: str, start: str) -> None:
        super().__init__(connector, topic, consumerSettings(connector.options["librdkafka"], group, start))
        self.group = group
        self.lock = DeferredLock()
        self.idleCall: Any = None
        self.lastCursor = Cursor()
        # reactor-side pending polls and commits
        self.requests: Dict[int, Tuple[Deferred, Any]] = {}
        self.commits: Dict[int, Deferred] = {}
        self._commitIds = itertools.count(1)
        # owner-thread state
        self.buffer: List[Message] = []
        self.assigned: Set[int] = set()
        self.fetchPaused = False
        self.pendingTake: Optional[TakeRequest] = None
        self.takeDeadline = 0.0

    # the reactor side

    def take(self, limit: int, timeout: float) -> Deferred:
        """
        Up to C{limit} messages, waiting up to C{timeout} seconds for the
        first; a Deferred of a L{GroupBatch}.  The caller holds L{lock}.
        """
        request = TakeRequest(limit, timeout)
        d: Deferred = Deferred()
        # The thread answers within its deadline unless it is stuck on a
        # broker request; then the poll fails rather than hang.
        guard = self.connector.reactor.callLater(timeout + self.requestTimeout + 1.0, self.abandon, request)
        self.requests[request.id] = (d, guard)
        self.send("take", request)
        return d

    def abandon(self, request: TakeRequest) -> None:
        """
        The thread did not answer C{request} in time.
        """
        request.abandoned = True
        entry = self.requests.pop(request.id, None)
        if entry is not None:
            entry[0].errback(EndpointUnavailable(
                f"Kafka did not answer the poll of consumer group {self.group} in time",
                retryAfter=self.connector.retryAfter))

    def taken(self, requestId: int, messages: List[Message], first: Cursor, cursor: Cursor) -> None:
        """
        On the reactor: the thread's answer to a take.
        """
        entry = self.requests.pop(requestId, None)
        if entry is None:
            # Abandoned meanwhile: nobody will see these; read them again.
            if messages:
                self.send("putBack", messages)
            return
        d, guard = entry
        if guard.active():
            guard.cancel()
        self.lastCursor = cursor
        d.callback(GroupBatch(self, messages, first, cursor))

    def tookFailed(self, requestId: int, failure: Failure) -> None:
        """
        On the reactor: the thread could not read for a take.
        """
        entry = self.requests.pop(requestId, None)
        if entry is not None:
            if entry[1].active():
                entry[1].cancel()
            entry[0].errback(failure)

    def commit(self, offsets: Mapping[int, int]) -> Deferred:
        """
        Commit C{offsets} (partition to next offset) on the thread, then
        release the poll lock.
        """
        d: Deferred = Deferred()
        if not offsets:
            self.release()
            d.callback(None)
            return d
        commitId = next(self._commitIds)
        self.commits[commitId] = d
        self.send("commit", commitId, dict(offsets))
        d.addErrback(self._commitFailed)
        d.addBoth(self._released)
        return d

    def committed(self, commitId: int, error: Optional[str]) -> None:
        """
        On the reactor: a commit finished, with C{error} if it failed.
        """
        d = self.commits.pop(commitId, None)
        if d is None:
            return
        if error is None:
            d.callback(None)
        else:
            d.errback(EndpointUnavailable(f"committing the position of consumer group {self.group} failed: "
                                          f"{error}", retryAfter=self.connector.retryAfter))

    def _commitFailed(self, failure: Failure) -> None:
        self.log.warn("Kafka endpoint {endpoint}: {reason}; the group reads those messages again",
                      endpoint=self.connector.name, reason=failure.getErrorMessage())

    def _released(self, result: Any) -> Any:
        self.release()
        return result

    def putBack(self, messages: List[Message]) -> None:
        """
        Return C{messages} to the front of the buffer, and release the poll
        lock.
        """
        if messages:
            self.send("putBack", messages)
        self.release()

    def release(self) -> None:
        """
        The poll that held the lock has ended; idle time starts.
        """
        if self.lock.locked:
            self.lock.release()
        self.touch()

    def touch(self) -> None:
        """
        (Re)start the idle timer.
        """
        if self.idleCall is not None and self.idleCall.active():
            self.idleCall.cancel()
        self.idleCall = None
        if self.stopped:
            return
        self.idleCall = self.connector.reactor.callLater(
            self.connector.options["group-idle-timeout"], self.idle)

    def idle(self) -> None:
        """
        Nobody polled for C{group-idle-timeout}: leave the group.
        """
        self.idleCall = None
        if self.lock.locked or self.lock.waiting:
            self.touch()
            return
        self.close()

    def close(self) -> None:
        """
        Leave the group and end the thread.  Idempotent.
        """
        if self.idleCall is not None and self.idleCall.active():
            self.idleCall.cancel()
        self.idleCall = None
        self.connector.groupClosing(self)
        for requestId in list(self.requests):
            self.tookFailed(requestId, Failure(EndpointUnavailable(
                "the consumer group reader is closing", retryAfter=self.connector.retryAfter)))
        self.stop()

    # the owner thread

    def open(self) -> None:
        super().open()
        self.consumer.subscribe([self.topic], on_assign=self.onAssign, on_revoke=self.onRevoke,
                                on_lost=self.onRevoke)

    def onAssign(self, consumer: Any, partitions: Sequence[Any]) -> None:
        """
        Rebalance (on this thread, inside poll): partitions are ours now.
        """
        self.assigned.update(tp.partition for tp in partitions)
        self.connector.observeBroker(True)

    def onRevoke(self, consumer: Any, partitions: Sequence[Any]) -> None:
        """
        Rebalance: partitions are taken away; their buffered records are
        dropped (the new owner reads them from the committed position).
        """
        gone = {tp.partition for tp in partitions}
        self.assigned -= gone
        self.buffer = [m for m in self.buffer if m.partition not in gone]

    def step(self) -> None:
        request = self.pendingTake
        if request is not None:
            self.serveTake(request)
            return
        # Nobody waits for records now (librdkafka fetches them meanwhile):
        # take what is there, serving rebalances, then sleep on the command
        # queue, so that the next take or commit starts at once rather than
        # after a blocking poll.  A full buffer still polls, for the group's
        # sake, taking one record per turn at most; the partitions are never
        # paused, which would drop what librdkafka prefetched and cost the
        # next take a fetch (fetch.wait.max.ms, 500 ms by default).
        self.pollInto(0.0)
        self.runCommands(self.pollTimeout)

    def pollInto(self, timeout: float, upTo: int = 0) -> None:
        """
        Poll once (serving rebalances), waiting at most C{timeout} for a
        record, then take what else is there at once, up to the buffer's
        bound (or C{upTo}, for a take that wants more); buffer the records.
        """
        record = self.consumer.poll(timeout)
        if record is None:
            return
        records = [record]
        room = max(self.batchSize, upTo) - len(self.buffer) - 1
        if room > 0:
            records.extend(self.consumer.consume(room, 0))
        for record in records:
            error = record.error()
            if error is None:
                self.buffer.append(toMessage(record))
            else:
                self.recordError(error)
        if len(self.buffer):
            self.connector.observeBroker(True)

    def recordError(self, error: Any) -> None:
        """
        React to an error the consumer returned in place of a record.
        """
        code = error.code()
        known = codes()
        if code in (known.ALL_BROKERS_DOWN, known.TRANSPORT):
            self.connector.observeBroker(False, error.str())
        elif code in known.NOT_AUTHORIZED:
            raise EndpointUnavailable(f"Kafka refuses consumer group {self.group} on topic {self.topic}: "
                                      f"{error.str()}", retryAfter=self.connector.retryAfter)
        elif code != known.PARTITION_EOF:
            self.fromThread(self.log.warn, "Kafka endpoint {endpoint}: group {group}: {error}",
                            endpoint=self.connector.name, group=self.group, error=error.str())

    def do_take(self, request: TakeRequest) -> None:
        """
        Command: take up to C{request.limit} messages, as soon as there is
        one or at the request's timeout.  The take stays pending over the
        following steps, which poll for it (and still serve commands).
        """
        if self.pendingTake is not None:
            # Only one take at a time reaches a reader (the poll lock); an
            # earlier one was abandoned by the reactor.
            self.pendingTake.abandoned = True
        self.pendingTake = request
        self.takeDeadline = self.now() + request.timeout
        if len(self.buffer) < request.limit:
            # What librdkafka already has fills the page up to its limit.
            try:
                self.pollInto(0.0, request.limit)
            except Exception:
                self.pendingTake = None
                self.fromThread(self.tookFailed, request.id, Failure())
                return
        if not self.buffer and request.limit > 0:
            self.serveTake(request, 0.0)
        else:
            self.answerTake(request)

    def serveTake(self, request: TakeRequest, wait: Optional[float] = None) -> None:
        """
        Poll for the pending take; answer it once there is a message or its
        time is up.
        """
        if request.abandoned:
            self.pendingTake = None
            return
        left = self.takeDeadline - self.now()
        try:
            self.pollInto(max(0.0, min(self.pollTimeout if wait is None else wait, left)))
        except Exception:
            self.pendingTake = None
            self.fromThread(self.tookFailed, request.id, Failure())
            return
        if self.buffer or left <= 0 or self.stopRequested.is_set():
            self.answerTake(request)

    def answerTake(self, request: TakeRequest) -> None:
        """
        Hand the pending take its messages.
        """
        self.pendingTake = None
        taken, self.buffer = self.buffer[:request.limit], self.buffer[request.limit:]
        if request.abandoned:
            self.buffer[:0] = taken
            return
        after = self.positions()
        first = dict(after.offsets)
        for message in reversed(taken):
            first[message.partition] = message.offset
        self.fromThread(self.taken, request.id, taken, Cursor.fromMapping(first), after)

    def positions(self) -> Cursor:
        """
        Per partition this member owns, the offset of the next message not
        yet returned to a client (where the position is known).
        """
        nextOffsets: Dict[int, int] = {}
        for message in self.buffer:
            nextOffsets.setdefault(message.partition, message.offset)
        missing = [p for p in sorted(self.assigned) if p not in nextOffsets]
        if missing:
            for tp in self.consumer.position([self.tp(p) for p in missing]):
                if tp.offset >= 0:
                    nextOffsets[tp.partition] = tp.offset
        return Cursor.fromMapping(nextOffsets)

    def do_commit(self, commitId: int, offsets: Mapping[int, int]) -> None:
        """
        Command: commit C{offsets} synchronously.
        """
        try:
            self.consumer.commit(offsets=[self.tp(p, o) for p, o in sorted(offsets.items())],
                                 asynchronous=False)
        except Exception as e:
            self.fromThread(self.committed, commitId, _kafkaReason(e))
        else:
            self.fromThread(self.committed, commitId, None)

    def do_putBack(self, messages: List[Message]) -> None:
        """
        Command: put C{messages} back at the front of the buffer (those of
        partitions still ours).
        """
        self.buffer[:0] = [m for m in messages if m.partition in self.assigned]


# ----------------------------------------------------------------- connector


class _Batch:
    """
    A batch of publishes waiting for their delivery reports: one entry, one
    timer and one Deferred for all of them.

    @ivar results: per record, L{None} until its report, then the
        L{Position} or the L{Problem}.
    """

    __slots__ = ("deferred", "timer", "topic", "results", "waiting")

    def __init__(self, deferred: Deferred, topic: str, results: List[Any], waiting: int) -> None:
        self.deferred = deferred
        self.topic = topic
        self.results = results
        self.waiting = waiting
        self.timer: Any = None


class _Publish:
    """
    A publish waiting for its delivery report.
    """

    __slots__ = ("deferred", "timer", "topic")

    def __init__(self, deferred: Deferred, topic: str) -> None:
        self.deferred = deferred
        self.topic = topic
        self.timer: Any = None


@implementer(IConnector, IConsumerGroups, IRetainedLog)
class KafkaConnector(Service):
    """
    An endpoint of C{type = kafka}.

    @ivar connected: whether a broker answered last (a delivery, metadata,
        records, or librdkafka's statistics showing a broker up), rather
        than librdkafka reporting every broker down.
    """

    kind = "kafka"
    log = Logger()

    def __init__(self, name: str, options: Mapping[str, Any], reactor: Any,
                 clients: Optional[Any] = None,
                 startThread: Callable[[Callable[[], None], str], None] = startDaemonThread) -> None:
        self.name = name  # type: ignore[assignment]  # Service declares it None
        self.options = options
        self.reactor = reactor
        self.clients = clients if clients is not None else ConfluentClients()
        self.startThread = startThread
        self.retryAfter: int = options["retry-after"]
        self.connected = False
        self.known = False
        self.brokerReason = "the gateway has not reached the broker yet"
        self.transportError = ""
        self.librdkafkaLog = LibrdkafkaLog(self)
        self.producerThread: Optional[ProducerThread] = None
        self.readers: Set[ConsumerThread] = set()
        self.groups: Dict[Tuple[str, str], GroupReader] = {}
        self._pending: Dict[int, Any] = {}  # _Publish or _Batch
        # Delivery reports collected on the producer thread, which alone
        # touches this list (see handOverReports).
        self._reports: List[Tuple[Any, ...]] = []
        self._tokens = itertools.count(1)
        self._stopping = False
        self._warnedTimeout = False
        self._reported: Tuple[Optional[bool], float] = (None, 0.0)

    def epoch(self) -> int:
        return 0

    # lifecycle

    def startService(self) -> None:
        # The producer is made here, not in __init__: twistd builds the
        # service before it daemonizes, and librdkafka's threads would not
        # survive the fork.
        Service.startService(self)
        self._stopping = False
        try:
            self.producerThread = ProducerThread(self)
        except Exception:
            self.log.failure("Kafka endpoint {endpoint}: cannot create the producer", endpoint=self.name)
            return
        self.startThread(self.producerThread.run, f"evgate-kafka-producer-{self.name}")
        self.startThread(self.producerThread.probe, f"evgate-kafka-probe-{self.name}")

    def stopService(self) -> Deferred:
        """
        Close every reader, flush the producer, and fire once their threads
        ended, or after C{shutdown-timeout} (plus a second) in any case.
        """
        Service.stopService(self)
        self._stopping = True
        exits = []
        for group in list(self.groups.values()):
            group.close()
        for reader in list(self.readers):
            if isinstance(reader, AssignedReader):
                reader.close()
            else:
                reader.stop()
            exits.append(reader.whenExited())
        producer = self.producerThread
        if producer is not None:
            producer.stopRequested.set()
            exits.append(producer.exits.when())
        done: Deferred = Deferred()
        remaining = [len(exits)]

        def oneExited(_: Any) -> None:
            remaining[0] -= 1
            if remaining[0] == 0 and not done.called:
                giveUp.cancel()
                done.callback(None)

        def gaveUp() -> None:
            self.log.warn("Kafka endpoint {endpoint}: {count} client thread(s) did not end within "
                          "{seconds} s (is the broker gone?); leaving them behind",
                          endpoint=self.name, count=remaining[0], seconds=self.options["shutdown-timeout"])
            done.callback(None)

        giveUp = self.reactor.callLater(self.options["shutdown-timeout"] + 1.0, gaveUp)
        for d in exits:
            d.addCallback(oneExited)
        if not exits:
            giveUp.cancel()
            done.callback(None)
        done.addCallback(self._stopped)
        return done

    def _stopped(self, _: Any) -> None:
        self.producerThread = None
        for token in list(self._pending):
            self._settle(token, EndpointUnavailable(
                "the gateway stopped before Kafka acknowledged; the message may or may not have been stored",
                retryAfter=self.retryAfter))

    def fromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """
        Run C{f} on the reactor thread: the one way client threads reach
        Twisted.
        """
        try:
            self.reactor.callFromThread(f, *args, **kwargs)
        except Exception:  # the reactor is gone (a thread left behind at exit)
            pass

    def forget(self, reader: ConsumerThread) -> None:
        """
        A reader's thread ended.
        """
        self.readers.discard(reader)
        if isinstance(reader, GroupReader):
            self.groupClosing(reader)

    # broker state, from any thread

    def observeBroker(self, up: bool, reason: str = "") -> None:
        """
        A client thread saw the broker up or down; the reactor learns of
        changes (at most every second per repeat, so a broker that is down
        does not flood the reactor).
        """
        last, when = self._reported
        now = time.monotonic()
        if up == self.connected and last == up:
            return
        if last == up and now - when < 1.0:
            return
        self._reported = (up, now)
        self.fromThread(self._setConnected, up, reason)

    def _setConnected(self, up: bool, reason: str = "") -> None:
        if reason and not up:
            self.brokerReason = reason
        if up == self.connected and self.known:
            return
        self.connected = up
        self.known = True
        if up:
            self.log.info("Kafka endpoint {endpoint}: broker reachable at {servers}",
                          endpoint=self.name, servers=self.options["librdkafka"]["bootstrap.servers"])
        else:
            self.log.warn("Kafka endpoint {endpoint}: broker unreachable: {reason}",
                          endpoint=self.name, reason=self.brokerReason)

    def onClientError(self, error: Any) -> None:
        """
        confluent-kafka's C{error_cb}, on a client thread.
        """
        code = error.code()
        known = codes()
        if code == known.ALL_BROKERS_DOWN:
            # "1/1 brokers are down" says less than the connection error
            # that came just before it.
            self.observeBroker(False, self.transportError or error.str())
        elif code == known.AUTHENTICATION:
            self.observeBroker(False, error.str())
        elif code == known.TRANSPORT:
            # One connection failing is not the cluster being gone; but its
            # reason is the useful one when they all are.
            self.transportError = error.str()
        elif getattr(error, "fatal", lambda: False)():
            self.observeBroker(False, error.str())
            self.fromThread(self.log.error, "Kafka endpoint {endpoint}: fatal client error: {error}",
                            endpoint=self.name, error=error.str())

    def onStatistics(self, text: str) -> None:
        """
        confluent-kafka's C{stats_cb}, on a client thread: any broker up
        means connected.
        """
        try:
            brokers = json.loads(text).get("brokers", {})
        except ValueError:
            return
        if any(broker.get("state") == "UP" for broker in brokers.values()):
            self.observeBroker(True)

    # publishing

    def publish(self, topic: str, draft: Draft, timeout: float = 10.0) -> Deferred:
        """
        Enqueue C{draft} on the shared producer; the Deferred fires on the
        reactor thread with the L{Position} of the delivery report.
        """
        producer = self.producerThread
        if producer is None or self._stopping:
            return fail(EndpointUnavailable(f"Kafka endpoint {self.name} is not running",
                                            retryAfter=self.retryAfter))
        if not self._warnedTimeout and producer.messageTimeout > timeout * 1000:
            self._warnedTimeout = True
            self.log.warn("Kafka endpoint {endpoint}: message.timeout.ms ({ms:.0f}) is longer than the publish "
                          "timeout ({seconds:g} s): during a broker outage publishers get 504, not 503",
                          endpoint=self.name, ms=producer.messageTimeout, seconds=timeout)
        token = next(self._tokens)
        try:
            producer.produce(topic, draft, self._reportFor(token))
        except BufferError:
            return fail(EndpointUnavailable(
                f"the Kafka producer of endpoint {self.name} has too many messages waiting for the broker "
                "(queue.buffering.max.messages / queue.buffering.max.kbytes); retry shortly",
                retryAfter=self.retryAfter))
        except Exception as e:
            error = kafkaError(e)
            if error is None:
                raise
            return fail(self.problemFor(error, topic))
        d: Deferred = Deferred(lambda _: self._forget(token))
        pending = self._pending[token] = _Publish(d, topic)
        pending.timer = self.reactor.callLater(timeout, self._timedOut, token, timeout)
        return d

    def publishMany(self, topic: str, drafts: Sequence[Draft], timeout: float = 10.0) -> Deferred:
        """
        Enqueue every draft on the shared producer, in order, under one
        token and one timer; the Deferred fires once every record has its
        delivery report (or the timeout passed) with one L{Position} or
        L{Problem} per draft.  Records that librdkafka refuses at once (its
        queue is full) get their problem without being sent.
        """
        producer = self.producerThread
        count = len(drafts)
        if producer is None or self._stopping:
            down = EndpointUnavailable(f"Kafka endpoint {self.name} is not running", retryAfter=self.retryAfter)
            return succeed([down] * count)
        token = next(self._tokens)
        results: List[Any] = [None] * count
        reports = self._reports
        handOver = self.handOverReports

        def report(index: int, error: Any, record: Any) -> None:
            # On the producer thread, like _reportFor's reports.
            if error is None:
                reports.append((token, index, record.partition(), record.offset()))
            else:
                reports.append((token, index, error, None))
            if len(reports) >= REPORT_BATCH:
                handOver()

        waiting = count
        index = 0
        while index < count:
            index, exception = producer.produceMany(topic, drafts, index, report)
            if exception is None:
                break
            if isinstance(exception, BufferError):
                # The queue is full: the rest are not tried.
                refused = EndpointUnavailable(
                    f"the Kafka producer of endpoint {self.name} has too many messages waiting for the "
                    "broker (queue.buffering.max.messages / queue.buffering.max.kbytes); retry shortly",
                    retryAfter=self.retryAfter)
                for rest in range(index, count):
                    results[rest] = refused
                waiting -= count - index
                break
            error = kafkaError(exception)
            if error is None:
                raise exception
            results[index] = self.problemFor(error, topic)
            waiting -= 1
            index += 1
        if not waiting:
            return succeed(results)
        d: Deferred = Deferred(lambda _: self._forget(token))
        pending = self._pending[token] = _Batch(d, topic, results, waiting)  # type: ignore[assignment]
        pending.timer = self.reactor.callLater(timeout, self._timedOut, token, timeout)
        return d

    def _reportFor(self, token: int) -> Callable[[Any, Any], None]:
        # The delivery report runs on the producer thread; everything it
        # needs is read there and handed to the reactor.
        fromThread = self.fromThread
        delivered = self._delivered

        reports = self._reports

        def report(error: Any, record: Any) -> None:
            # Collected here, on the producer thread, and handed to the
            # reactor once per poll (handOverReports): one reactor wake-up
            # per batch of acknowledgements rather than one per message.
            if error is None:
                reports.append((token, None, Position(record.topic(), record.partition(), record.offset())))
            else:
                reports.append((token, error, None))
            if len(reports) >= REPORT_BATCH:
                self.handOverReports()

        del fromThread, delivered
        return report

    def handOverReports(self) -> None:
        """
        On the producer thread: hand the delivery reports collected since
        the last call to the reactor, in one call.
        """
        reports = self._reports
        if reports:
            batch = reports[:]
            del reports[:]
            self.fromThread(self._deliveredAll, batch)

    def _deliveredAll(self, batch: List[Tuple[Any, ...]]) -> None:
        pending = self._pending
        delivered = False
        for report in batch:
            if len(report) == 3:
                self._delivered(*report)
                continue
            # The report of one record of a publishMany batch.
            token, index, partitionOrError, offset = report
            entry = pending.get(token)
            if entry is None or entry.results[index] is not None:
                continue
            if offset is None:
                entry.results[index] = self.problemFor(partitionOrError, entry.topic)
            else:
                delivered = True
                entry.results[index] = Position(entry.topic, partitionOrError, offset)
            entry.waiting -= 1
            if entry.waiting == 0:
                self._settle(token, entry.results)
        if delivered:
            self._setConnected(True)

    def _delivered(self, token: int, error: Any, position: Optional[Position]) -> None:
        if error is None:
            self._setConnected(True)
            self._settle(token, position)
            return
        pending = self._pending.get(token)
        if pending is not None:
            self._settle(token, self.problemFor(error, pending.topic))

    def _settle(self, token: int, result: Any) -> None:
        pending = self._pending.pop(token, None)
        if pending is None:
            return
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        if isinstance(result, Exception):
            pending.deferred.errback(result)
        else:
            pending.deferred.callback(result)

    def _forget(self, token: int) -> None:
        # The publisher cancelled (its own timeout); a late report is dropped.
        pending = self._pending.pop(token, None)
        if pending is not None and pending.timer is not None and pending.timer.active():
            pending.timer.cancel()

    def _timedOut(self, token: int, timeout: float) -> None:
        pending = self._pending.get(token)
        if pending is None:
            return
        pending.timer = None
        if not self.connected:
            problem: Problem = self.unreachable(f"no acknowledgement within {timeout:g} s")
        else:
            problem = EndpointTimeout(f"Kafka did not acknowledge within {timeout:g} s; "
                                      "the message may or may not have been stored")
        if isinstance(pending, _Batch):
            results = pending.results
            for index, result in enumerate(results):
                if result is None:
                    results[index] = problem
            self._settle(token, results)
            return
        self._settle(token, problem)

    def unreachable(self, what: str) -> EndpointUnavailable:
        """
        The 503 of a publish while the broker is unreachable.
        """
        return EndpointUnavailable(
            f"Kafka endpoint {self.name} cannot reach the broker ({self.brokerReason}); {what}",
            retryAfter=self.retryAfter)

    def problemFor(self, error: Any, topic: str) -> Problem:
        """
        The client's answer to a failed publish of the librdkafka
        C{error}.
        """
        code = error.code()
        known = codes()
        if code == known.MSG_TIMED_OUT:
            if not self.connected:
                return self.unreachable("the message was not stored (message.timeout.ms passed); "
                                        "retry when it is back")
            return EndpointTimeout("Kafka did not acknowledge within message.timeout.ms; "
                                   "the message may or may not have been stored",
                                   extra={"brokerError": error.name()})
        if code in known.MSG_SIZE_TOO_LARGE:
            return PayloadTooLarge(f"Kafka refuses the message as too large for topic {topic}: {error.str()}",
                                   extra={"brokerError": error.name()})
        if code in known.PURGED:
            return EndpointUnavailable("the gateway is stopping; the message was not stored",
                                       retryAfter=self.retryAfter, extra={"brokerError": error.name()})
        return EndpointUnavailable(f"Kafka refused the message for topic {topic}: {error.str()}",
                                   retryAfter=self.retryAfter, extra={"brokerError": error.name()})

    # subscribing

    def subscribe(self, topic: str, start: Start, sink: IUpstreamSink) -> AssignedReader:
        """
        Read C{topic} from C{start} into C{sink} on a reader thread of its
        own.
        """
        reader = AssignedReader(self, topic, start, sink)
        if self._stopping:
            reader.closed = True
            self.reactor.callLater(0, sink.failed, Failure(EndpointUnavailable(
                f"Kafka endpoint {self.name} is not running", retryAfter=self.retryAfter)))
            return reader
        self.readers.add(reader)
        reader.start()
        return reader

    # group mode

    def groupId(self, group: str) -> str:
        """
        The Kafka consumer group of the evgate group name C{group}.
        """
        return f"{self.options['group-prefix']}.{group}"

    def groupPoll(self, topic: str, group: str, limit: int, timeout: float,
                  start: str = "latest") -> Deferred:
        """
        Read C{topic} as a member of the consumer group
        C{<group-prefix>.<group>}: up to C{limit} messages, answering as
        soon as there is one or after C{timeout} seconds.

        The reader of a (topic, group) is kept between polls and closed
        after C{group-idle-timeout} seconds without one.  Polls of one group
        take turns: a poll that cannot get its turn within C{timeout} gets
        an empty batch.

        @param start: where a group without a committed position starts.
        @return: a Deferred of a L{GroupBatch}, which the caller must
            C{commit()} (after the client has the messages) or
            C{putBack()}.
        """
        if self._stopping:
            return fail(EndpointUnavailable(f"Kafka endpoint {self.name} is not running",
                                            retryAfter=self.retryAfter))
        groupId = self.groupId(group)
        reader = self.groups.get((topic, groupId))
        if reader is None:
            reader = self.groups[(topic, groupId)] = GroupReader(self, topic, groupId, start)
            self.readers.add(reader)
            reader.start()
        reader.touch()
        began = self.reactor.seconds()
        turn = reader.lock.acquire()
        turn.addTimeout(timeout, self.reactor)

        def haveTurn(_: Any) -> Deferred:
            left = max(0.0, timeout - (self.reactor.seconds() - began))
            d = reader.take(limit, left)
            d.addErrback(self._releaseOnError, reader)
            return d

        def noTurn(failure: Failure) -> GroupBatch:
            failure.trap(CancelledError, TimeoutError)
            return GroupBatch(None, [], reader.lastCursor, reader.lastCursor)

        turn.addCallbacks(haveTurn, noTurn)
        return turn

    def _releaseOnError(self, failure: Failure, reader: GroupReader) -> Failure:
        reader.release()
        return failure

    def groupClosing(self, reader: GroupReader) -> None:
        """
        Forget a group reader that is closing.
        """
        for key, value in list(self.groups.items()):
            if value is reader:
                del self.groups[key]


