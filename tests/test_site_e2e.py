"""
End-to-end tests of the connection limits against a real
C{twistd -n evgate} process, with plain sockets as the slow clients.
"""

from __future__ import annotations

import socket
import time
from typing import List

from twisted.trial.unittest import TestCase

from .helpers import MEMORY_INI, GatewayProcess, httpRequest


def slowClient(port: int) -> socket.socket:
    """
    A connection that sends the start of a request and then nothing.
    """
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET /demo HTTP/1.1\r\nHost: x\r\n")
    return s


def closedWithin(s: socket.socket, seconds: float) -> bytes:
    """
    Read from C{s} until the server closes it; fail after C{seconds}.
    """
    s.settimeout(seconds)
    received = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        chunk = s.recv(65536)
        if not chunk:
            return received
        received += chunk
    raise AssertionError("the connection was not closed in time")


class ConnectionLimitsEndToEndTests(TestCase):
    """
    Slow heads are cut off and the connection cap holds, in a real
    process, while a normal client is still served.
    """

    def start(self, keys: str) -> GatewayProcess:
        """
        A gateway process on the memory endpoint with extra [gateway] keys.
        """
        ini = MEMORY_INI.format(retention=100, entrypoints="http-post http-get", start="latest")
        ini = ini.replace("listen = tcp:0", "listen = tcp:0\n" + keys)
        gateway = GatewayProcess(ini).start()
        self.addCleanup(gateway.stop)
        return gateway

    def test_slowHeads(self) -> None:
        """
        Connections that never finish their heads are answered 408 and
        closed about request-head-timeout after they started, while a
        normal client is served in the meantime.
        """
        gateway = self.start("request-head-timeout = 1.5")
        port = gateway.ports[0]
        started = time.monotonic()
        slow: List[socket.socket] = [slowClient(port) for _ in range(5)]
        self.addCleanup(lambda: [s.close() for s in slow])
        status, _, _ = httpRequest("POST", gateway.url("/demo"), body=b"hello")
        self.assertEqual(status, 202)
        for s in slow:
            answer = closedWithin(s, 10)
            self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer)
            self.assertIn(b"application/problem+json", answer)
        elapsed = time.monotonic() - started
        self.assertGreater(elapsed, 1.0)
        self.assertLess(elapsed, 8.0)

    def test_maxConnections(self) -> None:
        """
        With max-connections = 3 and three connections held, a fourth is
        answered 503 and closed; once they close, requests are served.
        """
        gateway = self.start("max-connections = 3\nrequest-head-timeout = 30")
        port = gateway.ports[0]
        held = [slowClient(port) for _ in range(3)]
        time.sleep(0.3)  # let the gateway accept them (a real process)
        extra = socket.create_connection(("127.0.0.1", port), timeout=10)
        answer = closedWithin(extra, 10)
        extra.close()
        self.assertTrue(answer.startswith(b"HTTP/1.1 503 "), answer)
        self.assertIn(b"Retry-After: 1", answer)
        for s in held:
            s.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                status, _, _ = httpRequest("POST", gateway.url("/demo"), body=b"hello", timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.assertEqual(status, 202)
