"""
A subscription's dead letters: reading them back from the API's
dead-letter destination (C{dlq = <endpoint>/<topic>}) and delivering them
to the subscription's callback once more.

What is there to read: L{evgate.webhook.delivery.Deliverer} publishes every
message it gives up on to the dlq topic as it was read (content, key,
headers), with C{evgate-dlq-*} headers added that name the subscription,
the API, the reason (C{rejected}, C{attempts-exhausted}, or the slug of a
delivery step that failed on it), the last HTTP status and error, the
number of attempts, where the message was (topic, partition, offset,
timestamp) and its C{webhook-id}.  The dlq topic is shared by every
subscription of the API (and may be by several APIs), so a page is the
records of one subscription among those scanned.

Reading: a throw-away upstream subscription of the dlq endpoint
(L{readDeadLetters}) from a cursor, ended once it has scanned
L{SCAN_LIMIT} records, reached the head the endpoint knows of, or heard
nothing for L{QUIET} seconds.  Dead letters are records of a log: reading
them changes nothing, and neither does redelivering them (a redelivered
dead letter stays in the dlq; the answer says which went through).

Redelivering (L{Redelivery}): each record once, through the same signed
request a deliverer makes (L{evgate.webhook.headers.deliveryHeaders}: the
subscription's secret and headers, the message's original C{webhook-id}
so that a receiver's de-duplication recognises it), on the node's guarded
HTTP client; at most C{webhook.max-in-flight} at a time.  No retries: the
outcome of each is reported, and the operator decides.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from treq import collect
from twisted.internet.defer import Deferred, DeferredSemaphore, fail, gatherResults
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES
from zope.interface import implementer

from evgate.deadlines import atDeadline
from evgate.errors import EndpointUnavailable
from evgate.interfaces import IHeadOffsets, IUpstreamSink
from evgate.message import Cursor, Message, contentForJSON, cursorTag, headerObject
from evgate.pipeline import StepError
from evgate.pipeline.cloudevents import webhookCloudEvent
from evgate.webhook.client import ResponseDrain, describeFailure
from evgate.webhook.headers import deliveryHeaders
from evgate.webhook.retry import DELIVERED, classifyStatus

# Records of the dlq topic one read looks at, at most.
SCAN_LIMIT = 2000

# Seconds without a record after which a read counts as having reached the
# end (for endpoints that do not say where their head is).
QUIET = 0.5

# Seconds a read may take in all.
READ_TIMEOUT = 10.0

# Characters of a dead letter's content shown in a page.
PREVIEW_CHARS = 512

PREFIX = "evgate-dlq-"

# Reasons a receiver gave or caused: redelivering makes sense.  Any other
# reason is a delivery step that failed on the message, whose content is
# what the API does not mean to show: it is not sent.
REDELIVERABLE = frozenset({"rejected", "attempts-exhausted"})


def deadLetterTag(api: str, topic: str) -> bytes:
    """
    The cursor tag of API C{api}'s dead letters on C{topic}: a cursor of
    the dlq is not mistaken for one of the API's stream, nor the other
    way round.
    """
    return cursorTag(f"{api}#dead-letters", topic)


def positionText(message: Message) -> str:
    """
    The C{position} of a dead letter: C{<partition>:<offset>} in the dlq.
    """
    return f"{message.partition}:{message.offset}"


def parsePosition(text: Any) -> Tuple[int, int]:
    """
    A C{<partition>:<offset>} position.

    @raise ValueError: if C{text} is not one.
    """
    if not isinstance(text, str):
        raise ValueError("a position is a string <partition>:<offset>")
    partition, sep, offset = text.partition(":")
    if not sep or not partition.isdigit() or not offset.isdigit():
        raise ValueError(f"{text[:40]!r} is not a position <partition>:<offset>")
    return int(partition), int(offset)


def dlqHeaders(message: Message) -> Dict[str, str]:
    """
    The C{evgate-dlq-*} headers of a dead letter, without the prefix.
    """
    return {name[len(PREFIX):]: value for name, value in message.headers if name.startswith(PREFIX)}


def subscriptionOf(message: Message) -> Optional[str]:
    """
    The id of the subscription a dlq record is a dead letter of, or
    L{None} for a record that is not one.
    """
    for name, value in message.headers:
        if name == PREFIX + "subscription":
            return value
    return None


def _ms(text: Optional[str]) -> Optional[int]:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _time(ms: Optional[int]) -> Optional[str]:
    if ms is None:
        return None
    moment = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def original(message: Message) -> Message:
    """
    The message a dead letter was made of: its content, key and own
    headers, where it was read.
    """
    meta = dlqHeaders(message)
    return Message(
        content=message.content, key=message.key,
        headers=tuple((n, v) for n, v in message.headers if not n.startswith(PREFIX)),
        topic=meta.get("topic", ""), partition=_ms(meta.get("partition")) or 0,
        offset=_ms(meta.get("offset")) or 0, timestamp=_ms(meta.get("timestamp")) or 0)


def deadLetterView(message: Message) -> Dict[str, Any]:
    """
    What the admin API shows of one dead letter: where it is in the dlq,
    why it is there, where the message was, and a preview of its content.
    """
    meta = dlqHeaders(message)
    first = original(message)
    preview, encoding = contentForJSON(message.content[:PREVIEW_CHARS * 4])
    status = _ms(meta.get("status"))
    return {
        "position": positionText(message),
        "deadLetteredAt": _time(message.timestamp),
        "reason": meta.get("reason"),
        "status": status,
        "error": meta.get("error"),
        "attempts": _ms(meta.get("attempts")),
        "redeliverable": meta.get("reason") in REDELIVERABLE,
        "message": {
            "id": meta.get("message-id"),
            "topic": first.topic,
            "partition": first.partition,
            "offset": first.offset,
            "publishedAt": _time(first.timestamp),
            "key": first.key,
            "headers": headerObject(first.headers),
        },
        "size": len(message.content),
        "preview": preview[:PREVIEW_CHARS],
        "previewEncoding": encoding,
        "truncated": len(message.content) > PREVIEW_CHARS or len(preview) > PREVIEW_CHARS,
    }


@dataclass
class ScanResult:
    """
    What one read of the dlq found.

    @ivar records: the records scanned that L{readDeadLetters}'s C{keep}
        kept, in log order.
    @ivar cursor: resumes after the last record scanned.
    @ivar scanned: how many records were looked at.
    @ivar atHead: whether the read reached the end of what is there (as
        far as the endpoint knows).
    @ivar gaps: what the endpoint said was lost on the way (retention).
    """

    records: List[Message] = field(default_factory=list)
    cursor: Optional[Cursor] = None
    scanned: int = 0
    atHead: bool = False
    gaps: List[str] = field(default_factory=list)


@implementer(IUpstreamSink)
class _DeadLetterScan:
    """
    The sink of one read of the dlq: keeps what C{keep} wants, and ends
    the read once it has scanned enough, reached the head, or the
    endpoint fell quiet.
    """

    def __init__(self, connector: Any, topic: str, reactor: Any, keep: Callable[[Message], bool],
                 scanLimit: int, enough: Callable[[ScanResult], bool]) -> None:
        self.connector = connector
        self.topic = topic
        self.reactor = reactor
        self.keep = keep
        self.scanLimit = scanLimit
        self.enough = enough
        self.result = ScanResult()
        self.deferred: Deferred = Deferred()
        self.subscription: Any = None
        self.quietCall: Any = None

    def started(self, cursor: Cursor) -> None:
        self.result.cursor = cursor
        self._check()

    def deliver(self, messages: Sequence[Message]) -> None:
        if self.deferred.called:
            return
        result = self.result
        cursor = result.cursor if result.cursor is not None else Cursor()
        for message in messages:
            if result.scanned >= self.scanLimit or self.enough(result):
                break
            result.scanned += 1
            cursor = cursor.after(message)
            if self.keep(message):
                result.records.append(message)
        result.cursor = cursor
        self._check()

    def gap(self, cursor: Cursor, reason: str) -> None:
        self.result.cursor = cursor
        self.result.gaps.append(reason)

    def failed(self, reason: Failure) -> None:
        self._end(reason)

    def _check(self) -> None:
        result = self.result
        if result.scanned >= self.scanLimit or self.enough(result):
            self._end(None)
            return
        if self._atHead():
            result.atHead = True
            self._end(None)
            return
        if self.quietCall is not None and self.quietCall.active():
            self.quietCall.cancel()
        self.quietCall = self.reactor.callLater(QUIET, self._quiet)

    def _atHead(self) -> bool:
        if not IHeadOffsets.providedBy(self.connector) or self.result.cursor is None:
            return False
        heads = self.connector.headOffsets(self.topic)
        if not heads:
            return False
        cursor = self.result.cursor
        return all((cursor.get(p) or 0) >= head for p, head in heads.items())

    def _quiet(self) -> None:
        self.quietCall = None
        self.result.atHead = True
        self._end(None)

    def _end(self, failure: Optional[Failure]) -> None:
        if self.quietCall is not None and self.quietCall.active():
            self.quietCall.cancel()
        self.quietCall = None
        if self.subscription is not None:
            self.subscription.close()
        if self.deferred.called:
            return
        if failure is not None:
            self.deferred.errback(failure)
        else:
            self.deferred.callback(self.result)


def readDeadLetters(connector: Any, topic: str, start: Any, reactor: Any, keep: Callable[[Message], bool],
                    scanLimit: int = SCAN_LIMIT, enough: Callable[[ScanResult], bool] = lambda r: False,
                    timeout: float = READ_TIMEOUT) -> Deferred:
    """
    Read C{topic} of C{connector} from C{start} (C{"earliest"} or a
    L{Cursor}), keeping the records C{keep} wants, until C{scanLimit}
    records were scanned, C{enough} says so, or the end is reached.

    @return: a Deferred of a L{ScanResult}; it fails with
        L{EndpointUnavailable} if the endpoint did not start reading within
        C{timeout} seconds (a read that started and ran out of time
        answers with what it found).
    """
    scan = _DeadLetterScan(connector, topic, reactor, keep, scanLimit, enough)
    try:
        scan.subscription = connector.subscribe(topic, start, scan)
    except Exception:
        return fail()

    def tooLate() -> None:
        if scan.result.cursor is None:
            scan._end(Failure(EndpointUnavailable(
                f"endpoint {connector.name} did not start reading the dead letters ({topic}) within "
                f"{timeout:g} s; try again")))
        else:
            scan._end(None)

    return atDeadline(reactor, timeout, scan.deferred, tooLate)


@dataclass
class Redelivery:
    """
    Delivering dead letters of one subscription to its callback once more.

    @ivar record: the subscription's stored record (its callback, headers).
    @ivar key: its signing key.
    @ivar http: the node's guarded treq-like client.
    """

    record: Mapping[str, Any]
    key: bytes
    http: Any
    reactor: Any
    timeout: float
    maxInFlight: int
    cloudEvents: Optional[str] = None

    def deliverAll(self, letters: Sequence[Message]) -> Deferred:
        """
        Deliver each of C{letters}; a Deferred of their outcomes, in order:
        C{{"position", "ok", "status"?, "error"?}}.
        """
        gate = DeferredSemaphore(max(1, self.maxInFlight))
        return gatherResults([gate.run(self.deliverOne, letter) for letter in letters])

    def deliverOne(self, letter: Message) -> Deferred:
        """
        One attempt at delivering the dead letter C{letter}.
        """
        position = positionText(letter)
        meta = dlqHeaders(letter)
        if meta.get("reason") not in REDELIVERABLE:
            return _outcome(position, False, None, f"not redelivered: it was dead-lettered because a delivery "
                                                   f"step failed on it ({meta.get('reason')})")
        message = original(letter)
        if self.cloudEvents is not None:
            try:
                message = webhookCloudEvent(message, self.cloudEvents)
            except StepError as e:
                return _outcome(position, False, None, f"not a CloudEvent: {e.detail}")
        messageId = meta.get("message-id") or f"msg_{self.record['id']}_{message.partition}_{message.offset}"
        headers = deliveryHeaders(dict(self.record.get("headers") or {}), self.key, self.record["id"], message,
                                  messageId, int(self.reactor.seconds()))
        try:
            d = self.http.request("POST", self.record["callbackUrl"], data=message.content, headers=headers,
                                  timeout=self.timeout, allow_redirects=False, unbuffered=True,
                                  reactor=self.reactor)
        except Exception:
            d = fail()

        def answered(response: Any) -> Dict[str, Any]:
            collect(response, ResponseDrain()).addErrback(lambda f: None)
            code = response.code
            if classifyStatus(code) == DELIVERED:
                return {"position": position, "ok": True, "status": code}
            phrase = RESPONSES.get(code, b"").decode("latin-1")
            return {"position": position, "ok": False, "status": code, "error": f"HTTP {code} {phrase}".strip()}

        def unanswered(failure: Failure) -> Dict[str, Any]:
            return {"position": position, "ok": False, "status": None,
                    "error": describeFailure(failure, self.timeout)}

        d.addCallbacks(answered, unanswered)
        return d


def _outcome(position: str, ok: bool, status: Optional[int], error: str) -> Deferred:
    d: Deferred = Deferred()
    d.callback({"position": position, "ok": ok, "status": status, "error": error})
    return d
