"""
Integration tests of repeated message headers, end to end: Kafka record
headers and MQTT 5 user properties are ordered lists in which names repeat,
and evgate must carry every value, in order, both ways.

A C{twistd -n evgate} subprocess sits in front of the shared Kafka and
Mosquitto (scripts/dev-services); the other side is an independent client:
kcat (C{-H} to produce, C{-f '%h'} to read) and the Mosquitto clients
(C{-D PUBLISH user-property}, C{mosquitto_sub -F %P}); the WebSocket side is
the C{websockets} package.  These tests fail, never skip, when a broker is
not there.
"""

from __future__ import annotations

import http.client
import json
from typing import Any, Dict, List, Tuple

from twisted.trial.unittest import SynchronousTestCase

from .helpers import GatewayProcess, httpRequest, jsonOf, waitFor
from .test_kafka_integration import KafkaGatewayTestCase, freshTopic, kcat, kcatProduce
from .test_mqtt_integration import GatewayMixin, MosquittoSub, SseReader, mosquittoPub


def postWithRepeatedHeaders(gateway: GatewayProcess, path: str, body: bytes,
                            headers: List[Tuple[str, str]]) -> Tuple[int, Any]:
    """
    POST C{body} with C{headers} sent as they are, repeated names included
    (a dict of headers cannot say that).
    """
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    try:
        connection.putrequest("POST", path)
        for name, value in headers:
            connection.putheader(name, value)
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, jsonOf(response.read())
    finally:
        connection.close()


def sseJsonMessages(reader: SseReader, count: int) -> List[Dict[str, Any]]:
    """
    The envelopes of the first C{count} messages of a C{?format=json} stream.
    """
    def envelopes(lines: List[str]) -> List[Dict[str, Any]]:
        return [json.loads(line[len("data: "):]) for index, line in enumerate(lines)
                if line.startswith("data: ") and index > 0 and lines[index - 1] == "event: message"]

    return envelopes(reader.readUntil(lambda lines: len(envelopes(lines)) >= count))


def kcatHeaders(topic: str, count: int) -> List[Tuple[str, str, str, str]]:
    """
    (key, payload, headers as kcat's C{%h} prints them, offset) of every
    record of C{topic}, once there are C{count}.
    """
    def read() -> Any:
        out = kcat("-C", "-t", topic, "-o", "beginning", "-e", "-q", "-f", "%k\t%s\t%h\t%o\n")
        records = [tuple(line.split("\t")) for line in out.decode("utf-8").splitlines() if line]
        return records if len(records) >= count else None

    return waitFor(read, 30, 0.2, f"{count} records in {topic}")


