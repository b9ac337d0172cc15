"""
Transforms end to end: a real C{twistd -n evgate} gateway, driven over
sockets, on the memory endpoint (POST -> publish steps -> broker -> delivery
steps -> SSE) and on real Kafka, with kcat as the independent client that
proves the CloudEvents Kafka binding (C{ce_*} headers) on the record.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from typing import Any, Dict, List

from cloudevents.v1.conversion import to_structured
from cloudevents.v1.http import CloudEvent, from_http
from twisted.trial.unittest import TestCase

from .helpers import GatewayProcess, httpRequest, jsonOf
from .test_kafka_integration import KAFKA, kcatRead, requireKafka
from .wire import dechunk, splitHead, sseEvents

MEMORY_INI = """
[gateway]
listen = tcp:0

[endpoint:local]
type = memory

[api:orders]
path = /orders
endpoint = local
topic = orders
entrypoints = http-post sse
heartbeat = 0
publish-steps =
    key from content.orderId
    header copy content.customer.id x-customer
    header set x-source orders-api

[api:orders-public]
path = /orders-public
endpoint = local
topic = orders
entrypoints = sse
heartbeat = 0
deliver-steps =
    content jmespath {id: orderId, total: total}
    header remove x-customer
"""

KAFKA_INI = """
[gateway]
listen = tcp:0

[endpoint:kafka]
type = kafka
bootstrap.servers = {kafka}
linger.ms = 1

[api:events]
path = /events
endpoint = kafka
topic = {topic}
entrypoints = http-post http-get
start = earliest
publish-steps =
    cloudevents to-binary

[api:events-structured]
path = /events-structured
endpoint = kafka
topic = {topic}
entrypoints = http-get
start = earliest
deliver-steps =
    cloudevents to-structured
"""


def openSse(port: int, path: str) -> socket.socket:
    """
    An SSE request on a fresh connection.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n".encode())
    return sock


def readEvents(sock: socket.socket, count: int, timeout: float = 20) -> List[Dict[str, Any]]:
    """
    The first C{count} SSE events with data on C{sock}.
    """
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        if not chunk:
            break
        data += chunk
        if b"\r\n\r\n" not in data:
            continue
        _, _, rest = splitHead(data)
        body, _ = dechunk(rest)
        events = [e for e in sseEvents(body) if "data" in e]
        if len(events) >= count:
            return events
    raise AssertionError(f"fewer than {count} events came: {data[-500:]!r}")


class MemoryEndToEndTests(TestCase):
    """
    POST -> transforms -> SSE through a twistd gateway.
    """

    def test_postTransformSse(self) -> None:
        """
        The publish steps set the key and headers (and refuse what they
        cannot read); each API's SSE stream over the topic shows its own
        view.
        """
        gateway = GatewayProcess(MEMORY_INI, name="transforms").start()
        self.addCleanup(gateway.stop)
        full = openSse(gateway.port, "/orders?format=json")
        public = openSse(gateway.port, "/orders-public?format=json")
        self.addCleanup(full.close)
        self.addCleanup(public.close)
        time.sleep(0.5)
        order = {"orderId": "o-1", "total": 12, "customer": {"id": "c-9", "email": "x@example.com"}}
        status, _, body = httpRequest("POST", gateway.url("/orders"), json.dumps(order).encode(),
                                      {"Content-Type": "application/json"})
        self.assertEqual(status, 202, body)
        # Not JSON: the publish steps cannot read it, so it is refused and
        # nothing is published.
        status, _, body = httpRequest("POST", gateway.url("/orders"), b"not json")
        self.assertEqual(status, 400, body)
        self.assertEqual(jsonOf(body)["type"], "https://evgate.dev/problems/transform-refused")
        [seen] = [json.loads(e["data"]) for e in readEvents(full, 1)]
        self.assertEqual(seen["key"], "o-1")
        self.assertEqual((seen["headers"]["x-customer"], seen["headers"]["x-source"]), ("c-9", "orders-api"))
        self.assertEqual(json.loads(seen["content"]), order)
        [shown] = [json.loads(e["data"]) for e in readEvents(public, 1)]
        self.assertEqual(json.loads(shown["content"]), {"id": "o-1", "total": 12})
        self.assertNotIn("x-customer", shown["headers"])
        self.assertNotIn("error", shown)


class KafkaEndToEndTests(TestCase):
    """
    CloudEvents through real Kafka: kcat sees the Kafka binding.
    """

    def setUp(self) -> None:
        requireKafka()

    def test_cloudEventsKafkaBinding(self) -> None:
        """
        A structured CloudEvent POSTed (made with the SDK) is stored in
        binary mode with ce_ headers, which kcat shows on the record; an
        API that delivers structured mode gives the SDK the same event
        back.
        """
        topic = f"evgate-transforms-{uuid.uuid4().hex[:10]}"
        gateway = GatewayProcess(KAFKA_INI.format(kafka=KAFKA, topic=topic), name="kafka-transforms").start()
        self.addCleanup(gateway.stop)
        event = CloudEvent({"type": "com.example.order.created", "source": "/orders", "id": "evt-1",
                            "datacontenttype": "application/json"}, {"orderId": "o-1", "total": 12})
        headers, body = to_structured(event)
        status, _, answer = httpRequest("POST", gateway.url("/events"), body, dict(headers), timeout=30)
        self.assertEqual(status, 202, answer)
        [record] = kcatRead(topic, 1)
        flat = record.get("headers") or []
        stored = dict(zip(flat[0::2], flat[1::2], strict=True))
        self.assertEqual((stored["ce_id"], stored["ce_type"], stored["ce_source"], stored["ce_specversion"]),
                         ("evt-1", "com.example.order.created", "/orders", "1.0"))
        self.assertEqual(stored["content-type"], "application/json")
        self.assertEqual(json.loads(record["payload"]), {"orderId": "o-1", "total": 12})
        status, _, page = httpRequest("GET", gateway.url("/events-structured?timeout=10000"), timeout=30)
        self.assertEqual(status, 200, page)
        [item] = jsonOf(page)["items"]
        back = from_http(item["headers"], item["content"])
        self.assertEqual((back["id"], back["type"], back.data), ("evt-1", "com.example.order.created",
                                                                 {"orderId": "o-1", "total": 12}))
