"""
Replay of a webhook subscription on Kafka, end to end: a C{twistd -n
evgate} subprocess in front of the real broker, whose consumer group's
offsets the admin API moves (L{evgate.webhook.groupreplay}).  Fails (never
skips) without the broker.
"""

from __future__ import annotations

import datetime
import time
from typing import List

from .helpers import waitFor
from .test_kafka_integration import freshTopic
from .test_webhook_integration import KafkaWebhookCase, admin, publish


class KafkaReplayTests(KafkaWebhookCase):
    """
    C{POST /apis/<api>/subscriptions/<id>/replay} on a Kafka API.
    """

    timeout = 240

    def setUp(self) -> None:
        super().setUp()
        # Two partitions: the group's offsets are moved per partition.
        self.topic = freshTopic(2)

    def test_replayAtAndFrom(self) -> None:
        """
        Twenty messages delivered; replay C{at} a time between the tenth
        and the eleventh: the receiver gets the last ten again (and not the
        first ten).  Replay C{from} the cursor the subscription had after
        the tenth: likewise.  The subscription delivers on afterwards.
        """
        gateway = self.startGateway()
        receiver = self.startReceiver()
        status, created = admin(gateway, "POST", "/apis/orders/subscriptions",
                                {"callbackUrl": receiver.url, "start": "latest"})
        self.assertEqual(status, 201, created)
        path = f"/apis/orders/subscriptions/{created['id']}"
        first = [f"m{i:02d}".encode() for i in range(1, 11)]
        last = [f"m{i:02d}".encode() for i in range(11, 21)]
        for index, body in enumerate(first):
            publish(gateway, body, f"k{index % 4}")
        waitFor(lambda: sorted(receiver.delivered()) == first, 60, what="the first ten")

        def position() -> str:
            status, view = admin(gateway, "GET", path)
            return str(view["position"])

        waitFor(lambda: admin(gateway, "GET", path)[1]["counts"]["delivered"] == 10, 30, what="the count")
        afterTenth = position()
        time.sleep(1.2)
        between = datetime.datetime.now(datetime.timezone.utc).isoformat()
        time.sleep(1.2)
        for index, body in enumerate(last):
            publish(gateway, body, f"k{index % 4}")
        waitFor(lambda: len(receiver.delivered()) == 20, 60, what="all twenty")

        status, view = admin(gateway, "POST", path + "/replay", {"at": between})
        self.assertEqual(status, 200, view)
        self.assertEqual(view["status"], "active")
        waitFor(lambda: len(receiver.delivered()) == 30, 60, what="the last ten again")
        self.assertEqual(sorted(receiver.delivered()[20:]), last)

        status, view = admin(gateway, "POST", path + "/replay", {"from": afterTenth})
        self.assertEqual(status, 200, view)
        waitFor(lambda: len(receiver.delivered()) == 40, 60, what="the last ten once more")
        self.assertEqual(sorted(receiver.delivered()[30:]), last)

        publish(gateway, b"m21", "k0")
        waitFor(lambda: receiver.delivered()[-1:] == [b"m21"], 60, what="delivery going on")
        time.sleep(1.0)
        delivered: List[bytes] = receiver.delivered()
        self.assertEqual(len(delivered), 41, "nothing delivered more than the replays asked for")

    def test_pausedStaysPaused(self) -> None:
        """
        A paused subscription's group is moved, and it stays paused until
        resumed; then it delivers from the new position.
        """
        gateway = self.startGateway()
        receiver = self.startReceiver()
        status, created = admin(gateway, "POST", "/apis/orders/subscriptions",
                                {"callbackUrl": receiver.url, "start": "latest"})
        path = f"/apis/orders/subscriptions/{created['id']}"
        for index in range(3):
            publish(gateway, f"p{index}".encode(), "k")
        waitFor(lambda: len(receiver.delivered()) == 3, 60, what="three deliveries")
        admin(gateway, "POST", path + "/pause")
        status, view = admin(gateway, "POST", path + "/replay", {"at": "2000-01-01T00:00:00Z"})
        self.assertEqual((status, view["status"]), (200, "paused"))
        time.sleep(2.0)
        self.assertEqual(len(receiver.delivered()), 3)
        admin(gateway, "POST", path + "/resume")
        waitFor(lambda: len(receiver.delivered()) == 6, 60, what="the three again")