class KafkaRepeatedHeaderTests(KafkaGatewayTestCase):
    """
    Repeated record headers through evgate, with kcat on the other side.
    """

    def gateway(self, topic: str, **kwargs: Any) -> GatewayProcess:
        """
        A gateway on C{topic} whose API also streams (SSE, WebSocket).
        """
        return super().gateway(topic, entrypoints="http-post http-get sse websocket", **kwargs)

    def test_kcatHeadersReadThroughEvgate(self) -> None:
        """
        A record kcat produced with C{-H dup=1 -H dup=2} (and a third name
        in between) reaches a GET page, an SSE C{?format=json} stream and a
        WebSocket C{evgate.json} stream with both values of C{dup}, in
        order; C{text/plain} lists every header line in the record's order.
        """
        topic = freshTopic()
        kcatProduce(topic, ["k:v"], headers=("dup=1", "one=x", "dup=2"))
        gateway = self.gateway(topic)
        expected = {"dup": ["1", "2"], "one": "x"}
        status, _, page = self.get(gateway, "timeout=0")
        self.assertEqual(status, 200, page)
        [item] = page["items"]
        self.assertEqual((item["key"], item["content"], item["headers"]), ("k", "v", expected))
        status, _, body = httpRequest("GET", gateway.url("/orders?timeout=0"), headers={"Accept": "text/plain"})
        self.assertEqual(status, 200, body)
        lines = [line for line in body.decode("utf-8").splitlines() if line.startswith("header: ")]
        self.assertEqual(lines, ["header: dup: 1", "header: one: x", "header: dup: 2"])

        sse = SseReader(gateway.port, "/orders?format=json")
        self.addCleanup(sse.close)
        [envelope] = sseJsonMessages(sse, 1)
        self.assertEqual(envelope["headers"], expected)

        from websockets.sync.client import connect

        ws = connect(f"ws://127.0.0.1:{gateway.port}/orders", subprotocols=["evgate.json"], open_timeout=10)
        self.addCleanup(ws.close)
        documents = [json.loads(ws.recv(timeout=15)) for _ in range(2)]
        self.assertIn("subscribed", documents[0])
        self.assertEqual(documents[1]["headers"], expected)

    def test_publishedRepeatedHeadersReadWithKcat(self) -> None:
        """
        Repeated C{X-Message-Header-Dup} request headers, and a batch
        document's array value, become repeated record headers in order,
        as C{kcat -f '%h'} prints them.
        """
        topic = freshTopic()
        gateway = self.gateway(topic)
        status, ack = postWithRepeatedHeaders(gateway, "/orders?key=a", b"one", [
            ("X-Message-Header-Dup", "1"), ("X-Message-Header-Dup", "2"), ("Content-Type", "text/plain")])
        self.assertEqual(status, 202, ack)
        document = {"records": [{"value": "two", "key": "b", "headers": {"dup": ["1", "2", "1"]}}]}
        status, _, body = httpRequest("POST", gateway.url("/orders"), json.dumps(document).encode(),
                                      {"Content-Type": "application/vnd.evgate.batch+json"})
        self.assertEqual(status, 202, body)
        first, second = kcatHeaders(topic, 2)
        self.assertEqual(first[:3], ("a", "one", "dup=1,dup=2,content-type=text/plain"))
        self.assertEqual(second[:3], ("b", '"two"', "dup=1,dup=2,dup=1,content-type=application/json"))

    def test_roundTripExact(self) -> None:
        """
        What a reader got from evgate, published back through evgate as it
        is (the page item's headers in a batch document), is the record
        kcat produced: same values of every name, in order.
        """
        source, target = freshTopic(), freshTopic()
        kcatProduce(source, ["k:v"], headers=("dup=1", "dup=2", "dup=1"))
        reader = self.gateway(source)
        status, _, page = self.get(reader, "timeout=0")
        self.assertEqual(status, 200, page)
        [item] = page["items"]
        writer = self.gateway(target)
        document = {"records": [{"value": item["content"], "key": item["key"], "headers": item["headers"]}]}
        status, _, body = httpRequest("POST", writer.url("/orders"), json.dumps(document).encode(),
                                      {"Content-Type": "application/vnd.evgate.batch+json"})
        self.assertEqual(status, 202, body)
        [(key, _, headers, _)] = kcatHeaders(target, 1)
        self.assertEqual((key, headers), ("k", "dup=1,dup=2,dup=1,content-type=application/json"))

    def test_webSocketPublishWithAcks(self) -> None:
        """
        A C{websockets} client publishes C{evgate.json} frames with refs to
        Kafka: the acks come in frame order with the positions kcat sees,
        and kcat finds each record's content, key and repeated headers.
        """
        topic = freshTopic(partitions=3)
        gateway = self.gateway(topic)
        from websockets.sync.client import connect

        ws = connect(f"ws://127.0.0.1:{gateway.port}/orders", subprotocols=["evgate.json"], open_timeout=10)
        self.addCleanup(ws.close)
        self.assertIn("subscribed", json.loads(ws.recv(timeout=15)))
        frames = [{"content": f"m{i}", "key": f"k{i}", "headers": {"dup": ["1", str(i)], "n": str(i)}, "ref": i}
                  for i in range(6)]
        for frame in frames:
            ws.send(json.dumps(frame))
        acks: List[Dict[str, Any]] = []
        while len(acks) < len(frames):
            document = json.loads(ws.recv(timeout=15))
            self.assertNotIn("error", document)
            if "ack" in document:
                acks.append(document)
        self.assertEqual([a["ref"] for a in acks], list(range(6)))
        records = {(int(partition), int(offset)): (key, payload, headers)
                   for key, payload, headers, offset, partition in (
                       r + (p,) for p in range(3) for r in self.partitionRecords(topic, p))}
        self.assertEqual(len(records), 6)
        for i, ack in enumerate(acks):
            where = (ack["ack"]["partition"], ack["ack"]["offset"])
            self.assertEqual(ack["ack"]["topic"], topic)
            self.assertEqual(records[where], (f"k{i}", f"m{i}", f"dup=1,dup={i},n={i}"))

    def partitionRecords(self, topic: str, partition: int) -> List[Tuple[str, ...]]:
        """
        (key, payload, headers, offset) of every record of one partition.
        """
        out = kcat("-C", "-t", topic, "-p", str(partition), "-o", "beginning", "-e", "-q",
                   "-f", "%k\t%s\t%h\t%o\n")
        return [tuple(line.split("\t")) for line in out.decode("utf-8").splitlines() if line]


