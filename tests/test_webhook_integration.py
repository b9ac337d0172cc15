"""
End-to-end tests of webhooks: C{twistd -n evgate} subprocesses in front of
the real Kafka broker (127.0.0.1:${EVGATE_KAFKA_PORT:-9092}) and Mosquitto
(both from C{scripts/dev-services up}), driven through their admin API,
delivering to a real HTTP receiver (the standard library's C{http.server}
on a thread of this process).  Signatures are checked with the
C{standardwebhooks} package, dead letters read back with kcat.

These tests fail (they never skip) when a broker is not there.  The test
methods block; the gateways run in other processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import uuid
from typing import Any, Dict, List, Optional, Tuple

from standardwebhooks.webhooks import Webhook
from twisted.trial.unittest import TestCase

from .helpers import MQTT_HOST, MQTT_PORT, GatewayIni, GatewayProcess, WebhookReceiver, httpRequest, jsonOf, waitFor
from .test_kafka_integration import admin as kafkaAdmin
from .test_kafka_integration import freshTopic, kcat, kcatRead, requireKafka
from .test_mqtt_integration import requireBroker

TOKEN = "e2e-admin-token-" + uuid.uuid4().hex

def webhookGateway(token: str = TOKEN, store: str = "evgate.sqlite") -> GatewayIni:
    """
    A gateway with a SQLite store, an admin API and webhooks allowed to
    reach the test receivers on 127.0.0.1.
    """
    return (GatewayIni(listen="tcp:0:interface=127.0.0.1", store=f"sqlite:{store}")
            .admin(token).loopbackWebhooks().gateway(webhook_sync_interval=1))


def kafkaIni(topic: str, dlq: str, store: str, clientId: str) -> GatewayIni:
    """
    /orders delivering C{topic} to webhooks, with quick retries and
    dead letters to C{dlq}.
    """
    return (webhookGateway(store=store).kafka(settings={"client.id": clientId}, quick=True)
            .api("orders", endpoint="kafka", topic=topic, entrypoints="http-post webhook", dlq=f"kafka/{dlq}",
                 webhook={"retry.initial-delay": 0.2, "retry.max-delay": 1, "retry.max-attempts": 3,
                          "timeout": 5}))


def mqttIni(store: str, prefix: str) -> GatewayIni:
    """
    /sensors delivering C{prefix}/+/temperature to webhooks, at QoS 1.
    """
    return (webhookGateway(store=store).mqtt()
            .api("sensors", endpoint="mqtt", topic=f"{prefix}/+/temperature", entrypoints="webhook", qos=1))


def strictIni() -> GatewayIni:
    """
    A gateway with the default SSRF settings (only plain HTTP allowed).
    """
    return (GatewayIni(listen="tcp:0:interface=127.0.0.1", store="sqlite:evgate.sqlite").admin(TOKEN)
            .gateway(webhook_allow_http=True).memory().api("orders", entrypoints="http-post webhook"))


# The receiver under the name other test modules import.
Receiver = WebhookReceiver


def admin(gateway: GatewayProcess, method: str, path: str, body: Any = None,
          token: str = TOKEN) -> Tuple[int, Any]:
    """
    One admin API request: its status and JSON document.
    """
    data = json.dumps(body).encode() if body is not None else None
    status, _, content = httpRequest(method, gateway.adminUrl(path), data,
                                     {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    return status, (jsonOf(content) if content else None)


def publish(gateway: GatewayProcess, content: bytes, key: str) -> Dict[str, Any]:
    """
    POST one message through the gateway.
    """
    status, _, body = httpRequest("POST", gateway.url(f"/orders?key={key}"), content,
                                  {"Content-Type": "text/plain", "X-Message-Header-Trace": f"trace-{key}"})
    assert status == 202, (status, body)
    return jsonOf(body)  # type: ignore[no-any-return]


class KafkaWebhookCase(TestCase):
    """
    Fresh topics (the API's and its dlq), and gateways and receivers that
    are stopped at cleanup.
    """

    timeout = 150

    def setUp(self) -> None:
        requireKafka()
        self.topic = freshTopic()
        self.dlq = freshTopic()

    def startGateway(self, store: str = "evgate.sqlite", clientId: str = "evgate") -> GatewayProcess:
        """
        The gateway in front of this test's topics.
        """
        gateway = GatewayProcess(kafkaIni(self.topic, self.dlq, store, clientId))
        gateway.start()
        self.addCleanup(gateway.stop)
        return gateway

    def startReceiver(self, **kwargs: Any) -> WebhookReceiver:
        """
        A receiver, stopped at cleanup.
        """
        receiver = WebhookReceiver(**kwargs)
        self.addCleanup(receiver.stop)
        return receiver


class WebhookKafkaTests(KafkaWebhookCase):
    """
    Webhook subscriptions of a Kafka API through a real gateway process.
    """

    def test_signedRetriedAndDeadLettered(self) -> None:
        """
        Messages POSTed after the subscription was created (and not those
        before it: start = latest) reach the
        receiver in order, signed so that standardwebhooks verifies them; a
        503 is retried with the same webhook-id; a 400 sends the message to
        the dlq topic with the reason, and delivery goes on; the admin API
        counts all of it.
        """
        def decide(body: bytes, attempt: int) -> int:
            if body == b"flaky" and attempt == 1:
                return 503
            return 400 if body == b"poison" else 200

        receiver = self.startReceiver(decide=decide)
        gateway = self.startGateway()
        # Published before the subscription exists: start = latest (the
        # API's default) leaves it out.
        publish(gateway, b"before", "k")
        status, created = admin(gateway, "POST", "/apis/orders/subscriptions",
                                {"callbackUrl": receiver.url, "headers": {"Authorization": "Bearer for-the-receiver"}})
        self.assertEqual(status, 201, created)
        contents = [b"first", b"flaky", b"second", b"poison", b"third"]
        positions = [publish(gateway, content, f"k{i}") for i, content in enumerate(contents)]
        waitFor(lambda: len(receiver.delivered()) == 4, 60, what="four deliveries")
        self.assertEqual(receiver.delivered(), [b"first", b"flaky", b"second", b"third"])
        requests = receiver.all()
        self.assertEqual([r.body for r in requests], [b"first", b"flaky", b"flaky", b"second", b"poison", b"third"])
        verifier = Webhook(created["secret"])
        for request in requests:
            verifier.verify(request.body, request.headers, json_parse=False)
        flaky = [r for r in requests if r.body == b"flaky"]
        self.assertEqual(flaky[0].headers["webhook-id"], flaky[1].headers["webhook-id"])
        self.assertEqual(flaky[0].headers["webhook-id"], f"msg_{created['id']}_0_{positions[1]['offset']}")
        first = requests[0].headers
        self.assertEqual((first["evgate-key"], first["evgate-topic"], first["evgate-offset"],
                          first["evgate-header-trace"], first["content-type"], first["authorization"]),
                         ("k0", self.topic, str(positions[0]["offset"]), "trace-k0", "text/plain",
                          "Bearer for-the-receiver"))

        [dead] = kcatRead(self.dlq, 1)
        self.assertEqual((dead["payload"], dead["key"]), ("poison", "k3"))
        headers = dict(zip(dead["headers"][::2], dead["headers"][1::2], strict=True))
        self.assertEqual((headers["evgate-dlq-reason"], headers["evgate-dlq-status"],
                          headers["evgate-dlq-subscription"], headers["evgate-dlq-topic"],
                          headers["evgate-dlq-offset"], headers["trace"]),
                         ("rejected", "400", created["id"], self.topic, str(positions[3]["offset"]), "trace-k3"))

        def settled() -> Any:
            status, view = admin(gateway, "GET", f"/apis/orders/subscriptions/{created['id']}")
            return view if view["counts"]["delivered"] == 4 else None

        view = waitFor(settled, 20, what="the counts to be stored")
        self.assertEqual(view["counts"], {"delivered": 4, "failedAttempts": 2, "deadLettered": 1})
        self.assertEqual(view["status"], "active")
        self.assertNotIn("secret", view)
        self.assertNotIn("Traceback", gateway.output())

    def test_killDuringDeliveries(self) -> None:
        """
        kill -9 while deliveries are under way, then start again: the
        subscription is still there and every message reaches the receiver
        at least once, first deliveries in order.
        """
        receiver = self.startReceiver(delay=0.01)
        gateway = self.startGateway()
        status, created = admin(gateway, "POST", "/apis/orders/subscriptions", {"callbackUrl": receiver.url})
        self.assertEqual(status, 201, created)
        count = 300
        expected = [b"m%03d" % i for i in range(count)]
        kcat("-P", "-t", self.topic, stdin=b"\n".join(expected) + b"\n")
        waitFor(lambda: len(receiver.delivered()) >= 60, 60, what="deliveries to be under way")
        gateway.stop(signal.SIGKILL)
        before = len(receiver.delivered())
        self.assertLess(before, count, "the kill came after every delivery; the test proves nothing")
        gateway.start()
        status, view = admin(gateway, "GET", f"/apis/orders/subscriptions/{created['id']}")
        self.assertEqual((status, view["callbackUrl"]), (200, receiver.url))
        waitFor(lambda: set(receiver.delivered()) >= set(expected), 90, what="every message after the restart")
        firsts: List[bytes] = []
        for body in receiver.delivered():
            if body not in firsts:
                firsts.append(body)
        self.assertEqual(firsts, expected)
        duplicates = len(receiver.delivered()) - count
        # At most the batch that was under way is delivered again.
        self.assertLessEqual(duplicates, 100)

    def test_pauseResumeAndDelete(self) -> None:
        """
        A paused subscription receives nothing and keeps its position;
        resumed, it gets what was published meanwhile; deleted, nothing
        more.
        """
        receiver = self.startReceiver()
        gateway = self.startGateway()
        _, created = admin(gateway, "POST", "/apis/orders/subscriptions", {"callbackUrl": receiver.url})
        id = created["id"]
        publish(gateway, b"one", "a")
        waitFor(lambda: receiver.delivered() == [b"one"], 30, what="the first delivery")
        status, paused = admin(gateway, "POST", f"/apis/orders/subscriptions/{id}/pause")
        self.assertEqual((status, paused["status"]), (200, "paused"))
        publish(gateway, b"two", "b")
        status, resumed = admin(gateway, "POST", f"/apis/orders/subscriptions/{id}/resume")
        self.assertEqual(resumed["status"], "active")
        waitFor(lambda: receiver.delivered() == [b"one", b"two"], 30, what="the delivery after resuming")
        self.assertEqual(admin(gateway, "DELETE", f"/apis/orders/subscriptions/{id}")[0], 204)
        status, listed = admin(gateway, "GET", "/apis/orders/subscriptions")
        self.assertEqual(listed, {"items": []})
        # A second subscription shows when the next message has gone
        # through; the deleted one must not have had it.
        _, sentinel = admin(gateway, "POST", "/apis/orders/subscriptions", {"callbackUrl": receiver.url})
        publish(gateway, b"three", "c")
        waitFor(lambda: b"three" in receiver.delivered(), 30, what="the sentinel's delivery")
        self.assertEqual([(r.body, r.headers["evgate-subscription"]) for r in receiver.all()],
                         [(b"one", id), (b"two", id), (b"three", sentinel["id"])])


class WebhookScaleOutTests(KafkaWebhookCase):
    """
    Two gateway nodes sharing one SQLite store and the subscription's
    consumer group.
    """

    def test_oneNodeAtATime(self) -> None:
        """
        A subscription created on one node is delivered by the group: with
        both nodes in it, each message reaches the receiver once (not once
        per node); when the node that owns the partition stops, the other
        one takes over and nothing is lost.
        """
        receiver = self.startReceiver()
        shared = os.path.join(tempfile.mkdtemp(prefix="evgate-shared-"), "evgate.sqlite")
        nodes = {name: self.startGateway(store=shared, clientId=name) for name in ("node-a", "node-b")}
        status, created = admin(nodes["node-a"], "POST", "/apis/orders/subscriptions", {"callbackUrl": receiver.url})
        self.assertEqual(status, 201, created)
        group = f"evgate.webhook.orders.{created['id']}"
        owner = waitFor(lambda: self.stableOwner(group), 60, 0.2, what="both nodes in a stable group")
        first = [b"a%02d" % i for i in range(20)]
        kcat("-P", "-t", self.topic, stdin=b"\n".join(first) + b"\n")
        waitFor(lambda: set(receiver.delivered()) >= set(first), 30, what="the first messages")
        self.assertEqual(receiver.delivered(), first)
        nodes[owner].stop()
        second = [b"b%02d" % i for i in range(20)]
        kcat("-P", "-t", self.topic, stdin=b"\n".join(second) + b"\n")
        waitFor(lambda: set(receiver.delivered()) >= set(second), 60, what="the other node to take over")
        self.assertEqual([b for b in receiver.delivered() if b.startswith(b"b")], second)

    def stableOwner(self, group: str) -> Optional[str]:
        """
        The client id of the member that owns partition 0, once the group is
        stable with two members.
        """
        description = kafkaAdmin().describe_consumer_groups([group])[group].result(10)
        if str(description.state).split(".")[-1] != "STABLE" or len(description.members) != 2:
            return None
        for member in description.members:
            if any(tp.partition == 0 for tp in member.assignment.topic_partitions):
                return member.client_id  # type: ignore[no-any-return]
        return None


class WebhookMqttTests(TestCase):
    """
    Webhooks of an MQTT 5 API, through the subscription's share group.
    """

    timeout = 90

    def test_shareGroupAcrossNodes(self) -> None:
        """
        Two nodes join the subscription's share group
        ($share/evgate-<id>/...): the broker hands each message to one of
        them, so the receiver gets every message once, not once per node.
        """
        requireBroker()
        receiver = WebhookReceiver()
        self.addCleanup(receiver.stop)
        prefix = f"evgate-it/{uuid.uuid4().hex[:10]}"
        shared = os.path.join(tempfile.mkdtemp(prefix="evgate-shared-"), "evgate.sqlite")
        nodes = []
        for _ in range(2):
            node = GatewayProcess(mqttIni(shared, prefix))
            node.start()
            self.addCleanup(node.stop)
            nodes.append(node)
        status, created = admin(nodes[0], "POST", "/apis/sensors/subscriptions", {"callbackUrl": receiver.url})
        self.assertEqual(status, 201, created)
        group = f"$share/evgate-{created['id']}/{prefix}/+/temperature"
        waitFor(lambda: all(created["id"] in node.output() for node in nodes), 30,
                what="both nodes to deliver the subscription")
        sent = [b"t%02d" % i for i in range(20)]
        for body in sent:
            published = subprocess.run(
                ["mosquitto_pub", "-V", "mqttv5", "-h", MQTT_HOST, "-p", str(MQTT_PORT), "-q", "1",
                 "-t", f"{prefix}/kitchen/temperature", "-m", body.decode()], capture_output=True, timeout=10)
            self.assertEqual(published.returncode, 0, published.stderr)
        waitFor(lambda: set(receiver.delivered()) >= set(sent), 30, what="every MQTT message")
        self.assertEqual(sorted(receiver.delivered()), sent, f"each message once through {group}")
        headers = receiver.all()[0].headers
        self.assertEqual(headers["evgate-topic"], f"{prefix}/kitchen/temperature")
        Webhook(created["secret"]).verify(receiver.all()[0].body, headers, json_parse=False)


class WebhookGuardTests(TestCase):
    """
    What a gateway with the default SSRF settings refuses, and its admin
    API's token.
    """

    timeout = 60

    def setUp(self) -> None:
        self.gateway = GatewayProcess(strictIni()).start()
        self.addCleanup(self.gateway.stop)

    def test_internalCallbacksRefused(self) -> None:
        """
        Callback URLs that are or resolve to loopback, private or metadata
        addresses are refused with a 400 that says why.
        """
        for url, why in (("http://127.0.0.1:9/hook", "loopback"), ("http://localhost:9/hook", "loopback"),
                         ("http://10.0.0.7/hook", "private"), ("http://169.254.169.254/latest/meta-data", "metadata"),
                         ("http://[::1]:9/hook", "loopback"), ("http://2130706433:9/hook", "loopback")):
            status, problem = admin(self.gateway, "POST", "/apis/orders/subscriptions", {"callbackUrl": url})
            self.assertEqual((status, problem["field"]), (400, "callbackUrl"), url)
            self.assertIn(why, problem["detail"], url)
        self.assertEqual(admin(self.gateway, "GET", "/apis/orders/subscriptions")[1], {"items": []})

    def test_adminToken(self) -> None:
        """
        The admin listener answers /health to anyone and everything else
        only with the token; it is not the gateway's port.
        """
        self.assertNotEqual(self.gateway.adminPorts[0], self.gateway.port)
        status, _, body = httpRequest("GET", self.gateway.adminUrl("/health"))
        self.assertEqual((status, jsonOf(body)), (200, {"status": "ok"}))
        self.assertEqual(admin(self.gateway, "GET", "/apis/orders/subscriptions", token="wrong-token-000000")[0], 401)
        self.assertEqual(httpRequest("GET", self.gateway.url("/apis/orders/subscriptions"))[0], 404)
        self.assertIn("evgate admin listening on port", self.gateway.output())
