"""
Tests for the WebSocket entrypoint, in memory: the HTTP channel hands its
StringTransport over to autobahn as on a socket; the memory endpoint and
every timer (autobahn's included) run on a Clock.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from evgate.entrypoints.streaming import StreamSubscriber
from evgate.entrypoints.websocket import MAX_IN_FLIGHT, WebSocketEntrypoint
from evgate.errors import EndpointUnavailable
from evgate.interfaces import IEntrypoint, ISubscriber
from evgate.message import Cursor, Draft, Position, cursorTag

from .test_sse import ClaimsPlan, StreamTestCase
from .wire import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_TEXT,
    UPGRADE_HEADERS,
    WireConnection,
    clientFrame,
    closeCode,
    serverFrames,
    splitHead,
)

TAG = cursorTag("demo", "demo")


class WebSocketTestCase(StreamTestCase):
    """
    A gateway with the websocket entrypoint, and ways to speak to it.
    """

    entrypoints = "http-post websocket"

    def openSocket(self, target: str = "/demo", json: bool = False,
                   headers: Optional[Dict[str, str]] = None) -> WireConnection:
        """
        Upgrade a connection to a WebSocket on C{target}, with the
        evgate.json subprotocol if C{json}.
        """
        connection = WireConnection(self.gateway)
        allHeaders = dict(UPGRADE_HEADERS)
        if json:
            allHeaders["Sec-WebSocket-Protocol"] = "evgate.json"
        allHeaders.update(headers or {})
        connection.get(target, allHeaders)
        self.turn()
        return connection

    def frames(self, connection: WireConnection) -> List[Tuple[int, bytes]]:
        """
        The frames the gateway sent after the handshake.
        """
        status, headers, rest = splitHead(connection.received())
        self.assertEqual(status, 101, rest[:300])
        return serverFrames(rest)

    def documents(self, connection: WireConnection) -> List[Dict[str, Any]]:
        """
        The JSON documents of the text frames sent so far.
        """
        return [json.loads(payload) for opcode, payload in self.frames(connection) if opcode == OP_TEXT]

    def closed(self, connection: WireConnection) -> Tuple[int, str]:
        """
        The code and reason of the close frame the gateway sent.
        """
        closes = [payload for opcode, payload in self.frames(connection) if opcode == OP_CLOSE]
        self.assertEqual(len(closes), 1, "exactly one close frame")
        return closeCode(closes[0])

    def sendText(self, connection: WireConnection, text: str) -> None:
        """
        A text frame from the client.
        """
        connection.send(clientFrame(OP_TEXT, text.encode("utf-8")))
        self.turn()

    def sendJson(self, connection: WireConnection, document: Dict[str, Any]) -> None:
        """
        An evgate.json frame from the client.
        """
        self.sendText(connection, json.dumps(document))

    def stored(self) -> List[Any]:
        """
        The messages the memory broker holds.
        """
        return list(self.connector.topicLog("demo").messages)

    def entrypoint(self) -> WebSocketEntrypoint:  # type: ignore[override]
        """
        The API's WebSocket entrypoint.
        """
        for candidate in self.api.entrypoints:
            if isinstance(candidate, WebSocketEntrypoint):
                return candidate
        raise AssertionError("no websocket entrypoint")


class HandshakeTests(WebSocketTestCase):
    """
    Choosing the entrypoint and upgrading.
    """

    extra = ""

    def test_interfaces(self) -> None:
        """
        The entrypoint is an IEntrypoint; its subscribers are ISubscribers
        and IPushProducers.
        """
        verifyObject(IEntrypoint, self.entrypoint())
        self.openSocket()
        (subscriber,) = self.entrypoint().live
        verifyObject(ISubscriber, subscriber)
        verifyObject(IPushProducer, subscriber)

    def test_upgrade(self) -> None:
        """
        An upgrade request is answered 101 on the API's own path; a plain
        GET to an API without http-get is not.
        """
        connection = self.openSocket()
        status, headers, rest = splitHead(connection.received())
        self.assertEqual(status, 101)
        self.assertEqual(headers["sec-websocket-accept"], "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        self.assertNotIn("sec-websocket-protocol", headers)
        plain = WireConnection(self.gateway)
        plain.get("/demo")
        self.assertEqual(splitHead(plain.received())[0], 405)

    def test_subprotocol(self) -> None:
        """
        A client offering evgate.json gets it, and first a frame saying
        where its stream starts.
        """
        connection = self.openSocket(json=True)
        status, headers, rest = splitHead(connection.received())
        self.assertEqual(headers["sec-websocket-protocol"], "evgate.json")
        (first,) = self.documents(connection)
        self.assertEqual(Cursor.decode(first["subscribed"]["cursor"], TAG).asDict(), {0: 0})

    def test_badCursor(self) -> None:
        """
        A bad cursor is refused with a 400 problem before the upgrade.
        """
        connection = self.openSocket("/demo?cursor=nope")
        status, headers, rest = splitHead(connection.received())
        self.assertEqual(status, 400)
        self.assertEqual(headers["content-type"], "application/problem+json")

    def test_badFilter(self) -> None:
        """
        A bad filter is refused with a 400 problem before the upgrade.
        """
        connection = self.openSocket("/demo?filter=key%20%3D%3D")
        status, headers, rest = splitHead(connection.received())
        self.assertEqual(status, 400)
        self.assertEqual(json.loads(rest)["type"], "https://evgate.dev/problems/bad-filter")


class SubscribeTests(WebSocketTestCase):
    """
    Messages from the topic to the client.
    """

    extra = ""

    def test_rawFrames(self) -> None:
        """
        Without evgate.json a message is its content: a text frame when it
        is UTF-8, a binary frame otherwise.
        """
        connection = self.openSocket()
        self.publish(b"hello", b"\xff\x00")
        self.assertEqual(self.frames(connection), [(OP_TEXT, b"hello"), (OP_BINARY, b"\xff\x00")])

    def test_jsonEnvelopes(self) -> None:
        """
        Under evgate.json a message is its envelope, with the id that
        resumes after it.
        """
        connection = self.openSocket(json=True)
        self.publish(b"one", key="k", headers=[("h", "v")])
        self.publish(b"\xff")
        subscribed, first, second = self.documents(connection)
        self.assertEqual((first["key"], first["headers"], first["content"]), ("k", {"h": "v"}, "one"))
        self.assertEqual(Cursor.decode(first["id"], TAG).asDict(), {0: 1})
        self.assertEqual((second["content"], second["encoding"]), ("/w==", "base64"))

    def test_resume(self) -> None:
        """
        The cursor parameter resumes after the message whose id it is.
        """
        first = self.openSocket(json=True)
        self.publish(b"1", b"2", b"3")
        ids = [d["id"] for d in self.documents(first)[1:]]
        second = self.openSocket(f"/demo?cursor={ids[0]}", json=True)
        self.assertEqual([d["content"] for d in self.documents(second)[1:]], ["2", "3"])

    def test_filter(self) -> None:
        """
        The filter parameter applies to WebSocket subscribers too.
        """
        connection = self.openSocket("/demo?filter=key%20%3D%3D%20%22eu%22")
        self.publish(b"us", key="us")
        self.publish(b"eu", key="eu")
        self.assertEqual(self.frames(connection), [(OP_TEXT, b"eu")])

    def test_encodedOncePerMessage(self) -> None:
        """
        A message's frame is prepared once for all subscribers of the same
        kind.
        """
        connections = [self.openSocket() for _ in range(3)]
        self.publish(b"shared")
        stream = self.gateway.hub.streams[("local", "demo")]
        (event,) = stream.window.events
        self.assertEqual([k for k in event.frames if k[0] == "ws"], [("ws", "raw")])
        for connection in connections:
            self.assertEqual(self.frames(connection), [(OP_TEXT, b"shared")])

    def test_oneWritePerBatch(self) -> None:
        """
        A batch of messages is written with one write.
        """
        connection = self.openSocket()
        writes = []
        original = connection.transport.write
        self.patch(connection.transport, "write", lambda data: (writes.append(data), original(data)))
        self.publish(b"a", b"b", b"c")
        self.assertEqual(len(writes), 1)
        self.assertEqual(serverFrames(writes[0]), [(OP_TEXT, b"a"), (OP_TEXT, b"b"), (OP_TEXT, b"c")])


class PublishTests(WebSocketTestCase):
    """
    Frames from the client to the topic.
    """

    extra = ""

    def test_raw(self) -> None:
        """
        Without evgate.json each frame is published as it is, text or
        binary, and (being subscribed) the client receives it back.
        """
        connection = self.openSocket()
        self.sendText(connection, "héllo")
        connection.send(clientFrame(OP_BINARY, b"\x00\xff"))
        self.turn()
        self.assertEqual([m.content for m in self.stored()], ["héllo".encode(), b"\x00\xff"])
        self.assertEqual(self.frames(connection), [(OP_TEXT, "héllo".encode()), (OP_BINARY, b"\x00\xff")])

    def test_jsonAck(self) -> None:
        """
        Under evgate.json a frame's key, headers and content are published,
        and the broker's acknowledgement is answered with the ref.
        """
        connection = self.openSocket(json=True)
        self.sendJson(connection, {"key": "k", "headers": {"a": "b"}, "content": "hi", "ref": 7})
        self.sendJson(connection, {"content": base64.b64encode(b"\xff").decode(), "encoding": "base64"})
        first, second = self.stored()
        self.assertEqual((first.key, first.headers, first.content), ("k", (("a", "b"),), b"hi"))
        self.assertEqual(second.content, b"\xff")
        acks = [d for d in self.documents(connection) if "ack" in d]
        self.assertEqual(acks, [{"ack": {"topic": "demo", "partition": 0, "offset": 0}, "ref": 7},
                                {"ack": {"topic": "demo", "partition": 0, "offset": 1}}])

    def test_jsonRepeatedHeaders(self) -> None:
        """
        Under evgate.json a header whose value is an array of strings is
        that name repeated, in order: what a reader's envelope shows can be
        published back as it is.
        """
        connection = self.openSocket(json=True)
        self.sendJson(connection, {"headers": {"dup": ["1", "2"], "one": "x"}, "content": "hi", "ref": 1})
        (stored,) = self.stored()
        self.assertEqual(stored.headers, (("dup", "1"), ("dup", "2"), ("one", "x")))
        acks = [d for d in self.documents(connection) if "ack" in d]
        self.assertEqual(acks, [{"ack": {"topic": "demo", "partition": 0, "offset": 0}, "ref": 1}])

    def test_jsonErrors(self) -> None:
        """
        A frame that is not a valid evgate.json document is answered with
        an error frame (with its ref when readable) and nothing is
        published; the connection stays open.
        """
        connection = self.openSocket(json=True)
        bad = ["not json", json.dumps([1]), json.dumps({"content": 5, "ref": "r1"}),
               json.dumps({"content": "x", "extra": 1}), json.dumps({"content": "!", "encoding": "base64"}),
               json.dumps({"content": "x", "headers": {"a": 1}}),
               json.dumps({"content": "x", "headers": {"a": ["1", 2]}})]
        for text in bad:
            self.sendText(connection, text)
        connection.send(clientFrame(OP_BINARY, b"{}"))
        self.turn()
        errors = [d for d in self.documents(connection) if "error" in d]
        self.assertEqual(len(errors), len(bad) + 1)
        self.assertEqual({e["error"]["type"] for e in errors}, {"https://evgate.dev/problems/bad-request"})
        self.assertEqual(errors[2]["ref"], "r1")
        self.assertEqual(self.stored(), [])
        self.sendJson(connection, {"content": "fine"})
        self.assertEqual(len(self.stored()), 1)

    def test_acksInOrder(self) -> None:
        """
        Answers come in the order of the frames even when the broker
        acknowledges out of order.
        """
        pending: List[Deferred] = []
        self.patch(self.connector, "publish", lambda topic, draft, timeout: pending.append(Deferred())
                   or pending[-1])
        connection = self.openSocket(json=True)
        for ref in (1, 2, 3):
            self.sendJson(connection, {"content": "x", "ref": ref})
        pending[2].callback(Position("demo", 0, 12))
        pending[1].callback(Position("demo", 0, 11))
        self.assertEqual([d for d in self.documents(connection) if "ack" in d], [])
        pending[0].callback(Position("demo", 0, 10))
        self.assertEqual([d["ref"] for d in self.documents(connection) if "ack" in d], [1, 2, 3])

    def test_errorsWaitTheirTurn(self) -> None:
        """
        The error answering a bad frame waits behind the acknowledgements
        of the frames sent before it: answers go out in frame order,
        refusals included ([1, "two", 3], never ["two", 1, 3]).
        """
        pending: List[Deferred] = []
        self.patch(self.connector, "publish", lambda topic, draft, timeout: pending.append(Deferred())
                   or pending[-1])
        connection = self.openSocket(json=True)
        self.sendJson(connection, {"content": "x", "ref": 1})
        self.sendJson(connection, {"content": 5, "ref": "two"})
        self.sendJson(connection, {"content": "x", "ref": 3})
        self.assertEqual([d for d in self.documents(connection) if "ack" in d or "error" in d], [])
        pending[1].callback(Position("demo", 0, 11))
        pending[0].callback(Position("demo", 0, 10))
        answers = [d for d in self.documents(connection) if "ack" in d or "error" in d]
        self.assertEqual([d["ref"] for d in answers], [1, "two", 3])
        self.assertIn("error", answers[1])

    def test_inFlightBound(self) -> None:
        """
        With MAX_IN_FLIGHT publishes unanswered the gateway stops reading
        the client's frames, and reads again once half are answered.
        """
        pending: List[Deferred] = []
        self.patch(self.connector, "publish", lambda topic, draft, timeout: pending.append(Deferred())
                   or pending[-1])
        connection = self.openSocket(json=True)
        for i in range(MAX_IN_FLIGHT):
            self.sendJson(connection, {"content": str(i)})
        self.assertEqual(connection.transport.producerState, "paused")
        for d in pending[:MAX_IN_FLIGHT // 2 - 1]:
            d.callback(Position("demo", 0, 0))
        self.assertEqual(connection.transport.producerState, "paused")
        pending[MAX_IN_FLIGHT // 2 - 1].callback(Position("demo", 0, 0))
        self.assertEqual(connection.transport.producerState, "producing")

    def test_publishFailedJson(self) -> None:
        """
        Under evgate.json a publish the broker refuses is answered with an
        error frame.
        """
        self.patch(self.connector, "publish",
                   lambda topic, draft, timeout: fail(EndpointUnavailable("broker down")))
        connection = self.openSocket(json=True)
        self.sendJson(connection, {"content": "x", "ref": "a"})
        (error,) = [d for d in self.documents(connection) if "error" in d]
        self.assertEqual(error, {"error": {"type": "https://evgate.dev/problems/endpoint-unavailable",
                                           "title": "Endpoint unavailable", "detail": "broker down"},
                                 "ref": "a"})

    def test_publishFailedRaw(self) -> None:
        """
        Without evgate.json a refused publish closes the connection with
        1013 (try again later): there is no frame to say it with, and
        losing it silently is not an option.
        """
        self.patch(self.connector, "publish",
                   lambda topic, draft, timeout: fail(EndpointUnavailable("broker down")))
        connection = self.openSocket()
        self.sendText(connection, "x")
        code, reason = self.closed(connection)
        self.assertEqual(code, 1013)
        self.assertIn("broker down", reason)


class LimitTests(WebSocketTestCase):
    """
    Subscribe-only APIs and message size.
    """

    extra = "websocket.publish = false"

    def test_subscribeOnlyJson(self) -> None:
        """
        Under evgate.json a frame to a subscribe-only API is answered with
        a forbidden error; nothing is published.
        """
        connection = self.openSocket(json=True)
        self.sendJson(connection, {"content": "x"})
        (error,) = [d for d in self.documents(connection) if "error" in d]
        self.assertEqual(error["error"]["type"], "https://evgate.dev/problems/forbidden")
        self.assertEqual(self.stored(), [])

    def test_subscribeOnlyRaw(self) -> None:
        """
        Without evgate.json a frame to a subscribe-only API closes the
        connection with 1008 (policy).
        """
        connection = self.openSocket()
        self.sendText(connection, "x")
        self.assertEqual(self.closed(connection)[0], 1008)
        self.assertEqual(self.stored(), [])


class SizeTests(WebSocketTestCase):
    """
    Frames larger than max-message-bytes.
    """

    def setUp(self) -> None:
        super().setUp()
        # A gateway whose max-message-bytes is small.
        from evgate.config import parseConfig
        from evgate.service import GatewayService

        text = ("[gateway]\nlisten = tcp:0\nmax-message-bytes = 100\n"
                "[endpoint:local]\ntype = memory\n"
                "[api:demo]\npath = /demo\nendpoint = local\ntopic = demo\nentrypoints = websocket\n"
                "heartbeat = 0\n")
        self.gateway = GatewayService(parseConfig(text, "test.ini"), self.clock)
        self.api = self.gateway.apis[0]
        self.connector = self.gateway.connectors["local"]

    def test_rawTooBig(self) -> None:
        """
        A raw frame over max-message-bytes closes the connection with 1009.
        """
        connection = self.openSocket()
        connection.send(clientFrame(OP_BINARY, b"x" * 101))
        self.turn()
        self.assertEqual(self.closed(connection)[0], 1009)
        self.assertEqual(self.stored(), [])

    def test_jsonTooBig(self) -> None:
        """
        An evgate.json frame whose content is over max-message-bytes closes
        the connection with 1009; the envelope's own bytes do not count.
        """
        connection = self.openSocket(json=True)
        self.sendJson(connection, {"content": "x" * 100, "key": "k" * 50})
        self.assertEqual(len(self.stored()), 1)
        self.sendJson(connection, {"content": "x" * 101})
        self.assertEqual(self.closed(connection)[0], 1009)


class StreamControlTests(WebSocketTestCase):
    """
    Backpressure, keepalive, gaps and how connections end.
    """

    queue = 3
    heartbeat = 20
    retention = 3
    extra = ""

    def subscriber(self, connection: WireConnection) -> StreamSubscriber:
        for subscriber in self.entrypoint().live:
            if subscriber.framer.protocol.transport is connection.transport:
                return subscriber
        raise AssertionError("no live subscriber on this connection")

    def test_producer(self) -> None:
        """
        The subscriber, not the HTTP channel, is the transport's producer
        after the upgrade: a full transport pauses its hub subscription.
        """
        connection = self.openSocket()
        subscriber = self.subscriber(connection)
        self.assertIs(connection.transport.producer, subscriber)
        self.openSocket()
        connection.fill()
        self.assertTrue(subscriber.subscription.paused)
        self.publish(b"1")
        self.assertEqual(self.frames(connection), [])
        connection.drain()
        self.assertEqual(self.frames(connection), [(OP_TEXT, b"1")])

    def test_tooSlow(self) -> None:
        """
        A subscriber that falls more than subscriber-queue messages behind
        is closed with 1013; the others receive everything.
        """
        slow = self.openSocket(json=True)
        fast = self.openSocket()
        slow.fill()
        for i in range(5):
            self.publish(str(i).encode())
        code, reason = self.closed(slow)
        self.assertEqual(code, 1013)
        self.assertIn("too slow", reason)
        self.assertEqual([p for op, p in self.frames(fast)], [b"0", b"1", b"2", b"3", b"4"])

    def test_ping(self) -> None:
        """
        autobahn pings every heartbeat seconds (on the gateway's reactor).
        """
        connection = self.openSocket()
        self.clock.advance(20)
        self.assertEqual([op for op, p in self.frames(connection)], [OP_PING])

    def test_gap(self) -> None:
        """
        Under evgate.json a gap is a frame saying why and where reading
        resumes.
        """
        for i in range(6):
            self.connector.publish("demo", Draft(content=str(i).encode()))
        stale = Cursor.fromMapping({0: 1}, self.connector.epoch()).encode(TAG)
        connection = self.openSocket(f"/demo?cursor={stale}", json=True)
        documents = self.documents(connection)
        gap = documents[1]["gap"]
        self.assertIn("retention", gap["detail"])
        self.assertEqual(Cursor.decode(gap["cursor"], TAG).asDict(), {0: 3})
        self.assertEqual([d["content"] for d in documents[2:]], ["3", "4", "5"])

    def test_stop(self) -> None:
        """
        At shutdown every WebSocket is closed with 1013 (try again later).
        """
        connections = [self.openSocket(), self.openSocket(json=True)]
        self.entrypoint().stop()
        for connection in connections:
            self.assertEqual(self.closed(connection)[0], 1013)
        self.assertEqual(self.entrypoint().live, set())

    def test_upstreamFailed(self) -> None:
        """
        An upstream that fails closes with 1013 when the broker is
        unavailable.
        """
        connection = self.openSocket()
        self.subscriber(connection).failed(Failure(EndpointUnavailable("gone")))
        self.assertEqual(self.closed(connection)[0], 1013)

    def test_clientGone(self) -> None:
        """
        A client that disconnects leaves no live subscriber and no hub
        subscription behind.
        """
        connection = self.openSocket()
        connection.disconnect()
        self.assertEqual(self.entrypoint().live, set())
        self.assertEqual(self.gateway.hub.streams[("local", "demo")].subscriptions, [])

    def test_expiry(self) -> None:
        """
        A connection whose credentials expire is closed with 1008.
        """
        self.api.plans = [ClaimsPlan({}, expiresAt=30.0)]
        connection = self.openSocket()
        self.clock.advance(30)
        self.assertEqual(self.closed(connection)[0], 1008)
