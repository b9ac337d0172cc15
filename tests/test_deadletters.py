"""
Tests of a subscription's dead letters through the admin API: reading
them from the API's dlq (an in-memory topic here) and redelivering them,
through L{StubTreq} both ways (the admin API, and the receiver).
"""

from __future__ import annotations

from typing import Any, List

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from evgate.message import Draft
from evgate.webhook.signing import secretKey, signature

from .test_admin import INI, AdminHarness

DLQ_INI = INI.replace("entrypoints = http-post webhook\n",
                      "entrypoints = http-post webhook\ndlq = local/orders-dlq\n", 1)


class Receiver(Resource):
    """
    A webhook receiver answering C{status} to every POST and keeping what
    it got.
    """

    isLeaf = True

    def __init__(self, status: int) -> None:
        super().__init__()
        self.status = status
        self.requests: List[Any] = []

    def render_POST(self, request: Request) -> bytes:
        self.requests.append((request.content.read(), {k.decode().lower(): v[0].decode()
                                                       for k, v in request.requestHeaders.getAllRawHeaders()}))
        request.setResponseCode(self.status)
        return b""


class DeadLetterRouteTests(SynchronousTestCase):
    """
    C{GET /apis/<api>/subscriptions/<id>/dead-letters} and
    C{POST .../dead-letters/redeliver}.
    """

    def setUp(self) -> None:
        self.admin = AdminHarness(ini=DLQ_INI)
        self.service = self.admin.gateway.webhooks
        self.connector = self.admin.gateway.connectors["local"]
        self.failing = Receiver(400)
        self.service.http = StubTreq(self.failing)
        self.ids = []
        for _ in range(2):
            status, _, created = self.admin.call("POST", "/apis/orders/subscriptions",
                                                 {"callbackUrl": "https://hooks.example/in"})
            assert status == 201, created
            self.ids.append(created["id"])
            self.secret = created["secret"]
        self.id = self.ids[-1]
        self.path = f"/apis/orders/subscriptions/{self.id}/dead-letters"
        for index in range(3):
            self.connector.publish("orders", Draft(f"m{index}".encode(), key=f"k{index}", headers=(("h", "v"),)))
            self.settle()

    def settle(self) -> None:
        """
        Let deliveries and dead-letter publishes run.
        """
        for _ in range(10):
            self.admin.clock.advance(0)
            self.service.http.flush()

    def test_page(self) -> None:
        """
        The subscription's dead letters, oldest first, with the reason,
        the status, where the message was and its content; the other
        subscription's are not shown.
        """
        # Both subscriptions dead-lettered all three.
        self.assertEqual(len(self.connector.topicLog("orders-dlq").messages), 6)
        status, _, page = self.admin.call("GET", self.path)
        self.assertEqual(status, 200, page)
        self.assertEqual(page["dlq"], "local/orders-dlq")
        self.assertEqual([item["preview"] for item in page["items"]], ["m0", "m1", "m2"])
        first = page["items"][0]
        self.assertEqual((first["reason"], first["status"], first["attempts"], first["redeliverable"]),
                         ("rejected", 400, 1, True))
        self.assertEqual(first["error"], "HTTP 400 Bad Request")
        self.assertEqual((first["message"]["topic"], first["message"]["offset"], first["message"]["key"]),
                         ("orders", 0, "k0"))
        self.assertEqual(first["message"]["headers"], {"h": "v"})
        self.assertTrue(first["message"]["id"].startswith(f"msg_{self.id}_0_0"))
        self.assertTrue(first["deadLetteredAt"].endswith("Z"))
        self.assertTrue(page["atHead"])
        self.assertEqual(page["scanned"], 6)

    def test_pages(self) -> None:
        """
        C{limit} bounds a page; C{nextCursor} goes on after it, and a read
        at the head is empty.
        """
        status, _, page = self.admin.call("GET", self.path + "?limit=2")
        self.assertEqual([item["preview"] for item in page["items"]], ["m0", "m1"])
        self.assertFalse(page["atHead"])
        status, _, rest = self.admin.call("GET", self.path + "?limit=2&cursor=" + page["nextCursor"])
        self.assertEqual([item["preview"] for item in rest["items"]], ["m2"])
        status, _, end = self.admin.call("GET", self.path + "?cursor=" + rest["nextCursor"])
        self.assertEqual((status, end["items"], end["atHead"]), (200, [], True))

    def test_redeliverPositions(self) -> None:
        """
        Named dead letters are delivered once more, signed with the
        subscription's secret and with the message's original webhook-id;
        each is reported; one of another subscription is refused.
        """
        _, _, page = self.admin.call("GET", self.path)
        receiver = Receiver(204)
        self.service.http = StubTreq(receiver)
        _, _, other = self.admin.call("GET", f"/apis/orders/subscriptions/{self.ids[0]}/dead-letters")
        positions = [page["items"][0]["position"], page["items"][2]["position"], other["items"][0]["position"]]
        status, _, answer = self.admin.call("POST", self.path + "/redeliver", {"positions": positions})
        self.assertEqual(status, 200, answer)
        self.assertEqual((answer["redelivered"], answer["failed"]), (2, 1))
        self.assertEqual([(r["position"], r["ok"]) for r in answer["results"]],
                         [(positions[0], True), (positions[1], True), (positions[2], False)])
        self.assertIn("not a dead letter of subscription", answer["results"][2]["error"])
        self.assertEqual([body for body, _ in receiver.requests], [b"m0", b"m2"])
        body, headers = receiver.requests[0]
        self.assertEqual(headers["webhook-id"], page["items"][0]["message"]["id"])
        self.assertEqual(headers["evgate-subscription"], self.id)
        self.assertEqual(headers["evgate-offset"], "0")
        expected = signature(secretKey(self.secret), headers["webhook-id"], int(headers["webhook-timestamp"]), body)
        self.assertEqual(headers["webhook-signature"], expected)
        self.assertEqual(headers["evgate-header-h"], "v")

    def test_redeliverAll(self) -> None:
        """
        C{all}: every dead letter of the subscription; a receiver that
        still fails is reported, not retried.
        """
        receiver = Receiver(503)
        self.service.http = StubTreq(receiver)
        status, _, answer = self.admin.call("POST", self.path + "/redeliver", {"all": True})
        self.assertEqual((answer["redelivered"], answer["failed"]), (0, 3))
        self.assertEqual(answer["results"][0]["error"], "HTTP 503 Service Unavailable")
        self.assertEqual(len(receiver.requests), 3)
        receiver.status = 200
        status, _, answer = self.admin.call("POST", self.path + "/redeliver", {"all": True})
        self.assertEqual((status, answer["redelivered"], answer["atHead"]), (200, 3, True))
        status, _, answer = self.admin.call("POST", self.path + "/redeliver",
                                            {"all": True, "cursor": answer["nextCursor"]})
        self.assertEqual(answer["results"], [])

    def test_missingAndBadInput(self) -> None:
        """
        A position not in the dlq is reported; bad bodies and cursors are
        400s; an unknown subscription 404; an API without a dlq 409.
        """
        self.service.http = StubTreq(Receiver(200))
        status, _, answer = self.admin.call("POST", self.path + "/redeliver", ["0:99"])
        self.assertEqual((status, answer["failed"]), (200, 1))
        self.assertIn("no such dead letter", answer["results"][0]["error"])
        for body in ({}, {"positions": []}, {"positions": ["x"]}, {"all": False}, {"all": True, "x": 1},
                     {"positions": ["0:1"] * 101}, "0:1", {"all": True, "cursor": "nope"}):
            status, _, document = self.admin.call("POST", self.path + "/redeliver", body)
            self.assertEqual(status, 400, (body, document))
        for query in ("?cursor=nope", "?limit=x", "?limit=201"):
            status, _, document = self.admin.call("GET", self.path + query)
            self.assertEqual(status, 400, (query, document))
        status, _, _ = self.admin.call("GET", "/apis/orders/subscriptions/sub_00000000000000000000/dead-letters")
        self.assertEqual(status, 404)


class NoDeadLetterDestinationTests(SynchronousTestCase):
    """
    An API without C{dlq} has no dead letters to show.
    """

    def test_conflict(self) -> None:
        """
        Both routes answer 409 with a problem that says why.
        """
        admin = AdminHarness()
        status, _, created = admin.call("POST", "/apis/orders/subscriptions", {"callbackUrl": "https://hooks.example/in"})
        path = f"/apis/orders/subscriptions/{created['id']}/dead-letters"
        status, headers, document = admin.call("GET", path)
        self.assertEqual(status, 409)
        self.assertIn("no dlq", document["detail"])
        status, _, _ = admin.call("POST", path + "/redeliver", {"all": True})
        self.assertEqual(status, 409)
