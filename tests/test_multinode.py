"""
End-to-end tests of scale-out: three C{twistd -n evgate} processes on
different ports sharing one Kafka broker (the store: a compacted topic;
APIs on fresh topics; webhook consumer groups) and one Redis (rate
limits), driven through their APIs and admin APIs as a load balancer
would spread clients over them.

Kafka (127.0.0.1:${EVGATE_KAFKA_PORT:-9092}) and Redis (127.0.0.1:6379)
come from C{scripts/dev-services up}; these tests fail, never skip, when
either is missing.  The broker is never restarted here.  The test methods
block; the gateways run in other processes.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

from twisted.trial.unittest import TestCase

from .helpers import (
    REDIS,
    REDIS_HOST,
    REDIS_PORT,
    GatewayIni,
    GatewayProcess,
    WebhookReceiver,
    httpRequest,
    jsonOf,
    waitFor,
)
from .test_kafka_integration import admin as kafkaAdmin
from .test_kafka_integration import freshTopic, kcat, requireKafka

TOKEN = "multinode-admin-" + uuid.uuid4().hex
RATE = 5

def nodeIni(node: str, store: str, prefix: str, orders: str, limited: str, events: str) -> GatewayIni:
    """
    One node of the cluster: the Kafka store, limits in Redis, an admin
    API; /orders with API keys and webhooks, /limited at L{RATE} a second,
    /events streamed from the earliest offset.
    """
    return (GatewayIni(listen="tcp:0:interface=127.0.0.1", store=f"kafka:kafka/{store}", limits_store=REDIS,
                       limits_prefix=prefix)
            .admin(TOKEN, listen="tcp:0:interface=127.0.0.1").loopbackWebhooks().gateway(webhook_sync_interval=1)
            .kafka(settings={"client.id": node}, quick=True)
            .api("orders", endpoint="kafka", topic=orders, entrypoints="http-post webhook", plans="api-key",
                 webhook={"retry.initial-delay": 0.2, "retry.max-delay": 1})
            .api("limited", endpoint="kafka", topic=limited, rate_limit=f"{RATE}/s")
            .api("events", endpoint="kafka", topic=events, entrypoints="http-post sse", start="earliest",
                 heartbeat=1))


def requireRedis() -> None:
    """
    Fail loudly, with what to do, when Redis does not answer PING.
    """
    try:
        with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=3) as sock:
            sock.sendall(b"PING\r\n")
            answer = sock.recv(64)
    except OSError as e:
        raise AssertionError(f"Redis not reachable on {REDIS_HOST}:{REDIS_PORT} ({e}): "
                             "run scripts/dev-services up") from None
    if not answer.startswith(b"+PONG"):
        raise AssertionError(f"Redis on {REDIS_HOST}:{REDIS_PORT} answered {answer!r} to PING")


class Cluster:
    """
    The gateway nodes of one test: same configuration apart from their
    ports and Kafka client ids; nodes can be started, killed and started
    again.
    """

    def __init__(self, test: TestCase) -> None:
        self.test = test
        self.settings = dict(
            store=f"evgate-store-mn-{uuid.uuid4().hex[:10]}", prefix=f"evgate-test:{uuid.uuid4().hex[:12]}:",
            orders=freshTopic(), limited=freshTopic(), events=freshTopic())
        self.nodes: Dict[str, GatewayProcess] = {}

    def start(self, *names: str) -> List[GatewayProcess]:
        """
        Start the nodes C{names} at once; they are stopped at cleanup.
        """
        processes = []
        for name in names:
            process = GatewayProcess(nodeIni(name, **self.settings), name=name)
            self.test.addCleanup(process.stop, signal.SIGKILL)
            self.nodes[name] = process
            processes.append(process)
        with ThreadPoolExecutor(len(processes)) as pool:
            for future in [pool.submit(p.start, 60) for p in processes]:
                future.result()
        opened = f"store kafka:kafka/{self.settings['store']} open:"
        for process in processes:
            waitFor(lambda p=process: opened in p.output(), 30, what=f"the store of {process.ini} to open")
        return processes

    def admin(self, name: str, method: str, path: str, body: Any = None) -> Tuple[int, Any]:
        """
        One request to node C{name}'s admin API: status and JSON document.
        """
        data = json.dumps(body).encode() if body is not None else None
        status, _, content = httpRequest(method, self.nodes[name].adminUrl(path), data,
                                         {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        return status, (jsonOf(content) if content else None)

    def post(self, name: str, path: str, body: bytes, headers: Optional[dict] = None) -> Tuple[int, dict, bytes]:
        """
        POST C{body} to C{path} on node C{name}.
        """
        return httpRequest("POST", self.nodes[name].url(path), body,
                           dict({"Content-Type": "text/plain"}, **(headers or {})), timeout=15)

    def outputs(self) -> str:
        """
        Every node's log, for failure messages.
        """
        return "\n\n".join(f"--- {name}\n{node.output()}" for name, node in self.nodes.items())


def readSse(url: str, count: int, lastEventId: Optional[str] = None, timeout: float = 20) -> List[Tuple[str, str]]:
    """
    Open an SSE stream at C{url} (resuming after C{lastEventId}) and
    return the C{(id, data)} of its first C{count} message events, then
    close it.
    """
    host, _, rest = url.split("://", 1)[1].partition("/")
    address, port = host.split(":")
    connection = http.client.HTTPConnection(address, int(port), timeout=timeout)
    headers = {"Accept": "text/event-stream"}
    if lastEventId is not None:
        headers["Last-Event-ID"] = lastEventId
    try:
        connection.request("GET", "/" + rest, headers=headers)
        response = connection.getresponse()
        assert response.status == 200, (response.status, response.read())
        events: List[Tuple[str, str]] = []
        block: Dict[str, str] = {}
        deadline = time.monotonic() + timeout
        while len(events) < count:
            assert time.monotonic() < deadline, f"only {len(events)} of {count} SSE events came"
            line = response.fp.readline().decode("utf-8").rstrip("\r\n")
            if line:
                name, _, value = line.partition(":")
                block[name] = value[1:] if value.startswith(" ") else value
                continue
            if block.get("event") == "message":
                events.append((block["id"], block["data"]))
            block = {}
        return events
    finally:
        connection.close()


class ThreeNodeTests(TestCase):
    """
    Three gateway nodes sharing Kafka and Redis.
    """

    timeout = 170

    def setUp(self) -> None:
        requireKafka()
        requireRedis()
        self.cluster = Cluster(self)

    def test_keysLimitsAndStreams(self) -> None:
        """
        A key issued on node 1 works on nodes 2 and 3 within a second, and
        revoked on node 3 is refused by all three within a second; a rate
        limit of 5/s holds across the three; an SSE client resumes on
        another node with its Last-Event-ID.
        """
        cluster = self.cluster
        cluster.start("node1", "node2", "node3")

        # Keys: issued on one node, honoured by all; revoked on another,
        # refused by all.
        status, issued = cluster.admin("node1", "POST", "/apis/orders/keys", {"name": "shop"})
        self.assertEqual(status, 201, issued)
        key = {"X-Api-Key": issued["key"]}
        self.assertEqual(cluster.post("node1", "/orders", b"k1", key)[0], 202, cluster.outputs())
        began = time.monotonic()
        for name in ("node2", "node3"):
            waitFor(lambda name=name: cluster.post(name, "/orders", b"k", key)[0] == 202,
                    max(0.1, began + 1.0 - time.monotonic()), 0.02, f"the key to work on {name}")
        status, _ = cluster.admin("node3", "DELETE", f"/apis/orders/keys/{issued['id']}")
        self.assertEqual(status, 204)
        began = time.monotonic()
        for name in ("node3", "node1", "node2"):
            waitFor(lambda name=name: cluster.post(name, "/orders", b"k", key)[0] == 401,
                    max(0.1, began + 1.0 - time.monotonic()), 0.02, f"the revoked key to be refused on {name}")
        self.assertLess(time.monotonic() - began, 1.0)
        for name in ("node1", "node2"):
            self.assertIn(f"API key {issued['id']} was revoked elsewhere", cluster.nodes[name].output())
        status, keys = cluster.admin("node2", "GET", "/apis/orders/keys")
        self.assertEqual((status, keys["keys"]), (200, []))

        # Rate limit: one budget of 5 a second for the three nodes.
        names = ["node1", "node2", "node3"]
        for name in names:
            # Each node's first publish to the topic fetches its metadata;
            # done here, outside the measured second.
            self.assertIn(cluster.post(name, "/limited", b"warm-up")[0], (202, 429))
        accepted = self.burst(names, 3 * RATE)
        self.assertEqual(accepted, RATE, cluster.outputs())
        for name in names:
            self.assertNotIn("unavailable", cluster.nodes[name].output().lower().replace("endpoint-unavailable", ""))

        # SSE: read some events on node 1, resume on node 2 with the last id.
        for i in range(3):
            self.assertEqual(cluster.post("node1", "/events", f"e{i}".encode())[0], 202)
        first = readSse(cluster.nodes["node1"].url("/events"), 3)
        self.assertEqual([data for _, data in first], ["e0", "e1", "e2"])
        for i in range(3, 6):
            self.assertEqual(cluster.post("node3", "/events", f"e{i}".encode())[0], 202)
        resumed = readSse(cluster.nodes["node2"].url("/events"), 4, lastEventId=first[1][0])
        self.assertEqual([data for _, data in resumed], ["e2", "e3", "e4", "e5"])
        # And once more on the third node, from the id the first one gave.
        again = readSse(cluster.nodes["node3"].url("/events"), 1, lastEventId=first[2][0])
        self.assertEqual([data for _, data in again], ["e3"])

        # A node leaves cleanly and promptly; the others go on.
        began = time.monotonic()
        self.assertIn(cluster.nodes["node1"].stop(), (0, -signal.SIGTERM), cluster.nodes["node1"].output())
        self.assertLess(time.monotonic() - began, 15)
        status, issued = cluster.admin("node2", "POST", "/apis/orders/keys", {"name": "after"})
        self.assertEqual(status, 201, issued)
        waitFor(lambda: cluster.post("node3", "/orders", b"k", {"X-Api-Key": issued["key"]})[0] == 202, 1.0, 0.02,
                "a key issued after node 1 left to work on node 3")

    def burst(self, names: List[str], count: int) -> int:
        """
        Send C{count} POSTs to C{/limited}, round robin over the nodes,
        within one second of the clock (the limit's window); the number
        accepted.  A burst that straddled two windows is sent again.
        """
        for _ in range(3):
            # Start at the beginning of a window nothing was counted in yet
            # (aligning with the limit's clock, not waiting for the nodes).
            time.sleep(1.0 - time.time() % 1 + 0.02)
            began = time.time()
            codes = [self.cluster.post(names[i % len(names)], "/limited", b"m")[0] for i in range(count)]
            if int(time.time()) == int(began):
                self.assertEqual(set(codes) - {202, 429}, set(), codes)
                return codes.count(202)
        raise AssertionError("could not send the burst within one second three times")

    def test_webhookFailover(self) -> None:
        """
        A webhook subscription created on node 2 is delivered once per
        message by the three nodes' consumer group; when the delivering
        node is killed (kill -9) another takes over within the group's
        session timeout and every message arrives at least once, in order;
        a node that joins later (no restart of the others) reads the
        subscription from the store and joins the group, and delivery goes
        on once per message.
        """
        cluster = self.cluster
        receiver = WebhookReceiver(delay=0.03)
        self.addCleanup(receiver.stop)
        cluster.start("node1", "node2", "node3")
        status, created = cluster.admin("node2", "POST", "/apis/orders/subscriptions",
                                        {"callbackUrl": receiver.url, "start": "latest"})
        self.assertEqual(status, 201, created)
        group = f"evgate.webhook.orders.{created['id']}"
        topic = cluster.settings["orders"]
        owner = waitFor(lambda: stableOwner(group, 3), 60, 0.2, "the three nodes in a stable group")

        # Steady state: each message once, in order.
        first = [f"a{i:02d}".encode() for i in range(10)]
        kcat("-P", "-t", topic, stdin=b"\n".join(first) + b"\n")
        waitFor(lambda: len(receiver.delivered()) >= len(first), 30, what="the first messages")
        self.assertEqual(receiver.delivered(), first, cluster.outputs())

        # The delivering node dies in the middle of a run of messages.
        second = [f"b{i:02d}".encode() for i in range(60)]
        kcat("-P", "-t", topic, stdin=b"\n".join(second) + b"\n")
        waitFor(lambda: len(receiver.delivered()) >= len(first) + 10, 30, what="deliveries to be under way")
        killedAt = time.monotonic()
        cluster.nodes[owner].stop(signal.SIGKILL)
        waitFor(lambda: set(receiver.delivered()) >= set(second), 60, 0.1, "another node to take over")
        self.assertLess(time.monotonic() - killedAt, 30)
        run = [b for b in receiver.delivered() if b.startswith(b"b")]
        assertInOrderAtLeastOnce(self, run, second)

        # A node joins (the killed one, started again): nothing else restarts.
        cluster.start(owner)
        status, listed = cluster.admin(owner, "GET", "/apis/orders/subscriptions")
        self.assertEqual(status, 200, listed)
        self.assertEqual([item["id"] for item in listed["items"]], [created["id"]])
        waitFor(lambda: stableOwner(group, 3), 60, 0.2, "the joined node in a stable group")
        before = len(receiver.delivered())
        third = [f"c{i:02d}".encode() for i in range(10)]
        kcat("-P", "-t", topic, stdin=b"\n".join(third) + b"\n")
        waitFor(lambda: len(receiver.delivered()) >= before + len(third), 30, what="the last messages")
        self.assertEqual(receiver.delivered()[before:], third, cluster.outputs())


def stableOwner(group: str, members: int) -> Optional[str]:
    """
    The client id of the member of C{group} that owns partition 0, once
    the group is stable with C{members} members.
    """
    description = kafkaAdmin().describe_consumer_groups([group])[group].result(10)
    if str(description.state).split(".")[-1] != "STABLE" or len(description.members) != members:
        return None
    for member in description.members:
        if any(tp.partition == 0 for tp in member.assignment.topic_partitions):
            return member.client_id  # type: ignore[no-any-return]
    return None


def assertInOrderAtLeastOnce(test: TestCase, delivered: List[bytes], expected: List[bytes]) -> None:
    """
    Every message of C{expected} is in C{delivered}, and C{delivered} never
    skips ahead: each delivery is the next message or a step back (the new
    owner delivering again what the dead one had not committed).
    """
    index = {body: i for i, body in enumerate(expected)}
    positions = [index[body] for body in delivered]
    test.assertEqual(sorted(set(positions)), list(range(len(expected))))
    test.assertEqual(positions[0], 0, positions)
    for previous, current in zip(positions, positions[1:], strict=False):
        test.assertLessEqual(current, previous + 1, f"skipped ahead: {positions}")