class MqttRepeatedHeaderTests(GatewayMixin, SynchronousTestCase):
    """
    Repeated MQTT 5 user properties through evgate, with the Mosquitto
    clients on the other side.
    """

    def test_mosquittoPubReadThroughEvgate(self) -> None:
        """
        A message mosquitto_pub sent with two C{dup} user properties
        reaches a long poll, an SSE C{?format=json} stream and a WebSocket
        C{evgate.json} stream with both values, in order.
        """
        gateway = self.startGateway(streaming="sse websocket")
        cursor = self.liveCursor(gateway)
        sse = SseReader(gateway.port, f"/sensors?cursor={cursor}&format=json")
        self.addCleanup(sse.close)
        sse.readUntil(lambda lines: any(line.startswith("id:") for line in lines))
        from websockets.sync.client import connect

        ws = connect(f"ws://127.0.0.1:{gateway.port}/sensors?cursor={cursor}", subprotocols=["evgate.json"],
                     open_timeout=10)
        self.addCleanup(ws.close)
        self.assertIn("subscribed", json.loads(ws.recv(timeout=10)))
        mosquittoPub(f"{self.prefix}/kitchen/temperature", "21.5",
                     properties=(("user-property", "dup", "1"), ("user-property", "one", "x"),
                                 ("user-property", "dup", "2")))
        expected = {"dup": ["1", "2"], "one": "x"}
        [item] = self.poll(gateway, cursor)["items"]
        self.assertEqual((item["content"], item["headers"]), ("21.5", expected))
        [envelope] = sseJsonMessages(sse, 1)
        self.assertEqual(envelope["headers"], expected)
        self.assertEqual(json.loads(ws.recv(timeout=10))["headers"], expected)

    def test_publishedRepeatedHeadersReadWithMosquittoSub(self) -> None:
        """
        Repeated C{X-Message-Header-Dup} request headers become repeated
        user properties, in order, as C{mosquitto_sub -F %P} prints them.
        """
        gateway = self.startGateway()
        sub = MosquittoSub(f"{self.prefix}/+/temperature", 1)
        self.addCleanup(sub.stop)
        sub.waitSubscribed()
        status, ack = postWithRepeatedHeaders(gateway, "/sensors?key=kitchen", b"21.5", [
            ("X-Message-Header-Dup", "1"), ("X-Message-Header-One", "x"), ("X-Message-Header-Dup", "2")])
        self.assertEqual(status, 202, ack)
        waitFor(sub.messages, 10, what=f"mosquitto_sub to print the message: {sub.lines}")
        [[topic, _, _, _, userProperties, payload]] = sub.messages()
        self.assertEqual((topic, payload), (f"{self.prefix}/kitchen/temperature", "21.5"))
        # Twisted groups a request's headers by name: dup's values keep
        # their order, the names do not interleave.
        self.assertEqual(userProperties.split(" "), ["dup:1", "dup:2", "one:x"])

    def test_webSocketPublishWithAcks(self) -> None:
        """
        A C{websockets} client publishes C{evgate.json} frames with refs to
        Mosquitto: the acks come in frame order, each naming the topic its
        key picked, and mosquitto_sub receives each payload with its
        repeated user properties in order.
        """
        gateway = self.startGateway(streaming="websocket")
        sub = MosquittoSub(f"{self.prefix}/+/temperature", 4)
        self.addCleanup(sub.stop)
        sub.waitSubscribed()
        from websockets.sync.client import connect

        ws = connect(f"ws://127.0.0.1:{gateway.port}/sensors", subprotocols=["evgate.json"], open_timeout=10)
        self.addCleanup(ws.close)
        self.assertIn("subscribed", json.loads(ws.recv(timeout=10)))
        rooms = ["kitchen", "hall", "attic", "cellar"]
        for i, room in enumerate(rooms):
            ws.send(json.dumps({"content": f"{i}.5", "key": room, "headers": {"dup": [str(i), "z"]}, "ref": room}))
        acks: List[Dict[str, Any]] = []
        while len(acks) < len(rooms):
            document = json.loads(ws.recv(timeout=15))
            self.assertNotIn("error", document)
            if "ack" in document:
                acks.append(document)
        self.assertEqual([(a["ref"], a["ack"]["topic"]) for a in acks],
                         [(room, f"{self.prefix}/{room}/temperature") for room in rooms])
        waitFor(lambda: len(sub.messages()) >= 4, 10, what=f"mosquitto_sub to print 4 messages: {sub.lines}")
        self.assertEqual([(m[0], m[4], m[5]) for m in sub.messages()],
                         [(f"{self.prefix}/{room}/temperature", f"dup:{i} dup:z", f"{i}.5")
                          for i, room in enumerate(rooms)])
