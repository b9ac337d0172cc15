"""
What every Kafka client thread shares: the client factory, librdkafka's
error codes, the conversion of a record to a L{Message}, and librdkafka's
log lines.
"""

from __future__ import annotations

import base64
import re
import time
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

from twisted.logger import Logger, LogLevel

from evgate.connectors.kafka._options import _confluent
from evgate.message import NO_EXTRA, Message
from evgate.threads import callOnReactor

if TYPE_CHECKING:
    from evgate.connectors.kafka._connector import KafkaConnector


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


class _Codes:
    """
    librdkafka error codes, looked up once confluent-kafka is imported.
    """

    def __init__(self) -> None:
        error = _confluent().KafkaError
        self.ALL_BROKERS_DOWN = error._ALL_BROKERS_DOWN
        self.TRANSPORT = error._TRANSPORT
        self.SSL = error._SSL
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


def toMessage(record: Any, topic: Optional[str] = None) -> Message:
    """
    The L{Message} of a record consumed from Kafka (of C{topic}, if the
    caller knows it: one string shared by every message of a reader).

    Kafka keys and header values are bytes.  Those that are UTF-8 become
    text; the others are given as base64, and the metadata says so:
    C{keyEncoding: "base64"}, and C{headerEncoding: {name: "base64"}}.  A
    header name may repeat, and every one of its values is kept in order;
    C{headerEncoding} names a name, not one of its values, so when any value
    of a name is not UTF-8 all the values of that name are given as base64
    (otherwise a reader could not tell which to decode).  A null header value
    becomes C{""}; a null value (a tombstone) becomes empty content with
    C{tombstone: true}.
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
    pairs = record.headers()
    headers: Tuple[Tuple[str, str], ...] = ()
    if pairs:
        headers, binary = _headerTexts(pairs)
        if binary is not None:
            if extra is None:
                extra = {}
            extra["headerEncoding"] = binary
    content = record.value()
    if content is None:
        content = b""
        if extra is None:
            extra = {}
        extra["tombstone"] = True
    kind, stamp = record.timestamp()
    # Made as the tuple it is: a named tuple's own constructor is a Python
    # function, and this runs once per record read.
    return _newTuple(Message, (content, key, headers, topic if topic is not None else record.topic(),
                               record.partition(), record.offset(), stamp if kind and stamp >= 0 else 0,
                               extra if extra is not None else NO_EXTRA, None, False))


_newTuple = tuple.__new__


def _headerTexts(pairs: Any) -> Tuple[Tuple[Tuple[str, str], ...], Optional[Dict[str, str]]]:
    """
    The headers of a record as text (see L{toMessage}), and the names
    given as base64 (L{None} when there is none).
    """
    headers: List[Tuple[str, str]] = []
    binary: Optional[Dict[str, str]] = None
    for name, raw in pairs:
        if raw is None:
            headers.append((name, ""))
            continue
        try:
            headers.append((name, raw.decode("utf-8")))
        except UnicodeDecodeError:
            headers.append((name, base64.b64encode(raw).decode("ascii")))
            if binary is None:
                binary = {}
            binary[name] = "base64"
    if binary is not None:
        # Rare: encode again, every value of a binary name as base64.
        headers = [(name, base64.b64encode(raw or b"").decode("ascii") if name in binary else text)
                   for (name, raw), (_, text) in zip(pairs, headers, strict=True)]
    return tuple(headers), binary


# "(after 330ms in state AUTH_REQ)": differs on every retry of the same
# failure, so it is left out of reasons and of the repeat check of log lines.
_TIMING = re.compile(r"\s*\(after \d+ms in state [A-Z_]+(, \d+ identical error\(s\) suppressed)?\)")
# The broker's TLS alerts that mean it refused the client's certificate.
_CERTIFICATE_ALERT = re.compile(r"alert (bad certificate|certificate unknown|certificate expired|"
                                r"unknown ca|certificate required|certificate revoked|handshake failure|"
                                r"access denied)", re.IGNORECASE)

# librdkafka's log lines about the failures refusalOf names.
_REFUSAL_LINE = re.compile("SASL authentication error|SSL handshake failed|certificate verify failed|"
                           + _CERTIFICATE_ALERT.pattern,
                           re.IGNORECASE)


def withoutTiming(text: str) -> str:
    """
    C{text} without librdkafka's C{(after Nms in state X)}.
    """
    return _TIMING.sub("", text)


def refusalOf(code: int, text: str) -> Optional[str]:
    """
    Why the broker refuses the gateway, for a librdkafka error that means
    it was reached but will not let the gateway in (authentication, TLS),
    with what to check; L{None} for any other error (a broker that is down
    is not a refusal).
    """
    known = codes()
    text = withoutTiming(text)
    if code == known.AUTHENTICATION:
        return (f"authentication failed: {text} (check sasl.mechanism, sasl.username and "
                "sasl.password-file)")
    if code == known.SSL:
        if "certificate verify failed" in text:
            return (f"TLS failed: the broker's certificate is not trusted: {text} (check ssl.ca.location and "
                    "that the bootstrap address matches the certificate)")
        return f"TLS failed: {text} (check the ssl.* properties)"
    if code == known.TRANSPORT and _CERTIFICATE_ALERT.search(text):
        return (f"TLS failed: the broker refused the client certificate: {text} (check "
                "ssl.certificate.location and ssl.key.location: expired, or not signed by a CA the broker "
                "trusts?)")
    return None


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
        key = withoutTiming(re.sub(r"\[rdkafka#[a-z]+-\d+\]\s*", "", text))
        if key.startswith("FAIL ") and _REFUSAL_LINE.search(key):
            # The error callback brings the same news, and the connector
            # logs it once (KafkaConnector.refusedBy); librdkafka says it on
            # every retry, from every client.
            return
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
        callOnReactor(self.connector.reactor, self.twistedLog.emit, twisted, "Kafka endpoint {endpoint}: {line}",
                      endpoint=self.connector.name, line=key)

    def log(self, level: int, fmt: str, *args: Any) -> None:
        # confluent-kafka's logger protocol (logging.Logger.log); called by
        # the client's own thread, inside poll().
        try:
            self.log_(level, fmt % args if args else fmt)
        except Exception:  # a log line must never break a client thread
            pass
