"""
End-to-end tests of the skeleton: a real C{twistd -n evgate} process on a
free port, driven over real HTTP by the standard library's client.
"""

import re
import socket
import threading
import time

from twisted.trial.unittest import TestCase

from .helpers import GatewayIni, GatewayProcess, demoIni, httpRequest, jsonOf, waitFor


def endToEndIni() -> GatewayIni:
    """
    /demo on a memory endpoint keeping 1000 messages, read from the
    earliest, messages up to 1000 bytes, and an admin API.
    """
    return (demoIni("http-post http-get", listen="tcp:0:interface=127.0.0.1", max_message_bytes=1000,
                    api={"start": "earliest"})
            .admin("end-to-end-admin-token", listen="tcp:0:interface=127.0.0.1").memory(retention=1000))


class EndToEndTests(TestCase):
    """
    POST, long-poll GET and errors through a running gateway process.
    """

    timeout = 120

    def setUp(self) -> None:
        self.gateway = GatewayProcess(endToEndIni()).start()
        self.addCleanup(self.gateway.stop)

    def test_publishThenConsume(self) -> None:
        """
        Messages POSTed are read back by GET in order, with their key and
        headers, and nextCursor continues without repeats.
        """
        for i in range(3):
            status, _, body = httpRequest("POST", self.gateway.url(f"/demo?key=k{i}"), f"m{i}".encode(),
                                          {"X-Message-Header-Trace": f"t{i}", "Content-Type": "text/plain"})
            self.assertEqual(status, 202, body)
            self.assertEqual(jsonOf(body), {"topic": "demo", "partition": 0, "offset": i})
        status, _, body = httpRequest("GET", self.gateway.url("/demo?limit=2"))
        page = jsonOf(body)
        self.assertEqual([(i["content"], i["key"], i["headers"]["trace"]) for i in page["items"]],
                         [("m0", "k0", "t0"), ("m1", "k1", "t1")])
        status, _, body = httpRequest("GET", self.gateway.url(
            f"/demo?timeout=0&cursor={page['pagination']['nextCursor']}"))
        self.assertEqual([i["content"] for i in jsonOf(body)["items"]], ["m2"])

    def test_longPoll(self) -> None:
        """
        A GET waiting at the head answers when a message is POSTed, well
        before its timeout.
        """
        _, _, body = httpRequest("GET", self.gateway.url("/demo?timeout=0"))
        cursor = jsonOf(body)["pagination"]["nextCursor"]
        result = {}

        def poll() -> None:
            started = time.monotonic()
            result["response"] = httpRequest("GET", self.gateway.url(f"/demo?timeout=20000&cursor={cursor}"))
            result["elapsed"] = time.monotonic() - started

        thread = threading.Thread(target=poll)
        thread.start()
        # Publish only once the gateway says the poll is waiting, so that
        # the answer proves the waiting poll was woken.
        waitFor(lambda: self.waitingPolls() == 1, 20, what="the long poll to wait")
        httpRequest("POST", self.gateway.url("/demo"), b"wake up")
        thread.join(30)
        status, _, body = result["response"]
        self.assertEqual(status, 200)
        self.assertEqual([i["content"] for i in jsonOf(body)["items"]], ["wake up"])
        self.assertLess(result["elapsed"], 15)

    def waitingPolls(self) -> float:
        """
        The gateway's own count of long polls waiting on the demo API.
        """
        _, _, body = httpRequest("GET", self.gateway.adminUrl("/metrics"),
                                 headers={"Authorization": "Bearer end-to-end-admin-token"})
        match = re.search(rb'^evgate_subscribers\{api="demo",entrypoint="http-get"\} (\S+)$', body, re.M)
        return float(match.group(1)) if match else -1.0

    def test_tooLargeWithoutReading(self) -> None:
        """
        A request announcing a body over max-message-bytes is answered 413
        before it sends the body.
        """
        with socket.create_connection(("127.0.0.1", self.gateway.port), timeout=10) as s:
            s.sendall(b"POST /demo HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n")
            response = b""
            while b"\r\n\r\n" not in response:
                chunk = s.recv(4096)
                if not chunk:
                    break
                response += chunk
        self.assertTrue(response.startswith(b"HTTP/1.1 413"), response)

    def test_errors(self) -> None:
        """
        Unknown paths, wrong methods and bad cursors get problem documents.
        """
        status, headers, body = httpRequest("GET", self.gateway.url("/nope"))
        self.assertEqual((status, headers["content-type"]), (404, "application/problem+json"))
        status, headers, _ = httpRequest("PUT", self.gateway.url("/demo"), b"x")
        self.assertEqual((status, headers["allow"]), (405, "GET, POST"))
        status, _, body = httpRequest("GET", self.gateway.url("/demo?cursor=AAAA"))
        self.assertEqual(status, 400)
        self.assertEqual(jsonOf(body)["type"], "https://evgate.dev/problems/bad-cursor")
        status, _, _ = httpRequest("POST", self.gateway.url("/demo"), b"")
        self.assertEqual(status, 400)

    def test_cleanShutdown(self) -> None:
        """
        SIGTERM stops the gateway cleanly within seconds.  twistd reports a
        signalled stop by ending through that signal, which systemd counts
        as a clean exit.
        """
        started = time.monotonic()
        self.assertIn(self.gateway.stop(), (0, -15))
        self.assertLess(time.monotonic() - started, 10)
        self.assertIn("Server Shut Down.", self.gateway.output())
        self.assertNotIn("Traceback", self.gateway.output())
