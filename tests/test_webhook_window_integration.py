"""
Integration test of a webhook delivery window through a real gateway
process and real Kafka: a receiver that takes 10 ms per request, 64 keys
over two partitions, a window of 16.
"""

from __future__ import annotations

from typing import Dict, List

from .helpers import waitFor
from .test_kafka_integration import freshTopic, kcatProduce
from .test_webhook_integration import KafkaWebhookCase, admin

KEYS = 64
PER_KEY = 12


class WebhookWindowKafkaTests(KafkaWebhookCase):
    """
    A subscription with C{maxInFlight = 16} of a Kafka API.
    """

    def setUp(self) -> None:
        super().setUp()
        self.topic = freshTopic(2)

    def test_everythingInOrderPerKey(self) -> None:
        """
        Every message reaches a slow receiver exactly in its key's order,
        none is lost, the receiver is called on several connections at
        once, and the stored position ends past every message.
        """
        receiver = self.startReceiver(delay=0.01)
        gateway = self.startGateway()
        lines = [f"k{key:02d}:k{key:02d}/{seq:03d}" for seq in range(PER_KEY) for key in range(KEYS)]
        kcatProduce(self.topic, lines)
        status, created = admin(gateway, "POST", "/apis/orders/subscriptions",
                                {"callbackUrl": receiver.url, "start": "earliest", "maxInFlight": 16})
        self.assertEqual(status, 201, created)
        self.assertEqual(created["maxInFlight"], 16)
        waitFor(lambda: len(set(receiver.delivered())) >= len(lines), 120, 0.2, what="every message delivered")

        perKey: Dict[str, List[int]] = {}
        for body in receiver.delivered():
            key, seq = body.decode().split("/")
            perKey.setdefault(key, []).append(int(seq))
        self.assertEqual(len(perKey), KEYS)
        for key, seqs in perKey.items():
            # Nothing lost, nothing out of order; a message delivered again
            # (at-least-once) may only repeat the one before it.
            self.assertEqual(sorted(set(seqs)), list(range(PER_KEY)), key)
            self.assertEqual(seqs, sorted(seqs), key)
        # One connection at a time would have served it all on one.
        self.assertGreater(receiver.connections, 1)
        self.assertLessEqual(receiver.connections, 64)

        def settled() -> bool:
            _, view = admin(gateway, "GET", f"/apis/orders/subscriptions/{created['id']}")
            return bool(view["counts"]["delivered"] >= len(lines) and view["status"] == "active")

        waitFor(settled, 30, 0.2, what="the counts to reach every message")
