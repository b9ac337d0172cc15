"""
Server-Sent Events: C{GET {path}} with C{Accept: text/event-stream}.

The stream, as a browser's C{EventSource} reads it::

    retry: 3000                 reconnection delay (sse.retry)
    id: <start cursor>          so that a reconnect before the first
                                message still resumes where this began

    id: <cursor>                one event per message
    event: message
    data: first line of the content
    data: second line

    id: <cursor>                messages a filter dropped: the position
                                moves on without an event

    : keep-alive                a comment after `heartbeat` idle seconds

Content that is not UTF-8 is sent base64 as C{event: binary}, so that it
can never be mistaken for text (a browser hands it to
C{addEventListener("binary", ...)}, not to C{onmessage}).  With
C{?format=json} every event's data is the JSON envelope of the message.
C{event: gap} says that part of the stream is gone and where reading
resumes; C{event: error} precedes the end of a stream the gateway cuts
(slow client, upstream failure, expired credentials).  docs/entrypoints/sse.md
has the details and browser examples.

A client resumes with the C{Last-Event-ID} header (an EventSource sends it
when it reconnects) or the C{cursor} query parameter; the header wins,
because an EventSource reconnects to the URL it was made with, whose
C{cursor} is older than what it has seen since.
"""

from __future__ import annotations

import base64
import json
import math
import re
from typing import Any, Dict, Optional, Set

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from evgate.answers import finishWithFailure, onDeparture, writeProblem
from evgate.directwrite import boundSendBuffer, writeChunk, writeChunksFrom
from evgate.entrypoints.http_get import requestCursor
from evgate.entrypoints.streaming import Goodbye, StreamSubscriber, stopAll
from evgate.errors import (
    PROBLEM_BASE,
    BadCursor,
    BadRequest,
    EndpointUnavailable,
    Problem,
    TooManyRequests,
    Unauthorized,
)
from evgate.filters import filterFor
from evgate.gateway import ApiCall
from evgate.hub import Event
from evgate.interfaces import IStreamFramer, IStreamingEntrypoint
from evgate.message import Cursor, CursorError, envelopeJSON
from evgate.metrics import tallyFor

FORMATS = ("text", "json")

_LINE_BREAK = re.compile(r"\r\n|\r|\n")

HEARTBEAT_FRAME = b": keep-alive\n\n"

TOO_SLOW_TYPE = PROBLEM_BASE + "subscriber-too-slow"

# Seconds a connection cut for being too slow has to take the rest of what
# was written to it before it is aborted.
ABORT_GRACE = 10.0


