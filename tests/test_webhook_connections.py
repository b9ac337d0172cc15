"""
End-to-end tests of how deliveries use connections: a C{twistd -n evgate}
subprocess with the in-memory endpoint delivering to receivers that do not
keep connections open (the standard library's C{http.server}, as people
really run it), on 127.0.0.1.

No broker is needed.  The test methods block; the gateway runs in another
process.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import TestCase

from .helpers import GatewayIni, GatewayProcess, WebhookReceiver, httpRequest, waitFor
from .test_webhook_integration import TOKEN, admin


def receiverIni() -> GatewayIni:
    """
    /orders delivering to webhooks on 127.0.0.1 with few attempts, far
    apart: a failed attempt would show in the counts and make the test
    slow, never pass it.
    """
    return (GatewayIni(listen="tcp:0:interface=127.0.0.1", store="sqlite:evgate.sqlite").admin(TOKEN)
            .loopbackWebhooks().memory()
            .api("orders", entrypoints="http-post webhook",
                 webhook={"retry.initial-delay": 5, "retry.max-delay": 5, "retry.max-attempts": 2}))


COUNT = 12


class ClosingWebhookReceiverTests(TestCase):
    """
    Back-to-back deliveries to receivers that close their connections after
    every answer all succeed at the first attempt.
    """

    timeout = 90

    def setUp(self) -> None:
        self.gateway = GatewayProcess(receiverIni()).start()
        self.addCleanup(self.gateway.stop)

    def deliverBackToBack(self, receiver: WebhookReceiver) -> Any:
        """
        Publish L{COUNT} messages, then subscribe from the earliest so that
        the deliverer has them all at once and sends each as soon as the
        previous one was answered; return the subscription once every
        message was counted as delivered.
        """
        self.addCleanup(receiver.stop)
        bodies = [b"m%02d" % i for i in range(COUNT)]
        for body in bodies:
            status, _, answer = httpRequest("POST", self.gateway.url("/orders"), body,
                                            {"Content-Type": "text/plain"})
            self.assertEqual(status, 202, answer)
        status, created = admin(self.gateway, "POST", "/apis/orders/subscriptions",
                                {"callbackUrl": receiver.url, "start": "earliest"})
        self.assertEqual(status, 201, created)

        def settled() -> Any:
            _, view = admin(self.gateway, "GET", f"/apis/orders/subscriptions/{created['id']}")
            counts = view["counts"]
            return view if counts["delivered"] + counts["failedAttempts"] + counts["deadLettered"] >= COUNT else None

        view = waitFor(settled, 60, what=f"{COUNT} deliveries to be counted")
        self.assertEqual(receiver.delivered(), bodies)
        self.assertEqual(view["counts"], {"delivered": COUNT, "failedAttempts": 0, "deadLettered": 0})
        self.assertIsNone(view["lastError"])
        self.assertEqual(view["status"], "active")
        return view

    def test_http10WebhookReceiver(self) -> None:
        """
        A receiver that answers HTTP/1.0 (http.server's default) closes the
        connection after every answer: no delivery is sent on a connection
        it closed, so none fails, and each one has its own connection.
        """
        receiver = WebhookReceiver(protocol="HTTP/1.0")
        self.deliverBackToBack(receiver)
        self.assertEqual(receiver.connections, COUNT)

    def test_receiverClosingIdleConnections(self) -> None:
        """
        A receiver that answers HTTP/1.1 and closes the connection right
        after every answer without saying so: a delivery sent on such a
        closed connection is sent again at once on a new one, without
        counting a failed attempt.
        """
        self.deliverBackToBack(WebhookReceiver(closeAfterAnswer=True))

    def test_keepAliveWebhookReceiverReusesConnections(self) -> None:
        """
        A receiver that keeps connections open gets the deliveries on fewer
        connections than deliveries: reuse still works where it is safe.
        """
        receiver = WebhookReceiver()
        self.deliverBackToBack(receiver)
        self.assertLess(receiver.connections, COUNT)



