"""
WebSocket: C{GET {path}} with C{Upgrade: websocket}, on the gateway's own
port (autobahn's L{WebSocketResource} takes the connection over from
twisted.web once the plan chain authenticated the request).

Server to client, one frame per message: a text frame for UTF-8 content, a
binary frame otherwise.  With the subprotocol C{evgate.json}, every frame
is a JSON document instead::

    {"subscribed": {"cursor": "..."}}                 first, where the stream starts
    {"id": "...", "key": ..., "headers": {...},       a message; "id" resumes after it
     "content": "...", "metadata": {...}}             (+ "encoding": "base64")
    {"gap": {"detail": "...", "cursor": "..."}}       part of the stream is gone
    {"ack": {"topic", "partition", "offset"}}         a publish was acknowledged
    {"error": {"type", "title", "detail"}}            a publish was refused

Client to server, each frame is published to the API's topic (unless the
API sets C{websocket.publish = false}): the frame itself as the content, or
under C{evgate.json} a document C{{"key", "headers", "content"}} (with
C{"encoding": "base64"} for binary content, and an optional C{"ref"} that
the answer echoes).  Answers come in the order of the frames, after the
broker acknowledged.

Resume with the C{cursor} query parameter (ids are only visible under
C{evgate.json}).  Close codes: 1000 normal, 1008 policy (subscribe-only
API without evgate.json, expired credentials), 1009 message too big, 1011
server error, 1013 try again later (too slow a reader, broker unavailable,
gateway stopping).  docs/entrypoints/websocket.md has the details.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Deque, Dict, List, Optional, Set, Tuple

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from evgate import directwrite
from evgate.answers import writeProblem
from evgate.directwrite import boundSendBuffer, writeFrom, writeNow
from evgate.entrypoints.http_get import requestCursor
from evgate.entrypoints.streaming import Goodbye, StreamSubscriber, stopAll
from evgate.errors import BadRequest, EndpointTimeout, EndpointUnavailable, Forbidden, Problem
from evgate.filters import filterFor
from evgate.gateway import ApiCall
from evgate.hub import Event
from evgate.interfaces import IStreamFramer, IStreamingEntrypoint
from evgate.message import Cursor, Draft, Position, envelopeJSON, headerPairs
from evgate.metrics import tallyFor
from evgate.twistedprivate import autobahnWritesPlainFrames, bindAutobahnTimers, countAutobahnOctets

SUBPROTOCOL = "evgate.json"

CLOSE_NORMAL = WebSocketProtocol.CLOSE_STATUS_CODE_NORMAL
CLOSE_POLICY = WebSocketProtocol.CLOSE_STATUS_CODE_POLICY_VIOLATION
CLOSE_TOO_BIG = WebSocketProtocol.CLOSE_STATUS_CODE_MESSAGE_TOO_BIG
CLOSE_SERVER_ERROR = WebSocketProtocol.CLOSE_STATUS_CODE_INTERNAL_ERROR
CLOSE_TRY_AGAIN = WebSocketProtocol.CLOSE_STATUS_CODE_TRY_AGAIN_LATER

# Publishes one connection may have waiting for the broker before the
# gateway stops reading its frames: TCP then pushes back on the client.
MAX_IN_FLIGHT = 64

_MAX_KEY = 4096
_FRAME_FIELDS = frozenset({"key", "headers", "content", "encoding", "ref"})
# A close reason is at most 123 bytes of UTF-8 (RFC 6455, 5.5).
_MAX_REASON = 123


def _jsonFrame(document: Dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def errorDocument(problem: Problem, ref: Any = None) -> Dict[str, Any]:
    """
    The C{error} frame of C{problem}.
    """
    error: Dict[str, Any] = {"type": problem.type, "title": problem.title, "detail": problem.detail}
    # Its extension members too: the step and pointer of a refused
    # transform, the pointer of content that does not match the schema.
    error.update(problem.extra)
    document: Dict[str, Any] = {"error": error}
    if ref is not None:
        document["ref"] = ref
    return document


class FrameTooBig(Exception):
    """
    A frame's content is larger than max-message-bytes.
    """


def parseJsonFrame(payload: bytes, maxBytes: int) -> Tuple[Draft, Any]:
    """
    The message an C{evgate.json} frame asks to publish, and its C{ref}.

    @raise BadRequest: for a frame that is not such a document.
    @raise FrameTooBig: for content larger than C{maxBytes}.
    """
    try:
        document = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("an evgate.json frame is one JSON object: "
                         '{"key": ..., "headers": {...}, "content": "..."}') from None
    if not isinstance(document, dict):
        raise BadRequest("an evgate.json frame is a JSON object")
    ref = document.get("ref")
    unknown = sorted(set(document) - _FRAME_FIELDS)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r} (known: content, key, headers, encoding, ref)")
    content = document.get("content")
    if not isinstance(content, str):
        raise BadRequest("field content is required and must be a string")
    encoding = document.get("encoding")
    if encoding is None:
        raw = content.encode("utf-8")
    elif encoding == "base64":
        try:
            raw = base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("field content is not valid base64") from None
    else:
        raise BadRequest(f"field encoding must be \"base64\" when present, got {encoding!r}")
    if len(raw) > maxBytes:
        raise FrameTooBig(f"the message is larger than max-message-bytes ({maxBytes} bytes)")
    key = document.get("key")
    if key is not None:
        if not isinstance(key, str):
            raise BadRequest("field key must be a string or null")
        if len(key.encode("utf-8")) > _MAX_KEY:
            raise BadRequest(f"the message key is longer than {_MAX_KEY} bytes")
    try:
        # A name repeats as an array of its values, as readers see it.
        headers = headerPairs(document.get("headers"), "field headers")
    except ValueError as e:
        raise BadRequest(str(e)) from None
    return Draft(content=raw, key=key, headers=headers), ref


@implementer(IStreamFramer)
class WebSocketFramer:
    """
    How a stream goes on a WebSocket: one frame per message (text for
    UTF-8 content, binary otherwise; a JSON document each under
    C{evgate.json}), gap documents under C{evgate.json}, close codes for
    goodbyes.  Frames are complete, unmasked WebSocket frames (the gateway
    never negotiates per-message compression), so a batch is one write.
    """

    __slots__ = ("protocol", "tag", "json")

    def __init__(self, protocol: "GatewayWebSocketProtocol", tag: bytes, json: bool) -> None:
        self.protocol = protocol
        self.tag = tag
        self.json = json

    def _open(self) -> bool:
        return bool(self.protocol.state == WebSocketProtocol.STATE_OPEN)

    def _frame(self, payload: bytes, binary: bool = False) -> bytes:
        prepared: Any = self.protocol.factory.prepareMessage(payload, binary, True)
        return prepared.payloadHybi  # type: ignore[no-any-return]

    # IStreamFramer

    def open(self, producer: Any, cursor: Cursor) -> bool:
        # The protocol registered the producer when the socket opened.
        if self.json and self._open():
            self.protocol.sendMessage(_jsonFrame({"subscribed": {"cursor": cursor.encode(self.tag)}}))
        return True

    def event(self, event: Event) -> bytes:
        frames = event.frames
        if self.json:
            key: Tuple[Any, ...] = ("ws", "json", self.tag)
            frame = frames.get(key)
            if frame is None:
                frame = frames[key] = self._frame(envelopeJSON(event.message, event.token(self.tag)))
            return frame  # type: ignore[no-any-return]
        key = ("ws", "raw")
        frame = frames.get(key)
        if frame is None and event.message.error is not None:
            # A delivery step failed on it (evgate.pipeline): a raw stream
            # cannot carry a field, so a text frame of the JSON envelope
            # (raw content and error) stands for it.
            frame = frames[key] = self._frame(envelopeJSON(event.message, event.token(self.tag)))
        if frame is None:
            content = event.message.content
            try:
                content.decode("utf-8")
                binary = False
            except UnicodeDecodeError:
                binary = True
            frame = frames[key] = self._frame(content, binary)
        return frame  # type: ignore[no-any-return]

    def advance(self, cursor: Cursor) -> None:
        return None

    def gap(self, cursor: Cursor, reason: str) -> Optional[bytes]:
        if not self.json:
            # Without evgate.json there is no frame a client could tell
            # from a message; such clients cannot resume either.
            return None
        return self._frame(_jsonFrame({"gap": {"detail": reason, "cursor": cursor.encode(self.tag)}}))

    def heartbeat(self) -> None:
        # autobahn's pings (autoPingInterval) keep the connection alive.
        return None

    def write(self, data: bytes) -> None:
        if not self._open():
            return
        protocol = self.protocol
        if autobahnWritesPlainFrames(protocol):
            # What sendData does, with the bytes sent at once when the
            # socket can take them (evgate.directwrite).
            writeNow(protocol.transport, data)
            countAutobahnOctets(protocol, len(data))
        else:
            protocol.sendData(data)

    def writeFrom(self, frame: bytes, start: int) -> int:
        if not self._open():
            return len(frame)
        protocol = self.protocol
        if autobahnWritesPlainFrames(protocol):
            end = writeFrom(protocol.transport, frame, start)
            countAutobahnOctets(protocol, end - start)
            return end
        end = min(len(frame), start + directwrite.SLICE_BYTES)
        protocol.sendData(frame[start:end])
        return end

    def goodbye(self, reason: Goodbye, cursor: Optional[Cursor]) -> None:
        kind = reason.kind
        if reason.midFrame:
            # Half a frame is on the wire: a close frame cannot follow it.
            transport: Any = self.protocol.transport
            if transport is not None:
                transport.abortConnection()
            return
        if kind in (Goodbye.TOO_SLOW, Goodbye.SHED):
            self.protocol.closeWith(CLOSE_TRY_AGAIN, f"too slow: {reason.detail}; reconnect with the last id")
        elif kind == Goodbye.FAILED:
            failure = reason.failure
            if failure is not None and failure.check(EndpointUnavailable, EndpointTimeout):
                self.protocol.closeWith(CLOSE_TRY_AGAIN, "the endpoint is unavailable; reconnect later")
            else:
                self.protocol.closeWith(CLOSE_SERVER_ERROR, "the upstream subscription failed")
        elif kind == Goodbye.EXPIRED:
            self.protocol.closeWith(CLOSE_POLICY, "the credentials expired")
        elif kind == Goodbye.QUOTA:
            self.protocol.closeWith(CLOSE_TRY_AGAIN,
                                    f"message quota used up; reconnect in {math.ceil(reason.retryAfter)} s")
        else:
            self.protocol.closeWith(CLOSE_TRY_AGAIN, "the gateway is stopping; reconnect")


@dataclass
class Handoff:
    """
    What the entrypoint decided about an upgrade request, for the protocol
    that autobahn builds while rendering it.
    """

    call: ApiCall
    start: Any
    filter: Any


class GatewayWebSocketProtocol(WebSocketServerProtocol):
    """
    One WebSocket connection to an API: subscribes on open, publishes what
    the client sends.
    """

    # autobahn's own `log` (txaio) stays; this one is the gateway's.
    gatewayLog = Logger()

    handoff: Optional[Handoff] = None
    subscriber: Optional[StreamSubscriber] = None
    json = False

    def onConnect(self, request: Any) -> Optional[str]:
        self.json = SUBPROTOCOL in request.protocols
        entrypoint = self.factory.entrypoint
        if self.json:
            # A JSON frame carries its content escaped or base64: allow the
            # frame that much more, and check the content itself.
            self.maxMessagePayloadSize = entrypoint.maxBytes * 2 + 65536
            self.maxFramePayloadSize = self.maxMessagePayloadSize
        self.pending: Deque[List[Any]] = deque()
        self.readingPaused = False
        return SUBPROTOCOL if self.json else None

    def onOpen(self) -> None:
        handoff = self.handoff
        if handoff is None:  # pragma: no cover - only the entrypoint builds these
            self.closeWith(CLOSE_SERVER_ERROR, "no API for this connection")
            return
        self.handoff = None
        self.call = handoff.call
        boundSendBuffer(self.transport)
        framer = WebSocketFramer(self, handoff.call.api.tag, self.json)
        subscriber = self.subscriber = StreamSubscriber(handoff.call, self.factory.entrypoint, framer)
        # The HTTP channel registered itself as the transport's producer
        # before autobahn took the transport over; the stream is the
        # producer now, so that a full socket pauses its subscription.
        transport: Any = self.transport
        transport.unregisterProducer()
        transport.registerProducer(subscriber, True)
        subscriber.subscribe(handoff.start, handoff.filter)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        subscriber = self.subscriber
        if subscriber is not None:
            subscriber.end()
            # One access line per WebSocket, when it ends (evgate.logs).
            requestLog = subscriber.api.node.requestLog
            if requestLog is not None:
                peer = getattr(self.transport, "getPeer", lambda: None)()
                requestLog.streamEnded(subscriber.tally, subscriber, 101,
                                       subscriber.reactor.seconds() - subscriber.openedAt, subscriber.bytesOut,
                                       peer=getattr(peer, "host", "-"))

    def closeWith(self, code: int, reason: str) -> None:
        """
        Start the closing handshake with C{code}, which may be one of the
        codes RFC 6455 reserves for endpoints (1008, 1009, 1011, 1013):
        autobahn's C{sendClose} only lets applications send 1000 and
        3000-4999.
        """
        if self.state == WebSocketProtocol.STATE_OPEN:
            # Cut at a character boundary within the 123 bytes allowed.
            raw = reason.encode("utf-8")[:_MAX_REASON].decode("utf-8", "ignore").encode("utf-8")
            self.sendCloseFrame(code, raw)

    # publishing

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        api = self.call.api
        entrypoint = self.factory.entrypoint
        if not api.config.options.get("websocketPublish", True):
            problem = Forbidden(f"the WebSocket of API {api.name} is subscribe-only")
            if self.json:
                self.refuse(problem, None)
            else:
                self.closeWith(CLOSE_POLICY, problem.detail)
            return
        ref = None
        if self.json:
            if isBinary:
                self.refuse(BadRequest("evgate.json frames are text frames holding one JSON object"), None)
                return
            try:
                draft, ref = parseJsonFrame(payload, entrypoint.maxBytes)
            except FrameTooBig as e:
                self.closeWith(CLOSE_TOO_BIG, str(e))
                return
            except Problem as problem:
                self.refuse(problem, _refOf(payload))
                return
        else:
            draft = Draft(content=payload)
        self.publish(draft, ref)

    def refuse(self, problem: Problem, ref: Any) -> None:
        """
        Answer a frame that cannot be published with C{problem}, in its
        turn: after the answers of every earlier frame still waiting for
        the broker (evgate.json answers are in frame order, always).
        """
        self.pending.append([Failure(problem), ref])
        self._answer()

    def publish(self, draft: Draft, ref: Any) -> None:
        """
        Publish C{draft}; its answer is sent when it and every earlier
        publish of this connection are answered.
        """
        api = self.call.api
        timeout = self.factory.entrypoint.timeout
        slot: List[Any] = [None, ref]
        self.pending.append(slot)
        connector: Any = api.connector
        reactor = api.node.reactor
        started = reactor.seconds()
        # The connector owns the timeout (IConnector.publish): an
        # EndpointTimeout comes back as this frame's answer, in its turn.
        pipeline = api.pipeline
        if pipeline.publishSteps:
            # The API's publish steps first (evgate.pipeline); a refusal is
            # this frame's answer.
            d: Deferred = pipeline.publish(draft, self.call)
            d.addCallback(lambda ready: connector.publish(api.config.topic, ready, timeout))
        else:
            d = connector.publish(api.config.topic, draft, timeout)

        def settled(result: Any) -> None:
            slot[0] = result
            if not isinstance(result, Failure):
                self.factory.entrypoint.tally.published(len(draft.content), reactor.seconds() - started)
                if self.subscriber is not None:
                    self.subscriber.received += len(draft.content)
            self._answer()

        d.addBoth(settled)
        if len(self.pending) >= MAX_IN_FLIGHT and not self.readingPaused:
            self.readingPaused = True
            transport: Any = self.transport
            transport.pauseProducing()

    def _answer(self) -> None:
        while self.pending and self.pending[0][0] is not None:
            result, ref = self.pending.popleft()
            if isinstance(result, Failure):
                if not self._publishFailed(result, ref):
                    return
            elif self.json and self.state == WebSocketProtocol.STATE_OPEN:
                document: Dict[str, Any] = {"ack": result.asJSON() if isinstance(result, Position) else result}
                if ref is not None:
                    document["ref"] = ref
                self.sendMessage(_jsonFrame(document))
        if self.readingPaused and len(self.pending) <= MAX_IN_FLIGHT // 2:
            self.readingPaused = False
            transport: Any = self.transport
            transport.resumeProducing()

    def _publishFailed(self, failure: Failure, ref: Any) -> bool:
        # Returns whether the connection stays open.
        problem: Problem
        if isinstance(failure.value, Problem):
            problem = failure.value
        else:
            self.gatewayLog.failure("publishing from a WebSocket of {api}", failure, api=self.call.api.name)
            problem = Problem("an internal error occurred; it has been logged")
        if self.state != WebSocketProtocol.STATE_OPEN:
            return False
        if self.json:
            self.sendMessage(_jsonFrame(errorDocument(problem, ref)))
            return True
        # Without evgate.json there is no frame to refuse a publish with:
        # closing is the only way not to lose it silently.
        code = CLOSE_TRY_AGAIN if failure.check(EndpointUnavailable, EndpointTimeout) else CLOSE_SERVER_ERROR
        self.closeWith(code, "publish failed: " + problem.detail)
        self.pending.clear()
        return False


def _refOf(payload: bytes) -> Any:
    # The ref of a frame that was refused, when it is readable at all.
    try:
        document = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    return document.get("ref") if isinstance(document, dict) else None



class GatewayWebSocketFactory(WebSocketServerFactory):
    """
    Builds the protocol of each upgraded request of one API, handing it
    what the entrypoint decided (L{Handoff}).
    """

    protocol = GatewayWebSocketProtocol

    def __init__(self, entrypoint: "WebSocketEntrypoint", reactor: Any) -> None:
        super().__init__(server="evgate", reactor=reactor)
        bindAutobahnTimers(self, reactor)
        self.entrypoint = entrypoint
        self.handoff: Optional[Handoff] = None

    def buildProtocol(self, addr: Any) -> GatewayWebSocketProtocol:
        protocol: Any = super().buildProtocol(addr)
        protocol.handoff = self.handoff
        self.handoff = None
        return protocol  # type: ignore[no-any-return]


@implementer(IStreamingEntrypoint)
class WebSocketEntrypoint:
    """
    C{websocket}: subscribe and publish over one WebSocket.
    """

    name = "websocket"
    methods = (b"GET",)
    log = Logger()

    def __init__(self, api: Any) -> None:
        self.api = api
        settings = api.node.settings
        self.maxBytes: int = settings.maxMessageBytes
        self.timeout: float = settings.publishTimeout
        self.live: Set[StreamSubscriber] = set()
        self.tally = tallyFor(api, self.name)
        heartbeat = api.config.options.get("heartbeat", 15.0)
        self.factory = GatewayWebSocketFactory(self, api.node.reactor)
        self.factory.setProtocolOptions(
            maxMessagePayloadSize=self.maxBytes,
            maxFramePayloadSize=self.maxBytes,
            autoPingInterval=heartbeat,
            autoPingTimeout=heartbeat,
            openHandshakeTimeout=10,
            # Send 1009 and the like in a close frame rather than only
            # dropping the connection, so that clients learn why.
            failByDrop=False,
            closeHandshakeTimeout=2,
        )
        self.resource = WebSocketResource(self.factory)

    def accepts(self, request: Request) -> bool:
        upgrade = request.getHeader(b"upgrade")
        return request.method == b"GET" and upgrade is not None and b"websocket" in upgrade.lower()

    def render(self, request: Request, call: ApiCall) -> Any:
        try:
            cursor = requestCursor(request, call.api.tag)
            filter = filterFor(request, call)
        except Problem as problem:
            return writeProblem(request, problem)
        start: Any = cursor if cursor is not None else call.api.config.start
        # autobahn builds the protocol and runs the opening handshake
        # synchronously inside render: the handoff is picked up there.
        self.factory.handoff = Handoff(call, start, filter)
        try:
            return self.resource.render(request)
        finally:
            self.factory.handoff = None

    def stop(self) -> None:
        """
        Close every WebSocket with 1013 (try again later): the gateway is
        stopping.
        """
        stopAll(self.live)  # type: ignore[arg-type]

