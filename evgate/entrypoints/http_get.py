"""
HTTP GET: long-poll consumption with cursors.

C{GET {path}?cursor=&limit=&timeout=} answers as soon as at least one
message after the cursor is there, or after C{timeout} milliseconds with
none.  C{nextCursor} is always present, so a client that polls with it
never misses and never repeats a message.

Pages are rendered by L{evgate.entrypoints.pages} (whose C{jsonItemText}
is still importable from here).

Group mode: on an endpoint with consumer groups (Kafka), a client that
sends a client id (C{X-Client-Id} or C{?client-id=}) instead of a cursor
reads as a consumer group whose position the gateway commits after each
response (L{GroupPoll}).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, List, Optional, Tuple

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from evgate.answers import clientLeft, finishWithFailure, finishWithProblem, onDeparture, writeProblem
from evgate.entrypoints.pages import jsonItemText, renderPage, writePage  # noqa: F401
from evgate.errors import BadCursor, BadRequest, EndpointUnavailable, NotAcceptable, Problem
from evgate.filters import filterFor as subscriptionFilter
from evgate.gateway import ApiCall, queryArgs
from evgate.hub import Event, HubSubscription
from evgate.interfaces import IConsumerGroups, IEntrypoint, ISubscriber
from evgate.message import Cursor, CursorError, cursorsAfter
from evgate.metrics import countPage, headOffsets, tallyFor, tallyOf

DEFAULT_LIMIT = 100
DEFAULT_TIMEOUT = 5000
# Seconds a poll waits, beyond its timeout, for the endpoint to say where
# the read starts (a Kafka read resolves its offsets first).
POSITION_GRACE = 10.0
# Seconds a poll that starts behind the head may take to read what is
# already there before its own timeout counts (timeout=0 included): the
# endpoint hands a backlog over in batches, and a Kafka read fetches first.
CATCH_UP = 2.0

FORMATS = ("application/json", "text/plain", "application/xml")

def negotiate(accept: Optional[bytes], offered: Tuple[str, ...] = FORMATS) -> Optional[str]:
    """
    The media type of C{offered} that the C{Accept} header C{accept} prefers,
    or L{None} when it accepts none of them.  No header means the first
    offered type.
    """
    if accept is None or not accept.strip():
        return offered[0]
    best: Optional[str] = None
    bestScore = (0.0, 0)
    for part in accept.decode("latin-1").split(","):
        fields = [f.strip() for f in part.split(";")]
        media = fields[0].lower()
        q = 1.0
        for param in fields[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q <= 0:
            continue
        for index, candidate in enumerate(offered):
            kind = candidate.split("/")[0]
            if media == candidate:
                specificity = 2
            elif media == kind + "/*":
                specificity = 1
            elif media == "*/*":
                specificity = 0
            else:
                continue
            # Prefer higher q, then the more specific range, then our order.
            score = (q, specificity * 10 - index)
            if score > bestScore:
                best, bestScore = candidate, score
    return best


def intParameter(request: Request, name: str, default: int, maximum: int) -> int:
    """
    The integer query parameter C{name}, between 0 and C{maximum}.

    @raise BadRequest: if it is not such an integer.
    """
    values = queryArgs(request).get(name.encode("ascii"))
    if not values:
        return default
    raw = values[0]
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"query parameter {name} must be an integer, got {raw.decode('latin-1')!r}") from None
    if value < 0 or value > maximum:
        raise BadRequest(f"query parameter {name} must be between 0 and {maximum}, got {value}")
    return value


def requestCursor(request: Request, tag: bytes, header: Optional[bytes] = None) -> Optional[Cursor]:
    """
    The cursor a request resumes from: the C{cursor} query parameter, else
    the header C{header} if given (SSE's C{Last-Event-ID}), else L{None}.

    @raise BadCursor: if the token is malformed or foreign.
    """
    values = queryArgs(request).get(b"cursor")
    raw = values[0] if values else (request.getHeader(header) if header else None)
    if raw is None or raw == b"":
        return None
    try:
        return Cursor.decode(raw.decode("ascii"), tag)
    except (CursorError, UnicodeDecodeError) as e:
        raise BadCursor(f"cursor {raw[:80].decode('latin-1')!r} cannot be used here: {e}") from None


@implementer(ISubscriber)
class PollSubscriber:
    """
    One long poll: collects up to C{limit} events, answers with the first
    batch or at the timeout.
    """

    log = Logger()

    def __init__(self, request: Request, call: ApiCall, media: str, limit: int, timeout: float) -> None:
        self.request = request
        self.call = call
        self.media = media
        self.limit = limit
        self.timeout = timeout
        self.events: List[Event] = []
        self.cursor: Optional[Cursor] = None
        self.gapReason: Optional[str] = None
        self.subscription: Optional[HubSubscription] = None
        self.timer: Optional[IDelayedCall] = None
        self.done = False
        # Where the answered page ends, for the subscription (see _stop).
        self.readUpTo: Optional[Cursor] = None
        self.tally = tallyOf(request, call.api, "http-get")
        # While the read takes what was already there (see started).
        self.fromHistory = False
        self.catchUpTo: Optional[Cursor] = None
        self.firstBatch = False
        self.startedAt = 0.0

    def start(self, start: Any, filter: Any = None) -> None:
        """
        Subscribe and arm the timeout.
        """
        api = self.call.api
        reactor = api.node.reactor
        self.fromHistory = start != "latest"
        self.tally.waiting += 1
        onDeparture(self.request, self._clientGone)
        # Until the endpoint says where the read starts, the poll waits at
        # most its timeout plus a grace; the timeout proper counts from there.
        self.timer = reactor.callLater(self.timeout + POSITION_GRACE, self._timedOut)
        subscription = api.hub.subscribe(api.config.endpoint, api.config.topic, start, self, filter,
                                         api.pipeline.hubView)
        self.subscription = subscription
        if self.done:
            # Answered inside subscribe (a backlog replayed from the window),
            # before this poll held its subscription: let go of it now, or
            # it would stay on the shared stream, and keep this poll, its
            # request and its page alive, for as long as the stream lives.
            if self.readUpTo is not None:
                subscription.release(self.readUpTo)
            else:
                subscription.close()

    def started(self, cursor: Cursor) -> None:
        self.cursor = cursor
        if self.limit == 0:
            self._answer()
            return
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        api = self.call.api
        reactor = api.node.reactor
        self.startedAt = reactor.seconds()
        # The timeout counts the wait for *new* messages: a read that starts
        # behind the head first takes what is there (bounded by CATCH_UP).
        # Where the endpoint knows its head (memory; Kafka once its reader
        # fetched the watermarks), "there" is up to that head; where it does
        # not, a read from history waits for its first batch.
        head = headOffsets(api.connector, api.config.topic)
        if head is not None:
            target = Cursor.fromMapping(head, cursor.epoch)
            self.catchUpTo = None if cursor.dominates(target) else target
        elif self.fromHistory:
            self.catchUpTo = cursor
            self.firstBatch = True
        if self.catchUpTo is not None:
            self.timer = reactor.callLater(max(self.timeout, CATCH_UP), self._timedOut)
        else:
            self.timer = reactor.callLater(self.timeout, self._timedOut)

    def _caughtUp(self) -> None:
        # The read reached what was there when it started: from now on only
        # the timeout proper (what remains of it) is waited for.
        self.catchUpTo = None
        self.firstBatch = False
        if self.done:
            return
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        reactor = self.call.api.node.reactor
        self.timer = reactor.callLater(max(0.0, self.timeout - (reactor.seconds() - self.startedAt)),
                                       self._timedOut)

    def deliver(self, events: List[Event]) -> None:
        if self.done:
            return
        room = self.limit - len(self.events)
        taken = events[:room]
        self.events.extend(taken)
        if taken:
            self.cursor = taken[-1].cursor
        if (self.catchUpTo is not None and len(self.events) < self.limit and self.cursor is not None
                and not (self.firstBatch or self.cursor.dominates(self.catchUpTo))):
            # Still reading what was there when the poll started: the page
            # fills up to that head (or its limit) first, bounded by the
            # timer, so that timeout=0 is not "the first batch only".
            return
        # Answer as soon as something is there; the rest of this batch
        # stays for the next poll (the cursor says where it begins).
        self._answer()

    def advanced(self, cursor: Cursor) -> None:
        if not self.done and len(self.events) < self.limit:
            self.cursor = cursor
            if self.catchUpTo is not None and (self.firstBatch or cursor.dominates(self.catchUpTo)):
                self._caughtUp()

    def gap(self, cursor: Cursor, reason: str) -> None:
        if not self.done:
            self.cursor = cursor
            self.gapReason = reason

    def failed(self, reason: Any) -> None:
        if self.done:
            return
        self._stop()
        finishWithFailure(self.request, reason, "reading for a long poll")

    def _timedOut(self) -> None:
        self.timer = None
        self._answer()

    def _clientGone(self, reason: Any) -> None:
        self._stop()

    def _stop(self, readUpTo: Optional[Cursor] = None) -> None:
        if not self.done:
            self.tally.waiting -= 1
        self.done = True
        self.readUpTo = readUpTo
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.subscription is not None:
            if readUpTo is not None:
                # A page was answered: its read may serve the next page.
                self.subscription.release(readUpTo)
            else:
                self.subscription.close()

    def _answer(self) -> None:
        if self.done:
            return
        if self.cursor is None:
            self._stop()
            finishWithProblem(self.request, EndpointUnavailable(
                "the endpoint did not position the read in time", retryAfter=1))
            return
        request = self.request
        gone = clientLeft(request)
        self._stop(None if gone else self.cursor)
        if gone:
            return
        tag = self.call.api.tag
        body = renderPage(self.media, self.events, tag, self.cursor.encode(tag), self.limit, self.gapReason)
        countPage(self.tally, request, len(self.events), len(body))
        writePage(request, self.media, body)


_CLIENT_ID = re.compile(r"[A-Za-z0-9._-]{1,100}")


def requestClientId(request: Request) -> Optional[str]:
    """
    The client id of a group-mode poll: the C{client-id} query parameter,
    else the C{X-Client-Id} header, else L{None}.

    @raise BadRequest: if it is not 1 to 100 letters, digits, '.', '_' or
        '-'.
    """
    values = queryArgs(request).get(b"client-id")
    raw = values[0] if values else request.getHeader(b"x-client-id")
    if raw is None:
        return None
    text = raw.decode("latin-1")
    if not _CLIENT_ID.fullmatch(text):
        raise BadRequest(f"client id {text[:120]!r} must be 1 to 100 letters, digits, '.', '_' or '-'")
    return text


def groupName(api: str, consumer: Any, clientId: str) -> str:
    """
    The consumer group (before the endpoint's prefix) of a group-mode
    client.  An authenticated caller's groups are its own: its identity is
    part of the name, so knowing another caller's client id does not let
    anyone read as that caller's group.
    """
    # "get." keeps these groups apart from every other group the gateway
    # runs (webhook subscriptions are "webhook.<api>.<id>"), whatever the
    # API and client are called.
    if consumer.id == "anonymous":
        return f"get.{api}.{clientId}"
    owner = hashlib.sha256(f"{consumer.plan}\x00{consumer.id}".encode("utf-8")).hexdigest()[:16]
    return f"get.{api}.{owner}.{clientId}"


class GroupPoll:
    """
    One long poll in group mode: a client that names itself with a client
    id reads as the consumer group C{<api>.<client-id>} of the API's
    endpoint (the endpoint's C{groupPoll}, e.g.
    L{evgate.connectors.kafka.KafkaConnector.groupPoll}), so the gateway
    keeps its position.  The position moves past the messages of a
    response once that response is written; a response that cannot be
    written gives its messages back to the group.
    """

    def __init__(self, request: Request, call: ApiCall, media: str, limit: int, timeout: float,
                 clientId: str, filter: Any) -> None:
        self.request = request
        self.call = call
        self.media = media
        self.limit = limit
        self.timeout = timeout
        self.clientId = clientId
        self.filter = filter

    def start(self) -> None:
        """
        Poll the group and answer when the endpoint does.
        """
        api = self.call.api
        connector: Any = api.connector  # render checked that it has groupPoll
        d = connector.groupPoll(api.config.topic, groupName(api.name, self.call.consumer, self.clientId),
                                self.limit, self.timeout, api.config.start)
        d.addCallback(self._answer)
        d.addErrback(lambda f: finishWithFailure(self.request, f, "polling as a consumer group"))

    def _answer(self, batch: Any) -> Any:
        request = self.request
        if clientLeft(request):
            batch.putBack()
            return None
        events = [Event(m, c) for m, c in cursorsAfter(batch.first, batch.messages)]
        view = self.call.api.pipeline.hubView
        if view is not None:
            try:
                wait = view.ready(events)
            except Exception:
                batch.putBack()
                raise
            if wait is not None:
                # A decoder meeting a schema id for the first time fetches
                # it: the page waits for it rather than showing the record
                # marked (start()'s errback answers a failure).
                return wait.addCallback(lambda _: self._answer(batch))
        self._write(batch, events, view)
        return None

    def _write(self, batch: Any, events: List[Event], view: Any) -> None:
        request = self.request
        try:
            tag = self.call.api.tag
            if view is not None:
                events = view.events(events)
            if self.filter is not None:
                # Filtered-out messages are still read: the group moves past
                # them with the rest.
                events = [e for e in events if self.filter(e)]
            body = renderPage(self.media, events, tag, batch.cursor.encode(tag), self.limit, None)
        except Exception:
            batch.putBack()
            raise
        countPage(tallyOf(request, self.call.api, "http-get"), request, len(events), len(body))
        writePage(request, self.media, body)
        batch.commit()


@implementer(IEntrypoint)
class HttpGetEntrypoint:
    """
    C{http-get}: long-poll consumption.
    """

    name = "http-get"
    methods = (b"GET",)

    def __init__(self, api: Any) -> None:
        self.api = api
        self.tally = tallyFor(api, self.name)

    def stop(self) -> None:
        """
        Nothing to end: a request in progress finishes on its own.
        """

    def accepts(self, request: Request) -> bool:
        return request.method == b"GET"

    def render(self, request: Request, call: ApiCall) -> Any:
        settings = call.api.node.settings
        try:
            media = negotiate(request.getHeader(b"accept"))
            if media is None:
                raise NotAcceptable("this API answers GET with " + ", ".join(FORMATS))
            cursor = requestCursor(request, call.api.tag)
            limit = intParameter(request, "limit", min(DEFAULT_LIMIT, settings.maxPollLimit), settings.maxPollLimit)
            timeout = intParameter(request, "timeout", min(DEFAULT_TIMEOUT, settings.maxPollTimeout),
                                   settings.maxPollTimeout)
            filter = self.filterFor(request, call)
            clientId = requestClientId(request)
            if clientId is not None:
                if cursor is not None:
                    raise BadRequest("send a cursor or a client id, not both: with a client id the gateway "
                                     "keeps the position")
                if not IConsumerGroups.providedBy(call.api.connector):
                    raise BadRequest(f"API {call.api.name} reads from an endpoint without consumer groups: "
                                     "poll with cursors, without a client id")
        except Problem as problem:
            return writeProblem(request, problem)
        if clientId is not None:
            GroupPoll(request, call, media, limit, timeout / 1000.0, clientId, filter).start()
            return NOT_DONE_YET
        start: Any = cursor if cursor is not None else call.api.config.start
        PollSubscriber(request, call, media, limit, timeout / 1000.0).start(start, filter)
        return NOT_DONE_YET

    def filterFor(self, request: Request, call: ApiCall) -> Any:
        """
        The message filter of this request: the API's operator filter and
        the C{filter} query parameter (see evgate.filters).

        @raise BadFilter: if the query parameter is not a valid filter.
        """
        return subscriptionFilter(request, call)
