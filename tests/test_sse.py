"""
Tests for the SSE entrypoint, in memory: a real HTTP channel over a
StringTransport, the memory endpoint and a Clock.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

from twisted.internet.defer import succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from evgate import directwrite
from evgate.config import parseConfig
from evgate.entrypoints import sse as sseModule
from evgate.entrypoints import streaming as streamingModule
from evgate.entrypoints.sse import SseEntrypoint, acceptsEventStream
from evgate.entrypoints.streaming import StreamSubscriber
from evgate.errors import EndpointUnavailable
from evgate.gateway import Consumer
from evgate.interfaces import IEntrypoint, IPlan, ISubscriber
from evgate.message import Cursor, Draft, cursorTag
from evgate.service import GatewayService

from .helpers import GatewayIni
from .wire import WireConnection, dechunk, splitHead, sseEvents

TAG = cursorTag("demo", "demo")

def streamingGateway(clock: Clock, queue: int = 1000, retention: int = 100, heartbeat: Optional[float] = 0,
                     entrypoints: str = "http-post http-get sse", extra: str = "",
                     gatewayExtra: str = "") -> GatewayService:
    """
    A memory gateway for streaming tests, on C{clock}.
    """
    if heartbeat is not None:
        extra = f"heartbeat = {heartbeat}\n{extra}"
    ini = (GatewayIni(subscriber_queue=queue).lines("gateway", gatewayExtra).memory(retention=retention)
           .api("demo", entrypoints=entrypoints).extra(extra))
    return GatewayService(parseConfig(str(ini), "test.ini"), clock)


class StreamTestCase(SynchronousTestCase):
    """
    A streaming gateway on a Clock, and ways to open streams and publish.
    """

    queue = 1000
    retention = 100
    heartbeat: float = 0
    entrypoints = "http-post http-get sse"
    extra = ""
    gatewayExtra = ""

    def setUp(self) -> None:
        self.clock = Clock()
        self.gateway = streamingGateway(self.clock, self.queue, self.retention, self.heartbeat,
                                        self.entrypoints, self.extra, self.gatewayExtra)
        self.api = self.gateway.apis[0]
        self.connector = self.gateway.connectors["local"]

    def turn(self) -> None:
        """
        Let every pending zero-delay call run (the memory broker delivers on
        later reactor turns).
        """
        for _ in range(5):
            self.clock.advance(0)

    def openStream(self, target: str = "/demo", headers: Optional[Dict[str, str]] = None) -> WireConnection:
        """
        Open an event stream and let it start.
        """
        connection = WireConnection(self.gateway)
        allHeaders = {"Accept": "text/event-stream"}
        allHeaders.update(headers or {})
        connection.get(target, allHeaders)
        self.turn()
        return connection

    def publish(self, *contents: bytes, key: Optional[str] = None,
                headers: Sequence[Tuple[str, str]] = ()) -> None:
        """
        Publish C{contents} (in one broker batch) and deliver them.
        """
        for content in contents:
            self.connector.publish("demo", Draft(content=content, key=key, headers=tuple(headers)))
        self.turn()

    def response(self, connection: WireConnection) -> Tuple[int, Dict[str, str], bytes, bool]:
        """
        Status, headers, de-chunked body so far and whether it ended.
        """
        status, headers, rest = splitHead(connection.received())
        if headers.get("transfer-encoding") == "chunked":
            body, ended = dechunk(rest)
        else:
            body, ended = rest, False
        return status, headers, body, ended

    def events(self, connection: WireConnection) -> List[Dict[str, Any]]:
        """
        The SSE blocks received on C{connection}, preamble included.
        """
        return sseEvents(self.response(connection)[2])

    def messages(self, connection: WireConnection) -> List[Dict[str, Any]]:
        """
        The blocks that a browser would dispatch (those with data).
        """
        return [e for e in self.events(connection) if "data" in e]

    def entrypoint(self) -> SseEntrypoint:
        """
        The API's SSE entrypoint.
        """
        for candidate in self.api.entrypoints:
            if isinstance(candidate, SseEntrypoint):
                return candidate
        raise AssertionError("no sse entrypoint")


class SseEntrypointTests(StreamTestCase):
    """
    Choosing the entrypoint, response headers and the preamble.
    """

    def test_interfaces(self) -> None:
        """
        The entrypoint is an IEntrypoint; its subscribers are ISubscribers
        and IPushProducers.
        """
        entrypoint = self.entrypoint()
        verifyObject(IEntrypoint, entrypoint)
        self.openStream()
        (subscriber,) = entrypoint.live
        verifyObject(ISubscriber, subscriber)
        verifyObject(IPushProducer, subscriber)

    def test_acceptHeader(self) -> None:
        """
        Only an Accept header naming text/event-stream with a positive
        quality picks SSE; wildcards are plain GETs.
        """
        self.assertTrue(acceptsEventStream(b"text/event-stream"))
        self.assertTrue(acceptsEventStream(b"application/json;q=0.5, Text/Event-Stream"))
        self.assertFalse(acceptsEventStream(b"text/event-stream;q=0"))
        self.assertFalse(acceptsEventStream(b"*/*"))
        self.assertFalse(acceptsEventStream(b"text/*"))
        self.assertFalse(acceptsEventStream(None))

    def test_plainGetIsNotSse(self) -> None:
        """
        A GET without the event-stream Accept header goes to http-get.
        """
        connection = WireConnection(self.gateway)
        connection.get("/demo?timeout=0", {"Accept": "application/json"})
        self.turn()
        status, headers, body, ended = self.response(connection)
        self.assertEqual(status, 200)
        self.assertTrue(headers["content-type"].startswith("application/json"))

    def test_headersAndPreamble(self) -> None:
        """
        The stream is a 200 text/event-stream, not cached nor buffered by
        proxies, and starts with the retry delay and the id of where it
        starts.
        """
        connection = self.openStream()
        status, headers, body, ended = self.response(connection)
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], "text/event-stream")
        self.assertEqual(headers["cache-control"], "no-cache")
        self.assertEqual(headers["x-accel-buffering"], "no")
        self.assertFalse(ended)
        (preamble,) = self.events(connection)
        self.assertEqual(preamble["retry"], "3000")
        start = Cursor.decode(preamble["id"], TAG)
        self.assertEqual(start.asDict(), {0: 0})


class SseFramingTests(StreamTestCase):
    """
    How messages become events.
    """

    def test_multiLine(self) -> None:
        """
        Content with any line break (CRLF, CR, LF) becomes one data line per
        line, so a client reassembles it with newlines; a trailing break
        survives.
        """
        connection = self.openStream()
        self.publish(b"one\r\ntwo\rthree\nfour", b"last\n")
        first, second = self.messages(connection)
        self.assertEqual(first["event"], "message")
        self.assertEqual(first["data"], "one\ntwo\nthree\nfour")
        self.assertEqual(second["data"], "last\n")
        raw = self.response(connection)[2]
        self.assertIn(b"data: one\ndata: two\ndata: three\ndata: four\n\n", raw)

    def test_idsResume(self) -> None:
        """
        Every message event has the id that resumes right after it.
        """
        connection = self.openStream()
        self.publish(b"a", b"b")
        first, second = self.messages(connection)
        self.assertEqual(Cursor.decode(first["id"], TAG).asDict(), {0: 1})
        self.assertEqual(Cursor.decode(second["id"], TAG).asDict(), {0: 2})

    def test_binary(self) -> None:
        """
        Content that is not UTF-8 is sent base64 as an event of type
        binary, never as text.
        """
        connection = self.openStream()
        self.publish(b"\xff\x00\xfe")
        (event,) = self.messages(connection)
        self.assertEqual(event["event"], "binary")
        self.assertEqual(base64.b64decode(event["data"]), b"\xff\x00\xfe")

    def test_jsonFormat(self) -> None:
        """
        With format=json each event's data is the message's JSON envelope
        on one line, binary content base64 with its encoding.
        """
        connection = self.openStream("/demo?format=json")
        self.publish(b"line1\nline2", key="k1", headers=[("tenant", "a")])
        self.publish(b"\xff")
        first, second = self.messages(connection)
        envelope = json.loads(first["data"])
        self.assertEqual(envelope["key"], "k1")
        self.assertEqual(envelope["headers"], {"tenant": "a"})
        self.assertEqual(envelope["content"], "line1\nline2")
        self.assertEqual(envelope["metadata"]["offset"], 0)
        self.assertEqual(first["event"], "message")
        binary = json.loads(second["data"])
        self.assertEqual((binary["content"], binary["encoding"]), ("/w==", "base64"))

    def test_badFormat(self) -> None:
        """
        An unknown format is a 400 problem, not a stream.
        """
        connection = self.openStream("/demo?format=xml")
        status, headers, body, ended = self.response(connection)
        self.assertEqual(status, 400)
        self.assertEqual(headers["content-type"], "application/problem+json")

    def test_encodedOncePerMessage(self) -> None:
        """
        However many subscribers a message has, its event is encoded once
        (per API and format) and the same bytes are written to each.
        """
        calls = []
        original = sseModule.dataLines

        def counting(text: str) -> bytes:
            calls.append(text)
            return original(text)

        self.patch(sseModule, "dataLines", counting)
        connections = [self.openStream() for _ in range(5)]
        self.publish(b"shared")
        self.assertEqual(calls, ["shared"])
        for connection in connections:
            self.assertEqual([e["data"] for e in self.messages(connection)], ["shared"])

    def test_oneWritePerBatch(self) -> None:
        """
        A batch of messages is written with one write (one HTTP chunk).
        """
        connection = self.openStream()
        before = len(connection.received())
        self.publish(b"a", b"b", b"c")
        chunk = connection.received()[before:]
        size, _, rest = chunk.partition(b"\r\n")
        self.assertEqual(int(size, 16) + 2, len(rest), "one chunk carries the whole batch")


class SseHeartbeatTests(StreamTestCase):
    """
    Comments keep an idle stream alive.
    """

    heartbeat = 5

    def comments(self, connection: WireConnection) -> int:
        return sum(len(e.get("comments", ())) for e in self.events(connection))

    def test_idleStream(self) -> None:
        """
        A comment is written after heartbeat seconds without traffic, and
        again after each further heartbeat.
        """
        connection = self.openStream()
        self.clock.advance(4.9)
        self.assertEqual(self.comments(connection), 0)
        self.clock.advance(0.1)
        self.assertEqual(self.comments(connection), 1)
        self.clock.advance(5)
        self.assertEqual(self.comments(connection), 2)

    def test_trafficPostponesHeartbeat(self) -> None:
        """
        Messages count as traffic: the comment comes heartbeat seconds after
        the last write, not on a fixed beat.
        """
        connection = self.openStream()
        self.clock.advance(3)
        self.publish(b"x")
        self.clock.advance(2)
        self.assertEqual(self.comments(connection), 0)
        self.clock.advance(3)
        self.assertEqual(self.comments(connection), 1)


class SseResumeTests(StreamTestCase):
    """
    Last-Event-ID and the cursor parameter give exactly the messages after
    them.
    """

    def test_lastEventId(self) -> None:
        """
        A stream opened with the Last-Event-ID of a message receives exactly
        the messages after it.
        """
        first = self.openStream()
        self.publish(b"1", b"2", b"3")
        ids = [e["id"] for e in self.messages(first)]
        second = self.openStream(headers={"Last-Event-ID": ids[0]})
        self.assertEqual([e["data"] for e in self.messages(second)], ["2", "3"])
        self.assertEqual([e["id"] for e in self.messages(second)], ids[1:])
        self.publish(b"4")
        self.assertEqual([e["data"] for e in self.messages(second)], ["2", "3", "4"])

    def test_cursorParameter(self) -> None:
        """
        The cursor query parameter resumes the same way.
        """
        first = self.openStream()
        self.publish(b"1", b"2")
        ids = [e["id"] for e in self.messages(first)]
        second = self.openStream(f"/demo?cursor={ids[0]}")
        self.assertEqual([e["data"] for e in self.messages(second)], ["2"])

    def test_headerWinsOverParameter(self) -> None:
        """
        An EventSource reconnects to the URL it was made with plus the
        Last-Event-ID header: the header is newer and wins.
        """
        first = self.openStream()
        self.publish(b"1", b"2", b"3")
        ids = [e["id"] for e in self.messages(first)]
        second = self.openStream(f"/demo?cursor={ids[0]}", {"Last-Event-ID": ids[1]})
        self.assertEqual([e["data"] for e in self.messages(second)], ["3"])

    def test_resumeFromPreamble(self) -> None:
        """
        The id of the preamble resumes where the stream began, so a client
        cut before the first message misses nothing published meanwhile.
        """
        first = self.openStream()
        start = self.events(first)[0]["id"]
        first.disconnect()
        self.publish(b"while away")
        second = self.openStream(headers={"Last-Event-ID": start})
        self.assertEqual([e["data"] for e in self.messages(second)], ["while away"])

    def test_endedWhileReplayedLetsGo(self) -> None:
        """
        A stream that ends while the hub replays its backlog, inside
        subscribe and before it holds its subscription (cut for falling
        behind, or its connection gone), still leaves the shared stream.
        """
        first = self.openStream()
        self.publish(b"1", b"2", b"3")
        ids = [e["id"] for e in self.messages(first)]
        original = StreamSubscriber.deliver

        def deliverThenEnd(subscriber: StreamSubscriber, events: Any) -> None:
            original(subscriber, events)
            subscriber.end()

        self.patch(StreamSubscriber, "deliver", deliverThenEnd)
        self.openStream(headers={"Last-Event-ID": ids[0]})
        [stream] = self.gateway.hub.streams.values()
        self.assertEqual(len(stream.subscriptions), 1)
        self.assertEqual(len(self.entrypoint().live), 1)

    def test_badLastEventId(self) -> None:
        """
        A malformed or foreign Last-Event-ID is a 400 problem, never a
        silent restart.
        """
        foreign = Cursor.fromMapping({0: 1}).encode(cursorTag("other", "demo"))
        for value in ("not a cursor!", foreign):
            connection = self.openStream(headers={"Last-Event-ID": value})
            status, headers, body, ended = self.response(connection)
            self.assertEqual(status, 400)
            self.assertEqual(json.loads(body)["type"], "https://evgate.dev/problems/bad-cursor")


class SseGapTests(StreamTestCase):
    """
    Messages that are gone are announced, not skipped silently.
    """

    retention = 3

    def test_gapEvent(self) -> None:
        """
        Resuming from a cursor the broker no longer retains gives an
        event: gap saying why and where reading resumes (as its id), then
        the retained messages.
        """
        for i in range(6):
            self.connector.publish("demo", Draft(content=str(i).encode()))
        stale = Cursor.fromMapping({0: 1}, self.connector.epoch()).encode(TAG)
        connection = self.openStream(headers={"Last-Event-ID": stale})
        events = self.messages(connection)
        gap = events[0]
        self.assertEqual(gap["event"], "gap")
        document = json.loads(gap["data"])
        self.assertIn("retention", document["detail"])
        self.assertEqual(document["cursor"], gap["id"])
        self.assertEqual(Cursor.decode(gap["id"], TAG).asDict(), {0: 3})
        self.assertEqual([e["data"] for e in events[1:]], ["3", "4", "5"])


class SseFilterTests(StreamTestCase):
    """
    Client filters on the stream, and the position they move.
    """

    def test_clientFilter(self) -> None:
        """
        Only messages matching the filter parameter are sent; the dropped
        ones still move the client's last event id, once per batch.
        """
        connection = self.openStream('/demo?filter=key%20%3D%3D%20%22eu%22')
        self.publish(b"1", key="eu")
        self.publish(b"2", b"3", key="us")
        self.publish(b"4", key="eu")
        events = self.events(connection)[1:]
        self.assertEqual([e.get("data") for e in events], ["1", None, "4"])
        self.assertEqual(Cursor.decode(events[1]["id"], TAG).asDict(), {0: 3})
        self.assertEqual(set(events[1]), {"id"})

    def test_jsonContentFilter(self) -> None:
        """
        A filter reads JSON content as an object.
        """
        connection = self.openStream("/demo?filter=content.amount%20%3E%20100")
        self.publish(b'{"amount": 50}', b'{"amount": 150}', b"not json")
        self.assertEqual([e["data"] for e in self.messages(connection)], ['{"amount": 150}'])

    def test_badFilter(self) -> None:
        """
        A filter that does not compile is a 400 problem saying where.
        """
        connection = self.openStream("/demo?filter=key%20%3D%3D%20")
        status, headers, body, ended = self.response(connection)
        self.assertEqual(status, 400)
        problem = json.loads(body)
        self.assertEqual(problem["type"], "https://evgate.dev/problems/bad-filter")
        self.assertEqual((problem["line"], problem["column"]), (1, 6))


@implementer(IPlan)
class ClaimsPlan:
    """
    A plan that authenticates everyone as a consumer with fixed claims and
    expiry.
    """

    name = "test-claims"

    def __init__(self, claims: Dict[str, Any], expiresAt: Optional[float] = None) -> None:
        self.consumer = Consumer(id="tester", plan=self.name, claims=claims, expiresAt=expiresAt)

    def present(self, request: Any) -> bool:
        return True

    def authenticate(self, request: Any) -> Any:
        return succeed(self.consumer)


class SseOperatorFilterTests(StreamTestCase):
    """
    The API's operator filter, over the caller's claims.
    """

    extra = "filter = headers.tenant == claims.tenant"

    def test_claims(self) -> None:
        """
        The operator filter sees the claims of the caller: a tenant only
        receives its own messages.
        """
        self.api.plans = [ClaimsPlan({"tenant": "a"})]
        connection = self.openStream()
        self.publish(b"for a", headers=[("tenant", "a")])
        self.publish(b"for b", headers=[("tenant", "b")])
        self.publish(b"untagged")
        self.assertEqual([e["data"] for e in self.messages(connection)], ["for a"])

    def test_operatorThenClient(self) -> None:
        """
        A client filter narrows what the operator filter lets through; it
        cannot widen it.
        """
        self.api.plans = [ClaimsPlan({"tenant": "a"})]
        connection = self.openStream("/demo?filter=true")
        self.publish(b"for b", headers=[("tenant", "b")])
        self.publish(b"for a", headers=[("tenant", "a")])
        self.assertEqual([e["data"] for e in self.messages(connection)], ["for a"])

    def test_expiry(self) -> None:
        """
        A stream ends with an error event when the caller's credentials
        expire.
        """
        self.api.plans = [ClaimsPlan({"tenant": "a"}, expiresAt=30.0)]
        connection = self.openStream()
        self.clock.advance(30)
        status, headers, body, ended = self.response(connection)
        self.assertTrue(ended)
        error = self.messages(connection)[-1]
        self.assertEqual(error["event"], "error")
        self.assertEqual(json.loads(error["data"])["status"], 401)


class SseBackpressureTests(StreamTestCase):
    """
    A transport that pushes back pauses its subscriber; a subscriber that
    falls too far behind is cut; the others go on.
    """

    queue = 3

    def subscriber(self, connection: WireConnection) -> StreamSubscriber:
        for subscriber in self.entrypoint().live:
            if subscriber.framer.request.channel is connection.httpChannel:
                return subscriber
        raise AssertionError("no live subscriber on this connection")

    def test_pauseQueuesAndResumeFlushes(self) -> None:
        """
        While the transport is full, messages queue (and the hub is told);
        when it drains, the queue is written in order.
        """
        connection = self.openStream()
        subscriber = self.subscriber(connection)
        other = self.openStream()
        connection.fill()
        self.assertTrue(subscriber.paused)
        self.assertTrue(subscriber.subscription.paused)
        self.publish(b"1", b"2")
        self.assertEqual(self.messages(connection), [])
        self.assertEqual(len(subscriber.queue), 2)
        connection.drain()
        self.assertFalse(subscriber.subscription.paused)
        self.assertEqual([e["data"] for e in self.messages(connection)], ["1", "2"])
        self.publish(b"3")
        self.assertEqual([e["data"] for e in self.messages(connection)], ["1", "2", "3"])
        self.assertEqual([e["data"] for e in self.messages(other)], ["1", "2", "3"])

    def test_everyonePausedPausesUpstream(self) -> None:
        """
        When the only subscriber is paused the hub stops reading upstream
        rather than queueing; it reads on when the subscriber resumes.
        """
        connection = self.openStream()
        subscriber = self.subscriber(connection)
        connection.fill()
        self.publish(b"1", b"2")
        self.assertEqual(len(subscriber.queue), 0)
        connection.drain()
        self.turn()
        self.assertEqual([e["data"] for e in self.messages(connection)], ["1", "2"])

    def test_overflowCutsOnlyTheSlowOne(self) -> None:
        """
        A subscriber whose queue overflows gets an error event naming the
        last id it received and its stream ends; a subscriber that keeps up
        receives everything.
        """
        slow = self.openStream()
        fast = self.openStream()
        self.publish(b"0")
        lastSeen = self.messages(slow)[-1]["id"]
        slow.fill()
        for i in range(1, 6):
            self.publish(str(i).encode())
        status, headers, body, ended = self.response(slow)
        self.assertTrue(ended)
        events = self.messages(slow)
        self.assertEqual([e["data"] for e in events[:-1]], ["0"])
        error = events[-1]
        self.assertEqual(error["event"], "error")
        document = json.loads(error["data"])
        self.assertEqual(document["type"], "https://evgate.dev/problems/subscriber-too-slow")
        self.assertEqual(document["cursor"], lastSeen)
        self.assertNotIn("id", error)
        self.assertEqual([e["data"] for e in self.messages(fast)], [str(i) for i in range(6)])
        self.assertEqual(len(self.entrypoint().live), 1)
        # The connection closes once the client took what was written; one
        # that never does is aborted.
        self.assertTrue(slow.transport.disconnecting)
        self.clock.advance(sseModule.ABORT_GRACE)
        self.assertTrue(slow.transport.disconnected)
        # ... and the slow client resumes from its last id with nothing lost.
        again = self.openStream(headers={"Last-Event-ID": lastSeen})
        self.assertEqual([e["data"] for e in self.messages(again)], ["1", "2", "3", "4", "5"])

    def test_pausedFilteredPositionCoalesces(self) -> None:
        """
        Positions moved by a filter while paused are queued as one id-only
        block, and do not count towards the queue's bound.
        """
        connection = self.openStream("/demo?filter=key%20%3D%3D%20%22eu%22")
        self.openStream()
        connection.fill()
        for i in range(6):
            self.publish(str(i).encode(), key="us")
        subscriber = self.subscriber(connection)
        self.assertEqual(len(subscriber.queue), 1)
        connection.drain()
        events = self.events(connection)[1:]
        self.assertEqual(len(events), 1)
        self.assertEqual(Cursor.decode(events[0]["id"], TAG).asDict(), {0: 6})


class SseMemoryBoundTests(StreamTestCase):
    """
    Queued frames are shared bytes, bounded per stream and per node in
    bytes (subscriber-queue-bytes, max-queued-bytes).
    """

    gatewayExtra = "subscriber-queue-bytes = 5000\nmax-queued-bytes = 4096"

    def subscriber(self, connection: WireConnection) -> StreamSubscriber:
        for subscriber in self.entrypoint().live:
            if subscriber.framer.request.channel is connection.httpChannel:
                return subscriber
        raise AssertionError("no live subscriber on this connection")

    def test_sharedBytes(self) -> None:
        """
        Two paused streams queue the very same bytes object for a message:
        the frame cached on the event, not a copy each.
        """
        first, second = self.openStream(), self.openStream()
        self.openStream()  # a reader that keeps up keeps the stream flowing
        first.fill()
        second.fill()
        self.publish(b"x" * 100)
        a, b = self.subscriber(first), self.subscriber(second)
        (event,) = self.gateway.hub.streams[("local", "demo")].window.events
        self.assertIs(a.queue[0].frame, b.queue[0].frame)
        self.assertIs(a.queue[0].frame, event.frames[("sse", TAG, "text")])

    def test_largeFrameInSlices(self) -> None:
        """
        A frame larger than a slice goes to a transport that cannot be
        written to directly (this in-memory one) a slice at a time, while
        it takes them: a transport that pushes back after the first holds
        one slice, and the rest waits as the shared frame.
        """
        connection = self.openStream()
        self.openStream()
        subscriber = self.subscriber(connection)
        writes: List[bytes] = []
        original = connection.transport.write

        def write(data: bytes) -> None:
            writes.append(data)
            original(data)
            connection.fill()

        self.patch(connection.transport, "write", write)
        # A chunk goes out as (size line, data, CRLF).
        self.patch(connection.transport, "writeSequence", lambda parts: write(b"".join(parts)))
        self.patch(streamingModule, "FLUSH_BYTES", 1024)
        self.patch(directwrite, "SLICE_BYTES", 1024)
        self.publish(b"z" * 4000)
        self.assertEqual(len(writes), 1)
        self.assertLessEqual(len(writes[0]), 1024 + 16)
        (event,) = self.gateway.hub.streams[("local", "demo")].window.events
        self.assertIs(subscriber.queue[0].frame, event.frames[("sse", TAG, "text")])
        self.assertEqual(subscriber.headSent, 1024)
        while subscriber.queue:
            connection.drain()
        self.assertEqual(len(writes), 4)
        self.assertEqual([e["data"] for e in self.messages(connection)], ["z" * 4000])

    def test_largeFrameSharedByStreams(self) -> None:
        """
        Every stream writes a large message from the one frame cached on
        the hub's event, never from a copy of its own.
        """
        self.openStream()
        self.openStream()
        framed: List[bytes] = []
        original = sseModule.SseFramer.writeFrom

        def writeFrom(framer: Any, frame: bytes, start: int) -> int:
            framed.append(frame)
            return original(framer, frame, start)

        self.patch(sseModule.SseFramer, "writeFrom", writeFrom)
        self.patch(streamingModule, "FLUSH_BYTES", 1024)
        self.publish(b"w" * 4000)
        (event,) = self.gateway.hub.streams[("local", "demo")].window.events
        shared = event.frames[("sse", TAG, "text")]
        self.assertGreaterEqual(len(framed), 2)
        for frame in framed:
            self.assertIs(frame, shared)

    def test_byteBoundCuts(self) -> None:
        """
        A stream with more than subscriber-queue-bytes queued is cut like
        one too many messages behind, with its resume cursor.
        """
        connection = self.openStream()
        self.openStream()
        self.gateway.hub.streamQueues.limit = 10**9
        connection.fill()
        self.publish(b"a" * 3000)
        self.assertEqual(len(self.entrypoint().live), 2)
        self.publish(b"b" * 3000)
        self.assertEqual(len(self.entrypoint().live), 1)
        error = self.messages(connection)[-1]
        self.assertEqual(error["event"], "error")
        document = json.loads(error["data"])
        self.assertEqual(document["type"], "https://evgate.dev/problems/subscriber-too-slow")
        self.assertIn("5000 bytes", document["detail"])
        self.assertIn("cursor", document)

    def test_nodeShedsTheSlowest(self) -> None:
        """
        When the node's distinct queued frames exceed max-queued-bytes, the
        stream with the most bytes queued is cut first (and counted), and
        the others, which share what is left, go on.
        """
        slowest, b, c = self.openStream(), self.openStream(), self.openStream()
        cut = self.subscriber(slowest)
        self.openStream()
        slowest.fill()
        self.publish(b"1" * 1500)
        b.fill()
        c.fill()
        self.publish(b"2" * 1500)
        self.assertEqual(len(self.entrypoint().live), 4)
        self.publish(b"3" * 1500)
        live = self.entrypoint().live
        self.assertEqual(len(live), 3)
        self.assertNotIn(cut, live)
        error = self.messages(slowest)[-1]
        self.assertEqual(error["event"], "error")
        self.assertIn("max-queued-bytes", json.loads(error["data"])["detail"])
        self.assertEqual(self.entrypoint().tally.shed, 1)
        self.assertLessEqual(self.gateway.hub.streamQueues.total, 4096)
        b.drain()
        self.assertEqual([e["data"][0] for e in self.messages(b)], ["1", "2", "3"])


class SseLifecycleTests(StreamTestCase):
    """
    How streams end.
    """

    extra = "sse.max-duration = 60\nsse.retry = 500"

    def test_clientGone(self) -> None:
        """
        A client that disconnects leaves nothing behind: no live subscriber
        and no hub subscription.
        """
        connection = self.openStream()
        stream = self.gateway.hub.streams[("local", "demo")]
        self.assertEqual(len(stream.subscriptions), 1)
        connection.disconnect()
        self.assertEqual(self.entrypoint().live, set())
        self.assertEqual(stream.subscriptions, [])

    def test_maxDuration(self) -> None:
        """
        After sse.max-duration seconds the stream ends cleanly, so the
        client reconnects (through a load balancer, to any node); the retry
        delay is sse.retry.
        """
        connection = self.openStream()
        self.assertEqual(self.events(connection)[0]["retry"], "500")
        self.clock.advance(59)
        self.assertFalse(self.response(connection)[3])
        self.clock.advance(1)
        self.assertTrue(self.response(connection)[3])
        self.assertEqual(self.entrypoint().live, set())

    def test_stop(self) -> None:
        """
        At shutdown every stream ends cleanly (the response is completed).
        """
        connections = [self.openStream() for _ in range(3)]
        self.entrypoint().stop()
        for connection in connections:
            self.assertTrue(self.response(connection)[3])
        self.assertEqual(self.entrypoint().live, set())

    def test_upstreamFailure(self) -> None:
        """
        An upstream that fails after the stream started ends it with an
        error event holding the problem; the client reconnects.
        """
        connection = self.openStream()
        (subscriber,) = self.entrypoint().live
        subscriber.failed(Failure(EndpointUnavailable("the broker went away")))
        self.assertTrue(self.response(connection)[3])
        error = self.messages(connection)[-1]
        self.assertEqual(error["event"], "error")
        self.assertEqual(json.loads(error["data"])["detail"], "the broker went away")

    def test_upstreamFailureBeforeStart(self) -> None:
        """
        An upstream that fails before the stream started is an HTTP problem
        response (EventSource does not retry those).
        """
        connection = WireConnection(self.gateway)
        connection.get("/demo", {"Accept": "text/event-stream"})
        (subscriber,) = self.entrypoint().live
        subscriber.failed(Failure(EndpointUnavailable("no broker")))
        status, headers, body, ended = self.response(connection)
        self.assertEqual(status, 503)
        self.assertEqual(json.loads(body)["detail"], "no broker")


class CorsTests(StreamTestCase):
    """
    The cors-origins key lets pages on listed origins read the API.
    """

    extra = "cors-origins = http://app.test"

    def test_allowedOrigin(self) -> None:
        """
        A stream requested from a listed origin names it in
        Access-Control-Allow-Origin.
        """
        connection = self.openStream(headers={"Origin": "http://app.test"})
        status, headers, body, ended = self.response(connection)
        self.assertEqual(headers["access-control-allow-origin"], "http://app.test")
        self.assertEqual(headers["vary"], "Origin")

    def test_otherOrigin(self) -> None:
        """
        Another origin gets no Access-Control-Allow-Origin.
        """
        connection = self.openStream(headers={"Origin": "http://evil.test"})
        status, headers, body, ended = self.response(connection)
        self.assertNotIn("access-control-allow-origin", headers)

    def test_preflight(self) -> None:
        """
        A preflight is answered before the plans with the API's methods.
        """
        connection = WireConnection(self.gateway)
        connection.send(b"OPTIONS /demo HTTP/1.1\r\nHost: gateway.test\r\nOrigin: http://app.test\r\n"
                        b"Access-Control-Request-Method: POST\r\n"
                        b"Access-Control-Request-Headers: content-type, last-event-id\r\n\r\n")
        status, headers, rest = splitHead(connection.received())
        self.assertEqual(status, 204)
        self.assertEqual(headers["access-control-allow-origin"], "http://app.test")
        self.assertEqual(headers["access-control-allow-methods"], "GET, POST")
        self.assertEqual(headers["access-control-allow-headers"], "content-type, last-event-id")

    def test_badOrigin(self) -> None:
        """
        A cors-origins entry that is not an origin is a configuration
        error naming the key.
        """
        from evgate.config import ConfigError

        with self.assertRaises(ConfigError) as caught:
            streamingGateway(Clock(), extra="cors-origins = app.test/path")
        self.assertIn("[api:demo] cors-origins", str(caught.exception))


class StreamingConfigTests(SynchronousTestCase):
    """
    The streaming keys are refused where they mean nothing.
    """

    def test_keyWithoutEntrypoint(self) -> None:
        """
        sse.* keys on an API without the sse entrypoint are an error that
        says so, rather than being ignored.
        """
        from evgate.config import ConfigError

        with self.assertRaises(ConfigError) as caught:
            streamingGateway(Clock(), heartbeat=None, entrypoints="http-post", extra="sse.retry = 100")
        self.assertIn("sse.retry: is only used by the sse entrypoint", str(caught.exception))
