"""
End-to-end test of reloading a running C{twistd -n evgate}: an event
stream on API A stays open across a C{SIGHUP} that adds API B, B is
served, and A's stream still receives; a broken file is refused and
logged, and C{POST /reload} names its mistake.
"""

from __future__ import annotations

import json
import signal
import socket
from typing import List

from twisted.trial.unittest import SynchronousTestCase

from .helpers import GatewayIni, GatewayProcess, httpRequest, waitFor
from .test_reload import API_B

TOKEN = "reload-e2e-token-0123456789"


class SseReader:
    """
    A raw event-stream client on a socket of its own.
    """

    def __init__(self, port: int, path: str) -> None:
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.socket.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n".encode())
        self.received = b""

    def readUntil(self, wanted: bytes) -> bytes:
        """
        Read until C{wanted} has arrived (or fail on the socket timeout).
        """
        while wanted not in self.received:
            data = self.socket.recv(65536)
            if not data:
                raise AssertionError(f"stream closed before {wanted!r}; got {self.received!r}")
            self.received += data
        return self.received

    def close(self) -> None:
        self.socket.close()


class ReloadEndToEndTests(SynchronousTestCase):
    """
    SIGHUP and POST /reload against a real process.
    """

    def test_sighupKeepsStreams(self) -> None:
        """
        SIGHUP applies an added API while an open stream of an unchanged
        API stays open; a broken file is refused, logged, and changes
        nothing; POST /reload answers 400 naming the file, section and key.
        """
        text = str(GatewayIni(listen="tcp:0:interface=127.0.0.1").admin(TOKEN).memory()
                   .api("a", entrypoints="http-post sse", heartbeat=0))
        gateway = GatewayProcess(text).start()
        self.addCleanup(gateway.stop)
        reader = SseReader(gateway.port, "/a")
        self.addCleanup(reader.close)
        reader.readUntil(b"retry:")

        with open(gateway.ini, "w") as f:
            f.write(text + API_B)
        gateway.process.send_signal(signal.SIGHUP)
        waitFor(lambda: "reload: applied" in gateway.output(), 30, what="the reload to be applied")
        status, _, body = httpRequest("POST", gateway.url("/b"), b"for b")
        self.assertEqual(status, 202, body)
        status, _, body = httpRequest("POST", gateway.url("/a"), b"after the reload")
        self.assertEqual(status, 202, body)
        reader.readUntil(b"data: after the reload")

        with open(gateway.ini, "w") as f:
            f.write(text + API_B + "\n[api:broken]\npath = nope\n")
        gateway.process.send_signal(signal.SIGHUP)
        waitFor(lambda: "reload refused" in gateway.output(), 30, what="the refusal to be logged")
        refusal = [line for line in gateway.lines if "reload refused" in line][0]
        self.assertIn(f"{gateway.ini} [api:broken] path", refusal)
        status, _, body = httpRequest("POST", gateway.url("/a"), b"still served")
        self.assertEqual(status, 202)
        reader.readUntil(b"data: still served")

        status, headers, body = httpRequest("POST", gateway.adminUrl("/reload"), b"",
                                            {"Authorization": f"Bearer {TOKEN}"})
        problem = json.loads(body)
        self.assertEqual((status, headers["content-type"]), (400, "application/problem+json"))
        self.assertEqual((problem["file"], problem["section"], problem["key"]), (gateway.ini, "api:broken", "path"))
        lines: List[str] = [line for line in gateway.lines if "Traceback" in line]
        self.assertEqual(lines, [])
