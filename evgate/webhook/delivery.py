"""
One subscription's deliveries on one node: the L{Deliverer}.

Design
======

A I{feed} (L{evgate.webhook.feeds}, L{evgate.webhook.kafka}) hands the
deliverer the subscription's messages, already filtered, as hub
L{evgate.hub.Event}s: each message with the cursor that resumes right after
it.  The deliverer queues them in its L{evgate.webhook.window.DeliveryWindow},
which keeps at most C{maxInFlight} of them being delivered (one by default,
which keeps the order of the stream) and never two of the same message key
at once, so the order per key holds with any window.

Each message is I{settled} once the receiver answered 2xx or the message
went to the dead-letter destination.  The subscription's I{position}
moves, per partition, only over the settled prefix of that partition's
messages, so it never passes a message that is still being tried,
whatever order concurrent deliveries finish in: after a crash, delivery
resumes at the position and nothing unsettled is lost (at-least-once).
Messages a filter dropped move the position as soon as nothing is
unsettled.

An attempt that fails is tried again after a backoff
(L{evgate.webhook.retry}); the message keeps its place in the window and
the later messages of its key wait behind it, so with one in flight the
subscription waits for that message (order before throughput), and with
more the other keys go on.  When a message cannot be delivered (the receiver rejected it,
or the last attempt failed) it goes to the API's dead-letter destination
and delivery goes on; an API without one pauses the subscription instead,
with the reason, and the message is tried again (from its first attempt)
when an operator resumes it.

Writes to the store are coalesced (L{evgate.webhook.writes}): at most one
update per subscription is in flight, at most one starts every
L{evgate.webhook.writes.WRITE_INTERVAL} seconds, and what changed
meanwhile goes in the next one.  A crash loses at most the writes not yet
made, which means delivering some messages again, never skipping them.

Backpressure: the feed looks at L{Deliverer.backlog} after every batch and
every settled message, and stops reading (pauses its upstream) above its
bound.
"""

from __future__ import annotations

import random as _random
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

from treq import collect
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES
from twisted.web.http_headers import Headers

from evgate.message import Cursor, Draft, Message
from evgate.pipeline import StepError
from evgate.pipeline.cloudevents import webhookCloudEvent
from evgate.webhook import records
from evgate.webhook.client import MAX_RESPONSE_BYTES, USER_AGENT, ResponseDrain, ReusedConnectionLost, describeFailure
from evgate.webhook.headers import (
    RESERVED_HEADERS,
    RESERVED_PREFIXES,
    checkStaticHeaders,
    deliveryHeaders,
    headerName,
    headerValue,
)
from evgate.webhook.retry import DELIVERED, REJECTED, RETRYABLE, RetryPolicy, classifyStatus, parseRetryAfter
from evgate.webhook.window import DeliveryWindow, advancePosition
from evgate.webhook.writes import CoalescedWrites

# Names this module had before the HTTP client side and the headers moved
# out; other modules import them from here.
__all__ = [
    "MAX_RESPONSE_BYTES", "RESERVED_HEADERS", "RESERVED_PREFIXES", "USER_AGENT", "Attempt", "DeadLetters",
    "Deliverer", "DeliveryContext", "checkStaticHeaders", "describeFailure", "headerName", "headerValue",
    "splitDeadLetterTarget",
]

# Attempt states.
IDLE = "idle"                    # taken from the queue, waiting to be sent
SENDING = "sending"              # a request is out
WAITING = "waiting"              # a retry is scheduled
DEADLETTERING = "dead-lettering"  # being published to the dead letters
DONE = "done"                    # settled


@dataclass
class DeadLetters:
    """
    Where an API's undeliverable messages go: C{dlq = <endpoint>/<topic>}.
    """

    endpoint: str
    topic: str
    connector: Any
    timeout: float


@dataclass
class DeliveryContext:
    """
    What a deliverer needs from its node and API.

    @ivar http: a treq-like client (L{evgate.webhook.client.DeliveryClient}, or
        C{treq.testing.StubTreq} in tests).
    @ivar tag: the API's cursor tag (positions are stored as its tokens).
    @ivar epoch: the epoch of the API's endpoint (part of message ids).
    @ivar onPaused: called with the deliverer when it paused its
        subscription for good (no dead-letter destination).
    @ivar cloudEvents: C{webhook.cloudevents}: L{None}, C{"binary"} (the
        message's CloudEvents attributes as C{ce-} HTTP headers) or
        C{"structured"} (an C{application/cloudevents+json} body).
    """

    reactor: Any
    http: Any
    store: Any
    api: str
    tag: bytes
    epoch: int
    timeout: float
    maxInFlight: int
    dlq: Optional[DeadLetters]
    random: Any = _random
    onPaused: Callable[["Deliverer"], None] = lambda deliverer: None
    cloudEvents: Optional[str] = None


