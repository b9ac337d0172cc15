"""
Integration tests of the Kafka endpoint against a real broker: a
C{twistd -n evgate} subprocess in front of Kafka on
127.0.0.1:${EVGATE_KAFKA_PORT:-9092}, with kcat as the independent client on
the other side.

The broker comes from C{scripts/dev-services up kafka}.  These tests fail
(they do not skip) when it is not there.  Every test works on fresh,
uniquely named topics.  The test methods are plain blocking methods: the
gateway runs in another process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

from twisted.trial.unittest import TestCase

from .helpers import KAFKA, ROOT, GatewayIni, GatewayProcess, freePort, httpRequest, jsonOf, waitFor

DEV_SERVICES = os.path.join(ROOT, "scripts", "dev-services")
UNREACHABLE = f"Kafka not reachable on {KAFKA}: run scripts/dev-services up"

class _QuietLog:
    """
    A librdkafka logger that keeps the test client's lines (connection
    failures while a test stops the broker) out of the test output.
    """

    def log(self, level: int, fmt: str, *args: Any) -> None:
        pass


_admin: Any = None


def admin() -> Any:
    """
    The AdminClient of the test broker (one per test run).
    """
    global _admin
    if _admin is None:
        from confluent_kafka.admin import AdminClient

        _admin = AdminClient({"bootstrap.servers": KAFKA, "socket.timeout.ms": 5000, "logger": _QuietLog()})
    return _admin


_unreachable: Optional[str] = None
_checked = False


def requireKafka() -> None:
    """
    Fail loudly, with what to do, when the broker is not there (asked once
    per run: the next tests fail at once with the same message).
    """
    global _checked, _unreachable
    if not _checked:
        from confluent_kafka import KafkaException

        _checked = True
        try:
            metadata = admin().list_topics(timeout=10)
            if not metadata.brokers:
                _unreachable = UNREACHABLE
        except KafkaException as e:
            _unreachable = f"{UNREACHABLE} ({e})"
    if _unreachable is not None:
        raise AssertionError(_unreachable)


def freshTopic(partitions: int = 1) -> str:
    """
    Create a topic with a unique name and wait until every partition has a
    leader.
    """
    from confluent_kafka.admin import NewTopic

    topic = f"evgate-it-{uuid.uuid4().hex[:10]}"
    client = admin()
    client.create_topics([NewTopic(topic, partitions, 1)])[topic].result(30)

    def ready() -> bool:
        meta = client.list_topics(topic, timeout=5).topics.get(topic)
        return (meta is not None and meta.error is None and len(meta.partitions) == partitions
                and all(p.leader >= 0 for p in meta.partitions.values()))

    waitFor(ready, 30, 0.1, f"topic {topic} to have leaders")
    return topic


def kcat(*args: str, stdin: Optional[bytes] = None, timeout: float = 30) -> bytes:
    """
    Run kcat against the test broker and return its output.
    """
    result = subprocess.run(["kcat", "-b", KAFKA, *args], input=stdin, capture_output=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"kcat {' '.join(args)} failed: {result.stderr.decode(errors='replace')}")
    return result.stdout


def kcatProduce(topic: str, lines: List[str], partition: Optional[int] = None,
                headers: Tuple[str, ...] = ()) -> None:
    """
    Produce C{key:value} lines with kcat.
    """
    args = ["-P", "-t", topic, "-K:"]
    if partition is not None:
        args += ["-p", str(partition)]
    for header in headers:
        args += ["-H", header]
    kcat(*args, stdin=("\n".join(lines) + "\n").encode("utf-8"))


def kcatRead(topic: str, count: int) -> List[Dict[str, Any]]:
    """
    Every record of C{topic} as kcat's JSON, once there are C{count}.
    """
    def read() -> Optional[List[Dict[str, Any]]]:
        out = kcat("-C", "-t", topic, "-o", "beginning", "-e", "-q", "-J")
        records = [json.loads(line) for line in out.decode("utf-8").splitlines() if line.strip()]
        return records if len(records) >= count else None

    return waitFor(read, 30, 0.2, f"{count} records in {topic}")


def devServices(*args: str) -> str:
    """
    Run scripts/dev-services and return what it printed.
    """
    result = subprocess.run([DEV_SERVICES, *args], capture_output=True, timeout=180)
    output = (result.stdout + result.stderr).decode(errors="replace")
    if result.returncode != 0:
        raise AssertionError(f"scripts/dev-services {' '.join(args)} failed:\n{output}")
    return output


class KafkaGatewayTestCase(TestCase):
    """
    A gateway subprocess with one Kafka API, C{/orders}, on a fresh topic.
    """

    start = "earliest"
    messageTimeout = 3000

    def setUp(self) -> None:
        requireKafka()

    def gateway(self, topic: str, **kwargs: Any) -> GatewayProcess:
        """
        Start a gateway on C{topic}; it is stopped when the test ends.
        """
        settings = {"linger.ms": 1, "message.timeout.ms": kwargs.get("messageTimeout", self.messageTimeout)}
        ini = (GatewayIni(publish_timeout=10)
               .kafka(settings=settings, bootstrap=kwargs.get("kafka", KAFKA), request_timeout=3, group_idle_timeout=30,
                      **kwargs.get("endpoint", {}))
               .api("orders", endpoint="kafka", topic=topic,
                    entrypoints=kwargs.get("entrypoints", "http-post http-get"),
                    start=kwargs.get("start", self.start)))
        process = GatewayProcess(ini, name="kafka")
        self.addCleanup(self.stopGateway, process)
        return process.start()

    def stopGateway(self, process: GatewayProcess, within: float = 15) -> None:
        """
        Stop C{process}, which must exit cleanly within C{within} seconds.
        """
        if process.process is None or process.process.poll() is not None:
            return
        began = time.monotonic()
        status = process.stop()
        self.assertIn(status, (0, -signal.SIGTERM), process.output())
        self.assertLess(time.monotonic() - began, within, "the gateway took too long to stop")

    def get(self, gateway: GatewayProcess, query: str = "", headers: Optional[dict] = None,
            timeout: float = 40) -> Tuple[int, dict, Any]:
        """
        GET /orders?query; the status, headers and JSON body.
        """
        status, responseHeaders, body = httpRequest("GET", gateway.url("/orders?" + query), headers=headers,
                                                    timeout=timeout)
        return status, responseHeaders, jsonOf(body)

    def readAll(self, gateway: GatewayProcess, count: int, cursor: Optional[str] = None,
                limit: int = 100) -> Tuple[List[Dict[str, Any]], str]:
        """
        Poll with C{nextCursor} until C{count} items came; the items and the
        last cursor.
        """
        items: List[Dict[str, Any]] = []
        deadline = time.monotonic() + 60
        while len(items) < count:
            self.assertLess(time.monotonic(), deadline, f"only {len(items)} of {count} items came")
            query = f"limit={limit}&timeout=5000" + (f"&cursor={cursor}" if cursor else "")
            status, _, doc = self.get(gateway, query)
            self.assertEqual(status, 200, doc)
            items.extend(doc["items"])
            cursor = doc["pagination"]["nextCursor"]
        assert cursor is not None
        return items, cursor

    def assertNothingAfter(self, gateway: GatewayProcess, cursor: str) -> None:
        """
        A short poll after C{cursor} returns no item and the same position.
        """
        status, _, doc = self.get(gateway, f"timeout=1000&cursor={cursor}")
        self.assertEqual((status, doc["items"]), (200, []))


class PublishAndReadTests(KafkaGatewayTestCase):
    """
    What reaches Kafka through the gateway, and what the gateway reads from
    Kafka, seen from kcat on the other side.
    """

    def test_postReachesKafka(self) -> None:
        """
        A POST's body, key (C{?key=}), headers (C{X-Message-Header-*} and
        the Content-Type) become the record's value, key and headers; the
        202 gives the partition and offset kcat sees.
        """
        topic = freshTopic()
        gateway = self.gateway(topic)
        status, _, body = httpRequest("POST", gateway.url("/orders?key=order-42"), b'{"total": 12.5}',
                                      {"X-Message-Header-Tenant": "acme", "Content-Type": "application/json"})
        self.assertEqual(status, 202, body)
        ack = jsonOf(body)
        status, _, body = httpRequest("POST", gateway.url("/orders"), b"second")
        self.assertEqual(status, 202, body)
        second = jsonOf(body)
        records = kcatRead(topic, 2)
        first = records[0]
        self.assertEqual(first["key"], "order-42")
        self.assertEqual(first["payload"], '{"total": 12.5}')
        headers = dict(zip(first["headers"][::2], first["headers"][1::2], strict=True))
        self.assertEqual(headers, {"tenant": "acme", "content-type": "application/json"})
        self.assertEqual((ack["topic"], ack["partition"], ack["offset"]),
                         (topic, first["partition"], first["offset"]))
        self.assertEqual((records[1]["key"], records[1]["payload"]), (None, "second"))
        self.assertEqual(second["offset"], records[1]["offset"])

    def test_batchReachesKafka(self) -> None:
        """
        An NDJSON batch and a batch document become records in request
        order, with the keys and headers they asked for; the 202 lists the
        partition and offset kcat sees for each.
        """
        topic = freshTopic()
        gateway = self.gateway(topic)
        lines = [json.dumps({"n": n}).encode() for n in range(500)]
        status, _, body = httpRequest("POST", gateway.url("/orders?key=bulk"), b"\n".join(lines) + b"\n",
                                      {"Content-Type": "application/x-ndjson"})
        self.assertEqual(status, 202, body)
        ndjson = jsonOf(body)
        document = {"records": [{"value": {"n": "a"}, "key": "one", "headers": {"tenant": "acme"}},
                                {"value": {"n": "b"}}]}
        status, _, body = httpRequest("POST", gateway.url("/orders"), json.dumps(document).encode(),
                                      {"Content-Type": "application/vnd.evgate.batch+json"})
        self.assertEqual(status, 202, body)
        envelope = jsonOf(body)
        self.assertEqual((ndjson["published"], envelope["published"]), (500, 2))
        records = kcatRead(topic, 502)
        self.assertEqual([r["payload"].encode() for r in records[:500]], lines)
        self.assertEqual({r["key"] for r in records[:500]}, {"bulk"})
        self.assertEqual([(p["partition"], p["offset"]) for p in ndjson["positions"] + envelope["positions"]],
                         [(r["partition"], r["offset"]) for r in records])
        self.assertEqual([(r["key"], r["payload"]) for r in records[500:]], [("one", '{"n":"a"}'),
                                                                             (None, '{"n":"b"}')])
        headers = dict(zip(records[500]["headers"][::2], records[500]["headers"][1::2], strict=True))
        self.assertEqual(headers, {"tenant": "acme", "content-type": "application/json"})

    def test_getReadsKafka(self) -> None:
        """
        Records produced by kcat come out of HTTP GET in order, with their
        key, headers, partition and offset.
        """
        topic = freshTopic()
        kcatProduce(topic, ["a:first", "b:second", "c:third"], headers=("src=kcat",))
        gateway = self.gateway(topic)
        items, cursor = self.readAll(gateway, 3)
        self.assertEqual([(i["key"], i["content"]) for i in items],
                         [("a", "first"), ("b", "second"), ("c", "third")])
        self.assertEqual([i["headers"] for i in items], [{"src": "kcat"}] * 3)
        self.assertEqual([(i["metadata"]["partition"], i["metadata"]["offset"]) for i in items],
                         [(0, 0), (0, 1), (0, 2)])
        self.assertEqual([i["metadata"]["topic"] for i in items], [topic] * 3)
        self.assertNothingAfter(gateway, cursor)

    def test_partitionsExactlyOnce(self) -> None:
        """
        On a topic of 3 partitions, polling with nextCursor reads every
        record exactly once, in order within each partition.
        """
        topic = freshTopic(3)
        for partition in range(3):
            kcatProduce(topic, [f"k{partition}:p{partition}-m{i}" for i in range(4)], partition=partition)
        gateway = self.gateway(topic)
        items, cursor = self.readAll(gateway, 12, limit=5)
        self.assertEqual(len(items), 12)
        seen = [(i["metadata"]["partition"], i["metadata"]["offset"]) for i in items]
        self.assertEqual(sorted(seen), [(p, o) for p in range(3) for o in range(4)])
        for partition in range(3):
            self.assertEqual([i["content"] for i in items if i["metadata"]["partition"] == partition],
                             [f"p{partition}-m{n}" for n in range(4)])
        self.assertNothingAfter(gateway, cursor)

    def test_resumeAfterRestart(self) -> None:
        """
        A cursor from one gateway process resumes on a new process exactly
        after what the client saw.
        """
        topic = freshTopic()
        kcatProduce(topic, ["k:one", "k:two", "k:three"])
        first = self.gateway(topic)
        items, cursor = self.readAll(first, 3)
        self.stopGateway(first)
        kcatProduce(topic, ["k:four", "k:five"])
        second = self.gateway(topic)
        later, cursor = self.readAll(second, 2, cursor=cursor)
        self.assertEqual([i["content"] for i in later], ["four", "five"])
        self.assertEqual([i["metadata"]["offset"] for i in later], [3, 4])
        self.assertNothingAfter(second, cursor)


class NonBlockingReadTests(KafkaGatewayTestCase):
    """
    C{timeout=0} on Kafka reads what the topic holds.
    """

    def test_earliestWithoutWaiting(self) -> None:
        """
        With start = earliest, no cursor and timeout=0, a GET returns every
        record already in the topic (480 here, under its limit of 1000), in
        order: not an empty page because the read had not fetched yet, nor
        only the first batch librdkafka fetched.  The connector knows the
        head from the watermarks its reader fetched to start.
        """
        topic = freshTopic()
        kcatProduce(topic, [f"k:{i}" for i in range(480)])
        # Batches of 50: the backlog crosses to the reactor in ten.
        gateway = self.gateway(topic, extra="batch-size = 50")
        status, _, page = self.get(gateway, "timeout=0&limit=1000")
        self.assertEqual(status, 200, page)
        self.assertEqual([item["content"] for item in page["items"]], [str(i) for i in range(480)])


class GroupModeTests(KafkaGatewayTestCase):
    """
    HTTP GET with a client id: a consumer group whose position the gateway
    commits.
    """

    def poll(self, gateway: GatewayProcess, client: str, limit: int = 2, timeout: int = 10000) -> List[str]:
        """
        One group-mode poll; the contents it returned.
        """
        status, _, doc = self.get(gateway, f"limit={limit}&timeout={timeout}", headers={"X-Client-Id": client})
        self.assertEqual(status, 200, doc)
        self.assertIn("nextCursor", doc["pagination"])
        return [item["content"] for item in doc["items"]]

    def pollUntil(self, gateway: GatewayProcess, client: str, count: int) -> List[List[str]]:
        """
        Poll as C{client} until C{count} messages came; the pages.
        """
        pages: List[List[str]] = []
        deadline = time.monotonic() + 60
        while sum(map(len, pages)) < count:
            self.assertLess(time.monotonic(), deadline, f"{client} got only {pages}")
            page = self.poll(gateway, client)
            if page:
                pages.append(page)
        return pages

    def committed(self, group: str, topic: str) -> int:
        """
        The committed offset of C{group} on partition 0 of C{topic}.
        """
        from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition

        request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, 0)])
        result = admin().list_consumer_group_offsets([request])[group].result(10)
        return result.topic_partitions[0].offset

    def test_clientIds(self) -> None:
        """
        Successive polls with one client id get successive messages without
        a cursor; another client id reads the same messages independently;
        the position is committed to Kafka after each response, so it
        survives a restart of the gateway.
        """
        topic = freshTopic()
        kcatProduce(topic, [f"k:m{i}" for i in range(5)])
        gateway = self.gateway(topic)
        alice = self.pollUntil(gateway, "alice", 5)
        self.assertTrue(all(1 <= len(page) <= 2 for page in alice), alice)
        self.assertGreater(len(alice), 1, "limit=2 must take more than one poll")
        self.assertEqual(sum(alice, []), [f"m{i}" for i in range(5)])
        self.assertEqual(sum(self.pollUntil(gateway, "bob", 5), []), [f"m{i}" for i in range(5)])
        self.assertEqual(self.poll(gateway, "alice", timeout=500), [])
        waitFor(lambda: self.committed("evgate.get.orders.alice", topic) == 5, 20, 0.2,
                "alice's position to be committed")
        self.stopGateway(gateway)
        kcatProduce(topic, ["k:m5"])
        gateway = self.gateway(topic)
        self.assertEqual(self.pollUntil(gateway, "alice", 1), [["m5"]])
        status, _, doc = self.get(gateway, "client-id=no%20spaces")
        self.assertEqual(status, 400, doc)


class BrokerOutageTests(KafkaGatewayTestCase):
    """
    The broker stopping and starting again under a running gateway.
    """

    messageTimeout = 3000

    def test_outage(self) -> None:
        """
        While the broker is down, a publisher gets a 503 with Retry-After
        within message.timeout.ms, and a long-polling reader stays
        connected; once the broker is back, a message produced then reaches
        the waiting reader (or its next poll with the same cursor), and
        publishing works again.
        """
        status = subprocess.run([DEV_SERVICES, "status", "kafka"], capture_output=True)
        self.assertEqual(status.returncode, 0, "this test stops and starts Kafka with scripts/dev-services, "
                                               "which must be the one running it: " + status.stdout.decode())
        topic = freshTopic()
        gateway = self.gateway(topic)
        status_, _, body = httpRequest("POST", gateway.url("/orders"), b"before")
        self.assertEqual(status_, 202, body)
        items, cursor = self.readAll(gateway, 1)
        self.assertEqual(items[0]["content"], "before")

        waiting: Dict[str, Any] = {}

        def longPoll() -> None:
            try:
                waiting["result"] = self.get(gateway, f"timeout=30000&cursor={cursor}", timeout=60)
            except Exception as e:  # reported by the main thread
                waiting["error"] = e

        poller = threading.Thread(target=longPoll, daemon=True)
        poller.start()
        # The broker must be up again after this test, whatever happens.
        self.addCleanup(devServices, "up", "kafka")
        devServices("stop", "kafka")

        began = time.monotonic()
        status_, headers, body = httpRequest("POST", gateway.url("/orders"), b"during", timeout=30)
        elapsed = time.monotonic() - began
        self.assertEqual(status_, 503, body)
        self.assertLess(elapsed, 3.0 + 2.0)
        self.assertIn("retry-after", headers)
        self.assertIn("cannot reach the broker", jsonOf(body)["detail"])

        devServices("up", "kafka")
        kcatProduce(topic, ["k:after"])
        poller.join(60)
        self.assertNotIn("error", waiting)
        status_, _, doc = waiting["result"]
        self.assertEqual(status_, 200, doc)
        contents = [item["content"] for item in doc["items"]]
        if not contents:
            # The long poll ran out while the broker restarted: the next poll
            # with the same cursor gets the message.
            more, _ = self.readAll(gateway, 1, cursor=cursor)
            contents = [item["content"] for item in more]
        self.assertEqual(contents, ["after"])

        def published() -> bool:
            code, _, _ = httpRequest("POST", gateway.url("/orders"), b"again", timeout=30)
            return code == 202

        waitFor(published, 30, 0.5, "publishing to work again")

    def test_noBroker(self) -> None:
        """
        With no broker at all (a closed port; the shared broker is left
        alone): a publish is a 503 carrying the connection error within
        message.timeout.ms, a group poll answers empty at its timeout, and
        the gateway stops within seconds although a publish, a group member
        and a reader are waiting on the broker.
        """
        gateway = self.gateway("nowhere", kafka=f"127.0.0.1:{freePort()}", start="latest", messageTimeout=2000,
                               endpoint={"shutdown_timeout": 2})
        began = time.monotonic()
        status, headers, body = httpRequest("POST", gateway.url("/orders"), b"lost", timeout=30)
        self.assertEqual(status, 503, body)
        self.assertLess(time.monotonic() - began, 2.0 + 1.5)
        self.assertIn("Connection refused", jsonOf(body)["detail"])
        self.assertIn("retry-after", headers)
        status, _, doc = self.get(gateway, "timeout=1000", headers={"X-Client-Id": "c1"})
        self.assertEqual((status, doc["items"]), (200, []))

        # A reader waiting for the broker (a long poll) and a publish waiting
        # for its report: sent on raw sockets, then a synchronous poll as a
        # barrier, so that both are in the gateway before it is stopped.
        waiting = [sendRaw(gateway.port, b"GET /orders?timeout=30000 HTTP/1.1\r\nHost: x\r\n\r\n"),
                   sendRaw(gateway.port, b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n\r\n"
                                         b"pending")]
        status, _, doc = self.get(gateway, "timeout=300", headers={"X-Client-Id": "c2"})
        self.assertEqual(status, 200, doc)
        self.stopGateway(gateway, within=8)
        answers = [receiveAll(sock) for sock in waiting]
        # The stop may close the connection before the publish is answered;
        # if it is answered, it is a 503.
        if answers[1]:
            self.assertTrue(answers[1].startswith(b"HTTP/1.1 503"), answers[1])


def sendRaw(port: int, request: bytes) -> socket.socket:
    """
    A connection to the gateway that has sent C{request}.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(request)
    return sock


def receiveAll(sock: socket.socket) -> bytes:
    """
    Everything the gateway sent on C{sock} until it closed it.
    """
    chunks = []
    with sock:
        while True:
            try:
                chunk = sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)