def acceptsEventStream(accept: Optional[bytes]) -> bool:
    """
    Whether the C{Accept} header C{accept} names C{text/event-stream} with
    a quality above zero (a wildcard is not enough: that is a plain GET).
    """
    if not accept:
        return False
    for part in accept.decode("latin-1").split(","):
        fields = [f.strip() for f in part.split(";")]
        if fields[0].lower() != "text/event-stream":
            continue
        for param in fields[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    return float(value) > 0
                except ValueError:
                    return False
        return True
    return False


def dataLines(text: str) -> bytes:
    """
    C{text} as C{data:} lines: one per line of the text, whichever line
    break it uses (a client reassembles them with C{\\n}).
    """
    return b"".join(b"data: " + line.encode("utf-8") + b"\n" for line in _LINE_BREAK.split(text))


def eventFrame(event: Event, tag: bytes, format: str) -> bytes:
    """
    The SSE event of one message, encoded once per (API, format) and kept
    on the hub's event for every other subscriber.
    """
    key = ("sse", tag, format)
    frame: Optional[bytes] = event.frames.get(key)
    if frame is not None:
        return frame
    token = event.token(tag).encode("ascii")
    message = event.message
    if message.error is not None and format != "json":
        # A delivery step failed on it (evgate.pipeline): its own event
        # type, the JSON envelope (raw content and error) as data.
        frame = b"id: " + token + b"\nevent: message-error\ndata: " + envelopeJSON(message) + b"\n\n"
    elif format == "json":
        frame = b"id: " + token + b"\nevent: message\ndata: " + envelopeJSON(message) + b"\n\n"
    else:
        try:
            text = message.content.decode("utf-8")
            frame = b"id: " + token + b"\nevent: message\n" + dataLines(text) + b"\n"
        except UnicodeDecodeError:
            frame = (b"id: " + token + b"\nevent: binary\ndata: "
                     + base64.b64encode(message.content) + b"\n\n")
    event.frames[key] = frame
    return frame


def noticeFrame(event: str, document: Dict[str, Any], token: Optional[str] = None) -> bytes:
    """
    A gateway notice (C{gap}, C{error}): a JSON document on one data line.
    """
    head = f"id: {token}\n" if token is not None else ""
    body = json.dumps(document, separators=(",", ":"))
    return f"{head}event: {event}\ndata: {body}\n\n".encode("utf-8")


def problemDocument(problem: Problem, cursor: Optional[str]) -> Dict[str, Any]:
    """
    The data of an C{event: error}: the problem, and where to resume.
    """
    document = problem.asJSON()
    if cursor is not None:
        document["cursor"] = cursor
    return document


@implementer(IStreamFramer)
class SseFramer:
    """
    How an event stream goes on its HTTP response: the SSE encoding of
    events and notices (see the module docstring), written as chunks.
    """

    log = Logger()

    # One per stream, thousands at once: no __dict__.
    __slots__ = ("request", "tag", "format", "retry", "reactor", "opened", "left", "subscriber")

    def __init__(self, request: Request, tag: bytes, format: str, retry: int, reactor: Any) -> None:
        self.request = request
        self.tag = tag
        self.format = format
        self.retry = retry
        self.reactor = reactor
        self.opened = False
        # Set when the client leaves (evgate.answers.onDeparture).
        self.left = False
        self.subscriber: Any = None

    def watch(self, subscriber: Any) -> None:
        """
        End C{subscriber} when the client leaves, and name it to the
        access log (which counts its messages).
        """
        self.subscriber = subscriber
        onDeparture(self.request, self._clientGone)
        self.request.evgateStream = subscriber  # type: ignore[attr-defined]

    def _clientGone(self, reason: Failure) -> None:
        self.left = True
        if self.subscriber is not None:
            self.subscriber.end()

    def _gone(self) -> bool:
        return bool(self.left or self.request.finished)

    def _token(self, cursor: Optional[Cursor]) -> Optional[str]:
        return cursor.encode(self.tag) if cursor is not None else None

    # IStreamFramer

    def open(self, producer: Any, cursor: Cursor) -> bool:
        request = self.request
        if self._gone():
            return False
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.setHeader(b"Cache-Control", b"no-cache")
        # nginx and similar proxies buffer responses unless told not to.
        request.setHeader(b"X-Accel-Buffering", b"no")
        request.registerProducer(producer, True)
        if request.channel is not None:
            boundSendBuffer(request.channel.transport)
        self.opened = True
        request.write(f"retry: {self.retry}\nid: {cursor.encode(self.tag)}\n\n".encode("ascii"))
        return True

    def event(self, event: Event) -> bytes:
        return eventFrame(event, self.tag, self.format)

    def advance(self, cursor: Cursor) -> bytes:
        # An event with an id and no data: EventSource takes the id as its
        # last event id and dispatches nothing (HTML, "dispatch the event").
        return b"id: " + cursor.encode(self.tag).encode("ascii") + b"\n\n"

    def gap(self, cursor: Cursor, reason: str) -> bytes:
        token = cursor.encode(self.tag)
        return noticeFrame("gap", {"detail": reason, "cursor": token}, token)

    def heartbeat(self) -> bytes:
        return HEARTBEAT_FRAME

    def write(self, data: bytes) -> None:
        if not self._gone():
            writeChunk(self.request, data)

    def writeFrom(self, frame: bytes, start: int) -> int:
        if self._gone():
            return len(frame)
        return writeChunksFrom(self.request, frame, start)

    def goodbye(self, reason: Goodbye, cursor: Optional[Cursor]) -> None:
        kind = reason.kind
        if not self.opened:
            if kind == Goodbye.FAILED and reason.failure is not None:
                finishWithFailure(self.request, reason.failure, "starting an event stream")
            elif kind == Goodbye.STOPPING:
                stopping = EndpointUnavailable("the gateway is stopping; retry", retryAfter=1)
                finishWithFailure(self.request, Failure(stopping), "stopping")
            return
        token = self._token(cursor)
        if kind in (Goodbye.TOO_SLOW, Goodbye.SHED):
            problem = Problem(f"this client is {reason.detail} the stream; "
                              "reconnect to resume from the last id it received")
            document = problemDocument(problem, token)
            document.update(type=TOO_SLOW_TYPE, title="Subscriber too slow", status=503)
            self.finish(b"" if reason.midFrame else noticeFrame("error", document), disconnect=True)
        elif kind == Goodbye.FAILED:
            failure = reason.failure
            problem = (failure.value if failure is not None and isinstance(failure.value, Problem)
                       else Problem("the upstream subscription failed"))
            self.finish(noticeFrame("error", problemDocument(problem, token)))
        elif kind == Goodbye.EXPIRED:
            problem = Unauthorized("the credentials of this stream expired; reconnect with new ones")
            self.finish(noticeFrame("error", problemDocument(problem, token)))
        elif kind == Goodbye.QUOTA:
            seconds = max(1, math.ceil(reason.retryAfter))
            consumer = self.subscriber.call.consumer.id if self.subscriber is not None else "this consumer"
            api = self.subscriber.api.name if self.subscriber is not None else "-"
            problem = TooManyRequests(f"{consumer} used up its messages on API {api}; "
                                      f"reconnect in {seconds} s", extra={"retryAfter": seconds})
            self.finish(noticeFrame("error", problemDocument(problem, token)))
        elif kind == Goodbye.MAX_DURATION:
            self.finish(b": sse.max-duration reached; reconnect to continue\n\n")
        else:
            self.finish(b": the gateway is stopping; reconnect to continue\n\n")

    def finish(self, last: bytes = b"", disconnect: bool = False) -> None:
        """
        Write C{last} and end the response; the client reconnects with the
        last id it received.

        @param disconnect: also close the connection once what was written
            is sent, and abort it if that does not happen within
            L{ABORT_GRACE} seconds (a client that stopped reading would
            otherwise hold its buffer for as long as it likes).
        """
        if self._gone():
            return
        channel = self.request.channel
        if last:
            self.request.write(last)
        self.request.unregisterProducer()
        self.request.finish()
        if disconnect and channel is not None and channel.transport is not None:
            transport = channel.transport
            channel.loseConnection()
            self.reactor.callLater(ABORT_GRACE, transport.abortConnection)  # type: ignore[attr-defined]


def sseSubscriber(request: Request, call: ApiCall, entrypoint: "SseEntrypoint", format: str) -> StreamSubscriber:
    """
    One event stream: a L{StreamSubscriber} writing through an
    L{SseFramer} on C{request}.
    """
    options = call.api.config.options
    framer = SseFramer(request, call.api.tag, format, options.get("sseRetry", 3000), call.api.node.reactor)
    subscriber = StreamSubscriber(call, entrypoint, framer, heartbeat=options.get("heartbeat", 15.0),
                                  maxDuration=options.get("sseMaxDuration", 0.0))
    framer.watch(subscriber)
    return subscriber


def lastEventCursor(request: Request, tag: bytes) -> Optional[Cursor]:
    """
    Where an event stream resumes: the C{Last-Event-ID} header, else the
    C{cursor} query parameter, else L{None}.

    @raise BadCursor: if the one that applies is malformed or foreign.
    """
    raw = request.getHeader(b"last-event-id")
    if raw is None or raw.strip() == b"":
        return requestCursor(request, tag)
    try:
        return Cursor.decode(raw.strip().decode("ascii"), tag)
    except (CursorError, UnicodeDecodeError) as e:
        raise BadCursor(f"Last-Event-ID {raw[:80].decode('latin-1')!r} cannot be used here: {e}") from None


@implementer(IStreamingEntrypoint)
class SseEntrypoint:
    """
    C{sse}: a Server-Sent Events stream of the API's topic.
    """

    name = "sse"
    methods = (b"GET",)
    log = Logger()

    def __init__(self, api: Any) -> None:
        self.api = api
        self.live: Set[StreamSubscriber] = set()
        self.tally = tallyFor(api, self.name)

    def accepts(self, request: Request) -> bool:
        return request.method == b"GET" and acceptsEventStream(request.getHeader(b"accept"))

    def render(self, request: Request, call: ApiCall) -> Any:
        try:
            cursor = lastEventCursor(request, call.api.tag)
            format = self.format(request)
            filter = filterFor(request, call)
        except Problem as problem:
            return writeProblem(request, problem)
        start: Any = cursor if cursor is not None else call.api.config.start
        sseSubscriber(request, call, self, format).subscribe(start, filter)
        return NOT_DONE_YET

    def format(self, request: Request) -> str:
        """
        The C{format} query parameter: C{text} (the default) or C{json}.
        """
        args: Any = request.args
        values = args.get(b"format")
        if not values:
            return "text"
        value = values[0].decode("latin-1")
        if value not in FORMATS:
            raise BadRequest(f"query parameter format must be one of {', '.join(FORMATS)}, got {value!r}")
        return value

    def stop(self) -> None:
        """
        End every stream cleanly (the gateway is stopping); clients
        reconnect, to another node or to this one when it is back.
        """
        stopAll(self.live)  # type: ignore[arg-type]