class Attempt:
    """
    One message in the window, and how its delivery goes.
    """

    __slots__ = ("event", "count", "state", "call", "request", "dlqTries", "resent")

    def __init__(self, event: Any) -> None:
        self.event = event
        self.count = 0
        # Whether the current attempt was already sent again after its
        # connection turned out closed (see Deliverer._unanswered).
        self.resent = False
        self.state = IDLE
        self.call: Any = None
        self.request: Optional[Deferred] = None
        self.dlqTries = 0


class Deliverer(CoalescedWrites):
    """
    The deliveries of one subscription on this node.

    @ivar position: the cursor after the settled prefix: where delivery
        resumes after a restart.
    @ivar tail: the cursor after the last message the feed handed over (or
        skipped).
    """

    log = Logger()

    def __init__(self, record: Mapping[str, Any], key: bytes, policy: RetryPolicy,
                 position: Optional[Cursor], context: DeliveryContext) -> None:
        self.id: str = record["id"]
        self.callbackUrl: str = record["callbackUrl"]
        self.staticHeaders: Dict[str, str] = dict(record.get("headers") or {})
        self.key = key
        self.policy = policy
        self.context = context
        self.reactor = context.reactor
        self.position = position
        self.tail = position
        self.state = record.get("state") or records.ACTIVE
        self.window = DeliveryWindow(context.maxInFlight, Attempt)
        self.feed: Any = None
        self.paused = False
        self.stopped = False
        self._reopenCall: Any = None
        self._feedFactory: Optional[Callable[["Deliverer"], Any]] = None
        self._feedFailures = 0
        self._initWrites(position)

    # -- lifecycle

    def start(self, feedFactory: Callable[["Deliverer"], Any]) -> None:
        """
        Open the feed made by C{feedFactory} and start delivering.
        """
        self._feedFactory = feedFactory
        self._openFeed()

    def _openFeed(self) -> None:
        self._reopenCall = None
        if self.stopped or self._feedFactory is None:
            return
        self.feed = self._feedFactory(self)
        self.feed.start(self.tail)

    def stop(self) -> Deferred:
        """
        Stop delivering: cancel retries and requests under way (their
        messages are delivered again by whoever delivers next), close the
        feed, and fire once the store has the last position.
        """
        if self.stopped:
            return self.flushed()
        self.stopped = True
        if self._reopenCall is not None and self._reopenCall.active():
            self._reopenCall.cancel()
        self._reopenCall = None
        self._idleAll()
        if self.feed is not None:
            self.feed.close()
        return self.flushed()

    def _idleAll(self) -> None:
        for attempt in list(self.window.outstanding):
            if attempt.state in (SENDING, WAITING, DEADLETTERING):
                # A dead-letter publish under way cannot be called back; if
                # it lands, the message is dead-lettered again next time,
                # which at-least-once allows.
                self._cancel(attempt)

    def _cancel(self, attempt: Attempt) -> None:
        # IDLE first, so that the errback of the cancelled request sees an
        # attempt nobody waits for.
        attempt.state = IDLE
        if attempt.call is not None and attempt.call.active():
            attempt.call.cancel()
        attempt.call = None
        request, attempt.request = attempt.request, None
        if request is not None:
            request.cancel()

    # -- what feeds call

    def backlog(self) -> int:
        """
        Messages handed over and not settled yet.
        """
        return self.window.backlog()

    def began(self, cursor: Cursor) -> None:
        """
        The feed knows where it starts.
        """
        if self.tail is None:
            self.tail = cursor
        if self.position is None:
            self.position = cursor
            self._savePosition()
        self.readRecovered()

    def offer(self, events: Sequence[Any]) -> None:
        """
        Messages to deliver, in stream order (already filtered).
        """
        if self.stopped or not events:
            return
        self._feedFailures = 0
        self.window.queue.extend(events)
        self.tail = events[-1].cursor
        self._pump()

    def skipped(self, cursor: Cursor) -> None:
        """
        The stream moved to C{cursor} without a message to deliver (a
        filter dropped them).
        """
        if self.stopped:
            return
        self.tail = cursor
        self._advance()

    def gap(self, cursor: Cursor, reason: str) -> None:
        """
        The stream lost messages (retention, a restart of the in-memory
        broker) and goes on at C{cursor}.
        """
        if self.stopped:
            return
        self.log.warn("webhook subscription {subscription} of API {api}: messages were lost: {reason}",
                      subscription=self.id, api=self.context.api, reason=reason)
        self._save({"lastError": self._error(f"messages were lost: {reason}")})
        self.tail = cursor
        self._advance()

    def feedFailed(self, reason: Failure) -> None:
        """
        The feed ended; open a new one from the tail after a while.
        """
        if self.stopped:
            return
        self._feedFailures += 1
        self.feed = None
        delay = self.policy.delay(min(self._feedFailures, 10), random=self.context.random)
        self.log.warn("webhook subscription {subscription} of API {api}: reading failed ({reason}); "
                      "reading again in {delay:.1f} s", subscription=self.id, api=self.context.api,
                      reason=reason.getErrorMessage(), delay=delay)
        self._setState(records.FAILING, self._error(f"reading the topic failed: {reason.getErrorMessage()}"))
        self._reopenCall = self.reactor.callLater(max(delay, 0.1), self._openFeed)

    def readFailed(self, detail: str) -> None:
        """
        The feed cannot read for now and keeps trying (the broker is away).
        """
        if not self.stopped:
            self._setState(records.FAILING, self._error(detail))

    def readRecovered(self) -> None:
        """
        The feed reads again after L{readFailed} or L{feedFailed}.
        """
        self._feedFailures = 0
        self._settleState()

    def _settleState(self) -> None:
        # Back to active once nothing is failing: no attempt waiting for a
        # retry or being dead-lettered.
        if self.state == records.ACTIVE or self.stopped or self.paused:
            return
        if any(a.state in (WAITING, DEADLETTERING) or (a.state != DONE and a.count > 1)
               for a in self.window.outstanding):
            return
        self.state = records.ACTIVE
        self._save({"state": records.ACTIVE})

    # -- delivering

    def _pump(self) -> None:
        if self.paused or self.stopped:
            return
        for attempt in self.window.take():
            if attempt.state == IDLE:
                self._send(attempt)

    def messageId(self, message: Message) -> str:
        """
        The C{webhook-id} of C{message}: the same on every attempt and every
        node, different for every message and subscription.
        """
        base = f"msg_{self.id}_{message.partition}_{message.offset}"
        epoch = self.context.epoch
        return base if not epoch else f"{base}_{epoch}"

    def requestHeaders(self, message: Message, messageId: str, timestamp: int) -> Headers:
        """
        The headers of one attempt to deliver C{message}.
        """
        return deliveryHeaders(self.staticHeaders, self.key, self.id, message, messageId, timestamp)

    def _send(self, attempt: Attempt, counted: bool = True) -> None:
        if counted:
            attempt.count += 1
            attempt.resent = False
        message = attempt.event.message
        if message.error is not None:
            # A delivery step failed on it (evgate.pipeline): the receiver
            # would get what the API does not mean to show; it goes to the
            # dead letters (as read) with the reason, or pauses delivery.
            error = message.error
            self._deadLetter(attempt, error.slug, None, f"step {error.step!r} (line {error.line}): {error.detail}")
            return
        mode = self.context.cloudEvents
        if mode is not None:
            try:
                message = webhookCloudEvent(message, mode)
            except StepError as e:
                self._deadLetter(attempt, "not-a-cloudevent", None, e.detail)
                return
        attempt.state = SENDING
        messageId = self.messageId(message)
        headers = self.requestHeaders(message, messageId, int(self.reactor.seconds()))
        try:
            d = self.context.http.request(
                "POST", self.callbackUrl, data=message.content, headers=headers,
                timeout=self.context.timeout, allow_redirects=False, unbuffered=True, reactor=self.reactor)
        except Exception:
            d = fail()
        attempt.request = d
        d.addCallbacks(self._answered, self._unanswered, callbackArgs=(attempt,), errbackArgs=(attempt,))
        d.addErrback(self._bug, "handling a delivery's outcome")

    def _answered(self, response: Any, attempt: Attempt) -> None:
        drained = collect(response, ResponseDrain())
        drained.addErrback(lambda f: None)
        if attempt.state != SENDING or attempt.request is None:
            return
        attempt.request = None
        code = response.code
        outcome = classifyStatus(code)
        if outcome == DELIVERED:
            self._settled(attempt, "delivered")
            return
        phrase = RESPONSES.get(code, b"").decode("latin-1")
        retryAfter = None
        if code in (429, 503):
            values = response.headers.getRawHeaders(b"retry-after")
            retryAfter = parseRetryAfter(values[0].decode("latin-1") if values else None, self.reactor.seconds())
        self._failed(attempt, outcome, f"HTTP {code} {phrase}".strip(), code, retryAfter)

    def _unanswered(self, failure: Failure, attempt: Attempt) -> None:
        if attempt.state != SENDING or attempt.request is None:
            return
        attempt.request = None
        if failure.check(ReusedConnectionLost) and not attempt.resent:
            # The request went out on a pooled connection that the receiver
            # had closed, and not one byte of an answer came back.  Sending
            # it again at once, on a new connection (the client stops
            # reusing this receiver's connections), without counting an
            # attempt or waiting a backoff, is only safe because nothing of
            # the answer arrived: the receiver cannot have told us anything
            # about this message.  Should it have taken the request all the
            # same, it sees the same webhook-id twice, which at-least-once
            # delivery allows.  Once per attempt, so that a receiver that
            # closes every connection still fails attempts and is retried
            # with backoff.
            attempt.resent = True
            message = attempt.event.message
            self.log.debug("webhook subscription {subscription}: {topic}/{partition}@{offset} went out on a "
                           "connection the receiver had closed; sending it again on a new one",
                           subscription=self.id, topic=message.topic, partition=message.partition,
                           offset=message.offset)
            self._send(attempt, counted=False)
            return
        self._failed(attempt, RETRYABLE, describeFailure(failure, self.context.timeout), None, None)

    def _failed(self, attempt: Attempt, outcome: str, detail: str, status: Optional[int],
                retryAfter: Optional[float]) -> None:
        message = attempt.event.message
        self.log.info("webhook subscription {subscription}: attempt {attempt} at {topic}/{partition}@{offset} "
                      "failed: {detail}", subscription=self.id, attempt=attempt.count, topic=message.topic,
                      partition=message.partition, offset=message.offset, detail=detail)
        self._setState(records.FAILING, self._error(detail, status, attempt), failedAttempts=1)
        if outcome == REJECTED:
            self._deadLetter(attempt, "rejected", status, detail)
        elif attempt.count >= self.policy.maxAttempts:
            self._deadLetter(attempt, "attempts-exhausted", status, detail)
        else:
            delay = self.policy.delay(attempt.count, retryAfter, self.context.random)
            attempt.state = WAITING
            attempt.call = self.reactor.callLater(delay, self._retry, attempt)

    def _retry(self, attempt: Attempt) -> None:
        attempt.call = None
        if attempt.state != WAITING:
            return
        if self.paused or self.stopped:
            attempt.state = IDLE
            return
        self._send(attempt)

    def _settled(self, attempt: Attempt, how: str) -> None:
        moved = self.window.settle(attempt)
        if moved is not None:
            partition, cursor = moved
            self.position = advancePosition(self.position, partition, cursor)
        if how == "delivered":
            # Seconds; written as a time stamp only when the write is made
            # (evgate.webhook.writes), not for every delivery.
            self._save({"lastDeliveredAt": float(self.reactor.seconds())}, delivered=1)
        else:
            self._save({}, deadLettered=1)
        self._settleState()
        self._advance()
        self._pump()

    def _advance(self) -> None:
        if self.window.empty() and self.tail is not None and self.tail != self.position:
            self.position = self.tail
        self._savePosition()
        if self.feed is not None:
            self.feed.progress()

    # -- dead letters

    def _deadLetter(self, attempt: Attempt, reason: str, status: Optional[int], detail: str) -> None:
        message = attempt.event.message
        dlq = self.context.dlq
        if dlq is None:
            self._pauseForFailure(attempt, reason, detail)
            return
        attempt.state = DEADLETTERING
        attempt.dlqTries += 1
        headers = list(message.headers) + [
            ("evgate-dlq-reason", reason),
            ("evgate-dlq-status", "" if status is None else str(status)),
            ("evgate-dlq-error", detail),
            ("evgate-dlq-subscription", self.id),
            ("evgate-dlq-api", self.context.api),
            ("evgate-dlq-attempts", str(attempt.count)),
            ("evgate-dlq-topic", message.topic),
            ("evgate-dlq-partition", str(message.partition)),
            ("evgate-dlq-offset", str(message.offset)),
            ("evgate-dlq-timestamp", str(message.timestamp)),
            ("evgate-dlq-message-id", self.messageId(message)),
        ]
        draft = Draft(content=message.content, key=message.key, headers=tuple(headers))
        try:
            d = dlq.connector.publish(dlq.topic, draft, dlq.timeout)
        except Exception:
            d = fail()
        d.addCallbacks(self._deadLettered, self._deadLetterFailed, callbackArgs=(attempt, reason),
                       errbackArgs=(attempt, reason, status, detail))
        d.addErrback(self._bug, "handling a dead-letter publish")

    def _deadLettered(self, position: Any, attempt: Attempt, reason: str) -> None:
        if attempt.state != DEADLETTERING:
            return
        message = attempt.event.message
        self.log.warn("webhook subscription {subscription}: {topic}/{partition}@{offset} went to the dead "
                      "letters ({dlqEndpoint}/{dlqTopic}): {reason}", subscription=self.id, topic=message.topic,
                      partition=message.partition, offset=message.offset, reason=reason,
                      dlqEndpoint=self.context.dlq.endpoint if self.context.dlq else "",
                      dlqTopic=self.context.dlq.topic if self.context.dlq else "")
        self._settled(attempt, "dead-lettered")

    def _deadLetterFailed(self, failure: Failure, attempt: Attempt, reason: str, status: Optional[int],
                          detail: str) -> None:
        if attempt.state != DEADLETTERING:
            return
        # The message must not be lost: the dead-letter publish is tried
        # again, as long as it takes, and the window waits.
        delay = self.policy.delay(min(attempt.dlqTries, 20), random=self.context.random)
        self.log.warn("webhook subscription {subscription}: publishing to the dead letters failed "
                      "({error}); trying again in {delay:.1f} s", subscription=self.id,
                      error=failure.getErrorMessage(), delay=delay)
        self._setState(records.FAILING, self._error(
            f"publishing to the dead letters failed: {failure.getErrorMessage()}", None, attempt))
        attempt.state = WAITING
        attempt.call = self.reactor.callLater(delay, self._deadLetterAgain, attempt, reason, status, detail)

    def _deadLetterAgain(self, attempt: Attempt, reason: str, status: Optional[int], detail: str) -> None:
        attempt.call = None
        if attempt.state != WAITING or self.stopped:
            return
        self._deadLetter(attempt, reason, status, detail)

    def _pauseForFailure(self, attempt: Attempt, reason: str, detail: str) -> None:
        message = attempt.event.message
        why = (f"the message at {message.topic}/{message.partition}@{message.offset} could not be delivered "
               f"({reason}: {detail}) and API {self.context.api} has no dlq; resume to try it again")
        self.log.warn("webhook subscription {subscription} paused: {why}", subscription=self.id, why=why)
        attempt.state = IDLE
        attempt.count = 0
        self.paused = True
        self._idleAll()
        self._save({"paused": True, "pausedReason": why})
        self.context.onPaused(self)

    # -- the store

    def _error(self, detail: str, status: Optional[int] = None, attempt: Optional[Attempt] = None) -> Dict[str, Any]:
        error: Dict[str, Any] = {"at": records.timestamp(self.reactor.seconds()), "message": detail,
                                 "status": status}
        if attempt is not None:
            message = attempt.event.message
            error.update(attempt=attempt.count, partition=message.partition, offset=message.offset)
        return error

    def _setState(self, state: str, lastError: Dict[str, Any], **increments: int) -> None:
        changes: Dict[str, Any] = {"lastError": lastError}
        if state != self.state:
            self.state = state
            changes["state"] = state
        self._save(changes, **increments)

    def _savePosition(self) -> None:
        if self.position is not None and self.position != self._savedPosition:
            self._save({"position": self.position})

    def _bug(self, failure: Failure, what: str) -> None:
        self.log.failure("webhook subscription {subscription}: unexpected error {what}", failure,
                         subscription=self.id, what=what)


def splitDeadLetterTarget(text: str) -> Tuple[str, str]:
    """
    The endpoint and topic of a C{dlq = <endpoint>/<topic>} value.

    @raise ValueError: if it has no C{/} or an empty part.
    """
    endpoint, sep, topic = text.partition("/")
    if not sep or not endpoint or not topic:
        raise ValueError("expected <endpoint>/<topic>")
    return endpoint, topic
